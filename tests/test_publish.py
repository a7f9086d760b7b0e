"""From training to a published, audited model card without Python: ``accelerate launch`` training, ``diffusers-hold
audit`` and ``diffusers-hold publish`` as a user runs them, offline. The upload goes to a local stand-in for the Hub
(``HF_ENDPOINT``), which answers the four requests ``push_to_hub`` makes and records what was committed; nothing of
huggingface_hub is replaced, but the real Hub's server-side checks are not exercised."""

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from accelerate_launch import ROOT, launch_command, run_script
from diffusers import DiffusionPipeline
from huggingface_hub import ModelCard, constants
from PIL import Image

from diffusers_hold import HOLDPipeline, HOLDScheduler, cli
from diffusers_hold.audit import AuditReport, audit_pipeline
from diffusers_hold.data import load_digits_images, write_digits_imagefolder
from diffusers_hold.hub import validate_hub_folder
from diffusers_hold.testing import tiny_unet_2d
from diffusers_hold.training_config import TrainingConfig
from diffusers_hold.training_loop import make_accelerator

SCRIPT = ROOT / "training" / "train_unconditional_hold.py"
REPO_ID = "user/hold-repo"
TOKEN = "hf_publish_test_token"


class FakeHub:
    """A local HTTP server that answers what ``HfApi.create_repo`` and ``upload_folder`` request (create the repo,
    validate the card's YAML, pre-upload: every file "regular", commit) and keeps each commit's files."""

    def __init__(self):
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Authorization header
        self.commits: list[dict[str, bytes]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def reply(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                hub.requests.append(("GET", self.path, self.headers.get("Authorization")))
                self.reply(404, {"error": "not found"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append(("POST", self.path, self.headers.get("Authorization")))
                if self.path == "/api/repos/create":
                    return self.reply(200, {"url": f"{hub.endpoint}/{REPO_ID}"})
                if self.path == "/api/validate-yaml":
                    return self.reply(200, {"errors": [], "warnings": []})
                if self.path.startswith(f"/api/models/{REPO_ID}/preupload/"):
                    files = [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for f in json.loads(body)["files"]
                    ]
                    return self.reply(200, {"files": files})
                if self.path.startswith(f"/api/models/{REPO_ID}/commit/"):
                    lines = [json.loads(line) for line in body.decode().splitlines() if line]
                    files = {
                        line["value"]["path"]: base64.b64decode(line["value"]["content"])
                        for line in lines
                        if line["key"] == "file"
                    }
                    hub.commits.append(files)
                    oid = "0" * 40
                    return self.reply(200, {"commitUrl": f"{hub.endpoint}/{REPO_ID}/commit/{oid}", "commitOid": oid})
                self.reply(404, {"error": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def cli_env(tmp_path: Path, **overrides) -> dict:
    """A user's environment with no stored login and no token, the Hub offline and caches inside `tmp_path`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    for name in ("HF_TOKEN", "HF_ENDPOINT", "HUGGING_FACE_HUB_TOKEN", "DIFFUSERS_DISABLE_REMOTE_CODE"):
        env.pop(name, None)
    return {**env, **overrides}


def run_cli(args, env, expect_success=True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "diffusers_hold.cli", *map(str, args)]
    out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if expect_success:
        assert out.returncode == 0, out.stderr[-3000:]
    else:
        assert out.returncode != 0, out.stdout[-2000:]
    return out


def write_held_out_digits(folder: Path, start: int, count: int) -> Path:
    images, _ = load_digits_images(16)
    folder.mkdir()
    for i in range(start, start + count):
        Image.fromarray(((images[i, 0] + 1) * 127.5).round().byte().numpy(), mode="L").save(folder / f"{i}.png")
    return folder


def test_train_audit_publish_and_push_from_the_command_line(tmp_path):
    train_dir = write_digits_imagefolder(tmp_path / "digits", limit=48)
    held_out_dir = write_held_out_digits(tmp_path / "held_out", start=100, count=40)
    run = tmp_path / "run"
    training_args = ["--resolution", "16", "--num_channels", "1", "--block_out_channels", "8", "16"]
    training_args += ["--train_batch_size", "8", "--train_data_dir", train_dir, "--output_dir", run]
    training_args += ["--max_train_steps", "2", "--checkpointing_steps", "2", "--report_to", "none"]
    run_script(SCRIPT, training_args)
    env = cli_env(tmp_path)
    run_cli(
        ["audit", "--pipeline", run, "--train_data_dir", train_dir, "--held_out_dir", held_out_dir]
        + ["--num_samples", "8", "--output_dir", tmp_path / "audit"],
        env,
    )
    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    trained = DiffusionPipeline.from_pretrained(run)
    # the audit sampled at the scheduler's recommendation for its solver, not at a fixed count
    recommended = trained.scheduler.recommended_num_inference_steps
    assert report["settings"]["num_inference_steps"] == recommended
    assert report["settings"]["num_inference_steps_source"] == "scheduler"

    with FakeHub() as hub:
        push_env = {**env, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": TOKEN}
        out = run_cli(
            ["publish", "--pipeline", run, "--audit", tmp_path / "audit" / "report.json"]
            + ["--license", "apache-2.0", "--repo_id", REPO_ID, "--output_dir", tmp_path / "hub", "--push"],
            push_env,
        )
    folder = tmp_path / "hub"
    assert f"uploaded: {hub.endpoint}/{REPO_ID}/commit/" in out.stdout
    validate_hub_folder(folder)

    # the card: the audit's numbers, its sampler settings and the feature spaces, and model-index metrics
    card = ModelCard.load(folder / "README.md")
    memorization = report["memorization"]
    section = card.text.split("## Memorization audit", 1)[1]
    assert f"| distinct training images copied | {memorization['distinct_copied']} |" in section
    assert f"{memorization['fraction_memorized']:.1%} |" in section
    assert f"`HOLDScheduler` (solver `{trained.scheduler.config.solver}`" in section
    assert f"{recommended} steps (the count `HOLDScheduler` recommends for its solver)" in section
    assert "pixel space (1x16x16 images" in section and "features of `PCAFeatures(n_components=32" in section
    metrics = {m["type"]: m["value"] for m in card.data.to_dict()["model-index"][0]["results"][0]["metrics"]}
    assert metrics["memorized_fraction"] == memorization["fraction_memorized"]
    assert metrics["frechet_distance"] == report["quality"]["frechet_distance"]
    assert card.data.license == "apache-2.0"

    # the upload: the repo was created with the token, and one commit holds exactly the folder's files
    assert ("POST", "/api/repos/create", f"Bearer {TOKEN}") in hub.requests
    files = {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    assert hub.commits == [files]
    # (that such a folder loads by repo id in a fresh interpreter and samples the same images: tests/test_hub.py)

    # the training script publishes the same way: the finished run, resumed, pushes with the audit in its card
    weights = (run / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    command, launch_env = launch_command(
        SCRIPT,
        [*training_args, "--resume_from_checkpoint", "latest"]
        + ["--push_to_hub", "--hub_model_id", REPO_ID]
        + ["--audit_report", tmp_path / "audit" / "report.json"],
    )
    with FakeHub() as hub:
        launch_env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.endpoint, HF_TOKEN=TOKEN, HF_HOME=env["HF_HOME"])
        out = subprocess.run(command, env=launch_env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    script_folder = run / "hub"
    files = {p.relative_to(script_folder).as_posix(): p.read_bytes() for p in script_folder.rglob("*") if p.is_file()}
    assert hub.commits == [files]
    script_card = ModelCard.load(script_folder / "README.md")
    assert script_card.text.split("## Memorization audit", 1)[1] == section
    assert files["unet/diffusion_pytorch_model.safetensors"] == weights  # the audited model, not trained further


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline") / "pipe"
    unet = tiny_unet_2d(in_channels=3, out_channels=1, sample_size=16)
    HOLDPipeline(unet=unet, scheduler=HOLDScheduler(order=3)).save_pretrained(folder)
    return folder


def test_push_to_an_unreachable_hub_fails_with_a_clear_message_after_writing_the_folder(saved_pipeline, tmp_path):
    args = ["publish", "--pipeline", saved_pipeline, "--repo_id", REPO_ID, "--output_dir", tmp_path / "hub", "--push"]
    offline = run_cli(args, cli_env(tmp_path, HF_TOKEN=TOKEN), expect_success=False)
    assert f"uploading {tmp_path / 'hub'} to {REPO_ID} failed (OfflineModeIsEnabled" in offline.stderr
    assert "The folder is complete and validated" in offline.stderr
    validate_hub_folder(tmp_path / "hub")


def test_publish_refuses_bad_arguments_before_writing(saved_pipeline, tmp_path, monkeypatch):
    def publish(*extra):
        with pytest.raises(SystemExit) as error:
            cli.main(["publish", "--pipeline", str(saved_pipeline), "--output_dir", str(tmp_path / "hub"), *extra])
        return str(error.value)

    # no login: no token in the environment, none stored
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_stored_token"))
    message = publish("--repo_id", REPO_ID, "--push")
    assert "--push needs a Hugging Face token; log in with `hf auth login`, set HF_TOKEN" in message
    assert "--push needs --repo_id" in publish("--push")
    assert "--repo_id 'not a repo'" in publish("--repo_id", "not a repo")
    assert "No audit report at" in publish("--audit", str(tmp_path / "missing.json"))
    (tmp_path / "report.json").write_text('{"pipeline_class": "HOLDPipeline"}')
    assert f"{tmp_path / 'report.json'} has no `format_version`" in publish("--audit", str(tmp_path / "report.json"))

    # a valid report of another pipeline
    pipe = DiffusionPipeline.from_pretrained(saved_pipeline)
    digits = load_digits_images(16)[0] / 2 + 0.5
    audit_pipeline(
        pipe, digits[:10], digits[10:20], tmp_path / "audit", num_samples=2, num_inference_steps=2, quality=False
    )
    report = json.loads((tmp_path / "audit" / "report.json").read_text())
    AuditReport.from_dict(report)
    report["pipeline_class"] = "StableDiffusionPipeline"
    (tmp_path / "other.json").write_text(json.dumps(report))
    message = publish("--audit", str(tmp_path / "other.json"))
    assert f"audits a StableDiffusionPipeline, but {saved_pipeline} holds a HOLDPipeline" in message
    assert not (tmp_path / "hub").exists()


def test_training_refuses_an_audit_report_before_training(tmp_path):
    with pytest.raises(ValueError, match="--audit_report goes into the model card of --push_to_hub"):
        make_accelerator(TrainingConfig(output_dir=str(tmp_path), report_to="none", audit_report="report.json"))
    (tmp_path / "report.json").write_text("[]")
    config = TrainingConfig(
        output_dir=str(tmp_path), report_to="none", push_to_hub=True, audit_report=str(tmp_path / "report.json")
    )
    with pytest.raises(ValueError, match="report.json must hold a JSON object, not a list"):
        make_accelerator(config)
