"""Trajectory diagnostics of memorization, collected from stock pipelines without forking them.

- **Latent decomposition** (Kim, Kim and Lee, *How Diffusion Models Memorize*, 2025): record the latents ``x^(k)``
  after every sampling step (:class:`TrajectoryRecorder`, a ``callback_on_step_end``), regress each on the final
  image and the initial noise, ``x^(k) ~ w0 x_final + wT x_T`` (:func:`decompose_trajectory`), and compare the
  weights with the schedule's own (:func:`reference_weights`). Memorized generations overestimate the final image
  early: ``w0`` runs above the schedule and ``wT`` collapses before it should
  (:meth:`TrajectoryDecomposition.overestimation`).
- **CFG gap** (Wen et al., ICLR 2024): ``|| eps(x_t, prompt) - eps(x_t, empty) ||_2`` per step, averaged over steps
  (or the first step alone), read off the classifier-free-guidance batch by a UNet forward hook
  (:class:`CFGGapMonitor`). Memorized prompts have large gaps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ..schedulers import HOLDScheduler

__all__ = [
    "CFGGapMonitor",
    "Trajectory",
    "TrajectoryDecomposition",
    "TrajectoryRecorder",
    "decompose_trajectory",
    "is_guidance_batch",
    "reference_weights",
]

ReferenceKind = Literal["ddim", "ddpm", "marginal", "hold"]


@dataclass
class Trajectory:
    """Latents of a sampling run.

    Attributes:
        initial (`torch.Tensor` of shape `(B, ...)`): the latents the first step starts from (``x_T``).
        latents (`torch.Tensor` of shape `(K, B, ...)`): the latents after each of the ``K`` steps.
        timesteps (`torch.Tensor` of shape `(K,)`): the timestep of each step.
    """

    initial: torch.Tensor
    latents: torch.Tensor
    timesteps: torch.Tensor


class TrajectoryRecorder:
    """A ``callback_on_step_end`` that records the latents after every step of any diffusers pipeline.

    Pass the starting latents to the pipeline yourself (``latents=x_T``) and to the recorder, scaled as the pipeline
    scales them (``x_T * pipe.scheduler.init_noise_sigma``; 1 for DDPM, DDIM and :class:`~diffusers_hold.HOLDScheduler`
    with ``L_inv = 1``): the decomposition needs the initial noise, which no callback sees.

    Example::

        recorder = TrajectoryRecorder(initial_latents=latents)
        pipe(prompt, latents=latents, callback_on_step_end=recorder, output_type="latent")
        trajectory = recorder.trajectory()

    Args:
        initial_latents (`torch.Tensor` of shape `(B, ...)`): the latents the first step starts from.
        position_channels (`int`, *optional*): keep only the first channels of every record (the position block of a
            full HOLD state, as :class:`~diffusers_hold.HOLDPipeline` carries it); the initial latents are sliced the
            same way.
    """

    def __init__(self, initial_latents: torch.Tensor, position_channels: int | None = None):
        if initial_latents.ndim < 2:
            raise ValueError(f"initial_latents must have shape (batch, ...), got {tuple(initial_latents.shape)}.")
        self.position_channels = position_channels
        self.initial = self._keep(initial_latents)
        self._latents: list[torch.Tensor] = []
        self._timesteps: list[float] = []

    def _keep(self, latents: torch.Tensor) -> torch.Tensor:
        kept = latents if self.position_channels is None else latents[:, : self.position_channels]
        return kept.detach().to("cpu", torch.float64).clone()

    def __call__(self, pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
        if "latents" not in callback_kwargs:
            raise ValueError('TrajectoryRecorder needs "latents" in callback_on_step_end_tensor_inputs.')
        latents = self._keep(callback_kwargs["latents"])
        if latents.shape != self.initial.shape:
            raise ValueError(
                f"The pipeline's latents have shape {tuple(latents.shape)}, the initial latents "
                f"{tuple(self.initial.shape)}: pass the latents the pipeline starts from (or set position_channels)."
            )
        self._latents.append(latents)
        self._timesteps.append(float(timestep))
        return {}

    def trajectory(self) -> Trajectory:
        """The recorded :class:`Trajectory`; raises if no step was recorded."""
        if not self._latents:
            raise ValueError("No step was recorded: pass the recorder as `callback_on_step_end` to the pipeline.")
        return Trajectory(self.initial, torch.stack(self._latents), torch.tensor(self._timesteps, dtype=torch.float64))


@dataclass
class TrajectoryDecomposition:
    """Result of :func:`decompose_trajectory`: ``x^(k) ~ w0[k] x_final + wT[k] x_T`` per sample.

    Attributes:
        w0 (`torch.Tensor` of shape `(K, B)`): weight of the final latents at each step (float64).
        wT (`torch.Tensor` of shape `(K, B)`): weight of the initial noise.
        residual (`torch.Tensor` of shape `(K, B)`): ``|x^(k) - fit| / |x^(k)|``, what the two directions miss.
        timesteps (`torch.Tensor` of shape `(K,)`): the steps' timesteps.
    """

    w0: torch.Tensor
    wT: torch.Tensor
    residual: torch.Tensor
    timesteps: torch.Tensor

    def _early(self, reference: tuple[torch.Tensor, torch.Tensor], early_fraction: float) -> slice:
        steps = self.w0.shape[0]
        if any(len(weights) != steps for weights in reference):
            raise ValueError(f"The reference has {len(reference[0])} steps, the trajectory {steps}.")
        if not 0 < early_fraction <= 1:
            raise ValueError(f"early_fraction must be in (0, 1], got {early_fraction!r}.")
        return slice(0, max(1, math.ceil(early_fraction * steps)))

    def overestimation(
        self, reference: tuple[torch.Tensor, torch.Tensor], early_fraction: float = 0.5
    ) -> torch.Tensor:
        """Mean excess of ``w0`` over the reference in the early steps, per sample (shape `(B,)`).

        Positive values mean the final image appeared in the latents sooner than the schedule puts it there, Kim et
        al.'s signature of memorization; average it over seeds of one prompt to score the prompt.

        Args:
            reference (`tuple[torch.Tensor, torch.Tensor]`): ``(w0, wT)`` of :func:`reference_weights`.
            early_fraction (`float`, defaults to 0.5): leading fraction of the steps to average over.
        """
        early = self._early(reference, early_fraction)
        return (self.w0[early] - reference[0][early, None]).mean(0)

    def noise_suppression(
        self, reference: tuple[torch.Tensor, torch.Tensor], early_fraction: float = 0.5
    ) -> torch.Tensor:
        """Mean shortfall of ``wT`` below the reference in the early steps, per sample (shape `(B,)`): how much of
        the initial randomness was discarded early (the trajectory "collapse")."""
        early = self._early(reference, early_fraction)
        return (reference[1][early, None] - self.wT[early]).mean(0)


def decompose_trajectory(trajectory: Trajectory, final: torch.Tensor | None = None) -> TrajectoryDecomposition:
    """Least-squares weights of every recorded latent on the final latents and the initial noise.

    Per step ``k`` and sample ``b``, ``(w0, wT)`` minimise ``|x^(k)_b - w0 f_b - wT x_T,b|^2`` over the flattened
    latents (the 2x2 normal equations, in float64).

    Args:
        trajectory ([`Trajectory`]): from :class:`TrajectoryRecorder` (or built by hand).
        final (`torch.Tensor` of shape `(B, ...)`, *optional*): the final latents ``f``; the last recorded latents by
            default.

    Returns:
        [`TrajectoryDecomposition`]
    """
    latents = trajectory.latents.double()
    initial = trajectory.initial.double()
    if latents.ndim < 3 or latents.shape[0] < 1:
        raise ValueError(f"trajectory.latents must have shape (steps, batch, ...), got {tuple(latents.shape)}.")
    if latents.shape[1:] != initial.shape:
        raise ValueError(
            f"trajectory.latents has shape {tuple(latents.shape)}; its steps must match the initial latents "
            f"{tuple(initial.shape)}."
        )
    final = latents[-1] if final is None else final.double()
    if final.shape != initial.shape:
        raise ValueError(f"final has shape {tuple(final.shape)}, the initial latents {tuple(initial.shape)}.")
    for name, tensor in (("latents", latents), ("initial latents", initial), ("final latents", final)):
        if not torch.isfinite(tensor).all():
            raise ValueError(f"The trajectory's {name} contain NaN or infinite values.")
    x = latents.flatten(2)  # (K, B, D)
    f, z = final.flatten(1), initial.flatten(1)  # (B, D)
    ff, zz, fz = (f * f).sum(1), (z * z).sum(1), (f * z).sum(1)
    det = ff * zz - fz**2
    if (det <= 1e-12 * ff * zz).any():
        raise ValueError("The final latents are parallel to the initial noise for some sample: no unique weights.")
    xf, xz = (x * f).sum(2), (x * z).sum(2)  # (K, B)
    w0 = (zz * xf - fz * xz) / det
    wT = (ff * xz - fz * xf) / det
    fit = w0[..., None] * f + wT[..., None] * z
    residual = (x - fit).norm(dim=2) / x.norm(dim=2).clamp_min(torch.finfo(torch.float64).tiny)
    return TrajectoryDecomposition(w0=w0, wT=wT, residual=residual, timesteps=trajectory.timesteps)


def _vp_bridge(alpha_bar: torch.Tensor, alpha_bar_start: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """VP weights of ``x_0`` and ``x_T`` at noise levels ``alpha_bar`` for a start at ``alpha_bar_start``."""
    if kind == "marginal":
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if kind == "ddim":
        # deterministic DDIM from x_T with x0-prediction equal to x_0 at every step:
        # x_k = sqrt(ab_k) x_0 + sqrt(1 - ab_k) (x_T - sqrt(ab_T) x_0) / sqrt(1 - ab_T)
        w_t = ((1 - alpha_bar) / (1 - alpha_bar_start)).sqrt()
        return alpha_bar.sqrt() - w_t * alpha_bar_start.sqrt(), w_t
    # ddpm: the forward bridge E[x_k | x_0, x_T], the mean path of ancestral sampling with an exact x0-prediction
    w_t = (alpha_bar_start / alpha_bar).sqrt() * (1 - alpha_bar) / (1 - alpha_bar_start)
    return alpha_bar.sqrt() - w_t * alpha_bar_start.sqrt(), w_t


def _hold_bridge(scheduler: HOLDScheduler) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward bridge of the position block, ``E[q_k | x_0, q_start]`` for the HOLD kernel."""
    dynamics = scheduler.dynamics
    times = scheduler.trajectory_times
    start, later = times[0], times[1:]
    mean = dynamics.mean_coefficients(times)[:, 0]  # a_t[q]
    # Cov(q_k, q_start | x_0) = [Sigma_k e^{F (start - t_k)}^T]_{qq}
    covariance = (dynamics.covariance(later) @ dynamics.transition(start - later).transpose(-1, -2))[:, 0, 0]
    w_t = covariance / dynamics.covariance(start)[0, 0]
    return mean[1:] - w_t * mean[0], w_t


