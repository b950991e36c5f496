"""DualFast: exactness at scale 0, the correction's formula, the scheduler contract, bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from fastdiff import AcceleratedDDIMScheduler
from fastdiff.samplers.dualfast import (
    AcceleratedDDIMDualFastScheduler,
    DDIMDualFastScheduler,
    DPMSolverMultistepDualFastScheduler,
    UniPCMultistepDualFastScheduler,
    dualfast_coefficient,
)
from fastdiff.samplers.registry import available_samplers, make_scheduler
from fastdiff.testing import SD_SCHEDULER_CONFIG, make_gaussian_mixture

torch.set_num_threads(1)

PAIRS = [
    (DDIMDualFastScheduler, DDIMScheduler, {}),
    (DPMSolverMultistepDualFastScheduler, DPMSolverMultistepScheduler, {"solver_order": 2}),
    (DPMSolverMultistepDualFastScheduler, DPMSolverMultistepScheduler, {"solver_order": 3}),
    (UniPCMultistepDualFastScheduler, UniPCMultistepScheduler, {}),
    (AcceleratedDDIMDualFastScheduler, AcceleratedDDIMScheduler, {}),
    (AcceleratedDDIMDualFastScheduler, AcceleratedDDIMScheduler, {"stochastic": True}),
]


@pytest.fixture(scope="module")
def oracle():
    return make_gaussian_mixture(dim=64, num_components=8)


def trajectory(sched, model, x, n, generator_seed=None):
    sched.set_timesteps(n)
    outs = []
    for t in sched.timesteps:
        kw = {} if generator_seed is None else {"generator": torch.Generator().manual_seed(generator_seed + int(t))}
        x = sched.step(model(x, t), t, x, **kw).prev_sample
        outs.append(x)
    return outs


@pytest.mark.parametrize("cls,base,kw", PAIRS)
def test_scale_zero_is_the_base_sampler(cls, base, kw, oracle):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    seed = 3 if kw.get("stochastic") else None
    ours = trajectory(cls.from_config(SD_SCHEDULER_CONFIG, dualfast_scale=0.0, **kw), oracle, x, 6, seed)
    ref = trajectory(base.from_config(SD_SCHEDULER_CONFIG, **kw), oracle, x, 6, seed)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("reference", ["first", "previous"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_paper_form_on_ddim(reference, prediction_type, eta):
    """The paper's DDIM: x_s = alpha_s x0(eps_t) + sqrt(1 - abar_s - std^2) eps_new + std z, eps_new = eps_t +
    c_t (eps_t - eps_tau), c_t = scale (1 - t / T): x0 keeps the uncorrected prediction."""
    cfg = dict(SD_SCHEDULER_CONFIG, prediction_type=prediction_type)
    model = make_gaussian_mixture(dim=64, num_components=8, prediction_type=prediction_type)
    eps_model = make_gaussian_mixture(dim=64, num_components=8)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    df = DDIMDualFastScheduler.from_config(cfg, dualfast_scale=0.7, dualfast_reference=reference)
    df.set_timesteps(5)
    abar = df.alphas_cumprod.double()
    seen = []
    for t in df.timesteps:
        ti = int(t)
        prev = ti - 1000 // 5
        a_t, a_s = abar[ti], abar[prev] if prev >= 0 else df.final_alpha_cumprod.double()
        eps = eps_model(x, t)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        c = 0.7 * (1 - ti / 1000)
        eps_new = eps if not seen else eps + c * (eps - (seen[0] if reference == "first" else seen[-1]))
        std = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).sqrt()
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(ti), dtype=x.dtype)
        expected = a_s.sqrt() * x0 + (1 - a_s - std**2).sqrt() * eps_new + std * noise
        out = df.step(model(x, t), t, x, eta=eta, variance_noise=noise).prev_sample
        # diffusers' DDIM converts v-predictions with float32 alphas_cumprod: agreement to ~1e-6
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=2e-6)
        seen.append(eps)
        x = expected


BASES = {DDIMDualFastScheduler: DDIMScheduler, DPMSolverMultistepDualFastScheduler: DPMSolverMultistepScheduler,
         UniPCMultistepDualFastScheduler: UniPCMultistepScheduler,
         AcceleratedDDIMDualFastScheduler: AcceleratedDDIMScheduler}


@pytest.mark.parametrize("variant", ["paper", "interpolate"])
@pytest.mark.parametrize("cls,kw", [(DPMSolverMultistepDualFastScheduler, {"solver_order": 2}),
                                    (UniPCMultistepDualFastScheduler, {}),
                                    (AcceleratedDDIMDualFastScheduler, {})])
def test_paper_form_adds_the_noise_term_to_the_base_update(cls, kw, variant, oracle):
    """For every base: DualFast's step = the base class's step from the same state + sigma_s c_t (eps_t - eps_T),
    c_t = scale (1 - t / T) (paper) or -scale ("interpolate", toward eps_T); UniPC's corrector, which re-derives the
    current sample from the previous one, re-adds the previous term."""
    import copy

    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    df = cls.from_config(SD_SCHEDULER_CONFIG, dualfast_scale=0.6, dualfast_reference="first",
                         dualfast_variant=variant, **kw)
    df.set_timesteps(6)
    first, previous_term = None, None
    for i, t in enumerate(df.timesteps):
        eps = oracle(x, t)  # an epsilon model
        if hasattr(df, "sigmas"):
            sigma_s = float(df._sigma_to_alpha_sigma_t(df.sigmas[i + 1])[1])
        else:
            sigma_s = df.coefficients.sigma_next[i].item()
        first = eps if first is None else first
        c = 0.6 * (1 - int(t) / 1000) if variant == "paper" else -0.6
        term = sigma_s * c * (eps - first)
        state = copy.deepcopy(df)
        expected = BASES[cls].step(state, eps, t, x).prev_sample + term
        if cls is UniPCMultistepDualFastScheduler and previous_term is not None:
            bare = copy.deepcopy(df)
            bare._dualfast_pending = None
            BASES[cls].step(bare, eps, t, x)
        got = df.step(eps, t, x).prev_sample
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
        if cls is UniPCMultistepDualFastScheduler and previous_term is not None:
            torch.testing.assert_close(df.last_sample, bare.last_sample + previous_term, rtol=1e-6, atol=1e-9)
        previous_term = term if i > 0 else None
        x = got


def test_prediction_variant_on_ddim():
    """fastdiff's earlier variant: DDIM run on eps~ = eps_t + c_t (eps_t - eps_T), c_t = scale t / T."""
    model = make_gaussian_mixture(dim=64, num_components=8)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    df = DDIMDualFastScheduler.from_config(SD_SCHEDULER_CONFIG, dualfast_scale=0.7, dualfast_variant="prediction",
                                           dualfast_reference="first")
    base = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    df.set_timesteps(5)
    base.set_timesteps(5)
    seen = []
    for t in df.timesteps:
        eps = model(x, t)
        c = dualfast_coefficient(0.7, int(t), 1000, "prediction")
        corrected = eps if not seen else eps + c * (eps - seen[0])
        got = df.step(eps, t, x).prev_sample
        torch.testing.assert_close(got, base.step(corrected, t, x).prev_sample, rtol=1e-6, atol=1e-7)
        seen.append(eps)
        x = got


