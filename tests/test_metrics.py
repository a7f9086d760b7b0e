"""Memorization and quality metrics against brute-force numpy / scipy references and closed forms."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from diffusers_hold.metrics import (
    PCAFeatures,
    calibrated_l2,
    frechet_distance,
    frechet_distance_from_features,
    held_out_distance_memorization,
    nearest_neighbours,
    nn_ratio_memorization,
    precision_recall,
    quality_report,
)

IMAGE_SHAPE = (3, 4, 4)


# ------------------------------------------------------------------------------------------ numpy references
def flat64(x) -> np.ndarray:
    x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return x.reshape(len(x), -1).astype(np.float64)


def ref_sq_distances(a, b) -> np.ndarray:
    """All squared L2 distances by direct differences in float64."""
    a, b = flat64(a), flat64(b)
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def ref_knn(a, b, k: int) -> tuple[np.ndarray, np.ndarray]:
    dist = np.sqrt(ref_sq_distances(a, b))
    index = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, index, 1), index


def ref_frechet(mu1, cov1, mu2, cov2) -> float:
    """The pytorch-fid formula with scipy's general matrix square root."""
    covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))


def ref_precision_recall(real, fake, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019 from full distance matrices (column 0 of a sorted self-distance row is the point)."""
    real_radii = np.sort(ref_sq_distances(real, real), axis=1)[:, k]
    fake_radii = np.sort(ref_sq_distances(fake, fake), axis=1)[:, k]
    cross = ref_sq_distances(fake, real)  # (fake, real)
    precision = (cross <= real_radii[None, :]).any(1).mean()
    recall = (cross.T <= fake_radii[None, :]).any(1).mean()
    return float(precision), float(recall)


def ref_pca(fit_images, images, n_components: int) -> np.ndarray:
    """Projection on the top eigenvectors of the sample covariance (numpy eigh), signs arbitrary."""
    data = flat64(fit_images)
    mean = data.mean(0)
    cov = np.cov(data, rowvar=False)
    _, vecs = np.linalg.eigh(cov)
    top = vecs[:, ::-1][:, :n_components]
    return (flat64(images) - mean) @ top


def mem_model(train: torch.Tensor, n: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A memorizing "model": random training images plus a little Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.randint(0, train.shape[0], (n,), generator=gen)
    return train[index] + noise * torch.randn(n, *train.shape[1:], generator=gen), index


def randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------------ nearest neighbours
@pytest.mark.parametrize(
    "n_q, n_r, k, chunk, q_chunk, dtype",
    [
        (37, 53, 11, 8, 5, torch.float32),  # no chunk size divides a set size; k larger than a reference chunk
        (37, 53, 2, 7, 6, torch.float64),
        (20, 64, 3, 16, 20, torch.float32),  # chunk sizes divide the sizes
        (13, 29, 29, 4, 3, torch.float64),  # k equal to the number of references, larger than a chunk
        (5, 9, 1, 100, 100, torch.float32),  # one block larger than both sets
    ],
)
def test_nearest_neighbours_match_brute_force(n_q, n_r, k, chunk, q_chunk, dtype):
    queries = randn(n_q, *IMAGE_SHAPE, seed=n_q + n_r, dtype=dtype)
    refs = randn(n_r, *IMAGE_SHAPE, seed=n_q * n_r, dtype=dtype)
    ref_dist, ref_index = ref_knn(queries, refs, k)
    kwargs = dict(chunk_size=chunk, query_chunk_size=q_chunk, device="cpu", dtype=dtype)
    dist, index = nearest_neighbours(queries, refs, k, **kwargs)
    assert dist.shape == index.shape == (n_q, k)
    assert dist.dtype == dtype and index.dtype == torch.int64
    np.testing.assert_array_equal(index.numpy(), ref_index)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(dist.numpy(), ref_dist, rtol=rtol)
    sq_dist, sq_index = nearest_neighbours(queries, refs, k, squared=True, **kwargs)
    np.testing.assert_array_equal(sq_index.numpy(), ref_index)
    np.testing.assert_allclose(sq_dist.numpy(), ref_dist**2, rtol=2 * rtol)


def test_float32_search_stays_exact_far_from_the_origin():
    # norms ~ 7e3 times the distances: the raw expansion in float32 would lose the neighbour order
    queries = 1000.0 + randn(30, 48, seed=1)
    refs = 1000.0 + randn(40, 48, seed=2)
    ref_dist, ref_index = ref_knn(queries, refs, 5)
    dist, index = nearest_neighbours(queries, refs, 5, chunk_size=16, query_chunk_size=7)
    np.testing.assert_array_equal(index.numpy(), ref_index)
    np.testing.assert_allclose(dist.numpy(), ref_dist, rtol=1e-5)


def test_numpy_integer_channels_last_inputs():
    rng = np.random.default_rng(3)
    queries = rng.integers(0, 256, size=(12, 8, 8, 3), dtype=np.uint8)
    refs = rng.integers(0, 256, size=(25, 8, 8, 3), dtype=np.uint8)
    ref_dist, ref_index = ref_knn(queries, refs, 3)
    dist, index = nearest_neighbours(queries, refs, 3, chunk_size=6, dtype=torch.float64)
    np.testing.assert_array_equal(index.numpy(), ref_index)
    np.testing.assert_allclose(dist.numpy(), ref_dist, rtol=1e-12)
    # non-contiguous channels-first views of the same images: same pixels, reordered within each image
    q_view, r_view = (torch.from_numpy(x).permute(0, 3, 1, 2) for x in (queries, refs))
    assert not q_view.is_contiguous()
    view_dist, view_index = nearest_neighbours(q_view, r_view, 3, chunk_size=4, query_chunk_size=5)
    np.testing.assert_array_equal(view_index.numpy(), ref_index)
    np.testing.assert_allclose(view_dist.numpy(), ref_dist, rtol=1e-6)


def test_exact_copies_and_ties():
    base = randn(10, *IMAGE_SHAPE, seed=4)
    refs = torch.cat([base, base])  # every image twice: rows i and i + 10
    dist, index = nearest_neighbours(base, refs, 2, chunk_size=3, query_chunk_size=4)
    assert torch.all(dist == 0)  # recomputed by differences: no rounding residue from the expansion
    np.testing.assert_array_equal(index.numpy(), np.stack([np.arange(10), np.arange(10) + 10], 1))


# ------------------------------------------------------------------------------------------ nearest-neighbour ratio
def test_nn_ratio_matches_brute_force():
    train = randn(40, *IMAGE_SHAPE, seed=5)
    gen = torch.Generator().manual_seed(6)
    index = torch.randint(0, 40, (60,), generator=gen)
    scales = torch.logspace(-2, 0.5, 60).reshape(60, 1, 1, 1)  # ratios on both sides of 1/3
    generated = train[index] + scales * torch.randn(60, *IMAGE_SHAPE, generator=gen)
    held_out = torch.cat([randn(25, *IMAGE_SHAPE, seed=7), train[:5] + 0.05 * randn(5, *IMAGE_SHAPE, seed=8)])

    report = nn_ratio_memorization(generated, train, held_out, chunk_size=9, query_chunk_size=7)

    ref_dist, ref_index = ref_knn(generated, train, 2)
    ref_ratio = ref_dist[:, 0] / ref_dist[:, 1]
    ref_mask = ref_ratio < 1 / 3
    assert 10 < ref_mask.sum() < 50  # the threshold is exercised on both sides
    np.testing.assert_allclose(report.d1.numpy(), ref_dist[:, 0], rtol=1e-5)
    np.testing.assert_allclose(report.d2.numpy(), ref_dist[:, 1], rtol=1e-5)
    np.testing.assert_allclose(report.ratio.numpy(), ref_ratio, rtol=1e-5)
    np.testing.assert_array_equal(report.nearest_index.numpy(), ref_index[:, 0])
    np.testing.assert_array_equal(report.memorized.numpy(), ref_mask)
    assert report.fraction_memorized == pytest.approx(ref_mask.mean())
    copied = np.unique(ref_index[ref_mask, 0])
    assert report.distinct_copied == len(copied)
    np.testing.assert_array_equal(report.copied_indices.numpy(), copied)
    held_dist, _ = ref_knn(held_out, train, 2)
    ref_held_ratio = held_dist[:, 0] / held_dist[:, 1]
    np.testing.assert_allclose(report.held_out_ratio.numpy(), ref_held_ratio, rtol=1e-5)
    assert report.held_out_fraction == pytest.approx((ref_held_ratio < 1 / 3).mean())
    assert report.held_out_fraction == pytest.approx(5 / 30)
    assert report.threshold == pytest.approx(1 / 3) and not report.squared

    squared = nn_ratio_memorization(generated, train, held_out, squared=True, chunk_size=9, query_chunk_size=7)
    assert squared.threshold == pytest.approx(1 / 9) and squared.squared
    np.testing.assert_allclose(squared.d1.numpy(), ref_dist[:, 0] ** 2, rtol=1e-5)
    np.testing.assert_allclose(squared.ratio.numpy(), ref_ratio**2, rtol=1e-5)
    np.testing.assert_array_equal(squared.memorized.numpy(), ref_mask)
    assert squared.held_out_fraction == pytest.approx(report.held_out_fraction)

    strict = nn_ratio_memorization(generated, train, threshold=0.1)
    np.testing.assert_array_equal(strict.memorized.numpy(), ref_ratio < 0.1)
    assert strict.held_out_ratio is None and strict.held_out_fraction is None


def test_memorizing_model_is_detected_and_fresh_draws_are_not():
    train = randn(200, 3, 8, 8, seed=10)
    copies, index = mem_model(train[:60], 150, noise=1e-3, seed=11)
    fresh = randn(120, 3, 8, 8, seed=12)  # same distribution, never trained on
    held_out = randn(100, 3, 8, 8, seed=13)

    report = nn_ratio_memorization(copies, train, held_out, chunk_size=64, query_chunk_size=50)
    assert report.fraction_memorized == 1.0
    np.testing.assert_array_equal(report.nearest_index.numpy(), index.numpy())
    assert report.distinct_copied == len(np.unique(index.numpy()))
    np.testing.assert_array_equal(report.copied_indices.numpy(), np.unique(index.numpy()))
    assert report.held_out_fraction == 0.0
    assert float(report.ratio.max()) < 0.01

    novel = nn_ratio_memorization(fresh, train, held_out)
    assert novel.fraction_memorized == 0.0 and novel.distinct_copied == 0
    assert float(novel.ratio.min()) > 1 / 3

    mixed = nn_ratio_memorization(torch.cat([copies[:30], fresh[:70]]), train)
    assert mixed.fraction_memorized == pytest.approx(0.3)
    assert mixed.memorized[:30].all() and not mixed.memorized[30:].any()

    summary = json.loads(json.dumps(report.to_dict()))
    assert summary["fraction_memorized"] == 1.0 and summary["held_out_fraction"] == 0.0
    assert summary["distinct_copied"] == report.distinct_copied
    assert summary["per_sample"]["nearest_index"] == index.tolist()
    assert len(summary["held_out_ratio"]) == 100
    assert "per_sample" not in report.to_dict(per_sample=False)


def test_held_out_distance_criterion_matches_numpy_and_sees_copies_the_ratio_misses():
    train = randn(40, 3, 4, 4, seed=20)
    # two near-duplicate training images: a copy of either has d1 ~ d2, which the 1/3 rule cannot flag
    train[1] = train[0] + 1e-3
    held_out = randn(80, 3, 4, 4, seed=21)
    midway = (train[:1] + train[1:2]) / 2  # as close to one twin as to the other: ratio 1
    generated = torch.cat(
        [midway, midway, train[5:15] + 0.05 * randn(10, 3, 4, 4, seed=22), randn(30, 3, 4, 4, seed=23)]
    )

    report = held_out_distance_memorization(generated, train, held_out, quantile=0.05, chunk_size=16)
    d_generated = np.sqrt(ref_sq_distances(generated, train)).min(1)
    d_held_out = np.sqrt(ref_sq_distances(held_out, train)).min(1)
    threshold = np.quantile(d_held_out, 0.05)  # numpy's default is the same linear interpolation
    assert report.threshold == pytest.approx(threshold, rel=1e-6)
    np.testing.assert_allclose(report.distance.numpy(), d_generated, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(report.memorized.numpy(), d_generated < threshold)
    assert report.memorized[:12].all()  # copies; a fresh draw is flagged as often as a held-out image (~5 %)
    assert report.fraction_memorized == pytest.approx((d_generated < threshold).mean())
    assert not nn_ratio_memorization(generated[:2], train).memorized.any()  # what the second criterion is for
    with pytest.raises(ValueError, match="quantile must lie in"):
        held_out_distance_memorization(generated, train, held_out, quantile=1.0)


# ------------------------------------------------------------------------------------------ calibrated L2
def test_calibrated_l2_matches_brute_force():
    train = randn(45, *IMAGE_SHAPE, seed=20)
    gen = torch.Generator().manual_seed(21)
    index = torch.randint(0, 45, (40,), generator=gen)
    scales = torch.logspace(-2, 0.5, 40).reshape(40, 1, 1, 1)
    generated = train[index] + scales * torch.randn(40, *IMAGE_SHAPE, generator=gen)

    report = calibrated_l2(generated, train, k=12, alpha=0.5, chunk_size=5, query_chunk_size=6)

    ref_dist, ref_index = ref_knn(generated, train, 12)
    ref_mean = ref_dist.mean(1)
    ref_score = ref_dist[:, 0] / (0.5 * ref_mean)
    assert 5 < (ref_score < 1).sum() < 35
    np.testing.assert_allclose(report.score.numpy(), ref_score, rtol=1e-5)
    np.testing.assert_allclose(report.mean_knn_distance.numpy(), ref_mean, rtol=1e-5)
    np.testing.assert_allclose(report.nearest_distance.numpy(), ref_dist[:, 0], rtol=1e-5)
    np.testing.assert_array_equal(report.nearest_index.numpy(), ref_index[:, 0])
    np.testing.assert_array_equal(report.extracted.numpy(), ref_score < 1)
    assert report.fraction_extracted == pytest.approx((ref_score < 1).mean())
    assert report.distinct_extracted == len(np.unique(ref_index[ref_score < 1, 0]))

    lenient = calibrated_l2(generated, train, k=12, alpha=0.25, threshold=1.4)
    np.testing.assert_array_equal(lenient.extracted.numpy(), ref_dist[:, 0] / (0.25 * ref_mean) < 1.4)
    summary = json.loads(json.dumps(report.to_dict()))
    assert summary["score_p05"] == pytest.approx(np.quantile(ref_score, 0.05), rel=1e-5)


def test_calibrated_l2_on_memorizing_model_with_default_k():
    train = randn(80, 3, 8, 8, seed=22)
    copies, index = mem_model(train, 30, noise=1e-3, seed=23)
    report = calibrated_l2(copies, train)  # k = 50, alpha = 0.5
    assert report.k == 50 and report.alpha == 0.5
    assert report.extracted.all()
    np.testing.assert_array_equal(report.nearest_index.numpy(), index.numpy())
    fresh = calibrated_l2(randn(30, 3, 8, 8, seed=24), train)
    assert not fresh.extracted.any()


# ------------------------------------------------------------------------------------------ Fréchet distance
def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(30)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [-0.5], [[0.25]]) == pytest.approx(1.5**2 + 1.5**2, rel=1e-12)


def test_frechet_distance_commuting_singular_covariances():
    # cov1 = U diag(a) U^T, cov2 = U diag(b) U^T: the distance is the diagonal one, zero eigenvalues included
    rng = np.random.default_rng(31)
    u, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a, b = np.array([2.0, 1.0, 0.0, 0.0, 0.5]), np.array([0.0, 1.5, 3.0, 0.0, 0.5])
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    cov1, cov2 = u @ np.diag(a) @ u.T, u @ np.diag(b) @ u.T
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-7)


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(32)
    for dim in (3, 10):
        x, y = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
        cov1, cov2 = x @ x.T + 0.1 * np.eye(dim), y @ y.T + 0.1 * np.eye(dim)
        mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
        expected = ref_frechet(mu1, cov1, mu2, cov2)
        got = frechet_distance(torch.from_numpy(mu1), torch.from_numpy(cov1), mu2, cov2)
        assert got == pytest.approx(expected, rel=1e-9)
        assert frechet_distance(mu1, cov1, mu1, cov1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_from_features_of_gaussian_samples():
    rng = np.random.default_rng(33)
    mu1, mu2 = np.array([0.0, 1.0, -1.0, 2.0]), np.array([0.5, 1.0, 0.0, 2.0])
    a, b = np.array([1.0, 4.0, 0.25, 1.0]), np.array([2.0, 1.0, 0.25, 9.0])
    f1 = mu1 + np.sqrt(a) * rng.normal(size=(40000, 4))
    f2 = mu2 + np.sqrt(b) * rng.normal(size=(40000, 4))
    closed_form = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # 6.42
    got = frechet_distance_from_features(f1, torch.from_numpy(f2))
    assert got == pytest.approx(closed_form, abs=0.15)
    exact = ref_frechet(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    assert got == pytest.approx(exact, rel=1e-9)
    assert frechet_distance_from_features(f1[:500], f1[:500]) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance_from_features(f1[:2000], f1[2000:4000]) < 0.05


def test_frechet_distance_rejects_invalid_covariances():
    eye = np.eye(3)
    indefinite = np.diag([1.0, 1.0, -0.5])
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance(np.zeros(3), indefinite, np.zeros(3), eye)
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance(np.zeros(3), eye, np.zeros(3), indefinite)
    asymmetric = eye.copy()
    asymmetric[0, 1] = 0.3
    with pytest.raises(ValueError, match="symmetric"):
        frechet_distance(np.zeros(3), asymmetric, np.zeros(3), eye)
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(np.zeros(3), eye, np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), eye)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([0.0, np.nan, 0.0]), eye, np.zeros(3), eye)
    with pytest.raises(ValueError, match="different feature dimensions"):
        frechet_distance_from_features(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance_from_features(np.zeros((1, 3)), np.zeros((5, 3)))
    # rounding-level negative eigenvalues of a singular covariance are accepted
    v = np.random.default_rng(34).normal(size=(3, 1))
    rank_one = v @ v.T
    assert frechet_distance(np.zeros(3), rank_one, np.zeros(3), rank_one) == pytest.approx(0.0, abs=1e-9)


# ------------------------------------------------------------------------------------------ precision / recall
def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(40)
    real = rng.normal(size=(70, 6))
    fake = 1.2 * rng.normal(size=(55, 6)) + 1.0  # overlapping, shifted and wider
    expected = ref_precision_recall(real, fake, k=5)
    assert 0.05 < expected[0] < 0.95 and 0.05 < expected[1] < 0.95
    for dtype in (torch.float64, torch.float32):
        got = precision_recall(real, fake, k=5, chunk_size=13, query_chunk_size=9, dtype=dtype)
        assert got == pytest.approx(expected, abs=1e-12)
    got3 = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=3)
    assert got3 == pytest.approx(ref_precision_recall(real, fake, k=3), abs=1e-12)


def test_precision_recall_limiting_cases():
    rng = np.random.default_rng(41)
    real = rng.normal(size=(200, 8))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    assert precision_recall(real, real[::-1].copy(), chunk_size=17) == (1.0, 1.0)

    # collapse onto 4 real points: every fake sits on the real manifold, only the 4 real points are covered
    collapsed = np.repeat(real[:4], 25, axis=0)
    precision, recall = precision_recall(real, collapsed)
    assert precision == 1.0 and recall == pytest.approx(4 / 200)  # fake radii are 0: only exact hits count
    noisy = collapsed + 1e-3 * rng.normal(size=collapsed.shape)
    precision, recall = precision_recall(real, noisy)
    assert precision == 1.0 and recall <= 0.05

    far = real[:150] + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)


# ------------------------------------------------------------------------------------------ PCA features
def correlated_images(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Images (n, 1, 8, 8) with a decaying spectrum, so the principal axes are well separated."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(np.random.default_rng(99).normal(size=(64, 64)))[0]
    spectrum = 3.0 * 0.8 ** np.arange(64)
    data = (scale * rng.normal(size=(n, 64)) * np.sqrt(spectrum)) @ basis.T + 0.5
    return torch.from_numpy(data.reshape(n, 1, 8, 8).astype(np.float32))


def test_pca_features_match_numpy_eigh():
    fit = correlated_images(300, seed=50)
    images = correlated_images(40, seed=51)
    pca = PCAFeatures(n_components=6).fit(fit)
    features = pca.transform(images, batch_size=7)
    assert features.shape == (40, 6) and features.dtype == torch.float64
    expected = ref_pca(fit, images, 6)
    signs = np.sign((features.numpy() * expected).sum(0))
    np.testing.assert_allclose(features.numpy(), expected * signs, rtol=1e-7, atol=1e-9)
    eigenvalues = np.linalg.eigvalsh(np.cov(flat64(fit), rowvar=False))[::-1]
    np.testing.assert_allclose(pca.explained_variance_.numpy(), eigenvalues[:6], rtol=1e-9)
    np.testing.assert_allclose(pca.explained_variance_ratio_.numpy(), eigenvalues[:6] / eigenvalues.sum(), rtol=1e-9)
    # deterministic, with the largest loading of every axis positive
    again = PCAFeatures(n_components=6).fit(fit.clone())
    assert torch.equal(again.components_, pca.components_) and torch.equal(pca(images), features)
    loadings = pca.components_.gather(1, pca.components_.abs().argmax(1, keepdim=True))
    assert (loadings > 0).all()
    np.testing.assert_allclose((pca.components_ @ pca.components_.T).numpy(), np.eye(6), atol=1e-12)


def test_pca_features_reject_bad_use():
    fit = correlated_images(20, seed=52)
    with pytest.raises(ValueError, match="not fitted"):
        PCAFeatures(4).transform(fit)
    with pytest.raises(ValueError, match="too large"):
        PCAFeatures(20).fit(fit)  # at most N - 1 = 19
    with pytest.raises(ValueError, match="n_components"):
        PCAFeatures(0)
    pca = PCAFeatures(4).fit(fit)
    with pytest.raises(ValueError, match="channel counts"):
        pca.transform(torch.zeros(3, 3, 8, 8))
    with pytest.raises(ValueError, match="image shapes"):
        pca.transform(torch.zeros(3, 1, 4, 4))


# ------------------------------------------------------------------------------------------ quality report
def test_quality_report_against_independent_reference():
    train = correlated_images(150, seed=60)
    held_out = correlated_images(160, seed=61)
    generated = correlated_images(120, seed=62, scale=0.7)
    report = quality_report(generated, train, held_out, n_components=5, k=4)

    f_gen, f_train, f_held = (ref_pca(held_out, x, 5) for x in (generated, train, held_out))

    def ref_fd(a, b):
        return ref_frechet(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))

    assert report.frechet_distance == pytest.approx(ref_fd(f_gen, f_held), rel=1e-7)
    assert report.floor_frechet_distance == pytest.approx(ref_fd(f_train, f_held), rel=1e-7)
    assert (report.precision, report.recall) == pytest.approx(ref_precision_recall(f_held, f_gen, 4), abs=1e-12)
    assert (report.floor_precision, report.floor_recall) == pytest.approx(
        ref_precision_recall(f_held, f_train, 4), abs=1e-12
    )
    assert report.feature_dim == 5 and report.k == 4
    assert (report.num_generated, report.num_train, report.num_held_out) == (120, 150, 160)
    assert json.loads(json.dumps(report.to_dict()))["frechet_distance"] == pytest.approx(report.frechet_distance)


def test_quality_report_shows_memorization_as_high_precision_low_recall():
    train = correlated_images(300, seed=63)
    held_out = correlated_images(300, seed=64)
    copies, _ = mem_model(train[:10], 300, noise=1e-3, seed=65)
    memorizing = quality_report(copies, train, held_out, n_components=8)
    healthy = quality_report(correlated_images(300, seed=66), train, held_out, n_components=8)
    assert memorizing.precision > 0.9 and memorizing.recall < 0.1
    assert healthy.recall > 0.5 and healthy.precision > 0.5
    assert memorizing.floor_recall > 0.5  # the training set itself covers the held-out images
    assert memorizing.frechet_distance > 3 * healthy.frechet_distance
    assert memorizing.floor_frechet_distance == pytest.approx(healthy.floor_frechet_distance, rel=1e-12)


def test_quality_report_accepts_any_feature_extractor():
    train = correlated_images(60, seed=67)
    held_out = correlated_images(70, seed=68)
    generated = correlated_images(50, seed=69, scale=1.3)

    def first_pixels(images):  # returns numpy: anything array-like is accepted
        return images.reshape(len(images), -1)[:, :4].numpy() * 2.0

    report = quality_report(generated, train, held_out, feature_extractor=first_pixels, k=3, batch_size=16)
    f_gen, f_held = (flat64(x)[:, :4] * 2.0 for x in (generated, held_out))
    expected_fd = ref_frechet(f_gen.mean(0), np.cov(f_gen, rowvar=False), f_held.mean(0), np.cov(f_held, rowvar=False))
    assert report.frechet_distance == pytest.approx(expected_fd, rel=1e-6)
    assert (report.precision, report.recall) == pytest.approx(ref_precision_recall(f_held, f_gen, 3), abs=1e-12)
    assert report.feature_dim == 4 and report.feature_extractor.endswith("first_pixels")

    with pytest.raises(ValueError, match="one feature row per image"):
        quality_report(generated, train, held_out, feature_extractor=lambda x: x[:1].flatten(1))
    with pytest.raises(ValueError, match="NaN or infinite features"):
        quality_report(generated, train, held_out, feature_extractor=lambda x: x.flatten(1) / 0.0)
    with pytest.raises(ValueError, match="callable"):
        quality_report(generated, train, held_out, feature_extractor="pca")


# ------------------------------------------------------------------------------------------ bad input
GOOD = randn(6, 3, 8, 8, seed=70)


def with_nan(images: torch.Tensor, row: int) -> torch.Tensor:
    images = images.clone()
    images[row, 1, 2, 3] = float("nan")
    return images


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: nearest_neighbours(GOOD, randn(5, 3, 16, 16, seed=0)), "different image shapes"),
        (lambda: nearest_neighbours(GOOD, GOOD.flatten(1)), "different image shapes"),
        (lambda: nearest_neighbours(GOOD, randn(5, 1, 8, 8, seed=0)), r"channel counts \(3 vs 1"),
        (lambda: nn_ratio_memorization(GOOD, GOOD, randn(5, 4, 8, 8, seed=0)), "held_out and train .*channel"),
        (lambda: nn_ratio_memorization(GOOD.permute(0, 2, 3, 1), GOOD[:, :1].permute(0, 2, 3, 1)), "channel"),
        (lambda: quality_report(GOOD, GOOD, randn(6, 1, 8, 8, seed=0)), "channel counts"),
        (lambda: nearest_neighbours(GOOD[:0], GOOD), "queries is empty"),
        (lambda: nn_ratio_memorization(GOOD, GOOD[:0]), "train is empty"),
        (lambda: precision_recall(np.zeros((0, 4)), np.zeros((8, 4))), "real_features is empty"),
        (lambda: nn_ratio_memorization(with_nan(GOOD, 4), GOOD), r"generated contains NaN .*row 4"),
        (lambda: nn_ratio_memorization(GOOD, with_nan(GOOD, 0)), "train contains NaN"),
        (lambda: nn_ratio_memorization(GOOD, GOOD, with_nan(GOOD, 2)), "held_out contains NaN"),
        (lambda: calibrated_l2(GOOD, GOOD * float("inf"), k=2), "train contains NaN or infinite"),
        (lambda: quality_report(with_nan(GOOD, 1), GOOD, GOOD), "generated contains NaN"),
        (lambda: PCAFeatures(2).fit(with_nan(GOOD, 5)), "images contains NaN"),
        (lambda: nearest_neighbours(GOOD, GOOD[:4], k=5), "at least 5 images in references.*only 4"),
        (lambda: nn_ratio_memorization(GOOD, GOOD[:1]), "at least 2 images in train"),
        (lambda: calibrated_l2(GOOD, GOOD), "at least 50 images in train, but train holds only 6"),
        (lambda: precision_recall(GOOD, GOOD, k=6), "at least 7 images in real_features"),
        (lambda: nearest_neighbours(GOOD, GOOD, k=0), "k must be a positive integer"),
        (lambda: nearest_neighbours(GOOD[0, 0, 0], GOOD[0, 0, 0]), r"shape \(N, ...\)"),
        (lambda: nearest_neighbours(GOOD, GOOD, chunk_size=0), "chunk_size must be a positive integer"),
        (lambda: nearest_neighbours(GOOD, GOOD, dtype=torch.float16), "float32 or torch.float64"),
        (lambda: nearest_neighbours(GOOD.to(torch.complex64), GOOD), "real numbers"),
        (lambda: nn_ratio_memorization(GOOD, GOOD, threshold=1.5), r"threshold must be a number in \(0, 1\]"),
        (lambda: calibrated_l2(GOOD, GOOD, k=2, alpha=0.0), "alpha must be a positive finite number"),
    ],
)
def test_bad_input_raises_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_non_array_input_raises_type_error():
    with pytest.raises(TypeError, match="torch.Tensor or a numpy array"):
        nearest_neighbours([[0.0, 1.0]], GOOD.flatten(1))
