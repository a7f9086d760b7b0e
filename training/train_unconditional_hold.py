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
from pathlib import Path

from accelerate.logging import get_logger
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel

from diffusers_hold import HOLDPipeline, HOLDScheduler, HOLDUNet2DModel
from diffusers_hold.image_data import check_resolution
from diffusers_hold.schedulers.scheduling_hold import PROCESS_KEYS
from diffusers_hold.training_config import TrainingConfig, add_training_arguments
from diffusers_hold.training_loop import finish_training, load_training_data, make_accelerator, sampling_model, train

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
        hold_settings = {k: settings[k] for k in PROCESS_KEYS if k != "order"}
        return HOLDUNet2DModel(**config, hold_order=settings["order"], hold_settings=hold_settings)
    return UNet2DModel(**config)


def build_pipeline(unet, noise_scheduler):
    if isinstance(noise_scheduler, HOLDScheduler):
        return HOLDPipeline(unet=unet, scheduler=noise_scheduler)
    return DDPMPipeline(unet=unet, scheduler=noise_scheduler)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    config = TrainingConfig.from_args(args)
    output_dir = Path(config.output_dir)
    accelerator = make_accelerator(config)

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

    train_dataset, train_dataloader = load_training_data(config, accelerator, num_channels=args.num_channels)
    unet = train(
        config,
        accelerator,
        model=unet,
        noise_scheduler=noise_scheduler,
        train_dataset=train_dataset,
        train_dataloader=train_dataloader,
        encode=lambda batch, generator: (batch["pixel_values"].to(accelerator.device), {}),
        build_pipeline=lambda model: build_pipeline(model, noise_scheduler),
        ema=ema,
        validation_kwargs={"batch_size": args.num_validation_images},
        project_name="train_unconditional_hold",
        hyperparameters=vars(args),
    ).model
    finish_training(
        config, accelerator, lambda: build_pipeline(sampling_model(accelerator, unet, ema), noise_scheduler)
    )
    return output_dir


if __name__ == "__main__":
    main()
