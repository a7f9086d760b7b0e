"""HOLDPipeline: unconditional image generation that carries the full HOLD state explicitly."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models import UNet2DModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..models.unet_hold import HOLDModelMixin, HOLDUNet2DModel
from ..schedulers.scheduling_hold import HOLDScheduler

__all__ = ["HOLDPipeline"]


class HOLDPipeline(DiffusionPipeline):
    """Unconditional generation with a :class:`~diffusers_hold.HOLDScheduler`.

    The UNet reads the whole state and predicts the last block's noise (``C`` channels): a
    :class:`~diffusers_hold.HOLDUNet2DModel` of the scheduler's order, or a stock ``UNet2DModel`` with
    ``in_channels == order * out_channels``. Or, with ``HOLDScheduler(prediction_type="vp_epsilon")``, it is a stock
    pretrained VP epsilon UNet (``C`` channels in and out) that the scheduler turns into a HOLD score (zero-shot).
    The state ``[q | p | s | ...]`` travels through the loop as ``latents``; the images are its position block
    ``q``, mapped from ``[-1, 1]`` to ``[0, 1]``.

    Like diffusers' pipelines it exposes :attr:`num_timesteps` and :attr:`interrupt` to ``callback_on_step_end``
    (set ``pipe._interrupt = True`` in a callback to skip the remaining steps); the guidance properties of the text
    pipelines have no meaning for unconditional generation.

    Args:
        unet ([`HOLDUNet2DModel`] or [`~diffusers.UNet2DModel`]): the noise predictor.
        scheduler ([`HOLDScheduler`]): the HOLD sampler.
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: HOLDUNet2DModel | UNet2DModel, scheduler: HOLDScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def _check_components(self) -> int:
        """Channels ``C`` of one HOLD block; raises if the UNet does not fit the scheduler."""
        if not isinstance(self.scheduler, HOLDScheduler):
            raise ValueError(f"HOLDPipeline needs a HOLDScheduler, got {type(self.scheduler).__name__}.")
        order, cfg = self.scheduler.config.order, self.unet.config
        channels = cfg.out_channels
        reads = cfg.hold_order * cfg.in_channels if isinstance(self.unet, HOLDModelMixin) else cfg.in_channels
        zero_shot = self.scheduler.config.prediction_type == "vp_epsilon"
        needs = channels if zero_shot else order * channels
        if reads != needs:
            raise ValueError(
                f"The UNet reads {reads} channels and predicts {channels}; a HOLDScheduler of order {order} with "
                f"prediction_type={self.scheduler.config.prediction_type!r} feeds it {needs}. Use a HOLD UNet of the "
                'scheduler\'s order with prediction_type="epsilon", or a stock VP epsilon UNet with "vp_epsilon".'
            )
        return channels

    @property
    def num_timesteps(self) -> int:
        """Number of denoising steps of the current (or last) call: the length of the scheduler's timesteps."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Whether a callback asked to stop: the remaining steps are skipped and the current state is returned."""
        return self._interrupt

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 250,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        """Generate images.

        Args:
            batch_size (`int`, defaults to 1): number of images.
            generator (`torch.Generator` or list of them, *optional*): makes generation deterministic.
            num_inference_steps (`int`, defaults to 250): number of model calls.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (float array in ``[0, 1]``, NHWC), `"pt"`
                (tensor in ``[0, 1]``, NCHW) or `"latent"` (the final full HOLD state, unclipped).
            return_dict (`bool`, defaults to `True`): return an [`~diffusers.ImagePipelineOutput`].
            latents (`torch.Tensor` of shape `(batch, order * C, H, W)`, *optional*): initial state; drawn from the
                prior ``N(0, L_inv)`` when omitted.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*): called as
                ``callback(pipe, i, t, kwargs)`` after every step with the tensors named in
                ``callback_on_step_end_tensor_inputs``; the dict it returns may replace them (``"latents"`` is the
                full HOLD state). A diffusers ``PipelineCallback`` brings its own ``tensor_inputs``.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`): tensors passed to it, a
                subset of ``_callback_tensor_inputs``.

        Returns:
            [`~diffusers.ImagePipelineOutput`] or `tuple`: the generated images.
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        unknown = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, but found "
                f"{unknown}."
            )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"Got a list of {len(generator)} generators for a batch of {batch_size} images; pass one per image."
            )
        channels = self._check_components()
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.scheduler.config.order * channels, *size)
        device = self._execution_device
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
            latents = latents * self.scheduler.init_noise_sigma
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {shape}.")
        else:
            latents = latents.to(device=device, dtype=self.unet.dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps = len(self.scheduler.timesteps)
        self._interrupt = False
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if self.interrupt:
                continue
            model_input = self.scheduler.scale_model_input(latents, t, full_state=True)
            noise_pred = self.unet(model_input, t).sample
            latents = self.scheduler.step(noise_pred, t, latents, generator=generator, full_state=True).prev_sample
            if callback_on_step_end is not None:
                tensors = {"latents": latents}
                outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
                latents = outputs.pop("latents", latents)

        self.maybe_free_model_hooks()
        if output_type == "latent":
            image = latents
        else:
            image = (latents[:, :channels] / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                image = image.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
