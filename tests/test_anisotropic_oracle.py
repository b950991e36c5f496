"""The anisotropic Gaussian-mixture oracle: exact eps (= -sigma * score), exact x0, exact ODE solution."""

import torch

from fastdiff.testing import SD_SCHEDULER_CONFIG, make_anisotropic_mixture

torch.set_num_threads(1)


def test_posterior_is_the_score_of_the_noised_density():
    oracle = make_anisotropic_mixture(dim=12, num_components=3, seed=1)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in (999.0, 500.0, 20.0):
        a, s = oracle.schedule.alpha(t), oracle.schedule.sigma(t)
        xx = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(oracle.log_density(xx, a.expand(5), s.expand(5)).sum(), xx)
        x0, eps = oracle.posterior(x, a, s)
        torch.testing.assert_close(eps, -s * grad, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(a * x0 + s * eps, x, rtol=1e-9, atol=1e-9)  # Tweedie's pair is consistent


def test_prediction_types_and_data_covariance():
    eps_model = make_anisotropic_mixture(dim=6, num_components=1, seed=2)
    v_model = make_anisotropic_mixture(dim=6, num_components=1, seed=2, prediction_type="v_prediction")
    x = torch.randn(4, 6, dtype=torch.float64)
    a, s = eps_model.schedule.alpha(300), eps_model.schedule.sigma(300)
    x0, eps = eps_model.posterior(x, a, s)
    torch.testing.assert_close(v_model(x, 300), a * eps - s * x0)
    data = eps_model.sample_data(20000, generator=torch.Generator().manual_seed(3))
    cov = torch.cov(data.T)
    u, d = eps_model.rotations[0], eps_model.variances[0]
    torch.testing.assert_close(cov, u @ torch.diag(d) @ u.T, rtol=0.1, atol=0.02)


def test_ode_solution_is_converged():
    oracle = make_anisotropic_mixture(dim=8, num_components=2, seed=4, scheduler_config=SD_SCHEDULER_CONFIG)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    fine, coarse = oracle.solve_ode(x, 999, 0, steps=400), oracle.solve_ode(x, 999, 0, steps=200)
    assert (fine - coarse).abs().max() < 1e-6
