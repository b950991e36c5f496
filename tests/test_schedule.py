import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    ScoreSdeVeScheduler,
    UniPCMultistepScheduler,
)
from hypothesis import given
from hypothesis import strategies as st

from fastdiff.schedule import NoiseSchedule, add_noise, prediction_target, x0_and_eps
from fastdiff.testing import ddpm_beta_schedules

BETA_SCHEDULES = ddpm_beta_schedules()

vp_configs = st.fixed_dictionaries(
    {
        "num_train_timesteps": st.integers(10, 1000),
        "beta_schedule": st.sampled_from(BETA_SCHEDULES),
        "beta_start": st.floats(1e-5, 1e-3),
        "beta_end": st.floats(5e-3, 3e-2),
        "rescale_betas_zero_snr": st.booleans(),
    }
)


@given(cfg=vp_configs, cls=st.sampled_from([DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler]))
def test_alphas_cumprod_match_diffusers(cfg, cls):
    if cls is not DDPMScheduler and cfg["beta_schedule"] in ("sigmoid", "laplace"):
        cfg = {**cfg, "beta_schedule": "linear"}  # only DDPM implements sigmoid and laplace betas
    sched = cls(**cfg)
    ours = NoiseSchedule.from_config(sched.config)
    theirs = sched.alphas_cumprod.double()
    assert ours.num_train_timesteps == cfg["num_train_timesteps"]
    # diffusers works in float32; the zero-SNR rescale subtracts sqrt(alpha_bar_T) and so turns
    # float32 rounding into a large relative error where alpha_bar is small. Compare in the alpha
    # (sqrt) domain, where that rescale is affine and the error stays at float32 scale.
    # Some schedulers (DPM-Solver) also clamp the terminal alpha_bar to 2**-24 to avoid an infinite
    # log-SNR; we keep the exact 0 and check that entry separately.
    t = torch.arange(cfg["num_train_timesteps"])
    if cfg["rescale_betas_zero_snr"]:
        assert ours.alphas_cumprod[-1] == 0 and theirs[-1] <= 2**-24
        # The rescale divides by sqrt(a_0) - sqrt(a_T): float32 rounding grows by that factor.
        raw = NoiseSchedule.from_config({**cfg, "rescale_betas_zero_snr": False}).alphas_cumprod.sqrt()
        amplification = float(raw[0] / (raw[0] - raw[-1]))
        ours_a, theirs_a = ours.alpha(t)[:-1], theirs[:-1].sqrt()
        tol = dict(rtol=2e-5, atol=5e-7 * amplification)
    else:
        ours_a, theirs_a, tol = ours.alpha(t), theirs.sqrt(), dict(rtol=1e-5, atol=1e-7)
    assert torch.allclose(ours_a, theirs_a, **tol)
    assert torch.allclose(ours.alphas_cumprod.sqrt(), ours.alpha(t), rtol=1e-12, atol=0)
    assert torch.allclose(ours.alpha(t) ** 2 + ours.sigma(t) ** 2, torch.ones_like(theirs))


@given(cfg=vp_configs, frac=st.floats(0, 1))
def test_continuous_time_is_monotone_and_interpolates(cfg, frac):
    sched = NoiseSchedule.from_config(cfg)
    n = sched.num_train_timesteps
    t = torch.linspace(0, n - 1, 3 * n, dtype=torch.float64)
    a = sched.alpha(t)
    assert torch.all(a[1:] <= a[:-1] + 1e-12)
    lo = int(frac * (n - 2))
    mid = sched.alpha_cumprod(lo + 0.5)
    assert torch.isclose(mid, (sched.alphas_cumprod[lo] + sched.alphas_cumprod[lo + 1]) / 2)


def test_snr_and_log_snr_against_diffusers_compute_snr():
    from diffusers.training_utils import compute_snr

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 10, 500, 999])
    ours = NoiseSchedule.from_config(sched)
    assert torch.allclose(ours.snr(t), compute_snr(sched, t).double(), rtol=1e-4)
    assert torch.allclose(ours.log_snr(t), ours.snr(t).log())
    sigmas_euler = EulerDiscreteScheduler.from_config(sched.config).sigmas  # descending sigma_bar + 0
    assert torch.allclose(ours.sigma_bar(999), sigmas_euler[0].double(), rtol=1e-4)


def test_zero_terminal_snr_is_finite_where_it_should_be():
    sched = NoiseSchedule.from_config(DDIMScheduler(rescale_betas_zero_snr=True).config)
    assert sched.alpha(999).item() == 0 and sched.sigma(999).item() == 1
    assert sched.snr(999).item() == 0 and sched.log_snr(999).item() == -math.inf
    t = torch.linspace(0, 998.9, 50)
    assert torch.isfinite(sched.log_snr(t)).all()


def test_flow_matching_schedule():
    sched = NoiseSchedule.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert sched.kind == "flow" and sched.shift == 3.0
    t = torch.tensor([0.0, 250.0, 1000.0])
    assert torch.allclose(sched.sigma(t), t.double() / 1000)
    assert torch.allclose(sched.alpha(t), 1 - t.double() / 1000)
    diffusers_sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    unshifted = torch.linspace(1, 1 / 1000, 1000, dtype=torch.float64)
    assert torch.allclose(sched.shift_sigmas(unshifted), diffusers_sched.sigmas.double(), atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "flow"])
