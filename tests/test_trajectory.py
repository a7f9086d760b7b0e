"""Trajectory diagnostics: Kim et al.'s latent decomposition, the reference weights, Wen et al.'s CFG gap."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from diffusers_hold import HOLDPipeline, HOLDScheduler
from diffusers_hold.data import load_digits_images
from diffusers_hold.metrics import (
    CFGGapMonitor,
    Trajectory,
    TrajectoryRecorder,
    decompose_trajectory,
    reference_weights,
)
from diffusers_hold.models import OptimalEmpiricalDenoiser
from diffusers_hold.testing import tiny_stable_diffusion_pipeline


def test_decomposition_recovers_the_weights_a_trajectory_was_built_with():
    gen = torch.Generator().manual_seed(0)
    final, initial = torch.randn(4, 3, 8, 8, generator=gen), torch.randn(4, 3, 8, 8, generator=gen)
    w0, wT = (
        torch.rand(10, 4, generator=gen, dtype=torch.float64),
        torch.rand(10, 4, generator=gen, dtype=torch.float64),
    )
    # add a component orthogonal to both directions: it must not leak into the weights
    extra = torch.randn(10, 4, 3 * 8 * 8, generator=gen, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.stack([final.flatten(1).double(), initial.flatten(1).double()], -1))
    extra = extra - torch.einsum("bdi,kbi->kbd", basis, torch.einsum("bdi,kbd->kbi", basis, extra))
    latents = w0[..., None] * final.flatten(1) + wT[..., None] * initial.flatten(1) + 0.3 * extra
    trajectory = Trajectory(initial, latents.reshape(10, 4, 3, 8, 8), torch.arange(10.0))
    result = decompose_trajectory(trajectory, final=final)
    torch.testing.assert_close(result.w0, w0, rtol=0, atol=1e-10)
    torch.testing.assert_close(result.wT, wT, rtol=0, atol=1e-10)
    expected_residual = (0.3 * extra).norm(dim=2) / latents.norm(dim=2)
    torch.testing.assert_close(result.residual, expected_residual, rtol=1e-10, atol=1e-12)
    # overestimation: the mean excess over a reference on the first half of the steps
    reference = (torch.zeros(10, dtype=torch.float64), torch.ones(10, dtype=torch.float64))
    torch.testing.assert_close(result.overestimation(reference), w0[:5].mean(0))
    torch.testing.assert_close(result.noise_suppression(reference, early_fraction=0.3), (1 - wT[:3]).mean(0))


def exact_memorizer_loop(scheduler, image: torch.Tensor, initial: torch.Tensor, steps: int, seed: int = 0):
    """Sample with the real scheduler and the optimal empirical denoiser of one image (which predicts that image
    exactly at every step), recording latents through the recorder's callback interface."""
    schedule = {
        key: scheduler.config[key] for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
    }
    model = OptimalEmpiricalDenoiser.from_images(image[None], **schedule)
    scheduler.set_timesteps(steps)
    recorder = TrajectoryRecorder(initial)
    sample, generator = initial.clone(), torch.Generator().manual_seed(seed)
    for index, t in enumerate(scheduler.timesteps):
        eps = model(scheduler.scale_model_input(sample, t), t).sample
        sample = scheduler.step(eps, t, sample, generator=generator).prev_sample
        recorder(None, index, t, {"latents": sample})
    return recorder.trajectory()


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_reference_weights_are_what_an_exact_memorizer_traces(set_alpha_to_one):
    image = load_digits_images(resolution=8)[0][7]
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    scheduler = DDIMScheduler.from_config(scheduler.config, set_alpha_to_one=set_alpha_to_one)
    initial = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    trajectory = exact_memorizer_loop(scheduler, image, initial, steps=20)
    measured = decompose_trajectory(trajectory)
    w0, wT = reference_weights(scheduler)
    assert len(w0) == 20
    torch.testing.assert_close(measured.w0, w0[:, None].expand(20, 3), rtol=0, atol=2e-5)
    torch.testing.assert_close(measured.wT, wT[:, None].expand(20, 3), rtol=0, atol=2e-5)
    assert measured.overestimation((w0, wT)).abs().max() < 2e-5
    # the trajectory's weights are not the marginal's: the reference kind matters
    marginal = reference_weights(scheduler, kind="marginal")
    assert (marginal[0] - w0).abs().max() > 0.05


