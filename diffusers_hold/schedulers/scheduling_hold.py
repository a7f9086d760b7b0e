"""HOLDScheduler: higher-order Langevin dynamics as a diffusers scheduler.

The state has ``order`` blocks stacked on the channel axis, ``[q | p | s | ...]`` (``order * C`` channels for
``C``-channel data). The model reads the whole state and predicts the noise of the last block (or is a stock VP
epsilon model, converted through the sufficient statistic); every solver is a linear map of the state and the
last block's predicted noise, with coefficients computed in float64 by
:class:`diffusers_hold.dynamics.HOLDDynamics` and cast to the sample's dtype at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..dynamics import HOLDDynamics, LinearStep

__all__ = ["HOLDScheduler", "HOLDSchedulerOutput"]

SOLVERS = ("euler_maruyama", "sscs", "ddim")
TIMESTEP_SPACINGS = ("linear", "quadratic")
PREDICTION_TYPES = ("epsilon", "vp_epsilon")
BETA_SCHEDULES = ("linear", "scaled_linear")


@dataclass
class HOLDSchedulerOutput(BaseOutput):
    """Output of :meth:`HOLDScheduler.step`.

    Args:
        prev_sample (`torch.Tensor` of shape `(batch, order * C, ...)`):
            The full HOLD state at the next (less noisy) time; use it as the next model input.
        pred_original_sample (`torch.Tensor` of shape `(batch, C, ...)`):
            The denoised estimate ``x0_hat = E[x_0 | z_t]`` implied by the model output at the current time.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class HOLDScheduler(SchedulerMixin, ConfigMixin):
    """Sampler and training helper for critically damped higher-order Langevin dynamics (HOLD).

    Forward process (continuous time ``t`` in ``[0, T]``, blocks ``z = (q, p, s, ...)``, data in ``q``)::

        dz = F z dt + G dW,   noise only in the last block,   stationary law N(0, L_inv * I)

    ``order=1`` is the VP diffusion ``dq = -q dt + sqrt(2 / L) dW`` (``alpha_bar(t) = exp(-2 t)`` for
    ``L_inv = 1``), so the same code serves as the baseline. The model is trained to predict the noise ``eps_n`` of
    the last block from the whole state (hybrid score matching, :meth:`add_noise` and :meth:`get_target`).

    **Timesteps.** The model sees ``timestep = t * num_train_timesteps / T`` (a float in
    ``[0, num_train_timesteps]``); every public method of this class takes timesteps in that unit. With
    ``prediction_type="vp_epsilon"`` the sampling timesteps (:attr:`timesteps`, :meth:`step`,
    :meth:`scale_model_input`) are instead the VP model's own fractional timesteps.

    **Sampling grid.** :meth:`set_timesteps` places ``M + 1`` grid times ``T = t_0 > ... > t_M = sampling_eps``
    (``linear`` or ``quadratic`` spacing, the latter denser near the data). With ``denoise_final=True`` the last
    model call is a noise-free denoising step at ``sampling_eps`` (the position block becomes ``x0_hat``), so
    ``num_inference_steps`` model calls make ``M = num_inference_steps - 1`` solver steps; otherwise
    ``M = num_inference_steps``. The model is evaluated at the grid times, except by ``"sscs"``, which evaluates it
    at the midpoints of the grid intervals (Strang splitting).

    **Solvers.** ``"euler_maruyama"`` (the reference sampler of the HOLD papers), ``"sscs"`` (symmetric splitting:
    exact free flow, Euler score kick; CLD's SSCS generalised to any order) and ``"ddim"`` (deterministic
    probability-flow steps that freeze the denoised estimate in gDDIM's ``R_t`` basis; exactly DDIM at order 1).

    **Attributes.** ``order`` is diffusers' solver order (one model call per step, always 1);
    the HOLD order is ``config.order`` (also :attr:`hold_order`).

    Args:
        order (`int`, defaults to 3): number of HOLD blocks ``n >= 1`` (position, velocity, acceleration, ...).
        num_train_timesteps (`int`, defaults to 1000): scale of the timestep the model sees (``t = T`` maps to it).
        T (`float`, defaults to 5.0): time horizon of the forward process.
        L_inv (`float`, defaults to 1.0): stationary variance of every block; the prior is ``N(0, L_inv)``.
        aux_init_var (`float`, defaults to 0.08): ``alpha``; auxiliary blocks start as ``N(0, alpha * L_inv)``.
        eps_num (`float`, defaults to 1e-6): jitter on the diagonal of the kernel covariance.
        train_eps (`float`, defaults to 1e-5): smallest continuous time drawn for training.
        sampling_eps (`float`, defaults to 1e-3): continuous time at which sampling stops.
        solver (`str`, defaults to `"euler_maruyama"`): `"euler_maruyama"`, `"sscs"` or `"ddim"`.
        timestep_spacing (`str`, defaults to `"linear"`): `"linear"` or `"quadratic"` grid in ``t``.
        prediction_type (`str`, defaults to `"epsilon"`): `"epsilon"`: a HOLD model predicts the last block's noise
            from the whole state. `"vp_epsilon"`: zero-shot HOLD with a pretrained VP (DDPM) epsilon model; the
            model sees ``sqrt(alpha_bar) * s`` (``C`` channels), where ``s`` is the sufficient statistic of the state
            for ``x_0``, at the VP timestep whose ``alphas_cumprod`` is ``1 / (1 + Var(s - x_0))`` (clamped to the
            VP table), and its ``x0`` estimate gives the exact HOLD score when the model is exact.
        denoise_final (`bool`, defaults to `True`): make the last model call a noise-free Euler step of the reverse
            SDE from ``sampling_eps`` to 0.
        beta_start (`float`, defaults to 0.0001), beta_end (`float`, defaults to 0.02), beta_schedule (`str`,
            defaults to `"linear"`), trained_betas (`list[float]`, *optional*): the VP noise schedule of the model
            for `"vp_epsilon"`, under diffusers' names so that ``HOLDScheduler.from_config(pipe.scheduler.config,
            prediction_type="vp_epsilon")`` takes them from a stock scheduler (``"linear"`` or
            ``"scaled_linear"`` over ``num_train_timesteps`` steps). Unused with `"epsilon"`.
    """

    _compatibles = []
    order = 1

    @register_to_config
    def __init__(
        self,
        order: int = 3,
        num_train_timesteps: int = 1000,
        T: float = 5.0,
        L_inv: float = 1.0,
        aux_init_var: float = 0.08,
        eps_num: float = 1e-6,
        train_eps: float = 1e-5,
        sampling_eps: float = 1e-3,
        solver: Literal["euler_maruyama", "sscs", "ddim"] = "euler_maruyama",
        timestep_spacing: Literal["linear", "quadratic"] = "linear",
        prediction_type: Literal["epsilon", "vp_epsilon"] = "epsilon",
        denoise_final: bool = True,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: Literal["linear", "scaled_linear"] = "linear",
        trained_betas: list[float] | None = None,
    ):
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}.")
        if not (isinstance(T, (int, float)) and math.isfinite(T) and T > 0):
            raise ValueError(f"T must be a positive finite number, got {T!r}.")
        for name, value in (("train_eps", train_eps), ("sampling_eps", sampling_eps)):
            if not (isinstance(value, (int, float)) and 0 < value < T):
                raise ValueError(f"{name} must lie in (0, T={T}), got {value!r}.")
        for name, value, allowed in (
            ("solver", solver, SOLVERS),
            ("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS),
            ("prediction_type", prediction_type, PREDICTION_TYPES),
            ("beta_schedule", beta_schedule, BETA_SCHEDULES),
        ):
            if value not in allowed:
                raise ValueError(f"Unknown {name} {value!r}; expected one of {', '.join(allowed)}.")
        self.dynamics = HOLDDynamics(order, L_inv=L_inv, aux_init_var=aux_init_var, eps_num=eps_num)
        if trained_betas is not None:
            betas = torch.tensor(trained_betas, dtype=torch.float64)
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        else:
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        if len(betas) != num_train_timesteps or not ((betas > 0) & (betas < 1)).all():
            raise ValueError(f"The VP betas must be {num_train_timesteps} values in (0, 1).")
        # alpha_bar of the VP model, used by prediction_type="vp_epsilon"
        self.vp_alphas_cumprod = torch.cumprod(1.0 - betas, 0)

        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None
        self._steps: LinearStep | None = None
        self._x0_coefficients: tuple[torch.Tensor, torch.Tensor] | None = None
        self._vp_inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._begin_index: int | None = None
        self._step_index: int | None = None

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def hold_order(self) -> int:
        """Number of HOLD blocks (``config.order``); the model input has ``hold_order * C`` channels."""
        return self.config.order

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the stationary prior ``N(0, L_inv * I)`` that every block starts from."""
        return math.sqrt(self.config.L_inv)

    @property
    def begin_index(self) -> int | None:
        """First step index set by a pipeline with :meth:`set_begin_index` (``None`` when not set)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Record the first step index (pipelines call this for image-to-image).

        Steps are located by their timestep value, so this is bookkeeping only.
        """
        self._begin_index = begin_index

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ------------------------------------------------------------------------------------------------ time units
    def timestep_to_time(self, timesteps: torch.Tensor | float) -> torch.Tensor:
        """Continuous time ``t = timestep * T / num_train_timesteps`` in float64 on the CPU."""
        timesteps = torch.as_tensor(timesteps).detach().to("cpu", torch.float64)
        if not torch.isfinite(timesteps).all() or (timesteps < 0).any() or (timesteps > len(self)).any():
            raise ValueError(
                f"timesteps must lie in [0, num_train_timesteps={len(self)}], got values in "
                f"[{timesteps.min().item()}, {timesteps.max().item()}]."
            )
        return timesteps * (self.config.T / len(self))

    def time_to_timestep(self, t: torch.Tensor | float) -> torch.Tensor:
        """Model timestep ``t * num_train_timesteps / T`` for continuous times ``t`` (float64)."""
        return torch.as_tensor(t, dtype=torch.float64) * (len(self) / self.config.T)

    # -------------------------------------------------------------------------------------------------- sampling
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[float] | torch.Tensor | None = None,
    ) -> None:
        """Build the sampling grid and precompute every step's coefficients in float64.

        Args:
            num_inference_steps (`int`, *optional*): number of model calls.
            device (`str` or `torch.device`, *optional*): device of :attr:`timesteps`.
            timesteps (`list[float]` or `torch.Tensor`, *optional*): a custom, strictly decreasing grid in model
                timestep units, in ``(0, num_train_timesteps]``; it replaces the spaced grid. Without
                ``denoise_final``, ``sampling_eps`` is appended as the end point if the grid stops above it.
        """
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("Pass exactly one of `num_inference_steps` and `timesteps`.")
        cfg = self.config
        if timesteps is not None:
            grid = self.timestep_to_time(timesteps).flatten()
            if grid.numel() < 1 or (grid <= 0).any() or (grid[1:] >= grid[:-1]).any():
                raise ValueError("Custom `timesteps` must be non-empty, positive and strictly decreasing.")
            if not cfg.denoise_final and grid[-1] > cfg.sampling_eps:
                grid = torch.cat([grid, torch.tensor([cfg.sampling_eps], dtype=torch.float64)])
        else:
            if not isinstance(num_inference_steps, int) or num_inference_steps < (2 if cfg.denoise_final else 1):
                raise ValueError(
                    "num_inference_steps must be an integer >= 1 (>= 2 with denoise_final), "
                    f"got {num_inference_steps!r}."
                )
            num_intervals = num_inference_steps - 1 if cfg.denoise_final else num_inference_steps
            u = torch.linspace(0.0, 1.0, num_intervals + 1, dtype=torch.float64)
            if cfg.timestep_spacing == "quadratic":
                u = 1.0 - (1.0 - u) ** 2
            grid = cfg.T - (cfg.T - cfg.sampling_eps) * u

        dyn = self.dynamics
        start, end = grid[:-1], grid[1:]
        if cfg.solver == "euler_maruyama":
            eval_times, steps = start, dyn.euler_maruyama_step(start, end)
        elif cfg.solver == "ddim":
            eval_times, steps = start, dyn.ddim_step(start, end)
        else:  # sscs: kick at the interval midpoint, then free flow to the next midpoint (or to the grid end)
            h = start - end
            eval_times = 0.5 * (start + end)
            free = 0.5 * h + 0.5 * torch.cat([h[1:], h.new_zeros(1)])
            steps = dyn.sscs_step(eval_times, h, free)
        if cfg.denoise_final:
            final = dyn.denoise_step(grid[-1:])
            eval_times = torch.cat([eval_times, grid[-1:]])
            noise = steps.noise_matrix
            steps = LinearStep(
                torch.cat([steps.state_matrix, final.state_matrix]),
                torch.cat([steps.eps_vector, final.eps_vector]),
                None if noise is None else torch.cat([noise, torch.zeros_like(final.state_matrix)]),
            )
        self._steps = steps
        self._x0_coefficients = dyn.x0_coefficients(eval_times)
        self.num_inference_steps = len(eval_times)
        if cfg.prediction_type == "vp_epsilon":
            model_timesteps = self._set_vp_inputs(eval_times)
        else:
            model_timesteps = self.time_to_timestep(eval_times)
        self.timesteps = model_timesteps.to(device=device, dtype=torch.float32)
        self._begin_index = None
        self._step_index = None

    def _set_vp_inputs(self, eval_times: torch.Tensor) -> torch.Tensor:
        """Sufficient-statistic weights, VP ``alpha_bar`` and fractional VP timesteps for the zero-shot mode.

        The timestep is interpolated linearly in the VP table's log-SNR; ``alpha_bar`` is clamped to the range the
        VP model was trained on.
        """
        weights, variance = self.dynamics.sufficient_statistic(eval_times)
        table = self.vp_alphas_cumprod
        alpha_bar = (1.0 / (1.0 + variance)).clamp(float(table[-1]), float(table[0]))
        table_log_snr = torch.log(table / (1 - table))  # decreasing with the timestep
        log_snr = torch.log(alpha_bar / (1 - alpha_bar))
        positions = torch.arange(len(table), dtype=torch.float64)
        vp_timesteps = torch.from_numpy(np.interp(-log_snr.numpy(), -table_log_snr.numpy(), positions.numpy()))
        self._vp_inputs = (weights, alpha_bar)
        return vp_timesteps

    def index_for_timestep(self, timestep: float | torch.Tensor) -> int:
        """Position of ``timestep`` in :attr:`timesteps`; raises if it is not one of them.

        A value that occurs more than once (zero-shot timesteps clamped to the VP table's end) resolves to the
        position the step counter has reached.
        """
        if self.timesteps is None:
            raise ValueError("Call `set_timesteps` before `step`.")
        value = torch.as_tensor(timestep).to(device=self.timesteps.device, dtype=self.timesteps.dtype)
        if value.numel() != 1:
            raise ValueError(f"`step` takes one timestep for the whole batch, got shape {tuple(value.shape)}.")
        matches = (self.timesteps == value.reshape(())).nonzero()
        if len(matches) == 0:
            raise ValueError(
                f"timestep {value.item()} is not in the schedule set by `set_timesteps` (values from "
                f"{self.timesteps[0].item()} down to {self.timesteps[-1].item()})."
            )
        positions = matches[:, 0].tolist()
        if len(positions) > 1 and self._step_index in positions:
            return self._step_index
        return positions[0]

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """Return the model input for ``sample``.

        With ``prediction_type="epsilon"`` it is the full HOLD state, unchanged. With `"vp_epsilon"` it is the VP
        model's input ``sqrt(alpha_bar) * s`` of shape ``(batch, C, ...)``, built from the sufficient statistic ``s``.

        Args:
            sample (`torch.Tensor` of shape `(batch, order * C, ...)`): the current state.
            timestep (`float` or `torch.Tensor`): the current entry of :attr:`timesteps` (needed by `"vp_epsilon"`).
        """
        self._split_channels(sample)
        if self.config.prediction_type != "vp_epsilon":
            return sample
        if timestep is None:
            raise ValueError('scale_model_input needs the timestep with prediction_type="vp_epsilon".')
        return self._vp_model_input(sample, self.index_for_timestep(timestep))

    def _vp_model_input(self, sample: torch.Tensor, index: int) -> torch.Tensor:
        weights, alpha_bar = self._vp_inputs
        n = self.hold_order
        state = sample.reshape(sample.shape[0], n, -1)
        w = weights[index].to(device=sample.device, dtype=sample.dtype)
        statistic = (w[None, :, None] * state).sum(1)
        shape = (sample.shape[0], sample.shape[1] // n, *sample.shape[2:])
        return (float(alpha_bar[index]) ** 0.5 * statistic).reshape(shape)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> HOLDSchedulerOutput | tuple:
        """Advance the state one step of the chosen solver.

        Args:
            model_output (`torch.Tensor` of shape `(batch, C, ...)`): predicted noise of the last block (or, with
                `"vp_epsilon"`, the VP model's noise prediction for :meth:`scale_model_input`'s output).
            timestep (`float` or `torch.Tensor`): the current entry of :attr:`timesteps`.
            sample (`torch.Tensor` of shape `(batch, order * C, ...)`): the current state.
            generator (`torch.Generator` or list of them, *optional*): source of the solver's noise.
            return_dict (`bool`, defaults to `True`): return a :class:`HOLDSchedulerOutput` instead of a tuple.

        Returns:
            :class:`HOLDSchedulerOutput` or `tuple`: ``(prev_sample, pred_original_sample)``.
        """
        index = self.index_for_timestep(timestep)
        channels = self._split_channels(sample)
        expected = (sample.shape[0], channels, *sample.shape[2:])
        if tuple(model_output.shape) != expected:
            raise ValueError(
                f"model_output has shape {tuple(model_output.shape)}; expected {expected}: the last block's noise "
                f"for a state of {sample.shape[1]} channels (order {self.hold_order})."
            )
        if not torch.isfinite(model_output).all():
            raise ValueError(f"model_output contains NaN or infinite values at timestep {float(timestep):.4f}.")

        n = self.hold_order
        dtype, device = sample.dtype, sample.device
        state = sample.reshape(sample.shape[0], n, -1)  # (batch, n, C * spatial)
        eps = model_output.reshape(sample.shape[0], 1, -1).to(dtype)

        def coef(x: torch.Tensor) -> torch.Tensor:
            return x[index].to(device=device, dtype=dtype)

        ell, c = self._x0_coefficients
        whitened = (coef(ell)[None, :, None] * state).sum(1)
        if self.config.prediction_type == "vp_epsilon":
            # VP denoiser -> x0_hat -> the last block's noise that implies it (HOLD_MATH section 4)
            alpha_bar = float(self._vp_inputs[1][index])
            vp_input = self._vp_model_input(sample, index).reshape_as(eps[:, 0])
            pred_original = (vp_input - (1 - alpha_bar) ** 0.5 * eps[:, 0]) / alpha_bar**0.5
            eps = (whitened - coef(c) * pred_original)[:, None]
        else:
            pred_original = (whitened - eps[:, 0]) / coef(c)
        steps = self._steps
        prev = (
            torch.einsum("ij,bjr->bir", coef(steps.state_matrix), state) + coef(steps.eps_vector)[None, :, None] * eps
        )
        if steps.noise_matrix is not None:
            # draw noise only for the blocks it enters through (Euler-Maruyama: the last block alone)
            columns = steps.noise_matrix[index].abs().sum(0).nonzero()[:, 0]
            if len(columns):
                shape = (state.shape[0], len(columns), state.shape[2])
                noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
                noise_matrix = steps.noise_matrix[index][:, columns].to(device=device, dtype=dtype)
                prev = prev + torch.einsum("ij,bjr->bir", noise_matrix, noise)
        prev_sample = prev.reshape(sample.shape)
        pred_original_sample = pred_original.reshape(model_output.shape)
        self._step_index = index + 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return HOLDSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    # -------------------------------------------------------------------------------------------------- training
    def sample_timesteps(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        """Training timesteps with continuous time ``t ~ U[train_eps, T]``, in model units (float32).

        Args:
            batch_size (`int`): number of timesteps.
            generator (`torch.Generator`, *optional*): CPU generator for reproducibility.
            device (`str` or `torch.device`, *optional*): device of the result.
        """
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        t = self.config.train_eps + (self.config.T - self.config.train_eps) * u
        return self.time_to_timestep(t).to(device=device, dtype=torch.float32)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Draw the augmented state ``z_t = a_t x_0 + L_t eps`` from the exact HOLD kernel.

        Args:
            original_samples (`torch.Tensor` of shape `(batch, C, ...)`): clean data ``x_0``.
            noise (`torch.Tensor` of shape `(batch, order * C, ...)`): standard normal noise for every block.
            timesteps (`torch.Tensor` of shape `(batch,)` or a scalar): model timesteps.

        Returns:
            `torch.Tensor` of shape `(batch, order * C, ...)`: the noisy state; train the model to predict
            :meth:`get_target` of ``noise`` from it.
        """
        n = self.hold_order
        batch = original_samples.shape[0]
        expected = (batch, n * original_samples.shape[1], *original_samples.shape[2:])
        if tuple(noise.shape) != expected:
            raise ValueError(
                f"noise has shape {tuple(noise.shape)}; expected {expected} (order {n} blocks of the data's shape)."
            )
        t = self.timestep_to_time(timesteps).flatten()
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"Got {t.numel()} timesteps for a batch of {batch} samples.")
        dtype, device = original_samples.dtype, original_samples.device
        mean = self.dynamics.mean_coefficients(t).to(device=device, dtype=dtype)  # (batch, n)
        chol = self.dynamics.cholesky(t).to(device=device, dtype=dtype)  # (batch, n, n)
        x0 = original_samples.reshape(batch, 1, -1)
        z = mean[:, :, None] * x0 + chol @ noise.reshape(batch, n, -1)
        return z.reshape(noise.shape)

    def get_target(self, noise: torch.Tensor) -> torch.Tensor:
        """The training target for :meth:`add_noise`'s ``noise``: its last block, shape `(batch, C, ...)`."""
        channels = self._split_channels(noise)
        return noise[:, -channels:]

    def snr(self, timesteps: torch.Tensor | float) -> torch.Tensor:
        """Signal-to-noise ratio of the position block at the given model timesteps (float64 CPU tensor).

        ``SNR = a_t[1]^2 / Sigma_t[1, 1]``; at order 1 it is the VP ``alpha_bar / (1 - alpha_bar)``.
        """
        return self.dynamics.snr(self.timestep_to_time(timesteps))

    def _split_channels(self, state: torch.Tensor) -> int:
        """Channels ``C`` of one block of ``state``; raises unless the state has ``order * C`` channels."""
        n = self.hold_order
        if state.ndim < 2 or state.shape[1] % n != 0 or state.shape[1] == 0:
            raise ValueError(
                f"Expected a HOLD state of shape (batch, order * C, ...) with order {n}, got {tuple(state.shape)}."
            )
        return state.shape[1] // n
