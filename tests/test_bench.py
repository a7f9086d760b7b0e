"""The memorization benchmark: a short side-by-side run writes its files, resumes exactly, and rejects bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image

from diffusers_hold.bench import (
    BENCH_METHODS,
    BenchConfig,
    build_model,
    build_parser,
    config_from_args,
    evaluate,
    load_bench_data,
    run_bench,
    train_and_evaluate,
)
from diffusers_hold.data import load_photo_patches
from diffusers_hold.mitigations import attention_heads, pruned_heads

ROOT = Path(__file__).resolve().parents[1]
BENCH_ARCHITECTURE = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": (8, 16), "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"), "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
}  # fmt: skip
TINY = {"train_size": 16, "held_out_size": 64, "num_samples": 16, "block_out_channels": (8, 16), "hold_steps": 20}


def test_a_short_run_trains_every_method_and_writes_the_report(tmp_path):
    config = BenchConfig(methods=["ddpm", "hold2", "agc", "snr_interval"], train_steps=12, num_evaluations=2, **TINY)
    results = run_bench(config, tmp_path, progress=False)
    assert [r["method"] for r in results] == ["ddpm", "hold2", "agc", "snr_interval"]
    for r in results:
        assert [point["step"] for point in r["curve"]] == [6, 12]
        assert 0 <= r["memorized_ci"][0] <= r["memorized"] <= r["memorized_ci"][1] <= 1
        assert r["train_seconds"] > 0 and r["frechet_distance"] > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"] == json.loads(json.dumps(results)) and saved["config"]["train_steps"] == 12
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {name} |" in table for name in ("ddpm", "hold2", "agc", "snr_interval"))
    for figure in ("samples_vs_nearest.png", "memorization_vs_order.png", "memorization_vs_steps.png"):
        assert (tmp_path / figure).stat().st_size > 1000
    # a second call finds every method done and reports the same numbers without training
    again = run_bench(config, tmp_path, progress=False)
    assert [r["memorized"] for r in again] == [r["memorized"] for r in results]
    with pytest.raises(ValueError, match="other settings"):
        run_bench(BenchConfig(methods=["ddpm"], train_steps=13, num_evaluations=2, **TINY), tmp_path, progress=False)


def test_ensemble_pruning_and_guidance_methods_run_side_by_side(tmp_path):
    methods = ["ddpm", "iet", "iet_agc", "prune", "prune_random", "amg"]
    config = BenchConfig(methods=methods, train_steps=40, num_evaluations=2, **TINY)
    results = {r["method"]: r for r in run_bench(config, tmp_path, progress=False)}
    states = {name: torch.load(tmp_path / "state" / f"{name}.pt", weights_only=True) for name in methods[:-1]}
    # IET: 5 rounds of four shards per evaluation; the evaluated model is the last round's global average
    ensemble = states["iet"]["callbacks"]["callbacks"][1]["state"]
    assert ensemble["round"] == 10 and ensemble["shard"] == 0 and sorted(map(len, ensemble["shards"])) == [4] * 4
    for key, value in ensemble["global_weights"].items():
        torch.testing.assert_close(states["iet"]["model"][key], value, rtol=0, atol=0)
    # pruning: 20 % of the 8 heads (2 per attention module at width 16), chosen after 32 of the 40 updates
    unet = UNet2DModel(**BENCH_ARCHITECTURE)
    for name in ("prune", "prune_random"):
        unet.load_state_dict(states[name]["model"])
        assert len(pruned_heads(unet)) == round(0.2 * len(attention_heads(unet))) == 2
    # AMG trains nothing: it samples the baseline's final model once
    assert not (tmp_path / "state" / "amg.pt").exists() and len(results["amg"]["curve"]) == 1
    assert results["amg"]["train_seconds"] == results["ddpm"]["train_seconds"]
    assert all(0 <= r["memorized"] <= 1 for r in results.values())
    with pytest.raises(ValueError, match="multiple of the ensemble's 40 phases"):
        run_bench(BenchConfig(methods=["iet"], train_steps=60, num_evaluations=2, **TINY), tmp_path / "odd",
                  progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="put ddpm before it"):
        BenchConfig(methods=["amg", "ddpm"])


def test_text_conditional_methods_train_on_captions_and_sample_with_guidance_hooks(tmp_path):
    methods = ["t2i", "t2i_caption_random", "t2i_embedding_noise", "t2i_cfg_gap_filter", "t2i_delayed_guidance",
               "t2i_opposite_guidance", "t2i_amg"]  # fmt: skip
    config = BenchConfig(methods=methods, train_steps=8, num_evaluations=1, **TINY)
    results = {r["method"]: r for r in run_bench(config, tmp_path, progress=False)}
    state = torch.load(tmp_path / "state" / "t2i.pt", weights_only=True)
    assert any("attn2.to_k" in key for key in state["model"])  # cross-attention on the caption states
    # the inference-time methods sample the same model differently; the guidance hooks did change the samples
    assert results["t2i_delayed_guidance"]["frechet_distance"] != results["t2i"]["frechet_distance"]
    assert results["t2i_opposite_guidance"]["frechet_distance"] != results["t2i"]["frechet_distance"]
    with pytest.raises(ValueError, match="guidance_scale must be > 1"):
        BenchConfig(methods=["t2i"], guidance_scale=1.0)


def test_evaluate_scores_copies_as_memorized_and_draws_from_elsewhere_as_not():
    config = BenchConfig(**TINY)
    gen = torch.Generator().manual_seed(0)
    train, held_out = torch.rand(16, 1, 8, 8, generator=gen), torch.rand(64, 1, 8, 8, generator=gen)
    copies = train[torch.arange(32) % 16] + 0.001 * torch.randn(32, 1, 8, 8, generator=gen)
    scores = evaluate(copies, train, held_out, config)
    assert scores["memorized"] == 1.0 and scores["distinct_copied"] == 16 and scores["memorized_ci"] == [1.0, 1.0]
    fresh = evaluate(torch.rand(32, 1, 8, 8, generator=gen), train, held_out, config)
    assert fresh["memorized"] == 0.0 and fresh["held_out_memorized"] == 0.0


def bench_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "diffusers_hold.bench", "--methods", "ddpm", "--train_size", "16",
            "--held_out_size", "64", "--num_samples", "16", "--train_steps", "120", "--num_evaluations", "2",
            "--output_dir", str(out)]  # fmt: skip


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(bench_command(tmp_path / "straight"), env=env, check=True, capture_output=True, timeout=600)
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        bench_command(interrupted), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not (interrupted / "state" / "ddpm.pt").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first evaluation"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "results.json").exists()
    assert torch.load(interrupted / "state" / "ddpm.pt", weights_only=True)["step"] == 60
    subprocess.run(bench_command(interrupted), env=env, check=True, capture_output=True, timeout=600)
    straight = torch.load(tmp_path / "straight" / "state" / "ddpm.pt", weights_only=True)
    resumed = torch.load(interrupted / "state" / "ddpm.pt", weights_only=True)
    for name, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, rtol=0, atol=0)
    assert [p["memorized"] for p in resumed["curve"]] == [p["memorized"] for p in straight["curve"]]


def test_the_cli_runs_the_bench_with_its_flags(tmp_path):
    command = [sys.executable, "-m", "diffusers_hold.cli", "bench", "--methods", "ddpm", "--train_size", "8",
               "--held_out_size", "64", "--num_samples", "8", "--train_steps", "4", "--num_evaluations", "1",
               "--num_threads", "1", "--output_dir", str(tmp_path)]  # fmt: skip
    out = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| ddpm |" in out.stdout and (tmp_path / "results.json").exists()
    assert json.loads((tmp_path / "config.json").read_text())["train_steps"] == 4
    # The last line says where the files are and names each figure, which exists there.
    where = out.stdout.strip().splitlines()[-1]
    assert where.startswith("Wrote results.json, results.md") and where.endswith(f"{tmp_path}/"), where
    for figure in ("samples_vs_nearest.png", "memorization_vs_order.png", "memorization_vs_steps.png"):
        assert figure in where and (tmp_path / figure).exists(), figure


def test_bad_settings_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown methods"):
        BenchConfig(methods=["nope"])
    with pytest.raises(ValueError, match="train_size"):
        BenchConfig(train_size=1)
    with pytest.raises(ValueError, match="num_evaluations"):
        BenchConfig(train_steps=3, num_evaluations=5)
    with pytest.raises(ValueError, match="leaves no held-out"):
        run_bench(BenchConfig(data="lfw", train_size=99, **{k: v for k, v in TINY.items() if k != "train_size"}),
                  tmp_path / "lfw", progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="image folder"):
        run_bench(BenchConfig(data=str(tmp_path / "missing")), tmp_path / "x", progress=False)
    args = build_parser().parse_args(["--quick", "--hold_orders", "4"])
    config = config_from_args(args)
    assert config.train_steps <= 600 and "hold4" in config.methods
    with pytest.raises(ValueError, match="hold_orders"):
        config_from_args(build_parser().parse_args(["--hold_orders", "7"]))
    assert set(config.methods) <= set(BENCH_METHODS)


def test_an_image_folder_is_the_data_of_a_run(tmp_path):
    # 50 PNG files of one RGB colour each (12x10, so the centre crop and resize have work to do)
    folder = tmp_path / "images"
    folder.mkdir()
    colours = np.random.default_rng(0).integers(0, 256, (50, 3), dtype=np.uint8)
    for i, colour in enumerate(colours):
        Image.fromarray(np.broadcast_to(colour, (10, 12, 3)).copy()).save(folder / f"image_{i:02d}.png")
    config = BenchConfig(data=str(folder), methods=["ddpm"], train_size=16, held_out_size=34, num_samples=8,
                         train_steps=2, num_evaluations=1, block_out_channels=(8, 16))  # fmt: skip
    train, held_out = load_bench_data(config)
    assert train.shape == (16, 3, 8, 8) and held_out.shape == (34, 3, 8, 8)
    # every image is its file's colour, channels in RGB order, scaled to [-1, 1]; the split is a permutation
    expected = torch.from_numpy(colours).double() / 255 * 2 - 1
    loaded = torch.cat([train, held_out]).double()
    assert torch.allclose(loaded, loaded[:, :, :1, :1].expand_as(loaded), atol=1e-6)
    found = sorted(map(tuple, loaded[:, :, 0, 0].numpy().round(4).tolist()))
    assert found == sorted(map(tuple, expected.numpy().round(4).tolist()))
    results = run_bench(config, tmp_path / "run", progress=False)
    assert results[0]["method"] == "ddpm" and 0 <= results[0]["memorized"] <= 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"] == str(folder)


def test_photo_patches_are_split_into_disjoint_training_and_held_out_images():
    config = BenchConfig(data="photos", methods=["ddpm"], train_size=32, held_out_size=512)
    train, held_out = load_bench_data(config)
    assert train.shape == (32, 3, 8, 8) and held_out.shape == (512, 3, 8, 8)
    pool = load_photo_patches(8)
    rows = {tuple(row) for row in pool.reshape(len(pool), -1).tolist()}
    picked = [tuple(row) for row in torch.cat([train, held_out]).reshape(544, -1).tolist()]
    assert set(picked) <= rows and len(set(picked)) == 544  # drawn from the patches, none twice
    other_seed, _ = load_bench_data(BenchConfig(data="photos", methods=["ddpm"], seed=1))
    assert not torch.equal(other_seed, train)


@pytest.mark.parametrize(
    ("name", "setting", "value"),
    [
        ("hold3_linv05", "L_inv", 0.5),
        ("hold3_aux1", "aux_init_var", 1.0),
        ("hold3_T3", "T", 3.0),
        ("hold3_T8", "T", 8.0),
    ],
)
def test_hold_setting_variants_train_model_and_scheduler_under_the_same_process(name, setting, value):
    unet, scheduler = build_model(BENCH_METHODS[name], BenchConfig(methods=[name]), channels=1)
    assert scheduler.config[setting] == value and unet.config.hold_settings[setting] == value
    assert unet.config.hold_order == scheduler.hold_order == 3
    state = torch.randn(2, 3, 8, 8)
    with torch.no_grad():  # the UNet accepts its own scheduler's input and refuses the default process's
        unet(scheduler.scale_model_input(state, full_state=True), scheduler.time_to_timestep(torch.tensor(1.0)))
        default = build_model(BENCH_METHODS["hold3"], BenchConfig(methods=["hold3"]), channels=1)[1]
        with pytest.raises(ValueError, match=setting):
            unet(default.scale_model_input(state, full_state=True), torch.tensor(100.0))


def test_the_dit_methods_train_sample_and_prune_a_diffusers_dit(tmp_path):
    config = BenchConfig(methods=["dit", "dit_prune30_random"], train_size=16, held_out_size=64, num_samples=8,
                         train_steps=10, num_evaluations=1, ddim_steps=3)  # fmt: skip
    results = run_bench(config, tmp_path / "run", progress=False)
    assert [r["method"] for r in results] == ["dit", "dit_prune30_random"]
    assert all(0 <= r["memorized"] <= 1 and np.isfinite(r["frechet_distance"]) for r in results)
    for name, expected in (("dit", 0), ("dit_prune30_random", round(0.3 * 32))):
        model, _ = build_model(BENCH_METHODS[name], config, channels=1)
        model.load_state_dict(torch.load(tmp_path / "run" / "state" / f"{name}.pt", weights_only=True)["model"])
        assert len(pruned_heads(model)) == expected


def test_dit_training_is_reproducible_whatever_the_global_random_state(tmp_path):
    # diffusers' DiT draws its class-label dropout from the global RNG; the bench's one-class DiT must not depend on it
    config = BenchConfig(methods=["dit"], train_size=16, held_out_size=64, train_steps=8, num_evaluations=1,
                         num_samples=8, ddim_steps=2)  # fmt: skip
    train, held_out = load_bench_data(config)
    weights = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        (tmp_path / str(global_seed)).mkdir()
        train_and_evaluate(BENCH_METHODS["dit"], train, held_out, config, tmp_path / str(global_seed))
        weights.append(torch.load(tmp_path / str(global_seed) / "dit.pt", weights_only=True)["model"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_a_saved_state_from_another_evaluation_plan_is_refused(tmp_path):
    config = BenchConfig(methods=["ddpm"], train_size=16, held_out_size=64, train_steps=4, num_evaluations=1,
                         num_samples=8, ddim_steps=2)  # fmt: skip
    train, held_out = load_bench_data(config)
    train_and_evaluate(BENCH_METHODS["ddpm"], train, held_out, config, tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"evaluated at steps \[4\]; this run evaluates at \[2, 4\]"):
        train_and_evaluate(BENCH_METHODS["ddpm"], train, held_out, replace(config, num_evaluations=2), tmp_path)


def test_the_snr_interval_grid_is_vu_et_als_gaussian_over_each_interval():
    from scipy.stats import norm

    grid = {name: method for name, method in BENCH_METHODS.items() if name.startswith("snr_u")}
    assert len(grid) == 6
    for name, method in grid.items():
        low, high = (float(v) for v in name[len("snr_u") :].split("_c")[0].split("-"))
        confidence = int(name.split("_c")[1]) / 100
        config = BenchConfig(methods=[name])
        _, scheduler = build_model(method, config, channels=1)
        [callback] = method.callbacks(scheduler, config, torch.zeros(4, 1, 8, 8))
        assert callback.sampler.mean == pytest.approx((low + high) / 2)
        assert callback.sampler.std == pytest.approx((high - low) / (2 * norm.ppf((1 + confidence) / 2)))


class _Marker:
    """Unpickling this object creates a file: a stand-in for code a foreign state file could run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_data_and_sizes_are_checked_before_the_folder_is_claimed_and_foreign_state_is_not_unpickled(tmp_path):
    # a typo in --data, a held-out set too small for the PCA features, too few training images or generations for
    # precision/recall: each fails before config.json is written or anything is trained
    for name, settings, message in [
        ("typo", {"data": str(tmp_path / "digts")}, "image folder"),
        ("held_out", {"held_out_size": 20}, r"20 held-out images \(at least 33\)"),
        ("train", {"train_size": 4}, r"4 training images \(at least 6\)"),
        ("samples", {"num_samples": 5}, r"5 generated images \(at least 6\)"),
    ]:
        config = BenchConfig(methods=["ddpm"], train_steps=2, num_evaluations=1, **{**TINY, **settings})
        with pytest.raises(ValueError, match=message):
            run_bench(config, tmp_path / name, progress=False)
        assert not (tmp_path / name).exists()
    # a state file holding anything but tensors and plain values is refused, naming it, and its code does not run
    out, marker = tmp_path / "foreign", tmp_path / "code_ran"
    (out / "state").mkdir(parents=True)
    torch.save({"model": _Marker(marker)}, out / "state" / "ddpm.pt")
    config = BenchConfig(methods=["ddpm"], train_steps=2, num_evaluations=1, **TINY)
    with pytest.raises(ValueError, match=r"ddpm\.pt holds objects other than tensors"):
        run_bench(config, out, progress=False)
    assert not marker.exists()


