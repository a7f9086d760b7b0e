"""Is the residual noise of HOLD's generations the sampler's or the model's? The final models of a frontier study,
sampled by several samplers.

    python benchmarks/bench_frontier.py --study photos8              # trains and keeps the models first
    python benchmarks/bench_sampler_vs_model.py --study photos8 [--seeds 0 1 2] [--train_steps N | --quick]

**Question** (issue 15). On RGB natural-image patches HOLD-3's generations look like noisy, blotchy renditions of
training images. If the noise comes from the sampler, more steps, another solver or the final denoising step remove
it; if it comes from the model (its small-t score), no sampler does.

**Measurement.** For each seed, the final model of each method (saved by ``bench_frontier.py`` under
``--state_dir``) is sampled with the samplers below (same generator seed, ``num_samples`` generations) and scored as
the bench scores (1/3 rule, closer than the held-out 5th percentile, FD-PCA, precision, recall), plus the
*roughness*: the mean squared difference between an image and its 3x3 box blur, relative to the held-out images'
(1 = as rough as real images). HOLD samplers: Euler-Maruyama on the bench's quadratic grid at 200 steps (the
bench's) and 1000, the same at 200 without the final denoising step, and ``exp_multistep`` (2nd order,
``sde-dpmsolver++``, log1p grid) at 50 calls. DDPM: DDIM at 50 steps (the bench's) and ancestral DDPM at 1000.
Results go to ``benchmarks/results/frontier/<study>_samplers.json`` and a grid ``.png`` (seed 0: each sampler's first
generations, one row per method and sampler, under a row of held-out images).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_frontier import RESULTS, STUDIES, mean_interval, state_folder, study_config
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline
from harness import ForeignLoad, environment, finish

from diffusers_hold import HOLDPipeline, HOLDScheduler
from diffusers_hold.bench import BENCH_METHODS, EXP_SDE_SAMPLER, build_model, evaluate, load_bench_data
from diffusers_hold.utils import atomic_output, image_grid, to_pil_image

# sampler name -> (steps, settings on top of the bench's scheduler)
HOLD_SAMPLERS = {
    "em_200": (200, {}),
    "em_1000": (1000, {}),
    "em_200_no_final_denoise": (200, {"denoise_final": False}),
    "exp_sde_50": (50, EXP_SDE_SAMPLER),
}
DDPM_SAMPLERS = {"ddim_50": 50, "ddpm_1000": 1000}
SCORES = ("memorized", "closer_than_held_out", "frechet_distance", "precision", "recall", "roughness")
GRID_COLUMNS = 12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", choices=sorted(STUDIES), default="photos8")
    parser.add_argument("--methods", nargs="+", default=["ddpm", "hold3"], choices=BENCH_METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num_evaluations", type=int, default=6, help="the frontier run's (its state folder)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--train_steps", type=int, default=None, help="the models of bench_frontier.py --train_steps")
    length.add_argument("--quick", action="store_true", help="the models of bench_frontier.py --quick")
    parser.add_argument("--state_dir", type=Path, default=Path("outputs/frontier_state"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    config, stem = study_config(args.study, args.methods, args.num_evaluations, args.train_steps, args.quick)
    start, load = time.perf_counter(), ForeignLoad()
    scores: dict[str, dict[str, list[dict]]] = {}
    grid_rows = []
    for seed in args.seeds:
        run_config = replace(config, seed=seed)
        train, held_out = load_bench_data(run_config)
        if seed == args.seeds[0]:
            grid_rows.append(held_out[:GRID_COLUMNS])
        for method in args.methods:
            model = load_final_model(
                method, run_config, state_folder(args.state_dir, stem, config, seed), train.shape[1]
            )
            for sampler, generated in sample_all(model, run_config).items():
                result = {k: v for k, v in evaluate(generated, train, held_out, run_config).items() if k in SCORES}
                result["roughness"] = roughness(generated) / roughness(held_out)
                scores.setdefault(f"{method}/{sampler}", []).append(result)
                print(f"seed {seed} {method}/{sampler}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
                if seed == args.seeds[0]:
                    grid_rows.append(generated[:GRID_COLUMNS])
    summary = {name: {k: mean_interval([r[k] for r in runs]) for k in SCORES} for name, runs in scores.items()}
    env = environment(("torch", "diffusers"))
    env["foreign_cpu_share"] = load.share(env["cpu_count"])
    results = {
        "study": args.study,
        "seeds": args.seeds,
        "per_seed": scores,
        "summary": summary,
        "environment": env,
        "wall_time_s": time.perf_counter() - start,
    }
    output = RESULTS / f"{stem}_samplers.json"
    finish(results, output, print_report)
    grid = image_grid([to_pil_image((image + 1) / 2) for row in grid_rows for image in row], cols=GRID_COLUMNS,
                      scale=max(1, 64 // config.resolution))  # fmt: skip
    with atomic_output(output.with_suffix(".png")) as temporary:
        grid.save(temporary, format="png")
    print(f"Wrote {output.with_suffix('.png')} (rows: held-out, then {', '.join(scores)})")


def load_final_model(method: str, config, state_dir: Path, channels: int):
    """The final model of ``method`` that ``bench_frontier.py`` saved, with its training scheduler."""
    path = state_dir / f"{method}.pt"
    if not path.exists():
        raise SystemExit(f"{path} does not exist: run benchmarks/bench_frontier.py --study ... first.")
    saved = torch.load(path, weights_only=True)
    if saved["step"] != config.train_steps:
        raise SystemExit(f"{path} is at step {saved['step']}, not {config.train_steps}: finish the frontier run.")
    model, scheduler = build_model(BENCH_METHODS[method], config, channels)
    model.load_state_dict(saved["model"])
    return model.eval(), scheduler


@torch.no_grad()
def sample_all(model_and_scheduler, config) -> dict[str, torch.Tensor]:
    """Generations in ``[-1, 1]`` of every sampler that applies to the model, from one generator seed."""
    model, scheduler = model_and_scheduler
    out = {}
    if isinstance(scheduler, HOLDScheduler):
        for name, (steps, settings) in HOLD_SAMPLERS.items():
            pipe = HOLDPipeline(unet=model, scheduler=HOLDScheduler.from_config(scheduler.config, **settings))
            pipe.set_progress_bar_config(disable=True)
            images = pipe(batch_size=config.num_samples, num_inference_steps=steps, output_type="pt",
                          generator=torch.Generator().manual_seed(config.seed + 1)).images  # fmt: skip
            out[name] = images.float() * 2 - 1
        return out
    for name, steps in DDPM_SAMPLERS.items():
        if name.startswith("ddim"):
            pipe = DDIMPipeline(unet=model, scheduler=DDIMScheduler.from_config(scheduler.config))
        else:
            pipe = DDPMPipeline(unet=model, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=config.num_samples, num_inference_steps=steps, output_type="np",
                      generator=torch.Generator().manual_seed(config.seed + 1)).images  # fmt: skip
        out[name] = torch.from_numpy(images).permute(0, 3, 1, 2).float() * 2 - 1
    return out


def roughness(images: torch.Tensor) -> float:
    """Mean squared difference between the images and their 3x3 box blur (reflecting edges)."""
    channels = images.shape[1]
    kernel = torch.full((channels, 1, 3, 3), 1 / 9, dtype=images.dtype)
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="reflect"), kernel, groups=channels)
    return float(((images - blurred) ** 2).mean())


def print_report(results: dict) -> None:
    print(f"\n{results['study']}: mean [95 % t-interval] over seeds {results['seeds']}")
    print(f"{'method/sampler':<34}" + "".join(f"{k:>22}" for k in SCORES))
    for name, row in results["summary"].items():
        cells = []
        for key in SCORES:
            mean, ci = row[key]["mean"], row[key]["ci"]
            cells.append(f"{mean:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
        print(f"{name:<34}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
