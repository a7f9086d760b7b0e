"""Sampler accuracy against the number of steps, for every solver, on Gaussian-mixture data with the exact score.

    python benchmarks/bench_sampler_accuracy.py [--quick]

**Data.** A 2-D mixture of four Gaussians (unequal weights, anisotropic covariances), so the exact sampler output is
known in law and a reference sample can be drawn directly.

**Model.** Every sampler gets the same exact model: the closed-form VP epsilon of the mixture under diffusers'
default DDPM schedule (linear betas, 1000 steps), ``eps(x_t) = -sqrt(1 - abar) * grad log p_t(x_t)`` with
``p_t = sum_k pi_k N(sqrt(abar) mu_k, abar C_k + (1 - abar) I)``, in float64. The HOLD solvers use it through
``HOLDScheduler(prediction_type="vp_epsilon")``, which then gives HOLD's exact score (``docs/HOLD_MATH.md``
section 4), so every difference below is discretisation error (plus Monte Carlo noise).

**Solvers.** diffusers' ``DDIMScheduler`` (eta 0), ``DDPMScheduler`` (ancestral), ``DPMSolverMultistepScheduler``
(2nd order) and ``EulerDiscreteScheduler``; ``HOLDScheduler`` orders 2 and 3 with ``euler_maruyama``, ``sscs`` and
``ddim`` on the quadratic grid.

**Metrics.** Error of the mean (Euclidean), relative Frobenius error of the covariance and the sliced Wasserstein-1
distance (64 fixed directions) between ``N`` generated points and ``N`` exact draws; the noise floor is the same
distance between two independent exact samples. For each solver, the fewest steps from which the sliced Wasserstein
distance stays within 5 % of its 1000-step value (counting model evaluations: one per step for all of these
solvers); a solver whose 1000-step run is not finite is compared with its largest finite run (``reference_steps``).
Results go to ``benchmarks/results/sampler_accuracy.json``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from harness import ForeignLoad, environment, finish
from tqdm.auto import tqdm

from diffusers_hold import HOLDScheduler

RESULTS = Path(__file__).parent / "results" / "sampler_accuracy.json"
WEIGHTS = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
MEANS = torch.tensor([[1.5, 1.0], [-1.5, 0.5], [0.0, -1.5], [1.0, -0.5]], dtype=torch.float64)
COVARIANCES = torch.stack(
    [
        torch.tensor([[0.10, 0.04], [0.04, 0.05]]),
        torch.tensor([[0.20, -0.05], [-0.05, 0.10]]),
        torch.tensor([[0.05, 0.00], [0.00, 0.30]]),
        torch.tensor([[0.02, 0.00], [0.00, 0.02]]),
    ]
).double()
STEPS = (10, 15, 20, 25, 35, 50, 75, 100, 250, 1000)


def mixture_moments() -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and covariance of the mixture."""
    mean = WEIGHTS @ MEANS
    centred = MEANS - mean
    covariance = (WEIGHTS[:, None, None] * (COVARIANCES + centred[:, :, None] * centred[:, None, :])).sum(0)
    return mean, covariance


