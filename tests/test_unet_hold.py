"""HOLD UNets: diffusers subclasses that read the whole state, the from_unet conversion, peft LoRA, checkpointing."""

import copy
import inspect

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel, UNet2DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from diffusers_hold import HOLDPipeline, HOLDScheduler, HOLDUNet2DConditionModel, HOLDUNet2DModel
from diffusers_hold.testing import tiny_stable_diffusion_pipeline, tiny_unet_2d

SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def tiny_cond_unet(**hold):
    torch.manual_seed(0)
    return HOLDUNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(4, 8),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=2,
        **hold,
    )


def hold_inputs(scheduler, batch=2, channels=4, size=8, seed=0):
    """A tagged full state from the scheduler's own scale_model_input, a timestep and text states."""
    gen = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[3]
    state = torch.randn(batch, scheduler.config.order * channels, size, size, generator=gen)
    text = torch.randn(batch, 5, 8, generator=gen)
    return scheduler.scale_model_input(state, t, full_state=True), t, text


@pytest.mark.parametrize(
    ("hold_cls", "base_cls"), [(HOLDUNet2DConditionModel, UNet2DConditionModel), (HOLDUNet2DModel, UNet2DModel)]
)
def test_signature_is_the_base_signature_plus_the_hold_settings(hold_cls, base_cls):
    ours = dict(inspect.signature(hold_cls.__init__).parameters)
    for name in ("hold_order", "hold_parameterization", "hold_settings"):
        ours.pop(name)
    base = inspect.signature(base_cls.__init__).parameters
    assert list(ours) == list(base)
    assert {k: p.default for k, p in ours.items()} == {k: p.default for k, p in base.items()}


def test_hold_unet_reads_the_state_and_round_trips_through_safetensors(tmp_path):
    unet = tiny_cond_unet(hold_order=3)
    assert isinstance(unet, UNet2DConditionModel)
    assert unet.config.in_channels == 4 and unet.conv_in.in_channels == 12
    assert unet.config.hold_settings == {k: HOLDScheduler().config[k] for k in unet.config.hold_settings}
    sample, t, text = hold_inputs(HOLDScheduler(order=3))
    out = unet(sample, t, text).sample
    assert out.shape == (2, 4, 8, 8)
    unet.save_pretrained(tmp_path / "unet")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    reloaded = HOLDUNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert reloaded.config.hold_order == 3 and reloaded.config.hold_settings == unet.config.hold_settings
    torch.testing.assert_close(reloaded(sample, t, text).sample, out)
    assert isinstance(unet(sample, t, text, return_dict=False), tuple)


def test_unconditional_hold_unet():
    unet = tiny_unet_2d(in_channels=1, out_channels=1, hold_order=2)
    assert isinstance(unet, UNet2DModel) and unet.conv_in.in_channels == 2
    sample, t, _ = hold_inputs(HOLDScheduler(order=2), channels=1)
    assert unet(sample, t).sample.shape == (2, 1, 8, 8)


