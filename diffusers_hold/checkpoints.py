"""Checkpoints of a training run: atomic, resumable exactly, owned by the run that wrote them, and free of pickles
where the project's own state is concerned.

- :class:`CheckpointManager`: ``accelerator.save_state`` into a hidden temporary folder renamed into place once every
  process has written its part, so ``latest`` never picks a half-written checkpoint; pruning to a total limit; the
  run's own state objects (callbacks, EMA) in safetensors + JSON; and the run's record (:data:`RUN_FILE`), whose
  fingerprint decides whether a folder's checkpoints and pipeline belong to this run (:meth:`CheckpointManager.claim`).
- :class:`NoiseGenerator`: a per-process ``torch.Generator`` for noise and timesteps whose state is saved with each
  checkpoint. It is independent of the global RNG (which data loaders also draw from), so a resumed run draws
  exactly what an uninterrupted one draws.
- :func:`save_state_files` / :func:`load_state_files`: a nested state dict (dicts, lists, tensors, numbers, strings)
  as ``<name>.safetensors`` plus ``<name>.json``, which load without running any code.

What accelerate itself writes into a checkpoint (``model.safetensors``; ``optimizer.bin``, ``scheduler.bin``,
``random_states_<i>.pkl`` are ``torch.save`` pickles that accelerate unpickles on resume) must come from a source you
trust: resume only from checkpoint folders your own runs wrote.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .utils import atomic_output, replace_path

__all__ = [
    "RUN_CONTROL_SETTINGS",
    "RUN_FILE",
    "CheckpointManager",
    "NoiseGenerator",
    "load_state_files",
    "run_fingerprint",
    "save_state_files",
]

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
RUN_FILE = "run.json"
"""The run's record: its fingerprint, in the output folder and in every checkpoint."""
RUN_CONTROL_SETTINGS = frozenset(
    {
        "output_dir",
        "overwrite_output_dir",
        "resume_from_checkpoint",
        "num_train_epochs",
        "max_train_steps",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "validation_steps",
        "num_validation_images",
        "validation_inference_steps",
        "validation_prompts",
        "report_to",
        "push_to_hub",
        "hub_model_id",
        "hub_token",
        "audit_report",
        "dataloader_num_workers",
        "cache_dir",
        "gradient_checkpointing",
    }
)
"""Settings that say how a run is carried out (where, how long, what is logged and kept), not what it trains: they
may change when a run is resumed, and are left out of its fingerprint."""
_TENSOR = "__tensor__"


def run_fingerprint(settings: Mapping[str, Any]) -> dict[str, Any]:
    """What defines a run: its settings except :data:`RUN_CONTROL_SETTINGS`, as plain JSON values (sorted keys).

    Args:
        settings (`Mapping`): every setting of the run (e.g. ``vars(args)`` of a training script, or the fields of a
            :class:`~diffusers_hold.training_config.TrainingConfig`); values must be JSON-representable (tuples and
            paths are written as lists and strings).
    """
    kept = {name: settings[name] for name in sorted(settings) if name not in RUN_CONTROL_SETTINGS}
    return json.loads(json.dumps(kept, default=str))


