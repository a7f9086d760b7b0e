"""Tiny real diffusers components built offline, for tests, examples and trying the scripts without the Hub.

Everything here is a real diffusers / transformers class (``UNet2DConditionModel``, ``AutoencoderKL``,
``CLIPTextModel``, ``CLIPTokenizer``, ``StableDiffusionPipeline``) with a few thousand random weights, the shapes
diffusers' own fast tests use. The only Hub download of those tests, the tokenizer, is replaced by a character-level
CLIP vocabulary built in memory. The images such a pipeline makes are noise-like; what it is good for is running
every code path of a real pipeline in seconds on a CPU.

For the feature extractors of the audits: tiny random DINOv2 and CLIP models saved as local folders
(:func:`save_tiny_dinov2`, :func:`save_tiny_clip`) and a TorchScript stand-in for the SSCD descriptor whose
invariances are known by construction (:class:`ChannelMeanDescriptor`, :func:`save_channel_mean_torchscript`).
"""

from __future__ import annotations

import os
import string
import warnings
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Dinov2Config,
    Dinov2Model,
)

from .models import HOLDUNet2DModel

__all__ = [
    "ChannelMeanDescriptor",
    "save_channel_mean_torchscript",
    "save_tiny_clip",
    "save_tiny_dinov2",
    "tiny_clip_tokenizer",
    "tiny_stable_diffusion_pipeline",
    "tiny_stable_diffusion_xl_pipeline",
    "tiny_unet_2d",
]

_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>", "<unk>")


