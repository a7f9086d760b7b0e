"""Trajectory overestimation and the CFG gap on prompts: do they find the prompts a text-to-image model memorized?

    python benchmarks/bench_prompt_detection.py [--data digits] [--seeds 0 1 2] [--quick]

**Claims.** Kim, Kim and Lee (*How Diffusion Models Memorize*, 2025; seed ``003``): in memorized generations the
final image appears in the latents too early, so the early excess of its regression weight over the schedule's
(:meth:`~diffusers_hold.metrics.TrajectoryDecomposition.overestimation`), averaged over seeds of a prompt, scores the
prompt. Wen et al. (*Detecting, Explaining, and Mitigating Memorization in Diffusion Models*, 2024), the published
comparison: the magnitude of the text-conditional noise prediction, ``|| eps(x_t, c) - eps(x_t, "") ||``, is large
for memorized prompts, already at the first step (:class:`~diffusers_hold.metrics.CFGGapMonitor`).

**Measurement.** Per seed, the bench's text-conditional model (``t2i``: a ``UNet2DConditionModel`` trained with a
unique caption per training image and 10 % empty captions, :mod:`diffusers_hold.bench`) is trained for
``--train_steps`` updates; its weights are kept at ``--num_checkpoints`` evenly spaced points. At each checkpoint
every prompt, the ``train_size`` training captions and as many captions never trained on, is sampled
``--generations_per_prompt`` times (DDIM, the bench's steps and guidance scale, the same starting noises for every
prompt), recording each trajectory and the CFG gap at every step. A prompt is **memorized** when more than half of
its generations are copies of a training image (1/3 rule). Each detector scores a prompt by the mean over its
generations. Reported per checkpoint: the share of memorized prompts and the AUC of each score for memorized against
the other prompts (Mann-Whitney), over all prompts and over the training prompts alone (the harder question: which
of the captions the model saw did it memorize?); means over seeds with 95 % t-intervals. A seed whose checkpoint has
fewer than two prompts in a class gives no AUC there. Results go to ``benchmarks/results/prompt_detection/<data>.json``
and a figure of AUC along training beside it; trained weights to ``--state_dir/<data>/seed<k>/``, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from bench_frontier import mean_interval
from diffusers import DDIMScheduler
from harness import ForeignLoad, auc, environment, finish

from diffusers_hold.bench import BENCH_METHODS, BenchConfig, build_model, load_bench_data, train_and_evaluate
from diffusers_hold.bench.text import BenchTextEncoder, bench_caption
from diffusers_hold.metrics import (
    CFGGapMonitor,
    TrajectoryRecorder,
    decompose_trajectory,
    nn_ratio_memorization,
    reference_weights,
)

RESULTS = Path(__file__).resolve().parent / "results" / "prompt_detection"
SCORES = ("overestimation", "noise_suppression", "cfg_gap", "cfg_gap_first_step")
MIN_CLASS_SIZE = 2  # prompts each class needs at a checkpoint for an AUC


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="digits", help="digits, photos, lfw or an image folder (as the bench).")
    parser.add_argument("--resolution", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train_steps", type=int, default=2000)
    parser.add_argument("--num_checkpoints", type=int, default=6)
    parser.add_argument("--generations_per_prompt", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="300 updates, 2 checkpoints, 2 generations: a smoke run.")
    parser.add_argument("--state_dir", type=Path, default=Path("outputs/prompt_detection_state"))
    parser.add_argument("--output", type=Path, default=None, help="Default: results/prompt_detection/<data>.json")
    args = parser.parse_args()
    if args.quick:
        args.train_steps, args.num_checkpoints, args.generations_per_prompt = 300, 2, 2
    torch.set_num_threads(1)  # the model is tiny: one thread is faster than two here
    name = f"{Path(args.data).name}{'_quick' if args.quick else ''}"
    output = args.output or RESULTS / f"{name}.json"
    start, load = time.perf_counter(), ForeignLoad()
    runs = {}
    for seed in args.seeds:
        config = BenchConfig(
            data=args.data, resolution=args.resolution, methods=["t2i"], train_steps=args.train_steps,
            num_evaluations=args.num_checkpoints, num_samples=64 if args.quick else 256, seed=seed,
        )  # fmt: skip
        runs[str(seed)] = score_seed(config, args.generations_per_prompt, args.state_dir / name / f"seed{seed}")
        print(f"seed {seed} (step: memorized prompts, AUC overestimation / CFG gap): " + ", ".join(
            f"{c['step']}: {c['memorized_prompts']:.0%}, {c['all_prompts']['overestimation'] or math.nan:.2f} / "
            f"{c['all_prompts']['cfg_gap'] or math.nan:.2f}" for c in runs[str(seed)]
        ))  # fmt: skip
    env = environment(("torch", "diffusers"))
    env["foreign_cpu_share"] = load.share(env["cpu_count"])
    results = {
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "per_seed": runs,
        "summary": summarize(runs),
        "environment": env,
        "wall_time_s": time.perf_counter() - start,
    }
    finish(results, output, print_report)
    plot_auc(results, output.with_suffix(".png"))


def score_seed(config: BenchConfig, generations: int, state_dir: Path) -> list[dict]:
    """Train the seed's ``t2i`` model (resuming), then score every prompt at every kept checkpoint."""
    state_dir.mkdir(parents=True, exist_ok=True)
    method = BENCH_METHODS["t2i"]
    train, held_out = load_bench_data(config)

    def keep_checkpoint(step: int, *_) -> None:  # the run's state is saved just before this call
        shutil.copyfile(state_dir / "t2i.pt", state_dir / f"t2i_step{step}.pt")

    train_and_evaluate(method, train, held_out, config, state_dir, on_evaluation=keep_checkpoint)
    unet, _ = build_model(method, config, channels=train.shape[1])
    checkpoints = []
    for step in config.evaluation_steps():
        unet.load_state_dict(torch.load(state_dir / f"t2i_step{step}.pt", weights_only=True)["model"])
        checkpoints.append({"step": step, **score_prompts(unet.eval(), train, config, generations)})
    return checkpoints


