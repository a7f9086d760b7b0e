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

Reference: ``shared/design/MEMORIZATION.md``, "Metrics" 1 (the 1/3 rule) and 2 (calibrated L2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = [
    "CalibratedL2Report",
    "MemorizationReport",
    "calibrated_l2",
    "nearest_neighbours",
    "nn_ratio_memorization",
]

DEFAULT_CHUNK_SIZE = 1024
DEFAULT_QUERY_CHUNK_SIZE = 1024
_DTYPES = (torch.float32, torch.float64)
# elements handled at once by the exact recomputation and by the finiteness check (bounded extra memory)
_ELEMENT_BUDGET = 1 << 22


# ------------------------------------------------------------------------------------------------ validation
def _as_batch(images: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """A non-empty batch ``(N, *image_shape)`` of real numbers as a tensor (numpy arrays are wrapped, not copied)."""
    if isinstance(images, np.ndarray):
        if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
            raise ValueError(f"{name} must hold real numbers, got a numpy array of dtype {images.dtype}.")
        try:
            images = torch.from_numpy(images)
        except ValueError:  # negative strides
            images = torch.from_numpy(np.ascontiguousarray(images))
    elif not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or a numpy array, got {type(images).__name__}.")
    if images.is_complex() or images.dtype == torch.bool:
        raise ValueError(f"{name} must hold real numbers, got dtype {images.dtype}.")
    if images.ndim < 2:
        raise ValueError(
            f"{name} must be a batch of shape (N, ...) with one image (or feature vector) per row, "
            f"got shape {tuple(images.shape)}."
        )
    if images.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(images.shape)}); at least one image is needed.")
    if images[0].numel() == 0:
        raise ValueError(f"{name} holds images with no elements (shape {tuple(images.shape)}).")
    return images


