"""Timestep samplers: draws against laws written down from their definitions (scipy), for DDPM and HOLD schedulers.

The reference laws here are built from the documented definitions and the schedulers' own ``alphas_cumprod`` /
``snr``, never from the samplers' tables or distribution functions.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from scipy import stats

from diffusers_hold import HOLDScheduler
from diffusers_hold.mitigations import (
    TIMESTEP_SAMPLERS,
    LogitNormalTimestepSampler,
    SNRIntervalTimestepSampler,
    TimestepAxis,
    UniformTimestepSampler,
    get_timestep_sampler,
)

DRAWS = 40_000
P_MIN = 1e-3
TAILS = ["renormalize", "clip", "redistribute_uniform"]


@pytest.fixture(scope="module")
def ddpm():
    return DDPMScheduler(num_train_timesteps=1000)


@pytest.fixture(scope="module")
def hold():
    return HOLDScheduler(order=3)


def draw(sampler, n=DRAWS, seed=0):
    timesteps, weights = sampler.sample(n, generator=torch.Generator().manual_seed(seed))
    return timesteps, weights.double().numpy()


def hold_u(scheduler, timesteps):
    """u = (t - train_eps) / (T - train_eps) from HOLD model timesteps."""
    t = scheduler.timestep_to_time(timesteps).numpy()
    eps, horizon = scheduler.config.train_eps, scheduler.config.T
    return np.clip((t - eps) / (horizon - eps), 0.0, 1.0)


def hold_timesteps_of_u(scheduler, u):
    eps, horizon = scheduler.config.train_eps, scheduler.config.T
    return scheduler.time_to_timestep(torch.from_numpy(eps + (horizon - eps) * u)).clamp(max=1000)


def hold_logsnr(scheduler, timesteps):
    return np.log(scheduler.snr(timesteps).numpy())


def ddpm_logsnr(scheduler):
    alphas_cumprod = scheduler.alphas_cumprod.double().numpy()
    return np.log(alphas_cumprod) - np.log1p(-alphas_cumprod)


def gaussian_of(c_low, c_high, confidence):
    """(mean, std) of the Gaussian whose central `confidence` mass is the interval."""
    z = stats.norm.ppf((1 + confidence) / 2)
    return (c_low + c_high) / 2, (c_high - c_low) / (2 * z)


def reference_cdf(c_low, c_high, confidence, tails, mixture, low=0.0, high=1.0):
    """CDF on [low, high] of the tail-handled Gaussian mixed with the uniform law, from the definitions."""
    mean, std = gaussian_of(c_low, c_high, confidence)
    phi_a, phi_b = stats.norm.cdf([(low - mean) / std, (high - mean) / std])

    def cdf(x):
        x = np.asarray(x, dtype=np.float64)
        phi = stats.norm.cdf((np.clip(x, low, high) - mean) / std)
        uniform = np.clip((x - low) / (high - low), 0.0, 1.0)
        if tails == "renormalize":
            gaussian, to_uniform = (phi - phi_a) / (phi_b - phi_a), 0.0
        elif tails == "clip":
            gaussian, to_uniform = np.where(x >= high, 1.0, phi), 0.0
        else:
            gaussian, to_uniform = phi - phi_a, 1.0 - (phi_b - phi_a)
        gaussian = np.where(x < low, 0.0, gaussian)
        return (1 - mixture) * gaussian + (mixture + (1 - mixture) * to_uniform) * uniform

    return cdf


def assert_discrete_law(values, probabilities, bins=40):
    """Chi-square test of integer draws against probabilities, cells pooled into about `bins` equal-mass groups."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    assert probabilities.min() >= 0 and abs(probabilities.sum() - 1) < 1e-9
    midpoints = np.cumsum(probabilities) - probabilities / 2
    group = np.minimum((midpoints * bins).astype(int), bins - 1)
    observed = np.bincount(group[values], minlength=bins)
    expected = np.bincount(group, weights=probabilities, minlength=bins) * len(values)
    used = expected > 0
    assert observed[~used].sum() == 0
    assert stats.chisquare(observed[used], expected[used]).pvalue > P_MIN


