"""Kim et al.'s trajectory score, measured: does early overestimation of the final image separate copies?

    python benchmarks/bench_trajectory_separation.py [--train_steps 1000]

**Claim** (Kim, Kim and Lee, *How Diffusion Models Memorize*, 2025; ``docs/MEMORIZATION.md``
metric 5). Regressing each latent of a sampling trajectory on the
final image and the initial noise, ``x^(k) ~ w0 x_final + wT x_T``, memorized generations show ``w0`` above the
schedule's own weight in the early steps (the final image "appears" too soon) and ``wT`` collapsing; the paper
reports correlations of 0.70-0.92 with SSCD similarity.

**Measurement.** The benchmark's DDPM recipe (:mod:`diffusers_hold.bench`: 32 digits, the 177k-parameter UNet) is
trained for ``--train_steps`` updates, a point where it copies some but not all of its generations (about half at
1,000 updates). ``--num_samples`` generations are drawn with diffusers' ``DDIMScheduler`` (50 steps), recording
every step with :class:`~diffusers_hold.metrics.TrajectoryRecorder`. Each generation is labelled memorized by the
1/3 rule against the training images; its score is
:meth:`~diffusers_hold.metrics.TrajectoryDecomposition.overestimation` (and ``noise_suppression``) against
:func:`~diffusers_hold.metrics.reference_weights` of the DDIM schedule, over the first half of the steps. Reported:
the AUC of each score for memorized against novel generations (Mann-Whitney, ties counted half), and the Spearman
correlation of the score with the similarity ``1 - d1/d2``. Results go to
``benchmarks/results/trajectory_separation.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from harness import ForeignLoad, auc, environment, finish

from diffusers_hold.bench import BENCH_METHODS, BenchConfig, build_model, load_bench_data, run_bench
from diffusers_hold.metrics import TrajectoryRecorder, decompose_trajectory, nn_ratio_memorization, reference_weights

RESULTS = Path(__file__).resolve().parent / "results" / "trajectory_separation.json"


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


@torch.no_grad()
def sample_with_trajectories(unet, scheduler, num_samples: int, steps: int, seed: int):
    """DDIM samples and their recorded trajectories (the loop of ``DDIMPipeline``, with the recorder per step)."""
    generator = torch.Generator().manual_seed(seed)
    size, channels = unet.config.sample_size, unet.config.in_channels
    sample = torch.randn(num_samples, channels, size, size, generator=generator)
    recorder = TrajectoryRecorder(sample)
    scheduler.set_timesteps(steps)
    for index, t in enumerate(scheduler.timesteps):
        sample = scheduler.step(unet(sample, t).sample, t, sample).prev_sample
        recorder(None, index, t, {"latents": sample})
    return sample, recorder.trajectory()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_steps", type=int, default=1000)
    parser.add_argument("--num_samples", type=int, default=512)
    parser.add_argument("--ddim_steps", type=int, default=50)
    parser.add_argument("--work_dir", default="outputs/trajectory_separation", help="Where the model is trained.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the model is tiny: one thread is faster than two here
    start, load = time.perf_counter(), ForeignLoad()
    config = BenchConfig(methods=["ddpm"], train_steps=args.train_steps, num_evaluations=1, seed=args.seed)
    run_bench(config, args.work_dir)
    train, _ = load_bench_data(config)
    state = torch.load(Path(args.work_dir) / "state" / "ddpm.pt", weights_only=True)
    unet, _ = build_model(BENCH_METHODS["ddpm"], config, channels=train.shape[1])
    unet.eval()
    unet.load_state_dict(state["model"])
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    final, trajectory = sample_with_trajectories(unet, scheduler, args.num_samples, args.ddim_steps, args.seed + 7)
    report = nn_ratio_memorization(final.clamp(-1, 1), train)
    memorized = report.memorized.numpy()
    similarity = 1 - report.ratio.numpy()
    decomposition = decompose_trajectory(trajectory)
    reference = reference_weights(scheduler)
    scores = {
        "overestimation": decomposition.overestimation(reference).numpy(),
        "noise_suppression": decomposition.noise_suppression(reference).numpy(),
    }
    env = environment(("torch", "diffusers"))
    env["foreign_cpu_share"] = load.share(env["cpu_count"])
    results = {
        "claim": "the trajectory overestimation score separates memorized from non-memorized generations",
        "settings": vars(args),
        "memorized_fraction": float(memorized.mean()),
        "num_memorized": int(memorized.sum()),
        "scores": {
            name: {
                "auc_memorized_vs_novel": auc(values, memorized),
                "spearman_with_similarity": spearman(values, similarity),
                "mean_memorized": float(values[memorized].mean()) if memorized.any() else None,
                "mean_novel": float(values[~memorized].mean()) if (~memorized).any() else None,
            }
            for name, values in scores.items()
        },
        "environment": env,
        "wall_time_s": time.perf_counter() - start,
    }
    finish(results, RESULTS, print_report)


def print_report(results: dict) -> None:
    print(f"{results['num_memorized']} of {results['settings']['num_samples']} generations memorized (1/3 rule)")
    print(f"{'score':<20}{'AUC':>8}{'Spearman':>10}{'mean (memorized)':>18}{'mean (novel)':>14}")

    def number(value, width: int, digits: int) -> str:  # a class with no member has no mean (None)
        return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.{digits}f}"

    for name, row in results["scores"].items():
        auc, rank = number(row["auc_memorized_vs_novel"], 8, 3), number(row["spearman_with_similarity"], 10, 3)
        print(f"{name:<20}{auc}{rank}{number(row['mean_memorized'], 18, 4)}{number(row['mean_novel'], 14, 4)}")


if __name__ == "__main__":
    main()
