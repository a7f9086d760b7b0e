"""Inference-time mitigations as variants of one audit: the same prompts and seeds generated without and with each.

:func:`prepare_variants` checks, before anything is generated, that every requested mitigation applies to the
pipeline, and returns one :class:`MitigationVariant` per name: a context manager to generate inside and, for NeMo, a
hook that learns each batch's prompts. The mitigations are those of :mod:`diffusers_hold.mitigations`:

- ``"none"``: the pipeline as it is.
- ``"delayed_guidance"``: no classifier-free guidance while ``t > 0.5 T`` (``T`` the scheduler's
  ``num_train_timesteps``), then the pipeline's guidance scale (Jain et al.: 0 until t = 500 of 1000, then 7.5);
  :func:`~diffusers_hold.mitigations.delayed_guidance`. Text-to-image pipelines with guidance scale > 1.
- ``"opposite_guidance"``: guidance -2 while ``t > 0.65 T``, then the pipeline's scale (Jain et al.);
  :func:`~diffusers_hold.mitigations.opposite_guidance`. Same requirements.
- ``"amg"``: the dissimilarity guidance of anti-memorization guidance
  (:class:`~diffusers_hold.mitigations.AntiMemorizationGuidance`, ratio threshold 1/3, target ratio 1/2) against the
  training images (or, without them, all reference images), in the UNet's input space: VAE latents (the latent
  distribution's mean times the VAE's ``scaling_factor``) for latent pipelines, pixels in ``[-1, 1]`` otherwise. It
  needs a DDPM-style scheduler (``alphas_cumprod``, epsilon prediction, unscaled model input) and a UNet that reads
  the sample alone (not a HOLD UNet's stacked state).
- ``"nemo"``: NeMo value-neuron masking (Hintersdorf et al.) per prompt: the cross-attention value neurons whose
  activation on the prompt has a z-score above ``z_threshold`` (3) against reference prompts
  (:func:`~diffusers_hold.mitigations.value_neuron_z_scores`) are zeroed while that prompt's images are generated, in
  both halves of the guidance batch, which is what zeroing their ``to_v`` rows does
  (:func:`~diffusers_hold.mitigations.mask_value_neurons`), but per image, so that batches mixing prompts keep their
  seeds. Text-to-image pipelines with one CLIP text encoder and a UNet with cross-attention.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..mitigations import (
    AntiMemorizationGuidance,
    cross_attention_modules,
    delayed_guidance,
    opposite_guidance,
    value_neuron_activations,
)
from .run import is_text_conditional

__all__ = [
    "INFERENCE_MITIGATIONS",
    "MitigationVariant",
    "check_mitigation_names",
    "model_input_space",
    "prepare_variants",
    "resolve_guidance_scale",
    "text_states",
]

INFERENCE_MITIGATIONS = ("none", "delayed_guidance", "opposite_guidance", "amg", "nemo")
# Jain et al.'s schedules, as fractions of the training timesteps (500 and 650 of 1000), and the opposite scale
DELAYED_START = 0.5
OPPOSITE_START = 0.65
OPPOSITE_SCALE = -2.0
# anti-memorization guidance: flag at d1 / d2 < 1/3 (the audit's own rule), move to d1 / d2 = 1/2
AMG_RATIO_THRESHOLD = 1 / 3
AMG_TARGET_RATIO = 0.5
NEMO_Z_THRESHOLD = 3.0


@dataclass
class MitigationVariant:
    """One variant of a comparison: generate inside ``context()``, passing ``before_batch`` to
    :func:`~diffusers_hold.audit.generate_images`.

    Attributes:
        name (`str`): one of :data:`INFERENCE_MITIGATIONS`.
        settings (`dict`): what the report records (JSON values), with a one-line ``description``.
        context (`Callable[[], contextlib.AbstractContextManager]`): a fresh context manager per run.
        before_batch (`Callable`, *optional*): told each batch's prompts before it is generated.
    """

    name: str
    settings: dict[str, Any]
    context: Callable[[], contextlib.AbstractContextManager]
    before_batch: Callable[[list[str] | None], None] | None = None


def resolve_guidance_scale(pipeline, guidance_scale: float | None) -> float | None:
    """The guidance scale an audit generates with: ``guidance_scale`` if given, else the default of the pipeline's
    ``__call__`` (7.5 for Stable Diffusion); `None` for pipelines without one.

    Raises:
        `ValueError`: if ``guidance_scale`` is given for a pipeline that takes none.
    """
    parameter = inspect.signature(pipeline.__call__).parameters.get("guidance_scale")
    if parameter is None:
        if guidance_scale is not None:
            raise ValueError(
                f"{type(pipeline).__name__} takes no guidance_scale (it has no classifier-free guidance)."
            )
        return None
    if guidance_scale is None:
        default = parameter.default
        return None if default is inspect.Parameter.empty or default is None else float(default)
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise ValueError(f"guidance_scale must be a number, got {guidance_scale!r}.")
    return float(guidance_scale)


def prepare_variants(
    pipeline,
    names: Sequence[str],
    *,
    prompts: Sequence[str] | None,
    guidance_scale: float | None,
    index_images: torch.Tensor | None,
    index_source: str = "training images",
    nemo_reference_prompts: Sequence[str] | None = None,
    nemo_z_threshold: float = NEMO_Z_THRESHOLD,
) -> list[MitigationVariant]:
    """Check that each mitigation applies to ``pipeline`` and build its variant, before anything is generated.

    Args:
        pipeline (`DiffusionPipeline`): the audited pipeline.
        names (`Sequence[str]`): distinct names of :data:`INFERENCE_MITIGATIONS`, in the order to run them.
        prompts (`Sequence[str]`, *optional*): the prompt set (text-to-image), for NeMo's per-prompt neurons.
        guidance_scale (`float`, *optional*): the scale the audit generates with (:func:`resolve_guidance_scale`).
        index_images (`torch.Tensor`, *optional*): images in ``[0, 1]`` that AMG keeps away from (``N >= 2``).
        index_source (`str`, defaults to `"training images"`): what they are, for the report.
        nemo_reference_prompts (`Sequence[str]`, *optional*): ordinary prompts (at least 2) that NeMo's z-scores are
            measured against.
        nemo_z_threshold (`float`, defaults to 3.0): NeMo's z-score threshold.

    Returns:
        `list[MitigationVariant]`: one per name.

    Raises:
        `ValueError`: for an unknown or repeated name, or a mitigation that does not apply (the message says why).
    """
    check_mitigation_names(names)
    base = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    variants = []
    for name in names:
        if name == "none":
            variants.append(
                MitigationVariant(name, {**base, "description": "the pipeline as it is"}, contextlib.nullcontext)
            )
        elif name in ("delayed_guidance", "opposite_guidance"):
            variants.append(_guidance_schedule(pipeline, name, guidance_scale))
        elif name == "amg":
            variants.append(_amg(pipeline, guidance_scale, index_images, index_source))
        else:
            variants.append(_nemo(pipeline, guidance_scale, prompts, nemo_reference_prompts, nemo_z_threshold))
    return variants


def check_mitigation_names(names: Sequence[str]) -> None:
    """Raise unless ``names`` is a non-empty list of distinct names of :data:`INFERENCE_MITIGATIONS`."""
    if isinstance(names, str) or not names:
        raise ValueError(f"mitigations must be a non-empty list of names among {', '.join(INFERENCE_MITIGATIONS)}.")
    names = list(names)
    unknown = [name for name in names if name not in INFERENCE_MITIGATIONS]
    if unknown:
        raise ValueError(f"Unknown mitigation {unknown[0]!r}; choose among {', '.join(INFERENCE_MITIGATIONS)}.")
    repeated = [name for i, name in enumerate(names) if name in names[:i]]
    if repeated:
        raise ValueError(f"The mitigation {repeated[0]!r} is listed twice.")


def _refuse(pipeline, name: str, why: str) -> ValueError:
    return ValueError(f"The mitigation {name!r} does not apply to this {type(pipeline).__name__}: {why}.")


def _unet(pipeline, name: str) -> torch.nn.Module:
    unet = getattr(pipeline, "unet", None)
    if unet is None:
        raise _refuse(pipeline, name, "it hooks the pipeline's UNet, and the pipeline has none")
    return unet


def _guidance_schedule(pipeline, name: str, guidance_scale: float | None) -> MitigationVariant:
    if not is_text_conditional(pipeline):
        raise _refuse(
            pipeline, name, "it changes classifier-free guidance, which an unconditional pipeline does not run"
        )
    if guidance_scale is None or guidance_scale <= 1:
        raise _refuse(
            pipeline,
            name,
            f"it needs classifier-free guidance (a guidance scale > 1), and the scale is {guidance_scale}",
        )
    unet = _unet(pipeline, name)
    steps = int(getattr(pipeline.scheduler.config, "num_train_timesteps", 1000))
    g = guidance_scale
    if name == "delayed_guidance":
        start = DELAYED_START * steps
        settings = {"guidance_scale": g, "start_timestep": start, "scale": g}
        settings["description"] = f"delayed guidance (Jain et al.): no guidance while t > {start:g}, then {g:g}"

        def context():
            return delayed_guidance(unet, g, start_timestep=start, scale=g)
    else:
        start = OPPOSITE_START * steps
        settings = {"guidance_scale": g, "start_timestep": start, "opposite_scale": OPPOSITE_SCALE, "scale": g}
        settings["description"] = (
            f"opposite guidance (Jain et al.): guidance {OPPOSITE_SCALE:g} while t > {start:g}, then {g:g}"
        )

        def context():
            return opposite_guidance(unet, g, start_timestep=start, opposite_scale=OPPOSITE_SCALE, scale=g)

    return MitigationVariant(name, settings, context)


@torch.no_grad()
def model_input_space(pipeline, images: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Images in ``[0, 1]`` as the UNet sees samples: VAE latents (mean of the latent distribution, times
    ``scaling_factor``, minus ``shift_factor`` first where the VAE has one) for latent pipelines, else ``2 x - 1``.

    Returns:
        `tuple`: the tensor (float32, CPU) and ``"latents"`` or ``"pixels"``.
    """
    vae = getattr(pipeline, "vae", None)
    if vae is None:
        return (2 * images - 1).float(), "pixels"
    channels = vae.config.in_channels
    parts = []
    for batch in images.split(16):
        if batch.shape[1] != channels:
            batch = batch.expand(-1, channels, -1, -1)
        latents = vae.encode((2 * batch - 1).to(vae.device, vae.dtype)).latent_dist.mean.float()
        shift = getattr(vae.config, "shift_factor", None)
        parts.append(((latents - (shift or 0.0)) * vae.config.scaling_factor).cpu())
    return torch.cat(parts), "latents"


