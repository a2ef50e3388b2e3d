import math

import pytest
import torch

from hndsr.scheduler import DDIMConfig, DDIMScheduler


@pytest.mark.parametrize("total", [10, 100, 1000])
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 10])
def test_trailing_timesteps_are_strided_descending_and_chain_to_zero(total, steps):
    if steps > total:
        pytest.skip("more steps than timesteps")
    scheduler = DDIMScheduler(DDIMConfig(num_train_timesteps=total))
    timesteps = scheduler.set_timesteps(steps).tolist()
    assert len(timesteps) == steps
    assert timesteps[0] == total - 1, "sampling must start at the noisiest trained timestep"
    assert all(a > b for a, b in zip(timesteps, timesteps[1:], strict=False))
    # Each step moves to the next listed timestep (never to t - 1 or a recomputed neighbour); the last to -1.
    for i, t in enumerate(timesteps):
        expected = timesteps[i + 1] if i + 1 < steps else -1
        assert scheduler.previous_timestep(t) == expected
    gaps = [a - b for a, b in zip(timesteps, timesteps[1:], strict=False)]
    assert not gaps or max(gaps) - min(gaps) <= 1


def test_alphas_cumprod_is_a_decreasing_cosine_schedule():
    alpha_bar = DDIMScheduler().alphas_cumprod
    assert alpha_bar.shape == (1000,)
    assert torch.all(alpha_bar[1:] < alpha_bar[:-1])
    assert 0.999 < alpha_bar[0] <= 1.0 and alpha_bar[-1] < 1e-3


def test_add_noise_matches_the_closed_form():
    scheduler = DDIMScheduler()
    x0, noise = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    t = torch.tensor([0, 500, 999])
    noisy = scheduler.add_noise(x0, noise, t)
    for i in range(3):
        a = scheduler.alphas_cumprod[t[i]].item()
        assert torch.allclose(noisy[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i], atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
def test_step_with_a_perfect_model_recovers_x0(prediction_type):
    # If the network's output is exactly right, DDIM (eta = 0) lands on x0 whatever the schedule.
    scheduler = DDIMScheduler(DDIMConfig(prediction_type=prediction_type))
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, 4, generator=generator)
    noise = torch.randn(2, 3, 4, 4, generator=generator)
    sample = None
    for t in scheduler.set_timesteps(5).tolist():
        if sample is None:
            sample = scheduler.add_noise(x0, noise, torch.tensor([t, t]))
        a = scheduler.alphas_cumprod[t].item()
        eps = (sample - math.sqrt(a) * x0) / math.sqrt(1 - a)
        output = x0 if prediction_type == "sample" else eps
        sample = scheduler.step(output, t, sample)
    assert torch.allclose(sample, x0, atol=1e-5)


def test_step_is_consistent_with_add_noise():
    # With eta = 0 and a perfect x0 prediction, x_prev is exactly q(x_prev | x0) with the *same* noise.
    scheduler = DDIMScheduler()
    x0, noise = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    timesteps = scheduler.set_timesteps(4).tolist()
    t, prev = timesteps[0], timesteps[1]
    x_t = scheduler.add_noise(x0, noise, torch.tensor([t]))
    assert torch.allclose(scheduler.step(x0, t, x_t), scheduler.add_noise(x0, noise, torch.tensor([prev])), atol=1e-5)


def test_eta_zero_is_deterministic_and_eta_positive_uses_the_generator():
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(4)
    sample, output = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    t = int(scheduler.timesteps[1])
    assert torch.equal(scheduler.step(output, t, sample), scheduler.step(output, t, sample))
    a = scheduler.step(output, t, sample, eta=1.0, generator=torch.Generator().manual_seed(1))
    b = scheduler.step(output, t, sample, eta=1.0, generator=torch.Generator().manual_seed(1))
    c = scheduler.step(output, t, sample, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_misuse_raises_with_a_fix():
    scheduler = DDIMScheduler()
    with pytest.raises(ValueError, match="call set_timesteps first"):
        scheduler.step(torch.zeros(1), 999, torch.zeros(1))
    with pytest.raises(ValueError, match="between 1 and 1000"):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        DDIMScheduler(DDIMConfig(prediction_type="v"))
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        scheduler.step(torch.zeros(1), 999, torch.zeros(1), eta=-0.1)
    with pytest.warns(UserWarning, match="more noise than DDPM"):
        scheduler.step(torch.zeros(1), 999, torch.zeros(1), eta=1.5)
