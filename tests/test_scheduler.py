"""HOLDScheduler: diffusers conformance, training helpers, bad input, and samplers against exact Gaussian scores."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from gaussian_reference import GaussianData, exact_sampler_law, sample_with_exact_score

from diffusers_hold import HOLDScheduler, HOLDSchedulerOutput

SOLVERS = ["euler_maruyama", "sscs", "ddim", "exp_multistep"]


def public_config(scheduler):
    return {k: v for k, v in scheduler.config.items() if not k.startswith("_")}


def make_inputs(scheduler, channels=2, size=4, batch=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = scheduler.config.order
    sample = torch.randn(batch, n * channels, size, size, generator=gen)
    model_output = torch.randn(batch, channels, size, size, generator=gen)
    return sample, model_output


# ------------------------------------------------------------------------------------------------ conformance
@pytest.mark.parametrize("solver", SOLVERS)
def test_save_load_round_trip_gives_identical_steps(tmp_path, solver):
    scheduler = HOLDScheduler(order=2, solver=solver, T=6.0, L_inv=0.5, timestep_spacing="quadratic")
    scheduler.save_config(tmp_path)
    reloaded = HOLDScheduler.from_pretrained(tmp_path)
    assert public_config(reloaded) == public_config(scheduler)
    sample, model_output = make_inputs(scheduler)
    for sched in (scheduler, reloaded):
        sched.set_timesteps(12)
    for i in [0, 5, 11]:
        t = scheduler.timesteps[i]
        a = scheduler.step(
            model_output, t, sample, generator=torch.Generator().manual_seed(3), full_state=True
        ).prev_sample
        b = reloaded.step(
            model_output, t, sample, generator=torch.Generator().manual_seed(3), full_state=True
        ).prev_sample
        assert torch.equal(a, b)


def test_from_config_both_ways_with_ddpm():
    ddpm = DDPMScheduler(num_train_timesteps=1000)
    hold = HOLDScheduler.from_config(ddpm.config, order=4, solver="sscs")
    assert hold.config.order == 4 and hold.config.solver == "sscs" and hold.config.num_train_timesteps == 1000
    back = DDPMScheduler.from_config(hold.config)
    assert back.config.beta_schedule == ddpm.config.beta_schedule
    assert torch.equal(back.alphas_cumprod, ddpm.alphas_cumprod)
    again = HOLDScheduler.from_config(hold.config)
    assert public_config(again) == public_config(hold)


@pytest.mark.parametrize("solver", SOLVERS)
def test_dict_and_tuple_outputs_agree_and_have_the_right_shapes(solver):
    scheduler = HOLDScheduler(order=3, solver=solver)
    scheduler.set_timesteps(10)
    sample, model_output = make_inputs(scheduler)
    t = scheduler.timesteps[3]
    out = scheduler.step(model_output, t, sample, generator=torch.Generator().manual_seed(1), full_state=True)
    tup = scheduler.step(
        model_output, t, sample, generator=torch.Generator().manual_seed(1), return_dict=False, full_state=True
    )
    assert isinstance(out, HOLDSchedulerOutput)
    assert torch.equal(out.prev_sample, tup[0]) and torch.equal(out.pred_original_sample, tup[1])
    assert out.prev_sample.shape == sample.shape
    assert out.pred_original_sample.shape == model_output.shape
    assert scheduler.scale_model_input(sample, t, full_state=True).shape == sample.shape
    assert scheduler.scale_model_input(sample, 0.0, full_state=True).shape == sample.shape


@pytest.mark.parametrize("solver", SOLVERS)
def test_seeded_generator_is_deterministic(solver):
    scheduler = HOLDScheduler(order=3, solver=solver)
    scheduler.set_timesteps(8)
    sample, model_output = make_inputs(scheduler)

    def run(seed):
        z = sample
        gen = torch.Generator().manual_seed(seed)
        for t in scheduler.timesteps:
            z = scheduler.step(model_output, t, z, generator=gen, full_state=True).prev_sample
        return z

    assert torch.equal(run(0), run(0))
    if solver in ("ddim", "exp_multistep"):  # deterministic (exp_multistep's default algorithm is the ODE's)
        assert torch.equal(run(0), run(1))
    else:
        assert not torch.equal(run(0), run(1))


def test_device_and_dtype_handling():
    scheduler = HOLDScheduler(order=2)
    scheduler.set_timesteps(5, device="cpu")
    assert scheduler.timesteps.device.type == "cpu" and scheduler.timesteps.dtype == torch.float32
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        sample = torch.randn(2, 4, 3, 3, dtype=dtype)
        out = scheduler.step(torch.randn(2, 2, 3, 3, dtype=dtype), scheduler.timesteps[1], sample, full_state=True)
        assert out.prev_sample.dtype == dtype and out.pred_original_sample.dtype == dtype
    x0 = torch.randn(4, 2, 3, 3)
    noise = torch.randn(4, 4, 3, 3)
    noisy = scheduler.add_noise(x0, noise, scheduler.sample_timesteps(4))
    assert noisy.device == x0.device and noisy.dtype == x0.dtype and noisy.shape == noise.shape


def test_attributes_of_the_diffusers_protocol():
    scheduler = HOLDScheduler(order=3, L_inv=0.5)
    assert scheduler.order == 1 and scheduler.hold_order == 3
    assert scheduler.init_noise_sigma == pytest.approx(math.sqrt(0.5))
    assert len(scheduler) == 1000
    scheduler.set_timesteps(20)
    assert len(scheduler.timesteps) == 20 and scheduler.num_inference_steps == 20
    assert scheduler.timesteps[0] == pytest.approx(1000.0)
    assert scheduler.timesteps[-1] == pytest.approx(1e-3 * 1000 / 5.0)  # denoising call at sampling_eps
    assert (scheduler.timesteps[1:] < scheduler.timesteps[:-1]).all()
    scheduler.set_begin_index(3)
    assert scheduler.begin_index == 3


def test_timestep_grids():
    linear = HOLDScheduler(order=2, denoise_final=False)
    linear.set_timesteps(4)
    t = linear.timestep_to_time(linear.timesteps).numpy()
    np.testing.assert_allclose(t, 5.0 - (5.0 - 1e-3) * np.arange(4) / 4, rtol=1e-6)
    quadratic = HOLDScheduler(order=2, timestep_spacing="quadratic", denoise_final=False)
    quadratic.set_timesteps(4)
    t = quadratic.timestep_to_time(quadratic.timesteps).numpy()
    np.testing.assert_allclose(t, 1e-3 + (5.0 - 1e-3) * (1 - np.arange(4) / 4) ** 2, rtol=1e-6)
    log1p = HOLDScheduler(order=2, timestep_spacing="log1p", denoise_final=False)
    log1p.set_timesteps(4)  # four steps from T down to sampling_eps, equal in log(1 + t)
    t = log1p.timestep_to_time(log1p.timesteps).numpy()
    ends = np.log(1.0 + np.array([5.0, 1e-3]))
    np.testing.assert_allclose(t, np.exp(ends[0] + (ends[1] - ends[0]) * np.arange(4) / 4) - 1.0, rtol=1e-6)
    sscs = HOLDScheduler(order=2, solver="sscs", denoise_final=False)
    sscs.set_timesteps(4)  # evaluated at the interval midpoints
    t = sscs.timestep_to_time(sscs.timesteps).numpy()
    grid = 5.0 - (5.0 - 1e-3) * np.arange(5) / 4
    np.testing.assert_allclose(t, 0.5 * (grid[:-1] + grid[1:]), rtol=1e-6)
    custom = HOLDScheduler(order=2)
    custom.set_timesteps(timesteps=[900.0, 500.0, 100.0, 1.0])
    np.testing.assert_allclose(custom.timesteps.numpy(), [900.0, 500.0, 100.0, 1.0])


# -------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("order", [1, 2, 3])
def test_add_noise_draws_from_the_exact_kernel(order):
    scheduler = HOLDScheduler(order=order)
    reference = GaussianData(scheduler, [0.0], [[0.0]])  # kernel computed with scipy, independently
    gen = torch.Generator().manual_seed(0)
    num = 200_000
    for t in [0.01, 0.8, 4.0]:
        x0 = torch.full((num, 1), 0.7, dtype=torch.float64)
        noise = torch.randn(num, order, generator=gen, dtype=torch.float64)
        z = scheduler.add_noise(x0, noise, torch.tensor(t * 1000 / 5.0)).numpy()
        a, cov = reference.kernel(t)
        # whitened by the reference kernel, the draws must be standard normal (5 standard errors)
        white = np.linalg.solve(np.linalg.cholesky(cov), (z - 0.7 * a).T).T
        assert np.abs(white.mean(0)).max() < 5 / math.sqrt(num)
        assert np.abs(np.cov(white.T).reshape(order, order) - np.eye(order)).max() < 5 * math.sqrt(2 / num)


def test_training_target_makes_the_exact_score():
    """target / L_nn is minus the last-block score of p(z_t | x0), so eps-MSE is score matching."""
    scheduler = HOLDScheduler(order=3)
    reference = GaussianData(scheduler, [0.0], [[0.0]])
    x0 = torch.randn(5, 1, dtype=torch.float64)
    noise = torch.randn(5, 3, dtype=torch.float64)
    timesteps = torch.tensor([10.0, 100.0, 300.0, 600.0, 999.0])
    z = scheduler.add_noise(x0, noise, timesteps).numpy()
    target = scheduler.get_target(noise).numpy()[:, 0]
    for i, ts in enumerate(timesteps):
        a, cov = reference.kernel(float(ts) * 5.0 / 1000)
        score = -np.linalg.solve(cov, z[i] - a * x0[i, 0].item())
        assert -target[i] / np.linalg.cholesky(cov)[-1, -1] == pytest.approx(score[-1], rel=1e-8)


def test_sample_timesteps_is_uniform_on_the_training_interval():
    scheduler = HOLDScheduler(order=2, train_eps=0.01)
    timesteps = scheduler.sample_timesteps(100_000, generator=torch.Generator().manual_seed(0))
    t = scheduler.timestep_to_time(timesteps).numpy()
    assert t.min() >= 0.01 - 1e-6 and t.max() <= 5.0
    # Kolmogorov-Smirnov distance to U[0.01, 5]; 1.95 / sqrt(N) is the 0.1 % critical value
    u = np.sort((t - 0.01) / (5.0 - 0.01))
    ks = np.max(np.abs(u - np.arange(1, len(u) + 1) / len(u)))
    assert ks < 1.95 / math.sqrt(len(u))


def test_order_one_is_the_vp_diffusion():
    """alpha_bar(t) = exp(-2 t): noising, SNR and the DDIM step reduce to their VP closed forms."""
    scheduler = HOLDScheduler(order=1, solver="ddim", eps_num=1e-6, denoise_final=False)
    timesteps = torch.tensor([2.0, 200.0, 800.0])
    t = timesteps.double() * 5.0 / 1000
    alpha_bar = torch.exp(-2 * t)
    sigma2 = 1 - alpha_bar + 1e-6
    x0 = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    noise = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    expected = alpha_bar.sqrt()[:, None, None, None] * x0 + sigma2.sqrt()[:, None, None, None] * noise
    torch.testing.assert_close(scheduler.add_noise(x0, noise, timesteps), expected)
    torch.testing.assert_close(scheduler.snr(timesteps), alpha_bar / sigma2)

    scheduler.set_timesteps(10)
    grid = 5.0 - (5.0 - 1e-3) * torch.arange(11, dtype=torch.float64) / 10  # linear spacing, no denoising call
    for i in [0, 4, 9]:
        t_now, t_next = grid[i], grid[i + 1]
        ab, ab_next = torch.exp(-2 * t_now), torch.exp(-2 * t_next)
        s2, s2_next = 1 - ab + 1e-6, 1 - ab_next + 1e-6
        z = torch.randn(2, 1, 3, 3, dtype=torch.float64)
        eps = torch.randn(2, 1, 3, 3, dtype=torch.float64)
        x0_hat = (z - s2.sqrt() * eps) / ab.sqrt()
        ddim = ab_next.sqrt() * x0_hat + s2_next.sqrt() * eps
        out = scheduler.step(eps, scheduler.timesteps[i], z, full_state=True)
        torch.testing.assert_close(out.pred_original_sample, x0_hat, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out.prev_sample, ddim, rtol=1e-9, atol=1e-9)


def test_order_one_matches_diffusers_ddim_on_the_same_noise_levels():
    """Same alpha_bar path, same update: HOLD order 1 'ddim' and diffusers' DDIMScheduler (eta = 0)."""
    hold = HOLDScheduler(order=1, solver="ddim", eps_num=0.0, denoise_final=False)
    hold.set_timesteps(5)
    grid = 5.0 - (5.0 - 1e-3) * torch.arange(6, dtype=torch.float64) / 5
    ddim = DDIMScheduler(num_train_timesteps=len(grid), set_alpha_to_one=False, clip_sample=False)
    # place the HOLD noise levels into DDIM's table, index k <-> grid[len - 1 - k]
    ddim.alphas_cumprod = torch.exp(-2 * grid.flip(0)).float()
    ddim.final_alpha_cumprod = ddim.alphas_cumprod[0]
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 1, 4, 4, generator=gen)
    eps = torch.randn(2, 1, 4, 4, generator=gen)
    ddim.num_inference_steps = len(grid) - 1
    for i, ts in enumerate(hold.timesteps):
        k = len(grid) - 1 - i
        expected = ddim.step(eps, k, z, eta=0.0).prev_sample
        ours = hold.step(eps, ts, z, full_state=True).prev_sample
        torch.testing.assert_close(ours, expected, rtol=2e-5, atol=2e-5)


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"order": 0}, "order"),
        ({"order": -2}, "order"),
        ({"T": 0.0}, "T"),
        ({"T": -1.0}, "T"),
        ({"L_inv": 0.0}, "L_inv"),
        ({"aux_init_var": -0.1}, "aux_init_var"),
        ({"solver": "heun"}, "solver"),
        ({"prediction_type": "v_prediction"}, "prediction_type"),
        ({"timestep_spacing": "karras"}, "timestep_spacing"),
        ({"sampling_eps": 0.0}, "sampling_eps"),
        ({"train_eps": 6.0}, "train_eps"),
    ],
)
def test_invalid_config_raises_a_clear_error(kwargs, name):
    with pytest.raises(ValueError, match=name):
        HOLDScheduler(**kwargs)


