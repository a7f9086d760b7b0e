"""Zero-shot HOLD (prediction_type="vp_epsilon"): a VP epsilon model turned into the exact HOLD score.

Gaussian data make both sides closed form: the VP denoiser of N(m, v) and the HOLD marginal score. The VP denoiser
below reads the noise level from the fractional timestep by its own interpolation of the VP table in log-SNR.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from gaussian_reference import GaussianData

from diffusers_hold import HOLDPipeline, HOLDScheduler
from diffusers_hold.testing import tiny_unet_2d

MEAN, VAR = 0.3, 0.2


class ExactVPDenoiser:
    """``E[eps | x_vp]`` for data N(MEAN, VAR) under a diffusers DDPM noise schedule, at fractional timesteps."""

    def __init__(self, ddpm: DDPMScheduler):
        table = ddpm.alphas_cumprod.double().numpy()
        self.log_snr = np.log(table / (1 - table))

    def alpha_bar(self, timestep: float) -> float:
        k = np.arange(len(self.log_snr))
        log_snr = np.interp(timestep, k, self.log_snr)
        return 1 / (1 + math.exp(-log_snr))

    def __call__(self, x_vp: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar(float(timestep))
        return (1 - ab) ** 0.5 * (x_vp - ab**0.5 * MEAN) / (ab * VAR + 1 - ab)


def schedulers(order, solver="ddim", **kwargs):
    ddpm = DDPMScheduler(num_train_timesteps=1000)  # stock linear schedule
    zero_shot = HOLDScheduler.from_config(
        ddpm.config, order=order, prediction_type="vp_epsilon", solver=solver, **kwargs
    )
    native = HOLDScheduler.from_config(ddpm.config, order=order, prediction_type="epsilon", solver=solver, **kwargs)
    return ddpm, zero_shot, native


def test_from_config_of_a_stock_scheduler_takes_its_noise_schedule():
    sd_like = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    hold = HOLDScheduler.from_config(sd_like.config, order=3, prediction_type="vp_epsilon")
    torch.testing.assert_close(hold.vp_alphas_cumprod.float(), sd_like.alphas_cumprod)
    with pytest.raises(ValueError, match="beta_schedule"):
        HOLDScheduler(beta_schedule="squaredcos_cap_v2")


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_converted_vp_model_gives_the_exact_hold_score(order):
    ddpm, zero_shot, native = schedulers(order)
    denoiser = ExactVPDenoiser(ddpm)
    data = GaussianData(native, [MEAN], [[VAR]])
    for sched in (zero_shot, native):
        sched.set_timesteps(40)
    table = zero_shot.vp_alphas_cumprod
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for i, (t_vp, t_hold) in enumerate(zip(zero_shot.timesteps, native.timesteps, strict=True)):
        t = float(native.timestep_to_time(t_hold))
        _, variance = zero_shot.dynamics.sufficient_statistic(t)
        alpha_bar = 1 / (1 + float(variance))
        if not float(table[-1]) < alpha_bar < float(table[0]):
            continue  # clamped to the VP table: the conversion is approximate there by design
        mu, cov = data.marginal(t)
        z = torch.from_numpy(np.random.default_rng(i).multivariate_normal(mu, cov, size=64))
        vp_input = zero_shot.scale_model_input(z, t_vp, full_state=True)
        assert vp_input.shape == (64, 1)
        out = zero_shot.step(denoiser(vp_input, t_vp), t_vp, z, generator=gen, full_state=True)
        reference = native.step(data.eps_prediction(z, t_hold), t_hold, z, generator=gen, full_state=True)
        # the posterior mean E[x0 | z] in closed form
        a, _ = data.kernel(t)
        posterior = MEAN + (VAR * a) @ np.linalg.solve(cov, (z.numpy() - a * MEAN).T)
        np.testing.assert_allclose(out.pred_original_sample[:, 0].numpy(), posterior, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.prev_sample, reference.prev_sample, rtol=1e-5, atol=1e-5)
        checked += 1
    assert checked >= 30


def test_zero_shot_sampling_reproduces_the_data_law():
    ddpm, zero_shot, _ = schedulers(3, solver="euler_maruyama", timestep_spacing="quadratic")
    denoiser = ExactVPDenoiser(ddpm)
    zero_shot.set_timesteps(500)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20_000, 3, generator=gen, dtype=torch.float64)
    for t in zero_shot.timesteps:
        z = zero_shot.step(
            denoiser(zero_shot.scale_model_input(z, t, full_state=True), t), t, z, generator=gen, full_state=True
        ).prev_sample
    x = z[:, 0].numpy()
    assert abs(x.mean() - MEAN) < 4 * math.sqrt(VAR / len(x)) + 0.01
    assert abs(x.var() / VAR - 1) < 0.05  # 500 steps (about 1-2 % discretisation) + Monte Carlo error (1 %)


def test_hold_pipeline_samples_a_stock_unet_zero_shot():
    unet = tiny_unet_2d(in_channels=3, out_channels=3)
    scheduler = HOLDScheduler.from_config(DDPMScheduler().config, order=2, prediction_type="vp_epsilon")
    pipe = HOLDPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    unet.register_forward_hook(lambda module, args, output: seen.append((args[0].shape, float(args[1]))))
    out = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="latent")
    assert out.images.shape == (2, 6, 8, 8)  # the whole order-2 state of 3-channel images
    assert all(shape == (2, 3, 8, 8) for shape, _ in seen)  # the VP model sees C channels
    assert [t for _, t in seen] == pytest.approx([float(t) for t in scheduler.timesteps])
    assert 0 <= min(t for _, t in seen) and max(t for _, t in seen) <= 999
    with pytest.raises(ValueError, match="reads 6 channels and predicts 3"):
        HOLDPipeline(
            unet=tiny_unet_2d(in_channels=6, out_channels=3),
            scheduler=scheduler,
        )(num_inference_steps=3)


def test_hold_pipeline_samples_a_stock_unet_zero_shot_in_few_steps():
    """The README's few-step zero-shot settings in HOLDPipeline: ten calls of the VP model at evenly spaced VP
    timesteps, a finite order-3 state at the end, and image i of a batch made with [g_0, g_1] equal to the image
    made alone with g_i."""
    unet = tiny_unet_2d(in_channels=3, out_channels=3)
    scheduler = HOLDScheduler.from_config(
        DDPMScheduler().config,
        order=3,
        prediction_type="vp_epsilon",
        solver="exp_multistep",
        solver_order=2,
        algorithm_type="sde-dpmsolver++",
        timestep_spacing="vp_linspace",
        lower_order_final=True,
        denoise_final=False,
    )
    pipe = HOLDPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    unet.register_forward_hook(lambda module, args, output: seen.append(float(args[1])))
    generators = [torch.Generator().manual_seed(seed) for seed in (0, 1)]
    batch = pipe(batch_size=2, num_inference_steps=10, generator=generators, output_type="latent").images
    assert batch.shape == (2, 9, 8, 8) and torch.isfinite(batch).all()
    assert len(seen) == 10
    np.testing.assert_allclose(np.diff(seen), np.full(9, -seen[0] / 10), rtol=1e-4)
    single = pipe(num_inference_steps=10, generator=torch.Generator().manual_seed(1), output_type="latent").images
    # batched and single convolutions differ in float32 rounding only; a wrong generator would differ by O(1)
    torch.testing.assert_close(batch[1:], single, rtol=0, atol=5e-4 * float(single.abs().max()))
    assert (batch[0] - batch[1]).abs().max() > 0.1
