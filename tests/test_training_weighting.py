"""Min-SNR weights against the paper's formulas and diffusers, zero terminal SNR, timestep samplers."""

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_snr

from fastdiff.schedule import NoiseSchedule
from fastdiff.testing import ddpm_beta_schedules
from fastdiff.training import WEIGHTINGS, diffusion_loss, loss_weight, min_snr_weight, sample_timesteps
from fastdiff.training.weighting import sample_unit_times

GAMMA = 5.0


def paper_min_snr(snr: torch.Tensor, prediction_type: str, gamma: float = GAMMA) -> torch.Tensor:
    """Hang et al. 2023: x0 min(SNR, g); eps min(SNR, g)/SNR; v min(SNR, g)/(SNR + 1)."""
    clipped = torch.clamp(snr, max=gamma)
    return {"sample": clipped, "epsilon": clipped / snr, "v_prediction": clipped / (snr + 1)}[prediction_type]


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_matches_paper_and_diffusers_compute_snr(beta_schedule, prediction_type):
    scheduler = DDPMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type)
    t = torch.arange(scheduler.config.num_train_timesteps)
    snr_schedule = NoiseSchedule.from_config(scheduler).snr(t)
    snr_diffusers = compute_snr(scheduler, t).double()  # float32 inside diffusers
    torch.testing.assert_close(snr_schedule, snr_diffusers, rtol=1e-3, atol=0)  # diffusers: float32 at SNR ~1e4
    w = loss_weight(t, scheduler, "min_snr", GAMMA)
    torch.testing.assert_close(w, paper_min_snr(snr_schedule, prediction_type), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w, paper_min_snr(snr_diffusers, prediction_type), rtol=1e-3, atol=0)
    torch.testing.assert_close(min_snr_weight(t, scheduler.config, GAMMA), w)


def test_min_snr_rectified_flow_velocity():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    t = torch.linspace(0, 1000, 101)
    s = t.double() / 1000
    w = loss_weight(t, scheduler, "min_snr", GAMMA)
    torch.testing.assert_close(w, torch.minimum((1 - s) ** 2, GAMMA * s**2))  # anchors: min((1-t)^2, g t^2)
    snr = ((1 - s) / s) ** 2
    inner = slice(1, -1)  # the paper form divides by zero at both ends
    torch.testing.assert_close(w[inner], (torch.clamp(snr, max=GAMMA) * s**2)[inner])
    assert torch.isfinite(loss_weight(t, scheduler, "min_snr", GAMMA, "epsilon")).all()
    assert torch.isfinite(loss_weight(t, scheduler, "min_snr", GAMMA, "sample")).all()