def test_bad_step_inputs_raise_clear_errors():
    scheduler = HOLDScheduler(order=3)
    sample, model_output = make_inputs(scheduler)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(model_output, 1000.0, sample, full_state=True)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[2]
    with pytest.raises(ValueError, match="not in the schedule"):
        scheduler.step(model_output, 123.456, sample, full_state=True)
    with pytest.raises(ValueError, match="model_output has shape"):
        scheduler.step(model_output[:, :1], t, sample, full_state=True)
    with pytest.raises(ValueError, match="model_output has shape"):
        scheduler.step(torch.randn(3, 6, 4, 4), t, sample, full_state=True)
    with pytest.raises(ValueError, match="HOLD state"):
        scheduler.step(model_output, t, sample[:, :5], full_state=True)
    bad = model_output.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        scheduler.step(bad, t, sample, full_state=True)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(1)
    with pytest.raises(ValueError, match="strictly decreasing"):
        scheduler.set_timesteps(timesteps=[10.0, 500.0])


def test_out_of_range_timesteps_raise():
    scheduler = HOLDScheduler(order=2)
    x0 = torch.randn(2, 1, 4, 4)
    noise = torch.randn(2, 2, 4, 4)
    for bad in (torch.tensor([-1.0, 10.0]), torch.tensor([10.0, 1000.5]), torch.tensor([float("nan"), 1.0])):
        with pytest.raises(ValueError, match="timesteps must lie in"):
            scheduler.add_noise(x0, noise, bad)
    with pytest.raises(ValueError, match="timesteps must lie in"):
        scheduler.snr(2000.0)
    with pytest.raises(ValueError, match="timesteps must lie in"):
        scheduler.set_timesteps(timesteps=[1500.0, 10.0])
    with pytest.raises(ValueError, match="noise has shape"):
        scheduler.add_noise(x0, torch.randn(2, 3, 4, 4), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="timesteps for a batch"):
        scheduler.add_noise(x0, noise, torch.tensor([1.0, 2.0, 3.0]))


