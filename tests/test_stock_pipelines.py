"""Stock diffusers pipelines run HOLD through their unmodified ``__call__``, with the auxiliary blocks kept by the
scheduler; zero-shot HOLD with a stock UNet; saving and loading; img2img; the errors of mismatched components."""

import math
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
from gaussian_reference import GaussianData

from diffusers_hold import HOLDScheduler, HOLDUNet2DConditionModel
from diffusers_hold.testing import tiny_stable_diffusion_pipeline


def hold_pipeline(order=3, **scheduler_kwargs):
    """A tiny SD pipeline whose UNet is converted to HOLD and whose scheduler matches it."""
    pipe = tiny_stable_diffusion_pipeline()
    stock_config = pipe.scheduler.config
    pipe.unet = HOLDUNet2DConditionModel.from_unet(pipe.unet, order=order, scheduler_config=stock_config)
    pipe.scheduler = HOLDScheduler.from_config(stock_config, **pipe.unet.hold_process_settings(), **scheduler_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def record_unet_inputs(pipe):
    seen = []
    pipe.unet.register_forward_pre_hook(lambda module, args: seen.append((args[0].clone(), float(args[1]))))
    return seen


def generate(pipe, prompt="a red square", seed=0, **kwargs):
    kwargs = {"num_inference_steps": 4, "output_type": "np", **kwargs}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
def test_stock_pipeline_runs_hold_with_and_without_guidance(guidance_scale):
    pipe = hold_pipeline()
    seen = record_unet_inputs(pipe)
    images = generate(pipe, ["a cat", "a dog"], num_images_per_prompt=2, guidance_scale=guidance_scale)
    assert images.shape == (4, 32, 32, 3) and np.isfinite(images).all()
    assert len(seen) == 4
    doubled = guidance_scale > 1
    for model_input, _ in seen:
        assert model_input.shape == ((8 if doubled else 4), 12, 16, 16)  # the whole state, C = 4 latent channels
        if doubled:  # the unconditional and conditional halves share the state, auxiliary blocks included
            torch.testing.assert_close(model_input[:4], model_input[4:], rtol=0, atol=0)
    # the auxiliary blocks start from the prior N(0, 1), independent of the latents
    aux = seen[0][0][:4, 4:]
    assert abs(float(aux.mean())) < 0.05 and abs(float(aux.std()) - 1) < 0.05
    assert abs(float(torch.corrcoef(torch.stack([aux[:, :4].flatten(), seen[0][0][:4, :4].flatten()]))[0, 1])) < 0.05


def test_generator_fixes_the_images_and_the_hidden_state_resets_between_calls():
    pipe = hold_pipeline()
    a, b = generate(pipe, seed=1), generate(pipe, seed=1)
    np.testing.assert_array_equal(a, b)  # would differ if the auxiliary blocks leaked from the first call
    assert not np.array_equal(a, generate(pipe, seed=2))
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    np.testing.assert_array_equal(generate(pipe, latents=latents, seed=1), generate(pipe, latents=latents, seed=1))


def test_output_types_and_progress_bar(capsys):
    pipe = hold_pipeline()
    pil = generate(pipe, output_type="pil")
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].size == (32, 32)
    latent = generate(pipe, output_type="latent")
    assert latent.shape == (1, 4, 16, 16)  # the position block: what the VAE decodes
    pipe.set_progress_bar_config(disable=False)
    generate(pipe, num_inference_steps=3)
    assert "3/3" in capsys.readouterr().err


def test_callback_that_replaces_latents_is_honoured():
    pipe = hold_pipeline()
    seen = record_unet_inputs(pipe)

    def replace_at_step_1(pipeline, i, t, tensors):
        return {"latents": torch.full_like(tensors["latents"], 0.25)} if i == 1 else tensors

    generate(pipe, callback_on_step_end=replace_at_step_1)
    next_input = seen[2][0]
    assert (next_input[:, :4] == 0.25).all()  # the scheduler reads the replaced position block
    assert not (next_input[:, 4:] == 0.25).all()  # and keeps its own auxiliary blocks

    def zero_at_the_end(pipeline, i, t, tensors):  # diffusers' own callback test
        return {"latents": torch.zeros_like(tensors["latents"])} if i == pipeline.num_timesteps - 1 else tensors

    out = generate(pipe, callback_on_step_end=zero_at_the_end, output_type="latent")
    assert (out == 0).all()


