"""The memorization benchmark from the command line: ``diffusers-hold bench`` and ``python -m diffusers_hold.bench``.

The flags (:func:`build_parser`) become a :class:`~diffusers_hold.bench.BenchConfig` (:func:`config_from_args`) and a
run of :func:`~diffusers_hold.bench.run_bench`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from .methods import BENCH_METHODS, DEFAULT_METHODS, BenchConfig
from .run import run_bench

__all__ = ["build_parser", "config_from_args", "main", "run_from_args"]


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The flags of ``diffusers-hold bench``."""
    parser = parser or argparse.ArgumentParser(prog="diffusers-hold bench", description=__doc__.split("\n\n")[0])
    defaults = BenchConfig()
    parser.add_argument("--output_dir", default="outputs/bench")
    parser.add_argument(
        "--data",
        default=defaults.data,
        help='"digits", "lfw", "photos" (RGB patches) or an image folder (read as RGB).',
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        choices=sorted(BENCH_METHODS),
        metavar="METHOD",
        help=f"Methods to train side by side (default: {' '.join(DEFAULT_METHODS)}); any of: "
        + ", ".join(sorted(BENCH_METHODS)),
    )
    parser.add_argument("--hold_orders", nargs="+", type=int, default=None, help="HOLD orders to add (2..4).")
    parser.add_argument("--resolution", type=int, default=defaults.resolution)
    parser.add_argument("--train_size", type=int, default=defaults.train_size)
    parser.add_argument("--held_out_size", type=int, default=defaults.held_out_size)
    parser.add_argument("--train_steps", type=int, default=defaults.train_steps)
    parser.add_argument("--num_samples", type=int, default=defaults.num_samples)
    parser.add_argument("--num_evaluations", type=int, default=defaults.num_evaluations)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--guidance_scale", type=float, default=defaults.guidance_scale, help="For the t2i methods.")
    parser.add_argument(
        "--num_threads",
        type=int,
        default=1,
        help="torch threads; the models are tiny, and one thread trains them faster than two on a 2-core CPU.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="A short run: 16 images, 500 updates, 128 samples, one evaluation."
    )
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` of parsed ``bench`` flags (``--quick`` shortens training and sampling)."""
    methods = list(args.methods)
    for order in args.hold_orders or []:
        if f"hold{order}" not in BENCH_METHODS:
            raise ValueError(
                f"--hold_orders supports {sorted(m.hold_order for m in BENCH_METHODS.values() if m.hold_order)}."
            )
        if f"hold{order}" not in methods:
            methods.append(f"hold{order}")
    settings = {
        "data": args.data,
        "methods": methods,
        "resolution": args.resolution,
        "train_size": args.train_size,
        "held_out_size": args.held_out_size,
        "train_steps": args.train_steps,
        "num_samples": args.num_samples,
        "num_evaluations": args.num_evaluations,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
    }
    if args.quick:
        # 16 images memorize within a few hundred updates; one evaluation, fewer samples and HOLD steps
        settings.update(train_size=min(args.train_size, 16), train_steps=min(args.train_steps, 500))
        settings.update(num_samples=min(args.num_samples, 128), num_evaluations=1, hold_steps=100)
    return BenchConfig(**settings)


def run_from_args(args: argparse.Namespace) -> list[dict]:
    """Run the benchmark that parsed ``bench`` flags describe (``diffusers-hold bench`` and ``python -m``)."""
    torch.set_num_threads(args.num_threads)
    return run_bench(config_from_args(args), args.output_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m diffusers_hold.bench``."""
    run_from_args(build_parser().parse_args(argv))
    return 0
