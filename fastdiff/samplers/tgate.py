"""TGATE: cross-attention caching (and TGATE-V2 self-attention caching) as removable diffusers hooks.

TGATE (Liu et al. 2024, "Cross-Attention Makes Inference Cumbersome in Text-to-Image Diffusion Models",
arXiv:2404.02747v1) observes that cross-attention outputs converge within the first few sampling steps.
After a ``gate_step`` it serves every cross-attention layer from a cache (the mean of the layer's
unconditional and conditional outputs at the gate) and drops classifier-free guidance, so each later step
is one batch-halved denoiser call without cross-attention. TGATE-V2 ("Faster Diffusion via Temporal
Attention Decomposition", arXiv:2404.02747v2) also reuses self-attention outputs on a fixed schedule.

Usage::

    fastdiff.enable_tgate(pipe, gate_step=10)                # SD, SDXL, PixArt, the embedded digits model
    fastdiff.enable_tgate(pipe, 10, self_attn=dict(warm_up=2, sp_interval=5, fi_interval=1))  # TGATE-V2
    fastdiff.disable_tgate(pipe)                             # the pipeline is exactly as before

How it knows where it is, without the user passing the step (see :mod:`fastdiff.samplers.tgate_hooks`):

- a hook on the denoiser (``pipe.unet`` / ``pipe.transformer``) is told the step by two wrappers put on
  the pipeline's scheduler *instance*: ``set_timesteps`` starts a run (state reset, ``gate_step`` checked
  against the number of denoiser steps) and ``step`` advances it. Comparing the denoiser's batch with the
  scheduler's latent batch tells whether the pipeline runs CFG as ``[uncond; cond]``. Swapping
  ``pipe.scheduler`` after enabling is fine: the new scheduler is picked up at the next denoiser call.
- after the gate with CFG, the denoiser hook runs only the first (unconditional) half of every batched
  argument and returns that output twice; the pipeline's own ``noise_pred.chunk(2)`` and
  ``uncond + s * (cond - uncond)`` then give exactly the single-branch prediction.
- a hook on every cross-attention ``Attention`` module computes, keeps or serves the output.

Passing a bare denoiser (``enable_tgate(pipe.unet)``) works without a scheduler: each call is a step, a
timestep larger than the previous one starts a new run, and CFG is recognised by identical latent halves
(so two different prompts sharing one noise without CFG would be mistaken for CFG: pass the pipeline).

``gate_step`` counts denoiser evaluations (= inference steps for DDIM, DPM-Solver, UniPC, Euler; Heun
evaluates twice per step). Steps ``0 .. gate_step-1`` are unchanged, to float precision, with
``self_attn=None``. Joint-attention models (SD3, Flux and other MMDiTs) have no separate cross-attention
to cache and are rejected; so are pipelines that run CFG as separate denoiser calls.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import torch
from diffusers.hooks import HookRegistry
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention

from .tgate_hooks import (
    ATTENTION_HOOK,
    DENOISER_HOOK,
    AttentionCacheHook,
    DenoiserHook,
    SelfAttnSchedule,
    TGateRun,
)

__all__ = ["SelfAttnSchedule", "disable_tgate", "enable_tgate", "is_tgate_enabled"]

_STATE_ATTR = "_fastdiff_tgate"
_SELF_ATTN_KEYS = ("warm_up", "sp_interval", "fi_interval")


def enable_tgate(
    pipe_or_model: Any,
    gate_step: int = 10,
    self_attn: Mapping[str, int] | bool | None = None,
    cond_weight: float = 0.5,
) -> None:
    """Turn on TGATE (Liu et al. 2024, arXiv:2404.02747) for a diffusers pipeline or its denoiser.

    Args:
        pipe_or_model: a pipeline with a ``unet`` or ``transformer`` and a ``scheduler`` (SD, SDXL, PixArt,
            ``fastdiff.models.DigitsPipeline``, ...), or the denoiser module itself.
        gate_step: number of denoiser steps computed in full; from step ``gate_step`` (0-based) on,
            cross-attention is served from the cache and CFG is dropped. Must lie in ``[1, steps]``; the
            upper bound is checked when the pipeline sets its timesteps.
        self_attn: ``None`` (TGATE-V1, cross-attention only), ``True`` for the TGATE-V2 defaults, or a dict
            with any of ``warm_up`` (2), ``sp_interval`` (5), ``fi_interval`` (1).
        cond_weight: with CFG, the output kept at the gate is ``uncond + cond_weight * (cond - uncond)``.
            ``0.5`` is the paper's mean of the two halves; ``1`` keeps the conditional output; values above 1
            extrapolate like guidance and carry CFG's effect past the gate (fastdiff's option: on the
            embedded digits model at gate 10/25, class accuracy 0.63 -> 0.84 at 1 and 0.95 at 2, uncached
            0.98; ``benchmarks/attention_caching.py``). Ignored without CFG.

    Enabling again replaces the previous settings. Raises ``ValueError`` for models without
    cross-attention or with joint attention (SD3, Flux), ``TypeError`` for objects that are neither.
    """
    pipe, denoiser = _resolve(pipe_or_model)
    gate_step = _check_gate_step(gate_step)
    schedule = _check_self_attn(self_attn)
    cond_weight = check_cond_weight(cond_weight)
    cross, self_layers = _attention_layers(denoiser)
    if is_tgate_enabled(denoiser):
        disable_tgate(denoiser)
    layers = cross + (self_layers if schedule is not None else [])
    setattr(denoiser, _STATE_ATTR, _TGate(denoiser, pipe, gate_step, schedule, layers, cond_weight))


def disable_tgate(pipe_or_model: Any) -> None:
    """Remove TGATE's hooks and scheduler wrappers; the pipeline behaves (and looks) as before. No-op if off."""
    _, denoiser = _resolve(pipe_or_model)
    tgate = getattr(denoiser, _STATE_ATTR, None)
    if tgate is not None:
        tgate.remove()
        delattr(denoiser, _STATE_ATTR)


