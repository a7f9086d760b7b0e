"""The multistep exponential-integrator solver (``solver="exp_multistep"``) against independent references: an
ODE integrated by scipy for a single data point, diffusers' ``DPMSolverMultistepScheduler`` at HOLD order 1, the exact
output law for Gaussian data, its convergence order, and the stock-pipeline contracts of its multistep history."""

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline
from gaussian_reference import GaussianData, exact_sampler_law
from test_diffusers_contracts import generators
from test_stock_pipelines import generate, hold_pipeline, record_unet_inputs

from diffusers_hold import HOLDScheduler, HOLDUNet2DConditionModel
from diffusers_hold.schedulers.scheduling_hold import ALGORITHM_TYPES
from diffusers_hold.testing import tiny_stable_diffusion_pipeline

ALGORITHMS = list(ALGORITHM_TYPES)
FEW_STEP_GRID = {"timestep_spacing": "log1p", "denoise_final": False}


@pytest.mark.parametrize("algorithm_type", ["dpmsolver", "dpmsolver++"])
@pytest.mark.parametrize("order", [2, 3])
def test_first_order_step_is_the_exact_flow_of_a_single_data_point(order, algorithm_type):
    """With x0_hat = x0 constant (one data point), one first-order step equals the probability-flow ODE
    ``dz/dt = F z + 1/2 G G^T Sigma_t^{-1} (z - a_t x0)`` integrated by scipy from the kernel's matrices."""
    scheduler = HOLDScheduler(order=order, solver="exp_multistep", solver_order=1, algorithm_type=algorithm_type)
    data = GaussianData(scheduler, [0.0], [[1.0]])  # only its independent kernel is used
    dyn = scheduler.dynamics
    gg = np.zeros((order, order))
    gg[-1, -1] = dyn.diffusion_sq
    x0 = 0.7
    z0 = np.random.default_rng(0).standard_normal(order)

    def flow(t, z):
        a, sigma = data.kernel(t)
        return data._drift @ z + 0.5 * gg @ np.linalg.solve(sigma, z - a * x0)

    for t, t_next in [(4.0, 3.0), (0.8, 0.5), (0.05, 0.01)]:
        exact = scipy.integrate.solve_ivp(flow, (t, t_next), z0, method="DOP853", rtol=1e-11, atol=1e-12).y[:, -1]
        scheduler.set_timesteps(timesteps=scheduler.time_to_timestep(torch.tensor([t, t_next, t_next / 2])))
        state = torch.tensor(z0, dtype=torch.float64)[None, :, None]
        ell, c = dyn.x0_coefficients(torch.tensor(t, dtype=torch.float64))
        eps = (ell * state[0, :, 0]).sum() - c * x0  # the model output whose x0_hat is exactly x0
        out = scheduler.step(eps.reshape(1, 1, 1), scheduler.timesteps[0], state, full_state=True)
        np.testing.assert_allclose(out.pred_original_sample.item(), x0, rtol=1e-6)
        np.testing.assert_allclose(out.prev_sample[0, :, 0].numpy(), exact, rtol=1e-6, atol=1e-7)


def dpm_solver_on_hold_noise_levels(grid, algorithm_type, solver_order, lower_order_final=False):
    """diffusers' DPMSolverMultistepScheduler with its sigmas placed on HOLD order 1's noise levels at ``grid``."""
    dpm = DPMSolverMultistepScheduler(
        solver_order=solver_order,
        algorithm_type=algorithm_type,
        solver_type="heun",  # the exact integral of the interpolating polynomial, as HOLD's solver computes it
        lower_order_final=lower_order_final,
        final_sigmas_type="sigma_min",  # the last sigma is set below: HOLD's grid ends at sampling_eps
    )
    dpm.set_timesteps(len(grid) - 1)
    alpha_bar = torch.exp(-2 * grid)  # HOLD order 1 with L_inv = 1, eps_num = 0
    dpm.sigmas = ((1 - alpha_bar) / alpha_bar).sqrt()  # float64 coefficients: float32 ones would round visibly
    return dpm