@torch.no_grad()
def score_prompts(unet, train: torch.Tensor, config: BenchConfig, generations: int) -> dict:
    """Sample every prompt ``generations`` times and score it with each detector; label it by its copies."""
    prompts = [bench_caption(i) for i in range(2 * len(train))]  # the training captions, then unseen ones
    trained = np.arange(len(prompts)) < len(train)
    encoder = BenchTextEncoder.shared(config.seed)
    captions = [prompt for prompt in prompts for _ in range(generations)]
    states = torch.cat([encoder.encode([""]).expand(len(captions), -1, -1), encoder.encode(captions)])
    generator = torch.Generator().manual_seed(config.seed + 1000)
    noise = torch.randn(generations, train.shape[1], config.resolution, config.resolution, generator=generator)
    sample = noise.repeat(len(prompts), 1, 1, 1)  # generation g of every prompt starts from the same noise
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(config.ddim_steps)
    recorder = TrajectoryRecorder(sample)
    with CFGGapMonitor(unet) as monitor:
        for index, t in enumerate(scheduler.timesteps):
            prediction = unet(torch.cat([sample, sample]), t, encoder_hidden_states=states).sample
            unconditional, conditional = prediction.chunk(2)
            guided = unconditional + config.guidance_scale * (conditional - unconditional)
            sample = scheduler.step(guided, t, sample).prev_sample
            recorder(None, index, t, {"latents": sample})
    decomposition = decompose_trajectory(recorder.trajectory())
    reference = reference_weights(scheduler)
    per_generation = {
        "overestimation": decomposition.overestimation(reference),
        "noise_suppression": decomposition.noise_suppression(reference),
        "cfg_gap": monitor.mean_gap(),
        "cfg_gap_first_step": monitor.first_step_gap(),
    }
    copies = nn_ratio_memorization(sample.clamp(-1, 1), train)
    copied = copies.memorized.numpy().reshape(len(prompts), generations)
    own_image = copies.nearest_index.numpy().reshape(len(prompts), generations) == np.arange(len(prompts))[:, None]
    memorized = copied.mean(1) > 0.5
    scores = {key: value.numpy().reshape(len(prompts), generations).mean(1) for key, value in per_generation.items()}
    return {
        "memorized_prompts": float(memorized.mean()),
        "memorized_training_prompts": float(memorized[trained].mean()),
        "memorized_unseen_prompts": float(memorized[~trained].mean()),
        "copies_of_own_image": float((copied & own_image)[trained].sum() / max(copied[trained].sum(), 1)),
        "all_prompts": class_aucs(scores, memorized),
        "training_prompts": class_aucs({key: value[trained] for key, value in scores.items()}, memorized[trained]),
        "prompts": {"memorized": memorized.tolist(), **{key: value.tolist() for key, value in scores.items()}},
    }


