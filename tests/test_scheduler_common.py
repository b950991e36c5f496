"""diffusers' own scheduler test-suite, run against every fastdiff scheduler (offline, no diffusers test files needed).

This is our equivalent of diffusers' ``tests/schedulers/test_schedulers.py::SchedulerCommonTest`` (its 10 tests)
plus the 17 tests of ``tests/schedulers/test_scheduler_ddim.py::DDIMSchedulerTest`` other than ``test_variance``
(which checks DDIM's private ``_get_variance``): 27 tests per scheduler, each written from diffusers' test of the
same name, with the same configs, sweeps, dummy samples, dummy model and tolerances. Adaptations, all kept small:

* Schedulers built on DPM-Solver++ / UniPC take their base's test config and forward kwargs (diffusers'
  ``test_scheduler_dpm_multi.py`` / ``test_scheduler_unipc.py``: ``num_inference_steps=25``, no ``eta``); a
  sweep over an argument the base class does not take (``clip_sample``, ``eta``, ``set_alpha_to_one``) runs
  the base config instead.
* The hard-coded numbers of DDIM's full-loop tests are DDIM's; a fastdiff scheduler must reproduce them exactly
  with its own term switched off (``solver_order=1`` / ``dualfast_scale=0``) and, switched on, stay finite and
  differ from them (its term is live). Schedulers on other bases compare with their base class's loop.
* ``check_over_configs`` steps once at the test's timestep (on or off the grid, as diffusers does) and then at
  two further grid timesteps, so multistep history survives a save/load round trip too.

diffusers' own ``DDIMScheduler``, ``DPMSolverMultistepScheduler`` and ``UniPCMultistepScheduler`` run as controls.
"""

from __future__ import annotations

import inspect
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from diffusers.utils import logging

from fastdiff.samplers.accelerated_ddim import FEW_STEP_SETTINGS, AcceleratedDDIMScheduler
from fastdiff.samplers.dualfast import (
    AcceleratedDDIMDualFastScheduler,
    DDIMDualFastScheduler,
    DPMSolverMultistepDualFastScheduler,
    UniPCMultistepDualFastScheduler,
)

DDIM_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
               "clip_sample": True}
DPM_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
              "solver_order": 2, "prediction_type": "epsilon", "thresholding": False, "sample_max_value": 1.0,
              "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": False,
              "euler_at_final": False, "lambda_min_clipped": -float("inf"), "variance_type": None,
              "final_sigmas_type": "sigma_min"}
UNIPC_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                "solver_order": 2, "solver_type": "bh2", "final_sigmas_type": "sigma_min"}


@dataclass(frozen=True)
class Spec:
    """A scheduler under test: its class, its diffusers base, extra config, and the config that switches its own
    term off (then it must equal the base step for step)."""

    cls: type
    base: type
    extra: dict[str, Any] = field(default_factory=dict)
    off: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> tuple[dict[str, Any], tuple[tuple[str, Any], ...]]:
        if issubclass(self.base, DPMSolverMultistepScheduler):
            return DPM_CONFIG, (("num_inference_steps", 25),)
        if issubclass(self.base, UniPCMultistepScheduler):
            return UNIPC_CONFIG, (("num_inference_steps", 25),)
        return DDIM_CONFIG, (("eta", 0.0), ("num_inference_steps", 50))

    def accepts(self, key: str) -> bool:
        return key in inspect.signature(self.cls.__init__).parameters

    def config(self, **kwargs: Any) -> dict[str, Any]:
        cfg = {**self.family[0], **self.extra}
        cfg.update({k: v for k, v in kwargs.items() if self.accepts(k)})
        return cfg

    def forward_kwargs(self, **extra: Any) -> dict[str, Any]:
        step_params = inspect.signature(self.cls.step).parameters
        kwargs = {**dict(self.family[1]), **extra}
        return {k: v for k, v in kwargs.items() if k == "num_inference_steps" or k in step_params}


