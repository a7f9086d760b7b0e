"""One callback protocol for training-time mitigations (timestep sampling, loss filters, batch edits, ...), and the
training step that calls it.

A :class:`TrainingCallback` overrides some of five hooks; a :class:`CallbackList` composes callbacks; and
:func:`training_step` forms one micro-batch's loss through them, the same way for any model and scheduler
(DDPM-style or HOLD). Both loops of the project call it (the training scripts' ``diffusers_hold.training_loop`` and
the benchmark); your own loop does the optimisation around it::

    from diffusers_hold.mitigations import (
        CallbackList, TimestepSamplingCallback, TrainingState, get_timestep_sampler, training_step
    )

    sampler = get_timestep_sampler("snr_interval", noise_scheduler, c_low=0.05, c_high=0.45)
    callbacks = CallbackList([TimestepSamplingCallback(sampler, seed=seed)])
    # checkpoint callbacks.state_dict() with the run (diffusers_hold.checkpoints.save_state_files: no pickle)
    state = TrainingState(noise_scheduler=noise_scheduler, model=unet, accelerator=accelerator)

    def encode(batch, generator):  # clean model input and extra forward arguments, e.g. VAE latents and text states
        return batch["pixel_values"], {}

    for epoch in range(first_epoch, num_train_epochs):
        state.epoch = epoch
        for batch in train_dataloader:
            with accelerator.accumulate(unet):
                loss = training_step(batch, state, callbacks, encode, generator=generator)  # hooks 1-4
                accelerator.backward(loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                state.global_step += 1
                callbacks.on_step_end(state)                                   # 5. once per optimizer update
                accelerator.log({"loss": loss.item(), **state.logs}, step=state.global_step)
                state.logs.clear()
                # then checkpointing, e.g. CheckpointManager(..., states={"callbacks": callbacks}).save(...)

Inside :func:`training_step`: ``on_batch`` (1. edit the batch), ``encode``, ``on_conditioning`` (2. edit the
conditioning), ``sample_timesteps`` (3. timesteps and weights; uniform if no callback supplies them), the noising
and target of :func:`~diffusers_hold.objective.noisy_input_and_target`, the forward pass, the per-sample loss
(:func:`~diffusers_hold.objective.per_sample_mse`, optionally min-SNR weighted) and ``on_loss`` (4. filters and
weights, then the mean). ``state.timesteps`` and ``state.timestep_weights`` hold the current micro-batch's draw for
the hooks that run after it (``on_loss``, e.g. a per-timestep loss filter); ``state.model_input``,
``state.forward_kwargs`` and ``state.model_output`` (detached) hold the forward pass, for filters that compare it
with another one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..objective import min_snr_loss_weights, noisy_input_and_target, per_sample_mse, signal_to_noise
from .timestep_sampling import TimestepSampler, UniformTimestepSampler

__all__ = ["CallbackList", "TimestepSamplingCallback", "TrainingCallback", "TrainingState", "training_step"]


@dataclass
class TrainingState:
    """What a training loop shares with its callbacks; the loop owns it and updates the counters.

    Args:
        noise_scheduler (`SchedulerMixin`): the training noise scheduler (DDPM-style or HOLD).
        model (`torch.nn.Module`): the model being trained (as prepared by ``accelerate``, if it is used).
        accelerator (`accelerate.Accelerator`, *optional*): the accelerator, or `None` in a plain loop.
        global_step (`int`, defaults to 0): optimizer updates done so far; the loop increments it before
            :meth:`CallbackList.on_step_end`.
        epoch (`int`, defaults to 0): the current epoch.
        logs (`dict`, *optional*): metrics callbacks write for the progress bar and trackers; the loop reports and
            clears it after each :meth:`CallbackList.on_step_end`.
        timesteps (`torch.Tensor`, *optional*): the current micro-batch's timesteps, set by
            :meth:`CallbackList.sample_timesteps`.
        timestep_weights (`torch.Tensor`, *optional*): their per-sample loss weights, set with them.
        model_input (`torch.Tensor`, *optional*), forward_kwargs (`dict`, *optional*), model_output (`torch.Tensor`,
            *optional*): the current micro-batch's noisy input, the extra forward arguments and the (detached)
            prediction, set by the loop with :meth:`set_forward` before ``on_loss``.
        kept (`torch.Tensor`, *optional*): bool mask of the current micro-batch's samples that the loss filters so
            far kept (`None`: no filter dropped any); reset by :meth:`CallbackList.on_loss`, narrowed by each filter.
        optimizer (`torch.optim.Optimizer`, *optional*): the loop's optimizer, for callbacks that reset its state.
        updates_per_epoch (`int`, *optional*): optimizer updates in one epoch of the loop's data.
    """

    noise_scheduler: Any
    model: torch.nn.Module
    accelerator: Any | None = None
    global_step: int = 0
    epoch: int = 0
    logs: dict[str, Any] = field(default_factory=dict)
    timesteps: torch.Tensor | None = None
    timestep_weights: torch.Tensor | None = None
    model_input: torch.Tensor | None = None
    forward_kwargs: dict[str, Any] | None = None
    model_output: torch.Tensor | None = None
    kept: torch.Tensor | None = None
    optimizer: Any | None = None
    updates_per_epoch: int | None = None

    def set_forward(self, model_input: torch.Tensor, forward_kwargs: dict[str, Any], model_output: torch.Tensor):
        """Record the micro-batch's forward pass for the ``on_loss`` hooks (the output is stored detached)."""
        self.model_input, self.forward_kwargs, self.model_output = model_input, forward_kwargs, model_output.detach()

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        """The bare model: unwrapped from ``accelerate``'s wrappers (DDP, ...) when there is an accelerator."""
        return self.accelerator.unwrap_model(self.model) if self.accelerator is not None else self.model

    @property
    def device(self) -> torch.device:
        """The accelerator's device, else the model's (CPU for a model without parameters)."""
        if self.accelerator is not None:
            return self.accelerator.device
        parameter = next(self.model.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")


class TrainingCallback:
    """Base class of training-time mitigations: every hook is a no-op until overridden.

    The hooks, in the order a step calls them (see the module docstring): :meth:`on_batch`,
    :meth:`on_conditioning`, :meth:`sample_timesteps`, :meth:`on_loss`, :meth:`on_step_end`. A callback with state
    that must survive a resumed run stores it in :meth:`state_dict` (plain Python values and CPU tensors) and
    restores it in :meth:`load_state_dict`; these two methods make a callback checkpointable, as safetensors + JSON
    by :class:`~diffusers_hold.checkpoints.CheckpointManager` (no pickle) or by
    ``accelerate.Accelerator.register_for_checkpointing``.
    """

    @property
    def name(self) -> str:
        """Name under which :class:`CallbackList` checks the order of saved states (the class name by default)."""
        return type(self).__name__

    def on_batch(self, batch: dict, state: TrainingState) -> dict:
        """Edit a batch before it is encoded (images, captions, ...); return the batch to use.

        Args:
            batch (`dict`): the data loader's batch.
            state (`TrainingState`): the loop's state.
        """
        return batch

    def on_conditioning(self, forward_kwargs: dict, state: TrainingState) -> dict:
        """Edit the model's extra forward arguments after encoding (e.g. ``encoder_hidden_states``); return them.

        Args:
            forward_kwargs (`dict`): keyword arguments of the model's forward besides the input and the timesteps.
            state (`TrainingState`): the loop's state.
        """
        return forward_kwargs

    def sample_timesteps(self, batch_size: int, state: TrainingState) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Supply the training timesteps and their per-sample loss weights, or `None` to leave them to others.

        Args:
            batch_size (`int`): number of timesteps.
            state (`TrainingState`): the loop's state (``state.device`` is where they are used).

        Returns:
            `tuple[torch.Tensor, torch.Tensor]` or `None`: timesteps `(batch_size,)` in the scheduler's model units
            and float weights `(batch_size,)`, on ``state.device``.
        """
        return None

    def on_loss(self, per_sample_loss: torch.Tensor, state: TrainingState) -> torch.Tensor:
        """Transform the loss: return per-sample losses of the same shape, or a scalar that replaces the batch mean.

        The losses are unweighted; :class:`CallbackList` applies ``state.timestep_weights`` after the last callback.

        Args:
            per_sample_loss (`torch.Tensor` of shape `(batch,)`): the loss of each sample.
            state (`TrainingState`): the loop's state (``state.timesteps`` holds the samples' timesteps).
        """
        return per_sample_loss

    def on_step_end(self, state: TrainingState) -> None:
        """Called once per optimizer update, after ``state.global_step`` was incremented and before checkpointing.

        Args:
            state (`TrainingState`): the loop's state; write metrics into ``state.logs``.
        """

    def state_dict(self) -> dict:
        """The callback's resumable state (empty by default)."""
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the state returned by :meth:`state_dict`."""
        if state_dict:
            raise ValueError(f"{self.name} keeps no state but was given {sorted(state_dict)}.")


class CallbackList:
    """The callbacks of a training run, composed hook by hook. This is what a training loop calls.

    Rules:

    - :meth:`on_batch` and :meth:`on_conditioning`: each callback edits what the previous one returned, in list order.
    - :meth:`sample_timesteps`: at most one callback may implement ``sample_timesteps`` (checked here, so a
      conflicting set-up fails before training); without one, timesteps are uniform
      (:class:`~diffusers_hold.mitigations.UniformTimestepSampler` on the global RNG, as diffusers' scripts draw
      them) with weights 1.
    - :meth:`on_loss`: each callback transforms what the previous one returned, in list order; then the list
      multiplies per-sample losses by ``state.timestep_weights`` and averages them. A callback that returns a scalar
      ends the per-sample stage; that is refused when the timesteps carry weights other than 1, which the list could
      then no longer apply.
    - :meth:`on_step_end`: every callback, in list order.
    - :meth:`state_dict` holds each callback's state with its :attr:`TrainingCallback.name`, in order;
      :meth:`load_state_dict` refuses a state saved from a different list of callbacks.

    Args:
        callbacks (`Iterable[TrainingCallback]`, *optional*): the callbacks, in the order their hooks run.
    """

    def __init__(self, callbacks: Iterable[TrainingCallback] = ()):
        self.callbacks = list(callbacks)
        for callback in self.callbacks:
            if not isinstance(callback, TrainingCallback):
                raise TypeError(f"Expected TrainingCallback instances, got {type(callback).__name__}.")
        suppliers = [
            callback.name
            for callback in self.callbacks
            if type(callback).sample_timesteps is not TrainingCallback.sample_timesteps
        ]
        if len(suppliers) > 1:
            raise ValueError(
                f"At most one callback may supply timesteps, got {len(suppliers)}: {', '.join(suppliers)}. Combine "
                "them into one sampler."
            )

    def on_batch(self, batch: dict, state: TrainingState) -> dict:
        """The batch after every callback's :meth:`TrainingCallback.on_batch`, in order."""
        for callback in self.callbacks:
            batch = callback.on_batch(batch, state)
            if not isinstance(batch, Mapping):
                raise TypeError(f"{callback.name}.on_batch must return the batch dict, got {type(batch).__name__}.")
        return batch

    def on_conditioning(self, forward_kwargs: dict, state: TrainingState) -> dict:
        """The forward arguments after every callback's :meth:`TrainingCallback.on_conditioning`, in order."""
        for callback in self.callbacks:
            forward_kwargs = callback.on_conditioning(forward_kwargs, state)
            if not isinstance(forward_kwargs, Mapping):
                raise TypeError(
                    f"{callback.name}.on_conditioning must return the forward arguments dict, got "
                    f"{type(forward_kwargs).__name__}."
                )
        return forward_kwargs

    def sample_timesteps(self, batch_size: int, state: TrainingState) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps and per-sample weights from the supplying callback, else uniform with weights 1.

        Also stores them in ``state.timesteps`` and ``state.timestep_weights``.

        Args:
            batch_size (`int`): number of timesteps.
            state (`TrainingState`): the loop's state.
        """
        drawn = None
        for callback in self.callbacks:
            drawn = callback.sample_timesteps(batch_size, state)
            if drawn is not None:
                break
        if drawn is None:
            drawn = UniformTimestepSampler(state.noise_scheduler).sample(batch_size, device=state.device)
        timesteps, weights = drawn
        if timesteps.shape != (batch_size,) or weights.shape != (batch_size,):
            raise ValueError(
                f"sample_timesteps must return timesteps and weights of shape ({batch_size},), got "
                f"{tuple(timesteps.shape)} and {tuple(weights.shape)}."
            )
        state.timesteps, state.timestep_weights = timesteps, weights
        return timesteps, weights

    def on_loss(self, per_sample_loss: torch.Tensor, state: TrainingState) -> torch.Tensor:
        """The scalar loss to optimise: per-sample losses through every callback, weighted, then averaged.

        Args:
            per_sample_loss (`torch.Tensor` of shape `(batch,)`): unweighted per-sample losses (see
                :func:`~diffusers_hold.objective.per_sample_mse`).
            state (`TrainingState`): the loop's state, with this micro-batch's ``timestep_weights``.
        """
        if per_sample_loss.ndim != 1:
            raise ValueError(f"Expected per-sample losses of shape (batch,), got {tuple(per_sample_loss.shape)}.")
        loss = per_sample_loss
        state.kept = None
        for callback in self.callbacks:
            result = callback.on_loss(loss, state)
            if result.ndim != 0 and result.shape != loss.shape:
                raise ValueError(
                    f"{callback.name}.on_loss must return a scalar or a tensor of shape {tuple(loss.shape)}, got "
                    f"{tuple(result.shape)}."
                )
            loss = result
        weights = state.timestep_weights
        if loss.ndim == 0:
            if weights is not None and bool((weights != 1).any()):
                raise ValueError(
                    "A callback reduced the loss to a scalar, but the timesteps carry importance weights that could "
                    "then not be applied; return per-sample losses from on_loss."
                )
            return loss
        if weights is not None:
            loss = loss * weights.to(device=loss.device, dtype=loss.dtype)
        return loss.mean()

    def on_step_end(self, state: TrainingState) -> None:
        """Every callback's :meth:`TrainingCallback.on_step_end`, in order."""
        for callback in self.callbacks:
            callback.on_step_end(state)

    def state_dict(self) -> dict:
        """The callbacks' states, in order, each with its callback's name."""
        return {"callbacks": [{"name": callback.name, "state": callback.state_dict()} for callback in self.callbacks]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`'s output; the saved callbacks' names must match this list's, in order."""
        saved = [entry["name"] for entry in state_dict["callbacks"]]
        current = [callback.name for callback in self.callbacks]
        if saved != current:
            raise ValueError(f"The saved callback state is for callbacks {saved}, but this list has {current}.")
        for callback, entry in zip(self.callbacks, state_dict["callbacks"], strict=True):
            callback.load_state_dict(entry["state"])


class TimestepSamplingCallback(TrainingCallback):
    """Supplies training timesteps (and importance weights) from a :class:`TimestepSampler`.

    With ``seed``, draws come from the callback's own generator, whose state is part of :meth:`state_dict`, so a run
    resumed from an ``accelerate`` checkpoint draws the same timesteps as an uninterrupted one; without it they come
    from the global RNG (which ``accelerator.save_state`` saves itself). On several processes every process advances
    the same generator by one draw of ``batch_size * num_processes`` timesteps and takes its own slice: processes get
    different timesteps, and the one state that the main process checkpoints is every process's state.

    Args:
        sampler (`TimestepSampler`): the sampler, built for the training noise scheduler.
        seed (`int`, *optional*): seed of the callback's own CPU generator.
    """

    def __init__(self, sampler: TimestepSampler, seed: int | None = None):
        if not isinstance(sampler, TimestepSampler):
            raise TypeError(f"Expected a TimestepSampler, got {type(sampler).__name__}.")
        self.sampler = sampler
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def sample_timesteps(self, batch_size: int, state: TrainingState) -> tuple[torch.Tensor, torch.Tensor]:
        accelerator = state.accelerator
        num_processes = accelerator.num_processes if accelerator is not None else 1
        process_index = accelerator.process_index if accelerator is not None else 0
        timesteps, weights = self.sampler.sample(batch_size * num_processes, self.generator, state.device)
        own = slice(process_index * batch_size, (process_index + 1) * batch_size)
        return timesteps[own], weights[own]

    def state_dict(self) -> dict:
        return {} if self.generator is None else {"generator_state": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        if (self.generator is None) != ("generator_state" not in state_dict):
            raise ValueError(
                "The saved timestep-sampling state and this callback disagree on having a seeded generator; resume "
                "with the same `seed` setting."
            )
        if self.generator is not None:
            self.generator.set_state(state_dict["generator_state"])


def training_step(
    batch: dict,
    state: TrainingState,
    callbacks: CallbackList,
    encode: Callable[[dict, torch.Generator | None], tuple[torch.Tensor, dict]],
    *,
    generator: torch.Generator | None = None,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """The loss of one micro-batch, formed through the callbacks (see the module docstring for the loop around it).

    In order: ``callbacks.on_batch``; ``encode(batch, generator)`` -> the clean model input and the extra forward
    arguments; ``callbacks.on_conditioning``; ``callbacks.sample_timesteps``; the noisy input and the target of
    :func:`~diffusers_hold.objective.noisy_input_and_target` (noise from ``generator``); ``state.model(noisy,
    timesteps, **forward_kwargs)``, recorded with :meth:`TrainingState.set_forward`; the per-sample MSE, times the
    min-SNR-gamma weights with ``snr_gamma``; and ``callbacks.on_loss``, which filters, applies the timesteps'
    importance weights and averages. Backward and the optimizer step are the caller's.

    Args:
        batch (`dict`): the data loader's batch.
        state (`TrainingState`): the loop's state; ``state.model`` (as prepared by accelerate, if it is used) and
            ``state.noise_scheduler`` are trained with.
        callbacks (`CallbackList`): the run's callbacks.
        encode (`Callable`): ``(batch, generator)`` -> (clean model-space tensor `(B, C, H, W)`, extra forward
            keyword arguments such as ``{"encoder_hidden_states": ...}``); its random draws (e.g. VAE latent
            sampling) should come from ``generator`` for an exact resume.
        generator (`torch.Generator`, *optional*): source of the noise and of ``encode``'s draws (a CPU generator
            whose state the loop checkpoints); the global RNG without one.
        snr_gamma (`float`, *optional*): min-SNR-gamma weighting of the per-sample losses (Hang et al. 2023).

    Returns:
        `torch.Tensor`: the scalar loss to back-propagate.
    """
    batch = callbacks.on_batch(batch, state)
    clean, forward_kwargs = encode(batch, generator)
    forward_kwargs = callbacks.on_conditioning(forward_kwargs, state)
    timesteps, _ = callbacks.sample_timesteps(len(clean), state)
    model_input, target = noisy_input_and_target(state.noise_scheduler, clean, timesteps, generator)
    model_output = state.model(model_input, timesteps, **forward_kwargs).sample
    state.set_forward(model_input, forward_kwargs, model_output)
    per_sample_loss = per_sample_mse(model_output, target)
    if snr_gamma is not None:
        prediction_type = getattr(state.noise_scheduler.config, "prediction_type", "epsilon")
        snr = signal_to_noise(state.noise_scheduler, timesteps)
        per_sample_loss = per_sample_loss * min_snr_loss_weights(snr, snr_gamma, prediction_type)
    return callbacks.on_loss(per_sample_loss, state)
