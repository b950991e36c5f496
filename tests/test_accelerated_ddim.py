"""AcceleratedDDIMScheduler: the diffusers scheduler contract, exactness on the oracle, order of convergence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

from fastdiff import AcceleratedDDIMScheduler
from fastdiff.samplers.accelerated_ddim import accelerated_step_coefficients
from fastdiff.samplers.registry import make_scheduler
from fastdiff.schedule import NoiseSchedule
from fastdiff.testing import SD_SCHEDULER_CONFIG, make_gaussian_mixture

torch.set_num_threads(1)


def sample_loop(scheduler, model, x, num_inference_steps=None, timesteps=None, generator=None):
    if timesteps is None:
        scheduler.set_timesteps(num_inference_steps)
    else:
        scheduler.set_timesteps(timesteps=timesteps)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


def rms(a, b):
    return ((a - b) ** 2).mean().sqrt().item()


@pytest.fixture(scope="module")
def oracle():
    return make_gaussian_mixture(dim=64, num_components=8)


@pytest.fixture(scope="module")
def x_T():
    return torch.randn(32, 64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


# ------------------------------------------------------------------------------------------ drop-in
def test_drop_in_stable_diffusion_pipeline():
    from fastdiff.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    pipe.scheduler = AcceleratedDDIMScheduler.from_config(pipe.scheduler.config)
    images = [pipe("a red digit", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                   output_type="np").images for _ in range(2)]
    assert images[0].shape == (1, 16 * 4, 16 * 4, 3) or images[0].ndim == 4
    assert np.isfinite(images[0]).all()
    np.testing.assert_array_equal(images[0], images[1])  # deterministic sampler, same seed


@pytest.mark.parametrize("name", ["accel_ddim", "accel_ddpm"])
def test_drop_in_ddpm_pipeline(name):
    from fastdiff.testing import tiny_ddpm_pipeline

    pipe = tiny_ddpm_pipeline()
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
    runs = [pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(3),
                 output_type="np").images for _ in range(2)]
    assert runs[0].shape == (2, 8, 8, 1) and np.isfinite(runs[0]).all()
    np.testing.assert_array_equal(runs[0], runs[1])


@pytest.mark.parametrize("source", [DDIMScheduler, DDPMScheduler, PNDMScheduler, DPMSolverMultistepScheduler,
                                    EulerDiscreteScheduler])
def test_from_config_of_diffusers_schedulers(source):
    base = source.from_config(SD_SCHEDULER_CONFIG)
    sched = AcceleratedDDIMScheduler.from_config(base.config)
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.num_train_timesteps == 1000
    assert isinstance(DDIMScheduler.from_config(sched.config), DDIMScheduler)  # and back
    assert "DDIMScheduler" in AcceleratedDDIMScheduler._compatibles


def test_config_round_trip_identical_steps(tmp_path, oracle, x_T):
    sched = AcceleratedDDIMScheduler.from_config(SD_SCHEDULER_CONFIG, interpolation="alphas_cumprod")
    sched.save_config(tmp_path)
    loaded = AcceleratedDDIMScheduler.from_pretrained(tmp_path)
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert strip(loaded.config) == strip(sched.config)
    a = sample_loop(sched, oracle, x_T[:8], 6)
    b = sample_loop(loaded, oracle, x_T[:8], 6)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ scheduler contract
@pytest.mark.parametrize("spacing,expected", [
    ("trailing", [999, 799, 599, 399, 199]),
    ("leading", [801, 601, 401, 201, 1]),
    ("linspace", [999, 749, 500, 250, 0]),
])
def test_timestep_spacings(spacing, expected):
    cfg = dict(SD_SCHEDULER_CONFIG, timestep_spacing=spacing)
    sched = AcceleratedDDIMScheduler.from_config(cfg)
    sched.set_timesteps(5)
    assert sched.timesteps.tolist() == expected
    ddim = DDIMScheduler.from_config(cfg)
    ddim.set_timesteps(5)
    assert sched.timesteps.tolist() == ddim.timesteps.tolist()  # same grid as diffusers' DDIM


def test_consecutive_steps_and_shapes():
    sched = AcceleratedDDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    sched.set_timesteps(10)
    sample = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps[:3]:
        out = sched.step(0.1 * sample, t, sample)
        assert out.prev_sample.shape == sample.shape and out.pred_original_sample.shape == sample.shape
        sample = out.prev_sample
    prev, x0 = sched.step(0.1 * sample, sched.timesteps[3], sample, return_dict=False)
    assert prev.shape == sample.shape and x0.shape == sample.shape


def test_custom_timesteps(oracle, x_T):
    sched = AcceleratedDDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    custom = [999, 850, 620, 400, 250, 120, 40]
    sched.set_timesteps(timesteps=custom)
    assert sched.timesteps.tolist() == custom and sched.num_inference_steps == len(custom)
    x = sample_loop(sched, oracle, x_T[:8], timesteps=custom)
    assert torch.isfinite(x).all()


def test_add_noise_and_velocity_shapes():
    sched = AcceleratedDDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    x0 = torch.randn(4, 3, 8, 8)
    noise = torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    noisy = sched.add_noise(x0, noise, t)
    assert noisy.shape == x0.shape and noisy.dtype == x0.dtype
    ref = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG).add_noise(x0, noise, t)
    torch.testing.assert_close(noisy, ref, rtol=1e-5, atol=1e-6)
    assert sched.add_noise(x0, noise, torch.tensor(500)).shape == x0.shape
    assert sched.get_velocity(x0, noise, t).shape == x0.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_and_device_preserved(dtype):
    sched = AcceleratedDDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    sched.set_timesteps(4)
    sample = torch.randn(2, 4, 4, 4).to(dtype)
    for t in sched.timesteps[:2]:
        out = sched.step(0.5 * sample, t, sample)
        assert out.prev_sample.dtype == dtype and out.prev_sample.device == sample.device
        assert out.pred_original_sample.dtype == dtype
        sample = out.prev_sample
    assert torch.isfinite(sample.float()).all()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_types_on_matching_oracle(prediction_type, x_T):
    """The same trajectory whatever the model predicts, when the oracle predicts that type."""
    cfg = dict(SD_SCHEDULER_CONFIG, prediction_type=prediction_type)
    model = make_gaussian_mixture(dim=64, num_components=8, prediction_type=prediction_type)
    eps_model = make_gaussian_mixture(dim=64, num_components=8)
    x = sample_loop(AcceleratedDDIMScheduler.from_config(cfg), model, x_T[:8], 8)
    ref = sample_loop(AcceleratedDDIMScheduler.from_config(SD_SCHEDULER_CONFIG), eps_model, x_T[:8], 8)
    assert rms(x, ref) < 1e-8


def test_zero_terminal_snr_v_prediction(x_T):
    cfg = dict(SD_SCHEDULER_CONFIG, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    sched = AcceleratedDDIMScheduler.from_config(cfg)
    model = make_gaussian_mixture(dim=64, num_components=8, scheduler_config=cfg, prediction_type="v_prediction")
    x = sample_loop(sched, model, x_T[:8], 6)
    assert sched.noise_schedule.alpha(999).item() == 0.0 and torch.isfinite(x).all()


# ------------------------------------------------------------------------------------------ the math
def test_first_order_part_is_ddim(oracle, x_T):
    """With the correction switched off (every step lower order) the update is DDIM on the same grid."""
    sched = AcceleratedDDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    ddim = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    sched.set_timesteps(5)
    ddim.set_timesteps(5)
    x = x_T[:4]
    out_a = sched.step(oracle(x, 999), 999, x).prev_sample  # first step: no history
    out_b = ddim.step(oracle(x, 999), 999, x).prev_sample
    torch.testing.assert_close(out_a, out_b, rtol=1e-6, atol=1e-6)


def test_paper_coefficient_matches_arcsin_form():
    """noise space + alphas_cumprod interpolation is the paper's (arcsin) update, on any grid."""
    sched = NoiseSchedule.from_config(SD_SCHEDULER_CONFIG)
    grid = [999, 870, 600, 555, 300, 90, 20]
    coeffs = accelerated_step_coefficients(sched, grid, 0, solver_space="noise", interpolation="alphas_cumprod",
                                          max_step_ratio=None)
    ab = sched.alpha_cumprod(grid + [0]).tolist()
    for i in range(1, len(grid)):
        a_prev, a_t, a_s = ab[i - 1], ab[i], ab[i + 1]
        paper = math.sqrt(a_s) / (a_t - a_prev) * (
            a_t * math.sqrt(1 - a_s) / math.sqrt(a_s) + math.asin(math.sqrt(a_s))
            - a_t * math.sqrt(1 - a_t) / math.sqrt(a_t) - math.asin(math.sqrt(a_t)))
        # the paper writes the term as paper * (eps_prev - eps_t); ours is correction * (eps_t - eps_prev)
        assert coeffs.correction[i].item() == pytest.approx(-paper, rel=1e-9, abs=1e-12)
    assert coeffs.correction[0].item() == 0.0


