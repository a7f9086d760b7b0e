"""The training loop both scripts in ``training/`` run: data, optimisation, callbacks, checkpoints, validation.

A script builds its models and says two things: how a batch becomes the clean model input plus extra forward
arguments (``encode``: images as they are, or VAE latents and text states), and how a model becomes a pipeline
(``build_pipeline``, for validation grids). :func:`train` does the rest, the same way for HOLD and for DDPM-type
schedulers: exact resume, atomic checkpoints, EMA, min-SNR weighting, the mitigation callbacks, tracker logging, a
progress bar, and a final check that data-parallel replicas agree.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from . import hub
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
)
from .objective import min_snr_loss_weights, noisy_input_and_target, per_sample_mse, signal_to_noise
from .training_utils import (
    CheckpointManager,
    NoiseGenerator,
    build_timestep_sampler,
    check_replicas_agree,
    check_tracker_available,
    save_validation_grid,
)

__all__ = ["finish_training", "load_training_data", "make_accelerator", "sampling_model", "train"]

logger = get_logger(__name__)


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """The run's ``Accelerator`` from the flags; fails first if the ``--report_to`` tracker is not installed."""
    check_tracker_available(args.report_to)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # the data order of every epoch is a function of (seed, epoch), saved and restored with checkpoints
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    processes = f"{accelerator.num_processes} process(es) on {accelerator.device}"
    logger.info(f"{processes}, mixed precision: {accelerator.mixed_precision}")
    set_seed(args.seed)
    return accelerator


