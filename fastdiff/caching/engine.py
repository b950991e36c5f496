"""fastdiff's caching engine: where a sampling run is, what each step computes, and how that is undone.

Every cache in :mod:`fastdiff.caching` (TGATE, deep-feature reuse, block caching, CFG-residual reuse) is a
set of diffusers hooks (``diffusers.hooks.HookRegistry``) that read one shared :class:`Run`:

- a :class:`DenoiserHook` on the denoiser (``pipe.unet`` / ``pipe.transformer``) learns the step, the
  classifier-free-guidance (CFG) layout of *this* call and asks the planner for the step's :class:`StepPlan`;
  it runs the whole ``[uncond; cond]`` batch, only its conditional half (the unconditional output rebuilt
  from a cached residual) or only its unconditional half (guidance dropped, as TGATE does);
- hooks on inner modules (attention layers, UNet blocks, transformer blocks) compute, keep or serve outputs
  as the plan says, keyed by which rows ran (``Layout``);
- two :class:`SchedulerTap` objects on the pipeline's scheduler *instance* tell the run where it is:
  ``set_timesteps`` starts a run and ``step`` ends a step. The steps that run are counted from the first
  denoiser call, after ``strength < 1`` pipelines (img2img) have set the scheduler's ``begin_index``.

:class:`Installation` registers all of that and removes it again, leaving every module and the scheduler
as they were (``__dict__`` included), also on a ``copy.deepcopy`` of the pipeline.
"""

from __future__ import annotations

import enum
import functools
import inspect
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.utils import BaseOutput

DENOISER_HOOK = "fastdiff_cache_denoiser"


class Action(enum.Enum):
    """What a cached module does at one step."""

    COMPUTE = "compute"  # run it, keep nothing
    CACHE = "cache"  # run it and keep its output
    CACHE_GATE = "cache_gate"  # TGATE: run it and keep its output; with CFG the kept output mixes the halves
    REUSE = "reuse"  # skip it and serve the kept output


class CFG(enum.Enum):
    """Which rows of a ``[uncond; cond]`` CFG batch the denoiser runs at one step."""

    FULL = "full"  # both halves (or the single batch without CFG)
    COND = "cond"  # the conditional half; uncond = cond + (uncond - cond) kept at the last FULL step
    UNCOND = "uncond"  # the unconditional half, returned twice: guidance dropped (TGATE)


class Layout(str, enum.Enum):
    """Which rows a denoiser call runs: both CFG halves, one of them, a batch without CFG, or not known yet
    (step 0, before the scheduler has shown the latent batch)."""

    BOTH = "both"
    COND = "cond"
    UNCOND = "uncond"
    SINGLE = "single"
    PENDING = "pending"


@dataclass(frozen=True)
class StepPlan:
    cfg: CFG = CFG.FULL
    cross: Action = Action.COMPUTE  # TGATE: cross-attention layers
    self_attn: Action = Action.COMPUTE  # TGATE-V2: self-attention layers
    features: Action = Action.COMPUTE  # deep features (UNet) / block residuals (transformer)


IDLE = StepPlan()


class Planner(Protocol):
    """Decides every step's plan; ``start`` is called once per run, when its steps are known."""

    needs_delta: bool  # whether FULL CFG steps keep (uncond - cond) for later COND steps

    def start(self, run: Run) -> None: ...

    def plan(self, run: Run) -> StepPlan: ...

    def step_done(self, run: Run) -> None: ...


def check_integral(value: Any, name: str, low: int, allowed: str | None = None) -> int:
    """``value`` as an int ``>= low``; numpy and other integral numbers are accepted, bools are not."""
    allowed = allowed or f"an int >= {low}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {allowed}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return int(value)


