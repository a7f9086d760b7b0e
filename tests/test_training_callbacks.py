"""Training callbacks: hook order in a tiny real loop, composition rules, weights, and resume through accelerate."""

import argparse
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DModel

from diffusers_hold import HOLDScheduler, HOLDUNet2DModel
from diffusers_hold.mitigations import (
    CallbackList,
    SNRIntervalTimestepSampler,
    TimestepSamplingCallback,
    TrainingCallback,
    TrainingState,
    UniformTimestepSampler,
    get_timestep_sampler,
    training_step,
)
from diffusers_hold.objective import per_sample_mse
from diffusers_hold.training_config import TrainingConfig, add_training_arguments
from diffusers_hold.training_loop import make_accelerator
from diffusers_hold.training_utils import build_timestep_sampler

BATCH = 4
TINY_UNET = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (4, 8),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 2,
}


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_setup(kind: str):
    torch.manual_seed(0)
    if kind == "ddpm":
        return UNet2DModel(**TINY_UNET), DDPMScheduler(num_train_timesteps=1000)
    return HOLDUNet2DModel(**TINY_UNET, hold_order=2), HOLDScheduler(order=2)


def images(step: int) -> torch.Tensor:
    return torch.randn(BATCH, 1, 8, 8, generator=torch.Generator().manual_seed(1000 + step)).clamp(-1, 1)


def train(callbacks, state, optimizer, steps, record=None):
    """The documented loop: on_batch -> sample_timesteps -> forward -> per-sample MSE -> on_loss -> backward ->
    on_step_end. Returns the timesteps and losses of every step."""
    scheduler, model = state.noise_scheduler, state.model
    history = []
    for _ in range(steps):
        batch = callbacks.on_batch({"pixel_values": images(state.global_step)}, state)
        clean = batch["pixel_values"]
        timesteps, _ = callbacks.sample_timesteps(len(clean), state)
        if isinstance(scheduler, HOLDScheduler):
            noise = torch.randn(len(clean), scheduler.config.order * clean.shape[1], *clean.shape[2:])
            target = scheduler.get_target(noise)
        else:
            noise = target = torch.randn_like(clean)
        model_output = model(scheduler.add_noise(clean, noise, timesteps), timesteps).sample
        loss = callbacks.on_loss(per_sample_mse(model_output, target), state)
        if record is not None:
            record.append("backward")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        state.global_step += 1
        callbacks.on_step_end(state)
        history.append((timesteps.clone(), loss.item(), dict(state.logs)))
        state.logs.clear()
    return history


class RecordingCallback(TrainingCallback):
    """Appends the hooks it sees to a shared record and marks the batch it edited."""

    def __init__(self, label, record):
        self.label, self.record = label, record

    @property
    def name(self):
        return f"recording-{self.label}"

    def on_batch(self, batch, state):
        self.record.append(f"{self.label}.on_batch")
        return {**batch, "edited_by": [*batch.get("edited_by", []), self.label]}

    def on_loss(self, per_sample_loss, state):
        self.record.append(f"{self.label}.on_loss")
        assert per_sample_loss.shape == (BATCH,) and state.timesteps.shape == (BATCH,)
        return per_sample_loss

    def on_step_end(self, state):
        self.record.append((f"{self.label}.on_step_end", state.global_step))


class RecordingSampling(TimestepSamplingCallback):
    def __init__(self, sampler, record, seed=0):
        super().__init__(sampler, seed=seed)
        self.record = record

    def sample_timesteps(self, batch_size, state):
        self.record.append("sample_timesteps")
        return super().sample_timesteps(batch_size, state)


class StepCounter(TrainingCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, state):
        self.steps += 1
        state.logs["counted_steps"] = self.steps

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state_dict):
        self.steps = state_dict["steps"]


class Doubler(TrainingCallback):
    def on_loss(self, per_sample_loss, state):
        return 2 * per_sample_loss


class MeanLoss(TrainingCallback):
    def on_loss(self, per_sample_loss, state):
        return per_sample_loss.mean()


