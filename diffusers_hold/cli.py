"""The ``diffusers-hold`` command.

    diffusers-hold audit --pipeline outputs/t2i-hold --train_data_dir data/train --held_out_dir data/held_out \\
        --num_samples 256 --output_dir outputs/audit

    diffusers-hold audit --pipeline outputs/t2i-lora --prompts prompts.jsonl --features sscd \\
        --features_path sscd_disc_mixup.torchscript.pt --mitigations none delayed_guidance amg --output_dir outputs/p

    diffusers-hold publish --pipeline outputs/t2i-hold --audit outputs/audit/report.json --license apache-2.0 \\
        --repo_id me/t2i-hold --output_dir outputs/t2i-hold-hub [--push]

    diffusers-hold bench --output_dir outputs/bench [--quick]

``bench`` runs the memorization benchmark of :mod:`diffusers_hold.bench` (the DDPM baseline, HOLD orders and
mitigations trained side by side on bundled data). ``audit`` loads a saved pipeline (HOLD or stock; ``import
diffusers_hold`` is done here), loads the training and held-out images at the size and channels the pipeline
generates, generates (prompts: ``--prompt``, else the training captions in turn; steps: ``--num_inference_steps``,
else what the scheduler recommends for its solver, else the pipeline's default) and writes the report files of
:func:`diffusers_hold.audit.audit_pipeline`. Any flag of the prompt-set protocol (``--prompts``, ``--features``,
``--mitigations``, ...) runs :func:`diffusers_hold.audit.audit_prompt_set` instead: ``--images_per_prompt`` images
for each prompt (of ``--prompts``, else ``--prompt``, else the distinct training captions), scored against each
prompt's reference images (the JSONL's ``reference_images`` or ``--reference_dir``) or the training images, once per
mitigation; there the training images are optional when the prompts have references, and the held-out images are
optional (without them: no control and no quality metrics).

``publish`` writes a saved pipeline in the Hub layout with its model card
(:func:`diffusers_hold.hub.save_for_hub`; the card carries the audit read from ``--audit``), checks that the folder
loads with ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``, and with ``--push`` uploads it
(:func:`diffusers_hold.hub.push_to_hub`).
"""

from __future__ import annotations

import argparse
import sys

import torch

from .audit import INFERENCE_MITIGATIONS
from .bench import build_parser as build_bench_parser
from .bench import run_from_args
from .metrics.features import FEATURE_KINDS

__all__ = ["main"]

# the flags of the prompt-set protocol (diffusers_hold.audit.audit_prompt_set): giving any of them runs it
PROTOCOL_FLAGS = (
    "prompts",
    "images_per_prompt",
    "reference_dir",
    "features",
    "features_path",
    "feature_image_size",
    "copy_threshold",
    "clip_model_path",
    "mitigations",
    "nemo_reference_prompts",
    "guidance_scale",
    "n_bootstrap",
)


def _protocol_requested(args: argparse.Namespace) -> bool:
    return any(getattr(args, flag) is not None for flag in PROTOCOL_FLAGS)


def _load_and_probe(args: argparse.Namespace, probe_prompts: list[str]):
    """The pipeline on the GPU when there is one, and the image-loading settings of its generations' size and
    channels (read off one 2-step generation)."""
    from diffusers import DiffusionPipeline

    from .audit import generate_images

    pipeline = DiffusionPipeline.from_pretrained(args.pipeline)
    pipeline.to("cuda" if torch.cuda.is_available() else "cpu")
    probe, _ = generate_images(pipeline, 1, prompts=probe_prompts, num_inference_steps=2, seed=args.seed)
    channels, resolution = probe.shape[1], probe.shape[-1]
    return pipeline, {"resolution": resolution, "num_channels": channels, "image_column": args.image_column}


