"""Training timestep samplers for DDPM-style schedulers and :class:`~diffusers_hold.HOLDScheduler`.

Every sampler draws a normalised time ``u`` in ``[0, 1]`` from a law with a known density (:meth:`density`) and
distribution function (:meth:`cdf`), and maps it to the scheduler's model timesteps through a
:class:`TimestepAxis`:

- DDPM-style schedulers (anything with ``alphas_cumprod``: ``DDPMScheduler``, ``DDIMScheduler``, ...): timestep
  ``k`` in ``0..N-1`` owns the cell ``[k / N, (k + 1) / N)`` of ``u``, so ``k = floor(N * u)`` and a uniform ``u``
  gives exactly the uniform integer law of diffusers' training scripts. Its log-SNR
  ``log(alphas_cumprod[k] / (1 - alphas_cumprod[k]))`` sits at the cell centre ``(k + 0.5) / N``.
- :class:`~diffusers_hold.HOLDScheduler`: continuous time ``t = train_eps + (T - train_eps) * u``, model timestep
  ``t * num_train_timesteps / T``, so a uniform ``u`` is :meth:`HOLDScheduler.sample_timesteps`; the log-SNR is the
  position block's (:meth:`HOLDScheduler.snr`).

Large ``u`` is noise (large ``t``, low SNR, the first denoising steps); small ``u`` is close to the data (high SNR,
the last denoising steps).

:class:`SNRIntervalTimestepSampler` implements the confidence-interval Gaussian sampler of Vu et al. (2026,
"Memorization Control in Diffusion Models from Denoising-centric Perspective"); where the paper leaves the space, the
interval-to-Gaussian map and the tail rule open, each option is exposed (``docs/MEMORIZATION.md``).
"""

from __future__ import annotations

import math
import numbers
from functools import cached_property
from typing import Literal

import torch

from .._validation import check_positive_int

__all__ = [
    "TIMESTEP_SAMPLERS",
    "LogitNormalTimestepSampler",
    "SNRIntervalTimestepSampler",
    "TimestepAxis",
    "TimestepSampler",
    "UniformTimestepSampler",
    "get_timestep_sampler",
]

_F64 = torch.float64
INTERVAL_SPACES = ("u", "logsnr")
TAIL_RULES = ("renormalize", "clip", "redistribute_uniform")


