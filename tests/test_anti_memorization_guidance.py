"""Anti-memorization guidance (Chen et al. 2024) as a UNet hook: the formula by hand, memorization falls, CFG."""

import math

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler

from diffusers_hold.data import load_digits_images
from diffusers_hold.metrics import nn_ratio_memorization
from diffusers_hold.metrics.trajectory import is_guidance_batch
from diffusers_hold.mitigations.guidance import AntiMemorizationGuidance
from diffusers_hold.models import OptimalEmpiricalDenoiser
from diffusers_hold.testing import tiny_stable_diffusion_pipeline


@pytest.fixture(scope="module")
def digits():
    images, _ = load_digits_images(resolution=8)
    return images


def brute_force_guidance(x_t, eps, abar, index, ratio_threshold=1 / 3, target_ratio=0.5):
    """AMG's eps' written out per sample, with explicit loops over the index (float64)."""
    x_t, eps, index = x_t.double(), eps.double(), index.double()
    out, flagged = eps.clone(), []
    for row in range(x_t.shape[0]):
        a = abar[row]
        x0 = (x_t[row] - math.sqrt(1 - a) * eps[row]) / math.sqrt(a)
        distances = torch.stack([((x0 - item) ** 2).sum().sqrt() for item in index])
        order = sorted(range(len(index)), key=lambda i: float(distances[i]))
        d1, d2 = float(distances[order[0]]), float(distances[order[1]])
        flagged.append(d1 / d2 < ratio_threshold)
        if flagged[-1]:
            n = index[order[0]]
            moved = x0 + (target_ratio * d2 - d1) * (x0 - n) / d1
            out[row] = (x_t[row] - math.sqrt(a) * moved) / math.sqrt(1 - a)
    return out, torch.tensor(flagged)


def noisy_batch(train, timesteps, seed=1):
    """x_t of training images 0..B-1 at per-sample timesteps (low t: the denoiser's x0 is a copy; high t: a blend)."""
    abar = DDIMScheduler().alphas_cumprod.double()[timesteps]
    noise = torch.randn(len(timesteps), *train.shape[1:], generator=torch.Generator().manual_seed(seed))
    clean = train[: len(timesteps)].double()
    return (abar.sqrt().view(-1, 1, 1, 1) * clean + (1 - abar).sqrt().view(-1, 1, 1, 1) * noise).float(), abar


def test_hooked_prediction_matches_the_formula_by_hand(digits):
    train = digits[:4]
    model = OptimalEmpiricalDenoiser.from_images(train)
    timesteps = torch.tensor([20, 60, 999, 999])
    x_t, abar = noisy_batch(train, timesteps)
    raw = model(x_t, timesteps).sample
    expected, flagged = brute_force_guidance(x_t, raw, abar.tolist(), train)
    assert flagged.tolist() == [True, True, False, False]  # the case exercises both branches
    with AntiMemorizationGuidance(model, DDIMScheduler(), train) as amg:
        hooked = model(x_t, timesteps).sample
    torch.testing.assert_close(hooked[:2].double(), expected[:2], atol=1e-5, rtol=1e-5)
    assert torch.equal(hooked[2:], raw[2:])  # unflagged: bit-identical
    assert amg.num_flagged() == [2]
    assert amg.steps[0].flagged.tolist() == [True, True, False, False]
    assert amg.steps[0].nearest_index[:2].tolist() == [0, 1]
    # the moved x0 sits at exactly target_ratio * d2 from its old nearest neighbour
    x0_moved = (x_t[:2].double() - (1 - abar[:2]).sqrt().view(-1, 1, 1, 1) * hooked[:2].double()) / abar[
        :2
    ].sqrt().view(-1, 1, 1, 1)
    x0 = (x_t[:2].double() - (1 - abar[:2]).sqrt().view(-1, 1, 1, 1) * raw[:2].double()) / abar[:2].sqrt().view(
        -1, 1, 1, 1
    )
    for row in range(2):
        d2 = sorted(float((x0[row] - item.double()).norm()) for item in train)[1]
        assert float((x0_moved[row] - train[row].double()).norm()) == pytest.approx(0.5 * d2, rel=1e-4)


