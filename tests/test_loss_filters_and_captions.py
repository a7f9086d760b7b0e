"""Anti-gradient control, the CFG-gap filter, caption randomisation and text-embedding noise, against their
definitions."""

import math
import random

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_hold import HOLDScheduler
from diffusers_hold.mitigations import (
    AntiGradientControl,
    CallbackList,
    CaptionRandomization,
    CFGGapFilter,
    TextEmbeddingNoise,
    TrainingState,
    mean_over_kept,
    randomize_caption,
)
from diffusers_hold.testing import tiny_stable_diffusion_pipeline


def state_for(scheduler, timesteps=None, weights=None):
    state = TrainingState(noise_scheduler=scheduler, model=torch.nn.Linear(1, 1))
    state.timesteps, state.timestep_weights = timesteps, weights
    return state


def test_mean_over_kept_averages_the_kept_samples_only():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    keep = torch.tensor([True, False, True, False])
    assert mean_over_kept(losses, keep).mean() == pytest.approx(2.0)
    assert mean_over_kept(losses, torch.zeros(4, dtype=torch.bool)).abs().sum() == 0


def test_agc_keep_rule_and_bank_follow_the_definition():
    """Three micro-batches against a plain-Python bank: keep iff mem_ratio * l >= bank[t] (bank before the update);
    then bank[t] <- 0.8 bank[t] + 0.2 mean(l at t)."""
    agc = AntiGradientControl(num_train_timesteps=10, mem_ratio=2.0, decay=0.8)
    bank, dropped = [0.0] * 10, 0
    batches = [
        ([1.0, 3.0, 0.5, 2.0], [2, 2, 5, 7]),
        ([0.1, 0.2, 4.0, 0.05], [2, 5, 7, 2]),
        ([1.0, 0.01, 0.3, 0.3], [7, 7, 2, 5]),
    ]
    for losses, steps in batches:
        expected_keep = [2.0 * loss >= bank[t] for loss, t in zip(losses, steps, strict=True)]
        state = state_for(DDPMScheduler(num_train_timesteps=10), torch.tensor(steps))
        out = agc.on_loss(torch.tensor(losses), state)
        kept = [loss for loss, k in zip(losses, expected_keep, strict=True) if k]
        assert out.mean().item() == pytest.approx(sum(kept) / len(kept) if kept else 0.0)
        assert [bool(v) for v in out != 0] == expected_keep
        dropped += expected_keep.count(False)
        for t in set(steps):
            values = [loss for loss, s in zip(losses, steps, strict=True) if s == t]
            bank[t] = 0.8 * bank[t] + 0.2 * sum(values) / len(values)
        torch.testing.assert_close(agc.bank, torch.tensor(bank, dtype=torch.float64))
    assert dropped >= 2  # the constructed losses exercise both branches of the rule
    state = state_for(DDPMScheduler(num_train_timesteps=10))
    agc.on_step_end(state)
    assert 0 < state.logs["agc_kept"] < 1


def test_agc_bins_continuous_hold_timesteps():
    scheduler = HOLDScheduler(order=3)
    agc = AntiGradientControl(scheduler.config.num_train_timesteps, num_bins=10)
    timesteps = torch.tensor([0.0, 99.9, 100.0, 555.5, 999.99, 1000.0])
    assert agc.bins(timesteps).tolist() == [0, 0, 1, 5, 9, 9]
    agc.on_loss(torch.tensor([1.0, 3.0, 2.0, 4.0, 5.0, 7.0]), state_for(scheduler, timesteps))
    expected = torch.zeros(10, dtype=torch.float64)
    expected[[0, 1, 5, 9]] = 0.2 * torch.tensor([2.0, 2.0, 4.0, 6.0], dtype=torch.float64)
    torch.testing.assert_close(agc.bank, expected)


def test_agc_state_round_trip_and_composition_with_importance_weights():
    agc = AntiGradientControl(10, num_bins=5)
    agc.on_loss(torch.tensor([1.0, 2.0]), state_for(DDPMScheduler(num_train_timesteps=10), torch.tensor([1, 8])))
    other = AntiGradientControl(10, num_bins=5)
    other.load_state_dict(agc.state_dict())
    assert torch.equal(other.bank, agc.bank)
    with pytest.raises(ValueError, match="bins"):
        AntiGradientControl(10).load_state_dict(agc.state_dict())
    # inside a CallbackList, importance weights still apply to the kept samples
    agc = AntiGradientControl(10, mem_ratio=1.0)
    agc.bank[3] = 10.0
    weights = torch.tensor([2.0, 0.5, 1.0])
    state = state_for(DDPMScheduler(num_train_timesteps=10), torch.tensor([3, 4, 5]), weights)
    loss = CallbackList([agc]).on_loss(torch.tensor([1.0, 2.0, 3.0]), state)
    assert loss.item() == pytest.approx((2.0 * 0.5 + 3.0 * 1.0) / 2)  # sample 0 dropped, mean over the two kept
    for kwargs in ({"mem_ratio": 0}, {"decay": 1.0}, {"num_bins": 0}):
        with pytest.raises(ValueError):
            AntiGradientControl(10, **kwargs)


