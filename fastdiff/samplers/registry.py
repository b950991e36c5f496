"""Named samplers: a name -> a diffusers scheduler built from a pipeline's scheduler config.

``fastdiff compare`` and ``fastdiff sample`` take these names. The built-in samplers are a static table
(:data:`BUILTIN_SAMPLERS`: name -> module, attribute, config overrides, description), so listing them and reading
their descriptions imports neither torch nor diffusers; :func:`make_scheduler` imports the module on first use.
Other code adds samplers with :func:`register_sampler`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

SchedulerFactory = Callable[[Mapping[str, Any]], Any]

__all__ = ["BUILTIN_SAMPLERS", "BuiltinSampler", "SamplerSpec", "available_samplers", "make_scheduler",
           "register_sampler", "sampler_description", "sampler_spec"]


@dataclass(frozen=True)
class BuiltinSampler:
    """A lazily resolved sampler: ``getattr(import_module(module), attribute)`` is a scheduler class (built with
    ``from_config(config, **overrides)``) or a factory ``f(config) -> scheduler``."""

    module: str
    attribute: str
    description: str
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def build(self, config: Mapping[str, Any]) -> Any:
        target = getattr(importlib.import_module(self.module), self.attribute)
        if hasattr(target, "from_config"):
            return target.from_config(config, **self.overrides)
        return target(config, **self.overrides)


_D = "diffusers"
_ACCEL = "fastdiff.samplers.accelerated_ddim"
_DUAL = "fastdiff.samplers.dualfast"
_DPMPP = {"algorithm_type": "dpmsolver++"}

#: name -> how to build it; the single source of the built-in sampler names and descriptions.
BUILTIN_SAMPLERS: dict[str, BuiltinSampler] = {
    "ddim": BuiltinSampler(_D, "DDIMScheduler", "DDIM, eta 0 (diffusers)"),
    "ddpm": BuiltinSampler(_D, "DDPMScheduler", "DDPM ancestral (diffusers)"),
    "euler": BuiltinSampler(_D, "EulerDiscreteScheduler", "Euler (Karras et al. 2022; diffusers)"),
    "euler_a": BuiltinSampler(_D, "EulerAncestralDiscreteScheduler", "Euler ancestral (diffusers)"),
    "dpmpp_2m": BuiltinSampler(_D, "DPMSolverMultistepScheduler", "DPM-Solver++ 2M (diffusers)",
                               {**_DPMPP, "solver_order": 2}),
    "dpmpp_3m": BuiltinSampler(_D, "DPMSolverMultistepScheduler", "DPM-Solver++ 3M (diffusers)",
                               {**_DPMPP, "solver_order": 3}),
    "unipc": BuiltinSampler(_D, "UniPCMultistepScheduler", "UniPC bh2 (diffusers)"),
    "deis": BuiltinSampler(_D, "DEISMultistepScheduler", "DEIS 3rd order (diffusers)"),
    "accel_ddim": BuiltinSampler(_ACCEL, "few_step_scheduler",
                                 "fastdiff's few-step sampler per step count (v2's eps-in-sigma update below 8 steps; "
                                 "x0 2nd order in log-SNR + free 3-point corrector at 8-14, its last step "
                                 "extrapolating x0 in alpha^2; x0 3rd order + corrector from 15; log-SNR grids), 1 "
                                 "eval/step"),
    "accel_ddim_v3": BuiltinSampler(_ACCEL, "v3_scheduler",
                                    "fastdiff v3's few-step sampler: x0 linear in log-SNR + free 3-point corrector on "
                                    "a log-SNR-uniform grid from 8 steps, v2's sampler below"),
    "accel_ddim_v2": BuiltinSampler(_ACCEL, "AcceleratedDDIMScheduler",
                                    "fastdiff v2's few-step sampler: accelerated DDIM update, eps linear in sigma, "
                                    "trailing grid below 10 steps, Karras from 10 (Li et al. 2024)",
                                    {"timestep_schedule": "auto"}),
    "accel_ddim_paper": BuiltinSampler(_ACCEL, "paper_scheduler",
                                       "accelerated DDIM, the paper's update verbatim (eps linear in alpha-bar; "
                                       "Li et al. 2024)"),
    "accel_ddpm": BuiltinSampler(_ACCEL, "AcceleratedDDIMScheduler",
                                 "accelerated DDPM, stochastic, 1 eval/step (Li et al. 2024)", {"stochastic": True}),
    "ddim_dualfast": BuiltinSampler(_DUAL, "DDIMDualFastScheduler", "DDIM + DualFast, the paper's form "
                                    "(Yu et al. 2025)"),
    "dpmpp_2m_dualfast": BuiltinSampler(_DUAL, "DPMSolverMultistepDualFastScheduler",
                                        "DPM-Solver++ 2M + DualFast, the paper's form (Yu et al. 2025)",
                                        {**_DPMPP, "solver_order": 2}),
    "unipc_dualfast": BuiltinSampler(_DUAL, "UniPCMultistepDualFastScheduler",
                                     "UniPC + DualFast, the paper's form (Yu et al. 2025)"),
    "accel_ddim_dualfast": BuiltinSampler(_DUAL, "AcceleratedDDIMDualFastScheduler",
                                          "fastdiff v2's few-step sampler + DualFast, the paper's form (Yu et al. "
                                          "2025)", {"timestep_schedule": "auto"}),  # accel_ddim_v2 + DualFast
}


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    factory: SchedulerFactory
    description: str


_REGISTERED: dict[str, SamplerSpec] = {}


def register_sampler(name: str, factory: SchedulerFactory, description: str) -> None:
    """Register ``factory(base_config) -> scheduler`` under ``name`` (replaces a built-in of the same name)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__}")
    _REGISTERED[name] = SamplerSpec(name, factory, description)


def available_samplers() -> list[str]:
    """All sampler names, sorted (imports neither torch nor diffusers)."""
    return sorted({*BUILTIN_SAMPLERS, *_REGISTERED})


def sampler_description(name: str) -> str:
    """The one-line description of sampler ``name`` (imports neither torch nor diffusers)."""
    return sampler_spec(name).description


def sampler_spec(name: str) -> SamplerSpec:
    """The :class:`SamplerSpec` of ``name``; ValueError naming the available samplers for an unknown name."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in BUILTIN_SAMPLERS:
        builtin = BUILTIN_SAMPLERS[name]
        return SamplerSpec(name, builtin.build, builtin.description)
    raise ValueError(f"unknown sampler {name!r}; available samplers: {', '.join(available_samplers())}")


def make_scheduler(name: str, base_config: Mapping[str, Any]) -> Any:
    """A fresh scheduler for sampler ``name``, configured from ``base_config`` (e.g. ``pipe.scheduler.config``)."""
    return sampler_spec(name).factory(base_config)
