"""Training throughput of the HOLD training scripts against the same scripts with ``--scheduler ddpm``.

    python benchmarks/bench_training_throughput.py [--quick]

Runs each training script ``--repeats`` times (3) per scheduler, alternating HOLD and DDPM so that drifts in the
machine's speed fall on both, each run a fresh ``accelerate launch`` on one process with the same model, data, batch
and seed. The script itself reports images per second over its updates after the first five (``throughput:`` in its
log); the benchmark prints the median per scheduler and the ratio DDPM / HOLD (HOLD's slowdown; target <= 1.05):

* ``unconditional``: ``train_unconditional_hold.py`` on bundled digits (written as an imagefolder), 32x32 RGB
  copies, a 1.3M-parameter UNet (``--block_out_channels 32 64 64``), batch 16. HOLD adds ``order * C`` input
  channels to the first convolution, the exact-kernel noising and the noise of the auxiliary blocks.
* ``text_to_image``: ``train_text_to_image_hold.py`` on a small random Stable Diffusion built by
  ``diffusers_hold.testing`` (UNet widths 64 and 128, about 1.5M parameters; 32x32 images, 16x16 latents), batch 8,
  full fine-tuning. HOLD adds the sufficient-statistic conversion of the converted UNet on every forward (a few
  float64 3x3 matrix computations per sample, about 2 ms per step) and 8 more input channels. A model this small
  makes such fixed costs count far more than next to a real Stable Diffusion UNet.

Results go to ``benchmarks/results/training_throughput.json``. ``--quick`` takes fewer updates.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import ForeignLoad, environment, finish
from PIL import Image

from diffusers_hold.data import load_digits_images
from diffusers_hold.testing import tiny_stable_diffusion_pipeline

ROOT = Path(__file__).resolve().parents[1]
THROUGHPUT = re.compile(r"throughput: ([0-9.]+) images/s")


def write_images(folder: Path, resolution: int, count: int) -> Path:
    """Bundled digits as RGB PNGs of ``resolution`` with captions: real data, no download."""
    images, labels = load_digits_images(resolution)
    folder.mkdir(parents=True)
    with open(folder / "metadata.jsonl", "w") as metadata:
        for i in range(count):
            pixels = ((images[i, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
            Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(folder / f"{i:04d}.png")
            metadata.write(json.dumps({"file_name": f"{i:04d}.png", "text": f"digit {int(labels[i])}"}) + "\n")
    return folder


def run(script: str, args: list[str]) -> float:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "training" / script), *args]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{script} failed:\n{out.stderr[-3000:]}")
    return float(THROUGHPUT.findall(out.stdout + out.stderr)[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="30 updates per run instead of 80.")
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    steps = "30" if options.quick else "80"
    start = time.perf_counter()
    load = ForeignLoad()
    cases = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_images(tmp / "digits", 32, 256)
        small_sd = tiny_stable_diffusion_pipeline(block_out_channels=(64, 128), cross_attention_dim=64)
        small_sd.save_pretrained(tmp / "small-sd")
        common = [
            "--train_data_dir",
            str(data),
            "--resolution",
            "32",
            "--max_train_steps",
            steps,
            "--report_to",
            "none",
        ]
        common += ["--checkpointing_steps", "0", "--seed", "0"]
        settings = {
            "unconditional": ("train_unconditional_hold.py", ["--block_out_channels", "32", "64", "64"], 16),
            "text_to_image": (
                "train_text_to_image_hold.py",
                ["--pretrained_model_name_or_path", str(tmp / "small-sd")],
                8,
            ),
        }
        for name, (script, extra, batch) in settings.items():
            rates = {"hold": [], "ddpm": []}
            for repeat in range(options.repeats):
                for scheduler in ("hold", "ddpm"):
                    out = tmp / f"{name}-{scheduler}-{repeat}"
                    args = [*common, *extra, "--train_batch_size", str(batch), "--output_dir", str(out)]
                    rates[scheduler].append(run(script, [*args, "--scheduler", scheduler]))
                    print(f"{name} {scheduler} run {repeat + 1}: {rates[scheduler][-1]:.1f} images/s", flush=True)
            hold, ddpm = statistics.median(rates["hold"]), statistics.median(rates["ddpm"])
            cases[name] = {
                "batch": batch,
                "updates": int(steps),
                "hold_images_per_s": rates["hold"],
                "ddpm_images_per_s": rates["ddpm"],
                "ratio_ddpm_over_hold": ddpm / hold,
            }
    env = environment(("torch", "diffusers", "accelerate"))
    env["foreign_cpu_share"] = load.share(env["cpu_count"])
    results = {"cases": cases, "target_ratio": 1.05, "environment": env, "wall_time_s": time.perf_counter() - start}

    def report(results: dict) -> None:
        print("\ncase            HOLD img/s   DDPM img/s   DDPM/HOLD (target <= 1.05)")
        for name, case in results["cases"].items():
            hold, ddpm = statistics.median(case["hold_images_per_s"]), statistics.median(case["ddpm_images_per_s"])
            print(f"{name:<15} {hold:>10.1f} {ddpm:>12.1f} {case['ratio_ddpm_over_hold']:>11.3f}")

    finish(results, ROOT / "benchmarks" / "results" / "training_throughput.json", report)


if __name__ == "__main__":
    main()
