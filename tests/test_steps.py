"""Step maps equal ``scheduler.step`` over whole trajectories (float64 oracle, same generator)."""

from __future__ import annotations

import inspect

import diffusers as d
import pytest
import torch

from fastdiff.samplers.steps import (
    NonFiniteLatentError,
    StepMap,
    draw_noise,
    register_step_map,
    sample_sequential,
    step_map_for,
    supported_schedulers,
)
from fastdiff.testing import SD_SCHEDULER_CONFIG, make_gaussian_mixture

SD = SD_SCHEDULER_CONFIG
FLOW = {"num_train_timesteps": 1000, "shift": 3.0, "_class_name": "FlowMatchEulerDiscreteScheduler"}


def _oracles(ptype: str, flow: bool = False):
    return make_gaussian_mixture(dim=16, num_components=4, prediction_type=ptype, scheduler_config=FLOW if flow else None)


def run_scheduler(sched, model, x, steps, generator, **step_kwargs):
    """The diffusers loop, as a pipeline runs it."""
    sched.set_timesteps(steps)
    x = x * getattr(sched, "init_noise_sigma", 1.0)
    if "generator" in inspect.signature(sched.step).parameters:
        step_kwargs["generator"] = generator
    for t in sched.timesteps:
        u = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        x = sched.step(model(u, t), t, x, return_dict=False, **step_kwargs)[0]
    return x


def run_step_map(sched, model, x, steps, generator, **step_kwargs):
    sched.set_timesteps(steps)
    sm = step_map_for(sched, **step_kwargs)
    x = x * sm.init_noise_sigma
    return sample_sequential(sm, model, x, draw_noise(sm, tuple(x.shape), generator, dtype=x.dtype))


def _accelerated():
    from fastdiff.samplers.accelerated_ddim import AcceleratedDDIMScheduler as A

    return [
        ("accel_ddim", lambda: A.from_config(SD), {}, 12),
        ("accel_ddim_paper_clip", lambda: A.from_config({**SD, "clip_sample": True}, solver_space="noise",
                                                        interpolation="alphas_cumprod"), {}, 12),
        ("accel_ddpm", lambda: A.from_config(SD, stochastic=True), {}, 12),
    ]


CASES = [
    ("ddim", lambda: d.DDIMScheduler(**SD), {}, 15),
    ("ddim_eta", lambda: d.DDIMScheduler(**SD), {"eta": 0.6}, 12),
    ("ddim_leading_alpha1_clip", lambda: d.DDIMScheduler(**{**SD, "timestep_spacing": "leading", "set_alpha_to_one": True,
                                                           "clip_sample": True}),
     {"eta": 0.3, "use_clipped_model_output": True}, 13),
    ("ddim_parallel", lambda: d.DDIMParallelScheduler(**SD), {}, 10),
    ("ddpm_clip", lambda: d.DDPMScheduler.from_config({**SD, "clip_sample": True}), {}, 20),
    ("ddpm_fixed_large", lambda: d.DDPMScheduler.from_config({**SD, "variance_type": "fixed_large"}), {}, 12),
    ("euler", lambda: d.EulerDiscreteScheduler.from_config(SD), {}, 12),
    ("euler_karras", lambda: d.EulerDiscreteScheduler.from_config({**SD, "use_karras_sigmas": True,
                                                                  "timestep_spacing": "linspace"}), {}, 12),
    ("euler_ancestral", lambda: d.EulerAncestralDiscreteScheduler.from_config(SD), {}, 12),
    ("dpmpp_2m", lambda: d.DPMSolverMultistepScheduler.from_config(SD), {}, 12),
    ("dpmpp_2m_karras_heun", lambda: d.DPMSolverMultistepScheduler.from_config(
        {**SD, "use_karras_sigmas": True, "solver_type": "heun"}), {}, 16),
    ("dpmpp_2m_sigma_min", lambda: d.DPMSolverMultistepScheduler.from_config({**SD, "final_sigmas_type": "sigma_min"}),
     {}, 16),
    ("dpmpp_3m", lambda: d.DPMSolverMultistepScheduler.from_config({**SD, "solver_order": 3}), {}, 16),
    ("sde_dpmpp_2m", lambda: d.DPMSolverMultistepScheduler.from_config({**SD, "algorithm_type": "sde-dpmsolver++"}),
     {}, 12),
]


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name,make,kwargs,steps", CASES + _accelerated(), ids=[c[0] for c in CASES + _accelerated()])
def test_step_map_equals_scheduler_step(name, make, kwargs, steps, ptype):
    if name == "euler_ancestral" and ptype == "sample":
        pytest.skip("diffusers' Euler-ancestral does not implement prediction_type='sample'")
    model = _oracles(ptype)
    sched = make()
    sched = type(sched).from_config(sched.config, prediction_type=ptype)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = run_scheduler(sched, model, x, steps, torch.Generator().manual_seed(7), **kwargs)
    ours = run_step_map(sched, model, x, steps, torch.Generator().manual_seed(7), **kwargs)
    assert (ours - ref).pow(2).mean().sqrt() <= 1e-5 * max(1.0, float(ref.pow(2).mean().sqrt()))


