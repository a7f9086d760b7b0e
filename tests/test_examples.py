"""The text-to-image example, end to end on a tiny local pipeline folder."""

import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image

from diffusers_hold.testing import tiny_stable_diffusion_pipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_text_to_image_example(tmp_path, *flags):
    """The text-to-image example on a tiny local SD folder; returns its written paths and its three grids."""
    tiny_stable_diffusion_pipeline().save_pretrained(tmp_path / "sd")
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "sd"), "--output_dir", str(tmp_path / "out"), *flags]
    written = load_example("text_to_image_hold").main(argv)
    grids = {name: np.asarray(Image.open(written[name]), dtype=float) for name in ("stock", "zero_shot", "converted")}
    return written, grids


def test_text_to_image_example_samples_stock_zero_shot_and_converted(tmp_path):
    written, grids = run_text_to_image_example(tmp_path, "--num_inference_steps", "6", "--num_images_per_prompt", "2")
    assert all(grid.shape == grids["stock"].shape for grid in grids.values())
    # before fine-tuning, the converted UNet generates what the zero-shot scheduler makes of the stock UNet
    assert np.abs(grids["converted"] - grids["zero_shot"]).max() <= 2
    assert np.abs(grids["stock"] - grids["zero_shot"]).mean() > 5  # a different sampler gives different images
    assert (written["hold_pipeline"] / "unet" / "diffusion_pytorch_model.safetensors").exists()
    comparison = Image.open(written["comparison"])
    assert comparison.size[1] > 2.5 * Image.open(written["stock"]).size[1]  # three rows


def test_text_to_image_example_few_step_solver(tmp_path):
    """``--solver exp_multistep``: the few-step settings the README recommends, saved with the converted pipeline."""
    written, grids = run_text_to_image_example(tmp_path, "--solver", "exp_multistep", "--num_inference_steps", "5")
    assert np.abs(grids["stock"] - grids["zero_shot"]).mean() > 5
    saved = json.loads((written["hold_pipeline"] / "scheduler" / "scheduler_config.json").read_text())
    assert (saved["solver"], saved["algorithm_type"], saved["timestep_spacing"]) == (
        "exp_multistep", "sde-dpmsolver++", "log1p"
    )  # fmt: skip
