"""Publishing to the Hub: the save_for_hub layout loads by repo id in a fresh process that never imports
diffusers_hold, passes the checks diffusers makes on Hub repos, carries a valid model card, and bad folders are
refused before any network access. Everything runs offline, against a local Hugging Face cache."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, StableDiffusionImg2ImgPipeline
from diffusers.pipelines.pipeline_loading_utils import (
    _get_custom_components_and_folders,
    _get_ignore_patterns,
    filter_model_files,
)
from diffusers.utils import DIFFUSERS_DYNAMIC_MODULE_NAME
from huggingface_hub import ModelCard, constants
from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
from huggingface_hub.file_download import repo_folder_name

from diffusers_hold import HOLDPipeline, HOLDScheduler, HOLDUNet2DConditionModel
from diffusers_hold.hub import create_model_card, push_to_hub, save_for_hub, validate_hub_folder
from diffusers_hold.testing import tiny_stable_diffusion_pipeline, tiny_unet_2d

REPO_ID = "user/hold-repo"
COMMIT = hashlib.sha1(b"a commit of the test repo").hexdigest()
HOLD_CALL = {"batch_size": 2, "num_inference_steps": 4}
SD_CALL = {"prompt": "a cat", "num_inference_steps": 3}

# Runs in a fresh interpreter: loads REPO_ID as a Hub repo id from the offline cache, without importing diffusers_hold
LOAD_AND_SAMPLE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    repo_id, cache_dir, out_dir, call = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    assert "diffusers_hold" not in sys.modules
    pipe = DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True, cache_dir=cache_dir)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="np").images
    np.save(f"{out_dir}/images.npy", images)
    scheduler = type(pipe.scheduler)
    loaded = {
        "pipeline_class": f"{type(pipe).__module__}.{type(pipe).__name__}",
        "scheduler_class": f"{scheduler.__module__}.{scheduler.__name__}",
        "scheduler_config": {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")},
        "unet_class": f"{type(pipe.unet).__module__}.{type(pipe.unet).__name__}",
    }
    with open(f"{out_dir}/loaded.json", "w") as f:
        json.dump(loaded, f)
    """
)


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """Any request to the Hub raises OfflineModeIsEnabled (a ConnectionError), so no test can reach the network."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def tiny_hold_pipeline() -> HOLDPipeline:
    torch.manual_seed(0)
    unet = tiny_unet_2d(in_channels=3 * 1, out_channels=1)
    pipe = HOLDPipeline(unet=unet, scheduler=HOLDScheduler(order=3, T=6.0, solver="sscs"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_hold_stable_diffusion_pipeline():
    """A stock StableDiffusionPipeline whose UNet and scheduler come from diffusers_hold."""
    pipe = tiny_stable_diffusion_pipeline()
    pipe.unet = HOLDUNet2DConditionModel.from_unet(pipe.unet, order=3, scheduler_config=pipe.scheduler.config)
    pipe.scheduler = HOLDScheduler.from_config(pipe.scheduler.config, order=3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def hold_pipeline():
    return tiny_hold_pipeline()


@pytest.fixture(scope="module")
def sd_pipeline():
    return tiny_hold_stable_diffusion_pipeline()


@pytest.fixture(scope="module")
def hold_hub_folder(hold_pipeline, tmp_path_factory):
    return save_for_hub(hold_pipeline, tmp_path_factory.mktemp("hub") / "hold", repo_id=REPO_ID)


def sample(pipe, call: dict) -> np.ndarray:
    return pipe(**call, generator=torch.Generator().manual_seed(0), output_type="np").images


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def cache_as_hub_repo(folder: Path, cache_dir: Path, *, with_file_listing: bool) -> Path:
    """Lay `folder` out in a Hugging Face cache as commit COMMIT of REPO_ID's main branch, as a download would.

    With `with_file_listing`, also cache the repo's file listing (``trees/<commit>.json``), which a download writes and
    which ``DiffusionPipeline.download`` reads offline to make the same file-list checks as online.
    Returns the snapshot folder.
    """
    repo_cache = cache_dir / repo_folder_name(repo_id=REPO_ID, repo_type="model")
    snapshot = repo_cache / "snapshots" / COMMIT
    shutil.copytree(folder, snapshot)
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs" / "main").write_text(COMMIT)
    if with_file_listing:
        listing = {}
        for path in snapshot.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                listing[path.relative_to(snapshot).as_posix()] = TreeCacheEntry(
                    size=len(data), blob_id=git_blob_id(data)
                )
        write_tree_cache(str(repo_cache), COMMIT, listing)
    return snapshot


def load_in_fresh_process(cache_dir: Path, work_dir: Path, call: dict) -> tuple[np.ndarray, dict]:
    """Load REPO_ID from `cache_dir` in a fresh interpreter and sample with `call`; returns the images and what was
    loaded, with ``remote_code``: the files diffusers imported as remote code (it copies them to HF_MODULES_CACHE)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache_dir),
        "HF_HOME": str(work_dir / "hf_home"),  # keeps the user's token and settings out of the test
        "HF_MODULES_CACHE": str(work_dir / "hf_modules"),
    }
    env.pop("DIFFUSERS_DISABLE_REMOTE_CODE", None)
    result = subprocess.run(
        [sys.executable, "-c", LOAD_AND_SAMPLE, REPO_ID, str(cache_dir), str(work_dir), json.dumps(call)],
        env=env,
        cwd=work_dir,  # no folder named like the repo id here, so from_pretrained takes it as a repo id
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    images = np.load(work_dir / "images.npy", allow_pickle=False)
    loaded = json.loads((work_dir / "loaded.json").read_text())
    remote_code = work_dir / "hf_modules" / DIFFUSERS_DYNAMIC_MODULE_NAME / "local"
    loaded["remote_code"] = sorted(path.name for path in remote_code.glob("*.py") if path.name != "__init__.py")
    return images, loaded


def public_config(component) -> dict:
    return json.loads(json.dumps({k: v for k, v in component.config.items() if not k.startswith("_")}))


def test_hold_pipeline_loads_by_repo_id_with_trust_remote_code_and_samples_the_same_images(hold_pipeline, tmp_path):
    folder = save_for_hub(hold_pipeline, tmp_path / "hub")
    # Without the file listing, download()'s offline branch (diffusers 0.42.1) skips its file-list checks and goes
    # straight to snapshot_download. With it, the checks run, but fetching a root pipeline file then calls
    # model_info, which needs the network: the checks are covered offline by
    # test_diffusers_hub_checks_accept_the_hub_layout_and_reject_the_plain_one instead.
    cache_as_hub_repo(folder, tmp_path / "cache", with_file_listing=False)

    images, loaded = load_in_fresh_process(tmp_path / "cache", tmp_path, HOLD_CALL)

    assert loaded["pipeline_class"] == "diffusers_hold.pipelines.pipeline_hold.HOLDPipeline"
    assert loaded["scheduler_class"] == "diffusers_hold.schedulers.scheduling_hold.HOLDScheduler"
    assert loaded["scheduler_config"] == public_config(hold_pipeline.scheduler)
    assert loaded["unet_class"] == "diffusers.models.unets.unet_2d.UNet2DModel"
    # the scheduler came through its shim, not through a diffusers_hold that the pipeline file happened to import
    assert loaded["remote_code"] == ["pipeline_hold.py", "scheduling_hold.py"]
    assert np.array_equal(images, sample(hold_pipeline, HOLD_CALL))


def test_stable_diffusion_with_hold_components_loads_by_repo_id_through_all_download_checks(sd_pipeline, tmp_path):
    folder = save_for_hub(sd_pipeline, tmp_path / "hub")
    # the file listing is cached: download() makes its Hub file-list checks, then finds every file cached
    cache_as_hub_repo(folder, tmp_path / "cache", with_file_listing=True)

    images, loaded = load_in_fresh_process(tmp_path / "cache", tmp_path, SD_CALL)

    assert loaded["pipeline_class"].endswith(".StableDiffusionPipeline")
    assert loaded["scheduler_class"] == "diffusers_hold.schedulers.scheduling_hold.HOLDScheduler"
    assert loaded["scheduler_config"] == public_config(sd_pipeline.scheduler)
    assert loaded["unet_class"] == "diffusers_hold.models.unet_hold.HOLDUNet2DConditionModel"
    assert loaded["remote_code"] == ["scheduling_hold.py", "unet_hold.py"]
    assert np.array_equal(images, sample(sd_pipeline, SD_CALL))


def diffusers_hub_file_checks(folder: Path) -> tuple[dict, bool]:
    """The checks DiffusionPipeline.download makes on a Hub repo's file list before downloading (diffusers 0.42.1),
    called with diffusers' own functions on the files of `folder`.

    Returns the custom components (component -> shim module) and whether download() would fetch the pipeline class
    from a root file of the repo (`load_pipe_from_hub`).
    """
    config = json.loads((folder / "model_index.json").read_text())
    filenames = {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}
    custom_components, folder_names = _get_custom_components_and_folders(REPO_ID, config, filenames)
    model_folder_names = {
        os.path.split(f)[0] for f in filter_model_files(filenames) if os.path.split(f)[0] in folder_names
    }
    # as download(..., use_safetensors=True): raises when a model component has no safetensors weights
    _get_ignore_patterns(
        passed_components=[],
        model_folder_names=model_folder_names,
        model_filenames=filenames,
        use_safetensors=True,
        allow_pickle=False,
        use_onnx=None,
        is_onnx=False,
        use_flashpack=False,
    )
    custom_pipeline = config["_class_name"][0] if isinstance(config["_class_name"], list) else None
    return custom_components, custom_pipeline is not None and f"{custom_pipeline}.py" in filenames


def test_diffusers_hub_checks_accept_the_hub_layout_and_reject_the_plain_one(hold_pipeline, hold_hub_folder, tmp_path):
    custom_components, load_pipe_from_hub = diffusers_hub_file_checks(hold_hub_folder)
    assert custom_components == {"scheduler": "scheduling_hold"}
    assert load_pipe_from_hub
    validate_hub_folder(hold_hub_folder)

    plain = tmp_path / "plain"
    hold_pipeline.save_pretrained(plain, safe_serialization=True)
    with pytest.raises(ValueError, match=r"scheduler/diffusers_hold\.schedulers\.scheduling_hold\.py"):
        diffusers_hub_file_checks(plain)
    with pytest.raises(ValueError, match="save_for_hub"):
        validate_hub_folder(plain)


def test_diffusers_download_accepts_the_hub_layout_and_rejects_the_plain_one(sd_pipeline, tmp_path):
    # DiffusionPipeline.download itself, offline: with the file listing cached it makes the same checks as online
    hub_snapshot = cache_as_hub_repo(
        save_for_hub(sd_pipeline, tmp_path / "hub"), tmp_path / "hub_cache", with_file_listing=True
    )
    assert DiffusionPipeline.download(REPO_ID, cache_dir=tmp_path / "hub_cache", local_files_only=True) == hub_snapshot

    sd_pipeline.save_pretrained(tmp_path / "plain", safe_serialization=True)
    cache_as_hub_repo(tmp_path / "plain", tmp_path / "plain_cache", with_file_listing=True)
    with pytest.raises(ValueError, match=r"/diffusers_hold\.[a-z_.]+\.py as defined in `model_index.json` does not"):
        DiffusionPipeline.download(REPO_ID, cache_dir=tmp_path / "plain_cache", local_files_only=True)


def test_hub_layout_of_stable_diffusion_shims_only_the_hold_components(sd_pipeline, tmp_path):
    folder = save_for_hub(sd_pipeline, tmp_path / "hub")
    model_index = json.loads((folder / "model_index.json").read_text())
    assert model_index["_class_name"] == "StableDiffusionPipeline"
    assert model_index["unet"] == ["unet_hold", "HOLDUNet2DConditionModel"]
    assert model_index["scheduler"] == ["scheduling_hold", "HOLDScheduler"]
    assert model_index["vae"] == ["diffusers", "AutoencoderKL"]
    assert model_index["text_encoder"] == ["transformers", "CLIPTextModel"]
    shims = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*.py"))
    assert shims == ["scheduler/scheduling_hold.py", "unet/unet_hold.py"]
    assert diffusers_hub_file_checks(folder) == ({"scheduler": "scheduling_hold", "unet": "unet_hold"}, False)


def test_hub_layout_of_a_hold_pipeline_with_a_hold_unet_shims_all_three_classes(tmp_path):
    torch.manual_seed(0)
    unet = tiny_unet_2d(in_channels=1, out_channels=1, hold_order=2)
    folder = save_for_hub(HOLDPipeline(unet=unet, scheduler=HOLDScheduler(order=2)), tmp_path / "hub")

    model_index = json.loads((folder / "model_index.json").read_text())
    assert model_index["unet"] == ["unet_hold", "HOLDUNet2DModel"]
    assert (
        "from diffusers_hold.models.unet_hold import HOLDUNet2DModel" in (folder / "unet" / "unet_hold.py").read_text()
    )
    assert diffusers_hub_file_checks(folder) == ({"scheduler": "scheduling_hold", "unet": "unet_hold"}, True)
    hold_settings = ModelCard.load(folder / "README.md").data.hold
    assert hold_settings["unet"]["hold_order"] == 2 and hold_settings["scheduler"]["order"] == 2


def test_model_card_metadata_and_text(hold_pipeline, tmp_path):
    report = "| prompt | nearest neighbour distance |\n| --- | --- |\n| a cat | 0.42 |"
    folder = save_for_hub(
        hold_pipeline,
        tmp_path / "hub",
        base_model="someone/ddpm-digits",
        license="apache-2.0",
        tags=["digits"],
        extra_sections={"Memorization report": report},
        repo_id=REPO_ID,
    )
    card = ModelCard.load(folder / "README.md")

    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert card.data.tags == ["diffusers", "diffusers-hold", "hold", "unconditional-image-generation", "digits"]
    assert card.data.base_model == "someone/ddpm-digits"
    assert card.data.license == "apache-2.0"
    saved_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert card.data.hold == {"scheduler": {k: v for k, v in saved_config.items() if not k.startswith("_")}}
    assert card.data.hold["scheduler"]["T"] == 6.0 and card.data.hold["scheduler"]["solver"] == "sscs"

    assert f'DiffusionPipeline.from_pretrained("{REPO_ID}", trust_remote_code=True)' in card.text
    assert "pip install" in card.text and "diffusers-hold" in card.text
    assert "| `scheduler` | `solver` | `sscs` |" in card.text
    assert f"## Memorization report\n\n{report}" in card.text


def test_model_card_of_stable_diffusion_has_the_unet_hold_settings(sd_pipeline):
    card = create_model_card(sd_pipeline)

    assert card.data.pipeline_tag == "text-to-image"
    assert "text-to-image" in card.data.tags
    assert card.data.base_model is None
    unet_config = public_config(sd_pipeline.unet)
    assert card.data.hold["unet"] == {k: v for k, v in unet_config.items() if k.startswith("hold_")}
    assert card.data.hold["unet"]["hold_parameterization"] == "sufficient_statistic"
    scheduler_settings = card.data.hold["scheduler"]
    assert scheduler_settings.items() <= public_config(sd_pipeline.scheduler).items()
    assert scheduler_settings["beta_schedule"] == "scaled_linear"
    # leftovers of the stock DDPM config the scheduler was built from are not HOLD settings
    assert "clip_sample" in sd_pipeline.scheduler.config and "clip_sample" not in scheduler_settings
    assert '"<repo_id>", trust_remote_code=True' in card.text

    img2img_card = create_model_card(StableDiffusionImg2ImgPipeline(**sd_pipeline.components))
    assert img2img_card.data.pipeline_tag == "image-to-image"
    assert "image=init_image" in img2img_card.text


def test_model_card_keeps_long_lists_whole_in_the_metadata_and_summarised_in_the_table(hold_pipeline):
    betas = np.linspace(1e-4, 0.02, 1000).tolist()
    scheduler = HOLDScheduler(order=3, trained_betas=betas, prediction_type="vp_epsilon")
    card = create_model_card(HOLDPipeline(unet=hold_pipeline.unet, scheduler=scheduler))
    assert card.data.hold["scheduler"]["trained_betas"] == betas
    assert "| `scheduler` | `trained_betas` | 1000 values (see the `hold` metadata) |" in card.text


def test_pipelines_that_cannot_be_published_are_refused(hold_pipeline, tmp_path):
    stock = DDPMPipeline(unet=hold_pipeline.unet, scheduler=DDPMScheduler())
    with pytest.raises(ValueError, match="no component with HOLD settings"):
        save_for_hub(stock, tmp_path / "stock")

    class LocalPipeline(HOLDPipeline):  # its code lives in this test module, which a Hub repo cannot import
        pass

    local = LocalPipeline(unet=hold_pipeline.unet, scheduler=hold_pipeline.scheduler)
    with pytest.raises(ValueError, match="outside diffusers and diffusers-hold"):
        save_for_hub(local, tmp_path / "local")
    assert list(tmp_path.iterdir()) == []


def test_save_for_hub_refuses_to_overwrite_and_replaces_only_when_asked(hold_pipeline, tmp_path):
    target = tmp_path / "hub"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_for_hub(hold_pipeline, target)
    assert [path.name for path in target.iterdir()] == ["notes.txt"]

    save_for_hub(hold_pipeline, target, overwrite=True)
    assert not (target / "notes.txt").exists()
    validate_hub_folder(target)
    assert [path.name for path in tmp_path.iterdir()] == ["hub"]  # no staging folder left behind

    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="not a folder"):
        save_for_hub(hold_pipeline, tmp_path / "file", overwrite=True)


