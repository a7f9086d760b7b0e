"""Run a training script under ``accelerate launch`` in a subprocess, on one process or on two CPU processes."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch_command(script, args, num_processes=1, port=29600):
    """The command and environment; two processes run on the CPU with gloo (``ACCELERATE_USE_CPU``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no"]
    command += ["--dynamo_backend", "no"]
    if num_processes > 1:
        env["ACCELERATE_USE_CPU"] = "true"
        command += ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", str(port)]
    else:
        command += ["--num_processes", "1"]
    return command + [str(script), *map(str, args)], env


def run_script(script, args, **kwargs):
    """Run to completion; returns stdout + stderr, or fails the test with the end of stderr."""
    command, env = launch_command(script, args, **kwargs)
    out = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr
