"""The prompt-set protocol of the memorization audit, as the text-to-image memorization papers measure copying.

:func:`audit_prompt_set` generates ``images_per_prompt`` images for every prompt of a prompt set (for an unconditional
pipeline: ``num_samples`` images, each its own group), once per inference-time mitigation with the same seeds, and
scores each variant:

- **Copy detection** (:func:`~diffusers_hold.metrics.copy_detection`): each generation's highest cosine similarity to
  the references in the chosen features (SSCD is the papers' descriptor; DINOv2, CLIP or the weight-free PCA also
  work), against its own prompt's reference images (from the prompt file or a ``reference_dir``) or against every
  training image. Per prompt: the highest similarity, the mean of the ``top_k`` (3) highest and the fraction of copies
  (similarity > ``copy_threshold``, 0.5); overall: the means over prompts and the fraction of all generations, with
  percentile-bootstrap intervals over prompts.
- **CLIP score** (:func:`~diffusers_hold.metrics.clip_score`) with a local CLIP model, when one is given: per
  generation, its mean per prompt, and the mean over prompts with a bootstrap interval (the same resamples).
- **The 1/3 rule in the feature space**: :func:`~diffusers_hold.metrics.nn_ratio_memorization` with each image's
  feature vector as a flat vector (L2-normalised first for the cosine extractors, so that L2 distances order
  neighbours as the cosine similarity does; PCA coordinates as they are), against the training images (or, without
  them, all reference images pooled), with the held-out images' features as the control.
- **The 1/3 rule in pixel space**, as :func:`~diffusers_hold.audit.audit_pipeline` computes it.

The report (:class:`~diffusers_hold.audit.AuditReport` with one :class:`~diffusers_hold.audit.ProtocolReport` per
variant) and its files are those of :func:`~diffusers_hold.audit.audit_pipeline` (for the first variant: pixel-space
memorization, quality when there are held-out images, ``copies.png``, ``ratio_histogram.png``), plus
``copies_<variant>.png``: the generations most similar to a reference in the chosen features, above that reference.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .._validation import check_positive_int, is_integer, is_real_number
from ..metrics import (
    CopyDetectionReport,
    check_quality_sizes,
    clip_score,
    copy_detection,
    load_features,
    nn_ratio_memorization,
    prompt_bootstrap_intervals,
    quality_report,
)
from ..metrics.features import FEATURE_KINDS
from ..utils import image_grid, to_pil_image
from .prompts import PromptSet, load_reference_images
from .report import REPORT_FILE_NAME, AuditReport, ProtocolReport
from .run import (
    PCA_COMPONENTS,
    _sampler_settings,
    _write_copies,
    _write_histogram,
    check_output_dir,
    generate_images,
    is_text_conditional,
)
from .variants import MitigationVariant, check_mitigation_names, prepare_variants, resolve_guidance_scale

__all__ = ["DEFAULT_IMAGES_PER_PROMPT", "audit_prompt_set"]

DEFAULT_IMAGES_PER_PROMPT = 4
_COPY_SETTINGS = ("threshold", "top_k", "n_bootstrap", "seed", "confidence")  # _Scoring's fields for copy_detection


@dataclass
class _References:
    """What the generations are compared with: the copy detection's references (each prompt's own, or every
    training image) and the 1/3 rule's reference set (the training images, or the references pooled)."""

    copy_images: torch.Tensor
    copy_prompt_ids: list[str] | None
    kind: str  # "training" or "per_prompt"
    nn_images: torch.Tensor
    nn_kind: str  # "training" or "references"


@dataclass
class _Generation:
    """What every variant generates: ``num_generated`` images, ``expanded`` holding each prompt once per image (for a
    text-to-image pipeline), with the same guidance scale, sampler and seeds; ``shape`` is one image's."""

    text: bool
    prompt_set: PromptSet | None
    num_generated: int
    images_per_prompt: int
    expanded: list[str] | None
    guidance_scale: float | None = None
    sampler: dict[str, Any] | None = None
    settings: dict[str, Any] | None = None  # batch_size, num_inference_steps, seed: generate_images' keyword arguments
    shape: torch.Size | None = None


@dataclass
class _Scoring:
    """Everything the variants share: the extractor, the references and their features, and the settings."""

    extractor: Any
    kind: str
    label: str
    normalise: bool
    references: _References | None = None
    copy_features: torch.Tensor | None = None
    nn_features: torch.Tensor | None = None
    held_out: torch.Tensor | None = None
    held_out_features: torch.Tensor | None = None
    threshold: float = 0.5
    top_k: int = 3
    n_bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0
    clip_model_path: str | None = None
    images_per_prompt: int | None = None
    prompt_file: str | None = None
    device: Any = None