def test_step_ratio_limit_falls_back_to_log_snr():
    """Linear betas, 5 trailing steps: sigma saturates at high noise, so the second step (ratio 17 in sigma)
    extrapolates in log-SNR; well-conditioned steps keep the sigma coefficients."""
    sched = NoiseSchedule.from_config({"beta_schedule": "linear"})
    grid = [999, 799, 599, 399, 199]
    limited = accelerated_step_coefficients(sched, grid, None)
    plain = accelerated_step_coefficients(sched, grid, None, max_step_ratio=None)
    log_snr = accelerated_step_coefficients(sched, grid, None, interpolation="log_snr")
    sig = sched.sigma(grid + [0]).tolist()[:-1] + [0.0]
    for i in range(1, len(grid)):
        ratio = abs(sig[i + 1] - sig[i]) / abs(sig[i] - sig[i - 1])
        expected = log_snr if ratio > 3 else plain
        assert limited.correction[i].item() == pytest.approx(expected.correction[i].item(), rel=1e-12)
    assert abs(plain.correction[1].item()) > 5 * abs(limited.correction[1].item())
    with pytest.raises(ValueError, match="max_step_ratio"):
        AcceleratedDDIMScheduler(max_step_ratio=0)


def test_step_map_matches_scheduler(oracle, x_T):
    """The pure coefficient function reproduces the scheduler (what the parallel step maps reuse)."""
    sched = AcceleratedDDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    sched.set_timesteps(6)
    coeffs = accelerated_step_coefficients(sched.noise_schedule, sched.timesteps.tolist(), 0)
    x, prev_d = x_T[:4], None
    y = x.clone()
    for i, t in enumerate(sched.timesteps):
        a, s = sched.noise_schedule.alpha(t).item(), sched.noise_schedule.sigma(t).item()
        eps = oracle(y, t)
        x0 = (y - s * eps) / a
        d = eps if coeffs.space == "noise" else x0
        step = coeffs.alpha_next[i] * x0 + coeffs.sigma_next[i] * eps
        if prev_d is not None:
            step = step + coeffs.correction[i] * (d - prev_d)
        prev_d, y = d, step
        x = sched.step(oracle(x, t), t, x).prev_sample
    torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def grid_sample(model, schedule, timesteps, final, x, order2=True, **kw):
    """The accelerated update folded over a grid with the pure coefficient function."""
    c = accelerated_step_coefficients(schedule, timesteps, final, **kw)
    prev_d = None
    for i, t in enumerate(timesteps):
        a, s = schedule.alpha(t).item(), schedule.sigma(t).item()
        eps = model(x, t)
        x0 = (x - s * eps) / a
        d = eps if c.space == "noise" else x0
        x_next = c.alpha_next[i] * x0 + c.sigma_next[i] * eps
        if order2 and prev_d is not None:
            x_next = x_next + c.correction[i] * (d - prev_d)
        x, prev_d = x_next, d
    return x


