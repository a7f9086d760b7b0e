"""The settings of a training run: :class:`TrainingConfig`, and the flags both training scripts share.

:class:`TrainingConfig` is the interface of :mod:`diffusers_hold.training_loop`; build it in Python, or from the
scripts' flags with :meth:`TrainingConfig.from_args` after :func:`add_training_arguments`. Its field defaults are the
flags' defaults (the parser takes them from the dataclass), so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, fields

from ._validation import check_positive_int

__all__ = ["TrainingConfig", "add_training_arguments"]


@dataclass
class TrainingConfig:
    """Settings of one run of :func:`diffusers_hold.training_loop.train`; one field per shared flag of the scripts.

    Attributes:
        output_dir (`str`): checkpoints, validation grids, logs and the final pipeline.

        dataset_name (`str`, *optional*), dataset_config_name (`str`, *optional*), train_data_dir (`str`,
            *optional*), image_column (`str`, defaults to `"image"`), cache_dir (`str`, *optional*): the training
            data (see :func:`diffusers_hold.image_data.load_image_dataset`).
        resolution (`int`, defaults to 32), center_crop (`bool`), random_flip (`bool`), skip_bad_images (`bool`),
            dataloader_num_workers (`int`, defaults to 0): how the images are prepared and loaded.

        scheduler (`str`, defaults to `"hold"`): `"hold"`, or `"ddpm"` for the baseline.
        hold_order (`int`, defaults to 3), hold_solver (`str`, defaults to `"sscs"`): the HOLD process and sampler.

        seed (`int`, defaults to 0): seed of the weights, the data order, the noise and the timesteps.
        train_batch_size (`int`, defaults to 16), num_train_epochs (`int`, defaults to 100), max_train_steps
            (`int`, *optional*; overrides the epochs), gradient_accumulation_steps (`int`, defaults to 1),
            gradient_checkpointing (`bool`): the length and batching of the run.
        learning_rate (`float`, defaults to 1e-4), lr_scheduler (`str`, defaults to `"constant"`), lr_warmup_steps
            (`int`), adam_beta1, adam_beta2, adam_weight_decay, adam_epsilon (`float`), max_grad_norm (`float`,
            defaults to 1.0; 0 disables clipping): AdamW and its learning-rate schedule.
        snr_gamma (`float`, *optional*): min-SNR-gamma loss weighting.
        use_ema (`bool`), ema_max_decay (`float`, defaults to 0.9999): an EMA of the weights (saved as the model).
        mixed_precision (`str`, defaults to `"no"`): `"no"`, `"fp16"` or `"bf16"`.

        timestep_sampling (`str`, defaults to `"uniform"`): `"uniform"`, `"snr_interval"` or `"logit_normal"`, with
            snr_interval_low, snr_interval_high, snr_interval_confidence, snr_interval_space, snr_interval_tails,
            timestep_uniform_mixture, timestep_importance_weights, logit_normal_mean, logit_normal_std (see
            :func:`diffusers_hold.mitigations.get_timestep_sampler`).
        anti_gradient_control (`bool`), agc_mem_ratio (`float`, defaults to 2.0), agc_decay (`float`, defaults to
            0.8), agc_num_bins (`int`, *optional*): the anti-gradient-control loss filter.
        ensemble_shards (`int`, *optional*), ensemble_rounds (`int`, defaults to 10), ensemble_local_epochs (`int`,
            defaults to 1), ensemble_redistribute (`float`, defaults to 0.0): iterative ensemble training.
        prune_heads_ratio (`float`, *optional*), prune_at_step (`int`, defaults to 0), prune_criterion (`str`,
            defaults to `"masking"`), prune_importance_images (`int`, defaults to 32): attention-head pruning.

        checkpointing_steps (`int`, defaults to 500), checkpoints_total_limit (`int`, *optional*),
            resume_from_checkpoint (`str`, *optional*; `"latest"` or a checkpoint folder): checkpoints.
        overwrite_output_dir (`bool`): delete another run's checkpoints, record and pipeline index in ``output_dir``
            and start afresh, instead of refusing to (see :meth:`diffusers_hold.checkpoints.CheckpointManager.claim`).
        validation_steps (`int`, *optional*), num_validation_images (`int`, defaults to 16),
            validation_inference_steps (`int`, defaults to 100): validation grids.
        report_to (`str`, defaults to `"tensorboard"`): an accelerate tracker, or `"none"`.
        push_to_hub (`bool`), hub_model_id (`str`, *optional*), hub_token (`str`, *optional*): publishing.
        audit_report (`str`, *optional*): a ``report.json`` of ``diffusers-hold audit`` whose summary and metrics go
            into the model card of ``push_to_hub`` (see :meth:`diffusers_hold.audit.AuditReport.load`).
    """

    output_dir: str
    # data
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_data_dir: str | None = None
    image_column: str = "image"
    cache_dir: str | None = None
    resolution: int = 32
    center_crop: bool = False
    random_flip: bool = False
    skip_bad_images: bool = False
    dataloader_num_workers: int = 0
    # HOLD
    scheduler: str = "hold"
    hold_order: int = 3
    hold_solver: str = "sscs"
    # training
    seed: int = 0
    train_batch_size: int = 16
    num_train_epochs: int = 100
    max_train_steps: int | None = None
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    snr_gamma: float | None = None
    use_ema: bool = False
    ema_max_decay: float = 0.9999
    mixed_precision: str = "no"
    # timestep sampling
    timestep_sampling: str = "uniform"
    snr_interval_low: float | None = None
    snr_interval_high: float | None = None
    snr_interval_confidence: float = 0.95
    snr_interval_space: str = "u"
    snr_interval_tails: str = "renormalize"
    timestep_uniform_mixture: float = 0.0
    timestep_importance_weights: bool = False
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    # loss filters
    anti_gradient_control: bool = False
    agc_mem_ratio: float = 2.0
    agc_decay: float = 0.8
    agc_num_bins: int | None = None
    # iterative ensemble training
    ensemble_shards: int | None = None
    ensemble_rounds: int = 10
    ensemble_local_epochs: int = 1
    ensemble_redistribute: float = 0.0
    # attention-head pruning
    prune_heads_ratio: float | None = None
    prune_at_step: int = 0
    prune_criterion: str = "masking"
    prune_importance_images: int = 32
    # checkpoints, validation, logging
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    overwrite_output_dir: bool = False
    validation_steps: int | None = None
    num_validation_images: int = 16
    validation_inference_steps: int = 100
    report_to: str = "tensorboard"
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_token: str | None = None
    audit_report: str | None = None

    def __post_init__(self):
        # settings that would otherwise fail deep inside the run, or finish it without training
        for name in ("train_batch_size", "num_train_epochs", "gradient_accumulation_steps", "max_train_steps"):
            value = getattr(self, name)
            if value is not None or name != "max_train_steps":  # None: the epochs decide
                check_positive_int(value, f"--{name}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainingConfig:
        """The config of parsed flags: every field from the flag of the same name (:func:`add_training_arguments`);
        a script's own flags (model size, LoRA, captions, ...) stay in ``args``."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def add_training_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the flags both training scripts share (diffusers' names where the meaning is the same), one per field of
    :class:`TrainingConfig`, whose defaults they take.

    Args:
        parser (`argparse.ArgumentParser`): the script's parser.
    """
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", help="A save_to_disk folder, a local data folder or a dataset id.")
    data.add_argument("--dataset_config_name")
    data.add_argument("--train_data_dir", help="An imagefolder (with metadata.jsonl for captions).")
    data.add_argument("--image_column")
    data.add_argument("--cache_dir")
    data.add_argument("--resolution", type=int)
    data.add_argument("--center_crop", action="store_true", help="Center crop (default: random crop).")
    data.add_argument("--random_flip", action="store_true")
    data.add_argument("--skip_bad_images", action="store_true", help="Skip unreadable images (and count them).")
    data.add_argument("--dataloader_num_workers", type=int)

    hold = parser.add_argument_group("HOLD")
    hold.add_argument("--scheduler", choices=("hold", "ddpm"), help="ddpm trains the baseline.")
    hold.add_argument("--hold_order", type=int)
    hold.add_argument("--hold_solver", choices=("euler_maruyama", "sscs", "ddim"))

    training = parser.add_argument_group("training")
    training.add_argument("--output_dir", required=True)
    training.add_argument("--seed", type=int)
    training.add_argument("--train_batch_size", type=int)
    training.add_argument("--num_train_epochs", type=int)
    training.add_argument("--max_train_steps", type=int, help="Overrides --num_train_epochs.")
    training.add_argument("--gradient_accumulation_steps", type=int)
    training.add_argument("--gradient_checkpointing", action="store_true")
    training.add_argument("--learning_rate", type=float)
    training.add_argument("--lr_scheduler", help="A diffusers.optimization scheduler name.")
    training.add_argument("--lr_warmup_steps", type=int)
    training.add_argument("--adam_beta1", type=float)
    training.add_argument("--adam_beta2", type=float)
    training.add_argument("--adam_weight_decay", type=float)
    training.add_argument("--adam_epsilon", type=float)
    training.add_argument("--max_grad_norm", type=float, help="0 disables gradient clipping.")
    training.add_argument("--snr_gamma", type=float, help="Min-SNR weighting; 5.0 is the usual value.")
    training.add_argument("--use_ema", action="store_true")
    training.add_argument("--ema_max_decay", type=float)
    training.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"))

    timesteps = parser.add_argument_group("timestep sampling (diffusers_hold.mitigations)")
    timesteps.add_argument("--timestep_sampling", choices=("uniform", "snr_interval", "logit_normal"))
    timesteps.add_argument("--snr_interval_low", type=float, help="c_low of the interval.")
    timesteps.add_argument("--snr_interval_high", type=float, help="c_high of the interval.")
    timesteps.add_argument("--snr_interval_confidence", type=float)
    timesteps.add_argument("--snr_interval_space", choices=("u", "logsnr"))
    timesteps.add_argument("--snr_interval_tails", choices=("renormalize", "clip", "redistribute_uniform"))
    timesteps.add_argument("--timestep_uniform_mixture", type=float)
    timesteps.add_argument("--timestep_importance_weights", action="store_true")
    timesteps.add_argument("--logit_normal_mean", type=float)
    timesteps.add_argument("--logit_normal_std", type=float)

    filters = parser.add_argument_group("loss filters (diffusers_hold.mitigations)")
    filters.add_argument(
        "--anti_gradient_control",
        action="store_true",
        help="Drop samples whose loss is below the per-timestep loss EMA / --agc_mem_ratio (IET-AGC).",
    )
    filters.add_argument("--agc_mem_ratio", type=float)
    filters.add_argument("--agc_decay", type=float)
    filters.add_argument("--agc_num_bins", type=int, help="Bins of the loss bank (default: num_train_timesteps).")

    ensemble = parser.add_argument_group("iterative ensemble training (diffusers_hold.mitigations)")
    ensemble.add_argument(
        "--ensemble_shards",
        type=int,
        help="Train K shard models per round and average them by data size (IET); sets the number of epochs.",
    )
    ensemble.add_argument("--ensemble_rounds", type=int)
    ensemble.add_argument("--ensemble_local_epochs", type=int, help="Epochs of a shard per round.")
    ensemble.add_argument(
        "--ensemble_redistribute",
        type=float,
        help="Fraction of each shard's most-skipped samples moved to the next shard between rounds (IET-AGC+; "
        "needs --anti_gradient_control).",
    )

    pruning = parser.add_argument_group("attention-head pruning (diffusers_hold.mitigations)")
    pruning.add_argument(
        "--prune_heads_ratio",
        type=float,
        help="Prune this fraction of the attention heads (0.2 in Ye et al.) after --prune_at_step updates, then "
        "fine-tune with them held at zero.",
    )
    pruning.add_argument("--prune_at_step", type=int, help="Updates before pruning (0: at the start).")
    pruning.add_argument(
        "--prune_criterion",
        choices=("masking", "taylor", "random"),
        help="Head importance on the small-t loss: exact masking, first-order Taylor, or random heads (a control).",
    )
    pruning.add_argument("--prune_importance_images", type=int, help="Training images the importance is measured on.")

    output = parser.add_argument_group("checkpoints, validation, logging")
    output.add_argument("--checkpointing_steps", type=int)
    output.add_argument("--checkpoints_total_limit", type=int)
    output.add_argument("--resume_from_checkpoint", help='"latest" or a checkpoint folder.')
    output.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Delete the checkpoints and saved pipeline index of another run in --output_dir and start afresh "
        "(without it, such a folder is refused).",
    )
    output.add_argument("--validation_steps", type=int, help="Write a grid of samples every N steps.")
    output.add_argument("--num_validation_images", type=int)
    output.add_argument("--validation_inference_steps", type=int)
    output.add_argument("--report_to", help='An accelerate tracker, or "none".')
    output.add_argument("--push_to_hub", action="store_true")
    output.add_argument("--hub_model_id")
    output.add_argument("--hub_token")
    output.add_argument("--audit_report", help="A report.json of `diffusers-hold audit` for the --push_to_hub card.")
    parser.set_defaults(**{f.name: f.default for f in fields(TrainingConfig) if f.default is not MISSING})
    return parser
