"""UNets that read the whole HOLD state: subclasses of diffusers' ``UNet2DConditionModel`` and ``UNet2DModel``.

A HOLD UNet takes the state ``[q | p | s | ...]`` (``hold_order * C`` channels; its config keeps ``in_channels = C``,
the data channels, because stock pipelines size their ``latents`` from it) and predicts the noise of the last block,
the target of :meth:`HOLDScheduler.add_noise` / :meth:`HOLDScheduler.get_target`. Being subclasses, they keep every
diffusers feature: pipelines, peft's ``add_adapter``, gradient checkpointing, ``save_pretrained`` /
``from_pretrained`` with safetensors.

Two parameterizations (config ``hold_parameterization``):

- ``"state"``: the network reads the raw state and predicts ``eps_n`` directly (training from scratch).
- ``"sufficient_statistic"``: the network is a VP epsilon UNet run on ``[sqrt(alpha_bar) * s | p | s | ...]`` at the VP
  timestep, where ``s`` is the sufficient statistic of the state for the data (``docs/HOLD_MATH.md`` section 4); its
  prediction is turned into ``eps_n`` exactly as the scheduler's zero-shot mode does. ``from_unet`` builds this from a
  pretrained UNet with zero weights on the auxiliary inputs, so before any training the converted model *is* the
  zero-shot HOLD sampler of the pretrained model, and fine-tuning starts from its behaviour instead of from noise.

The forward-process settings the UNet was trained for (``hold_order`` and ``hold_settings``) are part of its config.
:meth:`HOLDScheduler.scale_model_input` tags its output with the scheduler's settings, and the UNet raises when they
differ, or when it is given anything but a HOLD state of its order.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Literal

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (DiffusionPipeline loading looks it up here)
from diffusers.models.unets.unet_2d import UNet2DModel, UNet2DOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel, UNet2DConditionOutput

from ..dynamics import critical_damping
from ..schedulers.scheduling_hold import HOLD_SETTINGS_ATTRIBUTE, PROCESS_KEYS, VP_SCHEDULE_KEYS, HOLDScheduler

__all__ = ["HOLDUNet2DConditionModel", "HOLDUNet2DModel"]

PARAMETERIZATIONS = ("state", "sufficient_statistic")


def _unet_arguments(arguments: dict) -> dict:
    """The arguments of a HOLD UNet's ``__init__`` for the diffusers UNet it extends, with ``in_channels`` widened to
    the whole HOLD state (so the first convolution is built once, exactly as a stock UNet of that width would be)."""
    unet_arguments = {
        k: v for k, v in arguments.items() if k not in ("self", "__class__") and not k.startswith("hold_")
    }
    critical_damping(arguments["hold_order"])  # a clear error for an invalid order, before any layer is built
    unet_arguments["in_channels"] = arguments["hold_order"] * arguments["in_channels"]
    return unet_arguments


class HOLDModelMixin:
    """What both HOLD UNets add to their diffusers base class: the HOLD settings, the wide input and the conversion."""

    _hold_base_class: type  # the diffusers UNet class that from_unet converts

    def _init_hold(self, order: int, parameterization: str, settings: Mapping | None) -> None:
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"Unknown hold_parameterization {parameterization!r}; expected one of {', '.join(PARAMETERIZATIONS)}."
            )
        allowed = [k for k in PROCESS_KEYS if k != "order"]
        if parameterization == "sufficient_statistic":
            allowed += VP_SCHEDULE_KEYS
        unknown = sorted(set(settings or {}) - set(allowed))
        if unknown:
            raise ValueError(
                f"Unknown hold_settings {unknown} for hold_parameterization={parameterization!r}; allowed: {allowed}."
            )
        zero_shot = parameterization == "sufficient_statistic"
        # validates every value, and gives the conversion coefficients of the sufficient-statistic parameterization
        self.hold_scheduler = HOLDScheduler(
            order=order, prediction_type="vp_epsilon" if zero_shot else "epsilon", **(settings or {})
        )
        # record the complete settings, so that changing a default later cannot change what a saved model means
        full = self.hold_scheduler.process_settings()
        self.register_to_config(hold_settings={k: full[k] for k in allowed})
        # ... and keep them on reload: diffusers drops config keys listed as defaulted when it loads a config
        defaulted = [k for k in self.config.get("_use_default_values", []) if k != "hold_settings"]
        self.register_to_config(_use_default_values=defaulted)
        # the base class built conv_in for the whole state; the config keeps the data's channels for pipelines
        self.register_to_config(in_channels=self.conv_in.in_channels // order)

    def hold_process_settings(self) -> dict:
        """The HOLD forward-process settings of this UNet, as :class:`HOLDScheduler` config values.

        Sample with a scheduler built from them::

            pipe.scheduler = HOLDScheduler.from_config(pipe.scheduler.config, **pipe.unet.hold_process_settings())
        """
        return {"order": self.config.hold_order, **self.config.hold_settings, "prediction_type": "epsilon"}

    def _check_hold_state(self, sample: torch.Tensor) -> None:
        order, channels = self.config.hold_order, self.config.in_channels
        name = type(self).__name__
        if sample.ndim != 4 or sample.shape[1] != order * channels:
            raise ValueError(
                f"{name} of HOLD order {order} reads the whole HOLD state, {order} blocks of {channels} channels "
                f"({order * channels} in all); got a sample of shape {tuple(sample.shape)}. Pair it with a "
                "HOLDScheduler of the same settings and prediction_type='epsilon', whose scale_model_input builds "
                "that state: pipe.scheduler = HOLDScheduler.from_config(pipe.scheduler.config, "
                "**pipe.unet.hold_process_settings())."
            )
        scheduler_settings = getattr(sample, HOLD_SETTINGS_ATTRIBUTE, None)
        if scheduler_settings is None:
            return
        mine = {"order": order, **self.config.hold_settings}
        differences = [
            f"{key}: scheduler {scheduler_settings.get(key)!r}, UNet {value!r}"
            for key, value in mine.items()
            if scheduler_settings.get(key) != value
        ]
        if differences:
            raise ValueError(
                f"The HOLDScheduler's settings differ from those {name} was trained for ("
                + "; ".join(differences)
                + "). Build the scheduler from the UNet's settings: pipe.scheduler = "
                "HOLDScheduler.from_config(pipe.scheduler.config, **pipe.unet.hold_process_settings())."
            )

    def _hold_forward(
        self, sample: torch.Tensor, timestep, run_unet: Callable[[torch.Tensor, torch.Tensor | float], torch.Tensor]
    ) -> torch.Tensor:
        """The last block's noise for the HOLD state ``sample``; ``run_unet(input, timestep)`` is the base forward."""
        self._check_hold_state(sample)
        if self.config.hold_parameterization == "state":
            return run_unet(sample, timestep)
        channels = self.config.in_channels
        return self.hold_scheduler.zero_shot_epsilon(
            sample,
            timestep,
            lambda vp_input, vp_timesteps: run_unet(torch.cat([vp_input, sample[:, channels:]], dim=1), vp_timesteps),
        )

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel | UNet2DModel,
        *,
        order: int = 3,
        scheduler_config: Mapping,
        T: float = 5.0,
        L_inv: float = 1.0,
        aux_init_var: float = 0.08,
        eps_num: float = 1e-6,
    ):
        """Convert a pretrained diffusers UNet into a HOLD UNet that starts as its zero-shot HOLD sampler.

        The model reads ``[sqrt(alpha_bar) * s | aux]`` at the VP timestep (the sufficient statistic ``s`` of the
        state, ``docs/HOLD_MATH.md`` section 4); the pretrained weights see ``sqrt(alpha_bar) * s`` and the weights of
        the auxiliary inputs start at zero, so before any training it generates what the zero-shot scheduler
        (``prediction_type="vp_epsilon"``) generates with the pretrained UNet.

        Args:
            unet (`UNet2DConditionModel` for :class:`HOLDUNet2DConditionModel`, `UNet2DModel` for
                :class:`HOLDUNet2DModel`): a pretrained VP epsilon UNet (``in_channels == out_channels``).
            order (`int`, defaults to 3): HOLD order of the new model.
            scheduler_config (`Mapping`): the pretrained model's scheduler config (e.g. ``pipe.scheduler.config``);
                its VP schedule (``beta_*``, ``trained_betas``, ``num_train_timesteps``) becomes the model's.
            T (`float`, defaults to 5.0), L_inv (`float`, defaults to 1.0), aux_init_var (`float`, defaults to
                0.08), eps_num (`float`, defaults to 1e-6): the HOLD process settings (see :class:`HOLDScheduler`).

        Returns:
            The HOLD UNet, with ``hold_parameterization="sufficient_statistic"``, on the UNet's device and dtype.
        """
        base = cls._hold_base_class
        if not isinstance(unet, base) or isinstance(unet, HOLDModelMixin):
            raise TypeError(f"{cls.__name__}.from_unet converts a {base.__name__}, got {type(unet).__name__}.")
        if unet.config.in_channels != unet.config.out_channels:
            raise ValueError(
                "from_unet needs a VP epsilon UNet with in_channels == out_channels, got "
                f"{unet.config.in_channels} and {unet.config.out_channels}."
            )
        if scheduler_config is None or not any(key in scheduler_config for key in ("beta_schedule", "trained_betas")):
            raise ValueError(
                "from_unet needs the pretrained model's noise schedule: pass scheduler_config=pipe.scheduler.config "
                "(a config with beta_start, beta_end, beta_schedule or trained_betas)."
            )
        prediction_type = scheduler_config.get("prediction_type", "epsilon")
        if prediction_type != "epsilon":
            raise ValueError(f"from_unet converts epsilon-prediction models; this one predicts {prediction_type!r}.")
        settings = {key: scheduler_config[key] for key in VP_SCHEDULE_KEYS if key in scheduler_config}
        settings["num_train_timesteps"] = scheduler_config.get("num_train_timesteps", 1000)
        settings.update(T=T, L_inv=L_inv, aux_init_var=aux_init_var, eps_num=eps_num)
        init_keys = inspect.signature(cls.__init__).parameters
        config = {k: v for k, v in unet.config.items() if k in init_keys and not k.startswith("hold_")}
        model = cls(**config, hold_order=order, hold_parameterization="sufficient_statistic", hold_settings=settings)
        state_dict = unet.state_dict()
        weight = state_dict["conv_in.weight"]
        # the statistic's channels take the pretrained weights; the auxiliary blocks start with zero weight
        extra = weight.new_zeros(weight.shape[0], (order - 1) * weight.shape[1], *weight.shape[2:])
        state_dict["conv_in.weight"] = torch.cat([weight, extra], dim=1)
        model.load_state_dict(state_dict)
        model.to(unet.device)
        return model if unet.dtype == model.dtype else model.to(unet.dtype)