# ------------------------------------------------------------------------------------- exact-score sampling
# Relative error of the output variance against the exact data law, for Gaussian data N(0.5, 0.09) and the exact
# score (denoised output at sampling_eps). The README's accuracy table quotes the values these bounds enclose.
EXACT_LAW_BOUNDS = [
    # (solver, spacing, steps, orders, bound)
    ("euler_maruyama", "linear", 1000, (2, 3, 4), 0.02),
    ("euler_maruyama", "quadratic", 1000, (1, 2, 3, 4), 0.02),
    ("sscs", "quadratic", 1000, (1, 2, 3, 4), 0.02),
    ("ddim", "quadratic", 1000, (1, 2, 3, 4), 0.02),
    ("euler_maruyama", "quadratic", 250, (1, 2, 3, 4), 0.06),
    ("sscs", "quadratic", 250, (1, 2, 3, 4), 0.06),
    ("ddim", "quadratic", 250, (1, 2, 3, 4), 0.06),
]
CASES = [(s, sp, st, o, b) for s, sp, st, orders, b in EXACT_LAW_BOUNDS for o in orders]


@pytest.mark.parametrize(("solver", "spacing", "steps", "order", "bound"), CASES)
def test_sampler_reproduces_scalar_gaussian_law(solver, spacing, steps, order, bound):
    """Exact moments of the discretised sampler (no Monte Carlo error) against the data law."""
    scheduler = HOLDScheduler(order=order, solver=solver, timestep_spacing=spacing)
    data = GaussianData(scheduler, [0.5], [[0.09]])
    mean, cov = exact_sampler_law(data, steps)
    true_mean, true_cov = data.output_law(scheduler.config.sampling_eps, denoised=True)
    assert abs(cov[0, 0] / true_cov[0, 0] - 1) < bound
    # the prior N(0, L_inv) differs from the marginal at T by e^{FT} x0 (worst at order 2: 0.04), hence 0.01
    assert abs(mean[0] - true_mean[0]) < 0.01


