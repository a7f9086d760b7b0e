"""The memorization audit: report files, known outcomes, the command line, the model card section."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler
from huggingface_hub import ModelCard
from PIL import Image

from diffusers_hold import HOLDPipeline, HOLDScheduler, hub
from diffusers_hold.audit import (
    AuditReport,
    audit_pipeline,
    default_num_inference_steps,
    generate_images,
)
from diffusers_hold.data import load_digits_images, write_digits_imagefolder
from diffusers_hold.image_data import load_image_folder
from diffusers_hold.models import OptimalEmpiricalDenoiser
from diffusers_hold.schedulers.scheduling_hold import RECOMMENDED_INFERENCE_STEPS, SOLVERS
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
    settings = {"num_samples": 5, "prompts": prompts, "batch_size": 2, "num_inference_steps": 2}
    # too few held-out images for the PCA features: an error before anything is generated, unless quality=False
    forwards = []
    hook = pipe.unet.register_forward_pre_hook(lambda *_: forwards.append(1))
    with pytest.raises(ValueError, match=r"5 held-out images \(at least 33\), 5 generated images \(at least 6\)"):
        audit_pipeline(pipe, train, held_out, tmp_path / "quality", **settings)
    assert not forwards and not (tmp_path / "quality" / "report.json").exists()
    hook.remove()
    report = audit_pipeline(pipe, train, held_out, tmp_path, quality=False, **settings)
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
    command += ["--num_inference_steps", "3", "--output_dir", tmp_path / "audit", "--skip_quality"]
    out = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "memorized generations" in out.stdout
    saved = json.loads((tmp_path / "audit" / "report.json").read_text())
    assert saved["memorization"]["num_train"] == 60 and saved["settings"]["image_shape"] == [1, 16, 16]

    train, _ = load_image_folder(train_data_dir=tmp_path / "train", resolution=16, num_channels=1)
    report = audit_pipeline(pipe, train, train[:10], tmp_path / "again", num_samples=2, num_inference_steps=3,
                            quality=False)  # fmt: skip
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


@pytest.fixture(scope="module")
def real_audit(digits, tmp_path_factory):
    """A real audit's report and folder: 8 generations of an untrained HOLD pipeline, 60 held-out images."""
    folder = tmp_path_factory.mktemp("audit")
    pipe = unconditional_pipeline()
    report = audit_pipeline(pipe, digits[:100], digits[100:160], folder, num_samples=8, num_inference_steps=3)
    return pipe, report, folder


def test_report_round_trips_through_report_json(real_audit):
    pipe, report, folder = real_audit
    assert report.quality is not None and report.memorization.held_out_ratio is not None  # every part is exercised
    for source in (folder, folder / "report.json"):
        loaded = AuditReport.load(source)
        assert loaded.to_dict() == report.to_dict()
        assert loaded.to_markdown() == report.to_markdown()
        mem, original = loaded.memorization, report.memorization
        for name in ("d1", "d2", "ratio", "nearest_index", "memorized", "copied_indices", "held_out_ratio"):
            assert torch.equal(getattr(mem, name), getattr(original, name)), name
    card = hub.create_model_card(pipe, memorization_audit=AuditReport.load(folder), repo_id="me/hold")
    assert str(card) == str(hub.create_model_card(pipe, memorization_audit=report, repo_id="me/hold"))


def drop(path):
    def edit(data):
        *parents, last = path.split(".")
        for key in parents:
            data = data[key]
        del data[last]

    return edit


def assign(path, value):
    def edit(data):
        *parents, last = path.split(".")
        for key in parents:
            data = data[key]
        data[last] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (drop("memorization.threshold"), r"has no `memorization\.threshold`"),
        (drop("settings.num_inference_steps"), r"has no `settings\.num_inference_steps`"),
        (drop("format_version"), r"has no `format_version`"),
        (assign("format_version", 2), r"has format_version 2; this version of diffusers-hold reads format_version 1"),
        (
            assign("settings.num_inference_steps", "250"),
            r"`settings\.num_inference_steps` must be an integer, got a s",
        ),
        (assign("settings.seed", True), r"`settings\.seed` must be an integer, got a boolean"),
        (assign("settings.num_inference_steps_source", "guess"), r"is 'guess'; expected one of scheduler, pipeline"),
        (assign("memorization", [1, 2]), r"`memorization` must be an object, got a list"),
        (assign("memorization.per_sample.ratio", [0.5] * 3), r"`memorization\.per_sample\.ratio` has 3 values but"),
        (
            assign("memorization.per_sample.memorized", [0] * 8),
            r"item 0 of `memorization\.per_sample\.memorized` must",
        ),
        (assign("quality.frechet_distance", None), r"`quality\.frechet_distance` must be a number, got null"),
        (assign("prompts", ["a cat"]), r"`prompts` has 1 values but `memorization\.num_generated` is 8"),
    ],
    ids=[
        "missing-key",
        "missing-setting",
        "no-version",
        "wrong-version",
        "string-for-int",
        "bool-for-int",
        "unknown-steps-source",
        "list-for-object",
        "short-per-sample-list",
        "int-for-bool",
        "null-for-number",
        "prompt-count",
    ],
)
def test_malformed_report_json_is_refused_naming_the_problem(real_audit, tmp_path, edit, problem):
    _, _, folder = real_audit
    data = json.loads((folder / "report.json").read_text())
    edit(data)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=problem) as error:
        AuditReport.load(path)
    assert str(path) in str(error.value)


