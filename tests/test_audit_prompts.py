"""The prompt-set protocol of the audit (issue 18 item 2): prompt files, references, the protocol's numbers, the
inference-time mitigations compared on the same seeds, the report, the command line.

Tiny real pipelines built offline (diffusers_hold.testing), tiny random DINOv2 / CLIP models saved locally and the
TorchScript stand-in for SSCD (each channel's mean, then a fixed orthonormal map), whose descriptor is computed here by
hand. Every number is checked against hand computation or against independent calls (a plain generation scored
directly with the metrics), never against the code's own earlier output.
"""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMPipeline, DDIMScheduler
from huggingface_hub import ModelCard
from PIL import Image

from diffusers_hold import HOLDPipeline, HOLDScheduler, hub
from diffusers_hold.audit import (
    INFERENCE_MITIGATIONS,
    AuditReport,
    PromptSet,
    audit_prompt_set,
    generate_images,
    load_reference_images,
    read_prompt_file,
)
from diffusers_hold.cli import main
from diffusers_hold.data import load_digits_images, write_digits_imagefolder
from diffusers_hold.metrics import (
    DINOv2Features,
    PCAFeatures,
    SSCDFeatures,
    clip_score,
    copy_detection,
    nn_ratio_memorization,
)
from diffusers_hold.mitigations import (
    AntiMemorizationGuidance,
    delayed_guidance,
    find_memorization_neurons,
    mask_value_neurons,
)
from diffusers_hold.models import OptimalEmpiricalDenoiser
from diffusers_hold.testing import (
    save_channel_mean_torchscript,
    save_tiny_clip,
    save_tiny_dinov2,
    tiny_stable_diffusion_pipeline,
    tiny_unet_2d,
)

pytestmark = pytest.mark.usefixtures("single_thread")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIDE = 32  # the tiny Stable Diffusion pipeline's images
STEPS = 2
PROJECTION = torch.linalg.qr(torch.rand(8, 3, generator=torch.Generator().manual_seed(2)) - 0.5)[0].T  # (3, 8)


# ------------------------------------------------------------------------------------------------ helpers
def rand_images(*shape, seed):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def hand_descriptor(images: torch.Tensor) -> torch.Tensor:
    """The SSCD stand-in by hand, for images already at its input size: ImageNet-normalised channel means, the fixed
    map, unit length."""
    means = torch.stack(
        [(images[:, c].double().mean(dim=(1, 2)) - IMAGENET_MEAN[c]) / IMAGENET_STD[c] for c in range(3)], dim=1
    )
    descriptor = means @ PROJECTION.double()
    return descriptor / descriptor.norm(dim=1, keepdim=True)


def save_png(image: torch.Tensor, path) -> torch.Tensor:
    """Save a ``(3, H, W)`` image in [0, 1] as an 8-bit PNG; return what the file holds, read back with PIL."""
    pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return torch.from_numpy(np.asarray(Image.open(path), dtype=np.float64) / 255).permute(2, 0, 1)


def plain_run(pipe, prompts, k, batch_size, seed=0, **kwargs):
    """What the protocol's "none" variant must generate: each prompt k times, in order, by generate_images."""
    expanded = [p for p in prompts for _ in range(k)]
    images, used = generate_images(
        pipe, len(expanded), prompts=expanded, batch_size=batch_size, num_inference_steps=STEPS, seed=seed, **kwargs
    )
    assert used == expanded
    return images, expanded


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sscd_path(tmp_path_factory):
    return save_channel_mean_torchscript(tmp_path_factory.mktemp("sscd") / "stand_in.torchscript.pt", PROJECTION)


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2") / "tiny-dinov2", image_size=16)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", image_size=16)


@pytest.fixture(scope="module")
def pipe():
    return tiny_stable_diffusion_pipeline()


# ------------------------------------------------------------------------------------------- prompt files
def test_plain_prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("  a red barn  \n\n  \nthe sea at night\r\n{not json\n")
    prompt_set = read_prompt_file(path)
    assert prompt_set.prompts == ["a red barn", "the sea at night", "{not json"]
    assert prompt_set.line_numbers == [1, 4, 5] and prompt_set.reference_images is None
    assert prompt_set.source == str(path) and len(prompt_set) == 3

    path.write_text("a cat\na dog\na cat\n")
    with pytest.raises(ValueError, match=r"line 3 of .*prompts\.txt repeats the prompt of line 1 of .*'a cat'"):
        read_prompt_file(path)
    path.write_text('{"prompt": "a cat"}\n')
    with pytest.raises(ValueError, match=r"Line 1 of .*prompts\.txt is a JSON object.*name it \*\.jsonl"):
        read_prompt_file(path)
    path.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompt_file(path)
    with pytest.raises(ValueError, match=r"missing\.txt' does not exist"):
        read_prompt_file(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="a single string"):
        PromptSet("a cat")