def draw_mixture(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` exact draws from the mixture."""
    component = torch.multinomial(WEIGHTS, n, replacement=True, generator=generator)
    chol = torch.linalg.cholesky(COVARIANCES)
    noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return MEANS[component] + (chol[component] @ noise[:, :, None])[:, :, 0]


class ExactMixtureEpsilon:
    """The VP epsilon of the mixture at (possibly fractional) DDPM timesteps, interpolated in log-SNR."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        table = alphas_cumprod.double()
        self.log_snr = torch.log(table / (1 - table)).numpy()

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        t = float(torch.as_tensor(timestep).flatten()[0])
        log_snr = np.interp(t, np.arange(len(self.log_snr)), self.log_snr)
        alpha_bar = 1 / (1 + math.exp(-log_snr))
        points = x.reshape(len(x), 2).double()
        means = math.sqrt(alpha_bar) * MEANS  # (K, 2)
        covariances = alpha_bar * COVARIANCES + (1 - alpha_bar) * torch.eye(2, dtype=torch.float64)
        precisions = torch.linalg.inv(covariances)  # (K, 2, 2)
        centred = points[:, None, :] - means[None]  # (N, K, 2)
        whitened = torch.einsum("kij,nkj->nki", precisions, centred)
        log_density = -0.5 * (centred * whitened).sum(-1) - 0.5 * torch.logdet(covariances) + torch.log(WEIGHTS)
        responsibilities = torch.softmax(log_density, dim=1)
        score = -(responsibilities[:, :, None] * whitened).sum(1)
        return (-math.sqrt(1 - alpha_bar) * score).to(x.dtype).reshape(x.shape)


def sample_vp(scheduler, steps: int, n: int, seed: int) -> torch.Tensor:
    """Sample with a diffusers VP scheduler and the exact epsilon."""
    model = ExactMixtureEpsilon(DDPMScheduler().alphas_cumprod)
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    x = torch.randn(n, 2, 1, 1, generator=generator, dtype=torch.float64) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x.reshape(n, 2)


def sample_hold(order: int, solver: str, steps: int, n: int, seed: int) -> torch.Tensor:
    """Sample the HOLD state with the exact score (zero-shot through the exact VP epsilon); return the positions."""
    base = DDPMScheduler().config  # HOLD never clips; only the VP schedule is read
    scheduler = HOLDScheduler.from_config(
        base, order=order, prediction_type="vp_epsilon", solver=solver, timestep_spacing="quadratic"
    )
    model = ExactMixtureEpsilon(DDPMScheduler().alphas_cumprod)
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    state = torch.randn(n, 2 * order, 1, 1, generator=generator, dtype=torch.float64) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = model(scheduler.scale_model_input(state, t, full_state=True), t)
        state = scheduler.step(eps, t, state, generator=generator, full_state=True).prev_sample
    return state[:, :2].reshape(n, 2)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> float:
    """Mean over directions of the 1-D Wasserstein-1 distance between equal-size samples."""
    pa, pb = (a @ directions.T).sort(0).values, (b @ directions.T).sort(0).values
    return float((pa - pb).abs().mean())


def solvers() -> dict:
    """Name -> function(steps, n, seed) returning samples."""
    base = DDPMScheduler(clip_sample=False).config  # the mixture reaches beyond [-1, 1]
    table = {
        "ddim": lambda s, n, seed: sample_vp(DDIMScheduler.from_config(base), s, n, seed),
        "ddpm": lambda s, n, seed: sample_vp(DDPMScheduler.from_config(base), s, n, seed),
        "dpmsolver++2m": lambda s, n, seed: sample_vp(DPMSolverMultistepScheduler.from_config(base), s, n, seed),
        "euler": lambda s, n, seed: sample_vp(EulerDiscreteScheduler.from_config(base), s, n, seed),
    }
    for order in (2, 3):
        for solver in ("euler_maruyama", "sscs", "ddim"):
            table[f"hold{order}_{solver}"] = lambda s, n, seed, o=order, v=solver: sample_hold(o, v, s, n, seed)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Fewer points and step counts (about a minute).")
    parser.add_argument("--num_samples", type=int, default=None)
    args = parser.parse_args()
    n = args.num_samples or (5000 if args.quick else 40000)
    step_counts = (10, 25, 50, 100, 1000) if args.quick else STEPS
    load, start = ForeignLoad(), time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    reference = draw_mixture(n, generator)
    directions = torch.randn(64, 2, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)
    mean, covariance = mixture_moments()
    floor = sliced_wasserstein(draw_mixture(n, generator), reference, directions)

    results: dict = {"num_samples": n, "steps": list(step_counts), "noise_floor_sw": floor, "solvers": {}}
    for name, sample in tqdm(solvers().items(), desc="solvers"):
        rows = []
        for steps in step_counts:
            x = sample(steps, n, 1)
            if not torch.isfinite(x).all():
                rows.append({"steps": steps, "sw": math.inf, "mean_error": math.inf, "cov_error": math.inf})
                continue
            rows.append(
                {
                    "steps": steps,
                    "sw": sliced_wasserstein(x, reference, directions),
                    "mean_error": float((x.mean(0) - mean).norm()),
                    "cov_error": float((torch.cov(x.T) - covariance).norm() / covariance.norm()),
                }
            )
        finite = [row for row in rows if math.isfinite(row["sw"])]
        best_run = finite[-1] if finite else None  # the 1000-step run, or the most steps that stayed finite
        fewest = None
        if best_run is not None:
            # the first step count from which the distance stays within 5 % of the reference's
            for row in reversed(rows):
                if not math.isfinite(row["sw"]) or row["sw"] > 1.05 * best_run["sw"]:
                    break
                fewest = row["steps"]
        results["solvers"][name] = {
            "rows": rows,
            "reference_steps": None if best_run is None else best_run["steps"],
            "fewest_steps_within_5pct": fewest,
        }
    best = min(results["solvers"].items(), key=lambda item: item[1]["fewest_steps_within_5pct"] or math.inf)
    results["best_solver"] = {"name": best[0], "steps": best[1]["fewest_steps_within_5pct"]}
    results["environment"] = {**environment(), "foreign_cpu_share": load.share(torch.get_num_threads())}
    results["wall_time_s"] = time.perf_counter() - start
    finish(results, RESULTS.with_name("sampler_accuracy_quick.json") if args.quick else RESULTS, print_report)


def print_report(results: dict) -> None:
    print(f"{results['num_samples']} samples per run; noise floor of the sliced Wasserstein distance "
          f"{results['noise_floor_sw']:.4f}\n")  # fmt: skip
    steps = results["steps"]
    print(f"{'solver':<22}" + "".join(f"{s:>9}" for s in steps) + "   fewest steps within 5 % of 1000-step SW")
    for name, entry in results["solvers"].items():
        cells = "".join(f"{row['sw']:9.4f}" for row in entry["rows"])
        note = "" if entry["reference_steps"] == steps[-1] else f" (vs {entry['reference_steps']} steps)"
        print(f"{name:<22}{cells}   {entry['fewest_steps_within_5pct']}{note}")
    print("\ncovariance relative error:")
    for name, entry in results["solvers"].items():
        print(f"{name:<22}" + "".join(f"{row['cov_error']:9.4f}" for row in entry["rows"]))
    best = results["best_solver"]
    print(f"\nbest: {best['name']} within 5 % of its 1000-step accuracy at {best['steps']} model evaluations "
          "(target <= 25)")  # fmt: skip


if __name__ == "__main__":
    main()
