"""The memorization benchmark: train the DDPM baseline, HOLD orders and mitigations side by side, then measure them.

    diffusers-hold bench --output_dir outputs/bench            # or: python -m diffusers_hold.bench
    diffusers-hold bench --quick --output_dir outputs/bench-quick

On bundled real data (scikit-learn's digits by default, scikit-image's LFW faces, or an image folder) at a
training-set size where the unmitigated DDPM memorizes, every method trains a model of the same architecture for the
same number of updates. Each is then sampled and measured against its training images (nearest-neighbour ratio,
the "1/3 rule", with a bootstrap interval and the held-out control) and against held-out images (Fréchet distance and
k-NN precision/recall in a PCA feature space, with the train-vs-held-out floor). Evaluations along training give the
curves of memorization and quality against training steps.

The output folder gets ``results.json``, ``results.md`` (the table), ``samples_vs_nearest.png`` (the most-copied
generations of each method above their nearest training images), ``memorization_vs_order.png`` and
``memorization_vs_steps.png``. A run is resumable: each method's state is saved atomically at every evaluation, and
finished methods are not run again (the configuration must match).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

from .metrics import nn_ratio_memorization, quality_report
from .mitigations import (
    AntiGradientControl,
    CallbackList,
    SNRIntervalTimestepSampler,
    TimestepSamplingCallback,
    TrainingCallback,
    TrainingState,
    UniformTimestepSampler,
    per_sample_mse,
)
from .models import HOLDUNet2DModel
from .pipelines import HOLDPipeline
from .schedulers import HOLDScheduler
from .training_utils import noisy_input_and_target

__all__ = ["BENCH_METHODS", "BenchConfig", "BenchMethod", "load_bench_data", "main", "run_bench"]


@dataclass(frozen=True)
class BenchMethod:
    """One training recipe of the benchmark.

    Attributes:
        name (`str`): the method's key (``--methods``).
        description (`str`): one line for the table.
        hold_order (`int`, *optional*): train a HOLD model of this order; `None` trains the DDPM baseline.
        callbacks (`Callable`): ``(noise_scheduler, seed) -> list[TrainingCallback]``, the mitigations.
    """

    name: str
    description: str
    hold_order: int | None = None
    callbacks: Callable[[Any, int], list[TrainingCallback]] = field(default=lambda scheduler, seed: [], repr=False)


def _later_steps_sampler(scheduler, seed: int) -> list[TrainingCallback]:
    # a Gaussian on u = t / T with mean 0.4 and sd 0.2 (MEMORIZATION.md's milder "later steps" setting)
    sampler = SNRIntervalTimestepSampler(scheduler, c_low=0.4 - 1.96 * 0.2, c_high=0.4 + 1.96 * 0.2, tails="clip")
    return [TimestepSamplingCallback(sampler, seed=seed)]


def _anti_gradient_control(scheduler, seed: int) -> list[TrainingCallback]:
    return [AntiGradientControl(scheduler.config.num_train_timesteps, mem_ratio=2.0)]


BENCH_METHODS: dict[str, BenchMethod] = {
    method.name: method
    for method in (
        BenchMethod("ddpm", "DDPM baseline (uniform timesteps)"),
        BenchMethod("hold2", "HOLD order 2", hold_order=2),
        BenchMethod("hold3", "HOLD order 3", hold_order=3),
        BenchMethod("hold4", "HOLD order 4", hold_order=4),
        BenchMethod(
            "snr_interval", "DDPM, timesteps ~ N(0.4, 0.2) on u (later steps)", callbacks=_later_steps_sampler
        ),
        BenchMethod("agc", "DDPM + anti-gradient control (mem_ratio 2)", callbacks=_anti_gradient_control),
    )
}
DEFAULT_METHODS = ("ddpm", "hold2", "hold3", "snr_interval", "agc")


@dataclass
class BenchConfig:
    """Settings of a benchmark run (every method gets the same).

    Attributes:
        data (`str`, defaults to `"digits"`): `"digits"`, `"lfw"` or a path to an image folder.
        resolution (`int`, defaults to 8): image side.
        train_size (`int`, defaults to 32): training images (where the DDPM baseline memorizes).
        held_out_size (`int`, defaults to 512): held-out real images for the control and the quality metrics.
        methods (`list[str]`): keys of :data:`BENCH_METHODS`.
        train_steps (`int`, defaults to 2000): optimizer updates per method.
        batch_size (`int`, defaults to 64), learning_rate (`float`, defaults to 2e-3): AdamW, cosine decay.
        block_out_channels (`tuple[int, ...]`, defaults to `(16, 32)`): the UNet's widths.
        num_evaluations (`int`, defaults to 4): evaluations along training (the last at the end).
        num_samples (`int`, defaults to 256): generations per evaluation.
        ddim_steps (`int`, defaults to 50): DDIM steps for DDPM-trained models.
        hold_steps (`int`, defaults to 200): Euler-Maruyama steps (quadratic grid) for HOLD models.
        bootstrap (`int`, defaults to 1000): bootstrap resamples of the memorized fraction.
        seed (`int`, defaults to 0): seed of the data split, the weights, the training draws and the samples.
    """

    data: str = "digits"
    resolution: int = 8
    train_size: int = 32
    held_out_size: int = 512
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    train_steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 2e-3
    block_out_channels: tuple[int, ...] = (16, 32)
    num_evaluations: int = 4
    num_samples: int = 256
    ddim_steps: int = 50
    hold_steps: int = 200
    bootstrap: int = 1000
    seed: int = 0

    def __post_init__(self):
        unknown = [name for name in self.methods if name not in BENCH_METHODS]
        if unknown or not self.methods:
            raise ValueError(f"Unknown methods {unknown or self.methods}; choose from {', '.join(BENCH_METHODS)}.")
        for name in ("resolution", "train_size", "held_out_size", "train_steps", "batch_size", "num_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.train_size < 2:
            raise ValueError("train_size must be at least 2 (the nearest-neighbour ratio needs two neighbours).")
        if not 1 <= self.num_evaluations <= self.train_steps:
            raise ValueError(f"num_evaluations must be in [1, train_steps], got {self.num_evaluations}.")
        self.block_out_channels = tuple(self.block_out_channels)

    def evaluation_steps(self) -> list[int]:
        """The training steps after which the methods are evaluated."""
        return sorted({round(self.train_steps * (i + 1) / self.num_evaluations) for i in range(self.num_evaluations)})


def load_bench_data(config: BenchConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The training and held-out images of a run, in ``[-1, 1]``, split by a seeded permutation.

    Raises when the data has fewer images than ``train_size + 2``.
    """
    if config.data == "digits":
        from .data import load_digits_images

        images, _ = load_digits_images(resolution=max(config.resolution, 8))
        if config.resolution < 8:
            raise ValueError("The digits are 8x8: resolution must be >= 8.")
    elif config.data == "lfw":
        images = _lfw_faces(config.resolution)
    else:
        from .audit import load_image_folder

        if not Path(config.data).is_dir():
            raise ValueError(f"--data must be 'digits', 'lfw' or an image folder; {config.data!r} is none of these.")
        images = load_image_folder(config.data, resolution=config.resolution) * 2 - 1
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(config.seed))
    if len(images) < config.train_size + 2:
        raise ValueError(f"The data has {len(images)} images; train_size {config.train_size} leaves no held-out set.")
    train = images[order[: config.train_size]]
    held_out = images[order[config.train_size : config.train_size + config.held_out_size]]
    return train.contiguous(), held_out.contiguous()


