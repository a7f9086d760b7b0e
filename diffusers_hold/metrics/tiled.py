"""Tiled L2 distance and the clique audit of Carlini et al. (2023), "Extracting Training Data from Diffusion Models".

Text-conditional extraction: generate many images per prompt; a prompt whose generations nearly coincide (a large
clique under a small tiled-L2 edge threshold) is likely regurgitating a training image. The tiled distance splits
each image into ``tiles x tiles`` tiles and takes the largest per-tile RMS difference, so two images must agree
everywhere, not just on average, to be close. The edge threshold must be calibrated per model
(:func:`calibrate_clique_threshold`), as the paper's value is specific to its data and resolution.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from .._validation import as_batch, check_finite, check_same_shape

__all__ = ["CliqueAudit", "calibrate_clique_threshold", "clique_audit", "tiled_l2"]


def _tiles(images: torch.Tensor, tiles: int) -> torch.Tensor:
    """``(N, tiles * tiles, C * tile_h * tile_w)`` float64 tiles of validated images."""
    n, c, h, w = images.shape
    if h % tiles or w % tiles:
        raise ValueError(f"Image size {h}x{w} is not divisible into {tiles}x{tiles} tiles.")
    th, tw = h // tiles, w // tiles
    x = images.to(torch.float64).reshape(n, c, tiles, th, tiles, tw).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, tiles * tiles, c * th * tw)


def tiled_l2(a: torch.Tensor, b: torch.Tensor, tiles: int = 4, chunk_size: int = 256) -> torch.Tensor:
    """Max over tiles of the per-tile RMS difference between every image of ``a`` and every image of ``b``.

    Args:
        a (`torch.Tensor` of shape `(N, C, H, W)`), b (`torch.Tensor` of shape `(M, C, H, W)`): images of one shape;
            ``H`` and ``W`` divisible by ``tiles``.
        tiles (`int`, defaults to 4): tiles per side.
        chunk_size (`int`, defaults to 256): images of ``b`` compared at once (memory stays bounded).

    Returns:
        `torch.Tensor` of shape `(N, M)`: float64 distances on the CPU.
    """
    a, b = as_batch(a, "a"), as_batch(b, "b")
    if a.ndim != 4:
        raise ValueError(f"Expected images of shape (N, C, H, W), got {tuple(a.shape)}.")
    check_same_shape(tuple(a.shape[1:]), "a", tuple(b.shape[1:]), "b")
    check_finite(a, "a")
    check_finite(b, "b")
    if not isinstance(tiles, int) or tiles < 1 or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"tiles and chunk_size must be positive integers, got {tiles!r} and {chunk_size!r}.")
    tiles_a = _tiles(a.cpu(), tiles)  # (N, T, P)
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float64)
    for start in range(0, b.shape[0], chunk_size):
        tiles_b = _tiles(b[start : start + chunk_size].cpu(), tiles)  # (m, T, P)
        # per tile: mean squared difference over its pixels, via |x|^2 + |y|^2 - 2 x.y, tile by tile
        cross = torch.einsum("ntp,mtp->nmt", tiles_a, tiles_b)
        sq = tiles_a.square().sum(-1)[:, None, :] + tiles_b.square().sum(-1)[None, :, :] - 2 * cross
        rms = (sq.clamp(min=0) / tiles_a.shape[-1]).sqrt()
        out[:, start : start + chunk_size] = rms.amax(-1)
    return out


def _largest_clique(adjacency: torch.Tensor) -> list[int]:
    """An exact maximum clique (Bron-Kerbosch with pivoting) of a small undirected graph."""
    neighbours = [set(torch.nonzero(row).flatten().tolist()) - {i} for i, row in enumerate(adjacency)]
    best: list[int] = []

    def expand(clique: list[int], candidates: set[int], excluded: set[int]) -> None:
        nonlocal best
        if not candidates and not excluded:
            if len(clique) > len(best):
                best = clique
            return
        if len(clique) + len(candidates) <= len(best):
            return  # cannot beat the best clique found so far
        pivot = max(candidates | excluded, key=lambda v: len(neighbours[v] & candidates))
        for v in list(candidates - neighbours[pivot]):
            expand(clique + [v], candidates & neighbours[v], excluded & neighbours[v])
            candidates = candidates - {v}
            excluded = excluded | {v}

    expand([], set(range(len(neighbours))), set())
    return sorted(best)


@dataclass
class CliqueAudit:
    """Result of :func:`clique_audit`.

    Attributes:
        threshold (`float`): the tiled-L2 edge threshold.
        min_clique_size (`int`): the clique size that flags a prompt.
        largest_clique (`dict`): prompt -> indices (into the generations) of its largest clique.
        flagged (`list`): prompts whose largest clique has at least ``min_clique_size`` members.
        fraction_flagged (`float`): flagged prompts over all prompts.
    """

    threshold: float
    min_clique_size: int
    largest_clique: dict[Hashable, list[int]]
    flagged: list[Hashable]
    fraction_flagged: float


def clique_audit(
    generations: torch.Tensor,
    groups: Sequence[Hashable],
    threshold: float,
    min_clique_size: int = 10,
    tiles: int = 4,
) -> CliqueAudit:
    """Flag prompts whose generations form a large clique of near-identical images (Carlini et al.).

    Args:
        generations (`torch.Tensor` of shape `(N, C, H, W)`): the generations of every prompt.
        groups (`Sequence`): the prompt (or prompt id) of each generation.
        threshold (`float`): two generations are joined when their tiled L2 is below it (see
            :func:`calibrate_clique_threshold`).
        min_clique_size (`int`, defaults to 10): flag a prompt when its largest clique has this many members.
        tiles (`int`, defaults to 4): tiles per side of the distance.
    """
    generations = as_batch(generations, "generations")
    if len(groups) != generations.shape[0]:
        raise ValueError(f"Got {len(groups)} group labels for {generations.shape[0]} generations.")
    if not threshold > 0 or min_clique_size < 2:
        raise ValueError(f"threshold must be > 0 and min_clique_size >= 2, got {threshold} and {min_clique_size}.")
    largest: dict[Hashable, list[int]] = {}
    for group in dict.fromkeys(groups):
        members = [i for i, g in enumerate(groups) if g == group]
        distances = tiled_l2(generations[members], generations[members], tiles=tiles)
        clique = _largest_clique(distances < threshold)
        largest[group] = [members[i] for i in clique]
    flagged = [group for group, clique in largest.items() if len(clique) >= min_clique_size]
    return CliqueAudit(threshold, min_clique_size, largest, flagged, len(flagged) / len(largest))


def calibrate_clique_threshold(reference: torch.Tensor, quantile: float = 0.01, tiles: int = 4) -> float:
    """An edge threshold below which pairs of unrelated images almost never fall.

    The ``quantile`` of the tiled L2 over all distinct pairs of ``reference`` images that are known not to be copies
    of each other (e.g. held-out real images, or generations for distinct prompts of a model known not to memorize).

    Args:
        reference (`torch.Tensor` of shape `(N, C, H, W)`): at least two images.
        quantile (`float`, defaults to 0.01): in ``(0, 1)``.
        tiles (`int`, defaults to 4): tiles per side.
    """
    reference = as_batch(reference, "reference")
    if reference.shape[0] < 2 or not 0 < quantile < 1:
        raise ValueError(f"Need >= 2 reference images and a quantile in (0, 1), got {reference.shape[0]}, {quantile}.")
    distances = tiled_l2(reference, reference, tiles=tiles)
    pairs = distances[torch.triu(torch.ones_like(distances, dtype=torch.bool), diagonal=1)]
    return float(torch.quantile(pairs, quantile))