def class_aucs(scores: dict[str, np.ndarray], memorized: np.ndarray) -> dict[str, float | None]:
    """AUC of each score for memorized against other prompts; ``None`` when a class has too few prompts."""
    if min(memorized.sum(), (~memorized).sum()) < MIN_CLASS_SIZE:
        return {key: None for key in scores}
    return {key: auc(value, memorized) for key, value in scores.items()}


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """Per checkpoint: means over seeds with t-intervals of the memorized shares and of each AUC."""
    summary = []
    for position, step in enumerate(checkpoint["step"] for checkpoint in next(iter(runs.values()))):
        at_step = [checkpoints[position] for checkpoints in runs.values()]
        row = {"step": step}
        for share in ("memorized_prompts", "memorized_training_prompts", "memorized_unseen_prompts"):
            row[share] = mean_interval([checkpoint[share] for checkpoint in at_step])
        for group in ("all_prompts", "training_prompts"):
            row[group] = {}
            for key in SCORES:
                values = [checkpoint[group][key] for checkpoint in at_step if checkpoint[group][key] is not None]
                row[group][key] = mean_interval(values) if values else None
        summary.append(row)
    return summary


def _cell(summary: dict | None, num_seeds: int, percent: bool = False) -> str:
    """``mean [interval]``, with the number of seeds behind it when some seeds gave no value."""
    if summary is None:
        return "n/a"
    scale, unit = (100, " %") if percent else (1, "")
    text = f"{summary['mean'] * scale:.2f}{unit}" if not percent else f"{summary['mean'] * scale:.0f}{unit}"
    if summary["ci"] is not None:
        low, high = (scale * bound for bound in summary["ci"])
        text += f" [{low:.0f}, {high:.0f}]" if percent else f" [{low:.2f}, {high:.2f}]"
    return text + ("" if len(summary["values"]) == num_seeds else f" ({len(summary['values'])} seeds)")


def print_report(results: dict) -> None:
    num_seeds = len(results["per_seed"])
    header = ["step", "memorized prompts (training / unseen)"] + [f"AUC {key}" for key in SCORES]
    for group in ("all_prompts", "training_prompts"):
        print(f"\n{group.replace('_', ' ')}:\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for row in results["summary"]:
            shares = [_cell(row[f"memorized_{kind}_prompts"], num_seeds, True) for kind in ("training", "unseen")]
            aucs = [_cell(row[group][key], num_seeds) for key in SCORES]
            print(f"| {row['step']} | {' / '.join(shares)} | " + " | ".join(aucs) + " |")


def plot_auc(results: dict, path: Path) -> None:
    """AUC of each detector along training (mean over seeds, seeds as dots), and the share of memorized prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    steps = [row["step"] for row in results["summary"]]
    for axis, group in zip(axes[:2], ("all_prompts", "training_prompts"), strict=True):
        for key in SCORES:
            means = [row[group][key]["mean"] if row[group][key] else math.nan for row in results["summary"]]
            (line,) = axis.plot(steps, means, marker="o", label=key)
            for step, row in zip(steps, results["summary"], strict=True):
                if row[group][key]:
                    axis.scatter([step] * len(row[group][key]["values"]), row[group][key]["values"], s=8,
                                 color=line.get_color(), alpha=0.4)  # fmt: skip
        axis.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
        axis.set(title=f"AUC, {group.replace('_', ' ')}", xlabel="training updates", ylim=(0, 1.02))
    axes[0].legend(fontsize=8)
    for share in ("memorized_training_prompts", "memorized_unseen_prompts"):
        axes[2].plot(steps, [row[share]["mean"] for row in results["summary"]], marker="o", label=share)
    axes[2].set(title="memorized prompts (mean over seeds)", xlabel="training updates", ylim=(0, 1.02))
    axes[2].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
