"""Running the benchmark: its data, the methods' models, their training (through
:func:`~diffusers_hold.mitigations.training_step`), sampling, and the saved state that makes a run resumable."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMScheduler,
    DiTTransformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.models.embeddings import LabelEmbedding
from tqdm.auto import tqdm

from ..data import load_digits_images, load_lfw_faces, load_photo_patches
from ..image_data import load_image_folder
from ..mitigations import (
    CallbackList,
    IterativeEnsembleTraining,
    TimestepSamplingCallback,
    TrainingCallback,
    TrainingState,
    UniformTimestepSampler,
    training_step,
)
from ..models import HOLDUNet2DModel
from ..pipelines import HOLDPipeline
from ..schedulers import HOLDScheduler
from ..utils import atomic_output
from .methods import BENCH_METHODS, BenchConfig, BenchMethod, dit_inputs
from .report import check_evaluation_sizes, evaluate, public_scores, results_table, write_figures
from .text import BenchTextEncoder, bench_caption

__all__ = ["build_model", "load_bench_data", "run_bench", "train_and_evaluate"]


def load_bench_data(config: BenchConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The training and held-out images of a run, in ``[-1, 1]``, split by a seeded permutation.

    ``config.data``: ``"digits"`` (scikit-learn's, grayscale), ``"lfw"`` (scikit-image's faces, grayscale),
    ``"photos"`` (RGB patches of bundled photographs, :func:`~diffusers_hold.data.load_photo_patches`) or an image
    folder (read as RGB, centre-cropped to the resolution). Raises when the data has fewer images than
    ``train_size + 2``.
    """
    if config.data == "digits":
        if config.resolution < 8:
            raise ValueError("The digits are 8x8: resolution must be >= 8.")
        images, _ = load_digits_images(resolution=config.resolution)
    elif config.data == "lfw":
        images = load_lfw_faces(config.resolution)
    elif config.data == "photos":
        images = load_photo_patches(config.resolution)
    elif Path(config.data).is_dir():
        pixels, _ = load_image_folder(train_data_dir=config.data, resolution=config.resolution)
        images = pixels * 2 - 1
    else:
        raise ValueError(
            f"--data must be 'digits', 'lfw', 'photos' or an image folder; {config.data!r} is none of these."
        )
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(config.seed))
    if len(images) < config.train_size + 2:
        raise ValueError(f"The data has {len(images)} images; train_size {config.train_size} leaves no held-out set.")
    train = images[order[: config.train_size]]
    held_out = images[order[config.train_size : config.train_size + config.held_out_size]]
    return train.contiguous(), held_out.contiguous()


