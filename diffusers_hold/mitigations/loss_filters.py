"""Loss filters: callbacks that drop training samples from the loss.

- :class:`AntiGradientControl` (Liu et al., ECCV 2024, the AGC of IET-AGC): a sample whose loss is already far below
  the recent loss at its timestep is being memorized, so its gradient is withheld.
- :class:`CFGGapFilter` (Wen et al., ICLR 2024): a sample whose conditional noise prediction departs far from the
  unconditional one is a caption the model is copying, so it is dropped.

Both keep the loss an average over the kept samples (see :func:`mean_over_kept`) and log the kept fraction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .callbacks import TrainingCallback, TrainingState

__all__ = ["AntiGradientControl", "CFGGapFilter", "mean_over_kept"]


def mean_over_kept(per_sample_loss: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-sample losses whose batch mean is the mean over the kept samples (all zero when none is kept).

    Dropped samples get 0 and kept ones are scaled by ``batch / kept``, so the per-sample stage of
    :class:`~diffusers_hold.mitigations.CallbackList` (importance weights, later callbacks) still applies.

    Args:
        per_sample_loss (`torch.Tensor` of shape `(batch,)`): the losses.
        keep (`torch.Tensor` of shape `(batch,)`): bool mask of the samples to keep.
    """
    if keep.shape != per_sample_loss.shape:
        raise ValueError(f"keep has shape {tuple(keep.shape)}, the losses {tuple(per_sample_loss.shape)}.")
    kept = int(keep.sum())
    scale = len(keep) / kept if kept else 0.0
    return torch.where(keep, per_sample_loss * scale, torch.zeros_like(per_sample_loss))


class _KeptFractionLog(TrainingCallback):
    """Counts kept samples over the micro-batches of an update and logs their fraction under ``log_name``; narrows
    ``TrainingState.kept`` to them."""

    log_name = "kept"

    def __init__(self):
        self._kept = self._seen = 0

    def _count(self, keep: torch.Tensor, state: TrainingState) -> None:
        state.kept = keep if state.kept is None else state.kept & keep
        self._kept += int(keep.sum())
        self._seen += keep.numel()

    def on_step_end(self, state: TrainingState) -> None:
        if self._seen:
            state.logs[self.log_name] = self._kept / self._seen
        self._kept = self._seen = 0