def cell_probabilities(cdf, n):
    """P(k) = mass of the cell [k / n, (k + 1) / n) of u, timestep k = floor(n * u)."""
    edges = cdf(np.arange(1, n) / n)
    return np.diff(np.concatenate([[0.0], edges, [1.0]]))


# ------------------------------------------------------------------------------------------------ laws in u space
@pytest.mark.parametrize("tails", ["renormalize", "redistribute_uniform"])
@pytest.mark.parametrize("mixture", [0.0, 0.3])
def test_hold_u_draws_follow_the_continuous_law(hold, tails, mixture):
    interval, confidence = (0.05, 0.45), 0.9
    sampler = SNRIntervalTimestepSampler(hold, *interval, confidence=confidence, tails=tails, uniform_mixture=mixture)
    u = hold_u(hold, draw(sampler)[0])
    cdf = reference_cdf(*interval, confidence, tails, mixture)
    assert stats.kstest(u, cdf).pvalue > P_MIN


def test_renormalize_is_scipys_truncated_normal(hold):
    sampler = SNRIntervalTimestepSampler(hold, 0.0, 0.3, confidence=0.8)
    mean, std = gaussian_of(0.0, 0.3, 0.8)
    truncated = stats.truncnorm((0 - mean) / std, (1 - mean) / std, loc=mean, scale=std)
    assert stats.kstest(hold_u(hold, draw(sampler)[0]), truncated.cdf).pvalue > P_MIN
    grid = np.linspace(0.001, 0.999, 501)
    np.testing.assert_allclose(sampler.density(torch.from_numpy(grid)).numpy(), truncated.pdf(grid), rtol=1e-9)
    np.testing.assert_allclose(sampler.cdf(torch.from_numpy(grid)).numpy(), truncated.cdf(grid), atol=1e-12)


def test_clip_law_has_atoms_of_the_right_mass_and_a_gaussian_inside(hold):
    interval, confidence = (0.0, 0.3), 0.8
    mean, std = gaussian_of(*interval, confidence)
    sampler = SNRIntervalTimestepSampler(hold, *interval, confidence=confidence, tails="clip")
    timesteps, _ = draw(sampler)
    t = hold.timestep_to_time(timesteps).numpy()
    at_start = np.isclose(t, hold.config.train_eps, rtol=1e-6, atol=0)
    low_mass = stats.norm.cdf((0 - mean) / std)  # about 0.1
    assert abs(at_start.mean() - low_mass) < 4 * math.sqrt(low_mass * (1 - low_mass) / DRAWS)
    assert not np.isclose(t, hold.config.T).any()  # the upper atom has mass 1 - Phi(7.5)
    inside = hold_u(hold, timesteps[torch.from_numpy(~at_start)])
    truncated = stats.truncnorm((0 - mean) / std, (1 - mean) / std, loc=mean, scale=std)
    assert stats.kstest(inside, truncated.cdf).pvalue > P_MIN


@pytest.mark.parametrize("tails", TAILS)
def test_ddpm_timesteps_follow_the_cell_masses(ddpm, tails):
    interval, confidence, mixture = (0.0, 0.3), 0.8, 0.1
    sampler = SNRIntervalTimestepSampler(ddpm, *interval, confidence=confidence, tails=tails, uniform_mixture=mixture)
    timesteps, _ = draw(sampler)
    assert timesteps.dtype == torch.int64
    probabilities = cell_probabilities(reference_cdf(*interval, confidence, tails, mixture), 1000)
    assert_discrete_law(timesteps.numpy(), probabilities)


def test_confidence_interval_holds_the_confidence_mass(hold):
    interval, confidence = (0.35, 0.6), 0.9
    sampler = SNRIntervalTimestepSampler(hold, *interval, confidence=confidence, tails="clip")
    u = hold_u(hold, draw(sampler)[0])
    fraction = ((u >= interval[0]) & (u <= interval[1])).mean()
    assert abs(fraction - confidence) < 4 * math.sqrt(confidence * (1 - confidence) / DRAWS)
    assert sampler.mean == pytest.approx(0.475) and sampler.std == pytest.approx(0.125 / stats.norm.ppf(0.95))


