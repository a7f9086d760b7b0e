"""Effective model memorization (Gu, Du, Pang, Li, Lin and Wang, *On Memorization in Diffusion Models*, 2023) of the
benchmark's recipes, against data size, model width and per-image labels.

    python benchmarks/bench_emm.py [--sizes 8 16 32 64] [--epochs 2000] [--recipes ...] [--output FILE]

**Claims.** Memorization is driven by the training-set size: at a fixed budget in epochs the memorized fraction falls
as the set grows, and the largest size still memorized >= 90 % (EMM) characterises a recipe; EMM grows with the
model's capacity (width) and with conditioning on unique per-image labels.

**Measurement.** :func:`~diffusers_hold.metrics.effective_model_memorization` over a grid of nested digit subsets
(the first ``n`` of one seeded permutation), each trained from scratch for ``--epochs`` epochs of batch 64
(``epochs * n / 64`` updates) with the recipe of :mod:`diffusers_hold.bench`, sampled (128 generations) and scored by
the 1/3 rule. Recipes: the DDPM UNet at widths (16, 32) and (32, 64), and the text-conditional UNet at (16, 32)
trained on a unique caption per image (``bench_caption``; the labels-as-ids set-up), sampled with those captions
and guidance 1.25. Results go to ``benchmarks/results/emm.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from harness import ForeignLoad, environment, finish

from diffusers_hold.bench import BENCH_METHODS, BenchConfig, load_bench_data, train_and_evaluate
from diffusers_hold.metrics import effective_model_memorization

RESULTS = Path(__file__).resolve().parent / "results" / "emm.json"
RECIPES = {
    "ddpm_width_16_32": ("ddpm", (16, 32)),
    "ddpm_width_32_64": ("ddpm", (32, 64)),
    "t2i_unique_captions_16_32": ("t2i", (16, 32)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--epochs", type=int, default=2000)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=sorted(RECIPES))
    parser.add_argument("--num_samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS, help="The result file.")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the models are tiny: one thread is faster than two here
    start, load = time.perf_counter(), ForeignLoad()
    # the pool: the benchmark's training split at the largest size (its held-out split scores quality)
    base = BenchConfig(methods=["ddpm"], train_size=max(args.sizes), num_samples=args.num_samples, seed=args.seed)
    pool, held_out = load_bench_data(base)
    rows = {}
    for name in args.recipes:
        method_name, widths = RECIPES[name]
        method = BENCH_METHODS[method_name]

        def train_and_sample(indices: torch.Tensor, epochs: int, method=method, widths=widths) -> torch.Tensor:
            steps = max(1, round(epochs * len(indices) / base.batch_size))
            config = replace(base, train_size=len(indices), train_steps=steps, num_evaluations=1,
                             block_out_channels=widths)  # fmt: skip
            with tempfile.TemporaryDirectory() as state_dir:
                _, generated = train_and_evaluate(method, pool[indices], held_out, config, Path(state_dir))
            return generated

        result = effective_model_memorization(
            train_and_sample, pool, args.epochs, sizes=args.sizes, seed=args.seed, progress=True
        )
        rows[name] = result.to_dict()
        print(f"{name}: EMM {result.emm}, curve {[(p.size, round(p.fraction_memorized, 3)) for p in result.curve]}")
    env = environment(("torch", "diffusers"))
    env["foreign_cpu_share"] = load.share(env["cpu_count"])
    settings = {**vars(args), "output": str(args.output)}
    results = {"settings": settings, "recipes": rows, "environment": env, "wall_time_s": time.perf_counter() - start}
    finish(results, args.output, print_report)


def print_report(results: dict) -> None:
    sizes = results["settings"]["sizes"]
    print(f"\nmemorized fraction (1/3 rule) at {results['settings']['epochs']} epochs")
    print(f"{'recipe':<28}" + "".join(f"{'n=' + str(n):>9}" for n in sizes) + f"{'EMM':>7}")
    for name, row in results["recipes"].items():
        by_size = {point["size"]: point["fraction_memorized"] for point in row["curve"]}
        cells = "".join(f"{by_size[n]:>9.1%}" for n in sizes)
        print(f"{name:<28}{cells}{str(row['emm']):>7}")


if __name__ == "__main__":
    main()
