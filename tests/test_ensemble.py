"""Iterative ensemble training: shards, data-size-weighted averaging, fresh optimizers, redistribution, exact resume
in a plain loop; then end to end through the unconditional training script (one and two processes, resume)."""

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate_launch import ROOT, run_script
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from diffusers_hold.checkpoints import load_state_files, save_state_files
from diffusers_hold.data import write_digits_imagefolder
from diffusers_hold.mitigations import (
    CallbackList,
    IterativeEnsembleTraining,
    TimestepSamplingCallback,
    TrainingCallback,
    TrainingState,
    UniformTimestepSampler,
)
from diffusers_hold.objective import noisy_input_and_target, per_sample_mse
from diffusers_hold.testing import tiny_unet_2d

NUM_EXAMPLES, BATCH, UPDATES_PER_EPOCH = 10, 2, 2


pytestmark = pytest.mark.usefixtures("single_thread")


class Examples(torch.utils.data.Dataset):
    """Ten distinct 8x8 images; the item's id is its position."""

    images = torch.linspace(-1, 1, NUM_EXAMPLES)[:, None, None, None].expand(NUM_EXAMPLES, 1, 8, 8).contiguous()

    def __len__(self):
        return NUM_EXAMPLES

    def __getitem__(self, item):
        return {"pixel_values": self.images[item], "index": item}


class Recorder(TrainingCallback):
    """Records the weights at every update and the ids of every batch."""

    def __init__(self, name):
        self.recorder_name, self.weights, self.batches = name, [], []

    @property
    def name(self):
        return self.recorder_name

    def on_batch(self, batch, state):
        self.batches.append((state.global_step, batch["indices"].tolist()))
        return batch

    def on_step_end(self, state):
        self.weights.append({k: v.detach().clone() for k, v in state.model.state_dict().items()})


class DropIds(TrainingCallback):
    """A loss filter that drops the given ids (narrowing ``state.kept`` as the real filters do)."""

    def __init__(self, ids):
        self.ids, self.current = set(ids), None

    def on_batch(self, batch, state):
        self.current = batch["indices"].tolist()
        return batch

    def on_loss(self, per_sample_loss, state):
        keep = torch.tensor([i not in self.ids for i in self.current])
        state.kept = keep if state.kept is None else state.kept & keep
        return per_sample_loss


def make_run(seed=0, ensemble_kwargs=None, extra=()):
    torch.manual_seed(seed)
    model = tiny_unet_2d(1, 1, seed=seed)
    scheduler = DDPMScheduler(num_train_timesteps=100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMAModel(model.parameters(), decay=0.5)
    ensemble = IterativeEnsembleTraining(num_shards=3, num_rounds=2, local_epochs=1, ema=ema, seed=1,
                                         **(ensemble_kwargs or {}))  # fmt: skip
    dataset = ensemble.shard_dataset(Examples())
    before, after = Recorder("before"), Recorder("after")
    sampler = TimestepSamplingCallback(UniformTimestepSampler(scheduler), seed=seed)
    callbacks = CallbackList([sampler, *extra, before, ensemble, after])
    state = TrainingState(scheduler, model, optimizer=optimizer, updates_per_epoch=UPDATES_PER_EPOCH)
    return {"model": model, "optimizer": optimizer, "ema": ema, "ensemble": ensemble, "dataset": dataset,
            "callbacks": callbacks, "state": state, "before": before, "after": after}  # fmt: skip


def run_updates(run, updates):
    """A loop over the sharded dataset: epoch e draws its batches from a permutation seeded by e."""
    state, dataset = run["state"], run["dataset"]
    for _ in range(updates):
        epoch, within = divmod(state.global_step, UPDATES_PER_EPOCH)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(epoch))
        items = [dataset[int(i)] for i in order[within * BATCH : (within + 1) * BATCH]]
        batch = {"pixel_values": torch.stack([x["pixel_values"] for x in items]),
                 "indices": torch.tensor([x["index"] for x in items])}  # fmt: skip
        batch = run["callbacks"].on_batch(batch, state)
        timesteps, _ = run["callbacks"].sample_timesteps(BATCH, state)
        generator = torch.Generator().manual_seed(1000 + state.global_step)
        noisy, target = noisy_input_and_target(state.noise_scheduler, batch["pixel_values"], timesteps, generator)
        output = state.model(noisy, timesteps).sample
        loss = run["callbacks"].on_loss(per_sample_mse(output, target), state)
        run["optimizer"].zero_grad()
        loss.backward()
        run["optimizer"].step()
        run["ema"].step(state.model.parameters())
        state.global_step += 1
        run["callbacks"].on_step_end(state)


