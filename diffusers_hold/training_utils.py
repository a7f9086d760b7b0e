"""The run infrastructure the training scripts in ``training/`` share, usable from your own loop as well (the
training objective itself is in :mod:`diffusers_hold.objective`).

- :class:`CheckpointManager`: ``accelerator.save_state`` into a hidden temporary folder renamed into place once every
  process has written its part, so ``latest`` never picks a half-written checkpoint; pruning to a total limit.
- :func:`build_timestep_sampler`, :func:`save_validation_grid`: the timestep sampler and the validation grids of a
  :class:`~diffusers_hold.training_config.TrainingConfig`.
- :class:`NoiseGenerator`: a per-process ``torch.Generator`` for noise and timesteps whose state is saved with each
  checkpoint. It is independent of the global RNG (which data loaders also draw from), so a resumed run draws
  exactly what an uninterrupted one draws.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate.logging import get_logger
from accelerate.utils import is_tensorboard_available, is_wandb_available
from safetensors.torch import load_file, save_file

from .mitigations.timestep_sampling import TimestepSampler, get_timestep_sampler
from .training_config import TrainingConfig
from .utils import image_grid, replace_path

__all__ = [
    "CheckpointManager",
    "NoiseGenerator",
    "build_timestep_sampler",
    "check_replicas_agree",
    "check_tracker_available",
    "save_validation_grid",
]

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
logger = get_logger(__name__)


class NoiseGenerator:
    """A ``torch.Generator`` per process, seeded with ``seed + process_index``, saved and restored per process.

    Args:
        seed (`int`): base seed of the run.
        process_index (`int`, defaults to 0): this process's rank (ranks draw different noise).
    """

    def __init__(self, seed: int, process_index: int = 0):
        self.process_index = process_index
        self.generator = torch.Generator().manual_seed(seed + process_index)

    def _path(self, folder: str | os.PathLike) -> Path:
        return Path(folder) / f"noise_generator_{self.process_index}.safetensors"

    def save(self, folder: str | os.PathLike) -> None:
        """Write this process's generator state into ``folder``."""
        save_file({"state": self.generator.get_state()}, self._path(folder))

    def load(self, folder: str | os.PathLike) -> None:
        """Restore this process's generator state from ``folder``; raises if the checkpoint has none for it."""
        path = self._path(folder)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint was written by a run with fewer processes than this one."
            )
        self.generator.set_state(load_file(path)["state"])


class CheckpointManager:
    """Atomic ``accelerator.save_state`` checkpoints named ``checkpoint-<step>`` in ``output_dir``.

    Every process writes into a hidden ``.checkpoint-<step>.tmp`` folder; once all have finished, the main process
    renames it to ``checkpoint-<step>`` (a rename is atomic on one file system). A crash mid-save leaves only a hidden
    temporary folder, which :meth:`latest` never returns and the next run deletes.

    Args:
        output_dir (`str` or `os.PathLike`): the run's output folder.
        total_limit (`int`, *optional*): keep at most this many checkpoints (the oldest are deleted first).
    """

    def __init__(self, output_dir: str | os.PathLike, total_limit: int | None = None):
        if total_limit is not None and total_limit < 1:
            raise ValueError(f"checkpoints_total_limit must be >= 1, got {total_limit}.")
        self.output_dir = Path(output_dir)
        self.total_limit = total_limit

    def checkpoints(self) -> list[Path]:
        """Finished checkpoints, oldest first."""
        if not self.output_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        """The finished checkpoint with the highest step, or ``None``."""
        checkpoints = self.checkpoints()
        return checkpoints[-1] if checkpoints else None

    def resolve(self, resume_from_checkpoint: str) -> Path | None:
        """The checkpoint named by ``--resume_from_checkpoint``: ``"latest"`` (``None`` when there is none yet) or a
        path / a name inside ``output_dir``, which must exist."""
        if resume_from_checkpoint == "latest":
            return self.latest()
        path = Path(resume_from_checkpoint)
        if not path.is_absolute() and not path.exists():
            path = self.output_dir / path
        if not (path.is_dir() and CHECKPOINT_PATTERN.match(path.name)):
            raise FileNotFoundError(f"No checkpoint folder {resume_from_checkpoint!r} (looked for {path}).")
        return path

    @staticmethod
    def step_of(checkpoint: Path) -> int:
        """The global step a checkpoint was written at."""
        return int(CHECKPOINT_PATTERN.match(checkpoint.name).group(1))

    def remove_unfinished(self, accelerator) -> None:
        """Delete temporary folders that a crashed save left behind (main process), then synchronise."""
        if accelerator.is_main_process and self.output_dir.is_dir():
            for path in self.output_dir.glob(".checkpoint-*.tmp"):
                shutil.rmtree(path)
        accelerator.wait_for_everyone()

    def save(self, accelerator, step: int, noise_generator: NoiseGenerator | None = None) -> Path:
        """Write ``checkpoint-<step>`` with the accelerator's state (models, optimizers, schedulers, RNGs, registered
        objects) and each process's noise generator; prune to the total limit. Call on every process."""
        final = self.output_dir / f"checkpoint-{step}"
        staging = self.output_dir / f".checkpoint-{step}.tmp"
        if accelerator.is_main_process:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))
        if noise_generator is not None:
            noise_generator.save(staging)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            replace_path(staging, final)  # the same step saved again (e.g. the final step after a resume) replaces it
            if self.total_limit is not None:
                for old in self.checkpoints()[: -self.total_limit]:
                    shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final

    def load(self, accelerator, checkpoint: Path, noise_generator: NoiseGenerator | None = None) -> int:
        """Restore ``checkpoint`` into the accelerator (and the noise generator); returns its global step."""
        accelerator.load_state(str(checkpoint))
        if noise_generator is not None:
            noise_generator.load(checkpoint)
        return self.step_of(checkpoint)


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