def audit_prompt_set(
    pipeline,
    output_dir: str | os.PathLike,
    *,
    prompts: PromptSet | Sequence[str] | None = None,
    train_images: torch.Tensor | None = None,
    held_out_images: torch.Tensor | None = None,
    reference_dir: str | os.PathLike | None = None,
    images_per_prompt: int | None = None,
    num_samples: int | None = None,
    features: str = "pca",
    features_path: str | os.PathLike | None = None,
    feature_kwargs: dict[str, Any] | None = None,
    copy_threshold: float = 0.5,
    top_k: int = 3,
    clip_model_path: str | os.PathLike | None = None,
    mitigations: Sequence[str] = ("none",),
    guidance_scale: float | None = None,
    nemo_reference_prompts: Sequence[str] | None = None,
    nemo_z_threshold: float = 3.0,
    batch_size: int = 8,
    num_inference_steps: int | None = None,
    seed: int = 0,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    num_copies_shown: int = 8,
    quality: bool = True,
    device: str | torch.device | None = None,
) -> AuditReport:
    """Audit ``pipeline`` with the prompt-set protocol, once per inference-time mitigation on the same prompts and
    seeds, and write the report files (see the module docstring for what is measured).

    Generations are ordered prompt by prompt (``images_per_prompt`` each) and made in batches of ``batch_size``, batch
    ``b`` with a generator seeded ``seed + b`` (as :func:`~diffusers_hold.audit.generate_images` does): the ``"none"``
    variant is exactly ``generate_images(pipeline, P * k, prompts=[each prompt k times], ...)``. Everything that can
    be checked is checked before the first generation (without training or held-out images, a 2-step probe
    generation first finds the size the reference images are read at).

    Args:
        pipeline (`DiffusionPipeline`): the pipeline (HOLD or stock, text-to-image or unconditional).
        output_dir (`str` or `os.PathLike`): where the files go (created).
        prompts ([`PromptSet`] or `Sequence[str]`, *optional*): the prompt set of a text-to-image pipeline
            (:func:`~diffusers_hold.audit.read_prompt_file` reads a file); not for unconditional pipelines.
        train_images (`torch.Tensor` of shape `(R, C, H, W)`, *optional*): the training images in ``[0, 1]`` at the
            generations' size; the copy detection's references when the prompts have none, and the 1/3 rule's. Needed
            unless the prompts have reference images.
        held_out_images (`torch.Tensor` of shape `(M, C, H, W)`, *optional*): real images not trained on: the 1/3
            rule's control, the quality metrics' real set and the PCA features' fitting set.
        reference_dir (`str` or `os.PathLike`, *optional*): a folder of per-prompt reference images (sub-folder
            ``k`` for prompt ``k``, see :mod:`diffusers_hold.audit.prompts`).
        images_per_prompt (`int`, *optional*): generations per prompt (text-to-image; default 4).
        num_samples (`int`, *optional*): generations of an unconditional pipeline (default 64).
        features (`str`, defaults to `"pca"`): ``"pca"`` (fitted on the held-out images), ``"dinov2"``, ``"clip"`` or
            ``"sscd"`` (:func:`~diffusers_hold.metrics.load_features`).
        features_path (`str` or `os.PathLike`, *optional*): the learned extractor's weights: a local folder or cached
            Hub id (DINOv2, CLIP), the TorchScript file (SSCD).
        feature_kwargs (`dict`, *optional*): more arguments of the extractor (``image_size``, ``batch_size``, ...).
        copy_threshold (`float`, defaults to 0.5): a generation is a copy at a cosine similarity above it.
        top_k (`int`, defaults to 3): the per-prompt top-k mean.
        clip_model_path (`str` or `os.PathLike`, *optional*): a CLIP model (with tokenizer) for the CLIP score.
        mitigations (`Sequence[str]`, defaults to `("none",)`): the variants, names of
            :data:`~diffusers_hold.audit.INFERENCE_MITIGATIONS`; one that does not apply to the pipeline is refused.
        guidance_scale (`float`, *optional*): the guidance scale of text-to-image generation (default: the
            pipeline's).
        nemo_reference_prompts (`Sequence[str]`, *optional*), nemo_z_threshold (`float`, defaults to 3.0): NeMo's
            reference prompts and z-score threshold (for ``"nemo"``).
        batch_size (`int`, defaults to 8), num_inference_steps (`int`, *optional*), seed (`int`, defaults to 0): as
            for :func:`~diffusers_hold.audit.audit_pipeline`; ``seed`` also seeds the bootstrap.
        n_bootstrap (`int`, defaults to 1000), confidence (`float`, defaults to 0.95): the bootstrap intervals.
        num_copies_shown (`int`, defaults to 8): pairs in each grid.
        quality (`bool`, defaults to `True`): also the quality metrics of the first variant, when there are
            held-out images.
        device (`str` or `torch.device`, *optional*): where features, similarities and CLIP scores are computed.

    Returns:
        [`AuditReport`]: with ``protocol`` holding one [`ProtocolReport`] per mitigation; also in ``report.json``.

    Raises:
        `ValueError`: before any generation, for inconsistent arguments, missing references or files, a
            mitigation that does not apply, or sets too small for the quality metrics.
    """
    output_dir = check_output_dir(output_dir)
    _check_settings(features, copy_threshold, top_k, n_bootstrap, confidence, seed, batch_size)
    plan = _plan_generation(pipeline, prompts, reference_dir, images_per_prompt, num_samples, clip_model_path)
    plan.guidance_scale = resolve_guidance_scale(pipeline, guidance_scale)
    sampler = plan.sampler = _sampler_settings(pipeline, num_inference_steps)
    plan.settings = {"batch_size": batch_size, "num_inference_steps": sampler["num_inference_steps"], "seed": seed}
    check_mitigation_names(mitigations)
    scoring = _scoring(features, features_path, feature_kwargs, held_out_images, device)
    scoring.threshold, scoring.top_k, scoring.seed = copy_threshold, top_k, seed
    scoring.n_bootstrap, scoring.confidence = n_bootstrap, confidence
    scoring.images_per_prompt = plan.images_per_prompt if plan.text else None
    scoring.prompt_file = None if plan.prompt_set is None else plan.prompt_set.source
    plan.shape = _image_shape(pipeline, train_images, held_out_images, plan.expanded, plan.guidance_scale, seed)
    references = scoring.references = _references(plan.prompt_set, train_images, plan.shape)
    held_out_quality = held_out_images if quality else None
    if held_out_quality is not None:
        sizes = (plan.num_generated, len(references.nn_images), len(held_out_quality), plan.shape.numel())
        check_quality_sizes(*sizes, n_components=PCA_COMPONENTS)
    variants = _variants(pipeline, mitigations, plan, references, nemo_reference_prompts, nemo_z_threshold)
    if clip_model_path is not None:
        scoring.clip_model_path = os.fspath(clip_model_path)
        clip_score(torch.full((1, 3, 8, 8), 0.5), ["a"], scoring.clip_model_path, device=device)  # loads, or says why
    reference_seconds = _reference_features(scoring)
    sections, first_images, first_prompts = _audit_variants(
        pipeline, variants, plan, scoring, reference_seconds, output_dir, num_copies_shown
    )
    report = _report(pipeline, plan, sections, first_prompts, first_images, references.nn_images, held_out_quality)
    _write_files(report, output_dir, first_images, references.nn_images, num_copies_shown)
    return report