def _audit(args: argparse.Namespace) -> None:
    from .audit import audit_pipeline, check_output_dir, is_text_conditional
    from .image_data import load_image_folder

    check_output_dir(args.output_dir)  # before any work: an unwritable folder would lose all of it
    if _protocol_requested(args):
        _audit_prompt_set(args)
        return
    # the data must be compared at the generations' size and channels: read them off one generation
    text = args.caption_column if args.prompt is None else None
    pipeline, settings = _load_and_probe(args, args.prompt or ["a photograph"])
    train, captions = load_image_folder(
        train_data_dir=args.train_data_dir,
        dataset_name=args.dataset_name,
        caption_column=text if is_text_conditional(pipeline) else None,
        **settings,
    )
    held_out, _ = load_image_folder(
        train_data_dir=args.held_out_dir,
        dataset_name=args.held_out_dataset_name,
        source_names=("held_out_dir", "held_out_dataset_name"),
        **settings,
    )
    report = audit_pipeline(
        pipeline,
        train,
        held_out,
        args.output_dir,
        num_samples=64 if args.num_samples is None else args.num_samples,
        prompts=args.prompt or captions,
        batch_size=args.batch_size,
        num_inference_steps=args.num_inference_steps,
        seed=args.seed,
        quality=not args.skip_quality,
    )
    print(report.to_markdown())
    print(f"\nreport: {report.files['markdown']}")


def _audit_prompt_set(args: argparse.Namespace) -> None:
    """``diffusers-hold audit`` with the prompt-set protocol; argument errors exit with a message naming them."""
    from .audit import audit_prompt_set, is_text_conditional, read_prompt_file
    from .image_data import load_image_folder

    try:
        prompt_set = None if args.prompts is None else read_prompt_file(args.prompts)
        nemo = None
        if args.nemo_reference_prompts is not None:
            nemo = read_prompt_file(args.nemo_reference_prompts).prompts
    except ValueError as error:
        raise SystemExit(f"diffusers-hold audit: {error}") from error
    first = prompt_set.prompts[:1] if prompt_set is not None else args.prompt or ["a photograph"]
    pipeline, settings = _load_and_probe(args, first)
    text = is_text_conditional(pipeline)
    train = captions = held_out = None
    if args.train_data_dir is not None or args.dataset_name is not None:
        wants_captions = text and prompt_set is None and args.prompt is None
        train, captions = load_image_folder(
            train_data_dir=args.train_data_dir,
            dataset_name=args.dataset_name,
            caption_column=args.caption_column if wants_captions else None,
            **settings,
        )
    if args.held_out_dir is not None or args.held_out_dataset_name is not None:
        held_out, _ = load_image_folder(
            train_data_dir=args.held_out_dir,
            dataset_name=args.held_out_dataset_name,
            source_names=("held_out_dir", "held_out_dataset_name"),
            **settings,
        )
    prompts = prompt_set
    if text and prompts is None:
        # --prompt, else the distinct training captions, in order
        prompts = args.prompt or (None if captions is None else list(dict.fromkeys(captions)))
    optional = {
        "copy_threshold": args.copy_threshold,
        "n_bootstrap": args.n_bootstrap,
        "features": args.features,
        "mitigations": args.mitigations,
    }
    try:
        report = audit_prompt_set(
            pipeline,
            args.output_dir,
            prompts=prompts,
            train_images=train,
            held_out_images=held_out,
            reference_dir=args.reference_dir,
            images_per_prompt=args.images_per_prompt,
            num_samples=args.num_samples,
            features_path=args.features_path,
            feature_kwargs=None if args.feature_image_size is None else {"image_size": args.feature_image_size},
            clip_model_path=args.clip_model_path,
            guidance_scale=args.guidance_scale,
            nemo_reference_prompts=nemo,
            batch_size=args.batch_size,
            num_inference_steps=args.num_inference_steps,
            seed=args.seed,
            quality=not args.skip_quality,
            **{name: value for name, value in optional.items() if value is not None},
        )
    except ValueError as error:
        raise SystemExit(f"diffusers-hold audit: {error}") from error
    print(report.to_markdown())
    print(f"\nreport: {report.files['markdown']}")