@pytest.mark.parametrize("kw", [{}, {"solver_space": "noise", "interpolation": "alphas_cumprod"},
                                {"solver_space": "noise", "interpolation": "log_snr"}])
def test_second_order_convergence(kw):
    """Error vs the exact ODE solution falls ~4x per doubling of steps (DDIM: ~2x), on a grid that refines
    everywhere (fractional timesteps, uniform in t from 999 to 100)."""
    model = make_gaussian_mixture(dim=8, num_components=4, std_range=(0.3, 0.6), seed=3)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    exact = model.solve_ode(x, 999, 100, steps=400)
    errs, ddim = [], []
    for n in (8, 16, 32):
        grid = torch.linspace(999, 100, n + 1, dtype=torch.float64).tolist()
        errs.append(rms(grid_sample(model, model.schedule, grid[:-1], grid[-1], x, **kw), exact))
        ddim.append(rms(grid_sample(model, model.schedule, grid[:-1], grid[-1], x, order2=False), exact))
    orders = [math.log2(a / b) for a, b in zip(errs[:-1], errs[1:])]
    ddim_orders = [math.log2(a / b) for a, b in zip(ddim[:-1], ddim[1:])]
    assert min(orders) > 1.7, (errs, orders)
    assert max(ddim_orders) < 1.3, (ddim, ddim_orders)
    assert errs[-1] < ddim[-1] / 5


def test_beats_ddim_at_same_nfe(oracle):
    """Same NFE, same trailing grid: lower rms error than DDIM vs the exact ODE solution."""
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    exact = oracle.solve_ode(x, 999, 0, steps=300)
    def err(sched, n):
        return rms(sample_loop(sched, oracle, x, n), exact)

    for n, margin in ((5, 0.8), (10, 0.6)):
        ddim = err(DDIMScheduler.from_config(SD_SCHEDULER_CONFIG), n)
        ours = err(AcceleratedDDIMScheduler.from_config(SD_SCHEDULER_CONFIG), n)
        exact_score = err(AcceleratedDDIMScheduler.from_config(SD_SCHEDULER_CONFIG, max_step_ratio=None), n)
        paper = err(AcceleratedDDIMScheduler.from_config(
            SD_SCHEDULER_CONFIG, interpolation="alphas_cumprod", max_step_ratio=None), n)
        assert ours < margin * ddim and max(exact_score, paper) < 0.6 * ddim, (n, ours, exact_score, paper, ddim)


# ------------------------------------------------------------------------------------------ stochastic
def test_stochastic_noise_budget():
    """Pre- and post-evaluation noise add up to the DDPM posterior variance of every step."""
    sched = NoiseSchedule.from_config(SD_SCHEDULER_CONFIG)
    grid = [999, 700, 400, 150, 30]
    c = accelerated_step_coefficients(sched, grid, None)
    a = sched.alpha(grid).tolist() + [1.0]
    s = sched.sigma(grid).tolist() + [0.0]
    var = [s[i + 1] ** 2 - c.eps_scale[i].item() ** 2 for i in range(len(grid))]
    for i in range(len(grid)):
        pre_next = (a[i + 1] / a[i + 2]) ** 2 * var[i + 1] / 2 if i + 1 < len(grid) else 0.0
        post = var[i] if i == 0 else var[i] / 2
        assert c.noise_std[i].item() ** 2 == pytest.approx(post + pre_next, rel=1e-12, abs=1e-15)
    assert c.noise_std[-1].item() == 0.0  # lands on clean data without noise