DUALFAST_OFF = {"dualfast_scale": 0.0}
SPECS = {
    "diffusers-DDIMScheduler": Spec(DDIMScheduler, DDIMScheduler),
    "diffusers-DPMSolverMultistepScheduler": Spec(DPMSolverMultistepScheduler, DPMSolverMultistepScheduler),
    "diffusers-UniPCMultistepScheduler": Spec(UniPCMultistepScheduler, UniPCMultistepScheduler),
    "accel_ddim": Spec(AcceleratedDDIMScheduler, DDIMScheduler, {}, {"solver_order": 1}),
    "accel_ddim_paper": Spec(AcceleratedDDIMScheduler, DDIMScheduler,
                             {"interpolation": "alphas_cumprod", "max_step_ratio": None}, {"solver_order": 1}),
    "accel_ddim_data": Spec(AcceleratedDDIMScheduler, DDIMScheduler, {"solver_space": "data"}, {"solver_order": 1}),
    "accel_ddim_few_step": Spec(AcceleratedDDIMScheduler, DDIMScheduler, FEW_STEP_SETTINGS,  # the default's config
                                {"solver_order": 1, "corrector_order": 0, "timestep_schedule": "spacing",
                                 "low_step_switch": 0, "step_regimes": None}),
    "accel_ddpm": Spec(AcceleratedDDIMScheduler, DDIMScheduler, {"stochastic": True}),
    "ddim_dualfast": Spec(DDIMDualFastScheduler, DDIMScheduler, {}, DUALFAST_OFF),
    "accel_ddim_dualfast": Spec(AcceleratedDDIMDualFastScheduler, DDIMScheduler, {},
                                {**DUALFAST_OFF, "solver_order": 1}),
    "dpmpp_2m_dualfast": Spec(DPMSolverMultistepDualFastScheduler, DPMSolverMultistepScheduler, {}, DUALFAST_OFF),
    "unipc_dualfast": Spec(UniPCMultistepDualFastScheduler, UniPCMultistepScheduler, {}, DUALFAST_OFF),
}
NAMES = list(SPECS)


# ------------------------------------------------------------------------------ diffusers' dummies, verbatim in spirit
def dummy_sample() -> torch.Tensor:
    return torch.rand((4, 3, 8, 8))


def _deter(flip: bool) -> torch.Tensor:
    n = 4 * 3 * 8 * 8
    values = torch.arange(n).flip(-1) if flip else torch.arange(n)
    return (values.reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)


def dummy_model(sample: torch.Tensor, t: Any) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        t = t.reshape(-1, *(1,) * (sample.ndim - 1)).to(sample.device, dtype=sample.dtype)
    return sample * t / (t + 1)


def _default_timesteps(spec: Spec) -> tuple[Any, Any]:
    kwargs = spec.forward_kwargs()
    sched = spec.cls(**spec.config())
    sched.set_timesteps(kwargs["num_inference_steps"])
    return sched.timesteps[0], sched.timesteps[1]


