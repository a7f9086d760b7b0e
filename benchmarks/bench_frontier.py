"""Memorization against quality along training, by HOLD order: does HOLD copy less than DDPM at equal quality?

    python benchmarks/bench_frontier.py --study digits32 [--methods ddpm hold2 hold3 hold4] [--seeds 0 1 2]
        [--train_steps N] [--quick] [--add_to RESULTS_FILE]

**Claim** (seed ``000``). Driving the data path by a low-pass-filtered score reduces memorization, more as the HOLD
order rises. A model that copies less only because it has learned less proves nothing, so the comparison is made at
matched quality, along the whole of training.

**Measurement.** Each method of :mod:`diffusers_hold.bench` (the bench's UNet, data split, training and samplers) is
trained once per seed (the seed sets the data split, the weights, the training draws and the samples) and evaluated
at ``--num_evaluations`` evenly spaced points: memorized fraction by the 1/3 rule, the fraction of generations closer
to their nearest training image than the 5th percentile of the held-out images' nearest-training distances (a
criterion that near-duplicates inside the training set do not defeat), FD-PCA, precision and recall. The figure
plots memorized fraction against FD-PCA, one colour per method, each seed thin, the mean over seeds at each
evaluation thick.

**Matched quality** (the rule the README states): the quality target is 1.1 times the best FD-PCA the baseline (the
first of ``--methods``, DDPM by default; ``dit`` for the pruning study on a DiT) reaches at any evaluation (mean over
seeds). For each method and seed, the matched-quality point is the least memorized evaluation whose FD-PCA meets
the target (where one would stop training); the report gives its mean over seeds with a 95 % t-interval, and says when
a seed never meets the target. FD-PCA rewards recall, so a model can meet it with less faithful samples; the stricter
rule also asks for precision at least the baseline's at its matched points (mean over seeds) divided by the same 1.1.

Studies (``--study``): ``digits32`` (the bench default: 32 digits at 8x8, 2,000 updates), ``digits64`` (64 digits,
4,000 updates), ``digits128`` (128 digits, 8,000 updates: DDPM in its transition regime), ``photos8`` and
``photos16`` (32 RGB patches of bundled photographs at 8x8 and 16x16, 2,000 updates), ``lfw`` (32 grayscale faces at
16x16, 2,000 updates). Results go to
``benchmarks/results/frontier/<study>.json`` and ``.png`` (or ``--output``); trained states to
``--state_dir/<study>/<n>_evaluations/seed<k>/<method>.pt`` (a rerun resumes, and a run with more methods reuses the
trained ones); sample grids (one row per evaluation, earliest on top) to ``<output>_samples/`` beside the results file.
``--add_to <results file>`` trains only the methods named and adds them to a committed study (same settings and
seeds, checked before training), so a study grows without its saved states.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from harness import ForeignLoad, environment, finish
from scipy import stats

from diffusers_hold.bench import BENCH_METHODS, BenchConfig, load_bench_data, train_and_evaluate
from diffusers_hold.utils import atomic_output, image_grid, to_pil_image

RESULTS = Path(__file__).resolve().parent / "results" / "frontier"
STUDIES = {
    "digits32": BenchConfig(data="digits", resolution=8, train_size=32, train_steps=2000),
    "digits64": BenchConfig(data="digits", resolution=8, train_size=64, train_steps=4000),
    "digits128": BenchConfig(data="digits", resolution=8, train_size=128, train_steps=8000),
    "photos8": BenchConfig(data="photos", resolution=8, train_size=32, train_steps=2000),
    "photos16": BenchConfig(data="photos", resolution=16, train_size=32, train_steps=2000),
    "lfw": BenchConfig(data="lfw", resolution=16, train_size=32, held_out_size=68, num_samples=128, train_steps=2000),
}
QUALITY_SLACK = 1.1  # matched quality: FD-PCA within 10 % of the baseline's (first method's) best
GRID_COLUMNS = 16  # generations shown per evaluation in the sample grids
METRICS = ("memorized", "closer_than_held_out", "frechet_distance", "precision", "recall")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", choices=sorted(STUDIES), default="digits32")
    parser.add_argument("--methods", nargs="+", default=["ddpm", "hold2", "hold3", "hold4"], choices=BENCH_METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num_evaluations", type=int, default=6)
    length = parser.add_mutually_exclusive_group()
    length.add_argument(
        "--train_steps", type=int, default=None,
        help="Updates per run instead of the study's (results and saved states get an _<n>_updates suffix).",
    )  # fmt: skip
    length.add_argument("--quick", action="store_true", help="300 updates, 64 samples, 2 evaluations: a smoke run.")
    parser.add_argument("--state_dir", type=Path, default=Path("outputs/frontier_state"))
    destination = parser.add_mutually_exclusive_group()
    destination.add_argument(
        "--output", type=Path, default=None, help="Default: benchmarks/results/frontier/<study>.json"
    )  # fmt: skip
    destination.add_argument(
        "--add_to", type=Path, default=None,
        help="Add these methods to an existing results file of the same study, settings and seeds (its baseline "
        "stays first); rewrites its summary, report and figure.",
    )  # fmt: skip
    parser.add_argument(
        "--from_results", type=Path, default=None,
        help="Recompute the summary, report and figure of this results file from its curves, without training.",
    )  # fmt: skip
    args = parser.parse_args()
    if args.from_results is not None:
        results = json.loads(args.from_results.read_text())
        results.update(summarize(results["curves"]))
        finish(results, args.from_results, print_report)
        plot_frontier(results, args.from_results.with_suffix(".png"))
        return
    torch.set_num_threads(1)  # the models are tiny: one thread is faster than two here
    config, name = study_config(args.study, args.methods, args.num_evaluations, args.train_steps, args.quick)
    config_dict = {k: v for k, v in asdict(config).items() if k != "seed"}
    output = args.add_to or args.output or RESULTS / f"{name}.json"
    existing = check_addition(args.add_to, args.study, config_dict, args.seeds) if args.add_to else None
    start, load = time.perf_counter(), ForeignLoad()
    curves: dict[str, dict[str, list[dict]]] = {}
    for method in args.methods:
        for seed in args.seeds:
            run_config = replace(config, seed=seed)
            train, held_out = load_bench_data(run_config)
            state_dir = state_folder(args.state_dir, name, config, seed)
            state_dir.mkdir(parents=True, exist_ok=True)
            grid_rows = []
            result, _ = train_and_evaluate(
                BENCH_METHODS[method], train, held_out, run_config, state_dir,
                on_evaluation=lambda step, generated, scores, rows=grid_rows: rows.append(generated[:GRID_COLUMNS]),
            )  # fmt: skip
            if grid_rows:  # a run restored whole from its state has no new generations to show
                save_grid(grid_rows, output.parent / f"{output.stem}_samples" / f"{method}_seed{seed}.png")
            curves.setdefault(method, {})[str(seed)] = [
                {"step": point["step"], **{key: point[key] for key in METRICS}} for point in result["curve"]
            ]
            print(f"{method} seed {seed}: " + ", ".join(
                f"{p['step']}: {p['memorized']:.0%} / FD {p['frechet_distance']:.2f}" for p in result["curve"]
            ))  # fmt: skip
    env = environment(("torch", "diffusers"))
    env["foreign_cpu_share"] = load.share(env["cpu_count"])
    if existing is not None:
        results = merge_addition(existing, curves, env, time.perf_counter() - start)
        finish(results, output, print_report)
        plot_frontier(results, output.with_suffix(".png"))
        return
    results = {
        "study": args.study,
        "config": config_dict,
        "seeds": args.seeds,
        "curves": curves,
        **summarize(curves),
        "environment": env,
        "wall_time_s": time.perf_counter() - start,
    }
    finish(results, output, print_report)
    plot_frontier(results, output.with_suffix(".png"))


def study_config(
    study: str, methods: list[str], num_evaluations: int, train_steps: int | None = None, quick: bool = False
) -> tuple[BenchConfig, str]:
    """A study's settings and its name (the results file's stem and the state folder's): ``<study>``, with
    ``_<n>_updates`` for another length or ``_quick`` for the smoke run."""
    config = replace(STUDIES[study], methods=methods, num_evaluations=num_evaluations)
    name = study
    if train_steps is not None:
        config = replace(config, train_steps=train_steps)
        name += f"_{train_steps}_updates"
    if quick:
        config = replace(config, train_steps=300, num_samples=64, num_evaluations=2, hold_steps=50)
        name += "_quick"
    return config, name


def state_folder(state_dir: Path, name: str, config: BenchConfig, seed: int) -> Path:
    """Where a study's trained states are kept: one folder per study, evaluation plan and seed, so that a run with
    other methods (another ``--output``) reuses the trained models."""
    return state_dir / name / f"{config.num_evaluations}_evaluations" / f"seed{seed}"


def check_addition(path: Path, study: str, config: dict, seeds: list[int]) -> dict:
    """The results file that ``--add_to`` extends, refused unless its runs are comparable with these (same study,
    settings other than the methods, and seeds); checked before any training."""
    existing = json.loads(path.read_text())
    theirs = {k: v for k, v in existing["config"].items() if k != "methods"}
    ours = json.loads(json.dumps({k: v for k, v in config.items() if k != "methods"}))  # tuples as JSON has them
    if existing["study"] != study or theirs != ours:
        changed = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        differing = ", ".join(changed) or "study"
        raise SystemExit(f"{path} holds study {existing['study']!r} with other settings ({differing}).")
    if existing["seeds"] != seeds:
        raise SystemExit(f"{path} holds seeds {existing['seeds']}; this run has {seeds}.")
    overlap = sorted(set(existing["curves"]) & set(config["methods"]))
    if overlap:
        raise SystemExit(f"{path} already holds {', '.join(overlap)}; add other methods.")
    return existing


def merge_addition(existing: dict, curves: dict, env: dict, seconds: float) -> dict:
    """``existing`` with the new methods' curves after its own (its baseline, hence the quality target, stays) and
    the summaries recomputed; the added run's environment and time are kept beside the first run's."""
    merged_curves = {**existing["curves"], **curves}
    config = {**existing["config"], "methods": list(merged_curves)}
    additions = existing.get("additions", []) + [{"methods": list(curves), "environment": env, "wall_time_s": seconds}]
    return {
        **existing,
        "config": config,
        "curves": merged_curves,
        **summarize(merged_curves),
        "additions": additions,
        "wall_time_s": existing["wall_time_s"] + seconds,
    }


def save_grid(rows: list[torch.Tensor], path: Path) -> None:
    """The first generations of each evaluation, one row per evaluation (top: earliest)."""
    images = [to_pil_image((image + 1) / 2) for row in rows for image in row]
    grid = image_grid(images, cols=GRID_COLUMNS, scale=max(1, 48 // rows[0].shape[-1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as temporary:
        grid.save(temporary, format="png")


def mean_interval(values: list[float]) -> dict:
    """Mean with a 95 % t-interval over seeds (no interval from one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return {"mean": mean, "ci": None, "values": values}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = stats.t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values))
    return {"mean": mean, "ci": [mean - half, mean + half], "values": values}


