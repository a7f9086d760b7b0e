"""Sample quality without Inception weights: Fréchet distance and k-NN precision / recall in a feature space.

The default feature space is a PCA fit on held-out real images (:class:`PCAFeatures`); any callable mapping a batch
of images ``(n, *image_shape)`` to features ``(n, F)`` can replace it (a small classifier trained in-project on a
disjoint split, or user-supplied weights). Memorization shows as high precision with low recall; the same numbers
for the training images against the held-out images are the reference floor.

Reference: ``docs/MEMORIZATION.md``, "Metrics" 8.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from .._validation import as_batch, check_finite, check_k, check_positive_int, check_same_shape
from ._search import DEFAULT_CHUNK_SIZE, DEFAULT_QUERY_CHUNK_SIZE, ball_coverage, knn, prepare_search

__all__ = [
    "PCAFeatures",
    "PrecisionRecall",
    "QualityReport",
    "frechet_distance",
    "frechet_distance_from_features",
    "check_quality_sizes",
    "precision_recall",
    "quality_report",
]

_F64 = torch.float64
FeatureExtractor = Callable[[torch.Tensor], Any]


# ------------------------------------------------------------------------------------------------------- PCA
class PCAFeatures:
    """Principal components of real images as a weight-free feature extractor.

    :meth:`fit` centres the flattened images and takes a thin SVD in float64 on the CPU (deterministic: each
    component's sign is fixed so that its largest-magnitude loading is positive). :meth:`transform` (also the call
    operator) projects images on the leading components. The SVD holds the fitting set in float64 in memory.

    Args:
        n_components (`int`, defaults to 32): number of components kept; at most ``min(N - 1, D)`` for a fitting set of
            ``N`` images with ``D`` elements each.

    Attributes:
        mean_ (`torch.Tensor` of shape `(D,)`): mean of the fitting set (float64).
        components_ (`torch.Tensor` of shape `(n_components, D)`): orthonormal principal axes, by decreasing variance.
        explained_variance_ (`torch.Tensor` of shape `(n_components,)`): variance along each axis (``N - 1`` divisor).
        explained_variance_ratio_ (`torch.Tensor` of shape `(n_components,)`): its share of the total variance.
        image_shape (`tuple`): per-image shape seen by :meth:`fit`; :meth:`transform` requires the same.
        metric (`str`): ``"l2"``, the distance the metrics use in this space (the learned extractors of
            :mod:`~diffusers_hold.metrics.features` say ``"cosine"``).
    """

    metric = "l2"

    def __init__(self, n_components: int = 32):
        check_positive_int(n_components, "n_components")
        self.n_components = n_components
        self.mean_: torch.Tensor | None = None
        self.components_: torch.Tensor | None = None
        self.explained_variance_: torch.Tensor | None = None
        self.explained_variance_ratio_: torch.Tensor | None = None
        self.image_shape: tuple[int, ...] | None = None

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` has run."""
        return self.components_ is not None

    def fit(self, images: torch.Tensor | np.ndarray) -> PCAFeatures:
        """Fit the principal axes on real images (normally held-out images, never the generated ones).

        Args:
            images (`torch.Tensor` or `np.ndarray` of shape `(N, *image_shape)`): ``N > n_components`` real images.

        Returns:
            [`PCAFeatures`]: ``self``.
        """
        images = as_batch(images, "images")
        check_finite(images, "images")
        n, dim = images.shape[0], images[0].numel()
        if self.n_components > min(n - 1, dim):
            raise ValueError(
                f"n_components={self.n_components} is too large for {n} images of {dim} elements: at most "
                f"min(N - 1, D) = {min(n - 1, dim)} components are defined."
            )
        data = images.reshape(n, dim).to("cpu", _F64)
        mean = data.mean(0)
        centred = data - mean
        _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
        components = vh[: self.n_components]
        signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
        components = components * torch.where(signs == 0, torch.ones_like(signs), signs)
        variance = singular.square() / (n - 1)
        total = variance.sum()
        self.mean_ = mean
        self.components_ = components.contiguous()
        self.explained_variance_ = variance[: self.n_components]
        self.explained_variance_ratio_ = self.explained_variance_ / (total if total > 0 else 1.0)
        self.image_shape = tuple(images.shape[1:])
        return self

    def transform(self, images: torch.Tensor | np.ndarray, batch_size: int = 1024) -> torch.Tensor:
        """Project images on the fitted axes.

        Args:
            images (`torch.Tensor` or `np.ndarray` of shape `(N, *image_shape)`): images shaped like the fitting set.
            batch_size (`int`, defaults to 1024): images converted to float64 at once.

        Returns:
            `torch.Tensor` of shape `(N, n_components)`: float64 features on the CPU.
        """
        if not self.is_fitted:
            raise ValueError("PCAFeatures is not fitted; call fit(held_out_images) first.")
        check_positive_int(batch_size, "batch_size")
        images = as_batch(images, "images")
        check_same_shape(images.shape[1:], "images", self.image_shape, "the images PCAFeatures was fitted on")
        check_finite(images, "images")
        n = images.shape[0]
        out = torch.empty(n, self.n_components, dtype=_F64)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            chunk = images[start:stop].reshape(stop - start, -1).to("cpu", _F64)
            out[start:stop] = (chunk - self.mean_) @ self.components_.T
        return out

    def __call__(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        return self.transform(images)

    def __repr__(self) -> str:
        return f"PCAFeatures(n_components={self.n_components}, fitted={self.is_fitted})"


# ------------------------------------------------------------------------------------------- Fréchet distance
def _as_vector(value: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    vec = torch.as_tensor(value).detach().to("cpu", _F64)
    if vec.ndim != 1 or vec.numel() == 0:
        raise ValueError(f"{name} must be a non-empty vector of shape (d,), got shape {tuple(vec.shape)}.")
    if not bool(torch.isfinite(vec).all()):
        raise ValueError(f"{name} contains NaN or infinite values.")
    return vec


def _as_covariance(value: torch.Tensor | np.ndarray, name: str, dim: int) -> torch.Tensor:
    cov = torch.as_tensor(value).detach().to("cpu", _F64)
    if cov.shape != (dim, dim):
        raise ValueError(f"{name} must have shape ({dim}, {dim}) to match the mean, got {tuple(cov.shape)}.")
    if not bool(torch.isfinite(cov).all()):
        raise ValueError(f"{name} contains NaN or infinite values.")
    scale = float(cov.abs().max())
    asymmetry = float((cov - cov.T).abs().max())
    if asymmetry > 1e-5 * max(scale, 1e-300):  # loose enough for covariances computed in float32
        raise ValueError(f"{name} is not symmetric (largest |C - C^T| = {asymmetry:.3g}, largest |C| = {scale:.3g}).")
    return 0.5 * (cov + cov.T)


def _psd_eigh(matrix: torch.Tensor, name: str, tolerance: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(eigenvalues, eigenvectors, scale)`` of a symmetric matrix that must be PSD.

    ``scale`` is the largest eigenvalue magnitude; negative eigenvalues down to ``-tolerance * scale`` are rounding
    and are clamped to 0, larger ones raise.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    scale = max(float(eigenvalues.abs().max()), torch.finfo(_F64).tiny)
    smallest = float(eigenvalues.min())
    if smallest < -tolerance * scale:
        raise ValueError(
            f"{name} is not positive semi-definite: eigenvalue {smallest:.3g} against a largest magnitude of "
            f"{scale:.3g} (relative tolerance {tolerance:g})."
        )
    return eigenvalues.clamp_min(0.0), eigenvectors, scale


def frechet_distance(
    mu1: torch.Tensor | np.ndarray,
    cov1: torch.Tensor | np.ndarray,
    mu2: torch.Tensor | np.ndarray,
    cov2: torch.Tensor | np.ndarray,
    tolerance: float = 1e-6,
) -> float:
    """Fréchet (2-Wasserstein) distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)``, squared as in FID.

    ``||mu1 - mu2||^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^{1/2})``. The trace term is computed from the
    symmetric matrix ``M = cov1^{1/2} cov2 cov1^{1/2}``, which has the same eigenvalues as ``cov1 cov2``:
    ``tr((cov1 cov2)^{1/2}) = sum sqrt(eig(M))``. ``M`` is PSD, so the root is real by construction; eigenvalues
    that rounding makes slightly negative (the counterpart of the small imaginary parts that ``scipy.linalg.sqrtm``
    returns) are clamped to 0, and clearly negative ones, which mean a covariance is not PSD, raise. Everything is
    computed in float64.

    Args:
        mu1 (`torch.Tensor` or `np.ndarray` of shape `(d,)`): mean of the first distribution.
        cov1 (`torch.Tensor` or `np.ndarray` of shape `(d, d)`): its covariance (symmetric PSD).
        mu2 (`torch.Tensor` or `np.ndarray` of shape `(d,)`): mean of the second distribution.
        cov2 (`torch.Tensor` or `np.ndarray` of shape `(d, d)`): its covariance (symmetric PSD).
        tolerance (`float`, defaults to 1e-6): negative eigenvalues down to ``-tolerance`` times the matrix's scale
            (its largest eigenvalue; ``||cov1|| ||cov2||`` for ``M``) count as rounding and are set to 0.

    Returns:
        `float`: the distance, ``>= 0``.
    """
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a non-negative finite number, got {tolerance!r}.")
    mu1, mu2 = _as_vector(mu1, "mu1"), _as_vector(mu2, "mu2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 have different dimensions: {mu1.numel()} vs {mu2.numel()}.")
    dim = mu1.numel()
    cov1, cov2 = _as_covariance(cov1, "cov1", dim), _as_covariance(cov2, "cov2", dim)

    w1, v1, scale1 = _psd_eigh(cov1, "cov1", tolerance)
    _, _, scale2 = _psd_eigh(cov2, "cov2", tolerance)
    sqrt1 = (v1 * w1.sqrt()) @ v1.T
    middle = sqrt1 @ cov2 @ sqrt1
    middle = 0.5 * (middle + middle.T)
    w_middle = torch.linalg.eigvalsh(middle)
    smallest = float(w_middle.min())
    if smallest < -tolerance * scale1 * scale2:
        raise ValueError(
            f"cov1 @ cov2 has a clearly negative eigenvalue ({smallest:.3g}, scale {scale1 * scale2:.3g}): its "
            "square root would have a large imaginary part. The covariances are not valid PSD matrices."
        )
    trace_sqrt = w_middle.clamp_min(0.0).sqrt().sum()
    diff = mu1 - mu2
    distance = diff.dot(diff) + torch.trace(cov1) + torch.trace(cov2) - 2.0 * trace_sqrt
    return max(float(distance), 0.0)


def _as_features(features: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """Validated ``(N, F)`` float64 CPU features (trailing axes are flattened)."""
    features = as_batch(features, name)
    check_finite(features, name)
    return features.reshape(features.shape[0], -1).to("cpu", _F64)


def _mean_and_covariance(features: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if features.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples for a covariance, got {features.shape[0]}.")
    mean = features.mean(0)
    centred = features - mean
    return mean, centred.T @ centred / (features.shape[0] - 1)


def frechet_distance_from_features(
    features1: torch.Tensor | np.ndarray, features2: torch.Tensor | np.ndarray, tolerance: float = 1e-6
) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (sample means, unbiased covariances).

    Args:
        features1 (`torch.Tensor` or `np.ndarray` of shape `(N1, F)`): first set, ``N1 >= 2``.
        features2 (`torch.Tensor` or `np.ndarray` of shape `(N2, F)`): second set, ``N2 >= 2``.
        tolerance (`float`, defaults to 1e-6): see :func:`frechet_distance`.

    Returns:
        `float`: the distance. It is biased upwards at finite sample sizes; compare sets of equal sizes.
    """
    f1, f2 = _as_features(features1, "features1"), _as_features(features2, "features2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"features1 and features2 have different feature dimensions: {f1.shape[1]} vs {f2.shape[1]}.")
    mu1, cov1 = _mean_and_covariance(f1, "features1")
    mu2, cov2 = _mean_and_covariance(f2, "features2")
    return frechet_distance(mu1, cov1, mu2, cov2, tolerance=tolerance)


# ------------------------------------------------------------------------------------------ precision / recall
class PrecisionRecall(NamedTuple):
    """k-NN precision and recall (Kynkäänniemi et al. 2019), unpackable as ``precision, recall``."""

    precision: float
    recall: float


def precision_recall(
    real_features: torch.Tensor | np.ndarray,
    fake_features: torch.Tensor | np.ndarray,
    k: int = 5,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifold estimates.

    Each real sample gets a ball whose radius is the distance to its ``k``-th nearest other real sample; precision is
    the fraction of fake samples inside at least one real ball (closed balls). Recall swaps the roles: the fraction
    of real samples inside at least one ball around a fake sample. Distances are L2 between flattened features.

    Args:
        real_features (`torch.Tensor` or `np.ndarray` of shape `(N, F)`): features of real images, ``N > k``.
        fake_features (`torch.Tensor` or `np.ndarray` of shape `(M, F)`): features of generated images, ``M > k``.
        k (`int`, defaults to 5): neighbourhood size of the manifold estimate.
        chunk_size (`int`, defaults to 1024): reference rows per block of the distance computations.
        query_chunk_size (`int`, defaults to 1024): query rows per block.
        device (`str` or `torch.device`, *optional*): where the distances are computed (see
            :func:`~diffusers_hold.metrics.nearest_neighbours`).
        dtype (`torch.dtype`, defaults to `torch.float64`): working precision, `torch.float32` or `torch.float64`.
        progress (`bool`, defaults to `False`): show tqdm progress bars.

    Returns:
        [`PrecisionRecall`]: ``(precision, recall)``, each in ``[0, 1]``.
    """
    real, fake, search = prepare_search(
        real_features,
        fake_features,
        ("real_features", "fake_features"),
        chunk_size=chunk_size,
        query_chunk_size=query_chunk_size,
        device=device,
        dtype=dtype,
        progress=progress,
    )
    check_positive_int(k, "k")
    check_k(k + 1, real.shape[0], f"Manifold radii with k={k} (k + 1 samples)", "real_features")
    check_k(k + 1, fake.shape[0], f"Manifold radii with k={k} (k + 1 samples)", "fake_features")
    # the k + 1 smallest distances of a set to itself include the zero self-distance: column k is the k-th neighbour
    real_radii = knn(real, real, k + 1, desc="real radii", **search)[0][:, k]
    fake_radii = knn(fake, fake, k + 1, desc="fake radii", **search)[0][:, k]
    precision = ball_coverage(fake, real, real_radii, **search).double().mean()
    recall = ball_coverage(real, fake, fake_radii, **search).double().mean()
    return PrecisionRecall(float(precision), float(recall))


# ------------------------------------------------------------------------------------------------------ report
@dataclass
class QualityReport:
    """Result of :func:`quality_report`.

    Attributes:
        frechet_distance (`float`): Fréchet distance, generated vs held-out features.
        precision (`float`): k-NN precision of the generated images against the held-out manifold.
        recall (`float`): k-NN recall of the held-out images by the generated manifold.
        floor_frechet_distance (`float`): the same distance for the training images vs held-out (reference floor).
        floor_precision (`float`): precision of the training images against the held-out images.
        floor_recall (`float`): recall of the held-out images by the training images.
        k (`int`): neighbourhood size of precision and recall.
        feature_dim (`int`): dimension of the feature space.
        feature_extractor (`str`): description of the feature extractor.
        num_generated (`int`): number of generated images.
        num_train (`int`): number of training images.
        num_held_out (`int`): number of held-out images.
    """

    frechet_distance: float
    precision: float
    recall: float
    floor_frechet_distance: float
    floor_precision: float
    floor_recall: float
    k: int
    feature_dim: int
    feature_extractor: str
    num_generated: int
    num_train: int
    num_held_out: int

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values for ``json.dump``."""
        return {"metric": "quality", **{name: getattr(self, name) for name in self.__dataclass_fields__}}


def _extract(extractor: FeatureExtractor, images: torch.Tensor, name: str, batch_size: int) -> torch.Tensor:
    """Features ``(N, F)`` (float64, CPU) of validated images, in batches, checked for shape and finiteness."""
    n = images.shape[0]
    parts = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        with torch.no_grad():
            out = extractor(images[start:stop])
        out = torch.as_tensor(out).detach()
        if out.ndim < 1 or out.shape[0] != stop - start:
            raise ValueError(
                f"The feature extractor returned shape {tuple(out.shape)} for a batch of {stop - start} {name} "
                "images; it must return one feature row per image."
            )
        parts.append(out.reshape(stop - start, -1).to("cpu", _F64))
    features = torch.cat(parts)
    if features.shape[1] == 0:
        raise ValueError(f"The feature extractor returned empty features for {name}.")
    if not bool(torch.isfinite(features).all()):
        raise ValueError(f"The feature extractor returned NaN or infinite features for {name}.")
    return features


def _describe(extractor: FeatureExtractor) -> str:
    if isinstance(extractor, PCAFeatures):
        return repr(extractor)
    return getattr(extractor, "__qualname__", type(extractor).__qualname__)


def check_quality_sizes(
    num_generated: int, num_train: int, num_held_out: int, image_dim: int, n_components: int = 32, k: int = 5
) -> None:
    """Raise before any work when :func:`quality_report` with its default PCA features cannot run on sets of these
    sizes, naming what is missing.

    The PCA is fitted on the held-out images and has ``min(n_components, image_dim)`` components, which takes more
    held-out images than components; precision and recall take ``k + 1`` images in every set (the held-out images
    are the real set for the generations and for the training images, which give the floor).

    Args:
        num_generated (`int`), num_train (`int`), num_held_out (`int`): the sizes of the three sets.
        image_dim (`int`): elements per image.
        n_components (`int`, defaults to 32), k (`int`, defaults to 5): the settings of :func:`quality_report`.
    """
    components = min(n_components, image_dim)
    needed = {"held-out": max(components + 1, k + 1), "generated": k + 1, "training": k + 1}
    sizes = {"held-out": num_held_out, "generated": num_generated, "training": num_train}
    short = [f"{sizes[name]} {name} images (at least {needed[name]})" for name in needed if sizes[name] < needed[name]]
    if short:
        raise ValueError(
            f"The quality metrics (Frechet distance and precision/recall in a {components}-component PCA space, "
            f"k = {k}) need more images: {', '.join(short)}."
        )


def quality_report(
    generated: torch.Tensor | np.ndarray,
    train: torch.Tensor | np.ndarray,
    held_out: torch.Tensor | np.ndarray,
    feature_extractor: FeatureExtractor | None = None,
    n_components: int = 32,
    k: int = 5,
    *,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> QualityReport:
    """Fréchet distance and k-NN precision / recall of generated images against held-out real images.

    The same statistics for the training images against the held-out images give the floor that a model matching the
    data distribution would reach (with the caveat that the Fréchet distance is biased upwards at small sample sizes,
    so compare sets of similar sizes).

    Args:
        generated (`torch.Tensor` or `np.ndarray` of shape `(N, *image_shape)`): generated images.
        train (`torch.Tensor` or `np.ndarray` of shape `(R, *image_shape)`): training images.
        held_out (`torch.Tensor` or `np.ndarray` of shape `(M, *image_shape)`): real images not used for training.
        feature_extractor (`Callable`, *optional*): maps a batch of images ``(n, *image_shape)`` (a tensor) to
            features ``(n, F)`` (tensor or array). Defaults to a :class:`PCAFeatures` fit on ``held_out``; an unfitted
            :class:`PCAFeatures` is fit on ``held_out`` too.
        n_components (`int`, defaults to 32): components of the default PCA.
        k (`int`, defaults to 5): neighbourhood size of precision and recall.
        batch_size (`int`, defaults to 512): images passed to the feature extractor at once.
        device (`str` or `torch.device`, *optional*): where the precision / recall distances are computed.
        progress (`bool`, defaults to `False`): show tqdm progress bars.

    Returns:
        [`QualityReport`]: generated-vs-held-out statistics and the train-vs-held-out floor.
    """
    check_positive_int(batch_size, "batch_size")
    generated = as_batch(generated, "generated")
    train = as_batch(train, "train")
    held_out = as_batch(held_out, "held_out")
    check_same_shape(generated.shape[1:], "generated", held_out.shape[1:], "held_out")
    check_same_shape(train.shape[1:], "train", held_out.shape[1:], "held_out")
    for images, name in ((generated, "generated"), (train, "train"), (held_out, "held_out")):
        check_finite(images, name)
    if feature_extractor is None:
        feature_extractor = PCAFeatures(n_components)
    if not callable(feature_extractor):
        raise ValueError(f"feature_extractor must be callable, got {type(feature_extractor).__name__}.")
    if isinstance(feature_extractor, PCAFeatures) and not feature_extractor.is_fitted:
        feature_extractor.fit(held_out)

    f_gen = _extract(feature_extractor, generated, "generated", batch_size)
    f_train = _extract(feature_extractor, train, "train", batch_size)
    f_held = _extract(feature_extractor, held_out, "held_out", batch_size)
    pr = precision_recall(f_held, f_gen, k=k, device=device, progress=progress)
    floor_pr = precision_recall(f_held, f_train, k=k, device=device, progress=progress)
    return QualityReport(
        frechet_distance=frechet_distance_from_features(f_gen, f_held),
        precision=pr.precision,
        recall=pr.recall,
        floor_frechet_distance=frechet_distance_from_features(f_train, f_held),
        floor_precision=floor_pr.precision,
        floor_recall=floor_pr.recall,
        k=k,
        feature_dim=int(f_held.shape[1]),
        feature_extractor=_describe(feature_extractor),
        num_generated=int(generated.shape[0]),
        num_train=int(train.shape[0]),
        num_held_out=int(held_out.shape[0]),
    )
