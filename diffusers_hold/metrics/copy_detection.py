"""The copy-detection protocol of the text-to-image memorization literature, over a prompt set.

Somepalli et al. (2023), Wen et al. (2024) and MemBench (Hong et al.) embed every generation and every reference image
with a copy-detection model (SSCD), score each generation by its highest cosine similarity to the references, and
call it a copy when that similarity exceeds 0.5. References are either the ground-truth images of the generation's own
prompt (a prompt set with its images, e.g. Wen et al.'s memorized LAION prompts) or the whole training set. Per prompt
they report the highest similarity, the mean of the top-3 similarities and the fraction of copies; overall, the mean
of the per-prompt maximum, the mean of the per-prompt top-3 mean and the fraction of all generations that are copies.
:func:`copy_detection` computes all of these from features (any extractor of
:mod:`~diffusers_hold.metrics.features`) with percentile-bootstrap intervals that resample prompts, the unit that a
prompt set samples.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._validation import ELEMENT_BUDGET, as_batch, check_finite, check_positive_int, is_integer, is_real_number
from ._search import _resolve_device

__all__ = ["CopyDetectionReport", "copy_detection", "cosine_similarity_matrix", "prompt_bootstrap_intervals"]


# ---------------------------------------------------------------------------------------------- similarity
def _as_rows(features: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """Validated features ``(N, D)`` (trailing axes flattened), as given (no copy)."""
    features = as_batch(features, name)
    check_finite(features, name)
    return features.reshape(features.shape[0], -1)


def _unit_rows(features: torch.Tensor, start: int, name: str, device: torch.device) -> torch.Tensor:
    """Rows divided by their L2 norm, float32 on ``device``; ``start`` is the first row's index, for the error."""
    rows = features.to(device, torch.float32)
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    zero = (norms[:, 0] == 0).nonzero()
    if zero.numel():
        raise ValueError(
            f"Row {start + int(zero[0, 0])} of {name} has zero norm (or underflows float32): its cosine similarity "
            "is undefined."
        )
    return rows / norms


def _check_dims(a: torch.Tensor, name_a: str, b: torch.Tensor, name_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} and {name_b} have different feature dimensions: {a.shape[1]} vs {b.shape[1]}.")