def load_training_data(
    args: argparse.Namespace, accelerator, *, caption_column: str | None = None, num_channels: int = 3
) -> tuple[ImageTrainingDataset, torch.utils.data.DataLoader]:
    """The training set (every image checked up front) and its data loader, from the data flags.

    Args:
        args (`argparse.Namespace`): the flags of :func:`~diffusers_hold.training_utils.add_training_arguments`.
        accelerator (`accelerate.Accelerator`): the run's accelerator (the main process prepares the data first).
        caption_column (`str`, *optional*): the caption column (text-to-image).
        num_channels (`int`, defaults to 3): image channels, 1 or 3.
    """
    dataset = load_image_dataset(
        train_data_dir=args.train_data_dir,
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        cache_dir=args.cache_dir,
    )
    with accelerator.main_process_first():
        train_dataset, info = prepare_training_dataset(
            dataset,
            image_column=args.image_column,
            caption_column=caption_column,
            resolution=args.resolution,
            center_crop=args.center_crop,
            random_flip=args.random_flip,
            num_channels=num_channels,
            seed=args.seed,
            skip_bad_images=args.skip_bad_images,
        )
    if info["skipped"]:
        logger.warning(f"Skipped {info['skipped']} unreadable images: {info['skipped_images']}")
    if args.ensemble_shards is not None:
        if args.ensemble_redistribute > 0 and not args.anti_gradient_control:
            raise ValueError("--ensemble_redistribute moves the samples AGC skips: add --anti_gradient_control.")
        ensemble = IterativeEnsembleTraining(
            num_shards=args.ensemble_shards,
            num_rounds=args.ensemble_rounds,
            local_epochs=args.ensemble_local_epochs,
            redistribute_fraction=args.ensemble_redistribute,
            seed=args.seed,
        )
        train_dataset = ensemble.shard_dataset(train_dataset)
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=collate_examples,
        num_workers=args.dataloader_num_workers,
        drop_last=True,
    )
    if len(train_dataloader) == 0:
        raise ValueError(
            f"{len(train_dataset)} images make no full batch of {args.train_batch_size}; lower --train_batch_size."
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


def train(
    args: argparse.Namespace,
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
) -> torch.nn.Module:
    """Train ``model`` to ``args.max_train_steps`` (resuming when asked) and return the prepared model.

    One optimizer update: ``on_batch`` callbacks, ``encode(batch, generator)`` -> clean input and forward
    arguments, ``on_conditioning`` callbacks, timesteps from the callbacks (a seeded sampler from
    ``--timestep_sampling`` comes first), noise from a per-process generator, ``model(noisy, timesteps,
    **forward_kwargs)``, per-sample MSE, min-SNR weights (``--snr_gamma``), ``on_loss`` callbacks (which apply
    importance weights), backward, clipping, optimizer and
    learning-rate steps; then EMA, ``on_step_end``, logging, checkpoints and validation grids.

    With ``--ensemble_shards`` (:func:`load_training_data` then returns a
    :class:`~diffusers_hold.mitigations.ShardedDataset`), the run is iterative ensemble training: its
    :class:`~diffusers_hold.mitigations.IterativeEnsembleTraining` callback runs after the loss filters, averages the
    weights and the EMA, and fixes the number of epochs. With ``--prune_heads_ratio``, a
    :class:`~diffusers_hold.mitigations.HeadPruningCallback` prunes the least important attention heads after
    ``--prune_at_step`` updates (importance on the small-t loss of the first ``--prune_importance_images`` images)
    and holds them at zero, in the EMA too, for the rest of the run.

    Args:
        args (`argparse.Namespace`): the flags of :func:`~diffusers_hold.training_utils.add_training_arguments`.
        accelerator (`accelerate.Accelerator`): the run's accelerator.
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
            ``--anti_gradient_control`` filter.
        validation_kwargs (`dict`, *optional*): pipeline arguments for the validation grids.
        project_name (`str`, defaults to `"diffusers_hold"`): the trackers' project name.
    """
    if trainable_parameters is None:
        trainable_parameters = [p for p in model.parameters() if p.requires_grad]
    trainable_parameters = list(trainable_parameters)
    optimizer = torch.optim.AdamW(
        trainable_parameters,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    updates_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    ensemble = train_dataset.ensemble if isinstance(train_dataset, ShardedDataset) else None
    if ensemble is not None:
        if args.max_train_steps is not None:
            raise ValueError("--ensemble_shards fixes the length of the run; drop --max_train_steps.")
        args.num_train_epochs = ensemble.num_epochs
        ensemble.ema = ema
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    sampler = TimestepSamplingCallback(build_timestep_sampler(args, noise_scheduler), seed=args.seed)
    filters = []
    if args.anti_gradient_control:
        filters.append(
            AntiGradientControl(
                noise_scheduler.config.num_train_timesteps,
                mem_ratio=args.agc_mem_ratio,
                decay=args.agc_decay,
                num_bins=args.agc_num_bins,
            )
        )
    if ensemble is not None:
        filters.append(ensemble)
    if args.prune_heads_ratio is not None:
        filters.append(_head_pruning(args, train_dataset, encode, ema))
    callbacks = CallbackList([sampler, *filters, *callbacks])
    accelerator.register_for_checkpointing(callbacks)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    noise_generator = NoiseGenerator(args.seed, accelerator.process_index)
    checkpoints = CheckpointManager(args.output_dir, args.checkpoints_total_limit)
    checkpoints.remove_unfinished(accelerator)

    global_step = 0
    if args.resume_from_checkpoint is not None:
        checkpoint = checkpoints.resolve(args.resume_from_checkpoint)
        if checkpoint is None:
            logger.info("No checkpoint to resume from; starting a new run.")
        else:
            global_step = checkpoints.load(accelerator, checkpoint, noise_generator)
            logger.info(f"Resumed from {checkpoint} at step {global_step}.")
    global_step_at_start = global_step
    first_epoch = global_step // updates_per_epoch
    batches_to_skip = (global_step % updates_per_epoch) * args.gradient_accumulation_steps

    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers(project_name, config={k: str(v) for k, v in vars(args).items()})
    state = TrainingState(
        noise_scheduler=noise_scheduler,
        model=model,
        accelerator=accelerator,
        global_step=global_step,
        optimizer=optimizer,
        updates_per_epoch=updates_per_epoch,
    )
    logger.info(
        f"{len(train_dataset)} images, {num_epochs} epochs, {args.max_train_steps} updates of "
        f"{args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps} images"
    )
    progress = tqdm(
        range(args.max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    prediction_type = getattr(noise_scheduler.config, "prediction_type", "epsilon")
    images_per_update = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    # throughput is timed after the first updates, which pay for allocations and lazy initialisation
    warmup_updates, timed_from, timed_start = min(5, args.max_train_steps // 2), None, None
    for epoch in range(first_epoch, num_epochs):
        if global_step >= args.max_train_steps:
            break
        state.epoch = epoch
        model.train()
        # accelerate does not always pass the epoch on to the dataset, whose crops and flips depend on it
        train_dataloader.set_epoch(epoch)
        train_dataset.set_epoch(epoch)
        batches = train_dataloader
        if epoch == first_epoch and batches_to_skip:
            batches = accelerator.skip_first_batches(train_dataloader, batches_to_skip)
        for batch in batches:
            with accelerator.accumulate(model):
                batch = callbacks.on_batch(batch, state)
                clean, forward_kwargs = encode(batch, noise_generator.generator)
                forward_kwargs = callbacks.on_conditioning(forward_kwargs, state)
                timesteps, _ = callbacks.sample_timesteps(len(clean), state)
                model_input, target = noisy_input_and_target(
                    noise_scheduler, clean, timesteps, noise_generator.generator
                )
                model_output = model(model_input, timesteps, **forward_kwargs).sample
                state.set_forward(model_input, forward_kwargs, model_output)
                per_sample_loss = per_sample_mse(model_output, target)
                if args.snr_gamma is not None:
                    snr = signal_to_noise(noise_scheduler, timesteps)
                    per_sample_loss = per_sample_loss * min_snr_loss_weights(snr, args.snr_gamma, prediction_type)
                loss = callbacks.on_loss(per_sample_loss, state)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable_parameters, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(trainable_parameters)
            global_step += 1
            state.global_step = global_step
            callbacks.on_step_end(state)
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0], **state.logs}
            if ema is not None:
                logs["ema_decay"] = ema.cur_decay_value
            state.logs.clear()
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=global_step)
            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                checkpoints.save(accelerator, global_step, noise_generator)
            if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                pipeline = build_pipeline(sampling_model(accelerator, model, ema))
                with accelerator.autocast():  # frozen components may be in the mixed-precision dtype
                    path = save_validation_grid(accelerator, pipeline, args, global_step, **(validation_kwargs or {}))
                logger.info(f"validation grid: {path}")
            if global_step == global_step_at_start + warmup_updates:
                timed_from, timed_start = global_step, time.perf_counter()
            if global_step >= args.max_train_steps:
                break
    progress.close()
    if timed_start is not None and global_step > timed_from:
        rate = (global_step - timed_from) * images_per_update / (time.perf_counter() - timed_start)
        logger.info(f"throughput: {rate:.2f} images/s over updates {timed_from + 1}-{global_step}")
        accelerator.log({"train_images_per_second": rate}, step=global_step)
    accelerator.wait_for_everyone()
    check_replicas_agree(accelerator, model, callbacks)
    return model


def _head_pruning(args: argparse.Namespace, train_dataset, encode: Callable, ema: EMAModel | None):
    """The ``--prune_heads_ratio`` callback, measuring importance on the first ``--prune_importance_images`` images."""
    count = min(args.prune_importance_images, len(train_dataset))
    if count < 1:
        raise ValueError(f"--prune_importance_images must be positive, got {args.prune_importance_images}.")
    # a generator of its own: encoding these images must not move the training noise stream (exact resume)
    clean, forward_kwargs = encode(
        collate_examples([train_dataset[i] for i in range(count)]), torch.Generator().manual_seed(args.seed)
    )
    return HeadPruningCallback(
        ratio=args.prune_heads_ratio,
        importance_data=clean.detach(),
        forward_kwargs={k: v.detach() if torch.is_tensor(v) else v for k, v in forward_kwargs.items()},
        prune_at_step=args.prune_at_step,
        criterion=args.prune_criterion,
        seed=args.seed,
        ema=ema,
    )


def finish_training(
    args: argparse.Namespace, accelerator, make_final_pipeline: Callable[[], object], base_model: str | None = None
) -> None:
    """Save the final pipeline to ``--output_dir`` (and publish it with ``--push_to_hub``), then end the run.

    The pipeline is built and saved on the main process only; every process waits for it before
    ``end_training`` tears the process group down (a process that left early would strand the others).

    Args:
        args (`argparse.Namespace`): the flags of :func:`~diffusers_hold.training_utils.add_training_arguments`.
        accelerator (`accelerate.Accelerator`): the run's accelerator.
        make_final_pipeline (`Callable`): builds the pipeline to save (called on the main process).
        base_model (`str`, *optional*): what the model was fine-tuned from, for the Hub model card.
    """
    if accelerator.is_main_process:
        pipeline = make_final_pipeline()
        pipeline.save_pretrained(args.output_dir)
        if args.push_to_hub:
            folder = hub.save_for_hub(
                pipeline,
                Path(args.output_dir) / "hub",
                base_model=base_model,
                repo_id=args.hub_model_id,
                overwrite=True,
            )
            hub.push_to_hub(folder, args.hub_model_id, token=args.hub_token)
    accelerator.wait_for_everyone()
    accelerator.end_training()
