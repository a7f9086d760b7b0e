"""The training objective, for a :class:`~diffusers_hold.HOLDScheduler` and for diffusers' DDPM-type schedulers.

One training step forms its loss from these pieces, the same way in the training scripts' loop and the benchmark:

- :func:`noisy_input_and_target`: noise the clean data at the drawn timesteps and give the regression target (HOLD:
  noise in every block of the state, the last block's noise as target; DDPM-type: the noise, or the velocity for
  ``prediction_type="v_prediction"``), so one loop trains HOLD and its baseline.
- :func:`per_sample_mse`: the mean squared error of each sample, the per-sample loss the mitigation callbacks filter
  and weight.
- :func:`signal_to_noise` and :func:`min_snr_loss_weights`: min-SNR-gamma weighting for both kinds of scheduler.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .schedulers.scheduling_hold import HOLDScheduler

__all__ = ["min_snr_loss_weights", "noisy_input_and_target", "per_sample_mse", "signal_to_noise"]


def noisy_input_and_target(
    noise_scheduler, clean: torch.Tensor, timesteps: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model input and regression target for clean data ``clean`` at ``timesteps``.

    Args:
        noise_scheduler: a :class:`HOLDScheduler` (input: the whole HOLD state, ``order * C`` channels; target: the
            last block's noise) or a diffusers DDPM-type scheduler with ``add_noise`` (target: the noise, or the
            velocity for ``prediction_type="v_prediction"``).
        clean (`torch.Tensor` of shape `(batch, C, H, W)`): images or latents.
        timesteps (`torch.Tensor` of shape `(batch,)`): the scheduler's training timesteps.
        generator (`torch.Generator`, *optional*): source of the noise (on the CPU, moved to ``clean``'s device).
    """
    if isinstance(noise_scheduler, HOLDScheduler):
        shape = (clean.shape[0], noise_scheduler.hold_order * clean.shape[1], *clean.shape[2:])
        noise = torch.randn(shape, generator=generator).to(device=clean.device, dtype=clean.dtype)
        return noise_scheduler.add_noise(clean, noise, timesteps), noise_scheduler.get_target(noise)
    noise = torch.randn(clean.shape, generator=generator).to(device=clean.device, dtype=clean.dtype)
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noisy, noise
    if prediction_type == "v_prediction":
        return noisy, noise_scheduler.get_velocity(clean, noise, timesteps)
    raise ValueError(f"Unsupported prediction_type {prediction_type!r}; expected 'epsilon' or 'v_prediction'.")


def per_sample_mse(model_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample, in float32: the input of
    :meth:`~diffusers_hold.mitigations.CallbackList.on_loss`.

    Args:
        model_output (`torch.Tensor` of shape `(batch, ...)`): the model's prediction.
        target (`torch.Tensor` of the same shape): the training target (the noise, its last HOLD block, ...).
    """
    if model_output.shape != target.shape:
        raise ValueError(f"Shapes differ: model output {tuple(model_output.shape)}, target {tuple(target.shape)}.")
    squared_error = F.mse_loss(model_output.float(), target.float(), reduction="none")
    return squared_error.reshape(len(squared_error), -1).mean(dim=1)


def signal_to_noise(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR at ``timesteps`` (float32, on the timesteps' device): the position block's for HOLD, else VP's."""
    if isinstance(noise_scheduler, HOLDScheduler):
        snr = noise_scheduler.snr(timesteps)
    else:
        alphas_cumprod = noise_scheduler.alphas_cumprod.to(torch.float64)[timesteps.cpu().long()]
        snr = alphas_cumprod / (1 - alphas_cumprod)
    return snr.to(device=timesteps.device, dtype=torch.float32)


def min_snr_loss_weights(snr: torch.Tensor, gamma: float, prediction_type: str = "epsilon") -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): ``min(SNR, gamma) / SNR`` for epsilon targets,
    ``min(SNR, gamma) / (SNR + 1)`` for velocity targets.

    At ``SNR = 0`` (a zero-terminal-SNR schedule) the epsilon weight takes its limit 1 instead of dividing by zero.

    Args:
        snr (`torch.Tensor`): per-sample SNR (:func:`signal_to_noise`).
        gamma (`float`): the clamp, e.g. 5.0.
        prediction_type (`str`, defaults to `"epsilon"`): `"epsilon"` or `"v_prediction"`.
    """
    if gamma <= 0:
        raise ValueError(f"snr_gamma must be positive, got {gamma}.")
    clamped = snr.clamp(max=gamma)
    if prediction_type == "v_prediction":
        return clamped / (snr + 1)
    if prediction_type != "epsilon":
        raise ValueError(f"Unsupported prediction_type {prediction_type!r} for min-SNR weighting.")
    return torch.where(snr > 0, clamped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