@dataclass
class Run:
    """State of one sampling run (one pipeline call): where it is, its CFG layout, and what is kept.

    ``step`` is the 0-based index of the denoiser step under way, counted over the steps that run.
    ``num_steps`` / ``timesteps`` are those steps, known from the first denoiser call on (pipeline mode).
    ``first_cfg`` is whether the run started with a ``[uncond; cond]`` batch twice the latent batch.
    """

    step: int = 0
    num_steps: int | None = None
    timesteps: list[float] | None = None
    started: bool = False
    latent_batch: int | None = None
    first_cfg: bool | None = None
    base_batch: int | None = None  # bare-denoiser mode: the batch of step 0
    denoiser_batch: int | None = None  # rows of the last denoiser call
    calls_this_step: int = 0
    last_timestep: float | None = None
    timestep: float | None = None
    plan: StepPlan = IDLE
    layout: Layout | None = None
    delta: list[torch.Tensor] | None = None  # (uncond - cond) of every output tensor at the last FULL step
    delta_layout: Layout | None = None
    store: dict[Any, Any] = field(default_factory=dict)  # kept outputs of the inner hooks
    counts: dict[str, int] = field(default_factory=lambda: {"computed": 0, "reused": 0})

    def begin(self) -> None:
        """Forget the step, the CFG layout and every kept output."""
        self.step, self.num_steps, self.timesteps, self.started = 0, None, None, False
        self.latent_batch = self.first_cfg = self.base_batch = self.denoiser_batch = None
        self.calls_this_step, self.last_timestep, self.timestep = 0, None, None
        self.delta = self.delta_layout = None
        self.store.clear()
        self.idle()

    def idle(self) -> None:
        self.plan, self.layout = IDLE, None

    @property
    def cfg_known(self) -> bool:
        return self.first_cfg is not None

    def resolve(self, layout: Layout) -> Layout:
        """A kept output's layout, with ``PENDING`` (kept at step 0) resolved once the CFG layout is known."""
        if layout is Layout.PENDING and self.first_cfg is not None:
            return Layout.BOTH if self.first_cfg else Layout.SINGLE
        return layout