def test_a_fresh_hold_unet_is_a_stock_unet_of_the_state_width():
    """Same layers, same initialisation from the same seed: only the config's in_channels (the data's) differs."""
    kwargs = {"sample_size": 8, "out_channels": 2, "block_out_channels": (8, 16), "layers_per_block": 1}
    kwargs |= {"down_block_types": ("DownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "UpBlock2D")}
    torch.manual_seed(0)
    hold = HOLDUNet2DModel(in_channels=2, hold_order=3, norm_num_groups=4, **kwargs)
    torch.manual_seed(0)
    stock = UNet2DModel(in_channels=6, norm_num_groups=4, **kwargs)
    assert hold.config.in_channels == 2 and stock.config.in_channels == 6
    for (name, a), (_, b) in zip(hold.state_dict().items(), stock.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_unconditional_conversion_in_hold_pipeline_matches_zero_shot():
    torch.manual_seed(0)
    stock = tiny_unet_2d(in_channels=3, out_channels=3)
    ddpm = DDPMScheduler()

    def sample(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(batch_size=2, num_inference_steps=8, generator=torch.Generator().manual_seed(0), output_type="pt")

    zero_shot = sample(
        HOLDPipeline(
            unet=stock, scheduler=HOLDScheduler.from_config(ddpm.config, order=2, prediction_type="vp_epsilon")
        )
    ).images
    converted = HOLDUNet2DModel.from_unet(stock, order=2, scheduler_config=ddpm.config)
    scheduler = HOLDScheduler.from_config(ddpm.config, **converted.hold_process_settings())
    torch.testing.assert_close(sample(HOLDPipeline(unet=converted, scheduler=scheduler)).images, zero_shot)


def test_from_unet_equals_the_zero_shot_conversion_of_the_pretrained_unet():
    """Before training, the converted UNet's eps_n is what the zero-shot scheduler makes of the stock UNet."""
    pipe = tiny_stable_diffusion_pipeline()
    stock, stock_config = pipe.unet, pipe.scheduler.config
    converted = HOLDUNet2DConditionModel.from_unet(stock, order=3, scheduler_config=stock_config)
    assert converted.config.hold_parameterization == "sufficient_statistic"
    assert converted.config.hold_settings["beta_schedule"] == "scaled_linear"
    weight = converted.conv_in.weight
    torch.testing.assert_close(weight[:, :4], stock.conv_in.weight)
    assert (weight[:, 4:] == 0).all()

    scheduler = HOLDScheduler.from_config(stock_config, **converted.hold_process_settings())
    gen = torch.Generator().manual_seed(0)
    state = torch.randn(3, 12, 16, 16, generator=gen)
    text = torch.randn(3, 5, 8, generator=gen)
    timesteps = torch.tensor([100.0, 250.5, 500.0])  # one per sample, off any sampling grid
    with torch.no_grad():
        ours = converted(state, timesteps, text).sample
        # the same map written out from the math (docs/HOLD_MATH.md section 4), with the stock UNet as the denoiser
        t = scheduler.timestep_to_time(timesteps)
        weights, variance = scheduler.dynamics.sufficient_statistic(t)
        alpha_bar = 1 / (1 + variance)
        table = scheduler.vp_alphas_cumprod
        assert ((alpha_bar > table[-1]) & (alpha_bar < table[0])).all()  # inside the VP table: no clamping
        log_snr, table_log_snr = torch.log(alpha_bar / (1 - alpha_bar)), torch.log(table / (1 - table))
        vp_t = torch.tensor([float(torch.searchsorted(-table_log_snr, -v)) for v in log_snr], dtype=torch.float64)
        lo = vp_t.long() - 1  # linear interpolation of the timestep in log-SNR
        vp_t = lo + (table_log_snr[lo] - log_snr) / (table_log_snr[lo] - table_log_snr[lo + 1])
        blocks = state.double().reshape(3, 3, -1)
        statistic = (weights[:, :, None] * blocks).sum(1).reshape(3, 4, 16, 16)
        x_vp = alpha_bar.sqrt()[:, None, None, None] * statistic
        eps_vp = stock(x_vp.float(), vp_t.float(), text).sample.double()
        x0 = (x_vp - (1 - alpha_bar).sqrt()[:, None, None, None] * eps_vp) / alpha_bar.sqrt()[:, None, None, None]
        ell, c = scheduler.dynamics.x0_coefficients(t)
        expected = (ell[:, :, None] * blocks).sum(1).reshape(3, 4, 16, 16) - c[:, None, None, None] * x0
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-4)

    # the auxiliary inputs are wired in: once their weights move, the output moves
    with torch.no_grad():
        converted.conv_in.weight[:, 4:].normal_(0, 0.1)
        assert not torch.allclose(converted(state, timesteps, text).sample, ours, atol=1e-3)


def test_from_unet_rejects_what_it_cannot_convert():
    pipe = tiny_stable_diffusion_pipeline()
    with pytest.raises(ValueError, match="noise schedule"):
        HOLDUNet2DConditionModel.from_unet(pipe.unet, order=3, scheduler_config={"num_train_timesteps": 1000})
    v_config = DDPMScheduler(prediction_type="v_prediction", **SD_SCHEDULE).config
    with pytest.raises(ValueError, match="v_prediction"):
        HOLDUNet2DConditionModel.from_unet(pipe.unet, order=3, scheduler_config=v_config)
    converted = HOLDUNet2DConditionModel.from_unet(pipe.unet, order=2, scheduler_config=pipe.scheduler.config)
    with pytest.raises(TypeError, match="converts a UNet2DConditionModel"):
        HOLDUNet2DConditionModel.from_unet(converted, order=3, scheduler_config=pipe.scheduler.config)
    with pytest.raises(ValueError, match="HOLD order must be an integer"):
        tiny_cond_unet(hold_order=0)
    with pytest.raises(ValueError, match="Unknown hold_settings"):
        tiny_cond_unet(hold_settings={"solver": "sscs"})
    with pytest.raises(ValueError, match="Unknown hold_parameterization"):
        tiny_cond_unet(hold_parameterization="velocity")


def test_wrong_inputs_and_mismatched_scheduler_settings_raise():
    unet = tiny_cond_unet(hold_order=3)
    sample, t, text = hold_inputs(HOLDScheduler(order=3))
    with pytest.raises(ValueError, match="reads the whole HOLD state"):
        unet(sample[:, :4], t, text)  # what a stock scheduler passes
    with pytest.raises(ValueError, match="reads the whole HOLD state"):
        unet(*hold_inputs(HOLDScheduler(order=2))[:2], text)  # another order
    with pytest.raises(ValueError, match=r"T: scheduler 7\.0, UNet 5\.0"):
        unet(*hold_inputs(HOLDScheduler(order=3, T=7.0))[:2], text)
    untagged = sample.clone()  # not from scale_model_input: nothing to compare, so it runs
    assert unet(untagged, t, text).sample.shape == (2, 4, 8, 8)


def test_peft_lora_adapter_saves_and_reloads_on_a_hold_unet(tmp_path):
    pipe = tiny_stable_diffusion_pipeline()
    pipe.unet = HOLDUNet2DConditionModel.from_unet(pipe.unet, order=3, scheduler_config=pipe.scheduler.config)
    base = copy.deepcopy(pipe.unet)
    pipe.unet.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
        )
    )
    with torch.no_grad():  # LoRA starts as the identity (B = 0); move B so that the adapter matters
        for name, parameter in pipe.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    state = torch.randn(2, 12, 16, 16, generator=torch.Generator().manual_seed(1))
    text = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        adapted = pipe.unet(state, 300.0, text).sample
        assert not torch.allclose(adapted, base(state, 300.0, text).sample, atol=1e-4)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()

    fresh = StableDiffusionPipeline(**{**pipe.components, "unet": base})
    fresh.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(fresh.unet(state, 300.0, text).sample, adapted)


def test_gradient_checkpointing_gives_the_same_gradients():
    sample, t, text = hold_inputs(HOLDScheduler(order=3, **SD_SCHEDULE))
    grads = []
    for checkpointing in (False, True):
        unet = tiny_cond_unet(hold_order=3, hold_parameterization="sufficient_statistic", hold_settings=SD_SCHEDULE)
        unet.train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        assert unet.is_gradient_checkpointing == checkpointing
        unet(sample, torch.tensor([t, t / 2]), text).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0