def reference_weights(scheduler, kind: ReferenceKind | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The schedule's own weights ``(w0, wT)`` of the final image and the initial noise after each step.

    They are what :func:`decompose_trajectory` measures when the model predicts the final image exactly at every step
    (so memorization shows as a deviation early on, when a generalizing model cannot know the final image yet). The
    formulas below give weights on ``x_0``; they are returned rewritten on the final latents, as the decomposition
    measures them (the same unless the last latents are not ``x_0``, e.g. DDIM with ``set_alpha_to_one=False``). Call
    after the sampling run (the scheduler then holds its timesteps).

    Kinds:

    - `"ddim"` (default for ``DDIMScheduler``): deterministic DDIM (``eta = 0``) with an exact x0-prediction,
      ``w0 = sqrt(ab_k) - wT sqrt(ab_T)``, ``wT = sqrt((1 - ab_k) / (1 - ab_T))``.
    - `"ddpm"` (default for ``DDPMScheduler``): the forward bridge ``E[x_k | x_0, x_T]``, followed on average by
      ancestral sampling with an exact x0-prediction, ``wT = sqrt(ab_T / ab_k) (1 - ab_k) / (1 - ab_T)``.
    - `"marginal"`: ``(sqrt(ab_k), sqrt(1 - ab_k))``, the forward marginal (Kim et al.'s simplest reference).
    - `"hold"` (default for :class:`~diffusers_hold.HOLDScheduler`): the forward bridge of the position block,
      ``E[q_k | x_0, q_T]`` from the exact HOLD kernel, at ``scheduler.trajectory_times``.

    Args:
        scheduler: a ``DDIMScheduler``, ``DDPMScheduler`` or :class:`~diffusers_hold.HOLDScheduler` after
            ``set_timesteps``.
        kind (`str`, *optional*): one of the kinds above (the VP kinds need a VP scheduler).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: ``w0`` and ``wT``, float64, one entry per step.
    """
    if getattr(scheduler, "timesteps", None) is None or getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("Call scheduler.set_timesteps (or run the pipeline) before asking for its reference weights.")
    if isinstance(scheduler, HOLDScheduler):
        if kind not in (None, "hold"):
            raise ValueError(f'A HOLDScheduler has the "hold" reference weights only, got kind={kind!r}.')
        return _in_final_basis(*_hold_bridge(scheduler))
    if isinstance(scheduler, DDIMScheduler):
        default = "ddim"
        step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        previous = [int(t) - step for t in scheduler.timesteps]
        final = float(scheduler.final_alpha_cumprod)
    elif isinstance(scheduler, DDPMScheduler):
        default = "ddpm"
        previous = [int(scheduler.previous_timestep(int(t))) for t in scheduler.timesteps]
        final = 1.0
    else:
        raise ValueError(
            f"Reference weights are defined for DDIMScheduler, DDPMScheduler and HOLDScheduler, not "
            f"{type(scheduler).__name__}."
        )
    kind = default if kind is None else kind
    if kind not in ("ddim", "ddpm", "marginal"):
        raise ValueError(f'kind must be "ddim", "ddpm" or "marginal" for {type(scheduler).__name__}, got {kind!r}.')
    table = scheduler.alphas_cumprod.double()
    alpha_bar = torch.tensor([float(table[t]) if t >= 0 else final for t in previous], dtype=torch.float64)
    return _in_final_basis(*_vp_bridge(alpha_bar, table[int(scheduler.timesteps[0])], kind))


def _in_final_basis(w_data: torch.Tensor, w_noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights on ``(x_0, x_T)`` rewritten on ``(x_final, x_T)``, the directions the decomposition regresses on.

    The last latents are ``x_final = a x_0 + b x_T`` (``a = 1, b = 0`` unless sampling stops short of ``t = 0``), so
    ``x_k = (w0_k / a) x_final + (wT_k - w0_k b / a) x_T``.
    """
    a, b = w_data[-1], w_noise[-1]
    return w_data / a, w_noise - w_data * b / a


def is_guidance_batch(sample: torch.Tensor) -> bool:
    """Whether a UNet input is a classifier-free-guidance batch: an even batch whose two halves are identical.

    diffusers pipelines run a guided step as one UNet call on ``cat([latents] * 2)`` (the unconditional half first),
    so the two halves of ``sample`` are equal element by element; an unguided call on distinct latents is not. Shared
    by :class:`CFGGapMonitor` and the inference-time hooks of :mod:`diffusers_hold.mitigations.guidance`.
    """
    half = sample.shape[0] // 2
    return sample.shape[0] > 0 and sample.shape[0] % 2 == 0 and torch.equal(sample[:half], sample[half:])


class CFGGapMonitor:
    """Wen et al.'s classifier-free-guidance gap, recorded by a forward hook on a pipeline's UNet.

    In a guided step, diffusers pipelines call the UNet once on ``cat([latents] * 2)`` with the unconditional
    embeddings first. The hook recognises such a call by its two identical halves of ``sample`` and records
    ``|| eps_cond - eps_uncond ||_2`` per image (float64); other calls are ignored. Use it as a context manager::

        with CFGGapMonitor(pipe.unet) as monitor:
            pipe(prompts, guidance_scale=7.5)
        gap = monitor.mean_gap()  # (batch,), Wen et al.'s detection score

    Args:
        unet (`torch.nn.Module`): the UNet (any module whose output is a tensor, a tuple or has ``.sample``).
    """

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self._handle = None
        self._gaps: list[torch.Tensor] = []
        self._timesteps: list[float] = []

    def __enter__(self) -> CFGGapMonitor:
        self._gaps.clear()
        self._timesteps.clear()
        self._handle = self.unet.register_forward_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc_info) -> None:
        self._handle.remove()
        self._handle = None

    def _record(self, module, args, kwargs, output) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if not is_guidance_batch(sample):
            return
        prediction = output.sample if hasattr(output, "sample") else output[0] if isinstance(output, tuple) else output
        unconditional, conditional = prediction.detach().double().chunk(2)
        gap = (conditional - unconditional).flatten(1).norm(dim=1).cpu()
        if not torch.isfinite(gap).all():
            raise ValueError("The UNet's noise prediction is NaN or infinite: the CFG gap is undefined.")
        self._gaps.append(gap)
        self._timesteps.append(float(torch.as_tensor(timestep).flatten()[0]))

    def gaps(self) -> torch.Tensor:
        """Gap per guided step and image, shape `(steps, batch)`; raises when no guided step was seen."""
        if not self._gaps:
            raise ValueError(
                "No classifier-free-guidance batch was seen: run the pipeline with guidance_scale > 1 inside the "
                "`with CFGGapMonitor(...)` block."
            )
        return torch.stack(self._gaps)

    @property
    def timesteps(self) -> torch.Tensor:
        """Timesteps of the recorded guided steps."""
        return torch.tensor(self._timesteps, dtype=torch.float64)

    def mean_gap(self) -> torch.Tensor:
        """Gap averaged over the steps, per image (Wen et al.'s detection score), shape `(batch,)`."""
        return self.gaps().mean(0)

    def first_step_gap(self) -> torch.Tensor:
        """Gap at the first step alone (Wen et al.: already separates memorized prompts), shape `(batch,)`."""
        return self.gaps()[0]
