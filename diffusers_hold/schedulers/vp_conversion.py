"""Reading a pretrained VP epsilon model as a HOLD model, through the sufficient statistic (``docs/HOLD_MATH.md``,
section 4).

Given a HOLD state ``z_t``, the statistic ``s = w(t) . z_t`` is distributed as ``x_0 + sqrt(v(t)) * noise``
(:meth:`~diffusers_hold.dynamics.HOLDDynamics.sufficient_statistic`), which is a VP state ``sqrt(alpha_bar) * s`` at
``alpha_bar = 1 / (1 + v)``. The VP model's noise prediction there gives ``x0_hat``, and ``x0_hat`` gives the last
block's noise ``eps_n = (L_t^{-1})_{n,:} z_t - c(t) x0_hat`` (section 3). :class:`HOLDScheduler` with
``prediction_type="vp_epsilon"`` samples this way.
"""

from __future__ import annotations

import numpy as np
import torch

from ..dynamics import HOLDDynamics, time_where_decreasing

__all__ = ["VPConversion", "vp_betas"]


def vp_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: list[float] | None = None,
) -> torch.Tensor:
    """The VP model's betas in float64, as diffusers' ``DDPMScheduler`` builds them (`"linear"` or
    `"scaled_linear"`, or ``trained_betas`` as given); raises unless they are ``num_train_timesteps`` values in
    ``(0, 1)``."""
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float64)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    else:
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    if len(betas) != num_train_timesteps or not ((betas > 0) & (betas < 1)).all():
        raise ValueError(f"The VP betas must be {num_train_timesteps} values in (0, 1).")
    return betas


class VPConversion:
    """The conversion between HOLD states and a VP model's inputs and outputs.

    Args:
        dynamics (`HOLDDynamics`): the HOLD process.
        alphas_cumprod (`torch.Tensor`): the VP model's ``alpha_bar`` table (float64, decreasing with the timestep).
    """

    def __init__(self, dynamics: HOLDDynamics, alphas_cumprod: torch.Tensor):
        self.dynamics = dynamics
        self.alphas_cumprod = alphas_cumprod

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sufficient-statistic weights `(len(t), n)`, VP ``alpha_bar`` and fractional VP timesteps at continuous
        times ``t`` (float64).

        The timestep is interpolated linearly in the VP table's log-SNR; ``alpha_bar`` is clamped to the range the
        VP model was trained on.
        """
        weights, variance = self.dynamics.sufficient_statistic(t)
        table = self.alphas_cumprod
        alpha_bar = (1.0 / (1.0 + variance)).clamp(float(table[-1]), float(table[0]))
        table_log_snr = torch.log(table / (1 - table))  # decreasing with the timestep
        log_snr = torch.log(alpha_bar / (1 - alpha_bar))
        positions = torch.arange(len(table), dtype=torch.float64)
        vp_timesteps = np.interp(-log_snr.numpy(), -table_log_snr.numpy(), positions.numpy())
        return weights, alpha_bar, torch.as_tensor(vp_timesteps, dtype=torch.float64)

    def time_at_timestep(self, vp_timesteps: torch.Tensor, t_min: float, t_max: float) -> torch.Tensor:
        """The continuous times in ``[t_min, t_max]`` at which :meth:`coefficients` gives the (fractional) VP
        timesteps ``vp_timesteps``: where the sufficient statistic's log-SNR ``-log Var(s - x_0)`` equals the VP
        table's log-SNR at those timesteps (interpolated linearly in the timestep). Timesteps whose noise level the
        statistic does not reach within ``[t_min, t_max]`` raise."""
        table = self.alphas_cumprod
        positions = np.arange(len(table), dtype=np.float64)
        table_log_snr = torch.log(table / (1 - table)).numpy()
        targets = torch.as_tensor(np.interp(np.asarray(vp_timesteps, dtype=np.float64), positions, table_log_snr))

        def statistic_log_snr(t: torch.Tensor) -> torch.Tensor:
            return -torch.log(self.dynamics.sufficient_statistic(t)[1])

        return time_where_decreasing(statistic_log_snr, targets, t_min, t_max, "VP log-SNR")

    @staticmethod
    def model_input(state: torch.Tensor, weights: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """The VP model's input ``sqrt(alpha_bar) * (w . z)`` `(batch, C, ...)` for states `(batch, n * C, ...)`;
        ``weights`` `(1 or batch, n)` and ``alpha_bar`` `(1 or batch,)` from :meth:`coefficients`."""
        n = weights.shape[-1]
        blocks = state.reshape(state.shape[0], n, -1)
        w = weights.to(device=state.device, dtype=state.dtype)
        scale = alpha_bar.sqrt().to(device=state.device, dtype=state.dtype)
        statistic = (w[:, :, None] * blocks).sum(1)
        shape = (state.shape[0], state.shape[1] // n, *state.shape[2:])
        return (scale[:, None] * statistic).reshape(shape)

    @staticmethod
    def epsilon_and_estimate(
        blocks: torch.Tensor,
        vp_eps: torch.Tensor,
        weights: torch.Tensor,
        alpha_bar: torch.Tensor,
        ell: torch.Tensor,
        c: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(eps_n, x0_hat)`` from a VP noise prediction ``vp_eps`` `(batch, R)` for states ``blocks``
        `(batch, n, R)`; ``ell``, ``c`` are the state's :meth:`~diffusers_hold.dynamics.HOLDDynamics.x0_coefficients`,
        all coefficients cast to the states' dtype and device."""
        statistic = (weights[:, :, None] * blocks).sum(1)
        # x_vp = sqrt(ab) s, so x0_hat = (x_vp - sqrt(1 - ab) eps_vp) / sqrt(ab) = s - sqrt((1 - ab) / ab) eps_vp
        pred_original = statistic - ((1 - alpha_bar) / alpha_bar).sqrt()[:, None] * vp_eps
        eps_n = (ell[:, :, None] * blocks).sum(1) - c[:, None] * pred_original
        return eps_n, pred_original
