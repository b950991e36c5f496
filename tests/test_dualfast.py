"""DualFast: exactness at scale 0, the correction's formula, the scheduler contract, bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from fastdiff import AcceleratedDDIMScheduler
from fastdiff.samplers.dualfast import (
    AcceleratedDDIMDualFastScheduler,
    DDIMDualFastScheduler,
    DPMSolverMultistepDualFastScheduler,
    dualfast_coefficient,
)
from fastdiff.samplers.registry import available_samplers, make_scheduler
from fastdiff.testing import SD_SCHEDULER_CONFIG, make_gaussian_mixture

torch.set_num_threads(1)

PAIRS = [
    (DDIMDualFastScheduler, DDIMScheduler, {}),
    (DPMSolverMultistepDualFastScheduler, DPMSolverMultistepScheduler, {"solver_order": 2}),
    (DPMSolverMultistepDualFastScheduler, DPMSolverMultistepScheduler, {"solver_order": 3}),
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
def test_correction_formula_on_ddim(reference, prediction_type):
    """DualFast-DDIM = DDIM run on eps~ = eps_t + c_t (eps_t - eps_tau), eps_tau from the first / previous step."""
    cfg = dict(SD_SCHEDULER_CONFIG, prediction_type=prediction_type)
    model = make_gaussian_mixture(dim=64, num_components=8, prediction_type=prediction_type)
    eps_model = make_gaussian_mixture(dim=64, num_components=8)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    df = DDIMDualFastScheduler.from_config(cfg, dualfast_scale=0.7, dualfast_reference=reference)
    base = DDIMScheduler.from_config(dict(cfg, prediction_type="epsilon"))
    df.set_timesteps(5)
    base.set_timesteps(5)
    seen = []
    for t in df.timesteps:
        eps = eps_model(x, t)
        corrected = eps if not seen else eps + dualfast_coefficient(0.7, int(t), 1000) * (
            eps - (seen[0] if reference == "first" else seen[-1]))
        out_df = df.step(model(x, t), t, x).prev_sample
        out_base = base.step(corrected, t, x).prev_sample
        # diffusers' DDIM converts v-predictions with float32 alphas_cumprod: agreement to ~1e-7
        torch.testing.assert_close(out_df, out_base, rtol=1e-5, atol=1e-6)
        seen.append(eps)
        x = out_base


def test_changes_the_trajectory_when_on(oracle):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    for cls, base, kw in PAIRS[:4]:
        a = trajectory(cls.from_config(SD_SCHEDULER_CONFIG, dualfast_scale=0.3, **kw), oracle, x, 5)[-1]
        b = trajectory(base.from_config(SD_SCHEDULER_CONFIG, **kw), oracle, x, 5)[-1]
        assert torch.isfinite(a).all() and not torch.equal(a, b)


def test_coefficient_decays_along_the_trajectory():
    cs = [dualfast_coefficient(0.5, t, 1000) for t in (999, 600, 300, 0)]
    assert cs == sorted(cs, reverse=True) and cs[-1] == 0.0 and cs[0] == pytest.approx(0.4995)


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
            assert sched.config.dualfast_scale == 0.5 and sched.config.num_train_timesteps == 1000
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
    sched = DPMSolverMultistepDualFastScheduler.from_config(SD_SCHEDULER_CONFIG)
    with pytest.warns(UserWarning, match="below 5 steps"):
        sched.set_timesteps(3)
    DPMSolverMultistepDualFastScheduler.from_config(SD_SCHEDULER_CONFIG, dualfast_scale=0.0).set_timesteps(3)


def test_registered_names():
    names = available_samplers()
    for name in ("accel_ddim", "accel_ddpm", "ddim_dualfast", "dpmpp_2m_dualfast", "accel_ddim_dualfast"):
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