@pytest.mark.parametrize("weighting", ["min_snr", "soft_min_snr", "none"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_zero_terminal_snr_is_finite_and_takes_the_limit(weighting, prediction_type):
    scheduler = DDPMScheduler(rescale_betas_zero_snr=True, prediction_type=prediction_type)
    t = torch.arange(1000)
    assert NoiseSchedule.from_config(scheduler).snr(999).item() == 0.0
    w = loss_weight(t, scheduler, weighting, GAMMA)
    assert torch.isfinite(w).all()
    if weighting == "min_snr":
        expected_last = {"epsilon": 1.0, "v_prediction": 0.0, "sample": 0.0}[prediction_type]  # lim snr -> 0
        assert w[-1].item() == expected_last
        assert torch.isnan(paper_min_snr(torch.tensor([0.0]), "epsilon")).all()  # the naive form's 0/0
    x = torch.randn(4, 3, 8, 8)
    loss = diffusion_loss(x, torch.zeros_like(x), torch.tensor([0, 500, 998, 999]), scheduler, weighting)
    assert torch.isfinite(loss)


def test_soft_min_snr_is_harmonic_mean_form():
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    t = torch.arange(0, 1000, 7)
    snr = NoiseSchedule.from_config(scheduler).snr(t)
    x0_weight = loss_weight(t, scheduler, "soft_min_snr", GAMMA, "sample")
    torch.testing.assert_close(x0_weight, snr * GAMMA / (snr + GAMMA))
    torch.testing.assert_close(loss_weight(t, scheduler, "soft_min_snr", GAMMA, "epsilon"), x0_weight / snr)


def test_diffusion_loss_equals_weighted_mse():
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    out, target = torch.randn(5, 2, 4, 4), torch.randn(5, 2, 4, 4)
    t = torch.tensor([0, 10, 200, 700, 999])
    per_sample = (out - target).pow(2).mean((1, 2, 3))
    w = paper_min_snr(NoiseSchedule.from_config(scheduler).snr(t), "v_prediction").float()
    torch.testing.assert_close(diffusion_loss(out, target, t, scheduler), (w * per_sample).mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(diffusion_loss(out, target, t, scheduler, "none"), per_sample.mean())
    torch.testing.assert_close(diffusion_loss(out, target, t, scheduler, reduction="none"), w * per_sample,
                               rtol=1e-5, atol=0)


def test_unknown_weighting_and_bad_arguments_raise():
    scheduler = DDPMScheduler()
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match=r"weighting must be one of .*min_snr"):
        diffusion_loss(x, x, torch.tensor([1, 2]), scheduler, weighting="max_snr")
    assert set(WEIGHTINGS) >= {"none", "min_snr"}
    with pytest.raises(ValueError, match="gamma"):
        loss_weight(torch.tensor([1]), scheduler, gamma=0)
    with pytest.raises(ValueError, match="shape"):
        diffusion_loss(x, x[:1], torch.tensor([1, 2]), scheduler)
    with pytest.raises(ValueError, match="timestep sampler"):
        sample_timesteps(4, scheduler, "lognormal")


@pytest.mark.parametrize("sampler, kwargs", [("uniform", {}), ("logit_normal", {"logit_mean": 0.3, "logit_std": 1.2}),
                                             ("mode", {"mode_scale": 1.29})])
def test_unit_time_samplers_match_diffusers(sampler, kwargs):
    ours = sample_unit_times(1000, sampler, generator=torch.Generator().manual_seed(0), **kwargs)
    theirs = compute_density_for_timestep_sampling(sampler, 1000, generator=torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(ours, theirs)


def test_sample_timesteps_vp_and_flow():
    gen = torch.Generator().manual_seed(0)
    t = sample_timesteps(20_000, DDPMScheduler(), generator=gen)
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    assert abs(t.float().mean().item() - 499.5) < 10
    flow = sample_timesteps(1000, FlowMatchEulerDiscreteScheduler(shift=3.0), "logit_normal", generator=gen)
    assert flow.dtype == torch.float32 and 0 <= flow.min() and flow.max() <= 1000
    assert flow.mean() > 500  # shift 3 moves mass to high noise
    assert math.isclose(loss_weight(torch.tensor([500.0]), NoiseSchedule("flow"), "min_snr", GAMMA).item(),
                        min(0.25, GAMMA * 0.25))


@pytest.mark.parametrize("beta_schedule", [b for b in ddpm_beta_schedules() if b in ("laplace", "sigmoid")])
def test_diffusion_loss_with_any_diffusers_beta_schedule(beta_schedule):
    """issue 17 item 14: the weights come from the scheduler's own alphas_cumprod (diffusers' compute_snr)."""
    scheduler = DDPMScheduler(beta_schedule=beta_schedule)
    out, target = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3)
    t = torch.tensor([0, 100, 600, 999])
    w = paper_min_snr(compute_snr(scheduler, t).double(), "epsilon").float()
    per_sample = (out - target).pow(2).mean((1, 2, 3))
    torch.testing.assert_close(diffusion_loss(out, target, t, scheduler), (w * per_sample).mean(), rtol=1e-4, atol=0)
    torch.testing.assert_close(diffusion_loss(out, target, t, scheduler.config), (w * per_sample).mean(), rtol=1e-4,
                               atol=0)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_diffusion_loss_names_bad_arguments(weighting):
    """issue 17 item 13: clear errors, also where weighting="none" would not use the argument."""
    scheduler = DDPMScheduler()
    x, t = torch.zeros(2, 1, 2, 2), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"prediction_type must be one of .*'score'"):
        diffusion_loss(x, x, t, scheduler, weighting, prediction_type="score")
    with pytest.raises(ValueError, match=r"model_output must have a batch dimension .*got shape \(2,\)"):
        diffusion_loss(torch.zeros(2), torch.zeros(2), t, scheduler, weighting)
    with pytest.raises(ValueError, match=r"target must have a batch dimension"):
        diffusion_loss(x, torch.zeros(2), t, scheduler, weighting)
    with pytest.raises(TypeError, match="model_output must be a floating-point tensor"):
        diffusion_loss([0.0, 1.0], x, t, scheduler, weighting)
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        diffusion_loss(x, x, t, scheduler, weighting, gamma=True)
    with pytest.raises(ValueError, match="reduction"):
        diffusion_loss(x, x, t, scheduler, weighting, reduction="sum")
    assert diffusion_loss(x, x, t, scheduler, weighting, prediction_type="v_prediction").item() == 0.0