class TimestepAxis:
    """The training time axis of a noise scheduler: normalised time ``u``, model timesteps and log-SNR.

    Reads the scheduler once; see the module docstring for the two kinds of axis.

    Args:
        scheduler (`SchedulerMixin`):
            A scheduler with ``alphas_cumprod`` (DDPM-style, integer timesteps) or a
            :class:`~diffusers_hold.HOLDScheduler` (``snr``, ``time_to_timestep``, ``config.T`` and
            ``config.train_eps``; continuous timesteps).

    Attributes:
        discrete (`bool`): whether model timesteps are the integers ``0..N-1``.
        num_train_timesteps (`int`): ``N``.
    """

    def __init__(self, scheduler):
        self.scheduler = scheduler
        config = getattr(scheduler, "config", {})
        if callable(getattr(scheduler, "snr", None)) and "T" in config and "train_eps" in config:
            self.discrete = False
            self.num_train_timesteps = int(config["num_train_timesteps"])
            self._train_eps, self._horizon = float(config["train_eps"]), float(config["T"])
        elif getattr(scheduler, "alphas_cumprod", None) is not None:
            self.discrete = True
            self.num_train_timesteps = len(scheduler.alphas_cumprod)
        else:
            raise ValueError(
                f"{type(scheduler).__name__} has neither `alphas_cumprod` (DDPM-style) nor a HOLD `snr`; timestep "
                "samplers need one of them to define the training time axis."
            )

    def timesteps_from_u(self, u: torch.Tensor) -> torch.Tensor:
        """Model timesteps for normalised times ``u`` in ``[0, 1]``: int64 for DDPM-style, float32 for HOLD (CPU)."""
        u = torch.as_tensor(u, dtype=_F64)
        if self.discrete:
            return (u * self.num_train_timesteps).floor().clamp(0, self.num_train_timesteps - 1).long()
        # the same arithmetic as HOLDScheduler.sample_timesteps, so a uniform u reproduces it draw for draw
        t = self._train_eps + (self._horizon - self._train_eps) * u
        return self.scheduler.time_to_timestep(t).to(torch.float32)

    @cached_property
    def logsnr_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Nodes ``(u, log-SNR)`` (float64, ``u`` increasing, log-SNR strictly decreasing) of the piecewise-linear
        log-SNR curve.

        DDPM-style: one node per timestep at the cell centre ``(k + 0.5) / N``, so inverting the curve and taking
        ``floor(N * u)`` picks the timestep with the nearest log-SNR. HOLD: nodes at 2,049 uniform and 1,025
        geometric times in ``[train_eps, T]`` (the log-SNR is steep near ``t = 0``), within about 1e-4 of the exact
        curve.
        """
        if self.discrete:
            n = self.num_train_timesteps
            u = (torch.arange(n, dtype=_F64) + 0.5) / n
            alphas_cumprod = self.scheduler.alphas_cumprod.detach().to("cpu", _F64)
            logsnr = alphas_cumprod.log() - torch.log1p(-alphas_cumprod)
        else:
            eps, horizon = self._train_eps, self._horizon
            t = torch.cat(
                [
                    torch.linspace(eps, horizon, 2049, dtype=_F64),
                    torch.logspace(math.log10(eps), math.log10(horizon), 1025, dtype=_F64),
                ]
            )
            t = t.clamp(eps, horizon).unique()
            u = (t - eps) / (horizon - eps)
            timesteps = self.scheduler.time_to_timestep(t).clamp(max=self.num_train_timesteps)
            logsnr = self.scheduler.snr(timesteps).log()
        if not torch.isfinite(logsnr).all():
            raise ValueError(
                f"The log-SNR of {type(self.scheduler).__name__} is infinite at some timestep (zero terminal SNR?); "
                'intervals in log-SNR need a finite one, use space="u".'
            )
        if not (logsnr[1:] < logsnr[:-1]).all():
            raise ValueError(f"The log-SNR of {type(self.scheduler).__name__} is not strictly decreasing in time.")
        return u, logsnr

    @property
    def logsnr_range(self) -> tuple[float, float]:
        """``(min, max)`` of the log-SNR over the training timesteps (at ``u = 1`` and ``u = 0``)."""
        logsnr = self.logsnr_table[1]
        return logsnr[-1].item(), logsnr[0].item()

    def logsnr_from_u(self, u: torch.Tensor) -> torch.Tensor:
        """Log-SNR at ``u``, linear between the nodes of :attr:`logsnr_table`.

        Defined on the span of the nodes; DDPM-style tables span ``[0.5 / N, 1 - 0.5 / N]``.
        """
        return self._logsnr_and_slope(u)[0]

    def _logsnr_and_slope(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`logsnr_from_u` and its derivative ``d logsnr / du``."""
        table_u, table_logsnr = self.logsnr_table
        return _piecewise_linear(torch.as_tensor(u, dtype=_F64), table_u, table_logsnr)

    def u_from_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`logsnr_from_u` for log-SNR values within :attr:`logsnr_range`."""
        table_u, table_logsnr = self.logsnr_table
        # the curve is decreasing; interpolate against -logsnr, which increases
        u = _piecewise_linear(-torch.as_tensor(logsnr, dtype=_F64), -table_logsnr, table_u)[0]
        # rounding at the last node must not step outside the table (and past t = T)
        return u.clamp(table_u[0], table_u[-1])


class TimestepSampler:
    """Base class of the timestep samplers: a law of ``u`` in ``[0, 1]`` mapped to model timesteps.

    Subclasses define :meth:`density`, :meth:`cdf` and the draw; this class maps draws to timesteps and computes
    importance weights.

    **Importance weights** (``importance_weights=True``) make the weighted loss an unbiased estimate of the loss under
    uniform timesteps: for a continuous axis ``w = 1 / density(u)`` (the uniform density is 1), for a discrete axis
    ``w = (1 / N) / P(k)`` with ``P(k)`` the sampler's probability of the drawn timestep. Both are the likelihood
    ratio of the uniform law to the sampler's, so their expectation under the sampler is exactly 1 and they are not
    rescaled per batch (that would bias the estimate). Draws in an atom of a continuous law (the ``"clip"`` tail
    rule) get weight 0, since the uniform law gives those points no mass. The weights are unbounded where the
    sampler's density is small; a uniform mixture of weight ``m`` bounds them by ``1 / m``.

    Args:
        scheduler (`SchedulerMixin`): the training noise scheduler (see :class:`TimestepAxis`).
        importance_weights (`bool`, defaults to `False`): make :meth:`sample` return importance weights, not ones.
    """

    def __init__(self, scheduler, importance_weights: bool = False):
        if not isinstance(importance_weights, bool):
            raise ValueError(f"importance_weights must be a bool, got {importance_weights!r}.")
        self.axis = TimestepAxis(scheduler)
        self.importance_weights = importance_weights

    def density(self, u: torch.Tensor) -> torch.Tensor:
        """Density of ``u`` (float64), of the continuous part where the law has atoms."""
        raise NotImplementedError

    def cdf(self, u: torch.Tensor) -> torch.Tensor:
        """Distribution function ``P(U <= u)`` (float64), atoms included."""
        raise NotImplementedError

    def _draw(self, batch_size: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` draws of ``u`` (float64, CPU) and the mask of the draws that landed in an atom."""
        raise NotImplementedError

    def sample_u(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw normalised times ``u`` (float64, CPU), as :meth:`sample` does before mapping them to timesteps.

        Args:
            batch_size (`int`): number of draws.
            generator (`torch.Generator`, *optional*): a CPU generator; the global RNG when omitted.
        """
        return self._draw(_check_batch_size(batch_size), generator)[0]

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: str | torch.device | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw training timesteps and their per-sample loss weights.

        Args:
            batch_size (`int`): number of timesteps.
            generator (`torch.Generator`, *optional*): a CPU generator; the global RNG when omitted.
            device (`str` or `torch.device`, *optional*): device of the results (CPU when omitted).

        Returns:
            `tuple[torch.Tensor, torch.Tensor]`: the timesteps `(batch_size,)` in the scheduler's model units (int64
            for DDPM-style schedulers, float32 for HOLD) and float32 weights `(batch_size,)`, all ones unless
            ``importance_weights`` is set.
        """
        u, in_atom = self._draw(_check_batch_size(batch_size), generator)
        timesteps = self.axis.timesteps_from_u(u)
        if not self.importance_weights:
            weights = torch.ones(batch_size)
        elif self.axis.discrete:
            weights = (1.0 / self.axis.num_train_timesteps) / self._timestep_probabilities[timesteps]
        else:
            weights = torch.where(in_atom, 0.0, 1.0 / self.density(u))
        return timesteps.to(device), weights.to(device=device, dtype=torch.float32)

    @cached_property
    def _timestep_probabilities(self) -> torch.Tensor:
        """``P(k)`` of every integer timestep: the mass of its cell ``[k / N, (k + 1) / N)``."""
        n = self.axis.num_train_timesteps
        inner_edges = self.cdf(torch.arange(1, n, dtype=_F64) / n)
        return torch.cat([inner_edges, torch.ones(1, dtype=_F64)]).diff(prepend=torch.zeros(1, dtype=_F64))


class UniformTimestepSampler(TimestepSampler):
    """Uniform training timesteps, the default of diffusers' and HOLD's training loops.

    For DDPM-style schedulers :meth:`sample` calls ``torch.randint(0, N, ...)`` like diffusers' training scripts, and
    for HOLD it reproduces :meth:`HOLDScheduler.sample_timesteps`, so for the same RNG state the timesteps are the
    same as without a sampler (for DDPM-style schedulers :meth:`sample_u` draws ``u`` with ``torch.rand`` instead,
    the same law but another stream). Weights are always ones.

    Args:
        scheduler (`SchedulerMixin`): the training noise scheduler (see :class:`TimestepAxis`).
    """

    def __init__(self, scheduler):
        super().__init__(scheduler)

    def density(self, u: torch.Tensor) -> torch.Tensor:
        u = torch.as_tensor(u, dtype=_F64)
        return ((u >= 0) & (u <= 1)).to(_F64)

    def cdf(self, u: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(u, dtype=_F64).clamp(0, 1)

    def _draw(self, batch_size: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.rand(batch_size, generator=generator, dtype=_F64)
        return u, torch.zeros(batch_size, dtype=torch.bool)

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: str | torch.device | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.axis.discrete:
            return super().sample(batch_size, generator, device)
        batch_size = _check_batch_size(batch_size)
        timesteps = torch.randint(0, self.axis.num_train_timesteps, (batch_size,), generator=generator)
        return timesteps.to(device), torch.ones(batch_size, device=device)


class LogitNormalTimestepSampler(TimestepSampler):
    """Logit-normal timesteps: ``u = sigmoid(mean + std * N(0, 1))`` (as in Stable Diffusion 3's training).

    Args:
        scheduler (`SchedulerMixin`): the training noise scheduler (see :class:`TimestepAxis`).
        mean (`float`, defaults to 0.0): location of ``logit(u)``; negative values favour the data end (small ``t``).
        std (`float`, defaults to 1.0): scale of ``logit(u)``, positive.
        importance_weights (`bool`, defaults to `False`): see :class:`TimestepSampler`.
    """

    def __init__(self, scheduler, mean: float = 0.0, std: float = 1.0, importance_weights: bool = False):
        super().__init__(scheduler, importance_weights)
        self.mean = _finite_float("mean", mean)
        self.std = _finite_float("std", std)
        if self.std <= 0:
            raise ValueError(f"std must be positive, got {std!r}.")

    def density(self, u: torch.Tensor) -> torch.Tensor:
        u = torch.as_tensor(u, dtype=_F64)
        inside = (u > 0) & (u < 1)
        safe_u = torch.where(inside, u, 0.5)
        z = (torch.logit(safe_u) - self.mean) / self.std
        density = torch.exp(-0.5 * z**2) / (math.sqrt(2 * math.pi) * self.std * safe_u * (1 - safe_u))
        return torch.where(inside, density, 0.0)

    def cdf(self, u: torch.Tensor) -> torch.Tensor:
        u = torch.as_tensor(u, dtype=_F64).clamp(0, 1)
        return torch.special.ndtr((torch.logit(u) - self.mean) / self.std)

    def _draw(self, batch_size: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(batch_size, generator=generator, dtype=_F64)
        return torch.sigmoid(self.mean + self.std * z), torch.zeros(batch_size, dtype=torch.bool)


class SNRIntervalTimestepSampler(TimestepSampler):
    """Gaussian timesteps whose central ``confidence`` mass covers an interval of ``u`` or of log-SNR (Vu et al.).

    With ``z = Phi^{-1}((1 + confidence) / 2)`` the Gaussian has ``mean = (c_low + c_high) / 2`` and
    ``std = (c_high - c_low) / (2 z)`` in the interval's space, so ``P(c_low <= X <= c_high) = confidence`` before the
    tail rule. Its mass outside the valid range (``[0, 1]`` for ``u``, :attr:`TimestepAxis.logsnr_range` for log-SNR)
    is handled by ``tails``:

    - ``"renormalize"``: the Gaussian truncated to the range (conditioned on falling inside it);
    - ``"clip"``: draws outside are moved to the nearer end, which becomes an atom of mass ``Phi(a)`` or
      ``1 - Phi(b)`` (``a``, ``b`` the standardised ends);
    - ``"redistribute_uniform"``: the outside mass is given to the uniform timestep law, i.e. the law is the Gaussian
      inside the range plus ``(1 - inside mass)`` times uniform ``u``.

    Then, with ``uniform_mixture = m``, the law is ``(1 - m) * that + m * uniform(u)``, so every timestep keeps being
    trained (``m = 1`` is :class:`UniformTimestepSampler`'s law). "Uniform" always means the uniform timestep law
    (uniform ``u``), the scheduler's default training distribution, in both spaces.

    In log-SNR space, large log-SNR means small ``t``: the last denoising steps, near the data. Shifting the interval
    there (small ``u``, large log-SNR) is what the paper reports to reduce memorization.

    Args:
        scheduler (`SchedulerMixin`): the training noise scheduler (see :class:`TimestepAxis`).
        c_low (`float`), c_high (`float`): the interval, ``c_low < c_high``, inside the valid range of ``space``.
        confidence (`float`, defaults to 0.95): Gaussian mass on the interval, in ``(0, 1)``.
        space (`str`, defaults to `"u"`): `"u"` (normalised time in ``[0, 1]``) or `"logsnr"` (natural log of the
            SNR of the scheduler: ``alphas_cumprod / (1 - alphas_cumprod)``, or :meth:`HOLDScheduler.snr`).
        tails (`str`, defaults to `"renormalize"`): `"renormalize"`, `"clip"` or `"redistribute_uniform"`.
        uniform_mixture (`float`, defaults to 0.0): weight ``m`` in ``[0, 1]`` of the uniform timestep law.
        importance_weights (`bool`, defaults to `False`): see :class:`TimestepSampler`.

    Attributes:
        mean (`float`), std (`float`): the Gaussian, in the interval's space.
        inside_mass (`float`): the Gaussian's mass inside the valid range, before the tail rule.
    """

    def __init__(
        self,
        scheduler,
        c_low: float,
        c_high: float,
        confidence: float = 0.95,
        space: Literal["u", "logsnr"] = "u",
        tails: Literal["renormalize", "clip", "redistribute_uniform"] = "renormalize",
        uniform_mixture: float = 0.0,
        importance_weights: bool = False,
    ):
        super().__init__(scheduler, importance_weights)
        if space not in INTERVAL_SPACES:
            raise ValueError(f"Unknown space {space!r}; expected one of {', '.join(INTERVAL_SPACES)}.")
        if tails not in TAIL_RULES:
            raise ValueError(f"Unknown tails {tails!r}; expected one of {', '.join(TAIL_RULES)}.")
        c_low, c_high = _finite_float("c_low", c_low), _finite_float("c_high", c_high)
        confidence = _finite_float("confidence", confidence)
        uniform_mixture = _finite_float("uniform_mixture", uniform_mixture)
        if not c_low < c_high:
            raise ValueError(f"c_low must be smaller than c_high, got c_low={c_low}, c_high={c_high}.")
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must lie in (0, 1), got {confidence}.")
        if not 0 <= uniform_mixture <= 1:
            raise ValueError(f"uniform_mixture must lie in [0, 1], got {uniform_mixture}.")
        low, high = (0.0, 1.0) if space == "u" else self.axis.logsnr_range
        if not low <= c_low < c_high <= high:
            raise ValueError(
                f"The interval ({c_low}, {c_high}) must lie in the valid {space} range [{low:.6g}, {high:.6g}] of "
                f"{type(scheduler).__name__}."
            )
        self.interval = (c_low, c_high)
        self.confidence = confidence
        self.space = space
        self.tails = tails
        self.uniform_mixture = uniform_mixture
        z = torch.special.ndtri(torch.tensor((1 + confidence) / 2, dtype=_F64)).item()
        self.mean = (c_low + c_high) / 2
        self.std = (c_high - c_low) / (2 * z)

        # Internally the Gaussian lives on a coordinate s that increases with u (s = u, or s = -logsnr), so that one
        # code path serves both spaces; the Gaussian's symmetry makes the law of -logsnr the mirrored Gaussian.
        if space == "u":
            self._s_mean, self._s_range, self._u_span = self.mean, (0.0, 1.0), (0.0, 1.0)
        else:
            table_u = self.axis.logsnr_table[0]
            self._s_mean, self._s_range = -self.mean, (-high, -low)
            self._u_span = (table_u[0].item(), table_u[-1].item())
        a, b = ((end - self._s_mean) / self.std for end in self._s_range)
        self._phi_a, self._phi_b = (torch.special.ndtr(torch.tensor(x, dtype=_F64)).item() for x in (a, b))
        self.inside_mass = self._phi_b - self._phi_a
        outside_to_uniform = 1.0 - self.inside_mass if tails == "redistribute_uniform" else 0.0
        # weight of the uniform law in the final mixture, and the Gaussian part's total mass
        self._uniform_weight = uniform_mixture + (1 - uniform_mixture) * outside_to_uniform
        self._gaussian_mass = 1.0 - outside_to_uniform

    def _s_from_u(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian's coordinate ``s`` at ``u`` and ``ds / du``."""
        if self.space == "u":
            return u, torch.ones_like(u)
        logsnr, slope = self.axis._logsnr_and_slope(u)
        return -logsnr, -slope

    def _u_from_s(self, s: torch.Tensor) -> torch.Tensor:
        return s if self.space == "u" else self.axis.u_from_logsnr(-s)

    def _gaussian_cdf(self, s: torch.Tensor) -> torch.Tensor:
        """``P(S <= s)`` of the Gaussian part after the tail rule, for ``s`` in the valid range's lower end up to
        (excluding) its upper end; total mass ``self._gaussian_mass``."""
        phi = torch.special.ndtr((s - self._s_mean) / self.std)
        if self.tails == "renormalize":
            return (phi - self._phi_a) / self.inside_mass
        if self.tails == "clip":
            # the lower atom is P(S <= s_low) = Phi(a), already in Phi
            return phi
        return phi - self._phi_a

    def density(self, u: torch.Tensor) -> torch.Tensor:
        u = torch.as_tensor(u, dtype=_F64)
        in_span = (u >= self._u_span[0]) & (u <= self._u_span[1])
        s, ds_du = self._s_from_u(u.clamp(*self._u_span))
        gaussian = torch.exp(-0.5 * ((s - self._s_mean) / self.std) ** 2) / (math.sqrt(2 * math.pi) * self.std)
        if self.tails == "renormalize":
            gaussian = gaussian / self.inside_mass
        density = (1 - self.uniform_mixture) * torch.where(in_span, gaussian * ds_du, 0.0) + self._uniform_weight
        return torch.where((u >= 0) & (u <= 1), density, 0.0)

    def cdf(self, u: torch.Tensor) -> torch.Tensor:
        u = torch.as_tensor(u, dtype=_F64)
        s = self._s_from_u(u.clamp(*self._u_span))[0]
        gaussian = torch.where(u < self._u_span[0], 0.0, self._gaussian_cdf(s))
        gaussian = torch.where(u >= self._u_span[1], self._gaussian_mass, gaussian)
        return (1 - self.uniform_mixture) * gaussian + self._uniform_weight * u.clamp(0, 1)

    def _draw(self, batch_size: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        # three fixed streams per draw, whatever the options, so a generator advances the same way for every rule
        choose_uniform = torch.rand(batch_size, generator=generator, dtype=_F64) < self.uniform_mixture
        quantile = torch.rand(batch_size, generator=generator, dtype=_F64)
        uniform_u = torch.rand(batch_size, generator=generator, dtype=_F64)
        s_low, s_high = self._s_range
        if self.tails == "renormalize":
            quantile = self._phi_a + self.inside_mass * quantile
        s = self._s_mean + self.std * torch.special.ndtri(quantile)
        outside = (s < s_low) | (s > s_high)
        if self.tails == "redistribute_uniform":
            choose_uniform = choose_uniform | outside
        in_atom = ~choose_uniform & outside if self.tails == "clip" else torch.zeros(batch_size, dtype=torch.bool)
        gaussian_u = self._u_from_s(s.clamp(s_low, s_high))
        return torch.where(choose_uniform, uniform_u, gaussian_u), in_atom


TIMESTEP_SAMPLERS: dict[str, type[TimestepSampler]] = {
    "uniform": UniformTimestepSampler,
    "snr_interval": SNRIntervalTimestepSampler,
    "logit_normal": LogitNormalTimestepSampler,
}
"""Sampler classes by the names of the training scripts' ``--timestep_sampling`` flag."""


def get_timestep_sampler(name: str, scheduler, **kwargs) -> TimestepSampler:
    """Build the timestep sampler named by a ``--timestep_sampling`` flag.

    Args:
        name (`str`): `"uniform"`, `"snr_interval"` or `"logit_normal"` (the keys of :data:`TIMESTEP_SAMPLERS`).
        scheduler (`SchedulerMixin`): the training noise scheduler.
        **kwargs: the sampler's own arguments (e.g. ``c_low``, ``c_high``, ``space`` for `"snr_interval"`).
    """
    if name not in TIMESTEP_SAMPLERS:
        raise ValueError(f"Unknown timestep sampling {name!r}; expected one of {', '.join(TIMESTEP_SAMPLERS)}.")
    return TIMESTEP_SAMPLERS[name](scheduler, **kwargs)


def _piecewise_linear(
    x: torch.Tensor, nodes_x: torch.Tensor, nodes_y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and slopes at ``x`` of the linear interpolant through the nodes (``nodes_x`` strictly increasing).

    Extrapolates linearly beyond the end nodes; at a node the slope is that of the segment to its right.
    """
    segment = (torch.searchsorted(nodes_x, x, right=True) - 1).clamp(0, len(nodes_x) - 2)
    x0, x1, y0, y1 = nodes_x[segment], nodes_x[segment + 1], nodes_y[segment], nodes_y[segment + 1]
    slope = (y1 - y0) / (x1 - x0)
    return y0 + slope * (x - x0), slope


def _finite_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    return float(value)


def _check_batch_size(batch_size: int) -> int:
    check_positive_int(batch_size, "batch_size")
    return batch_size