@pytest.mark.parametrize("kind", ["ddpm", "hold"])
def test_hooks_run_in_the_documented_order_in_a_real_loop(kind):
    model, scheduler = tiny_setup(kind)
    record = []
    model.register_forward_pre_hook(lambda module, args: record.append("forward"))
    first, second = RecordingCallback("A", record), RecordingCallback("B", record)
    sampler = SNRIntervalTimestepSampler(scheduler, 0.1, 0.5)
    counter = StepCounter()
    callbacks = CallbackList([first, RecordingSampling(sampler, record), second, counter])
    state = TrainingState(noise_scheduler=scheduler, model=model)
    before = [p.detach().clone() for p in model.parameters()]
    history = train(callbacks, state, torch.optim.SGD(model.parameters(), lr=0.1), steps=3, record=record)

    per_step = ["A.on_batch", "B.on_batch", "sample_timesteps", "forward", "A.on_loss", "B.on_loss", "backward"]
    # on_step_end sees the incremented global_step
    expected = [entry for step in (1, 2, 3) for entry in [*per_step, ("A.on_step_end", step), ("B.on_step_end", step)]]
    assert record == expected
    assert [logs["counted_steps"] for _, _, logs in history] == [1, 2, 3] and state.logs == {}
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss, _ in history)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    timesteps = history[0][0]
    assert timesteps.dtype == (torch.int64 if kind == "ddpm" else torch.float32)
    assert torch.equal(state.timesteps, history[-1][0])


def test_batch_edits_are_chained_in_order():
    record = []
    callbacks = CallbackList([RecordingCallback("A", record), RecordingCallback("B", record)])
    model, scheduler = tiny_setup("ddpm")
    batch = callbacks.on_batch({"pixel_values": images(0)}, TrainingState(scheduler, model))
    assert batch["edited_by"] == ["A", "B"]


def test_two_timestep_suppliers_raise():
    _, scheduler = tiny_setup("ddpm")
    first = TimestepSamplingCallback(UniformTimestepSampler(scheduler))
    second = TimestepSamplingCallback(SNRIntervalTimestepSampler(scheduler, 0.1, 0.3))
    with pytest.raises(ValueError, match="At most one callback may supply timesteps"):
        CallbackList([first, StepCounter(), second])


def test_without_a_supplier_timesteps_are_uniform_on_the_global_rng():
    model, scheduler = tiny_setup("ddpm")
    state = TrainingState(scheduler, model)
    torch.manual_seed(7)
    timesteps, weights = CallbackList([StepCounter()]).sample_timesteps(BATCH, state)
    torch.manual_seed(7)
    assert torch.equal(timesteps, torch.randint(0, 1000, (BATCH,)))
    assert torch.equal(weights, torch.ones(BATCH)) and state.timestep_weights is weights


@pytest.mark.parametrize("kind", ["ddpm", "hold"])
def test_importance_weights_reach_the_loss(kind):
    model, scheduler = tiny_setup(kind)
    sampler = SNRIntervalTimestepSampler(scheduler, 0.05, 0.3, uniform_mixture=0.2, importance_weights=True)
    callbacks = CallbackList([TimestepSamplingCallback(sampler, seed=0), Doubler()])
    state = TrainingState(scheduler, model)
    timesteps, weights = callbacks.sample_timesteps(BATCH, state)
    expected_timesteps, expected_weights = sampler.sample(BATCH, generator=torch.Generator().manual_seed(0))
    assert torch.equal(timesteps, expected_timesteps) and torch.equal(weights, expected_weights)
    assert not torch.allclose(weights, torch.ones(BATCH))
    per_sample_loss = torch.rand(BATCH)
    loss = callbacks.on_loss(per_sample_loss, state)
    torch.testing.assert_close(loss, (2 * per_sample_loss * weights).mean())


def test_a_scalar_loss_is_refused_when_weights_would_be_lost_and_accepted_otherwise():
    model, scheduler = tiny_setup("ddpm")
    weighted = SNRIntervalTimestepSampler(scheduler, 0.05, 0.3, uniform_mixture=0.2, importance_weights=True)
    callbacks = CallbackList([TimestepSamplingCallback(weighted, seed=0), MeanLoss()])
    state = TrainingState(scheduler, model)
    callbacks.sample_timesteps(BATCH, state)
    with pytest.raises(ValueError, match="importance weights"):
        callbacks.on_loss(torch.rand(BATCH), state)
    unweighted = CallbackList([MeanLoss(), Doubler()])
    unweighted.sample_timesteps(BATCH, state)
    per_sample_loss = torch.rand(BATCH)
    torch.testing.assert_close(unweighted.on_loss(per_sample_loss, state), 2 * per_sample_loss.mean())


def test_bad_hook_results_raise():
    model, scheduler = tiny_setup("ddpm")
    state = TrainingState(scheduler, model)

    class WrongShape(TrainingCallback):
        def on_loss(self, per_sample_loss, state):
            return per_sample_loss[:2]

    class NotABatch(TrainingCallback):
        def on_batch(self, batch, state):
            return [batch]

    with pytest.raises(ValueError, match="WrongShape.on_loss"):
        CallbackList([WrongShape()]).on_loss(torch.rand(BATCH), state)
    with pytest.raises(TypeError, match="NotABatch.on_batch"):
        CallbackList([NotABatch()]).on_batch({}, state)
    with pytest.raises(TypeError, match="TrainingCallback"):
        CallbackList([object()])
    with pytest.raises(ValueError, match="per-sample"):
        CallbackList().on_loss(torch.rand(BATCH, 2), state)
    with pytest.raises(ValueError, match="Shapes differ"):
        per_sample_mse(torch.rand(2, 3), torch.rand(2, 4))