# ------------------------------------------------------------------------------------------- laws in log-SNR space
@pytest.mark.parametrize("tails", ["renormalize", "redistribute_uniform"])
def test_hold_logsnr_of_drawn_timesteps_is_gaussian(hold, tails):
    interval, confidence = (8.0, 13.0), 0.5  # about 19 % of the Gaussian lies above the largest log-SNR
    low, high = np.log(hold.snr(torch.tensor([1000.0, hold.config.train_eps * 1000 / hold.config.T])).numpy())
    sampler = SNRIntervalTimestepSampler(hold, *interval, confidence=confidence, space="logsnr", tails=tails)
    assert sampler.axis.logsnr_range == pytest.approx((low, high), abs=1e-9)
    timesteps, _ = draw(sampler)
    logsnr = hold_logsnr(hold, timesteps)
    if tails == "renormalize":
        assert stats.kstest(logsnr, reference_cdf(*interval, confidence, tails, 0.0, low, high)).pvalue > P_MIN
    else:
        # Gaussian inside the range plus the outside mass spread uniformly over u (not over log-SNR)
        mean, std = gaussian_of(*interval, confidence)
        phi_low, phi_high = stats.norm.cdf([(low - mean) / std, (high - mean) / std])
        grid = np.linspace(0, 1, 20001)
        grid_logsnr = hold_logsnr(hold, hold_timesteps_of_u(hold, grid))

        def cdf(u):
            # P(U <= u) = P(logsnr(u) <= logsnr <= high) for the Gaussian part: the log-SNR decreases with u
            gaussian = phi_high - stats.norm.cdf((np.interp(u, grid, grid_logsnr) - mean) / std)
            return gaussian + (1 - (phi_high - phi_low)) * u

        u = hold_u(hold, timesteps)
        assert stats.kstest(u, cdf).pvalue > P_MIN


def test_ddpm_logsnr_draws_pick_the_timestep_with_the_nearest_logsnr(ddpm):
    interval, confidence = (-6.0, 4.0), 0.95
    logsnr = ddpm_logsnr(ddpm)  # decreasing in k
    sampler = SNRIntervalTimestepSampler(ddpm, *interval, confidence=confidence, space="logsnr", tails="clip")
    assert sampler.axis.logsnr_range == pytest.approx((logsnr[-1], logsnr[0]))
    # timestep k owns the log-SNR values nearer to logsnr[k] than to its neighbours'
    upper = np.concatenate([[logsnr[0]], (logsnr[1:] + logsnr[:-1]) / 2])
    lower = np.concatenate([(logsnr[1:] + logsnr[:-1]) / 2, [-np.inf]])  # the clip atom at the low end is timestep N-1
    mean, std = gaussian_of(*interval, confidence)
    probabilities = stats.norm.cdf((upper - mean) / std) - stats.norm.cdf((lower - mean) / std)
    probabilities[0] += stats.norm.sf((logsnr[0] - mean) / std)  # the clip atom at the high end is timestep 0
    timesteps, _ = draw(sampler)
    assert_discrete_law(timesteps.numpy(), probabilities)


def test_logit_normal_draws(hold, ddpm):
    sampler = LogitNormalTimestepSampler(hold, mean=-0.5, std=0.8)
    reference = stats.norm(-0.5, 0.8)
    assert stats.kstest(hold_u(hold, draw(sampler)[0]), lambda u: reference.cdf(np.log(u / (1 - u)))).pvalue > P_MIN
    grid = np.linspace(0.01, 0.99, 99)
    expected_density = reference.pdf(np.log(grid / (1 - grid))) / (grid * (1 - grid))
    np.testing.assert_allclose(sampler.density(torch.from_numpy(grid)).numpy(), expected_density, rtol=1e-9)
    ddpm_sampler = LogitNormalTimestepSampler(ddpm, mean=-0.5, std=0.8)
    probabilities = cell_probabilities(lambda u: reference.cdf(np.log(u / (1 - u))), 1000)
    assert_discrete_law(draw(ddpm_sampler)[0].numpy(), probabilities)


