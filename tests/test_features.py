"""Learned feature extractors, the copy-detection protocol and the CLIP score, offline.

Tiny randomly initialised DINOv2 and CLIP models are saved into temporary folders and loaded back through the
extractors; a TorchScript module whose descriptor is the per-channel pixel mean under a fixed orthonormal map stands in
for SSCD, so that its invariances (any rearrangement of the pixels) and its orthogonal pairs are known by
construction. Everything is checked against hand computations or against the models run directly through
transformers, never against the code's own earlier output.
"""

import importlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel, Dinov2Model

from diffusers_hold.metrics import (
    CLIPImageFeatures,
    DINOv2Features,
    PCAFeatures,
    SSCDFeatures,
    clip_score,
    copy_detection,
    cosine_similarity_matrix,
    load_features,
)
from diffusers_hold.testing import (
    save_channel_mean_torchscript,
    save_tiny_clip,
    save_tiny_dinov2,
    tiny_clip_tokenizer,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIDE = 16  # image side of the tiny models
# the module, which the package's function of the same name shadows as an attribute
COPY_DETECTION_MODULE = importlib.import_module("diffusers_hold.metrics.copy_detection")

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------------ helpers
def rand_images(*shape, seed: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def normalise_by_hand(images: torch.Tensor, mean, std) -> torch.Tensor:
    """``(x - mean_c) / std_c`` per channel, written out channel by channel."""
    return torch.stack([(images[:, c] - mean[c]) / std[c] for c in range(3)], dim=1)


def direction_image(channel: int, seed: int, sign: float = 1.0, side: int = SIDE) -> torch.Tensor:
    """An RGB image whose ImageNet-normalised channel means are ``sign * e_channel`` (the channel's mean is
    ``mean + sign * std``, the others' are their ImageNet means), with a zero-mean texture of amplitude 0.1 on top."""
    texture = 0.2 * rand_images(3, side, side, seed=seed) - 0.1
    texture = texture - texture.mean(dim=(1, 2), keepdim=True)
    base = torch.tensor(IMAGENET_MEAN) + sign * torch.tensor(IMAGENET_STD) * F.one_hot(torch.tensor(channel), 3)
    return (base.view(3, 1, 1) + texture).clamp(0, 1)


def features_with_similarities(similarities) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated features whose cosine similarity to reference ``j`` is ``similarities[i][j]``: the references are the
    standard basis vectors ``e_j`` and generation ``i`` is the unit vector ``(s_i, sqrt(1 - |s_i|^2))``."""
    s = np.asarray(similarities, dtype=np.float64)
    rest = np.sqrt(1.0 - (s**2).sum(1, keepdims=True))
    generated = np.concatenate([s, rest], axis=1)
    references = np.eye(s.shape[1], s.shape[1] + 1)
    return torch.from_numpy(generated), torch.from_numpy(references)


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    """A tiny random Dinov2Model (width 32, 2 layers, patch 4) saved locally."""
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2"), image_size=SIDE, seed=0)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIPModel with its tokenizer; both towers carry ``projection_dim`` as the released configs do, so the
    vision tower loads alone as a CLIPVisionModelWithProjection."""
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), image_size=SIDE, seed=1)


@pytest.fixture(scope="module")
def sscd_path(tmp_path_factory):
    """The SSCD stand-in (ChannelMeanDescriptor of diffusers_hold.testing): each channel's mean over the pixels, then a
    fixed map with orthonormal rows, so flips and any permutation of the pixels leave the descriptor unchanged and
    images whose normalised channel means are orthogonal get orthogonal descriptors."""
    q, _ = torch.linalg.qr(rand_images(8, 3, seed=2) - 0.5)  # (8, 3) with orthonormal columns
    return save_channel_mean_torchscript(tmp_path_factory.mktemp("sscd") / "stand_in.torchscript.pt", q.T)