class HOLDUNet2DConditionModel(HOLDModelMixin, UNet2DConditionModel):
    """A diffusers ``UNet2DConditionModel`` that reads the whole HOLD state and predicts the last block's noise.

    Args:
        hold_order (`int`, defaults to 3): number of HOLD blocks ``n``; the model reads ``n * in_channels`` channels.
        hold_parameterization (`str`, defaults to `"state"`): `"state"` or `"sufficient_statistic"` (see the module
            docstring); :meth:`from_unet` builds the latter.
        hold_settings (`dict`, *optional*): the forward-process values of :class:`HOLDScheduler` the model is
            trained for (``num_train_timesteps``, ``T``, ``L_inv``, ``aux_init_var``, ``eps_num``; with
            `"sufficient_statistic"` also the VP schedule ``beta_start``, ``beta_end``, ``beta_schedule``,
            ``trained_betas``); missing values take the scheduler's defaults and the config records all of them.
        Every other argument is the base class's, unchanged; ``in_channels`` and ``out_channels`` are the data's
        ``C`` channels.
    """

    _hold_base_class = UNet2DConditionModel

    @register_to_config
    def __init__(
        self,
        sample_size=None,
        in_channels=4,
        out_channels=4,
        center_input_sample=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        only_cross_attention=False,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        downsample_padding=1,
        mid_block_scale_factor=1,
        dropout=0.0,
        act_fn="silu",
        norm_num_groups=32,
        norm_eps=1e-05,
        cross_attention_dim=1280,
        transformer_layers_per_block=1,
        reverse_transformer_layers_per_block=None,
        encoder_hid_dim=None,
        encoder_hid_dim_type=None,
        attention_head_dim=8,
        num_attention_heads=None,
        dual_cross_attention=False,
        use_linear_projection=False,
        class_embed_type=None,
        addition_embed_type=None,
        addition_time_embed_dim=None,
        num_class_embeds=None,
        upcast_attention=False,
        resnet_time_scale_shift="default",
        resnet_skip_time_act=False,
        resnet_out_scale_factor=1.0,
        time_embedding_type="positional",
        time_embedding_dim=None,
        time_embedding_act_fn=None,
        timestep_post_act=None,
        time_cond_proj_dim=None,
        conv_in_kernel=3,
        conv_out_kernel=3,
        projection_class_embeddings_input_dim=None,
        attention_type="default",
        class_embeddings_concat=False,
        mid_block_only_cross_attention=None,
        cross_attention_norm=None,
        addition_embed_type_num_heads=64,
        hold_order: int = 3,
        hold_parameterization: Literal["state", "sufficient_statistic"] = "state",
        hold_settings: dict | None = None,
    ):
        super().__init__(**_unet_arguments(locals()))
        self._init_hold(hold_order, hold_parameterization, hold_settings)

    def forward(
        self,
        sample: torch.Tensor,
        timestep,
        encoder_hidden_states: torch.Tensor,
        *args,
        return_dict: bool = True,
        **kwargs,
    ) -> UNet2DConditionOutput | tuple:
        """Predict the last block's noise ``eps_n`` of shape `(batch, C, H, W)`.

        Args:
            sample (`torch.Tensor` of shape `(batch, hold_order * C, H, W)`): HOLD states, as built by
                :meth:`HOLDScheduler.scale_model_input` or :meth:`HOLDScheduler.add_noise`.
            timestep (`torch.Tensor`, `float` or `int`): HOLD model timesteps (one, or one per sample).
            encoder_hidden_states (`torch.Tensor`): the text encoder's states, as for the base class.
            return_dict (`bool`, defaults to `True`): return a ``UNet2DConditionOutput``.
            **kwargs: every other keyword of ``UNet2DConditionModel.forward``, passed through.
        """
        base_forward = super().forward
        noise_pred = self._hold_forward(
            sample,
            timestep,
            lambda x, t: base_forward(x, t, encoder_hidden_states, *args, return_dict=False, **kwargs)[0],
        )
        return UNet2DConditionOutput(sample=noise_pred) if return_dict else (noise_pred,)