@pytest.mark.parametrize("solver", SOLVERS)
def test_sampler_error_falls_with_the_number_of_steps(solver):
    scheduler = HOLDScheduler(order=3, solver=solver, timestep_spacing="quadratic")
    data = GaussianData(scheduler, [0.5], [[0.09]])
    _, true_cov = data.output_law(scheduler.config.sampling_eps, denoised=True)
    errors = [abs(exact_sampler_law(data, steps)[1][0, 0] / true_cov[0, 0] - 1) for steps in (50, 200, 800)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] / errors[2] > 3  # first order: four times the steps, about a quarter of the error


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("solver", SOLVERS)
def test_sampler_reproduces_two_dimensional_gaussian_law(order, solver):
    """Correlated 2-D data, no final denoising: the position block must follow the exact marginal at sampling_eps."""
    scheduler = HOLDScheduler(order=order, solver=solver, timestep_spacing="quadratic", denoise_final=False)
    data = GaussianData(scheduler, [0.5, -0.2], [[0.09, 0.03], [0.03, 0.04]])
    mean, cov = exact_sampler_law(data, 1000)
    true_mean, true_cov = data.output_law(scheduler.config.sampling_eps, denoised=False)
    np.testing.assert_allclose(mean[:2], true_mean, atol=0.01)
    np.testing.assert_allclose(cov[:2, :2], true_cov, rtol=0.02, atol=0.02 * 0.04)