# ------------------------------------------------------------------------------------------ preprocessing
def test_sscd_preprocessing_resizes_the_short_side_without_crop(sscd_path):
    colour = (0.2, 0.5, 0.9)
    expected = [(colour[c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c] for c in range(3)]
    extractor = SSCDFeatures.from_torchscript(sscd_path, image_size=8, device="cpu")
    for shape, out_shape in (((16, 24), (8, 12)), ((24, 16), (12, 8)), ((6, 9), (8, 12))):
        image = torch.tensor(colour).view(1, 3, 1, 1).expand(1, 3, *shape).clone()
        pixels = extractor.preprocess(image)
        assert pixels.shape == (1, 3, *out_shape)
        for c in range(3):  # resizing keeps a constant image constant
            torch.testing.assert_close(pixels[0, c], torch.full(out_shape, expected[c]), atol=1e-5, rtol=0)
    # at the target size nothing is resized: the pixels are only normalised
    image = rand_images(2, 3, 8, 13, seed=3)
    torch.testing.assert_close(
        extractor.preprocess(image), normalise_by_hand(image, IMAGENET_MEAN, IMAGENET_STD), atol=1e-6, rtol=0
    )
    assert SSCDFeatures.from_torchscript(sscd_path, device="cpu").image_size == 288


def test_dinov2_preprocessing_crops_the_centre_and_normalises(dinov2_dir):
    extractor = DINOv2Features.from_pretrained(dinov2_dir, image_size=SIDE, device="cpu")
    image = rand_images(2, 3, SIDE, 24, seed=4)  # the short side is already SIDE: only the crop acts
    expected = normalise_by_hand(image[..., 4:20], IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(extractor.preprocess(image), expected, atol=1e-6, rtol=0)
    tall = rand_images(1, 3, 20, SIDE, seed=5)
    torch.testing.assert_close(
        extractor.preprocess(tall),
        normalise_by_hand(tall[..., 2:18, :], IMAGENET_MEAN, IMAGENET_STD),
        atol=1e-6,
        rtol=0,
    )
    grey = torch.full((1, 1, 32, 48), 0.3)  # resized to 16 x 24, cropped to 16 x 16, repeated to RGB
    pixels = extractor.preprocess(grey)
    assert pixels.shape == (1, 3, SIDE, SIDE)
    for c in range(3):
        torch.testing.assert_close(
            pixels[0, c], torch.full((SIDE, SIDE), (0.3 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]), atol=1e-5, rtol=0
        )


def test_clip_preprocessing_uses_the_config_size_and_clip_statistics(clip_dir):
    extractor = CLIPImageFeatures.from_pretrained(clip_dir, device="cpu")
    assert extractor.image_size == SIDE  # from the vision config
    image = torch.tensor([0.1, 0.6, 1.0]).view(1, 3, 1, 1).expand(1, 3, 40, 32).clone()
    pixels = extractor.preprocess(image)
    assert pixels.shape == (1, 3, SIDE, SIDE)
    for c, value in enumerate((0.1, 0.6, 1.0)):
        torch.testing.assert_close(
            pixels[0, c], torch.full((SIDE, SIDE), (value - CLIP_MEAN[c]) / CLIP_STD[c]), atol=1e-5, rtol=0
        )


# ------------------------------------------------------------------------------------------- the models
def test_dinov2_features_are_the_cls_token(dinov2_dir):
    extractor = DINOv2Features.from_pretrained(dinov2_dir, image_size=SIDE, batch_size=2, device="cpu", progress=True)
    assert extractor.metric == "cosine"
    reference_model = Dinov2Model.from_pretrained(dinov2_dir).eval()
    images = rand_images(5, 3, SIDE, SIDE, seed=6)
    features = extractor(images)
    assert features.dtype == torch.float32 and features.device.type == "cpu" and features.shape == (5, 32)
    with torch.no_grad():
        expected = reference_model(normalise_by_hand(images, IMAGENET_MEAN, IMAGENET_STD)).last_hidden_state[:, 0]
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    grey = rand_images(2, 1, SIDE, SIDE, seed=7)
    with torch.no_grad():
        expected = reference_model(normalise_by_hand(grey.repeat(1, 3, 1, 1), IMAGENET_MEAN, IMAGENET_STD))
    torch.testing.assert_close(extractor(grey), expected.last_hidden_state[:, 0], atol=1e-5, rtol=1e-5)


def test_clip_image_features_are_the_projected_embedding(clip_dir):
    extractor = load_features("clip", clip_dir, device="cpu", batch_size=3)
    assert isinstance(extractor, CLIPImageFeatures) and extractor.metric == "cosine"
    model = CLIPModel.from_pretrained(clip_dir).eval()
    images = rand_images(4, 3, SIDE, SIDE, seed=8)
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=normalise_by_hand(images, CLIP_MEAN, CLIP_STD)).pooler_output
        expected = model.visual_projection(pooled)
    features = extractor(images)
    assert features.shape == (4, 16) and features.dtype == torch.float32
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)


