import pytest
import torch
from diffusers import DDIMScheduler

from fastdiff.schedule import NoiseSchedule, x0_and_eps
from fastdiff.testing import SD_SCHEDULER_CONFIG, GaussianMixtureDenoiser, make_gaussian_mixture


@pytest.fixture(scope="module")
def oracle():
    return make_gaussian_mixture(dim=16, num_components=4)


def test_eps_matches_autograd_of_exact_log_density(oracle):
    x = torch.randn(6, 16, dtype=torch.float64)
    t = torch.tensor([0.0, 5.0, 120.5, 500.0, 880.0, 999.0])
    alpha, sigma = oracle.schedule.alpha(t), oracle.schedule.sigma(t)
    xr = x.clone().requires_grad_()
    (score,) = torch.autograd.grad(oracle.log_density(xr, alpha, sigma).sum(), xr)
    assert torch.allclose(oracle(x, t), -sigma[:, None] * score, atol=1e-10)


def test_log_density_is_normalised_in_one_dim():
    sched = NoiseSchedule.from_config(SD_SCHEDULER_CONFIG)
    gm = GaussianMixtureDenoiser(torch.tensor([[-1.0], [2.0]]), torch.tensor([0.3, 0.5]), torch.tensor([1.0, 3.0]), sched)
    grid = torch.linspace(-8, 8, 20001, dtype=torch.float64)[:, None]
    for t in (0, 400, 999):
        p = gm.log_density(grid, sched.alpha(t), sched.sigma(t)).exp()
        assert torch.trapezoid(p, grid[:, 0]).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_prediction_types_are_consistent(prediction_type):
    eps_model = make_gaussian_mixture(dim=8, num_components=3)
    other = make_gaussian_mixture(dim=8, num_components=3, prediction_type=prediction_type)
    x, t = torch.randn(4, 8, dtype=torch.float64), torch.tensor([1.0, 200.0, 600.0, 999.0])
    a, s = other.schedule.alpha(t), other.schedule.sigma(t)
    _, eps = x0_and_eps(other(x, t), x, a, s, prediction_type)
    assert torch.allclose(eps, eps_model(x, t), atol=1e-9)


def test_ode_solution_is_the_limit_of_ddim(oracle):
    x = torch.randn(3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sched = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    errors = []
    for n in (25, 50, 100):
        sched.set_timesteps(n)
        xt = x.clone()
        for t in sched.timesteps:
            xt = sched.step(oracle(xt, t), t, xt).prev_sample
        ref = oracle.solve_ode(x, sched.timesteps[0].item(), 0, steps=400)
        errors.append((xt - ref).pow(2).mean().sqrt().item())
    assert errors[0] > errors[1] > errors[2]  # first-order convergence towards the exact solution
    assert 1.6 < errors[0] / errors[1] < 2.5 and 1.6 < errors[1] / errors[2] < 2.5


def test_sample_data_statistics(oracle):
    x = oracle.sample_data(20000, torch.Generator().manual_seed(0))
    weights = oracle.log_weights.exp()
    mean = (weights[:, None] * oracle.means).sum(0)
    assert torch.allclose(x.mean(0), mean, atol=0.05)