def test_zero_shot_stock_unet_in_a_stock_pipeline():
    pipe = tiny_stable_diffusion_pipeline()
    pipe.set_progress_bar_config(disable=True)
    stock_config = pipe.scheduler.config
    pipe.scheduler = HOLDScheduler.from_config(stock_config, order=3, prediction_type="vp_epsilon")
    seen = record_unet_inputs(pipe)
    zero_shot = generate(pipe, ["a cat", "a dog"], num_inference_steps=6, output_type="latent")
    assert zero_shot.shape == (2, 4, 16, 16)
    assert all(x.shape == (4, 4, 16, 16) for x, _ in seen)  # the VP model sees C channels, guidance doubled
    vp_timesteps = [t for _, t in seen]
    assert vp_timesteps == pytest.approx(pipe.scheduler.timesteps.tolist())
    assert 0 <= min(vp_timesteps) and max(vp_timesteps) <= 999

    # the converted UNet with a native HOLD scheduler generates the same thing (before any training)
    pipe.unet = HOLDUNet2DConditionModel.from_unet(pipe.unet, order=3, scheduler_config=stock_config)
    pipe.scheduler = HOLDScheduler.from_config(stock_config, **pipe.unet.hold_process_settings())
    converted = generate(pipe, ["a cat", "a dog"], num_inference_steps=6, output_type="latent")
    torch.testing.assert_close(converted, zero_shot, rtol=1e-4, atol=1e-4 * float(zero_shot.abs().max()))


class ExactVPDenoiser:
    """``E[eps | x_vp]`` for 1-D data N(mean, var) under a VP table, at fractional timesteps (log-SNR interp.)."""

    def __init__(self, alphas_cumprod, mean, var):
        table = alphas_cumprod.double().numpy()
        self.log_snr, self.mean, self.var = np.log(table / (1 - table)), mean, var

    def __call__(self, x_vp, timestep):
        log_snr = np.interp(float(timestep), np.arange(len(self.log_snr)), self.log_snr)
        ab = 1 / (1 + math.exp(-log_snr))
        return (1 - ab) ** 0.5 * (x_vp - ab**0.5 * self.mean) / (ab * self.var + 1 - ab)


def test_zero_shot_with_hidden_auxiliary_blocks_reproduces_the_data_law():
    """Position-only samples (as a stock pipeline passes them), exact VP denoiser of Gaussian data: the output must
    follow the data law within Monte Carlo and discretisation error."""
    mean, var = 0.3, 0.2
    scheduler = HOLDScheduler(
        order=3, prediction_type="vp_epsilon", beta_schedule="linear", timestep_spacing="quadratic"
    )
    denoiser = ExactVPDenoiser(scheduler.vp_alphas_cumprod, mean, var)
    scheduler.set_timesteps(500)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(20_000, 1, generator=gen, dtype=torch.float64)
    for t in scheduler.timesteps:
        q = scheduler.step(denoiser(scheduler.scale_model_input(q, t), t), t, q, generator=gen).prev_sample
    x = q[:, 0].numpy()
    assert abs(x.mean() - mean) < 4 * math.sqrt(var / len(x)) + 0.01
    assert abs(x.var() / var - 1) < 0.05  # 500 steps (about 1-2 % discretisation) + Monte Carlo error (1 %)


