"""Checkpoints: state files without pickle, and run ownership of output folders (a real single-process Accelerator)."""

import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel

from diffusers_hold.checkpoints import (
    RUN_FILE,
    CheckpointManager,
    NoiseGenerator,
    load_state_files,
    run_fingerprint,
    save_state_files,
)
from diffusers_hold.mitigations import (
    AntiGradientControl,
    CallbackList,
    TimestepSamplingCallback,
    UniformTimestepSampler,
)
from diffusers_hold.testing import tiny_unet_2d
from diffusers_hold.training_config import TrainingConfig


def test_state_files_round_trip_nested_state_exactly_and_refuse_what_needs_pickle(tmp_path):
    generator = torch.Generator().manual_seed(3)
    state = {
        "generator": generator.get_state(),
        "bank": torch.arange(6, dtype=torch.float64).reshape(2, 3) / 7,
        "shards": [[0, 3, 5], [1, 2]],
        "heads": [["down.attn1", 0], ["mid.attn1", 1]],
        "nested": {"round": 2, "ratio": 0.25, "flag": True, "none": None, "params": [torch.ones(2), torch.zeros(1)]},
    }
    save_state_files(state, tmp_path, "callbacks")
    loaded = load_state_files(tmp_path, "callbacks")
    assert loaded["shards"] == state["shards"] and loaded["heads"] == state["heads"]
    assert {k: v for k, v in loaded["nested"].items() if k != "params"} == {"round": 2, "ratio": 0.25, "flag": True,
                                                                          "none": None}  # fmt: skip
    for got, want in [(loaded["generator"], state["generator"]), (loaded["bank"], state["bank"]),
                      *zip(loaded["nested"]["params"], state["nested"]["params"], strict=True)]:  # fmt: skip
        assert got.dtype == want.dtype and torch.equal(got, want)
    json.loads((tmp_path / "callbacks.json").read_text())  # plain JSON: nothing to unpickle
    with pytest.raises(TypeError, match=r"callbacks\.shards\[0\]: cannot store a ndarray without pickle"):
        save_state_files({"shards": [np.arange(3)]}, tmp_path, "callbacks")
    (tmp_path / "callbacks.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"callbacks\.safetensors"):
        load_state_files(tmp_path, "callbacks")


def test_callbacks_and_ema_resume_from_their_state_files(tmp_path):
    """The run's own state objects round-trip through a real checkpoint, and the checkpoint holds no pickle of them."""
    accelerator = Accelerator(cpu=True)
    model = tiny_unet_2d(1, 1)
    ema = EMAModel(model.parameters(), decay=0.9)
    scheduler_steps = 100
    callbacks = CallbackList([
        TimestepSamplingCallback(UniformTimestepSampler(_ddpm(scheduler_steps)), seed=1),
        AntiGradientControl(scheduler_steps, num_bins=10),
    ])  # fmt: skip
    callbacks.callbacks[1].bank = torch.linspace(0.1, 1.0, 10, dtype=torch.float64)
    for parameter in model.parameters():
        parameter.data.add_(0.5)
    ema.step(model.parameters())
    manager = CheckpointManager(tmp_path, states={"callbacks": callbacks, "ema": ema})
    checkpoint = manager.save(accelerator, 3, NoiseGenerator(0))
    files = {path.name for path in checkpoint.iterdir()}
    assert {"callbacks.json", "callbacks.safetensors", "ema.json", "ema.safetensors"} <= files
    assert not list(checkpoint.glob("custom_checkpoint_*"))
    fresh_callbacks = CallbackList([
        TimestepSamplingCallback(UniformTimestepSampler(_ddpm(scheduler_steps)), seed=9),
        AntiGradientControl(scheduler_steps, num_bins=10),
    ])  # fmt: skip
    fresh_ema = EMAModel(tiny_unet_2d(1, 1, seed=5).parameters(), decay=0.9)
    restored = CheckpointManager(tmp_path, states={"callbacks": fresh_callbacks, "ema": fresh_ema})
    assert restored.load(accelerator, checkpoint, NoiseGenerator(0)) == 3
    assert torch.equal(fresh_callbacks.callbacks[1].bank, callbacks.callbacks[1].bank)
    sampler, fresh_sampler = callbacks.callbacks[0], fresh_callbacks.callbacks[0]
    assert torch.equal(fresh_sampler.generator.get_state(), sampler.generator.get_state())
    assert fresh_ema.optimization_step == ema.optimization_step == 1
    for got, want in zip(fresh_ema.shadow_params, ema.shadow_params, strict=True):
        assert torch.equal(got, want)


def _ddpm(steps):
    return DDPMScheduler(num_train_timesteps=steps)


def _fingerprint(**settings):
    return run_fingerprint({**vars(TrainingConfig(output_dir="out", **settings)), "num_channels": 1})


def test_a_folder_belongs_to_the_run_that_wrote_it(tmp_path):
    accelerator = Accelerator(cpu=True)
    first = CheckpointManager(tmp_path, fingerprint=_fingerprint(hold_order=2))
    assert first.claim(accelerator) is None  # a fresh folder
    assert json.loads((tmp_path / RUN_FILE).read_text())["fingerprint"]["hold_order"] == 2
    written = first.save(accelerator, 4)
    assert json.loads((written / RUN_FILE).read_text()) == json.loads((tmp_path / RUN_FILE).read_text())
    # the run-control settings may change on resume; the same run resumes its own checkpoint
    again = CheckpointManager(tmp_path, fingerprint=_fingerprint(hold_order=2, max_train_steps=50, report_to="none"))
    assert again.claim(accelerator, "latest") == written

    other = CheckpointManager(tmp_path, fingerprint=_fingerprint(hold_order=3, seed=1))
    with pytest.raises(FileExistsError, match=r"holds checkpoints of a run \(checkpoint-4\): resume it with "):
        other.claim(accelerator)  # a new run would overwrite checkpoint-4 and later resume it as its own
    with pytest.raises(ValueError, match=r"checkpoint-4 was written by a run with other settings: hold_order 2 there, "
                                         r"3 now; seed 0 there, 1 now\. .*--overwrite_output_dir"):  # fmt: skip
        other.claim(accelerator, "latest")
    (written / RUN_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"run\.json is missing: the checkpoint was not written by this"):
        again.claim(accelerator, "latest")

    # a finished pipeline and no checkpoint: not something to resume, nor a free folder
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "model_index.json").write_text("{}")
    for resume in (None, "latest"):
        with pytest.raises(FileExistsError, match="holds a saved pipeline"):
            CheckpointManager(finished, fingerprint=_fingerprint()).claim(accelerator, resume)

    # --overwrite_output_dir: the older run's checkpoints, record and pipeline index go, the new run's record stays
    assert other.claim(accelerator, "latest", overwrite=True) is None
    assert not other.checkpoints() and json.loads((tmp_path / RUN_FILE).read_text())["fingerprint"]["seed"] == 1
    assert CheckpointManager(finished, fingerprint=_fingerprint()).claim(accelerator, overwrite=True) is None
    assert not (finished / "model_index.json").exists()
    # a run killed before its first checkpoint left only its record: the same run may start again, another may not
    with pytest.raises(ValueError, match="was started by a run with other settings: seed 1 there, 0 now"):
        CheckpointManager(tmp_path, fingerprint=_fingerprint(hold_order=3)).claim(accelerator)
    assert other.claim(accelerator) is None


