"""Fine-tune Stable Diffusion with HOLD dynamics (or its DDPM baseline), fully or with LoRA, under accelerate.

    accelerate launch training/train_text_to_image_hold.py --pretrained_model_name_or_path path/to/sd \\
        --train_data_dir data/images --caption_column text --resolution 512 --output_dir outputs/t2i-hold \\
        --hold_order 3 --use_lora --rank 8 --validation_prompts "a red barn" --validation_steps 500

Arguments follow diffusers' ``examples/text_to_image`` where the meaning is the same. With ``--scheduler hold`` (the
default) the pretrained UNet is converted with ``HOLDUNet2DConditionModel.from_unet`` (it starts as the zero-shot
HOLD sampler of the pretrained model, so fine-tuning starts from its behaviour) and trained on the last block's noise
of the HOLD state of the VAE latents; a folder that already holds a HOLD UNet is fine-tuned as it is. With
``--scheduler ddpm`` the stock UNet is trained with ``DDPMScheduler``: the baseline, with the same data, loop and
flags. ``--use_lora`` trains peft LoRA adapters of ``--rank`` on the attention projections (and, for HOLD, on the
input convolution, whose weights for the auxiliary blocks start at zero) instead of the whole UNet.

The output folder holds a pipeline that loads with ``DiffusionPipeline.from_pretrained`` after ``import
diffusers_hold`` (with LoRA, the adapters fused into the UNet), and with LoRA also ``pytorch_lora_weights.safetensors``
(load it with ``pipe.load_lora_weights`` onto the converted base). Checkpoints, exact resume, EMA, min-SNR, timestep
sampling, anti-gradient control, validation grids and tracker logging are those of ``diffusers_hold.training_loop``;
``--caption_randomization``, ``--text_embedding_noise`` and ``--cfg_gap_filter`` add the caption mitigations of
``diffusers_hold.mitigations``.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from accelerate.logging import get_logger
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.training_utils import EMAModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from diffusers_hold import HOLDScheduler, HOLDUNet2DConditionModel
from diffusers_hold.image_data import check_resolution
from diffusers_hold.mitigations import (
    CAPTION_RANDOMIZATIONS,
    CaptionRandomization,
    CFGGapFilter,
    TextEmbeddingNoise,
    TrainingCallback,
)
from diffusers_hold.training_config import TrainingConfig, add_training_arguments
from diffusers_hold.training_loop import finish_training, load_training_data, make_accelerator, sampling_model, train

logger = get_logger(__name__)

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="A Stable Diffusion pipeline folder.")
    add_training_arguments(parser)
    text = parser.add_argument_group("text-to-image")
    text.add_argument("--caption_column", default="text")
    text.add_argument("--validation_prompts", nargs="+", default=None)
    text.add_argument("--use_lora", action="store_true", help="Train peft LoRA adapters instead of the whole UNet.")
    text.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    captions = parser.add_argument_group("caption mitigations (diffusers_hold.mitigations)")
    captions.add_argument(
        "--caption_randomization",
        nargs="+",
        choices=CAPTION_RANDOMIZATIONS,
        default=None,
        help="Perturb captions with probability --caption_randomization_p (one of the given modes per sample).",
    )
    captions.add_argument("--caption_randomization_p", type=float, default=0.1)
    captions.add_argument(
        "--text_embedding_noise", type=float, default=None, help="Add this scale times N(0, I) to text embeddings."
    )
    captions.add_argument("--text_embedding_noise_p", type=float, default=1.0)
    captions.add_argument(
        "--cfg_gap_filter",
        type=float,
        default=None,
        help="Drop samples whose |eps(caption) - eps(empty)| exceeds this (Wen et al.; one extra forward per step).",
    )
    args = parser.parse_args(argv)
    if args.dataset_name is None and args.train_data_dir is None:
        parser.error("Pass --train_data_dir or --dataset_name.")
    if args.validation_steps and not args.validation_prompts:
        parser.error("--validation_steps needs --validation_prompts.")
    if args.use_lora and args.use_ema:
        parser.error("--use_ema applies to full fine-tuning; LoRA adapters are trained without EMA.")
    if args.use_lora and args.prune_heads_ratio is not None:
        parser.error("--prune_heads_ratio prunes the UNet's own weights; LoRA adapters would add to the pruned heads.")
    return args


def build_models(args: argparse.Namespace, pipe: StableDiffusionPipeline):
    """The UNet to train and its training scheduler, from the pretrained pipeline and ``--scheduler``."""
    stock_config = pipe.scheduler.config
    if args.scheduler == "ddpm":
        if isinstance(pipe.unet, HOLDUNet2DConditionModel):
            raise ValueError("--scheduler ddpm trains a stock UNet; this pipeline's UNet is a HOLD UNet.")
        return pipe.unet, DDPMScheduler.from_config(stock_config)
    if isinstance(pipe.unet, HOLDUNet2DConditionModel):  # continue a HOLD fine-tune
        if pipe.unet.config.hold_order != args.hold_order:
            raise ValueError(
                f"The pretrained HOLD UNet has order {pipe.unet.config.hold_order}; pass --hold_order "
                f"{pipe.unet.config.hold_order}."
            )
        unet = pipe.unet
    else:
        unet = HOLDUNet2DConditionModel.from_unet(pipe.unet, order=args.hold_order, scheduler_config=stock_config)
    # only what HOLD reads: the stock scheduler's own keys (clip_sample, steps_offset, ...) would be saved with the
    # pipeline and warned about on every load, and a native HOLD scheduler has no stock scheduler to hand them back to
    hold_keys = set(HOLDScheduler().config)
    noise_scheduler = HOLDScheduler.from_config(
        {key: value for key, value in stock_config.items() if key in hold_keys or key.startswith("_")},
        **unet.hold_process_settings(),
        solver=args.hold_solver,
        timestep_spacing="quadratic",
    )
    return unet, noise_scheduler


def tokenizer_words(tokenizer) -> list[str]:
    """The tokenizer's whole-word, alphabetic tokens: the vocabulary of random caption tokens."""
    return sorted({token[:-4] for token in tokenizer.get_vocab() if token.endswith("</w>") and token[:-4].isalpha()})


