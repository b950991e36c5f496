"""TGATE's moving parts: the caching schedule, the run state, and the diffusers hooks that apply them.

TGATE (Liu et al. 2024, "Cross-Attention Makes Inference Cumbersome in Text-to-Image Diffusion Models",
arXiv:2404.02747v1; TGATE-V2: "Faster Diffusion via Temporal Attention Decomposition", arXiv:2404.02747v2)
splits sampling into a semantics-planning phase (steps ``0 .. gate_step-1``, computed as usual) and a
fidelity-improving phase (steps ``gate_step ..``), where every cross-attention layer returns the output it
produced at step ``gate_step-1``, averaged over the unconditional and conditional halves of the CFG batch,
and classifier-free guidance is dropped. :func:`tgate_actions` is the schedule, after ``tgate_scheduler``
in the authors' ``tgate/tgate_utils.py``; :class:`TGateRun` follows one sampling run;
:class:`AttentionCacheHook` and :class:`DenoiserHook` act on it. The public API is in
:mod:`fastdiff.samplers.tgate`.
"""

from __future__ import annotations

import enum
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import ModelHook
from diffusers.utils import BaseOutput

ATTENTION_HOOK = "fastdiff_tgate"
DENOISER_HOOK = "fastdiff_tgate_denoiser"


class Action(enum.Enum):
    """What an attention layer does at one step."""

    COMPUTE = "compute"  # run it, keep nothing
    CACHE = "cache"  # run it and keep its output
    CACHE_GATE = "cache_gate"  # run it and keep its output; with CFG the kept output is the mean of the halves
    REUSE = "reuse"  # skip it and return the kept output


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


@dataclass
class _Entry:
    value: torch.Tensor
    at_gate: bool  # kept at the gate step: becomes the mix of the CFG halves on first reuse


@dataclass
class TGateRun:
    """State of one sampling run: where it is, whether it uses CFG, and the kept attention outputs.

    ``step`` is the 0-based index of the denoiser step under way. ``cfg`` is whether the pipeline runs the
    denoiser on a ``[uncond; cond]`` batch twice the size of the latents (``None`` until known).
    """

    gate_step: int
    self_attn: SelfAttnSchedule | None
    cond_weight: float = 0.5  # kept output = uncond + cond_weight * (cond - uncond); 0.5 is TGATE's mean
    step: int = 0
    num_steps: int | None = None
    cfg: bool | None = None
    denoiser_batch: int | None = None
    calls_this_step: int = 0
    last_timestep: float | None = None
    cross_action: Action = Action.COMPUTE
    self_action: Action = Action.COMPUTE
    drop_cfg: bool = False
    cache: dict[int, _Entry] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: {"computed": 0, "reused": 0})

    def begin(self, num_steps: int | None) -> None:
        """Start a new run (a pipeline call): forget the step, the CFG layout and every kept output."""
        if num_steps is not None and not 1 <= self.gate_step <= num_steps:
            raise ValueError(
                f"gate_step must lie in [1, {num_steps}] for a run of {num_steps} denoiser steps, got {self.gate_step}"
            )
        self.step, self.num_steps, self.cfg = 0, num_steps, None
        self.denoiser_batch, self.calls_this_step, self.last_timestep = None, 0, None
        self.cache.clear()
        self.idle()

    def idle(self) -> None:
        self.cross_action = self.self_action = Action.COMPUTE
        self.drop_cfg = False

    def enter_step(self) -> None:
        self.cross_action, self.self_action = tgate_actions(self.step, self.gate_step, self.self_attn)
        self.drop_cfg = self.cross_action is Action.REUSE and bool(self.cfg)

    def record_cfg(self, latent_batch: int) -> None:
        """The scheduler stepped ``latent_batch`` latents after the denoiser saw ``denoiser_batch`` rows."""
        n = self.denoiser_batch
        if n is None:
            return
        if n not in (latent_batch, 2 * latent_batch):
            raise ValueError(
                f"TGATE supports denoiser batches of B (no guidance) or 2B ([uncond; cond] CFG) rows for B latents; "
                f"this pipeline ran {n} rows for {latent_batch} latents"
            )
        self.cfg = n == 2 * latent_batch

    def store(self, key: int, value: torch.Tensor, action: Action) -> None:
        self.cache[key] = _Entry(value, at_gate=action is Action.CACHE_GATE)

    def load(self, key: int, batch: int) -> torch.Tensor | None:
        entry = self.cache.get(key)
        if entry is None:
            return None
        if entry.at_gate:
            if self.cfg:
                uncond, cond = entry.value.chunk(2)
                entry.value = torch.lerp(uncond, cond, self.cond_weight)
            entry.at_gate = False
        if entry.value.shape[0] != batch:
            raise RuntimeError(
                f"TGATE kept an attention output of batch {entry.value.shape[0]} but the layer now sees batch {batch}; "
                "the pipeline changed its batch layout within one run"
            )
        return entry.value