def test_a_missing_noise_generator_file_says_why(tmp_path):
    """A deleted file of a one-process checkpoint used to be blamed on "fewer processes"."""
    for rank in (0, 1):
        NoiseGenerator(0, rank).save(tmp_path)
    (tmp_path / "noise_generator_0.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="_0.safetensors is missing: the checkpoint is incomplete"):
        NoiseGenerator(0, 0).load(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds 1 process\\(es\\)' generators, so it was written by"):
        NoiseGenerator(0, 2).load(tmp_path)
    NoiseGenerator(0, 1).load(tmp_path)  # the remaining file still loads


def test_a_corrupt_checkpoint_is_named_and_the_earlier_one_offered(tmp_path):
    """accelerate's errors for a truncated file (EOFError, "Errno 22") used to name no file and offer nothing."""
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(tiny_unet_2d(1, 1))
    manager = CheckpointManager(tmp_path)
    first = manager.save(accelerator, 2, NoiseGenerator(0))
    latest = manager.save(accelerator, 4, NoiseGenerator(0))
    weights = next(latest.glob("model*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # a crash of the disk, not of the atomic save
    with pytest.raises(RuntimeError, match=f"Cannot resume from {latest} .*--resume_from_checkpoint {first}"):
        manager.load(accelerator, latest, NoiseGenerator(0))
    assert manager.load(accelerator, first, NoiseGenerator(0)) == 2