def test_processes_take_slices_of_one_shared_draw():
    model, scheduler = tiny_setup("hold")
    sampler = SNRIntervalTimestepSampler(scheduler, 0.2, 0.6)
    whole, _ = sampler.sample(2 * BATCH, generator=torch.Generator().manual_seed(5))
    parts, states = [], []
    for rank in range(2):
        callback = TimestepSamplingCallback(sampler, seed=5)
        accelerator = SimpleNamespace(num_processes=2, process_index=rank, device=torch.device("cpu"))
        parts.append(callback.sample_timesteps(BATCH, TrainingState(scheduler, model, accelerator))[0])
        states.append(callback.state_dict()["generator_state"])
    assert torch.equal(torch.cat(parts), whole) and torch.equal(states[0], states[1])


def test_state_dicts_are_checked_on_load():
    _, scheduler = tiny_setup("ddpm")
    sampler = UniformTimestepSampler(scheduler)
    saved = CallbackList([TimestepSamplingCallback(sampler, seed=0), StepCounter()]).state_dict()
    with pytest.raises(ValueError, match="saved callback state is for callbacks"):
        CallbackList([StepCounter(), TimestepSamplingCallback(sampler, seed=0)]).load_state_dict(saved)
    with pytest.raises(ValueError, match="same `seed` setting"):
        CallbackList([TimestepSamplingCallback(sampler), StepCounter()]).load_state_dict(saved)
    with pytest.raises(ValueError, match="keeps no state"):
        Doubler().load_state_dict({"steps": 1})