class AttentionCacheHook(ModelHook):
    """On one ``Attention`` module: compute, keep, or serve the kept output, as the run says.

    A call with ``encoder_hidden_states`` is cross-attention, one without is self-attention (the rule of the
    reference implementation). What is kept is the attention branch only: for layers with
    ``residual_connection`` the residual is subtracted before keeping and the current one added back on reuse.
    """

    def __init__(self, run: TGateRun, key: int) -> None:
        super().__init__()
        self.run, self.key = run, key

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        action = self.run.cross_action if context is not None else self.run.self_action
        residual = getattr(module, "residual_connection", False)
        rescale = getattr(module, "rescale_output_factor", 1.0)
        if action is Action.REUSE:
            kept = self.run.load(self.key, hidden.shape[0])
            if kept is not None:
                self.run.counts["reused"] += 1
                return (kept + hidden) / rescale if residual else kept
            action = Action.CACHE  # nothing kept yet (self-attention schedules may ask early): compute
        out = self.fn_ref.original_forward(*args, **kwargs)
        self.run.counts["computed"] += 1
        if action in (Action.CACHE, Action.CACHE_GATE):
            self.run.store(self.key, out * rescale - hidden if residual else out, action)
        return out


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor in nested tuples / lists / dicts / diffusers outputs."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, BaseOutput):
        return type(obj)(**{k: _map_tensors(v, fn) for k, v in obj.items()})
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


class DenoiserHook(ModelHook):
    """On the denoiser (``unet`` / ``transformer``): sets the step's actions and, after the gate with CFG,
    runs only the unconditional half of the batch and returns its output twice.

    The pipeline still builds ``torch.cat([latents] * 2)`` and still computes
    ``uncond + s * (cond - uncond)`` on ``noise_pred.chunk(2)``; with both halves equal that is exactly the
    single-branch prediction, so guidance is dropped without touching the pipeline. Every tensor argument
    whose leading dimension is the batch is sliced to its first half (latents, timesteps, text embeddings,
    masks, SDXL's ``added_cond_kwargs``, ControlNet residuals), matching the reference, which feeds the
    negative / null-text embeddings after the gate.
    """

    _is_stateful = True

    def __init__(self, run: TGateRun, on_call: Callable[[int, Any, torch.Tensor], None]) -> None:
        super().__init__()
        self.run, self.on_call = run, on_call

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.signature = inspect.signature(module.forward)
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        bound = self.signature.bind(*args, **kwargs)
        sample = next(iter(bound.arguments.values()))
        self.on_call(sample.shape[0], bound.arguments.get("timestep"), sample)
        try:
            if not self.run.drop_cfg:
                return self.fn_ref.original_forward(*args, **kwargs)
            batch = sample.shape[0]
            half = functools.partial(_first_half, batch=batch)
            for name, value in bound.arguments.items():
                bound.arguments[name] = _map_tensors(value, half)
            out = self.fn_ref.original_forward(*bound.args, **bound.kwargs)
            return _map_tensors(out, lambda x: torch.cat([x, x]) if x.ndim and x.shape[0] == batch // 2 else x)
        finally:
            self.run.idle()

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.run.begin(None)
        return module


def _first_half(x: torch.Tensor, batch: int) -> torch.Tensor:
    return x[: batch // 2] if x.ndim and x.shape[0] == batch else x
