"""Training-time memorization mitigations and the callback protocol that plugs them into a training loop.

Timestep samplers (:mod:`.timestep_sampling`): uniform, logit-normal, and the SNR-aware confidence-interval Gaussian
of Vu et al. (:class:`SNRIntervalTimestepSampler`), for DDPM-style schedulers and
:class:`~diffusers_hold.HOLDScheduler` alike, with optional importance weights that keep the loss an unbiased estimate
of the uniform-timestep loss.

Callbacks (:mod:`.callbacks`): :class:`TrainingCallback` hooks (``on_batch``, ``sample_timesteps``, ``on_loss``,
``on_step_end``, ``state_dict`` / ``load_state_dict``), composed by :class:`CallbackList`, which the training scripts
and a user's own loop call in the order shown in :mod:`.callbacks`. See ``shared/design/MEMORIZATION.md``,
"Training-time mitigations".
"""

from .callbacks import CallbackList, TimestepSamplingCallback, TrainingCallback, TrainingState, per_sample_mse
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
    "TIMESTEP_SAMPLERS",
    "CallbackList",
    "LogitNormalTimestepSampler",
    "SNRIntervalTimestepSampler",
    "TimestepAxis",
    "TimestepSampler",
    "TimestepSamplingCallback",
    "TrainingCallback",
    "TrainingState",
    "UniformTimestepSampler",
    "get_timestep_sampler",
    "per_sample_mse",
]
