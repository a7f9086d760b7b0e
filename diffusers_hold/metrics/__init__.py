"""Memorization and quality metrics over image tensors, weight-free by default.

Memorization: the nearest-neighbour ratio ("1/3 rule", :func:`nn_ratio_memorization`), the calibrated L2 distance
(:func:`calibrated_l2`) and closeness beyond what held-out images show (:func:`held_out_distance_memorization`), all
on a chunked exact nearest-neighbour search (:func:`nearest_neighbours`). Quality:
Fréchet distance and k-NN precision / recall in a feature space, by default a PCA fit on held-out real images
(:func:`quality_report`). Learned features for the text-to-image protocol, loaded from local files only: DINOv2,
CLIP and SSCD embeddings behind the same callable interface (:class:`DINOv2Features`, :class:`CLIPImageFeatures`,
:class:`SSCDFeatures`, :func:`load_features`), the copy-detection protocol over a prompt set with bootstrap
intervals (:func:`copy_detection`, :func:`cosine_similarity_matrix`) and the CLIP score (:func:`clip_score`).
Text-conditional extraction: the tiled L2 distance and the clique audit of Carlini et al.
(:func:`tiled_l2`, :func:`clique_audit`, :func:`calibrate_clique_threshold`). Effective model memorization, the
largest training set a recipe still memorizes (:func:`effective_model_memorization`). Trajectory diagnostics: Kim et
al.'s latent decomposition against the schedule's weights (:class:`TrajectoryRecorder`, :func:`decompose_trajectory`,
:func:`reference_weights`) and Wen et al.'s CFG gap (:class:`CFGGapMonitor`). Nothing here downloads weights. See
``docs/MEMORIZATION.md``, "Metrics".
"""

from .copy_detection import CopyDetectionReport, copy_detection, cosine_similarity_matrix, prompt_bootstrap_intervals
from .emm import EMMPoint, EMMResult, effective_model_memorization
from .features import CLIPImageFeatures, DINOv2Features, SSCDFeatures, clip_score, load_features
from .neighbours import (
    CalibratedL2Report,
    HeldOutDistanceReport,
    MemorizationReport,
    calibrated_l2,
    held_out_distance_memorization,
    nearest_neighbours,
    nn_ratio_memorization,
)
from .quality import (
    PCAFeatures,
    PrecisionRecall,
    QualityReport,
    check_quality_sizes,
    frechet_distance,
    frechet_distance_from_features,
    precision_recall,
    quality_report,
)
from .tiled import CliqueAudit, calibrate_clique_threshold, clique_audit, tiled_l2
from .trajectory import (
    CFGGapMonitor,
    Trajectory,
    TrajectoryDecomposition,
    TrajectoryRecorder,
    decompose_trajectory,
    is_guidance_batch,
    reference_weights,
)

__all__ = [
    "CFGGapMonitor",
    "CLIPImageFeatures",
    "CalibratedL2Report",
    "CliqueAudit",
    "CopyDetectionReport",
    "DINOv2Features",
    "EMMPoint",
    "EMMResult",
    "HeldOutDistanceReport",
    "MemorizationReport",
    "PCAFeatures",
    "PrecisionRecall",
    "QualityReport",
    "SSCDFeatures",
    "calibrate_clique_threshold",
    "calibrated_l2",
    "check_quality_sizes",
    "clip_score",
    "clique_audit",
    "copy_detection",
    "cosine_similarity_matrix",
    "decompose_trajectory",
    "is_guidance_batch",
    "effective_model_memorization",
    "frechet_distance",
    "frechet_distance_from_features",
    "held_out_distance_memorization",
    "load_features",
    "nearest_neighbours",
    "nn_ratio_memorization",
    "precision_recall",
    "prompt_bootstrap_intervals",
    "quality_report",
    "reference_weights",
    "tiled_l2",
    "Trajectory",
    "TrajectoryDecomposition",
    "TrajectoryRecorder",
]