def _plan_generation(pipeline, prompts, reference_dir, images_per_prompt, num_samples, clip_model_path) -> _Generation:
    """What each variant generates (the same for all): the prompt set, the number of images and the prompts repeated
    per image; the caller adds the guidance scale and the sampler's settings."""
    text = is_text_conditional(pipeline)
    prompt_set, num_generated, k = _plan(pipeline, text, prompts, reference_dir, images_per_prompt, num_samples)
    if clip_model_path is not None and not text:
        raise ValueError("The CLIP score compares images with their prompts; an unconditional pipeline has none.")
    expanded = None if prompt_set is None else [p for p in prompt_set.prompts for _ in range(k)]
    return _Generation(text, prompt_set, num_generated, k, expanded)


def _variants(pipeline, mitigations, plan: _Generation, references: _References, nemo_prompts, nemo_z_threshold):
    """The mitigation variants, prepared (and checked to apply) before any generation."""
    return prepare_variants(
        pipeline,
        list(mitigations),
        prompts=None if plan.prompt_set is None else plan.prompt_set.prompts,
        guidance_scale=plan.guidance_scale,
        index_images=references.nn_images,
        index_source="training images" if references.nn_kind == "training" else "reference images",
        nemo_reference_prompts=nemo_prompts,
        nemo_z_threshold=nemo_z_threshold,
    )


