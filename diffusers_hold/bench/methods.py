"""The benchmark's methods (the registry :data:`BENCH_METHODS`) and the settings of a run (:class:`BenchConfig`).

A method is one training recipe: the DDPM baseline, a HOLD order, or the baseline with training-time mitigations
(callbacks of :mod:`diffusers_hold.mitigations`), or an inference-time mitigation that samples another method's final
model with guidance hooks. To add one, add a :class:`BenchMethod` to :data:`BENCH_METHODS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..mitigations import (
    CAPTION_RANDOMIZATIONS,
    AntiGradientControl,
    AntiMemorizationGuidance,
    CaptionRandomization,
    CFGGapFilter,
    HeadPruningCallback,
    IterativeEnsembleTraining,
    SNRIntervalTimestepSampler,
    TextEmbeddingNoise,
    TimestepSamplingCallback,
    TrainingCallback,
    delayed_guidance,
    opposite_guidance,
)
from .text import BenchTextEncoder, bench_caption

__all__ = ["BENCH_METHODS", "DEFAULT_METHODS", "EXP_SDE_SAMPLER", "BenchConfig", "BenchMethod", "dit_inputs"]

# HOLDScheduler settings of the second-order stochastic exponential integrator (sde-dpmsolver++ form, log1p grid,
# no final denoising step). At 50 model calls it finishes the 16x16 photo patches that the bench's 200
# Euler-Maruyama steps leave noisy (benchmarks/bench_sampler_vs_model.py, issue 15).
EXP_SDE_SAMPLER = {
    "solver": "exp_multistep",
    "algorithm_type": "sde-dpmsolver++",
    "timestep_spacing": "log1p",
    "denoise_final": False,
}


@dataclass(frozen=True)
class BenchMethod:
    """One training recipe of the benchmark.

    Attributes:
        name (`str`): the method's key (``--methods``).
        description (`str`): one line for the table.
        hold_order (`int`, *optional*): train a HOLD model of this order; `None` trains the DDPM baseline.
        hold_settings (`dict`): forward-process settings of the HOLD model other than the defaults of
            :class:`~diffusers_hold.HOLDScheduler` (``T``, ``L_inv``, ``aux_init_var``).
        callbacks (`Callable`): ``(noise_scheduler, config, train_images) -> list[TrainingCallback]``, the training
            mitigations.
        sampling_guidance (`Callable`, *optional*): ``(unet, scheduler, train_images, config) -> context manager``
            around sampling, for inference-time mitigations.
        text_conditional (`bool`, defaults to `False`): train a ``UNet2DConditionModel`` on a unique caption per
            training image (per-image ids, the set-up in which Gu et al. find memorization) with 10 % of the captions
            dropped for classifier-free guidance, and sample each training caption with guidance
            ``config.guidance_scale``.
        trained_by (`str`, *optional*): an inference-time method trains nothing: it samples the final model of this
            method (which must come earlier in the run) and is evaluated once, at the end.
        hold_sampler (`dict`): settings of the HOLD scheduler used to sample a HOLD model, on top of the bench's
            (Euler-Maruyama on a quadratic grid), e.g. :data:`EXP_SDE_SAMPLER`; training is unchanged.
        hold_sampling_steps (`int`, *optional*): model calls per generation of a HOLD model; `None` uses
            ``BenchConfig.hold_steps``.
        transformer (`bool`, defaults to `False`): train a small DiT (diffusers' ``DiTTransformer2DModel``: patch
            size 2, 4 layers of 8 heads of width 8, one class, no label dropout) instead of the UNet, as Ye et al.
            prune.
    """

    name: str
    description: str
    hold_order: int | None = None
    hold_settings: dict[str, float] = field(default_factory=dict)
    hold_sampler: dict[str, Any] = field(default_factory=dict)
    hold_sampling_steps: int | None = None
    callbacks: Callable[[Any, BenchConfig, torch.Tensor], list[TrainingCallback]] = field(
        default=lambda scheduler, config, train: [], repr=False
    )
    sampling_guidance: Callable[[Any, Any, torch.Tensor, BenchConfig], Any] | None = field(default=None, repr=False)
    text_conditional: bool = False
    trained_by: str | None = None
    transformer: bool = False


def _gaussian_timesteps(mean: float, sd: float):
    """A Gaussian on ``u = t / T`` with this mean and sd: the 95 % interval of Vu et al.'s sampler, tails clipped."""

    def callbacks(scheduler, config: BenchConfig, train: torch.Tensor) -> list[TrainingCallback]:
        sampler = SNRIntervalTimestepSampler(scheduler, c_low=mean - 1.96 * sd, c_high=mean + 1.96 * sd, tails="clip")
        return [TimestepSamplingCallback(sampler, seed=config.seed)]

    return callbacks