def test_changes_the_trajectory_when_on(oracle):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    for cls, base, kw in PAIRS[:4]:
        a = trajectory(cls.from_config(SD_SCHEDULER_CONFIG, dualfast_scale=0.3, **kw), oracle, x, 5)[-1]
        b = trajectory(base.from_config(SD_SCHEDULER_CONFIG, **kw), oracle, x, 5)[-1]
        assert torch.isfinite(a).all() and not torch.equal(a, b)


def test_coefficient_schedules():
    paper = [dualfast_coefficient(0.5, t, 1000) for t in (999, 600, 300, 0)]
    assert paper == sorted(paper) and paper[-1] == 0.5 and paper[0] == pytest.approx(0.0005)  # grows toward t = 0
    old = [dualfast_coefficient(0.5, t, 1000, "prediction") for t in (999, 600, 300, 0)]
    assert old == sorted(old, reverse=True) and old[-1] == 0.0 and old[0] == pytest.approx(0.4995)
    assert [dualfast_coefficient(0.5, t, 1000, "interpolate") for t in (999, 0)] == [-0.5, -0.5]  # toward eps_tau


def test_interpolate_variant_on_ddim():
    """fastdiff's "interpolate" option: x_s = alpha_s x0(eps_t) + sigma_s ((1 - c) eps_t + c eps_prev), constant c."""
    model = make_gaussian_mixture(dim=64, num_components=8)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    df = DDIMDualFastScheduler.from_config(SD_SCHEDULER_CONFIG, dualfast_scale=0.3, dualfast_variant="interpolate")
    df.set_timesteps(5)
    abar, prev_eps = df.alphas_cumprod.double(), None
    for t in df.timesteps:
        ti = int(t)
        a_t = abar[ti]
        a_s = abar[ti - 200] if ti >= 200 else df.final_alpha_cumprod.double()
        eps = model(x, t)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        mixed = eps if prev_eps is None else 0.7 * eps + 0.3 * prev_eps
        expected = a_s.sqrt() * x0 + (1 - a_s).sqrt() * mixed
        torch.testing.assert_close(df.step(eps, t, x).prev_sample, expected, rtol=1e-6, atol=1e-7)
        prev_eps, x = eps, expected


@pytest.mark.parametrize("cls", [DDIMDualFastScheduler, DPMSolverMultistepDualFastScheduler,
                                 UniPCMultistepDualFastScheduler, AcceleratedDDIMDualFastScheduler])
