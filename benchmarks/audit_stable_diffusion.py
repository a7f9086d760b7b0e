"""GPU recipe: audit a Stable Diffusion checkpoint with the copy-detection protocol (SSCD), without and with each
inference-time mitigation; with ``--random_sd15_unet``, the audit's throughput on an SD-1.5-sized pipeline with random
weights.

NOT RUN: this script was written on a machine without a GPU and has never been run on a GPU, nor at Stable Diffusion
scale; no numbers from it are reported anywhere. What was checked, on the CPU: its code path on a tiny random pipeline
saved to a folder (``--pipeline``, 2 steps, every mitigation), the parameter counts of the SD-1.5 configs below
(UNet 859.5M, VAE 83.7M, text encoder 123.1M, built on the meta device) and the SSCD-sized stand-in (24.6M
parameters, a 512-d descriptor). Its pieces are those of ``diffusers-hold audit --prompts ...``
(:func:`diffusers_hold.audit.audit_prompt_set`), which the test suite runs on tiny pipelines.

Audit a checkpoint (a local folder; nothing is downloaded). A fine-tune of training/README.md's "Text-to-image
fine-tuning" (``--use_lora``) saves a complete pipeline with the adapters fused, which is what ``--pipeline`` takes;
``--lora`` loads ``pytorch_lora_weights.safetensors`` onto a base instead::

    python benchmarks/audit_stable_diffusion.py --pipeline outputs/t2i-lora --prompts prompts.jsonl \\
        --sscd_path sscd_disc_mixup.torchscript.pt --clip_model_path clip-vit-large-patch14 \\
        --train_data_dir data/captioned --held_out_dir data/held_out --output_dir outputs/sd-audit

``prompts.jsonl`` holds ``{"prompt": ..., "reference_images": [...]}`` lines (e.g. Wen et al.'s memorized LAION
prompts with their images; without ``reference_images`` every training image is every prompt's reference). The
mitigations default to every one that applies to the pipeline (``none``, ``delayed_guidance``, ``opposite_guidance``,
``amg``; ``nemo`` too with ``--nemo_reference_prompts``, a file of ordinary prompts such as COCO captions); those that
do not apply are named and skipped. The report (``report.json``, ``report.md`` with the variants side by side, the
grids) goes to ``--output_dir``, and ``throughput.json`` the images per second of each variant.

Throughput on an SD-1.5-sized pipeline with random weights (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M, all
from configs; fp16 on the GPU; PNDM at 50 steps as SD 1.5 ships it), 512x512, features included: SSCD from
``--sscd_path``, or without it a random network of SSCD's architecture (ResNet-50, GeM pooling, 512-d projection)
scripted to TorchScript::

    python benchmarks/audit_stable_diffusion.py --random_sd15_unet --output_dir outputs/sd15-throughput
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_scheduler_overhead import SD15_UNET_CONFIG
from torch import nn

from diffusers_hold.audit import INFERENCE_MITIGATIONS, audit_prompt_set, read_prompt_file
from diffusers_hold.audit.variants import prepare_variants, resolve_guidance_scale

# Stable Diffusion 1.5's configs (runwayml/stable-diffusion-v1-5), for a pipeline of its size with random weights;
# the UNet's is bench_scheduler_overhead's (its other arguments, norm_num_groups=32 among them, diffusers' defaults)
SD15_UNET = SD15_UNET_CONFIG
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
SD15_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)


# --------------------------------------------------------------------------------------- SSCD-sized stand-in
class _Bottleneck(nn.Module):
    def __init__(self, channels_in: int, width: int, stride: int):
        super().__init__()
        out = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(channels_in, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out, 1, bias=False),
            nn.BatchNorm2d(out),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or channels_in != out:
            self.shortcut = nn.Sequential(nn.Conv2d(channels_in, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class SSCDSizedDescriptor(nn.Module):
    """SSCD's architecture (``sscd_disc_mixup``: a ResNet-50 trunk, GeM pooling with p = 3, a 2048 -> 512 linear
    projection) with random weights: the compute of the real descriptor, for throughput only."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        ]
        channels = 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for block in range(blocks):
                layers.append(_Bottleneck(channels, width, stride if block == 0 else 1))
                channels = 4 * width
        self.trunk = nn.Sequential(*layers)
        self.projection = nn.Linear(channels, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trunk(x).clamp(min=1e-6).pow(3.0).mean(dim=(2, 3)).pow(1.0 / 3.0)
        return self.projection(x)


def save_sscd_sized_torchscript(path: Path) -> Path:
    """Script a random :class:`SSCDSizedDescriptor` (eval mode) to ``path``, as the SSCD release ships its models."""
    torch.jit.script(SSCDSizedDescriptor().eval()).save(str(path))
    return path


# --------------------------------------------------------------------------------------------- pipelines
def random_sd15_pipeline(dtype: torch.dtype):
    """A StableDiffusionPipeline of SD 1.5's sizes with random weights (UNet, VAE, CLIP text encoder from configs;
    the character-level tokenizer of diffusers_hold.testing; PNDM as SD 1.5 ships it)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusers_hold.testing import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    text_config = CLIPTextConfig(
        **SD15_TEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    pipeline = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE),
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipeline.to(dtype=dtype)


def load_pipeline(options, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    import diffusers_hold  # noqa: F401  (registers the HOLD classes before a HOLD pipeline is loaded)

    pipeline = DiffusionPipeline.from_pretrained(options.pipeline, torch_dtype=dtype, local_files_only=True)
    if options.lora is not None:
        pipeline.load_lora_weights(options.lora)
    if hasattr(pipeline, "safety_checker"):
        pipeline.safety_checker = None  # the audit looks at what the model makes
    return pipeline


def applicable_mitigations(pipeline, names, prompts, nemo_prompts, resolution: int) -> list[str]:
    """The names of ``names`` that apply to ``pipeline``, as the audit itself decides (the others are printed)."""
    guidance = resolve_guidance_scale(pipeline, None)
    kept = []
    for name in names:
        try:
            prepare_variants(
                pipeline,
                [name],
                prompts=prompts[:2],
                guidance_scale=guidance,
                index_images=torch.rand(2, 3, resolution, resolution),
                nemo_reference_prompts=nemo_prompts,
            )
        except ValueError as error:
            print(f"skipping {name}: {error}")
        else:
            kept.append(name)
    return kept


# ------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default=None, help="A local Stable Diffusion pipeline folder.")
    parser.add_argument("--lora", default=None, help="pytorch_lora_weights.safetensors to load onto --pipeline.")
    parser.add_argument("--random_sd15_unet", action="store_true", help="An SD-1.5-sized pipeline, random weights.")
    parser.add_argument("--prompts", default=None, help="Prompt file (plain or JSONL with reference_images).")
    parser.add_argument("--num_prompts", type=int, default=64, help="Synthetic prompts with --random_sd15_unet.")
    parser.add_argument("--reference_dir", default=None)
    parser.add_argument("--train_data_dir", default=None)
    parser.add_argument("--held_out_dir", default=None)
    parser.add_argument("--caption_column", default="text")
    parser.add_argument("--num_random_train", type=int, default=64, help="Random training images (random mode).")
    parser.add_argument("--sscd_path", default=None, help="SSCD TorchScript, e.g. sscd_disc_mixup.torchscript.pt.")
    parser.add_argument("--clip_model_path", default=None, help="Local CLIP model for the CLIP score.")
    parser.add_argument("--nemo_reference_prompts", default=None, help="Ordinary prompts for the nemo variant.")
    parser.add_argument("--mitigations", nargs="+", default=None, choices=INFERENCE_MITIGATIONS,
                        help="Default: every one that applies.")  # fmt: skip
    parser.add_argument("--images_per_prompt", type=int, default=4)
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", required=True)
    return parser


def main() -> None:
    options = build_parser().parse_args()
    if (options.pipeline is None) == (not options.random_sd15_unet):
        raise SystemExit("Give --pipeline (a local checkpoint) or --random_sd15_unet, not both.")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, options.dtype) if device == "cuda" else torch.float32
    output = Path(options.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pipeline = random_sd15_pipeline(dtype) if options.random_sd15_unet else load_pipeline(options, dtype)
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    resolution = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    load_seconds = time.perf_counter() - start

    from diffusers_hold.image_data import load_image_folder

    prompt_set = read_prompt_file(options.prompts) if options.prompts else None
    train = held_out = None
    if options.train_data_dir is not None:
        train, captions = load_image_folder(
            train_data_dir=options.train_data_dir,
            resolution=resolution,
            caption_column=options.caption_column if prompt_set is None else None,
        )
        if prompt_set is None and captions is not None:
            prompt_set = list(dict.fromkeys(captions))
    if options.held_out_dir is not None:
        held_out, _ = load_image_folder(train_data_dir=options.held_out_dir, resolution=resolution)
    if options.random_sd15_unet:
        prompt_set = prompt_set or [f"a photograph of object number {i}" for i in range(options.num_prompts)]
        if train is None and options.reference_dir is None:
            train = torch.rand(
                options.num_random_train,
                3,
                resolution,
                resolution,
                generator=torch.Generator().manual_seed(options.seed),
            )
    if prompt_set is None:
        raise SystemExit("Give --prompts (or --train_data_dir with captions).")
    sscd = options.sscd_path
    if sscd is None:
        if not options.random_sd15_unet:
            raise SystemExit("Give --sscd_path: the SSCD TorchScript file (sscd_disc_mixup.torchscript.pt).")
        sscd = save_sscd_sized_torchscript(output / "sscd_sized_random.torchscript.pt")
    nemo = read_prompt_file(options.nemo_reference_prompts).prompts if options.nemo_reference_prompts else None
    prompts = prompt_set if isinstance(prompt_set, list) else prompt_set.prompts
    names = options.mitigations or applicable_mitigations(
        pipeline, [n for n in INFERENCE_MITIGATIONS if n != "nemo" or nemo], prompts, nemo, resolution
    )

    audit_start = time.perf_counter()
    report = audit_prompt_set(
        pipeline,
        output,
        prompts=prompt_set,
        train_images=train,
        held_out_images=held_out,
        reference_dir=options.reference_dir,
        images_per_prompt=options.images_per_prompt,
        features="sscd",
        features_path=sscd,
        clip_model_path=options.clip_model_path,
        mitigations=names,
        nemo_reference_prompts=nemo,
        batch_size=options.batch_size,
        num_inference_steps=options.num_inference_steps,
        seed=options.seed,
        quality=held_out is not None,
    )
    audit_seconds = time.perf_counter() - audit_start
    write_throughput(report, output, options, f"{device} {dtype}", load_seconds, audit_seconds)
    print(report.to_markdown())


def write_throughput(report, output: Path, options, where: str, load_seconds: float, audit_seconds: float) -> None:
    """Images per second of each variant (generation, SSCD features, protocol, CLIP score) into throughput.json."""
    rows = {}
    print(f"\n{'variant':<20}{'generation':>12}{'features':>10}{'audit':>10}  (images/s)")
    for name, section in report.protocol.items():
        n = section.copy_detection.num_generated
        timings = section.timings
        scored = sum(v for k, v in timings.items() if k != "reference_features_s")
        rows[name] = {
            "num_generated": n,
            "timings_s": timings,
            "generation_images_per_s": n / timings["generation_s"],
            "feature_images_per_s": n / timings["features_s"],
            "images_per_s": n / scored,
        }
        print(f"{name:<20}{rows[name]['generation_images_per_s']:>12.2f}{rows[name]['feature_images_per_s']:>10.1f}"
              f"{rows[name]['images_per_s']:>10.2f}")  # fmt: skip
    results = {
        "pipeline": "random SD-1.5-sized" if options.random_sd15_unet else options.pipeline,
        "device": torch.cuda.get_device_name() if where.startswith("cuda") else "cpu",
        "dtype": where.split(" ")[1],
        "image_size": report.settings["image_shape"][-1],
        "num_inference_steps": report.settings["num_inference_steps"],
        "batch_size": options.batch_size,
        "load_s": load_seconds,
        "audit_wall_s": audit_seconds,
        "variants": rows,
        "torch": torch.__version__,
    }
    (output / "throughput.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