def _publish(args: argparse.Namespace) -> None:
    from diffusers import DiffusionPipeline
    from huggingface_hub import get_token
    from huggingface_hub.utils import validate_repo_id

    from .audit import AuditReport
    from .hub import push_to_hub, save_for_hub

    # everything that can be checked is checked before the work: the upload is the last step
    if args.repo_id is not None:
        try:
            validate_repo_id(args.repo_id)
        except ValueError as error:
            raise SystemExit(f"diffusers-hold publish: --repo_id {args.repo_id!r}: {error}") from error
    elif args.push:
        raise SystemExit("diffusers-hold publish: --push needs --repo_id (user/name).")
    token = args.hub_token or get_token()
    if args.push and token is None:
        raise SystemExit(
            "diffusers-hold publish: --push needs a Hugging Face token; log in with `hf auth login`, set HF_TOKEN or "
            "pass --hub_token."
        )
    try:
        report = None if args.audit is None else AuditReport.load(args.audit)
    except (OSError, ValueError) as error:
        raise SystemExit(f"diffusers-hold publish: {error}") from error
    pipeline = DiffusionPipeline.from_pretrained(args.pipeline)
    if report is not None and report.pipeline_class != type(pipeline).__name__:
        raise SystemExit(
            f"diffusers-hold publish: {args.audit} audits a {report.pipeline_class}, but {args.pipeline} holds a "
            f"{type(pipeline).__name__}; audit this pipeline (diffusers-hold audit --pipeline {args.pipeline} ...)."
        )
    folder = save_for_hub(
        pipeline,
        args.output_dir,
        base_model=args.base_model,
        license=args.license,
        tags=args.tags,
        repo_id=args.repo_id,
        memorization_audit=report,
        overwrite=args.overwrite,
    )
    _check_loads_back(pipeline, folder)
    print(f"Hub folder: {folder} (model card: {folder / 'README.md'}); it loads with trust_remote_code=True.")
    if not args.push:
        return
    try:
        url = push_to_hub(folder, args.repo_id, token=token, private=args.private)
    except Exception as error:  # network, authentication and Hub errors come from several libraries
        raise SystemExit(
            f"diffusers-hold publish: uploading {folder} to {args.repo_id} failed ({type(error).__name__}: {error}). "
            "The folder is complete and validated: once the cause is fixed, run the command again with --overwrite "
            "--push, or upload the folder as it is."
        ) from error
    print(f"uploaded: {url}")


