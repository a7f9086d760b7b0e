"""HOLD dynamics against independent float64 / high-precision references."""

import math

import mpmath
import numpy as np
import pytest
import scipy.linalg
import sympy
import torch
from scipy.integrate import solve_ivp

from diffusers_hold.dynamics import HOLDDynamics, critical_damping

ORDERS = [1, 2, 3, 4, 5, 6]

# docs/HOLD_MATH.md, section 1 (r, xi, gammas)
PUBLISHED = {
    1: (1.0, 1.0, ()),
    2: (1.0, 2.0, (1.0,)),
    3: (1.7321, 5.1962, (1.0, 2.8284)),
    4: (2.2361, 8.9443, (1.0, 2.0, 5.0)),
    5: (2.6458, 13.2288, (1.0, 1.7889, 3.1305, 7.4833)),
    6: (3.0, 18.0, (1.0, 1.6903, 2.6349, 4.3818, 10.2470)),
}


def van_loan_noise_covariance(drift: np.ndarray, diffusion_sq: float, t: float, digits: int = 40) -> np.ndarray:
    """int_0^t e^{Fs} G G^T e^{F^T s} ds from one block matrix exponential (Van Loan 1978).

    The block exponential contains e^{+r t}, so it is evaluated with 40 significant digits (mpmath) to keep the
    reference itself accurate at moderate t.
    """
    n = drift.shape[0]
    gg = np.zeros((n, n))
    gg[-1, -1] = diffusion_sq
    block = np.block([[-drift, gg], [np.zeros((n, n)), drift.T]]) * t
    with mpmath.workdps(digits):
        expm = mpmath.expm(mpmath.matrix(block.tolist()))
        result = expm[n:, n:].T * expm[:n, n:]
        return np.array(result.tolist(), dtype=float)


def series_noise_covariance(dyn: HOLDDynamics, t: float, digits: int = 50) -> mpmath.matrix:
    """The same integral as a Taylor series in t, summed with 50 significant digits."""
    with mpmath.workdps(digits):
        n = dyn.order
        drift = mpmath.matrix(dyn.drift_matrix.tolist())
        term = mpmath.zeros(n, n)
        term[n - 1, n - 1] = mpmath.mpf(dyn.diffusion_sq)
        total = mpmath.zeros(n, n)
        t = mpmath.mpf(t)
        # entry (i, j) starts at t^(2n - i - j - 1); 40 terms past the last start cover every entry at t <= 1e-2
        for k in range(2 * n + 40):
            total += term * (t ** (k + 1) / mpmath.factorial(k + 1))
            term = drift * term + term * drift.T
        return total


@pytest.mark.parametrize("order", ORDERS)
def test_critical_damping_matches_published_table(order):
    r, xi, gammas = critical_damping(order)
    ref_r, ref_xi, ref_gammas = PUBLISHED[order]
    assert r == pytest.approx(ref_r, abs=1e-4)
    assert xi == pytest.approx(ref_xi, abs=1e-4)
    assert gammas == pytest.approx(ref_gammas, abs=1e-4)


@pytest.mark.parametrize("order", ORDERS)
def test_single_eigenvalue_and_nilpotency(order):
    dyn = HOLDDynamics(order)
    drift = dyn.drift_matrix.numpy()
    charpoly = np.poly(drift)
    expected = np.poly(np.full(order, -dyn.r))  # (s + r)^n
    np.testing.assert_allclose(charpoly, expected, rtol=1e-9, atol=1e-9 * dyn.r**order)
    nilpotent = drift + dyn.r * np.eye(order)
    assert np.abs(np.linalg.matrix_power(nilpotent, order)).max() < 1e-9 * max(1.0, dyn.xi**order)
    # stationary law N(0, L^{-1} I) for any L: F + F^T = -2 xi E_nn
    sym = drift + drift.T
    expected_sym = np.zeros((order, order))
    expected_sym[-1, -1] = -2 * dyn.xi
    np.testing.assert_allclose(sym, expected_sym, atol=1e-14)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("t", [0.0, 1e-6, 1e-3, 0.1, 1.0, 3.0, 5.0])
def test_transition_matches_general_matrix_exponential(order, t):
    dyn = HOLDDynamics(order)
    reference = scipy.linalg.expm(dyn.drift_matrix.numpy() * t)
    assert np.abs(dyn.transition(t).numpy() - reference).max() <= 1e-12


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("t", [0.05, 0.3, 1.0, 2.0])
def test_noise_covariance_matches_van_loan(order, t):
    dyn = HOLDDynamics(order)
    reference = van_loan_noise_covariance(dyn.drift_matrix.numpy(), dyn.diffusion_sq, t)
    ours = dyn.noise_covariance(t).numpy()
    assert np.abs(ours - reference).max() <= 1e-9 * np.abs(reference).max()


