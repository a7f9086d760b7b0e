"""Memorization audit of a pipeline: generate, compare with the training images, write a report people can read.

:func:`audit_pipeline` takes any diffusers image pipeline (HOLD or stock, unconditional or text-to-image), the
training images and held-out real images, generates ``num_samples`` images (prompts: given, or the training
captions in turn), and measures

- memorization by the nearest-neighbour ratio (the 1/3 rule; :func:`~diffusers_hold.metrics.nn_ratio_memorization`),
  with the held-out images as the control (their memorized fraction should be ~0);
- quality without downloaded weights: Fréchet distance and k-NN precision / recall in a PCA space fitted on the
  held-out images, with the train-vs-held-out floor (:func:`~diffusers_hold.metrics.quality_report`).

It writes ``report.json`` (everything, per sample), ``report.md`` (the summary; also the model card section of
:func:`diffusers_hold.hub.create_model_card`), ``copies.png`` (the generations closest to being copies, each beside its
nearest training image) and ``ratio_histogram.png`` (the ratios of generations and of held-out images, with the
threshold). ``diffusers-hold audit`` is the command-line form.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .image_data import load_image_dataset, prepare_training_dataset
from .metrics import MemorizationReport, QualityReport, nn_ratio_memorization, quality_report
from .utils import image_grid

__all__ = ["AuditReport", "audit_pipeline", "generate_images", "load_image_folder"]

# the default PCA of the quality metrics has 32 components and needs more held-out images than that
MIN_HELD_OUT_FOR_QUALITY = 33


@dataclass
class AuditReport:
    """What :func:`audit_pipeline` measured.

    Attributes:
        memorization (`MemorizationReport`): nearest-neighbour ratios of the generations and of the held-out control.
        quality (`QualityReport`, *optional*): Fréchet distance and precision / recall (`None` with too few held-out
            images for the PCA).
        pipeline_class (`str`): the audited pipeline's class.
        prompts (`list[str]`, *optional*): the prompt of each generation (text-to-image).
        settings (`dict`): the generation settings (samples, steps, seed, image size).
        files (`dict[str, str]`): the files written, by kind.
    """

    memorization: MemorizationReport
    quality: QualityReport | None
    pipeline_class: str
    prompts: list[str] | None
    settings: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values for ``json.dump`` (per-sample memorization values included)."""
        return {
            "pipeline_class": self.pipeline_class,
            "settings": self.settings,
            "memorization": self.memorization.to_dict(per_sample=True),
            "quality": None if self.quality is None else self.quality.to_dict(),
            "prompts": self.prompts,
            "files": self.files,
        }

    def to_markdown(self) -> str:
        """The summary as Markdown (a model card section)."""
        mem = self.memorization
        lines = [
            f"Audit of `{self.pipeline_class}`: {mem.num_generated} generations "
            f"({self.settings['num_inference_steps']} steps, seed {self.settings['seed']}) against "
            f"{mem.num_train} training images.",
            "",
            "| metric | value |",
            "| --- | --- |",
            f"| memorized generations (nearest / second-nearest distance < {mem.threshold:.3g}) | "
            f"{mem.fraction_memorized:.1%} |",
            f"| distinct training images copied | {mem.distinct_copied} |",
            f"| median distance ratio | {float(mem.ratio.double().median()):.3f} |",
        ]
        if mem.held_out_fraction is not None:
            control = "held-out real images below the threshold (control, ~0 expected)"
            lines.append(f"| {control} | {mem.held_out_fraction:.1%} |")
        quality = self.quality
        if quality is not None:
            lines += [
                f"| Fréchet distance to held-out images (PCA features) | {quality.frechet_distance:.4g} |",
                f"| same for the training images (floor) | {quality.floor_frechet_distance:.4g} |",
                f"| precision / recall (k-NN, k = {quality.k}) | {quality.precision:.3f} / {quality.recall:.3f} |",
            ]
        lines += ["", "Memorization is measured by the nearest-neighbour ratio in pixel space (the 1/3 rule)."]
        return "\n".join(lines)

    def model_index_metrics(self) -> list[dict[str, Any]]:
        """The headline numbers as ``(name, type, value)`` records for model-index metadata."""
        mem = self.memorization
        metrics = [
            {"name": "memorized fraction (1/3 rule)", "type": "memorized_fraction", "value": mem.fraction_memorized},
            {"name": "distinct training images copied", "type": "distinct_copied", "value": mem.distinct_copied},
        ]
        if self.quality is not None:
            value = self.quality.frechet_distance
            metrics.append({"name": "Frechet distance (PCA)", "type": "frechet_distance", "value": value})
        return metrics


def load_image_folder(
    *,
    train_data_dir: str | os.PathLike | None = None,
    dataset_name: str | os.PathLike | None = None,
    resolution: int,
    num_channels: int = 3,
    image_column: str = "image",
    caption_column: str | None = None,
) -> tuple[torch.Tensor, list[str] | None]:
    """Images of a folder or saved data set as a float tensor in ``[0, 1]`` `(N, C, resolution, resolution)`,
    centre-cropped without flips (as the nearest-neighbour rule needs), and their captions when asked.

    Args:
        train_data_dir (`str` or `os.PathLike`, *optional*), dataset_name (`str` or `os.PathLike`, *optional*):
            exactly one source, as in :func:`diffusers_hold.image_data.load_image_dataset`.
        resolution (`int`): side of the square images (the generations' size).
        num_channels (`int`, defaults to 3): 1 (grayscale) or 3 (RGB), the generations' channels.
        image_column (`str`, defaults to `"image"`), caption_column (`str`, *optional*): the columns.
    """
    dataset = load_image_dataset(train_data_dir=train_data_dir, dataset_name=dataset_name)
    examples, _ = prepare_training_dataset(
        dataset,
        image_column=image_column,
        caption_column=caption_column,
        resolution=resolution,
        center_crop=True,
        num_channels=num_channels,
    )
    items = [examples[i] for i in range(len(examples))]
    images = torch.stack([item["pixel_values"] for item in items]) / 2 + 0.5
    captions = [item["caption"] for item in items] if caption_column is not None else None
    return images, captions