def test_a_hold_method_with_its_own_sampler_trains_like_its_order_and_samples_with_that_sampler():
    from diffusers_hold import HOLDPipeline, HOLDScheduler
    from diffusers_hold.bench import EXP_SDE_SAMPLER
    from diffusers_hold.bench.run import _sample

    config = BenchConfig(methods=["hold3", "hold3_exp50"], **TINY)
    train, _ = load_bench_data(config)
    torch.manual_seed(0)
    model, scheduler = build_model(BENCH_METHODS["hold3"], config, channels=1)
    torch.manual_seed(0)
    same_model, same_scheduler = build_model(BENCH_METHODS["hold3_exp50"], config, channels=1)
    # the same model and forward process: only sampling differs
    assert scheduler.config == same_scheduler.config and model.config == same_model.config
    weights, same_weights = model.state_dict(), same_model.state_dict()
    assert weights.keys() == same_weights.keys() and all(torch.equal(weights[k], same_weights[k]) for k in weights)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    generated = {}
    for name in ("hold3", "hold3_exp50"):
        calls.clear()
        generated[name] = _sample(model, scheduler, config, BENCH_METHODS[name], train)
        assert len(calls) == (50 if name == "hold3_exp50" else TINY["hold_steps"])
        assert generated[name].shape == (TINY["num_samples"], 1, 8, 8) and torch.isfinite(generated[name]).all()
    # hold3_exp50 is the exponential SDE solver from the bench's generator seed, not the scheduler it was given
    pipe = HOLDPipeline(unet=model, scheduler=HOLDScheduler.from_config(scheduler.config, **EXP_SDE_SAMPLER))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(batch_size=TINY["num_samples"], num_inference_steps=50, output_type="pt",
                    generator=torch.Generator().manual_seed(config.seed + 1)).images * 2 - 1  # fmt: skip
    torch.testing.assert_close(generated["hold3_exp50"], expected.float())
    assert not torch.allclose(generated["hold3"], generated["hold3_exp50"], atol=1e-2)