@pytest.mark.parametrize("lower_order_final", [False, True])
@pytest.mark.parametrize("algorithm_type", ALGORITHMS)
@pytest.mark.parametrize("solver_order", [1, 2])
def test_order_one_is_diffusers_dpm_solver_on_the_same_noise_levels(algorithm_type, solver_order, lower_order_final):
    """HOLD order 1 is the VP diffusion with alpha_bar = exp(-2 t); its exp_multistep solver must take the same steps
    as DPMSolverMultistepScheduler (same algorithm, order, ``lower_order_final`` and noise levels, same model, same
    noise draws).

    Orders 1 and 2 only: diffusers' third-order update weights its second divided difference by half the exact
    integral of the interpolating quadratic, which HOLD's solver integrates exactly."""
    hold = HOLDScheduler(
        order=1,
        eps_num=0.0,
        denoise_final=False,
        solver="exp_multistep",
        solver_order=solver_order,
        algorithm_type=algorithm_type,
        timestep_spacing="log_snr",
        lower_order_final=lower_order_final,
    )
    hold.set_timesteps(8)
    dpm = dpm_solver_on_hold_noise_levels(hold.trajectory_times, algorithm_type, solver_order, lower_order_final)
    # float32 samples, as diffusers' step casts them, so that both draw the same noise from the same generator
    sample = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ours, theirs = sample.clone(), sample.clone()
    gen_ours, gen_theirs = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)

    def model(x):  # any smooth, nonlinear epsilon model
        return torch.tanh(1.5 * x) * 0.8 + 0.1 * x.flip(-1)

    for hold_t, dpm_t in zip(hold.timesteps, dpm.timesteps, strict=True):
        ours = hold.step(model(ours), hold_t, ours, generator=gen_ours, full_state=True).prev_sample
        theirs = dpm.step(model(theirs), dpm_t, theirs, generator=gen_theirs).prev_sample
        # HOLD integrates its coefficients numerically (relative error about 1e-7), diffusers has closed forms
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("algorithm_type", ALGORITHMS)
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("lower_order_final", [False, True])
def test_second_order_sampler_reproduces_two_dimensional_gaussian_law(order, algorithm_type, lower_order_final):
    """Exact law of the sampler's output for correlated 2-D Gaussian data and the exact model (no Monte Carlo)."""
    scheduler = HOLDScheduler(
        order=order,
        solver="exp_multistep",
        algorithm_type=algorithm_type,
        timestep_spacing="quadratic",
        lower_order_final=lower_order_final,
    )
    data = GaussianData(scheduler, [0.5, -0.2], [[0.09, 0.03], [0.03, 0.04]])
    steps = 200 if algorithm_type.startswith("sde") else 100  # the SDE's injected noise costs accuracy
    mean, cov = exact_sampler_law(data, steps)
    true_mean, true_cov = data.output_law(scheduler.config.sampling_eps, denoised=True)
    np.testing.assert_allclose(mean[:2], true_mean, atol=0.01)
    # first-order solvers are 4-12 % off at 100 steps on this law; the second-order one within 3 %
    assert np.abs(cov[:2, :2] - true_cov).max() / np.abs(true_cov).max() < 0.03


@pytest.mark.parametrize("algorithm_type", ["dpmsolver", "sde-dpmsolver++"])
@pytest.mark.parametrize("order", [2, 3])
def test_error_falls_at_second_order(order, algorithm_type):
    """Covariance error of the output law at 25 and 100 steps: a quarter of the steps' length gives at least 8x less
    error at solver_order 2 (second order: 16x), at most 5x at solver_order 1 (first order: 4x)."""

    def error(solver_order, steps):
        scheduler = HOLDScheduler(
            order=order,
            solver="exp_multistep",
            solver_order=solver_order,
            algorithm_type=algorithm_type,
            timestep_spacing="quadratic",
            denoise_final=False,
        )
        data = GaussianData(scheduler, [0.5, -0.2], [[0.09, 0.03], [0.03, 0.04]])
        _, cov = exact_sampler_law(data, steps)
        _, true_cov = data.output_law(scheduler.config.sampling_eps, denoised=False)
        return np.abs(cov[:2, :2] - true_cov).max()

    assert error(2, 25) / error(2, 100) > 8
    assert error(1, 25) / error(1, 100) < 5