def is_tgate_enabled(pipe_or_model: Any) -> bool:
    """Whether :func:`enable_tgate` is active on this pipeline or denoiser."""
    return getattr(_resolve(pipe_or_model)[1], _STATE_ATTR, None) is not None


# ----------------------------------------------------------------------------------------------------
# validation and discovery


def _resolve(obj: Any) -> tuple[Any, torch.nn.Module]:
    if isinstance(obj, torch.nn.Module):
        return None, obj
    for name in ("unet", "transformer"):
        denoiser = getattr(obj, name, None)
        if isinstance(denoiser, torch.nn.Module):
            if getattr(obj, "scheduler", None) is None:
                raise TypeError(f"pipe_or_model: {type(obj).__name__} has a {name} but no scheduler")
            return obj, denoiser
    raise TypeError(
        "pipe_or_model must be a diffusers pipeline with a `unet` or `transformer` and a `scheduler`, or a "
        f"denoiser torch.nn.Module; got {type(obj).__name__}"
    )


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")
    return value


def _check_gate_step(gate_step: Any) -> int:
    if isinstance(gate_step, bool) or not isinstance(gate_step, int):
        raise TypeError(f"gate_step must be an int in [1, num_inference_steps], got {gate_step!r}")
    if gate_step < 1:
        raise ValueError(f"gate_step must lie in [1, num_inference_steps], got {gate_step}")
    return gate_step


def check_cond_weight(cond_weight: Any) -> float:
    """``cond_weight`` as a float; raises naming the argument and the allowed values."""
    if isinstance(cond_weight, bool) or not isinstance(cond_weight, (int, float)) or not math.isfinite(cond_weight):
        raise TypeError(f"cond_weight must be a finite number (0.5: the paper's mean), got {cond_weight!r}")
    if cond_weight < 0:
        raise ValueError(f"cond_weight must be >= 0 (0.5: the paper's mean, 1: conditional only), got {cond_weight}")
    return float(cond_weight)