def test_jsonl_prompt_file_with_reference_images(tmp_path):
    (tmp_path / "refs").mkdir()
    held = {}
    for name, seed in (("a.png", 0), ("refs/b.png", 1), ("refs/c.png", 2)):
        held[name] = save_png(rand_images(3, 40, 32, seed=seed), tmp_path / name)
    absolute = tmp_path / "refs" / "c.png"
    lines = [
        {"prompt": "a cat", "reference_images": "a.png", "url": "ignored"},
        {"prompt": "a dog", "reference_images": ["refs/b.png", str(absolute)]},
    ]
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n")
    prompt_set = read_prompt_file(path)
    assert prompt_set.prompts == ["a cat", "a dog"] and prompt_set.line_numbers == [1, 3]
    assert prompt_set.reference_images == [[tmp_path / "a.png"], [tmp_path / "refs" / "b.png", absolute]]

    images, owners = load_reference_images(prompt_set, resolution=16, num_channels=3)
    assert images.shape == (3, 3, 16, 16) and owners == [0, 1, 1]
    # 40 x 32 -> short side 16: 20 x 16 (bilinear), centre crop rows 2..18; as PIL does it
    expected = Image.open(tmp_path / "refs" / "b.png").resize((16, 20), Image.Resampling.BILINEAR).crop((0, 2, 16, 18))
    expected = torch.from_numpy(np.asarray(expected, dtype=np.float64) / 255).permute(2, 0, 1)
    torch.testing.assert_close(images[1].double(), expected, atol=1e-6, rtol=0)
    grey, _ = load_reference_images(prompt_set, resolution=16, num_channels=1)
    assert grey.shape == (3, 1, 16, 16)


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        (['{"prompt": "a"}', "{broken"], r"line 2 of .*bad\.jsonl is not a JSON object: '\{broken'"),
        (['{"prompt": "a"}', "[1, 2]"], r"line 2 of .*bad\.jsonl is not a JSON object"),
        (['{"text": "a"}'], r"line 1 of .*bad\.jsonl has no `prompt` string \(keys: text\)"),
        (['{"prompt": ""}'], r"line 1 of .*bad\.jsonl has no `prompt` string"),
        (['{"prompt": "a", "reference_images": [3]}'], r"line 1 of .*bad\.jsonl: `reference_images` must be a path"),
        (['{"prompt": "a", "reference_images": "gone.png"}'], r"line 1 of .*: the reference image 'gone.png' does"),
        (
            ['{"prompt": "a", "reference_images": "ok.png"}', '{"prompt": "b"}'],
            r"Line 2 of .*bad\.jsonl lacks `reference_images` but line 1 has them",
        ),
        (['{"prompt": "a"}', '{"prompt": "a"}'], r"line 2 of .*bad\.jsonl repeats the prompt of line 1"),
    ],
    ids=[
        "invalid-json",
        "not-an-object",
        "no-prompt",
        "empty-prompt",
        "bad-references",
        "missing-image",
        "mixed",
        "repeated",
    ],  # fmt: skip
)
def test_bad_jsonl_lines_are_named_with_file_and_line(tmp_path, lines, problem):
    save_png(rand_images(3, 8, 8, seed=0), tmp_path / "ok.png")
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=problem):
        read_prompt_file(path)


def test_reference_dir_layout(tmp_path):
    folder = tmp_path / "references"
    for name, count in (("0", 2), ("001", 1), ("2", 1)):
        (folder / name).mkdir(parents=True)
        for i in range(count):
            save_png(rand_images(3, 8, 8, seed=i), folder / name / f"{i}.png")
    (folder / "2" / "notes.txt").write_text("not an image")
    (folder / "README.md").write_text("files beside the sub-folders are ignored")
    prompt_set = PromptSet(["a", "b", "c"]).with_reference_dir(folder)
    assert prompt_set.reference_images == [
        [folder / "0" / "0.png", folder / "0" / "1.png"],
        [folder / "001" / "0.png"],
        [folder / "2" / "0.png"],
    ]
    with pytest.raises(ValueError, match=r"no sub-folder 3 for prompt 3 \('d'\)"):
        PromptSet(["a", "b", "c", "d"]).with_reference_dir(folder)
    with pytest.raises(ValueError, match=r"references/2 is not named by the position of a prompt: .* 0 to 1"):
        PromptSet(["a", "b"]).with_reference_dir(folder)
    (folder / "3").mkdir()
    with pytest.raises(ValueError, match=r"references/3 holds no image files \(for prompt 3\)"):
        PromptSet(["a", "b", "c", "d"]).with_reference_dir(folder)
    (folder / "02").mkdir()
    with pytest.raises(ValueError, match="name the same prompt 2"):
        PromptSet(["a", "b", "c", "d"]).with_reference_dir(folder)
    with pytest.raises(ValueError, match="already lists reference_images"):
        prompt_set.with_reference_dir(folder)
    with pytest.raises(ValueError, match="does not exist"):
        PromptSet(["a"]).with_reference_dir(tmp_path / "nowhere")