# ------------------------------------------------------------------------------------------------ importance weights
def test_importance_weights_recover_the_uniform_mean_for_ddpm(ddpm):
    sampler = SNRIntervalTimestepSampler(ddpm, 0.05, 0.45, uniform_mixture=0.2, importance_weights=True)
    timesteps, weights = draw(sampler)
    k = np.arange(1000)
    f = np.cos(2 * np.pi * k / 1000) + (k / 1000) ** 2
    estimate = weights * f[timesteps.numpy()]
    error = 4 * estimate.std() / math.sqrt(DRAWS)
    assert abs(estimate.mean() - f.mean()) < error
    assert abs(weights.mean() - 1) < 4 * weights.std() / math.sqrt(DRAWS)
    assert weights.max() <= 1 / 0.2 + 1e-6


@pytest.mark.parametrize("space, interval", [("u", (0.6, 0.9)), ("logsnr", (-4.0, 6.0))])
def test_importance_weights_recover_the_uniform_mean_for_hold(hold, space, interval):
    sampler = SNRIntervalTimestepSampler(
        hold, *interval, space=space, tails="clip", confidence=0.8, uniform_mixture=0.25, importance_weights=True
    )
    timesteps, weights = draw(sampler)
    horizon, eps = hold.config.T, hold.config.train_eps
    t = hold.timestep_to_time(timesteps).numpy()
    f = np.cos(2 * np.pi * t / horizon) + t / horizon
    exact = ((math.sin(2 * math.pi) - math.sin(2 * math.pi * eps / horizon)) * horizon / (2 * math.pi)) / (
        horizon - eps
    ) + (horizon + eps) / (2 * horizon)
    estimate = weights * f
    assert abs(estimate.mean() - exact) < 4 * estimate.std() / math.sqrt(DRAWS)
    # the clip atoms get weight 0: the uniform law gives those points no mass
    at_ends = np.isclose(t, eps, rtol=1e-6, atol=0) | np.isclose(t, horizon, rtol=1e-9, atol=0)
    assert at_ends.any() and (weights[at_ends] == 0).all() and (weights[~at_ends] > 0).all()


def test_weights_are_ones_without_importance_weighting(ddpm, hold):
    for scheduler in (ddpm, hold):
        for sampler in (UniformTimestepSampler(scheduler), SNRIntervalTimestepSampler(scheduler, 0.1, 0.2)):
            timesteps, weights = sampler.sample(16)
            assert weights.dtype == torch.float32 and torch.equal(weights, torch.ones(16))


# ----------------------------------------------------------------------------------------- units, ranges, seeding
def test_timestep_units_and_ranges(ddpm, hold):
    ddpm_timesteps, _ = SNRIntervalTimestepSampler(ddpm, 0.0, 1.0, confidence=0.5, tails="clip").sample(DRAWS)
    assert ddpm_timesteps.dtype == torch.int64
    assert ddpm_timesteps.min() == 0 and ddpm_timesteps.max() == 999
    hold_timesteps, _ = SNRIntervalTimestepSampler(hold, 0.0, 1.0, confidence=0.5, tails="clip").sample(DRAWS)
    assert hold_timesteps.dtype == torch.float32
    low = hold.config.train_eps * 1000 / hold.config.T
    assert hold_timesteps.min().item() == pytest.approx(low, rel=1e-6) and hold_timesteps.max().item() == 1000.0
    hold.snr(hold_timesteps)  # every drawn timestep is valid for the scheduler


def test_u_maps_to_timesteps_by_the_documented_rule(ddpm, hold):
    # DDPM: timestep k owns the cell [k / N, (k + 1) / N); HOLD: t = train_eps + (T - train_eps) u
    for scheduler in (ddpm, hold):
        sampler = SNRIntervalTimestepSampler(scheduler, 0.0, 1.0, confidence=0.5, tails="clip")
        u = sampler.sample_u(2000, generator=torch.Generator().manual_seed(4))
        timesteps, _ = sampler.sample(2000, generator=torch.Generator().manual_seed(4))
        assert (u == 0).any() and (u == 1).any()
        if scheduler is ddpm:
            assert torch.equal(timesteps, (1000 * u).floor().clamp(max=999).long())
        else:
            eps, horizon = hold.config.train_eps, hold.config.T
            torch.testing.assert_close(timesteps, ((eps + (horizon - eps) * u) * 1000 / horizon).float())