def _is_text_conditional(pipeline) -> bool:
    return "prompt" in inspect.signature(pipeline.__call__).parameters


def generate_images(
    pipeline,
    num_samples: int,
    *,
    prompts: list[str] | None = None,
    batch_size: int = 8,
    num_inference_steps: int = 50,
    seed: int = 0,
) -> tuple[torch.Tensor, list[str] | None]:
    """Generate ``num_samples`` images in ``[0, 1]`` `(N, C, H, W)` with a progress bar over batches.

    Args:
        pipeline (`DiffusionPipeline`): a text-to-image pipeline (its ``__call__`` takes ``prompt``) or an
            unconditional one (it takes ``batch_size``).
        num_samples (`int`): number of images.
        prompts (`list[str]`, *optional*): for text-to-image, used in turn (required there).
        batch_size (`int`, defaults to 8): images per pipeline call.
        num_inference_steps (`int`, defaults to 50): sampling steps.
        seed (`int`, defaults to 0): batch ``b`` uses a generator seeded ``seed + b``.

    Returns:
        `tuple`: the images and the prompt of each (or `None`).
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}.")
    text = _is_text_conditional(pipeline)
    if text and not prompts:
        raise ValueError("A text-to-image pipeline needs prompts (or training captions) to audit.")
    pipeline.set_progress_bar_config(disable=True)
    images, used_prompts = [], []
    starts = range(0, num_samples, batch_size)
    for batch, start in enumerate(tqdm(starts, desc="generating", unit="batch")):
        count = min(batch_size, num_samples - start)
        generator = torch.Generator().manual_seed(seed + batch)
        kwargs = {"num_inference_steps": num_inference_steps, "generator": generator, "output_type": "np"}
        if text:
            batch_prompts = [prompts[(start + i) % len(prompts)] for i in range(count)]
            used_prompts += batch_prompts
            output = pipeline(batch_prompts, **kwargs)
        else:
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
    num_inference_steps: int = 50,
    seed: int = 0,
    num_copies_shown: int = 8,
) -> AuditReport:
    """Generate with ``pipeline``, measure memorization and quality against the data, and write the report files.

    Args:
        pipeline (`DiffusionPipeline`): the pipeline to audit (HOLD or stock).
        train_images (`torch.Tensor` of shape `(R, C, H, W)`): the training images in ``[0, 1]``, at the generations'
            size and channels (see :func:`load_image_folder`), ``R >= 2``.
        held_out_images (`torch.Tensor` of shape `(M, C, H, W)`): real images not used for training (the control).
        output_dir (`str` or `os.PathLike`): where the files go (created).
        num_samples (`int`, defaults to 64): generations.
        prompts (`list[str]`, *optional*): for text-to-image pipelines, used in turn (e.g. the training captions).
        batch_size (`int`, defaults to 8), num_inference_steps (`int`, defaults to 50), seed (`int`, defaults to 0):
            generation settings.
        num_copies_shown (`int`, defaults to 8): pairs in ``copies.png``.
    """
    output_dir = Path(output_dir)
    generated, used_prompts = generate_images(
        pipeline,
        num_samples,
        prompts=prompts,
        batch_size=batch_size,
        num_inference_steps=num_inference_steps,
        seed=seed,
    )
    if generated.shape[1:] != train_images.shape[1:]:
        raise ValueError(
            f"Generated images have shape {tuple(generated.shape[1:])} but the training images "
            f"{tuple(train_images.shape[1:])}; load the data at the generations' size and channels."
        )
    memorization = nn_ratio_memorization(generated, train_images, held_out_images, progress=True)
    quality = None
    if len(held_out_images) >= MIN_HELD_OUT_FOR_QUALITY:
        quality = quality_report(generated, train_images, held_out_images, progress=True)
    report = AuditReport(
        memorization=memorization,
        quality=quality,
        pipeline_class=type(pipeline).__name__,
        prompts=used_prompts,
        settings={
            "num_samples": num_samples,
            "num_inference_steps": num_inference_steps,
            "seed": seed,
            "image_shape": list(generated.shape[1:]),
        },
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    copies = _write_copies(output_dir / "copies.png", generated, train_images, memorization, num_copies_shown)
    report.files = {
        "copies": str(copies),
        "histogram": str(_write_histogram(output_dir / "ratio_histogram.png", memorization)),
        "json": str(output_dir / "report.json"),
        "markdown": str(output_dir / "report.md"),
    }
    (output_dir / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    markdown = report.to_markdown() + "\n\n![closest generations and their nearest training images](copies.png)\n"
    (output_dir / "report.md").write_text("# Memorization audit\n\n" + markdown)
    return report


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def _write_copies(path: Path, generated, train, memorization: MemorizationReport, count: int) -> Path:
    """The ``count`` generations with the smallest ratio (top row) above their nearest training images."""
    order = torch.argsort(memorization.ratio)[:count]
    top = [_to_pil(generated[i]) for i in order]
    bottom = [_to_pil(train[memorization.nearest_index[i]]) for i in order]
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
