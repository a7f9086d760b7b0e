"""What the benchmark reports: the scores of one set of generations (with a bootstrap interval), the results table
and the figures."""

from __future__ import annotations

from pathlib import Path

import torch

from ..metrics import check_quality_sizes, held_out_distance_memorization, nn_ratio_memorization, quality_report
from ..utils import image_grid, to_pil_image
from .methods import BenchConfig

__all__ = ["check_evaluation_sizes", "evaluate", "public_scores", "results_table", "write_figures"]

# the feature space of the quality scores: a PCA of the held-out images with at most this many components
PCA_COMPONENTS = 32
# the second memorization criterion: closer to the nearest training image than this quantile of the held-out images'
# nearest-training distances
HELD_OUT_QUANTILE = 0.05


def _bootstrap_interval(memorized: torch.Tensor, resamples: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of the memorized fraction over bootstrap resamples of the generations."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(len(memorized), (resamples, len(memorized)), generator=generator)
    fractions = memorized.double()[draws].mean(1)
    return float(fractions.quantile(0.025)), float(fractions.quantile(0.975))


def evaluate(generated: torch.Tensor, train: torch.Tensor, held_out: torch.Tensor, config: BenchConfig) -> dict:
    """Memorization (with its bootstrap interval and held-out control) and quality of one set of generations.

    The keys starting with ``_`` hold per-generation tensors (the distance ratio and the nearest training image) for
    the figures; :func:`public_scores` leaves them out.
    """
    memorization = nn_ratio_memorization(generated, train, held_out=held_out)
    quality = quality_report(generated, train, held_out, n_components=min(PCA_COMPONENTS, train[0].numel()))
    low, high = _bootstrap_interval(memorization.memorized, config.bootstrap, config.seed)
    closer = held_out_distance_memorization(generated, train, held_out, quantile=HELD_OUT_QUANTILE)
    return {
        "memorized": memorization.fraction_memorized,
        "memorized_ci": [low, high],
        "closer_than_held_out": closer.fraction_memorized,
        "distinct_copied": memorization.distinct_copied,
        "held_out_memorized": memorization.held_out_fraction,
        "frechet_distance": quality.frechet_distance,
        "precision": quality.precision,
        "recall": quality.recall,
        "floor_frechet_distance": quality.floor_frechet_distance,
        "floor_recall": quality.floor_recall,
        "_ratio": memorization.ratio,
        "_nearest": memorization.nearest_index,
    }


def check_evaluation_sizes(config: BenchConfig, train: torch.Tensor, held_out: torch.Tensor) -> None:
    """Raise before any training when :func:`evaluate` could not score this run: too few held-out, training or
    generated images for the quality metrics (see :func:`~diffusers_hold.metrics.check_quality_sizes`)."""
    check_quality_sizes(config.num_samples, len(train), len(held_out), train[0].numel(), n_components=PCA_COMPONENTS)


def public_scores(scores: dict) -> dict:
    """The scores without the per-generation entries (keys starting with ``_``), as ``results.json`` holds them."""
    return {k: v for k, v in scores.items() if not k.startswith("_")}


def results_table(results: list[dict], config: BenchConfig) -> str:
    """The Markdown table of ``results.md``: one row per method, then the train-vs-held-out floor."""
    lines = [
        f"Data: {config.data}, {config.train_size} training images at {config.resolution}x{config.resolution}, "
        f"{config.train_steps} updates of batch {config.batch_size} per method, {config.num_samples} samples.",
        "",
        "| method | memorized (1/3 rule) [95 % CI] | distinct copied | held-out control | closer than held-out "
        "5 % | FD-PCA | precision | recall | train time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        low, high = r["memorized_ci"]
        lines.append(
            f"| {r['method']} | {r['memorized']:.1%} [{low:.1%}, {high:.1%}] | {r['distinct_copied']} | "
            f"{r['held_out_memorized']:.1%} | {r['closer_than_held_out']:.1%} | {r['frechet_distance']:.3f} | "
            f"{r['precision']:.2f} | "
            f"{r['recall']:.2f} | {r['train_seconds']:.0f} s |"
        )
    floor = results[0]
    lines += ["", f"Floor (training images vs held-out): FD-PCA {floor['floor_frechet_distance']:.3f}, "
              f"recall {floor['floor_recall']:.2f}."]  # fmt: skip
    return "\n".join(lines)


def write_figures(
    results: list[dict], generated: dict[str, torch.Tensor], train: torch.Tensor, out: Path
) -> list[str]:
    """Draw the benchmark's figures into ``out``; returns the file names written.

    ``samples_vs_nearest.png``: each method's most-copied generations above their nearest training images;
    ``memorization_vs_order.png`` (when the run has the baseline or a HOLD order): memorization and FD-PCA against
    the order; ``memorization_vs_steps.png``: both along training.
    """
    # matplotlib is an optional dependency (the [bench] extra): imported only when figures are drawn
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("The benchmark's figures need matplotlib: pip install 'diffusers-hold[bench]'.") from error
    figures = {
        "samples_vs_nearest.png": _samples_vs_nearest(plt, results, generated, train),
        "memorization_vs_order.png": _memorization_vs_order(plt, results),
        "memorization_vs_steps.png": _memorization_vs_steps(plt, results),
    }
    written = []
    for name, figure in figures.items():
        if figure is None:
            continue
        figure.tight_layout()
        figure.savefig(out / name, dpi=100)
        plt.close(figure)
        written.append(name)
    return written


def _samples_vs_nearest(plt, results: list[dict], generated: dict[str, torch.Tensor], train: torch.Tensor, count=8):
    figure, axes = plt.subplots(len(results), 1, figsize=(8, 2.2 * len(results)), squeeze=False)
    for axis, result in zip(axes[:, 0], results, strict=True):
        order = torch.argsort(torch.tensor(result["_ratio"]))[:count]
        top = [to_pil_image((generated[result["method"]][i] + 1) / 2) for i in order]
        bottom = [to_pil_image((train[result["_nearest"][i]] + 1) / 2) for i in order]
        axis.imshow(image_grid(top + bottom, cols=len(top), padding=1, scale=4), cmap="gray")
        axis.set_title(f"{result['method']}: memorized {result['memorized']:.0%} (top: samples, bottom: nearest)")
        axis.axis("off")
    return figure


def _memorization_vs_order(plt, results: list[dict]):
    ordered = sorted(
        (r for r in results if r["method"] in ("ddpm", f"hold{r['hold_order']}")), key=lambda r: r["hold_order"] or 1
    )
    if not ordered:
        return None
    figure, axis = plt.subplots(figsize=(5, 3.5))
    orders = [r["hold_order"] or 1 for r in ordered]
    axis.plot(orders, [100 * r["memorized"] for r in ordered], "o-", label="memorized %")
    axis.set_xlabel("order (1 = DDPM baseline)")
    axis.set_ylabel("memorized (%)")
    twin = axis.twinx()
    twin.plot(orders, [r["frechet_distance"] for r in ordered], "s--", color="tab:red", label="FD-PCA")
    twin.set_ylabel("FD-PCA", color="tab:red")
    axis.set_xticks(orders)
    return figure


def _memorization_vs_steps(plt, results: list[dict]):
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    for r in results:
        steps = [point["step"] for point in r["curve"]]
        left.plot(steps, [100 * point["memorized"] for point in r["curve"]], "o-", label=r["method"])
        right.plot(steps, [point["frechet_distance"] for point in r["curve"]], "o-", label=r["method"])
    left.set(xlabel="training steps", ylabel="memorized (%)")
    right.set(xlabel="training steps", ylabel="FD-PCA to held-out")
    left.legend(fontsize=8)
    return figure
