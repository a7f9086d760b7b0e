"""Sample a pretrained Stable Diffusion checkpoint with HOLD dynamics, three ways, through the stock pipeline.

    python examples/text_to_image_hold.py --pretrained_model_name_or_path path/to/sd-folder --prompt "a red barn"

1. ``stock``: the checkpoint's own scheduler, for reference.
2. ``zero_shot``: the stock UNet, with ``HOLDScheduler(prediction_type="vp_epsilon")`` turning its noise prediction
   into the exact HOLD score through the sufficient statistic of the state. No training, no new weights.
3. ``converted``: ``HOLDUNet2DConditionModel.from_unet`` (reads the whole HOLD state, auxiliary inputs at zero
   weight) with a native ``HOLDScheduler``; before fine-tuning it generates what ``zero_shot`` generates (with
   ``--solver exp_multistep`` the two use different grids, so they differ by the grid's error), and it is the
   starting point of a HOLD fine-tune. Its pipeline is saved to ``<output_dir>/hold_pipeline``.

All three run the unmodified ``StableDiffusionPipeline.__call__`` (guidance, ``num_images_per_prompt``, generator).
Each writes a grid ``<output_dir>/<name>.png``; ``comparison.png`` stacks them, one row each. Without a checkpoint at
hand, write a tiny random one (noise-like images, seconds on a CPU) with ``python -m diffusers_hold.testing tiny-sd``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from diffusers_hold import HOLDScheduler, HOLDUNet2DConditionModel
from diffusers_hold.utils import image_grid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pretrained_model_name_or_path", required=True, help="Folder of a Stable Diffusion pipeline."
    )
    parser.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/text_to_image_hold"))
    parser.add_argument("--hold_order", type=int, default=3, help="HOLD order (blocks of the state).")
    parser.add_argument(
        "--solver", choices=["euler_maruyama", "sscs", "ddim", "exp_multistep"], default="sscs",
        help='"exp_multistep" (try 10-25 steps): the few-step solver with the settings the README recommends, '
        "for zero_shot on the VP model's own timesteps (vp_linspace), for converted on the log1p grid.",
    )  # fmt: skip
    parser.add_argument("--num_inference_steps", type=int, default=100)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--num_images_per_prompt", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    args = parse_args(argv)
    pipe = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe.to(device)
    stock_scheduler, stock_unet = pipe.scheduler, pipe.unet
    hold = {"solver": args.solver, "timestep_spacing": "quadratic"}
    zero_shot_settings = hold
    if args.solver == "exp_multistep":
        hold = {**hold, "algorithm_type": "sde-dpmsolver++", "timestep_spacing": "log1p", "denoise_final": False}
        zero_shot_settings = {**hold, "timestep_spacing": "vp_linspace", "lower_order_final": True}

    def zero_shot(pipe: StableDiffusionPipeline) -> None:
        pipe.scheduler = HOLDScheduler.from_config(
            stock_scheduler.config, order=args.hold_order, prediction_type="vp_epsilon", **zero_shot_settings
        )

    def converted(pipe: StableDiffusionPipeline) -> None:
        pipe.unet = HOLDUNet2DConditionModel.from_unet(
            stock_unet, order=args.hold_order, scheduler_config=stock_scheduler.config
        )
        pipe.scheduler = HOLDScheduler.from_config(stock_scheduler.config, **pipe.unet.hold_process_settings(), **hold)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    written, rows = {}, []
    for name, configure in (("stock", None), ("zero_shot", zero_shot), ("converted", converted)):
        if configure is not None:
            configure(pipe)
        start = time.perf_counter()
        images = pipe(
            args.prompt,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            num_images_per_prompt=args.num_images_per_prompt,
            generator=torch.Generator(device).manual_seed(args.seed),
        ).images
        written[name] = args.output_dir / f"{name}.png"
        image_grid(images, cols=len(images)).save(written[name])
        rows.extend(images)
        print(f"{name}: {len(images)} images in {time.perf_counter() - start:.1f}s -> {written[name]}")
    written["comparison"] = args.output_dir / "comparison.png"
    image_grid(rows, cols=args.num_images_per_prompt).save(written["comparison"])
    pipe.save_pretrained(args.output_dir / "hold_pipeline")
    written["hold_pipeline"] = args.output_dir / "hold_pipeline"
    print(f"comparison (rows: stock, zero-shot, converted) -> {written['comparison']}")
    return written


if __name__ == "__main__":
    main()