@pytest.mark.parametrize("kind", ["ddpm", "hold"])
def test_resume_through_accelerate_repeats_the_uninterrupted_run(tmp_path, kind):
    def fresh_run():
        model, scheduler = tiny_setup(kind)
        sampler = SNRIntervalTimestepSampler(scheduler, 0.1, 0.6, tails="clip", importance_weights=True)
        counter = StepCounter()
        callbacks = CallbackList([TimestepSamplingCallback(sampler, seed=123), counter])
        accelerator = Accelerator(cpu=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        model, optimizer = accelerator.prepare(model, optimizer)
        accelerator.register_for_checkpointing(callbacks)
        return accelerator, TrainingState(scheduler, model, accelerator), callbacks, optimizer, counter

    accelerator, state, callbacks, optimizer, _ = fresh_run()
    torch.manual_seed(99)
    uninterrupted = train(callbacks, state, optimizer, steps=6)

    accelerator, state, callbacks, optimizer, _ = fresh_run()
    torch.manual_seed(99)
    first_half = train(callbacks, state, optimizer, steps=3)
    accelerator.save_state(str(tmp_path / "checkpoint"))

    accelerator, state, callbacks, optimizer, counter = fresh_run()
    torch.manual_seed(12345)  # load_state restores the RNG states saved with the checkpoint
    accelerator.load_state(str(tmp_path / "checkpoint"))
    assert counter.steps == 3
    state.global_step = 3
    second_half = train(callbacks, state, optimizer, steps=3)

    for (expected_t, expected_loss, expected_logs), (t, loss, logs) in zip(
        uninterrupted, first_half + second_half, strict=True
    ):
        assert torch.equal(t, expected_t) and loss == expected_loss and logs == expected_logs
    assert counter.steps == 6


class ConditioningRecorder(TrainingCallback):
    """Records the hooks training_step runs and scales the conditioning it is given."""

    def __init__(self, record):
        self.record = record

    def on_batch(self, batch, state):
        self.record.append("on_batch")
        return {**batch, "pixel_values": batch["pixel_values"] * 0.5}

    def on_conditioning(self, forward_kwargs, state):
        self.record.append(("on_conditioning", sorted(forward_kwargs)))
        return forward_kwargs

    def on_loss(self, per_sample_loss, state):
        self.record.append("on_loss")
        return per_sample_loss


@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_training_step_is_the_documented_step_written_out_by_hand(snr_gamma):
    model, scheduler = tiny_setup("ddpm")
    record = []
    weighted = SNRIntervalTimestepSampler(scheduler, c_low=0.1, c_high=0.5, importance_weights=True)
    callbacks = CallbackList([TimestepSamplingCallback(weighted, seed=3), ConditioningRecorder(record)])
    state = TrainingState(noise_scheduler=scheduler, model=model)
    seen = []

    def encode(batch, generator):
        seen.append(generator)
        return batch["pixel_values"], {}

    generator = torch.Generator().manual_seed(11)
    batch = {"pixel_values": images(0)}
    loss = training_step(batch, state, callbacks, encode, generator=generator, snr_gamma=snr_gamma)
    assert record == ["on_batch", ("on_conditioning", []), "on_loss"] and seen == [generator]

    # the same step by hand: the sampler's seeded draw, noise from a generator in the same state, DDPM noising,
    # float64 MSE per sample, min(SNR, gamma) / SNR from alphas_cumprod, the importance weights, the mean
    timesteps, weights = weighted.sample(BATCH, torch.Generator().manual_seed(3))
    noise = torch.randn(BATCH, 1, 8, 8, generator=torch.Generator().manual_seed(11))
    abar = scheduler.alphas_cumprod.double()[timesteps]
    clean = images(0) * 0.5
    noisy = (abar.sqrt()[:, None, None, None] * clean + (1 - abar).sqrt()[:, None, None, None] * noise).float()
    with torch.no_grad():
        output = model(noisy, timesteps).sample.double()
    expected = (output - noise.double()).square().flatten(1).mean(1)
    if snr_gamma is not None:
        snr = abar / (1 - abar)
        expected = expected * snr.clamp(max=snr_gamma) / snr
    expected = (expected * weights.double()).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    assert torch.equal(state.timesteps, timesteps) and torch.equal(state.timestep_weights, weights)
    torch.testing.assert_close(state.model_input, noisy, rtol=1e-5, atol=1e-6)
    assert loss.requires_grad  # the caller back-propagates it


def test_training_config_has_one_field_per_shared_flag_with_the_flags_defaults():
    parser = add_training_arguments(argparse.ArgumentParser())
    flags = {action.dest for action in parser._actions if action.dest != "help"}
    assert flags == {f.name for f in dataclasses.fields(TrainingConfig)}
    assert TrainingConfig.from_args(parser.parse_args(["--output_dir", "out"])) == TrainingConfig(output_dir="out")
    args = parser.parse_args(["--output_dir", "out", "--resolution", "16", "--use_ema", "--snr_gamma", "5"])
    args.num_channels = 1  # a script's own flag stays out of the config
    config = TrainingConfig.from_args(args)
    assert (config.resolution, config.use_ema, config.snr_gamma, config.train_batch_size) == (16, True, 5.0, 16)
    assert not hasattr(config, "num_channels")


def test_the_timestep_flags_build_the_sampler_they_name():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    cases = [
        ({}, get_timestep_sampler("uniform", scheduler)),
        ({"timestep_sampling": "logit_normal", "logit_normal_mean": 0.5, "logit_normal_std": 0.7},
         get_timestep_sampler("logit_normal", scheduler, mean=0.5, std=0.7)),
        ({"timestep_sampling": "snr_interval", "snr_interval_low": 0.1, "snr_interval_high": 0.4,
          "snr_interval_tails": "clip", "timestep_importance_weights": True, "timestep_uniform_mixture": 0.2},
         get_timestep_sampler("snr_interval", scheduler, c_low=0.1, c_high=0.4, tails="clip", importance_weights=True,
                              uniform_mixture=0.2)),
    ]  # fmt: skip
    for settings, reference in cases:
        sampler = build_timestep_sampler(TrainingConfig(output_dir="out", **settings), scheduler)
        assert type(sampler) is type(reference)
        drawn = sampler.sample(64, torch.Generator().manual_seed(0))
        expected = reference.sample(64, torch.Generator().manual_seed(0))
        assert all(torch.equal(a, b) for a, b in zip(drawn, expected, strict=True))
    with pytest.raises(ValueError, match="needs --snr_interval_low and --snr_interval_high"):
        build_timestep_sampler(TrainingConfig(output_dir="out", timestep_sampling="snr_interval"), scheduler)


@pytest.mark.parametrize(
    ("flag", "value"),
    [("max_train_steps", 0), ("gradient_accumulation_steps", 0), ("train_batch_size", -1), ("num_train_epochs", 1.5)],
)
def test_training_config_refuses_run_lengths_that_would_not_train(flag, value):
    """`--max_train_steps 0` used to save an untrained pipeline and exit 0; `--gradient_accumulation_steps 0` was a
    ZeroDivisionError deep in the loop."""
    with pytest.raises(ValueError, match=f"--{flag} must be a positive integer"):
        TrainingConfig(output_dir="out", **{flag: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 mixed precision is valid with a GPU")
def test_fp16_mixed_precision_on_a_cpu_is_refused_before_training(tmp_path):
    """accelerate would log fp16 and train in float32."""
    with pytest.raises(ValueError, match="--mixed_precision fp16 needs a GPU"):
        make_accelerator(TrainingConfig(output_dir=str(tmp_path), report_to="none", mixed_precision="fp16"))
