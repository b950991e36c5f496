"""fastdiff's cache: one removable API over diffusers' hook registry, composed of measured parts.

Parts (each optional, each a set of hooks on :mod:`fastdiff.caching.engine`'s shared run):

- ``features``: reuse of expensive features across steps: ``"deep"`` on UNets (DeepCache's skip-branch
  reuse, :mod:`fastdiff.caching.features`), ``"blocks"`` on transformers (a block span's residual);
  at reuse steps the kept features are forecast from the last ``order + 1`` full steps (TaylorSeer's idea;
  ``order=0`` serves them as kept, DeepCache's reuse); on UNets ``shallow`` blocks too: the transformer blocks the
  shallow path still runs at a reuse step serve their forecast residual (on by default when features are forecast);
- ``guidance="residual"``: on steps that skip the unconditional branch, the denoiser runs the conditional
  half and rebuilds the unconditional output from ``uncond - cond`` kept at the last full step
  (FasterCache's CFG-Cache idea), so CFG costs one branch there;
- ``tgate``: TGATE / TGATE-V2 (:mod:`fastdiff.caching.tgate`), with guidance dropped after the gate (the
  paper) or kept through the residual (``tgate={"gate_step": 10, "guidance": "residual"}``);
- the schedule: uniform (``interval``, ``warmup`` / ``cooldown`` full steps at the start / end,
  ``guidance_interval``) or calibrated (``calibration`` from
  :func:`calibrate_cache` plus the fraction ``reuse`` / ``guidance_reuse`` of steps to serve from the cache),
  which spends the cache where the calibration run changed least (:mod:`fastdiff.caching.schedule`).

Usage::

    fastdiff.enable_cache(pipe)                               # deep / block features forecast every 2nd step
    fastdiff.enable_cache(pipe, cooldown=2)                   # ... and the last two steps computed
    cal = fastdiff.calibrate_cache(pipe, [3, 7], num_inference_steps=25, guidance_scale=2.0)
    fastdiff.enable_cache(pipe, calibration=cal, reuse=0.5, guidance="residual", guidance_reuse=0.6)
    fastdiff.disable_cache(pipe)                              # the pipeline is exactly as before

Works with every diffusers scheduler (the step count is what runs: img2img ``strength < 1``, SDXL's
``denoising_end``), ``num_images_per_prompt``, ``callback_on_step_end`` (also callbacks that switch CFG off
mid-run, such as diffusers' ``SDCFGCutoffCallback``), pipelines whose CFG batch is ``[uncond; cond]`` in one
call. ``fastdiff.parallel_sample`` evaluates many timesteps per call, which step-to-step caching cannot
serve: it raises a ``ValueError`` there (disable the cache first).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from .engine import CFG, Action, Installation, Run, StepPlan, check_integral, resolve_denoiser
from .features import (
    FEATURE_KINDS,
    FORECASTS,
    MAX_ORDER,
    check_blocks,
    check_branch,
    feature_hooks,
    feature_kind,
    feature_snapshot,
)
from .schedule import Calibration, calibrated_schedule, computes, uniform_schedule
from .tgate import TGateSettings, attention_hooks, tgate_actions, tgate_settings

__all__ = ["CacheSettings", "calibrate_cache", "disable_cache", "enable_cache", "is_cache_enabled"]

_STATE_ATTR = "_fastdiff_cache"
GUIDANCE_PARTS = (None, "residual")


@dataclass(frozen=True)
class CacheSettings:
    features: str | None = None
    interval: int = 2
    reuse: float | None = None
    branch: int = 0
    blocks: tuple[int, int] | None = None
    order: int = 2
    forecast: str = "newton"
    shallow: bool | None = False  # enable_cache passes None ("auto"); calibrations measure the deep features only
    warmup: int = 1
    cooldown: int = 0
    guidance: str | None = None
    guidance_interval: int = 5
    guidance_reuse: float | None = None
    tgate: TGateSettings | None = None
    calibration: Calibration | None = None


def enable_cache(
    pipe_or_model: Any,
    features: str | None = "auto",
    interval: int = 2,
    reuse: float | None = None,
    calibration: Calibration | None = None,
    branch: int = 0,
    blocks: tuple[int, int] | None = None,
    order: int = 2,
    forecast: str = "newton",
    shallow: bool | None = None,
    warmup: int = 1,
    cooldown: int = 0,
    guidance: str | None = None,
    guidance_interval: int = 5,
    guidance_reuse: float | None = None,
    tgate: int | Mapping[str, Any] | None = None,
) -> None:
    """Turn on fastdiff's cache for a diffusers pipeline (or a bare denoiser, uniform schedules only).

    Args:
        pipe_or_model: a pipeline with a ``unet`` or ``transformer`` and a ``scheduler``, or the denoiser.
        features: ``"auto"`` (``"deep"`` for UNets, ``"blocks"`` for transformers with ``transformer_blocks``),
            ``"deep"``, ``"blocks"`` or ``None`` (no feature reuse).
        interval: uniform schedule: features are computed at steps ``0, interval, 2 interval, ...`` and served
            (forecast) from the cache in between (DeepCache's N; 1 = never reused).
        reuse: with ``calibration``: the fraction of steps whose features are served from the cache, placed
            where the calibration run changed least. Replaces ``interval``.
        calibration: a :func:`calibrate_cache` result for this pipeline (any step count or scheduler).
        branch: ``"deep"``: DeepCache's skip branch (0 = shallowest, the most saved).
        blocks: ``"blocks"``: the ``(start, end)`` span of transformer blocks whose residual is reused
            (default: every block, measured closest to the uncached samples per MAC saved on the embedded digits
            transformer; the span (1, 5) without forecasting saved 33 % at FD 2.35).
        order: 0 (serve the last full step's features), 1 or 2 (forecast them from the last ``order + 1`` full
            steps, TaylorSeer's forecast; see :mod:`fastdiff.caching.features`). Default 2: on both embedded
            digits models (``benchmarks/attention_caching.py``) order 2 came closest to the uncached samples at
            the same schedule, order 0 furthest (DeepCache's; pass ``order=0`` for DeepCache's exact output).
        forecast: ``"newton"`` (default, fastdiff's: the polynomial through the kept points) or ``"taylor"``
            (TaylorSeer's finite-difference Taylor series); the same at ``order=1``; Newton measured closer to
            the uncached samples at order 2 on both embedded models.
        shallow: ``"deep"`` only: at reuse steps also forecast the residual of the transformer blocks that the
            shallow path still runs (fastdiff's; see :mod:`fastdiff.caching.features`). ``None`` (default): on when
            features are forecast (``order > 0``) without ``tgate``, off at ``order=0`` so that ``order=0`` is
            DeepCache's reuse exactly. On the embedded digits UNet it came closer to the uncached samples and
            saved more time (``benchmarks/attention_caching.py``).
        warmup: full steps at the start of the run (at least step 0; TaylorSeer's ``disable_cache_before_step``);
            the uniform schedule computes steps ``warmup - 1 + k interval`` after them (DeepCache's ``0, N, 2N, ...``
            at ``warmup=1``).
        cooldown: full steps at the end of the run (TaylorSeer's ``disable_cache_after_step`` counted from the
            end): their errors reach the sample uncorrected. Warmup and cooldown steps compute in calibrated
            schedules too.
        guidance: ``None`` or ``"residual"``: skip the unconditional branch on cached steps and rebuild it from
            the kept ``uncond - cond`` residual (needs CFG batched as ``[uncond; cond]``).
        guidance_interval: uniform schedule of the full CFG batch: steps ``0, k, 2k, ...``.
        guidance_reuse: with ``calibration``: the fraction of steps that run the conditional half only.
        tgate: ``None``, a gate step, or a dict of :func:`fastdiff.enable_tgate`'s arguments (``gate_step``,
            ``self_attn``, ``cond_weight``, ``guidance``).

    Enabling again (or :func:`fastdiff.enable_tgate`) replaces the previous cache. Bad arguments raise a
    ``ValueError`` / ``TypeError`` naming them before anything is installed.
    """
    _, denoiser = resolve_denoiser(pipe_or_model)
    kind = feature_kind(denoiser) if features == "auto" else features
    if features == "auto" and kind is None and tgate is None:
        raise ValueError(f"{type(denoiser).__name__} has neither UNet blocks nor transformer_blocks: pass "
                         "features=None with guidance/tgate parts, or a UNet / transformer")
    if tgate is None:
        tgate_part = None
    elif isinstance(tgate, Mapping):
        unknown = sorted(set(tgate) - {"gate_step", "self_attn", "cond_weight", "guidance"})
        if unknown or "gate_step" not in tgate:
            raise ValueError(f"tgate must be a gate step or a dict with gate_step and optional self_attn, cond_weight, "
                             f"guidance; got keys {sorted(tgate)}")
        tgate_part = tgate_settings(**tgate)
    else:
        tgate_part = tgate_settings(tgate)
    install(pipe_or_model, features=kind, interval=interval, reuse=reuse, calibration=calibration, branch=branch,
            blocks=blocks, order=order, forecast=forecast, shallow=shallow, warmup=warmup, cooldown=cooldown,
            guidance=guidance, guidance_interval=guidance_interval, guidance_reuse=guidance_reuse, tgate=tgate_part)


def disable_cache(pipe_or_model: Any) -> None:
    """Remove fastdiff's cache (any part, TGATE included); the pipeline behaves and looks as before. No-op if off."""
    uninstall(pipe_or_model)


def is_cache_enabled(pipe_or_model: Any) -> bool:
    """Whether :func:`enable_cache` or :func:`fastdiff.enable_tgate` is active on this pipeline or denoiser."""
    return installed(pipe_or_model) is not None


# ----------------------------------------------------------------------------------------------------
# validation and installation


def _check_fraction(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a fraction in [0, 1) of the steps served from the cache, got {value!r}")
    return float(value)


def check_settings(denoiser: torch.nn.Module, pipe: Any, **kw: Any) -> CacheSettings:
    s = CacheSettings(**kw)
    if s.features not in (None, *FEATURE_KINDS):
        raise ValueError(f"features must be 'auto', None or one of {FEATURE_KINDS}, got {s.features!r}")
    have = feature_kind(denoiser)
    if s.features is not None and s.features != have:
        raise ValueError(f"features={s.features!r} needs a {'UNet' if s.features == 'deep' else 'transformer with '}"
                         f"{'' if s.features == 'deep' else 'transformer_blocks'}; {type(denoiser).__name__} supports "
                         f"{have!r}")
    if s.guidance not in GUIDANCE_PARTS:
        raise ValueError(f"guidance must be None or 'residual', got {s.guidance!r}")
    if s.forecast not in FORECASTS:
        raise ValueError(f"forecast must be one of {FORECASTS}, got {s.forecast!r}")
    s = replace(s, interval=check_integral(s.interval, "interval", 1), order=check_integral(s.order, "order", 0),
                warmup=check_integral(s.warmup, "warmup", 1), cooldown=check_integral(s.cooldown, "cooldown", 0),
                guidance_interval=check_integral(s.guidance_interval, "guidance_interval", 1),
                reuse=_check_fraction(s.reuse, "reuse"), guidance_reuse=_check_fraction(s.guidance_reuse, "guidance_reuse"))
    if s.order > MAX_ORDER:
        raise ValueError(f"order must be 0 (reuse), 1 or {MAX_ORDER} (forecast from order + 1 full steps), got {s.order}")
    if s.cooldown and pipe is None:
        raise ValueError("cooldown needs the pipeline (its scheduler tells where the run ends), not a bare denoiser")
    if s.shallow is not None and not isinstance(s.shallow, bool):
        raise TypeError(f"shallow must be None, True or False, got {s.shallow!r}")
    if s.shallow and s.features != "deep":
        raise ValueError(f"shallow=True forecasts the shallow path of features='deep' (UNets); features={s.features!r}")
    if s.shallow and s.tgate is not None:
        raise ValueError("shallow=True cannot be combined with tgate: a served block would skip TGATE's gate step; "
                         "pass shallow=None or False")
    if s.shallow is None:
        s = replace(s, shallow=s.features == "deep" and s.order > 0 and s.tgate is None)
    if s.features == "deep":
        s = replace(s, branch=check_branch(denoiser, s.branch))
    if s.features == "blocks":
        s = replace(s, blocks=check_blocks(denoiser, s.blocks))
    if (s.reuse is not None or s.guidance_reuse is not None) and s.calibration is None:
        raise ValueError("reuse / guidance_reuse place the cache by a calibration: pass calibration=calibrate_cache(...)")
    if s.calibration is not None:
        if not isinstance(s.calibration, Calibration):
            raise TypeError(f"calibration must come from fastdiff.calibrate_cache, got {type(s.calibration).__name__}")
        if pipe is None:
            raise ValueError("a calibrated schedule needs the pipeline (its scheduler tells the run's timesteps)")
        if s.reuse is not None and (s.calibration.kind != s.features or (s.features == "deep" and s.calibration.branch
                                    != s.branch) or (s.features == "blocks" and s.calibration.blocks != s.blocks)):
            raise ValueError(f"calibration measured features={s.calibration.kind!r} (branch {s.calibration.branch}, "
                             f"blocks {s.calibration.blocks}); calibrate again with this cache's features")
    return s


def installed(pipe_or_model: Any) -> Installation | None:
    return getattr(resolve_denoiser(pipe_or_model)[1], _STATE_ATTR, None)


def uninstall(pipe_or_model: Any) -> None:
    _, denoiser = resolve_denoiser(pipe_or_model)
    cache = getattr(denoiser, _STATE_ATTR, None)
    if cache is not None:
        cache.remove()
        delattr(denoiser, _STATE_ATTR)


def install(pipe_or_model: Any, planner_cls: type | None = None, **kw: Any) -> Installation:
    pipe, denoiser = resolve_denoiser(pipe_or_model)
    settings = check_settings(denoiser, pipe, **kw)
    run = Run()
    hooks = []
    if settings.tgate is not None:
        hooks += attention_hooks(denoiser, run, settings.tgate)
    if settings.features is not None:
        hooks += feature_hooks(denoiser, run, settings.features, settings.branch, settings.blocks, settings.order,
                               settings.forecast, settings.shallow)
    uninstall(denoiser)
    planner = (planner_cls or CachePlanner)(settings)
    label = "TGATE" if settings.tgate is not None and settings.features is None and settings.guidance is None else "fastdiff cache"
    cache = Installation(denoiser, pipe, planner, hooks, run, label)
    cache.settings = settings
    setattr(denoiser, _STATE_ATTR, cache)
    return cache


class CachePlanner:
    """Every step's plan from the settings: TGATE's schedule, the feature schedule and the CFG schedule."""

    def __init__(self, settings: CacheSettings) -> None:
        self.s = settings
        self.needs_delta = settings.guidance == "residual" or (settings.tgate is not None and settings.tgate.guidance == "residual")
        self.features: list[bool] | None = None
        self.full_cfg: list[bool] | None = None

    def start(self, run: Run) -> None:
        s, n = self.s, run.num_steps
        if s.tgate is not None and n is not None and not 1 <= s.tgate.gate_step <= n:
            raise ValueError(f"gate_step must lie in [1, {n}] for a run of {n} denoiser steps (the steps that run: "
                             f"img2img with strength < 1 runs fewer), got {s.tgate.gate_step}")
        self.features = self.full_cfg = None
        if n is None:
            return
        cal, ts = s.calibration, run.timesteps or list(range(n))
        forced = list(range(s.warmup)) + list(range(n - s.cooldown, n))
        self.features = (calibrated_schedule(cal.changes(ts, "features"), s.reuse, forced) if s.reuse is not None
                         else uniform_schedule(n, s.interval, s.warmup, s.cooldown))
        self.full_cfg = (calibrated_schedule(cal.changes(ts, "guidance"), s.guidance_reuse) if s.guidance_reuse is not None
                         else uniform_schedule(n, s.guidance_interval))

    def step_done(self, run: Run) -> None:
        return None

    def plan(self, run: Run) -> StepPlan:
        s, i = self.s, run.step
        compute = (self.features[i] if self.features is not None and i < len(self.features)
                   else computes(i, None, s.interval, s.warmup, s.cooldown))
        feat = Action.CACHE if compute or s.features is None else Action.REUSE
        if s.guidance == "residual":
            full = self.full_cfg[i] if self.full_cfg is not None and i < len(self.full_cfg) else i % s.guidance_interval == 0
            cfg = CFG.FULL if full else CFG.COND
        else:
            cfg = CFG.FULL
        cross = self_attn = Action.COMPUTE
        if s.tgate is not None:
            cross, self_attn = tgate_actions(i, s.tgate.gate_step, s.tgate.self_attn)
            if cross is Action.REUSE:
                cfg = CFG.COND if s.tgate.guidance == "residual" else CFG.UNCOND
            elif cross is Action.CACHE_GATE:
                cfg = CFG.FULL  # keep both halves at the gate
        return StepPlan(cfg, cross, self_attn, feat)


# ----------------------------------------------------------------------------------------------------
# calibration


class _Recorder(CachePlanner):
    """Computes everything, keeps the features, and measures their per-step change."""

    def __init__(self, settings: CacheSettings) -> None:
        super().__init__(settings)
        self.needs_delta = True
        self.timesteps: list[float] = []
        self.feature: list[float] = []
        self.guidance: list[float] = []
        self._prev: tuple[Any, Any] = (None, None)

    def plan(self, run: Run) -> StepPlan:
        return StepPlan(features=Action.CACHE)

    def step_done(self, run: Run) -> None:
        feats = feature_snapshot(run)
        delta = torch.cat([d.reshape(-1).float() for d in run.delta]) if run.delta and run.first_cfg else None
        self.timesteps.append(run.timestep if run.timestep is not None else float(run.step))
        self.feature.append(_rel_change(feats, self._prev[0]))
        self.guidance.append(_rel_change(delta, self._prev[1]))
        self._prev = (feats, delta)
        for history in run.store.values():  # keep the newest only: calibration runs compute every step
            if hasattr(history, "entries"):
                del history.entries[1:]


def _rel_change(now: torch.Tensor | None, before: torch.Tensor | None) -> float:
    if now is None or before is None or now.shape != before.shape:
        return float("nan")
    return float((now - before).abs().sum() / now.abs().sum().clamp_min(1e-12))


def calibrate_cache(pipe: Any, *args: Any, features: str | None = "auto", branch: int = 0,
                    blocks: tuple[int, int] | None = None, **call_kwargs: Any) -> Calibration:
    """Run ``pipe(*args, **call_kwargs)`` once uncached and measure, per step, how much the features the cache
    would keep (``features`` / ``branch`` / ``blocks`` as in :func:`enable_cache`) and the guidance residual
    ``uncond - cond`` change (see :mod:`fastdiff.caching.schedule`). Any cache on ``pipe`` is replaced and
    removed afterwards. Pass the result to :func:`enable_cache` with ``reuse`` / ``guidance_reuse``."""
    pipe_, denoiser = resolve_denoiser(pipe)
    if pipe_ is None:
        raise TypeError("calibrate_cache needs a pipeline (it runs one sampling call), not a bare denoiser")
    kind = feature_kind(denoiser) if features == "auto" else features
    cache = install(pipe, _Recorder, features=kind, branch=branch, blocks=blocks)
    try:
        pipe(*args, **call_kwargs)
        rec: _Recorder = cache.planner
        settings = cache.settings
    finally:
        uninstall(pipe)
    have_guidance = any(v == v for v in rec.guidance)
    return Calibration.from_changes(rec.timesteps, rec.feature if kind else [], rec.guidance if have_guidance else [],
                                    kind, settings.branch if kind == "deep" else None,
                                    settings.blocks if kind == "blocks" else None)