def summarize(curves: dict[str, dict[str, list[dict]]]) -> dict:
    """The results' summaries: matched FD, matched FD and precision, and the end of training."""
    matched_fd = matched_quality(curves)
    baseline = next(iter(curves))
    baseline_precision = [p["precision"] for p in matched_fd[baseline]["per_seed"].values() if p is not None]
    precision_target = sum(baseline_precision) / len(baseline_precision) / QUALITY_SLACK
    return {
        "matched_quality": matched_fd,
        "matched_quality_and_precision": matched_quality(curves, precision_target),
        "final": final_scores(curves),
    }


def matched_quality(curves: dict[str, dict[str, list[dict]]], precision_target: float = 0.0) -> dict:
    """Each method's least memorized evaluation that meets the FD target (and ``precision_target``), per seed and
    over seeds."""
    baseline = list(next(iter(curves.values())).values())
    mean_fd = [sum(s[i]["frechet_distance"] for s in baseline) / len(baseline) for i in range(len(baseline[0]))]
    target = QUALITY_SLACK * min(mean_fd)
    summary = {"fd_target": target, "precision_target": precision_target}
    for method, seeds in curves.items():
        chosen = {}
        for seed, curve in seeds.items():
            meeting = [p for p in curve if p["frechet_distance"] <= target and p["precision"] >= precision_target]
            chosen[seed] = min(meeting, key=lambda p: (p["memorized"], p["frechet_distance"])) if meeting else None
        reached = [point for point in chosen.values() if point is not None]
        entry = {"per_seed": chosen, "seeds_reaching_target": len(reached)}
        if len(reached) == len(chosen):
            entry.update({key: mean_interval([point[key] for point in reached]) for key in METRICS})
        summary[method] = entry
    return summary


