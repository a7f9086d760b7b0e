"""Train a small HOLD diffusion model on scikit-learn's bundled digits and write a grid of samples.

    python examples/train_unconditional_digits.py --output_dir outputs/digits

A ``HOLDUNet2DModel`` reads the whole HOLD state (``order`` blocks of one channel) and learns the last block's noise
with the objective of ``HOLDScheduler.add_noise`` / ``get_target``; ``HOLDPipeline`` then samples it. The trained
pipeline is saved with ``save_pretrained`` (reload it with ``DiffusionPipeline.from_pretrained`` after
``import diffusers_hold``), next to ``samples.png``. Defaults take a few minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffusers_hold import HOLDPipeline, HOLDScheduler, HOLDUNet2DModel
from diffusers_hold.data import load_digits_images
from diffusers_hold.utils import image_grid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/digits"))
    parser.add_argument("--hold_order", type=int, default=3, help="HOLD order (1 = VP diffusion baseline).")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--max_train_steps", type=int, default=1200)
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--num_inference_steps", type=int, default=250)
    parser.add_argument("--solver", choices=["euler_maruyama", "sscs", "ddim"], default="sscs")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_unet(hold_order: int, resolution: int) -> HOLDUNet2DModel:
    """A small UNet (about 1.1M parameters) whose input is the full HOLD state of one-channel images."""
    return HOLDUNet2DModel(
        sample_size=resolution,
        in_channels=1,
        out_channels=1,
        hold_order=hold_order,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images, _ = load_digits_images(args.resolution)
    scheduler = HOLDScheduler(order=args.hold_order, solver=args.solver, timestep_spacing="quadratic")
    unet = build_unet(args.hold_order, args.resolution)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / args.max_train_steps, 1.0)))
    )

    unet.train()
    start = time.perf_counter()
    progress = tqdm(range(args.max_train_steps), desc="training")
    for _ in progress:
        batch = images[torch.randint(len(images), (args.train_batch_size,), generator=generator)]
        timesteps = scheduler.sample_timesteps(len(batch), generator=generator)
        noise = torch.randn(len(batch), args.hold_order, *batch.shape[2:], generator=generator)
        noisy = scheduler.add_noise(batch, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps).sample, scheduler.get_target(noise))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr_schedule.get_last_lr()[0]:.2e}")
    train_seconds = time.perf_counter() - start

    unet.eval()
    pipeline = HOLDPipeline(unet=unet, scheduler=scheduler)
    samples = pipeline(
        batch_size=args.num_samples,
        generator=torch.Generator().manual_seed(args.seed),
        num_inference_steps=args.num_inference_steps,
    ).images
    args.output_dir.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(args.output_dir / "pipeline")
    grid_path = args.output_dir / "samples.png"
    image_grid(samples, padding=2, scale=4).save(grid_path)
    print(f"trained {args.max_train_steps} steps in {train_seconds:.0f}s; samples written to {grid_path}")
    return grid_path


if __name__ == "__main__":
    main()
