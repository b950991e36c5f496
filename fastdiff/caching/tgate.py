"""TGATE: cross-attention caching (and TGATE-V2 self-attention caching) as removable diffusers hooks.

TGATE (Liu et al. 2024, "Cross-Attention Makes Inference Cumbersome in Text-to-Image Diffusion Models",
arXiv:2404.02747v1) observes that cross-attention outputs converge within the first few sampling steps.
It splits sampling into a semantics-planning phase (steps ``0 .. gate_step-1``, computed as usual) and a
fidelity-improving phase (steps ``gate_step ..``), where every cross-attention layer returns the output it
produced at step ``gate_step-1``, averaged over the unconditional and conditional halves of the CFG batch,
and classifier-free guidance is dropped: each later step is one batch-halved denoiser call without
cross-attention. TGATE-V2 ("Faster Diffusion via Temporal Attention Decomposition", arXiv:2404.02747v2)
also reuses self-attention outputs on a fixed schedule. :func:`tgate_actions` is the schedule, after
``tgate_scheduler`` in the authors' ``tgate/tgate_utils.py``.

Usage::

    fastdiff.enable_tgate(pipe, gate_step=10)                # SD, SDXL, PixArt, the embedded digits models
    fastdiff.enable_tgate(pipe, 10, self_attn=dict(warm_up=2, sp_interval=5, fi_interval=1))  # TGATE-V2
    fastdiff.enable_tgate(pipe, 10, guidance="residual")     # fastdiff's option: guidance survives the gate
    fastdiff.disable_tgate(pipe)                             # the pipeline is exactly as before

The step and the CFG layout come from :mod:`fastdiff.caching.engine` (scheduler taps and a denoiser hook);
``gate_step`` counts the denoiser evaluations that run (= inference steps for DDIM, DPM-Solver, UniPC, Euler;
Heun evaluates twice per step; img2img with ``strength < 1`` runs fewer). Steps ``0 .. gate_step-1`` are
unchanged, to float precision, with ``self_attn=None``. Joint-attention models (SD3, Flux and other MMDiTs)
have no separate cross-attention to cache and are rejected; so are pipelines that run CFG as separate
denoiser calls. TGATE is one part of :func:`fastdiff.enable_cache` (``tgate=...``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import ModelHook
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention

from .engine import Action, Layout, Run, check_integral, split_layout

__all__ = ["Action", "SelfAttnSchedule", "TGateSettings", "disable_tgate", "enable_tgate", "is_tgate_enabled",
           "tgate_actions"]

ATTENTION_HOOK = "fastdiff_tgate"
GUIDANCE_MODES = ("drop", "residual")
_SELF_ATTN_KEYS = ("warm_up", "sp_interval", "fi_interval")


@dataclass(frozen=True)
class SelfAttnSchedule:
    """TGATE-V2's self-attention caching schedule (paper defaults for SDXL at 25 steps).

    Before the gate, self-attention is computed for steps ``< warm_up``, recomputed (and kept) at
    ``warm_up`` and every ``sp_interval``-th step, and reused in between; after the gate it is recomputed
    every ``fi_interval``-th step.
    """

    warm_up: int = 2
    sp_interval: int = 5
    fi_interval: int = 1


def tgate_actions(step: int, gate_step: int, self_attn: SelfAttnSchedule | None) -> tuple[Action, Action]:
    """``(cross-attention action, self-attention action)`` at 0-based ``step`` (``tgate_scheduler`` in
    the TGATE repo): compute before the gate, keep at ``gate_step - 1``, reuse from ``gate_step`` on."""
    if step < gate_step - 1:
        if self_attn is None or step < self_attn.warm_up:
            return Action.COMPUTE, Action.COMPUTE
        if step == self_attn.warm_up or step % self_attn.sp_interval == 0:
            return Action.COMPUTE, Action.CACHE
        return Action.COMPUTE, Action.REUSE
    if step == gate_step - 1:
        return Action.CACHE_GATE, (Action.COMPUTE if self_attn is None else Action.CACHE_GATE)
    if self_attn is None:
        return Action.REUSE, Action.COMPUTE
    return Action.REUSE, (Action.CACHE if step % self_attn.fi_interval == 0 else Action.REUSE)


@dataclass(frozen=True)
class TGateSettings:
    """TGATE as a part of fastdiff's cache (validated by :func:`tgate_settings`).

    ``guidance="drop"`` is the paper: after the gate the unconditional branch runs alone and guidance is
    gone; the kept cross-attention output is ``uncond + cond_weight * (cond - uncond)`` (0.5: the paper's
    mean). ``guidance="residual"`` (fastdiff's option) runs the conditional branch after the gate and
    rebuilds the unconditional output from ``uncond - cond`` kept at the gate step, so guidance survives;
    its kept cross-attention is the conditional half (``cond_weight`` 1) unless told otherwise.
    """

    gate_step: int
    self_attn: SelfAttnSchedule | None = None
    cond_weight: float = 0.5
    guidance: str = "drop"


def tgate_settings(gate_step: Any, self_attn: Any = None, cond_weight: Any = None, guidance: Any = "drop") -> TGateSettings:
    gate_step = check_integral(gate_step, "gate_step", 1, "an int in [1, num_inference_steps]")
    if guidance not in GUIDANCE_MODES:
        raise ValueError(f"guidance must be one of {GUIDANCE_MODES} ('drop': the paper), got {guidance!r}")
    if cond_weight is None:
        cond_weight = 1.0 if guidance == "residual" else 0.5
    return TGateSettings(gate_step, _check_self_attn(self_attn), check_cond_weight(cond_weight), guidance)


def enable_tgate(
    pipe_or_model: Any,
    gate_step: int = 10,
    self_attn: Mapping[str, int] | bool | None = None,
    cond_weight: float | None = None,
    guidance: str = "drop",
) -> None:
    """Turn on TGATE (Liu et al. 2024, arXiv:2404.02747) for a diffusers pipeline or its denoiser.

    Args:
        pipe_or_model: a pipeline with a ``unet`` or ``transformer`` and a ``scheduler`` (SD, SDXL, PixArt,
            ``fastdiff.models.DigitsPipeline``, ...), or the denoiser module itself.
        gate_step: number of denoiser steps computed in full (any integral number); from step ``gate_step``
            (0-based) on, cross-attention is served from the cache and CFG is dropped. Must lie in
            ``[1, steps]`` where steps are those that run (checked at the run's first denoiser call).
        self_attn: ``None`` (TGATE-V1, cross-attention only), ``True`` for the TGATE-V2 defaults, or a dict
            with any of ``warm_up`` (2), ``sp_interval`` (5), ``fi_interval`` (1).
        cond_weight: with CFG, the output kept at the gate is ``uncond + cond_weight * (cond - uncond)``.
            Default 0.5 (the paper's mean) with ``guidance="drop"``, 1 with ``"residual"``; values above 1
            extrapolate like guidance. Ignored without CFG.
        guidance: ``"drop"`` (the paper) or ``"residual"`` (fastdiff's: guidance survives the gate through
            the ``uncond - cond`` output residual kept at the gate step; see :class:`TGateSettings`).

    Enabling again (or :func:`fastdiff.enable_cache`) replaces the previous settings. Raises ``ValueError``
    for models without cross-attention or with joint attention (SD3, Flux), ``TypeError`` for objects that
    are neither pipelines nor denoisers.
    """
    from .cache import install

    install(pipe_or_model, tgate=tgate_settings(gate_step, self_attn, cond_weight, guidance), features=None)


def disable_tgate(pipe_or_model: Any) -> None:
    """Remove TGATE's hooks and scheduler taps; the pipeline behaves (and looks) as before. No-op if off."""
    from .cache import installed, uninstall

    cache = installed(pipe_or_model)
    if cache is not None and cache.settings.tgate is not None:
        uninstall(pipe_or_model)


def is_tgate_enabled(pipe_or_model: Any) -> bool:
    """Whether TGATE (alone or as a part of :func:`fastdiff.enable_cache`) is active on this pipeline or denoiser."""
    from .cache import installed

    cache = installed(pipe_or_model)
    return cache is not None and cache.settings.tgate is not None


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
    return SelfAttnSchedule(**{k: check_integral(v, f"self_attn[{k!r}]", lows[k]) for k, v in self_attn.items()})


def attention_layers(denoiser: torch.nn.Module) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
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


def attention_hooks(denoiser: torch.nn.Module, run: Run, settings: TGateSettings) -> list[tuple[Any, ModelHook, str]]:
    cross, self_layers = attention_layers(denoiser)
    layers = cross + (self_layers if settings.self_attn is not None else [])
    return [(m, AttentionCacheHook(run, ("tgate", i), settings.cond_weight), ATTENTION_HOOK) for i, m in enumerate(layers)]


@dataclass
class _Kept:
    value: torch.Tensor
    layout: Layout
    at_gate: bool  # kept at the gate step: becomes the mix of the CFG halves on first reuse
    mixed: bool = False  # the mix: one value for whichever half runs


class AttentionCacheHook(ModelHook):
    """On one ``Attention`` module: compute, keep, or serve the kept output, as the step's plan says.

    A call with ``encoder_hidden_states`` is cross-attention, one without is self-attention (the rule of the
    reference implementation). What is kept is the attention branch only: for layers with
    ``residual_connection`` the residual is subtracted before keeping and the current one added back on reuse.
    A kept output that does not fit the rows of this call (CFG switched off mid-run) is recomputed.
    """

    def __init__(self, run: Run, key: Any, cond_weight: float) -> None:
        super().__init__()
        self.run, self.key, self.cond_weight = run, key, cond_weight

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        run = self.run
        hidden = args[0] if args else kwargs["hidden_states"]
        context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        action = run.plan.cross if context is not None else run.plan.self_attn
        residual = getattr(module, "residual_connection", False)
        rescale = getattr(module, "rescale_output_factor", 1.0)
        if action is Action.REUSE:
            kept = self._load(hidden.shape[0])
            if kept is not None:
                run.counts["reused"] += 1
                return (kept + hidden) / rescale if residual else kept
            action = Action.CACHE  # nothing fitting kept yet (self-attention schedules may ask early): compute
        out = self.fn_ref.original_forward(*args, **kwargs)
        run.counts["computed"] += 1
        if action in (Action.CACHE, Action.CACHE_GATE):
            value = out * rescale - hidden if residual else out
            run.store[self.key] = _Kept(value, run.layout or Layout.SINGLE, at_gate=action is Action.CACHE_GATE)
        return out

    def _load(self, batch: int) -> torch.Tensor | None:
        run, entry = self.run, self.run.store.get(self.key)
        if entry is None:
            return None
        layout = run.resolve(entry.layout)
        if entry.at_gate:
            if layout is Layout.PENDING:
                return None
            if layout is Layout.BOTH:
                entry.value = torch.lerp(*entry.value.chunk(2), self.cond_weight)
            entry.at_gate, entry.mixed = False, True
        value = entry.value if entry.mixed else split_layout(entry.value, layout, run.layout or Layout.SINGLE)
        return value if value is not None and value.shape[0] == batch else None