def _generate(pipeline, variant: MitigationVariant, plan: _Generation) -> tuple[torch.Tensor, list | None, float]:
    """One variant's generations (same prompts and seeds for every variant), their prompts and their seconds."""
    started = time.perf_counter()
    with variant.context():
        generated, used = generate_images(
            pipeline,
            plan.num_generated,
            prompts=plan.expanded,
            guidance_scale=plan.guidance_scale,
            before_batch=variant.before_batch,
            **plan.settings,
        )
    seconds = time.perf_counter() - started
    if generated.shape[1:] != plan.shape:
        raise ValueError(
            f"Generated images have shape {tuple(generated.shape[1:])} but the training (or held-out) images "
            f"{tuple(plan.shape)}; load the data at the generations' size and channels."
        )
    return generated, used, seconds


def _audit_variants(pipeline, variants, plan: _Generation, scoring: _Scoring, reference_seconds, output_dir, count):
    """Generate and score every variant, writing its ``copies_<variant>.png``; the sections by variant name, and the
    first variant's generations and prompts."""
    sections: dict[str, ProtocolReport] = {}
    for variant in variants:
        generated, used, seconds = _generate(pipeline, variant, plan)
        section = _score(variant, generated, used if plan.text else list(range(plan.num_generated)), scoring)
        section.timings = {"generation_s": seconds, **section.timings}
        if not sections:
            first_images, first_prompts = generated, used
            section.timings["reference_features_s"] = reference_seconds
        sections[variant.name] = section
        _write_protocol_copies(output_dir / f"copies_{variant.name}.png", generated, scoring, section, count)
    return sections, first_images, first_prompts


def _report(pipeline, plan: _Generation, sections, prompts, generated, nn_images, held_out) -> AuditReport:
    """The report of all variants: the first variant's pixel-space 1/3 rule, and its quality against ``held_out``
    (when given)."""
    scores = None
    if held_out is not None:
        scores = quality_report(generated, nn_images, held_out, n_components=PCA_COMPONENTS, progress=True)
    return AuditReport(
        memorization=next(iter(sections.values())).memorization,
        quality=scores,
        pipeline_class=type(pipeline).__name__,
        prompts=prompts,
        settings={"num_samples": plan.num_generated, **plan.settings, "image_shape": list(plan.shape), **plan.sampler},
        protocol=sections,
    )


def _check_settings(features, copy_threshold, top_k, n_bootstrap, confidence, seed, batch_size) -> None:
    """The protocol's settings, checked before any work (copy_detection checks them again, after generation)."""
    if features not in FEATURE_KINDS:
        raise ValueError(f"Unknown feature kind {features!r}; choose one of {', '.join(FEATURE_KINDS)}.")
    if not (is_real_number(copy_threshold) and -1.0 <= copy_threshold <= 1.0):
        raise ValueError(f"copy_threshold must be a cosine similarity in [-1, 1], got {copy_threshold!r}.")
    check_positive_int(top_k, "top_k")
    check_positive_int(n_bootstrap, "n_bootstrap")
    check_positive_int(batch_size, "batch_size")
    if not (is_real_number(confidence) and 0.0 < confidence < 1.0):
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}.")
    if not (is_integer(seed) and seed >= 0):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")


def _plan(pipeline, text: bool, prompts, reference_dir, images_per_prompt, num_samples):
    """The prompt set (text-to-image; with the reference_dir's images), the number of generations per variant and
    the images per prompt."""
    name = type(pipeline).__name__
    if not text:
        given = {"prompts": prompts, "reference_dir": reference_dir, "images_per_prompt": images_per_prompt}
        for what, value in given.items():
            if value is not None:
                raise ValueError(f"{name} is unconditional: it takes no {what} (give num_samples).")
        num_samples = 64 if num_samples is None else num_samples
        check_positive_int(num_samples, "num_samples")
        return None, num_samples, 1
    if num_samples is not None:
        raise ValueError(
            f"{name} is text-to-image: the protocol generates images_per_prompt images for each prompt; num_samples "
            "is for unconditional pipelines."
        )
    if prompts is None:
        raise ValueError(f"{name} is text-to-image: the protocol needs prompts (a prompt file or a list).")
    prompt_set = prompts if isinstance(prompts, PromptSet) else PromptSet(prompts)
    if reference_dir is not None:
        prompt_set = prompt_set.with_reference_dir(reference_dir)
    k = DEFAULT_IMAGES_PER_PROMPT if images_per_prompt is None else images_per_prompt
    check_positive_int(k, "images_per_prompt")
    return prompt_set, len(prompt_set) * k, k