def test_cfg_gap_filter_drops_the_samples_with_large_gaps():
    pipe = tiny_stable_diffusion_pipeline()
    unet = pipe.unet
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn(4, 4, 16, 16, generator=gen)
    timesteps = torch.tensor([10, 300, 600, 900])
    conditional = torch.randn(4, 77, 8, generator=gen)
    empty = torch.randn(1, 77, 8, generator=gen)
    with torch.no_grad():
        output = unet(noisy, timesteps, encoder_hidden_states=conditional).sample
        reference = unet(noisy, timesteps, encoder_hidden_states=empty.expand(4, -1, -1)).sample
    expected = (output - reference).double().flatten(1).norm(dim=1)
    state = TrainingState(noise_scheduler=pipe.scheduler, model=unet)
    state.timesteps = timesteps
    state.set_forward(noisy, {"encoder_hidden_states": conditional}, output)
    gap_filter = CFGGapFilter({"encoder_hidden_states": empty}, threshold=float(expected.median()))
    torch.testing.assert_close(gap_filter.gaps(state), expected, rtol=1e-5, atol=1e-7)
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = gap_filter.on_loss(losses, state)
    keep = expected <= expected.median()
    assert torch.equal(out != 0, keep)
    assert out.mean().item() == pytest.approx(losses[keep].mean().item())
    with pytest.raises(ValueError, match="set_forward"):
        gap_filter.gaps(TrainingState(noise_scheduler=pipe.scheduler, model=unet))


VOCABULARY = ["zebra", "quartz", "violet", "nimbus", "harbor"]  # disjoint from the captions' words


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_caption_randomization_perturbs_with_the_promised_probability(p):
    callback = CaptionRandomization(VOCABULARY, ["random_token_insertion", "word_repetition"], p=p, seed=3)
    state = state_for(DDPMScheduler())
    captions = ["a photo of a red cube on a table"] * 20000
    out = callback.on_batch({"captions": captions, "pixel_values": None}, state)["captions"]
    changed = [c for c in out if c != captions[0]]
    se = math.sqrt(p * (1 - p) / len(captions))
    assert abs(len(changed) / len(captions) - p) < 4 * se
    # each perturbed caption gained exactly one word: a vocabulary word (insertion) or one of its own (repetition)
    inserted = sum(any(w in VOCABULARY for w in c.split()) for c in changed)
    assert all(len(c.split()) == 10 for c in changed)
    assert abs(inserted / len(changed) - 0.5) < 4 * math.sqrt(0.25 / len(changed))


def test_each_caption_randomization_keeps_its_definition():
    rng = random.Random(0)
    caption = "a small brown dog"
    for _ in range(200):
        words = randomize_caption(caption, "random_caption", VOCABULARY, rng).split()
        assert len(words) == 4 and set(words) <= set(VOCABULARY)
        words = randomize_caption(caption, "random_word_replacement", VOCABULARY, rng).split()
        assert len(words) == 4 and sum(w in VOCABULARY for w in words) == 1
        assert sum(a != b for a, b in zip(words, caption.split(), strict=True)) == 1
        words = randomize_caption(caption, "word_repetition", VOCABULARY, rng).split()
        assert len(words) == 5 and sorted(set(words)) == sorted(set(caption.split()))
        words = randomize_caption(caption, "random_token_insertion", VOCABULARY, rng).split()
        assert len(words) == 5 and [w for w in words if w not in VOCABULARY] == caption.split()
    with pytest.raises(ValueError, match="Unknown"):
        CaptionRandomization(VOCABULARY, "shuffle")
    with pytest.raises(ValueError, match="probability"):
        CaptionRandomization(VOCABULARY, p=1.5)
    with pytest.raises(ValueError, match="vocabulary"):
        CaptionRandomization([" "])
    with pytest.raises(ValueError, match="captions"):
        CaptionRandomization(VOCABULARY).on_batch({"pixel_values": None}, state_for(DDPMScheduler()))


def test_caption_randomization_resumes_exactly():
    state = state_for(DDPMScheduler())
    batch = {"captions": [f"caption number {i}" for i in range(64)]}
    first = CaptionRandomization(VOCABULARY, p=0.5, seed=1)
    first.on_batch(batch, state)
    saved = first.state_dict()
    expected = first.on_batch(batch, state)["captions"]
    resumed = CaptionRandomization(VOCABULARY, p=0.5, seed=99)
    resumed.load_state_dict(saved)
    assert resumed.on_batch(batch, state)["captions"] == expected


def test_text_embedding_noise_perturbs_rows_with_probability_p_and_the_given_scale():
    callback = TextEmbeddingNoise(scale=0.5, p=0.3, seed=0)
    embedding = torch.randn(4000, 7, 16)
    out = callback.on_conditioning({"encoder_hidden_states": embedding, "other": 1}, state_for(DDPMScheduler()))
    assert out["other"] == 1
    difference = out["encoder_hidden_states"] - embedding
    perturbed = difference.flatten(1).abs().amax(1) > 0
    assert abs(perturbed.double().mean().item() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 4000)
    noise = difference[perturbed] / 0.5
    assert abs(noise.std().item() - 1) < 0.01 and abs(noise.mean().item()) < 0.01
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        callback.on_conditioning({}, state_for(DDPMScheduler()))
    with pytest.raises(ValueError, match="scale"):
        TextEmbeddingNoise(scale=0)