def caption_callbacks(args: argparse.Namespace, tokenizer, encode_text) -> list[TrainingCallback]:
    """The caption mitigations the flags ask for, in the order their hooks run."""
    callbacks: list[TrainingCallback] = []
    if args.caption_randomization:
        callbacks.append(
            CaptionRandomization(
                tokenizer_words(tokenizer), args.caption_randomization, p=args.caption_randomization_p, seed=args.seed
            )
        )
    if args.text_embedding_noise is not None:
        callbacks.append(TextEmbeddingNoise(args.text_embedding_noise, p=args.text_embedding_noise_p, seed=args.seed))
    if args.cfg_gap_filter is not None:
        callbacks.append(CFGGapFilter({"encoder_hidden_states": encode_text([""])}, threshold=args.cfg_gap_filter))
    return callbacks


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    config = TrainingConfig.from_args(args)
    output_dir = Path(config.output_dir)
    accelerator = make_accelerator(config)
    pipe = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, safety_checker=None)
    unet, noise_scheduler = build_models(args, pipe)
    vae, text_encoder, tokenizer = pipe.vae, pipe.text_encoder, pipe.tokenizer
    check_resolution(args.resolution, vae=vae, unet=unet)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)

    ema = None
    if args.use_lora:
        unet.requires_grad_(False)
        targets = LORA_TARGETS + (["conv_in"] if isinstance(unet, HOLDUNet2DConditionModel) else [])
        unet.add_adapter(
            LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=targets)
        )
    elif args.use_ema:
        ema = EMAModel(unet.parameters(), decay=args.ema_max_decay, model_cls=type(unet), model_config=unet.config)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    def encode_text(captions: list[str]) -> torch.Tensor:
        with torch.no_grad():
            ids = tokenizer(
                captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            return text_encoder(ids.to(accelerator.device))[0].float()

    def encode(batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            pixels = batch["pixel_values"].to(accelerator.device, dtype=weight_dtype)
            latents = vae.encode(pixels).latent_dist.sample(generator=generator) * vae.config.scaling_factor
        return latents.float(), {"encoder_hidden_states": encode_text(batch["captions"])}

    def build_pipeline(model) -> StableDiffusionPipeline:
        scheduler = noise_scheduler if isinstance(noise_scheduler, HOLDScheduler) else pipe.scheduler
        return StableDiffusionPipeline(**{**pipe.components, "unet": model, "scheduler": scheduler})

    train_dataset, train_dataloader = load_training_data(config, accelerator, caption_column=args.caption_column)
    unet = train(
        config,
        accelerator,
        model=unet,
        noise_scheduler=noise_scheduler,
        train_dataset=train_dataset,
        train_dataloader=train_dataloader,
        encode=encode,
        build_pipeline=build_pipeline,
        ema=ema,
        validation_kwargs={"prompt": args.validation_prompts},
        callbacks=caption_callbacks(args, tokenizer, encode_text),
        project_name="train_text_to_image_hold",
        hyperparameters=vars(args),
    ).model

    def final_pipeline() -> StableDiffusionPipeline:
        # the saved pipeline keeps full-precision weights, whatever --mixed_precision trained with
        vae.to(dtype=torch.float32)
        text_encoder.to(dtype=torch.float32)
        trained = sampling_model(accelerator, unet, ema)
        if args.use_lora:
            StableDiffusionPipeline.save_lora_weights(
                output_dir, unet_lora_layers=get_peft_model_state_dict(trained), safe_serialization=True
            )
            trained = copy.deepcopy(trained)  # the saved pipeline gets the adapters fused into plain weights
            trained.fuse_lora()
            trained.unload_lora()
        return build_pipeline(trained.to(torch.float32))

    finish_training(config, accelerator, final_pipeline, base_model=args.pretrained_model_name_or_path)
    return output_dir


if __name__ == "__main__":
    main()