def test_stochastic_reproducible_and_distribution(oracle):
    cfg = dict(SD_SCHEDULER_CONFIG, set_alpha_to_one=True)
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    runs = [sample_loop(AcceleratedDDIMScheduler.from_config(cfg, stochastic=True), oracle, x, 20,
                        generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    # samples land on mixture components (a 20-step DDPM is under-dispersed on components this sharp)
    dist = torch.cdist(runs[0], oracle.means)
    k = dist.argmin(1)
    spread = (dist.min(1).values / math.sqrt(64) / oracle.stds[k])
    assert 0.3 < spread.median().item() < 1.2
    assert len(set(k.tolist())) == 8  # every component is reached


def test_stochastic_variance_types():
    sched = NoiseSchedule.from_config(SD_SCHEDULER_CONFIG)
    grid = [999, 600, 200]
    small = accelerated_step_coefficients(sched, grid, None, variance="posterior")
    large = accelerated_step_coefficients(sched, grid, None, variance="beta")
    assert torch.all(large.noise_std[:-1] > small.noise_std[:-1])
    torch.testing.assert_close(large.eps_scale, small.eps_scale)  # same (posterior) mean
    ddpm_cfg = DDPMScheduler(variance_type="fixed_large").config
    assert AcceleratedDDIMScheduler.from_config(ddpm_cfg, stochastic=True).config.variance_type == "fixed_large"
    with pytest.raises(ValueError, match="variance_type"):
        AcceleratedDDIMScheduler(stochastic=True, variance_type="learned_range")


# ------------------------------------------------------------------------------------------ errors
def test_bad_arguments():
    with pytest.raises(ValueError, match="solver_space"):
        AcceleratedDDIMScheduler(solver_space="latent")
    with pytest.raises(ValueError, match="interpolation"):
        AcceleratedDDIMScheduler(interpolation="cubic")
    with pytest.raises(ValueError, match="timestep_spacing"):
        AcceleratedDDIMScheduler(timestep_spacing="karras")
    with pytest.raises(ValueError, match="prediction_type"):
        AcceleratedDDIMScheduler(prediction_type="noise")
    with pytest.raises(ValueError, match="flow"):
        AcceleratedDDIMScheduler(prediction_type="flow")
    sched = AcceleratedDDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(torch.zeros(1, 4), 999, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="exactly one"):
        sched.set_timesteps()
    with pytest.raises(ValueError, match="exactly one"):
        sched.set_timesteps(10, timesteps=[999, 500])
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(1001)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(10.5)
    with pytest.raises(TypeError, match="num_inference_steps"):
        sched.set_timesteps("10")
    with pytest.raises(ValueError, match="decreasing"):
        sched.set_timesteps(timesteps=[500, 999])
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        sched.set_timesteps(timesteps=[1000, 10])
    sched.set_timesteps(10)
    with pytest.raises(TypeError, match="model_output"):
        sched.step([torch.zeros(1, 4)], sched.timesteps[0], torch.zeros(1, 4))
    with pytest.raises(ValueError, match="shape"):
        sched.step(torch.zeros(1, 4), sched.timesteps[0], torch.zeros(1, 5))


# ------------------------------------------------------------------------------------------ issue 10 regressions
def test_saturated_schedule_and_ddim_attributes():
    """Two grid points at sigma == 1 (alphas_cumprod underflows) used to divide by zero."""
    sched = AcceleratedDDIMScheduler(beta_start=0.01, beta_end=0.2)
    sched.set_timesteps(10)
    ddim = DDIMScheduler(beta_start=0.01, beta_end=0.2)
    for name in ("betas", "alphas", "alphas_cumprod", "final_alpha_cumprod"):
        assert torch.equal(getattr(sched, name), getattr(ddim, name)), name
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps[-3:]:
        x = sched.step(0.1 * x, t, x).prev_sample
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("t", [1, 10, 49, 998])
@pytest.mark.parametrize("stochastic", [False, True])
def test_off_grid_timestep_is_ddims_step(t, stochastic):
    """Off the grid: one first-order step to DDIM's previous timestep (DDIM's own step when deterministic)."""
    cfg = dict(SD_SCHEDULER_CONFIG, clip_sample=False, timestep_spacing="leading")
    sched = AcceleratedDDIMScheduler.from_config(cfg, stochastic=stochastic)
    ddim = DDIMScheduler.from_config(cfg)
    sched.set_timesteps(50)
    ddim.set_timesteps(50)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps = torch.randn(3, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = sched.step(eps, t, x, generator=torch.Generator().manual_seed(3)).prev_sample
    if not stochastic:
        torch.testing.assert_close(out, ddim.step(eps, t, x).prev_sample, rtol=1e-5, atol=1e-6)
    else:  # a DDPM posterior step to the same point: mean as DDIM with eta = 1, finite noise
        assert torch.isfinite(out).all() and not torch.allclose(out, ddim.step(eps, t, x).prev_sample)


def test_step_counts_and_custom_float_timesteps(oracle, x_T):
    sched = AcceleratedDDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    sched.set_timesteps(7.0)  # DDIM accepts a whole float
    assert len(sched.timesteps) == 7
    sched.set_timesteps(timesteps=[999.0, 640.5, 300.25, 20.0])
    assert sched.timesteps.dtype == torch.float64 and sched.timesteps.tolist() == [999.0, 640.5, 300.25, 20.0]
    ref = AcceleratedDDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    ref.set_timesteps(timesteps=[999, 640, 300, 20])
    a = sample_loop(sched, oracle, x_T, timesteps=[999.0, 640.5, 300.25, 20.0])
    b = sample_loop(ref, oracle, x_T, timesteps=[999, 640, 300, 20])
    assert torch.isfinite(a).all() and 0 < rms(a, b) < 0.05  # fractional timesteps are used, not truncated
    offset = AcceleratedDDIMScheduler.from_config(SD_SCHEDULER_CONFIG, steps_offset=1, timestep_spacing="leading")
    with pytest.raises(ValueError, match="steps_offset"):
        offset.set_timesteps(1000)
    with pytest.raises(ValueError, match="solver_order"):
        AcceleratedDDIMScheduler(solver_order=4)
    with pytest.raises(ValueError, match="solver_order=3 needs interpolation='log_snr'"):
        AcceleratedDDIMScheduler(solver_order=3)


def test_karras_and_auto_timestep_schedules():
    from fastdiff.samplers.accelerated_ddim import karras_timesteps

    sched = AcceleratedDDIMScheduler.from_config(SD_SCHEDULER_CONFIG, timestep_schedule="karras")
    dpm = DPMSolverMultistepScheduler.from_config(SD_SCHEDULER_CONFIG, use_karras_sigmas=True)
    dpm.set_timesteps(10)
    ours = karras_timesteps(sched.noise_schedule, 10, include_last=True)
    assert np.abs(ours - dpm.timesteps.numpy()).max() <= 0.5  # diffusers rounds the same grid to integers
    sched.set_timesteps(10)  # ends at t = 0 (set_alpha_to_one=False): t = 0 is the end point, not a timestep
    assert sched.timesteps[0] == 999 and 0 < sched.timesteps[-1] < 10 and len(sched.timesteps) == 10
    auto = make_scheduler("accel_ddim_v2", {**SD_SCHEDULER_CONFIG, "timestep_spacing": "leading"})
    auto.set_timesteps(5)
    assert auto.timesteps.tolist() == [999, 799, 599, 399, 199]  # trailing below 10 steps, from the top
    auto.set_timesteps(12)
    assert auto.timesteps.dtype == torch.float64 and auto.timesteps[0] == 999 and auto.timesteps[-1] < 5
    with pytest.raises(ValueError, match="timestep_schedule"):
        AcceleratedDDIMScheduler(timestep_schedule="ays")
    with pytest.raises(ValueError, match="karras_rho"):
        AcceleratedDDIMScheduler(karras_rho=0)


# ------------------------------------------------------------------------------------------------ corrector, log-SNR grid
def reference_pc(model, schedule, timesteps, x, space, corrector_order, predictor_order=2, noise_steps=0,
                 lower_order_final=False, final_alphas_cumprod=False):
    """Independent reference of the predictor-corrector: ``d`` (eps or x0) a polynomial in log-SNR through the
    last ``predictor_order`` (predictor) / ``corrector_order`` (corrector) points by ``numpy.polyfit``, integrated in ``u = x / alpha``
    (noise) or ``x / sigma`` (data) against ``d rho`` / ``d (alpha / sigma)`` by composite Simpson on 4001 points;
    the grid ends at ``t = 0``. ``noise_steps``: the predictors of the first this many steps integrate eps (noise
    space) from the corrected sample, the correctors stay in ``space``. ``lower_order_final``: the last predictor
    holds ``d`` constant (one node); ``final_alphas_cumprod``: the last predictor fits ``d`` linearly in
    ``alpha^2 = sigmoid(lambda)`` through the last two points instead."""
    t_all = list(timesteps) + [0.0]
    a = np.array([schedule.alpha(t).item() for t in t_all])
    s = np.array([schedule.sigma(t).item() for t in t_all])
    lam = 2 * np.log(a / s)

    def integral(sp, nodes, i0, i1, ds, var=lambda v: v):
        grid = np.linspace(lam[i0], lam[i1], 4001)
        dw = -0.5 * np.exp(-grid / 2) if sp == "noise" else 0.5 * np.exp(grid / 2)
        simpson = np.ones(4001)
        simpson[1:-1:2], simpson[2:-1:2] = 4, 2
        simpson *= (grid[1] - grid[0]) / 3
        vals = np.stack([d.numpy().ravel() for d in ds])  # [k, n]
        coef = np.polyfit(var(np.array([lam[j] for j in nodes])), vals, len(nodes) - 1)  # [k, n], exact at nodes
        poly = np.stack([np.polyval(coef[:, m], var(grid)) for m in range(vals.shape[1])])
        return torch.from_numpy((poly * dw * simpson).sum(1).reshape(ds[0].shape))

    hist, prev = {"noise": [], "data": []}, None
    for i in range(len(timesteps)):
        eps = model(x, t_all[i])
        hist["noise"].append(eps)
        hist["data"].append((x - s[i] * eps) / a[i])
        if corrector_order and i >= 1:
            nodes = list(range(i, max(i - corrector_order, -1), -1))
            sc = a if space == "noise" else s
            x = sc[i] * (prev / sc[i - 1] + integral(space, nodes, i - 1, i, [hist[space][j] for j in nodes]))
        sp = "noise" if i < noise_steps else space
        sc = a if sp == "noise" else s
        last = i == len(timesteps) - 1
        k = 1 if lower_order_final and last else 2 if final_alphas_cumprod and last else predictor_order
        nodes = list(range(i, max(i - k, -1), -1))
        var = (lambda v: 1 / (1 + np.exp(-v))) if final_alphas_cumprod and last else (lambda v: v)
        prev = x
        x = sc[i + 1] * (x / sc[i] + integral(sp, nodes, i, i + 1, [hist[sp][j] for j in nodes], var))
    return x


@pytest.mark.parametrize("space", ["noise", "data"])
@pytest.mark.parametrize("solver_order,corrector_order", [(2, 0), (2, 2), (2, 3), (3, 0), (3, 3), (3, 4)])
def test_corrector_matches_independent_reference(space, solver_order, corrector_order):
    model = make_gaussian_mixture(dim=6, num_components=3, std_range=(0.2, 0.5), seed=5)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sched = AcceleratedDDIMScheduler.from_config(SD_SCHEDULER_CONFIG, solver_space=space, interpolation="log_snr",
                                                 solver_order=solver_order, corrector_order=corrector_order,
                                                 timestep_schedule="log_snr")
    ours = sample_loop(sched, model, x, 7)
    ref = reference_pc(model, model.schedule, sched.timesteps.tolist(), x, space, corrector_order, solver_order)
    assert rms(ours, ref) < 1e-7 * rms(ref, 0 * ref), rms(ours, ref)
    if corrector_order:  # the corrector changes the result (the test can fail)
        plain = sample_loop(AcceleratedDDIMScheduler.from_config(sched.config, corrector_order=0), model, x, 7)
        assert rms(plain, ours) > 1e-4


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("noise_steps,solver_order", [(1, 2), (2, 2), (3, 2), (2, 3)])
def test_noise_space_steps_match_independent_reference(noise_steps, solver_order, prediction_type):
    """``noise_space_steps``: eps-space predictors for the first steps, data-space correctors throughout."""
    cfg = dict(SD_SCHEDULER_CONFIG, prediction_type=prediction_type)
    model = make_gaussian_mixture(dim=6, num_components=3, std_range=(0.2, 0.5), seed=5,
                                  prediction_type=prediction_type)
    eps_model = make_gaussian_mixture(dim=6, num_components=3, std_range=(0.2, 0.5), seed=5)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sched = AcceleratedDDIMScheduler.from_config(cfg, solver_space="data", interpolation="log_snr",
                                                 solver_order=solver_order, corrector_order=3,
                                                 timestep_schedule="log_snr", noise_space_steps=noise_steps)
    ours = sample_loop(sched, model, x, 8)
    ref = reference_pc(eps_model, model.schedule, sched.timesteps.tolist(), x, "data", 3, solver_order, noise_steps)
    assert rms(ours, ref) < 1e-7 * rms(ref, 0 * ref), rms(ours, ref)
    plain = sample_loop(AcceleratedDDIMScheduler.from_config(sched.config, noise_space_steps=0), model, x, 8)
    if noise_steps == 1:  # a first-order (DDIM) first step is the same in both spaces
        assert rms(plain, ours) < 1e-12
    else:  # the option changes the result (the test can fail)
        assert rms(plain, ours) > 1e-5


def _regime_against_reference(solver_order, regime, steps, **reference_kw):
    """The data-space log-SNR predictor-corrector with ``regime`` from 8 steps, sampled for ``steps`` on a small
    mixture, with the independent reference with ``reference_kw`` and without them: ``(sched, ours, ref, full)``."""
    model = make_gaussian_mixture(dim=6, num_components=3, std_range=(0.2, 0.5), seed=5)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sched = AcceleratedDDIMScheduler.from_config(SD_SCHEDULER_CONFIG, solver_space="data", interpolation="log_snr",
                                                 solver_order=solver_order, corrector_order=3,
                                                 timestep_schedule="log_snr", step_regimes=[[8, regime]])
    ours = sample_loop(sched, model, x, steps)
    ts = sched.timesteps.tolist()
    ref = reference_pc(model, model.schedule, ts, x, "data", 3, solver_order, **reference_kw)
    return sched, ours, ref, reference_pc(model, model.schedule, ts, x, "data", 3, solver_order)


@pytest.mark.parametrize("solver_order", [2, 3])
def test_lower_order_final_regime_matches_independent_reference(solver_order):
    """``lower_order_final`` as a step-regime setting (the default's 8-14-step regime): the last predictor is DDIM's,
    the corrector before it unchanged; other step counts keep the config's value."""
    sched, ours, ref, full = _regime_against_reference(solver_order, {"lower_order_final": True}, 8,
                                                       lower_order_final=True)
    assert rms(ours, ref) < 1e-7 * rms(ref, 0 * ref), rms(ours, ref)
    assert rms(full, ref) > 1e-4  # the option changes the result (the test can fail)
    assert sched.settings_for(8)["lower_order_final"] and not sched.settings_for(7)["lower_order_final"]
    sched.set_timesteps(7)
    assert sched.coefficients.weights[-1].abs().sum() > 0  # below the regime the last step stays second order
    with pytest.raises(ValueError, match="lower_order_final"):
        AcceleratedDDIMScheduler(step_regimes=[[8, {"lower_order_final": 1}]])


@pytest.mark.parametrize("solver_order", [2, 3])
def test_final_interpolation_matches_independent_reference(solver_order):
    """``final_interpolation="alphas_cumprod"`` (the default's 8-14-step regime): the last predictor extrapolates x0
    linearly in alpha^2 through the last two points; every other step and the correctors are unchanged."""
    sched, ours, ref, full = _regime_against_reference(solver_order, {"final_interpolation": "alphas_cumprod"}, 9,
                                                       final_alphas_cumprod=True)
    assert rms(ours, ref) < 1e-7 * rms(ref, 0 * ref), rms(ours, ref)
    assert rms(full, ref) > 1e-5  # the option changes the result (the test can fail)
    assert sched.settings_for(9)["final_interpolation"] == "alphas_cumprod"
    assert sched.settings_for(7)["final_interpolation"] is None
    for bad in ("alpha", 1):
        with pytest.raises(ValueError, match="final_interpolation"):
            AcceleratedDDIMScheduler(final_interpolation=bad)


def test_evaluate_at_zero_on_a_clean_data_end():
    """``evaluate_at_zero=False`` (the default's regime from 8 steps): on a clean-data end the log-SNR / Karras grid
    stops one level above t = 0 (the first n of the n + 1 levels to t = 0); other ends and grids are unchanged."""
    from fastdiff.samplers.accelerated_ddim import log_snr_timesteps

    clean = {**SD_SCHEDULER_CONFIG, "set_alpha_to_one": True}
    for schedule in ("log_snr", "karras"):
        at_zero = AcceleratedDDIMScheduler.from_config(clean, timestep_schedule=schedule)
        above = AcceleratedDDIMScheduler.from_config(clean, timestep_schedule=schedule,
                                                     step_regimes=[[8, {"evaluate_at_zero": False}]])
        for n, expect_zero in ((7, True), (10, False)):
            at_zero.set_timesteps(n)
            above.set_timesteps(n)
            assert at_zero.timesteps[-1] == 0 and len(above.timesteps) == n
            assert (above.timesteps[-1] == 0) == expect_zero, (schedule, n)
        if schedule == "log_snr":
            ref = log_snr_timesteps(above.noise_schedule, 10, include_last=False)  # n + 1 levels, t = 0 dropped
            np.testing.assert_allclose(above.timesteps.numpy(), ref)
            lam = above.noise_schedule.log_snr(torch.tensor([*ref, 0.0], dtype=torch.float64))
            torch.testing.assert_close(lam.diff(), lam.diff().mean().expand(10), rtol=2e-2, atol=0)
    # an alphas_cumprod[0] end (set_alpha_to_one=False): t = 0 is never a timestep, the option changes nothing
    a = AcceleratedDDIMScheduler.from_config(SD_SCHEDULER_CONFIG, timestep_schedule="log_snr")
    b = AcceleratedDDIMScheduler.from_config(SD_SCHEDULER_CONFIG, timestep_schedule="log_snr", evaluate_at_zero=False)
    a.set_timesteps(10)
    b.set_timesteps(10)
    assert torch.equal(a.timesteps, b.timesteps)
    default = make_scheduler("accel_ddim", clean)
    default.set_timesteps(10)
    assert default.timesteps[-1] > 0
    default.set_timesteps(5)  # below 8 steps: v2's trailing grid
    assert default.timesteps.tolist() == [999, 799, 599, 399, 199]
    with pytest.raises(ValueError, match="evaluate_at_zero"):
        AcceleratedDDIMScheduler(evaluate_at_zero=0)


def test_noise_space_steps_bad_arguments_and_regime():
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="noise_space_steps"):
            AcceleratedDDIMScheduler(solver_space="data", noise_space_steps=bad)
    with pytest.raises(ValueError, match="noise_space_steps"):
        AcceleratedDDIMScheduler(solver_space="noise", noise_space_steps=2)
    with pytest.raises(ValueError, match="noise_space_steps"):
        AcceleratedDDIMScheduler(step_regimes=[[8, {"solver_space": "noise", "noise_space_steps": 1}]])
    coef = accelerated_step_coefficients(NoiseSchedule.from_config(SD_SCHEDULER_CONFIG), [999.0, 600.0, 300.0], 0,
                                         solver_space="data", interpolation="log_snr", corrector_order=3,
                                         noise_space_steps=1)
    with pytest.raises(ValueError, match="linear_form"):
        coef.linear_form()
    sched = AcceleratedDDIMScheduler(solver_space="data", interpolation="log_snr", corrector_order=3,
                                     step_regimes=[[8, {"noise_space_steps": 2}]])
    sched.set_timesteps(8)
    assert sched.coefficients.noise_rows == 2
    sched.set_timesteps(7)
    assert sched.coefficients.noise_rows == 0


def linear_form_sample(model, schedule, timesteps, final, x, **kw):
    """Fold ``x_{i+1} = sum_j b[i, j] x0_{i-j} + c[i, j] eps_{i-j}`` (``StepCoefficients.linear_form``)."""
    b, c = accelerated_step_coefficients(schedule, timesteps, final, **kw).linear_form()
    x0s, epss = [], []
    for i, t in enumerate(timesteps):
        a, s = schedule.alpha(t).item(), schedule.sigma(t).item()
        eps = model(x, t)
        x0s.insert(0, (x - s * eps) / a)
        epss.insert(0, eps)
        x = sum(b[i, j] * x0s[j] + c[i, j] * epss[j] for j in range(min(len(x0s), b.shape[1])))
    return x


def test_linear_form_equals_scheduler_and_step_map():
    from fastdiff.samplers.steps import draw_noise, sample_sequential, step_map_for

    model = make_gaussian_mixture(dim=6, num_components=3, std_range=(0.2, 0.5), seed=5)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for kw in ({"solver_space": "data", "interpolation": "log_snr", "corrector_order": 3},
               {"solver_space": "data", "interpolation": "log_snr", "solver_order": 3, "corrector_order": 4},
               {"solver_space": "noise", "corrector_order": 2}, {"clip_sample": True, "corrector_order": 3}):
        sched = AcceleratedDDIMScheduler.from_config(SD_SCHEDULER_CONFIG, timestep_schedule="log_snr", **kw)
        ref = sample_loop(sched, model, x, 8)
        sm = step_map_for(sched)
        mapped = sample_sequential(sm, model, x, draw_noise(sm, tuple(x.shape), torch.Generator(), dtype=x.dtype))
        assert rms(mapped, ref) < 1e-7, kw
        if not kw.get("clip_sample"):
            coef_kw = {k: v for k, v in kw.items()}
            folded = linear_form_sample(model, model.schedule, sched.timesteps.tolist(), 0, x, **coef_kw)
            assert rms(folded, ref) < 1e-7, kw


def test_corrector_raises_the_order():
    """On a grid that refines everywhere, the order-3 corrector on the log-SNR data-space update converges at
    order >= 3 (without it: 2.4-2.9 on this grid)."""
    model = make_gaussian_mixture(dim=8, num_components=4, std_range=(0.3, 0.6), seed=3)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    exact = model.solve_ode(x, 999, 100, steps=400)
    orders, last = {}, {}
    for k in (0, 3):
        errs = []
        for n in (8, 16, 32):
            grid = torch.linspace(999, 100, n + 1, dtype=torch.float64).tolist()
            errs.append(rms(linear_form_sample(model, model.schedule, grid[:-1], grid[-1], x, solver_space="data",
                                               interpolation="log_snr", corrector_order=k), exact))
        orders[k], last[k] = [math.log2(a / b) for a, b in zip(errs[:-1], errs[1:])], errs[-1]
    assert min(orders[3]) > 3.0 and min(orders[3]) > min(orders[0]) + 0.5 and last[3] < last[0] / 2, (orders, last)


def test_few_step_default_and_log_snr_grid():
    from fastdiff.samplers.accelerated_ddim import FEW_STEP_REGIMES, FEW_STEP_SETTINGS, LOW_STEP_ORDER3

    config = {**SD_SCHEDULER_CONFIG, "timestep_spacing": "leading"}
    sched = make_scheduler("accel_ddim", config)
    assert all(sched.config[k] == v for k, v in FEW_STEP_SETTINGS.items())
    sched.set_timesteps(20)
    t = sched.timesteps.tolist() + [0.0]
    lam = sched.noise_schedule.log_snr(torch.tensor(t, dtype=torch.float64))
    assert t[0] == 999 and len(t) == 21 and sched.coefficients.space == "data"
    # uniform in log-SNR (up to mapping levels to timesteps by interpolating log(sigma / alpha) between integers)
    # (at 20 steps the last level falls between t = 0 and t = 1: 3 % there)
    torch.testing.assert_close(lam.diff(), lam.diff().mean().expand(20), rtol=4e-2, atol=0)
    torch.testing.assert_close(lam.diff()[:15], lam.diff().mean().expand(15), rtol=5e-3, atol=0)
    assert sched.coefficients.predictor is not None and sched.coefficients.corrector is not None  # 3rd order + C
    # 8-14 steps: the log-SNR grid warped to power 0.9 (levels lam_top + u^0.9 (lam_end - lam_top))
    sched.set_timesteps(10)
    lam = sched.noise_schedule.log_snr(torch.tensor(sched.timesteps.tolist() + [0.0], dtype=torch.float64))
    u = torch.linspace(0, 1, 11, dtype=torch.float64) ** 0.9
    torch.testing.assert_close(lam, lam[0] + u * (lam[-1] - lam[0]), rtol=0, atol=2e-2)
    assert sched.coefficients.predictor is None and sched.coefficients.corrector is not None
    # each regime is exactly the scheduler configured with its settings
    model = make_gaussian_mixture(dim=6, num_components=3, std_range=(0.2, 0.5), seed=5)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for n, (_, settings) in zip((5, 9, 16), FEW_STEP_REGIMES):
        plain = AcceleratedDDIMScheduler.from_config(config, **{"timestep_schedule": "log_snr", **settings})
        torch.testing.assert_close(sample_loop(sched, model, x, n), sample_loop(plain, model, x, n), rtol=0, atol=0)
        assert sched.timesteps.tolist() == plain.timesteps.tolist()
        assert sched.settings_for(n) == plain.settings_for(n)
    assert sched.coefficients.space == "data" and sched.settings_for(5)["solver_space"] == "noise"
    # custom timesteps take the update of their count (below 8: v2's, no corrector)
    sched.set_timesteps(timesteps=[999, 600, 300, 100, 20])
    assert sched.coefficients.space == "noise" and sched.coefficients.corrector is None
    sched.set_timesteps(timesteps=[999, 800, 600, 450, 300, 200, 120, 60, 20])
    assert sched.coefficients.space == "data" and sched.coefficients.corrector is not None
    # below 8 steps the default and v3 are v2's sampler, step for step (chosen on the trained digits model)
    for name in ("accel_ddim", "accel_ddim_v3"):
        for n in (5, 7):
            other, v2 = make_scheduler(name, config), make_scheduler("accel_ddim_v2", config)
            torch.testing.assert_close(sample_loop(other, model, x, n), sample_loop(v2, model, x, n), rtol=0, atol=0)
            assert other.timesteps.tolist() == v2.timesteps.tolist() and other.coefficients.corrector is None
    # the dev mixtures' 1-7-step choice stays reachable as a named regime
    order3 = AcceleratedDDIMScheduler.from_config(config, **{**FEW_STEP_SETTINGS,
                                                             "step_regimes": [[1, LOW_STEP_ORDER3]]})
    order3.set_timesteps(5)
    assert order3.coefficients.space == "noise" and order3.coefficients.predictor is not None
    with pytest.raises(ValueError, match="low_step_switch"):
        AcceleratedDDIMScheduler(low_step_switch=-1)
    clean = AcceleratedDDIMScheduler.from_config({**SD_SCHEDULER_CONFIG, "set_alpha_to_one": True},
                                                 timestep_schedule="log_snr")
    clean.set_timesteps(6)  # ends at clean data: t = 0 is the last timestep
    assert clean.timesteps[0] == 999 and clean.timesteps[-1] == 0 and len(clean.timesteps) == 6
    for bad in (1, 5, True):
        with pytest.raises(ValueError, match="corrector_order"):
            AcceleratedDDIMScheduler(corrector_order=bad)


@pytest.mark.parametrize("regimes,match", [
    ("x", "step_regimes must be None or a list"), ([[1]], "the entry"), ([[0, {}]], "min_steps"),
    ([[3, {}], [3, {}]], "strictly increasing"), ([[1, {"eta": 1}]], "unknown settings"),
    ([[1, {"solver_order": 3}]], "solver_order=3 needs"), ([[1, {"log_snr_power": 0}]], "log_snr_power"),
    ([[1, {"solver_space": "x"}]], "solver_space")])
def test_step_regimes_bad_arguments(regimes, match):
    with pytest.raises(ValueError, match=match):
        AcceleratedDDIMScheduler(step_regimes=regimes)


def test_step_regimes_round_trip(tmp_path):
    sched = make_scheduler("accel_ddim", SD_SCHEDULER_CONFIG)
    sched.save_config(tmp_path)
    again = AcceleratedDDIMScheduler.from_pretrained(tmp_path)
    for n in (5, 10, 20):
        sched.set_timesteps(n)
        again.set_timesteps(n)
        assert torch.equal(sched.timesteps, again.timesteps)
        torch.testing.assert_close(sched.coefficients.linear_form(), again.coefficients.linear_form(), rtol=0, atol=0)


def test_broken_history_skips_the_corrector():
    """Repeating a step (a broken history) must not apply a corrector built for the consecutive grid."""
    model = make_gaussian_mixture(dim=6, num_components=3, std_range=(0.2, 0.5), seed=5)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sched = AcceleratedDDIMScheduler.from_config(SD_SCHEDULER_CONFIG, corrector_order=3, timestep_schedule="log_snr")
    sched.set_timesteps(6)
    ts = sched.timesteps
    plain = AcceleratedDDIMScheduler.from_config(sched.config, corrector_order=0, solver_order=1)
    plain.set_timesteps(6)
    sched.step(model(x, ts[1]), ts[1], x)  # step 1 first: no history behind it
    ours = sched.step(model(x, ts[1]), ts[1], x).prev_sample  # step 1 again: history (1, 1) is not (1, 0)
    first = plain.step(model(x, ts[1]), ts[1], x).prev_sample
    torch.testing.assert_close(ours, first)