def _check_self_attn(self_attn: Any) -> SelfAttnSchedule | None:
    if self_attn is None or self_attn is False:
        return None
    if self_attn is True:
        return SelfAttnSchedule()
    if not isinstance(self_attn, Mapping):
        raise TypeError(f"self_attn must be None, True or a dict with keys {_SELF_ATTN_KEYS}, got {self_attn!r}")
    unknown = sorted(set(self_attn) - set(_SELF_ATTN_KEYS))
    if unknown:
        raise ValueError(f"self_attn has unknown keys {unknown}; allowed keys are {list(_SELF_ATTN_KEYS)}")
    lows = {"warm_up": 0, "sp_interval": 1, "fi_interval": 1}
    return SelfAttnSchedule(**{k: _check_int(v, f"self_attn[{k!r}]", lows[k]) for k, v in self_attn.items()})


def _attention_layers(denoiser: torch.nn.Module) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """``(cross-attention layers, self-attention layers)``; raises for joint or missing cross-attention."""
    cross, self_layers, joint = [], [], []
    for name, module in denoiser.named_modules():
        if not isinstance(module, (Attention, AttentionModuleMixin)):
            continue
        if getattr(module, "added_kv_proj_dim", None) is not None:
            joint.append(name)
        elif getattr(module, "is_cross_attention", False):
            cross.append(module)
        else:
            self_layers.append(module)
    kind = type(denoiser).__name__
    if joint:
        raise ValueError(
            f"TGATE does not support joint (text + image) attention, used by {kind} in {joint[:3]}"
            f"{' ...' if len(joint) > 3 else ''}: SD3, Flux and other MMDiT models have no separate "
            "cross-attention output to cache"
        )
    if not cross:
        raise ValueError(
            f"{kind} has no cross-attention layers: TGATE caches cross-attention, so it needs a conditional "
            "model such as UNet2DConditionModel (SD, SDXL) or PixArtTransformer2DModel"
        )
    return cross, self_layers


# ----------------------------------------------------------------------------------------------------
# the installed hooks and scheduler wrappers


