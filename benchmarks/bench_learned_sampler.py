"""Few-step HOLD sampling of learned models: FD-PCA of ``exp_multistep`` at 10-50 calls against 250-step references.

    python benchmarks/bench_learned_sampler.py [--part {all,native,zero_shot}] [--train_steps 1200]
        [--num_samples 512] [--models_dir DIR] [--train_seed 0] [--samplers NAME ...]

**Models.** Two 1.1M-parameter UNets of the digits demo's architecture (``examples/train_unconditional_digits.py``)
trained the same way (``--train_steps`` updates of batch 64, AdamW 2e-3 with cosine decay, ``--train_seed``) on
scikit-learn's 1,797 digits at 16x16: a native HOLD-3 model (``HOLDUNet2DModel``, predicting the last block's noise)
and a DDPM baseline (``UNet2DModel`` with diffusers' ``DDPMScheduler``, linear betas). Both are saved under
``--models_dir`` and reused by later runs. A different ``--train_seed`` trains (and keeps) models of its own, to check
on a model the settings were not chosen on; ``--samplers`` restricts a run to the named samplers (the keys of the
report, without ``@calls``).

**Samplers.** Native HOLD-3: Euler-Maruyama and SSCS at 250 calls (the references) and ``exp_multistep`` at 10, 25
and 50 calls (``dpmsolver`` at solver orders 2 and 3, ``dpmsolver++`` and ``sde-dpmsolver++`` at 2; ``log1p``
grid, no final denoising call). Zero-shot HOLD-3 on the DDPM model (``prediction_type="vp_epsilon"``):
``exp_multistep`` (the same algorithm types, ``dpmsolver`` and ``dpmsolver++`` also at order 3) at 10 and 25 calls
against diffusers' ``DPMSolverMultistepScheduler`` (2M, its defaults) and DDIM on the same model and calls; the
``dpmsolver++`` and ``sde-dpmsolver++`` types also started late (``_late``: ``sampling_T=3.5``), and DPM-Solver++ 2M
started where those first call the model (DDPM timestep 698), so that both skip the same noise levels; and
``dpmsolver++`` / ``sde-dpmsolver++`` with ``timestep_spacing="vp_linspace"`` and ``lower_order_final=True`` (the
VP model called at DPM-Solver++'s evenly spaced timesteps, the last step first order; ``_vp``, and ``_vp_late``
started at 3.5), the README's recommendation for zero-shot sampling.

**Metric.** Fréchet distance in a 32-component PCA space fitted on the digits
(:class:`diffusers_hold.metrics.PCAFeatures`) between ``--num_samples`` generations and the 1,797 digits, three
sampling seeds each (mean and spread), and for the
native model the standard deviation of each auxiliary block at the end (a diverging ODE shows here first). Targets
(issue 13): native ``exp_multistep`` at 25 calls within 10 % of the 250-call Euler-Maruyama FD with finite, O(1)
auxiliary blocks; zero-shot at 10 and 25 calls within 5 % of DPM-Solver++ 2M. Results go to
``benchmarks/results/learned_sampler.json`` (``--part native`` or ``zero_shot``: one half, with only its model
trained, to ``learned_sampler_<part>.json``; a ``--train_seed`` other than 0 adds ``_train_seed<n>`` to the name).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_sampler_accuracy import FEW_STEP as FEW_STEP_GRID
from bench_sampler_accuracy import LATE_START, linspace_timesteps, vp_timestep_at_start
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from harness import ForeignLoad, environment, finish
from tqdm.auto import tqdm

from diffusers_hold import HOLDScheduler, HOLDUNet2DModel
from diffusers_hold.data import load_digits_images
from diffusers_hold.metrics import PCAFeatures, frechet_distance_from_features
from diffusers_hold.objective import noisy_input_and_target

RESULTS = Path(__file__).resolve().parent / "results" / "learned_sampler.json"
UNET = {
    "sample_size": 16,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
}
FEW_STEP = {"solver": "exp_multistep", **FEW_STEP_GRID}
# the README's zero-shot recommendation
RECOMMENDED_ZERO_SHOT = {
    **FEW_STEP,
    "solver_order": 2,
    "algorithm_type": "sde-dpmsolver++",
    "timestep_spacing": "vp_linspace",
    "lower_order_final": True,
}
SEEDS = (1, 2, 3)


def train(model, scheduler, images: torch.Tensor, steps: int, seed: int = 0):
    """The digits demo's loop: uniform timesteps, the scheduler's noising and target, MSE, AdamW with cosine decay."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    model.train()
    for _ in tqdm(range(steps), desc=f"training {type(model).__name__}", leave=False):
        batch = images[torch.randint(len(images), (64,), generator=generator)]
        if isinstance(scheduler, HOLDScheduler):
            timesteps = scheduler.sample_timesteps(len(batch), generator=generator)
        else:
            timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(batch),), generator=generator)
        model_input, target = noisy_input_and_target(scheduler, batch, timesteps, generator=generator)
        loss = F.mse_loss(model(model_input, timesteps).sample, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        decay.step()
    return model.eval()


def trained_model(kind: str, images: torch.Tensor, steps: int, models_dir: Path, seed: int = 0):
    """The native HOLD-3 (``"hold3"``) or DDPM (``"ddpm"``) digits model, trained once with ``seed`` and then loaded
    from ``models_dir``."""
    model_class, scheduler = (HOLDUNet2DModel, HOLDScheduler(order=3)) if kind == "hold3" else (UNet2DModel, None)
    folder = models_dir / (f"{kind}_{steps}" + (f"_seed{seed}" if seed else ""))
    if not folder.exists():
        extra = {"hold_order": 3} if kind == "hold3" else {}
        torch.manual_seed(seed)  # the initial weights
        unet = model_class(in_channels=1, out_channels=1, **extra, **UNET)
        train(unet, scheduler or DDPMScheduler(), images, steps, seed).save_pretrained(folder)
    return model_class.from_pretrained(folder).eval()


@torch.no_grad()
def sample_native(unet, scheduler: HOLDScheduler, calls: int, n: int, seed: int) -> tuple[torch.Tensor, list]:
    """HOLD-3 samples carrying the full state (the HOLDPipeline loop); returns positions and the aux blocks' std."""
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(calls)
    state = torch.randn(n, 3, 16, 16, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = unet(scheduler.scale_model_input(state, t, full_state=True), t).sample
        state = scheduler.step(eps, t, state, generator=generator, full_state=True).prev_sample
    return state[:, :1], [float(state[:, k].std()) for k in (1, 2)]


@torch.no_grad()
def sample_position(unet, scheduler, calls: int, n: int, seed: int, start: float | None = None) -> torch.Tensor:
    """Samples through the stock loop (position block only; a HOLD scheduler keeps the auxiliary blocks);
    ``start``: first timestep of a linearly spaced grid for a VP scheduler instead of its own."""
    generator = torch.Generator().manual_seed(seed)
    if start is None:
        scheduler.set_timesteps(calls)
    else:
        scheduler.set_timesteps(timesteps=linspace_timesteps(start, calls))
    x = torch.randn(n, 1, 16, 16, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = unet(scheduler.scale_model_input(x, t), t).sample
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_steps", type=int, default=1200)
    parser.add_argument("--num_samples", type=int, default=512)
    parser.add_argument("--models_dir", type=Path, default=Path("outputs/learned_sampler"))
    parser.add_argument("--part", choices=("all", "native", "zero_shot"), default="all")
    parser.add_argument("--train_seed", type=int, default=0)
    parser.add_argument("--samplers", nargs="+", default=None, help="run only these samplers (report keys)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    def selected(samplers: dict) -> list:
        return [item for item in samplers.items() if args.samplers is None or item[0] in args.samplers]

    load, start = ForeignLoad(), time.perf_counter()
    images, _ = load_digits_images(16)
    run_native, run_zero_shot = args.part in ("all", "native"), args.part in ("all", "zero_shot")
    features = PCAFeatures(32).fit(images)
    reference = features(images)

    def fd(samples: torch.Tensor) -> float:
        return frechet_distance_from_features(features(samples.clamp(-1, 1)), reference)

    native = {
        "euler_maruyama": ({"solver": "euler_maruyama", "timestep_spacing": "quadratic"}, (250,)),
        "sscs": ({"solver": "sscs", "timestep_spacing": "quadratic"}, (250,)),
        "exp2m": ({**FEW_STEP, "solver_order": 2}, (10, 25, 50)),
        "exp3m": ({**FEW_STEP, "solver_order": 3}, (10, 25, 50)),
        "exp2m_dpmpp": ({**FEW_STEP, "solver_order": 2, "algorithm_type": "dpmsolver++"}, (10, 25, 50)),
        "exp2m_sde": ({**FEW_STEP, "solver_order": 2, "algorithm_type": "sde-dpmsolver++"}, (10, 25, 50)),
    }
    results: dict = {
        "num_samples": args.num_samples,
        "train_steps": args.train_steps,
        "train_seed": args.train_seed,
        "native": {},
        "zero_shot": {},
    }
    ddpm_config = DDPMScheduler().config
    late = vp_timestep_at_start(3, LATE_START)
    zero_shot = {  # name -> (scheduler factory, first timestep of a VP grid or None)
        "dpmsolver++2m": (lambda: DPMSolverMultistepScheduler.from_config(ddpm_config), None),
        "dpmsolver++2m_late": (lambda: DPMSolverMultistepScheduler.from_config(ddpm_config), late),
        "ddim": (lambda: DDIMScheduler.from_config(ddpm_config), None),
    }
    for algorithm, tag in (("dpmsolver", ""), ("dpmsolver++", "_dpmpp"), ("sde-dpmsolver++", "_sde")):
        for order in (2, 3) if algorithm != "sde-dpmsolver++" else (2,):
            for late_tag, start_time in [("", None)] + ([("_late", LATE_START)] if algorithm != "dpmsolver" else []):
                settings = {"solver_order": order, "algorithm_type": algorithm, "sampling_T": start_time, **FEW_STEP}
                zero_shot[f"hold3_exp{order}m{tag}{late_tag}"] = (
                    lambda kw=settings: HOLDScheduler.from_config(
                        ddpm_config, order=3, prediction_type="vp_epsilon", **kw
                    ),
                    None,
                )
    # the VP model called at DPM-Solver++'s timesteps, the last step first order (RECOMMENDED_ZERO_SHOT: its settings)
    for name, settings in (
        ("hold3_exp2m_dpmpp_vp", {**RECOMMENDED_ZERO_SHOT, "algorithm_type": "dpmsolver++"}),
        ("hold3_exp2m_sde_vp", RECOMMENDED_ZERO_SHOT),
        ("hold3_exp2m_sde_vp_late", {**RECOMMENDED_ZERO_SHOT, "sampling_T": LATE_START}),
    ):
        zero_shot[name] = (
            lambda kw=settings: HOLDScheduler.from_config(ddpm_config, order=3, prediction_type="vp_epsilon", **kw),
            None,
        )
    unknown = set(args.samplers or ()) - set(native) - set(zero_shot)
    if unknown:
        parser.error(f"unknown --samplers {sorted(unknown)}; known: {sorted(native) + sorted(zero_shot)}")
    models = (images, args.train_steps, args.models_dir, args.train_seed)
    hold_unet = trained_model("hold3", *models) if run_native else None
    ddpm_unet = trained_model("ddpm", *models) if run_zero_shot else None
    train_seconds = time.perf_counter() - start
    for name, (settings, call_counts) in tqdm(selected(native) if run_native else (), desc="native HOLD-3"):
        scheduler = HOLDScheduler(order=3, **settings)
        for calls in call_counts:
            runs = [sample_native(hold_unet, scheduler, calls, args.num_samples, seed) for seed in SEEDS]
            results["native"][f"{name}@{calls}"] = summary([fd(x) for x, _ in runs], [aux for _, aux in runs])
    for name, (make, vp_start) in tqdm(selected(zero_shot) if run_zero_shot else (), desc="zero-shot"):
        for calls in (10, 25):
            runs = [sample_position(ddpm_unet, make(), calls, args.num_samples, seed, vp_start) for seed in SEEDS]
            results["zero_shot"][f"{name}@{calls}"] = summary([fd(x) for x in runs])
    results["train_seconds"] = train_seconds
    results["environment"] = {**environment(), "foreign_cpu_share": load.share(torch.get_num_threads())}
    results["wall_time_s"] = time.perf_counter() - start
    name = "learned_sampler" + ("" if args.part == "all" else f"_{args.part}")
    path = RESULTS.with_name(name + (f"_train_seed{args.train_seed}" if args.train_seed else "") + ".json")
    finish(results, path, print_report)


def summary(scores: list[float], aux_std: list | None = None) -> dict:
    mean = sum(scores) / len(scores)
    spread = (sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)) ** 0.5
    out = {"fd_pca": scores, "mean": mean, "sd": spread}
    if aux_std is not None:
        out["aux_std_max"] = max(max(row) for row in aux_std)
    return out


def print_report(results: dict) -> None:
    print(f"FD-PCA (32 components) of {results['num_samples']} samples against the 1,797 digits, seeds {SEEDS}")
    if results["native"]:
        print("\nnative HOLD-3 model:")
        for key, row in results["native"].items():
            print(f"  {key:<22} {row['mean']:7.3f} +- {row['sd']:.3f}   aux std max {row['aux_std_max']:.2f}")
        reference = results["native"]["euler_maruyama@250"]["mean"]
        best25 = min(v["mean"] for k, v in results["native"].items() if k.endswith("@25") and k.startswith("exp"))
        print(f"  best exp_multistep at 25 calls / Euler-Maruyama at 250: {best25 / reference:.3f} (target <= 1.10)")
    if not results["zero_shot"]:
        return
    print("\nzero-shot HOLD-3 on the DDPM model:")
    for key, row in results["zero_shot"].items():
        print(f"  {key:<22} {row['mean']:7.3f} +- {row['sd']:.3f}")
    rows = results["zero_shot"]
    for calls in (10, 25):
        if f"dpmsolver++2m@{calls}" not in rows:
            continue
        dpm = rows[f"dpmsolver++2m@{calls}"]["mean"]
        hold = {key: row["mean"] for key, row in rows.items() if key.startswith("hold3") and key.endswith(f"@{calls}")}
        line = f"  at {calls} calls, / DPM-Solver++ 2M:"
        if hold:
            line += f" best HOLD-3 exp_multistep {min(hold.values()) / dpm:.3f} (target <= 1.05)"
        if f"dpmsolver++2m_late@{calls}" in rows and hold:
            better_dpm = min(dpm, rows[f"dpmsolver++2m_late@{calls}"]["mean"])
            line += f"; best HOLD-3 / the better of DPM-Solver++ 2M's two starts {min(hold.values()) / better_dpm:.3f}"
        if f"hold3_exp2m_sde_vp@{calls}" in hold:
            recommended = hold[f"hold3_exp2m_sde_vp@{calls}"]
            line += f"; the recommended (sde-dpmsolver++, vp_linspace, lower_order_final) {recommended / dpm:.3f}"
        print(line)


if __name__ == "__main__":
    main()
