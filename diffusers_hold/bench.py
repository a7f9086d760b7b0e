"""The memorization benchmark: train the DDPM baseline, HOLD orders and mitigations side by side, then measure them.

    diffusers-hold bench --output_dir outputs/bench            # or: python -m diffusers_hold.bench
    diffusers-hold bench --quick --output_dir outputs/bench-quick

On bundled real data (scikit-learn's digits by default, scikit-image's LFW faces, or an image folder) at a
training-set size where the unmitigated DDPM memorizes, every method trains a model of the same architecture for the
same number of updates. Each is then sampled and measured against its training images (nearest-neighbour ratio,
the "1/3 rule", with a bootstrap interval and the held-out control) and against held-out images (Fréchet distance and
k-NN precision/recall in a PCA feature space, with the train-vs-held-out floor). Evaluations along training give the
curves of memorization and quality against training steps.

The output folder gets ``results.json``, ``results.md`` (the table), ``samples_vs_nearest.png`` (the most-copied
generations of each method above their nearest training images), ``memorization_vs_order.png`` and
``memorization_vs_steps.png``. A run is resumable: each method's state is saved atomically at every evaluation, and
finished methods are not run again (the configuration must match).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import string
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from tqdm.auto import tqdm

from .metrics import nn_ratio_memorization, quality_report
from .mitigations import (
    CAPTION_RANDOMIZATIONS,
    AntiGradientControl,
    AntiMemorizationGuidance,
    CallbackList,
    CaptionRandomization,
    CFGGapFilter,
    HeadPruningCallback,
    IterativeEnsembleTraining,
    SNRIntervalTimestepSampler,
    TextEmbeddingNoise,
    TimestepSamplingCallback,
    TrainingCallback,
    TrainingState,
    UniformTimestepSampler,
    delayed_guidance,
    opposite_guidance,
    training_step,
)
from .models import HOLDUNet2DModel
from .pipelines import HOLDPipeline
from .schedulers import HOLDScheduler

__all__ = [
    "BENCH_METHODS",
    "BenchConfig",
    "BenchMethod",
    "bench_caption",
    "build_model",
    "load_bench_data",
    "main",
    "run_bench",
    "run_from_args",
]


@dataclass(frozen=True)
class BenchMethod:
    """One training recipe of the benchmark.

    Attributes:
        name (`str`): the method's key (``--methods``).
        description (`str`): one line for the table.
        hold_order (`int`, *optional*): train a HOLD model of this order; `None` trains the DDPM baseline.
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
    """

    name: str
    description: str
    hold_order: int | None = None
    callbacks: Callable[[Any, BenchConfig, torch.Tensor], list[TrainingCallback]] = field(
        default=lambda scheduler, config, train: [], repr=False
    )
    sampling_guidance: Callable[[Any, Any, torch.Tensor, BenchConfig], Any] | None = field(default=None, repr=False)
    text_conditional: bool = False
    trained_by: str | None = None


def _gaussian_timesteps(mean: float, sd: float):
    """A Gaussian on ``u = t / T`` with this mean and sd: the 95 % interval of Vu et al.'s sampler, tails clipped."""

    def callbacks(scheduler, config: BenchConfig, train: torch.Tensor) -> list[TrainingCallback]:
        sampler = SNRIntervalTimestepSampler(scheduler, c_low=mean - 1.96 * sd, c_high=mean + 1.96 * sd, tails="clip")
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
    empty = _TextEncoder.shared(config).encode([""])
    return [CFGGapFilter({"encoder_hidden_states": empty}, threshold=threshold)]


def _head_pruning(criterion: str):
    def callbacks(scheduler, config: BenchConfig, train: torch.Tensor) -> list[TrainingCallback]:
        # Ye et al.: prune 20 % of the heads of the trained model, then fine-tune; here after 80 % of the updates
        return [
            HeadPruningCallback(
                ratio=0.2,
                importance_data=train,
                prune_at_step=round(0.8 * config.train_steps),
                criterion=criterion,
                num_draws=8,
                seed=config.seed,
            )
        ]

    return callbacks


