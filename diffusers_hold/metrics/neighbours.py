"""Nearest neighbours between image sets, and the weight-free memorization metrics built on them.

Images are compared as flat vectors: an image of shape ``(C, H, W)`` (or any shape) is one point of ``R^D`` with
``D = C * H * W``, and the distance is the Euclidean (L2) norm of the pixel-wise difference. Two sets of shape
``(N, *image_shape)`` must share ``image_shape``.

The search never builds the full ``Q x R`` distance matrix. It walks over blocks of ``query_chunk_size`` queries and
``chunk_size`` references, computes each block of squared distances with the expansion
``||a||^2 - 2 a.b + ||b||^2`` (one matrix product, clamped at 0) after shifting both sets by the mean reference (which
leaves distances unchanged and shrinks the norms whose cancellation limits the expansion's accuracy), and keeps a
running top-k per query that is merged with every new block. The selected pairs are then recomputed by direct
differences ``sum((a - b)^2)``, so the distances returned carry no cancellation error from the expansion (which only
decides which neighbours are kept). Peak memory is about ``query_chunk_size * chunk_size`` distances plus a copy of
one chunk of each set in the working dtype, whatever the set sizes.

Reference: ``docs/MEMORIZATION.md``, "Metrics" 1 (the 1/3 rule) and 2 (calibrated L2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._validation import as_batch, check_finite, check_k, check_same_shape, is_real_number
from ._search import DEFAULT_CHUNK_SIZE, DEFAULT_QUERY_CHUNK_SIZE, knn, prepare_search

__all__ = [
    "CalibratedL2Report",
    "HeldOutDistanceReport",
    "MemorizationReport",
    "calibrated_l2",
    "held_out_distance_memorization",
    "nearest_neighbours",
    "nn_ratio_memorization",
]


# ----------------------------------------------------------------------------------------------------- search
def nearest_neighbours(
    queries: torch.Tensor | np.ndarray,
    references: torch.Tensor | np.ndarray,
    k: int = 2,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    squared: bool = False,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest references of every query in L2 distance between flattened images, with bounded memory.

    Blocks of ``query_chunk_size x chunk_size`` squared distances are computed with the expansion
    ``||a||^2 - 2 a.b + ||b||^2`` (on mean-shifted data, clamped at 0) and merged into a running top-k; the ``k``
    selected distances of each query are then recomputed by direct differences. Exact ties are broken arbitrarily
    when they straddle the ``k``-th place, otherwise by increasing reference index. Memory stays bounded by the chunk
    sizes (plus the ``(Q, k)`` results), whatever ``Q`` and ``R``.

    Args:
        queries (`torch.Tensor` or `np.ndarray` of shape `(Q, *image_shape)`): images whose neighbours are sought.
        references (`torch.Tensor` or `np.ndarray` of shape `(R, *image_shape)`): the set searched (``R >= k``).
        k (`int`, defaults to 2): number of neighbours per query.
        chunk_size (`int`, defaults to 1024): references per block.
        query_chunk_size (`int`, defaults to 1024): queries per block.
        device (`str` or `torch.device`, *optional*): where the blocks are computed; by default the device of a
            non-CPU input, else CUDA when available, else the CPU. Inputs stay where they are; chunks are copied.
        dtype (`torch.dtype`, defaults to `torch.float32`): `torch.float32` or `torch.float64`, the working precision.
        squared (`bool`, defaults to `False`): return squared distances.
        progress (`bool`, defaults to `False`): show a tqdm progress bar over the blocks.

    Returns:
        `tuple`: ``distances`` of shape ``(Q, k)`` in ``dtype``, increasing along each row, and the matching
        ``indices`` into ``references`` (int64), both on the CPU.
    """
    queries, references, search = prepare_search(
        queries,
        references,
        ("queries", "references"),
        chunk_size=chunk_size,
        query_chunk_size=query_chunk_size,
        device=device,
        dtype=dtype,
        progress=progress,
    )
    check_k(k, references.shape[0], f"A {k}-nearest-neighbour search", "references")
    dist, index = knn(queries, references, k, **search)
    return (dist if squared else dist.sqrt()), index