def test_ddpm_reference_weights_are_the_mean_path_of_ancestral_sampling():
    """Regress the real DDPM sampler's latents (exact memorizer, 100k one-pixel chains) on (x_0, x_T); the standard
    errors are below 0.005."""
    scheduler = DDPMScheduler()
    image = torch.tensor([[[0.9]]])
    initial = torch.randn(100_000, 1, 1, 1, generator=torch.Generator().manual_seed(3))
    trajectory = exact_memorizer_loop(scheduler, image, initial, steps=25)
    design = torch.stack([torch.full((100_000,), 0.9, dtype=torch.float64), initial.flatten().double()], 1)
    fitted = torch.linalg.lstsq(design, trajectory.latents.flatten(1).T.double()).solution  # (2, steps)
    w0, wT = reference_weights(scheduler)
    torch.testing.assert_close(fitted[0], w0, rtol=0, atol=0.02)
    torch.testing.assert_close(fitted[1], wT, rtol=0, atol=0.01)
    assert wT[0] < 0.999 and wT[-1] == 0 and w0[-1] == 1


def test_hold_reference_weights_are_the_mean_path_of_the_hold_sampler():
    """The HOLD position bridge against the real Euler-Maruyama sampler with an exact single-image score
    (zero-shot through the empirical denoiser), regressed over 16,000 chains of a 2x2 image (Monte Carlo and
    discretisation errors measured below 0.017)."""
    image = torch.tensor([[[0.8, -0.4], [0.1, -0.9]]])
    base = DDPMScheduler().config
    scheduler = HOLDScheduler.from_config(base, order=3, prediction_type="vp_epsilon", timestep_spacing="quadratic")
    pipe = HOLDPipeline(unet=OptimalEmpiricalDenoiser.from_images(image[None]), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    state = torch.randn(16000, 3, 2, 2, generator=torch.Generator().manual_seed(4))
    recorder = TrajectoryRecorder(state, position_channels=1)
    pipe(batch_size=16000, latents=state, num_inference_steps=150, callback_on_step_end=recorder, output_type="latent")
    trajectory = recorder.trajectory()
    x0 = image.double().expand(16000, 1, 2, 2).flatten()
    design = torch.stack([x0, trajectory.initial.flatten()], 1)
    fitted = torch.linalg.lstsq(design, trajectory.latents.flatten(1).T).solution
    w0, wT = reference_weights(pipe.scheduler)
    assert len(w0) == 150 and len(pipe.scheduler.trajectory_times) == 151
    torch.testing.assert_close(fitted[0], w0, rtol=0, atol=0.03)
    torch.testing.assert_close(fitted[1], wT, rtol=0, atol=0.03)
    # a reference that decays from the noise to the data over the run, not a degenerate one
    assert wT[0] > 0.99 and wT[30] > 0.2 and (wT[1:] <= wT[:-1]).all() and w0[-1] == 1


def test_hold_trajectory_times_follow_each_solver():
    for solver in ("euler_maruyama", "ddim", "sscs"):
        for denoise_final in (True, False):
            scheduler = HOLDScheduler(order=2, solver=solver, denoise_final=denoise_final)
            scheduler.set_timesteps(6)
            times = scheduler.trajectory_times
            assert len(times) == 7 and times[0] == scheduler.config.T
            assert (times[1:] < times[:-1]).all()
            assert float(times[-1]) == pytest.approx(0.0 if denoise_final else scheduler.config.sampling_eps)
    scheduler = HOLDScheduler(order=2, solver="sscs", denoise_final=False)
    scheduler.set_timesteps(4)
    torch.testing.assert_close(scheduler.trajectory_times[1:-1], scheduler.timestep_to_time(scheduler.timesteps[1:]))


@pytest.fixture(scope="module")
def tiny_sd():
    pipe = tiny_stable_diffusion_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_recorder_and_cfg_gap_in_a_stock_stable_diffusion_pipeline(tiny_sd):
    pipe = tiny_sd
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    recorder = TrajectoryRecorder(latents * pipe.scheduler.init_noise_sigma)
    prompts = ["a red cube", "a blue ball"]
    with CFGGapMonitor(pipe.unet) as monitor:
        out = pipe(
            prompts,
            latents=latents,
            num_inference_steps=6,
            guidance_scale=6.0,
            output_type="latent",
            callback_on_step_end=recorder,
        ).images
    trajectory = recorder.trajectory()
    assert trajectory.latents.shape == (6, 2, 4, 16, 16)
    torch.testing.assert_close(trajectory.latents[-1], out.double())
    torch.testing.assert_close(trajectory.timesteps, pipe.scheduler.timesteps.double())
    decomposition = decompose_trajectory(trajectory)
    assert decomposition.w0.shape == (6, 2)
    assert decomposition.overestimation(reference_weights(pipe.scheduler)).shape == (2,)

    # the first step's gap, computed by hand from the UNet and the pipeline's own prompt embeddings
    gaps = monitor.gaps()
    assert gaps.shape == (6, 2)
    torch.testing.assert_close(monitor.timesteps, pipe.scheduler.timesteps.double())
    conditional, unconditional = pipe.encode_prompt(prompts, "cpu", 1, True)
    t0 = pipe.scheduler.timesteps[0]
    with torch.no_grad():
        eps_c = pipe.unet(latents, t0, encoder_hidden_states=conditional).sample
        eps_u = pipe.unet(latents, t0, encoder_hidden_states=unconditional).sample
    expected = (eps_c - eps_u).double().flatten(1).norm(dim=1)
    torch.testing.assert_close(monitor.first_step_gap(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(monitor.mean_gap(), gaps.mean(0))
    assert (gaps > 0).all()

    # the hook is gone after the block, and an unguided run records nothing
    with CFGGapMonitor(pipe.unet) as unguided:
        pipe(prompts, latents=latents, num_inference_steps=2, guidance_scale=1.0, output_type="latent")
    with pytest.raises(ValueError, match="guidance_scale > 1"):
        unguided.gaps()
    assert not pipe.unet._forward_hooks


def test_trajectory_tools_reject_bad_input(tiny_sd):
    initial = torch.randn(2, 4, 8, 8)
    recorder = TrajectoryRecorder(initial)
    with pytest.raises(ValueError, match="No step was recorded"):
        recorder.trajectory()
    with pytest.raises(ValueError, match="shape"):
        recorder(None, 0, 10, {"latents": torch.randn(2, 4, 16, 16)})
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        recorder(None, 0, 10, {"prompt_embeds": initial})
    bad = Trajectory(initial, torch.full((3, 2, 4, 8, 8), float("nan")), torch.arange(3.0))
    with pytest.raises(ValueError, match="NaN"):
        decompose_trajectory(bad)
    with pytest.raises(ValueError, match="shape"):
        decompose_trajectory(Trajectory(initial, torch.randn(3, 1, 4, 8, 8), torch.arange(3.0)))
    with pytest.raises(ValueError, match="parallel"):
        decompose_trajectory(Trajectory(initial, (2 * initial)[None].expand(3, -1, -1, -1, -1), torch.arange(3.0)))
    with pytest.raises(ValueError, match="set_timesteps"):
        reference_weights(DDIMScheduler())
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="kind"):
        reference_weights(scheduler, kind="hold")
    with pytest.raises(ValueError, match="EulerDiscreteScheduler"):
        euler = EulerDiscreteScheduler()
        euler.set_timesteps(4)
        reference_weights(euler)
    decomposition = decompose_trajectory(
        Trajectory(initial, torch.randn(4, 2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(4.0))
    )
    w0, wT = reference_weights(scheduler)
    with pytest.raises(ValueError, match="steps"):
        decomposition.overestimation((w0[:2], wT[:2]))
    with pytest.raises(ValueError, match="early_fraction"):
        decomposition.overestimation((w0, wT), early_fraction=0)