def test_multistep_history_follows_the_trajectory():
    """The history starts empty after set_timesteps, grows to solver_order - 1 and is used: a second run repeats the
    first exactly, and a trajectory entered mid-schedule starts at first order (no stale history)."""
    scheduler = HOLDScheduler(order=3, solver="exp_multistep", solver_order=3)
    data = GaussianData(scheduler, [0.5], [[0.09]])

    def run(start=0):
        scheduler.set_timesteps(10)
        z = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        for t in scheduler.timesteps[start:]:
            z = scheduler.step(data.eps_prediction(z, t), t, z, full_state=True).prev_sample
            assert len(scheduler._data_history) <= 2
        return z

    torch.testing.assert_close(run(), run(), rtol=0, atol=0)
    first_order = HOLDScheduler(order=3, solver="exp_multistep", solver_order=1)
    scheduler.set_timesteps(10)
    first_order.set_timesteps(10)
    z = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = scheduler.timesteps[4]
    ours = scheduler.step(data.eps_prediction(z, t), t, z, full_state=True).prev_sample
    reference = first_order.step(data.eps_prediction(z, t), t, z, full_state=True).prev_sample
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="set_timesteps"):  # a different batch in the middle of a trajectory
        t = scheduler.timesteps[5]
        scheduler.step(data.eps_prediction(z[:4], t), t, z[:4], full_state=True)


@pytest.mark.parametrize("algorithm_type", ALGORITHMS)
def test_position_only_sampling_equals_full_state_sampling(algorithm_type):
    """In a stock pipeline the scheduler keeps the auxiliary blocks and the multistep history itself."""
    settings = {"order": 3, "solver": "exp_multistep", "solver_order": 3, "algorithm_type": algorithm_type}
    scheduler, full_state_scheduler = HOLDScheduler(**settings), HOLDScheduler(**settings)
    data = GaussianData(scheduler, [0.5, -0.2], [[0.09, 0.03], [0.03, 0.04]])
    scheduler.set_timesteps(12)
    full_state_scheduler.set_timesteps(12)
    q = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = scheduler.scale_model_input(q, scheduler.timesteps[0]).clone()
    gen_position, gen_full = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(q, t)
        q = scheduler.step(data.eps_prediction(model_input, t), t, q, generator=gen_position).prev_sample
        step = full_state_scheduler.step(data.eps_prediction(z, t), t, z, generator=gen_full, full_state=True)
        z = step.prev_sample
        torch.testing.assert_close(q, z[:, :2], rtol=1e-12, atol=1e-12)


def test_invalid_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="solver_order"):
        HOLDScheduler(solver="exp_multistep", solver_order=4)
    with pytest.raises(ValueError, match="lower_order_final"):
        HOLDScheduler(solver="exp_multistep", lower_order_final="yes")
    with pytest.raises(ValueError, match="vp_linspace.*vp_epsilon"):
        HOLDScheduler(solver="exp_multistep", timestep_spacing="vp_linspace")
    with pytest.raises(ValueError, match="algorithm_type"):
        HOLDScheduler(solver="exp_multistep", algorithm_type="sde-dpmsolver")
    with pytest.raises(ValueError, match="eta"):
        HOLDScheduler(order=2).dynamics.exponential_step(1.0, 0.5, torch.tensor([1.0]), prediction="noise", eta=0.5)


@pytest.mark.parametrize("prediction", ["noise", "data"])
@pytest.mark.parametrize("order", [2, 3])
def test_coefficients_of_a_few_step_grid_match_a_finely_integrated_reference(order, prediction):
    """Each step gets the Magnus substeps its own length needs (the grid's steps are integrated in runs of similar
    length): every step's coefficients agree with an integration at 8x the substep density, row by row."""
    scheduler = HOLDScheduler(order=order, solver="exp_multistep", timestep_spacing="log1p", denoise_final=False)
    grid = scheduler._spaced_grid(10)
    start, end = grid[2:-1], grid[3:]
    history = torch.stack([grid[:-1][torch.arange(2, 10) - j] for j in range(3)], dim=-1)
    ours = scheduler.dynamics.exponential_step(start, end, history, prediction=prediction)
    reference = scheduler.dynamics.exponential_step(
        start[None], end[None], history[None], prediction=prediction, substeps_per_unit=512
    )  # one batch of steps (no runs), at the longest step's density throughout
    for mine, fine in [(ours.state_matrix, reference.state_matrix[0]), (ours.data_vectors, reference.data_vectors[0])]:
        scale = fine.abs().amax(dim=(-1, -2), keepdim=True)
        assert ((mine - fine).abs() / scale).max() < 2e-6