class AntiGradientControl(_KeptFractionLog):
    """Anti-gradient control: keep sample ``i`` iff ``mem_ratio * loss_i >= bank[t_i]``.

    ``bank`` holds an exponential moving average of the loss per timestep (initially 0, so everything is kept at
    first). The decision uses the bank as it was before this micro-batch; then every sample updates it (kept or not):
    ``bank[b] = decay * bank[b] + (1 - decay) * mean of this micro-batch's losses in bin b``. Under several processes
    the losses and timesteps of all processes are gathered first, so every process holds the same bank (the main
    process's copy is what checkpoints store). Continuous timesteps (:class:`~diffusers_hold.HOLDScheduler`) are
    binned: bin ``floor(t * num_bins / num_train_timesteps)``; integer DDPM timesteps with the default
    ``num_bins = num_train_timesteps`` get one bin each.

    The defaults are those of the IET-AGC paper and code: ``mem_ratio`` 2.0 for CIFAR-10-sized models (1.25 for
    Stable Diffusion fine-tuning), decay 0.8. See ``docs/MEMORIZATION.md``, "Training-time mitigations".

    Args:
        num_train_timesteps (`int`): the scheduler's timestep range (``noise_scheduler.config.num_train_timesteps``).
        mem_ratio (`float`, defaults to 2.0): a sample is dropped when its loss is below ``bank / mem_ratio``.
        decay (`float`, defaults to 0.8): EMA decay of the bank.
        num_bins (`int`, *optional*): bins of the bank, ``num_train_timesteps`` by default.
    """

    log_name = "agc_kept"

    def __init__(
        self, num_train_timesteps: int, mem_ratio: float = 2.0, decay: float = 0.8, num_bins: int | None = None
    ):
        super().__init__()
        num_bins = num_train_timesteps if num_bins is None else num_bins
        if not isinstance(num_bins, int) or num_bins < 1 or not isinstance(num_train_timesteps, int):
            raise ValueError(f"num_bins and num_train_timesteps must be positive integers, got {num_bins!r}.")
        if not mem_ratio > 0:
            raise ValueError(f"mem_ratio must be positive, got {mem_ratio!r}.")
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}.")
        self.num_train_timesteps = num_train_timesteps
        self.mem_ratio = float(mem_ratio)
        self.decay = float(decay)
        self.bank = torch.zeros(num_bins, dtype=torch.float64)

    def bins(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Bank bin of each timestep (int64, CPU)."""
        scaled = timesteps.detach().double().cpu() * len(self.bank) / self.num_train_timesteps
        return scaled.floor().long().clamp(0, len(self.bank) - 1)

    def keep_mask(self, per_sample_loss: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The keep rule against the current bank (bool, on the losses' device)."""
        threshold = self.bank[self.bins(timesteps)].to(per_sample_loss.device)
        return self.mem_ratio * per_sample_loss.detach().double() >= threshold

    def update(self, per_sample_loss: torch.Tensor, timesteps: torch.Tensor) -> None:
        """Fold losses into the bank (the per-bin mean of this batch, with the EMA decay)."""
        bins = self.bins(timesteps)
        losses = per_sample_loss.detach().double().cpu()
        totals = torch.zeros_like(self.bank).index_add_(0, bins, losses)
        counts = torch.zeros_like(self.bank).index_add_(0, bins, torch.ones_like(losses))
        seen = counts > 0
        self.bank[seen] = self.decay * self.bank[seen] + (1 - self.decay) * totals[seen] / counts[seen]

    def on_loss(self, per_sample_loss: torch.Tensor, state: TrainingState) -> torch.Tensor:
        if state.timesteps is None:
            raise ValueError("AntiGradientControl needs state.timesteps (call CallbackList.sample_timesteps first).")
        keep = self.keep_mask(per_sample_loss, state.timesteps)
        losses, timesteps = per_sample_loss.detach(), state.timesteps
        accelerator = state.accelerator
        if accelerator is not None and accelerator.num_processes > 1:
            losses, timesteps = accelerator.gather(losses), accelerator.gather(timesteps)
        self.update(losses, timesteps)
        self._count(keep, state)
        return mean_over_kept(per_sample_loss, keep)

    def state_dict(self) -> dict:
        return {"bank": self.bank.clone()}

    def load_state_dict(self, state_dict: dict) -> None:
        bank = state_dict["bank"]
        if bank.shape != self.bank.shape:
            raise ValueError(f"The saved AGC bank has {len(bank)} bins, this callback {len(self.bank)}.")
        self.bank = bank.clone().double()


class CFGGapFilter(_KeptFractionLog):
    """Wen et al.'s training filter: drop samples whose ``|| eps(x_t, caption) - eps(x_t, empty) ||_2 > threshold``.

    The conditional prediction is the training forward pass itself (``state.model_output``); the unconditional one is
    an extra forward pass without gradients on the same noisy input with ``unconditional_kwargs`` (e.g. the text
    encoder's embedding of the empty caption), so a step costs one more forward. The norm is over all of a sample's
    elements, so the threshold depends on the latent size (2 in Wen et al.'s Stable Diffusion set-up).

    Args:
        unconditional_kwargs (`Mapping` or `Callable[[int], Mapping]`): the forward arguments of the unconditional
            prediction, with tensors of batch size 1 (expanded to the batch) or a function of the batch size.
        threshold (`float`, defaults to 2.0): largest gap kept.
    """

    log_name = "cfg_gap_kept"

    def __init__(self, unconditional_kwargs: Mapping | Callable[[int], Mapping], threshold: float = 2.0):
        super().__init__()
        if not threshold > 0:
            raise ValueError(f"threshold must be positive, got {threshold!r}.")
        self.unconditional_kwargs = unconditional_kwargs
        self.threshold = float(threshold)

    def _unconditional(self, batch_size: int) -> dict:
        if callable(self.unconditional_kwargs):
            return dict(self.unconditional_kwargs(batch_size))
        return {
            key: value.expand(batch_size, *value.shape[1:]) if torch.is_tensor(value) else value
            for key, value in self.unconditional_kwargs.items()
        }

    def gaps(self, state: TrainingState) -> torch.Tensor:
        """``|| eps_cond - eps_uncond ||_2`` per sample of the current micro-batch (float64)."""
        if state.model_output is None or state.model_input is None or state.timesteps is None:
            raise ValueError("CFGGapFilter needs the forward pass in the state (TrainingState.set_forward).")
        with torch.no_grad():
            kwargs = self._unconditional(len(state.model_input))
            unconditional = state.model(state.model_input, state.timesteps, **kwargs).sample
        difference = state.model_output.double() - unconditional.double()
        return difference.flatten(1).norm(dim=1)

    def on_loss(self, per_sample_loss: torch.Tensor, state: TrainingState) -> torch.Tensor:
        gaps = self.gaps(state)
        if not torch.isfinite(gaps).all():
            raise ValueError("The CFG gap is NaN or infinite: the model's predictions are not finite.")
        keep = (gaps <= self.threshold).to(per_sample_loss.device)
        self._count(keep, state)
        return mean_over_kept(per_sample_loss, keep)