def build_model(method: BenchMethod, config: BenchConfig, channels: int):
    """The method's model and training scheduler (untrained), with weights from the run's seed.

    Args:
        method (`BenchMethod`): the method (its HOLD order, conditioning and ``transformer`` choose the
            architecture).
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
        if method.transformer:
            dit = DiTTransformer2DModel(
                num_attention_heads=8,
                attention_head_dim=8,
                in_channels=channels,
                num_layers=4,
                sample_size=config.resolution,
                patch_size=2,
                num_embeds_ada_norm=1,
            )
            # diffusers' DiT drops its class label 10 % of the time in training (for classifier-free guidance),
            # drawing from the global RNG; with one class and no guidance that only made training irreproducible
            for module in dit.modules():
                if isinstance(module, LabelEmbedding):
                    module.dropout_prob = 0.0
            return dit, DDPMScheduler(num_train_timesteps=1000)
        if method.text_conditional:
            unet = UNet2DConditionModel(
                **architecture,
                down_block_types=("DownBlock2D",) * depth + ("CrossAttnDownBlock2D",),
                up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * depth,
                cross_attention_dim=BenchTextEncoder.width,
                attention_head_dim=8,
            )
            return unet, DDPMScheduler(num_train_timesteps=1000)
        architecture["down_block_types"] = ("DownBlock2D",) * depth + ("AttnDownBlock2D",)
        architecture["up_block_types"] = ("AttnUpBlock2D",) + ("UpBlock2D",) * depth
        if method.hold_order is None:
            return UNet2DModel(**architecture), DDPMScheduler(num_train_timesteps=1000)
        scheduler = HOLDScheduler(
            order=method.hold_order, solver="euler_maruyama", timestep_spacing="quadratic", **method.hold_settings
        )
        unet = HOLDUNet2DModel(**architecture, hold_order=method.hold_order, hold_settings=method.hold_settings)
        return unet, scheduler


@torch.no_grad()
def _sample(model, scheduler, config: BenchConfig, method: BenchMethod, train: torch.Tensor) -> torch.Tensor:
    """``num_samples`` generations in ``[-1, 1]``, from a generator seeded by the run's seed, inside the method's
    sampling guidance (if any)."""
    model.eval()
    generator = torch.Generator().manual_seed(config.seed + 1)
    hold = isinstance(scheduler, HOLDScheduler)
    if hold:
        sampler = HOLDScheduler.from_config(scheduler.config, **method.hold_sampler)
    else:
        sampler = DDIMScheduler.from_config(scheduler.config)
    guidance = method.sampling_guidance or (lambda *args: contextlib.nullcontext())
    with guidance(model, sampler, train, config):
        if method.text_conditional:
            images = _sample_with_captions(model, sampler, config, len(train), generator)
        elif method.transformer:
            images = _sample_dit(model, sampler, config, train.shape[1], generator)
        else:
            pipe = HOLDPipeline(unet=model, scheduler=sampler) if hold else DDIMPipeline(unet=model, scheduler=sampler)
            pipe.set_progress_bar_config(disable=True)
            images = pipe(
                batch_size=config.num_samples,
                generator=generator,
                num_inference_steps=(method.hold_sampling_steps or config.hold_steps) if hold else config.ddim_steps,
                output_type="pt" if hold else "np",  # HOLDPipeline gives NCHW tensors, DDIMPipeline NHWC arrays
            ).images
            images = (images if hold else torch.from_numpy(images).permute(0, 3, 1, 2)).float() * 2 - 1
    model.train()
    return images


def _sample_dit(dit, scheduler, config: BenchConfig, channels: int, generator) -> torch.Tensor:
    """DDIM for the bench's DiT, which diffusers' DDIMPipeline cannot call (it needs class labels)."""
    size = config.resolution
    sample = torch.randn(config.num_samples, channels, size, size, generator=generator)
    inputs = dit_inputs(config.num_samples)
    scheduler.set_timesteps(config.ddim_steps)
    for t in scheduler.timesteps:
        noise_pred = dit(sample, t.expand(len(sample)), **inputs).sample
        sample = scheduler.step(noise_pred, t, sample).prev_sample
    return sample.clamp(-1, 1)


def _sample_with_captions(unet, scheduler, config: BenchConfig, train_size: int, generator) -> torch.Tensor:
    """DDIM with classifier-free guidance over the training captions (sample ``i`` gets caption ``i % n``), called
    the way diffusers' pipelines call the UNet (one batch, the unconditional half first), so the UNet hooks of
    :mod:`diffusers_hold.mitigations.guidance` apply unchanged."""
    encoder = BenchTextEncoder.shared(config.seed)
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


@dataclass
class _MethodRun:
    """One method's training: model, optimizer, callbacks and random draws, saved and restored as a whole."""

    method: BenchMethod
    config: BenchConfig
    train: torch.Tensor
    model: torch.nn.Module
    scheduler: Any
    callbacks: CallbackList
    optimizer: torch.optim.Optimizer
    decay: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    state: TrainingState
    ensemble: IterativeEnsembleTraining | None
    step: int = 0
    curve: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @classmethod
    def create(cls, method: BenchMethod, config: BenchConfig, train: torch.Tensor) -> _MethodRun:
        """A fresh run: the model of :func:`build_model`, the method's callbacks, AdamW with cosine decay."""
        model, scheduler = build_model(method, config, channels=train.shape[1])
        mitigations = method.callbacks(scheduler, config, train)
        ensemble = next((c for c in mitigations if isinstance(c, IterativeEnsembleTraining)), None)
        if all(type(c).sample_timesteps is TrainingCallback.sample_timesteps for c in mitigations):
            # uniform timesteps from a generator that is checkpointed with the run, so that resuming is exact
            mitigations = [TimestepSamplingCallback(UniformTimestepSampler(scheduler), seed=config.seed), *mitigations]
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
        decay = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / config.train_steps, 1.0)))
        )
        state = TrainingState(noise_scheduler=scheduler, model=model, optimizer=optimizer)
        if ensemble is not None:
            # the bench draws batches with replacement, so an "epoch" of a shard is its share of the updates
            state.updates_per_epoch, remainder = divmod(config.train_steps, ensemble.num_epochs)
            if remainder or not state.updates_per_epoch:
                raise ValueError(
                    f"{method.name}: train_steps ({config.train_steps}) must be a multiple of the ensemble's "
                    f"{ensemble.num_epochs} phases."
                )
        generator = torch.Generator().manual_seed(config.seed + 2)
        return cls(method, config, train, model, scheduler, CallbackList(mitigations), optimizer, decay, generator,
                   state, ensemble)  # fmt: skip

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr": self.decay.state_dict(),
            "callbacks": self.callbacks.state_dict(),
            "generator": self.generator.get_state(),
            "step": self.step,
            "curve": self.curve,
            "seconds": self.seconds,
        }

    def load_state_dict(self, saved: dict) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.decay.load_state_dict(saved["lr"])
        self.callbacks.load_state_dict(saved["callbacks"])
        self.generator.set_state(saved["generator"])
        self.step, self.curve, self.seconds = saved["step"], saved["curve"], saved["seconds"]

    def encode(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """The training images of the batch's indices; for text-conditional methods also their captions' states."""
        clean = self.train[batch["indices"]]
        if self.method.transformer:
            return clean, dit_inputs(len(clean))
        if not self.method.text_conditional:
            return clean, {}
        # 10 % empty captions, so that the model also learns the unconditional score CFG needs
        dropped = (torch.rand(len(batch["indices"]), generator=generator) < 0.1).tolist()
        captions = ["" if drop else caption for caption, drop in zip(batch["captions"], dropped, strict=True)]
        return clean, {"encoder_hidden_states": BenchTextEncoder.shared(self.config.seed).encode(captions)}

    def train_until(self, target_step: int, bar) -> None:
        """Optimizer updates up to ``target_step``, on batches drawn with replacement (from the current shard with
        an ensemble)."""
        start = time.perf_counter()
        self.model.train()
        while self.step < target_step:
            ensemble = self.ensemble
            pool = torch.from_numpy(ensemble.current_shard) if ensemble is not None else torch.arange(len(self.train))
            indices = pool[torch.randint(len(pool), (self.config.batch_size,), generator=self.generator)]
            self.state.global_step = self.step
            batch = {"indices": indices}
            if self.method.text_conditional:
                batch["captions"] = [bench_caption(i) for i in indices.tolist()]
            loss = training_step(batch, self.state, self.callbacks, self.encode, generator=self.generator)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.decay.step()
            self.step += 1
            self.state.global_step = self.step  # updates done, as the protocol's on_step_end expects
            self.callbacks.on_step_end(self.state)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        self.seconds += time.perf_counter() - start


def _result(method: BenchMethod, scores: dict, parameters: int, train_seconds: float, curve: list[dict]) -> dict:
    """A method's entry of the results: its scores, size, training time and curve (per-generation lists last)."""
    return {
        "method": method.name,
        "description": method.description,
        "hold_order": method.hold_order,
        "parameters": parameters,
        "train_seconds": train_seconds,
        **public_scores(scores),
        "curve": curve,
        "_ratio": scores["_ratio"].tolist(),
        "_nearest": scores["_nearest"].tolist(),
    }


def train_and_evaluate(
    method: BenchMethod,
    train: torch.Tensor,
    held_out: torch.Tensor,
    config: BenchConfig,
    state_dir: Path,
    progress: bool = True,
    on_evaluation: Callable[[int, torch.Tensor, dict], None] | None = None,
) -> tuple[dict, torch.Tensor]:
    """Train one method, evaluating it along the way; resume from ``state_dir`` when it holds a saved state.

    The state (``<state_dir>/<method>.pt``) is saved atomically after every evaluation. Returns the method's result
    dict and its final generations. ``on_evaluation(step, generations, scores)``, if given, is called after each
    evaluation this call makes (not for those restored from a saved state), e.g. to keep sample grids.
    """
    run = _MethodRun.create(method, config, train)
    path = state_dir / f"{method.name}.pt"
    if path.exists():
        run.load_state_dict(_load_state(path))
        done, planned = [point["step"] for point in run.curve], config.evaluation_steps()
        if done != planned[: len(done)]:
            raise ValueError(
                f"{path} was saved by a run that evaluated at steps {done}; this run evaluates at {planned}. "
                "Use another state folder."
            )
    bar = tqdm(total=config.train_steps, initial=run.step, desc=method.name, disable=not progress, leave=False)
    generated, scores = None, None
    for target_step in [s for s in config.evaluation_steps() if s > run.step]:
        run.train_until(target_step, bar)
        generated = _sample(run.model, run.scheduler, config, method, train)
        scores = evaluate(generated, train, held_out, config)
        run.curve.append({"step": run.step, **public_scores(scores)})
        _save_state(run.state_dict(), path)
        if on_evaluation is not None:
            on_evaluation(run.step, generated, scores)
    bar.close()
    if generated is None:  # every evaluation was done before an interruption: sample the saved final model again
        generated = _sample(run.model, run.scheduler, config, method, train)
        scores = evaluate(generated, train, held_out, config)
    parameters = sum(p.numel() for p in run.model.parameters())
    return _result(method, scores, parameters, run.seconds, run.curve), generated


def _sample_trained(
    method: BenchMethod, train: torch.Tensor, held_out: torch.Tensor, config: BenchConfig, state_dir: Path, done: list
) -> tuple[dict, torch.Tensor]:
    """An inference-time method: the final model of ``method.trained_by``, sampled with the method's guidance."""
    base = next(r for r in done if r["method"] == method.trained_by)
    model, scheduler = build_model(method, config, channels=train.shape[1])
    saved = _load_state(state_dir / f"{method.trained_by}.pt")
    model.load_state_dict(saved["model"])
    generated = _sample(model, scheduler, config, method, train)
    scores = evaluate(generated, train, held_out, config)
    curve = [{"step": saved["step"], **public_scores(scores)}]
    return _result(method, scores, base["parameters"], base["train_seconds"], curve), generated


def _save_state(state: dict, path: Path) -> None:
    with atomic_output(path) as temporary:
        torch.save(state, temporary)


def _load_state(path: Path) -> dict:
    """A state file of this benchmark: tensors and plain values only (``weights_only``), so a state folder from
    elsewhere cannot run code when it is resumed."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds objects other than tensors and plain values, so it is not a state file of this benchmark; "
            "it was not loaded. Delete it to train the method again, or use another --output_dir."
        ) from error


def _write_json(obj: Any, path: Path) -> None:
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(obj, indent=2))


def run_bench(config: BenchConfig, output_dir: str | os.PathLike, progress: bool = True) -> list[dict]:
    """Run (or resume) the benchmark and write its files to ``output_dir``; returns the per-method results.

    A folder that holds a run with other settings (``config.json``; the methods may differ) is refused. Methods
    whose result is saved (``state/<method>.json``) are not run again; their final model is sampled for the figures.
    """
    out = Path(output_dir)
    state_dir = out / "state"
    config_path = out / "config.json"
    settings = asdict(config)
    settings["block_out_channels"] = list(config.block_out_channels)
    if config_path.exists():
        saved = json.loads(config_path.read_text())
        shared = {k: v for k, v in saved.items() if k != "methods"}
        if shared != {k: v for k, v in settings.items() if k != "methods"}:
            raise ValueError(f"{out} holds a run with other settings ({config_path}); use another --output_dir.")
    # everything that can fail on the data fails here, before the folder is claimed by config.json
    train, held_out = load_bench_data(config)
    check_evaluation_sizes(config, train, held_out)
    state_dir.mkdir(parents=True, exist_ok=True)
    _write_json(settings, config_path)
    results, generated = [], {}
    for name in tqdm(config.methods, desc="methods", disable=not progress):
        method = BENCH_METHODS[name]
        done = state_dir / f"{name}.json"
        if done.exists():
            result = json.loads(done.read_text())
            model, scheduler = build_model(method, config, channels=train.shape[1])
            model.load_state_dict(_load_state(state_dir / f"{method.trained_by or name}.pt")["model"])
            samples = _sample(model, scheduler, config, method, train)
        elif method.trained_by is not None:
            result, samples = _sample_trained(method, train, held_out, config, state_dir, results)
            _write_json(result, done)
        else:
            result, samples = train_and_evaluate(method, train, held_out, config, state_dir, progress)
            _write_json(result, done)
        results.append(result)
        generated[name] = samples
    public = [public_scores(r) for r in results]
    _write_json({"config": settings, "results": public}, out / "results.json")
    table = results_table(results, config)
    (out / "results.md").write_text(table + "\n")
    figures = write_figures(results, generated, train, out)
    print(table)
    print(f"\nWrote results.json, results.md and the figures {', '.join(figures)} to {out}/")
    return public
