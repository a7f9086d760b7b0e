"""Cost of the HOLD scheduler next to the network it drives, on CPU.

    python benchmarks/bench_scheduler_overhead.py [--quick]

**Sampling side.** One denoising step of ``HOLDScheduler(order=3)`` (``scale_model_input`` + ``step``, for each
solver ``euler_maruyama``, ``sscs``, ``ddim`` and ``exp_multistep`` at ``solver_order=3``) on a state of shape
``(2, 3 * 4, 64, 64)`` with a model output of shape ``(2, 4, 64, 64)``, float32, against one forward of a
``UNet2DConditionModel`` with Stable Diffusion 1.5's configuration and random weights (latents ``(2, 4, 64, 64)``,
text states ``(2, 77, 768)``, ``torch.no_grad``). The SD UNet reads 4 channels where a HOLD model would read 12: only
the costs are compared. The step is timed at the first, a middle and the last timestep of a 50-step grid (the middle
one goes in the table). The last step of ``euler_maruyama`` and ``sscs`` is the noise-free final denoising step, so
it skips the noise draw and is cheaper.
A step repeated at one timestep never reads a multistep history, so every solver is also timed over whole
trajectories (``trajectory``: all steps in order, per step), where ``exp_multistep`` reads two earlier calls; the
larger of the two per-step figures is compared with the UNet. Target: the scheduler step costs under 1 % of the UNet
forward. ``set_timesteps`` (the coefficients, once per sampling run) is timed on a new scheduler and again on the
same grid, which reuses them, as a pipeline's second and later calls do.

**Training side.** A full training step (noising, forward, MSE loss, backward, AdamW step) of a small ``UNet2DModel``
on a batch of 16 three-channel 32x32 images, with

* HOLD noising: ``sample_timesteps`` + ``randn(B, 9, 32, 32)`` + ``add_noise`` + ``get_target``, 9-channel UNet;
* DDPM noising (``DDPMScheduler.add_noise``, target = the 3-channel noise) feeding the same 9-channel UNet with the
  noisy image repeated to 9 channels, which isolates the cost of the noising;
* DDPM noising feeding a 3-channel UNet (the plain baseline, for reference).

The variants are interleaved (rotating their order every round) to reduce the effect of drift, and the noising is
also timed on its own. Target: full training step HOLD / DDPM with the same 9-channel UNet <= 1.03.

Every figure is the median over repetitions (``time.perf_counter``, after warm-up). ``--quick`` cuts the repetitions
so the run takes well under a minute; it then times a single SD UNet forward without warm-up (so the first-call
set-up is included) and fills the SD UNet with random normal weights instead of running diffusers' slower default
initialisation (the values do not change the cost of a float32 forward). Results go to
``benchmarks/results/scheduler_overhead.json``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from harness import ForeignLoad, environment, finish

from diffusers_hold import HOLDScheduler

HOLD_ORDER = 3
SOLVERS = {
    "euler_maruyama": {"solver": "euler_maruyama"},
    "sscs": {"solver": "sscs"},
    "ddim": {"solver": "ddim"},
    "exp_multistep": {"solver": "exp_multistep", "solver_order": 3},
}
SAMPLING_TARGET = 0.01  # scheduler step / UNet forward
TRAINING_TARGET = 1.03  # HOLD / DDPM full training step, same 9-channel UNet
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "scheduler_overhead.json"

# Stable Diffusion 1.5's UNet (the remaining arguments are diffusers' defaults, as in SD 1.5's config.json).
SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)


def small_unet_config(in_channels: int) -> dict[str, Any]:
    return dict(
        sample_size=32,
        in_channels=in_channels,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Few repetitions: a smoke run of well under a minute.")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="Where to write the JSON results.")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="Length of the sampling grid.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick = args.quick
    # (repetitions, warm-up calls) of each measurement
    args.unet_reps, args.unet_warmup = (1, 0) if quick else (3, 1)
    args.step_reps, args.step_warmup = (30, 3) if quick else (300, 20)
    args.set_timesteps_reps = 1 if quick else 3
    args.train_reps, args.train_warmup = (4, 1) if quick else (40, 3)
    args.noising_reps, args.noising_warmup = (30, 3) if quick else (300, 20)
    return args


# ------------------------------------------------------------------------------------------------------ timing
def time_calls(fn: Callable[[], object], reps: int, warmup: int) -> list[float]:
    """Wall-clock seconds of ``reps`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def time_interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, list[float]]:
    """Like :func:`time_calls` for several variants, one call of each per round, rotating their order every round."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(reps):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - start)
    return samples


def summarize(samples: list[float]) -> dict[str, Any]:
    """Median and spread (seconds) of timing samples, with the samples themselves."""
    quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "q1_s": quartiles[0],
        "q3_s": quartiles[2],
        "n": len(samples),
        "samples_s": samples,
    }


def fmt_time(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"


# ------------------------------------------------------------------------------------------------ sampling side
def build_sd_unet(fast_init: bool) -> UNet2DConditionModel:
    """SD 1.5's UNet with random weights (diffusers' own initialisation unless ``fast_init``)."""
    if not fast_init:
        return UNet2DConditionModel(**SD15_UNET_CONFIG).eval()
    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    unet = unet.to_empty(device="cpu").eval()
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if param.ndim > 1:  # conv / linear weights, std 1 / sqrt(fan_in)
                param.normal_(0.0, 1.0 / math.sqrt(param[0].numel()))
            elif name.endswith("weight"):  # normalisation scales, as PyTorch initialises them
                param.fill_(1.0)
            else:
                param.zero_()
        for buffer in unet.buffers():  # none in SD 1.5's UNet today; keep them finite if that changes
            buffer.zero_()
    return unet


def bench_sd_unet(args: argparse.Namespace, generator: torch.Generator) -> dict[str, Any]:
    """Build SD 1.5's UNet and time its forward at batch 2, latents 4x64x64, under ``torch.no_grad``."""
    build_start = time.perf_counter()
    unet = build_sd_unet(fast_init=args.quick)
    build_s = time.perf_counter() - build_start
    latents = torch.randn(2, 4, 64, 64, generator=generator)
    text_states = torch.randn(2, 77, 768, generator=generator)
    timestep = torch.tensor(500.0)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return unet(latents, timestep, encoder_hidden_states=text_states).sample

    return {
        "config": SD15_UNET_CONFIG,
        "num_parameters": sum(p.numel() for p in unet.parameters()),
        "init": "normal (fast, --quick)" if args.quick else "diffusers default",
        "build_s": build_s,
        "forward": summarize(time_calls(forward, args.unet_reps, args.unet_warmup)),
    }


def bench_sampling(args: argparse.Namespace) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(args.seed)
    batch, channels, size = 2, 4, 64
    sample = torch.randn(batch, HOLD_ORDER * channels, size, size, generator=generator)
    model_output = torch.randn(batch, channels, size, size, generator=generator)

    solvers: dict[str, Any] = {}
    for solver, settings in SOLVERS.items():

        def first_set_timesteps(settings=settings):  # a new scheduler: the coefficients are computed
            HOLDScheduler(order=HOLD_ORDER, **settings).set_timesteps(args.num_inference_steps)

        set_timesteps = time_calls(first_set_timesteps, args.set_timesteps_reps, warmup=0)
        scheduler = HOLDScheduler(order=HOLD_ORDER, **settings)
        # the next generation with the same grid: what a pipeline pays on every call after its first
        set_timesteps_again = time_calls(
            lambda s=scheduler: s.set_timesteps(args.num_inference_steps), args.set_timesteps_reps, warmup=1
        )
        timesteps = scheduler.timesteps
        positions = {"first": 0, "middle": len(timesteps) // 2, "last": len(timesteps) - 1}
        step_generator = torch.Generator().manual_seed(args.seed)
        per_position = {}
        for position, index in positions.items():
            t = timesteps[index]

            def one_step(s=scheduler, t=t, g=step_generator) -> torch.Tensor:
                model_input = s.scale_model_input(sample, t, full_state=True)
                return s.step(model_output, t, model_input, generator=g, full_state=True).prev_sample

            per_position[position] = {
                "index": index,
                "timestep": float(t),
                **summarize(time_calls(one_step, args.step_reps, args.step_warmup)),
            }
        medians = [per_position[p]["median_s"] for p in positions]

        def trajectory(s=scheduler, g=step_generator) -> None:
            state = sample
            for t in s.timesteps:
                state = s.step(
                    model_output, t, s.scale_model_input(state, t, full_state=True), generator=g, full_state=True
                ).prev_sample

        trajectory_times = time_calls(trajectory, max(1, args.step_reps // len(timesteps)), warmup=1)
        solvers[solver] = {
            "set_timesteps": summarize(set_timesteps),
            "set_timesteps_again": summarize(set_timesteps_again),
            "step": per_position,
            "trajectory_per_step": summarize([seconds / len(timesteps) for seconds in trajectory_times]),
            "step_max_over_min": max(medians) / min(medians),
        }

    unet_info = bench_sd_unet(args, generator)
    gc.collect()  # release the SD UNet before the training side
    unet_median = unet_info["forward"]["median_s"]
    for entry in solvers.values():
        per_step = max(entry["step"]["middle"]["median_s"], entry["trajectory_per_step"]["median_s"])
        entry["step_middle_over_unet"] = per_step / unet_median
        entry["step_worst_over_unet"] = max(v["median_s"] for v in entry["step"].values()) / unet_median
        entry["target_met"] = entry["step_middle_over_unet"] < SAMPLING_TARGET
    return {
        "shapes": {
            "hold_state": [batch, HOLD_ORDER * channels, size, size],
            "model_output": [batch, channels, size, size],
            "unet_latents": [batch, channels, size, size],
            "encoder_hidden_states": [batch, 77, 768],
        },
        "num_inference_steps": args.num_inference_steps,
        "unet": unet_info,
        "solvers": solvers,
        "target": f"scheduler step < {SAMPLING_TARGET:.0%} of the UNet forward",
        "target_met": all(entry["target_met"] for entry in solvers.values()),
    }


# ------------------------------------------------------------------------------------------------ training side
def time_add_noise(
    hold: HOLDScheduler, ddpm: DDPMScheduler, x0: torch.Tensor, args: argparse.Namespace
) -> dict[str, list[float]]:
    """Seconds per ``add_noise`` call of each scheduler alone, on timesteps and noise drawn once."""
    batch, channels = x0.shape[:2]
    g = torch.Generator().manual_seed(args.seed)
    hold_t = hold.sample_timesteps(batch, generator=g)
    hold_noise = torch.randn(batch, HOLD_ORDER * channels, *x0.shape[2:], generator=g)
    ddpm_t = torch.randint(0, ddpm.config.num_train_timesteps, (batch,), generator=g)
    ddpm_noise = torch.randn(x0.shape, generator=g)
    return time_interleaved(
        {
            "hold": lambda: hold.add_noise(x0, hold_noise, hold_t),
            "ddpm": lambda: ddpm.add_noise(x0, ddpm_noise, ddpm_t),
        },
        args.noising_reps,
        args.noising_warmup,
    )


def bench_training(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    batch, channels, size = 16, 3, 32
    x0 = torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(args.seed)) * 2 - 1
    hold = HOLDScheduler(order=HOLD_ORDER)
    ddpm = DDPMScheduler()
    num_train_timesteps = ddpm.config.num_train_timesteps

    unet9 = UNet2DModel(**small_unet_config(HOLD_ORDER * channels)).train()
    unet3 = UNet2DModel(**small_unet_config(channels)).train()
    models = {"hold": unet9, "ddpm_9ch": copy.deepcopy(unet9), "ddpm_3ch": unet3}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    generators = {name: torch.Generator().manual_seed(args.seed + i) for i, name in enumerate(models)}

    def hold_noising(g: torch.Generator = generators["hold"]):
        t = hold.sample_timesteps(batch, generator=g)
        noise = torch.randn(batch, HOLD_ORDER * channels, size, size, generator=g)
        z = hold.add_noise(x0, noise, t)
        return z, t, hold.get_target(noise)

    def ddpm_noising(g: torch.Generator, repeat: int):
        t = torch.randint(0, num_train_timesteps, (batch,), generator=g)
        noise = torch.randn(batch, channels, size, size, generator=g)
        z = ddpm.add_noise(x0, noise, t)
        return (z.repeat(1, repeat, 1, 1) if repeat > 1 else z), t, noise

    noisings = {
        "hold": hold_noising,
        "ddpm_9ch": lambda: ddpm_noising(generators["ddpm_9ch"], HOLD_ORDER),
        "ddpm_3ch": lambda: ddpm_noising(generators["ddpm_3ch"], 1),
    }

    def make_train_step(name: str) -> Callable[[], float]:
        model, optimizer, noising = models[name], optimizers[name], noisings[name]

        def train_step() -> float:
            z, t, target = noising()
            loss = F.mse_loss(model(z, t).sample, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.item()

        return train_step

    add_noise_only = time_add_noise(hold, ddpm, x0, args)
    noising = time_interleaved(noisings, args.noising_reps, args.noising_warmup)
    train = time_interleaved({name: make_train_step(name) for name in models}, args.train_reps, args.train_warmup)

    noising_stats = {name: summarize(v) for name, v in noising.items()}
    train_stats = {name: summarize(v) for name, v in train.items()}
    med = {name: s["median_s"] for name, s in train_stats.items()}
    noise_med = {name: s["median_s"] for name, s in noising_stats.items()}
    ratio_9ch = med["hold"] / med["ddpm_9ch"]
    return {
        "batch": batch,
        "data_shape": [batch, channels, size, size],
        "unet_configs": {"9ch": small_unet_config(HOLD_ORDER * channels), "3ch": small_unet_config(channels)},
        "num_parameters": {
            "9ch": sum(p.numel() for p in unet9.parameters()),
            "3ch": sum(p.numel() for p in unet3.parameters()),
        },
        "add_noise_only": {name: summarize(v) for name, v in add_noise_only.items()},
        "noising": noising_stats,
        "train_step": train_stats,
        "ratios": {
            "train_step_hold_over_ddpm_9ch": ratio_9ch,
            "train_step_hold_over_ddpm_3ch": med["hold"] / med["ddpm_3ch"],
            "noising_hold_over_ddpm_9ch": noise_med["hold"] / noise_med["ddpm_9ch"],
            "add_noise_hold_over_ddpm": statistics.median(add_noise_only["hold"])
            / statistics.median(add_noise_only["ddpm"]),
            # the overhead predicted from the noising timings alone, free of the training step's noise
            "noising_extra_over_ddpm_9ch_step": (noise_med["hold"] - noise_med["ddpm_9ch"]) / med["ddpm_9ch"],
        },
        "target": f"train step HOLD / DDPM (same 9-channel UNet) <= {TRAINING_TARGET}",
        "target_met": ratio_9ch <= TRAINING_TARGET,
    }


# ------------------------------------------------------------------------------------------------------ report
def print_report(results: dict[str, Any]) -> None:
    env = results["environment"]
    print(
        f"\ntorch {env['torch']}, diffusers {env['diffusers']}, {env['num_threads']} threads "
        f"({env['cpu_count']} CPUs), {'quick' if results['quick'] else 'full'} run"
    )

    sampling = results["sampling"]
    unet = sampling["unet"]["forward"]
    print(f"\nSampling side: HOLD order {HOLD_ORDER}, state {tuple(sampling['shapes']['hold_state'])}, float32")
    print(f"  SD 1.5 UNet forward (batch 2, 4x64x64, no_grad): {fmt_time(unet['median_s'])}  (median of {unet['n']})")
    header = (
        f"  {'solver':<15}{'first':>12}{'middle':>12}{'last':>12}{'trajectory':>12}{'max/min':>9}{'step/UNet':>13}"
        "  target <1%"
    )
    print(header)
    print("  " + "-" * (len(header) - 2))
    for solver, entry in sampling["solvers"].items():
        step = entry["step"]
        print(
            f"  {solver:<15}{fmt_time(step['first']['median_s']):>12}{fmt_time(step['middle']['median_s']):>12}"
            f"{fmt_time(step['last']['median_s']):>12}{fmt_time(entry['trajectory_per_step']['median_s']):>12}"
            f"{entry['step_max_over_min']:>9.2f}"
            f"{entry['step_middle_over_unet']:>12.4%}  {'met' if entry['target_met'] else 'MISSED'}"
        )

    def set_timesteps_cost(entry):
        return f"{fmt_time(entry['set_timesteps']['median_s'])} ({fmt_time(entry['set_timesteps_again']['median_s'])})"

    one_off = ", ".join(f"{solver} {set_timesteps_cost(entry)}" for solver, entry in sampling["solvers"].items())
    print(f"  set_timesteps({sampling['num_inference_steps']}), new grid (same grid again): {one_off}")

    training = results["training"]
    labels = {
        "hold": "HOLD, 9-ch UNet",
        "ddpm_9ch": "DDPM, 9-ch UNet (input x3)",
        "ddpm_3ch": "DDPM, 3-ch UNet",
    }
    print(f"\nTraining side: small UNet2DModel, batch {training['batch']}, data {tuple(training['data_shape'][1:])}")
    print(f"  {'variant':<28}{'noising':>12}{'full train step':>18}")
    print("  " + "-" * 58)
    for name, label in labels.items():
        print(
            f"  {label:<28}{fmt_time(training['noising'][name]['median_s']):>12}"
            f"{fmt_time(training['train_step'][name]['median_s']):>18}"
        )
    add_noise = training["add_noise_only"]
    ratios = training["ratios"]
    print(
        f"  add_noise alone: HOLD {fmt_time(add_noise['hold']['median_s'])}, "
        f"DDPM {fmt_time(add_noise['ddpm']['median_s'])} (x{ratios['add_noise_hold_over_ddpm']:.2f})"
    )
    print(f"  noising HOLD / DDPM (9-ch):           {ratios['noising_hold_over_ddpm_9ch']:.2f}x")
    print(f"  extra noising cost / DDPM train step:  {ratios['noising_extra_over_ddpm_9ch_step']:+.3%}")
    print(f"  train step HOLD / DDPM, 3-ch UNet:     {ratios['train_step_hold_over_ddpm_3ch']:.3f}x")
    print(
        f"  train step HOLD / DDPM, same 9-ch UNet: {ratios['train_step_hold_over_ddpm_9ch']:.3f}x  "
        f"(target <= {TRAINING_TARGET}: {'met' if training['target_met'] else 'MISSED'})"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cpu_count = os.cpu_count() or 1
    torch.set_num_threads(cpu_count)
    start = time.perf_counter()
    foreign_load = ForeignLoad()
    results: dict[str, Any] = {
        "benchmark": "scheduler_overhead",
        "quick": args.quick,
        "environment": environment(("torch", "diffusers", "diffusers_hold"), processor=True),
        "repetitions": {key: value for key, value in vars(args).items() if key.endswith(("_reps", "_warmup"))},
    }
    print("Sampling side (the SD UNet forward takes tens of seconds on a small CPU)...", flush=True)
    results["sampling"] = bench_sampling(args)
    print("Training side...", flush=True)
    results["training"] = bench_training(args)
    results["targets_met"] = {
        "sampling": results["sampling"]["target_met"],
        "training": results["training"]["target_met"],
    }
    results["wall_time_s"] = time.perf_counter() - start
    results["environment"]["foreign_cpu_share"] = foreign_load.share(cpu_count)
    return finish(results, args.output, print_report)


if __name__ == "__main__":
    main()
