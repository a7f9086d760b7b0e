"""training/train_text_to_image_hold.py on a tiny local SD folder and a captioned imagefolder, under accelerate."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from accelerate_launch import ROOT, run_script
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

import diffusers_hold
from diffusers_hold import HOLDScheduler, HOLDUNet2DConditionModel
from diffusers_hold.mitigations import attention_heads, pruned_heads
from diffusers_hold.testing import tiny_stable_diffusion_pipeline

SCRIPT = ROOT / "training" / "train_text_to_image_hold.py"


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    tiny_stable_diffusion_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def captioned_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    with open(folder / "metadata.jsonl", "w") as metadata:
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            metadata.write(json.dumps({"file_name": f"{i}.png", "text": f"a picture of thing {i}"}) + "\n")
    return folder


def train(args, **kwargs):
    return run_script(SCRIPT, args, **kwargs)


def common(sd_folder, images, out, steps=3):
    return ["--pretrained_model_name_or_path", sd_folder, "--train_data_dir", images, "--resolution", "32",
            "--output_dir", out, "--max_train_steps", steps, "--train_batch_size", "2", "--report_to", "none",
            "--checkpointing_steps", "2"]  # fmt: skip


def generate(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a picture", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images


def test_full_hold_fine_tune_converts_the_unet_and_saves_a_loadable_pipeline(sd_folder, captioned_images, tmp_path):
    out = tmp_path / "full"
    log = train([*common(sd_folder, captioned_images, out), "--use_ema", "--validation_steps", "3",
                 "--gradient_accumulation_steps", "2", "--gradient_checkpointing",
                 "--validation_prompts", "a picture", "--num_validation_images", "1",
                 "--validation_inference_steps", "3", "--snr_gamma", "5"])  # fmt: skip
    assert "steps: 100%" in log
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.unet, HOLDUNet2DConditionModel)
    assert isinstance(pipe.scheduler, HOLDScheduler) and pipe.unet.config.hold_order == 3
    # the saved scheduler config holds HOLD's keys only (it used to keep DDPM's, and every load warned about them)
    saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert {key for key in saved if not key.startswith("_")} <= set(HOLDScheduler().config)
    assert (out / "validation" / "step-0000003.png").exists()
    assert generate(pipe).shape == (1, 32, 32, 3)
    # training moved the weights of the auxiliary inputs away from their zero start
    assert pipe.unet.conv_in.weight[:, 4:].abs().max() > 0


def test_lora_fine_tune_saves_adapters_and_a_fused_pipeline(sd_folder, captioned_images, tmp_path):
    out = tmp_path / "lora"
    log = train([*common(sd_folder, captioned_images, out), "--use_lora", "--rank", "2", "--learning_rate", "1e-2",
                 "--mixed_precision", "bf16"])  # fmt: skip
    assert "mixed precision: bf16" in log  # frozen VAE and text encoder in bf16, CPU autocast
    adapters = load_file(out / "pytorch_lora_weights.safetensors")
    assert any("conv_in" in name for name in adapters) and any("to_q" in name for name in adapters)
    fused = DiffusionPipeline.from_pretrained(out)
    # the converted base plus the saved adapters generates what the fused pipeline generates
    base = StableDiffusionPipeline.from_pretrained(sd_folder)
    stock = base.scheduler.config
    base.unet = HOLDUNet2DConditionModel.from_unet(base.unet, order=3, scheduler_config=stock)
    base.scheduler = fused.scheduler
    base.load_lora_weights(out)
    state = torch.randn(2, 12, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = fused.unet(state, 400.0, text).sample
        torch.testing.assert_close(
            base.unet(state, 400.0, text).sample, expected, rtol=1e-4, atol=1e-4 * expected.abs().max()
        )
    assert generate(fused).shape == (1, 32, 32, 3)
    assert not torch.equal(fused.unet.conv_in.weight, base.unet.conv_in.base_layer.weight)


def test_ddpm_baseline_and_resume(sd_folder, captioned_images, tmp_path):
    out = tmp_path / "ddpm"
    train([*common(sd_folder, captioned_images, out, steps=2), "--scheduler", "ddpm"])
    log = train([*common(sd_folder, captioned_images, out, steps=4), "--scheduler", "ddpm",
                 "--resume_from_checkpoint", "latest"])  # fmt: skip
    assert "Resumed from" in log and "checkpoint-2" in log
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and type(pipe.scheduler).__name__ == "DDPMScheduler"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_cross_attention_aware_head_pruning_with_text_states(sd_folder, captioned_images, tmp_path):
    out = tmp_path / "pruned"
    train([*common(sd_folder, captioned_images, out, steps=2), "--scheduler", "ddpm", "--prune_heads_ratio", "0.25",
           "--prune_criterion", "taylor", "--prune_importance_images", "4"])  # fmt: skip
    unet = DiffusionPipeline.from_pretrained(out).unet
    # importance was measured with the captions' text states; a quarter of all heads (self and cross) is pruned
    assert len(pruned_heads(unet)) == round(0.25 * len(attention_heads(unet))) > 0


def test_lora_with_caption_mitigations_on_two_processes(sd_folder, captioned_images, tmp_path):
    out = tmp_path / "ddp"
    mitigations = ["--caption_randomization", "random_caption", "word_repetition", "--caption_randomization_p", "0.5",
                   "--text_embedding_noise", "0.1", "--cfg_gap_filter", "1000", "--anti_gradient_control"]  # fmt: skip
    log = train(
        [*common(sd_folder, captioned_images, out, steps=2), "--use_lora", *mitigations], num_processes=2, port=29611
    )
    assert "weights agree across 2 processes" in log
    assert "callback states agree" in log  # caption and noise generators, AGC bank
    assert isinstance(diffusers_hold.HOLDScheduler.from_pretrained(out / "scheduler"), HOLDScheduler)


def test_bad_input_fails_before_training(sd_folder, captioned_images, tmp_path):
    def fails(*args):
        command = [sys.executable, SCRIPT, *map(str, args)]
        out = subprocess.run(
            command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )
        assert out.returncode != 0
        return out.stderr

    base = common(sd_folder, captioned_images, tmp_path / "x", steps=1)
    assert "caption" in fails(*base, "--caption_column", "prompt")
    assert "multiple of 2" in fails(*base, "--resolution", "31")
    assert "--validation_prompts" in fails(*base, "--validation_steps", "1")
    assert "LoRA adapters are trained without EMA" in fails(*base, "--use_lora", "--use_ema")
    assert "LoRA adapters would add to the pruned heads" in fails(*base, "--use_lora", "--prune_heads_ratio", "0.2")