def _amg(pipeline, guidance_scale: float | None, images: torch.Tensor | None, source: str) -> MitigationVariant:
    unet = _unet(pipeline, "amg")
    scheduler = pipeline.scheduler
    if images is None or images.shape[0] < 2:
        raise _refuse(pipeline, "amg", "it needs at least 2 training (or reference) images to keep away from")
    if float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
        raise _refuse(
            pipeline,
            "amg",
            f"{type(scheduler).__name__} scales the model input (init_noise_sigma "
            f"{float(scheduler.init_noise_sigma):g}); AMG needs a DDPM-style scheduler such as DDIMScheduler, "
            "DDPMScheduler or PNDMScheduler",
        )
    index, space = model_input_space(pipeline, images)
    in_channels = getattr(getattr(unet, "config", None), "in_channels", index.shape[1])
    if in_channels != index.shape[1]:
        raise _refuse(
            pipeline,
            "amg",
            f"its UNet reads {in_channels} input channels but the samples ({space}) have {index.shape[1]} (a HOLD "
            "UNet reads its whole stacked state)",
        )
    guided = is_text_conditional(pipeline) and guidance_scale is not None and guidance_scale > 1
    try:
        guidance = AntiMemorizationGuidance(
            unet,
            scheduler,
            index,
            ratio_threshold=AMG_RATIO_THRESHOLD,
            target_ratio=AMG_TARGET_RATIO,
            guidance_scale=guidance_scale if guided else None,
        )
    except ValueError as error:
        raise _refuse(pipeline, "amg", str(error).rstrip(".")) from error
    settings = {
        "guidance_scale": guidance_scale,
        "ratio_threshold": AMG_RATIO_THRESHOLD,
        "target_ratio": AMG_TARGET_RATIO,
        "index": source,
        "index_size": int(index.shape[0]),
        "space": space,
        "description": (
            f"anti-memorization guidance (Chen et al.): each step's predicted clean {space[:-1]} that is nearer than "
            f"1/3 of the second-nearest of {index.shape[0]} {source} is moved to 1/2"
        ),
    }
    return MitigationVariant("amg", settings, lambda: guidance)