def test_shards_partition_the_data_and_each_phase_trains_on_its_shard_alone():
    run = make_run()
    shards = run["ensemble"].shards
    assert sorted(np.concatenate(shards).tolist()) == list(range(NUM_EXAMPLES))
    assert sorted(len(s) for s in shards) == [3, 3, 4]
    assert len(run["dataset"]) == 4 and run["ensemble"].num_epochs == 6
    run_updates(run, 6 * UPDATES_PER_EPOCH)
    for step, ids in run["before"].batches:
        phase = step // UPDATES_PER_EPOCH
        assert set(ids) <= set(shards[phase % 3].tolist())
    assert run["ensemble"].round == 2 and run["ensemble"].shard == 0
    with pytest.raises(ValueError, match="ran past the ensemble's 2 rounds"):
        run_updates(run, UPDATES_PER_EPOCH)


def test_global_weights_are_the_data_size_weighted_average_and_every_shard_starts_from_them():
    run = make_run()
    initial = {k: v.clone() for k, v in run["model"].state_dict().items()}
    initial_ema = [p.clone() for p in run["ema"].shadow_params]
    sizes = [len(s) for s in run["ensemble"].shards]
    shard_ema = []

    class EMARecorder(TrainingCallback):
        def on_step_end(self, state):
            shard_ema.append([p.clone() for p in run["ema"].shadow_params])

    run["callbacks"].callbacks.insert(1, EMARecorder())
    optimizer_states = []

    class OptimizerStateProbe(TrainingCallback):
        def on_batch(self, batch, state):
            optimizer_states.append(len(state.optimizer.state))
            return batch

    run["callbacks"].callbacks.insert(1, OptimizerStateProbe())
    run_updates(run, 6 * UPDATES_PER_EPOCH)
    ends = [UPDATES_PER_EPOCH * (phase + 1) - 1 for phase in range(6)]  # the last update of each phase
    before, after = run["before"].weights, run["after"].weights
    # within round 0 every shard starts from the initial weights: the state after each phase end is the start
    for end in ends[:2]:
        for key, value in initial.items():
            torch.testing.assert_close(after[end][key], value, rtol=0, atol=0)
    for round_index in range(2):
        shard_weights = [before[e] for e in ends[3 * round_index : 3 * round_index + 3]]
        expected = {
            key: (sum(n * w[key].double() for n, w in zip(sizes, shard_weights, strict=True)) / sum(sizes)).float()
            for key in initial
        }
        for key, value in expected.items():
            torch.testing.assert_close(after[ends[3 * round_index + 2]][key], value, rtol=1e-6, atol=1e-7)
        if round_index == 0:  # round 1's shards start from round 0's average
            for key, value in expected.items():
                torch.testing.assert_close(after[ends[3]][key], value, rtol=1e-6, atol=1e-7)
    # the averaged model is not any shard's: averaging did something
    assert not torch.equal(after[-1]["conv_in.weight"], before[-1]["conv_in.weight"])
    # the EMA is averaged the same way: after the last round it holds the weighted mean of round 1's shard EMAs
    shard_emas = [shard_ema[e] for e in ends[3:]]
    for i, shadow in enumerate(run["ema"].shadow_params):
        mean = sum(n * e[i].double() for n, e in zip(sizes, shard_emas, strict=True)) / sum(sizes)
        torch.testing.assert_close(shadow, mean.float(), rtol=1e-6, atol=1e-7)
        assert not torch.equal(shadow, initial_ema[i])
    # the first update of every phase finds a fresh optimizer (its moments of the previous shard cleared)
    assert [optimizer_states[UPDATES_PER_EPOCH * p] for p in range(6)] == [0] * 6
    assert all(n > 0 for i, n in enumerate(optimizer_states) if i % UPDATES_PER_EPOCH)


def test_frozen_weights_are_neither_averaged_nor_stored():
    run = make_run()
    frozen = run["model"].conv_in.weight
    frozen.requires_grad_(False)  # as the base weights of a LoRA run
    with torch.no_grad():
        frozen.add_(1.0)  # a value no average of trained shard weights would give back
    expected = frozen.clone()
    run_updates(run, 3 * UPDATES_PER_EPOCH)  # one round
    ensemble = run["ensemble"]
    assert "conv_in.weight" not in ensemble.global_weights and "conv_in.bias" in ensemble.global_weights
    torch.testing.assert_close(run["model"].conv_in.weight, expected, rtol=0, atol=0)
    trainable = {name for name, p in run["model"].named_parameters() if p.requires_grad}
    assert set(ensemble.global_weights) == trainable | {name for name, _ in run["model"].named_buffers()}