def test_save_for_hub_leaves_nothing_behind_when_saving_fails(monkeypatch, tmp_path):
    pipe = tiny_hold_pipeline()
    save_pretrained = pipe.save_pretrained

    def save_then_crash(directory, **kwargs):
        save_pretrained(directory, **kwargs)
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipe, "save_pretrained", save_then_crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_for_hub(pipe, tmp_path / "hub")
    assert list(tmp_path.iterdir()) == []


def drop_library_name(folder: Path) -> None:
    card = ModelCard.load(folder / "README.md")
    card.data.library_name = None
    card.save(folder / "README.md")


def corrupt_card_yaml(folder: Path) -> None:
    text = (folder / "README.md").read_text()
    (folder / "README.md").write_text(text.replace("library_name: diffusers", "library_name: [diffusers"))


def replace_shim(folder: Path) -> None:
    (folder / "scheduler" / "scheduling_hold.py").write_text("from diffusers_hold import HOLDPipeline\n")


def pickle_weights_only(folder: Path) -> None:
    unet = folder / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.bin")


@pytest.mark.parametrize(
    ("break_folder", "problem"),
    [
        (lambda folder: (folder / "scheduler" / "scheduling_hold.py").unlink(), r"scheduler/scheduling_hold\.py"),
        (lambda folder: (folder / "pipeline_hold.py").unlink(), r"pipeline_hold\.py"),
        (replace_shim, r"neither imports nor defines HOLDScheduler"),
        (lambda folder: (folder / "model_index.json").unlink(), r"has no model_index\.json"),
        (lambda folder: (folder / "model_index.json").write_text("{"), r"model_index\.json is not valid JSON"),
        (lambda folder: (folder / "README.md").unlink(), r"has no README\.md"),
        (drop_library_name, r"library_name: diffusers"),
        (corrupt_card_yaml, r"does not parse"),
        (pickle_weights_only, r"diffusers would refuse to download .*safetensors"),
    ],
    ids=[
        "missing-component-shim",
        "missing-pipeline-file",
        "shim-without-class",
        "missing-model-index",
        "broken-model-index",
        "missing-card",
        "card-without-library-name",
        "broken-card-yaml",
        "no-safetensors",
    ],
)
def test_validate_hub_folder_names_the_problem(hold_hub_folder, tmp_path, break_folder, problem):
    folder = Path(shutil.copytree(hold_hub_folder, tmp_path / "hub"))
    validate_hub_folder(folder)
    break_folder(folder)
    with pytest.raises(ValueError, match=problem):
        validate_hub_folder(folder)


def test_push_to_hub_refuses_before_any_network_access(hold_hub_folder, tmp_path):
    # offline_hub makes any request raise OfflineModeIsEnabled, a ConnectionError: a ValueError means it stopped first
    broken = Path(shutil.copytree(hold_hub_folder, tmp_path / "hub"))
    (broken / "scheduler" / "scheduling_hold.py").unlink()
    with pytest.raises(ValueError, match=r"scheduler/scheduling_hold\.py"):
        push_to_hub(broken, REPO_ID, token="hf_not_a_token")
    with pytest.raises(ValueError, match="has no model_index.json"):
        push_to_hub(tmp_path, REPO_ID, token="hf_not_a_token")
    with pytest.raises(ValueError, match="Repo id"):
        push_to_hub(hold_hub_folder, "not/a/repo id", token="hf_not_a_token")
