"""The run infrastructure the training scripts in ``training/`` share, usable from your own loop as well (the
training objective is in :mod:`diffusers_hold.objective`, checkpoints and per-process noise in
:mod:`diffusers_hold.checkpoints`).

- :func:`build_timestep_sampler`, :func:`save_validation_grid`: the timestep sampler and the validation grids of a
  :class:`~diffusers_hold.training_config.TrainingConfig`.
- :func:`check_replicas_agree`, :func:`check_tracker_available`: checks at the end and at the start of a run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from accelerate.logging import get_logger
from accelerate.utils import is_tensorboard_available, is_wandb_available

from .mitigations.timestep_sampling import TimestepSampler, get_timestep_sampler
from .training_config import TrainingConfig
from .utils import image_grid

__all__ = [
    "build_timestep_sampler",
    "check_replicas_agree",
    "check_tracker_available",
    "save_validation_grid",
]

logger = get_logger(__name__)


def build_timestep_sampler(config: TrainingConfig, noise_scheduler) -> TimestepSampler:
    """The timestep sampler chosen by ``config.timestep_sampling`` and its settings."""
    if config.timestep_sampling == "uniform":
        return get_timestep_sampler("uniform", noise_scheduler)
    settings = {"importance_weights": config.timestep_importance_weights}
    if config.timestep_sampling == "logit_normal":
        settings.update(mean=config.logit_normal_mean, std=config.logit_normal_std)
    else:
        if config.snr_interval_low is None or config.snr_interval_high is None:
            raise ValueError("--timestep_sampling snr_interval needs --snr_interval_low and --snr_interval_high.")
        settings.update(c_low=config.snr_interval_low, c_high=config.snr_interval_high)
        settings.update(confidence=config.snr_interval_confidence, space=config.snr_interval_space)
        settings.update(tails=config.snr_interval_tails, uniform_mixture=config.timestep_uniform_mixture)
    return get_timestep_sampler(config.timestep_sampling, noise_scheduler, **settings)


def save_validation_grid(accelerator, pipeline, config: TrainingConfig, step: int, **pipeline_kwargs) -> Path:
    """Sample with a fixed generator (``config.seed``), save a grid under ``<output_dir>/validation`` and log the
    images to the trackers (main process only).

    Args:
        accelerator (`accelerate.Accelerator`): the run's accelerator (for its trackers).
        pipeline (`DiffusionPipeline`): the pipeline to sample with.
        config (`TrainingConfig`): the run's settings (seed, sampling steps, output folder).
        step (`int`): the global step (file name and tracker step).
        **pipeline_kwargs: extra pipeline arguments (e.g. the validation prompt).
    """
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        num_inference_steps=config.validation_inference_steps,
        generator=torch.Generator().manual_seed(config.seed),
        **pipeline_kwargs,
    ).images
    folder = Path(config.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:07d}.png"
    image_grid(images, padding=2, scale=max(1, 128 // images[0].size[0])).save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            array = np.stack([np.asarray(image.convert("RGB")) for image in images])
            tracker.writer.add_images("validation", array, step, dataformats="NHWC")
    return path


def _fingerprint(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Float64 sum and sum of squares over a list of tensors."""
    values = [t.detach().double().flatten() for t in tensors] or [torch.zeros(1, dtype=torch.float64)]
    return torch.stack([sum(v.sum() for v in values), sum(v.square().sum() for v in values)])


def _state_tensors(state) -> list[torch.Tensor]:
    """Every tensor in a nested ``state_dict`` (dicts, lists, tuples)."""
    if torch.is_tensor(state):
        return [state.cpu()]
    if isinstance(state, dict):
        return [t for value in state.values() for t in _state_tensors(value)]
    if isinstance(state, (list, tuple)):
        return [t for value in state for t in _state_tensors(value)]
    return []


def check_replicas_agree(accelerator, model: torch.nn.Module, callbacks=None) -> None:
    """Raise unless every process holds the same weights and callback state (replicas must never drift apart).

    Compares float64 fingerprints (sum and sum of squares) of the parameters and of the tensors in
    ``callbacks.state_dict()`` (loss banks, generator states) across processes; logs them. The main process's
    callback state is what checkpoints store, so it must be every process's.

    Args:
        accelerator (`accelerate.Accelerator`): the run's accelerator.
        model (`torch.nn.Module`): the (prepared) model.
        callbacks (`CallbackList`, *optional*): the run's callbacks.
    """
    parameters = list(accelerator.unwrap_model(model).parameters())
    states = [] if callbacks is None else _state_tensors(callbacks.state_dict())
    fingerprint = torch.cat([_fingerprint(parameters), _fingerprint(states)])
    everyone = accelerator.gather(fingerprint.to(accelerator.device)[None]).cpu()
    if not torch.equal(everyone[:, :2], everyone[:1, :2].expand(len(everyone), 2)):
        raise RuntimeError(f"The {accelerator.num_processes} processes hold different weights: {everyone.tolist()}.")
    if not torch.equal(everyone[:, 2:], everyone[:1, 2:].expand(len(everyone), 2)):
        raise RuntimeError(
            f"The {accelerator.num_processes} processes hold different callback states: {everyone.tolist()}."
        )
    logger.info(
        f"weights agree across {accelerator.num_processes} processes (fingerprint {everyone[0, :2].tolist()}); "
        f"callback states agree (fingerprint {everyone[0, 2:].tolist()})",
        main_process_only=True,
    )


def check_tracker_available(report_to: str) -> None:
    """Fail before training when ``--report_to`` names a tracker that is not installed (accelerate would only warn
    and drop it, and the run would log nothing)."""
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    if report_to in available and not available[report_to]():
        raise ValueError(f"--report_to {report_to} needs the {report_to} package: pip install {report_to}.")
