"""Delayed and opposite classifier-free guidance inside an unmodified StableDiffusionPipeline."""

import pytest
import torch
from diffusers import DDIMScheduler

from diffusers_hold.mitigations import GuidanceSchedule, delayed_guidance, opposite_guidance
from diffusers_hold.testing import tiny_stable_diffusion_pipeline

PROMPTS = ["a red cube", "a blue ball"]


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_stable_diffusion_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def latents():
    return torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))


def run(pipe, latents, guidance_scale, steps=8):
    return pipe(
        PROMPTS, latents=latents, guidance_scale=guidance_scale, num_inference_steps=steps, output_type="latent"
    ).images


def reference_loop(pipe, latents, schedule, steps=8):
    """Classifier-free guidance with a per-step scale, written out with the pipeline's UNet and scheduler."""
    conditional, unconditional = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    embeddings = torch.cat([unconditional, conditional])
    pipe.scheduler.set_timesteps(steps)
    x = latents.clone()
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            eps_u, eps_c = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=embeddings).sample.chunk(2)
            eps = eps_u + schedule(float(t)) * (eps_c - eps_u)
            x = pipe.scheduler.step(eps, t, x).prev_sample
    return x


def test_a_constant_schedule_equals_the_pipeline_at_that_scale(pipe, latents):
    with GuidanceSchedule(pipe.unet, pipeline_guidance_scale=6.0, schedule=lambda t: 3.0):
        scheduled = run(pipe, latents, 6.0)
    torch.testing.assert_close(scheduled, run(pipe, latents, 3.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["delayed", "opposite"])
def test_delayed_and_opposite_guidance_match_a_hand_written_loop(pipe, latents, kind):
    if kind == "delayed":
        schedule = delayed_guidance(pipe.unet, 7.5, start_timestep=500, scale=7.5)
        expected = reference_loop(pipe, latents, lambda t: 0.0 if t > 500 else 7.5)
    else:
        schedule = opposite_guidance(pipe.unet, 7.5, start_timestep=650, opposite_scale=-2.0, scale=7.5)
        expected = reference_loop(pipe, latents, lambda t: -2.0 if t > 650 else 7.5)
    with schedule:
        scheduled = run(pipe, latents, 7.5)
    torch.testing.assert_close(scheduled, expected, rtol=1e-5, atol=1e-5)
    scales = [scale for _, scale in schedule.applied]
    assert len(scales) == 8 and len(set(scales)) == 2  # both phases happened
    assert not torch.allclose(scheduled, run(pipe, latents, 7.5), atol=1e-4)  # and changed the result
    assert not pipe.unet._forward_hooks  # the UNet is restored


def test_guidance_schedules_reject_runs_without_guidance(pipe, latents):
    with pytest.raises(ValueError, match="pipeline_guidance_scale must be > 1"):
        delayed_guidance(pipe.unet, 1.0)
    with pytest.raises(ValueError, match="guidance_scale > 1"):
        with delayed_guidance(pipe.unet, 7.5):
            run(pipe, latents, 1.0, steps=2)
    assert not pipe.unet._forward_hooks
