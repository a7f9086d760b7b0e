"""The optimal empirical denoiser: the exact minimiser of the denoising loss on a finite training set.

A diffusion model trained to zero loss on ``N`` images has the score of the empirical distribution, whose sampler
reproduces training images (Gu, Du, Pang, Li, Lin and Wang, *On Memorization in Diffusion Models*, 2023). This
module gives that model in closed form as a real diffusers model, so that it runs in stock pipelines
(``DDPMPipeline``, ``DDIMPipeline``) and with ``HOLDScheduler(prediction_type="vp_epsilon")``: the reference
"memorizes everything" model for memorization metrics.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput

__all__ = ["OptimalEmpiricalDenoiser"]


class OptimalEmpiricalDenoiser(ModelMixin, ConfigMixin):
    """Epsilon prediction of the exact denoiser ``E[x_0 | x_t]`` for data uniform on ``train_images``.

    With the VP forward process ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``::

        E[x_0 | x_t] = sum_i softmax_i(-|x_t - sqrt(alpha_bar_t) x_i|^2 / (2 (1 - alpha_bar_t))) x_i
        eps_hat      = (x_t - sqrt(alpha_bar_t) E[x_0 | x_t]) / sqrt(1 - alpha_bar_t)

    computed in float64. It has the call signature and output of ``UNet2DModel`` (``model(sample, timestep).sample``)
    and the config keys pipelines read (``sample_size``, ``in_channels``), so ``DDIMPipeline(unet=model, ...)`` works.
    Fractional timesteps (as :class:`~diffusers_hold.HOLDScheduler` passes in ``"vp_epsilon"`` mode) are interpolated
    linearly in the table's log-SNR, the same map that scheduler uses. The training images are a buffer, so
    ``save_pretrained`` stores them.

    Args:
        sample_size (`int`): image side (square images).
        in_channels (`int`): image channels.
        num_train_images (`int`): number of training images (build with :meth:`from_images`).
        out_channels (`int`, *optional*): equal to ``in_channels`` (the config records it for pipelines that read it).
        num_train_timesteps (`int`, defaults to 1000), beta_start (`float`, defaults to 0.0001), beta_end (`float`,
            defaults to 0.02), beta_schedule (`str`, defaults to `"linear"`): the VP noise schedule, under diffusers'
            names (``DDPMScheduler``'s table is used).
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int,
        in_channels: int,
        num_train_images: int,
        out_channels: int | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
    ):
        super().__init__()
        if num_train_images < 1:
            raise ValueError(f"num_train_images must be >= 1, got {num_train_images}.")
        if out_channels not in (None, in_channels):
            raise ValueError(f"out_channels must equal in_channels ({in_channels}), got {out_channels}.")
        self.register_to_config(out_channels=in_channels)
        self.register_buffer("train_images", torch.zeros(num_train_images, in_channels, sample_size, sample_size))
        table = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
        ).alphas_cumprod.double()
        self._log_snr_table = torch.log(table / (1 - table)).numpy()

    @classmethod
    def from_images(cls, images: torch.Tensor | np.ndarray, **schedule) -> OptimalEmpiricalDenoiser:
        """The denoiser of ``images`` (shape `(N, C, H, H)`, the value range samples should have, e.g. [-1, 1]).

        ``schedule`` takes the VP schedule keys of the class (``num_train_timesteps``, ``beta_schedule``, ...).
        """
        images = torch.as_tensor(images, dtype=torch.float32)
        if images.ndim != 4 or images.shape[2] != images.shape[3]:
            raise ValueError(f"images must have shape (N, C, H, H), got {tuple(images.shape)}.")
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or infinite values.")
        batch, channels, side = images.shape[:3]
        model = cls(sample_size=side, in_channels=channels, num_train_images=batch, **schedule)
        model.train_images.copy_(images)
        return model

    def alpha_bar(self, timestep: torch.Tensor | float) -> torch.Tensor:
        """``alpha_bar`` at (possibly fractional) timesteps, float64."""
        positions = np.arange(len(self._log_snr_table), dtype=np.float64)
        t = torch.as_tensor(timestep, dtype=torch.float64).detach().cpu().numpy()
        log_snr = np.interp(t, positions, self._log_snr_table)
        return torch.sigmoid(torch.as_tensor(log_snr, dtype=torch.float64))

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | float | int, return_dict: bool = True
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        """Predict the noise of ``sample`` (shape `(B, C, H, H)`) at ``timestep`` (scalar or `(B,)`)."""
        expected = tuple(self.train_images.shape[1:])
        if tuple(sample.shape[1:]) != expected:
            raise ValueError(f"sample has shape {tuple(sample.shape)}; this denoiser's images are {expected}.")
        batch = sample.shape[0]
        alpha_bar = self.alpha_bar(timestep).flatten().to(sample.device)
        if alpha_bar.numel() == 1:
            alpha_bar = alpha_bar.expand(batch)
        if alpha_bar.numel() != batch:
            raise ValueError(f"Got {alpha_bar.numel()} timesteps for a batch of {batch} samples.")
        x_t = sample.double().flatten(1)
        train = self.train_images.double().flatten(1)
        signal, noise_var = alpha_bar.sqrt()[:, None], (1 - alpha_bar)[:, None]
        # |x_t - s x_i|^2 without the (batch, N, D) difference tensor
        squared = (x_t**2).sum(1, keepdim=True) - 2 * signal * (x_t @ train.T) + signal**2 * (train**2).sum(1)
        logits = -squared / (2 * noise_var)
        x0 = torch.softmax(logits, dim=-1) @ train
        eps = ((x_t - signal * x0) / noise_var.sqrt()).to(sample.dtype).reshape(sample.shape)
        return UNet2DOutput(sample=eps) if return_dict else (eps,)