def test_prediction_type_round_trip(prediction_type):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    sched = NoiseSchedule.from_config({"beta_schedule": "linear"})
    if prediction_type == "flow":
        sched = NoiseSchedule("flow")
    t = torch.tensor([3.0, 400.0, 990.0])
    alpha, sigma = sched.alpha(t), sched.sigma(t)
    xt = add_noise(x0, noise, alpha, sigma)
    out = prediction_target(x0, noise, alpha, sigma, prediction_type)
    x0_hat, eps_hat = x0_and_eps(out, xt, alpha, sigma, prediction_type)
    assert torch.allclose(x0_hat, x0, atol=1e-8) and torch.allclose(eps_hat, noise, atol=1e-8)


def test_v_prediction_matches_diffusers_get_velocity():
    sched = DDPMScheduler()
    x0, noise = torch.randn(4, 3), torch.randn(4, 3)
    t = torch.tensor([1, 100, 500, 999])
    ours = NoiseSchedule.from_config(sched)
    v = prediction_target(x0.double(), noise.double(), ours.alpha(t), ours.sigma(t), "v_prediction")
    assert torch.allclose(v.float(), sched.get_velocity(x0, noise, t), atol=1e-5)
    assert torch.allclose(add_noise(x0.double(), noise.double(), ours.alpha(t), ours.sigma(t)).float(),
                          sched.add_noise(x0, noise, t), atol=1e-5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="beta_schedule .cubic. is not implemented by diffusers. DDPMScheduler"):
        NoiseSchedule.from_config({"beta_schedule": "cubic"})
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        x0_and_eps(torch.zeros(1), torch.zeros(1), 1.0, 0.0, "score")
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\]"):
        NoiseSchedule.from_config({}).alpha(1000)
    with pytest.raises(ValueError, match="kind must be one of"):
        NoiseSchedule("ve")
    with pytest.raises(TypeError, match="diffusers scheduler or its config"):
        NoiseSchedule.from_config(42)


# every schedule diffusers implements, read from the scheduler (issue 17, item 14)
EVERY_SCHEDULE = {
    **{name: {"beta_schedule": name} for name in BETA_SCHEDULES},
    "trained_betas": {"trained_betas": torch.linspace(1e-3, 0.05, 50).tolist(), "num_train_timesteps": 50},
    "linear_zero_snr": {"rescale_betas_zero_snr": True},
    **({"laplace_zero_snr": {"beta_schedule": "laplace", "rescale_betas_zero_snr": True}}
       if "laplace" in BETA_SCHEDULES else {}),
}


@pytest.mark.parametrize("name", sorted(EVERY_SCHEDULE))
def test_every_diffusers_beta_schedule_is_the_schedulers_own(name):
    cfg = {"num_train_timesteps": 200, **EVERY_SCHEDULE[name]}
    sched = DDPMScheduler(**cfg)
    expected = sched.alphas_cumprod.double()
    for source in (sched, sched.config, dict(sched.config), cfg):  # instance, FrozenDict, dicts
        ours = NoiseSchedule.from_config(source)
        assert ours.kind == "vp" and torch.equal(ours.alphas_cumprod, expected), type(source)
    # other scheduler classes: read from the instance (their own alphas_cumprod, clamps included)
    for cls in (DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler):
        if "sigmoid" in name or "laplace" in name:
            continue  # only DDPM implements sigmoid and laplace betas
        other = cls(**cfg)
        assert torch.equal(NoiseSchedule.from_config(other).alphas_cumprod, other.alphas_cumprod.double()), cls


def test_the_scheduler_instance_is_the_source_of_truth():
    sched = DDIMScheduler()
    sched.alphas_cumprod = sched.alphas_cumprod**1.5  # a schedule no config describes
    assert torch.equal(NoiseSchedule.from_config(sched).alphas_cumprod, sched.alphas_cumprod.double())
    # DPM-Solver clamps the zero-SNR terminal alpha_bar to 2**-24; a config naming its class gets the clamp too,
    # a config without a class name is read as the DDPM family's reference (exact 0)
    dpm = DPMSolverMultistepScheduler(rescale_betas_zero_snr=True)
    assert NoiseSchedule.from_config(dpm).alphas_cumprod[-1] == 2**-24
    named = {**dpm.config, "_class_name": "DPMSolverMultistepScheduler"}
    assert NoiseSchedule.from_config(named).alphas_cumprod[-1] == 2**-24
    assert NoiseSchedule.from_config(dict(dpm.config)).alphas_cumprod[-1] == 0
    # a saved config of a non-scheduler or fastdiff class falls back to DDPMScheduler
    other = {"_class_name": "StableDiffusionPipeline", "beta_schedule": BETA_SCHEDULES[-1]}  # laplace where it exists
    assert torch.equal(NoiseSchedule.from_config(other).alphas_cumprod,
                       DDPMScheduler(beta_schedule=BETA_SCHEDULES[-1]).alphas_cumprod.double())


def test_flow_matching_still_needs_no_alphas_cumprod_and_ve_is_refused():
    assert NoiseSchedule.from_config(FlowMatchEulerDiscreteScheduler(shift=2.0).config).kind == "flow"
    assert NoiseSchedule.from_config({"shift": 2.0}).shift == 2.0
    with pytest.raises(TypeError, match="ScoreSdeVeScheduler has no alphas_cumprod"):
        NoiseSchedule.from_config(ScoreSdeVeScheduler())
