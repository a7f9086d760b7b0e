"""The HOLD linear SDE in float64: the one place where the mathematics of the project lives.

Higher-order Langevin dynamics of order ``n`` evolve a state ``z = (z_1, ..., z_n)`` whose blocks are each shaped
like the data (``z_1 = q`` is the data, ``z_2`` its velocity, ``z_3`` its acceleration, ...):

    dz = F z dt + G dW,    F = sum_i gamma_i (E_{i,i+1} - E_{i+1,i}) - xi E_{n,n},    G G^T = (2 xi / L) E_{n,n}

Noise enters only the last block; the stationary law is ``N(0, L^{-1} I)`` for every order. With critical damping
``F`` has the single eigenvalue ``-r`` of multiplicity ``n``, so ``N = F + r I`` is nilpotent and every matrix
function below is a finite polynomial in ``N``: no eigendecomposition, no series truncation.

All matrices are ``n x n`` and act block-wise on the channel axis of a tensor whose channels are ``[z_1 | ... | z_n]``
(the ``kron(F, I_d)`` matrix is never built). Everything here is computed in float64 on the CPU; callers cast the
final per-sample coefficients to the model's dtype and device. The module imports torch only.

Reference: ``docs/HOLD_MATH.md`` (sections 1-5); CLD (Dockhorn et al. 2022) is order 2, VP/OU is order 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["HOLDDynamics", "LinearStep", "critical_damping"]

_F64 = torch.float64


def critical_damping(order: int) -> tuple[float, float, tuple[float, ...]]:
    """Critically damped HOLD parameters ``(r, xi, gammas)`` for ``order`` blocks.

    ``F`` then has characteristic polynomial ``(s + r)^order``: the fastest decay without oscillation.

    Args:
        order (`int`): number of blocks ``n >= 1`` (1 is the VP / Ornstein-Uhlenbeck process).

    Returns:
        `tuple`: ``r`` (the negated eigenvalue), ``xi`` (friction on the last block) and the ``n - 1`` couplings
        ``gamma_k = r sqrt((n^2 - (n - k)^2) / (4 (n - k)^2 - 1))`` (``gamma_1 = 1``).
    """
    if not isinstance(order, int) or isinstance(order, bool) or order < 1:
        raise ValueError(f"HOLD order must be an integer >= 1, got {order!r}.")
    n = order
    r = 1.0 if n == 1 else math.sqrt(2 * n - 3)
    xi = n * r
    gammas = tuple(r * math.sqrt((n * n - (n - k) ** 2) / (4 * (n - k) ** 2 - 1)) for k in range(1, n))
    return r, xi, gammas


@dataclass(frozen=True)
class LinearStep:
    """One sampler step written as ``z' = state_matrix @ z + eps_vector * eps_hat + noise_matrix @ noise``.

    ``z`` is the state with its blocks on a leading axis of size ``n``, ``eps_hat`` the model's prediction of the last
    block's noise and ``noise`` standard normal in every block. Every sampler of this module, and the final denoising
    step, has this form because the dynamics are linear and the model enters only through ``eps_hat``.

    Attributes:
        state_matrix (`torch.Tensor` of shape `(..., n, n)`): linear map of the current state.
        eps_vector (`torch.Tensor` of shape `(..., n)`): how the predicted noise enters each block.
        noise_matrix (`torch.Tensor` of shape `(..., n, n)` or `None`): square root of the injected noise covariance;
            `None` for a deterministic step.
    """

    state_matrix: torch.Tensor
    eps_vector: torch.Tensor
    noise_matrix: torch.Tensor | None


def _as_time(t: torch.Tensor | float) -> torch.Tensor:
    return torch.as_tensor(t, dtype=_F64, device="cpu")


def _jacobi_cholesky(cov: torch.Tensor, what: str) -> torch.Tensor:
    """Lower Cholesky factor of a batch of SPD matrices, computed on the correlation matrix.

    Block variances of HOLD covariances span many decades near ``t -> 0`` (the position variance grows like
    ``t^(2n-1)``); scaling to unit diagonal first keeps the factorisation well conditioned. Raises instead of masking
    a failure.
    """
    scale = torch.diagonal(cov, dim1=-2, dim2=-1).sqrt()
    corr = cov / (scale[..., :, None] * scale[..., None, :])
    chol, info = torch.linalg.cholesky_ex(corr)
    if torch.any(info != 0) or not torch.isfinite(scale).all():
        raise ValueError(f"Cholesky factorisation of the {what} failed: the matrix is not positive definite.")
    return scale[..., :, None] * chol


class HOLDDynamics:
    """Critically damped higher-order Langevin dynamics, with everything the schedulers need, in float64.

    Times ``t`` are continuous (``0 <= t``); every method accepts a scalar or a tensor of times of any shape and
    returns float64 CPU tensors with the matrix axes appended.

    Args:
        order (`int`): number of blocks ``n >= 1``.
        L_inv (`float`): stationary variance ``L^{-1}`` of every block (also the sampling prior's variance).
        aux_init_var (`float`): ``alpha``; the auxiliary blocks start as ``N(0, alpha L^{-1})`` and are marginalised
            analytically (hybrid score matching).
        eps_num (`float`): jitter added to the diagonal of every kernel covariance.
    """

    def __init__(self, order: int, L_inv: float = 1.0, aux_init_var: float = 0.08, eps_num: float = 1e-6):
        self.r, self.xi, self.gammas = critical_damping(order)
        for name, value in (("L_inv", L_inv), ("aux_init_var", aux_init_var)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}.")
        if not (isinstance(eps_num, (int, float)) and math.isfinite(eps_num) and eps_num >= 0):
            raise ValueError(f"eps_num must be a non-negative finite number, got {eps_num!r}.")
        self.order = n = order
        self.L_inv = float(L_inv)
        self.aux_init_var = float(aux_init_var)
        self.eps_num = float(eps_num)

        drift = torch.zeros(n, n, dtype=_F64)
        for k, gamma in enumerate(self.gammas):
            drift[k, k + 1] = gamma
            drift[k + 1, k] = -gamma
        drift[n - 1, n - 1] = -self.xi
        self.drift_matrix = drift
        self.nilpotent = drift + self.r * torch.eye(n, dtype=_F64)
        # G G^T = diffusion_sq * E_nn
        self.diffusion_sq = 2.0 * self.xi * self.L_inv
        self.initial_covariance = torch.diag(
            torch.tensor([0.0] + [self.aux_init_var * self.L_inv] * (n - 1), dtype=_F64)
        )
        powers = [torch.eye(n, dtype=_F64)]
        for _ in range(n - 1):
            powers.append(powers[-1] @ self.nilpotent)
        # N^k / k!, the terms of the terminating exponential series
        self._scaled_powers = torch.stack([p / math.factorial(k) for k, p in enumerate(powers)])

    # ----------------------------------------------------------------------------------------------------- kernel
    def transition(self, t: torch.Tensor | float) -> torch.Tensor:
        """Exact matrix exponential ``e^{F t} = e^{-r t} sum_{k<n} t^k N^k / k!``, shape ``(..., n, n)``."""
        t = _as_time(t)
        k = torch.arange(self.order, dtype=_F64)
        t_pows = t[..., None] ** k  # (..., n)
        series = torch.einsum("...k,kij->...ij", t_pows, self._scaled_powers)
        return torch.exp(-self.r * t)[..., None, None] * series

    def noise_covariance(self, t: torch.Tensor | float, adjoint: bool = False) -> torch.Tensor:
        """``int_0^t e^{A s} G G^T e^{A^T s} ds`` for ``A = F`` (``A = F^T`` if ``adjoint``), shape ``(..., n, n)``.

        Uses the incomplete-gamma form, accurate to a few ulps at every ``t`` including ``t -> 0``:
        ``sum_{j,k} u_j u_k^T I_{j+k}(t)`` with ``u_j = N^j e_n / j!`` and
        ``I_m(t) = int_0^t s^m e^{-2 r s} ds = m! / (2r)^(m+1) P(m + 1, 2 r t)``.
        ``adjoint=True`` is the free (A) part of the splitting sampler, whose drift is exactly ``F^T``.
        """
        t = _as_time(t)
        n = self.order
        powers = self._scaled_powers.transpose(-1, -2) if adjoint else self._scaled_powers
        u = powers[:, :, n - 1]  # (n, n): u[j] = N^j e_n / j!
        m = torch.arange(2 * n - 1, dtype=_F64)
        log_prefactor = torch.lgamma(m + 1) - (m + 1) * math.log(2 * self.r)
        integrals = torch.exp(log_prefactor) * torch.special.gammainc(m + 1, 2 * self.r * t[..., None])  # (..., 2n-1)
        jk = torch.arange(n)[:, None] + torch.arange(n)[None, :]
        weights = integrals[..., jk]  # (..., n, n) = I_{j+k}
        return self.diffusion_sq * torch.einsum("...jk,ja,kb->...ab", weights, u, u)

    def covariance(self, t: torch.Tensor | float) -> torch.Tensor:
        """Kernel covariance ``Sigma_t = Sigma_t^noise + e^{Ft} Sigma_0 e^{Ft}^T + eps_num I`` of ``p(z_t | x_0)``."""
        expm = self.transition(t)
        cov = self.noise_covariance(t) + expm @ self.initial_covariance @ expm.transpose(-1, -2)
        return cov + self.eps_num * torch.eye(self.order, dtype=_F64)

    def cholesky(self, t: torch.Tensor | float) -> torch.Tensor:
        """Lower Cholesky factor ``L_t`` of ``Sigma_t`` with the noised (last) block ordered last, ``(..., n, n)``."""
        return _jacobi_cholesky(self.covariance(t), "HOLD kernel covariance")

    def mean_coefficients(self, t: torch.Tensor | float) -> torch.Tensor:
        """``a_t = e^{Ft} e_1``: the kernel mean is ``a_t x_0`` block by block (auxiliaries start at mean 0)."""
        return self.transition(t)[..., :, 0]

    def score_scale(self, t: torch.Tensor | float) -> torch.Tensor:
        """``1 / L_t[n, n]``: the last-block score is ``-eps_n * score_scale``, shape ``(...)``."""
        return 1.0 / self.cholesky(t)[..., -1, -1]

    def x0_coefficients(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ell_t, c_t)`` such that ``x0_hat = (ell_t . z_t - eps_n) / c_t``.

        ``ell_t = (L_t^{-1})_{n,:}`` (shape ``(..., n)``) whitens the state, ``c_t = ell_t . a_t`` (shape ``(...)``).
        """
        chol = self.cholesky(t)
        eye = torch.eye(self.order, dtype=_F64).expand_as(chol)
        ell = torch.linalg.solve_triangular(chol, eye, upper=False)[..., -1, :]
        c = (ell * self.mean_coefficients(t)).sum(-1)
        return ell, c

    def sufficient_statistic(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_t, sigma2_t)`` with ``w_t . z_t = x_0 + N(0, sigma2_t)`` per pixel (``docs/HOLD_MATH.md`` section 4).

        ``w_t = Sigma_t^{-1} a_t / (a_t^T Sigma_t^{-1} a_t)`` (shape ``(..., n)``) and
        ``sigma2_t = 1 / (a_t^T Sigma_t^{-1} a_t)`` (shape ``(...)``). Since ``p(z_t | x_0)`` depends on ``x_0``
        only through this statistic, ``E[x_0 | z_t]`` equals a VP denoiser's answer at ``alpha_bar = 1/(1+sigma2)``.
        """
        a = self.mean_coefficients(t)
        precision_a = torch.cholesky_solve(a[..., None], self.cholesky(t))[..., 0]
        info = (precision_a * a).sum(-1)
        return precision_a / info[..., None], 1.0 / info

    def snr(self, t: torch.Tensor | float) -> torch.Tensor:
        """Signal-to-noise ratio of the position marginal: ``SNR(t) = (a_t[1])^2 / Sigma_t[1, 1]``, shape ``(...)``."""
        return self.mean_coefficients(t)[..., 0] ** 2 / self.covariance(t)[..., 0, 0]

    # ---------------------------------------------------------------------------------------- sampler coefficients
    def euler_maruyama_step(self, t: torch.Tensor | float, t_next: torch.Tensor | float) -> LinearStep:
        """Euler-Maruyama on the reverse SDE ``dz = [-F z + G G^T S] dtau + G dW`` from ``t`` down to ``t_next``.

        ``z <- z - h F z``; the last block also gets ``h (2 xi / L) s + sqrt(2 xi h / L) N(0, I)`` with the score
        ``s = -eps_hat * score_scale(t)``.
        """
        t, t_next = _as_time(t), _as_time(t_next)
        h = t - t_next
        n = self.order
        eye = torch.eye(n, dtype=_F64)
        state = eye - h[..., None, None] * self.drift_matrix
        eps_vector = torch.zeros(*h.shape, n, dtype=_F64)
        eps_vector[..., -1] = -h * self.diffusion_sq * self.score_scale(t)
        noise = torch.zeros(*h.shape, n, n, dtype=_F64)
        noise[..., -1, -1] = torch.sqrt(self.diffusion_sq * h)
        return LinearStep(state, eps_vector, noise)

    def sscs_step(self, t_eval: torch.Tensor | float, h_score: torch.Tensor | float, h_free: torch.Tensor | float):
        """Score kick then exact free flow: the two halves of the symmetric splitting sampler (CLD's SSCS).

        The reverse drift splits as ``F^T z`` (free part: an OU process with stationary law ``N(0, L^{-1} I)``,
        solved exactly) plus ``G G^T (S + L z)`` (score part, an Euler kick). Strang splitting
        ``A(h/2) S(h) A(h/2)`` over consecutive steps becomes ``S(h_i)`` at the midpoint time followed by
        ``A(h_i/2 + h_{i+1}/2)``; the very first ``A(h_0/2)`` leaves the stationary prior unchanged and is skipped.

        Args:
            t_eval: time at which the model was evaluated (the midpoint of the current interval).
            h_score: length of the score kick ``S``.
            h_free: length of the free flow ``A`` that follows it.
        """
        t_eval, h_score, h_free = _as_time(t_eval), _as_time(h_score), _as_time(h_free)
        n = self.order
        kick = torch.eye(n, dtype=_F64).expand(*h_score.shape, n, n).clone()
        kick[..., -1, -1] += 2.0 * self.xi * h_score  # + h (2 xi / L) L z_n
        kick_eps = torch.zeros(*h_score.shape, n, dtype=_F64)
        kick_eps[..., -1] = -h_score * self.diffusion_sq * self.score_scale(t_eval)
        free = self.transition(h_free).transpose(-1, -2)
        noise = _jacobi_cholesky(self.noise_covariance(h_free, adjoint=True), "SSCS free-flow noise covariance")
        return LinearStep(free @ kick, (free @ kick_eps[..., None])[..., 0], noise)

    def _flow_generator(self, t: torch.Tensor) -> torch.Tensor:
        """``F + 1/2 G G^T Sigma_t^{-1}``, the generator of the probability-flow transport, shape ``(..., n, n)``."""
        n = self.order
        e_n = torch.zeros(*t.shape, n, 1, dtype=_F64)
        e_n[..., -1, 0] = 1.0
        precision_row = torch.cholesky_solve(e_n, self.cholesky(t))[..., 0]
        generator = self.drift_matrix.expand(*t.shape, n, n).clone()
        generator[..., -1, :] += 0.5 * self.diffusion_sq * precision_row
        return generator

    def transport(self, t: torch.Tensor | float, t_next: torch.Tensor | float, substeps_per_unit: float = 48.0):
        """``Phi = R_{t_next} R_t^{-1}``: the probability-flow transport of the kernel for a fixed ``x_0``.

        ``R`` solves gDDIM's ``dR/dt = (F + 1/2 G G^T Sigma_t^{-1}) R``, so ``z - a x_0 = R eps_R`` with ``eps_R``
        constant along the flow of a single data point. Integrated with the fourth-order Magnus method (two Gauss
        points, one exact ``matrix_exp`` per substep: stable for the stiff ``Sigma_t^{-1}`` near ``t = 0``) on
        substeps uniform in ``log(t + 0.01)``, ``substeps_per_unit`` per unit of that variable. The result is then
        projected so that ``Phi Sigma_t Phi^T = Sigma_{t_next}`` holds exactly: ``Phi = L_{t_next} Q L_t^{-1}`` with
        ``Q`` orthogonal, and the projection replaces ``Q`` by its polar factor.
        """
        t, t_next = torch.broadcast_tensors(_as_time(t), _as_time(t_next))
        offset = 0.01
        u0, u1 = torch.log(t + offset), torch.log(t_next + offset)
        substeps = max(2, math.ceil(substeps_per_unit * float((u1 - u0).abs().max())))
        fractions = torch.linspace(0.0, 1.0, substeps + 1, dtype=_F64)
        knots = torch.exp(u0[..., None] + (u1 - u0)[..., None] * fractions) - offset  # (..., substeps + 1)
        left, width = knots[..., :-1], (knots[..., 1:] - knots[..., :-1])
        gauss = 0.5 - math.sqrt(3) / 6, 0.5 + math.sqrt(3) / 6
        a1 = self._flow_generator(left + gauss[0] * width)
        a2 = self._flow_generator(left + gauss[1] * width)
        h = width[..., None, None]
        omega = 0.5 * h * (a1 + a2) + (math.sqrt(3) / 12) * h**2 * (a2 @ a1 - a1 @ a2)
        steps = torch.linalg.matrix_exp(omega)
        n = self.order
        phi = torch.eye(n, dtype=_F64).expand(*t.shape, n, n)
        for j in range(substeps):
            phi = steps[..., j, :, :] @ phi
        chol_t, chol_next = self.cholesky(t), self.cholesky(t_next)
        core = torch.linalg.solve_triangular(chol_next, phi @ chol_t, upper=False)
        u_left, _, v_right = torch.linalg.svd(core)
        return chol_next @ (u_left @ v_right) @ torch.linalg.inv(chol_t)

    def ddim_step(self, t: torch.Tensor | float, t_next: torch.Tensor | float) -> LinearStep:
        """Deterministic probability-flow step with the denoised estimate frozen (gDDIM's R-basis sampler).

        ``z' = a' x0_hat + Phi (z - a x0_hat)`` with ``Phi = transport(t, t_next)`` and ``x0_hat`` from
        :meth:`x0_coefficients`; exact when ``E[x_0 | z]`` is constant along the step (a single data point), and
        identical to DDIM (``eta = 0``) at order 1.
        """
        t, t_next = _as_time(t), _as_time(t_next)
        phi = self.transport(t, t_next)
        ell, c = self.x0_coefficients(t)
        residual = self.mean_coefficients(t_next) - (phi @ self.mean_coefficients(t)[..., None])[..., 0]
        gain = residual / c[..., None]
        return LinearStep(phi + gain[..., :, None] * ell[..., None, :], -gain, None)

    def denoise_step(self, t: torch.Tensor | float) -> LinearStep:
        """Noise-free final step: one Euler step of the reverse SDE from ``t`` to 0 without injected noise.

        The denoising step of CLD and of Song et al. It uses the score ``-eps_hat * score_scale(t)``, which stays
        well conditioned as ``t -> 0``, rather than ``x0_hat``: for orders >= 2 the last block's noise says little
        about ``x_0`` at small ``t`` (``c_t`` of :meth:`x0_coefficients` is small), so inverting it amplifies model
        error. At order 1 it agrees with Tweedie's ``x0_hat`` to first order in ``t``.
        """
        t = _as_time(t)
        step = self.euler_maruyama_step(t, torch.zeros_like(t))
        return LinearStep(step.state_matrix, step.eps_vector, None)