def _snr_interval(c_low: float, c_high: float, confidence: float):
    """Vu et al.'s sampler as the paper parameterises it: the Gaussian whose central ``confidence`` mass covers
    ``[c_low, c_high]`` on ``u``, truncated to ``[0, 1]``."""

    def callbacks(scheduler, config: BenchConfig, train: torch.Tensor) -> list[TrainingCallback]:
        sampler = SNRIntervalTimestepSampler(scheduler, c_low=c_low, c_high=c_high, confidence=confidence)
        return [TimestepSamplingCallback(sampler, seed=config.seed)]

    return callbacks


def _anti_gradient_control(scheduler, config: BenchConfig, train: torch.Tensor) -> list[TrainingCallback]:
    return [AntiGradientControl(scheduler.config.num_train_timesteps, mem_ratio=2.0)]


def _ensemble(redistribute: bool):
    def callbacks(scheduler, config: BenchConfig, train: torch.Tensor) -> list[TrainingCallback]:
        # 4 shards, 5 rounds between evaluations (every evaluation sees a global, averaged model); shorter rounds
        # keep the shard models close enough for their average to be a good model
        ensemble = IterativeEnsembleTraining(
            num_shards=4,
            num_rounds=5 * config.num_evaluations,
            redistribute_fraction=0.25 if redistribute else 0.0,
            seed=config.seed,
        )
        ensemble.make_shards(len(train))
        if not redistribute:
            return [ensemble]
        return [AntiGradientControl(scheduler.config.num_train_timesteps, mem_ratio=2.0), ensemble]

    return callbacks


def _caption_randomization(scheduler, config: BenchConfig, train: torch.Tensor) -> list[TrainingCallback]:
    vocabulary = sorted({word for i in range(len(train)) for word in bench_caption(i).split()})
    return [CaptionRandomization(vocabulary, modes=CAPTION_RANDOMIZATIONS, p=0.1, seed=config.seed)]


def _cfg_gap_filter(scheduler, config: BenchConfig, train: torch.Tensor) -> list[TrainingCallback]:
    # Wen et al.'s threshold 2 is a norm over SD's 4 x 64 x 64 latent; keep its RMS gap per element, 2 / 128
    threshold = 2 / math.sqrt(4 * 64 * 64) * math.sqrt(train[0].numel())
    empty = BenchTextEncoder.shared(config.seed).encode([""])
    return [CFGGapFilter({"encoder_hidden_states": empty}, threshold=threshold)]


def _head_pruning(criterion: str, ratio: float = 0.2, transformer: bool = False):
    def callbacks(scheduler, config: BenchConfig, train: torch.Tensor) -> list[TrainingCallback]:
        # Ye et al.: prune 20 % of the heads of the trained model, then fine-tune; here after 80 % of the updates
        return [
            HeadPruningCallback(
                ratio=ratio,
                importance_data=train,
                prune_at_step=round(0.8 * config.train_steps),
                criterion=criterion,
                num_draws=8,
                forward_kwargs=dit_inputs(len(train)) if transformer else None,
                seed=config.seed,
            )
        ]

    return callbacks


def dit_inputs(batch_size: int) -> dict[str, torch.Tensor]:
    """The forward arguments of the bench's DiT besides the sample and timestep: its one class label."""
    return {"class_labels": torch.zeros(batch_size, dtype=torch.long)}


def _sampled_t2i(name: str, description: str, guidance: Callable) -> BenchMethod:
    """An inference-time method of the text-conditional model: the final ``t2i`` model sampled with ``guidance``."""
    return BenchMethod(name, description, sampling_guidance=guidance, text_conditional=True, trained_by="t2i")