class HOLDUNet2DModel(HOLDModelMixin, UNet2DModel):
    """A diffusers ``UNet2DModel`` that reads the whole HOLD state and predicts the last block's noise.

    Args:
        hold_order (`int`, defaults to 3): number of HOLD blocks ``n``; the model reads ``n * in_channels`` channels.
        hold_parameterization (`str`, defaults to `"state"`): `"state"` or `"sufficient_statistic"` (see the module
            docstring); :meth:`from_unet` builds the latter.
        hold_settings (`dict`, *optional*): the forward-process values of :class:`HOLDScheduler` the model is
            trained for (``num_train_timesteps``, ``T``, ``L_inv``, ``aux_init_var``, ``eps_num``; with
            `"sufficient_statistic"` also the VP schedule ``beta_start``, ``beta_end``, ``beta_schedule``,
            ``trained_betas``); missing values take the scheduler's defaults and the config records all of them.
        Every other argument is the base class's, unchanged; ``in_channels`` and ``out_channels`` are the data's
        ``C`` channels.
    """

    _hold_base_class = UNet2DModel

    @register_to_config
    def __init__(
        self,
        sample_size=None,
        in_channels=3,
        out_channels=3,
        center_input_sample=False,
        time_embedding_type="positional",
        time_embedding_dim=None,
        freq_shift=0,
        flip_sin_to_cos=True,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type="UNetMidBlock2D",
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(224, 448, 672, 896),
        layers_per_block=2,
        mid_block_scale_factor=1,
        downsample_padding=1,
        downsample_type="conv",
        upsample_type="conv",
        dropout=0.0,
        act_fn="silu",
        attention_head_dim=8,
        norm_num_groups=32,
        attn_norm_num_groups=None,
        norm_eps=1e-05,
        resnet_time_scale_shift="default",
        add_attention=True,
        class_embed_type=None,
        num_class_embeds=None,
        num_train_timesteps=None,
        hold_order: int = 3,
        hold_parameterization: Literal["state", "sufficient_statistic"] = "state",
        hold_settings: dict | None = None,
    ):
        super().__init__(**_unet_arguments(locals()))
        self._init_hold(hold_order, hold_parameterization, hold_settings)

    def forward(
        self,
        sample: torch.Tensor,
        timestep,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
        **kwargs,
    ) -> UNet2DOutput | tuple:
        """Predict the last block's noise ``eps_n`` of shape `(batch, C, H, W)`.

        Args:
            sample (`torch.Tensor` of shape `(batch, hold_order * C, H, W)`): HOLD states, as built by
                :meth:`HOLDScheduler.scale_model_input` or :meth:`HOLDScheduler.add_noise`.
            timestep (`torch.Tensor`, `float` or `int`): HOLD model timesteps (one, or one per sample).
            class_labels (`torch.Tensor`, *optional*): class labels, as for the base class.
            return_dict (`bool`, defaults to `True`): return a ``UNet2DOutput``.
        """
        base_forward = super().forward
        noise_pred = self._hold_forward(
            sample, timestep, lambda x, t: base_forward(x, t, class_labels, return_dict=False, **kwargs)[0]
        )
        return UNet2DOutput(sample=noise_pred) if return_dict else (noise_pred,)
