"""Throughput of the prompt-set audit on the CPU: generation, features and protocol timed side by side.

    OMP_NUM_THREADS=1 python benchmarks/bench_audit_throughput.py [--quick]

One :func:`diffusers_hold.audit.audit_prompt_set` run, as ``diffusers-hold audit --prompts ... --features dinov2``
does it: 64 prompts x 4 images = 256 generations of 64x64 RGB from a small random Stable Diffusion pipeline of
:mod:`diffusers_hold.testing` (UNet widths 32 and 64, 32x32 latents, DDPM at 20 steps with classifier-free guidance)
scored in the features of a random DINOv2 model of dinov2-small's size (hidden 384, 12 layers, 6 heads, patch 14,
MLP ratio 4; 224x224 input, 257 tokens: the cost of the real model, not its features) against 64 training images
(bundled digits, 64x64 RGB), with 40 held-out images as the 1/3 rule's control. Random weights make the numbers
meaningless and the timings real.

The audit records wall seconds per phase (:attr:`~diffusers_hold.audit.ProtocolReport.timings`): generation,
features of the generations, features of the training and held-out images (once), and the protocol (copy detection
with 1000 bootstrap resamples, the 1/3 rule in feature and pixel space). Results go to
``benchmarks/results/audit_throughput.json``; ``--quick`` runs 16 prompts.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from harness import ForeignLoad, environment, finish

from diffusers_hold.audit import audit_prompt_set
from diffusers_hold.data import load_digits_images
from diffusers_hold.testing import save_tiny_dinov2, tiny_stable_diffusion_pipeline

ROOT = Path(__file__).resolve().parents[1]
DINOV2_SMALL = {
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "patch_size": 14,
    "mlp_ratio": 4,
}


def digits_rgb(resolution: int, start: int, count: int) -> torch.Tensor:
    """Bundled digits as RGB images in [0, 1]."""
    images, _ = load_digits_images(resolution)
    return (images[start : start + count] / 2 + 0.5).expand(-1, 3, -1, -1).contiguous()


PHASES = {
    "generation_s": "generation",
    "generation_features_s": "features of the generations",
    "reference_features_s": "features of training + held-out",
    "protocol_s": "protocol (copy detection, 1/3 rules)",
    "other_s": "other (loading, figures, files)",
}


def print_report(results: dict) -> None:
    total = results["audit_wall_s"]
    print(
        f"\n{results['num_generated']} generations of {results['image_size']}x{results['image_size']}, "
        f"{results['num_inference_steps']} steps; features: {results['features']}"
    )
    print(f"{'phase':<40}{'seconds':>9}{'share':>7}{'images/s':>10}")
    for key, label in PHASES.items():
        seconds = results["phases_s"][key]
        count = results["num_references"] if key == "reference_features_s" else results["num_generated"]
        print(f"{label:<40}{seconds:>9.1f}{seconds / total:>7.0%}{count / seconds:>10.2f}")
    print(f"{'whole audit (wall)':<40}{total:>9.1f}{1:>7.0%}{results['images_per_s']:>10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 prompts instead of 64.")
    parser.add_argument("--images_per_prompt", type=int, default=4)
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "audit_throughput.json"))
    options = parser.parse_args()
    num_prompts = 16 if options.quick else 64
    start = time.perf_counter()
    pipe = tiny_stable_diffusion_pipeline(sample_size=32, block_out_channels=(32, 64), cross_attention_dim=32)
    prompts = [f"a photograph of object number {i}" for i in range(num_prompts)]
    train, held_out = digits_rgb(64, 0, 64), digits_rgb(64, 1000, 40)
    load = ForeignLoad()
    with tempfile.TemporaryDirectory() as tmp:
        dinov2 = save_tiny_dinov2(Path(tmp) / "dinov2-small-random", image_size=224, seed=0, **DINOV2_SMALL)
        audit_start = time.perf_counter()
        report = audit_prompt_set(
            pipe,
            Path(tmp) / "audit",
            prompts=prompts,
            train_images=train,
            held_out_images=held_out,
            images_per_prompt=options.images_per_prompt,
            features="dinov2",
            features_path=dinov2,
            feature_kwargs={"batch_size": 32, "device": "cpu"},
            batch_size=options.batch_size,
            num_inference_steps=options.num_inference_steps,
            quality=False,
            device="cpu",
        )
        audit_wall = time.perf_counter() - audit_start
    section = report.protocol["none"]
    timings = section.timings
    num_generated = section.copy_detection.num_generated
    phases = {
        "generation_s": timings["generation_s"],
        "generation_features_s": timings["features_s"],
        "reference_features_s": timings["reference_features_s"],
        "protocol_s": timings["protocol_s"],
    }
    phases["other_s"] = audit_wall - sum(phases.values())
    results = {
        "benchmark": "audit_throughput",
        "num_prompts": num_prompts,
        "images_per_prompt": options.images_per_prompt,
        "num_generated": num_generated,
        "image_size": int(report.settings["image_shape"][-1]),
        "num_inference_steps": report.settings["num_inference_steps"],
        "batch_size": options.batch_size,
        "pipeline": "tiny_stable_diffusion_pipeline(sample_size=32, block_out_channels=(32, 64), "
        "cross_attention_dim=32), DDPMScheduler, guidance 7.5",
        "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
        "features": f"random DINOv2 of dinov2-small's size {DINOV2_SMALL}, 224x224 input",
        "num_references": len(train) + len(held_out),
        "phases_s": phases,
        "audit_wall_s": audit_wall,
        "images_per_s": num_generated / audit_wall,
        "generation_images_per_s": num_generated / timings["generation_s"],
        "feature_images_per_s": num_generated / timings["features_s"],
        "environment": {
            **environment(("torch", "diffusers", "transformers"), processor=True),
            "foreign_cpu_share": load.share(os.cpu_count() or 1),
        },
        "wall_time_s": time.perf_counter() - start,
    }
    finish(results, Path(options.output), print_report)


if __name__ == "__main__":
    main()