BENCH_METHODS: dict[str, BenchMethod] = {
    method.name: method
    for method in (
        BenchMethod("ddpm", "DDPM baseline (uniform timesteps)"),
        BenchMethod("hold2", "HOLD order 2", hold_order=2),
        BenchMethod("hold3", "HOLD order 3", hold_order=3),
        BenchMethod("hold4", "HOLD order 4", hold_order=4),
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
        BenchMethod(
            "t2i_delayed_guidance",
            "the t2i model sampled with delayed guidance (0 until t = 500)",
            sampling_guidance=lambda unet, scheduler, train, config: delayed_guidance(
                unet, config.guidance_scale, start_timestep=500, scale=config.guidance_scale
            ),
            text_conditional=True,
            trained_by="t2i",
        ),
        BenchMethod(
            "t2i_opposite_guidance",
            "the t2i model sampled with opposite guidance (-2 until t = 650)",
            sampling_guidance=lambda unet, scheduler, train, config: opposite_guidance(
                unet, config.guidance_scale, start_timestep=650, opposite_scale=-2.0, scale=config.guidance_scale
            ),
            text_conditional=True,
            trained_by="t2i",
        ),
        BenchMethod(
            "t2i_amg",
            "the t2i model sampled with anti-memorization guidance",
            sampling_guidance=lambda unet, scheduler, train, config: AntiMemorizationGuidance(
                unet, scheduler, train, guidance_scale=config.guidance_scale
            ),
            text_conditional=True,
            trained_by="t2i",
        ),
    )
}
DEFAULT_METHODS = ("ddpm", "hold2", "hold3", "snr_interval", "agc", "iet", "prune")


@dataclass
class BenchConfig:
    """Settings of a benchmark run (every method gets the same).

    Attributes:
        data (`str`, defaults to `"digits"`): `"digits"`, `"lfw"` or a path to an image folder.
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


def load_bench_data(config: BenchConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The training and held-out images of a run, in ``[-1, 1]``, split by a seeded permutation.

    Raises when the data has fewer images than ``train_size + 2``.
    """
    if config.data == "digits":
        from .data import load_digits_images

        images, _ = load_digits_images(resolution=max(config.resolution, 8))
        if config.resolution < 8:
            raise ValueError("The digits are 8x8: resolution must be >= 8.")
    elif config.data == "lfw":
        images = _lfw_faces(config.resolution)
    else:
        from .audit import load_image_folder

        if not Path(config.data).is_dir():
            raise ValueError(f"--data must be 'digits', 'lfw' or an image folder; {config.data!r} is none of these.")
        images = load_image_folder(config.data, resolution=config.resolution) * 2 - 1
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(config.seed))
    if len(images) < config.train_size + 2:
        raise ValueError(f"The data has {len(images)} images; train_size {config.train_size} leaves no held-out set.")
    train = images[order[: config.train_size]]
    held_out = images[order[config.train_size : config.train_size + config.held_out_size]]
    return train.contiguous(), held_out.contiguous()


def _lfw_faces(resolution: int) -> torch.Tensor:
    """scikit-image's bundled LFW subset: the 100 face images (of 200; the rest are not faces), grayscale."""
    try:
        from skimage.data import lfw_subset
    except ImportError as error:
        raise ImportError("The LFW faces need scikit-image: pip install scikit-image.") from error
    from PIL import Image

    faces = lfw_subset()[:100].astype(np.float32)  # (100, 25, 25) in [0, 1]
    resized = np.stack(
        [np.asarray(Image.fromarray(face, mode="F").resize((resolution, resolution), Image.BICUBIC)) for face in faces]
    )
    return torch.from_numpy(np.clip(resized, 0, 1) * 2 - 1)[:, None]


def bench_caption(index: int) -> str:
    """The caption of training image ``index`` in the text-conditional methods: a unique id per image, spelled as
    three random three-letter words (seeded by the index), so that captions differ in every token."""
    rng = random.Random(index)
    return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(3)) for _ in range(3))