@pytest.mark.parametrize("sampling_T", [None, 3.5])
def test_vp_linspace_calls_the_vp_model_at_evenly_spaced_timesteps(sampling_T):
    """With ``"vp_linspace"`` the model's timesteps fall evenly from the start's VP timestep towards 0, as
    DPMSolverMultistepScheduler's linspace grid calls a VP model; checked against the VP timestep of each call time
    computed independently: the kernel from scipy's matrix exponential, the sufficient statistic's variance
    ``1 / (a^T Sigma^{-1} a)``, and diffusers' ``alphas_cumprod``, interpolated in log-SNR."""
    ddpm = DDPMScheduler()
    scheduler = HOLDScheduler.from_config(
        ddpm.config, order=3, prediction_type="vp_epsilon", sampling_T=sampling_T, timestep_spacing="vp_linspace",
        solver="exp_multistep", denoise_final=False, lower_order_final=True,
    )  # fmt: skip
    data = GaussianData(scheduler, [0.0], [[1.0]])  # only its independent kernel is used
    table = ddpm.alphas_cumprod.double().numpy()
    table_log_snr = np.log(table / (1 - table))

    def vp_timestep(t):
        a, sigma = data.kernel(t)
        statistic_log_snr = np.log(a @ np.linalg.solve(sigma, a))  # -log Var(s - x0)
        return np.interp(-statistic_log_snr, -table_log_snr, np.arange(len(table)))

    scheduler.set_timesteps(10)
    times = scheduler.trajectory_times.numpy()
    start = sampling_T or scheduler.config.T
    assert times[0] == start and times[-1] == scheduler.config.sampling_eps and len(times) == 11
    expected = np.linspace(vp_timestep(start), 0.0, 11)[:-1]
    np.testing.assert_allclose([vp_timestep(t) for t in times[:-1]], expected, atol=1e-3)
    np.testing.assert_allclose(scheduler.timesteps.numpy(), expected, rtol=1e-6)


def test_repeated_set_timesteps_gives_the_coefficients_of_its_own_grid():
    """Coefficients are kept for the last grid; switching grids and back must not mix them up."""
    settings = {"order": 3, "solver": "exp_multistep", "solver_order": 3, "algorithm_type": "sde-dpmsolver++"}
    scheduler, fresh = HOLDScheduler(**settings), HOLDScheduler(**settings)
    fresh.set_timesteps(10)
    for steps in (10, 25, 10):
        scheduler.set_timesteps(steps)
    torch.testing.assert_close(scheduler.timesteps, fresh.timesteps, rtol=0, atol=0)
    pairs = zip([scheduler._steps, *scheduler._multistep_steps], [fresh._steps, *fresh._multistep_steps], strict=True)
    for mine, theirs in pairs:
        torch.testing.assert_close(mine.state_matrix, theirs.state_matrix, rtol=0, atol=0)
        torch.testing.assert_close(mine.data_vectors, theirs.data_vectors, rtol=0, atol=0)
        torch.testing.assert_close(mine.noise_matrix, theirs.noise_matrix, rtol=0, atol=0)


@pytest.mark.parametrize("spacing", ["linear", "quadratic", "log_snr", "log1p"])
def test_sampling_T_starts_the_grid(spacing):
    scheduler = HOLDScheduler(order=3, sampling_T=3.5, timestep_spacing=spacing)
    scheduler.set_timesteps(8)
    times = scheduler.trajectory_times
    assert float(times[0]) == 3.5 and (times[1:] < times[:-1]).all()
    assert float(times[-1]) == 0.0 and float(times[-2]) == scheduler.config.sampling_eps  # then the denoising step
    for bad in (5.5, 1e-3, "3"):
        with pytest.raises(ValueError, match="sampling_T"):
            HOLDScheduler(order=3, sampling_T=bad)