def _check_loads_back(pipeline, folder) -> None:
    """Load the Hub folder as users will (``trust_remote_code=True``) and compare its classes with `pipeline`'s."""
    from diffusers import DiffusionPipeline

    loaded = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    expected = {"pipeline": type(pipeline), **{name: type(c) for name, c in pipeline.components.items()}}
    found = {"pipeline": type(loaded), **{name: type(c) for name, c in loaded.components.items()}}
    for name, cls in expected.items():
        if found.get(name) is not cls:
            raise SystemExit(
                f"diffusers-hold publish: {folder} loads {name} as {getattr(found.get(name), '__name__', None)}, "
                f"not {cls.__name__}."
            )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``diffusers-hold``."""
    parser = argparse.ArgumentParser(prog="diffusers-hold", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    audit = commands.add_parser("audit", help="Measure memorization of a saved pipeline against its training data.")
    audit.add_argument("--pipeline", required=True, help="A saved pipeline folder.")
    audit.add_argument("--train_data_dir", default=None, help="Training images (an imagefolder).")
    audit.add_argument("--dataset_name", default=None, help="Training images (a save_to_disk or data folder).")
    audit.add_argument("--held_out_dir", default=None, help="Held-out real images (an imagefolder).")
    audit.add_argument("--held_out_dataset_name", default=None, help="Held-out real images (a saved data set).")
    audit.add_argument("--image_column", default="image")
    audit.add_argument("--caption_column", default="text", help="Training captions used as prompts by default.")
    audit.add_argument("--prompt", nargs="+", default=None, help="Prompts to use instead of the captions.")
    audit.add_argument(
        "--num_samples", type=int, default=None, help="Generations (default 64; with --prompts: --images_per_prompt)."
    )
    audit.add_argument("--batch_size", type=int, default=8)
    audit.add_argument(
        "--num_inference_steps",
        type=int,
        default=None,
        help="Sampling steps (default: what the scheduler recommends for its solver, else the pipeline's default).",
    )
    audit.add_argument("--seed", type=int, default=0)
    audit.add_argument("--output_dir", required=True)
    audit.add_argument(
        "--skip_quality",
        action="store_true",
        help="Measure memorization only, without the Frechet distance and precision/recall (which need at least 33 "
        "held-out images).",
    )
    _add_protocol_arguments(audit)
    audit.set_defaults(run=_audit)
    publish = commands.add_parser(
        "publish", help="Write a saved pipeline and its model card (with a memorization audit) for the Hub; upload it."
    )
    publish.add_argument("--pipeline", required=True, help="A saved pipeline folder (save_pretrained).")
    publish.add_argument("--output_dir", required=True, help="The Hub folder to write (the repo's content).")
    publish.add_argument("--audit", default=None, help="The report.json of `diffusers-hold audit` for the card.")
    publish.add_argument("--base_model", default=None, help="Hub id of the model it was fine-tuned from.")
    publish.add_argument("--license", default=None, help='License of the weights, e.g. "apache-2.0".')
    publish.add_argument("--repo_id", default=None, help="The Hub repo, user/name (needed with --push).")
    publish.add_argument("--tags", nargs="+", default=None, help="Extra tags for the card.")
    publish.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output_dir.")
    publish.add_argument("--push", action="store_true", help="Upload the folder to --repo_id.")
    publish.add_argument("--private", action="store_true", default=None, help="Create the repo private.")
    publish.add_argument("--hub_token", default=None, help="Hub token (default: the stored login or HF_TOKEN).")
    publish.set_defaults(run=_publish)
    bench = commands.add_parser("bench", help="Train and measure the baseline, HOLD orders and mitigations.")
    build_bench_parser(bench)
    bench.set_defaults(run=_bench)
    return parser


def _add_protocol_arguments(audit: argparse.ArgumentParser) -> None:
    """The flags of the prompt-set protocol (:func:`diffusers_hold.audit.audit_prompt_set`)."""
    group = audit.add_argument_group(
        "prompt-set protocol",
        "Any of these flags runs the copy-detection protocol of the text-to-image memorization papers, once per "
        "mitigation on the same prompts and seeds.",
    )
    group.add_argument(
        "--prompts",
        default=None,
        help="A prompt file: one prompt a line, or JSON Lines (*.jsonl) with `prompt` and optional `reference_images` "
        "(paths relative to the file).",
    )
    group.add_argument("--images_per_prompt", type=int, default=None, help="Generations per prompt (default 4).")
    group.add_argument(
        "--reference_dir",
        default=None,
        help="Ground-truth images per prompt: sub-folder k holds those of prompt k (counted from 0). Without it (and "
        "without reference_images in the prompt file) every training image is every prompt's reference.",
    )
    group.add_argument(
        "--features",
        choices=FEATURE_KINDS,
        default=None,
        help="Feature space of the copy detection (default pca, fitted on the held-out images; sscd is the papers').",
    )
    group.add_argument(
        "--features_path",
        default=None,
        help="The features' weights: a local folder or cached Hub id (dinov2, clip), the TorchScript file (sscd).",
    )
    group.add_argument(
        "--feature_image_size", type=int, default=None, help="Input side of dinov2 / sscd (defaults 224 / 288)."
    )
    group.add_argument(
        "--copy_threshold", type=float, default=None, help="A copy is a cosine similarity above it (default 0.5)."
    )
    group.add_argument("--clip_model_path", default=None, help="A local CLIP model with tokenizer: the CLIP score.")
    group.add_argument(
        "--mitigations",
        nargs="+",
        choices=INFERENCE_MITIGATIONS,
        default=None,
        help="Inference-time mitigations, each generated with the same prompts and seeds (default: none).",
    )
    group.add_argument(
        "--nemo_reference_prompts", default=None, help="A prompt file of ordinary prompts, for --mitigations nemo."
    )
    group.add_argument(
        "--guidance_scale", type=float, default=None, help="Guidance scale (text-to-image; default: the pipeline's)."
    )
    group.add_argument("--n_bootstrap", type=int, default=None, help="Bootstrap resamples of prompts (default 1000).")


def _bench(args: argparse.Namespace) -> None:
    run_from_args(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``diffusers-hold`` command."""
    import diffusers_hold  # noqa: F401  (registers the HOLD classes before any pipeline is loaded)

    args = build_parser().parse_args(argv)
    if args.command == "audit":
        sources = {
            "training": ("train_data_dir", "dataset_name"),
            "held-out": ("held_out_dir", "held_out_dataset_name"),
        }
        protocol = _protocol_requested(args)
        for name, (a, b) in sources.items():
            given = (getattr(args, a) is not None, getattr(args, b) is not None)
            if protocol and all(given):
                raise SystemExit(f"diffusers-hold audit: pass at most one of --{a} and --{b} for the {name} images.")
            if not protocol and given[0] == given[1]:
                raise SystemExit(f"diffusers-hold audit: pass exactly one of --{a} and --{b} for the {name} images.")
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