def cosine_similarity_matrix(
    a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, *, device: str | torch.device | None = None
) -> torch.Tensor:
    """All cosine similarities between two feature sets, in float32, a block of rows of ``a`` at a time.

    Rows are divided by their L2 norm and multiplied; results are clamped to ``[-1, 1]`` (rounding can exceed it).

    Args:
        a (`torch.Tensor` or `np.ndarray` of shape `(N, D)`): first set (trailing axes are flattened).
        b (`torch.Tensor` or `np.ndarray` of shape `(M, D)`): second set.
        device (`str` or `torch.device`, *optional*): where the products are computed; by default the device of a
            non-CPU input, else CUDA when available, else the CPU.

    Returns:
        `torch.Tensor` of shape `(N, M)`: float32 similarities on the CPU.
    """
    a, b = _as_rows(a, "a"), _as_rows(b, "b")
    _check_dims(a, "a", b, "b")
    device = _resolve_device(device, a, b)
    b_unit = _unit_rows(b, 0, "b", device)
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float32)
    rows = max(1, ELEMENT_BUDGET // max(b.shape[0], b.shape[1]))  # bounds the blocks on the device
    for start in range(0, a.shape[0], rows):
        a_unit = _unit_rows(a[start : start + rows], start, "a", device)
        out[start : start + rows] = (a_unit @ b_unit.T).clamp_(-1.0, 1.0).cpu()
    return out


def _max_similarity(
    generated: torch.Tensor,
    references: torch.Tensor,
    generated_prompt: torch.Tensor,
    reference_prompt: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each generation's highest similarity and the reference reaching it, among the references of its own prompt
    when ``reference_prompt`` is given; blocks of generations keep the memory bounded."""
    ref_unit = _unit_rows(references, 0, "reference_features", device)
    if reference_prompt is not None:
        reference_prompt = reference_prompt.to(device)
    values, indices = [], []
    rows = max(1, ELEMENT_BUDGET // max(references.shape[0], references.shape[1]))
    for start in range(0, generated.shape[0], rows):
        sims = _unit_rows(generated[start : start + rows], start, "generated_features", device) @ ref_unit.T
        if reference_prompt is not None:
            other = reference_prompt[None, :] != generated_prompt[start : start + rows, None].to(device)
            sims.masked_fill_(other, -math.inf)
        best, index = sims.max(dim=1)  # the first maximum on ties
        values.append(best.clamp_(-1.0, 1.0).cpu())
        indices.append(index.cpu())
    return torch.cat(values), torch.cat(indices)


# ----------------------------------------------------------------------------------------------- prompts
def _prompt_list(ids: Any, name: str, length: int) -> list[Hashable]:
    """``ids`` as a list of hashable Python values (numpy and torch scalars converted, for JSON), checked in length."""
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        ids = ids.tolist()
    if isinstance(ids, str) or not isinstance(ids, Sequence):
        raise ValueError(f"{name} must be a sequence with one prompt id per row, got {type(ids).__name__}.")
    ids = [value.item() if isinstance(value, np.generic) else value for value in ids]
    if len(ids) != length:
        raise ValueError(f"{name} has {len(ids)} entries for {length} feature rows; one prompt id per row is needed.")
    for value in ids:
        if not isinstance(value, Hashable):
            raise ValueError(
                f"{name} must hold hashable prompt ids (strings or integers), got {type(value).__name__}."
            )
    return ids


# ---------------------------------------------------------------------------------------------- bootstrap
def prompt_bootstrap_intervals(
    per_prompt: dict[str, np.ndarray],
    copies: np.ndarray,
    counts: np.ndarray,
    n_bootstrap: int,
    seed: int,
    level: float,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of the per-prompt means in ``per_prompt`` and of the pooled fraction of copies
    (``sum copies / sum counts``), over ``n_bootstrap`` resamples of the prompts with replacement.

    Args:
        per_prompt (`dict[str, np.ndarray]`): per-prompt values (shape ``(P,)``) whose mean over prompts is reported.
        copies (`np.ndarray`), counts (`np.ndarray`): per prompt, its copies and its generations (shape ``(P,)``).
        n_bootstrap (`int`), seed (`int`): resamples and their seed (the same seed gives the same resamples, so
            intervals of several statistics are paired).
        level (`float`): the interval's confidence, e.g. 0.95.

    Returns:
        `dict[str, tuple[float, float]]`: ``(low, high)`` per key of ``per_prompt`` and for ``"fraction_copied"``.
    """
    n_prompts = counts.shape[0]
    rng = np.random.default_rng(seed)
    stats: dict[str, list[np.ndarray]] = {name: [] for name in (*per_prompt, "fraction_copied")}
    rows = max(1, ELEMENT_BUDGET // n_prompts)
    for start in range(0, n_bootstrap, rows):
        sample = rng.integers(0, n_prompts, size=(min(rows, n_bootstrap - start), n_prompts))
        for name, values in per_prompt.items():
            stats[name].append(values[sample].mean(1))
        stats["fraction_copied"].append(copies[sample].sum(1) / counts[sample].sum(1))
    tail = (1.0 - level) / 2.0
    out = {}
    for name, parts in stats.items():
        low, high = np.quantile(np.concatenate(parts), [tail, 1.0 - tail])
        out[name] = (float(low), float(high))
    return out


# ------------------------------------------------------------------------------------------------- report
@dataclass
class CopyDetectionReport:
    """Result of :func:`copy_detection`.

    A generation is a copy when its similarity is strictly greater than ``threshold`` (the papers' "> 0.5"); the
    comparison is made in float32, the similarities' precision. Per-prompt values follow the order of ``prompts``.

    Attributes:
        max_similarity (`torch.Tensor` of shape `(N,)`): each generation's highest cosine similarity to the
            references (those of its prompt when ``per_prompt_references``), float32.
        nearest_reference (`torch.Tensor` of shape `(N,)`): the index into the reference features reaching it (the
            first on ties), int64.
        copied (`torch.Tensor` of shape `(N,)`): ``max_similarity > threshold`` (bool).
        prompt_index (`torch.Tensor` of shape `(N,)`): each generation's position in ``prompts`` (int64).
        prompts (`list`): the distinct prompt ids, in order of first appearance among the generations.
        prompt_num_generations (`torch.Tensor` of shape `(P,)`): generations per prompt (int64).
        prompt_max_similarity (`torch.Tensor` of shape `(P,)`): the highest similarity among a prompt's generations.
        prompt_top_k_mean (`torch.Tensor` of shape `(P,)`): the mean of its ``top_k`` highest (of all of them when it
            has fewer generations).
        prompt_fraction_copied (`torch.Tensor` of shape `(P,)`): the fraction of its generations that are copies.
        mean_max_similarity (`float`): the mean over prompts of ``prompt_max_similarity``.
        mean_max_similarity_interval (`tuple[float, float]`): its percentile-bootstrap interval over prompts.
        mean_top_k (`float`): the mean over prompts of ``prompt_top_k_mean``.
        mean_top_k_interval (`tuple[float, float]`): its interval.
        fraction_copied (`float`): the fraction of all generations that are copies.
        fraction_copied_interval (`tuple[float, float]`): its interval (resampled prompts bring all their
            generations: the statistic is the resample's copies over its generations).
        threshold (`float`), top_k (`int`), confidence (`float`), n_bootstrap (`int`), seed (`int`): the settings.
        features (`str`): the feature extractor the similarities were computed in.
        per_prompt_references (`bool`): whether each generation was compared with its own prompt's references
            (ground-truth images) rather than with all of them (the training set).
        num_references (`int`): number of reference features.

    Per-prompt statistics are float64 tensors.
    """

    max_similarity: torch.Tensor
    nearest_reference: torch.Tensor
    copied: torch.Tensor
    prompt_index: torch.Tensor
    prompts: list[Hashable]
    prompt_num_generations: torch.Tensor
    prompt_max_similarity: torch.Tensor
    prompt_top_k_mean: torch.Tensor
    prompt_fraction_copied: torch.Tensor
    mean_max_similarity: float
    mean_max_similarity_interval: tuple[float, float]
    mean_top_k: float
    mean_top_k_interval: tuple[float, float]
    fraction_copied: float
    fraction_copied_interval: tuple[float, float]
    threshold: float
    top_k: int
    confidence: float
    n_bootstrap: int
    seed: int
    features: str
    per_prompt_references: bool
    num_references: int

    @property
    def num_generated(self) -> int:
        """Number of generations scored."""
        return int(self.max_similarity.shape[0])

    def to_dict(self, per_sample: bool = True) -> dict[str, Any]:
        """Plain Python values for ``json.dump``; ``per_sample=False`` leaves out the per-generation lists.

        Args:
            per_sample (`bool`, defaults to `True`): include each generation's similarity, reference and flag.

        Returns:
            `dict`: the settings, the overall numbers with their intervals, a list of per-prompt records, and
            (with ``per_sample``) the per-generation lists.
        """
        out: dict[str, Any] = {
            "metric": "copy_detection",
            "features": self.features,
            "similarity": "cosine",
            "threshold": self.threshold,
            "top_k": self.top_k,
            "confidence": self.confidence,
            "n_bootstrap": self.n_bootstrap,
            "seed": self.seed,
            "per_prompt_references": self.per_prompt_references,
            "num_generated": self.num_generated,
            "num_prompts": len(self.prompts),
            "num_references": self.num_references,
            "mean_max_similarity": self.mean_max_similarity,
            "mean_max_similarity_interval": list(self.mean_max_similarity_interval),
            "mean_top_k": self.mean_top_k,
            "mean_top_k_interval": list(self.mean_top_k_interval),
            "fraction_copied": self.fraction_copied,
            "fraction_copied_interval": list(self.fraction_copied_interval),
            "per_prompt": [
                {
                    "prompt": prompt,
                    "num_generations": int(self.prompt_num_generations[p]),
                    "max_similarity": float(self.prompt_max_similarity[p]),
                    "top_k_mean": float(self.prompt_top_k_mean[p]),
                    "fraction_copied": float(self.prompt_fraction_copied[p]),
                }
                for p, prompt in enumerate(self.prompts)
            ],
        }
        if per_sample:
            out["per_sample"] = {
                "prompt": [self.prompts[p] for p in self.prompt_index.tolist()],
                "max_similarity": self.max_similarity.tolist(),
                "nearest_reference": self.nearest_reference.tolist(),
                "copied": self.copied.tolist(),
            }
        return out

    def to_markdown(self) -> str:
        """A short Markdown summary: the setting, then the three overall numbers with their intervals.

        Returns:
            `str`: a paragraph and a table.
        """
        references = "its own prompt's reference images" if self.per_prompt_references else "all reference images"
        level = f"{100 * self.confidence:g}%"

        def row(label: str, value: float, interval: tuple[float, float]) -> str:
            return f"| {label} | {value:.4f} | [{interval[0]:.4f}, {interval[1]:.4f}] |"

        return "\n".join(
            [
                f"Copy detection in **{self.features}** features (cosine similarity): {self.num_generated} "
                f"generations of {len(self.prompts)} prompts, each compared with {references} "
                f"({self.num_references} in all); a copy is a similarity > {self.threshold:g}. Intervals: {level} "
                f"percentile bootstrap over prompts ({self.n_bootstrap} resamples).",
                "",
                f"| metric | value | {level} interval |",
                "|---|---|---|",
                row("mean of per-prompt max similarity", self.mean_max_similarity, self.mean_max_similarity_interval),
                row(f"mean of per-prompt top-{self.top_k} mean", self.mean_top_k, self.mean_top_k_interval),
                row(
                    f"fraction of generations > {self.threshold:g}",
                    self.fraction_copied,
                    self.fraction_copied_interval,
                ),
            ]
        )


def copy_detection(
    generated_features: torch.Tensor | np.ndarray,
    reference_features: torch.Tensor | np.ndarray,
    prompt_ids: Sequence[Hashable] | torch.Tensor | np.ndarray,
    *,
    reference_prompt_ids: Sequence[Hashable] | torch.Tensor | np.ndarray | None = None,
    threshold: float = 0.5,
    top_k: int = 3,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    features: str = "unspecified",
    device: str | torch.device | None = None,
) -> CopyDetectionReport:
    """Score generations against reference images with the published copy-detection protocol.

    Each generation's score is its highest cosine similarity to the references: to the references of its own prompt
    when ``reference_prompt_ids`` is given (ground-truth images per prompt), else to all of them (the training set).
    It is a copy when the score is strictly greater than ``threshold``. Per prompt: the highest score, the mean of
    the ``top_k`` highest and the fraction of copies; overall: the mean over prompts of the first two and the fraction
    of all generations that are copies, each with a percentile-bootstrap interval that resamples prompts (with all
    their generations) ``n_bootstrap`` times.

    Use features whose ``metric`` is ``"cosine"`` (SSCD is the protocol's; DINOv2 and CLIP are common
    alternatives); for the L2 PCA features the nearest-neighbour ratio
    (:func:`~diffusers_hold.metrics.nn_ratio_memorization`) is the matching test.

    Args:
        generated_features (`torch.Tensor` or `np.ndarray` of shape `(N, D)`): features of the generations.
        reference_features (`torch.Tensor` or `np.ndarray` of shape `(R, D)`): features of the reference images.
        prompt_ids (`Sequence` or tensor of length `N`): each generation's prompt (any hashable id: the prompt
            text, or its index in the prompt set).
        reference_prompt_ids (`Sequence` or tensor of length `R`, *optional*): each reference's prompt; every prompt
            of the generations needs at least one reference, and references of other prompts are ignored.
        threshold (`float`, defaults to 0.5): a copy is a similarity strictly above it; in ``[-1, 1]``.
        top_k (`int`, defaults to 3): how many of a prompt's highest scores are averaged.
        n_bootstrap (`int`, defaults to 1000): bootstrap resamples of the prompts.
        seed (`int`, defaults to 0): seed of the resampling.
        confidence (`float`, defaults to 0.95): the intervals' level, in ``(0, 1)``.
        features (`str`, defaults to `"unspecified"`): the name of the feature extractor, for the report (e.g.
            ``repr`` of the extractor).
        device (`str` or `torch.device`, *optional*): where the similarities are computed; by default the device of
            a non-CPU input, else CUDA when available, else the CPU.

    Returns:
        [`CopyDetectionReport`]: per-generation scores, per-prompt statistics and the overall numbers with intervals.
    """
    _check_settings(threshold, top_k, n_bootstrap, seed, confidence, features)
    generated = _as_rows(generated_features, "generated_features")
    references = _as_rows(reference_features, "reference_features")
    _check_dims(generated, "generated_features", references, "reference_features")
    prompts, generated_prompt, reference_prompt = _prompt_indices(
        prompt_ids, reference_prompt_ids, generated, references
    )

    device = _resolve_device(device, generated, references)
    max_similarity, nearest = _max_similarity(generated, references, generated_prompt, reference_prompt, device)
    copied = max_similarity > threshold
    per_prompt = _per_prompt(max_similarity, copied, generated_prompt, len(prompts), top_k)
    counts, prompt_max, prompt_top_k, prompt_copies = per_prompt

    intervals = prompt_bootstrap_intervals(
        {"max": prompt_max.numpy(), "top_k": prompt_top_k.numpy()},
        prompt_copies.numpy(),
        counts.double().numpy(),
        int(n_bootstrap),
        int(seed),
        float(confidence),
    )
    return CopyDetectionReport(
        max_similarity=max_similarity,
        nearest_reference=nearest,
        copied=copied,
        prompt_index=generated_prompt,
        prompts=prompts,
        prompt_num_generations=counts,
        prompt_max_similarity=prompt_max,
        prompt_top_k_mean=prompt_top_k,
        prompt_fraction_copied=prompt_copies / counts.double(),
        mean_max_similarity=float(prompt_max.mean()),
        mean_max_similarity_interval=intervals["max"],
        mean_top_k=float(prompt_top_k.mean()),
        mean_top_k_interval=intervals["top_k"],
        fraction_copied=float(copied.double().mean()),
        fraction_copied_interval=intervals["fraction_copied"],
        threshold=float(threshold),
        top_k=int(top_k),
        confidence=float(confidence),
        n_bootstrap=int(n_bootstrap),
        seed=int(seed),
        features=features,
        per_prompt_references=reference_prompt is not None,
        num_references=int(references.shape[0]),
    )


def _check_settings(threshold, top_k, n_bootstrap, seed, confidence, features) -> None:
    """:func:`copy_detection`'s settings, checked before any work."""
    if not (is_real_number(threshold) and -1.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {threshold!r}.")
    check_positive_int(top_k, "top_k")
    check_positive_int(n_bootstrap, "n_bootstrap")
    if not (is_integer(seed) and seed >= 0):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    if not (is_real_number(confidence) and 0.0 < confidence < 1.0):
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}.")
    if not isinstance(features, str):
        raise ValueError(f"features must be a string naming the feature extractor, got {type(features).__name__}.")


def _prompt_indices(
    prompt_ids: Any, reference_prompt_ids: Any, generated: torch.Tensor, references: torch.Tensor
) -> tuple[list[Hashable], torch.Tensor, torch.Tensor | None]:
    """The distinct prompts (in order of first appearance), each generation's position among them and each
    reference's (``-1`` for a prompt without generations; `None` without ``reference_prompt_ids``)."""
    ids = _prompt_list(prompt_ids, "prompt_ids", generated.shape[0])
    position: dict[Hashable, int] = {}
    for value in ids:
        position.setdefault(value, len(position))
    prompts = list(position)
    generated_prompt = torch.tensor([position[value] for value in ids], dtype=torch.int64)
    if reference_prompt_ids is None:
        return prompts, generated_prompt, None
    reference_ids = _prompt_list(reference_prompt_ids, "reference_prompt_ids", references.shape[0])
    reference_prompt = torch.tensor([position.get(value, -1) for value in reference_ids], dtype=torch.int64)
    covered = set(reference_prompt.tolist())
    missing = [prompt for p, prompt in enumerate(prompts) if p not in covered]
    if missing:
        raise ValueError(
            f"{len(missing)} prompts have generations but no reference image in reference_prompt_ids, e.g. "
            f"{missing[0]!r}."
        )
    return prompts, generated_prompt, reference_prompt


def _per_prompt(
    max_similarity: torch.Tensor, copied: torch.Tensor, generated_prompt: torch.Tensor, num_prompts: int, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per prompt: the number of generations, the highest similarity, the mean of the ``top_k`` highest (float64)
    and the number of copies (float64)."""
    counts = torch.bincount(generated_prompt, minlength=num_prompts)
    order = torch.argsort(generated_prompt, stable=True)
    groups = torch.split(max_similarity[order].double(), counts.tolist())
    prompt_max = torch.stack([group.max() for group in groups])
    prompt_top_k = torch.stack([group.topk(min(top_k, group.numel())).values.mean() for group in groups])
    prompt_copies = torch.bincount(generated_prompt[copied], minlength=num_prompts).double()
    return counts, prompt_max, prompt_top_k, prompt_copies
