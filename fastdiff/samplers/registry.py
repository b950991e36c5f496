"""Named samplers: a name -> a diffusers scheduler built from a pipeline's scheduler config.

``fastdiff compare`` and ``fastdiff sample`` take these names. Later modules register their own
samplers with :func:`register_sampler`; the diffusers baselines are registered here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

SchedulerFactory = Callable[[Mapping[str, Any]], Any]


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    factory: SchedulerFactory
    description: str


_REGISTRY: dict[str, SamplerSpec] = {}


def register_sampler(name: str, factory: SchedulerFactory, description: str) -> None:
    """Register ``factory(base_config) -> scheduler`` under ``name`` (re-registering replaces it)."""
    _REGISTRY[name] = SamplerSpec(name, factory, description)


def available_samplers() -> list[str]:
    _load_builtin_samplers()
    return sorted(_REGISTRY)


def sampler_spec(name: str) -> SamplerSpec:
    _load_builtin_samplers()
    if name not in _REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; available samplers: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def make_scheduler(name: str, base_config: Mapping[str, Any]) -> Any:
    """A fresh scheduler for sampler ``name``, configured from ``base_config`` (e.g. ``pipe.scheduler.config``)."""
    return sampler_spec(name).factory(base_config)


def _diffusers(cls_name: str, **overrides: Any) -> SchedulerFactory:
    def factory(config: Mapping[str, Any]) -> Any:
        import diffusers

        return getattr(diffusers, cls_name).from_config(config, **overrides)

    return factory


_BUILTINS_LOADED = False


def _load_builtin_samplers() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    register_sampler("ddim", _diffusers("DDIMScheduler"), "DDIM, eta 0 (diffusers)")
    register_sampler("ddpm", _diffusers("DDPMScheduler"), "DDPM ancestral (diffusers)")
    register_sampler("euler", _diffusers("EulerDiscreteScheduler"), "Euler (Karras et al. 2022; diffusers)")
    register_sampler("euler_a", _diffusers("EulerAncestralDiscreteScheduler"), "Euler ancestral (diffusers)")
    register_sampler("dpmpp_2m", _diffusers("DPMSolverMultistepScheduler", algorithm_type="dpmsolver++",
                                            solver_order=2), "DPM-Solver++ 2M (diffusers)")
    register_sampler("dpmpp_3m", _diffusers("DPMSolverMultistepScheduler", algorithm_type="dpmsolver++",
                                            solver_order=3), "DPM-Solver++ 3M (diffusers)")
    register_sampler("unipc", _diffusers("UniPCMultistepScheduler"), "UniPC bh2 (diffusers)")
    register_sampler("deis", _diffusers("DEISMultistepScheduler"), "DEIS 3rd order (diffusers)")
    # fastdiff's own samplers register themselves when their modules are imported.
    import importlib

    for module in ("fastdiff.samplers.accelerated_ddim", "fastdiff.samplers.dualfast"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
