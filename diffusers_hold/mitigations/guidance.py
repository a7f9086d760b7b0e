"""Inference-time guidance schedules (Jain et al. 2025): delayed and opposite classifier-free guidance.

Memorized prompts are copied in the first, high-noise steps; guidance that is off (delayed) or negative (opposite)
there and normal afterwards keeps the image from locking onto a training image. Stock pipelines apply one
``guidance_scale`` ``g`` to every step, ``eps = eps_u + g (eps_c - eps_u)``. :class:`GuidanceSchedule` is a forward
hook on the pipeline's UNet that replaces the conditional half of the guidance batch by
``eps_u + (s(t) / g) (eps_c - eps_u)``, so the pipeline's own combination becomes ``eps_u + s(t) (eps_c - eps_u)``:
no pipeline code changes, and leaving the ``with`` block restores the UNet.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["GuidanceSchedule", "delayed_guidance", "opposite_guidance"]


class GuidanceSchedule:
    """A per-timestep guidance scale for an unmodified diffusers pipeline, as a context manager over its UNet::

        with delayed_guidance(pipe.unet, pipeline_guidance_scale=7.5):
            image = pipe(prompt, guidance_scale=7.5).images[0]

    The hook recognises the classifier-free-guidance call by its two identical halves of ``sample`` (diffusers puts
    the unconditional half first). Leaving the block raises if no such call was seen (the pipeline ran without
    guidance, so the schedule did nothing).

    Args:
        unet (`torch.nn.Module`): the pipeline's UNet.
        pipeline_guidance_scale (`float`): the ``guidance_scale`` passed to the pipeline (must be > 1, so that the
            pipeline runs classifier-free guidance).
        schedule (`Callable[[float], float]`): the guidance scale wanted at a timestep.
    """

    def __init__(self, unet: torch.nn.Module, pipeline_guidance_scale: float, schedule: Callable[[float], float]):
        if not pipeline_guidance_scale > 1:
            raise ValueError(
                f"pipeline_guidance_scale must be > 1 (diffusers pipelines skip guidance otherwise), got "
                f"{pipeline_guidance_scale!r}."
            )
        self.unet = unet
        self.pipeline_guidance_scale = float(pipeline_guidance_scale)
        self.schedule = schedule
        self.applied: list[tuple[float, float]] = []
        self._handle = None

    def __enter__(self) -> GuidanceSchedule:
        self.applied.clear()
        self._handle = self.unet.register_forward_hook(self._rescale, with_kwargs=True)
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        self._handle.remove()
        self._handle = None
        if exc_type is None and not self.applied:
            raise ValueError(
                "No classifier-free-guidance batch was seen: run the pipeline with guidance_scale > 1 inside the "
                "`with` block."
            )

    def _rescale(self, module, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        half = sample.shape[0] // 2
        if sample.shape[0] % 2 or not torch.equal(sample[:half], sample[half:]):
            return output
        t = float(torch.as_tensor(timestep).flatten()[0])
        scale = float(self.schedule(t))
        self.applied.append((t, scale))
        prediction = output.sample if hasattr(output, "sample") else output[0]
        unconditional, conditional = prediction.chunk(2)
        conditional = unconditional + (scale / self.pipeline_guidance_scale) * (conditional - unconditional)
        rescaled = torch.cat([unconditional, conditional])
        if hasattr(output, "sample"):
            return type(output)(sample=rescaled)
        return (rescaled, *output[1:])


def delayed_guidance(
    unet: torch.nn.Module, pipeline_guidance_scale: float, start_timestep: float = 500, scale: float = 7.5
) -> GuidanceSchedule:
    """No guidance while ``t > start_timestep``, then ``scale`` (Jain et al.: 0 until t = 500, then 7.5)."""
    return GuidanceSchedule(unet, pipeline_guidance_scale, lambda t: 0.0 if t > start_timestep else scale)


def opposite_guidance(
    unet: torch.nn.Module,
    pipeline_guidance_scale: float,
    start_timestep: float = 650,
    opposite_scale: float = -2.0,
    scale: float = 7.5,
) -> GuidanceSchedule:
    """Guidance ``opposite_scale`` (negative) while ``t > start_timestep``, then ``scale`` (Jain et al.: -2 until
    t = 650, then 7.5)."""
    return GuidanceSchedule(unet, pipeline_guidance_scale, lambda t: opposite_scale if t > start_timestep else scale)
