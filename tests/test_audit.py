"""The memorization audit: report files, known outcomes, the command line, the model card section."""

import json
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from diffusers_hold import HOLDPipeline, HOLDScheduler, hub
from diffusers_hold.audit import audit_pipeline, generate_images, load_image_folder
from diffusers_hold.data import load_digits_images, write_digits_imagefolder
from diffusers_hold.testing import tiny_stable_diffusion_pipeline, tiny_unet_2d


def unconditional_pipeline():
    unet = tiny_unet_2d(in_channels=3, out_channels=1, sample_size=16)
    return HOLDPipeline(unet=unet, scheduler=HOLDScheduler(order=3))


@pytest.fixture(scope="module")
def digits():
    images, _ = load_digits_images(16)
    return images / 2 + 0.5  # [0, 1], as the audit compares them


def test_audit_of_a_pipeline_that_copies_its_training_set(digits, tmp_path):
    """Training images that contain the generations themselves: every generation is a copy (ratio 0)."""
    pipe = unconditional_pipeline()
    generated, _ = generate_images(pipe, 6, batch_size=4, num_inference_steps=3)
    train = torch.cat([digits[:40], generated])
    report = audit_pipeline(pipe, train, digits[100:140], tmp_path, num_samples=6, batch_size=4, num_inference_steps=3)
    mem = report.memorization
    assert mem.fraction_memorized == 1.0 and mem.distinct_copied == 6
    assert sorted(mem.nearest_index.tolist()) == list(range(40, 46))
    assert mem.held_out_fraction < 0.1
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["memorization"]["fraction_memorized"] == 1.0 and len(saved["memorization"]["per_sample"]["d1"]) == 6
    assert "| distinct training images copied | 6 |" in (tmp_path / "report.md").read_text()
    assert Image.open(tmp_path / "copies.png").size[0] > 6 * 16 and (tmp_path / "ratio_histogram.png").exists()


def test_audit_of_an_untrained_model_finds_no_copies(digits, tmp_path):
    report = audit_pipeline(
        unconditional_pipeline(), digits[:200], digits[200:260], tmp_path, num_samples=8, num_inference_steps=3
    )
    assert report.memorization.fraction_memorized == 0.0
    assert report.quality is not None  # 60 held-out images: enough for the PCA features
    assert report.quality.frechet_distance > report.quality.floor_frechet_distance


def test_text_to_image_audit_uses_the_prompts_in_turn(tmp_path):
    pipe = tiny_stable_diffusion_pipeline()
    generated, _ = generate_images(pipe, 1, prompts=["x"], num_inference_steps=2)
    train = torch.rand(10, *generated.shape[1:], generator=torch.Generator().manual_seed(0))
    held_out = torch.rand(5, *generated.shape[1:], generator=torch.Generator().manual_seed(1))
    prompts = ["a cat", "a dog", "a bird"]
    report = audit_pipeline(
        pipe, train, held_out, tmp_path, num_samples=5, prompts=prompts, batch_size=2, num_inference_steps=2
    )
    assert report.prompts == ["a cat", "a dog", "a bird", "a cat", "a dog"]
    assert report.quality is None  # too few held-out images for the PCA: reported as absent, not guessed
    with pytest.raises(ValueError, match="needs prompts"):
        generate_images(pipe, 2)


def test_audit_command_and_model_card_section(tmp_path):
    pipe = unconditional_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    write_digits_imagefolder(tmp_path / "train", limit=60)
    images, _ = load_digits_images(16)
    held = tmp_path / "held_out"
    held.mkdir()
    for i in range(60, 70):
        Image.fromarray(((images[i, 0] + 1) * 127.5).round().byte().numpy(), mode="L").save(held / f"{i}.png")
    command = [sys.executable, "-m", "diffusers_hold.cli", "audit", "--pipeline", tmp_path / "pipe"]
    command += ["--train_data_dir", tmp_path / "train", "--held_out_dir", held, "--num_samples", "4"]
    command += ["--num_inference_steps", "3", "--output_dir", tmp_path / "audit"]
    out = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "memorized generations" in out.stdout
    saved = json.loads((tmp_path / "audit" / "report.json").read_text())
    assert saved["memorization"]["num_train"] == 60 and saved["settings"]["image_shape"] == [1, 16, 16]

    train, _ = load_image_folder(train_data_dir=tmp_path / "train", resolution=16, num_channels=1)
    report = audit_pipeline(pipe, train, train[:10], tmp_path / "again", num_samples=2, num_inference_steps=3)
    card = hub.create_model_card(pipe, memorization_audit=report, repo_id="me/hold")
    assert "## Memorization audit" in card.text and "distinct training images copied" in card.text
    metadata = ModelCard(str(card)).data.to_dict()
    metrics = metadata["model-index"][0]["results"][0]["metrics"]
    assert {m["type"] for m in metrics} >= {"memorized_fraction", "distinct_copied"}

    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffusers_hold.cli",
            "audit",
            "--pipeline",
            str(tmp_path / "pipe"),
            "--output_dir",
            "x",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "exactly one of --train_data_dir and --dataset_name" in bad.stderr
