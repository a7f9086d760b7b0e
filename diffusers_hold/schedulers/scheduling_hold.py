"""HOLDScheduler: higher-order Langevin dynamics as a diffusers scheduler.

The state has ``order`` blocks stacked on the channel axis, ``[q | p | s | ...]`` (``order * C`` channels for
``C``-channel data). The model reads the whole state and predicts the noise of the last block (or is a stock VP
epsilon model, converted through the sufficient statistic); every solver is a linear map of the state and the
last block's predicted noise, with coefficients computed in float64 by
:class:`diffusers_hold.dynamics.HOLDDynamics` and cast to the sample's dtype at the end.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .._validation import is_integer
from ..dynamics import HOLDDynamics, LinearStep
from .vp_conversion import VPConversion, vp_betas

__all__ = [
    "HOLD_SETTINGS_ATTRIBUTE",
    "PROCESS_KEYS",
    "RECOMMENDED_INFERENCE_STEPS",
    "VP_SCHEDULE_KEYS",
    "HOLDScheduler",
    "HOLDSchedulerOutput",
]

SOLVERS = ("euler_maruyama", "sscs", "ddim", "exp_multistep")
# Model calls per sample that each solver needs to sample as the model is trained to, read by
# `HOLDScheduler.recommended_num_inference_steps` (and so by the memorization audit, whose default step count it is).
# All three solvers converge at first order. On the exact-score Gaussian-mixture benchmark
# (benchmarks/results/sampler_accuracy.json) the fewest steps within 5 % of the 1000-step accuracy are 250 for HOLD-2
# SSCS and HOLD-3 Euler-Maruyama and 1000 for the others; at 250 steps every HOLD solver is within 2.3x of the Monte
# Carlo floor, at 50 steps up to 5.4x (DDIM-type, order 2). With the exact empirical score of 16 digits (a model that
# copies its training images), order-3 SSCS on the linear grid copies nothing at 50 steps and everything at 250
# (tests/test_audit.py).
# exp_multistep (second order by default) is within the Monte Carlo floor of that benchmark at 50 model calls for HOLD
# orders 1-3 (benchmarks/results/sampler_accuracy.json, the README's Performance section).
RECOMMENDED_INFERENCE_STEPS = {"euler_maruyama": 250, "sscs": 250, "ddim": 250, "exp_multistep": 50}
# exp_multistep: the quantity interpolated across model calls and the noise scale eta of the reverse dynamics, under
# the names of diffusers' DPMSolverMultistepScheduler, which each equals at HOLD order 1
ALGORITHM_TYPES = {"dpmsolver": ("noise", 0.0), "dpmsolver++": ("data", 0.0), "sde-dpmsolver++": ("data", 1.0)}
TIMESTEP_SPACINGS = ("linear", "quadratic", "log_snr", "log1p", "vp_linspace")
PREDICTION_TYPES = ("epsilon", "vp_epsilon")
BETA_SCHEDULES = ("linear", "scaled_linear")
# Config keys that define the forward process. A HOLD UNet is trained for (or converted under) exactly these values,
# so it records them and refuses a scheduler whose values differ (see `HOLD_SETTINGS_ATTRIBUTE`).
PROCESS_KEYS = ("order", "num_train_timesteps", "T", "L_inv", "aux_init_var", "eps_num")
VP_SCHEDULE_KEYS = ("beta_start", "beta_end", "beta_schedule", "trained_betas")
# `scale_model_input` attaches the scheduler's process settings to its output under this attribute name; a HOLD UNet
# compares them with its own, since stock pipelines pass that tensor to the UNet unchanged.
HOLD_SETTINGS_ATTRIBUTE = "hold_settings"


@dataclass
class HOLDSchedulerOutput(BaseOutput):
    """Output of :meth:`HOLDScheduler.step`.

    Args:
        prev_sample (`torch.Tensor`):
            The sample at the next (less noisy) time, shaped like the ``sample`` given to :meth:`HOLDScheduler.step`:
            the position block (``C`` channels) by default, the full state (``order * C``) with ``full_state=True``.
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
    exact free flow, Euler score kick; CLD's SSCS generalised to any order), ``"ddim"`` (deterministic
    probability-flow steps that freeze the denoised estimate in gDDIM's ``R_t`` basis; exactly DDIM at order 1) and
    ``"exp_multistep"``, the few-step solver: a multistep exponential integrator of order ``solver_order`` (1-3) that
    integrates the linear part of the dynamics exactly and interpolates the model's contribution across the last
    ``solver_order`` model calls in the log-SNR (:meth:`~diffusers_hold.HOLDDynamics.exponential_step`), with
    coefficients computed once per :meth:`set_timesteps`. ``algorithm_type`` picks what is interpolated:
    ``"dpmsolver"`` (the default) the noise part in gDDIM's ``R_t`` basis, ``"dpmsolver++"`` the denoised estimate,
    ``"sde-dpmsolver++"`` the denoised estimate on the reverse SDE (noise injected every step). At HOLD order 1 each is
    diffusers' ``DPMSolverMultistepScheduler`` with the same ``algorithm_type`` and ``solver_type="heun"`` (orders 1
    and 2; its third-order update differs). The first steps warm up at lower order, and the history of earlier calls
    is kept like diffusers' multistep schedulers keep theirs: reset by :meth:`set_timesteps`, per trajectory (a new
    batch needs a new :meth:`set_timesteps`), and a trajectory entered mid-schedule starts at first order. With
    ``denoise_final`` the last call is still the noise-free denoising step.

    **Samples: the position block, or the full state.** A stock diffusers pipeline (``StableDiffusionPipeline``,
    img2img, ...) carries ``C``-channel ``latents`` (its VAE decodes them), so by default ``sample`` is the position
    block ``q`` and the scheduler keeps the auxiliary blocks ``(p, s, ...)`` itself, the way multistep schedulers keep
    their history:

    - :meth:`scale_model_input` returns the augmented state ``[q | aux]`` (``order * C`` channels) that a HOLD UNet
      reads; the ``sample`` passed in is the authoritative ``q``, so a ``callback_on_step_end`` that replaces
      ``latents`` is honoured.
    - The auxiliary blocks are reset by :meth:`set_timesteps`. At the first call of a trajectory, at whatever step
      it starts, they are drawn from their law given ``q`` under the forward marginal at the sample's time, for data
      of mean 0 and variance 1 per element (Stable Diffusion's scaled latents are close to that):
      ``aux | q ~ N(g_t q, S_t)`` from the joint Gaussian ``N(0, a_t a_t^T + Sigma_t)``
      (:meth:`~diffusers_hold.dynamics.HOLDDynamics.auxiliary_given_position`). At the first timestep (``t = T``) this
      is the prior ``N(0, L_inv)`` up to ``~1e-4`` and nearly independent of ``q``; later (SDXL's refiner with
      ``denoising_start``, or a caller that steps from any timestep) it is the exact conditional law for such data
      and a moment-matched approximation for others. The noise of row ``i`` comes from a generator seeded by a hash
      of ``q[i]``: a pipeline ``generator`` (or given ``latents``) fixes the whole state, and image ``i`` of a batch
      made with ``generator=[g_0, g_1, ...]`` equals the image made alone with ``g_i``. :meth:`add_noise` with
      ``C``-channel noise (image-to-image, where ``x_0`` is known) instead draws them from the exact forward kernel
      at the start time, row ``i`` seeded by a hash of ``noise[i]``.
    - A batch that is a multiple of the stored one (the classifier-free-guidance doubled batch ``cat([latents] * 2)``)
      gets the auxiliary blocks tiled the same way; equal rows (the copies made for guidance) get equal draws.

    Pass ``full_state=True`` to :meth:`scale_model_input` and :meth:`step` to carry the whole ``order * C``-channel
    state yourself instead (as :class:`~diffusers_hold.HOLDPipeline` does); no hidden state is used then.

    **Attributes.** ``order`` is diffusers' solver order (one model call per step, always 1);
    the HOLD order is ``config.order`` (also :attr:`hold_order`). After :meth:`set_timesteps`, ``trajectory_times``
    (float64, one more than the steps) holds the continuous time of the sample before the first step and after each
    step, which trajectory diagnostics compare against (:func:`diffusers_hold.metrics.reference_weights`).

    **VP tables and compatible schedulers.** With ``prediction_type="vp_epsilon"`` the model is a stock VP model and
    ``betas`` / ``alphas_cumprod`` (float64) are its tables, indexed by its integer timesteps, so diffusers helpers
    such as ``diffusers.training_utils.compute_snr`` work; :attr:`compatibles` then lists the stock schedulers it can
    be swapped for (pass ``prediction_type="epsilon"`` to their ``from_config``). A native HOLD scheduler
    (``"epsilon"``) has neither attribute (reading one raises an ``AttributeError`` that points to :meth:`snr`): its
    position block is not ``sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps``, its timesteps are continuous, and helpers
    that find ``alphas_cumprod`` apply DDPM formulas; no stock scheduler is compatible with a HOLD UNet.

    **Diffusers contracts that differ by design.** :meth:`scale_model_input` needs :meth:`set_timesteps` and a
    timestep of the schedule (the model input depends on the step), and with ``prediction_type="epsilon"`` it returns
    the augmented state, not a tensor shaped like ``sample``. ``trained_betas`` must list ``num_train_timesteps``
    values. The auxiliary blocks kept for a trajectory belong to one step: a call at another step (diffusers' tests
    step from arbitrary timesteps of a fresh schedule) draws them afresh by the first-call rule above.

    Args:
        order (`int`, defaults to 3): number of HOLD blocks ``n >= 1`` (position, velocity, acceleration, ...).
        num_train_timesteps (`int`, defaults to 1000): scale of the timestep the model sees (``t = T`` maps to it).
        T (`float`, defaults to 5.0): time horizon of the forward process. A HOLD model is trained for one; with
            `"vp_epsilon"` it is a free sampling setting. At order 2 the position still holds 4 % of the data at
            ``T = 5``, so the standard-normal prior biases sampling once steps are many; ``T = 8`` removes it
            (``benchmarks/bench_sampler_accuracy.py``, 50 calls).
        L_inv (`float`, defaults to 1.0): stationary variance of every block; the prior is ``N(0, L_inv)``.
        aux_init_var (`float`, defaults to 0.08): ``alpha``; auxiliary blocks start as ``N(0, alpha * L_inv)``.
        eps_num (`float`, defaults to 1e-6): jitter on the diagonal of the kernel covariance.
        train_eps (`float`, defaults to 1e-5): smallest continuous time drawn for training.
        sampling_eps (`float`, defaults to 1e-3): continuous time at which sampling stops.
        sampling_T (`float`, *optional*): continuous time at which the spaced grid starts, in ``(sampling_eps, T]``;
            `None` starts at ``T``. The state is still drawn from the prior, so a start below ``T`` trades the
            prior's mismatch (at HOLD order 3 and ``T = 5``, ``sampling_T = 3.5`` leaves the noise covariance within
            1 % of the prior, at a position log-SNR of -6.2; Stable Diffusion's VP schedule starts at -5.4) for steps
            not spent at noise levels the data barely reaches. Measured best for few-step `"exp_multistep"` sampling
            at order 3: 3.0 at 10 calls, 3.5 at 15-25, ``T`` from 50 (``benchmarks/bench_sampler_accuracy.py``).
        solver (`str`, defaults to `"euler_maruyama"`): `"euler_maruyama"`, `"sscs"`, `"ddim"` or `"exp_multistep"`.
        solver_order (`int`, defaults to 2): how many model calls `"exp_multistep"` interpolates (1, 2 or 3).
        algorithm_type (`str`, defaults to `"dpmsolver"`): what `"exp_multistep"` interpolates: `"dpmsolver"` (noise
            part, probability-flow ODE), `"dpmsolver++"` (denoised estimate, ODE) or `"sde-dpmsolver++"` (denoised
            estimate, reverse SDE). Measured choice: `"dpmsolver"` with exact scores, `"sde-dpmsolver++"` for learned
            HOLD models (the ODE types diverge there at orders >= 2), `"sde-dpmsolver++"` with
            ``timestep_spacing="vp_linspace"`` and ``lower_order_final=True`` for zero-shot `"vp_epsilon"` sampling
            (``benchmarks/bench_learned_sampler.py``).
        lower_order_final (`bool`, defaults to `False`): as diffusers' `DPMSolverMultistepScheduler`: the last
            `"exp_multistep"` step is first order, and with fewer than 15 steps the one before reads at most two
            estimates. The last step of a few-step grid spans the widest range of noise levels, where extrapolating
            earlier estimates is least accurate; needed with `"vp_linspace"`. Off by default so that the measured
            `"log1p"` results stand as measured.
        timestep_spacing (`str`, defaults to `"linear"`): `"linear"` or `"quadratic"` grid in ``t``, `"log_snr"`:
            uniform in :meth:`~diffusers_hold.HOLDDynamics.log_snr` (DPM-Solver's uniform-lambda grid at order 1), or
            `"log1p"`: uniform in ``log(1 + t)``, which spends more steps at high noise than `"quadratic"`; it is the
            measured best grid for `"exp_multistep"` at HOLD orders 2 and 3 with native HOLD models. `"vp_linspace"`
            (`"vp_epsilon"` only): the VP model is called at evenly spaced VP timesteps, from the start's down towards
            0, as `DPMSolverMultistepScheduler`'s `"linspace"` grid calls it, and the grid then ends at
            ``sampling_eps``; measured best for zero-shot few-step sampling, where `"log1p"` spends its last calls at
            noise levels the VP model sees as clean.
        prediction_type (`str`, defaults to `"epsilon"`): `"epsilon"`: a HOLD model predicts the last block's noise
            from the whole state. `"vp_epsilon"`: zero-shot HOLD with a pretrained VP (DDPM) epsilon model; the
            model sees ``sqrt(alpha_bar) * s`` (``C`` channels), where ``s`` is the sufficient statistic of the state
            for ``x_0``, at the VP timestep whose ``alphas_cumprod`` is ``1 / (1 + Var(s - x_0))`` (clamped to the
            VP table), and its ``x0`` estimate gives the exact HOLD score when the model is exact.
        denoise_final (`bool`, defaults to `True`): make the last model call a noise-free Euler step of the reverse
            SDE from ``sampling_eps`` to 0. For few-step sampling at HOLD orders >= 2 pass `False`: the position's
            own noise at ``sampling_eps`` is already negligible there (std about 3e-4 at order 3), and the call is
            better spent on a solver step.
        beta_start (`float`, defaults to 0.0001), beta_end (`float`, defaults to 0.02), beta_schedule (`str`,
            defaults to `"linear"`), trained_betas (`list[float]`, *optional*): the VP noise schedule of the model
            for `"vp_epsilon"`, under diffusers' names so that ``HOLDScheduler.from_config(pipe.scheduler.config,
            prediction_type="vp_epsilon")`` takes them from a stock scheduler (``"linear"`` or
            ``"scaled_linear"`` over ``num_train_timesteps`` steps). Unused with `"epsilon"`.
    """

    # the stock schedulers a zero-shot ("vp_epsilon") HOLD scheduler can be swapped for: its model is a stock VP
    # epsilon model, so diffusers' own list for DDPMScheduler; `compatibles` offers them for "vp_epsilon" only
    _compatibles = list(DDPMScheduler._compatibles)
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
        sampling_T: float | None = None,
        solver: Literal["euler_maruyama", "sscs", "ddim", "exp_multistep"] = "euler_maruyama",
        solver_order: int = 2,
        algorithm_type: Literal["dpmsolver", "dpmsolver++", "sde-dpmsolver++"] = "dpmsolver",
        lower_order_final: bool = False,
        timestep_spacing: Literal["linear", "quadratic", "log_snr", "log1p", "vp_linspace"] = "linear",
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
        if sampling_T is not None and not (isinstance(sampling_T, (int, float)) and sampling_eps < sampling_T <= T):
            raise ValueError(f"sampling_T must lie in (sampling_eps={sampling_eps}, T={T}], got {sampling_T!r}.")
        for name, value, allowed in (
            ("solver", solver, SOLVERS),
            ("algorithm_type", algorithm_type, tuple(ALGORITHM_TYPES)),
            ("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS),
            ("prediction_type", prediction_type, PREDICTION_TYPES),
            ("beta_schedule", beta_schedule, BETA_SCHEDULES),
        ):
            if value not in allowed:
                raise ValueError(f"Unknown {name} {value!r}; expected one of {', '.join(allowed)}.")
        if not isinstance(solver_order, int) or isinstance(solver_order, bool) or not 1 <= solver_order <= 3:
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}.")
        if not isinstance(lower_order_final, bool):
            raise ValueError(f"lower_order_final must be True or False, got {lower_order_final!r}.")
        if timestep_spacing == "vp_linspace" and prediction_type != "vp_epsilon":
            raise ValueError(
                'timestep_spacing="vp_linspace" places the model calls at a VP model\'s timesteps; it needs '
                'prediction_type="vp_epsilon".'
            )
        defaulted = set(self.config.get("_use_default_values", []))
        if prediction_type == "vp_epsilon" and defaulted.issuperset(VP_SCHEDULE_KEYS):
            # a silent default schedule would feed the VP model the wrong noise levels
            raise ValueError(
                'prediction_type="vp_epsilon" needs the VP model\'s noise schedule: build the scheduler from the '
                'pretrained one, HOLDScheduler.from_config(pipe.scheduler.config, prediction_type="vp_epsilon", '
                "...), or pass beta_start, beta_end and beta_schedule (or trained_betas)."
            )
        self.dynamics = HOLDDynamics(order, L_inv=L_inv, aux_init_var=aux_init_var, eps_num=eps_num)
        betas = vp_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        # alpha_bar of the VP model, used by prediction_type="vp_epsilon"
        self.vp_alphas_cumprod = torch.cumprod(1.0 - betas, 0)
        self._vp_conversion = VPConversion(self.dynamics, self.vp_alphas_cumprod)
        if prediction_type == "vp_epsilon":
            # the model is a stock VP model, and these are its tables under diffusers' names (see the class docstring)
            self.betas = betas
            self.alphas_cumprod = self.vp_alphas_cumprod

        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None
        self._steps: LinearStep | None = None
        self._solver_cache: tuple[torch.Tensor, tuple[torch.Tensor, tuple[LinearStep, ...]]] | None = None
        # exp_multistep: the step forms that read 2..solver_order denoised estimates, and the estimates of the
        # previous model calls as (step index, x0_hat) pairs, most recent last
        self._multistep_steps: tuple[LinearStep, ...] = ()
        self._data_history: list[tuple[int, torch.Tensor]] = []
        self._x0_coefficients: tuple[torch.Tensor, torch.Tensor] | None = None
        self._mean_coefficients: torch.Tensor | None = None
        self._vp_inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._eval_times: torch.Tensor | None = None
        # continuous time of the sample before the first step and after each step (float64, length steps + 1)
        self.trajectory_times: torch.Tensor | None = None
        self._begin_index: int | None = None
        self._step_index: int | None = None
        # auxiliary blocks of the state when samples are position blocks (stock pipelines), see the class docstring,
        # and the step index they belong to (None: any)
        self._auxiliary: torch.Tensor | None = None
        self._auxiliary_index: int | None = None

    @classmethod
    def from_config(cls, config: dict | None = None, return_unused_kwargs: bool = False, **kwargs):
        """Build a scheduler from a config, as diffusers' ``from_config`` does, keeping the source's VP schedule.

        A stock config built with default betas lists them as defaulted, and diffusers would drop them before
        ``__init__``; for a `"vp_epsilon"` scheduler they are the VP model's noise schedule, so when all of them are
        defaulted they are passed on explicitly (``kwargs`` still win). Otherwise the config is read as diffusers
        reads it, so that round trips (``HOLDScheduler`` -> a compatible scheduler -> ``HOLDScheduler``) keep which
        values were defaults. A stock ``timestep_spacing`` (``"leading"``, ``"trailing"``, ``"linspace"``: VP grids,
        written explicitly in saved Stable Diffusion XL and ``save_pretrained`` configs) is not HOLD's and is left to
        HOLD's default instead of being refused.
        """
        if config is not None and config.get("timestep_spacing") not in (None, *TIMESTEP_SPACINGS):
            config = {key: value for key, value in config.items() if key != "timestep_spacing"}
        prediction_type = kwargs.get("prediction_type", (config or {}).get("prediction_type"))
        defaulted = set((config or {}).get("_use_default_values", []))
        if prediction_type == "vp_epsilon" and defaulted.issuperset(VP_SCHEDULE_KEYS):
            for key in (*VP_SCHEDULE_KEYS, "num_train_timesteps"):
                if key in config and key not in kwargs:
                    kwargs[key] = config[key]
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def hold_order(self) -> int:
        """Number of HOLD blocks (``config.order``); the model input has ``hold_order * C`` channels."""
        return self.config.order

    @property
    def recommended_num_inference_steps(self) -> int:
        """Model calls per sample that the configured ``solver`` needs (from :data:`RECOMMENDED_INFERENCE_STEPS`).

        Fewer steps sample farther from the model's distribution (with learned models: noisier images, which look
        less like training images), so a memorization audit at fewer steps can under-report copying;
        ``diffusers-hold audit`` samples with this count unless told otherwise.
        """
        solver = self.config.solver
        if solver not in RECOMMENDED_INFERENCE_STEPS:
            raise ValueError(f"No recommended step count for solver {solver!r} in RECOMMENDED_INFERENCE_STEPS.")
        return RECOMMENDED_INFERENCE_STEPS[solver]

    def process_settings(self) -> dict:
        """The config values that define the forward process (order, time scale, ``L_inv``, ..., VP schedule).

        A HOLD UNet records them (``hold_order`` and ``hold_settings`` in its config) and raises when the scheduler it
        runs with has different values.
        """
        return {key: self.config[key] for key in PROCESS_KEYS + VP_SCHEDULE_KEYS}

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the stationary prior ``N(0, L_inv * I)`` that every block starts from."""
        return math.sqrt(self.config.L_inv)

    @property
    def compatibles(self) -> list[type[SchedulerMixin]]:
        """Scheduler classes that can replace this one in its pipeline (``cls.from_config(scheduler.config)``).

        With ``prediction_type="epsilon"`` only :class:`HOLDScheduler`: a HOLD UNet reads the augmented state, which
        no stock scheduler produces. With `"vp_epsilon"` the model is a stock VP epsilon model, so also every stock
        scheduler diffusers lists for ``DDPMScheduler``; pass ``prediction_type="epsilon"`` when swapping, since the
        config says `"vp_epsilon"` (``DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="epsilon")``).
        """
        classes = [HOLDScheduler]
        if self.config.prediction_type == "vp_epsilon":
            stock = [c for c in super().compatibles if isinstance(c, type) and issubclass(c, SchedulerMixin)]
            classes += sorted(stock, key=lambda c: c.__name__)
        return classes

    def __getattr__(self, name: str):
        # only reached when normal lookup fails: the VP tables exist as attributes for "vp_epsilon" alone
        if name in ("alphas_cumprod", "betas"):
            raise AttributeError(
                f'HOLDScheduler with prediction_type="epsilon" has no `{name}`: its position block is not '
                "sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps on a table of integer timesteps, so DDPM formulas "
                "(such as diffusers.training_utils.compute_snr) do not apply. Use `scheduler.snr(timesteps)` for "
                "the signal-to-noise ratio of the position block."
            )
        return super().__getattr__(name)

    @property
    def begin_index(self) -> int | None:
        """First step index set by a pipeline with :meth:`set_begin_index` (``None`` when not set)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Record the first step index (pipelines call this for image-to-image).

        Steps are located by their timestep value; the begin index only decides between repeated values (see
        :meth:`index_for_timestep`) at the first call.
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
            if not is_integer(num_inference_steps) or num_inference_steps < (2 if cfg.denoise_final else 1):
                raise ValueError(
                    "num_inference_steps must be an integer >= 1 (>= 2 with denoise_final), "
                    f"got {num_inference_steps!r}."
                )
            num_intervals = int(num_inference_steps) - (1 if cfg.denoise_final else 0)
            grid = self._spaced_grid(num_intervals)

        dyn = self.dynamics
        # pipelines call set_timesteps once per generation, and the coefficients depend on the grid alone (the config
        # is frozen): keep the last grid's
        if self._solver_cache is not None and torch.equal(self._solver_cache[0], grid):
            eval_times, forms = self._solver_cache[1]
        else:
            eval_times, forms = self._solver_steps(grid[:-1], grid[1:])
            self._solver_cache = (grid, (eval_times, forms))
        # after a step the sample is at the next grid time; SSCS leaves it at the next midpoint (its first half flow
        # is skipped, so it starts at grid[0]), and the denoising step takes it to t = 0
        ends = torch.cat([eval_times[1:], grid[-1:]]) if cfg.solver == "sscs" else grid[1:]
        sample_times = [grid[:1], ends] + ([grid.new_zeros(1)] if cfg.denoise_final else [])
        self.trajectory_times = torch.cat(sample_times)
        if cfg.denoise_final:
            final = dyn.denoise_step(grid[-1:])
            eval_times = torch.cat([eval_times, grid[-1:]])
            forms = tuple(LinearStep.concat(form, final) for form in forms)
        self._steps, self._multistep_steps = forms[0], forms[1:]
        self._data_history = []
        self._eval_times = eval_times
        self._x0_coefficients = dyn.x0_coefficients(eval_times)
        self._mean_coefficients = dyn.mean_coefficients(eval_times)
        self.num_inference_steps = len(eval_times)
        if cfg.prediction_type == "vp_epsilon":
            weights, alpha_bar, model_timesteps = self._vp_conversion.coefficients(eval_times)
            self._vp_inputs = (weights, alpha_bar)
        else:
            model_timesteps = self.time_to_timestep(eval_times)
        self.timesteps = model_timesteps.to(device=device, dtype=torch.float32)
        self._begin_index = None
        self._step_index = None
        self._auxiliary = None
        self._auxiliary_index = None

    def _spaced_grid(self, num_intervals: int) -> torch.Tensor:
        """``num_intervals + 1`` times from ``sampling_T`` (``T`` by default) down to ``sampling_eps`` with the
        configured spacing (float64)."""
        cfg = self.config
        start = cfg.T if cfg.sampling_T is None else cfg.sampling_T
        u = torch.linspace(0.0, 1.0, num_intervals + 1, dtype=torch.float64)
        if cfg.timestep_spacing == "log_snr":
            ends = self.dynamics.log_snr(torch.tensor([start, cfg.sampling_eps], dtype=torch.float64))
            grid = self.dynamics.time_at_log_snr(ends[0] + (ends[1] - ends[0]) * u, cfg.sampling_eps, start)
            grid[0], grid[-1] = start, cfg.sampling_eps  # exact end points
            return grid
        if cfg.timestep_spacing == "vp_linspace":
            # the VP model is called at the timesteps DPMSolverMultistepScheduler's "linspace" grid gives it: evenly
            # from the start's VP timestep towards 0, the end point excluded; then the grid's end at sampling_eps
            conversion = self._vp_conversion
            first = conversion.coefficients(torch.tensor([start], dtype=torch.float64))[2]
            calls = conversion.time_at_timestep(first * (1.0 - u[:-1]), cfg.sampling_eps, start)
            grid = torch.cat([calls, torch.tensor([cfg.sampling_eps], dtype=torch.float64)])
            grid[0] = start  # exact, also where the start's noise level lies beyond the VP table's clamp
            return grid
        if cfg.timestep_spacing == "log1p":  # uniform in log(1 + t)
            ends = torch.log1p(torch.tensor([start, cfg.sampling_eps], dtype=torch.float64))
            grid = torch.expm1(ends[0] + (ends[1] - ends[0]) * u)
            grid[0], grid[-1] = start, cfg.sampling_eps
            return grid
        if cfg.timestep_spacing == "quadratic":
            u = 1.0 - (1.0 - u) ** 2
        grid = start - (start - cfg.sampling_eps) * u
        grid[-1] = cfg.sampling_eps  # exact, not start - (start - eps)
        return grid

    def _solver_steps(self, start: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, tuple[LinearStep, ...]]:
        """Model-call times and step coefficients of the configured solver for the grid intervals ``start -> end``.

        One :class:`~diffusers_hold.dynamics.LinearStep` per number of denoised estimates a step reads: a single form
        for the one-step solvers; ``solver_order`` forms for ``"exp_multistep"``, the ``k``-th of which holds, from
        row ``k - 1`` on, the step that interpolates the current and ``k - 1`` previous estimates (its first rows,
        which would need estimates from before the first model call, are zero and never read).
        """
        cfg, dyn = self.config, self.dynamics
        if cfg.solver == "euler_maruyama":
            return start, (dyn.euler_maruyama_step(start, end),)
        if cfg.solver == "ddim":
            return start, (dyn.ddim_step(start, end),)
        if cfg.solver == "sscs":  # kick at the interval midpoint, then free flow to the next midpoint (or grid end)
            h = start - end
            eval_times = 0.5 * (start + end)
            free = 0.5 * h + 0.5 * torch.cat([h[1:], h.new_zeros(1)])
            return eval_times, (dyn.sscs_step(eval_times, h, free),)
        n, forms = self.hold_order, []
        for k in range(1, min(cfg.solver_order, len(start)) + 1):
            rows = torch.arange(k - 1, len(start))
            history = torch.stack([start[rows - j] for j in range(k)], dim=-1)
            prediction, eta = ALGORITHM_TYPES[cfg.algorithm_type]
            step = dyn.exponential_step(start[rows], end[rows], history, prediction=prediction, eta=eta)
            unused = LinearStep(start.new_zeros(k - 1, n, n), start.new_zeros(k - 1, n), None)
            forms.append(LinearStep.concat(unused, step))
        return start, tuple(forms)

    def index_for_timestep(self, timestep: float | torch.Tensor) -> int:
        """Position of ``timestep`` in :attr:`timesteps`; raises if it is not one of them.

        A value that occurs more than once (zero-shot timesteps clamped to the VP table's ends) resolves to the
        position the step counter has reached, or before the first step to the :attr:`begin_index` a pipeline set.
        """
        if self.timesteps is None:
            raise ValueError("No sampling schedule yet: call `set_timesteps` first.")
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
        expected = self._step_index if self._step_index is not None else self._begin_index
        if len(positions) > 1 and expected in positions:
            return expected
        return positions[0]

    def scale_model_input(
        self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None, full_state: bool = False
    ) -> torch.Tensor:
        """Return the model input for ``sample`` at ``timestep``.

        With ``prediction_type="epsilon"`` it is the full HOLD state ``[q | aux]`` (``order * C`` channels) that a HOLD
        UNet reads, carrying this scheduler's :meth:`process_settings` as the attribute ``hold_settings`` (a HOLD UNet
        checks them against its own). With `"vp_epsilon"` it is the VP model's input ``sqrt(alpha_bar) * s`` of shape
        ``(batch, C, ...)``, built from the sufficient statistic ``s`` of the state.

        Args:
            sample (`torch.Tensor`): the position block ``q`` of shape `(batch, C, ...)`, whose auxiliary blocks the
                scheduler keeps (see the class docstring); or, with ``full_state=True``, the whole state of shape
                `(batch, order * C, ...)`. ``batch`` may be a multiple of the batch passed to :meth:`step` (guidance).
            timestep (`float` or `torch.Tensor`): the current entry of :attr:`timesteps`.
            full_state (`bool`, defaults to `False`): ``sample`` is the whole state.
        """
        zero_shot = self.config.prediction_type == "vp_epsilon"
        if full_state and not zero_shot:
            state = sample  # the state is the model input; no schedule lookup needed
        elif timestep is None:
            raise ValueError("scale_model_input needs the current timestep (an entry of `timesteps`).")
        else:
            index = self.index_for_timestep(timestep)
            state = sample if full_state else self._with_auxiliary(sample, index)
        self._split_channels(state)
        if zero_shot:
            weights, alpha_bar = self._vp_inputs
            return self._vp_conversion.model_input(state, weights[index : index + 1], alpha_bar[index : index + 1])
        model_input = state.view_as(state)  # a new tensor object, so the attribute never lands on the caller's tensor
        setattr(model_input, HOLD_SETTINGS_ATTRIBUTE, self.process_settings())
        return model_input

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        full_state: bool = False,
    ) -> HOLDSchedulerOutput | tuple:
        """Advance the sample one step of the chosen solver.

        Args:
            model_output (`torch.Tensor` of shape `(batch, C, ...)`): predicted noise of the last block (or, with
                `"vp_epsilon"`, the VP model's noise prediction for :meth:`scale_model_input`'s output).
            timestep (`float` or `torch.Tensor`): the current entry of :attr:`timesteps`.
            sample (`torch.Tensor`): the position block `(batch, C, ...)`, or with ``full_state=True`` the whole state
                `(batch, order * C, ...)`.
            generator (`torch.Generator` or list of them, *optional*): source of the solver's noise.
            return_dict (`bool`, defaults to `True`): return a :class:`HOLDSchedulerOutput` instead of a tuple.
            full_state (`bool`, defaults to `False`): ``sample`` is the whole state, and so is ``prev_sample``.

        Returns:
            :class:`HOLDSchedulerOutput` or `tuple`: ``(prev_sample, pred_original_sample)``.
        """
        index = self.index_for_timestep(timestep)
        n = self.hold_order
        if not full_state and n > 1 and sample.ndim >= 2 and sample.shape[1] == n * model_output.shape[1]:
            raise ValueError(
                f"step got a {sample.shape[1]}-channel sample for a {model_output.shape[1]}-channel model output: "
                "that is a full HOLD state; pass full_state=True, or pass the position block alone."
            )
        state = sample if full_state else self._with_auxiliary(sample, index)
        channels = self._split_channels(state)
        expected = (state.shape[0], channels, *state.shape[2:])
        if tuple(model_output.shape) != expected:
            raise ValueError(
                f"model_output has shape {tuple(model_output.shape)}; expected {expected}: the last block's noise "
                f"for a state of {state.shape[1]} channels (order {n})."
            )
        if not torch.isfinite(model_output).all():
            cause = "" if torch.isfinite(state).all() else ", and so does the sample: check the initial latents"
            raise ValueError(f"model_output contains NaN or infinite values at timestep {float(timestep):.4f}{cause}.")

        dtype, device = state.dtype, state.device
        blocks = state.reshape(state.shape[0], n, -1)  # (batch, n, C * spatial)
        eps = model_output.reshape(state.shape[0], -1).to(dtype)

        def coef(x: torch.Tensor) -> torch.Tensor:
            return x[index : index + 1].to(device=device, dtype=dtype)

        ell, c = self._x0_coefficients
        if self.config.prediction_type == "vp_epsilon":
            weights, alpha_bar = self._vp_inputs
            eps, pred_original = self._vp_conversion.epsilon_and_estimate(
                blocks, eps, coef(weights), coef(alpha_bar), coef(ell), coef(c)
            )
        else:
            pred_original = ((coef(ell)[:, :, None] * blocks).sum(1) - eps) / coef(c)[:, None]
        noise_form = self._steps.transport is not None  # exp_multistep interpolating noise parts
        previous = self._previous_estimates(index, blocks.shape if noise_form else pred_original.shape, dtype)
        steps = self._multistep_steps[len(previous) - 1] if previous else self._steps
        prev = torch.einsum("ij,bjr->bir", coef(steps.state_matrix)[0], blocks)
        prev = prev + coef(steps.eps_vector)[:, :, None] * eps[:, None]
        if steps.data_vectors is not None:
            estimates = [pred_original] if noise_form else [pred_original, *previous]
            for data_vector, estimate in zip(coef(steps.data_vectors)[0], estimates, strict=True):
                prev = prev + data_vector[None, :, None] * estimate[:, None]
        if steps.history_matrices is not None:
            for matrix, noise_part in zip(coef(steps.history_matrices)[0], previous, strict=True):
                prev = prev + torch.einsum("ij,bjr->bir", matrix, noise_part)
        if steps.noise_matrix is not None:
            # draw noise only for the blocks it enters through (Euler-Maruyama: the last block alone)
            columns = steps.noise_matrix[index].abs().sum(0).nonzero()[:, 0]
            if len(columns):
                shape = (blocks.shape[0], len(columns), blocks.shape[2])
                noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
                noise_matrix = steps.noise_matrix[index][:, columns].to(device=device, dtype=dtype)
                prev = prev + torch.einsum("ij,bjr->bir", noise_matrix, noise)
        prev_state = prev.reshape(state.shape)
        if full_state:
            prev_sample = prev_state
        else:
            prev_sample, self._auxiliary = prev_state[:, :channels], prev_state[:, channels:]
            self._auxiliary_index = index + 1
        pred_original_sample = pred_original.reshape(model_output.shape)
        if self._multistep_steps:
            self._remember(index, blocks, pred_original, previous)
        self._step_index = index + 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return HOLDSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def _previous_estimates(self, index: int, shape: torch.Size, dtype: torch.dtype) -> list[torch.Tensor]:
        """What the multistep solver keeps of the model calls just before step ``index`` (most recent first), as many
        as it reads: denoised estimates, or noise parts carried to the current time. The run stops at the first
        missing step, so a trajectory entered mid-schedule starts at first order; with ``lower_order_final`` the last
        steps read fewer."""
        estimates, readable = [], len(self._multistep_steps)
        if self.config.lower_order_final:  # as diffusers: the last step first order, the one before at most second
            remaining = self.num_inference_steps - index - 1
            readable = 0 if remaining == 0 else min(readable, remaining) if self.num_inference_steps < 15 else readable
        for back, (step_index, estimate) in enumerate(reversed(self._data_history)):
            if step_index != index - 1 - back or back == readable:
                break
            if estimate.shape != shape:
                raise ValueError(
                    f"The multistep history holds tensors of shape {tuple(estimate.shape)}, this step needs "
                    f"{tuple(shape)}: call `set_timesteps` before starting a new trajectory."
                )
            estimates.append(estimate.to(dtype))
        return estimates

    def _remember(self, index: int, blocks: torch.Tensor, pred_original: torch.Tensor, previous: list) -> None:
        """Keep this call's estimate for the next steps: ``x0_hat``, or for the noise-interpolating form the noise
        parts ``z - a_t x0_hat`` of this and the earlier calls, carried to the next step's time."""
        keep = len(self._multistep_steps)
        if self._steps.transport is None:
            self._data_history = [*self._data_history, (index, pred_original)][-keep:]
            return
        transport = self._steps.transport[index].to(device=blocks.device, dtype=blocks.dtype)
        mean = self._mean_coefficients[index].to(device=blocks.device, dtype=blocks.dtype)
        parts = [blocks - mean[None, :, None] * pred_original[:, None], *previous][:keep]
        carried = [torch.einsum("ij,bjr->bir", transport, part) for part in parts]
        self._data_history = [(index - back, part) for back, part in enumerate(carried)][::-1]

    # ------------------------------------------------------------------------------------------ zero-shot (VP model)
    def zero_shot_epsilon(
        self,
        state: torch.Tensor,
        timesteps: torch.Tensor | float,
        vp_model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The last block's noise ``eps_n`` of HOLD states, from a pretrained VP epsilon model (``docs/HOLD_MATH.md``,
        section 4).

        ``vp_model`` is called once, on ``sqrt(alpha_bar) * s`` (``s`` the sufficient statistic of the state) at the
        fractional VP timesteps whose ``alphas_cumprod`` is that ``alpha_bar``; its noise prediction gives ``x0_hat``,
        and ``eps_n = (L_t^{-1})_{n,:} z_t - c(t) x0_hat`` (section 3). Unlike :meth:`scale_model_input` and
        :meth:`step`, this works at any (per-sample) timesteps, not only on the sampling grid; a HOLD UNet with
        ``hold_parameterization="sufficient_statistic"`` runs its network through it on every forward pass.

        Args:
            state (`torch.Tensor` of shape `(batch, order * C, ...)`): HOLD states.
            timesteps (`torch.Tensor` of shape `(batch,)` or a scalar): model timesteps
                (``t * num_train_timesteps / T``).
            vp_model (`Callable`): ``(vp_input (batch, C, ...), vp_timesteps (batch,) float32) -> noise prediction``
                of the VP input's shape.

        Returns:
            `torch.Tensor` of shape `(batch, C, ...)`: ``eps_n``.
        """
        self._split_channels(state)
        t = self.timestep_to_time(timesteps).flatten()
        if t.numel() == 1:
            t = t.expand(state.shape[0])
        if t.numel() != state.shape[0]:
            raise ValueError(f"Got {t.numel()} timesteps for a batch of {state.shape[0]} states.")
        weights, alpha_bar, vp_timesteps = self._vp_conversion.coefficients(t)
        ell, c = self.dynamics.x0_coefficients(t)
        vp_input = self._vp_conversion.model_input(state, weights, alpha_bar)
        vp_noise_pred = vp_model(vp_input, vp_timesteps.to(device=state.device, dtype=torch.float32))

        def cast(x: torch.Tensor) -> torch.Tensor:
            return x.to(device=state.device, dtype=state.dtype)

        blocks = state.reshape(state.shape[0], self.hold_order, -1)
        eps = vp_noise_pred.reshape(state.shape[0], -1).to(state.dtype)
        eps_n, _ = self._vp_conversion.epsilon_and_estimate(
            blocks, eps, cast(weights), cast(alpha_bar), cast(ell), cast(c)
        )
        return eps_n.reshape(vp_input.shape)

    # ------------------------------------------------------------------------------------ hidden auxiliary blocks
    def _with_auxiliary(self, sample: torch.Tensor, index: int) -> torch.Tensor:
        """``[q | aux]`` for a position block ``q``, with the stored auxiliary blocks tiled to ``q``'s batch."""
        n = self.hold_order
        if n == 1:
            return sample
        if sample.ndim < 2:
            raise ValueError(f"Expected a sample of shape (batch, C, ...), got {tuple(sample.shape)}.")
        if self._auxiliary is None or self._auxiliary_index not in (None, index):
            # a trajectory's first call, or a call at another step than the kept blocks belong to (a new trajectory)
            self._auxiliary = self._initial_auxiliary(sample, index)
            self._auxiliary_index = index
        aux = self._auxiliary
        batch = sample.shape[0]
        if aux.shape[1] != (n - 1) * sample.shape[1] or aux.shape[2:] != sample.shape[2:] or batch % aux.shape[0]:
            raise ValueError(
                f"A sample of shape {tuple(sample.shape)} does not fit the stored auxiliary HOLD state of shape "
                f"{tuple(aux.shape)} (order {n}); the batch may only be a multiple of the stored one. Call "
                "`set_timesteps` before starting a new trajectory."
            )
        aux = aux.to(device=sample.device, dtype=sample.dtype)
        return torch.cat([sample, aux.repeat(batch // aux.shape[0], *([1] * (aux.ndim - 1)))], dim=1)

    def _initial_auxiliary(self, sample: torch.Tensor, index: int) -> torch.Tensor:
        """Auxiliary blocks for a trajectory of position blocks ``sample`` that starts at step ``index``.

        Drawn from their law given ``q`` under the forward marginal at the sample's time for standardised data
        (:meth:`~diffusers_hold.dynamics.HOLDDynamics.auxiliary_given_position`), with the noise of row ``i`` seeded
        by a hash of ``q[i]`` (see the class docstring). Rows repeated in ``sample`` (the copies a pipeline makes for
        classifier-free guidance) are stored once; being equal, they would get equal draws anyway.
        """
        if not torch.isfinite(sample).all():  # the draw is seeded by the rows' values; NaN would also hide the copies
            raise ValueError(
                f"The sample starting a trajectory at step {index} contains NaN or infinite values: check the initial "
                "latents (or what a callback wrote into them)."
            )
        base = sample[: _period(sample)]
        n = self.hold_order
        gain, chol = self.dynamics.auxiliary_given_position(self.trajectory_times[index])
        dtype, device = sample.dtype, sample.device
        noise = _row_seeded_normal(base, (n - 1, *base.shape[1:])).to(device=device, dtype=dtype)
        q = base.reshape(len(base), 1, -1)
        aux = gain.to(device=device, dtype=dtype)[:, None] * q + torch.einsum(
            "ij,bjr->bir", chol.to(device=device, dtype=dtype), noise.reshape(len(base), n - 1, -1)
        )
        return aux.reshape(len(base), (n - 1) * base.shape[1], *base.shape[2:])

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

        With noise for every block this is the training forward process. With noise shaped like ``original_samples``
        (what image-to-image pipelines pass) it starts a sampling trajectory at ``timesteps``: that noise drives the
        position block, which is returned, and the auxiliary blocks are drawn from the same kernel (the extra noise of
        row ``i`` seeded by a hash of ``noise[i]``) and kept by the scheduler for the following steps. Once
        :meth:`step` has run in the current schedule, position-only calls (inpainting blends the noised original into
        the latents after every step) return the position block and leave the trajectory's auxiliary blocks alone.

        Args:
            original_samples (`torch.Tensor` of shape `(batch, C, ...)`): clean data ``x_0``.
            noise (`torch.Tensor`): standard normal noise, `(batch, order * C, ...)` for every block, or
                `(batch, C, ...)` to return the position block alone and keep the auxiliary blocks.
            timesteps (`torch.Tensor` of shape `(batch,)` or a scalar): model timesteps; with
                ``prediction_type="vp_epsilon"``, entries of :attr:`timesteps` (the VP model's units).

        Returns:
            `torch.Tensor`: the noisy state `(batch, order * C, ...)`, from which a model is trained to predict
            :meth:`get_target` of ``noise``; or its position block `(batch, C, ...)` for position-only noise.
        """
        n = self.hold_order
        batch = original_samples.shape[0]
        channels = original_samples.shape[1]
        full_shape = (batch, n * channels, *original_samples.shape[2:])
        position_only = n > 1 and tuple(noise.shape) == tuple(original_samples.shape)
        if position_only:
            extra = _row_seeded_normal(noise, ((n - 1) * channels, *noise.shape[2:]))
            noise = torch.cat([noise, extra.to(device=noise.device, dtype=noise.dtype)], dim=1)
        if tuple(noise.shape) != full_shape:
            raise ValueError(
                f"noise has shape {tuple(noise.shape)}; expected {full_shape} (order {n} blocks of the data's shape) "
                f"or {tuple(original_samples.shape)} (the position block alone)."
            )
        t = self._noise_times(timesteps).flatten()
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"Got {t.numel()} timesteps for a batch of {batch} samples.")
        dtype, device = original_samples.dtype, original_samples.device
        mean = self.dynamics.mean_coefficients(t).to(device=device, dtype=dtype)  # (batch, n)
        chol = self.dynamics.cholesky(t).to(device=device, dtype=dtype)  # (batch, n, n)
        x0 = original_samples.reshape(batch, 1, -1)
        z = (mean[:, :, None] * x0 + chol @ noise.reshape(batch, n, -1)).reshape(full_shape)
        if not position_only:
            return z
        if self._step_index is None:  # a trajectory starts here; during one (inpainting's blending) it goes on
            self._auxiliary = z[:, channels:]
            self._auxiliary_index = self._schedule_index(timesteps)
        return z[:, :channels]

    def _schedule_index(self, timesteps: torch.Tensor | float) -> int | None:
        """Step index of ``timesteps`` if every row is at one entry of the schedule, else ``None``."""
        values = torch.as_tensor(timesteps).flatten()
        if self.timesteps is None or not bool((values == values[0]).all()):
            return None
        if not bool((self.timesteps == values[0].to(self.timesteps)).any()):
            return None
        return self.index_for_timestep(values[0])

    def _noise_times(self, timesteps: torch.Tensor | float) -> torch.Tensor:
        """Continuous times for :meth:`add_noise`'s timesteps (schedule entries in the zero-shot mode)."""
        if self.config.prediction_type != "vp_epsilon":
            return self.timestep_to_time(timesteps)
        values = torch.as_tensor(timesteps).flatten()
        if self.timesteps is None:
            raise ValueError('With prediction_type="vp_epsilon", call `set_timesteps` before `add_noise`.')
        return torch.stack([self._eval_times[self.index_for_timestep(value)] for value in values])

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


def _period(sample: torch.Tensor) -> int:
    """Smallest ``k`` such that ``sample`` is ``sample[:k]`` repeated along the batch axis."""
    batch = sample.shape[0]
    for k in range(1, batch):
        if batch % k == 0 and torch.equal(sample, sample[:k].repeat(batch // k, *([1] * (sample.ndim - 1)))):
            return k
    return batch


def _row_seeded_normal(source: torch.Tensor, row_shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal float32 CPU draws of shape ``(batch, *row_shape)``, row ``i`` seeded by a hash of ``source[i]``.

    Stock pipelines give a scheduler no generator before its first model call; seeding from the pipeline's own
    random draw makes the auxiliary blocks reproducible from the pipeline's generator and, for any practical
    purpose, independent of that draw. Seeding each row from its own values makes an image of a batch get the draws
    it gets alone, so per-image generators (``generator=[...]``) reproduce single images.
    """
    rows = source.detach().float().cpu().reshape(len(source), -1).numpy()
    draws = []
    for row in rows:
        digest = hashlib.blake2b(row.tobytes(), digest_size=8).digest()
        draws.append(torch.randn(row_shape, generator=torch.Generator().manual_seed(int.from_bytes(digest, "little"))))
    return torch.stack(draws)