def test_report_files_that_are_not_reports_are_refused(tmp_path):
    (tmp_path / "truncated.json").write_text('{"format_version": 1, "settings": {')
    with pytest.raises(ValueError, match=r"truncated\.json is not valid JSON"):
        AuditReport.load(tmp_path / "truncated.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object, not a list"):
        AuditReport.load(tmp_path / "list.json")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="not a JSON text file"):
        AuditReport.load(tmp_path / "binary.json")
    with pytest.raises(FileNotFoundError, match="diffusers-hold audit` writes report.json"):
        AuditReport.load(tmp_path / "missing")


def test_every_solver_states_a_recommended_step_count():
    assert set(RECOMMENDED_INFERENCE_STEPS) == set(SOLVERS)
    for solver in SOLVERS:
        scheduler = HOLDScheduler(solver=solver)
        assert scheduler.recommended_num_inference_steps == RECOMMENDED_INFERENCE_STEPS[solver]
        pipe = HOLDPipeline(unet=tiny_unet_2d(3, 1), scheduler=scheduler)
        assert default_num_inference_steps(pipe) == (RECOMMENDED_INFERENCE_STEPS[solver], "scheduler")


def test_an_under_sampled_memorizer_is_not_reported_as_less_memorized(digits, tmp_path, single_thread):
    """The exact empirical denoiser of 16 digits copies them; sampled through HOLD (order 3, SSCS, linear grid) at
    the audit's default settings its generations are flagged, as when sampled at 1000 steps, while 50 steps (the
    audit's former default) report almost no copying."""
    images, _ = load_digits_images(8)  # [-1, 1], as the pipeline's position block
    train, held_out = images[:16] / 2 + 0.5, images[1000:1040] / 2 + 0.5
    scheduler = HOLDScheduler.from_config(DDPMScheduler().config, order=3, prediction_type="vp_epsilon", solver="sscs")
    pipe = HOLDPipeline(unet=OptimalEmpiricalDenoiser.from_images(images[:16]), scheduler=scheduler)

    def audit(name, **kwargs):
        return audit_pipeline(pipe, train, held_out, tmp_path / name, num_samples=16, batch_size=16, **kwargs)

    default = audit("default")
    assert default.settings["num_inference_steps"] == 250 and default.settings["default_num_inference_steps"] == 250
    assert default.settings["num_inference_steps_source"] == "scheduler"
    assert (
        default.settings["scheduler"] == "HOLDScheduler" and default.settings["scheduler_config"]["solver"] == "sscs"
    )
    assert default.memorization.fraction_memorized >= 0.9 and default.memorization.held_out_fraction == 0.0
    proper = audit("proper", num_inference_steps=1000)
    assert proper.memorization.fraction_memorized >= 0.9
    assert default.memorization.fraction_memorized >= proper.memorization.fraction_memorized - 1 / 16

    under = audit("under", num_inference_steps=50)
    # the hazard the default avoids: sampled too coarsely, the perfect memorizer looks original
    assert under.memorization.fraction_memorized <= 0.1
    assert under.settings["num_inference_steps_source"] == "user"
    markdown = (tmp_path / "under" / "report.md").read_text()
    assert "50 steps (chosen for this audit; the default is 250, and fewer steps can under-report copying)" in markdown
    assert "(solver `sscs`, timestep spacing `linear`, HOLD order `3`), 250 steps" in default.to_markdown()


def test_a_stock_pipeline_keeps_its_own_default_step_count(digits, tmp_path):
    pipe = DDIMPipeline(unet=OptimalEmpiricalDenoiser.from_images(digits[:8] * 2 - 1), scheduler=DDIMScheduler())
    assert default_num_inference_steps(pipe) == (50, "pipeline")  # DDIMPipeline.__call__'s default
    report = audit_pipeline(
        pipe, digits[:8], digits[100:110], tmp_path, num_samples=2, num_inference_steps=None, quality=False
    )
    assert report.settings["num_inference_steps"] == 50 and report.settings["num_inference_steps_source"] == "pipeline"
    assert "50 steps (the default of `DDIMPipeline`)" in report.to_markdown()


def test_an_unwritable_output_folder_fails_before_anything_is_generated(tmp_path):
    pipe = unconditional_pipeline()
    forwards = []
    pipe.unet.register_forward_pre_hook(lambda *_: forwards.append(1))
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    images = torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=f"Cannot write the audit's files to {blocked}"):
        audit_pipeline(pipe, images[:8], images[8:], blocked, num_samples=8, num_inference_steps=2)
    assert not forwards and blocked.read_text() == "not a folder"
    # the command checks the folder before it loads the pipeline or any data
    pipe.save_pretrained(tmp_path / "pipe")
    command = [sys.executable, "-m", "diffusers_hold.cli", "audit", "--pipeline", str(tmp_path / "pipe"),
               "--train_data_dir", str(tmp_path / "missing"), "--held_out_dir", str(tmp_path / "missing"),
               "--output_dir", str(blocked / "audit")]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True)
    assert out.returncode != 0 and f"Cannot write the audit's files to {blocked / 'audit'}" in out.stderr