def final_scores(curves: dict[str, dict[str, list[dict]]]) -> dict:
    """Every metric at the end of training, mean and 95 % t-interval over seeds."""
    return {
        method: {key: mean_interval([curve[-1][key] for curve in seeds.values()]) for key in METRICS}
        for method, seeds in curves.items()
    }


def print_report(results: dict) -> None:
    matched, strict = results["matched_quality"], results["matched_quality_and_precision"]
    baseline = next(iter(results["curves"]))
    print(f"\n{results['study']}: matched quality = FD-PCA <= {matched['fd_target']:.3f} (1.1 x {baseline}'s best); "
          f"with precision >= {strict['precision_target']:.3f} ({baseline}'s there / 1.1)")  # fmt: skip
    print(f"{'method':<20}{'memorized at matched FD':>28}{'closer than held-out':>26}{'... and precision':>26}"
          f"{'final memorized':>22}{'final FD':>18}")  # fmt: skip
    for method in results["curves"]:
        final = results["final"][method]
        print(f"{method:<20}{_matched_cell(matched[method], 'memorized'):>28}"
              f"{_matched_cell(matched[method], 'closer_than_held_out'):>26}"
              f"{_matched_cell(strict[method], 'memorized'):>26}{_cell(final['memorized']):>22}"
              f"{_cell(final['frechet_distance'], percent=False):>18}")  # fmt: skip


