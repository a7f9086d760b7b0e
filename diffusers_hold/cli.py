"""The ``diffusers-hold`` command.

    diffusers-hold audit --pipeline outputs/t2i-hold --train_data_dir data/train --held_out_dir data/held_out \\
        --num_samples 256 --output_dir outputs/audit

    diffusers-hold bench --output_dir outputs/bench [--quick]

``bench`` runs the memorization benchmark of :mod:`diffusers_hold.bench` (the DDPM baseline, HOLD orders and
mitigations trained side by side on bundled data). ``audit`` loads a saved pipeline (HOLD or stock; ``import
diffusers_hold`` is done here), loads the training and held-out images at the size and channels the pipeline
generates, generates (prompts: ``--prompt``, else the training captions in turn) and writes the report files of
:func:`diffusers_hold.audit.audit_pipeline`.
"""

from __future__ import annotations

import argparse
import inspect
import sys

import torch

from .bench import build_parser as build_bench_parser
from .bench import run_from_args

__all__ = ["main"]


def _audit(args: argparse.Namespace) -> None:
    from diffusers import DiffusionPipeline

    from .audit import audit_pipeline, generate_images, load_image_folder

    pipeline = DiffusionPipeline.from_pretrained(args.pipeline)
    pipeline.to("cuda" if torch.cuda.is_available() else "cpu")
    # the data must be compared at the generations' size and channels: read them off one generation
    text = args.caption_column if args.prompt is None else None
    probe_prompts = args.prompt or ["a photograph"]
    probe, _ = generate_images(pipeline, 1, prompts=probe_prompts, num_inference_steps=2, seed=args.seed)
    channels, resolution = probe.shape[1], probe.shape[-1]
    train, captions = load_image_folder(
        train_data_dir=args.train_data_dir,
        dataset_name=args.dataset_name,
        resolution=resolution,
        num_channels=channels,
        image_column=args.image_column,
        caption_column=text if "prompt" in _call_parameters(pipeline) else None,
    )
    held_out, _ = load_image_folder(
        train_data_dir=args.held_out_dir,
        dataset_name=args.held_out_dataset_name,
        resolution=resolution,
        num_channels=channels,
        image_column=args.image_column,
    )
    report = audit_pipeline(
        pipeline,
        train,
        held_out,
        args.output_dir,
        num_samples=args.num_samples,
        prompts=args.prompt or captions,
        batch_size=args.batch_size,
        num_inference_steps=args.num_inference_steps,
        seed=args.seed,
    )
    print(report.to_markdown())
    print(f"\nreport: {report.files['markdown']}")


def _call_parameters(pipeline) -> set[str]:
    return set(inspect.signature(pipeline.__call__).parameters)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``diffusers-hold``."""
    parser = argparse.ArgumentParser(prog="diffusers-hold", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    audit = commands.add_parser("audit", help="Measure memorization of a saved pipeline against its training data.")
    audit.add_argument("--pipeline", required=True, help="A saved pipeline folder.")
    audit.add_argument("--train_data_dir", default=None, help="Training images (an imagefolder).")
    audit.add_argument("--dataset_name", default=None, help="Training images (a save_to_disk or data folder).")
    audit.add_argument("--held_out_dir", default=None, help="Held-out real images (an imagefolder).")
    audit.add_argument("--held_out_dataset_name", default=None, help="Held-out real images (a saved data set).")
    audit.add_argument("--image_column", default="image")
    audit.add_argument("--caption_column", default="text", help="Training captions used as prompts by default.")
    audit.add_argument("--prompt", nargs="+", default=None, help="Prompts to use instead of the captions.")
    audit.add_argument("--num_samples", type=int, default=64)
    audit.add_argument("--batch_size", type=int, default=8)
    audit.add_argument("--num_inference_steps", type=int, default=50)
    audit.add_argument("--seed", type=int, default=0)
    audit.add_argument("--output_dir", required=True)
    audit.set_defaults(run=_audit)
    bench = commands.add_parser("bench", help="Train and measure the baseline, HOLD orders and mitigations.")
    build_bench_parser(bench)
    bench.set_defaults(run=_bench)
    return parser


def _bench(args: argparse.Namespace) -> None:
    run_from_args(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``diffusers-hold`` command."""
    import diffusers_hold  # noqa: F401  (registers the HOLD classes before any pipeline is loaded)

    args = build_parser().parse_args(argv)
    if args.command == "audit":
        sources = {
            "training": ("train_data_dir", "dataset_name"),
            "held-out": ("held_out_dir", "held_out_dataset_name"),
        }
        for name, (a, b) in sources.items():
            if (getattr(args, a) is None) == (getattr(args, b) is None):
                raise SystemExit(f"diffusers-hold audit: pass exactly one of --{a} and --{b} for the {name} images.")
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