@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("solver", SOLVERS)
def test_step_draws_from_the_discretised_law(order, solver):
    """End to end through set_timesteps / scale_model_input / step with a seeded generator: the samples must follow
    the law implied by the step coefficients, within Monte Carlo error (4 standard errors)."""
    scheduler = HOLDScheduler(order=order, solver=solver, timestep_spacing="quadratic")
    data = GaussianData(scheduler, [0.5, -0.2], [[0.09, 0.03], [0.03, 0.04]])
    num = 20_000
    z = sample_with_exact_score(data, 100, num).numpy()
    mean, cov = exact_sampler_law(data, 100)
    sd = np.sqrt(np.diag(cov))
    assert (np.abs(z.mean(0) - mean) < 4 * sd / math.sqrt(num) + 1e-9).all()
    # standard error of a sample covariance entry: sqrt((cov_ij^2 + cov_ii cov_jj) / N)
    se = np.sqrt((cov**2 + np.outer(sd**2, sd**2)) / num)
    assert (np.abs(np.cov(z.T) - cov) < 4 * se + 1e-9).all()


def test_set_timesteps_takes_numpy_and_tensor_step_counts():
    """Step counts computed with numpy or torch (``np.int64``, a 0-d tensor) are integers too."""
    reference = HOLDScheduler(order=3)
    reference.set_timesteps(12)
    for count in (np.int64(12), torch.tensor(12)):
        scheduler = HOLDScheduler(order=3)
        scheduler.set_timesteps(count)
        torch.testing.assert_close(scheduler.timesteps, reference.timesteps, rtol=0, atol=0)
    for bad in (12.0, np.float64(12), True, torch.tensor([12]), 1):
        with pytest.raises(ValueError, match="num_inference_steps must be an integer"):
            HOLDScheduler(order=3).set_timesteps(bad)