class _PromptNeuronMasks:
    """Zero each image's prompt's value neurons at the output of the cross-attention ``to_v`` projections.

    ``neurons[prompt][module]`` lists the neurons; :meth:`set_batch` (the ``before_batch`` hook) says which prompt
    each image of the next pipeline call has. A ``to_v`` call on ``2 B`` rows is a guidance batch (unconditional half
    first, both halves in the batch's order); on ``B`` rows, an unguided one.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], neurons: dict[str, dict[str, list[int]]]):
        self.modules, self.neurons = modules, neurons
        self.batch: list[str] = []
        self._handles: list = []
        self._keep: dict[tuple, torch.Tensor] = {}  # the masks of the current batch, per module and call shape

    def set_batch(self, prompts: list[str] | None) -> None:
        self.batch = list(prompts or [])
        self._keep.clear()

    def __enter__(self) -> _PromptNeuronMasks:
        for name, attention in self.modules.items():
            self._handles.append(attention.to_v.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, module_name: str):
        def mask(module, inputs, output):
            rows, size = output.shape[0], len(self.batch)
            if rows not in (size, 2 * size):
                raise ValueError(f"NeMo masks: a to_v call on {rows} rows for a batch of {size} prompts.")
            key = (module_name, rows, output.dtype, output.device)
            if key not in self._keep:
                keep = torch.ones(rows, output.shape[-1], dtype=output.dtype)
                for row in range(rows):
                    keep[row, self.neurons[self.batch[row % size]].get(module_name, [])] = 0
                self._keep[key] = keep.to(output.device).view(rows, *([1] * (output.ndim - 2)), -1)
            return output * self._keep[key]

        return mask


@torch.no_grad()
def text_states(pipeline, prompts: Sequence[str]) -> torch.Tensor:
    """The text encoder's last hidden states of ``prompts`` as the Stable Diffusion pipelines compute them (padded
    to the tokenizer's ``model_max_length``, truncated)."""
    tokenizer, encoder = pipeline.tokenizer, pipeline.text_encoder
    tokens = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    mask = tokens.attention_mask if getattr(encoder.config, "use_attention_mask", False) else None
    device = encoder.device
    return encoder(tokens.input_ids.to(device), attention_mask=None if mask is None else mask.to(device))[0]