BENCH_METHODS: dict[str, BenchMethod] = {
    method.name: method
    for method in (
        BenchMethod("ddpm", "DDPM baseline (uniform timesteps)"),
        BenchMethod("hold2", "HOLD order 2", hold_order=2),
        BenchMethod("hold3", "HOLD order 3", hold_order=3),
        BenchMethod("hold4", "HOLD order 4", hold_order=4),
        # the same training, sampled along training by a solver that finishes 16x16 samples in 50 calls (issue 15)
        *(
            BenchMethod(
                f"hold{order}_exp50",
                f"HOLD order {order}, sampled by the exponential SDE solver at 50 calls",
                hold_order=order,
                hold_sampler=EXP_SDE_SAMPLER,
                hold_sampling_steps=50,
            )
            for order in (2, 3, 4)
        ),
        # HOLD's own settings (issue 15): the HOLD++ reference code's CIFAR value of L_inv, auxiliaries started at
        # the prior's variance instead of 0.08, shorter and longer horizons T, and HOLD on top of IET
        BenchMethod("hold3_linv05", "HOLD order 3, L_inv 0.5", hold_order=3, hold_settings={"L_inv": 0.5}),
        BenchMethod("hold3_aux1", "HOLD order 3, aux_init_var 1", hold_order=3, hold_settings={"aux_init_var": 1.0}),
        BenchMethod("hold3_T3", "HOLD order 3, T 3", hold_order=3, hold_settings={"T": 3.0}),
        BenchMethod("hold3_T8", "HOLD order 3, T 8", hold_order=3, hold_settings={"T": 8.0}),
        BenchMethod(
            "hold3_iet", "HOLD order 3 + iterative ensemble training", hold_order=3, callbacks=_ensemble(False)
        ),
        # the three settings of docs/MEMORIZATION.md: milder and stronger emphasis on later steps, and on earlier ones
        BenchMethod(
            "snr_interval", "DDPM, timesteps ~ N(0.4, 0.2) on u (later steps)", callbacks=_gaussian_timesteps(0.4, 0.2)
        ),
        BenchMethod(
            "snr_later",
            "DDPM, timesteps ~ N(0.25, 0.125) on u (later)",
            callbacks=_gaussian_timesteps(0.25, 0.125),
        ),
        BenchMethod(
            "snr_early", "DDPM, timesteps ~ N(0.75, 0.125) on u (earlier)", callbacks=_gaussian_timesteps(0.75, 0.125)
        ),
        # a grid over the sampler's interval and confidence (issue 15 item 4): intervals of width 0.4 on u from the
        # last denoising steps (u in [0, 0.4]) to the first, at 95 % and 68 % confidence
        *(
            BenchMethod(
                f"snr_u{low:g}-{low + 0.4:g}_c{round(100 * confidence)}",
                f"DDPM, {round(100 * confidence)} % of timesteps in u = [{low:g}, {low + 0.4:g}] (Vu et al.)",
                callbacks=_snr_interval(low, round(low + 0.4, 2), confidence),
            )
            for low in (0.0, 0.3, 0.6)
            for confidence in (0.95, 0.68)
        ),
        BenchMethod("agc", "DDPM + anti-gradient control (mem_ratio 2)", callbacks=_anti_gradient_control),
        BenchMethod("iet", "DDPM, iterative ensemble training (4 shards)", callbacks=_ensemble(redistribute=False)),
        BenchMethod(
            "iet_agc",
            "DDPM, IET + AGC + redistribution of 25 % per round (IET-AGC+)",
            callbacks=_ensemble(redistribute=True),
        ),
        BenchMethod(
            "prune", "DDPM, 20 % least important heads pruned at 80 % of training", callbacks=_head_pruning("masking")
        ),
        BenchMethod(
            "prune_random", "DDPM, 20 % random heads pruned at 80 % (control)", callbacks=_head_pruning("random")
        ),
        # pruning where Ye et al. prune it (issue 15): a DiT, whose capacity is in its attention heads
        BenchMethod("dit", "DDPM DiT (patch 2, 4 layers x 8 heads)", transformer=True),
        *(
            BenchMethod(
                f"dit_prune{percent}{suffix}",
                f"DDPM DiT, {percent} % {kind} heads pruned at 80 % of training",
                callbacks=_head_pruning(criterion, percent / 100, transformer=True),
                transformer=True,
            )
            for percent in (10, 20, 30)
            for criterion, suffix, kind in (("masking", "", "least important"), ("random", "_random", "random"))
        ),
        BenchMethod(
            "amg",
            "the DDPM baseline sampled with anti-memorization guidance (training-set index)",
            sampling_guidance=lambda unet, scheduler, train, config: AntiMemorizationGuidance(unet, scheduler, train),
            trained_by="ddpm",
        ),
        BenchMethod("t2i", "text-conditional DDPM, a unique caption per image, CFG", text_conditional=True),
        BenchMethod(
            "t2i_caption_random",
            "t2i + caption randomisation (p 0.1: random caption, token insertion, word replacement, repetition)",
            callbacks=_caption_randomization,
            text_conditional=True,
        ),
        BenchMethod(
            "t2i_embedding_noise",
            "t2i + Gaussian noise on the text embedding (lambda 0.1)",
            callbacks=lambda scheduler, config, train: [TextEmbeddingNoise(0.1, p=1.0, seed=config.seed)],
            text_conditional=True,
        ),
        BenchMethod(
            "t2i_cfg_gap_filter",
            "t2i + Wen et al.'s training filter (RMS CFG gap per element > 2 / 128, as 2 on SD's 4x64x64)",
            callbacks=_cfg_gap_filter,
            text_conditional=True,
        ),
        _sampled_t2i(
            "t2i_delayed_guidance",
            "the t2i model sampled with delayed guidance (0 until t = 500)",
            lambda unet, scheduler, train, config: delayed_guidance(
                unet, config.guidance_scale, start_timestep=500, scale=config.guidance_scale
            ),
        ),
        _sampled_t2i(
            "t2i_opposite_guidance",
            "the t2i model sampled with opposite guidance (-2 until t = 650)",
            lambda unet, scheduler, train, config: opposite_guidance(
                unet, config.guidance_scale, start_timestep=650, opposite_scale=-2.0, scale=config.guidance_scale
            ),
        ),
        _sampled_t2i(
            "t2i_amg",
            "the t2i model sampled with anti-memorization guidance",
            lambda unet, scheduler, train, config: AntiMemorizationGuidance(
                unet, scheduler, train, guidance_scale=config.guidance_scale
            ),
        ),
    )
}