@pytest.mark.parametrize("order", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("t", [1e-6, 1e-4, 1e-2])
def test_noise_covariance_matches_high_precision_series_at_small_t(order, t):
    """Entry by entry, including the position variance that grows like t^(2n-1)."""
    dyn = HOLDDynamics(order)
    reference = np.array(series_noise_covariance(dyn, t).tolist(), dtype=float)
    ours = dyn.noise_covariance(t).numpy()
    assert (np.abs(reference) > 0).all()
    assert np.abs(ours / reference - 1).max() <= 1e-12


@pytest.mark.parametrize("order", [1, 3, 5])
def test_adjoint_noise_covariance_matches_van_loan_of_transposed_drift(order):
    dyn = HOLDDynamics(order)
    reference = van_loan_noise_covariance(dyn.drift_matrix.numpy().T, dyn.diffusion_sq, 0.4)
    ours = dyn.noise_covariance(0.4, adjoint=True).numpy()
    assert np.abs(ours - reference).max() <= 1e-9 * np.abs(reference).max()


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("L_inv", [1.0, 0.5])
def test_covariance_is_stationary_at_large_t(order, L_inv):
    dyn = HOLDDynamics(order, L_inv=L_inv, eps_num=0.0)
    cov = dyn.covariance(80.0).numpy()
    np.testing.assert_allclose(cov, L_inv * np.eye(order), atol=1e-11)


@pytest.mark.parametrize("order", [2, 3, 4])
def test_covariance_solves_the_lyapunov_equation(order):
    """d Sigma/dt = F Sigma + Sigma F^T + G G^T, checked by a centred finite difference."""
    dyn = HOLDDynamics(order)
    t, h = 0.7, 1e-5
    derivative = (dyn.covariance(t + h) - dyn.covariance(t - h)).numpy() / (2 * h)
    cov = (dyn.covariance(t) - dyn.eps_num * torch.eye(order, dtype=torch.float64)).numpy()
    drift = dyn.drift_matrix.numpy()
    gg = np.zeros((order, order))
    gg[-1, -1] = dyn.diffusion_sq
    np.testing.assert_allclose(derivative, drift @ cov + cov @ drift.T + gg, atol=1e-8)


def test_order_two_equals_cld_closed_form():
    """CLD (Dockhorn et al. 2022; M = 1/4, Gamma = 1, v_0 ~ N(0, gamma M)) is order 2 after rescaling.

    The CLD kernel is derived here symbolically from CLD's own SDE (sympy), independently of the HOLD code:
    with time s = 2 beta t and v' = v / sqrt(M), HOLD order 2 (L_inv = 1, aux_init_var = gamma) must agree.
    """
    beta, t = sympy.Rational(3, 2), sympy.symbols("t", positive=True)
    mass, friction, gamma = sympy.Rational(1, 4), sympy.Integer(1), sympy.Rational(1, 25)
    drift = sympy.Matrix([[0, beta / mass], [-beta, -friction * beta / mass]])
    diffusion = sympy.Matrix([[0, 0], [0, 2 * friction * beta]])
    s = sympy.symbols("s", positive=True)
    expm_s = sympy.simplify((drift * s).exp())
    integrand = expm_s * diffusion * expm_s.T
    noise = integrand.applyfunc(lambda e: sympy.integrate(e, (s, 0, t)))
    expm_t = expm_s.subs(s, t)
    cov0 = sympy.diag(0, gamma * mass)
    cov = noise + expm_t * cov0 * expm_t.T
    mean = expm_t[:, 0]  # x_0 = 1, v_0 mean 0

    dyn = HOLDDynamics(2, L_inv=1.0, aux_init_var=float(gamma), eps_num=0.0)
    scale = np.diag([1.0, 1.0 / math.sqrt(float(mass))])  # v' = v / sqrt(M)
    for t_value in [0.01, 0.2, 1.0, 2.5]:
        cld_cov = np.array(cov.subs(t, t_value).evalf(30).tolist(), dtype=float)
        cld_mean = np.array(mean.subs(t, t_value).evalf(30).tolist(), dtype=float)[:, 0]
        hold_time = 2 * float(beta) * t_value
        np.testing.assert_allclose(dyn.covariance(hold_time).numpy(), scale @ cld_cov @ scale, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(dyn.mean_coefficients(hold_time).numpy(), scale @ cld_mean, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_cholesky_accurate_and_finite_near_zero(order):
    dyn = HOLDDynamics(order)
    t = torch.tensor([1e-7, 1e-5, 1e-3, 0.1, 5.0], dtype=torch.float64)
    chol = dyn.cholesky(t)
    cov = dyn.covariance(t)
    assert torch.isfinite(chol).all()
    assert torch.allclose(chol @ chol.transpose(-1, -2), cov, rtol=1e-12, atol=1e-15)
    assert torch.equal(chol, torch.tril(chol))


def test_cholesky_failure_raises():
    dyn = HOLDDynamics(3, eps_num=0.0)
    with pytest.raises(ValueError, match="Cholesky"):
        dyn.cholesky(0.0)  # Sigma_0 is singular in the position block without eps_num


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_kernel_score_scale_and_x0_inversion(order):
    """z = a x0 + L eps: the last-block score is -eps_n / L_nn and x0 is recovered exactly from eps_n."""
    dyn = HOLDDynamics(order)
    gen = torch.Generator().manual_seed(0)
    for t in [1e-3, 0.5, 4.0]:
        a, chol = dyn.mean_coefficients(t), dyn.cholesky(t)
        x0 = torch.randn(64, generator=gen, dtype=torch.float64)
        eps = torch.randn(64, order, generator=gen, dtype=torch.float64)
        z = a * x0[:, None] + eps @ chol.T
        precision = torch.linalg.inv(dyn.covariance(t))
        exact_score = -(z - a * x0[:, None]) @ precision  # grad_z log p(z | x0)
        torch.testing.assert_close(exact_score[:, -1], -eps[:, -1] * dyn.score_scale(t), rtol=1e-9, atol=1e-9)
        ell, c = dyn.x0_coefficients(t)
        torch.testing.assert_close((z @ ell - eps[:, -1]) / c, x0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_sufficient_statistic_is_unbiased_with_stated_variance(order):
    dyn = HOLDDynamics(order)
    for t in [0.01, 0.7, 3.0]:
        weights, variance = dyn.sufficient_statistic(t)
        a, cov = dyn.mean_coefficients(t), dyn.covariance(t)
        assert float(weights @ a) == pytest.approx(1.0, rel=1e-12)  # w^T z = x0 + noise
        assert float(weights @ cov @ weights) == pytest.approx(float(variance), rel=1e-9)
        # minimum variance: no other unbiased linear statistic does better (e.g. q / a_1)
        assert float(variance) <= float(cov[0, 0] / a[0] ** 2) * (1 + 1e-12)


def test_order_one_is_vp():
    dyn = HOLDDynamics(1, eps_num=0.0)
    t = torch.tensor([0.01, 0.5, 2.0], dtype=torch.float64)
    alpha_bar = torch.exp(-2 * t)
    torch.testing.assert_close(dyn.mean_coefficients(t)[:, 0], alpha_bar.sqrt())
    torch.testing.assert_close(dyn.covariance(t)[:, 0, 0], 1 - alpha_bar)
    torch.testing.assert_close(dyn.snr(t), alpha_bar / (1 - alpha_bar))
    _, variance = dyn.sufficient_statistic(t)
    torch.testing.assert_close(1 / variance, alpha_bar / (1 - alpha_bar))


@pytest.mark.parametrize("order", [2, 4])
def test_transport_matches_stiff_ode_solver(order):
    """Phi = R_t' R_t^{-1} against scipy's Radau on dPhi/ds = (F + 1/2 G G^T Sigma_s^{-1}) Phi."""
    dyn = HOLDDynamics(order)

    def rhs(s, y):
        generator = dyn.drift_matrix.numpy().copy()
        generator[-1] += 0.5 * dyn.diffusion_sq * np.linalg.solve(dyn.covariance(s).numpy(), np.eye(order)[-1])
        return (generator @ y.reshape(order, order)).ravel()

    for t, t_next in [(2.0, 0.5), (0.1, 0.001)]:
        ref = solve_ivp(rhs, (t, t_next), np.eye(order).ravel(), method="Radau", rtol=1e-11, atol=1e-13)
        phi = dyn.transport(t, t_next).numpy()
        assert np.abs(phi - ref.y[:, -1].reshape(order, order)).max() <= 1e-4 * np.abs(phi).max()
        cov_t, cov_next = dyn.covariance(t).numpy(), dyn.covariance(t_next).numpy()
        np.testing.assert_allclose(phi @ cov_t @ phi.T, cov_next, rtol=1e-9, atol=1e-12)


def test_invalid_parameters_raise():
    for kwargs, name in [
        ({"order": 0}, "order"),
        ({"order": 2.5}, "order"),
        ({"order": 3, "L_inv": 0.0}, "L_inv"),
        ({"order": 3, "aux_init_var": -1.0}, "aux_init_var"),
        ({"order": 3, "eps_num": float("nan")}, "eps_num"),
    ]:
        with pytest.raises(ValueError, match=name):
            HOLDDynamics(**kwargs)