def save_state_files(state: Mapping[str, Any], folder: str | os.PathLike, name: str) -> None:
    """Write a nested state dict as ``<name>.safetensors`` (its tensors) and ``<name>.json`` (everything else, the
    tensors replaced by references), so that loading it runs no code.

    Args:
        state (`Mapping`): dicts with string keys, lists and tuples, tensors, ``bool``, ``int``, ``float``, ``str`` and
            ``None`` (what a ``state_dict`` of the project's callbacks or diffusers' ``EMAModel`` holds).
        folder (`str` or `os.PathLike`): an existing folder.
        name (`str`): the files' stem.

    Raises:
        `TypeError`: for any other value, named by its place in ``state``.
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, where: str) -> Any:
        if isinstance(value, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = value.detach().cpu().contiguous().clone()
            return {_TENSOR: key}
        if isinstance(value, Mapping):
            if not all(isinstance(key, str) for key in value) or _TENSOR in value:
                raise TypeError(f"{where}: state dicts need string keys other than {_TENSOR!r}, got {list(value)}.")
            return {key: encode(item, f"{where}.{key}") for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"{where}: cannot store a {type(value).__name__} without pickle; use tensors or plain values.")

    tree = encode(state, name)
    folder = Path(folder)
    save_file(tensors, folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(json.dumps(tree))


def load_state_files(folder: str | os.PathLike, name: str) -> dict[str, Any]:
    """Read back what :func:`save_state_files` wrote (tensors on the CPU); raise naming the file that is missing or
    unreadable."""
    folder = Path(folder)
    paths = [folder / f"{name}.json", folder / f"{name}.safetensors"]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"The checkpoint lacks {' and '.join(missing)}.")
    try:
        tree = json.loads(paths[0].read_text())
        tensors = load_file(paths[1])
    except (json.JSONDecodeError, SafetensorError, OSError) as error:
        raise ValueError(f"Cannot read the state {name!r} in {folder}: {error}") from error

    def decode(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {_TENSOR}:
                return tensors[value[_TENSOR]]
            return {key: decode(item) for key, item in value.items()}
        if isinstance(value, list):
            return [decode(item) for item in value]
        return value

    return decode(tree)


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
            others = sorted(Path(folder).glob("noise_generator_*.safetensors"))
            cause = (
                f"the checkpoint holds {len(others)} process(es)' generators, so it was written by a run with fewer "
                "processes than this one"
                if others and self.process_index >= len(others)
                else "the checkpoint is incomplete; resume from an earlier one"
            )
            raise FileNotFoundError(f"{path} is missing: {cause}.")
        self.generator.set_state(load_file(path)["state"])


class CheckpointManager:
    """Atomic ``accelerator.save_state`` checkpoints named ``checkpoint-<step>`` in ``output_dir``, owned by one run.

    Every process writes into a hidden ``.checkpoint-<step>.tmp`` folder; once all have finished, the main process
    renames it to ``checkpoint-<step>`` (a rename is atomic on one file system). A crash mid-save leaves only a hidden
    temporary folder, which :meth:`latest` never returns and the next run deletes. Each checkpoint holds the run's
    record (:data:`RUN_FILE`) and the state of the ``states`` objects in safetensors + JSON (not accelerate's pickled
    ``custom_checkpoint_*.pkl``).

    Args:
        output_dir (`str` or `os.PathLike`): the run's output folder.
        total_limit (`int`, *optional*): keep at most this many checkpoints (the oldest are deleted first).
        fingerprint (`dict`, *optional*): the run's :func:`run_fingerprint`, written with every checkpoint and
            checked by :meth:`claim`.
        states (`Mapping[str, object]`, *optional*): objects with ``state_dict`` / ``load_state_dict`` (the
            callbacks, the EMA) saved and restored under these names; the main process's state is saved.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        total_limit: int | None = None,
        fingerprint: Mapping[str, Any] | None = None,
        states: Mapping[str, Any] | None = None,
    ):
        if total_limit is not None and total_limit < 1:
            raise ValueError(f"checkpoints_total_limit must be >= 1, got {total_limit}.")
        self.output_dir = Path(output_dir)
        self.total_limit = total_limit
        self.fingerprint = None if fingerprint is None else dict(fingerprint)
        self.states = dict(states or {})

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

    def claim(self, accelerator, resume_from_checkpoint: str | None = None, overwrite: bool = False) -> Path | None:
        """Make ``output_dir`` this run's and return the checkpoint to resume from (`None`: start afresh).

        Refused, before any training, with a message that says what to do: a new run (no ``resume_from_checkpoint``)
        in a folder that holds checkpoints, a saved pipeline or the record of a run with another fingerprint; a
        resume from a checkpoint whose record differs from this run's fingerprint (the message lists the settings
        that differ) or has no record; ``"latest"`` in a folder that holds a finished pipeline and no checkpoint.
        With ``overwrite``, the folder's checkpoints, record and pipeline index (``model_index.json``) are deleted
        first, so no file of the older run can pass for this one's. Then the main process writes this run's record.
        Call on every process.
        """
        self.remove_unfinished(accelerator)
        if overwrite:
            if accelerator.is_main_process:
                self._forget_other_run()
            accelerator.wait_for_everyone()
        checkpoint = None if resume_from_checkpoint is None else self.resolve(resume_from_checkpoint)
        if checkpoint is not None:
            self._check_record(checkpoint / RUN_FILE, f"{checkpoint.name} was written by")
        else:
            self._check_free(resumed=resume_from_checkpoint is not None)
        accelerator.wait_for_everyone()  # every process has checked before the record is (re)written
        if accelerator.is_main_process and self.fingerprint is not None:
            self._write_record(self.output_dir)
        accelerator.wait_for_everyone()
        return checkpoint

    def _check_free(self, resumed: bool) -> None:
        """A fresh start: the folder may hold nothing of another run."""
        advice = "start the run in a new --output_dir, or pass --overwrite_output_dir to delete them and start afresh"
        found = [path.name for path in self.checkpoints()]
        if found and not resumed:
            raise FileExistsError(
                f"{self.output_dir} holds checkpoints of a run ({', '.join(found)}): resume it with "
                f"--resume_from_checkpoint latest (same settings), {advice}."
            )
        if (self.output_dir / "model_index.json").is_file():
            raise FileExistsError(
                f"{self.output_dir} holds a saved pipeline (model_index.json), the result of a finished run; {advice}."
            )
        if (self.output_dir / RUN_FILE).is_file():
            self._check_record(self.output_dir / RUN_FILE, f"{self.output_dir} was started by")

    def _check_record(self, path: Path, owner: str) -> None:
        """Raise unless the record at ``path`` has this run's fingerprint, listing what differs."""
        if self.fingerprint is None:
            return
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint was not written by this training loop (or by an older version), "
                "so it cannot be told apart from another run's. Start the run in a new --output_dir, or pass "
                "--overwrite_output_dir to delete the folder's checkpoints and start afresh."
            )
        try:
            saved = json.loads(path.read_text())["fingerprint"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path} is not a run record of diffusers-hold ({error}).") from error
        if saved == self.fingerprint:
            return
        names = sorted(set(saved) | set(self.fingerprint))
        differences = [
            f"{name} {saved.get(name, '(unset)')!r} there, {self.fingerprint.get(name, '(unset)')!r} now"
            for name in names
            if saved.get(name, "(unset)") != self.fingerprint.get(name, "(unset)")
        ]
        raise ValueError(
            f"{owner} a run with other settings: {'; '.join(differences)}. Resume with the same settings, start "
            "this run in a new --output_dir, or pass --overwrite_output_dir to delete the folder's checkpoints and "
            "start afresh."
        )

    def _forget_other_run(self) -> None:
        """Delete what makes the folder another run's: its checkpoints, record and pipeline index."""
        for path in self.checkpoints():
            shutil.rmtree(path)
        for name in (RUN_FILE, "model_index.json"):
            (self.output_dir / name).unlink(missing_ok=True)

    def _write_record(self, folder: Path) -> None:
        with atomic_output(folder / RUN_FILE) as temporary:
            temporary.write_text(json.dumps({"fingerprint": self.fingerprint}, indent=2, sort_keys=True) + "\n")

    def save(self, accelerator, step: int, noise_generator: NoiseGenerator | None = None) -> Path:
        """Write ``checkpoint-<step>`` with the accelerator's state (models, optimizers, schedulers, RNGs), the run's
        record and state objects, and each process's noise generator; prune to the total limit. Call on every
        process."""
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
        if accelerator.is_main_process:
            for name, obj in self.states.items():
                save_state_files(obj.state_dict(), staging, name)
            if self.fingerprint is not None:
                self._write_record(staging)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            replace_path(staging, final)  # the same step saved again (e.g. the final step after a resume) replaces it
            if self.total_limit is not None:
                for old in self.checkpoints()[: -self.total_limit]:
                    shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final

    def load(self, accelerator, checkpoint: Path, noise_generator: NoiseGenerator | None = None) -> int:
        """Restore ``checkpoint`` into the accelerator, the state objects and the noise generator; returns its global
        step."""
        try:
            accelerator.load_state(str(checkpoint))
            for name, obj in self.states.items():
                obj.load_state_dict(load_state_files(checkpoint, name))
            if noise_generator is not None:
                noise_generator.load(checkpoint)
        except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError, SafetensorError) as error:
            # accelerate's own errors (EOFError, "Errno 22") name no file; say which checkpoint, and what is left
            earlier = [str(path) for path in self.checkpoints() if self.step_of(path) < self.step_of(checkpoint)]
            offer = (
                f" Resume from the newest earlier one with --resume_from_checkpoint {earlier[-1]}."
                if earlier
                else " There is no earlier checkpoint."
            )
            raise RuntimeError(f"Cannot resume from {checkpoint} ({type(error).__name__}: {error}).{offer}") from error
        return self.step_of(checkpoint)