def _matched_cell(entry: dict, key: str) -> str:
    if key in entry:
        return _cell(entry[key])
    return f"{entry['seeds_reaching_target']}/{len(entry['per_seed'])} seeds reach it"


def _cell(summary: dict, percent: bool = True) -> str:
    scale, unit = (100, "%") if percent else (1, "")
    if summary["ci"] is None:
        return f"{scale * summary['mean']:.1f}{unit}"
    low, high = summary["ci"]
    return f"{scale * summary['mean']:.1f} [{scale * low:.1f}, {scale * high:.1f}]{unit}"


def plot_frontier(results: dict, path: Path) -> None:
    """Memorized fraction (two criteria) against FD-PCA: seeds thin, the mean over seeds thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for colour, (method, seeds) in zip(plt.cm.tab10.colors, results["curves"].items(), strict=False):
        for criterion, axis in zip(("memorized", "closer_than_held_out"), axes, strict=True):
            for curve in seeds.values():
                axis.plot([p["frechet_distance"] for p in curve], [100 * p[criterion] for p in curve],
                          "o-", color=colour, alpha=0.3, lw=0.8, ms=3)  # fmt: skip
            mean = [
                (sum(c[i]["frechet_distance"] for c in seeds.values()) / len(seeds),
                 100 * sum(c[i][criterion] for c in seeds.values()) / len(seeds))
                for i in range(len(next(iter(seeds.values()))))
            ]  # fmt: skip
            axis.plot(*zip(*mean, strict=True), "o-", color=colour, lw=2.2, label=method)
    target = results["matched_quality"]["fd_target"]
    for axis, title in zip(axes, ("memorized (1/3 rule), %", "closer than held-out 5th percentile, %"), strict=True):
        axis.axvline(target, color="grey", ls="--", lw=1)
        axis.set_xlabel("FD-PCA (lower is better)")
        axis.set_ylabel(title)
        axis.grid(alpha=0.3)
    axes[0].legend()
    config = results["config"]
    figure.suptitle(
        f"{results['study']}: {config['train_size']} images, {config['train_steps']} updates, "
        f"seeds {results['seeds']} (thin) and their mean (thick); dashed: matched-quality target"
    )
    figure.tight_layout()
    with atomic_output(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