def tiny_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is single characters (letters, digits, punctuation), with no merges.

    Args:
        model_max_length (`int`, defaults to 77): sequence length the text encoder accepts (pipelines pad and
            truncate prompts to it, so it must be set).
    """
    vocab = {token: i for i, token in enumerate(_SPECIAL_TOKENS)}
    for character in string.ascii_lowercase + string.digits + string.punctuation:
        for token in (character, character + "</w>"):  # inside a word, and at its end
            vocab[token] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab,
        merges=[],
        unk_token="<unk>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
    )


def tiny_unet_2d(
    in_channels: int, out_channels: int, sample_size: int = 8, hold_order: int | None = None, seed: int = 0
) -> UNet2DModel:
    """A two-level ``UNet2DModel`` with widths 8 and 16 (about 30k random weights), or a ``HOLDUNet2DModel`` of that
    architecture with ``hold_order``.

    Args:
        in_channels (`int`), out_channels (`int`): the channels (for a HOLD UNet, ``in_channels`` is the data's).
        sample_size (`int`, defaults to 8): image side, a multiple of 2.
        hold_order (`int`, *optional*): build a ``HOLDUNet2DModel`` of this order.
        seed (`int`, defaults to 0): seed of the random weights (the global RNG is left as it was).
    """
    config = {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 4,
    }
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return UNet2DModel(**config) if hold_order is None else HOLDUNet2DModel(**config, hold_order=hold_order)


def _tiny_vae(sample_size: int) -> AutoencoderKL:
    """The four-channel-latent VAE of the tiny Stable Diffusion pipelines (one downsampling, images twice as large)."""
    return AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=2,
        sample_size=2 * sample_size,
    )


def _tiny_clip_text_config(tokenizer: CLIPTokenizer, width: int, **kwargs) -> CLIPTextConfig:
    """A two-layer CLIP text encoder config of ``width`` for ``tokenizer`` (``kwargs``: e.g. ``projection_dim``)."""
    return CLIPTextConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )


def tiny_stable_diffusion_pipeline(
    seed: int = 0, sample_size: int = 16, block_out_channels: tuple[int, int] = (4, 8), cross_attention_dim: int = 8
) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` of tiny random components, with SD's ``scaled_linear`` DDPM schedule.

    Args:
        seed (`int`, defaults to 0): seed of the random weights.
        sample_size (`int`, defaults to 16): latent side; images are twice as large (one VAE downsampling).
        block_out_channels (`tuple[int, int]`, defaults to `(4, 8)`): the UNet's widths (wider for benchmarks).
        cross_attention_dim (`int`, defaults to 8): the text encoder's width and the UNet's cross-attention width.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=block_out_channels,
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=2,
            norm_num_groups=2,
        )
        vae = _tiny_vae(sample_size)
        tokenizer = tiny_clip_tokenizer()
        text_encoder = CLIPTextModel(_tiny_clip_text_config(tokenizer, cross_attention_dim))
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_stable_diffusion_xl_pipeline(seed: int = 0, sample_size: int = 16) -> StableDiffusionXLPipeline:
    """A ``StableDiffusionXLPipeline`` of tiny random components (two text encoders, SDXL's micro-conditioning).

    Its components also make a ``StableDiffusionXLImg2ImgPipeline`` (pass ``requires_aesthetics_score=False``), so
    the base-plus-refiner hand-off (``denoising_end`` / ``denoising_start``) runs offline. The scheduler is SDXL's
    ``EulerDiscreteScheduler`` configuration.

    Args:
        seed (`int`, defaults to 0): seed of the random weights.
        sample_size (`int`, defaults to 16): latent side; images are twice as large.
    """
    width = 8  # of each text encoder; the UNet's cross-attention reads both, concatenated
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + width,  # six size/crop ids and the pooled text embedding
            cross_attention_dim=2 * width,
            norm_num_groups=4,
        )
        vae = _tiny_vae(sample_size)
        tokenizer = tiny_clip_tokenizer()
        text_config = _tiny_clip_text_config(tokenizer, width, projection_dim=width)
        text_encoder, text_encoder_2 = CLIPTextModel(text_config), CLIPTextModelWithProjection(text_config)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


# ------------------------------------------------------------------------- feature extractors for the audits
class ChannelMeanDescriptor(torch.nn.Module):
    """A stand-in for the SSCD descriptor: each channel's mean over the pixels, then a fixed ``(3, D)`` map.

    The mean ignores where the pixels are, so flips and any rearrangement of the pixels leave the descriptor unchanged;
    a map with orthonormal rows preserves dot products, so images whose (normalised) channel means are orthogonal get
    orthogonal descriptors. Invariances and similarities are therefore known by construction.

    Args:
        projection (`torch.Tensor` of shape `(3, D)`): the map.
    """

    def __init__(self, projection: torch.Tensor):
        super().__init__()
        self.register_buffer("projection", projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x.mean(dim=(2, 3)) @ projection``: ``(N, 3, H, W)`` to ``(N, D)``."""
        return x.mean(dim=(2, 3)) @ self.projection


def save_channel_mean_torchscript(path: str | os.PathLike, projection: torch.Tensor) -> Path:
    """Script a :class:`ChannelMeanDescriptor` and save it as a TorchScript file, as the SSCD release ships its models.

    Args:
        path (`str` or `os.PathLike`): the file to write.
        projection (`torch.Tensor` of shape `(3, D)`): the descriptor's map.

    Returns:
        `Path`: ``path``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is what the SSCD release ships
        torch.jit.script(ChannelMeanDescriptor(projection.contiguous())).save(os.fspath(path))
    return Path(path)


def save_tiny_dinov2(path: str | os.PathLike, image_size: int = 16, seed: int = 0, **config) -> Path:
    """Save a randomly initialised ``Dinov2Model`` (default: width 32, 2 layers, 2 heads, patch 4) with
    ``save_pretrained``; ``config`` overrides any ``Dinov2Config`` field (e.g. the dinov2-small sizes). The global RNG
    is left as it was.

    Returns:
        `Path`: ``path``.
    """
    settings = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=4)
    settings.update(config)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        Dinov2Model(Dinov2Config(image_size=image_size, **settings)).save_pretrained(path)
    return Path(path)


def save_tiny_clip(path: str | os.PathLike, image_size: int = 16, seed: int = 1) -> Path:
    """Save a randomly initialised ``CLIPModel`` (two towers of width 32, 2 layers, projection 16, patch 4) with the
    character-level tokenizer of :func:`tiny_clip_tokenizer`. Both towers carry ``projection_dim`` as the released
    configs do, so the vision tower loads alone as a ``CLIPVisionModelWithProjection``. The global RNG is left as it
    was.

    Returns:
        `Path`: ``path``.
    """
    tokenizer = tiny_clip_tokenizer()
    width, projection = 32, 16
    tower = dict(hidden_size=width, intermediate_size=2 * width, num_attention_heads=2, num_hidden_layers=2)
    text_config = dict(
        **tower,
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection,
    )
    vision_config = dict(**tower, image_size=image_size, patch_size=4, projection_dim=projection)
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    """``python -m diffusers_hold.testing FOLDER``: write a tiny random Stable Diffusion pipeline to try scripts on."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("output_dir", help="Folder to write the pipeline to (save_pretrained layout).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tiny_stable_diffusion_pipeline(seed=args.seed).save_pretrained(args.output_dir)
    print(f"tiny Stable Diffusion pipeline written to {args.output_dir}")


if __name__ == "__main__":
    main()
