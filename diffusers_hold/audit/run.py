"""Running an audit: generate images from a pipeline, measure them against the training and held-out images, write
the report and its figures."""

from __future__ import annotations

import inspect
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .._validation import check_positive_int, is_integer
from ..metrics import MemorizationReport, check_quality_sizes, nn_ratio_memorization, quality_report
from ..utils import image_grid, to_pil_image
from .report import REPORT_FILE_NAME, AuditReport

__all__ = [
    "audit_pipeline",
    "check_output_dir",
    "default_num_inference_steps",
    "generate_images",
    "is_text_conditional",
]

# the quality metrics' feature space: a PCA of the held-out images with at most this many components
PCA_COMPONENTS = 32


def is_text_conditional(pipeline) -> bool:
    """Whether a pipeline generates from prompts (its ``__call__`` takes ``prompt``), i.e. is text-to-image."""
    return "prompt" in inspect.signature(pipeline.__call__).parameters


def default_num_inference_steps(pipeline) -> tuple[int, str]:
    """The step count an audit of `pipeline` samples with unless told otherwise, and where it comes from.

    A scheduler that states the steps its solver needs decides (``scheduler.recommended_num_inference_steps``, which
    :class:`~diffusers_hold.HOLDScheduler` gives per solver): ``(steps, "scheduler")``. Otherwise the pipeline keeps
    its own default, the ``num_inference_steps`` default of its ``__call__``: ``(steps, "pipeline")``.

    Args:
        pipeline (`DiffusionPipeline`): the pipeline to audit.

    Returns:
        `tuple[int, str]`: the step count and its source, `"scheduler"` or `"pipeline"`.

    Raises:
        `ValueError`: if neither states a step count (then give one explicitly).
    """
    recommended = getattr(getattr(pipeline, "scheduler", None), "recommended_num_inference_steps", None)
    if recommended is not None:
        return int(recommended), "scheduler"
    parameter = inspect.signature(pipeline.__call__).parameters.get("num_inference_steps")
    default = None if parameter is None else parameter.default
    if not is_integer(default):
        raise ValueError(
            f"Neither {type(pipeline).__name__} nor its scheduler states a default number of inference steps; pass "
            "num_inference_steps (--num_inference_steps)."
        )
    return default, "pipeline"


def _sampler_settings(pipeline, num_inference_steps: int | None) -> dict[str, Any]:
    """The ``settings`` keys of a report that say how the audit sampled (see :class:`AuditReport`)."""
    if num_inference_steps is None:
        steps, source = default_num_inference_steps(pipeline)
        default = steps
    else:
        check_positive_int(num_inference_steps, "num_inference_steps")
        steps, source = num_inference_steps, "user"
        try:
            default, _ = default_num_inference_steps(pipeline)
        except ValueError:  # nothing states a default; the report says so (None)
            default = None
    scheduler = getattr(pipeline, "scheduler", None)
    config = None
    if scheduler is not None:
        # tuples -> lists, as report.json stores them
        config = json.loads(json.dumps({k: v for k, v in scheduler.config.items() if not k.startswith("_")}))
    return {
        "num_inference_steps": steps,
        "num_inference_steps_source": source,
        "default_num_inference_steps": default,
        "scheduler": None if scheduler is None else type(scheduler).__name__,
        "scheduler_config": config,
    }