# ------------------------------------------------------------------------------ the protocol, by hand
def test_per_prompt_references_grouping_and_threshold_by_hand(tmp_path, pipe, sscd_path):
    """Three prompts, two images each, in batches of 4 that straddle prompts; each prompt's references in a JSONL
    file: an 8-bit copy of one generation, a mirrored copy of another (the stand-in is invariant to mirroring by
    construction) and unrelated images. No training images: the 1/3 rule runs against the references pooled."""
    prompts = ["a red cat", "a blue dog", "green"]
    generated, expanded = plain_run(pipe, prompts, k=2, batch_size=4, seed=3)
    references = [
        save_png(generated[1], tmp_path / "copy.png"),
        save_png(rand_images(3, SIDE, SIDE, seed=10), tmp_path / "other0.png"),
        save_png(rand_images(3, SIDE, SIDE, seed=11), tmp_path / "other1.png"),
        save_png(generated[4].flip(-1), tmp_path / "mirror.png"),
    ]
    owners = [0, 0, 1, 2]
    records = [["copy.png", "other0.png"], ["other1.png"], ["mirror.png"]]
    lines = [json.dumps({"prompt": p, "reference_images": r}) for p, r in zip(prompts, records, strict=True)]
    (tmp_path / "set.jsonl").write_text("\n".join(lines) + "\n")

    # by hand: each generation's best cosine similarity among its own prompt's references
    generated_descriptors, reference_descriptors = hand_descriptor(generated), hand_descriptor(torch.stack(references))
    cosine = generated_descriptors @ reference_descriptors.T
    own = torch.tensor([[owners[r] == g // 2 for r in range(4)] for g in range(6)])
    best = cosine.masked_fill(~own, -2.0).max(dim=1).values
    assert best[1] > 0.9999 and best[4] > 0.9999  # the copy and the mirrored copy
    ranked = sorted(best.tolist())
    threshold = (ranked[2] + ranked[3]) / 2  # between the third and fourth: three copies by construction
    assert ranked[3] - ranked[2] > 1e-4

    report = audit_prompt_set(
        pipe,
        tmp_path / "audit",
        prompts=read_prompt_file(tmp_path / "set.jsonl"),
        images_per_prompt=2,
        features="sscd",
        features_path=sscd_path,
        feature_kwargs={"image_size": SIDE, "device": "cpu"},
        copy_threshold=threshold,
        batch_size=4,
        num_inference_steps=STEPS,
        seed=3,
        n_bootstrap=200,
    )
    section = report.protocol["none"]
    copies = section.copy_detection
    assert report.prompts == expanded and copies.prompts == prompts
    assert copies.prompt_index.tolist() == [0, 0, 1, 1, 2, 2] and copies.prompt_num_generations.tolist() == [2, 2, 2]
    torch.testing.assert_close(copies.max_similarity.double(), best, atol=1e-5, rtol=0)
    assert copies.copied.tolist() == (best > threshold).tolist() and sum(copies.copied.tolist()) == 3
    pairs = best.view(3, 2)
    torch.testing.assert_close(copies.prompt_max_similarity, pairs.max(1).values, atol=1e-5, rtol=0)
    torch.testing.assert_close(copies.prompt_top_k_mean, pairs.mean(1), atol=1e-5, rtol=0)  # top-3 of 2: both
    assert copies.prompt_fraction_copied.tolist() == (pairs > threshold).double().mean(1).tolist()
    assert copies.mean_max_similarity == pytest.approx(float(pairs.max(1).values.mean()), abs=1e-5)
    assert copies.fraction_copied == 0.5 and copies.per_prompt_references and copies.num_references == 4
    # the bootstrap intervals of an independent copy_detection call on the hand-made descriptors
    independent = copy_detection(
        generated_descriptors,
        reference_descriptors,
        expanded,
        reference_prompt_ids=[prompts[o] for o in owners],
        threshold=threshold,
        n_bootstrap=200,
        seed=3,
    )
    for name in ("mean_max_similarity_interval", "mean_top_k_interval", "fraction_copied_interval"):
        assert getattr(copies, name) == pytest.approx(getattr(independent, name), abs=1e-5), name
    # the 1/3 rules against the references pooled, in pixel space and on unit-length descriptors
    assert section.nn_reference == "references" and section.references == "per_prompt"
    pixels = nn_ratio_memorization(generated, torch.stack(references).float())
    torch.testing.assert_close(section.memorization.d1, pixels.d1, atol=2e-3, rtol=0)  # 8-bit references
    in_features = nn_ratio_memorization(generated_descriptors, reference_descriptors)
    torch.testing.assert_close(section.feature_memorization.ratio, in_features.ratio, atol=1e-4, rtol=0)
    assert section.features_normalised and section.feature_memorization.held_out_ratio is None
    assert report.quality is None and report.memorization is section.memorization  # no held-out images
    assert "reference images (all prompts' pooled; no training images given)" in report.to_markdown()


@pytest.fixture(scope="module")
def comparison(tmp_path_factory, pipe, sscd_path, clip_dir):
    """One audit comparing every mitigation that applies to a text-to-image pipeline, with the CLIP score, against
    training images, with held-out images as the control."""
    folder = tmp_path_factory.mktemp("comparison")
    train = rand_images(5, 3, SIDE, SIDE, seed=20)
    held_out = rand_images(4, 3, SIDE, SIDE, seed=21)
    settings = dict(
        prompts=["a cat", "a dog"],
        train_images=train,
        held_out_images=held_out,
        images_per_prompt=2,
        features="sscd",
        features_path=sscd_path,
        feature_kwargs={"image_size": SIDE},
        clip_model_path=clip_dir,
        nemo_reference_prompts=["sky", "a tree", "two boats", "3 apples"],
        nemo_z_threshold=1.0,
        batch_size=4,
        num_inference_steps=STEPS,
        n_bootstrap=100,
        quality=False,
    )
    mitigations = ["none", "delayed_guidance", "amg", "nemo"]
    report = audit_prompt_set(pipe, folder, mitigations=mitigations, **settings)
    return report, folder, settings


def scored(pipe, images, expanded, settings, sscd_path):
    """Copy detection of ``images`` against the training images, computed directly."""
    extractor = SSCDFeatures.from_torchscript(sscd_path, image_size=SIDE, device="cpu")
    return copy_detection(extractor(images), extractor(settings["train_images"]), expanded, n_bootstrap=100)


def test_mitigations_compared_on_the_same_seeds(comparison, pipe, sscd_path):
    report, _, settings = comparison
    assert list(report.protocol) == ["none", "delayed_guidance", "amg", "nemo"]
    plain, expanded = plain_run(pipe, settings["prompts"], k=2, batch_size=4)
    none = report.protocol["none"]
    assert none.mitigation_settings["guidance_scale"] == 7.5  # the pipeline's default
    torch.testing.assert_close(none.copy_detection.max_similarity, scored(pipe, plain, expanded, settings, sscd_path)
                               .max_similarity, atol=1e-6, rtol=0)  # fmt: skip

    # delayed guidance: the plain run inside the schedule's hook (no guidance while t > 500, then 7.5)
    with delayed_guidance(pipe.unet, 7.5, start_timestep=500, scale=7.5):
        delayed, _ = plain_run(pipe, settings["prompts"], k=2, batch_size=4)
    section = report.protocol["delayed_guidance"]
    expected = scored(pipe, delayed, expanded, settings, sscd_path).max_similarity
    torch.testing.assert_close(section.copy_detection.max_similarity, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(section.copy_detection.max_similarity, none.copy_detection.max_similarity)
    assert section.mitigation_settings["start_timestep"] == 500

    # AMG against the training images' latents (mean of the latent distribution times the VAE's scaling factor)
    with torch.no_grad():
        latents = pipe.vae.encode(2 * settings["train_images"] - 1).latent_dist.mean * pipe.vae.config.scaling_factor
    with AntiMemorizationGuidance(pipe.unet, pipe.scheduler, latents, guidance_scale=7.5):
        guided, _ = plain_run(pipe, settings["prompts"], k=2, batch_size=4)
    expected = scored(pipe, guided, expanded, settings, sscd_path).max_similarity
    torch.testing.assert_close(report.protocol["amg"].copy_detection.max_similarity, expected, atol=1e-6, rtol=0)
    assert report.protocol["amg"].mitigation_settings["space"] == "latents"


def test_nemo_masks_each_prompts_own_neurons(comparison, pipe, sscd_path):
    """The NeMo variant equals, prompt by prompt, a run with that prompt's neurons zeroed in the weights, found by
    find_memorization_neurons on the pipeline's own prompt embeddings."""
    report, _, settings = comparison
    section = report.protocol["nemo"]
    references, _ = pipe.encode_prompt(settings["nemo_reference_prompts"], "cpu", 1, False)
    counts = []
    for p, prompt in enumerate(settings["prompts"]):
        states, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        neurons = find_memorization_neurons(pipe.unet, states, references, z_threshold=1.0)
        counts.append(sum(len(found) for found in neurons.values()))
        masked = copy.deepcopy(pipe)
        mask_value_neurons(masked.unet, neurons)
        images, expanded = plain_run(masked, settings["prompts"], k=2, batch_size=4)  # the same batch as the audit
        expected = scored(pipe, images, expanded, settings, sscd_path).max_similarity
        rows = slice(2 * p, 2 * p + 2)
        torch.testing.assert_close(section.copy_detection.max_similarity[rows], expected[rows], atol=1e-6, rtol=0)
    assert min(counts) > 0 and section.mitigation_settings["masked_neurons_per_prompt"] == counts
    assert not torch.equal(
        section.copy_detection.max_similarity, report.protocol["none"].copy_detection.max_similarity
    )


def test_nemo_without_neurons_to_mask_equals_the_plain_run(pipe, sscd_path, tmp_path):
    train = rand_images(3, 3, SIDE, SIDE, seed=30)
    report = audit_prompt_set(
        pipe, tmp_path, prompts=["a cat"], train_images=train, images_per_prompt=3, features="sscd",
        features_path=sscd_path, feature_kwargs={"image_size": SIDE}, mitigations=["none", "nemo"],
        nemo_reference_prompts=["x", "y"], nemo_z_threshold=1e9, batch_size=2, num_inference_steps=STEPS,
        n_bootstrap=10, quality=False,
    )  # fmt: skip
    none, nemo = report.protocol["none"], report.protocol["nemo"]
    assert nemo.mitigation_settings["masked_neurons_per_prompt"] == [0]
    assert torch.equal(none.copy_detection.max_similarity, nemo.copy_detection.max_similarity)
    assert torch.equal(none.memorization.d1, nemo.memorization.d1)


def test_clip_score_and_feature_space_rule_by_independent_calls(comparison, pipe, sscd_path, clip_dir):
    report, _, settings = comparison
    plain, expanded = plain_run(pipe, settings["prompts"], k=2, batch_size=4)
    section = report.protocol["none"]
    scores = clip_score(plain, expanded, clip_dir, device="cpu")
    torch.testing.assert_close(section.clip_score, scores, atol=1e-4, rtol=0)
    torch.testing.assert_close(section.prompt_clip_score, scores.double().view(2, 2).mean(1), atol=1e-4, rtol=0)
    assert section.clip_score_mean == pytest.approx(float(scores.double().mean()), abs=1e-4)
    assert section.clip_model == "tiny-clip"  # the folder's name, not the local path
    low, high = section.clip_score_interval
    assert min(section.prompt_clip_score) - 1e-9 <= low <= section.clip_score_mean <= high <= max(
        section.prompt_clip_score) + 1e-9  # fmt: skip
    # the 1/3 rule on unit-length descriptors, with the held-out control
    extractor = SSCDFeatures.from_torchscript(sscd_path, image_size=SIDE, device="cpu")
    unit = [F.normalize(extractor(x), dim=1) for x in (plain, settings["train_images"], settings["held_out_images"])]
    expected = nn_ratio_memorization(*unit)
    torch.testing.assert_close(section.feature_memorization.ratio, expected.ratio, atol=1e-5, rtol=0)
    torch.testing.assert_close(section.feature_memorization.held_out_ratio, expected.held_out_ratio, atol=1e-5, rtol=0)
    pixels = nn_ratio_memorization(plain, settings["train_images"], settings["held_out_images"])
    torch.testing.assert_close(section.memorization.ratio, pixels.ratio, atol=1e-6, rtol=0)
    assert report.memorization is section.memorization


def hold_pipeline():
    unet = tiny_unet_2d(in_channels=3, out_channels=1, sample_size=16)
    return HOLDPipeline(unet=unet, scheduler=HOLDScheduler(order=3))


def test_report_files_markdown_and_model_card(comparison):
    report, folder, _ = comparison
    names = ["none", "delayed_guidance", "amg", "nemo"]
    for name in names:
        assert (folder / f"copies_{name}.png").exists() and report.files[f"copies_{name}"].endswith(f"{name}.png")
    assert (folder / "copies.png").exists() and (folder / "ratio_histogram.png").exists()
    markdown = (folder / "report.md").read_text()
    assert "| metric | `none` | `delayed_guidance` | `amg` | `nemo` |" in markdown
    assert "in **SSCD** features (`SSCDFeatures('stand_in.torchscript.pt', image_size=32" in markdown
    assert "2 prompts x 2 images, the same seeds for every variant" in markdown
    assert "| CLIP score (`tiny-clip`) |" in markdown and "same, held-out real images (control)" in markdown
    none = report.protocol["none"].copy_detection
    assert f"| {none.fraction_copied:.4f} [{none.fraction_copied_interval[0]:.4f}," in markdown
    # the card of a diffusers-hold pipeline carries report.to_markdown() as its section
    card = hub.create_model_card(hold_pipeline(), memorization_audit=report, repo_id="me/hold")
    section = card.text.split("## Memorization audit", 1)[1]
    assert "### Prompt-set protocol" in section and "`delayed_guidance`" in section
    metrics = ModelCard(str(card)).data.to_dict()["model-index"][0]["results"][0]["metrics"]
    by_type = {m["type"]: m for m in metrics}
    assert by_type["copy_fraction"]["value"] == none.fraction_copied
    assert "SSCD, mitigation none" in by_type["copy_fraction"]["name"]
    assert by_type["clip_score"]["value"] == report.protocol["none"].clip_score_mean
    assert {"memorized_fraction", "distinct_copied", "mean_max_similarity"} <= set(by_type)


def test_report_round_trips_through_report_json(comparison):
    report, folder, _ = comparison
    loaded = AuditReport.load(folder)
    assert loaded.to_dict() == report.to_dict() and loaded.to_markdown() == report.to_markdown()
    for name, section in report.protocol.items():
        again = loaded.protocol[name]
        for field in ("max_similarity", "nearest_reference", "copied", "prompt_index", "prompt_num_generations",
                      "prompt_max_similarity", "prompt_top_k_mean", "prompt_fraction_copied"):  # fmt: skip
            expected = getattr(section.copy_detection, field)
            assert torch.equal(getattr(again.copy_detection, field), expected) and expected.dtype == getattr(
                again.copy_detection, field).dtype, field  # fmt: skip
        assert torch.equal(again.clip_score, section.clip_score)
        assert torch.equal(again.feature_memorization.held_out_ratio, section.feature_memorization.held_out_ratio)
    # a report without the protocol has no `protocol` key (format 1 as before) and loads
    data = report.to_dict()
    del data["protocol"]
    assert AuditReport.from_dict(data).protocol is None


def edit(path, value=None, delete=False):
    def apply(data):
        *parents, last = path.split(".")
        for key in parents:
            data = data[int(key)] if isinstance(data, list) else data[key]
        if delete:
            del data[last]
        elif isinstance(data, list):
            data[int(last)] = value
        else:
            data[last] = value

    return apply


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (edit("protocol.amg.mitigation", "none"), r"`protocol\.amg\.mitigation` is 'none', not 'amg'"),
        (edit("protocol.none.features", "inception"), r"`protocol\.none\.features` is 'inception'; expected one of"),
        (edit("protocol.none.copy_detection.per_sample.max_similarity", [0.5]), r"max_similarity` has 1 values but"),
        (edit("protocol.none.copy_detection.per_prompt.0.prompt", "a bird"), r"`protocol\.none\.copy_detection\.per"),
        (edit("protocol.nemo.copy_detection.fraction_copied_interval", [0.9, 0.1]), r"must be \[low, high\]"),
        (edit("protocol.none.clip_score.per_sample", [1.0]), r"`protocol\.none\.clip_score\.per_sample` has 1 values"),
        (edit("protocol.none.copy_detection.top_k", delete=True), r"has no `protocol\.none\.copy_detection\.top_k`"),
        (edit("protocol.none.timings.generation_s", "fast"), r"`protocol\.none\.timings\.generation_s` must be a n"),
        (edit("protocol", {}), r"`protocol` is empty"),
    ],
    ids=["name", "features", "short-list", "prompt-mismatch", "interval", "clip-length", "missing", "timing", "empty"],
)
def test_malformed_protocol_sections_are_refused(comparison, tmp_path, change, problem):
    _, folder, _ = comparison
    data = json.loads((folder / "report.json").read_text())
    change(data)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=problem) as error:
        AuditReport.load(path)
    assert str(path) in str(error.value)


# ------------------------------------------------------------------------------------------ unconditional
@pytest.fixture(scope="module")
def digits():
    images, _ = load_digits_images(16)
    return images / 2 + 0.5


def test_unconditional_pipeline_amg_against_the_memorizer(digits, tmp_path):
    """The exact memorizer of 8 digits copies them; AMG keeps its samples away, on the same seeds. Unconditional:
    each generation is its own group. PCA features fitted on held-out digits, as they are (L2)."""
    train, held_out = digits[:8], digits[100:140]
    pipe = DDIMPipeline(unet=OptimalEmpiricalDenoiser.from_images(train * 2 - 1), scheduler=DDIMScheduler())
    report = audit_prompt_set(
        pipe, tmp_path, train_images=train, held_out_images=held_out, num_samples=6, mitigations=["none", "amg"],
        batch_size=3, num_inference_steps=20, n_bootstrap=50,
    )  # fmt: skip
    none, amg = report.protocol["none"], report.protocol["amg"]
    # exact copies without; with AMG, every generation at least a quarter of the way to its second-nearest
    assert none.memorization.fraction_memorized == 1.0 and float(none.memorization.ratio.max()) < 1e-6
    assert float(amg.memorization.ratio.min()) > 0.25
    assert amg.memorization.fraction_memorized < 1.0 and amg.copy_detection.mean_max_similarity < 0.99
    assert none.copy_detection.prompts == list(range(6)) and none.images_per_prompt is None
    plain, _ = generate_images(pipe, 6, batch_size=3, num_inference_steps=20, seed=0)
    pca = PCAFeatures(n_components=32).fit(held_out)
    expected = nn_ratio_memorization(pca(plain), pca(train), pca(held_out))
    torch.testing.assert_close(none.feature_memorization.ratio, expected.ratio.float(), atol=1e-5, rtol=0)
    assert not none.features_normalised and "PCAFeatures(n_components=32, fitted on 40" in none.feature_extractor
    per_sample = copy_detection(pca(plain), pca(train), list(range(6)), n_bootstrap=50)
    torch.testing.assert_close(none.copy_detection.prompt_max_similarity, per_sample.max_similarity.double(),
                               atol=1e-5, rtol=0)  # fmt: skip
    assert report.quality is not None and AuditReport.load(tmp_path).to_dict() == report.to_dict()


def test_mitigations_that_do_not_apply_are_refused_before_generating(digits, pipe, tmp_path):
    hold = hold_pipeline()
    calls = []
    hold.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    common = dict(train_images=digits[:8], held_out_images=digits[100:140], num_inference_steps=STEPS)
    for name in ("delayed_guidance", "opposite_guidance"):
        with pytest.raises(ValueError, match=f"'{name}' does not apply to this HOLDPipeline: it changes classifier-f"):
            audit_prompt_set(hold, tmp_path, mitigations=["none", name], **common)
    with pytest.raises(ValueError, match=r"'amg' does not apply to this HOLDPipeline: its UNet reads 3 input chann"):
        audit_prompt_set(hold, tmp_path, mitigations=["amg"], **common)
    with pytest.raises(ValueError, match="'nemo' does not apply to this HOLDPipeline: .*unconditional"):
        audit_prompt_set(hold, tmp_path, mitigations=["nemo"], **common)
    for kwargs, message in (
        ({"prompts": ["a cat"]}, "HOLDPipeline is unconditional: it takes no prompts"),
        ({"images_per_prompt": 2}, "takes no images_per_prompt"),
        ({"clip_model_path": "clip"}, "an unconditional pipeline has none"),
        ({"guidance_scale": 3.0}, "takes no guidance_scale"),
        ({"mitigations": ["none", "bogus"]}, r"Unknown mitigation 'bogus'; choose among none, delayed_guidance"),
        ({"mitigations": ["none", "none"]}, "listed twice"),
        ({"features": "inception"}, "Unknown feature kind 'inception'"),
        ({"features": "sscd"}, "need features_path"),
        ({"copy_threshold": 1.5}, r"copy_threshold must be a cosine similarity in \[-1, 1\]"),
        ({"held_out_images": None}, "The PCA features are fitted on held-out images"),
        ({"train_images": None}, "Nothing to compare the generations with"),
    ):
        with pytest.raises(ValueError, match=message):
            audit_prompt_set(hold, tmp_path, **{**common, **kwargs})
    assert not calls  # every refusal came before the first generation
    train, held_out = rand_images(3, 3, SIDE, SIDE, seed=0), rand_images(3, 3, SIDE, SIDE, seed=1)
    guidance_off = dict(
        prompts=["a cat"], train_images=train, held_out_images=held_out, guidance_scale=1.0, quality=False
    )
    with pytest.raises(ValueError, match="needs classifier-free guidance .* the scale is 1.0"):
        audit_prompt_set(pipe, tmp_path, mitigations=["delayed_guidance"], **guidance_off)
    with pytest.raises(ValueError, match="'nemo' needs at least 2 reference prompts"):
        audit_prompt_set(pipe, tmp_path, mitigations=["nemo"], **{**guidance_off, "guidance_scale": None})
    with pytest.raises(ValueError, match="text-to-image: the protocol generates images_per_prompt"):
        audit_prompt_set(pipe, tmp_path, num_samples=4, **guidance_off)
    assert set(INFERENCE_MITIGATIONS) == {"none", "delayed_guidance", "opposite_guidance", "amg", "nemo"}


# ------------------------------------------------------------------------------------------ command line
def test_command_line_protocol_end_to_end(tmp_path, dinov2_dir, pipe):
    """``diffusers-hold audit`` with the training captions as prompts, DINOv2 features and two variants; then a
    prompt file with a reference_dir and no training images; then bad flags."""
    pipe.save_pretrained(tmp_path / "pipe")
    write_digits_imagefolder(tmp_path / "train", resolution=SIDE, limit=12)  # captions "digit 0" ... "digit 9"
    base = ["audit", "--pipeline", str(tmp_path / "pipe"), "--num_inference_steps", str(STEPS)]
    out = tmp_path / "audit"
    main(base + ["--train_data_dir", str(tmp_path / "train"), "--features", "dinov2", "--features_path",
                 str(dinov2_dir), "--feature_image_size", "16", "--images_per_prompt", "1", "--mitigations", "none",
                 "opposite_guidance", "--n_bootstrap", "50", "--output_dir", str(out)])  # fmt: skip
    report = AuditReport.load(out)
    assert list(report.protocol) == ["none", "opposite_guidance"]
    section = report.protocol["none"]
    captions = [f"digit {d}" for d in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)]
    assert section.copy_detection.prompts == captions and report.prompts == captions  # distinct, in order
    assert section.features == "dinov2" and "DINOv2Features('tiny-dinov2', image_size=16" in section.feature_extractor
    # independently: the same generations, DINOv2 features, unit length, against the training images
    from diffusers_hold.image_data import load_image_folder

    train, _ = load_image_folder(train_data_dir=tmp_path / "train", resolution=SIDE, num_channels=3)
    plain, _ = generate_images(pipe, 10, prompts=captions, batch_size=8, num_inference_steps=STEPS)
    extractor = DINOv2Features.from_pretrained(dinov2_dir, image_size=16, device="cpu")
    expected = nn_ratio_memorization(F.normalize(extractor(plain), dim=1), F.normalize(extractor(train), dim=1))
    torch.testing.assert_close(section.feature_memorization.ratio, expected.ratio, atol=1e-4, rtol=0)
    assert "| metric | `none` | `opposite_guidance` |" in (out / "report.md").read_text()

    # a prompt file and a reference_dir, no training images: the references pooled are the 1/3 rule's
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    for k in range(2):
        (tmp_path / "refs" / str(k)).mkdir(parents=True)
        for i in range(2):
            save_png(rand_images(3, SIDE, SIDE, seed=10 * k + i), tmp_path / "refs" / str(k) / f"{i}.png")
    main(base + ["--prompts", str(tmp_path / "prompts.txt"), "--reference_dir", str(tmp_path / "refs"),
                 "--features", "dinov2", "--features_path", str(dinov2_dir), "--feature_image_size", "16",
                 "--output_dir", str(tmp_path / "refs_audit")])  # fmt: skip
    report = AuditReport.load(tmp_path / "refs_audit")
    section = report.protocol["none"]
    assert section.references == "per_prompt" and section.nn_reference == "references"
    assert section.copy_detection.num_references == 4 and section.memorization.num_train == 4
    assert section.copy_detection.prompt_num_generations.tolist() == [4, 4]  # the default: 4 images per prompt
    assert section.prompt_file == str(tmp_path / "prompts.txt")


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        (["--features", "sscd"], "need features_path"),
        (["--prompts", "missing.txt"], r"The prompt file 'missing.txt' does not exist"),
        (["--prompts", "{prompts}", "--num_samples", "4"], "num_samples is for unconditional pipelines"),
        (
            ["--prompts", "{prompts}", "--held_out_dir", "{train}", "--skip_quality", "--mitigations", "nemo"],
            "'nemo' needs at least 2 reference prompts",
        ),
        (["--prompts", "{prompts}", "--copy_threshold", "2"], r"copy_threshold must be a cosine similarity"),
        (["--prompts", "{prompts}", "--dataset_name", "x"], "pass at most one of --train_data_dir and --dataset_name"),
        (["--prompts", "{prompts}", "--reference_dir", "{train}"], r"has no sub-folder 0 for line 1 of .*prompts"),
    ],
    ids=["no-path", "missing-file", "num-samples", "nemo-references", "threshold", "two-sources", "bad-layout"],
)
def test_command_line_refuses_bad_flags(tmp_path_factory, pipe, flags, problem):
    folder = tmp_path_factory.mktemp("flags")
    if not (folder / "pipe").exists():
        pipe.save_pretrained(folder / "pipe")
        write_digits_imagefolder(folder / "train", resolution=SIDE, limit=4)
        (folder / "prompts.txt").write_text("a cat\n")
    flags = [f.format(prompts=folder / "prompts.txt", train=folder / "train") for f in flags]
    command = ["audit", "--pipeline", str(folder / "pipe"), "--train_data_dir", str(folder / "train")]
    with pytest.raises(SystemExit, match=problem):
        main(command + flags + ["--num_inference_steps", str(STEPS), "--output_dir", str(folder / "out")])


def test_command_line_refuses_unknown_mitigations(capsys):
    with pytest.raises(SystemExit):
        main(["audit", "--pipeline", "p", "--train_data_dir", "t", "--output_dir", "o", "--mitigations", "cfg"])
    assert "invalid choice: 'cfg'" in capsys.readouterr().err
