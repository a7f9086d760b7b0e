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
from collections.abc import Callable
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
    step, has this form because the dynamics are linear and the model enters only through ``eps_hat``. Multistep
    solvers read the model through its denoised estimates instead: they add ``sum_j data_vectors[j] * x0_hat_j``
    (``x0_hat_0`` from the current model call, ``x0_hat_j`` from the ``j``-th previous one), or, interpolating the
    noise, ``data_vectors[0] * x0_hat_0 + sum_j history_matrices[j - 1] @ y~_j``.

    Attributes:
        state_matrix (`torch.Tensor` of shape `(..., n, n)`): linear map of the current state.
        eps_vector (`torch.Tensor` of shape `(..., n)`): how the predicted noise enters each block.
        noise_matrix (`torch.Tensor` of shape `(..., n, n)` or `None`): square root of the injected noise covariance;
            `None` for a deterministic step.
        data_vectors (`torch.Tensor` of shape `(..., k, n)` or `None`): how the denoised estimates of the current and
            the ``k - 1`` previous model calls enter each block; `None` for a step that reads ``eps_hat`` only.
        history_matrices (`torch.Tensor` of shape `(..., k - 1, n, n)` or `None`): for the noise-interpolating
            multistep form, how the noise parts ``y~_j`` of the ``k - 1`` previous model calls (carried to the current
            time) enter: ``z' += history_matrices[j - 1] @ y~_j``.
        transport (`torch.Tensor` of shape `(..., n, n)` or `None`): the map that carries a noise part from this
            step's start to its end, ``y~ <- transport @ y~``; the current call's noise part is ``z - a_t x0_hat``.
    """

    state_matrix: torch.Tensor
    eps_vector: torch.Tensor
    noise_matrix: torch.Tensor | None
    data_vectors: torch.Tensor | None = None
    history_matrices: torch.Tensor | None = None
    transport: torch.Tensor | None = None

    @classmethod
    def concat(cls, *steps: LinearStep) -> LinearStep:
        """The rows of ``steps`` one after the other (leading axis); a missing term counts as zero."""

        def join(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
            present = next((part for part in parts if part is not None), None)
            if present is None:
                return None
            zeros = [step.state_matrix.new_zeros(len(step.state_matrix), *present.shape[1:]) for step in steps]
            return torch.cat([zero if part is None else part for part, zero in zip(parts, zeros, strict=True)])

        return cls(
            torch.cat([step.state_matrix for step in steps]),
            torch.cat([step.eps_vector for step in steps]),
            *(join([getattr(step, name) for step in steps]) for name in _OPTIONAL_TERMS),
        )


_OPTIONAL_TERMS = ("noise_matrix", "data_vectors", "history_matrices", "transport")


# Magnus substeps are uniform in log(t + _MAGNUS_OFFSET): dense near the data, where Sigma_t^{-1} is stiff.
_MAGNUS_OFFSET = 0.01


def _magnus_substeps(t: torch.Tensor, t_next: torch.Tensor, substeps_per_unit: float) -> torch.Tensor:
    """Magnus substeps (at least 2) each step from ``t`` to ``t_next`` needs: ``substeps_per_unit`` per unit of
    ``log(t + 0.01)`` near the data, per unit of ``t`` far from it (the drift's own time scale is O(1))."""
    log_span = (torch.log(t_next + _MAGNUS_OFFSET) - torch.log(t + _MAGNUS_OFFSET)).abs()
    return torch.ceil(substeps_per_unit * torch.maximum(log_span, (t_next - t).abs())).clamp_min(2)


def _runs_of_similar_length(t: torch.Tensor, t_next: torch.Tensor, substeps_per_unit: float) -> list[slice]:
    """Consecutive steps whose Magnus substep counts share a power of two, as slices of the step axis."""
    octave = torch.ceil(torch.log2(_magnus_substeps(t, t_next, substeps_per_unit))).tolist()
    starts = [0] + [i for i in range(1, len(octave)) if octave[i] != octave[i - 1]]
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [len(octave)], strict=True)]


