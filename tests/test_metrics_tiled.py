"""Tiled L2 and the clique audit against brute-force references."""

import itertools

import numpy as np
import pytest
import torch

from diffusers_hold.metrics.tiled import _largest_clique, calibrate_clique_threshold, clique_audit, tiled_l2


def brute_tiled_l2(a, b, tiles):
    """Loops over pairs and tiles, in numpy."""
    a, b = a.numpy().astype(np.float64), b.numpy().astype(np.float64)
    th, tw = a.shape[2] // tiles, a.shape[3] // tiles
    out = np.zeros((len(a), len(b)))
    for i, j in itertools.product(range(len(a)), range(len(b))):
        worst = 0.0
        for r, c in itertools.product(range(tiles), range(tiles)):
            diff = (
                a[i, :, r * th : (r + 1) * th, c * tw : (c + 1) * tw]
                - b[j, :, r * th : (r + 1) * th, c * tw : (c + 1) * tw]
            )
            worst = max(worst, np.sqrt(np.mean(diff**2)))
        out[i, j] = worst
    return out


@pytest.mark.parametrize(("tiles", "chunk_size"), [(1, 3), (2, 1), (4, 2), (4, 64)])
def test_tiled_l2_matches_the_brute_force_reference(tiles, chunk_size):
    gen = torch.Generator().manual_seed(tiles)
    a, b = torch.rand(5, 3, 8, 8, generator=gen), torch.rand(4, 3, 8, 8, generator=gen)
    np.testing.assert_allclose(tiled_l2(a, b, tiles, chunk_size).numpy(), brute_tiled_l2(a, b, tiles), atol=1e-12)


def test_the_distance_is_the_worst_tile():
    a = torch.zeros(1, 1, 8, 8)
    b = a.clone()
    b[0, 0, 4:6, 0:2] = 0.5  # one 2x2 tile of a 4x4 tiling differs by 0.5 everywhere
    assert float(tiled_l2(a, b, tiles=4)[0, 0]) == pytest.approx(0.5)
    assert float(tiled_l2(a, b, tiles=1)[0, 0]) == pytest.approx(np.sqrt(4 * 0.25 / 64))  # the plain RMS is smaller


def test_largest_clique_matches_exhaustive_search():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = 9
        upper = np.triu(rng.random((n, n)) < 0.5, 1)
        adjacency = torch.from_numpy(upper | upper.T)
        best = max(
            (s for k in range(1, n + 1) for s in itertools.combinations(range(n), k)
             if all(adjacency[i, j] for i, j in itertools.combinations(s, 2))),
            key=len,
        )  # fmt: skip
        clique = _largest_clique(adjacency)
        assert len(clique) == len(best), trial
        assert all(adjacency[i, j] for i, j in itertools.combinations(clique, 2))


def test_clique_audit_flags_the_prompt_that_regurgitates():
    gen = torch.Generator().manual_seed(0)
    copied = torch.rand(1, 3, 16, 16, generator=gen)
    copies = copied + 0.01 * torch.randn(12, 3, 16, 16, generator=gen)  # near-copies of one image
    fresh = torch.rand(12, 3, 16, 16, generator=gen)
    generations = torch.cat([copies, fresh])
    groups = ["copied prompt"] * 12 + ["fresh prompt"] * 12
    threshold = calibrate_clique_threshold(fresh, quantile=0.01)
    assert 0.05 < threshold  # unrelated random images are far apart in every tile
    audit = clique_audit(generations, groups, threshold, min_clique_size=10)
    assert audit.flagged == ["copied prompt"] and audit.fraction_flagged == 0.5
    assert audit.largest_clique["copied prompt"] == list(range(12))
    assert len(audit.largest_clique["fresh prompt"]) < 10


def test_bad_input_raises():
    a = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="not divisible"):
        tiled_l2(a, a, tiles=3)
    with pytest.raises(ValueError, match="channel counts"):
        tiled_l2(a, torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        tiled_l2(a, torch.full((1, 3, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="empty"):
        tiled_l2(a, torch.rand(0, 3, 8, 8))
    with pytest.raises(ValueError, match="group labels"):
        clique_audit(a, ["p"], threshold=0.1)
    with pytest.raises(ValueError, match="quantile"):
        calibrate_clique_threshold(a[:1])