class _TextEncoder:
    """A frozen CLIP text encoder of random weights (the offline tokenizer of :mod:`diffusers_hold.testing`): real
    CLIP code and distinct embeddings for distinct captions, which is all a conditioning signal needs here."""

    width, max_length = 32, 16
    _cache: dict[int, _TextEncoder] = {}

    def __init__(self, seed: int):
        from transformers import CLIPTextConfig, CLIPTextModel

        from .testing import tiny_clip_tokenizer

        self.tokenizer = tiny_clip_tokenizer(model_max_length=self.max_length)
        config = CLIPTextConfig(
            hidden_size=self.width,
            intermediate_size=2 * self.width,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=len(self.tokenizer),
            max_position_embeddings=self.max_length,
            bos_token_id=self.tokenizer.bos_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.model = CLIPTextModel(config).eval().requires_grad_(False)

    @classmethod
    def shared(cls, config: BenchConfig) -> _TextEncoder:
        """One encoder per seed, so every text-conditional method sees the same conditioning."""
        if config.seed not in cls._cache:
            cls._cache[config.seed] = cls(config.seed)
        return cls._cache[config.seed]

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(captions), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        return self.model(tokens.input_ids)[0]


def build_model(method: BenchMethod, config: BenchConfig, channels: int):
    """The method's model and training scheduler (untrained), with weights from the run's seed.

    Args:
        method (`BenchMethod`): the method (its HOLD order and conditioning choose the architecture).
        config (`BenchConfig`): the run's settings (resolution, widths, seed).
        channels (`int`): image channels.
    """
    architecture = {
        "sample_size": config.resolution,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": config.block_out_channels,
        "layers_per_block": 1,
        "norm_num_groups": 8,
    }
    depth = len(config.block_out_channels) - 1
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        if method.text_conditional:
            unet = UNet2DConditionModel(
                **architecture,
                down_block_types=("DownBlock2D",) * depth + ("CrossAttnDownBlock2D",),
                up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * depth,
                cross_attention_dim=_TextEncoder.width,
                attention_head_dim=8,
            )
            return unet, DDPMScheduler(num_train_timesteps=1000)
        architecture["down_block_types"] = ("DownBlock2D",) * depth + ("AttnDownBlock2D",)
        architecture["up_block_types"] = ("AttnUpBlock2D",) + ("UpBlock2D",) * depth
        if method.hold_order is None:
            return UNet2DModel(**architecture), DDPMScheduler(num_train_timesteps=1000)
        scheduler = HOLDScheduler(order=method.hold_order, solver="euler_maruyama", timestep_spacing="quadratic")
        return HOLDUNet2DModel(**architecture, hold_order=method.hold_order), scheduler


@torch.no_grad()
def _sample(model, scheduler, config: BenchConfig, method: BenchMethod, train: torch.Tensor) -> torch.Tensor:
    """``num_samples`` generations in ``[-1, 1]``, from a generator seeded by the run's seed, inside the method's
    sampling guidance (if any)."""
    model.eval()
    generator = torch.Generator().manual_seed(config.seed + 1)
    hold = isinstance(scheduler, HOLDScheduler)
    sampler = scheduler if hold else DDIMScheduler.from_config(scheduler.config)
    guidance = method.sampling_guidance or (lambda *args: contextlib.nullcontext())
    with guidance(model, sampler, train, config):
        if method.text_conditional:
            images = _sample_with_captions(model, sampler, config, len(train), generator)
        else:
            pipe = HOLDPipeline(unet=model, scheduler=sampler) if hold else DDIMPipeline(unet=model, scheduler=sampler)
            pipe.set_progress_bar_config(disable=True)
            images = pipe(
                batch_size=config.num_samples,
                generator=generator,
                num_inference_steps=config.hold_steps if hold else config.ddim_steps,
                output_type="pt" if hold else "np",  # HOLDPipeline gives NCHW tensors, DDIMPipeline NHWC arrays
            ).images
            images = (images if hold else torch.from_numpy(images).permute(0, 3, 1, 2)).float() * 2 - 1
    model.train()
    return images


def _sample_with_captions(unet, scheduler, config: BenchConfig, train_size: int, generator) -> torch.Tensor:
    """DDIM with classifier-free guidance over the training captions (sample ``i`` gets caption ``i % n``), called
    the way diffusers' pipelines call the UNet (one batch, the unconditional half first), so the UNet hooks of
    :mod:`diffusers_hold.mitigations.guidance` apply unchanged."""
    encoder = _TextEncoder.shared(config)
    captions = [bench_caption(i % train_size) for i in range(config.num_samples)]
    states = torch.cat([encoder.encode([""]).expand(len(captions), -1, -1), encoder.encode(captions)])
    channels, size = unet.config.in_channels, config.resolution
    sample = torch.randn(len(captions), channels, size, size, generator=generator)
    scheduler.set_timesteps(config.ddim_steps)
    for t in scheduler.timesteps:
        unconditional, conditional = unet(torch.cat([sample, sample]), t, encoder_hidden_states=states).sample.chunk(2)
        guided = unconditional + config.guidance_scale * (conditional - unconditional)
        sample = scheduler.step(guided, t, sample).prev_sample
    return sample.clamp(-1, 1)


def _bootstrap_interval(memorized: torch.Tensor, resamples: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of the memorized fraction over bootstrap resamples of the generations."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(len(memorized), (resamples, len(memorized)), generator=generator)
    fractions = memorized.double()[draws].mean(1)
    return float(fractions.quantile(0.025)), float(fractions.quantile(0.975))


def evaluate(generated: torch.Tensor, train: torch.Tensor, held_out: torch.Tensor, config: BenchConfig) -> dict:
    """Memorization (with its bootstrap interval and held-out control) and quality of one set of generations."""
    memorization = nn_ratio_memorization(generated, train, held_out=held_out)
    quality = quality_report(generated, train, held_out, n_components=min(32, train[0].numel()))
    low, high = _bootstrap_interval(memorization.memorized, config.bootstrap, config.seed)
    return {
        "memorized": memorization.fraction_memorized,
        "memorized_ci": [low, high],
        "distinct_copied": memorization.distinct_copied,
        "held_out_memorized": memorization.held_out_fraction,
        "frechet_distance": quality.frechet_distance,
        "precision": quality.precision,
        "recall": quality.recall,
        "floor_frechet_distance": quality.floor_frechet_distance,
        "floor_recall": quality.floor_recall,
        "_ratio": memorization.ratio,
        "_nearest": memorization.nearest_index,
    }


def _atomic_save(obj: Any, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def _atomic_json(obj: Any, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(obj, indent=2))
    os.replace(temporary, path)


def train_and_evaluate(
    method: BenchMethod,
    train: torch.Tensor,
    held_out: torch.Tensor,
    config: BenchConfig,
    state_dir: Path,
    progress: bool = True,
) -> tuple[dict, torch.Tensor]:
    """Train one method, evaluating it along the way; resume from ``state_dir`` when it holds a saved state.

    Returns the method's result dict and its final generations.
    """
    model, scheduler = build_model(method, config, channels=train.shape[1])
    mitigations = method.callbacks(scheduler, config, train)
    ensemble = next((c for c in mitigations if isinstance(c, IterativeEnsembleTraining)), None)
    if all(type(c).sample_timesteps is TrainingCallback.sample_timesteps for c in mitigations):
        # uniform timesteps from a generator that is checkpointed with the run, so that resuming is exact
        mitigations = [TimestepSamplingCallback(UniformTimestepSampler(scheduler), seed=config.seed), *mitigations]
    callbacks = CallbackList(mitigations)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / config.train_steps, 1.0)))
    )
    generator = torch.Generator().manual_seed(config.seed + 2)
    state = TrainingState(noise_scheduler=scheduler, model=model, optimizer=optimizer)
    if ensemble is not None:
        # the bench draws batches with replacement, so an "epoch" of a shard is its share of the updates
        state.updates_per_epoch, remainder = divmod(config.train_steps, ensemble.num_epochs)
        if remainder or not state.updates_per_epoch:
            raise ValueError(
                f"{method.name}: train_steps ({config.train_steps}) must be a multiple of the ensemble's "
                f"{ensemble.num_epochs} phases."
            )
    path = state_dir / f"{method.name}.pt"
    step, curve, seconds = 0, [], 0.0
    if path.exists():
        saved = torch.load(path, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        decay.load_state_dict(saved["lr"])
        callbacks.load_state_dict(saved["callbacks"])
        generator.set_state(saved["generator"])
        step, curve, seconds = saved["step"], saved["curve"], saved["seconds"]
    model.train()

    def encode(batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        if not method.text_conditional:
            return train[batch["indices"]], {}
        # 10 % empty captions, so that the model also learns the unconditional score CFG needs
        dropped = (torch.rand(len(batch["indices"]), generator=generator) < 0.1).tolist()
        captions = ["" if drop else caption for caption, drop in zip(batch["captions"], dropped, strict=True)]
        return train[batch["indices"]], {"encoder_hidden_states": _TextEncoder.shared(config).encode(captions)}

    evaluations = [s for s in config.evaluation_steps() if s > step]
    bar = tqdm(total=config.train_steps, initial=step, desc=method.name, disable=not progress, leave=False)
    generated, last = None, None
    for target_step in evaluations:
        start = time.perf_counter()
        while step < target_step:
            pool = torch.from_numpy(ensemble.current_shard) if ensemble is not None else torch.arange(len(train))
            indices = pool[torch.randint(len(pool), (config.batch_size,), generator=generator)]
            state.global_step = step
            batch = {"indices": indices}
            if method.text_conditional:
                batch["captions"] = [bench_caption(i) for i in indices.tolist()]
            loss = training_step(batch, state, callbacks, encode, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            decay.step()
            step += 1
            state.global_step = step  # updates done, as the protocol's on_step_end expects
            callbacks.on_step_end(state)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        seconds += time.perf_counter() - start
        generated = _sample(model, scheduler, config, method, train)
        last = evaluate(generated, train, held_out, config)
        curve.append({"step": step, **{k: v for k, v in last.items() if not k.startswith("_")}})
        _atomic_save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr": decay.state_dict(),
                "callbacks": callbacks.state_dict(),
                "generator": generator.get_state(),
                "step": step,
                "curve": curve,
                "seconds": seconds,
            },
            path,
        )
    bar.close()
    if generated is None:  # every evaluation was done before an interruption: sample the saved final model again
        generated = _sample(model, scheduler, config, method, train)
        last = evaluate(generated, train, held_out, config)
    final = {k: v for k, v in last.items() if not k.startswith("_")}
    result = {
        "method": method.name,
        "description": method.description,
        "hold_order": method.hold_order,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": seconds,
        **final,
        "curve": curve,
        "_ratio": last["_ratio"].tolist(),
        "_nearest": last["_nearest"].tolist(),
    }
    return result, generated


def _sample_trained(
    method: BenchMethod, train: torch.Tensor, held_out: torch.Tensor, config: BenchConfig, state_dir: Path, done: list
) -> tuple[dict, torch.Tensor]:
    """An inference-time method: the final model of ``method.trained_by``, sampled with the method's guidance."""
    base = next(r for r in done if r["method"] == method.trained_by)
    model, scheduler = build_model(method, config, channels=train.shape[1])
    saved = torch.load(state_dir / f"{method.trained_by}.pt", weights_only=False)
    model.load_state_dict(saved["model"])
    generated = _sample(model, scheduler, config, method, train)
    scores = evaluate(generated, train, held_out, config)
    final = {k: v for k, v in scores.items() if not k.startswith("_")}
    result = {
        "method": method.name,
        "description": method.description,
        "hold_order": method.hold_order,
        "parameters": base["parameters"],
        "train_seconds": base["train_seconds"],
        **final,
        "curve": [{"step": saved["step"], **final}],
        "_ratio": scores["_ratio"].tolist(),
        "_nearest": scores["_nearest"].tolist(),
    }
    return result, generated


def _table(results: list[dict], config: BenchConfig) -> str:
    lines = [
        f"Data: {config.data}, {config.train_size} training images at {config.resolution}x{config.resolution}, "
        f"{config.train_steps} updates of batch {config.batch_size} per method, {config.num_samples} samples.",
        "",
        "| method | memorized (1/3 rule) [95 % CI] | distinct copied | held-out control | FD-PCA | precision | recall "
        "| train time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        low, high = r["memorized_ci"]
        lines.append(
            f"| {r['method']} | {r['memorized']:.1%} [{low:.1%}, {high:.1%}] | {r['distinct_copied']} | "
            f"{r['held_out_memorized']:.1%} | {r['frechet_distance']:.3f} | {r['precision']:.2f} | "
            f"{r['recall']:.2f} | {r['train_seconds']:.0f} s |"
        )
    floor = results[0]
    lines += ["", f"Floor (training images vs held-out): FD-PCA {floor['floor_frechet_distance']:.3f}, "
              f"recall {floor['floor_recall']:.2f}."]  # fmt: skip
    return "\n".join(lines)


def _write_figures(
    results: list[dict], generated: dict[str, torch.Tensor], train: torch.Tensor, out: Path
) -> list[str]:
    """Draw the benchmark's figures into ``out``; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .audit import _to_pil
    from .utils import image_grid

    written, count = [], 8
    figure, axes = plt.subplots(len(results), 1, figsize=(8, 2.2 * len(results)), squeeze=False)
    for axis, result in zip(axes[:, 0], results, strict=True):
        ratio = torch.tensor(result["_ratio"])
        order = torch.argsort(ratio)[:count]
        top = [_to_pil((generated[result["method"]][i] + 1) / 2) for i in order]
        bottom = [_to_pil((train[result["_nearest"][i]] + 1) / 2) for i in order]
        axis.imshow(image_grid(top + bottom, cols=len(top), padding=1, scale=4), cmap="gray")
        axis.set_title(f"{result['method']}: memorized {result['memorized']:.0%} (top: samples, bottom: nearest)")
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(out / "samples_vs_nearest.png", dpi=100)
    written.append("samples_vs_nearest.png")
    plt.close(figure)

    ordered = sorted(
        (r for r in results if r["method"] == "ddpm" or r["hold_order"]), key=lambda r: r["hold_order"] or 1
    )
    if ordered:
        figure, axis = plt.subplots(figsize=(5, 3.5))
        orders = [r["hold_order"] or 1 for r in ordered]
        axis.plot(orders, [100 * r["memorized"] for r in ordered], "o-", label="memorized %")
        axis.set_xlabel("order (1 = DDPM baseline)")
        axis.set_ylabel("memorized (%)")
        twin = axis.twinx()
        twin.plot(orders, [r["frechet_distance"] for r in ordered], "s--", color="tab:red", label="FD-PCA")
        twin.set_ylabel("FD-PCA", color="tab:red")
        axis.set_xticks(orders)
        figure.tight_layout()
        figure.savefig(out / "memorization_vs_order.png", dpi=100)
        written.append("memorization_vs_order.png")
        plt.close(figure)

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    for r in results:
        steps = [point["step"] for point in r["curve"]]
        left.plot(steps, [100 * point["memorized"] for point in r["curve"]], "o-", label=r["method"])
        right.plot(steps, [point["frechet_distance"] for point in r["curve"]], "o-", label=r["method"])
    left.set(xlabel="training steps", ylabel="memorized (%)")
    right.set(xlabel="training steps", ylabel="FD-PCA to held-out")
    left.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "memorization_vs_steps.png", dpi=100)
    written.append("memorization_vs_steps.png")
    plt.close(figure)
    return written


def run_bench(config: BenchConfig, output_dir: str | os.PathLike, progress: bool = True) -> list[dict]:
    """Run (or resume) the benchmark and write its files to ``output_dir``; returns the per-method results."""
    out = Path(output_dir)
    state_dir = out / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.json"
    settings = asdict(config)
    settings["block_out_channels"] = list(config.block_out_channels)
    if config_path.exists():
        saved = json.loads(config_path.read_text())
        shared = {k: v for k, v in saved.items() if k != "methods"}
        if shared != {k: v for k, v in settings.items() if k != "methods"}:
            raise ValueError(f"{out} holds a run with other settings ({config_path}); use another --output_dir.")
    _atomic_json(settings, config_path)
    train, held_out = load_bench_data(config)
    results, generated = [], {}
    for name in tqdm(config.methods, desc="methods", disable=not progress):
        method = BENCH_METHODS[name]
        done = state_dir / f"{name}.json"
        if done.exists():
            result = json.loads(done.read_text())
            model, scheduler = build_model(method, config, channels=train.shape[1])
            weights = state_dir / f"{method.trained_by or name}.pt"
            model.load_state_dict(torch.load(weights, weights_only=False)["model"])
            samples = _sample(model, scheduler, config, method, train)
        elif method.trained_by is not None:
            result, samples = _sample_trained(method, train, held_out, config, state_dir, results)
            _atomic_json(result, done)
        else:
            result, samples = train_and_evaluate(method, train, held_out, config, state_dir, progress)
            _atomic_json(result, done)
        results.append(result)
        generated[name] = samples
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    _atomic_json({"config": settings, "results": public}, out / "results.json")
    table = _table(results, config)
    (out / "results.md").write_text(table + "\n")
    figures = _write_figures(results, generated, train, out)
    print(table)
    print(f"\nWrote results.json, results.md and the figures {', '.join(figures)} to {out}/")
    return public


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The flags of ``diffusers-hold bench``."""
    parser = parser or argparse.ArgumentParser(prog="diffusers-hold bench", description=__doc__.split("\n\n")[0])
    defaults = BenchConfig()
    parser.add_argument("--output_dir", default="outputs/bench")
    parser.add_argument("--data", default=defaults.data, help='"digits", "lfw" or an image folder.')
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        choices=sorted(BENCH_METHODS),
        metavar="METHOD",
        help=f"Methods to train side by side (default: {' '.join(DEFAULT_METHODS)}); any of: "
        + ", ".join(sorted(BENCH_METHODS)),
    )
    parser.add_argument("--hold_orders", nargs="+", type=int, default=None, help="HOLD orders to add (2..4).")
    parser.add_argument("--resolution", type=int, default=defaults.resolution)
    parser.add_argument("--train_size", type=int, default=defaults.train_size)
    parser.add_argument("--held_out_size", type=int, default=defaults.held_out_size)
    parser.add_argument("--train_steps", type=int, default=defaults.train_steps)
    parser.add_argument("--num_samples", type=int, default=defaults.num_samples)
    parser.add_argument("--num_evaluations", type=int, default=defaults.num_evaluations)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--guidance_scale", type=float, default=defaults.guidance_scale, help="For the t2i methods.")
    parser.add_argument(
        "--num_threads",
        type=int,
        default=1,
        help="torch threads; the models are tiny, and one thread trains them faster than two on a 2-core CPU.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="A short run: 16 images, 500 updates, 128 samples, one evaluation."
    )
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` of parsed ``bench`` flags (``--quick`` shortens training and sampling)."""
    methods = list(args.methods)
    for order in args.hold_orders or []:
        if f"hold{order}" not in BENCH_METHODS:
            raise ValueError(
                f"--hold_orders supports {sorted(m.hold_order for m in BENCH_METHODS.values() if m.hold_order)}."
            )
        if f"hold{order}" not in methods:
            methods.append(f"hold{order}")
    settings = {
        "data": args.data,
        "methods": methods,
        "resolution": args.resolution,
        "train_size": args.train_size,
        "held_out_size": args.held_out_size,
        "train_steps": args.train_steps,
        "num_samples": args.num_samples,
        "num_evaluations": args.num_evaluations,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
    }
    if args.quick:
        # 16 images memorize within a few hundred updates; one evaluation, fewer samples and HOLD steps
        settings.update(train_size=min(args.train_size, 16), train_steps=min(args.train_steps, 500))
        settings.update(num_samples=min(args.num_samples, 128), num_evaluations=1, hold_steps=100)
    return BenchConfig(**settings)


def run_from_args(args: argparse.Namespace) -> list[dict]:
    """Run the benchmark that parsed ``bench`` flags describe (``diffusers-hold bench`` and ``python -m``)."""
    torch.set_num_threads(args.num_threads)
    return run_bench(config_from_args(args), args.output_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m diffusers_hold.bench``."""
    run_from_args(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