def time_where_decreasing(
    function: Callable[[torch.Tensor], torch.Tensor], values: torch.Tensor, t_min: float, t_max: float, name: str
) -> torch.Tensor:
    """The times in ``[t_min, t_max]`` at which ``function``, strictly decreasing in ``t``, takes ``values``
    (bisection in ``log t``, accurate to ``1e-12`` relative in ``t``; float64). Values outside
    ``[function(t_max), function(t_min)]`` raise, naming the quantity ``name``."""
    target = torch.as_tensor(values, dtype=_F64)
    high, low = function(torch.tensor(t_min, dtype=_F64)), function(torch.tensor(t_max, dtype=_F64))
    if (target > high + 1e-9).any() or (target < low - 1e-9).any():
        raise ValueError(f"{name} values must lie in [{float(low):.4g}, {float(high):.4g}].")
    left = torch.full_like(target, math.log(t_min))
    right = torch.full_like(target, math.log(t_max))
    for _ in range(60):  # decreasing in t: above the target means the time is still too small
        middle = 0.5 * (left + right)
        too_early = function(middle.exp()) > target
        left, right = torch.where(too_early, middle, left), torch.where(too_early, right, middle)
    return (0.5 * (left + right)).exp()


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

    def auxiliary_given_position(
        self, t: torch.Tensor | float, data_variance: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Law of the auxiliary blocks given the position block under the forward marginal at ``t``.

        For data whose elements have mean 0 and variance ``v`` (``data_variance``) and are independent, every element
        of the state ``z_t = a_t x_0 + L_t eps`` has mean 0 and covariance ``C_t = v a_t a_t^T + Sigma_t``.
        Conditioning on the position ``q = z_1`` gives ``(z_2, ..., z_n) | q ~ N(g_t q, S_t)`` with
        ``g_t = C_t[2:, 1] / C_t[1, 1]`` and the Schur complement ``S_t = C_t[2:, 2:] - g_t C_t[1, 2:]``. Exact for
        Gaussian data of that law; for other data it is the Gaussian law with the same first two moments.

        Args:
            t: continuous times, any shape ``(...)``.
            data_variance (`float`, defaults to 1.0): ``v``, the variance of one data element (1 for standardised
                data such as Stable Diffusion's scaled latents).

        Returns:
            `tuple`: ``g_t`` of shape ``(..., n - 1)`` and the lower Cholesky factor of ``S_t``, shape
            ``(..., n - 1, n - 1)``, so that ``aux = g_t q + chol_t eps`` with ``eps`` standard normal.
        """
        if not (isinstance(data_variance, (int, float)) and math.isfinite(data_variance) and data_variance >= 0):
            raise ValueError(f"data_variance must be a non-negative finite number, got {data_variance!r}.")
        a = self.mean_coefficients(t)
        joint = data_variance * a[..., :, None] * a[..., None, :] + self.covariance(t)
        gain = joint[..., 1:, 0] / joint[..., :1, 0]
        schur = joint[..., 1:, 1:] - gain[..., :, None] * joint[..., None, 0, 1:]
        return gain, _jacobi_cholesky(schur, "conditional covariance of the auxiliary blocks")

    def snr(self, t: torch.Tensor | float) -> torch.Tensor:
        """Signal-to-noise ratio of the position marginal: ``SNR(t) = (a_t[1])^2 / Sigma_t[1, 1]``, shape ``(...)``."""
        return self.mean_coefficients(t)[..., 0] ** 2 / self.covariance(t)[..., 0, 0]

    def log_snr(self, t: torch.Tensor | float) -> torch.Tensor:
        """``log(a_t[1]^2 / Sigma_t[1, 1])`` without the ``eps_num`` jitter, shape ``(...)``.

        The variable in which the multistep solver interpolates denoised estimates. At order 1 it is the VP
        ``log(alpha_bar / (1 - alpha_bar))`` (twice DPM-Solver's ``lambda``); at every order it decreases strictly on
        ``(0, T]`` and grows like ``2 log(1 / t)`` as ``t -> 0``, where the jittered :meth:`snr` would saturate at
        ``1 / eps_num``.
        """
        t = _as_time(t)
        expm = self.transition(t)
        position_var = self.noise_covariance(t)[..., 0, 0]
        position_var = position_var + (expm[..., 0, :] ** 2 * torch.diagonal(self.initial_covariance)).sum(-1)
        return 2.0 * torch.log(expm[..., 0, 0].abs()) - torch.log(position_var)

    def time_at_log_snr(self, log_snr: torch.Tensor, t_min: float, t_max: float) -> torch.Tensor:
        """The times in ``[t_min, t_max]`` at which :meth:`log_snr` takes the given values (bisection in ``log t``).

        Values outside ``[log_snr(t_max), log_snr(t_min)]`` raise. Accurate to ``1e-12`` relative in ``t``.
        """
        return time_where_decreasing(self.log_snr, log_snr, t_min, t_max, "log-SNR")

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

    def _precision_row(self, t: torch.Tensor) -> torch.Tensor:
        """``Sigma_t^{-1} e_n``, shape ``(..., n)``: the only part of the precision that ``G G^T`` reaches."""
        e_n = torch.zeros(*t.shape, self.order, 1, dtype=_F64)
        e_n[..., -1, 0] = 1.0
        return torch.cholesky_solve(e_n, self.cholesky(t))[..., 0]

    def _flow_generator(self, t: torch.Tensor, score_weight: float = 0.5) -> torch.Tensor:
        """``F + w G G^T Sigma_t^{-1}``, shape ``(..., n, n)``.

        With the score written as ``-Sigma_t^{-1} (z - a_t x0_hat)``, the reverse dynamics
        ``dz = [F z - w G G^T score] dt (+ noise)`` are linear in ``z`` with this generator; ``w = 1/2`` is the
        probability-flow ODE (gDDIM's transport), ``w = (1 + eta^2) / 2`` the reverse SDE family of
        :meth:`exponential_step`.
        """
        n = self.order
        generator = self.drift_matrix.expand(*t.shape, n, n).clone()
        generator[..., -1, :] += score_weight * self.diffusion_sq * self._precision_row(t)
        return generator

    def _magnus_propagator(self, generator, t: torch.Tensor, t_next: torch.Tensor, substeps_per_unit: float):
        """Propagator from ``t`` to ``t_next`` of ``dy/dt = generator(t) y`` (fourth-order Magnus).

        Two Gauss points and one exact ``matrix_exp`` per substep (stable for the stiff ``Sigma_t^{-1}`` near
        ``t = 0``), substeps uniform in ``log(t + 0.01)``; every step of the batch gets as many as its longest one
        needs (:func:`_magnus_substeps`). ``generator`` maps times of shape ``(..., S)`` to matrices
        ``(..., S, d, d)``.
        """
        u0, u1 = torch.log(t + _MAGNUS_OFFSET), torch.log(t_next + _MAGNUS_OFFSET)
        substeps = int(_magnus_substeps(t, t_next, substeps_per_unit).max())
        fractions = torch.linspace(0.0, 1.0, substeps + 1, dtype=_F64)
        knots = torch.exp(u0[..., None] + (u1 - u0)[..., None] * fractions) - _MAGNUS_OFFSET  # (..., substeps + 1)
        left, width = knots[..., :-1], (knots[..., 1:] - knots[..., :-1])
        gauss = 0.5 - math.sqrt(3) / 6, 0.5 + math.sqrt(3) / 6
        a1 = generator(left + gauss[0] * width)
        a2 = generator(left + gauss[1] * width)
        h = width[..., None, None]
        omega = 0.5 * h * (a1 + a2) + (math.sqrt(3) / 12) * h**2 * (a2 @ a1 - a1 @ a2)
        steps = torch.linalg.matrix_exp(omega)
        d = steps.shape[-1]
        propagator = torch.eye(d, dtype=_F64).expand(*t.shape, d, d)
        for j in range(substeps):
            propagator = steps[..., j, :, :] @ propagator
        return propagator

    def transport(self, t: torch.Tensor | float, t_next: torch.Tensor | float, substeps_per_unit: float = 48.0):
        """``Phi = R_{t_next} R_t^{-1}``: the probability-flow transport of the kernel for a fixed ``x_0``.

        ``R`` solves gDDIM's ``dR/dt = (F + 1/2 G G^T Sigma_t^{-1}) R``, so ``z - a x_0 = R eps_R`` with ``eps_R``
        constant along the flow of a single data point; integrated by :meth:`_magnus_propagator`. The result is then
        projected so that ``Phi Sigma_t Phi^T = Sigma_{t_next}`` holds exactly: ``Phi = L_{t_next} Q L_t^{-1}`` with
        ``Q`` orthogonal, and the projection replaces ``Q`` by its polar factor.
        """
        t, t_next = torch.broadcast_tensors(_as_time(t), _as_time(t_next))
        phi = self._magnus_propagator(self._flow_generator, t, t_next, substeps_per_unit)
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

    def exponential_step(
        self,
        t: torch.Tensor | float,
        t_next: torch.Tensor | float,
        history_times: torch.Tensor,
        prediction: str = "noise",
        eta: float = 0.0,
        substeps_per_unit: float = 64.0,
    ) -> LinearStep:
        """Multistep exponential-integrator step (DPM-Solver / DPM-Solver++ / gDDIM, generalised to HOLD).

        With the score written as ``-Sigma_t^{-1} (z - a_t x0_hat)``, the reverse dynamics with noise scale ``eta``,
        ``dz = [F z - w G G^T score] dt + eta G dW`` (reverse time, ``w = (1 + eta^2) / 2``), are linear in the state
        apart from the model's estimate. ``eta = 0`` is the probability-flow ODE, ``eta = 1`` the reverse SDE. The step
        integrates the linear part exactly and the model's part with the estimates of the ``k`` most recent model calls
        interpolated by a polynomial in :meth:`log_snr` (Lagrange basis ``l_j``), the coefficients coming out of one
        fourth-order Magnus integration of the linear system augmented with the polynomial moments, in float64.

        ``prediction="noise"`` (gDDIM's R-basis multistep; ``eta = 0`` only) interpolates the noise part
        ``y = z - a x0_hat``, the quantity that stays constant along the flow of a single data point once expressed in
        the basis ``R_t`` of ``dR/dt = (F + 1/2 G G^T Sigma_t^{-1}) R``. Earlier noise parts are carried to the
        current time by the transport ``Phi`` (:meth:`transport`'s flow), ``y~_j = Phi(t, t_j) y_j``, and::

            z' = e^{F h} z + sum_j M_j y~_j,
            M_j = int_t^{t_next} e^{F (t_next - s)} 1/2 G G^T Sigma_s^{-1} Phi(s, t) l_j(s) ds

        As a :class:`LinearStep`: ``state_matrix = e^{F h} + M_0``, ``data_vectors = [-M_0 a_t]`` (the current
        ``x0_hat``), ``history_matrices = [M_1, ...]`` and ``transport = Phi(t_next, t)``.

        ``prediction="data"`` (DPM-Solver++) interpolates ``x0_hat`` itself in ``dz/dt = A z + b x0_hat`` with
        ``A = F + w G G^T Sigma^{-1}`` and ``b = -w G G^T Sigma^{-1} a``::

            z' = Phi_A z + sum_j W_j x0_hat_j + noise,   W_j = int_t^{t_next} Phi_A(t_next, s) b(s) l_j ds

        and, for ``eta > 0``, noise of covariance ``Sigma_{t_next} - Phi_A Sigma_t Phi_A^T``, which keeps the kernel's
        covariance exactly.

        With one node (``k = 1``) either form is exact when ``x0_hat`` is constant (a single data point). At HOLD order
        1 they are DPM-Solver (``"noise"``), DPM-Solver++ (``"data"``, ``eta = 0``) and SDE-DPM-Solver++ (``"data"``,
        ``eta = 1``), with the exact polynomial integrals of diffusers' ``solver_type="heun"``.

        Args:
            t, t_next: start and end times of the step, shape ``(...)``.
            history_times (`torch.Tensor` of shape `(..., k)`): times of the model calls whose estimates are
                interpolated, the current one (``t``) first.
            prediction (`str`): ``"noise"`` or ``"data"``, the quantity interpolated.
            eta (`float`): noise scale in ``[0, 1]`` (``"data"`` only).
            substeps_per_unit (`float`): Magnus substeps per unit of ``log(t + 0.01)`` near the data, of ``t`` far
                from it (:func:`_magnus_substeps`); a 1-D batch of steps is integrated in runs of similar length.
        """
        if prediction not in ("noise", "data"):
            raise ValueError(f"prediction must be 'noise' or 'data', got {prediction!r}.")
        if not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0) or (prediction == "noise" and eta != 0):
            raise ValueError(f"eta must lie in [0, 1], and be 0 for prediction='noise'; got {eta!r}.")
        t, t_next = torch.broadcast_tensors(_as_time(t), _as_time(t_next))
        history = _as_time(history_times)
        if history.shape[:-1] != t.shape or not torch.equal(history[..., 0], t):
            raise ValueError("history_times must have shape (..., k) with the current time t first.")
        runs = _runs_of_similar_length(t, t_next, substeps_per_unit) if t.ndim == 1 else [slice(None)]
        if len(runs) > 1:  # steps batched together share the longest one's substeps; few-step grids end in a long one
            return LinearStep.concat(
                *(self.exponential_step(t[r], t_next[r], history[r], prediction, eta, substeps_per_unit) for r in runs)
            )
        n, k = self.order, history.shape[-1]
        lam_t = self.log_snr(t)
        span = self.log_snr(t_next) - lam_t
        nodes = (self.log_snr(history) - lam_t[..., None]) / span[..., None]  # 0 for the current call
        powers = torch.arange(k, dtype=_F64)
        # Lagrange basis l_j(u) = sum_m C[m, j] u^m, C the inverse of the Vandermonde matrix V[j, m] = nodes_j^m
        lagrange = torch.linalg.inv(nodes[..., :, None] ** powers)

        def monomials(s: torch.Tensor) -> torch.Tensor:
            """``u(s)^m`` for ``m < k``, ``u`` the log-SNR normalised to 0 at ``t`` and 1 at ``t_next``."""
            return ((self.log_snr(s) - lam_t[..., None]) / span[..., None])[..., None] ** powers

        if prediction == "data":
            weight = 0.5 * (1.0 + eta**2)

            def data_generator(s: torch.Tensor) -> torch.Tensor:
                # d/ds [z; c] = [[A, b u^T], [0, 0]] [z; c]: the top-right block accumulates int Phi_A b u^m
                forcing = -weight * self.diffusion_sq * (self._precision_row(s) * self.mean_coefficients(s)).sum(-1)
                moments = torch.zeros(*s.shape, n, k, dtype=_F64)
                moments[..., -1, :] = forcing[..., None] * monomials(s)
                top = torch.cat([self._flow_generator(s, weight), moments], dim=-1)
                return torch.cat([top, torch.zeros(*s.shape, k, n + k, dtype=_F64)], dim=-2)

            propagator = self._magnus_propagator(data_generator, t, t_next, substeps_per_unit)
            phi = propagator[..., :n, :n]
            data_vectors = (propagator[..., :n, n:] @ lagrange).transpose(-1, -2)
            noise = None if eta == 0 else self._residual_noise(phi, t, t_next)
            return LinearStep(phi, torch.zeros(*t.shape, n, dtype=_F64), noise, data_vectors)

        def noise_generator(s: torch.Tensor) -> torch.Tensor:
            # d/ds [Phi; W_0; ...] = [[A, 0], [B u^m, F]] [Phi; W_0; ...]: W_m = int e^{F (s - r)} B u^m Phi(r, t) dr
            generator = torch.zeros(*s.shape, n * (k + 1), n * (k + 1), dtype=_F64)
            generator[..., :n, :n] = self._flow_generator(s)
            kick = torch.zeros(*s.shape, n, n, dtype=_F64)
            kick[..., -1, :] = 0.5 * self.diffusion_sq * self._precision_row(s)
            u_powers = monomials(s)
            for m in range(k):
                rows = slice(n * (m + 1), n * (m + 2))
                generator[..., rows, :n] = kick * u_powers[..., m, None, None]
                generator[..., rows, rows] = self.drift_matrix
            return generator

        propagator = self._magnus_propagator(noise_generator, t, t_next, substeps_per_unit)[..., :, :n]
        phi = propagator[..., :n, :]
        moments = propagator[..., n:, :].reshape(*t.shape, k, n, n)
        weights = torch.einsum("...mab,...mj->...jab", moments, lagrange)  # M_j
        free = self.transition(t_next - t)
        current_data = -(weights[..., 0, :, :] @ self.mean_coefficients(t)[..., None])[..., 0]
        return LinearStep(
            free + weights[..., 0, :, :],
            torch.zeros(*t.shape, n, dtype=_F64),
            None,
            current_data[..., None, :],
            history_matrices=weights[..., 1:, :, :],
            transport=phi,
        )

    def _residual_noise(self, phi: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        """Square root of ``Sigma_{t_next} - Phi Sigma_t Phi^T``, the noise that keeps the kernel covariance.

        Computed in the whitened basis ``I - K K^T``, ``K = L_{t_next}^{-1} Phi L_t``. Eigenvalues below zero by more
        than rounding mean ``Phi`` does not contract the covariance (the step is not a valid SDE step) and raise.
        """
        chol_t, chol_next = self.cholesky(t), self.cholesky(t_next)
        whitened = torch.linalg.solve_triangular(chol_next, phi @ chol_t, upper=False)
        eye = torch.eye(self.order, dtype=_F64)
        values, vectors = torch.linalg.eigh(eye - whitened @ whitened.transpose(-1, -2))
        if (values < -1e-8).any():
            raise ValueError(f"The exponential step's noise covariance is not positive ({float(values.min()):.3g}).")
        root = vectors @ torch.diag_embed(values.clamp_min(0.0).sqrt()) @ vectors.transpose(-1, -2)
        return chol_next @ root

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