def test_sampling_T_costs_only_the_priors_mismatch():
    """Started at t = 3.5 from the prior, the exact output law of HOLD-3 (Gaussian data of mean norm 1.8, exact
    model, 200 steps) is off by the prior's mismatch there only: 2 % of the mean, 1 % of the covariance. At t = 1
    the prior is far from the marginal and the law is far off, which shows the start is honoured."""

    def law_error(sampling_T):
        scheduler = HOLDScheduler(
            order=3, solver="exp_multistep", solver_order=3, sampling_T=sampling_T, **FEW_STEP_GRID
        )
        data = GaussianData(scheduler, [1.5, -1.0], [[0.5, 0.1], [0.1, 0.3]])
        mean, cov = exact_sampler_law(data, 200)
        true_mean, true_cov = data.output_law(scheduler.config.sampling_eps, denoised=False)
        return np.abs(mean[:2] - true_mean).max(), np.abs(cov[:2, :2] - true_cov).max() / np.abs(true_cov).max()

    mean_error, cov_error = law_error(3.5)
    assert mean_error < 0.05 and cov_error < 0.01
    mean_error, cov_error = law_error(1.0)
    assert mean_error > 0.5 and cov_error > 0.5


# ------------------------------------------------------------------------------------------- in diffusers' pipelines
FEW_STEP = {"solver": "exp_multistep", "solver_order": 2, **FEW_STEP_GRID}
# the README's zero-shot recommendation
ZERO_SHOT = {
    **FEW_STEP,
    "algorithm_type": "sde-dpmsolver++",
    "timestep_spacing": "vp_linspace",
    "lower_order_final": True,
}


@pytest.mark.parametrize("algorithm_type", ALGORITHMS)
def test_stock_pipeline_with_guidance_reproduces_per_image_seeds(algorithm_type):
    """Classifier-free guidance doubles the batch the scheduler sees; its history must follow the rows, and image i
    of a batch made with generator=[g_0, g_1, g_2] must equal the image made alone with g_i."""
    pipe = hold_pipeline(algorithm_type=algorithm_type, **FEW_STEP)
    seen = record_unet_inputs(pipe)
    kwargs = {"guidance_scale": 7.5, "num_inference_steps": 5, "output_type": "np"}
    batch = pipe("a cat", num_images_per_prompt=3, generator=generators(0, 1, 2), **kwargs).images
    assert batch.shape == (3, 32, 32, 3) and np.isfinite(batch).all()
    assert len(seen) == 5 and all(x.shape == (6, 12, 16, 16) for x, _ in seen)
    for model_input, _ in seen:  # the unconditional and conditional halves share the whole state
        torch.testing.assert_close(model_input[:3], model_input[3:], rtol=0, atol=0)
    for i in range(3):
        single = pipe("a cat", generator=torch.Generator().manual_seed(i), **kwargs).images[0]
        np.testing.assert_allclose(batch[i], single, rtol=0, atol=1e-5)
    assert np.abs(batch[0] - batch[1]).max() > 1e-2


def test_callback_that_replaces_latents_is_read_by_the_next_multistep_update():
    pipe = hold_pipeline(algorithm_type="dpmsolver++", **FEW_STEP)
    seen = record_unet_inputs(pipe)

    def replace_at_step_1(pipeline, i, t, tensors):
        return {"latents": torch.full_like(tensors["latents"], 0.25)} if i == 1 else tensors

    out = generate(pipe, callback_on_step_end=replace_at_step_1, output_type="latent")
    assert (seen[2][0][:, :4] == 0.25).all() and not (seen[2][0][:, 4:] == 0.25).all()
    assert torch.isfinite(out).all()
    unedited = generate(pipe, output_type="latent")
    assert (out - unedited).abs().max() > 1e-3  # the edit reached the result