DEFAULT_METHODS = ("ddpm", "hold2", "hold3", "snr_interval", "agc", "iet", "prune")


@dataclass
class BenchConfig:
    """Settings of a benchmark run (every method gets the same).

    Attributes:
        data (`str`, defaults to `"digits"`): `"digits"`, `"lfw"`, `"photos"` (RGB patches of photographs) or a
            path to an image folder.
        resolution (`int`, defaults to 8): image side.
        train_size (`int`, defaults to 32): training images (where the DDPM baseline memorizes).
        held_out_size (`int`, defaults to 512): held-out real images for the control and the quality metrics.
        methods (`list[str]`): keys of :data:`BENCH_METHODS`.
        train_steps (`int`, defaults to 2000): optimizer updates per method.
        batch_size (`int`, defaults to 64), learning_rate (`float`, defaults to 2e-3): AdamW, cosine decay.
        block_out_channels (`tuple[int, ...]`, defaults to `(16, 32)`): the UNet's widths.
        num_evaluations (`int`, defaults to 4): evaluations along training (the last at the end).
        num_samples (`int`, defaults to 256): generations per evaluation.
        ddim_steps (`int`, defaults to 50): DDIM steps for DDPM-trained models.
        hold_steps (`int`, defaults to 200): Euler-Maruyama steps (quadratic grid) for HOLD models.
        bootstrap (`int`, defaults to 1000): bootstrap resamples of the memorized fraction.
        guidance_scale (`float`, defaults to 1.25): classifier-free guidance of the text-conditional methods (the
            tiny model's samples degrade above about 1.5: at 2 they stop being copies because they stop being
            digits).
        seed (`int`, defaults to 0): seed of the data split, the weights, the training draws and the samples.
    """

    data: str = "digits"
    resolution: int = 8
    train_size: int = 32
    held_out_size: int = 512
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    train_steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 2e-3
    block_out_channels: tuple[int, ...] = (16, 32)
    num_evaluations: int = 4
    num_samples: int = 256
    ddim_steps: int = 50
    hold_steps: int = 200
    bootstrap: int = 1000
    guidance_scale: float = 1.25
    seed: int = 0

    def __post_init__(self):
        unknown = [name for name in self.methods if name not in BENCH_METHODS]
        if unknown or not self.methods:
            raise ValueError(f"Unknown methods {unknown or self.methods}; choose from {', '.join(BENCH_METHODS)}.")
        for position, name in enumerate(self.methods):
            base = BENCH_METHODS[name].trained_by
            if base is not None and base not in self.methods[:position]:
                raise ValueError(f"{name} samples the model of {base}: put {base} before it in the methods.")
        if not self.guidance_scale > 1:
            raise ValueError(f"guidance_scale must be > 1 (classifier-free guidance), got {self.guidance_scale!r}.")
        for name in ("resolution", "train_size", "held_out_size", "train_steps", "batch_size", "num_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.train_size < 2:
            raise ValueError("train_size must be at least 2 (the nearest-neighbour ratio needs two neighbours).")
        if not 1 <= self.num_evaluations <= self.train_steps:
            raise ValueError(f"num_evaluations must be in [1, train_steps], got {self.num_evaluations}.")
        self.block_out_channels = tuple(self.block_out_channels)

    def evaluation_steps(self) -> list[int]:
        """The training steps after which the methods are evaluated."""
        return sorted({round(self.train_steps * (i + 1) / self.num_evaluations) for i in range(self.num_evaluations)})
