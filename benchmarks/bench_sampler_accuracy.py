"""Sampler accuracy against the number of model calls, for every solver, on two 2-D targets with the exact score.

    python benchmarks/bench_sampler_accuracy.py [--quick] [--num_samples N] [--steps N ...] [--solvers NAME ...]
        [--output FILE]

**Targets.** ``mixture``: four Gaussians (unequal weights, anisotropic covariances). ``ring``: twelve thin Gaussians
(standard deviation 0.04) on a circle of radius 1.5, a target with thin structure of a different shape. Exact draws
give the reference sample.

**Model.** Every sampler gets the same exact model: the closed-form VP epsilon of the target under diffusers' default
DDPM schedule (linear betas, 1000 steps), ``eps(x_t) = -sqrt(1 - abar) * grad log p_t(x_t)`` with
``p_t = sum_k pi_k N(sqrt(abar) mu_k, abar C_k + (1 - abar) I)``, in float64. The HOLD solvers use it through
``HOLDScheduler(prediction_type="vp_epsilon")``, which then gives HOLD's exact score (docs/HOLD_MATH.md, section 4),
so every difference below is discretisation error (plus Monte Carlo noise).

**Solvers.** diffusers' ``DDIMScheduler`` (eta 0), ``DDPMScheduler`` (ancestral), ``DPMSolverMultistepScheduler``
(``dpmsolver++``, 2nd order, its defaults; ``_late`` / ``_t3``: started where zero-shot HOLD-3 with ``sampling_T`` 3.5
/ 3.0 first calls the model, DDPM timestep 698 / 607) and ``EulerDiscreteScheduler``; ``HOLDScheduler`` orders 2 and 3
with ``euler_maruyama``, ``sscs`` and ``ddim`` on the quadratic grid, and ``exp_multistep`` (``dpmsolver``: noise part
in the ``R_t`` basis) at solver orders 2 and 3 on the ``log1p`` grid without the final denoising call; at HOLD order 3
also started late (``_late``: ``sampling_T=3.5``, where the position's log-SNR is -6.2, from the prior; ``exp3m_t3``:
``sampling_T=3.0``, log-SNR -4.9); at HOLD order 2 also over a longer horizon (``exp3m_T8``: ``T=8``, a
free setting when sampling zero-shot, where the prior matches the process's law better than at ``T=5``); and the
zero-shot recommendation, ``exp2m_vp`` / ``exp2m_sde_vp``
(``dpmsolver`` / ``sde-dpmsolver++`` at solver order 2 with ``timestep_spacing="vp_linspace"`` and
``lower_order_final=True``: the VP model called at DPM-Solver++'s evenly spaced timesteps, the last step first order).

**Metrics.** Sliced Wasserstein-1 distance (64 fixed directions) between ``N`` generated points and ``N`` exact draws,
error of the mean and relative Frobenius error of the covariance, each the mean over three sampling seeds (one with
``--quick``); the noise floor is the same distance between two independent exact samples. **Score**: for HOLD orders
2 and 3, ``SW(best HOLD solver at N calls) / SW(DPM-Solver++ 2M at N calls)`` for N in 10, 15, 25, 50 (target: <= 1
at every N, on both targets), and the same against the best of DPM-Solver++ 2M's three starts. Results go to
``benchmarks/results/sampler_accuracy.json`` and the plot of error against model calls to
``benchmarks/results/sampler_accuracy.png`` (``--output``: elsewhere). ``--steps`` and ``--solvers`` (names as in the
report; ``dpmsolver++2m`` is always run, the score's reference) restrict a run, e.g. to resolve one step count with
more samples than the floor of the full run allows.
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
STEPS = (10, 15, 25, 50, 100)
SCORED_STEPS = (10, 15, 25, 50)
# exp_multistep's few-step settings: the grid uniform in log(1 + t) and every model call a solver step
FEW_STEP = {"timestep_spacing": "log1p", "denoise_final": False}
VP_GRID = {"timestep_spacing": "vp_linspace", "denoise_final": False, "lower_order_final": True}
# HOLD-3 also started late, at t = 3.5 (`sampling_T`; exp3m also at 3.0), and DPM-Solver++ 2M at the noise level the
# model sees there
LATE_START = 3.5
LATER_START = 3.0
# HOLD-2 also run over a longer horizon (`T=8` instead of 5), where its prior matches the process's law
LONG_HORIZON = 8.0
SEEDS = (1, 2, 3)


class Target:
    """A 2-D Gaussian mixture: exact draws, moments and the exact VP epsilon at (fractional) DDPM timesteps."""

    def __init__(self, weights, means, covariances):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.covariances = torch.as_tensor(covariances, dtype=torch.float64)
        table = DDPMScheduler().alphas_cumprod.double()
        self.log_snr = torch.log(table / (1 - table)).numpy()

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.weights @ self.means
        centred = self.means - mean
        outer = centred[:, :, None] * centred[:, None, :]
        return mean, (self.weights[:, None, None] * (self.covariances + outer)).sum(0)

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covariances)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return self.means[component] + (chol[component] @ noise[:, :, None])[:, :, 0]

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        """The exact VP epsilon at a DDPM timestep, interpolated in log-SNR."""
        t = float(torch.as_tensor(timestep).flatten()[0])
        log_snr = np.interp(t, np.arange(len(self.log_snr)), self.log_snr)
        alpha_bar = 1 / (1 + math.exp(-log_snr))
        points = x.reshape(len(x), 2).double()
        means = math.sqrt(alpha_bar) * self.means
        covariances = alpha_bar * self.covariances + (1 - alpha_bar) * torch.eye(2, dtype=torch.float64)
        precisions = torch.linalg.inv(covariances)
        centred = points[:, None, :] - means[None]
        whitened = torch.einsum("kij,nkj->nki", precisions, centred)
        log_density = -0.5 * (centred * whitened).sum(-1) - 0.5 * torch.logdet(covariances) + torch.log(self.weights)
        responsibilities = torch.softmax(log_density, dim=1)
        score = -(responsibilities[:, :, None] * whitened).sum(1)
        return (-math.sqrt(1 - alpha_bar) * score).to(x.dtype).reshape(x.shape)


def ring(components: int = 12, radius: float = 1.5, std: float = 0.04) -> Target:
    angles = torch.arange(components, dtype=torch.float64) * (2 * math.pi / components)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return Target(torch.full((components,), 1 / components), means, std**2 * torch.eye(2).expand(components, 2, 2))


TARGETS = {
    "mixture": Target(
        [0.4, 0.3, 0.2, 0.1],
        [[1.5, 1.0], [-1.5, 0.5], [0.0, -1.5], [1.0, -0.5]],
        [
            [[0.10, 0.04], [0.04, 0.05]],
            [[0.20, -0.05], [-0.05, 0.10]],
            [[0.05, 0.00], [0.00, 0.30]],
            [[0.02, 0.00], [0.00, 0.02]],
        ],
    ),
    "ring": ring(),
}


def linspace_timesteps(start: float, steps: int) -> list[int]:
    """``steps`` DDPM timesteps from ``start`` down, spaced as diffusers' ``"linspace"`` spacing (ending before 0)."""
    return np.linspace(0, start, steps + 1).round()[::-1][:-1].astype(int).tolist()


