"""The training loop both scripts in ``training/`` run: data, optimisation, callbacks, checkpoints, validation.

A script builds its models and says two things: how a batch becomes the clean model input plus extra forward
arguments (``encode``: images as they are, or VAE latents and text states), and how a model becomes a pipeline
(``build_pipeline``, for validation grids). :func:`train` does the rest, the same way for HOLD and for DDPM-type
schedulers: exact resume, atomic checkpoints, EMA, min-SNR weighting, the mitigation callbacks, tracker logging, a
progress bar, and a final check that data-parallel replicas agree.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from . import hub
from .audit import AuditReport
from .checkpoints import CheckpointManager, NoiseGenerator, run_fingerprint
from .image_data import ImageTrainingDataset, collate_examples, load_image_dataset, prepare_training_dataset
from .mitigations import (
    AntiGradientControl,
    CallbackList,
    HeadPruningCallback,
    IterativeEnsembleTraining,
    ShardedDataset,
    TimestepSamplingCallback,
    TrainingCallback,
    TrainingState,
    training_step,
)
from .training_config import TrainingConfig
from .training_utils import (
    build_timestep_sampler,
    check_replicas_agree,
    check_tracker_available,
    save_validation_grid,
)

__all__ = ["TrainingResult", "finish_training", "load_training_data", "make_accelerator", "sampling_model", "train"]

logger = get_logger(__name__)


def make_accelerator(config: TrainingConfig) -> Accelerator:
    """The run's ``Accelerator`` from the config; fails first if the ``report_to`` tracker is not installed, or if
    ``audit_report`` is given without ``push_to_hub`` or is not a valid report (not at the end of the run)."""
    check_tracker_available(config.report_to)
    _load_audit_report(config)
    if config.mixed_precision == "fp16" and PartialState().device.type == "cpu":
        # accelerate would log fp16 and train in float32
        raise ValueError("--mixed_precision fp16 needs a GPU; on a CPU use bf16 or no.")
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # the data order of every epoch is a function of (seed, epoch), saved and restored with checkpoints
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    processes = f"{accelerator.num_processes} process(es) on {accelerator.device}"
    logger.info(f"{processes}, mixed precision: {accelerator.mixed_precision}")
    set_seed(config.seed)
    return accelerator


def load_training_data(
    config: TrainingConfig, accelerator, *, caption_column: str | None = None, num_channels: int = 3
) -> tuple[ImageTrainingDataset, torch.utils.data.DataLoader]:
    """The training set (every image checked up front) and its data loader, from the data flags.

    Args:
        config (`TrainingConfig`): the run's settings.
        accelerator (`accelerate.Accelerator`): the run's accelerator (the main process prepares the data first).
        caption_column (`str`, *optional*): the caption column (text-to-image).
        num_channels (`int`, defaults to 3): image channels, 1 or 3.
    """
    dataset = load_image_dataset(
        train_data_dir=config.train_data_dir,
        dataset_name=config.dataset_name,
        dataset_config_name=config.dataset_config_name,
        cache_dir=config.cache_dir,
    )
    with accelerator.main_process_first():
        train_dataset, info = prepare_training_dataset(
            dataset,
            image_column=config.image_column,
            caption_column=caption_column,
            resolution=config.resolution,
            center_crop=config.center_crop,
            random_flip=config.random_flip,
            num_channels=num_channels,
            seed=config.seed,
            skip_bad_images=config.skip_bad_images,
        )
    if info["skipped"]:
        logger.warning(f"Skipped {info['skipped']} unreadable images: {info['skipped_images']}")
    if config.ensemble_shards is not None:
        if config.ensemble_redistribute > 0 and not config.anti_gradient_control:
            raise ValueError("--ensemble_redistribute moves the samples AGC skips: add --anti_gradient_control.")
        ensemble = IterativeEnsembleTraining(
            num_shards=config.ensemble_shards,
            num_rounds=config.ensemble_rounds,
            local_epochs=config.ensemble_local_epochs,
            redistribute_fraction=config.ensemble_redistribute,
            seed=config.seed,
        )
        train_dataset = ensemble.shard_dataset(train_dataset)
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=config.train_batch_size,
        shuffle=True,
        collate_fn=collate_examples,
        num_workers=config.dataloader_num_workers,
        drop_last=True,
    )
    if len(train_dataloader) == 0:
        raise ValueError(
            f"{len(train_dataset)} images make no full batch of {config.train_batch_size}; lower --train_batch_size."
        )
    return train_dataset, train_dataloader


def sampling_model(accelerator, model: torch.nn.Module, ema: EMAModel | None) -> torch.nn.Module:
    """The trained model unwrapped from accelerate; with EMA, a copy that holds the EMA weights."""
    model = accelerator.unwrap_model(model)
    if ema is None:
        return model
    model = copy.deepcopy(model)
    ema.copy_to(model.parameters())
    return model


@dataclass
class TrainingResult:
    """What :func:`train` computed.

    Attributes:
        model (`torch.nn.Module`): the trained model as prepared by accelerate (:func:`sampling_model` unwraps it and
            applies the EMA).
        global_step (`int`): optimizer updates done.
        max_train_steps (`int`): the run's length in updates: ``config.max_train_steps``, else its epochs' worth (an
            ensemble fixes the epochs).
        num_epochs (`int`): the epochs those updates span.
    """

    model: torch.nn.Module
    global_step: int
    max_train_steps: int
    num_epochs: int


def train(
    config: TrainingConfig,
    accelerator,
    *,
    model: torch.nn.Module,
    noise_scheduler,
    train_dataset: ImageTrainingDataset | ShardedDataset,
    train_dataloader: torch.utils.data.DataLoader,
    encode: Callable[[dict, torch.Generator], tuple[torch.Tensor, dict]],
    build_pipeline: Callable[[torch.nn.Module], object],
    trainable_parameters: Iterable[torch.nn.Parameter] | None = None,
    ema: EMAModel | None = None,
    callbacks: Iterable[TrainingCallback] = (),
    validation_kwargs: dict | None = None,
    project_name: str = "diffusers_hold",
    hyperparameters: Mapping[str, Any] | None = None,
) -> TrainingResult:
    """Train ``model`` to ``config.max_train_steps`` (resuming when asked); ``config`` is not modified.

    Each micro-batch is one :func:`~diffusers_hold.mitigations.training_step` (``on_batch`` callbacks, ``encode(batch,
    generator)`` -> clean input and forward arguments, ``on_conditioning`` callbacks, timesteps from the callbacks (a
    seeded sampler from ``config.timestep_sampling`` comes first), noise from a per-process generator, the forward
    pass, per-sample MSE, min-SNR weights with ``config.snr_gamma``, ``on_loss`` callbacks), then backward, clipping,
    optimizer and learning-rate steps; after each update: EMA, ``on_step_end``, logging, checkpoints and validation
    grids.

    With ``config.ensemble_shards`` (:func:`load_training_data` then returns a
    :class:`~diffusers_hold.mitigations.ShardedDataset`), the run is iterative ensemble training: its
    :class:`~diffusers_hold.mitigations.IterativeEnsembleTraining` callback runs after the loss filters, averages the
    weights and the EMA, and fixes the number of epochs. With ``config.prune_heads_ratio``, a
    :class:`~diffusers_hold.mitigations.HeadPruningCallback` prunes the least important attention heads after
    ``config.prune_at_step`` updates (importance on the small-t loss of the first ``config.prune_importance_images``
    images) and holds them at zero, in the EMA too, for the rest of the run.

    Args:
        config (`TrainingConfig`): the run's settings.
        accelerator (`accelerate.Accelerator`): the run's accelerator (:func:`make_accelerator`).
        model (`torch.nn.Module`): the UNet to train (not yet prepared).
        noise_scheduler: the training scheduler, :class:`~diffusers_hold.HOLDScheduler` or DDPM-type.
        train_dataset (`ImageTrainingDataset`), train_dataloader (`DataLoader`): from :func:`load_training_data`.
        encode (`Callable`): ``(batch, generator)`` -> (clean model-space tensor `(B, C, H, W)`, extra forward
            keyword arguments); random draws (e.g. VAE latent sampling) must come from ``generator`` (the
            per-process noise generator) for exact resume.
        build_pipeline (`Callable`): sampling model -> pipeline, for validation grids.
        trainable_parameters (`Iterable[Parameter]`, *optional*): what the optimizer updates (default: all of the
            model's parameters that require gradients, e.g. the LoRA weights alone).
        ema (`EMAModel`, *optional*): EMA of the trainable parameters.
        callbacks (`Iterable[TrainingCallback]`, *optional*): mitigations, after the timestep sampler and the
            ``config.anti_gradient_control`` filter.
        validation_kwargs (`dict`, *optional*): pipeline arguments for the validation grids.
        project_name (`str`, defaults to `"diffusers_hold"`): the trackers' project name.
        hyperparameters (`Mapping`, *optional*): further settings logged to the trackers with the config's (e.g. the
            script's own flags).

    Returns:
        [`TrainingResult`]: the prepared model and the run's length.
    """
    trainable_parameters = list(
        [p for p in model.parameters() if p.requires_grad] if trainable_parameters is None else trainable_parameters
    )
    ensemble = train_dataset.ensemble if isinstance(train_dataset, ShardedDataset) else None
    per_epoch, max_train_steps, num_epochs = _run_length(config, accelerator, train_dataloader, ensemble)
    optimizer = torch.optim.AdamW(
        trainable_parameters,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    if ensemble is not None:
        ensemble.ema = ema
    callback_list = _callback_list(config, noise_scheduler, train_dataset, encode, ema, ensemble, callbacks)
    if ema is not None:
        ema.to(accelerator.device)
    # the callbacks' and the EMA's state go into the checkpoints as safetensors + JSON, not as accelerate's pickles
    states = {"callbacks": callback_list} if ema is None else {"callbacks": callback_list, "ema": ema}
    fingerprint = run_fingerprint({**(hyperparameters or {}), **asdict(config)})
    run = _Run(
        config=config,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        callbacks=callback_list,
        state=TrainingState(noise_scheduler, model, accelerator, optimizer=optimizer, updates_per_epoch=per_epoch),
        encode=encode,
        noise_generator=NoiseGenerator(config.seed, accelerator.process_index),
        checkpoints=CheckpointManager(config.output_dir, config.checkpoints_total_limit, fingerprint, states),
        trainable_parameters=trainable_parameters,
        ema=ema,
        build_pipeline=build_pipeline,
        validation_kwargs=validation_kwargs or {},
    )
    global_step = run.start()
    if global_step > max_train_steps:  # the run would save the checkpoint's later model as if it had stopped here
        raise ValueError(
            f"Resumed at step {global_step}, past this run's {max_train_steps} updates (--max_train_steps, or the "
            "epochs): raise --max_train_steps, or resume from an earlier checkpoint."
        )
    if accelerator.is_main_process and config.report_to != "none":
        settings = {**(hyperparameters or {}), **asdict(config), "max_train_steps": max_train_steps}
        accelerator.init_trackers(project_name, config={k: str(v) for k, v in settings.items()})
    logger.info(
        f"{len(train_dataset)} images, {num_epochs} epochs, {max_train_steps} updates of "
        f"{config.train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps} images"
    )
    global_step = run.train_epochs(train_dataset, train_dataloader, global_step, per_epoch, max_train_steps)
    accelerator.wait_for_everyone()
    check_replicas_agree(accelerator, model, callback_list)
    return TrainingResult(model=model, global_step=global_step, max_train_steps=max_train_steps, num_epochs=num_epochs)


def _run_length(config: TrainingConfig, accelerator, train_dataloader, ensemble) -> tuple[int, int, int]:
    """``(updates per epoch, max_train_steps, epochs)`` of a run; an iterative ensemble fixes the epochs."""
    updates_per_epoch = math.ceil(
        len(train_dataloader) / accelerator.num_processes / config.gradient_accumulation_steps
    )
    num_train_epochs = config.num_train_epochs
    if ensemble is not None:
        if config.max_train_steps is not None:
            raise ValueError("--ensemble_shards fixes the length of the run; drop --max_train_steps.")
        num_train_epochs = ensemble.num_epochs
    max_train_steps = config.max_train_steps
    if max_train_steps is None:
        max_train_steps = num_train_epochs * updates_per_epoch
    return updates_per_epoch, max_train_steps, math.ceil(max_train_steps / updates_per_epoch)


def _callback_list(
    config: TrainingConfig, noise_scheduler, train_dataset, encode: Callable, ema, ensemble, callbacks
) -> CallbackList:
    """The run's callbacks in hook order: the seeded timestep sampler, the loss filters the config asks for (AGC, the
    ensemble, head pruning), then the caller's."""
    sampler = TimestepSamplingCallback(build_timestep_sampler(config, noise_scheduler), seed=config.seed)
    filters = []
    if config.anti_gradient_control:
        filters.append(
            AntiGradientControl(
                noise_scheduler.config.num_train_timesteps,
                mem_ratio=config.agc_mem_ratio,
                decay=config.agc_decay,
                num_bins=config.agc_num_bins,
            )
        )
    if ensemble is not None:
        filters.append(ensemble)
    if config.prune_heads_ratio is not None:
        filters.append(_head_pruning(config, train_dataset, encode, ema))
    return CallbackList([sampler, *filters, *callbacks])