def test_distance_threshold_flags_and_sets_the_floor(digits):
    train = digits[:4]
    model = OptimalEmpiricalDenoiser.from_images(train)
    timesteps = torch.tensor([999, 999])  # blends: not flagged by the ratio, but within a large RMS distance
    x_t, abar = noisy_batch(train, timesteps)
    raw = model(x_t, timesteps).sample
    tau = 2.0  # RMS difference per pixel; pixels lie in [-1, 1]
    with AntiMemorizationGuidance(model, DDIMScheduler(), train, distance_threshold=tau) as amg:
        hooked = model(x_t, timesteps).sample
    assert amg.num_flagged() == [2]
    x0 = (x_t.double() - (1 - abar).sqrt().view(-1, 1, 1, 1) * raw.double()) / abar.sqrt().view(-1, 1, 1, 1)
    moved = (x_t.double() - (1 - abar).sqrt().view(-1, 1, 1, 1) * hooked.double()) / abar.sqrt().view(-1, 1, 1, 1)
    for row in range(2):
        n = train[int(amg.steps[0].nearest_index[row])].double()
        assert float((moved[row] - n).norm()) == pytest.approx(tau * 8, rel=1e-4)  # sqrt(D) = 8
        direction = torch.nn.functional.cosine_similarity((moved[row] - n).flatten(), (x0[row] - n).flatten(), dim=0)
        assert float(direction) == pytest.approx(1.0, abs=1e-6)


