"""The chunked exact nearest-neighbour search behind :mod:`.neighbours` and :mod:`.quality` (private to the package).

See :mod:`diffusers_hold.metrics.neighbours` for the method: blocks of squared distances by the expansion
``||a||^2 - 2 a.b + ||b||^2`` on mean-shifted data, a running top-k, and the selected pairs recomputed exactly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .._validation import ELEMENT_BUDGET, as_batch, check_finite, check_positive_int, check_same_shape

DEFAULT_CHUNK_SIZE = 1024
DEFAULT_QUERY_CHUNK_SIZE = 1024
_DTYPES = (torch.float32, torch.float64)


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
    rows = max(1, ELEMENT_BUDGET // dim)
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
    rows = max(1, ELEMENT_BUDGET // (k * dim))
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        picked = references[index[start:stop].reshape(-1).to(references.device)]  # a fresh copy: safe in place
        picked = picked.reshape(-1, dim).to(device=a.device, dtype=a.dtype).sub_(shift).view(stop - start, k, dim)
        out[start:stop] = picked.sub_(a[start:stop, None, :]).square_().sum(-1)
    return out


def knn(
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


def ball_coverage(
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
                step = max(1, ELEMENT_BUDGET // p.shape[1])
                for start in range(0, rows.numel(), step):
                    r, s = rows[start : start + step], cols[start : start + step]
                    exact = p[r].sub_(c[s]).square_().sum(1)  # p[r] is a fresh copy
                    covered[r[exact <= radii[0, s]]] = True
                bar.update(1)
            inside[p_start:p_stop] = covered.cpu()
    return inside


def prepare_search(
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
    :func:`knn` / :func:`ball_coverage` (chunk sizes, resolved device, dtype, progress)."""
    queries, references = as_batch(queries, names[0]), as_batch(references, names[1])
    check_same_shape(queries.shape[1:], names[0], references.shape[1:], names[1])
    check_positive_int(chunk_size, "chunk_size")
    check_positive_int(query_chunk_size, "query_chunk_size")
    _check_dtype(dtype)
    check_finite(queries, names[0])
    check_finite(references, names[1])
    search = {
        "chunk_size": chunk_size,
        "query_chunk_size": query_chunk_size,
        "device": _resolve_device(device, queries, references),
        "dtype": dtype,
        "progress": progress,
    }
    return queries, references, search