@dataclass
class _Run:
    """What the updates of one run of :func:`train` work with (the prepared model, optimizer and callbacks, ...)."""

    config: TrainingConfig
    accelerator: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    callbacks: CallbackList
    state: TrainingState
    encode: Callable
    noise_generator: NoiseGenerator
    checkpoints: CheckpointManager
    trainable_parameters: list[torch.nn.Parameter]
    ema: EMAModel | None
    build_pipeline: Callable
    validation_kwargs: dict

    def start(self) -> int:
        """Claim the output folder for this run (:meth:`CheckpointManager.claim`: another run's checkpoints or
        pipeline are refused before any update) and restore the checkpoint to resume from, if any. The global step."""
        config, accelerator = self.config, self.accelerator
        checkpoint = self.checkpoints.claim(accelerator, config.resume_from_checkpoint, config.overwrite_output_dir)
        if checkpoint is None:
            if config.resume_from_checkpoint is not None:
                logger.info("No checkpoint to resume from; starting a new run.")
            return 0
        global_step = self.checkpoints.load(accelerator, checkpoint, self.noise_generator)
        if self.ema is not None:
            self.ema.to(accelerator.device)  # the restored EMA weights are read onto the CPU
        logger.info(f"Resumed from {checkpoint} at step {global_step}.")
        return global_step

    def train_epochs(self, train_dataset, train_dataloader, global_step: int, updates_per_epoch: int, max_steps: int):
        """Run the updates from ``global_step`` to ``max_steps`` (skipping the batches a resumed epoch already used);
        returns the last global step."""
        config, accelerator = self.config, self.accelerator
        first_epoch = global_step // updates_per_epoch
        batches_to_skip = (global_step % updates_per_epoch) * config.gradient_accumulation_steps
        progress = tqdm(
            range(max_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
        )
        throughput = _Throughput(global_step, warmup=min(5, max_steps // 2))
        self.state.global_step = global_step
        for epoch in range(first_epoch, math.ceil(max_steps / updates_per_epoch)):
            if global_step >= max_steps:
                break
            self.state.epoch = epoch
            self.model.train()
            # accelerate does not always pass the epoch on to the dataset, whose crops and flips depend on it
            train_dataloader.set_epoch(epoch)
            train_dataset.set_epoch(epoch)
            batches = train_dataloader
            if epoch == first_epoch and batches_to_skip:
                batches = accelerator.skip_first_batches(train_dataloader, batches_to_skip)
            for batch in batches:
                loss = self.update(batch)
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                self.after_update(loss, global_step, progress)
                throughput.mark(global_step)
                if global_step >= max_steps:
                    break
        progress.close()
        images_per_update = config.train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
        throughput.report(accelerator, global_step, images_per_update)
        return global_step

    def update(self, batch: dict) -> torch.Tensor:
        """One micro-batch: its :func:`training_step` loss, backward, and (on a synchronising micro-batch, through
        accelerate's accumulation) clipping and the optimizer and learning-rate steps."""
        config, accelerator = self.config, self.accelerator
        with accelerator.accumulate(self.model):
            loss = training_step(
                batch,
                self.state,
                self.callbacks,
                self.encode,
                generator=self.noise_generator.generator,
                snr_gamma=config.snr_gamma,
            )
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(self.trainable_parameters, config.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss

    def after_update(self, loss: torch.Tensor, global_step: int, progress) -> None:
        """After optimizer update ``global_step``: EMA, ``on_step_end``, logs, and the checkpoint and grid due."""
        config, accelerator, state = self.config, self.accelerator, self.state
        if self.ema is not None:
            self.ema.step(self.trainable_parameters)
        state.global_step = global_step
        self.callbacks.on_step_end(state)
        logs = {"loss": loss.detach().item(), "lr": self.lr_scheduler.get_last_lr()[0], **state.logs}
        if self.ema is not None:
            logs["ema_decay"] = self.ema.cur_decay_value
        state.logs.clear()
        progress.update(1)
        progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
        accelerator.log(logs, step=global_step)
        if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
            self.checkpoints.save(accelerator, global_step, self.noise_generator)
        if config.validation_steps and global_step % config.validation_steps == 0 and accelerator.is_main_process:
            pipeline = self.build_pipeline(sampling_model(accelerator, self.model, self.ema))
            with accelerator.autocast():  # frozen components may be in the mixed-precision dtype
                path = save_validation_grid(accelerator, pipeline, config, global_step, **self.validation_kwargs)
            logger.info(f"validation grid: {path}")


class _Throughput:
    """Images per second, timed after the first updates of a run (they pay for allocations and lazy setup)."""

    def __init__(self, first_step: int, warmup: int):
        self.start_step, self.timed_from, self.started = first_step + warmup, None, None

    def mark(self, global_step: int) -> None:
        if global_step == self.start_step:
            self.timed_from, self.started = global_step, time.perf_counter()

    def report(self, accelerator, global_step: int, images_per_update: int) -> None:
        if self.started is None or global_step <= self.timed_from:
            return
        rate = (global_step - self.timed_from) * images_per_update / (time.perf_counter() - self.started)
        logger.info(f"throughput: {rate:.2f} images/s over updates {self.timed_from + 1}-{global_step}")
        accelerator.log({"train_images_per_second": rate}, step=global_step)


def _head_pruning(config: TrainingConfig, train_dataset, encode: Callable, ema: EMAModel | None):
    """The ``--prune_heads_ratio`` callback, measuring importance on the first ``--prune_importance_images`` images."""
    count = min(config.prune_importance_images, len(train_dataset))
    if count < 1:
        raise ValueError(f"--prune_importance_images must be positive, got {config.prune_importance_images}.")
    # a generator of its own: encoding these images must not move the training noise stream (exact resume)
    clean, forward_kwargs = encode(
        collate_examples([train_dataset[i] for i in range(count)]), torch.Generator().manual_seed(config.seed)
    )
    return HeadPruningCallback(
        ratio=config.prune_heads_ratio,
        importance_data=clean.detach(),
        forward_kwargs={k: v.detach() if torch.is_tensor(v) else v for k, v in forward_kwargs.items()},
        prune_at_step=config.prune_at_step,
        criterion=config.prune_criterion,
        seed=config.seed,
        ema=ema,
    )


def _load_audit_report(config: TrainingConfig) -> AuditReport | None:
    """The validated ``config.audit_report`` (`None` when not given)."""
    if config.audit_report is None:
        return None
    if not config.push_to_hub:
        raise ValueError("--audit_report goes into the model card of --push_to_hub; add --push_to_hub.")
    return AuditReport.load(config.audit_report)


def finish_training(
    config: TrainingConfig, accelerator, make_final_pipeline: Callable[[], object], base_model: str | None = None
) -> None:
    """Save the final pipeline to ``--output_dir`` (and publish it with ``--push_to_hub``, with the audit of
    ``--audit_report`` in the model card), then end the run.

    The pipeline is built and saved on the main process only; every process waits for it before
    ``end_training`` tears the process group down (a process that left early would strand the others).

    Args:
        config (`TrainingConfig`): the run's settings.
        accelerator (`accelerate.Accelerator`): the run's accelerator.
        make_final_pipeline (`Callable`): builds the pipeline to save (called on the main process).
        base_model (`str`, *optional*): what the model was fine-tuned from, for the Hub model card.
    """
    if accelerator.is_main_process:
        pipeline = make_final_pipeline()
        pipeline.save_pretrained(config.output_dir)
        if config.push_to_hub:
            audit = _load_audit_report(config)
            if audit is not None and audit.pipeline_class != type(pipeline).__name__:
                raise ValueError(
                    f"--audit_report {config.audit_report} audits a {audit.pipeline_class}, but this run made a "
                    f"{type(pipeline).__name__} (saved to {config.output_dir}); audit it and publish it with "
                    "`diffusers-hold publish`."
                )
            folder = hub.save_for_hub(
                pipeline,
                Path(config.output_dir) / "hub",
                base_model=base_model,
                repo_id=config.hub_model_id,
                memorization_audit=audit,
                overwrite=True,
            )
            hub.push_to_hub(folder, config.hub_model_id, token=config.hub_token)
    accelerator.wait_for_everyone()
    accelerator.end_training()