@pytest.mark.parametrize("prediction_type", ["epsilon", "vp_epsilon", "vp_epsilon_recommended"])
def test_img2img_enters_the_few_step_schedule_at_its_strength(prediction_type):
    if prediction_type == "epsilon":
        pipe = hold_pipeline(algorithm_type="sde-dpmsolver++", **FEW_STEP)
    else:
        pipe = tiny_stable_diffusion_pipeline()
        settings = (
            ZERO_SHOT if prediction_type.endswith("recommended") else {**FEW_STEP, "algorithm_type": "sde-dpmsolver++"}
        )
        pipe.scheduler = HOLDScheduler.from_config(
            pipe.scheduler.config, order=3, prediction_type="vp_epsilon", **settings
        )
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    seen = record_unet_inputs(img2img)
    image = torch.from_numpy(np.random.default_rng(0).random((1, 3, 32, 32)).astype(np.float32))
    kwargs = {"image": image, "strength": 0.5, "num_inference_steps": 10, "output_type": "np"}
    batch = img2img(["a cat"] * 2, generator=generators(0, 1), **kwargs).images
    assert np.isfinite(batch).all()
    assert [t for _, t in seen] == pytest.approx(img2img.scheduler.timesteps[5:].tolist())
    single = img2img("a cat", generator=torch.Generator().manual_seed(1), **kwargs).images[0]
    np.testing.assert_allclose(batch[1], single, rtol=0, atol=1e-5)


def test_zero_shot_recommended_settings_in_a_stock_pipeline_with_guidance_keep_per_image_seeds():
    """The zero-shot recommendation (vp_linspace, lower_order_final, sde-dpmsolver++) in StableDiffusionPipeline
    with classifier-free guidance: the model sees evenly spaced VP timesteps, and image i of a batch made with
    generator=[g_0, g_1] equals the image made alone with g_i."""
    pipe = tiny_stable_diffusion_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = HOLDScheduler.from_config(
        pipe.scheduler.config, order=3, prediction_type="vp_epsilon", **ZERO_SHOT
    )
    seen = record_unet_inputs(pipe)
    kwargs = {"guidance_scale": 7.5, "num_inference_steps": 6, "output_type": "np"}
    batch = pipe("a cat", num_images_per_prompt=2, generator=generators(0, 1), **kwargs).images
    assert np.isfinite(batch).all() and len(seen) == 6
    timesteps = np.array([float(t) for _, t in seen])
    np.testing.assert_allclose(np.diff(timesteps), np.full(5, -timesteps[0] / 6), rtol=1e-4)
    single = pipe("a cat", generator=torch.Generator().manual_seed(1), **kwargs).images[0]
    np.testing.assert_allclose(batch[1], single, rtol=0, atol=1e-5)


@pytest.mark.parametrize("algorithm_type", ["dpmsolver", "dpmsolver++"])
def test_zero_shot_equals_the_converted_unet_with_a_native_scheduler(algorithm_type):
    """A stock UNet sampled zero-shot and the same UNet converted to HOLD (before any training it predicts the HOLD
    noise that the zero-shot conversion computes) give the same images under the few-step solver."""
    pipe = tiny_stable_diffusion_pipeline()
    pipe.set_progress_bar_config(disable=True)
    stock_config = pipe.scheduler.config
    settings = {"algorithm_type": algorithm_type, **FEW_STEP}
    pipe.scheduler = HOLDScheduler.from_config(stock_config, order=3, prediction_type="vp_epsilon", **settings)
    zero_shot = generate(pipe, ["a cat", "a dog"], num_inference_steps=6, output_type="latent")
    pipe.unet = HOLDUNet2DConditionModel.from_unet(pipe.unet, order=3, scheduler_config=stock_config)
    pipe.scheduler = HOLDScheduler.from_config(stock_config, **pipe.unet.hold_process_settings(), **settings)
    converted = generate(pipe, ["a cat", "a dog"], num_inference_steps=6, output_type="latent")
    assert torch.isfinite(zero_shot).all()
    torch.testing.assert_close(converted, zero_shot, rtol=1e-4, atol=1e-4 * float(zero_shot.abs().max()))


def test_save_and_load_keeps_the_solver_and_the_images(tmp_path):
    pipe = hold_pipeline(
        algorithm_type="sde-dpmsolver++", **{**FEW_STEP, "solver_order": 3, "lower_order_final": True}
    )
    expected = generate(pipe, num_inference_steps=6)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is HOLDScheduler
    for key in ("solver", "solver_order", "algorithm_type", "timestep_spacing", "denoise_final", "lower_order_final"):
        assert loaded.scheduler.config[key] == pipe.scheduler.config[key]
    np.testing.assert_array_equal(generate(loaded, num_inference_steps=6), expected)