def generate_images(
    pipeline,
    num_samples: int,
    *,
    prompts: list[str] | None = None,
    batch_size: int = 8,
    num_inference_steps: int | None = None,
    seed: int = 0,
    guidance_scale: float | None = None,
    before_batch: Callable[[list[str] | None], None] | None = None,
) -> tuple[torch.Tensor, list[str] | None]:
    """Generate ``num_samples`` images in ``[0, 1]`` `(N, C, H, W)` with a progress bar over batches.

    Args:
        pipeline (`DiffusionPipeline`): a text-to-image pipeline (its ``__call__`` takes ``prompt``) or an
            unconditional one (it takes ``batch_size``).
        num_samples (`int`): number of images.
        prompts (`list[str]`, *optional*): for text-to-image, used in turn (required there).
        batch_size (`int`, defaults to 8): images per pipeline call.
        num_inference_steps (`int`, *optional*): sampling steps; by default those of
            :func:`default_num_inference_steps` (the scheduler's recommendation, else the pipeline's default).
        seed (`int`, defaults to 0): batch ``b`` uses a generator seeded ``seed + b``.
        guidance_scale (`float`, *optional*): passed to the pipeline when given (text-to-image pipelines); otherwise
            the pipeline uses its default.
        before_batch (`Callable`, *optional*): called with each batch's prompts (`None` for an unconditional
            pipeline) before the pipeline call that generates it (e.g. to set per-prompt masks).

    Returns:
        `tuple`: the images and the prompt of each (or `None`).
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}.")
    if num_inference_steps is None:
        num_inference_steps, _ = default_num_inference_steps(pipeline)
    text = is_text_conditional(pipeline)
    if text and not prompts:
        raise ValueError("A text-to-image pipeline needs prompts (or training captions) to audit.")
    pipeline.set_progress_bar_config(disable=True)
    images, used_prompts = [], []
    starts = range(0, num_samples, batch_size)
    for batch, start in enumerate(tqdm(starts, desc="generating", unit="batch")):
        count = min(batch_size, num_samples - start)
        generator = torch.Generator().manual_seed(seed + batch)
        kwargs = {"num_inference_steps": num_inference_steps, "generator": generator, "output_type": "np"}
        if guidance_scale is not None:
            kwargs["guidance_scale"] = guidance_scale
        if text:
            batch_prompts = [prompts[(start + i) % len(prompts)] for i in range(count)]
            used_prompts += batch_prompts
            if before_batch is not None:
                before_batch(batch_prompts)
            output = pipeline(batch_prompts, **kwargs)
        else:
            if before_batch is not None:
                before_batch(None)
            output = pipeline(batch_size=count, **kwargs)
        array = np.asarray(output.images, dtype=np.float32)
        if not np.isfinite(array).all():
            raise ValueError(f"The pipeline generated NaN or infinite values in batch {batch}.")
        images.append(torch.from_numpy(array).permute(0, 3, 1, 2))
    return torch.cat(images), (used_prompts if text else None)


def audit_pipeline(
    pipeline,
    train_images: torch.Tensor,
    held_out_images: torch.Tensor,
    output_dir: str | os.PathLike,
    *,
    num_samples: int = 64,
    prompts: list[str] | None = None,
    batch_size: int = 8,
    num_inference_steps: int | None = None,
    seed: int = 0,
    num_copies_shown: int = 8,
    quality: bool = True,
) -> AuditReport:
    """Generate with ``pipeline``, measure memorization and quality against the data, and write the report files.

    Args:
        pipeline (`DiffusionPipeline`): the pipeline to audit (HOLD or stock).
        train_images (`torch.Tensor` of shape `(R, C, H, W)`): the training images in ``[0, 1]``, at the generations'
            size and channels (see :func:`~diffusers_hold.image_data.load_image_folder`), ``R >= 2``.
        held_out_images (`torch.Tensor` of shape `(M, C, H, W)`): real images not used for training (the control).
        output_dir (`str` or `os.PathLike`): where the files go (created).
        num_samples (`int`, defaults to 64): generations.
        prompts (`list[str]`, *optional*): for text-to-image pipelines, used in turn (e.g. the training captions).
        batch_size (`int`, defaults to 8), seed (`int`, defaults to 0): generation settings.
        num_inference_steps (`int`, *optional*): sampling steps; by default the count the pipeline is meant to run
            at (:func:`default_num_inference_steps`: a HOLD scheduler's recommendation for its solver, else the
            pipeline's own default). The report records the count, where it came from and the scheduler's config.
        num_copies_shown (`int`, defaults to 8): pairs in ``copies.png``.
        quality (`bool`, defaults to `True`): also measure the Fréchet distance and precision / recall, which need
            more held-out images than PCA components (33 for images of 32 or more elements) and 6 generations and
            training images; too few raise before anything is generated. `False` measures memorization only.

    Returns:
        [`AuditReport`]: what was measured; also written to ``report.json``.

    Raises:
        `ValueError`: before any generation, when ``output_dir`` cannot be written or (with ``quality``) the sets are
            too small for the quality metrics.
    """
    output_dir = check_output_dir(output_dir)
    if quality:
        dim = train_images[0].numel()
        check_quality_sizes(num_samples, len(train_images), len(held_out_images), dim, n_components=PCA_COMPONENTS)
    sampler = _sampler_settings(pipeline, num_inference_steps)
    generated, used_prompts = generate_images(
        pipeline,
        num_samples,
        prompts=prompts,
        batch_size=batch_size,
        num_inference_steps=sampler["num_inference_steps"],
        seed=seed,
    )
    if generated.shape[1:] != train_images.shape[1:]:
        raise ValueError(
            f"Generated images have shape {tuple(generated.shape[1:])} but the training images "
            f"{tuple(train_images.shape[1:])}; load the data at the generations' size and channels."
        )
    memorization = nn_ratio_memorization(generated, train_images, held_out_images, progress=True)
    scores = None
    if quality:
        scores = quality_report(generated, train_images, held_out_images, n_components=PCA_COMPONENTS, progress=True)
    report = AuditReport(
        memorization=memorization,
        quality=scores,
        pipeline_class=type(pipeline).__name__,
        prompts=used_prompts,
        settings={
            "num_samples": num_samples,
            "batch_size": batch_size,
            "seed": seed,
            "image_shape": list(generated.shape[1:]),
            **sampler,
        },
    )
    copies = _write_copies(output_dir / "copies.png", generated, train_images, memorization, num_copies_shown)
    report.files = {
        "copies": str(copies),
        "histogram": str(_write_histogram(output_dir / "ratio_histogram.png", memorization)),
        "json": str(output_dir / REPORT_FILE_NAME),
        "markdown": str(output_dir / "report.md"),
    }
    (output_dir / REPORT_FILE_NAME).write_text(report.to_json())
    markdown = report.to_markdown() + "\n\n![closest generations and their nearest training images](copies.png)\n"
    (output_dir / "report.md").write_text("# Memorization audit\n\n" + markdown)
    return report


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Create ``output_dir`` (with its parents) and check that files can be written in it; raise naming it otherwise.

    The audit calls this before it generates anything, so that an unwritable folder costs no work.
    """
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        raise ValueError(f"Cannot write the audit's files to {output_dir}: {error.strerror or error}.") from error
    return output_dir


def _write_copies(path: Path, generated, train, memorization: MemorizationReport, count: int) -> Path:
    """The ``count`` generations with the smallest ratio (top row) above their nearest training images."""
    order = torch.argsort(memorization.ratio)[:count]
    top = [to_pil_image(generated[i]) for i in order]
    bottom = [to_pil_image(train[memorization.nearest_index[i]]) for i in order]
    scale = max(1, 96 // generated.shape[-1])
    image_grid(top + bottom, cols=len(top), padding=2, scale=scale).save(path)
    return path


def _write_histogram(path: Path, memorization: MemorizationReport) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("The audit's histogram needs matplotlib: pip install 'diffusers-hold[train]'.") from error
    figure, axis = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(0, 1, 41)
    axis.hist(memorization.ratio.numpy(), bins=bins, alpha=0.7, label="generations")
    if memorization.held_out_ratio is not None:
        axis.hist(memorization.held_out_ratio.numpy(), bins=bins, alpha=0.5, label="held-out real images")
    axis.axvline(memorization.threshold, color="k", linestyle="--", label=f"threshold {memorization.threshold:.3g}")
    axis.set_xlabel("nearest / second-nearest training distance")
    axis.set_ylabel("images")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
