"""Weight-free memorization and quality metrics over image tensors.

Memorization: the nearest-neighbour ratio ("1/3 rule", :func:`nn_ratio_memorization`) and the calibrated L2 distance
(:func:`calibrated_l2`), both on a chunked exact nearest-neighbour search (:func:`nearest_neighbours`). Quality:
Fréchet distance and k-NN precision / recall in a feature space, by default a PCA fit on held-out real images
(:func:`quality_report`). Nothing here downloads weights. See ``shared/design/MEMORIZATION.md``, "Metrics".
"""

from .neighbours import (
    CalibratedL2Report,
    MemorizationReport,
    calibrated_l2,
    nearest_neighbours,
    nn_ratio_memorization,
)
from .quality import (
    PCAFeatures,
    PrecisionRecall,
    QualityReport,
    frechet_distance,
    frechet_distance_from_features,
    precision_recall,
    quality_report,
)

__all__ = [
    "CalibratedL2Report",
    "MemorizationReport",
    "PCAFeatures",
    "PrecisionRecall",
    "QualityReport",
    "calibrated_l2",
    "frechet_distance",
    "frechet_distance_from_features",
    "nearest_neighbours",
    "nn_ratio_memorization",
    "precision_recall",
    "quality_report",
]