def _lfw_faces(resolution: int) -> torch.Tensor:
    """scikit-image's bundled LFW subset: the 100 face images (of 200; the rest are not faces), grayscale."""
    try:
        from skimage.data import lfw_subset
    except ImportError as error:
        raise ImportError("The LFW faces need scikit-image: pip install scikit-image.") from error
    from PIL import Image

    faces = lfw_subset()[:100].astype(np.float32)  # (100, 25, 25) in [0, 1]
    resized = np.stack(
        [np.asarray(Image.fromarray(face, mode="F").resize((resolution, resolution), Image.BICUBIC)) for face in faces]
    )
    return torch.from_numpy(np.clip(resized, 0, 1) * 2 - 1)[:, None]


def _build(method: BenchMethod, config: BenchConfig, channels: int):
    """The method's model and training scheduler, with weights from the run's seed."""
    architecture = {
        "sample_size": config.resolution,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": config.block_out_channels,
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D",) * (len(config.block_out_channels) - 1) + ("AttnDownBlock2D",),
        "up_block_types": ("AttnUpBlock2D",) + ("UpBlock2D",) * (len(config.block_out_channels) - 1),
        "norm_num_groups": 8,
    }
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        if method.hold_order is None:
            return UNet2DModel(**architecture), DDPMScheduler(num_train_timesteps=1000)
        scheduler = HOLDScheduler(order=method.hold_order, solver="euler_maruyama", timestep_spacing="quadratic")
        return HOLDUNet2DModel(**architecture, hold_order=method.hold_order), scheduler


