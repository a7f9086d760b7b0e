"""Effective model memorization (EMM; Gu, Du, Pang, Li, Lin and Wang, *On Memorization in Diffusion Models*, 2023).

EMM is the largest training-set size ``|D|`` at which a training recipe (architecture, optimiser, a budget of a fixed
number of epochs for every ``|D|``) still memorizes at least 90 % of its generations under the nearest-neighbour
ratio. Smaller training sets memorize more, so EMM separates recipes by how much they memorize: a recipe with a larger
EMM memorizes more. Each evaluation trains a model, so the search spends as few as it can: a bisection on a log scale
between two sizes, or a grid the caller gives.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .._validation import as_batch, check_finite, check_positive_int
from .neighbours import nn_ratio_memorization

__all__ = ["EMMPoint", "EMMResult", "effective_model_memorization"]


@dataclass
class EMMPoint:
    """One measured training-set size of :func:`effective_model_memorization`.

    Attributes:
        size (`int`): number of training images.
        fraction_memorized (`float`): memorized fraction of the generations (nearest-neighbour ratio).
        distinct_copied (`int`): distinct training images that some memorized generation copies.
        num_generated (`int`): generations measured.
        seconds (`float`): wall time of training, sampling and measuring.
    """

    size: int
    fraction_memorized: float
    distinct_copied: int
    num_generated: int
    seconds: float


@dataclass
class EMMResult:
    """Result of :func:`effective_model_memorization`.

    Attributes:
        emm (`int`, *optional*): the largest measured size whose memorized fraction is ``>= threshold``; `None` when
            no measured size reaches it (EMM is below the smallest size tried).
        threshold (`float`): the memorized fraction that defines EMM (0.9 in Gu et al.).
        epochs (`int`): the training budget given to every size.
        curve (`list[EMMPoint]`): every measured size, sorted by size.
        bracket (`tuple[int, int | None]`): ``(emm, next larger measured size)``: EMM lies in ``[bracket[0],
            bracket[1])``; ``bracket[1]`` is `None` when even the largest size tried memorized (EMM is at least the
            data pool, a lower bound only).
        search (`str`): `"bisection"` or `"grid"`.
    """

    emm: int | None
    threshold: float
    epochs: int
    curve: list[EMMPoint] = field(default_factory=list)
    bracket: tuple[int | None, int | None] = (None, None)
    search: str = "bisection"

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values for ``json.dump``."""
        return {
            "emm": self.emm,
            "threshold": self.threshold,
            "epochs": self.epochs,
            "search": self.search,
            "bracket": list(self.bracket),
            "curve": [vars(point) for point in self.curve],
        }