# ----------------------------------------------------------------------------------------------------
# tensors in nested outputs


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor in nested tuples / lists / dicts / diffusers outputs."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, BaseOutput):
        return type(obj)(**{k: map_tensors(v, fn) for k, v in obj.items()})
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def zip_tensors(a: Any, b: Any, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` on matching tensors of two structures of the same shape (e.g. two outputs of one module)."""
    if isinstance(a, torch.Tensor):
        return fn(a, b)
    if isinstance(a, BaseOutput):
        return type(a)(**{k: zip_tensors(v, b[k], fn) for k, v in a.items()})
    if isinstance(a, dict):
        return {k: zip_tensors(v, b[k], fn) for k, v in a.items()}
    if isinstance(a, (tuple, list)):
        return type(a)(zip_tensors(x, y, fn) for x, y in zip(a, b))
    return a


def tensors_of(obj: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    map_tensors(obj, lambda x: found.append(x) or x)
    return found


def half(obj: Any, batch: int, second: bool) -> Any:
    """The first or second half of every tensor whose leading dimension is ``batch``."""
    def cut(x: torch.Tensor) -> torch.Tensor:
        if not x.ndim or x.shape[0] != batch:
            return x
        return x[batch // 2:] if second else x[: batch // 2]
    return map_tensors(obj, cut)


def split_layout(value: Any, layout: Layout, want: Layout) -> Any | None:
    """``value`` kept with rows ``layout`` as rows ``want``, or ``None`` when it does not hold them."""
    if layout is want:
        return value
    if layout is Layout.BOTH and want in (Layout.COND, Layout.UNCOND):
        rows = tensors_of(value)[0].shape[0]
        return half(value, rows, second=want is Layout.COND)
    return None


# ----------------------------------------------------------------------------------------------------
# the denoiser hook


class DenoiserHook(ModelHook):
    """On the denoiser: sets the step's plan and runs the rows the plan asks for.

    ``CFG.UNCOND`` runs the first half of every batched argument and returns its output twice, so the
    pipeline's own ``uncond + s * (cond - uncond)`` gives the single-branch prediction (TGATE).
    ``CFG.COND`` runs the second half and returns ``[cond + delta; cond]``, where ``delta = uncond - cond``
    was kept at the last full step, so the pipeline computes ``cond + (s - 1) * (cond - uncond)_kept``:
    guidance survives with the kept residual (FasterCache's CFG-Cache, Lv et al. 2024, arXiv:2410.19355,
    Eq. 9-10, without its frequency split). Every tensor argument whose leading dimension is the batch is
    sliced (latents, timesteps, embeddings, masks, ``added_cond_kwargs``, ControlNet residuals).
    """

    _is_stateful = True

    def __init__(self, owner: Installation) -> None:
        super().__init__()
        self.owner = owner

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.signature = inspect.signature(module.forward)
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        bound = self.signature.bind(*args, **kwargs)
        sample = next(iter(bound.arguments.values()))
        run = self.owner.run
        self.owner.on_call(sample.shape[0], bound.arguments.get("timestep"), sample)
        try:
            batch = sample.shape[0]
            mode = run.plan.cfg if run.layout in (Layout.COND, Layout.UNCOND) else CFG.FULL
            if mode is CFG.FULL:
                out = self.fn_ref.original_forward(*args, **kwargs)
                if self.owner.planner.needs_delta and run.layout in (Layout.BOTH, Layout.PENDING) and batch % 2 == 0:
                    run.delta = [u - c for u, c in (x.chunk(2) for x in tensors_of(out) if x.ndim and x.shape[0] == batch)]
                    run.delta_layout = run.layout
                return out
            for name, value in bound.arguments.items():
                bound.arguments[name] = half(value, batch, second=mode is CFG.COND)
            out = self.fn_ref.original_forward(*bound.args, **bound.kwargs)
            if mode is CFG.UNCOND:
                return map_tensors(out, lambda x: torch.cat([x, x]) if x.ndim and x.shape[0] == batch // 2 else x)
            deltas = iter(run.delta)

            def rebuild(x: torch.Tensor) -> torch.Tensor:
                return torch.cat([x + next(deltas), x]) if x.ndim and x.shape[0] == batch // 2 else x

            return map_tensors(out, rebuild)
        finally:
            run.idle()

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.owner.run.begin()
        return module


# ----------------------------------------------------------------------------------------------------
# scheduler taps


class SchedulerTap:
    """``set_timesteps`` / ``step`` of one scheduler instance, wrapped (an object, not a closure, so that
    ``copy.deepcopy`` of a pipeline copies it along with the scheduler and run it belongs to)."""

    def __init__(self, owner: Installation, scheduler: Any, name: str) -> None:
        self.owner, self.scheduler, self.name = owner, scheduler, name
        self.had_own = name in scheduler.__dict__
        self.saved = scheduler.__dict__.get(name)
        self.inner = getattr(scheduler, name)
        functools.update_wrapper(self, self.inner)  # keeps inspect.signature: pipelines read step's parameters

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.name == "set_timesteps":
            out = self.inner(*args, **kwargs)
            self.owner.run.begin()
            return out
        return self.owner.on_step(self.inner, args, kwargs)

    def restore(self) -> None:
        if self.scheduler.__dict__.get(self.name) is not self:
            return
        if self.had_own:
            setattr(self.scheduler, self.name, self.saved)
        else:
            delattr(self.scheduler, self.name)


# ----------------------------------------------------------------------------------------------------
# installation


class Installation:
    """One cache installed on one denoiser: its run, planner, hooks and scheduler taps, and their removal."""

    def __init__(self, denoiser: torch.nn.Module, pipe: Any, planner: Planner,
                 hooks: list[tuple[torch.nn.Module, ModelHook, str]], run: Run, label: str = "fastdiff cache") -> None:
        self.denoiser, self.pipe, self.planner, self.label = denoiser, pipe, planner, label
        self.run = run
        self.scheduler: Any = None
        self._taps: list[SchedulerTap] = []
        self._installed: list[tuple[torch.nn.Module, str, bool, bool]] = []
        for module, hook, name in hooks:
            self._register(module, hook, name)
        self._register(denoiser, DenoiserHook(self), DENOISER_HOOK)
        invalidate_registry_caches(denoiser)
        if pipe is not None:
            self._tap(pipe.scheduler)

    def _register(self, module: torch.nn.Module, hook: ModelHook, name: str) -> None:
        had_registry, had_forward = hasattr(module, "_diffusers_hook"), "forward" in module.__dict__
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
        self._installed.append((module, name, had_registry, had_forward))

    def remove(self) -> None:
        for tap in self._taps:
            tap.restore()
        self._taps, self.scheduler = [], None
        for module, name, had_registry, had_forward in reversed(self._installed):
            registry = module._diffusers_hook
            registry.remove_hook(name, recurse=False)
            if not had_registry and not registry.hooks:
                del module._diffusers_hook
                if not had_forward:
                    module.__dict__.pop("forward", None)
        self._installed.clear()
        self.run.begin()
        invalidate_registry_caches(self.denoiser)

    def _tap(self, scheduler: Any) -> None:
        for tap in self._taps:
            tap.restore()
        self._taps = [SchedulerTap(self, scheduler, name) for name in ("set_timesteps", "step")]
        for tap in self._taps:
            setattr(scheduler, tap.name, tap)
        self.scheduler = scheduler

    # -- where the run is -------------------------------------------------------------------------
    def on_call(self, batch: int, timestep: Any, sample: torch.Tensor) -> None:
        run = self.run
        t = scalar_timestep(timestep, self.label)
        if self.pipe is not None:
            if self.pipe.scheduler is not self.scheduler:  # swapped after enable: its set_timesteps ran untapped
                self._tap(self.pipe.scheduler)
                run.begin()
            elif run.num_steps is not None and run.step >= run.num_steps:  # a finished run: a new one starts
                run.begin()
            elif run.calls_this_step:
                if run.step == 0:  # direct calls before any step (or after a run): uncached, each starts afresh
                    run.begin()
                else:
                    raise RuntimeError(
                        f"{self.label}: the denoiser was called twice in one scheduler step. Caching needs "
                        "sequential sampling with CFG batched as [uncond; cond] in one call (not parallel samplers "
                        "or separate CFG passes); disable the cache first"
                    )
            run.calls_this_step += 1
            if not run.started:
                self._start_pipeline_run(t)
            cfg = None if run.latent_batch is None else _cfg_of(batch, run.latent_batch, self.label)
        else:
            if run.last_timestep is not None:
                if t is not None and t > run.last_timestep:
                    run.begin()
                else:
                    run.step += 1
            run.last_timestep = t
            if run.step == 0:
                h = batch // 2
                run.first_cfg = batch % 2 == 0 and torch.equal(sample[:h], sample[h:])
                run.base_batch = batch
                self.planner.start(run)
                run.started = True
            cfg = run.first_cfg and batch == run.base_batch
        run.timestep, run.denoiser_batch = t, batch
        run.plan = self.planner.plan(run)
        if cfg is None:
            run.layout = Layout.PENDING if batch % 2 == 0 else Layout.SINGLE
        elif not cfg:
            run.layout = Layout.SINGLE
        else:
            run.layout = {CFG.FULL: Layout.BOTH, CFG.COND: Layout.COND, CFG.UNCOND: Layout.UNCOND}[run.plan.cfg]
            if run.plan.cfg is CFG.COND and (run.delta is None or run.resolve(run.delta_layout) is not Layout.BOTH):
                run.layout = Layout.BOTH  # nothing kept to rebuild the unconditional half from: run it
                run.plan = StepPlan(CFG.FULL, run.plan.cross, run.plan.self_attn, run.plan.features)

    def _start_pipeline_run(self, t: float | None) -> None:
        """The steps this run will take: the scheduler's timesteps from its ``begin_index`` on, or (schedulers
        without one, e.g. DDIM) from the first one equal to this call's timestep (img2img, ``strength < 1``); no
        more than the pipeline's own count for this call, ``_num_timesteps``, which diffusers pipelines set before
        their loop (SDXL's ``denoising_end`` stops the loop early without touching the scheduler)."""
        run, scheduler = self.run, self.scheduler
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is not None:
            values = [float(v) for v in torch.as_tensor(timesteps).reshape(-1)]
            begin = getattr(scheduler, "begin_index", None)
            if begin is None:
                begin = next((i for i, v in enumerate(values) if t is not None and abs(v - t) < 1e-4), 0)
            run.timesteps = values[begin:]
            looped = getattr(self.pipe, "_num_timesteps", None)
            if isinstance(looped, int) and not isinstance(looped, bool) and 0 < looped < len(run.timesteps):
                run.timesteps = run.timesteps[:looped]
            run.num_steps = len(run.timesteps)
        self.planner.start(run)
        run.started = True

    def on_step(self, step: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        run = self.run
        latents = kwargs.get("sample", args[2] if len(args) > 2 else None)
        if latents is None:
            latents = (args or [kwargs.get("model_output")])[0]
        run.latent_batch = latents.shape[0]
        if run.first_cfg is None and run.started:
            if run.denoiser_batch is not None:
                run.first_cfg = _cfg_of(run.denoiser_batch, run.latent_batch, self.label)
        out = step(*args, **kwargs)
        self.planner.step_done(run)
        run.step += 1
        run.calls_this_step = 0
        if run.num_steps is not None and run.step >= run.num_steps:
            run.store.clear()  # the run is over: free the kept outputs
            run.delta = None
        return out


def _cfg_of(batch: int, latent_batch: int, label: str) -> bool:
    if batch not in (latent_batch, 2 * latent_batch):
        raise ValueError(
            f"{label} supports denoiser batches of B (no guidance) or 2B ([uncond; cond] CFG) rows for B latents; "
            f"this pipeline ran {batch} rows for {latent_batch} latents"
        )
    return batch == 2 * latent_batch


def scalar_timestep(timestep: Any, label: str = "fastdiff cache") -> float | None:
    """The call's one timestep; several different ones in one batch (a parallel sampler's window) raise."""
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        flat = timestep.reshape(-1)
        if flat.numel() > 1 and not bool(torch.all(flat == flat[0])):
            raise ValueError(
                f"{label} needs one timestep per denoiser call (sequential sampling); got several different "
                "timesteps in one batch. Parallel samplers (fastdiff.parallel_sample) evaluate many steps at once, "
                "which step-to-step caching cannot serve: disable the cache first"
            )
        return float(flat[0])
    return float(timestep)


def invalidate_registry_caches(denoiser: torch.nn.Module) -> None:
    """diffusers registries cache their child registries; ours came or went, so drop those caches."""
    for module in denoiser.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            registry._child_registries_cache = None


def resolve_denoiser(obj: Any) -> tuple[Any, torch.nn.Module]:
    """``(pipeline or None, denoiser)`` of a pipeline with a ``unet`` / ``transformer``, or a bare module."""
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