class _TGate:
    """TGATE installed on one denoiser: its run state, hooks and scheduler wrappers, and how to undo them."""

    def __init__(self, denoiser: torch.nn.Module, pipe: Any, gate_step: int, schedule: SelfAttnSchedule | None,
                 layers: list[torch.nn.Module], cond_weight: float = 0.5) -> None:
        self.denoiser, self.pipe = denoiser, pipe
        self.run = TGateRun(gate_step, schedule, cond_weight)
        self.scheduler: Any = None
        self._scheduler_saved: dict[str, Any] = {}
        self._wrappers: dict[str, Any] = {}
        self._installed: list[tuple[torch.nn.Module, str, bool, bool]] = []
        for key, module in enumerate(layers):
            self._register(module, AttentionCacheHook(self.run, key), ATTENTION_HOOK)
        self._register(denoiser, DenoiserHook(self.run, self._on_denoiser_call), DENOISER_HOOK)
        _invalidate_registry_caches(denoiser)
        if pipe is not None:
            self._tap(pipe.scheduler)

    def _register(self, module: torch.nn.Module, hook: Any, name: str) -> None:
        had_registry, had_forward = hasattr(module, "_diffusers_hook"), "forward" in module.__dict__
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
        self._installed.append((module, name, had_registry, had_forward))

    def remove(self) -> None:
        self._untap()
        for module, name, had_registry, had_forward in reversed(self._installed):
            registry = module._diffusers_hook
            registry.remove_hook(name, recurse=False)
            if not had_registry and not registry.hooks:
                del module._diffusers_hook
                if not had_forward:
                    module.__dict__.pop("forward", None)
        self._installed.clear()
        self.run.begin(None)
        _invalidate_registry_caches(self.denoiser)

    # -- where the run is -------------------------------------------------------------------------
    def _on_denoiser_call(self, batch: int, timestep: Any, sample: torch.Tensor) -> None:
        run = self.run
        if self.pipe is not None:
            if self.pipe.scheduler is not self.scheduler:  # swapped after enable: its set_timesteps ran untapped
                self._tap(self.pipe.scheduler)
                run.begin(_num_steps(self.scheduler))
            elif run.num_steps is not None and run.step >= run.num_steps:  # a finished run, timesteps not set again
                run.begin(run.num_steps)
            elif run.calls_this_step:
                raise RuntimeError(
                    "TGATE: the denoiser was called twice in one scheduler step. TGATE needs sequential sampling "
                    "with CFG batched as [uncond; cond] in one call (not parallel samplers or separate CFG "
                    "passes); call fastdiff.disable_tgate first"
                )
            run.calls_this_step += 1
        else:
            t = _scalar_timestep(timestep)
            if run.last_timestep is not None:
                if t > run.last_timestep:
                    run.begin(None)
                else:
                    run.step += 1
            run.last_timestep = t
            if run.step == 0:
                half = batch // 2
                run.cfg = batch % 2 == 0 and torch.equal(sample[:half], sample[half:])
        run.denoiser_batch = batch
        run.enter_step()

    def _tap(self, scheduler: Any) -> None:
        """Wrap ``scheduler.set_timesteps`` / ``scheduler.step`` on the instance (signatures preserved)."""
        self._untap()
        run = self.run
        set_timesteps, step = scheduler.set_timesteps, scheduler.step

        def tapped_set_timesteps(*args: Any, **kwargs: Any) -> Any:
            out = set_timesteps(*args, **kwargs)
            run.begin(_num_steps(scheduler))
            return out

        def tapped_step(*args: Any, **kwargs: Any) -> Any:
            latents = kwargs.get("sample", args[2] if len(args) > 2 else None)
            run.record_cfg((latents if latents is not None else (args or [kwargs.get("model_output")])[0]).shape[0])
            out = step(*args, **kwargs)
            run.step += 1
            run.calls_this_step = 0
            if run.num_steps is not None and run.step >= run.num_steps:
                run.cache.clear()  # the run is over: free the kept outputs
            return out

        self._wrappers = {
            "set_timesteps": _wraps(tapped_set_timesteps, set_timesteps),
            "step": _wraps(tapped_step, step),
        }
        self._scheduler_saved = {name: scheduler.__dict__.get(name, _MISSING) for name in self._wrappers}
        for name, wrapper in self._wrappers.items():
            setattr(scheduler, name, wrapper)
        self.scheduler = scheduler

    def _untap(self) -> None:
        if self.scheduler is None:
            return
        for name, wrapper in self._wrappers.items():
            if self.scheduler.__dict__.get(name) is wrapper:
                saved = self._scheduler_saved[name]
                if saved is _MISSING:
                    delattr(self.scheduler, name)
                else:
                    setattr(self.scheduler, name, saved)
        self.scheduler, self._wrappers, self._scheduler_saved = None, {}, {}


_MISSING = object()


def _wraps(wrapper: Any, wrapped: Any) -> Any:
    return functools.update_wrapper(wrapper, wrapped)  # keeps inspect.signature: pipelines read step's parameters


def _num_steps(scheduler: Any) -> int | None:
    timesteps = getattr(scheduler, "timesteps", None)
    return None if timesteps is None else len(timesteps)


def _scalar_timestep(timestep: Any) -> float:
    if timestep is None:
        raise ValueError("TGATE on a bare denoiser needs its `timestep` argument to track the sampling step")
    if isinstance(timestep, torch.Tensor):
        flat = timestep.reshape(-1)
        if flat.numel() > 1 and not bool(torch.all(flat == flat[0])):
            raise ValueError(
                "TGATE needs one timestep per denoiser call (sequential sampling); got several different timesteps "
                "in one batch (parallel samplers are not supported)"
            )
        return float(flat[0])
    return float(timestep)


def _invalidate_registry_caches(denoiser: torch.nn.Module) -> None:
    """diffusers registries cache their child registries; ours came or went, so drop those caches."""
    for module in denoiser.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            registry._child_registries_cache = None