def _check_finite(images: torch.Tensor, name: str) -> None:
    """Raise on NaN or infinite values, naming the first offending row; works chunk by chunk (bounded memory).

    Row norms are a fast screen (NaN and inf propagate into them); only a chunk with a non-finite norm, which may
    also be a harmless overflow, is checked element by element.
    """
    if not images.is_floating_point():
        return
    rows = max(1, _ELEMENT_BUDGET // images[0].numel())
    for start in range(0, images.shape[0], rows):
        chunk = images[start : start + rows].flatten(1)
        if bool(torch.isfinite(torch.linalg.vector_norm(chunk, dim=1)).all()):
            continue
        ok = torch.isfinite(chunk).all(1)
        if not bool(ok.all()):
            first = start + int((~ok).nonzero()[0, 0])
            raise ValueError(f"{name} contains NaN or infinite values (first in row {first}).")


def _check_same_shape(shape_a: tuple[int, ...], name_a: str, shape_b: tuple[int, ...], name_b: str) -> None:
    """Raise unless two per-image shapes agree, saying when only the channel count differs."""
    shape_a, shape_b = tuple(shape_a), tuple(shape_b)
    if shape_a == shape_b:
        return
    if len(shape_a) == len(shape_b) >= 3:
        if shape_a[1:] == shape_b[1:]:  # channels first
            channels = (shape_a[0], shape_b[0])
        elif shape_a[:-1] == shape_b[:-1]:  # channels last
            channels = (shape_a[-1], shape_b[-1])
        else:
            channels = None
        if channels is not None:
            raise ValueError(
                f"{name_a} and {name_b} have different channel counts ({channels[0]} vs {channels[1]}; image shapes "
                f"{shape_a} and {shape_b})."
            )
    raise ValueError(
        f"{name_a} and {name_b} have different image shapes: {shape_a} vs {shape_b}. Samples are compared element "
        "by element, so both sets must have the same shape after the batch axis."
    )


def _check_k(k: int, available: int, what: str, name: str) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    if available < k:
        raise ValueError(f"{what} needs at least {k} images in {name}, but {name} holds only {available}.")


def _is_real_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_positive_int(value: int, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _resolve_device(device: str | torch.device | None, *tensors: torch.Tensor) -> torch.device:
    """``device`` if given, else the device of the first non-CPU input, else CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    for tensor in tensors:
        if tensor.device.type != "cpu":
            return tensor.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}.")


def _rows(
    images: torch.Tensor, start: int, stop: int, device: torch.device, dtype: torch.dtype, shift: torch.Tensor
) -> torch.Tensor:
    """Rows ``start:stop`` flattened to ``(stop - start, D)`` on ``device`` in ``dtype``, minus ``shift`` (a copy)."""
    return images[start:stop].reshape(stop - start, -1).to(device=device, dtype=dtype) - shift


def _centre(images: torch.Tensor, device: torch.device, dtype: torch.dtype, max_rows: int = 1024) -> torch.Tensor:
    """Mean of at most ``max_rows`` evenly spaced flattened rows (float64 sum), in ``dtype`` on ``device``.

    Every point is shifted by it before the expansion ``||a||^2 - 2 a.b + ||b||^2``: distances do not change, but the
    norms, and with them the cancellation error of the expansion, shrink to the spread of the data. Any shift is
    exact; one near the middle of the data is all that is needed, so a subset suffices.
    """
    subset = images[:: max(1, images.shape[0] // max_rows)][:max_rows]
    m, dim = subset.shape[0], subset[0].numel()
    total = torch.zeros(dim, dtype=torch.float64, device=device)
    rows = max(1, _ELEMENT_BUDGET // dim)
    for start in range(0, m, rows):
        stop = min(start + rows, m)
        total += subset[start:stop].reshape(stop - start, dim).to(device=device, dtype=torch.float64).sum(0)
    return (total / m).to(dtype)


def _squared_norms(x: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each row, without a temporary the size of ``x``."""
    return torch.linalg.vector_norm(x, dim=1).square()


def _squared_distance_block(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """``||a_i||^2 - 2 a_i.b_j + ||b_j||^2`` for a block, clamped at 0 (``a_sq`` is ``(n, 1)``, ``b_sq`` ``(m,)``)."""
    return torch.addmm(b_sq[None, :], a, b.T, beta=1.0, alpha=-2.0).add_(a_sq).clamp_min_(0.0)


def _exact_squared_distances(
    a: torch.Tensor, references: torch.Tensor, index: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """``sum((a_i - (references[index[i, j]] - shift))^2)`` by direct differences, ``(n, k)``, in bounded batches."""
    n, k = index.shape
    dim = a.shape[1]
    out = torch.empty(n, k, dtype=a.dtype, device=a.device)
    rows = max(1, _ELEMENT_BUDGET // (k * dim))
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        picked = references[index[start:stop].reshape(-1).to(references.device)]  # a fresh copy: safe in place
        picked = picked.reshape(-1, dim).to(device=a.device, dtype=a.dtype).sub_(shift).view(stop - start, k, dim)
        out[start:stop] = picked.sub_(a[start:stop, None, :]).square_().sum(-1)
    return out


# ----------------------------------------------------------------------------------------------------- search
def _knn(
    queries: torch.Tensor,
    references: torch.Tensor,
    k: int,
    *,
    chunk_size: int,
    query_chunk_size: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool,
    desc: str = "nearest neighbours",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distances and indices of the ``k`` nearest references of every query (inputs already validated)."""
    n_queries, n_refs = queries.shape[0], references.shape[0]
    out_dist = torch.empty(n_queries, k, dtype=dtype)
    out_index = torch.empty(n_queries, k, dtype=torch.long)
    ref_chunks = [(start, min(start + chunk_size, n_refs)) for start in range(0, n_refs, chunk_size)]
    n_blocks = math.ceil(n_queries / query_chunk_size) * len(ref_chunks)
    shift = _centre(references, device, dtype)
    with tqdm(total=n_blocks, desc=desc, unit="block", disable=not progress) as bar:
        for q_start in range(0, n_queries, query_chunk_size):
            q_stop = min(q_start + query_chunk_size, n_queries)
            q = _rows(queries, q_start, q_stop, device, dtype, shift)
            q_sq = _squared_norms(q)[:, None]
            best_dist = torch.full((q_stop - q_start, k), math.inf, dtype=dtype, device=device)
            best_index = torch.full((q_stop - q_start, k), -1, dtype=torch.long, device=device)
            for r_start, r_stop in ref_chunks:
                r = _rows(references, r_start, r_stop, device, dtype, shift)
                block = _squared_distance_block(q, q_sq, r, _squared_norms(r))
                vals, idx = torch.topk(block, min(k, r_stop - r_start), dim=1, largest=False, sorted=False)
                merged_dist = torch.cat([best_dist, vals], dim=1)
                merged_index = torch.cat([best_index, idx + r_start], dim=1)
                best_dist, pos = torch.topk(merged_dist, k, dim=1, largest=False, sorted=False)
                best_index = merged_index.gather(1, pos)
                bar.update(1)
            del r, block, vals, idx, merged_dist, merged_index
            if bool((best_index < 0).any()):
                raise ValueError(
                    f"Squared distances overflow {dtype}; rescale the images or pass dtype=torch.float64."
                )
            # exact distances of the selected pairs; order by (distance, index) so ties come out deterministically
            best_index = best_index.sort(dim=1).values
            exact = _exact_squared_distances(q, references, best_index, shift)
            exact, order = exact.sort(dim=1, stable=True)
            if not bool(torch.isfinite(exact).all()):
                raise ValueError(
                    f"Squared distances overflow {dtype}; rescale the images or pass dtype=torch.float64."
                )
            out_dist[q_start:q_stop] = exact.cpu()
            out_index[q_start:q_stop] = best_index.gather(1, order).cpu()
    return out_dist, out_index


def _ball_coverage(
    points: torch.Tensor,
    centres: torch.Tensor,
    radii_sq: torch.Tensor,
    *,
    chunk_size: int,
    query_chunk_size: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = False,
) -> torch.Tensor:
    """Whether each point lies in at least one closed ball ``||p - c_j||^2 <= radii_sq[j]``, ``(N,)`` bool.

    Pairs that the expansion places within its rounding margin of a ball's boundary are recomputed exactly, so a
    point that coincides with a centre, or sits exactly on the boundary, is decided the same way as the radii were.
    """
    n_points, n_centres = points.shape[0], centres.shape[0]
    radii_sq = radii_sq.to(device=device, dtype=dtype)
    slack = math.sqrt(torch.finfo(dtype).eps)
    inside = torch.zeros(n_points, dtype=torch.bool)
    ref_chunks = [(start, min(start + chunk_size, n_centres)) for start in range(0, n_centres, chunk_size)]
    n_blocks = math.ceil(n_points / query_chunk_size) * len(ref_chunks)
    shift = _centre(centres, device, dtype)
    with tqdm(total=n_blocks, desc="ball coverage", unit="block", disable=not progress) as bar:
        for p_start in range(0, n_points, query_chunk_size):
            p_stop = min(p_start + query_chunk_size, n_points)
            p = _rows(points, p_start, p_stop, device, dtype, shift)
            p_sq = _squared_norms(p)[:, None]
            covered = torch.zeros(p_stop - p_start, dtype=torch.bool, device=device)
            for c_start, c_stop in ref_chunks:
                if bool(covered.all()):
                    bar.update(1)
                    continue
                c = _rows(centres, c_start, c_stop, device, dtype, shift)
                c_sq = _squared_norms(c)
                block = _squared_distance_block(p, p_sq, c, c_sq)
                radii = radii_sq[c_start:c_stop][None, :]
                margin = slack * (p_sq + c_sq[None, :])
                covered |= (block <= radii - margin).any(1)
                rows, cols = torch.nonzero((block <= radii + margin) & ~covered[:, None], as_tuple=True)
                step = max(1, _ELEMENT_BUDGET // p.shape[1])
                for start in range(0, rows.numel(), step):
                    r, s = rows[start : start + step], cols[start : start + step]
                    exact = p[r].sub_(c[s]).square_().sum(1)  # p[r] is a fresh copy
                    covered[r[exact <= radii[0, s]]] = True
                bar.update(1)
            inside[p_start:p_stop] = covered.cpu()
    return inside


def _prepare_search(
    queries: torch.Tensor | np.ndarray,
    references: torch.Tensor | np.ndarray,
    names: tuple[str, str],
    *,
    chunk_size: int,
    query_chunk_size: int,
    device: str | torch.device | None,
    dtype: torch.dtype,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Validate a pair of image sets and the search settings; return both batches and the keyword arguments of
    :func:`_knn` / :func:`_ball_coverage` (chunk sizes, resolved device, dtype, progress)."""
    queries, references = _as_batch(queries, names[0]), _as_batch(references, names[1])
    _check_same_shape(queries.shape[1:], names[0], references.shape[1:], names[1])
    _check_positive_int(chunk_size, "chunk_size")
    _check_positive_int(query_chunk_size, "query_chunk_size")
    _check_dtype(dtype)
    _check_finite(queries, names[0])
    _check_finite(references, names[1])
    search = {
        "chunk_size": chunk_size,
        "query_chunk_size": query_chunk_size,
        "device": _resolve_device(device, queries, references),
        "dtype": dtype,
        "progress": progress,
    }
    return queries, references, search


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
    queries, references, search = _prepare_search(
        queries,
        references,
        ("queries", "references"),
        chunk_size=chunk_size,
        query_chunk_size=query_chunk_size,
        device=device,
        dtype=dtype,
        progress=progress,
    )
    _check_k(k, references.shape[0], f"A {k}-nearest-neighbour search", "references")
    dist, index = _knn(queries, references, k, **search)
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
    if not (_is_real_number(threshold) and 0 < threshold <= 1):
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}.")
    generated, train, search = _prepare_search(
        generated,
        train,
        ("generated", "train"),
        chunk_size=chunk_size,
        query_chunk_size=query_chunk_size,
        device=device,
        dtype=dtype,
        progress=progress,
    )
    _check_k(2, train.shape[0], "The nearest-neighbour ratio (k=2)", "train")
    if held_out is not None:
        held_out = _as_batch(held_out, "held_out")
        _check_same_shape(held_out.shape[1:], "held_out", train.shape[1:], "train")
        _check_finite(held_out, "held_out")

    dist, index = _knn(generated, train, 2, desc="generated vs train", **search)
    if not squared:
        dist = dist.sqrt()
    ratio = _ratio(dist[:, 0], dist[:, 1])
    memorized = ratio < threshold
    copied = torch.unique(index[memorized, 0])
    held_out_ratio = held_out_fraction = None
    if held_out is not None:
        held_dist, _ = _knn(held_out, train, 2, desc="held-out vs train", **search)
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
        if not (_is_real_number(value) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}.")
    generated, train, search = _prepare_search(
        generated,
        train,
        ("generated", "train"),
        chunk_size=chunk_size,
        query_chunk_size=query_chunk_size,
        device=device,
        dtype=dtype,
        progress=progress,
    )
    _check_k(k, train.shape[0], f"The calibrated L2 distance with k={k}", "train")
    dist, index = _knn(generated, train, k, desc="generated vs train", **search)
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