def effective_model_memorization(
    train_and_sample: Callable[[torch.Tensor, int], torch.Tensor | np.ndarray],
    data_pool: torch.Tensor | np.ndarray,
    epochs: int,
    *,
    sizes: Sequence[int] | None = None,
    min_size: int = 2,
    max_size: int | None = None,
    rtol: float = 0.1,
    threshold: float = 0.9,
    ratio_threshold: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> EMMResult:
    """Estimate the effective model memorization of a training recipe.

    Training sets are nested: size ``n`` uses the first ``n`` images of one seeded permutation of ``data_pool``, so a
    larger set contains every smaller one. For each size ``n`` the search calls ``train_and_sample(indices, epochs)``,
    which trains a fresh model on ``data_pool[indices]`` for ``epochs`` epochs (the same budget for every size, as in
    Gu et al.) and returns its generations; their memorized fraction is measured by
    :func:`~diffusers_hold.metrics.nn_ratio_memorization` against those training images.

    Without ``sizes`` the search is a bisection on a log scale: it measures ``min_size`` and ``max_size``, then the
    geometric midpoint of the bracket ``[largest size that memorizes, smallest size that does not]`` until the bracket
    is narrower than ``rtol`` relative (and at most 1 image). It assumes the memorized fraction falls with the size;
    to check that, pass a grid in ``sizes`` (every size is measured and EMM is the largest one that memorizes).

    Args:
        train_and_sample (`Callable[[torch.Tensor, int], torch.Tensor]`): ``(indices, epochs) -> generations``;
            ``indices`` is a 1-D int64 tensor into ``data_pool`` (use it for labels or captions too); the generations
            have shape `(M, *image_shape)` in the pool's value range.
        data_pool (`torch.Tensor` or `np.ndarray` of shape `(P, *image_shape)`): the images training sets are drawn
            from (deduplicated: near-duplicates break the nearest-neighbour ratio).
        epochs (`int`): training budget for every size.
        sizes (`Sequence[int]`, *optional*): a grid of sizes to measure instead of bisecting.
        min_size (`int`, defaults to 2), max_size (`int`, *optional*): the bisection's range; ``max_size`` defaults to
            the pool size.
        rtol (`float`, defaults to 0.1): relative width at which the bisection stops.
        threshold (`float`, defaults to 0.9): memorized fraction that counts as "memorizes".
        ratio_threshold (`float`, *optional*): the nearest-neighbour ratio threshold (1/3 by default).
        seed (`int`, defaults to 0): seed of the permutation that orders the pool.
        progress (`bool`, defaults to `True`): show a progress bar over the measured sizes.

    Returns:
        [`EMMResult`]: EMM, the bracket around it and the measured curve.
    """
    pool = as_batch(data_pool, "data_pool")
    check_finite(pool, "data_pool")
    pool_size = pool.shape[0]
    check_positive_int(epochs, "epochs")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}.")
    order = torch.randperm(pool_size, generator=torch.Generator().manual_seed(seed))
    measured: dict[int, EMMPoint] = {}
    bar = tqdm(desc="EMM: training-set sizes", unit="size", disable=not progress)

    def measure(size: int) -> EMMPoint:
        if size not in measured:
            start = time.perf_counter()
            indices = order[:size].clone()
            generated = train_and_sample(indices, epochs)
            report = nn_ratio_memorization(as_batch(generated, "generated"), pool[indices], threshold=ratio_threshold)
            measured[size] = EMMPoint(
                size=size,
                fraction_memorized=report.fraction_memorized,
                distinct_copied=report.distinct_copied,
                num_generated=report.num_generated,
                seconds=time.perf_counter() - start,
            )
            bar.update(1)
            bar.set_postfix(size=size, memorized=f"{report.fraction_memorized:.1%}")
        return measured[size]

    def valid_size(size: int, name: str) -> int:
        if not isinstance(size, (int, np.integer)) or not 2 <= size <= pool_size:
            raise ValueError(f"{name} must be an integer in [2, {pool_size}] (the pool size), got {size!r}.")
        return int(size)

    try:
        if sizes is not None:
            grid = sorted({valid_size(size, "every entry of sizes") for size in sizes})
            if not grid:
                raise ValueError("sizes is empty.")
            for size in grid:
                measure(size)
            search = "grid"
        else:
            low = valid_size(min_size, "min_size")
            high = valid_size(pool_size if max_size is None else max_size, "max_size")
            if low >= high:
                raise ValueError(f"min_size ({low}) must be smaller than max_size ({high}).")
            if rtol <= 0:
                raise ValueError(f"rtol must be positive, got {rtol!r}.")
            search = "bisection"
            if measure(low).fraction_memorized >= threshold and measure(high).fraction_memorized < threshold:
                # invariant: low memorizes, high does not
                while high - low > max(1, rtol * low):
                    middle = min(max(round(math.sqrt(low * high)), low + 1), high - 1)
                    if measure(middle).fraction_memorized >= threshold:
                        low = middle
                    else:
                        high = middle
    finally:
        bar.close()

    curve = [measured[size] for size in sorted(measured)]
    memorizing = [point.size for point in curve if point.fraction_memorized >= threshold]
    emm = max(memorizing) if memorizing else None
    larger = [point.size for point in curve if emm is None or point.size > emm]
    bracket = (emm, min(larger) if larger else None)
    return EMMResult(emm=emm, threshold=threshold, epochs=epochs, curve=curve, bracket=bracket, search=search)