def _nemo(
    pipeline, guidance_scale, prompts: Sequence[str] | None, references: Sequence[str] | None, z_threshold: float
) -> MitigationVariant:
    if not is_text_conditional(pipeline) or not prompts:
        raise _refuse(
            pipeline, "nemo", "NeMo masks the value neurons a prompt drives; an unconditional pipeline has no prompt"
        )
    if getattr(pipeline, "text_encoder_2", None) is not None or getattr(pipeline, "text_encoder", None) is None:
        raise _refuse(
            pipeline,
            "nemo",
            "the NeMo variant supports pipelines with one CLIP text encoder (Stable Diffusion 1.x / 2.x)",
        )
    if isinstance(z_threshold, bool) or not isinstance(z_threshold, (int, float)):
        raise ValueError(f"nemo_z_threshold must be a number, got {z_threshold!r}.")
    if references is None or len(references) < 2:
        raise ValueError(
            "The mitigation 'nemo' needs at least 2 reference prompts (ordinary prompts the memorized ones are "
            "compared with): pass nemo_reference_prompts (--nemo_reference_prompts FILE)."
        )
    unet = _unet(pipeline, "nemo")
    try:
        modules = cross_attention_modules(unet)
    except ValueError as error:
        raise _refuse(pipeline, "nemo", str(error).rstrip(".")) from error
    # z = (a - mean_ref) / std_ref per neuron, as value_neuron_z_scores computes it for one memorized prompt
    reference = value_neuron_activations(unet, text_states(pipeline, references))
    neurons: dict[str, dict[str, list[int]]] = {}
    for start in range(0, len(prompts), 64):
        batch = list(prompts[start : start + 64])
        activations = value_neuron_activations(unet, text_states(pipeline, batch))
        for i, prompt in enumerate(batch):
            neurons[prompt] = {}
            for name, ref in reference.items():
                z = (activations[name][i] - ref.mean(0)) / ref.std(0).clamp_min(1e-12)
                found = torch.nonzero(z > z_threshold).flatten().tolist()
                if found:
                    neurons[prompt][name] = found
    counts = [sum(len(found) for found in neurons[prompt].values()) for prompt in prompts]
    masks = _PromptNeuronMasks(modules, neurons)
    settings = {
        "guidance_scale": guidance_scale,
        "z_threshold": float(z_threshold),
        "num_reference_prompts": len(references),
        "masked_neurons_per_prompt": counts,
        "description": (
            f"NeMo value-neuron masking (Hintersdorf et al.): per prompt, the cross-attention value neurons with "
            f"z-score > {z_threshold:g} against {len(references)} reference prompts are zeroed ({sum(counts)} in all, "
            f"{sum(1 for c in counts if c)} of {len(counts)} prompts with any)"
        ),
    }
    return MitigationVariant("nemo", settings, lambda: masks, before_batch=masks.set_batch)
