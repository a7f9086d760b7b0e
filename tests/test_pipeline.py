"""HOLDPipeline with a tiny real UNet2DModel: outputs, determinism, callbacks, save/load in a fresh interpreter."""

import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline

from diffusers_hold import HOLDPipeline, HOLDScheduler
from diffusers_hold.testing import tiny_unet_2d


def tiny_pipeline(order=3, channels=1, solver="euler_maruyama", seed=0):
    unet = tiny_unet_2d(in_channels=order * channels, out_channels=channels, seed=seed)
    pipe = HOLDPipeline(unet=unet, scheduler=HOLDScheduler(order=order, solver=solver))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("solver", ["euler_maruyama", "sscs", "ddim"])
def test_output_types_and_shapes(solver):
    pipe = tiny_pipeline(order=2, channels=3, solver=solver)
    kwargs = {"batch_size": 2, "num_inference_steps": 4}
    pil = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert len(pil) == 2 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (8, 8)
    arr = pipe(generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
    assert arr.shape == (2, 8, 8, 3) and arr.min() >= 0 and arr.max() <= 1
    pt = pipe(generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images
    assert pt.shape == (2, 3, 8, 8)
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), arr, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(pil[0]), (arr[0] * 255).round().astype(np.uint8))
    latent = pipe(generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).images
    assert latent.shape == (2, 6, 8, 8)  # the whole state
    np.testing.assert_allclose((latent[:, :3] / 2 + 0.5).clamp(0, 1).numpy(), pt.numpy(), atol=1e-6)
    assert isinstance(pipe(generator=torch.Generator().manual_seed(0), return_dict=False, **kwargs), tuple)


def test_generator_makes_generation_deterministic():
    pipe = tiny_pipeline()
    a = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(1), output_type="pt")
    b = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(1), output_type="pt")
    c = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(2), output_type="pt")
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)


def test_num_inference_steps_sets_the_number_of_model_calls():
    pipe = tiny_pipeline()
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[1]))
    pipe(num_inference_steps=7, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 7
    assert [float(t) for t in calls] == [float(t) for t in pipe.scheduler.timesteps]


def test_callback_on_step_end_sees_and_replaces_the_state():
    pipe = tiny_pipeline(order=3)
    seen = []

    def callback(pipeline, i, t, kwargs):
        seen.append((i, kwargs["latents"].shape))
        if i == pipeline.scheduler.num_inference_steps - 1:
            kwargs["latents"] = torch.zeros_like(kwargs["latents"])
        return kwargs

    out = pipe(
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        callback_on_step_end=callback,
    ).images
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    assert all(shape == (1, 3, 8, 8) for _, shape in seen)
    assert torch.count_nonzero(out) == 0


def test_progress_bar_is_shown(capsys):
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=False)
    pipe(num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert "3/3" in capsys.readouterr().err


def test_mismatched_unet_and_scheduler_raise():
    pipe = tiny_pipeline(order=3)
    pipe.scheduler = HOLDScheduler(order=2)
    with pytest.raises(ValueError, match="feeds it 2"):
        pipe(num_inference_steps=3)
    with pytest.raises(ValueError, match="output_type"):
        tiny_pipeline()(output_type="jpeg")
    with pytest.raises(ValueError, match="latents have shape"):
        tiny_pipeline()(latents=torch.zeros(1, 2, 8, 8))


def test_save_and_load_in_a_fresh_interpreter_reproduces_images(tmp_path):
    pipe = tiny_pipeline(order=3, solver="sscs")
    pipe.save_pretrained(tmp_path / "pipe")
    expected = pipe(batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(5), output_type="np")
    np.save(tmp_path / "expected.npy", expected.images)
    script = textwrap.dedent(
        f"""
        import numpy as np, torch
        import diffusers_hold
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(tmp_path / "pipe")!r})
        assert type(pipe).__name__ == "HOLDPipeline", type(pipe)
        assert type(pipe.scheduler).__name__ == "HOLDScheduler" and pipe.scheduler.config.solver == "sscs"
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(5),
                      output_type="np").images
        np.testing.assert_array_equal(images, np.load({str(tmp_path / "expected.npy")!r}))
        print("identical")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "identical" in result.stdout
    # the in-process loader gives the same pipeline back
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(reloaded, HOLDPipeline) and isinstance(reloaded.scheduler, HOLDScheduler)


def test_nan_in_the_initial_state_is_named():
    pipe = tiny_pipeline(order=3)
    state = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    state[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="and so does the sample: check the initial latents"):
        pipe(latents=state, num_inference_steps=3, output_type="np")
