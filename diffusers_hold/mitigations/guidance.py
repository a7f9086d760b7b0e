"""Inference-time guidance schedules (Jain et al. 2025): delayed and opposite classifier-free guidance.

Memorized prompts are copied in the first, high-noise steps; guidance that is off (delayed) or negative (opposite)
there and normal afterwards keeps the image from locking onto a training image. Stock pipelines apply one
``guidance_scale`` ``g`` to every step, ``eps = eps_u + g (eps_c - eps_u)``. :class:`GuidanceSchedule` is a forward
hook on the pipeline's UNet that replaces the conditional half of the guidance batch by
``eps_u + (s(t) / g) (eps_c - eps_u)``, so the pipeline's own combination becomes ``eps_u + s(t) (eps_c - eps_u)``:
no pipeline code changes, and leaving the ``with`` block restores the UNet.

Anti-memorization guidance (Chen et al., CVPR 2024; :class:`AntiMemorizationGuidance`) is a hook of the same kind:
at every denoising call it turns the noise prediction into the predicted clean sample, and where that sample is
(nearly) a copy of a training item it moves it away from that item and returns the noise prediction of the moved
sample (its dissimilarity guidance, as a step in ``x_0`` space; see the class for the exact rule).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..metrics.neighbours import nearest_neighbours
from ..metrics.trajectory import is_guidance_batch

__all__ = [
    "AMGStep",
    "AntiMemorizationGuidance",
    "GuidanceSchedule",
    "delayed_guidance",
    "opposite_guidance",
]


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
        if not is_guidance_batch(sample):
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


# ------------------------------------------------------------------------------------ anti-memorization guidance
@dataclass
class AMGStep:
    """What :class:`AntiMemorizationGuidance` did at one denoising call (one entry per image of the pipeline's batch;
    under classifier-free guidance the two halves of the UNet batch count as one image).

    Attributes:
        timestep (`float`): the call's timestep (the first one, if the call had one per sample).
        flagged (`torch.Tensor` of shape `(B,)`, bool): images whose predicted clean sample looked memorized and was
            moved.
        ratio (`torch.Tensor` of shape `(B,)`, float64): ``d1 / d2`` of the predicted clean sample before the move.
        distance (`torch.Tensor` of shape `(B,)`, float64): ``d1``, its L2 distance to the nearest index item.
        nearest_index (`torch.Tensor` of shape `(B,)`, int64): that item's row in the index.
    """

    timestep: float
    flagged: torch.Tensor
    ratio: torch.Tensor
    distance: torch.Tensor
    nearest_index: torch.Tensor

    @property
    def num_flagged(self) -> int:
        """How many images were moved at this call."""
        return int(self.flagged.sum())


def _output_tensor(output) -> torch.Tensor:
    if hasattr(output, "sample"):
        return output.sample
    return output[0] if isinstance(output, tuple) else output


def _with_tensor(output, tensor: torch.Tensor):
    if hasattr(output, "sample"):
        return type(output)(sample=tensor)
    if isinstance(output, tuple):
        return (tensor, *output[1:])
    return tensor


class AntiMemorizationGuidance:
    r"""Dissimilarity guidance of anti-memorization guidance (Chen et al., CVPR 2024) for an unmodified DDPM-style
    diffusers pipeline, as a context manager over its UNet::

        with AntiMemorizationGuidance(pipe.unet, pipe.scheduler, train_images) as amg:
            images = pipe(batch_size=64).images
        amg.num_flagged()  # images moved at each denoising call

    At every UNet call the hook reads the noise prediction ``eps`` of ``x_t`` at timestep ``t`` and, with
    ``abar = scheduler.alphas_cumprod[t]``, forms the predicted clean sample

    .. math:: x_0 = (x_t - \sqrt{1 - \bar\alpha_t}\, \epsilon) / \sqrt{\bar\alpha_t}.

    It finds the nearest and second-nearest items ``n``, ``n_2`` of ``x_0`` in ``index`` (L2 between flattened
    tensors, :func:`~diffusers_hold.metrics.nearest_neighbours`), at distances ``d1 <= d2``. The sample is flagged
    when ``d1 / d2 < ratio_threshold`` (the "1/3 rule" of :func:`~diffusers_hold.metrics.nn_ratio_memorization`,
    default 1/3: a copy is far closer to one training item than to any other) or, if ``distance_threshold`` is set,
    when the normalised distance ``d1 / sqrt(D)`` (the RMS difference per element, ``D = C H W``) is below it.

    **The rule.** A flagged ``x_0`` is moved along the ray from ``n`` through it to the distance

    .. math:: r = \max(\rho\, d_2,\ \tau \sqrt{D}), \qquad x_0' = x_0 + (r - d_1) \frac{x_0 - n}{\lVert x_0 - n\rVert}

    (``rho = target_ratio``, default 1/2; the ``tau`` term only when ``distance_threshold = tau`` is set), so that
    ``||x_0' - n|| = r``: its ratio to the old nearest item becomes at least ``rho > ratio_threshold`` and its RMS
    distance at least ``tau``. The step is measured in the index's own distances, ``d2`` (which grows like
    ``sqrt(D)``), so it is dimension-aware and needs no tuning per resolution, and it is the smallest move along
    that direction that un-flags the sample with respect to ``n``: an image that is already novel is not touched, and a
    copy is moved just far enough, every step, which is what keeps quality. If ``x_0`` coincides with ``n``
    (``d1 = 0``, where the direction is undefined), it is moved along the current noise, ``x_t - sqrt(abar) n``. The
    hook returns the noise prediction consistent with ``x_0'``,

    .. math:: \epsilon' = (x_t - \sqrt{\bar\alpha_t}\, x_0') / \sqrt{1 - \bar\alpha_t}
              = \epsilon - \sqrt{\bar\alpha_t / (1 - \bar\alpha_t)}\, (x_0' - x_0),

    so any scheduler that reads the prediction as epsilon (DDIM, DDPM, PNDM, DPM-Solver, ...) steps towards
    ``x_0'``. Unflagged samples are returned bit-identical. This is Chen et al.'s dissimilarity guidance taken as a
    step in ``x_0`` space rather than a gradient of a similarity through the network: no backward pass, any model.
    Their despecification and duplicate-caption guidance need caption data and are not implemented here.

    **Classifier-free guidance.** Pass the pipeline's ``guidance_scale`` ``g``. A call whose two halves of ``sample``
    are identical (:func:`~diffusers_hold.metrics.trajectory.is_guidance_batch`; unconditional half first) is
    treated as one guided step: ``x_0`` is formed from the combination ``eps_u + g (eps_c - eps_u)`` that the
    pipeline will compute, and the same shift ``eps' - eps`` is added to both halves, so the pipeline's combination
    (whose coefficients ``1 - g`` and ``g`` sum to 1) comes out as exactly the ``eps'`` of ``x_0'``. Seeing such a
    call without ``guidance_scale`` raises. ``guidance_rescale`` of Stable Diffusion pipelines is not accounted for.

    Each call appends an :class:`AMGStep` to :attr:`steps` (cleared on entering the block). Leaving the ``with``
    block removes the hook.

    Args:
        unet (`torch.nn.Module`): the pipeline's UNet (any module whose output is a tensor, a tuple or has
            ``.sample``), called on ``x_t`` itself (schedulers whose ``scale_model_input`` is the identity).
        scheduler: the pipeline's scheduler; must have ``alphas_cumprod`` (DDPM-style) and predict ``"epsilon"``.
        index (`torch.Tensor` of shape `(N, C, H, W)`): the training images (or latents, for latent pipelines) to keep
            away from, in the samples' value range; ``N >= 2``.
        ratio_threshold (`float` or `None`, defaults to 1/3): flag when ``d1 / d2`` is below it; `None` turns the
            ratio test off.
        distance_threshold (`float` or `None`, *optional*): flag when ``d1 / sqrt(D)`` is below it.
        target_ratio (`float`, defaults to 1/2): ``rho`` above, in ``(ratio_threshold, 1]``.
        guidance_scale (`float`, *optional*): the pipeline's ``guidance_scale``, needed for guided pipelines.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        scheduler,
        index: torch.Tensor,
        ratio_threshold: float | None = 1 / 3,
        distance_threshold: float | None = None,
        target_ratio: float = 0.5,
        guidance_scale: float | None = None,
    ):
        table = getattr(scheduler, "alphas_cumprod", None)
        if table is None:
            raise ValueError(
                f"The scheduler ({type(scheduler).__name__}) has no alphas_cumprod: anti-memorization guidance "
                "needs a DDPM-style (variance-preserving) scheduler such as DDIMScheduler or DDPMScheduler."
            )
        table = torch.as_tensor(table, dtype=torch.float64).flatten()
        if table.numel() == 0 or not bool(torch.isfinite(table).all()) or not bool(((table > 0) & (table < 1)).all()):
            raise ValueError("The scheduler's alphas_cumprod must be non-empty and lie in (0, 1).")
        config = getattr(scheduler, "config", {})
        prediction_type = config.get("prediction_type", "epsilon") if hasattr(config, "get") else "epsilon"
        if prediction_type != "epsilon":
            raise ValueError(
                "Anti-memorization guidance reads the model output as epsilon; the scheduler predicts "
                f'"{prediction_type}".'
            )
        if not isinstance(index, torch.Tensor):
            raise ValueError(f"index must be a torch.Tensor of shape (N, C, H, W), got {type(index).__name__}.")
        if index.ndim != 4:
            raise ValueError(f"index must be a 4-D tensor (N, C, H, W), got shape {tuple(index.shape)}.")
        if index.shape[0] < 2 or index[0].numel() == 0:
            raise ValueError(
                f"index must hold at least 2 non-empty items (nearest and second-nearest), got shape "
                f"{tuple(index.shape)}."
            )
        if not index.is_floating_point():
            raise ValueError(f"index must be a floating-point tensor, got dtype {index.dtype}.")
        if not bool(torch.isfinite(index).all()):
            raise ValueError("index contains NaN or infinite values.")
        for name, value in (("ratio_threshold", ratio_threshold), ("distance_threshold", distance_threshold)):
            if value is not None and not (
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
            ):
                raise ValueError(f"{name} must be a positive number or None, got {value!r}.")
        if ratio_threshold is None and distance_threshold is None:
            raise ValueError("Set ratio_threshold or distance_threshold (or both); with neither nothing is flagged.")
        if ratio_threshold is not None and ratio_threshold > 1:
            raise ValueError(f"ratio_threshold must be <= 1 (d1 / d2 never exceeds 1), got {ratio_threshold!r}.")
        lower = 0.0 if ratio_threshold is None else ratio_threshold
        if not (isinstance(target_ratio, (int, float)) and lower < target_ratio <= 1):
            raise ValueError(f"target_ratio must lie in ({lower}, 1] (above ratio_threshold), got {target_ratio!r}.")
        if guidance_scale is not None and not (
            isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale)
        ):
            raise ValueError(f"guidance_scale must be a finite number or None, got {guidance_scale!r}.")
        self.unet = unet
        self.scheduler = scheduler
        self.index = index.detach()
        self.ratio_threshold = None if ratio_threshold is None else float(ratio_threshold)
        self.distance_threshold = None if distance_threshold is None else float(distance_threshold)
        self.target_ratio = float(target_ratio)
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        self.steps: list[AMGStep] = []
        self._alphas_cumprod = table
        self._handle = None

    def __enter__(self) -> AntiMemorizationGuidance:
        if self._handle is not None:
            raise RuntimeError("This AntiMemorizationGuidance is already active.")
        self.steps.clear()
        self._handle = self.unet.register_forward_hook(self._guide, with_kwargs=True)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def num_flagged(self) -> list[int]:
        """Number of images moved at each recorded denoising call."""
        return [step.num_flagged for step in self.steps]

    # -------------------------------------------------------------------------------------------------- hook
    def _alpha_bar(self, timestep, batch: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(timestep).detach().flatten().to("cpu", torch.float64)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"Got {t.numel()} timesteps for a batch of {batch} samples.")
        if not bool((t == t.round()).all()) or bool((t < 0).any()) or bool((t >= self._alphas_cumprod.numel()).any()):
            raise ValueError(
                f"Timesteps must be integers in [0, {self._alphas_cumprod.numel()}) to index alphas_cumprod, got "
                f"{t.tolist()}."
            )
        return self._alphas_cumprod[t.long()].to(device)

    def _guide(self, module, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        prediction = _output_tensor(output)
        if not bool(torch.isfinite(prediction).all()):
            raise ValueError("The model's noise prediction contains NaN or infinite values.")
        if tuple(sample.shape[1:]) != tuple(self.index.shape[1:]):
            raise ValueError(
                f"The samples have shape {tuple(sample.shape[1:])} per item but the index holds "
                f"{tuple(self.index.shape[1:])}: index must match the model's input (latents for latent pipelines)."
            )
        guided = is_guidance_batch(sample)
        if guided:
            if self.guidance_scale is None:
                raise ValueError(
                    "A classifier-free-guidance batch (two identical halves) was seen: pass the pipeline's "
                    "guidance_scale to AntiMemorizationGuidance."
                )
            half = sample.shape[0] // 2
            x_t = sample[:half].double()
            eps_u, eps_c = prediction.double().chunk(2)
            eps = eps_u + self.guidance_scale * (eps_c - eps_u)
        else:
            x_t, eps = sample.double(), prediction.double()
        batch = x_t.shape[0]
        abar = self._alpha_bar(timestep, sample.shape[0], x_t.device)[:batch].view(-1, *([1] * (x_t.ndim - 1)))
        signal, sigma = abar.sqrt(), (1 - abar).sqrt()
        x0 = (x_t - sigma * eps) / signal

        dist, nearest = nearest_neighbours(x0, self.index, k=2, dtype=torch.float64, device=x0.device)
        d1, d2 = dist[:, 0].to(x0.device), dist[:, 1].to(x0.device)
        ratio = torch.where(d2 > 0, d1 / torch.where(d2 > 0, d2, torch.ones_like(d2)), torch.ones_like(d1))
        dim = x0[0].numel()
        flagged = torch.zeros(batch, dtype=torch.bool, device=x0.device)
        target = self.target_ratio * d2
        if self.ratio_threshold is not None:
            flagged |= ratio < self.ratio_threshold
        if self.distance_threshold is not None:
            floor = self.distance_threshold * math.sqrt(dim)
            flagged |= d1 < floor
            target = target.clamp_min(floor)
        step_record = AMGStep(
            timestep=float(torch.as_tensor(timestep).flatten()[0]),
            flagged=flagged.cpu(),
            ratio=ratio.cpu(),
            distance=d1.cpu(),
            nearest_index=nearest[:, 0].clone(),
        )
        self.steps.append(step_record)
        if not bool(flagged.any()):
            return output

        rows = flagged.nonzero().flatten()
        per_item = (-1, *([1] * (x0.ndim - 1)))
        n = self.index[nearest[rows.cpu(), 0]].to(device=x0.device, dtype=torch.float64)
        away = x0[rows] - n
        noise = x_t[rows] - signal[rows] * n  # the direction where x0 coincides with n
        away = torch.where((d1[rows] > 0).view(per_item), away, noise)
        unit = away / away.flatten(1).norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny).view(per_item)
        moved = n + target[rows].view(per_item) * unit  # x0' = x0 + (r - d1) (x0 - n) / d1
        shift = (signal[rows] / sigma[rows]) * (x0[rows] - moved)  # eps' - eps

        new_prediction = prediction.clone()
        for offset in (0, batch) if guided else (0,):
            new_prediction[offset + rows] = (prediction[offset + rows].double() + shift).to(prediction.dtype)
        return _with_tensor(output, new_prediction)