def test_custom_timesteps_pass_through_pipelines(cls):
    """diffusers' retrieve_timesteps inspects set_timesteps for `timesteps` / `sigmas`: same answer as the base."""
    import inspect

    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

    base = {DDIMDualFastScheduler: DDIMScheduler, DPMSolverMultistepDualFastScheduler: DPMSolverMultistepScheduler,
            UniPCMultistepDualFastScheduler: UniPCMultistepScheduler,
            AcceleratedDDIMDualFastScheduler: AcceleratedDDIMScheduler}[cls]
    for kind in ("timesteps", "sigmas"):
        assert (kind in inspect.signature(cls.set_timesteps).parameters) == (
            kind in inspect.signature(base.set_timesteps).parameters)
    if "timesteps" in inspect.signature(cls.set_timesteps).parameters:
        sched = cls.from_config(SD_SCHEDULER_CONFIG)
        ts, n = retrieve_timesteps(sched, timesteps=[999, 700, 400, 100])
        assert n == 4 and ts.tolist()[:4] == [999, 700, 400, 100]


@pytest.mark.parametrize("cls", [DDIMDualFastScheduler, DPMSolverMultistepDualFastScheduler,
                                 AcceleratedDDIMDualFastScheduler])
def test_config_round_trip_identical_steps(cls, tmp_path, oracle):
    sched = cls.from_config(SD_SCHEDULER_CONFIG, dualfast_scale=0.25, dualfast_reference="previous")
    sched.save_config(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    assert loaded.config.dualfast_scale == 0.25 and loaded.config.dualfast_reference == "previous"
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    for a, b in zip(trajectory(sched, oracle, x, 5), trajectory(loaded, oracle, x, 5)):
        assert torch.equal(a, b)


def test_from_other_configs_and_step_signature():
    import inspect

    for source in (DDIMScheduler, DPMSolverMultistepScheduler):
        base_cfg = source.from_config(SD_SCHEDULER_CONFIG).config
        for cls in (DDIMDualFastScheduler, DPMSolverMultistepDualFastScheduler, AcceleratedDDIMDualFastScheduler):
            sched = cls.from_config(base_cfg)
            assert sched.config.dualfast_scale == 0.1 and sched.config.num_train_timesteps == 1000
    # pipelines inspect step's signature to decide whether to pass eta / generator
    assert "eta" in inspect.signature(DDIMDualFastScheduler.step).parameters
    assert "generator" in inspect.signature(DPMSolverMultistepDualFastScheduler.step).parameters


def test_return_dict_false_and_dtype(oracle):
    sched = DDIMDualFastScheduler.from_config(SD_SCHEDULER_CONFIG)
    sched.set_timesteps(5)
    x = torch.randn(2, 64).half()
    for t in sched.timesteps[:2]:
        out = sched.step(oracle(x.double(), t).half(), t, x, return_dict=False)
        assert isinstance(out, tuple) and out[0].dtype == torch.float16 and out[0].shape == x.shape
        x = out[0]


def test_drop_in_pipeline():
    from fastdiff.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    pipe.scheduler = make_scheduler("dpmpp_2m_dualfast", pipe.scheduler.config)
    image = pipe("a digit", num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert np.isfinite(image).all()


def test_warns_below_five_steps():
    sched = DPMSolverMultistepDualFastScheduler.from_config(SD_SCHEDULER_CONFIG, dualfast_variant="prediction")
    with pytest.warns(UserWarning, match="below 5 steps"):
        sched.set_timesteps(3)
    DPMSolverMultistepDualFastScheduler.from_config(SD_SCHEDULER_CONFIG, dualfast_scale=0.0).set_timesteps(3)


def test_registered_names():
    names = available_samplers()
    for name in ("accel_ddim", "accel_ddpm", "ddim_dualfast", "dpmpp_2m_dualfast", "unipc_dualfast",
                 "accel_ddim_dualfast"):
        assert name in names
        make_scheduler(name, SD_SCHEDULER_CONFIG)


def test_bad_arguments():
    with pytest.raises(ValueError, match="dualfast_scale"):
        DDIMDualFastScheduler(dualfast_scale=-0.1)
    with pytest.raises(ValueError, match="dualfast_scale"):
        DDIMDualFastScheduler(dualfast_scale=float("nan"))
    with pytest.raises(TypeError, match="dualfast_scale"):
        DDIMDualFastScheduler(dualfast_scale="0.5")
    with pytest.raises(ValueError, match="dualfast_reference"):
        DPMSolverMultistepDualFastScheduler(dualfast_reference="last")
    with pytest.raises(ValueError, match="dualfast_variant"):
        UniPCMultistepDualFastScheduler(dualfast_variant="v2")
    sched = DDIMDualFastScheduler()
    sched.set_timesteps(5)
    with pytest.raises(TypeError, match="model_output"):
        sched.step([torch.zeros(1, 4)], sched.timesteps[0], torch.zeros(1, 4))