class GuidedDenoiser(torch.nn.Module):
    """The empirical denoiser plus a fixed offset on the second ("conditional") half of the batch."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep):
        eps = self.model(sample, timestep).sample
        half = sample.shape[0] // 2
        offset = torch.zeros_like(eps)
        offset[half:] = 0.05 * torch.linspace(-1, 1, eps[0].numel()).view(eps.shape[1:])
        return (eps + offset,)


def test_guidance_batch_is_moved_consistently_in_both_halves(digits):
    train = digits[:4]
    model = GuidedDenoiser(OptimalEmpiricalDenoiser.from_images(train))
    x_t, _ = noisy_batch(train, torch.tensor([20]))  # at t = 20 the denoiser's x0 is a copy of image 0
    timestep = torch.tensor(20)
    abar = [float(DDIMScheduler().alphas_cumprod[20])]
    batch = torch.cat([x_t, x_t])  # what a pipeline passes under classifier-free guidance
    assert is_guidance_batch(batch)
    g = 7.5
    eps_u, eps_c = model(batch, timestep)[0].chunk(2)
    expected, flagged = brute_force_guidance(x_t, eps_u + g * (eps_c - eps_u), abar, train)
    assert flagged.tolist() == [True]
    with pytest.raises(ValueError, match="guidance_scale"):
        with AntiMemorizationGuidance(model, DDIMScheduler(), train):
            model(batch, timestep)
    with AntiMemorizationGuidance(model, DDIMScheduler(), train, guidance_scale=g):
        new_u, new_c = model(batch, timestep)[0].chunk(2)
    torch.testing.assert_close((new_u + g * (new_c - new_u)).double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_c - new_u, eps_c - eps_u, atol=1e-5, rtol=0)  # same shift in both halves


def sample_digits(pipe, seed):
    images = pipe(
        batch_size=64, num_inference_steps=20, generator=torch.Generator().manual_seed(seed), output_type="np"
    ).images
    return torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1


def test_memorization_falls_under_amg_in_a_stock_ddim_pipeline(digits):
    train = digits[:16]
    model = OptimalEmpiricalDenoiser.from_images(train)
    scheduler = DDIMScheduler.from_config(DDIMScheduler().config)
    pipe = DDIMPipeline(unet=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    plain = sample_digits(pipe, seed=0)
    assert nn_ratio_memorization(plain, train).fraction_memorized >= 0.95
    with AntiMemorizationGuidance(pipe.unet, pipe.scheduler, train) as amg:
        guided = sample_digits(pipe, seed=0)
    report = nn_ratio_memorization(guided, train)
    assert report.fraction_memorized <= 0.5  # measured 0.27 (seeds 0-3: 0.25-0.30)
    assert torch.isfinite(guided).all() and guided.min() >= -1 and guided.max() <= 1
    assert len(amg.steps) == 20 and amg.num_flagged()[-1] > 0 and amg.num_flagged()[0] == 0
    assert float((guided - plain).flatten(1).norm(dim=1).mean()) < 0.5 * float(train.flatten(1).norm(dim=1).mean())
    assert not pipe.unet._forward_hooks  # removed on exit
    assert torch.equal(sample_digits(pipe, seed=0), plain)


@pytest.fixture(scope="module")
def sd_pipe():
    pipe = tiny_stable_diffusion_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_latents(pipe, guidance_scale=7.5):
    return pipe(
        ["a red cube", "a blue ball"],
        num_inference_steps=4,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images


def test_text_to_image_pipeline_with_cfg(sd_pipe):
    plain = sd_latents(sd_pipe)
    far = torch.randn(plain.shape, generator=torch.Generator().manual_seed(5)) * 10
    index = torch.cat([plain, far])  # the exact latents the pipeline produces, and decoys
    with AntiMemorizationGuidance(sd_pipe.unet, sd_pipe.scheduler, index, guidance_scale=7.5) as amg:
        guided = sd_latents(sd_pipe)
    assert len(amg.steps) == 4 and all(step.flagged.shape == (2,) for step in amg.steps)
    assert amg.steps[0].flagged.all()  # the x0 of the first step is already a near-copy of the final latents
    assert amg.steps[0].nearest_index.tolist() == [0, 1]
    assert torch.isfinite(guided).all()
    # the outputs are no longer copies of the index latents by the 1/3 rule (measured ratios 0.39)
    report = nn_ratio_memorization(guided, index)
    assert not report.memorized.any() and report.nearest_index.tolist() == [0, 1]
    assert ((guided - plain).flatten(1).norm(dim=1) > 0.25 * plain.flatten(1).norm(dim=1)).all()
    assert not sd_pipe.unet._forward_hooks
    assert torch.equal(sd_latents(sd_pipe), plain)


def test_bad_inputs_raise(digits):
    train = digits[:4]
    model = OptimalEmpiricalDenoiser.from_images(train)
    scheduler = DDIMScheduler()
    with pytest.raises(ValueError, match="4-D"):
        AntiMemorizationGuidance(model, scheduler, train[0])
    with pytest.raises(ValueError, match="at least 2"):
        AntiMemorizationGuidance(model, scheduler, train[:0])
    with pytest.raises(ValueError, match="at least 2"):
        AntiMemorizationGuidance(model, scheduler, train[:1])
    with pytest.raises(ValueError, match="NaN"):
        AntiMemorizationGuidance(model, scheduler, torch.full((3, 1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="torch.Tensor"):
        AntiMemorizationGuidance(model, scheduler, train.numpy())
    with pytest.raises(ValueError, match="alphas_cumprod"):
        AntiMemorizationGuidance(model, object(), train)
    with pytest.raises(ValueError, match="epsilon"):
        AntiMemorizationGuidance(model, DDIMScheduler(prediction_type="v_prediction"), train)
    with pytest.raises(ValueError, match="ratio_threshold or distance_threshold"):
        AntiMemorizationGuidance(model, scheduler, train, ratio_threshold=None)
    with pytest.raises(ValueError, match="target_ratio"):
        AntiMemorizationGuidance(model, scheduler, train, target_ratio=0.3)
    with pytest.raises(ValueError, match="distance_threshold"):
        AntiMemorizationGuidance(model, scheduler, train, distance_threshold=-1.0)

    # shape mismatch between index and samples is caught at the first call
    amg = AntiMemorizationGuidance(model, scheduler, torch.zeros(3, 1, 4, 4))
    with pytest.raises(ValueError, match="index must match"):
        with amg:
            model(torch.zeros(2, 1, 8, 8), 10)
    assert not model._forward_hooks  # removed even when the block raises

    class NaNModel(torch.nn.Module):
        def forward(self, sample, timestep):
            return (torch.full_like(sample, float("nan")),)

    nan_model = NaNModel()
    with pytest.raises(ValueError, match="NaN"):
        with AntiMemorizationGuidance(nan_model, scheduler, train):
            nan_model(torch.zeros(2, 1, 8, 8), 10)
    with pytest.raises(ValueError, match="integers"):
        with AntiMemorizationGuidance(model, scheduler, train):
            model(torch.randn(2, 1, 8, 8), 10.5)


def test_is_guidance_batch():
    x = torch.randn(2, 1, 4, 4)
    assert is_guidance_batch(torch.cat([x, x]))
    assert not is_guidance_batch(x)
    assert not is_guidance_batch(torch.cat([x, x])[:3])
    assert not is_guidance_batch(torch.zeros(0, 1, 4, 4))