def test_resume_mid_round_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    straight = make_run()
    run_updates(straight, 9)
    first = make_run()
    run_updates(first, 3)  # round 0, in shard 1
    buffer = io.BytesIO()
    torch.save({"model": first["model"].state_dict(), "optimizer": first["optimizer"].state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    # the ensemble's and the EMA's state as the training checkpoints store them: safetensors + JSON, no pickle
    save_state_files(first["ema"].state_dict(), tmp_path, "ema")
    save_state_files(first["callbacks"].state_dict(), tmp_path, "callbacks")
    saved.update(ema=load_state_files(tmp_path, "ema"), callbacks=load_state_files(tmp_path, "callbacks"))
    resumed = make_run(seed=5)  # other initial weights and timestep seed: everything must come from the state
    resumed["model"].load_state_dict(saved["model"])
    resumed["optimizer"].load_state_dict(saved["optimizer"])
    resumed["ema"].load_state_dict(saved["ema"])
    resumed["callbacks"].load_state_dict(saved["callbacks"])
    resumed["state"].global_step = 3
    run_updates(resumed, 6)
    for key, value in straight["model"].state_dict().items():
        torch.testing.assert_close(resumed["model"].state_dict()[key], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="saved ensemble state has 3 shards"):
        IterativeEnsembleTraining(num_shards=2).load_state_dict(saved["callbacks"]["callbacks"][2]["state"])


def test_redistribution_moves_the_most_skipped_samples_to_the_next_shard():
    probe = make_run()
    shards = [s.copy() for s in probe["ensemble"].shards]
    # drop one sample of each shard whenever it is seen: each is that shard's most-skipped sample
    dropped = [int(shard[0]) for shard in shards]
    run = make_run(ensemble_kwargs={"redistribute_fraction": 0.34}, extra=[DropIds(dropped)])
    run_updates(run, 3 * UPDATES_PER_EPOCH)  # round 0
    seen = {i for _, ids in run["before"].batches for i in ids}
    moved = [d for d in dropped if d in seen]  # a sample skipped at least once
    assert moved
    new = run["ensemble"].shards
    assert [len(s) for s in new] == [len(s) for s in shards]
    assert sorted(np.concatenate(new).tolist()) == list(range(NUM_EXAMPLES))
    for k, shard in enumerate(shards):
        if int(shard[0]) in moved:
            assert int(shard[0]) in new[(k + 1) % 3] and int(shard[0]) not in new[k]
    assert run["state"].logs.get("ensemble_moved") == len(moved)


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="num_shards must be a positive integer"):
        IterativeEnsembleTraining(num_shards=0)
    with pytest.raises(ValueError, match="redistribute_fraction"):
        IterativeEnsembleTraining(redistribute_fraction=1.0)
    with pytest.raises(ValueError, match="needs num_shards >= 2"):
        IterativeEnsembleTraining(num_shards=1, redistribute_fraction=0.1)
    with pytest.raises(ValueError, match="3 examples cannot fill 4 shards"):
        IterativeEnsembleTraining(num_shards=4).make_shards(3)
    ensemble = IterativeEnsembleTraining(num_shards=2)
    with pytest.raises(ValueError, match="no shards"):
        ensemble.on_batch({}, TrainingState(DDPMScheduler(), torch.nn.Linear(1, 1)))
    ensemble.make_shards(4)
    with pytest.raises(ValueError, match="updates_per_epoch"):
        ensemble.on_step_end(TrainingState(DDPMScheduler(), torch.nn.Linear(1, 1), global_step=1))


SCRIPT = ROOT / "training" / "train_unconditional_hold.py"
SMALL = ["--resolution", "16", "--num_channels", "1", "--block_out_channels", "8", "16", "--train_batch_size", "8"]
# 32 digits in 2 shards of 16: 2 updates an epoch, 2 rounds -> 8 updates
IET = ["--ensemble_shards", "2", "--ensemble_rounds", "2", "--report_to", "none", "--checkpointing_steps", "3"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits_imagefolder(tmp_path_factory.mktemp("data") / "digits", limit=32)


def test_training_script_runs_iet_and_resumes_mid_round(digits, tmp_path):
    straight = tmp_path / "straight"
    log = run_script(SCRIPT, [*SMALL, *IET, "--train_data_dir", digits, "--output_dir", straight, "--use_ema"])
    assert "8 updates" in log and (straight / "checkpoint-6").exists()
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")  # round 0, shard 1, one update in
    log = run_script(SCRIPT, [*SMALL, *IET, "--train_data_dir", digits, "--output_dir", resumed, "--use_ema",
                              "--resume_from_checkpoint", "latest"])  # fmt: skip
    assert "Resumed from" in log
    expected, got = load_weights(straight), load_weights(resumed)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0)


def test_training_script_iet_agc_redistribution_on_two_processes(digits, tmp_path):
    out = tmp_path / "ddp"
    log = run_script(
        SCRIPT,
        [*SMALL, *IET, "--train_data_dir", digits, "--output_dir", out, "--anti_gradient_control",
         "--ensemble_redistribute", "0.25", "--train_batch_size", "4"],
        num_processes=2,
    )  # fmt: skip
    assert "weights agree across 2 processes" in log and "callback states agree" in log
    with pytest.raises(AssertionError, match="drop --max_train_steps"):
        run_script(SCRIPT, [*SMALL, *IET, "--train_data_dir", digits, "--output_dir", out, "--max_train_steps", "3"])
    with pytest.raises(AssertionError, match="add --anti_gradient_control"):
        run_script(SCRIPT, [*SMALL, *IET, "--train_data_dir", digits, "--output_dir", out,
                            "--ensemble_redistribute", "0.25"])  # fmt: skip


def load_weights(folder):
    return load_file(Path(folder) / "unet" / "diffusion_pytorch_model.safetensors")
