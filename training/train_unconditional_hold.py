"""Train an unconditional HOLD diffusion model (or its DDPM baseline) with accelerate.

    accelerate launch training/train_unconditional_hold.py --train_data_dir data/digits --resolution 16 \\
        --num_channels 1 --output_dir outputs/uncond-hold --hold_order 3

Arguments follow diffusers' ``examples/unconditional_image_generation`` where the meaning is the same. The model is
a :class:`~diffusers_hold.HOLDUNet2DModel` that reads the whole HOLD state and is trained on the last block's noise
(``--scheduler hold``), or a stock ``UNet2DModel`` trained with ``DDPMScheduler`` (``--scheduler ddpm``): one script,
one data pipeline and one loop for HOLD and its baseline. The final pipeline (a ``HOLDPipeline`` or a
``DDPMPipeline``, EMA weights when ``--use_ema``) is saved to ``--output_dir`` and loads with
``DiffusionPipeline.from_pretrained`` after ``import diffusers_hold``.

Checkpoints (``--checkpointing_steps``) are written atomically and resume exactly (``--resume_from_checkpoint
latest``): the data order, the crops and flips, the noise and the timesteps of a resumed run are those of an
uninterrupted one. Training-time mitigations plug in through ``diffusers_hold.mitigations`` callbacks; the timestep
sampler (``--timestep_sampling``) is the first of them.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from diffusers_hold import HOLDPipeline, HOLDScheduler, HOLDUNet2DModel, hub
from diffusers_hold.image_data import check_resolution, collate_examples, load_image_dataset, prepare_training_dataset
from diffusers_hold.mitigations import CallbackList, TimestepSamplingCallback, TrainingState, per_sample_mse
from diffusers_hold.training_utils import (
    CheckpointManager,
    NoiseGenerator,
    add_training_arguments,
    build_timestep_sampler,
    check_replicas_agree,
    check_tracker_available,
    min_snr_loss_weights,
    noisy_input_and_target,
    save_validation_grid,
    signal_to_noise,
)

logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_training_arguments(parser)
    model = parser.add_argument_group("model")
    model.add_argument("--num_channels", type=int, choices=(1, 3), default=3, help="1: grayscale, 3: RGB.")
    model.add_argument(
        "--model_config_name_or_path",
        default=None,
        help="A UNet config (folder with config.json, or the file) to build the model from; else a small default.",
    )
    model.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64, 64])
    model.add_argument("--layers_per_block", type=int, default=1)
    args = parser.parse_args(argv)
    if args.dataset_name is None and args.train_data_dir is None:
        parser.error("Pass --train_data_dir or --dataset_name.")
    return args


def build_unet(args: argparse.Namespace, noise_scheduler) -> UNet2DModel:
    """The model: a HOLD UNet reading ``hold_order * num_channels`` channels, or a stock UNet for DDPM."""
    if args.model_config_name_or_path is not None:
        config = UNet2DModel.load_config(args.model_config_name_or_path)
        config = {k: v for k, v in config.items() if not k.startswith(("_", "hold_"))}
    else:
        depth = len(args.block_out_channels)
        config = {
            "sample_size": args.resolution,
            "block_out_channels": tuple(args.block_out_channels),
            "layers_per_block": args.layers_per_block,
            "down_block_types": ("DownBlock2D",) * (depth - 1) + ("AttnDownBlock2D",),
            "up_block_types": ("AttnUpBlock2D",) + ("UpBlock2D",) * (depth - 1),
            "norm_num_groups": min(8, args.block_out_channels[0]),
        }
    config.update(in_channels=args.num_channels, out_channels=args.num_channels)
    if isinstance(noise_scheduler, HOLDScheduler):
        settings = noise_scheduler.process_settings()
        order = settings.pop("order")
        hold_settings = {k: settings[k] for k in ("num_train_timesteps", "T", "L_inv", "aux_init_var", "eps_num")}
        return HOLDUNet2DModel(**config, hold_order=order, hold_settings=hold_settings)
    return UNet2DModel(**config)


def sampling_model(accelerator, unet, ema: EMAModel | None):
    """The trained UNet unwrapped from accelerate, with the EMA weights in a copy when EMA is on."""
    model = accelerator.unwrap_model(unet)
    if ema is None:
        return model
    model = copy.deepcopy(model)
    ema.copy_to(model.parameters())
    return model


def build_pipeline(unet, noise_scheduler):
    if isinstance(noise_scheduler, HOLDScheduler):
        return HOLDPipeline(unet=unet, scheduler=noise_scheduler)
    return DDPMPipeline(unet=unet, scheduler=noise_scheduler)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
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
    set_seed(args.seed)

    if args.scheduler == "hold":
        noise_scheduler = HOLDScheduler(order=args.hold_order, solver=args.hold_solver, timestep_spacing="quadratic")
    else:
        noise_scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon")
    unet = build_unet(args, noise_scheduler)
    check_resolution(args.resolution, unet=unet)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    ema = None
    if args.use_ema:
        ema = EMAModel(unet.parameters(), decay=args.ema_max_decay, model_cls=type(unet), model_config=unet.config)

    dataset = load_image_dataset(
        train_data_dir=args.train_data_dir,
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        cache_dir=args.cache_dir,
    )
    with accelerator.main_process_first():
        train_dataset, data_info = prepare_training_dataset(
            dataset,
            image_column=args.image_column,
            resolution=args.resolution,
            center_crop=args.center_crop,
            random_flip=args.random_flip,
            num_channels=args.num_channels,
            seed=args.seed,
            skip_bad_images=args.skip_bad_images,
        )
    if data_info["skipped"]:
        logger.warning(f"Skipped {data_info['skipped']} unreadable images.")
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

    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    updates_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        unet, optimizer, train_dataloader, lr_scheduler
    )

    callbacks = CallbackList([TimestepSamplingCallback(build_timestep_sampler(args, noise_scheduler), seed=args.seed)])
    accelerator.register_for_checkpointing(callbacks)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    noise_generator = NoiseGenerator(args.seed, accelerator.process_index)
    checkpoints = CheckpointManager(output_dir, args.checkpoints_total_limit)
    checkpoints.remove_unfinished(accelerator)

    global_step = 0
    if args.resume_from_checkpoint is not None:
        checkpoint = checkpoints.resolve(args.resume_from_checkpoint)
        if checkpoint is None:
            logger.info("No checkpoint to resume from; starting a new run.")
        else:
            global_step = checkpoints.load(accelerator, checkpoint, noise_generator)
            logger.info(f"Resumed from {checkpoint} at step {global_step}.")
    first_epoch = global_step // updates_per_epoch
    batches_to_skip = (global_step % updates_per_epoch) * args.gradient_accumulation_steps

    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("train_unconditional_hold", config={k: str(v) for k, v in vars(args).items()})
    state = TrainingState(
        noise_scheduler=noise_scheduler, model=unet, accelerator=accelerator, global_step=global_step
    )
    logger.info(
        f"{len(train_dataset)} images, {num_epochs} epochs, {args.max_train_steps} updates of "
        f"{args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps} images"
    )
    progress = tqdm(
        range(args.max_train_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    for epoch in range(first_epoch, num_epochs):
        state.epoch = epoch
        unet.train()
        # accelerate does not always pass the epoch on to the dataset, whose crops and flips depend on it
        train_dataloader.set_epoch(epoch)
        train_dataset.set_epoch(epoch)
        batches = train_dataloader
        if epoch == first_epoch and batches_to_skip:
            batches = accelerator.skip_first_batches(train_dataloader, batches_to_skip)
        for batch in batches:
            with accelerator.accumulate(unet):
                batch = callbacks.on_batch(batch, state)
                clean = batch["pixel_values"].to(accelerator.device)
                timesteps, _ = callbacks.sample_timesteps(len(clean), state)
                model_input, target = noisy_input_and_target(
                    noise_scheduler, clean, timesteps, noise_generator.generator
                )
                per_sample_loss = per_sample_mse(unet(model_input, timesteps).sample, target)
                if args.snr_gamma is not None:
                    snr = signal_to_noise(noise_scheduler, timesteps)
                    per_sample_loss = per_sample_loss * min_snr_loss_weights(snr, args.snr_gamma)
                loss = callbacks.on_loss(per_sample_loss, state)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(unet.parameters())
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
                pipeline = build_pipeline(sampling_model(accelerator, unet, ema), noise_scheduler)
                save_validation_grid(accelerator, pipeline, args, global_step, batch_size=args.num_validation_images)
            if global_step >= args.max_train_steps:
                break

    accelerator.wait_for_everyone()
    check_replicas_agree(accelerator, unet)
    if accelerator.is_main_process:
        pipeline = build_pipeline(sampling_model(accelerator, unet, ema), noise_scheduler)
        pipeline.save_pretrained(output_dir)
        if args.push_to_hub:
            hub_folder = hub.save_for_hub(pipeline, output_dir / "hub", repo_id=args.hub_model_id, overwrite=True)
            hub.push_to_hub(hub_folder, args.hub_model_id, token=args.hub_token)
    accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    main()