@pytest.mark.parametrize("stochastic", [False, True])
def test_flow_match_euler(stochastic):
    model = _oracles("flow", flow=True)
    sched = d.FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=stochastic)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = run_scheduler(sched, model, x, 14, torch.Generator().manual_seed(7))
    if stochastic and not torch.equal(ref, run_scheduler(sched, model, x, 14, torch.Generator().manual_seed(7))):
        pytest.skip("this diffusers' FlowMatchEulerDiscreteScheduler draws its noise without the generator")
    ours = run_step_map(sched, model, x, 14, torch.Generator().manual_seed(7))
    assert (ours - ref).pow(2).mean().sqrt() <= 1e-5


def test_custom_timesteps_and_generator_list():
    """DDPM on a custom, non-uniform grid whose last step is not t=0 (noise on every step), with one
    generator per sample: the pre-drawn noise is what ``step`` would draw."""
    model = _oracles("epsilon")
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grid = [999, 900, 700, 420, 200, 77, 30, 5]
    gens = lambda: [torch.Generator().manual_seed(s) for s in (11, 12)]  # noqa: E731
    sched = d.DDPMScheduler.from_config(SD)
    sched.set_timesteps(timesteps=grid)
    ref, g = x.clone(), gens()
    for t in sched.timesteps:
        ref = sched.step(model(ref, t), t, ref, generator=g).prev_sample
    sm = step_map_for(sched)
    assert sm.noise_drawn.all()
    ours = sample_sequential(sm, model, x, draw_noise(sm, tuple(x.shape), gens(), dtype=x.dtype))
    assert (ours - ref).abs().max() <= 1e-6


def test_ddim_non_uniform_trailing_grid():
    """30 steps do not divide 1000: DDIM's grid is non-uniform but its step uses t - 1000 // 30; mirrored."""
    model = _oracles("epsilon")
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sched = d.DDIMScheduler(**SD)
    ref = run_scheduler(sched, model, x, 30, None)
    assert len(set((sched.timesteps[:-1] - sched.timesteps[1:]).tolist())) > 1
    ours = run_step_map(sched, model, x, 30, None)
    assert (ours - ref).pow(2).mean().sqrt() <= 1e-6


def test_unsupported_scheduler_names_supported_ones():
    sched = d.PNDMScheduler.from_config(SD)
    sched.set_timesteps(10)
    with pytest.raises(ValueError, match="PNDMScheduler.*DDIMScheduler.*EulerDiscreteScheduler"):
        step_map_for(sched)
    assert "DPMSolverMultistepScheduler" in supported_schedulers()


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="set_timesteps"):
        step_map_for(d.DDIMScheduler(**SD))
    sched = d.DDIMScheduler(**{**SD, "thresholding": True})
    sched.set_timesteps(5)
    with pytest.raises(ValueError, match="thresholding"):
        step_map_for(sched)
    sched = d.DDPMScheduler.from_config({**SD, "variance_type": "learned_range"})
    sched.set_timesteps(5)
    with pytest.raises(ValueError, match="variance_type"):
        step_map_for(sched)
    sched = d.DDIMScheduler(**SD)
    sched.set_timesteps(5)
    with pytest.raises(ValueError, match="eta"):
        step_map_for(sched, eta=-1.0)


def test_registry_one_entry_for_a_new_scheduler():
    class MyDDIM(d.DDIMScheduler):  # a subclass is found through the MRO
        pass

    sched = MyDDIM(**SD)
    sched.set_timesteps(5)
    assert step_map_for(sched).name == "ddim"

    class Custom(d.DDIMScheduler):
        pass

    @register_step_map(Custom)
    def build(scheduler, **_):
        base = d.DDIMScheduler.from_config(scheduler.config)
        base.set_timesteps(len(scheduler.timesteps))
        from dataclasses import replace

        return replace(step_map_for(base), name="custom")

    sched = Custom(**SD)
    sched.set_timesteps(5)
    assert isinstance(step_map_for(sched), StepMap) and step_map_for(sched).name == "custom"


def test_sequential_reports_the_non_finite_step():
    model = _oracles("epsilon")

    def broken(u, t):
        out = model(u, t)
        return out / 0 if float(torch.as_tensor(t).flatten()[0]) < 500 else out

    sched = d.DDIMScheduler(**SD)
    sched.set_timesteps(10)
    sm = step_map_for(sched)
    first_bad = int((sm.timesteps < 500).nonzero()[0])
    with pytest.raises(NonFiniteLatentError, match=f"step {first_bad}") as err:
        sample_sequential(sm, broken, torch.randn(2, 16, dtype=torch.float64))
    assert err.value.step == first_bad


def test_accelerated_step_map_on_fractional_custom_timesteps():
    """Fractional custom timesteps reach the step map unrounded (the scheduler keeps them as given)."""
    from fastdiff.samplers.accelerated_ddim import AcceleratedDDIMScheduler

    model = _oracles("epsilon")
    sched = AcceleratedDDIMScheduler.from_config(SD)
    grid = [999.0, 700.5, 480.25, 250.75, 90.5, 10.0]
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sched.set_timesteps(timesteps=grid)
    ref = x.clone()
    for t in sched.timesteps:
        ref = sched.step(model(ref, t), t, ref).prev_sample
    sched.set_timesteps(timesteps=grid)
    sm = step_map_for(sched)
    assert sm.timesteps.tolist() == grid
    ours = sample_sequential(sm, model, x.clone(), None)
    assert (ours - ref).pow(2).mean().sqrt() <= 1e-6
