"""Training-time memorization mitigations and the callback protocol that plugs them into a training loop.

Timestep samplers (:mod:`.timestep_sampling`): uniform, logit-normal, and the SNR-aware confidence-interval Gaussian
of Vu et al. (:class:`SNRIntervalTimestepSampler`), for DDPM-style schedulers and
:class:`~diffusers_hold.HOLDScheduler` alike, with optional importance weights that keep the loss an unbiased estimate
of the uniform-timestep loss.

Callbacks (:mod:`.callbacks`): :class:`TrainingCallback` hooks (``on_batch``, ``on_conditioning``,
``sample_timesteps``, ``on_loss``, ``on_step_end``, ``state_dict`` / ``load_state_dict``), composed by
:class:`CallbackList`, which the training scripts and a user's own loop call in the order shown in :mod:`.callbacks`.

Loss filters (:mod:`.loss_filters`): anti-gradient control (:class:`AntiGradientControl`) and Wen et al.'s CFG-gap
filter (:class:`CFGGapFilter`). Caption perturbations (:mod:`.captions`): :class:`CaptionRandomization` and
:class:`TextEmbeddingNoise`. Inference-time guidance schedules (:mod:`.guidance`):
:func:`delayed_guidance`, :func:`opposite_guidance`, :class:`GuidanceSchedule`. See
``shared/design/MEMORIZATION.md``, "Training-time mitigations" and "Inference-time mitigations".
"""

from .callbacks import CallbackList, TimestepSamplingCallback, TrainingCallback, TrainingState, per_sample_mse
from .captions import CAPTION_RANDOMIZATIONS, CaptionRandomization, TextEmbeddingNoise, randomize_caption
from .guidance import GuidanceSchedule, delayed_guidance, opposite_guidance
from .loss_filters import AntiGradientControl, CFGGapFilter, mean_over_kept
from .timestep_sampling import (
    TIMESTEP_SAMPLERS,
    LogitNormalTimestepSampler,
    SNRIntervalTimestepSampler,
    TimestepAxis,
    TimestepSampler,
    UniformTimestepSampler,
    get_timestep_sampler,
)

__all__ = [
    "CAPTION_RANDOMIZATIONS",
    "TIMESTEP_SAMPLERS",
    "AntiGradientControl",
    "CFGGapFilter",
    "CallbackList",
    "CaptionRandomization",
    "GuidanceSchedule",
    "LogitNormalTimestepSampler",
    "SNRIntervalTimestepSampler",
    "TimestepAxis",
    "TimestepSampler",
    "TextEmbeddingNoise",
    "TimestepSamplingCallback",
    "TrainingCallback",
    "TrainingState",
    "UniformTimestepSampler",
    "delayed_guidance",
    "get_timestep_sampler",
    "mean_over_kept",
    "opposite_guidance",
    "per_sample_mse",
    "randomize_caption",
]
