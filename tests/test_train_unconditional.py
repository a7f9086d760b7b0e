"""training/train_unconditional_hold.py end to end under ``accelerate launch``: HOLD and DDPM, EMA, validation grids,
tensorboard, atomic checkpoints, exact resume after a kill, two processes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate_launch import ROOT, launch_command, run_script
from diffusers import DiffusionPipeline, UNet2DModel
from safetensors.torch import load_file

import diffusers_hold
from diffusers_hold.data import write_digits_imagefolder
from diffusers_hold.mitigations import attention_heads, pruned_heads

SCRIPT = ROOT / "training" / "train_unconditional_hold.py"
SMALL = ["--resolution", "16", "--num_channels", "1", "--block_out_channels", "8", "16", "--train_batch_size", "8"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits_imagefolder(tmp_path_factory.mktemp("data") / "digits", limit=64)


def run(args, **kwargs):
    return run_script(SCRIPT, args, **kwargs)


def fails(*args):
    """The script's stderr on a run that must fail (run without accelerate launch: it fails before training)."""
    out = subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0
    return out.stderr


def weights(folder):
    return load_file(Path(folder) / "unet" / "diffusion_pytorch_model.safetensors")


def test_hold_training_run_saves_a_loadable_pipeline_grids_logs_and_limited_checkpoints(digits, tmp_path):
    out = tmp_path / "run"
    args = [*SMALL, "--train_data_dir", digits, "--output_dir", out, "--max_train_steps", "6", "--use_ema"]
    args += ["--checkpointing_steps", "2", "--checkpoints_total_limit", "2", "--validation_steps", "3"]
    args += ["--num_validation_images", "4", "--validation_inference_steps", "4", "--snr_gamma", "5"]
    log = run(
        [*args, "--timestep_sampling", "snr_interval", "--snr_interval_low", "0.05", "--snr_interval_high", "0.5"]
    )
    assert "steps: 100%" in log and "loss=" in log and "lr=" in log  # the tqdm bar with loss and learning rate
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert not list(out.glob(".checkpoint-*"))
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-0000003.png", "step-0000006.png"]
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, diffusers_hold.HOLDPipeline) and isinstance(pipe.unet, diffusers_hold.HOLDUNet2DModel)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (2, 16, 16, 1) and np.isfinite(images.images).all()
    # the callbacks' and the EMA's state are safetensors + JSON beside the run's record, not accelerate's pickles
    names = {path.name for path in (out / "checkpoint-6").iterdir()}
    assert {"callbacks.json", "callbacks.safetensors", "ema.json", "ema.safetensors", "run.json"} <= names
    assert not [name for name in names if name.startswith("custom_checkpoint")]
    # another run in this folder is refused before it trains, and is told what differs and how to proceed
    other = [*args, "--seed", "1", "--report_to", "none"]
    assert "holds checkpoints of a run (checkpoint-4, checkpoint-6): resume it with" in fails(*other)
    message = fails(*other, "--resume_from_checkpoint", "latest")
    assert "checkpoint-6 was written by a run with other settings: " in message and "seed 0 there, 1 now" in message
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


def test_ddpm_baseline_from_the_same_script(digits, tmp_path):
    out = tmp_path / "ddpm"
    args = [*SMALL, "--train_data_dir", digits, "--output_dir", out, "--max_train_steps", "3", "--scheduler", "ddpm"]
    assert "mixed precision: bf16" in run([*args, "--mixed_precision", "bf16"])  # CPU autocast
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "DDPMPipeline" and pipe.unet.config.in_channels == 1


def test_resume_after_a_kill_gives_the_weights_of_an_uninterrupted_run(digits, tmp_path):
    common = [*SMALL, "--train_data_dir", digits, "--max_train_steps", "24", "--checkpointing_steps", "3"]
    common += ["--use_ema", "--random_flip", "--lr_scheduler", "cosine", "--report_to", "none"]
    common += ["--anti_gradient_control", "--agc_num_bins", "10"]  # its loss bank must resume exactly too
    run([*common, "--output_dir", tmp_path / "straight"])

    interrupted = tmp_path / "interrupted"
    command, env = launch_command(SCRIPT, [*common, "--output_dir", interrupted])
    process = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not (interrupted / "checkpoint-3").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and its training process
    process.wait()
    assert not (interrupted / "model_index.json").exists()  # it did not finish
    log = run([*common, "--output_dir", interrupted, "--resume_from_checkpoint", "latest"])
    assert "Resumed from" in log

    straight, resumed = weights(tmp_path / "straight"), weights(interrupted)
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0)


def test_two_processes_train_and_agree_on_the_weights_and_the_agc_bank(digits, tmp_path):
    out = tmp_path / "ddp"
    log = run(
        [*SMALL, "--train_data_dir", digits, "--output_dir", out, "--max_train_steps", "4", "--report_to", "none",
         "--anti_gradient_control"],
        num_processes=2,
    )  # fmt: skip
    assert "weights agree across 2 processes" in log
    assert "callback states agree" in log  # the AGC bank is shared through gathered losses
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_pruning_flags_prune_after_the_given_step_and_keep_the_heads_zero_in_the_saved_ema_model(digits, tmp_path):
    out = tmp_path / "pruned"
    args = [*SMALL, "--train_data_dir", digits, "--output_dir", out, "--max_train_steps", "4", "--report_to", "none"]
    args += ["--prune_heads_ratio", "0.5", "--prune_at_step", "2", "--use_ema", "--scheduler", "ddpm"]
    args += ["--checkpointing_steps", "4"]
    run(args)
    pipe = DiffusionPipeline.from_pretrained(out)  # the EMA weights
    heads = attention_heads(pipe.unet)
    # the default UNet: attention at width 16 with 8-channel heads, in 1 down, 1 mid and 2 up modules
    assert len(heads) == 8 and len(pruned_heads(pipe.unet)) == 4
    checkpoint = load_file(out / "checkpoint-4" / "model.safetensors")
    unet = UNet2DModel.from_config(pipe.unet.config)
    unet.load_state_dict(checkpoint)  # the trained (non-EMA) weights: the same heads pruned
    assert pruned_heads(unet) == pruned_heads(pipe.unet)
    assert not checkpoint["mid_block.attentions.0.to_out.0.weight"].eq(0).all()  # pruned heads only, not modules


def test_bad_input_fails_before_training(digits, tmp_path):
    base = [*SMALL[2:], "--output_dir", tmp_path / "x", "--max_train_steps", "1"]
    assert "not a multiple of 2" in fails(*base, "--train_data_dir", digits, "--resolution", "15")
    assert "contains no image files" in fails(*base, "--train_data_dir", tmp_path, "--resolution", "16")
    assert "--train_data_dir or --dataset_name" in fails(*base, "--resolution", "16")
    assert "no full batch" in fails(
        *base, "--train_data_dir", digits, "--resolution", "16", "--train_batch_size", "128"
    )


def test_resuming_past_max_train_steps_is_refused(digits, tmp_path):
    """It used to save the checkpoint's step-4 model as the result of a 2-step run, without a word."""
    common = [*SMALL, "--train_data_dir", digits, "--output_dir", tmp_path, "--report_to", "none"]
    run([*common, "--max_train_steps", "4", "--checkpointing_steps", "4"])
    stderr = fails(*common, "--max_train_steps", "2", "--resume_from_checkpoint", "latest")
    assert "Resumed at step 4, past this run's 2 updates" in stderr