def sample_vp(scheduler, target: Target, steps: int, n: int, seed: int, start: float | None = None) -> torch.Tensor:
    """Sample with a diffusers VP scheduler and the exact epsilon; ``start``: first DDPM timestep of a custom
    linearly spaced grid (diffusers' ``"linspace"`` spacing, ending before 0) instead of the scheduler's own."""
    generator = torch.Generator().manual_seed(seed)
    if start is None:
        scheduler.set_timesteps(steps)
    else:
        scheduler.set_timesteps(timesteps=linspace_timesteps(start, steps))
    x = torch.randn(n, 2, 1, 1, generator=generator, dtype=torch.float64) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = target(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x.reshape(n, 2)


def sample_hold(order: int, target: Target, steps: int, n: int, seed: int, **settings) -> torch.Tensor:
    """Sample the HOLD state with the exact score (zero-shot through the exact VP epsilon); return the positions."""
    base = DDPMScheduler().config  # HOLD never clips; only the VP schedule is read
    settings = {"timestep_spacing": "quadratic", **settings}
    scheduler = HOLDScheduler.from_config(base, order=order, prediction_type="vp_epsilon", **settings)
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    state = torch.randn(n, 2 * order, 1, 1, generator=generator, dtype=torch.float64) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = target(scheduler.scale_model_input(state, t, full_state=True), t)
        state = scheduler.step(eps, t, state, generator=generator, full_state=True).prev_sample
    return state[:, :2].reshape(n, 2)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> float:
    """Mean over directions of the 1-D Wasserstein-1 distance between equal-size samples."""
    pa, pb = (a @ directions.T).sort(0).values, (b @ directions.T).sort(0).values
    return float((pa - pb).abs().mean())


def vp_timestep_at_start(order: int, sampling_T: float) -> float:
    """The DDPM timestep at which zero-shot HOLD started at ``sampling_T`` first calls the VP model: the noise level
    of HOLD's sufficient statistic there, which a VP sampler must start from to see the same first input."""
    scheduler = HOLDScheduler.from_config(
        DDPMScheduler().config, order=order, prediction_type="vp_epsilon", sampling_T=sampling_T
    )
    scheduler.set_timesteps(2)
    return float(scheduler.timesteps[0])


def solvers() -> dict:
    """Name -> function(target, steps, n, seed) returning samples."""
    base = DDPMScheduler(clip_sample=False).config  # the targets reach beyond [-1, 1]
    late, later = vp_timestep_at_start(3, LATE_START), vp_timestep_at_start(3, LATER_START)
    table = {
        "ddim": lambda g, s, n, seed: sample_vp(DDIMScheduler.from_config(base), g, s, n, seed),
        "ddpm": lambda g, s, n, seed: sample_vp(DDPMScheduler.from_config(base), g, s, n, seed),
        "dpmsolver++2m": lambda g, s, n, seed: sample_vp(DPMSolverMultistepScheduler.from_config(base), g, s, n, seed),
        "dpmsolver++2m_late": lambda g, s, n, seed: sample_vp(
            DPMSolverMultistepScheduler.from_config(base), g, s, n, seed, start=late
        ),
        "dpmsolver++2m_t3": lambda g, s, n, seed: sample_vp(
            DPMSolverMultistepScheduler.from_config(base), g, s, n, seed, start=later
        ),
        "euler": lambda g, s, n, seed: sample_vp(EulerDiscreteScheduler.from_config(base), g, s, n, seed),
    }
    hold_solvers = {
        "euler_maruyama": {"solver": "euler_maruyama"},
        "sscs": {"solver": "sscs"},
        "ddim": {"solver": "ddim"},
        "exp2m": {"solver": "exp_multistep", "solver_order": 2, **FEW_STEP},
        "exp3m": {"solver": "exp_multistep", "solver_order": 3, **FEW_STEP},
        # the zero-shot recommendation: the VP model called at DPM-Solver++'s timesteps, the last step first order
        "exp2m_vp": {"solver": "exp_multistep", "solver_order": 2, **VP_GRID},
        "exp2m_sde_vp": {"solver": "exp_multistep", "solver_order": 2, "algorithm_type": "sde-dpmsolver++", **VP_GRID},
    }
    late_hold = {f"{name}_late": {**hold_solvers[name], "sampling_T": LATE_START} for name in ("exp2m", "exp3m")}
    late_hold["exp3m_t3"] = {**hold_solvers["exp3m"], "sampling_T": LATER_START}
    # zero-shot, the horizon T is a sampler setting; HOLD-2's prior at T = 5 is off enough to bias it at 50+ calls
    long_hold = {"exp3m_T8": {**hold_solvers["exp3m"], "T": LONG_HORIZON}}
    for order in (2, 3):
        for name, settings in {**hold_solvers, **(late_hold if order == 3 else long_hold)}.items():
            table[f"hold{order}_{name}"] = lambda g, s, n, seed, o=order, kw=settings: sample_hold(
                o, g, s, n, seed, **kw
            )
    return table


def evaluate(
    target: Target, n: int, step_counts: tuple[int, ...], seeds: tuple[int, ...], names: list[str] | None = None
) -> dict:
    """Every solver (or those in ``names``) at every step count on one target (metrics averaged over sampling
    ``seeds``), with the Monte Carlo floor and the score."""
    generator = torch.Generator().manual_seed(0)
    reference = target.draw(n, generator)
    directions = torch.randn(64, 2, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)
    mean, covariance = target.moments()
    floor = sliced_wasserstein(target.draw(n, generator), reference, directions)
    entry: dict = {"noise_floor_sw": floor, "solvers": {}}
    table = solvers()
    for name in tqdm(names or list(table), desc="solvers", leave=False):
        sample = table[name]
        rows = []
        for steps in step_counts:
            runs = []
            for seed in seeds:
                x = sample(target, steps, n, seed)
                finite = bool(torch.isfinite(x).all())
                runs.append(
                    {
                        "sw": sliced_wasserstein(x, reference, directions) if finite else math.inf,
                        "mean_error": float((x.mean(0) - mean).norm()) if finite else math.inf,
                        "cov_error": float((torch.cov(x.T) - covariance).norm() / covariance.norm())
                        if finite
                        else math.inf,
                    }
                )
            row = {key: float(np.mean([run[key] for run in runs])) for key in runs[0]}
            row["sw_sd"] = float(np.std([run["sw"] for run in runs], ddof=1)) if len(runs) > 1 else 0.0
            rows.append({"steps": steps, **row})
        entry["solvers"][name] = rows
    entry["score"] = score(entry["solvers"], step_counts)
    return entry


def score(results: dict, step_counts: tuple[int, ...]) -> dict:
    """Per HOLD order: best HOLD solver's SW over DPM-Solver++ 2M's at each scored step count."""
    reference = dict(zip(step_counts, (row["sw"] for row in results["dpmsolver++2m"]), strict=True))
    dpm_starts = [name for name in results if name.startswith("dpmsolver++2m")]
    better = {steps: min(next(r["sw"] for r in results[name] if r["steps"] == steps) for name in dpm_starts)
              for steps in step_counts}  # fmt: skip
    out = {}
    for order in (2, 3):
        ratios = {}
        for steps in SCORED_STEPS:
            if steps not in reference:
                continue
            candidates = {
                name: next(row["sw"] for row in rows if row["steps"] == steps)
                for name, rows in results.items()
                if name.startswith(f"hold{order}_")
            }
            if not candidates:  # a run restricted by --solvers
                continue
            best = min(candidates, key=candidates.get)
            ratios[str(steps)] = {
                "solver": best,
                "ratio": candidates[best] / reference[steps],
                "ratio_to_better_dpm": candidates[best] / better[steps],
            }
        out[f"hold{order}"] = ratios
    return out


def plot(results: dict, path: Path) -> None:
    """Error against model calls for every solver, one panel per target; VP solvers dashed, HOLD-2 circles, HOLD-3
    squares, one colour per solver."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = results["targets"]
    names = list(next(iter(targets.values()))["solvers"])
    palette = [*plt.get_cmap("tab20").colors, *plt.get_cmap("tab20b").colors]
    colours = {name: palette[i % len(palette)] for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, len(targets), figsize=(6.5 * len(targets) + 3.5, 5.5), squeeze=False)
    for ax, (name, entry) in zip(axes[0], targets.items(), strict=True):
        for solver, rows in entry["solvers"].items():
            style = "-" if solver.startswith("hold") else "--"
            marker = "s" if solver.startswith("hold3") else "o"
            width = 2.2 if "exp" in solver or solver == "dpmsolver++2m" else 1.0
            steps, errors = [r["steps"] for r in rows], [r["sw"] for r in rows]
            ax.plot(steps, errors, style, color=colours[solver], lw=width, marker=marker, ms=4, label=solver)
        ax.axhline(entry["noise_floor_sw"], color="grey", lw=0.8, ls=":", label="Monte Carlo floor")
        ax.set(xscale="log", yscale="log", xlabel="model calls", ylabel="sliced Wasserstein-1", title=name)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Fewer points and step counts (a few minutes).")
    parser.add_argument("--num_samples", type=int, default=None)
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="model-call counts (default: all)")
    parser.add_argument("--solvers", nargs="+", default=None, help="run only these solvers (and dpmsolver++2m)")
    parser.add_argument("--output", type=Path, default=None, help="results file (the plot goes beside it)")
    args = parser.parse_args()
    names = None
    if args.solvers:
        known = sorted(solvers())
        unknown = sorted(set(args.solvers) - set(known))
        if unknown:
            parser.error(f"unknown --solvers {unknown}; known: {known}")
        names = ["dpmsolver++2m"] + [name for name in args.solvers if name != "dpmsolver++2m"]
    if args.steps and min(args.steps) < 2:
        parser.error("--steps must be at least 2")
    torch.set_num_threads(1)
    n = args.num_samples or (5000 if args.quick else 20000)
    step_counts = tuple(args.steps) if args.steps else (10, 25, 50) if args.quick else STEPS
    load, start = ForeignLoad(), time.perf_counter()
    seeds = SEEDS[:1] if args.quick else SEEDS
    results: dict = {"num_samples": n, "steps": list(step_counts), "seeds": list(seeds), "targets": {}}
    for name, target in tqdm(TARGETS.items(), desc="targets"):
        results["targets"][name] = evaluate(target, n, step_counts, seeds, names)
    results["environment"] = {**environment(), "foreign_cpu_share": load.share(torch.get_num_threads())}
    results["wall_time_s"] = time.perf_counter() - start
    path = args.output or (RESULTS.with_name("sampler_accuracy_quick.json") if args.quick else RESULTS)
    plot(results, path.with_suffix(".png"))
    finish(results, path, print_report)


def print_report(results: dict) -> None:
    steps = results["steps"]
    for name, entry in results["targets"].items():
        print(f"\n{name}: {results['num_samples']} samples per run, mean over seeds {results['seeds']}; Monte Carlo "
              f"floor of the sliced Wasserstein distance {entry['noise_floor_sw']:.4f}")  # fmt: skip
        print(f"{'solver':<22}" + "".join(f"{s:>9}" for s in steps))
        for solver, rows in entry["solvers"].items():
            print(f"{solver:<22}" + "".join(f"{row['sw']:9.4f}" for row in rows))
        for order, ratios in entry["score"].items():
            cells = ", ".join(
                f"{s}: {r['ratio']:.2f} / {r['ratio_to_better_dpm']:.2f} ({r['solver']})" for s, r in ratios.items()
            )
            print(f"score {order} (best HOLD SW / DPM-Solver++ 2M SW, / its best start; target <= 1): {cells}")


if __name__ == "__main__":
    main()