# -------------------------------------------------------------------------------------------- 1/3 rule (NN ratio)
def _ratio(d1: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
    """``d1 / d2``, and 1 where ``d2 == 0`` (then ``d1 == 0`` too: the limit of equal distances)."""
    return torch.where(d2 > 0, d1 / torch.where(d2 > 0, d2, torch.ones_like(d2)), torch.ones_like(d1))


@dataclass
class MemorizationReport:
    """Result of :func:`nn_ratio_memorization` (the nearest-neighbour "1/3 rule").

    Distances are L2 distances between flattened images, or their squares when ``squared`` (then ``ratio`` is the
    square of the plain ratio and the default threshold ``1/9`` gives the same decisions as ``1/3``).

    Attributes:
        d1 (`torch.Tensor` of shape `(N,)`): distance of each generated image to its nearest training image.
        d2 (`torch.Tensor` of shape `(N,)`): distance to the second-nearest training image.
        ratio (`torch.Tensor` of shape `(N,)`): ``d1 / d2`` in ``[0, 1]``; 1 where ``d2 == 0`` (a sample equal to two
            identical training images: deduplicate the training set before measuring).
        nearest_index (`torch.Tensor` of shape `(N,)`): index of the nearest training image (int64).
        memorized (`torch.Tensor` of shape `(N,)`): ``ratio < threshold`` (bool).
        threshold (`float`): the threshold used.
        squared (`bool`): whether distances (and the ratio) are squared.
        fraction_memorized (`float`): mean of ``memorized``.
        distinct_copied (`int`): number of distinct training images that some memorized sample is nearest to.
        copied_indices (`torch.Tensor`): those training indices, sorted (int64).
        num_train (`int`): size of the training set searched.
        held_out_ratio (`torch.Tensor` of shape `(M,)`, *optional*): the same ratio for held-out real images (the
            control; `None` without ``held_out``).
        held_out_fraction (`float`, *optional*): fraction of held-out images below the threshold (should be ~0).
    """

    d1: torch.Tensor
    d2: torch.Tensor
    ratio: torch.Tensor
    nearest_index: torch.Tensor
    memorized: torch.Tensor
    threshold: float
    squared: bool
    fraction_memorized: float
    distinct_copied: int
    copied_indices: torch.Tensor
    num_train: int
    held_out_ratio: torch.Tensor | None = None
    held_out_fraction: float | None = None

    @property
    def num_generated(self) -> int:
        """Number of generated images measured."""
        return int(self.d1.shape[0])

    def to_dict(self, per_sample: bool = True) -> dict[str, Any]:
        """Plain Python values for ``json.dump``; ``per_sample=False`` keeps only the summary."""
        out: dict[str, Any] = {
            "metric": "nn_ratio",
            "threshold": self.threshold,
            "squared": self.squared,
            "num_generated": self.num_generated,
            "num_train": self.num_train,
            "fraction_memorized": self.fraction_memorized,
            "distinct_copied": self.distinct_copied,
            "copied_indices": self.copied_indices.tolist(),
            "median_ratio": float(self.ratio.double().median()),
            "held_out_fraction": self.held_out_fraction,
            "num_held_out": None if self.held_out_ratio is None else int(self.held_out_ratio.shape[0]),
        }
        if per_sample:
            out["per_sample"] = {
                "d1": self.d1.tolist(),
                "d2": self.d2.tolist(),
                "ratio": self.ratio.tolist(),
                "nearest_index": self.nearest_index.tolist(),
                "memorized": self.memorized.tolist(),
            }
            out["held_out_ratio"] = None if self.held_out_ratio is None else self.held_out_ratio.tolist()
        return out


def nn_ratio_memorization(
    generated: torch.Tensor | np.ndarray,
    train: torch.Tensor | np.ndarray,
    held_out: torch.Tensor | np.ndarray | None = None,
    threshold: float | None = None,
    squared: bool = False,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> MemorizationReport:
    """Memorization by the nearest-neighbour ratio: a generated image is memorized iff ``d1 / d2 < threshold``.

    ``d1`` and ``d2`` are its L2 distances to the nearest and second-nearest training images (Yoon et al.; Gu et
    al.). Train without flips when measuring this way (or add the flipped images to ``train``), and deduplicate
    ``train``: a near-duplicate pair makes ``d1 ~ d2`` for anything close to it.

    Args:
        generated (`torch.Tensor` or `np.ndarray` of shape `(N, *image_shape)`): generated images.
        train (`torch.Tensor` or `np.ndarray` of shape `(R, *image_shape)`): the training images (``R >= 2``), in the
            same value range and layout as ``generated``.
        held_out (`torch.Tensor` or `np.ndarray` of shape `(M, *image_shape)`, *optional*): real images not used for
            training; their ratio to ``train`` is the control, whose memorized fraction should be ~0.
        threshold (`float`, *optional*): in ``(0, 1]``; defaults to ``1/3``, or ``1/9`` when ``squared``.
        squared (`bool`, defaults to `False`): use squared distances (and their ratio).
        chunk_size (`int`, defaults to 1024): training images per block of the search.
        query_chunk_size (`int`, defaults to 1024): generated (or held-out) images per block.
        device (`str` or `torch.device`, *optional*): where the search runs (see :func:`nearest_neighbours`).
        dtype (`torch.dtype`, defaults to `torch.float32`): working precision, `torch.float32` or `torch.float64`.
        progress (`bool`, defaults to `False`): show tqdm progress bars.

    Returns:
        [`MemorizationReport`]: per-sample distances, ratios and nearest indices, the memorized mask and fraction, the
        distinct training images copied, and the held-out control.
    """
    if threshold is None:
        threshold = 1.0 / 9.0 if squared else 1.0 / 3.0
    if not (is_real_number(threshold) and 0 < threshold <= 1):
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}.")
    generated, train, search = prepare_search(
        generated,
        train,
        ("generated", "train"),
        chunk_size=chunk_size,
        query_chunk_size=query_chunk_size,
        device=device,
        dtype=dtype,
        progress=progress,
    )
    check_k(2, train.shape[0], "The nearest-neighbour ratio (k=2)", "train")
    if held_out is not None:
        held_out = as_batch(held_out, "held_out")
        check_same_shape(held_out.shape[1:], "held_out", train.shape[1:], "train")
        check_finite(held_out, "held_out")

    dist, index = knn(generated, train, 2, desc="generated vs train", **search)
    if not squared:
        dist = dist.sqrt()
    ratio = _ratio(dist[:, 0], dist[:, 1])
    memorized = ratio < threshold
    copied = torch.unique(index[memorized, 0])
    held_out_ratio = held_out_fraction = None
    if held_out is not None:
        held_dist, _ = knn(held_out, train, 2, desc="held-out vs train", **search)
        if not squared:
            held_dist = held_dist.sqrt()
        held_out_ratio = _ratio(held_dist[:, 0], held_dist[:, 1])
        held_out_fraction = float((held_out_ratio < threshold).double().mean())
    return MemorizationReport(
        d1=dist[:, 0],
        d2=dist[:, 1],
        ratio=ratio,
        nearest_index=index[:, 0],
        memorized=memorized,
        threshold=float(threshold),
        squared=bool(squared),
        fraction_memorized=float(memorized.double().mean()),
        distinct_copied=int(copied.numel()),
        copied_indices=copied,
        num_train=int(train.shape[0]),
        held_out_ratio=held_out_ratio,
        held_out_fraction=held_out_fraction,
    )


@dataclass
class HeldOutDistanceReport:
    """Result of :func:`held_out_distance_memorization`.

    Attributes:
        distance (`torch.Tensor` of shape `(N,)`): each generation's L2 distance to its nearest training image.
        nearest_index (`torch.Tensor` of shape `(N,)`): that training image's index.
        held_out_distance (`torch.Tensor` of shape `(M,)`): each held-out image's distance to its nearest training
            image.
        threshold (`float`): the ``quantile`` of ``held_out_distance`` (linear interpolation).
        quantile (`float`): the quantile used.
        memorized (`torch.Tensor` of shape `(N,)`, bool): ``distance < threshold``.
        fraction_memorized (`float`): the mean of ``memorized``.
    """

    distance: torch.Tensor
    nearest_index: torch.Tensor
    held_out_distance: torch.Tensor
    threshold: float
    quantile: float
    memorized: torch.Tensor
    fraction_memorized: float


def held_out_distance_memorization(
    generated: torch.Tensor | np.ndarray,
    train: torch.Tensor | np.ndarray,
    held_out: torch.Tensor | np.ndarray,
    quantile: float = 0.05,
    **search: Any,
) -> HeldOutDistanceReport:
    """Memorization as closeness beyond what fresh data shows: a generation is memorized iff its nearest training
    image is closer than the ``quantile`` of the held-out images' nearest-training distances.

    Unlike the 1/3 rule (:func:`nn_ratio_memorization`), this does not hinge on the gap between the first and second
    nearest training images, so near-duplicates inside the training set do not hide copies of them. By construction
    about ``quantile`` of fresh real images would count as memorized.

    Args:
        generated (`torch.Tensor` or `np.ndarray` of shape `(N, *image_shape)`): generated images.
        train (`torch.Tensor` or `np.ndarray` of shape `(R, *image_shape)`): the training images.
        held_out (`torch.Tensor` or `np.ndarray` of shape `(M, *image_shape)`): real images not used for training.
        quantile (`float`, defaults to 0.05): in ``(0, 1)``.
        **search: keyword arguments of :func:`nearest_neighbours` (``chunk_size``, ``device``, ``dtype``, ...).

    Returns:
        [`HeldOutDistanceReport`]
    """
    if not (is_real_number(quantile) and 0 < quantile < 1):
        raise ValueError(f"quantile must lie in (0, 1), got {quantile!r}.")
    distance, index = nearest_neighbours(generated, train, k=1, **search)
    held_out_distance, _ = nearest_neighbours(held_out, train, k=1, **search)
    threshold = float(torch.quantile(held_out_distance[:, 0].double(), quantile))
    memorized = distance[:, 0] < threshold
    return HeldOutDistanceReport(
        distance=distance[:, 0],
        nearest_index=index[:, 0],
        held_out_distance=held_out_distance[:, 0],
        threshold=threshold,
        quantile=float(quantile),
        memorized=memorized,
        fraction_memorized=float(memorized.double().mean()),
    )


# ------------------------------------------------------------------------------------------------ calibrated L2
@dataclass
class CalibratedL2Report:
    """Result of :func:`calibrated_l2` (Carlini et al. 2023's calibrated L2 extraction test).

    Attributes:
        score (`torch.Tensor` of shape `(N,)`): ``l2(x, n_0) / (alpha * mean_{j<k} l2(x, n_j))``, float64, where
            ``n_0, ..., n_{k-1}`` are the ``k`` nearest training images (``n_0`` included in the mean); ``1 / alpha``
            where all ``k`` distances are 0 (the limit of equal distances).
        extracted (`torch.Tensor` of shape `(N,)`): ``score < threshold`` (bool).
        nearest_index (`torch.Tensor` of shape `(N,)`): index of the nearest training image ``n_0`` (int64).
        nearest_distance (`torch.Tensor` of shape `(N,)`): ``l2(x, n_0)``.
        mean_knn_distance (`torch.Tensor` of shape `(N,)`): mean L2 distance to the ``k`` nearest training images.
        k (`int`): neighbours in the calibration mean.
        alpha (`float`): calibration factor.
        threshold (`float`): the extraction threshold.
        fraction_extracted (`float`): mean of ``extracted``.
        distinct_extracted (`int`): number of distinct training images nearest to an extracted sample.
    """

    score: torch.Tensor
    extracted: torch.Tensor
    nearest_index: torch.Tensor
    nearest_distance: torch.Tensor
    mean_knn_distance: torch.Tensor
    k: int
    alpha: float
    threshold: float
    fraction_extracted: float
    distinct_extracted: int

    def to_dict(self, per_sample: bool = True) -> dict[str, Any]:
        """Plain Python values for ``json.dump``; ``per_sample=False`` keeps only the summary."""
        scores = self.score.double()
        out: dict[str, Any] = {
            "metric": "calibrated_l2",
            "k": self.k,
            "alpha": self.alpha,
            "threshold": self.threshold,
            "num_generated": int(scores.shape[0]),
            "fraction_extracted": self.fraction_extracted,
            "distinct_extracted": self.distinct_extracted,
            "score_p05": float(torch.quantile(scores, 0.05)),
            "score_median": float(scores.median()),
        }
        if per_sample:
            out["per_sample"] = {
                "score": self.score.tolist(),
                "extracted": self.extracted.tolist(),
                "nearest_index": self.nearest_index.tolist(),
                "nearest_distance": self.nearest_distance.tolist(),
                "mean_knn_distance": self.mean_knn_distance.tolist(),
            }
        return out


def calibrated_l2(
    generated: torch.Tensor | np.ndarray,
    train: torch.Tensor | np.ndarray,
    k: int = 50,
    alpha: float = 0.5,
    threshold: float = 1.0,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> CalibratedL2Report:
    """Calibrated L2 distance to the training set: ``l2(x, n_0) / (alpha * mean_{k NN} l2(x, z))``.

    A sample is "extracted" when it is much closer to its nearest training image than to the rest of its
    neighbourhood: ``score < threshold`` (Carlini et al. 2023: ``k = 50``, ``alpha = 0.5``, threshold 1; AMG flags
    ``< 1.4`` on CIFAR-10 and reports the 5th percentile of the score).

    Args:
        generated (`torch.Tensor` or `np.ndarray` of shape `(N, *image_shape)`): generated images.
        train (`torch.Tensor` or `np.ndarray` of shape `(R, *image_shape)`): training images (``R >= k``).
        k (`int`, defaults to 50): size of the neighbourhood averaged in the denominator (the nearest included).
        alpha (`float`, defaults to 0.5): calibration factor, positive.
        threshold (`float`, defaults to 1.0): extraction threshold, positive.
        chunk_size (`int`, defaults to 1024): training images per block of the search.
        query_chunk_size (`int`, defaults to 1024): generated images per block.
        device (`str` or `torch.device`, *optional*): where the search runs (see :func:`nearest_neighbours`).
        dtype (`torch.dtype`, defaults to `torch.float32`): working precision, `torch.float32` or `torch.float64`.
        progress (`bool`, defaults to `False`): show a tqdm progress bar.

    Returns:
        [`CalibratedL2Report`]: per-sample scores, the extracted mask and the neighbourhood statistics.
    """
    for name, value in (("alpha", alpha), ("threshold", threshold)):
        if not (is_real_number(value) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}.")
    generated, train, search = prepare_search(
        generated,
        train,
        ("generated", "train"),
        chunk_size=chunk_size,
        query_chunk_size=query_chunk_size,
        device=device,
        dtype=dtype,
        progress=progress,
    )
    check_k(k, train.shape[0], f"The calibrated L2 distance with k={k}", "train")
    dist, index = knn(generated, train, k, desc="generated vs train", **search)
    dist = dist.double().sqrt()
    mean_knn = dist.mean(1)
    denominator = alpha * mean_knn
    score = torch.where(
        denominator > 0,
        dist[:, 0] / torch.where(denominator > 0, denominator, torch.ones_like(denominator)),
        torch.full_like(denominator, 1.0 / alpha),
    )
    extracted = score < threshold
    return CalibratedL2Report(
        score=score,
        extracted=extracted,
        nearest_index=index[:, 0],
        nearest_distance=dist[:, 0],
        mean_knn_distance=mean_knn,
        k=k,
        alpha=float(alpha),
        threshold=float(threshold),
        fraction_extracted=float(extracted.double().mean()),
        distinct_extracted=int(torch.unique(index[extracted, 0]).numel()),
    )