@torch.no_grad()
def _sample(model, scheduler, config: BenchConfig) -> torch.Tensor:
    """``num_samples`` generations in ``[-1, 1]``, from a generator seeded by the run's seed."""
    model.eval()
    generator = torch.Generator().manual_seed(config.seed + 1)
    hold = isinstance(scheduler, HOLDScheduler)
    if hold:
        pipe = HOLDPipeline(unet=model, scheduler=scheduler)
    else:
        pipe = DDIMPipeline(unet=model, scheduler=DDIMScheduler.from_config(scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        batch_size=config.num_samples,
        generator=generator,
        num_inference_steps=config.hold_steps if hold else config.ddim_steps,
        output_type="pt" if hold else "np",  # HOLDPipeline gives NCHW tensors, DDIMPipeline NHWC arrays in [0, 1]
    ).images
    model.train()
    images = images if hold else torch.from_numpy(images).permute(0, 3, 1, 2)
    return images.float() * 2 - 1


def _bootstrap_interval(memorized: torch.Tensor, resamples: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of the memorized fraction over bootstrap resamples of the generations."""
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(len(memorized), (resamples, len(memorized)), generator=generator)
    fractions = memorized.double()[draws].mean(1)
    return float(fractions.quantile(0.025)), float(fractions.quantile(0.975))


def evaluate(generated: torch.Tensor, train: torch.Tensor, held_out: torch.Tensor, config: BenchConfig) -> dict:
    """Memorization (with its bootstrap interval and held-out control) and quality of one set of generations."""
    memorization = nn_ratio_memorization(generated, train, held_out=held_out)
    quality = quality_report(generated, train, held_out, n_components=min(32, train[0].numel()))
    low, high = _bootstrap_interval(memorization.memorized, config.bootstrap, config.seed)
    return {
        "memorized": memorization.fraction_memorized,
        "memorized_ci": [low, high],
        "distinct_copied": memorization.distinct_copied,
        "held_out_memorized": memorization.held_out_fraction,
        "frechet_distance": quality.frechet_distance,
        "precision": quality.precision,
        "recall": quality.recall,
        "floor_frechet_distance": quality.floor_frechet_distance,
        "floor_recall": quality.floor_recall,
        "_ratio": memorization.ratio,
        "_nearest": memorization.nearest_index,
    }


def _atomic_save(obj: Any, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def _atomic_json(obj: Any, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(obj, indent=2))
    os.replace(temporary, path)


def train_and_evaluate(
    method: BenchMethod,
    train: torch.Tensor,
    held_out: torch.Tensor,
    config: BenchConfig,
    state_dir: Path,
    progress: bool = True,
) -> tuple[dict, torch.Tensor]:
    """Train one method, evaluating it along the way; resume from ``state_dir`` when it holds a saved state.

    Returns the method's result dict and its final generations.
    """
    model, scheduler = _build(method, config, channels=train.shape[1])
    mitigations = method.callbacks(scheduler, config.seed)
    if all(type(c).sample_timesteps is TrainingCallback.sample_timesteps for c in mitigations):
        # uniform timesteps from a generator that is checkpointed with the run, so that resuming is exact
        mitigations = [TimestepSamplingCallback(UniformTimestepSampler(scheduler), seed=config.seed), *mitigations]
    callbacks = CallbackList(mitigations)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / config.train_steps, 1.0)))
    )
    generator = torch.Generator().manual_seed(config.seed + 2)
    state = TrainingState(noise_scheduler=scheduler, model=model)
    path = state_dir / f"{method.name}.pt"
    step, curve, seconds = 0, [], 0.0
    if path.exists():
        saved = torch.load(path, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        decay.load_state_dict(saved["lr"])
        callbacks.load_state_dict(saved["callbacks"])
        generator.set_state(saved["generator"])
        step, curve, seconds = saved["step"], saved["curve"], saved["seconds"]
    model.train()
    evaluations = [s for s in config.evaluation_steps() if s > step]
    bar = tqdm(total=config.train_steps, initial=step, desc=method.name, disable=not progress, leave=False)
    generated, last = None, None
    for target_step in evaluations:
        start = time.perf_counter()
        while step < target_step:
            batch = train[torch.randint(len(train), (config.batch_size,), generator=generator)]
            state.global_step = step
            timesteps, _ = callbacks.sample_timesteps(len(batch), state)
            model_input, target = noisy_input_and_target(scheduler, batch, timesteps, generator)
            output = model(model_input, timesteps).sample
            state.set_forward(model_input, {}, output)
            loss = callbacks.on_loss(per_sample_mse(output, target), state)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            decay.step()
            step += 1
            callbacks.on_step_end(state)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        seconds += time.perf_counter() - start
        generated = _sample(model, scheduler, config)
        last = evaluate(generated, train, held_out, config)
        curve.append({"step": step, **{k: v for k, v in last.items() if not k.startswith("_")}})
        _atomic_save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr": decay.state_dict(),
                "callbacks": callbacks.state_dict(),
                "generator": generator.get_state(),
                "step": step,
                "curve": curve,
                "seconds": seconds,
            },
            path,
        )
    bar.close()
    if generated is None:  # every evaluation was done before an interruption: sample the saved final model again
        generated = _sample(model, scheduler, config)
        last = evaluate(generated, train, held_out, config)
    final = {k: v for k, v in last.items() if not k.startswith("_")}
    result = {
        "method": method.name,
        "description": method.description,
        "hold_order": method.hold_order,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": seconds,
        **final,
        "curve": curve,
        "_ratio": last["_ratio"].tolist(),
        "_nearest": last["_nearest"].tolist(),
    }
    return result, generated


def _table(results: list[dict], config: BenchConfig) -> str:
    lines = [
        f"Data: {config.data}, {config.train_size} training images at {config.resolution}x{config.resolution}, "
        f"{config.train_steps} updates of batch {config.batch_size} per method, {config.num_samples} samples.",
        "",
        "| method | memorized (1/3 rule) [95 % CI] | distinct copied | held-out control | FD-PCA | precision | recall "
        "| train time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        low, high = r["memorized_ci"]
        lines.append(
            f"| {r['method']} | {r['memorized']:.1%} [{low:.1%}, {high:.1%}] | {r['distinct_copied']} | "
            f"{r['held_out_memorized']:.1%} | {r['frechet_distance']:.3f} | {r['precision']:.2f} | "
            f"{r['recall']:.2f} | {r['train_seconds']:.0f} s |"
        )
    floor = results[0]
    lines += ["", f"Floor (training images vs held-out): FD-PCA {floor['floor_frechet_distance']:.3f}, "
              f"recall {floor['floor_recall']:.2f}."]  # fmt: skip
    return "\n".join(lines)


def _write_figures(results: list[dict], generated: dict[str, torch.Tensor], train: torch.Tensor, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .audit import _to_pil
    from .utils import image_grid

    count = 8
    figure, axes = plt.subplots(len(results), 1, figsize=(8, 2.2 * len(results)), squeeze=False)
    for axis, result in zip(axes[:, 0], results, strict=True):
        ratio = torch.tensor(result["_ratio"])
        order = torch.argsort(ratio)[:count]
        top = [_to_pil((generated[result["method"]][i] + 1) / 2) for i in order]
        bottom = [_to_pil((train[result["_nearest"][i]] + 1) / 2) for i in order]
        axis.imshow(image_grid(top + bottom, cols=len(top), padding=1, scale=4), cmap="gray")
        axis.set_title(f"{result['method']}: memorized {result['memorized']:.0%} (top: samples, bottom: nearest)")
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(out / "samples_vs_nearest.png", dpi=100)
    plt.close(figure)

    ordered = sorted(
        (r for r in results if r["method"] == "ddpm" or r["hold_order"]), key=lambda r: r["hold_order"] or 1
    )
    if ordered:
        figure, axis = plt.subplots(figsize=(5, 3.5))
        orders = [r["hold_order"] or 1 for r in ordered]
        axis.plot(orders, [100 * r["memorized"] for r in ordered], "o-", label="memorized %")
        axis.set_xlabel("order (1 = DDPM baseline)")
        axis.set_ylabel("memorized (%)")
        twin = axis.twinx()
        twin.plot(orders, [r["frechet_distance"] for r in ordered], "s--", color="tab:red", label="FD-PCA")
        twin.set_ylabel("FD-PCA", color="tab:red")
        axis.set_xticks(orders)
        figure.tight_layout()
        figure.savefig(out / "memorization_vs_order.png", dpi=100)
        plt.close(figure)

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    for r in results:
        steps = [point["step"] for point in r["curve"]]
        left.plot(steps, [100 * point["memorized"] for point in r["curve"]], "o-", label=r["method"])
        right.plot(steps, [point["frechet_distance"] for point in r["curve"]], "o-", label=r["method"])
    left.set(xlabel="training steps", ylabel="memorized (%)")
    right.set(xlabel="training steps", ylabel="FD-PCA to held-out")
    left.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "memorization_vs_steps.png", dpi=100)
    plt.close(figure)


def run_bench(config: BenchConfig, output_dir: str | os.PathLike, progress: bool = True) -> list[dict]:
    """Run (or resume) the benchmark and write its files to ``output_dir``; returns the per-method results."""
    out = Path(output_dir)
    state_dir = out / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.json"
    settings = asdict(config)
    settings["block_out_channels"] = list(config.block_out_channels)
    if config_path.exists():
        saved = json.loads(config_path.read_text())
        shared = {k: v for k, v in saved.items() if k != "methods"}
        if shared != {k: v for k, v in settings.items() if k != "methods"}:
            raise ValueError(f"{out} holds a run with other settings ({config_path}); use another --output_dir.")
    _atomic_json(settings, config_path)
    train, held_out = load_bench_data(config)
    results, generated = [], {}
    for name in tqdm(config.methods, desc="methods", disable=not progress):
        done = state_dir / f"{name}.json"
        if done.exists():
            result = json.loads(done.read_text())
            model, scheduler = _build(BENCH_METHODS[name], config, channels=train.shape[1])
            model.load_state_dict(torch.load(state_dir / f"{name}.pt", weights_only=False)["model"])
            samples = _sample(model, scheduler, config)
        else:
            result, samples = train_and_evaluate(BENCH_METHODS[name], train, held_out, config, state_dir, progress)
            _atomic_json(result, done)
        results.append(result)
        generated[name] = samples
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    _atomic_json({"config": settings, "results": public}, out / "results.json")
    table = _table(results, config)
    (out / "results.md").write_text(table + "\n")
    _write_figures(results, generated, train, out)
    print(table)
    return public


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The flags of ``diffusers-hold bench``."""
    parser = parser or argparse.ArgumentParser(prog="diffusers-hold bench", description=__doc__.split("\n\n")[0])
    defaults = BenchConfig()
    parser.add_argument("--output_dir", default="outputs/bench")
    parser.add_argument("--data", default=defaults.data, help='"digits", "lfw" or an image folder.')
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=sorted(BENCH_METHODS))
    parser.add_argument("--hold_orders", nargs="+", type=int, default=None, help="HOLD orders to add (2..4).")
    parser.add_argument("--resolution", type=int, default=defaults.resolution)
    parser.add_argument("--train_size", type=int, default=defaults.train_size)
    parser.add_argument("--held_out_size", type=int, default=defaults.held_out_size)
    parser.add_argument("--train_steps", type=int, default=defaults.train_steps)
    parser.add_argument("--num_samples", type=int, default=defaults.num_samples)
    parser.add_argument("--num_evaluations", type=int, default=defaults.num_evaluations)
    parser.add_argument("--seed", type=int, default=defaults.seed)
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
        "seed": args.seed,
    }
    if args.quick:
        # 16 images memorize within a few hundred updates; one evaluation, fewer samples and HOLD steps
        settings.update(train_size=min(args.train_size, 16), train_steps=min(args.train_steps, 500))
        settings.update(num_samples=min(args.num_samples, 128), num_evaluations=1, hold_steps=100)
    return BenchConfig(**settings)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m diffusers_hold.bench``."""
    args = build_parser().parse_args(argv)
    run_bench(config_from_args(args), args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
