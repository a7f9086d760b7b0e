"""The contracts diffusers holds its schedulers and pipelines to (``SchedulerCommonTest``, ``PipelineTesterMixin``),
where they apply to HOLD: per-image seeds, entering the schedule at any step, the VP tables and compatible schedulers,
subfolder save/load, tuple outputs, dtypes, callbacks, interruption, attention slicing."""

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionXLImg2ImgPipeline,
)
from diffusers.callbacks import PipelineCallback
from diffusers.models.attention_processor import SlicedAttnProcessor
from diffusers.training_utils import compute_snr
from gaussian_reference import GaussianData
from test_stock_pipelines import generate, hold_pipeline

from diffusers_hold import HOLDPipeline, HOLDScheduler, HOLDUNet2DConditionModel, HOLDUNet2DModel
from diffusers_hold.testing import tiny_stable_diffusion_pipeline, tiny_stable_diffusion_xl_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")

SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def generators(*seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def zero_shot_pipeline():
    pipe = tiny_stable_diffusion_pipeline()
    pipe.scheduler = HOLDScheduler.from_config(pipe.scheduler.config, order=3, prediction_type="vp_epsilon")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hold_unet_pipeline(order=3, channels=3, solver="euler_maruyama"):
    """HOLDPipeline with a tiny HOLD UNet that has attention blocks (as diffusers' DDIM pipeline tests use)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = HOLDUNet2DModel(
            hold_order=order,
            sample_size=8,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=(4, 8),
            layers_per_block=1,
            norm_num_groups=4,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        )
    pipe = HOLDPipeline(unet=unet, scheduler=HOLDScheduler(order=order, solver=solver))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def public_config(scheduler):
    return {k: v for k, v in scheduler.config.items() if not k.startswith("_")}


def normalised(config):
    """A config with its list of defaulted keys in a fixed order (diffusers builds it from a set)."""
    return {k: sorted(v) if k == "_use_default_values" else v for k, v in config.items()}


def position_loop(scheduler, q, generator, model=None, num_inference_steps=6, return_dict=True):
    """A stock pipeline's loop on position blocks, with a fixed linear model of the state."""
    scheduler.set_timesteps(num_inference_steps)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(q, t)
        eps = model(model_input) if model is not None else 0.1 * model_input[:, -q.shape[1] :]
        out = scheduler.step(eps, t, q, generator=generator, return_dict=return_dict)
        q = out.prev_sample if return_dict else out[0]
    return q


# ------------------------------------------------------------------------------------------- per-image seeds
@pytest.mark.parametrize("kind", ["zero_shot", "converted"])
def test_per_image_generators_reproduce_single_images_in_a_stock_pipeline(kind):
    """Image i of a batch made with generator=[g_0, g_1, g_2] equals the image made alone with g_i (guidance on, so
    the doubled batch is in play)."""
    pipe = zero_shot_pipeline() if kind == "zero_shot" else hold_pipeline()
    kwargs = {"guidance_scale": 7.5, "num_inference_steps": 4, "output_type": "np"}
    batch = pipe("a cat", num_images_per_prompt=3, generator=generators(0, 1, 2), **kwargs).images
    for i in range(3):
        single = pipe("a cat", generator=torch.Generator().manual_seed(i), **kwargs).images[0]
        np.testing.assert_allclose(batch[i], single, rtol=0, atol=1e-5)
    assert np.abs(batch[0] - batch[1]).max() > 1e-2


def test_per_image_generators_reproduce_single_images_in_img2img():
    """add_noise with position noise seeds each row's auxiliary blocks from that row."""
    img2img = StableDiffusionImg2ImgPipeline(**hold_pipeline().components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.from_numpy(np.random.default_rng(0).random((1, 3, 32, 32)).astype(np.float32))
    kwargs = {"image": image, "strength": 0.6, "num_inference_steps": 5, "output_type": "np"}
    batch = img2img(["a cat"] * 3, generator=generators(0, 1, 2), **kwargs).images
    for i in range(3):
        single = img2img("a cat", generator=torch.Generator().manual_seed(i), **kwargs).images[0]
        np.testing.assert_allclose(batch[i], single, rtol=0, atol=1e-5)


def test_per_image_generators_reproduce_single_images_in_hold_pipeline():
    pipe = hold_unet_pipeline().to(torch.float64)  # the random UNet's final states reach ~2000: compare in float64
    kwargs = {"num_inference_steps": 4, "output_type": "latent"}
    batch = pipe(batch_size=3, generator=generators(0, 1, 2), **kwargs).images
    for i in range(3):
        single = pipe(generator=torch.Generator().manual_seed(i), **kwargs).images[0]
        torch.testing.assert_close(batch[i], single, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="list of 2 generators for a batch of 3"):
        pipe(batch_size=3, num_inference_steps=4, generator=generators(0, 1))


@pytest.mark.parametrize("solver", ["euler_maruyama", "sscs"])
def test_batch_and_single_rows_agree_on_the_hidden_state_path(solver):
    """The scheduler alone: hidden auxiliary blocks and stochastic steps per row, so a batch is its rows."""
    scheduler = HOLDScheduler(order=3, solver=solver)
    q = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    batch = position_loop(scheduler, q, generators(10, 11, 12))
    for i in range(3):
        single = position_loop(scheduler, q[i : i + 1], torch.Generator().manual_seed(10 + i))
        torch.testing.assert_close(batch[i : i + 1], single, rtol=0, atol=1e-12)
    # add_noise with position noise: row i's auxiliary blocks are those of row i alone
    x0, noise = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[4]
    rows = scheduler.scale_model_input(scheduler.add_noise(x0, noise, t.expand(3)), t)
    for i in range(3):
        scheduler.set_timesteps(10)
        alone = scheduler.scale_model_input(scheduler.add_noise(x0[i : i + 1], noise[i : i + 1], t[None]), t)
        torch.testing.assert_close(rows[i : i + 1], alone, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------ entering mid-schedule
@pytest.mark.parametrize("order", [2, 3, 4])
@pytest.mark.parametrize("data_variance", [1.0, 0.3])
def test_auxiliary_given_position_is_the_gaussian_conditional_of_the_marginal(order, data_variance):
    """Against the conditional of the marginal computed with scipy's kernel (gaussian_reference), in numpy."""
    scheduler = HOLDScheduler(order=order)
    data = GaussianData(scheduler, [0.0], [[data_variance]])
    times = [0.02, 0.3, 1.0, 4.0]
    gain, chol = scheduler.dynamics.auxiliary_given_position(torch.tensor(times), data_variance=data_variance)
    for k, t in enumerate(times):
        _, cov = data.marginal(t)
        expected_gain = cov[1:, 0] / cov[0, 0]
        expected_cov = cov[1:, 1:] - np.outer(cov[1:, 0], cov[0, 1:]) / cov[0, 0]
        # the reference kernel (Van Loan) is good to ~1e-8 at t < 1
        np.testing.assert_allclose(gain[k].numpy(), expected_gain, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose((chol[k] @ chol[k].T).numpy(), expected_cov, rtol=1e-6, atol=1e-7)
        assert torch.equal(chol[k], torch.tril(chol[k]))
    with pytest.raises(ValueError, match="data_variance"):
        scheduler.dynamics.auxiliary_given_position(1.0, data_variance=-1.0)


@pytest.mark.parametrize(("order", "solver"), [(2, "euler_maruyama"), (3, "euler_maruyama"), (3, "sscs")])
def test_first_call_at_a_late_step_draws_the_state_from_the_marginal(order, solver):
    """Stepping into a fresh schedule at step k (no add_noise): with q from the position marginal of unit-variance
    data, the state the model sees follows the full marginal at the sample's time (Monte Carlo, 4 sigma); the prior
    N(0, 1) for the auxiliary blocks would be far off there."""
    scheduler = HOLDScheduler(order=order, solver=solver)
    scheduler.set_timesteps(20)
    k = 18
    t = float(scheduler.trajectory_times[k])
    _, cov = GaussianData(scheduler, [0.0], [[1.0]]).marginal(t)
    num = 40_000
    q = torch.randn(num, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * math.sqrt(cov[0, 0])
    z = scheduler.scale_model_input(torch.cat([q, q]), scheduler.timesteps[k])  # guidance doubles the batch
    assert torch.equal(z[:num], z[num:]) and torch.equal(z[:num, :1], q)
    z = z[:num].numpy()
    sd = np.sqrt(np.diag(cov))
    se = np.sqrt((cov**2 + np.outer(sd**2, sd**2)) / num)
    assert (np.abs(np.cov(z.T) - cov) < 4 * se).all()
    assert np.abs(np.cov(z.T)[1, 1] - 1.0) > 20 * se[1, 1]  # the test tells this law from the prior's
    prev = scheduler.step(torch.zeros(num, 1, dtype=torch.float64), scheduler.timesteps[k], q).prev_sample
    assert prev.shape == q.shape and torch.isfinite(prev).all()


def test_a_call_at_another_step_than_the_kept_state_starts_a_new_trajectory():
    scheduler = HOLDScheduler(order=3)
    scheduler.set_timesteps(10)
    q = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    late = scheduler.scale_model_input(q, scheduler.timesteps[7])
    early = scheduler.scale_model_input(q, scheduler.timesteps[0])  # kept blocks belong to step 7: redrawn
    again = scheduler.scale_model_input(q, scheduler.timesteps[0])  # now they belong to step 0: kept
    assert not torch.equal(late, early) and torch.equal(early, again)
    scheduler.set_timesteps(10)
    torch.testing.assert_close(scheduler.scale_model_input(q, scheduler.timesteps[0]), early, rtol=0, atol=0)


def test_add_noise_during_a_trajectory_keeps_the_hidden_state():
    """Inpainting blends add_noise(image, noise, t_next) into the latents after every step; the trajectory's own
    auxiliary blocks must go on, not be replaced by the original image's."""
    scheduler = HOLDScheduler(order=3)
    scheduler.set_timesteps(10)
    x0, noise = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    q = scheduler.add_noise(x0, noise, scheduler.timesteps[3].expand(2))  # starts the trajectory at step 3
    t = scheduler.timesteps[3]
    state = scheduler.scale_model_input(q, t)
    q_next = scheduler.step(0.1 * q, t, q, generator=torch.Generator().manual_seed(0)).prev_sample
    aux_after_step = scheduler._auxiliary.clone()
    blended = scheduler.add_noise(x0, noise, scheduler.timesteps[4].expand(2))
    assert blended.shape == q_next.shape and not torch.equal(blended, q_next)
    torch.testing.assert_close(scheduler.scale_model_input(blended, scheduler.timesteps[4])[:, 1:], aux_after_step)
    assert not torch.equal(state[:, 1:], aux_after_step)


def test_sdxl_refiner_enters_a_hold_schedule_at_denoising_start():
    """SDXL's base (denoising_end) hands its latents to the refiner (denoising_start), which never calls add_noise:
    the refiner's first model call sees the handed-over position block and auxiliary blocks with the conditional
    law given it (regression of each auxiliary block on q over the 2,048 elements: slope and residual variance)."""
    base = tiny_stable_diffusion_xl_pipeline()
    base.set_progress_bar_config(disable=True)
    stock = base.scheduler.config
    base.unet = HOLDUNet2DConditionModel.from_unet(base.unet, order=3, scheduler_config=stock)
    base.scheduler = HOLDScheduler.from_config(stock, **base.unet.hold_process_settings(), timestep_spacing="linear")
    kwargs = {"num_inference_steps": 10, "generator": torch.Generator().manual_seed(0)}
    latents = base(["a cat", "a dog"], denoising_end=0.6, output_type="latent", **kwargs).images
    refiner = StableDiffusionXLImg2ImgPipeline(**base.components, requires_aesthetics_score=False)
    refiner.set_progress_bar_config(disable=True)
    seen = []
    refiner.unet.register_forward_pre_hook(lambda module, args: seen.append((args[0].clone(), float(args[1]))))

    def refine():
        kwargs["generator"] = torch.Generator().manual_seed(1)
        return refiner(["a cat", "a dog"], image=latents, denoising_start=0.6, output_type="np", **kwargs).images

    images = refine()
    scheduler = refiner.scheduler
    late = scheduler.timesteps[scheduler.timesteps < 400]  # denoising_start=0.6 of 1000 training timesteps
    assert [t for _, t in seen] == pytest.approx(late.tolist()) and len(late) < 10
    state = seen[0][0]
    assert state.shape == (4, 12, 16, 16) and torch.equal(state[:2], state[2:])  # guidance halves share the state
    torch.testing.assert_close(state[:2, :4], latents, rtol=0, atol=0)
    k = len(scheduler.timesteps) - len(late)
    gain, chol = scheduler.dynamics.auxiliary_given_position(scheduler.trajectory_times[k])
    variance = (chol @ chol.T).diagonal()
    q = state[:2, :4].double().flatten()
    for j in range(2):
        aux = state[:2, 4 * (j + 1) : 4 * (j + 2)].double().flatten()
        slope = float((aux * (q - q.mean())).sum() / ((q - q.mean()) ** 2).sum())
        residual = aux - slope * q
        assert abs(slope - float(gain[j])) < 5 * math.sqrt(float(variance[j]) / float((q - q.mean()).pow(2).sum()))
        assert abs(float(residual.var()) / float(variance[j]) - 1) < 5 * math.sqrt(2 / len(q))
    assert np.isfinite(images).all() and images.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(images, refine())


def test_begin_index_resolves_repeated_zero_shot_timesteps():
    """Zero-shot timesteps clamp to the VP table's ends, so values repeat; a pipeline that starts late sets the begin
    index, which decides where its first call is."""
    scheduler = HOLDScheduler.from_config(DDPMScheduler(**SD_SCHEDULE).config, order=3, prediction_type="vp_epsilon")
    scheduler.set_timesteps(50)
    repeated = (scheduler.timesteps == scheduler.timesteps[-1]).nonzero()[:, 0].tolist()
    assert len(repeated) > 1
    assert scheduler.index_for_timestep(scheduler.timesteps[-1]) == repeated[0]
    scheduler.set_begin_index(repeated[1])
    assert scheduler.index_for_timestep(scheduler.timesteps[-1]) == repeated[1]


def test_sdxl_refiner_with_zero_shot_hold():
    base = tiny_stable_diffusion_xl_pipeline()
    base.set_progress_bar_config(disable=True)
    base.scheduler = HOLDScheduler.from_config(
        base.scheduler.config, order=3, prediction_type="vp_epsilon", timestep_spacing="linear"
    )
    generator = torch.Generator().manual_seed(0)
    latents = base("a cat", num_inference_steps=10, denoising_end=0.6, output_type="latent", generator=generator)
    refiner = StableDiffusionXLImg2ImgPipeline(**base.components, requires_aesthetics_score=False)
    refiner.set_progress_bar_config(disable=True)
    out = refiner("a cat", image=latents.images, num_inference_steps=10, denoising_start=0.6, output_type="np")
    assert np.isfinite(out.images).all()


# ---------------------------------------------------------------------- VP tables and compatible schedulers
def test_scale_model_input_before_set_timesteps_says_so():
    scheduler = HOLDScheduler(order=3)
    for call in (
        lambda: scheduler.scale_model_input(torch.zeros(1, 1, 2, 2), 0.0),
        lambda: scheduler.step(torch.zeros(1, 1, 2, 2), 0.0, torch.zeros(1, 1, 2, 2)),
    ):
        with pytest.raises(ValueError, match="call `set_timesteps` first"):
            call()


def test_zero_shot_scheduler_exposes_the_vp_tables():
    stock = DDPMScheduler(**SD_SCHEDULE)
    hold = HOLDScheduler.from_config(stock.config, order=3, prediction_type="vp_epsilon")
    torch.testing.assert_close(hold.betas.float(), stock.betas)
    torch.testing.assert_close(hold.alphas_cumprod.float(), stock.alphas_cumprod)
    # scaled_linear in float64 (the stock float32 table loses SNR digits near timestep 0)
    alphas_cumprod = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)
    timesteps = torch.tensor([0, 10, 500, 999])
    expected = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
    np.testing.assert_allclose(compute_snr(hold, timesteps).numpy(), expected, rtol=1e-6)


def test_native_scheduler_has_no_vp_tables_and_says_what_to_use():
    native = HOLDScheduler(order=3)
    assert not hasattr(native, "alphas_cumprod") and not hasattr(native, "betas")
    with pytest.raises(AttributeError, match=r"no `alphas_cumprod`.*scheduler.snr\(timesteps\)"):
        compute_snr(native, torch.tensor([10]))
    with pytest.raises(AttributeError, match="has no attribute 'unknown_name'"):
        native.unknown_name  # noqa: B018


def test_compatible_schedulers():
    native = HOLDScheduler(order=3)
    assert native.compatibles == [HOLDScheduler]  # a HOLD UNet reads the augmented state
    stock = DDPMScheduler(**SD_SCHEDULE, steps_offset=1)
    zero_shot = HOLDScheduler.from_config(stock.config, order=3, prediction_type="vp_epsilon")
    compatibles = zero_shot.compatibles
    assert compatibles[0] is HOLDScheduler
    assert {DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler} <= set(compatibles)
    assert len(compatibles) == len(set(compatibles)) >= 10
    for cls in compatibles[1:]:
        # swapping back keeps the VP model's schedule: the same scheduler as one built from the stock config
        swapped = cls.from_config(zero_shot.config, prediction_type="epsilon")
        direct = cls.from_config(stock.config)
        for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
            assert swapped.config[key] == direct.config[key], (cls.__name__, key)
        if "steps_offset" in direct.config:
            assert swapped.config["steps_offset"] == direct.config["steps_offset"] == 1, cls.__name__
        # and diffusers' round trip through the stock class gives the HOLD config back (SchedulerCommonTest)
        back = HOLDScheduler.from_config(cls.from_config(zero_shot.config).config)
        kept = {k: v for k, v in back.config.items() if k in zero_shot.config}
        assert normalised(kept) == normalised(zero_shot.config), cls.__name__


def test_from_config_round_trip_keeps_which_values_were_defaults():
    for scheduler in (HOLDScheduler(order=2, T=4.0), HOLDScheduler.from_config(DDPMScheduler().config, order=3)):
        again = HOLDScheduler.from_config(scheduler.config)
        assert normalised(again.config) == normalised(scheduler.config)


def test_swapping_a_zero_shot_pipeline_to_a_compatible_scheduler_matches_the_stock_pipeline():
    stock_pipe = tiny_stable_diffusion_pipeline()
    stock_pipe.set_progress_bar_config(disable=True)
    stock_config = stock_pipe.scheduler.config
    stock_pipe.scheduler = DDIMScheduler.from_config(stock_config)
    expected = generate(stock_pipe)
    pipe = zero_shot_pipeline()
    assert DDIMScheduler in pipe.scheduler.compatibles
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="epsilon")
    np.testing.assert_array_equal(generate(pipe), expected)


# ------------------------------------------------------------------------------------ scheduler contracts
@pytest.mark.parametrize("prediction_type", ["epsilon", "vp_epsilon"])
def test_save_and_load_through_a_subfolder_gives_identical_trajectories(tmp_path, prediction_type):
    pipe = zero_shot_pipeline() if prediction_type == "vp_epsilon" else hold_pipeline(solver="sscs")
    pipe.save_pretrained(tmp_path)
    reloaded = HOLDScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert public_config(reloaded) == public_config(pipe.scheduler)
    q = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    a = position_loop(pipe.scheduler, q, torch.Generator().manual_seed(1))
    b = position_loop(reloaded, q, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_tuple_and_dict_outputs_agree_on_the_hidden_state_path():
    scheduler = HOLDScheduler(order=3)
    q = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    as_dict = position_loop(scheduler, q, torch.Generator().manual_seed(1))
    as_tuple = position_loop(scheduler, q, torch.Generator().manual_seed(1), return_dict=False)
    assert torch.equal(as_dict, as_tuple)


def test_dtypes_on_the_hidden_state_path():
    """float32, bfloat16 and float16 (all on the CPU) keep their dtype and stay close to the same run in float64.

    Deterministic solver: torch draws different normals for different dtypes, so stochastic runs differ by design.
    """
    scheduler = HOLDScheduler(order=3, solver="ddim")
    q = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 0.05), (torch.float16, 0.01)):
        low = q.to(dtype)
        reference = position_loop(scheduler, low.double(), None)  # same start, so same hashed auxiliary blocks
        out = position_loop(scheduler, low, None)
        assert out.dtype == dtype
        assert float((out.double() - reference).abs().max()) < tolerance * float(reference.abs().max()), dtype


# ------------------------------------------------------------------------------------- pipeline contracts
def test_hold_pipeline_callback_properties_and_validation():
    pipe = hold_unet_pipeline()
    seen = []

    def callback(pipeline, i, t, tensors):
        seen.append((i, pipeline.num_timesteps, pipeline.interrupt, sorted(tensors)))
        return tensors

    pipe(num_inference_steps=3, generator=torch.Generator().manual_seed(0), callback_on_step_end=callback)
    assert seen == [(i, 3, False, ["latents"]) for i in range(3)]
    with pytest.raises(ValueError, match=r"`callback_on_step_end_tensor_inputs` has to be in \['latents'\]"):
        pipe(num_inference_steps=3, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise_pred"])


def test_hold_pipeline_interrupt_skips_the_remaining_steps():
    pipe = hold_unet_pipeline()
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, output: calls.append(float(args[1])))

    def stop_after_two(pipeline, i, t, tensors):
        pipeline._interrupt = i == 1
        return tensors

    out = pipe(num_inference_steps=5, generator=torch.Generator().manual_seed(0), callback_on_step_end=stop_after_two)
    assert len(calls) == 2 and len(out.images) == 1
    pipe(num_inference_steps=5, generator=torch.Generator().manual_seed(0))  # the next call starts afresh
    assert len(calls) == 7


class ZeroLatentsAtTheEnd(PipelineCallback):
    """A diffusers callback object: it names its own tensor inputs."""

    tensor_inputs = ["latents"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        if step_index == pipeline.num_timesteps - 1:
            callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
        return callback_kwargs


def test_hold_pipeline_takes_diffusers_callback_objects():
    pipe = hold_unet_pipeline()
    out = pipe(num_inference_steps=3, output_type="latent", callback_on_step_end=ZeroLatentsAtTheEnd())
    assert torch.count_nonzero(out.images) == 0


def test_hold_pipeline_to_dtype_and_tuple_output():
    """Deterministic solver and given latents, since torch draws different normals for different dtypes."""
    pipe = hold_unet_pipeline(solver="ddim")
    latents = torch.randn(1, 9, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = {"num_inference_steps": 3, "output_type": "latent", "latents": latents}
    reference = pipe(**kwargs).images
    (as_tuple,) = pipe(return_dict=False, **kwargs)
    assert torch.equal(as_tuple, reference)
    for dtype, tolerance in ((torch.float64, 1e-5), (torch.bfloat16, 0.05)):
        pipe.to(dtype)
        assert pipe.unet.dtype == dtype
        out = pipe(**kwargs).images
        assert out.dtype == dtype
        assert float((out.float() - reference).abs().max()) < tolerance * float(reference.abs().max()), dtype


def test_attention_slicing_leaves_hold_images_unchanged():
    pipe = hold_pipeline()
    expected = generate(pipe, guidance_scale=7.5)
    pipe.enable_attention_slicing(slice_size=1)
    assert any(isinstance(p, SlicedAttnProcessor) for p in pipe.unet.attn_processors.values())
    np.testing.assert_allclose(generate(pipe, guidance_scale=7.5), expected, rtol=0, atol=1e-5)


def test_saved_stock_configs_with_a_vp_timestep_spacing_convert():
    """Saved stock configs (SDXL's on the Hub, any `save_pretrained` folder) write `timestep_spacing` ("leading", ...)
    explicitly; it describes a VP grid, not HOLD's, and used to be refused."""
    saved = {k: v for k, v in EulerDiscreteScheduler(**SD_SCHEDULE).config.items() if k != "_use_default_values"}
    assert saved["timestep_spacing"] == "linspace"  # a VP grid (SDXL: "leading")
    zero_shot = HOLDScheduler.from_config(saved, order=3, prediction_type="vp_epsilon")
    assert zero_shot.config.timestep_spacing == "linear"  # HOLD's default
    stock = EulerDiscreteScheduler(**SD_SCHEDULE).alphas_cumprod.double()  # computed in float32 there
    torch.testing.assert_close(zero_shot.alphas_cumprod, stock, rtol=1e-5, atol=0)
    assert HOLDScheduler.from_config(saved, timestep_spacing="log1p").config.timestep_spacing == "log1p"
    with pytest.raises(ValueError, match="Unknown timestep_spacing 'trailing'"):
        HOLDScheduler.from_config(saved, timestep_spacing="trailing")  # asked for by name: refused