def _image_shape(pipeline, train, held_out, expanded, guidance_scale, seed) -> torch.Size:
    """The generations' per-image shape: the data's, else a 2-step probe generation's."""
    for images in (train, held_out):
        if images is not None:
            return images.shape[1:]
    prompts = None if expanded is None else expanded[:1]
    probe, _ = generate_images(
        pipeline, 1, prompts=prompts, num_inference_steps=2, seed=seed, guidance_scale=guidance_scale
    )
    return probe.shape[1:]


def _references(prompt_set: PromptSet | None, train, shape) -> _References:
    if prompt_set is not None and prompt_set.reference_images is not None:
        images, owners = load_reference_images(prompt_set, resolution=shape[-1], num_channels=shape[0])
        ids = [prompt_set.prompts[i] for i in owners]
        nn_images, nn_kind = (train, "training") if train is not None else (images, "references")
        if len(nn_images) < 2:
            raise ValueError("The 1/3 rule needs at least 2 reference images (nearest and second-nearest).")
        return _References(images, ids, "per_prompt", nn_images, nn_kind)
    if train is None:
        raise ValueError(
            "Nothing to compare the generations with: give training images, or prompts with reference images "
            "(reference_images in a JSONL prompt file, or a reference_dir)."
        )
    if tuple(train.shape[1:]) != tuple(shape) or len(train) < 2:
        raise ValueError(
            f"train_images must hold at least 2 images of shape {tuple(shape)}, got {tuple(train.shape)}."
        )
    return _References(train, None, "training", train, "training")


def _scoring(kind, path, kwargs, held_out, device) -> _Scoring:
    """The feature extractor (PCA: fitted on the held-out images) and how reports name it."""
    kwargs = dict(kwargs or {})
    if kind == "pca":
        if path is not None:
            raise ValueError("The PCA features are fitted on the held-out images, not loaded: drop features_path.")
        if held_out is None:
            raise ValueError(
                "The PCA features are fitted on held-out images: give held-out images, or learned features."
            )
        dim = held_out[0].numel()
        kwargs.setdefault("n_components", max(1, min(PCA_COMPONENTS, len(held_out) - 1, dim)))
        extractor = load_features("pca", fit_images=held_out, **kwargs)
        label = f"PCAFeatures(n_components={extractor.n_components}, fitted on {len(held_out)} held-out images)"
    else:
        if path is None:
            raise ValueError(f"The {kind!r} features need features_path (local weights; nothing is downloaded).")
        if device is not None:
            kwargs.setdefault("device", device)
        extractor = load_features(kind, path, **kwargs)
        if os.path.exists(os.fspath(path)):  # name the weights by their file or folder, not the local path
            extractor.source = os.path.basename(os.path.normpath(os.fspath(path)))
        label = repr(extractor)
    return _Scoring(extractor, kind, label, extractor.metric == "cosine", held_out=held_out, device=device)


def _reference_features(scoring: _Scoring) -> float:
    """Features of the references, the 1/3 rule's reference set and the held-out images (once); their seconds."""
    started = time.perf_counter()
    refs = scoring.references
    scoring.copy_features = scoring.extractor(refs.copy_images)
    same = refs.nn_images is refs.copy_images
    scoring.nn_features = scoring.copy_features if same else scoring.extractor(refs.nn_images)
    if scoring.held_out is not None:
        scoring.held_out_features = scoring.extractor(scoring.held_out)
    return time.perf_counter() - started


def _flat(features: torch.Tensor | None, normalise: bool) -> torch.Tensor | None:
    """Feature vectors for the 1/3 rule: unit length for the cosine extractors, as they are otherwise."""
    if features is None:
        return None
    return F.normalize(features.float(), dim=1) if normalise else features