def test_sscd_descriptors_are_l2_normalised_channel_means(sscd_path):
    extractor = load_features("sscd", sscd_path, image_size=SIDE, device="cpu")
    assert isinstance(extractor, SSCDFeatures) and extractor.metric == "cosine"
    images = rand_images(3, 3, SIDE, SIDE, seed=9)
    q, _ = torch.linalg.qr(rand_images(8, 3, seed=2) - 0.5)
    means = normalise_by_hand(images, IMAGENET_MEAN, IMAGENET_STD).mean(dim=(2, 3))
    expected = means @ q.T
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(extractor(images), expected, atol=1e-6, rtol=1e-5)


def test_pca_stays_weight_free_with_l2():
    held_out = rand_images(12, 1, 4, 4, seed=10)
    pca = load_features("pca", fit_images=held_out, n_components=3)
    assert isinstance(pca, PCAFeatures) and pca.metric == "l2" and pca.is_fitted and pca.n_components == 3
    # the projection is onto orthonormal axes through the mean: the mean image maps to the origin
    torch.testing.assert_close(pca(held_out.mean(0, keepdim=True)), torch.zeros(1, 3, dtype=torch.float64))


# ------------------------------------------------------------------------------------- copies and invariances
def test_sscd_stand_in_flags_copies_and_invariant_edits_not_unrelated_images(sscd_path):
    # directions e0, e1 and -e0 of the normalised channel means
    references = torch.stack(
        [direction_image(0, seed=11), direction_image(1, seed=12), direction_image(0, seed=13, sign=-1.0)]
    )
    permutation = torch.randperm(SIDE * SIDE, generator=torch.Generator().manual_seed(14))
    shuffled = references[1].reshape(3, -1)[:, permutation].reshape(3, SIDE, SIDE)
    generated = torch.stack(
        [
            references[0],  # an exact copy
            references[1].flip(-1),  # a mirror image: the channel means do not change
            shuffled,  # the pixels of reference 1 rearranged
            direction_image(2, seed=15),  # orthogonal to every reference by construction
        ]
    )
    extractor = SSCDFeatures.from_torchscript(sscd_path, image_size=SIDE, device="cpu")
    gen_features, ref_features = extractor(generated), extractor(references)
    report = copy_detection(gen_features, ref_features, ["a", "b", "b", "c"], features=repr(extractor))
    torch.testing.assert_close(report.max_similarity[:3], torch.ones(3), atol=1e-5, rtol=0)
    assert abs(float(report.max_similarity[3])) < 1e-5
    assert report.nearest_reference[:3].tolist() == [0, 1, 1]
    assert report.copied.tolist() == [True, True, True, False]
    assert report.fraction_copied == pytest.approx(0.75)
    # against the references of each prompt: "c" has only reference 2, whose direction (-e0) is orthogonal to it
    per_prompt = copy_detection(
        gen_features, ref_features, ["a", "b", "b", "c"], reference_prompt_ids=["a", "b", "c"], n_bootstrap=10
    )
    assert per_prompt.nearest_reference.tolist() == [0, 1, 1, 2]
    assert per_prompt.copied.tolist() == [True, True, True, False]


