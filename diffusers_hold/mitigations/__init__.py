"""Memorization mitigations: training-time ones, which plug into a training loop through one callback protocol, and
inference-time ones, which act on a trained model or around an unmodified pipeline.

Training time:

- The protocol (:mod:`.callbacks`): :class:`TrainingCallback` hooks (``on_batch``, ``on_conditioning``,
  ``sample_timesteps``, ``on_loss``, ``on_step_end``, ``state_dict`` / ``load_state_dict``), composed by
  :class:`CallbackList`, and :func:`training_step`, one micro-batch's loss through them, which the training scripts,
  the benchmark and a user's own loop call.
- Timestep samplers (:mod:`.timestep_sampling`): uniform, logit-normal, and the SNR-aware confidence-interval
  Gaussian of Vu et al. (:class:`SNRIntervalTimestepSampler`), for DDPM-style schedulers and
  :class:`~diffusers_hold.HOLDScheduler` alike, with optional importance weights that keep the loss an unbiased
  estimate of the uniform-timestep loss; :class:`TimestepSamplingCallback` plugs one in.
- Loss filters (:mod:`.loss_filters`): anti-gradient control (:class:`AntiGradientControl`) and Wen et al.'s CFG-gap
  filter (:class:`CFGGapFilter`).
- Iterative ensemble training (:mod:`.ensemble`): :class:`IterativeEnsembleTraining` and its :class:`ShardedDataset`.
- Caption perturbations (:mod:`.captions`): :class:`CaptionRandomization` and :class:`TextEmbeddingNoise`.
- Attention-head pruning (:mod:`.head_pruning`): head importance on the small-t loss, :func:`prune_heads`,
  :func:`prune_least_important_heads` on a trained model, and :class:`HeadPruningCallback` to prune during training
  and hold the heads at zero while fine-tuning.

Inference time:

- Guidance (:mod:`.guidance`): :func:`delayed_guidance`, :func:`opposite_guidance`, :class:`GuidanceSchedule` and
  anti-memorization guidance (:class:`AntiMemorizationGuidance`), as UNet hooks around unmodified pipelines.
- Value-neuron masking (:mod:`.value_neurons`): NeMo-style selection of the cross-attention value neurons a memorized
  prompt drives (:func:`find_memorization_neurons`) and their masking in the weights (:func:`mask_value_neurons`).

See ``docs/MEMORIZATION.md``, "Training-time mitigations" and "Inference-time mitigations".
"""

from .callbacks import CallbackList, TimestepSamplingCallback, TrainingCallback, TrainingState, training_step
from .captions import CAPTION_RANDOMIZATIONS, CaptionRandomization, TextEmbeddingNoise, randomize_caption
from .ensemble import IterativeEnsembleTraining, ShardedDataset
from .guidance import AMGStep, AntiMemorizationGuidance, GuidanceSchedule, delayed_guidance, opposite_guidance
from .head_pruning import (
    AttentionHead,
    HeadPruningCallback,
    attention_heads,
    head_importance,
    prune_heads,
    prune_least_important_heads,
    pruned_heads,
    random_heads,
    sample_small_t,
)
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
from .value_neurons import (
    cross_attention_modules,
    find_memorization_neurons,
    mask_value_neurons,
    masked_value_neurons,
    value_neuron_activations,
    value_neuron_z_scores,
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
    "cross_attention_modules",
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