def _score(variant: MitigationVariant, generated: torch.Tensor, ids: list, scoring: _Scoring) -> ProtocolReport:
    """One variant's :class:`ProtocolReport`: copy detection, CLIP score and both 1/3 rules."""
    timings = {}
    started = time.perf_counter()
    features = scoring.extractor(generated)
    timings["features_s"] = time.perf_counter() - started
    started = time.perf_counter()
    refs = scoring.references
    copy = copy_detection(
        features,
        scoring.copy_features,
        ids,
        reference_prompt_ids=refs.copy_prompt_ids,
        features=scoring.label,
        device=scoring.device,
        **{name: getattr(scoring, name) for name in _COPY_SETTINGS},
    )
    feature_memorization = nn_ratio_memorization(
        _flat(features, scoring.normalise),
        _flat(scoring.nn_features, scoring.normalise),
        _flat(scoring.held_out_features, scoring.normalise),
        device=scoring.device,
    )
    memorization = nn_ratio_memorization(generated, refs.nn_images, scoring.held_out, progress=True)
    timings["protocol_s"] = time.perf_counter() - started
    clip = {}
    if scoring.clip_model_path is not None:
        started = time.perf_counter()
        clip = _clip(generated, ids, copy, scoring)
        timings["clip_score_s"] = time.perf_counter() - started
    return ProtocolReport(
        mitigation=variant.name,
        mitigation_settings=variant.settings,
        features=scoring.kind,
        feature_extractor=scoring.label,
        references=refs.kind,
        nn_reference=refs.nn_kind,
        copy_detection=copy,
        feature_memorization=feature_memorization,
        features_normalised=scoring.normalise,
        memorization=memorization,
        images_per_prompt=scoring.images_per_prompt,
        prompt_file=scoring.prompt_file,
        timings=timings,
        **clip,
    )


def _clip(generated: torch.Tensor, prompts: list[str], copy: CopyDetectionReport, scoring: _Scoring) -> dict:
    """CLIP scores per generation, their mean per prompt, and the mean over prompts with a bootstrap interval drawn
    with the copy detection's seed (so with the same resamples of the prompts)."""
    scores = clip_score(generated, prompts, scoring.clip_model_path, device=scoring.device, progress=True)
    counts = copy.prompt_num_generations.double()
    per_prompt = (
        torch.zeros(len(copy.prompts), dtype=torch.float64).index_add_(0, copy.prompt_index, scores.double()) / counts
    )
    interval = prompt_bootstrap_intervals(
        {"clip": per_prompt.numpy()},
        torch.zeros_like(counts).numpy(),
        counts.numpy(),
        scoring.n_bootstrap,
        scoring.seed,
        scoring.confidence,
    )["clip"]
    return {
        "clip_model": _model_name(scoring.clip_model_path),
        "clip_score": scores,
        "prompt_clip_score": per_prompt,
        "clip_score_mean": float(per_prompt.mean()),
        "clip_score_interval": interval,
    }


def _model_name(path: str) -> str:
    """A local model folder by its name (not its full local path); a Hub id as it is."""
    return os.path.basename(os.path.normpath(path)) if os.path.exists(path) else path


def _write_protocol_copies(path: Path, generated, scoring: _Scoring, section: ProtocolReport, count: int) -> None:
    """The ``count`` generations most similar to a reference (top row), above that reference."""
    copy = section.copy_detection
    order = torch.argsort(copy.max_similarity, descending=True, stable=True)[:count]
    top = [to_pil_image(generated[i]) for i in order]
    bottom = [to_pil_image(scoring.references.copy_images[copy.nearest_reference[i]]) for i in order]
    scale = max(1, 96 // generated.shape[-1])
    image_grid(top + bottom, cols=len(top), padding=2, scale=scale).save(path)


def _write_files(report: AuditReport, output_dir: Path, generated, nn_images, count: int) -> None:
    """``copies.png`` and ``ratio_histogram.png`` of the first variant, ``report.json`` and ``report.md``."""
    copies = _write_copies(output_dir / "copies.png", generated, nn_images, report.memorization, count)
    report.files = {
        "copies": str(copies),
        "histogram": str(_write_histogram(output_dir / "ratio_histogram.png", report.memorization)),
        **{f"copies_{name}": str(output_dir / f"copies_{name}.png") for name in report.protocol},
        "json": str(output_dir / REPORT_FILE_NAME),
        "markdown": str(output_dir / "report.md"),
    }
    (output_dir / REPORT_FILE_NAME).write_text(report.to_json())
    markdown = report.to_markdown() + "\n\n![closest generations and their nearest training images](copies.png)\n"
    for name in report.protocol:
        markdown += (
            f"\n`{name}`: the generations most similar to a reference, above it\n\n![{name}](copies_{name}.png)\n"
        )
    (output_dir / "report.md").write_text("# Memorization audit\n\n" + markdown)