@pytest.mark.parametrize("solver", ["euler_maruyama", "sscs", "ddim"])
def test_position_only_sampling_equals_full_state_sampling(solver):
    """The hidden-state path is the full-state path: same start, same generator, identical trajectories."""
    scheduler = HOLDScheduler(order=3, solver=solver)
    data = GaussianData(scheduler, [0.5, -0.2], [[0.09, 0.03], [0.03, 0.04]])
    scheduler.set_timesteps(20)
    q = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = scheduler.scale_model_input(q, scheduler.timesteps[0])  # [q | aux drawn by the scheduler]
    z = z.clone()
    gen_position, gen_full = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(q, t)
        torch.testing.assert_close(model_input[:, :2], q, rtol=0, atol=0)
        q = scheduler.step(data.eps_prediction(model_input, t), t, q, generator=gen_position).prev_sample
        z = scheduler.step(data.eps_prediction(z, t), t, z, generator=gen_full, full_state=True).prev_sample
        torch.testing.assert_close(q, z[:, :2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("order", [2, 3])
def test_add_noise_with_position_noise_draws_the_whole_state_from_the_kernel(order):
    """img2img: the position block comes from the given noise, the auxiliary blocks from the same exact kernel."""
    scheduler = HOLDScheduler(order=order)
    data = GaussianData(scheduler, [0.0], [[1.0]])  # only its kernel is used
    scheduler.set_timesteps(10)
    k = 4
    timestep = scheduler.timesteps[k]
    num, x0 = 40_000, 0.7
    noise = torch.randn(num, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = scheduler.add_noise(torch.full((num, 1), x0, dtype=torch.float64), noise, timestep.expand(num))
    z = scheduler.scale_model_input(q, timestep).numpy()  # [q | aux] the next step will use
    a, sigma = data.kernel(float(scheduler.timestep_to_time(timestep)))
    np.testing.assert_allclose(z[:, 0], (a[0] * x0 + np.sqrt(sigma[0, 0]) * noise[:, 0]).numpy(), rtol=1e-9)
    sd = np.sqrt(np.diag(sigma))
    assert (np.abs(z.mean(0) - a * x0) < 4 * sd / math.sqrt(num)).all()
    se = np.sqrt((sigma**2 + np.outer(sd**2, sd**2)) / num)
    assert (np.abs(np.cov(z.T) - sigma) < 4 * se).all()


@pytest.mark.parametrize("prediction_type", ["epsilon", "vp_epsilon"])
def test_img2img_strength_sets_the_start_and_the_auxiliary_blocks(prediction_type):
    if prediction_type == "epsilon":
        pipe = hold_pipeline()
    else:
        pipe = tiny_stable_diffusion_pipeline()
        pipe.scheduler = HOLDScheduler.from_config(pipe.scheduler.config, order=3, prediction_type="vp_epsilon")
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    seen = record_unet_inputs(img2img)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))

    def run(seed):
        return img2img(
            "a cat",
            image=image,
            strength=0.5,
            num_inference_steps=10,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images

    a = run(0)
    assert a.shape == (1, 32, 32, 3) and np.isfinite(a).all()
    assert [t for _, t in seen] == pytest.approx(img2img.scheduler.timesteps[5:].tolist())  # half the schedule
    np.testing.assert_array_equal(a, run(0))
    assert not np.array_equal(a, run(1))


def test_save_and_load_in_a_fresh_interpreter(tmp_path):
    pipe = hold_pipeline(solver="sscs")
    expected = generate(pipe, num_inference_steps=5)
    pipe.save_pretrained(tmp_path / "pipe")
    code = textwrap.dedent(
        f"""
        import numpy as np, torch
        import diffusers_hold
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(tmp_path / "pipe")!r})
        pipe.set_progress_bar_config(disable=True)
        print(type(pipe).__name__, type(pipe.unet).__name__, type(pipe.scheduler).__name__)
        print(pipe.scheduler.config.solver)
        generator = torch.Generator().manual_seed(0)
        images = pipe("a red square", num_inference_steps=5, generator=generator, output_type="np").images
        np.save({str(tmp_path / "images.npy")!r}, images)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["StableDiffusionPipeline", "HOLDUNet2DConditionModel", "HOLDScheduler", "sscs"]
    np.testing.assert_array_equal(np.load(tmp_path / "images.npy"), expected)

    forgot = f"from diffusers import DiffusionPipeline; DiffusionPipeline.from_pretrained({str(tmp_path / 'pipe')!r})"
    out = subprocess.run([sys.executable, "-c", forgot], capture_output=True, text=True)
    assert out.returncode != 0 and "import diffusers_hold" in out.stderr


def test_mismatched_components_raise_clear_errors():
    pipe = hold_pipeline(order=3)
    hold_scheduler = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(hold_scheduler.config)  # a HOLD UNet with a stock scheduler
    with pytest.raises(ValueError, match="reads the whole HOLD state"):
        generate(pipe)
    pipe.scheduler = HOLDScheduler.from_config(hold_scheduler.config, order=2)  # mismatched orders
    with pytest.raises(ValueError, match="reads the whole HOLD state"):
        generate(pipe)
    pipe.scheduler = HOLDScheduler.from_config(hold_scheduler.config, L_inv=0.5)  # mismatched process settings
    with pytest.raises(ValueError, match="L_inv: scheduler 0.5, UNet 1.0"):
        generate(pipe)
    pipe.scheduler = HOLDScheduler.from_config(hold_scheduler.config, prediction_type="vp_epsilon")
    with pytest.raises(ValueError, match="reads the whole HOLD state"):  # a HOLD UNet is not a VP model
        generate(pipe)
    with pytest.raises(ValueError, match="needs the VP model's noise schedule"):
        HOLDScheduler(order=3, prediction_type="vp_epsilon")
    stock = tiny_stable_diffusion_pipeline()  # a stock UNet with a native HOLD scheduler: a channel error
    stock.scheduler = HOLDScheduler.from_config(stock.scheduler.config, order=3)
    with pytest.raises(RuntimeError, match="expected input.*to have 4 channels, but got 12"):
        generate(stock)


def test_nan_in_the_initial_latents_is_named():
    """NaN latents used to surface as a batch-size mismatch of the hidden state (NaN rows never compare equal)."""
    pipe = hold_pipeline()
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    latents[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="contains NaN or infinite values: check the initial latents"):
        generate(pipe, latents=latents)