def test_sscd_flip_invariance_survives_the_default_resize(sscd_path):
    extractor = SSCDFeatures.from_torchscript(sscd_path, device="cpu")  # 16 -> 288, bilinear
    image = direction_image(1, seed=16).unsqueeze(0)
    features = extractor(torch.cat([image, image.flip(-1), image.flip(-2)]))
    similarities = cosine_similarity_matrix(features[:1], features)
    torch.testing.assert_close(similarities, torch.ones(1, 3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["dinov2", "clip"])
def test_learned_features_score_exact_copies_one(kind, dinov2_dir, clip_dir):
    path = dinov2_dir if kind == "dinov2" else clip_dir
    kwargs = {"image_size": SIDE} if kind == "dinov2" else {}
    extractor = load_features(kind, path, device="cpu", **kwargs)
    references = rand_images(4, 3, SIDE, SIDE, seed=17)
    generated = torch.cat([references[[2]], rand_images(1, 3, SIDE, SIDE, seed=18)])
    report = copy_detection(extractor(generated), extractor(references), [0, 1], n_bootstrap=10)
    assert abs(float(report.max_similarity[0]) - 1.0) < 1e-5
    assert int(report.nearest_reference[0]) == 2 and bool(report.copied[0])


# ------------------------------------------------------------------------------------ protocol arithmetic
# generation -> prompt, and its similarity to references 0, 1, 2 (hand-built; row 3 is exactly 0.5 everywhere)
HAND_PROMPTS = ["a", "b", "a", "c", "a", "b", "a"]
HAND_SIMILARITIES = [
    [0.9, 0.1, 0.0],
    [0.1, 0.2, 0.0],
    [0.2, 0.3, 0.1],
    [0.5, 0.5, 0.5],
    [0.0, 0.0, 0.6],
    [0.0, 0.7, 0.0],
    [0.4, 0.0, 0.0],
]


@pytest.mark.parametrize("budget", [None, 5])
def test_cosine_similarity_matrix_matches_hand_values(budget, monkeypatch):
    if budget is not None:  # blocks of a single row
        monkeypatch.setattr(COPY_DETECTION_MODULE, "ELEMENT_BUDGET", budget)
    generated, references = features_with_similarities(HAND_SIMILARITIES)
    similarities = cosine_similarity_matrix(2.0 * generated, 4.0 * references)  # norms do not matter
    assert similarities.dtype == torch.float32 and similarities.shape == (7, 3)
    torch.testing.assert_close(similarities, torch.tensor(HAND_SIMILARITIES, dtype=torch.float32), atol=1e-6, rtol=0)
    a, b = rand_images(5, 2, 3, seed=19) - 0.5, rand_images(4, 6, seed=20) - 0.5  # trailing axes are flattened
    a64, b64 = a.reshape(5, -1).double(), b.double()
    expected = (a64 @ b64.T) / (a64.norm(dim=1)[:, None] * b64.norm(dim=1)[None, :])
    torch.testing.assert_close(cosine_similarity_matrix(a, b).double(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("budget", [None, 5])
def test_copy_detection_against_the_training_set_by_hand(budget, monkeypatch):
    if budget is not None:
        monkeypatch.setattr(COPY_DETECTION_MODULE, "ELEMENT_BUDGET", budget)
    generated, references = features_with_similarities(HAND_SIMILARITIES)
    report = copy_detection(2.0 * generated, 4.0 * references, HAND_PROMPTS, features="hand-built")
    torch.testing.assert_close(
        report.max_similarity, torch.tensor([0.9, 0.2, 0.3, 0.5, 0.6, 0.7, 0.4]), atol=1e-6, rtol=0
    )
    assert report.nearest_reference.tolist() == [0, 1, 1, 0, 2, 1, 0]  # row 3 ties: the first reference
    # strictly greater: the generation at exactly 0.5 is not a copy
    assert report.copied.tolist() == [True, False, False, False, True, True, False]
    assert report.prompts == ["a", "b", "c"] and report.prompt_index.tolist() == [0, 1, 0, 2, 0, 1, 0]
    assert report.prompt_num_generations.tolist() == [4, 2, 1]
    # a: 0.9, 0.3, 0.6, 0.4; b: 0.2, 0.7; c: 0.5
    torch.testing.assert_close(report.prompt_max_similarity, torch.tensor([0.9, 0.7, 0.5], dtype=torch.float64))
    top3 = [(0.9 + 0.6 + 0.4) / 3, (0.7 + 0.2) / 2, 0.5]  # fewer than 3 generations: all of them
    torch.testing.assert_close(report.prompt_top_k_mean, torch.tensor(top3, dtype=torch.float64))
    torch.testing.assert_close(report.prompt_fraction_copied, torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    assert report.mean_max_similarity == pytest.approx((0.9 + 0.7 + 0.5) / 3, abs=1e-6)
    assert report.mean_top_k == pytest.approx(sum(top3) / 3, abs=1e-6)
    assert report.fraction_copied == pytest.approx(3 / 7)
    lower = copy_detection(generated, references, HAND_PROMPTS, threshold=0.49, n_bootstrap=10)
    assert lower.copied.tolist() == [True, False, False, True, True, True, False]
    top1 = copy_detection(generated, references, HAND_PROMPTS, top_k=1, n_bootstrap=10)
    torch.testing.assert_close(top1.prompt_top_k_mean, top1.prompt_max_similarity)


def test_copy_detection_against_each_prompts_references_by_hand():
    # generation "x" is closest to reference 1 overall, but only reference 0 belongs to "x"; reference 3 is "z",
    # a prompt without generations, and is ignored
    similarities = [[0.2, 0.9, 0.0, 0.3], [0.7, 0.3, 0.6, 0.0], [0.1, 0.55, 0.0, 0.0]]
    generated, references = features_with_similarities(similarities)
    report = copy_detection(generated, references, ["x", "y", "y"], reference_prompt_ids=["x", "y", "y", "z"], top_k=3)
    assert report.per_prompt_references and report.num_references == 4
    torch.testing.assert_close(report.max_similarity, torch.tensor([0.2, 0.6, 0.55]), atol=1e-6, rtol=0)
    assert report.nearest_reference.tolist() == [0, 2, 1]
    assert report.copied.tolist() == [False, True, True]
    torch.testing.assert_close(report.prompt_max_similarity, torch.tensor([0.2, 0.6], dtype=torch.float64))
    torch.testing.assert_close(report.prompt_top_k_mean, torch.tensor([0.2, 0.575], dtype=torch.float64))
    torch.testing.assert_close(report.prompt_fraction_copied, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert report.mean_max_similarity == pytest.approx(0.4, abs=1e-6)
    assert report.fraction_copied == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no reference image.*'y'"):
        copy_detection(generated, references, ["x", "y", "y"], reference_prompt_ids=["x", "x", "z", "z"])


# --------------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_of_identical_prompts_has_zero_width():
    # three prompts with the same two scores each
    generated, references = features_with_similarities([[0.8, 0.0], [0.3, 0.0]] * 3)
    report = copy_detection(generated, references, [0, 0, 1, 1, 2, 2], top_k=3, n_bootstrap=200)
    for value, interval, expected in (
        (report.mean_max_similarity, report.mean_max_similarity_interval, 0.8),
        (report.mean_top_k, report.mean_top_k_interval, 0.55),
        (report.fraction_copied, report.fraction_copied_interval, 0.5),
    ):
        assert value == pytest.approx(expected, abs=1e-6)
        assert interval[0] == pytest.approx(value, abs=1e-12) and interval[1] == pytest.approx(value, abs=1e-12)


def test_bootstrap_resamples_prompts_not_generations():
    # one prompt whose generations differ: resampling prompts can only redraw that prompt
    generated, references = features_with_similarities([[0.9, 0.0], [0.1, 0.0], [0.6, 0.0]])
    report = copy_detection(generated, references, ["p", "p", "p"], top_k=2, n_bootstrap=100)
    assert report.mean_max_similarity_interval == pytest.approx((0.9, 0.9), abs=1e-6)
    assert report.mean_top_k_interval == pytest.approx((0.75, 0.75), abs=1e-6)
    assert report.fraction_copied_interval == pytest.approx((2 / 3, 2 / 3))


def test_bootstrap_percentiles_of_two_prompts_by_hand():
    # prompt A: one generation, a copy at 0.9; prompt B: three generations at 0.1, none a copy. A resample of the two
    # prompts is (A, A), (A, B), (B, A) or (B, B) with probabilities 1/4, 1/2 (both mixed orders), 1/4: the mean of
    # the per-prompt maximum is 0.9, 0.5 or 0.1, and the pooled fraction of copies 1/1, 1/4 or 0/3.
    generated, references = features_with_similarities([[0.9, 0.0], [0.1, 0.0], [0.1, 0.0], [0.1, 0.0]])
    prompts = ["A", "B", "B", "B"]
    wide = copy_detection(generated, references, prompts, n_bootstrap=10_000, confidence=0.95, seed=3)
    assert wide.mean_max_similarity_interval == pytest.approx((0.1, 0.9), abs=1e-6)  # 2.5 % and 97.5 % in the tails
    assert wide.fraction_copied_interval == pytest.approx((0.0, 1.0))
    # 20 % and 80 % still fall in the tails (each holds a quarter of the resamples)
    middle = copy_detection(generated, references, prompts, n_bootstrap=10_000, confidence=0.6, seed=3)
    assert middle.mean_max_similarity_interval == pytest.approx((0.1, 0.9), abs=1e-6)
    narrow = copy_detection(generated, references, prompts, n_bootstrap=10_000, confidence=0.4, seed=3)
    assert narrow.mean_max_similarity_interval == pytest.approx((0.5, 0.5), abs=1e-6)  # 30 % and 70 %: the middle
    # pooled over the resample's generations (1/4), not the mean of the per-prompt fractions (1/2)
    assert narrow.fraction_copied_interval == pytest.approx((0.25, 0.25))
    assert wide.fraction_copied == pytest.approx(0.25)


def test_bootstrap_interval_lies_within_the_per_prompt_range_and_follows_the_seed():
    scores = [0.95, 0.2, 0.7, 0.45, 0.6, 0.3, 0.85, 0.1]
    generated, references = features_with_similarities([[s, 0.0] for s in scores])
    prompts = [0, 1, 2, 3, 4, 5, 6, 7]
    report = copy_detection(generated, references, prompts, top_k=1, n_bootstrap=500, seed=4)
    low, high = report.mean_max_similarity_interval
    assert min(scores) - 1e-6 <= low < report.mean_max_similarity < high <= max(scores) + 1e-6
    assert 0.0 <= report.fraction_copied_interval[0] < report.fraction_copied_interval[1] <= 1.0
    again = copy_detection(generated, references, prompts, top_k=1, n_bootstrap=500, seed=4)
    assert again.mean_max_similarity_interval == report.mean_max_similarity_interval
    other = copy_detection(generated, references, prompts, top_k=1, n_bootstrap=500, seed=5)
    assert other.mean_max_similarity_interval != report.mean_max_similarity_interval
    wider = copy_detection(generated, references, prompts, top_k=1, n_bootstrap=500, seed=4, confidence=0.99)
    assert wider.mean_max_similarity_interval[0] <= low and wider.mean_max_similarity_interval[1] >= high


def test_report_to_dict_and_markdown():
    generated, references = features_with_similarities(HAND_SIMILARITIES)
    report = copy_detection(generated, references, HAND_PROMPTS, features="SSCDFeatures('sscd.pt')", n_bootstrap=50)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["features"] == "SSCDFeatures('sscd.pt')" and data["threshold"] == 0.5 and data["top_k"] == 3
    assert data["num_generated"] == 7 and data["num_prompts"] == 3 and data["num_references"] == 3
    assert [p["prompt"] for p in data["per_prompt"]] == ["a", "b", "c"]
    assert [p["num_generations"] for p in data["per_prompt"]] == [4, 2, 1]
    assert data["per_prompt"][1]["top_k_mean"] == pytest.approx(0.45, abs=1e-6)
    assert data["fraction_copied"] == pytest.approx(3 / 7)
    assert data["per_sample"]["prompt"] == HAND_PROMPTS
    assert data["per_sample"]["copied"] == [True, False, False, False, True, True, False]
    assert "per_sample" not in report.to_dict(per_sample=False)
    text = report.to_markdown()
    assert "SSCDFeatures('sscd.pt')" in text and "> 0.5" in text and "top-3" in text
    assert f"{report.mean_max_similarity:.4f}" in text and f"{report.fraction_copied_interval[1]:.4f}" in text
    numpy_ids = copy_detection(generated, references, np.array([1, 2, 1, 3, 1, 2, 1]), n_bootstrap=10)
    assert json.loads(json.dumps(numpy_ids.to_dict()))["per_sample"]["prompt"] == [1, 2, 1, 3, 1, 2, 1]


# -------------------------------------------------------------------------------------------- CLIP score
def test_clip_score_is_clamped_hundred_times_the_cosine(clip_dir):
    model = CLIPModel.from_pretrained(clip_dir).eval()
    tokenizer = tiny_clip_tokenizer()
    prompts = ["a red cat", "two dogs on grass", "x", "the sea at night", "3 apples", "blue", "a b c", "zz top"]
    images = rand_images(len(prompts), 3, SIDE, SIDE, seed=21)
    expected = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts, strict=True):
            tokens = tokenizer(prompt, return_tensors="pt")
            text = model.text_projection(model.text_model(input_ids=tokens.input_ids).pooler_output)
            pixels = normalise_by_hand(image[None], CLIP_MEAN, CLIP_STD)
            picture = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
            expected.append(max(100.0 * float(F.cosine_similarity(picture, text)), 0.0))
    assert any(e == 0.0 for e in expected) and any(e > 0.0 for e in expected)  # both sides of the clamp
    scores = clip_score(images, prompts, clip_dir, batch_size=3, device="cpu")
    assert scores.shape == (len(prompts),) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------ errors
def test_missing_or_wrong_model_paths_are_named(tmp_path, dinov2_dir, clip_dir, sscd_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ValueError, match="no_such_model"):
        DINOv2Features.from_pretrained(missing)
    with pytest.raises(ValueError, match="no_such_model"):
        load_features("clip", missing)
    with pytest.raises(ValueError, match="no_such_model"):
        clip_score(rand_images(1, 3, SIDE, SIDE, seed=0), ["a"], missing)
    with pytest.raises(ValueError, match="does not exist"):
        SSCDFeatures.from_torchscript(tmp_path / "sscd_disc_mixup.torchscript.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.pt.*not a TorchScript"):
        load_features("sscd", junk)
    state_dict = tmp_path / "state_dict.pt"
    torch.save({"weight": torch.zeros(2)}, state_dict)
    with pytest.raises(ValueError, match="state_dict.pt"):
        SSCDFeatures.from_torchscript(state_dict)
    with pytest.raises(ValueError, match="DINOv2 model.*'clip'"):
        load_features("dinov2", clip_dir)  # AutoModel loads a CLIPModel, whose output has no CLS token to take
    with pytest.raises(ValueError, match="weights are missing"):
        CLIPImageFeatures.from_pretrained(dinov2_dir)  # would otherwise run with random weights
    without_tokenizer = tmp_path / "clip_without_tokenizer"
    CLIPModel.from_pretrained(clip_dir).save_pretrained(without_tokenizer)
    with pytest.raises(ValueError, match="tokenizer.*clip_without_tokenizer"):
        clip_score(rand_images(1, 3, SIDE, SIDE, seed=0), ["a"], without_tokenizer)


def test_load_features_arguments(sscd_path):
    with pytest.raises(ValueError, match="Unknown feature kind 'inception'"):
        load_features("inception", sscd_path)
    with pytest.raises(ValueError, match="need path"):
        load_features("dinov2")
    with pytest.raises(ValueError, match="fit_images"):
        load_features("pca")
    with pytest.raises(ValueError, match="fitted, not loaded"):
        load_features("pca", sscd_path, fit_images=rand_images(4, 1, 2, 2, seed=0))
    with pytest.raises(ValueError, match="only used by the 'pca'"):
        load_features("sscd", sscd_path, fit_images=rand_images(4, 1, 2, 2, seed=0))


def test_bad_images_are_rejected(sscd_path, clip_dir):
    extractor = SSCDFeatures.from_torchscript(sscd_path, image_size=SIDE, device="cpu")
    good = rand_images(2, 3, SIDE, SIDE, seed=22)
    nan = good.clone()
    nan[1, 0, 3, 3] = math.nan
    with pytest.raises(ValueError, match="NaN.*row 1"):
        extractor(nan)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\).*\(3, 16, 16\)"):
        extractor(good[0])
    with pytest.raises(ValueError, match=r"C = 1.*or 3.*\(2, 2, 16, 16\)"):
        extractor(good[:, :2])
    with pytest.raises(ValueError, match=r"\[0, 1\].*-1"):
        extractor(2 * good - 1)
    with pytest.raises(ValueError, match="floating point"):
        extractor((255 * good).to(torch.uint8))
    with pytest.raises(ValueError, match="one prompt per image: 1 prompts for 2"):
        clip_score(good, ["a"], clip_dir)
    with pytest.raises(ValueError, match="sequence of strings"):
        clip_score(good, "ab", clip_dir)


def test_bad_protocol_arguments_are_rejected():
    generated, references = features_with_similarities(HAND_SIMILARITIES)
    with pytest.raises(ValueError, match="prompt_ids has 6 entries for 7"):
        copy_detection(generated, references, HAND_PROMPTS[:6])
    with pytest.raises(ValueError, match="reference_prompt_ids has 2 entries for 3"):
        copy_detection(generated, references, HAND_PROMPTS, reference_prompt_ids=["a", "b"])
    with pytest.raises(ValueError, match="different feature dimensions: 4 vs 3"):
        copy_detection(generated, references[:, :3], HAND_PROMPTS)
    zero = references.clone()
    zero[1] = 0.0
    with pytest.raises(ValueError, match="Row 1 of reference_features has zero norm"):
        copy_detection(generated, zero, HAND_PROMPTS)
    bad_generated = generated.clone()
    bad_generated[2, 0] = math.nan
    with pytest.raises(ValueError, match="generated_features contains NaN"):
        copy_detection(bad_generated, references, HAND_PROMPTS)
    for kwargs, message in (
        ({"threshold": 1.5}, "threshold"),
        ({"top_k": 0}, "top_k"),
        ({"n_bootstrap": 0}, "n_bootstrap"),
        ({"confidence": 1.0}, "confidence"),
        ({"seed": -1}, "seed"),
    ):
        with pytest.raises(ValueError, match=message):
            copy_detection(generated, references, HAND_PROMPTS, **kwargs)