def _step(sched: Any, residual: torch.Tensor, t: Any, sample: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    if "generator" in inspect.signature(sched.step).parameters:
        kwargs = {**kwargs, "generator": torch.manual_seed(0)}
    return sched.step(residual, t, sample, **kwargs).prev_sample


def _round_trip(spec: Spec, sched: Any) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        sched.save_config(tmp)
        return spec.cls.from_pretrained(tmp)


def check_over(spec: Spec, time_step: Any = 0, config: dict[str, Any] | None = None,
               forward: dict[str, Any] | None = None) -> None:
    """diffusers' ``check_over_configs`` / ``check_over_forward``: a saved and reloaded scheduler steps identically.

    DDIM family: one step at ``time_step`` (a timestep, on or off the grid), then two grid steps. Multistep
    family (as in diffusers' DPM-Solver / UniPC tests): ``time_step`` is a grid index (or a timestep on the grid)
    and three consecutive grid steps run from there."""
    kwargs = spec.forward_kwargs(**(forward or {}))
    n = kwargs.pop("num_inference_steps", None)
    sched = spec.cls(**spec.config(**(config or {})))
    sample = dummy_sample()
    residual = 0.1 * sample
    new = _round_trip(spec, sched)
    if n is not None:
        sched.set_timesteps(n)
        new.set_timesteps(n)
    sched.scale_model_input(sample, sched.timesteps[-1])
    new.scale_model_input(sample, sched.timesteps[-1])
    grid = sched.timesteps
    if spec.base is DDIMScheduler:
        out, new_out = _step(sched, residual, time_step, sample, kwargs), _step(new, residual, time_step, sample,
                                                                                kwargs)
        assert torch.sum(torch.abs(out - new_out)) < 1e-5, "Scheduler outputs are not identical"
        rest = grid[1:3]
    else:
        hits = (grid == time_step).nonzero()
        start = int(hits[0]) if hits.numel() else min(int(time_step), max(len(grid) - 3, 0))
        out = new_out = sample
        rest = grid[start:start + 3]
    for t in rest:  # further grid steps: the multistep history must match too
        out, new_out = _step(sched, residual, t, out, kwargs), _step(new, residual, t, new_out, kwargs)
        # (NaN equals NaN here: DDIM itself gives NaN on the grid of beta_end=2, whose alphas_cumprod is < 0)
        torch.testing.assert_close(out, new_out, rtol=0, atol=1e-5, equal_nan=True)


def full_loop(spec: Spec, cls_or_spec_config: dict[str, Any], scheduler_class: type | None = None,
              noise_from: int | None = None) -> torch.Tensor:
    """DDIM's ``full_loop`` / ``test_full_loop_with_noise`` loop: 10 steps of the dummy model."""
    cls = scheduler_class or spec.cls
    params = inspect.signature(cls.__init__).parameters
    sched = cls(**{k: v for k, v in cls_or_spec_config.items() if k in params or k.startswith("dualfast")})
    sched.set_timesteps(10)
    sample = _deter(flip=False)
    kwargs = {k: v for k, v in {"eta": 0.0}.items() if k in inspect.signature(sched.step).parameters}
    timesteps = sched.timesteps
    if noise_from is not None:
        timesteps = timesteps[noise_from * sched.order:]
        sample = sched.add_noise(sample, _deter(flip=True), timesteps[:1])
    for t in timesteps:
        sample = _step(sched, dummy_model(sample, t), t, sample, kwargs)
    return sample


# ------------------------------------------------------------------------------ SchedulerCommonTest (10)
@pytest.mark.parametrize("name", NAMES)
def test_from_save_pretrained(name):
    spec = SPECS[name]
    check_over(spec, time_step=_default_timesteps(spec)[0])


@pytest.mark.parametrize("name", NAMES)
def test_compatibles(name):
    spec = SPECS[name]
    sched = spec.cls(**spec.config())
    assert all(c is not None for c in sched.compatibles)
    for comp_cls in sched.compatibles:
        if comp_cls.__module__.startswith("diffusers.utils.dummy_"):
            continue  # an optional backend this environment lacks (torchsde): diffusers' placeholder class
        comp = comp_cls.from_config(sched.config)
        assert comp is not None
    new = spec.cls.from_config(comp.config)
    new_config = {k: v for k, v in new.config.items() if k in sched.config}
    diff = {k: v for k, v in new.config.items() if k not in sched.config}
    assert new_config == dict(sched.config)
    assert set(diff).intersection(inspect.signature(spec.cls.__init__).parameters) == set()


@pytest.mark.parametrize("name", NAMES)
def test_from_pretrained(name, tmp_path):
    spec = SPECS[name]
    sched = spec.cls(**spec.config())
    sched.save_pretrained(tmp_path)
    new = spec.cls.from_pretrained(tmp_path)
    config = dict(sched.config)
    del config["_use_default_values"]
    assert config == new.config


@pytest.mark.parametrize("name", NAMES)
def test_step_shape(name):
    spec = SPECS[name]
    kwargs = spec.forward_kwargs()
    n = kwargs.pop("num_inference_steps")
    t0, t1 = _default_timesteps(spec)
    sched = spec.cls(**spec.config())
    sample = dummy_sample()
    sched.set_timesteps(n)
    out0 = sched.step(0.1 * sample, t0, sample, **kwargs).prev_sample
    out1 = sched.step(0.1 * sample, t1, sample, **kwargs).prev_sample
    assert out0.shape == sample.shape == out1.shape


@pytest.mark.parametrize("name", NAMES)
def test_scheduler_outputs_equivalence(name):
    spec = SPECS[name]
    kwargs = spec.forward_kwargs()
    n = kwargs.pop("num_inference_steps")
    t = _default_timesteps(spec)[0]
    sched = spec.cls(**spec.config())
    sample = dummy_sample()
    sched.set_timesteps(n)
    as_dict = sched.step(0.1 * sample, t, sample, **{**kwargs, **_gen(sched)})
    sched.set_timesteps(n)
    as_tuple = sched.step(0.1 * sample, t, sample, return_dict=False, **{**kwargs, **_gen(sched)})
    for a, b in zip(as_tuple, as_dict.values()):
        if a is not None:
            assert torch.allclose(torch.nan_to_num(a), torch.nan_to_num(b), atol=1e-5)


def _gen(sched: Any) -> dict[str, Any]:
    return {"generator": torch.manual_seed(0)} if "generator" in inspect.signature(sched.step).parameters else {}


@pytest.mark.parametrize("name", NAMES)
def test_scheduler_public_api(name):
    spec = SPECS[name]
    sched = spec.cls(**spec.config())
    assert hasattr(sched, "init_noise_sigma") and hasattr(sched, "scale_model_input") and hasattr(sched, "step")
    sample = dummy_sample()
    assert sched.scale_model_input(sample, 0.0).shape == sample.shape


@pytest.mark.parametrize("name", NAMES)
def test_add_noise_device(name):
    spec = SPECS[name]
    sched = spec.cls(**spec.config())
    sched.set_timesteps(50)
    sample = sched.scale_model_input(dummy_sample(), 0.0)
    noised = sched.add_noise(sample, torch.randn(sample.shape), sched.timesteps[5][None])
    assert noised.shape == sample.shape


@pytest.mark.parametrize("name", NAMES)
def test_deprecated_kwargs(name):
    cls = SPECS[name].cls
    has_kwargs = "kwargs" in inspect.signature(cls.__init__).parameters
    assert has_kwargs == (len(cls._deprecated_kwargs) > 0)


@pytest.mark.parametrize("name", NAMES)
def test_trained_betas(name, tmp_path):
    spec = SPECS[name]
    sched = spec.cls(**spec.config(), trained_betas=np.array([0.1, 0.3]))
    sched.save_pretrained(tmp_path)
    new = spec.cls.from_pretrained(tmp_path)
    assert sched.betas.tolist() == new.betas.tolist()


@pytest.mark.parametrize("name", NAMES)
def test_getattr_is_correct(name):
    spec = SPECS[name]
    sched = spec.cls(**spec.config())
    sched.dummy_attribute = 5
    sched.register_to_config(test_attribute=5)
    logging.get_logger("diffusers.configuration_utils").setLevel(30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sched.dummy_attribute == 5
        assert hasattr(sched, "save_pretrained") and callable(sched.save_pretrained)
    with pytest.warns(FutureWarning):
        assert sched.test_attribute == 5


# ------------------------------------------------------------------------------ DDIMSchedulerTest (17)
@pytest.mark.parametrize("name", NAMES)
def test_timesteps(name):
    for timesteps in [100, 500, 1000]:
        check_over(SPECS[name], config={"num_train_timesteps": timesteps})


@pytest.mark.parametrize("name", NAMES)
def test_steps_offset(name):
    spec = SPECS[name]
    for offset in [0, 1]:
        check_over(spec, config={"steps_offset": offset})
    # a config that picks its own grid (fastdiff's default: log-SNR / v2's trailing, both from the top) ignores
    # timestep_spacing and steps_offset by design: the pinned DDIM grid is checked with the spacing grid
    grid = {k: v for k, v in spec.off.items() if k in ("timestep_schedule", "low_step_switch", "step_regimes")}
    sched = spec.cls(**{**spec.config(steps_offset=1), **grid})
    sched.set_timesteps(5)
    if spec.base is DDIMScheduler:
        assert torch.equal(sched.timesteps, torch.LongTensor([801, 601, 401, 201, 1]))
    else:
        base = spec.base(**{k: v for k, v in spec.config(steps_offset=1).items() if not k.startswith("dualfast")})
        base.set_timesteps(5)
        assert torch.equal(sched.timesteps, base.timesteps)


@pytest.mark.parametrize("name", NAMES)
def test_betas(name):
    for beta_start, beta_end in zip([0.0001, 0.001, 0.01, 0.1], [0.002, 0.02, 0.2, 2]):
        check_over(SPECS[name], config={"beta_start": beta_start, "beta_end": beta_end})


@pytest.mark.parametrize("name", NAMES)
def test_schedules(name):
    for schedule in ["linear", "squaredcos_cap_v2"]:
        check_over(SPECS[name], config={"beta_schedule": schedule})


@pytest.mark.parametrize("name", NAMES)
def test_prediction_type(name):
    for prediction_type in ["epsilon", "v_prediction"]:
        check_over(SPECS[name], config={"prediction_type": prediction_type})


@pytest.mark.parametrize("name", NAMES)
def test_clip_sample(name):
    for clip_sample in [True, False]:
        check_over(SPECS[name], config={"clip_sample": clip_sample})


@pytest.mark.parametrize("name", NAMES)
def test_timestep_spacing(name):
    for spacing in ["trailing", "leading"]:
        check_over(SPECS[name], config={"timestep_spacing": spacing})


@pytest.mark.parametrize("name", NAMES)
def test_rescale_betas_zero_snr(name):
    for rescale in [True, False]:
        check_over(SPECS[name], config={"rescale_betas_zero_snr": rescale})


@pytest.mark.parametrize("name", NAMES)
def test_thresholding(name):
    check_over(SPECS[name], config={"thresholding": False})
    for threshold in [0.5, 1.0, 2.0]:
        for prediction_type in ["epsilon", "v_prediction"]:
            check_over(SPECS[name], config={"thresholding": True, "prediction_type": prediction_type,
                                            "sample_max_value": threshold})


@pytest.mark.parametrize("name", NAMES)
def test_time_indices(name):
    for t in [1, 10, 49]:
        check_over(SPECS[name], time_step=t)


@pytest.mark.parametrize("name", NAMES)
def test_inference_steps(name):
    for t, n in zip([1, 10, 50], [10, 50, 500]):
        check_over(SPECS[name], time_step=t, forward={"num_inference_steps": n})


@pytest.mark.parametrize("name", NAMES)
def test_eta(name):
    for t, eta in zip([1, 10, 49], [0.0, 0.5, 1.0]):
        check_over(SPECS[name], time_step=t, forward={"eta": eta})


# DDIM's pinned full-loop results (sum, mean of |sample|), diffusers' test_scheduler_ddim.py
DDIM_LOOPS = {
    "test_full_loop_no_noise": ({}, None, (172.0067, 0.223967)),
    "test_full_loop_with_v_prediction": ({"prediction_type": "v_prediction"}, None, (52.5302, 0.0684)),
    "test_full_loop_with_set_alpha_to_one": ({"set_alpha_to_one": True, "beta_start": 0.01}, None,
                                             (149.8295, 0.1951)),
    "test_full_loop_with_no_set_alpha_to_one": ({"set_alpha_to_one": False, "beta_start": 0.01}, None,
                                                (149.0784, 0.1941)),
    "test_full_loop_with_noise": ({}, 8, (354.5418, 0.4616)),
}


def _check_full_loop(name: str, loop: str) -> None:
    spec = SPECS[name]
    overrides, noise_from, (pinned_sum, pinned_mean) = DDIM_LOOPS[loop]
    config = spec.config(**overrides)
    if spec.base is DDIMScheduler:
        reference = (pinned_sum, pinned_mean)
    else:  # the base class's own loop on the same config
        ref = full_loop(spec, config, scheduler_class=spec.base, noise_from=noise_from)
        reference = (ref.abs().sum().item(), ref.abs().mean().item())
    if spec.cls is spec.base:
        sample = full_loop(spec, config, noise_from=noise_from)
    else:
        sample = full_loop(spec, {**config, **spec.off}, noise_from=noise_from)
    if spec.off or spec.cls is spec.base:  # with its own term off it is its base, to diffusers' tolerance
        assert abs(sample.abs().sum().item() - reference[0]) < 1e-2
        assert abs(sample.abs().mean().item() - reference[1]) < 1e-3
    live = full_loop(spec, config, noise_from=noise_from)
    assert torch.isfinite(live).all()
    assert live.shape == _deter(False).shape
    # (from step 8 of 10 only two steps run: DualFast's first step sets its reference, its last lands on sigma = 0)
    if spec.cls is not spec.base and not config.get("stochastic") and noise_from is None:
        assert abs(live.abs().sum().item() - reference[0]) > 1e-3, "the scheduler's own term changed nothing"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("loop", list(DDIM_LOOPS))
def test_full_loops(name, loop):
    _check_full_loop(name, loop)


def test_count_is_27():
    tests = [n for n, f in globals().items() if n.startswith("test_") and callable(f) and n != "test_count_is_27"]
    assert len(tests) - 1 + len(DDIM_LOOPS) == 27, sorted(tests)