def test_axis_logsnr_follows_the_schedulers_own(ddpm, hold):
    axis = TimestepAxis(ddpm)
    centres = (np.arange(1000) + 0.5) / 1000
    np.testing.assert_allclose(axis.logsnr_from_u(torch.from_numpy(centres)).numpy(), ddpm_logsnr(ddpm), rtol=1e-12)
    axis = TimestepAxis(hold)
    u = np.linspace(0, 1, 3001)
    timesteps = hold_timesteps_of_u(hold, u)
    np.testing.assert_allclose(
        axis.logsnr_from_u(torch.from_numpy(u)).numpy(), hold_logsnr(hold, timesteps), atol=1e-3
    )
    logsnr = np.linspace(*axis.logsnr_range, 101)[1:-1]
    back = hold_logsnr(hold, hold_timesteps_of_u(hold, axis.u_from_logsnr(torch.from_numpy(logsnr)).numpy()))
    np.testing.assert_allclose(back, logsnr, atol=1e-3)


def test_uniform_sampler_matches_the_stock_draws(ddpm, hold):
    timesteps, _ = UniformTimestepSampler(ddpm).sample(64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(timesteps, torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3)))
    timesteps, _ = UniformTimestepSampler(hold).sample(64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(timesteps, hold.sample_timesteps(64, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("name", ["uniform", "snr_interval", "logit_normal"])
def test_draws_are_reproducible_with_a_generator(hold, name):
    kwargs = {"c_low": 0.2, "c_high": 0.4} if name == "snr_interval" else {}
    sampler = get_timestep_sampler(name, hold, **kwargs)
    assert isinstance(sampler, TIMESTEP_SAMPLERS[name])
    first, second, other = (sampler.sample(32, generator=torch.Generator().manual_seed(s))[0] for s in (1, 1, 2))
    assert torch.equal(first, second) and not torch.equal(first, other)


def test_device_argument(ddpm):
    timesteps, weights = SNRIntervalTimestepSampler(ddpm, 0.1, 0.2).sample(4, device="cpu")
    assert timesteps.device.type == "cpu" and weights.device.type == "cpu"


# --------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"c_low": 0.5, "c_high": 0.5}, "smaller than c_high"),
        ({"c_low": 0.6, "c_high": 0.2}, "smaller than c_high"),
        ({"c_low": -0.1, "c_high": 0.2}, "valid u range"),
        ({"c_low": 0.1, "c_high": 1.2}, "valid u range"),
        ({"c_low": 0.1, "c_high": float("nan")}, "finite"),
        ({"c_low": 0.1, "c_high": 0.2, "confidence": 1.0}, "confidence"),
        ({"c_low": 0.1, "c_high": 0.2, "confidence": 0.0}, "confidence"),
        ({"c_low": 0.1, "c_high": 0.2, "uniform_mixture": 1.5}, "uniform_mixture"),
        ({"c_low": 0.1, "c_high": 0.2, "space": "t"}, "Unknown space"),
        ({"c_low": 0.1, "c_high": 0.2, "tails": "wrap"}, "Unknown tails"),
        ({"c_low": 0.1, "c_high": 0.2, "importance_weights": 1}, "importance_weights"),
        ({"c_low": -30.0, "c_high": 2.0, "space": "logsnr"}, "valid logsnr range"),
    ],
)
def test_bad_interval_arguments_raise(ddpm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SNRIntervalTimestepSampler(ddpm, **kwargs)


def test_other_bad_input_raises(ddpm):
    with pytest.raises(ValueError, match="alphas_cumprod"):
        UniformTimestepSampler(FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="infinite"):
        SNRIntervalTimestepSampler(DDPMScheduler(rescale_betas_zero_snr=True), -2.0, 2.0, space="logsnr")
    with pytest.raises(ValueError, match="Unknown timestep sampling"):
        get_timestep_sampler("beta", ddpm)
    with pytest.raises(ValueError, match="std"):
        LogitNormalTimestepSampler(ddpm, std=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        UniformTimestepSampler(ddpm).sample(0)
