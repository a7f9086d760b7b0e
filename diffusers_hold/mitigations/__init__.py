"""Training-time memorization mitigations and the callback protocol that plugs them into a training loop.

Timestep samplers (:mod:`.timestep_sampling`): uniform, logit-normal, and the SNR-aware confidence-interval Gaussian
of Vu et al. (:class:`SNRIntervalTimestepSampler`), for DDPM-style schedulers and
:class:`~diffusers_hold.HOLDScheduler` alike, with optional importance weights that keep the loss an unbiased estimate
of the uniform-timestep loss.

Callbacks (:mod:`.callbacks`): :class:`TrainingCallback` hooks (``on_batch``, ``on_conditioning``,
``sample_timesteps``, ``on_loss``, ``on_step_end``, ``state_dict`` / ``load_state_dict``), composed by
:class:`CallbackList`, which the training scripts and a user's own loop call in the order shown in :mod:`.callbacks`.

Loss filters (:mod:`.loss_filters`): anti-gradient control (:class:`AntiGradientControl`) and Wen et al.'s CFG-gap
filter (:class:`CFGGapFilter`). Iterative ensemble training (:mod:`.ensemble`): :class:`IterativeEnsembleTraining`
and its :class:`ShardedDataset`. Caption perturbations (:mod:`.captions`): :class:`CaptionRandomization` and
:class:`TextEmbeddingNoise`. Pruning (:mod:`.pruning`): attention-head importance on the small-t loss,
:func:`prune_least_important_heads`, :class:`HeadPruningCallback` for fine-tuning, and NeMo-style value-neuron
masking (:func:`find_memorization_neurons`, :func:`mask_value_neurons`).

Inference-time guidance (:mod:`.guidance`): :func:`delayed_guidance`, :func:`opposite_guidance`,
:class:`GuidanceSchedule` and anti-memorization guidance (:class:`AntiMemorizationGuidance`). See
``docs/MEMORIZATION.md``, "Training-time mitigations" and "Inference-time mitigations".
"""

from .callbacks import CallbackList, TimestepSamplingCallback, TrainingCallback, TrainingState, training_step
from .captions import CAPTION_RANDOMIZATIONS, CaptionRandomization, TextEmbeddingNoise, randomize_caption
from .ensemble import IterativeEnsembleTraining, ShardedDataset
from .guidance import AMGStep, AntiMemorizationGuidance, GuidanceSchedule, delayed_guidance, opposite_guidance
from .loss_filters import AntiGradientControl, CFGGapFilter, mean_over_kept
from .pruning import (
    AttentionHead,
    HeadPruningCallback,
    attention_heads,
    find_memorization_neurons,
    head_importance,
    mask_value_neurons,
    masked_value_neurons,
    prune_heads,
    prune_least_important_heads,
    pruned_heads,
    random_heads,
    sample_small_t,
    value_neuron_activations,
    value_neuron_z_scores,
)
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
    "AMGStep",
    "AntiGradientControl",
    "AntiMemorizationGuidance",
    "AttentionHead",
    "CFGGapFilter",
    "CallbackList",
    "CaptionRandomization",
    "GuidanceSchedule",
    "HeadPruningCallback",
    "IterativeEnsembleTraining",
    "LogitNormalTimestepSampler",
    "SNRIntervalTimestepSampler",
    "ShardedDataset",
    "TimestepAxis",
    "TimestepSampler",
    "TextEmbeddingNoise",
    "TimestepSamplingCallback",
    "TrainingCallback",
    "TrainingState",
    "UniformTimestepSampler",
    "attention_heads",
    "delayed_guidance",
    "find_memorization_neurons",
    "get_timestep_sampler",
    "head_importance",
    "mask_value_neurons",
    "masked_value_neurons",
    "mean_over_kept",
    "opposite_guidance",
    "prune_heads",
    "prune_least_important_heads",
    "pruned_heads",
    "random_heads",
    "randomize_caption",
    "sample_small_t",
    "training_step",
    "value_neuron_activations",
    "value_neuron_z_scores",
]
