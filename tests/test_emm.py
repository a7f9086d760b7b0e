"""Effective model memorization and the closed-form memorizing model (the optimal empirical denoiser)."""

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler

from diffusers_hold import HOLDPipeline, HOLDScheduler
from diffusers_hold.data import load_digits_images
from diffusers_hold.metrics import effective_model_memorization, nn_ratio_memorization
from diffusers_hold.models import OptimalEmpiricalDenoiser


@pytest.fixture(scope="module")
def digits():
    images, _ = load_digits_images(resolution=8)
    return images


def sample_empirical_denoiser(train: torch.Tensor, num_samples: int, seed: int = 0, steps: int = 25) -> torch.Tensor:
    """Generations of the optimal empirical denoiser of ``train`` through the stock DDIMPipeline, in [-1, 1]."""
    pipe = DDIMPipeline(unet=OptimalEmpiricalDenoiser.from_images(train), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        batch_size=num_samples,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images
    return torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1


def test_empirical_denoiser_matches_the_posterior_mean_written_out(digits):
    """eps_hat agrees with E[x0 | x_t] computed per training image with explicit Gaussian likelihoods."""
    train = digits[:5].double()
    model = OptimalEmpiricalDenoiser.from_images(train)
    x_t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    timestep = torch.tensor([10, 400, 900])
    eps = model(x_t.float(), timestep).sample.double()
    table = DDIMScheduler().alphas_cumprod.double()
    for row in range(3):
        ab = table[timestep[row]]
        log_lik = torch.stack(
            [-((x_t[row] - ab.sqrt() * image) ** 2).sum() / (2 * (1 - ab)) for image in train]
        )  # uniform prior over the training images
        x0 = (torch.softmax(log_lik, 0)[:, None, None, None] * train).sum(0)
        expected = (x_t[row] - ab.sqrt() * x0) / (1 - ab).sqrt()
        torch.testing.assert_close(eps[row], expected, atol=1e-5, rtol=1e-5)


def test_empirical_denoiser_memorizes_and_held_out_images_do_not(digits):
    train, held_out = digits[:16], digits[1000:1064]
    generated = sample_empirical_denoiser(train, num_samples=64)
    report = nn_ratio_memorization(generated, train, held_out=held_out)
    assert report.fraction_memorized >= 0.95
    assert report.held_out_fraction <= 0.05
    assert report.distinct_copied >= 8  # it copies many training images, not one


def test_empirical_denoiser_memorizes_under_zero_shot_hold(digits):
    """The exact empirical score memorizes under HOLD too: HOLD's effect needs a learned (smoothed) score."""
    train = digits[:16]
    scheduler = HOLDScheduler.from_config(
        DDIMScheduler().config, order=3, prediction_type="vp_epsilon", solver="ddim", timestep_spacing="quadratic"
    )
    pipe = HOLDPipeline(unet=OptimalEmpiricalDenoiser.from_images(train), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=32, num_inference_steps=60, generator=torch.Generator().manual_seed(0), output_type="pt")
    generated = images.images * 2 - 1
    assert nn_ratio_memorization(generated, train).fraction_memorized >= 0.9


def test_empirical_denoiser_checks_its_input(digits):
    model = OptimalEmpiricalDenoiser.from_images(digits[:4])
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(2, 3, 8, 8), 10)
    with pytest.raises(ValueError, match="NaN"):
        OptimalEmpiricalDenoiser.from_images(torch.full((2, 1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match=r"\(N, C, H, H\)"):
        OptimalEmpiricalDenoiser.from_images(torch.zeros(2, 8, 8))


def capacity_model(capacity: int, num_samples: int = 50):
    """A recipe whose memorized fraction is exactly ``min(1, capacity / n)`` rounded to samples: it copies training
    images for that many generations and draws the rest far from every image."""
    calls = []

    def train_and_sample(indices: torch.Tensor, epochs: int, pool: torch.Tensor) -> torch.Tensor:
        calls.append((indices.clone(), epochs))
        copies = round(num_samples * min(1.0, capacity / len(indices)))
        train = pool[indices]
        copied = train[torch.arange(copies) % len(indices)] + 1e-4
        fresh = 50.0 + torch.randn(num_samples - copies, *pool.shape[1:], generator=torch.Generator().manual_seed(0))
        return torch.cat([copied, fresh])

    def exact_emm(pool_size: int) -> int:
        return max(n for n in range(2, pool_size + 1) if round(num_samples * min(1.0, capacity / n)) >= 45)

    return train_and_sample, calls, exact_emm


@pytest.mark.parametrize("capacity", [7, 30, 61])
def test_bisection_finds_the_exact_emm_of_a_known_curve(digits, capacity):
    pool = digits[:200]
    train_and_sample, calls, exact_emm = capacity_model(capacity)
    result = effective_model_memorization(
        lambda indices, epochs: train_and_sample(indices, epochs, pool), pool, epochs=3, rtol=1e-9, progress=False
    )
    assert result.emm == exact_emm(200)
    assert result.bracket == (exact_emm(200), exact_emm(200) + 1)
    assert result.search == "bisection"
    for point in result.curve:
        expected = round(50 * min(1.0, capacity / point.size)) / 50
        assert point.fraction_memorized == pytest.approx(expected)
    # budget in epochs, the same for every size; nested training sets of distinct pool images
    assert {epochs for _, epochs in calls} == {3}
    largest = max(calls, key=lambda call: len(call[0]))[0]
    for indices, _ in calls:
        assert len(set(indices.tolist())) == len(indices)
        assert torch.equal(indices, largest[: len(indices)])
    assert len(calls) <= 12  # a bisection, not a scan of 199 sizes


def test_grid_search_reports_the_largest_memorizing_size(digits):
    pool = digits[:200]
    train_and_sample, calls, _ = capacity_model(30)
    result = effective_model_memorization(
        lambda indices, epochs: train_and_sample(indices, epochs, pool), pool, epochs=1, sizes=[150, 8, 32, 33, 64]
    )
    assert [point.size for point in result.curve] == [8, 32, 33, 64, 150]
    # fractions 1, 0.94, 0.90, 0.46, 0.2: 33 is the largest size at >= 90 %
    assert result.emm == 33 and result.bracket == (33, 64)
    assert result.to_dict()["curve"][0]["size"] == 8


def test_a_memorize_everything_recipe_has_emm_at_least_the_pool(digits):
    pool = digits[:48]
    result = effective_model_memorization(
        lambda indices, epochs: sample_empirical_denoiser(pool[indices], num_samples=24, steps=20),
        pool,
        epochs=1,
        min_size=4,
        progress=False,
    )
    assert result.emm == 48 and result.bracket == (48, None)
    assert all(point.fraction_memorized >= 0.9 for point in result.curve)


def test_a_recipe_that_never_memorizes_has_no_emm(digits):
    pool = digits[:64]

    def fresh(indices, epochs):
        return 50.0 + torch.randn(20, *pool.shape[1:])

    result = effective_model_memorization(fresh, pool, epochs=1, progress=False)
    assert result.emm is None and result.bracket == (None, 2)
    assert len(result.curve) == 1


def test_emm_rejects_bad_input(digits):
    pool = digits[:20]

    def never_called(indices, epochs):
        raise AssertionError("must fail before training")

    for kwargs, match in [
        ({"epochs": 0}, "epochs"),
        ({"epochs": 1, "sizes": [1, 5]}, "sizes"),
        ({"epochs": 1, "sizes": [5, 21]}, r"\[2, 20\]"),
        ({"epochs": 1, "min_size": 10, "max_size": 10}, "smaller"),
        ({"epochs": 1, "threshold": 1.5}, "threshold"),
    ]:
        with pytest.raises(ValueError, match=match):
            effective_model_memorization(never_called, pool, progress=False, **kwargs)
    with pytest.raises(ValueError, match="NaN"):
        effective_model_memorization(never_called, torch.full((4, 1, 8, 8), float("nan")), epochs=1)
    with pytest.raises(ValueError, match="shape"):
        effective_model_memorization(lambda i, e: torch.zeros(5, 3, 8, 8), pool, epochs=1, sizes=[4], progress=False)


def test_empirical_denoiser_saves_and_loads_its_training_images(digits, tmp_path):
    model = OptimalEmpiricalDenoiser.from_images(digits[:4])
    model.save_pretrained(tmp_path)
    loaded = OptimalEmpiricalDenoiser.from_pretrained(tmp_path)
    assert torch.equal(loaded.train_images, digits[:4])
    x_t = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded(x_t, 300).sample, model(x_t, 300).sample, rtol=0, atol=0)
