"""Which steps a cache computes in full: uniform (DeepCache's 1:N), or calibrated to spend the cache where
the trajectory changes least.

A calibration run (:func:`fastdiff.caching.calibrate_cache`) samples once without caching and records, per
step ``i``, the relative change of the cached quantity, ``e_i = |F_i - F_{i-1}|_1 / |F_i|_1`` (the cached
deep features or block residual; for guidance the kept ``uncond - cond``), as a rate per unit of timestep at
the midpoint of the step. For a run over other timesteps ``s_j`` the predicted change of step ``j`` is that
rate (interpolated) times ``|s_j - s_{j-1}|``, so other step counts and schedulers reuse one calibration.
Serving step ``j`` from values kept at step ``a`` costs about ``sum_{a<k<=j} e_k``; the schedule reuses a
step while that sum stays below a threshold ``tau`` and computes it otherwise (the accumulated-change rule of
TeaCache / MagCache, Liu et al. 2024 arXiv:2411.19108, Ma et al. 2025 arXiv:2506.09045, here with ``tau``
set by bisection so that a requested fraction of the steps is reused). Step 0 always computes, and so do
the schedule's ``warmup`` and ``cooldown`` steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Calibration:
    """Per-step change rates of one calibration run: ``mid_timesteps`` ascending, ``*_rate`` per unit timestep."""

    kind: str | None  # "deep" / "blocks" / None: what the feature rates were measured on
    branch: int | None
    blocks: tuple[int, int] | None
    mid_timesteps: tuple[float, ...]
    feature_rate: tuple[float, ...] = field(default=())
    guidance_rate: tuple[float, ...] = field(default=())
    num_steps: int = 0

    @classmethod
    def from_changes(cls, timesteps: list[float], feature: list[float], guidance: list[float], kind: str | None,
                     branch: int | None, blocks: tuple[int, int] | None) -> Calibration:
        """From per-step relative changes (index ``i`` = change from step ``i-1`` to ``i``, ``i >= 1``)."""
        mids, frate, grate = [], [], []
        for i in range(1, len(timesteps)):
            dt = abs(timesteps[i] - timesteps[i - 1]) or 1.0
            mids.append((timesteps[i] + timesteps[i - 1]) / 2)
            frate.append(feature[i] / dt if i < len(feature) else math.nan)
            grate.append(guidance[i] / dt if i < len(guidance) else math.nan)
        order = np.argsort(mids)
        pick = lambda v: tuple(float(np.asarray(v)[order][k]) for k in range(len(order)))  # noqa: E731
        return cls(kind, branch, blocks, pick(mids), pick(frate) if feature else (), pick(grate) if guidance else (),
                   len(timesteps))

    def changes(self, timesteps: list[float], which: str) -> list[float]:
        """Predicted change of every step of a run over ``timesteps`` (step 0: infinite, always computed)."""
        rate = self.feature_rate if which == "features" else self.guidance_rate
        if not rate or any(math.isnan(r) for r in rate):
            raise ValueError(f"this calibration has no {which} measurements; calibrate with that part enabled")
        out = [math.inf]
        for i in range(1, len(timesteps)):
            mid, dt = (timesteps[i] + timesteps[i - 1]) / 2, abs(timesteps[i] - timesteps[i - 1])
            out.append(float(np.interp(mid, self.mid_timesteps, rate)) * dt)
        return out


def computes(i: int, num_steps: int | None, interval: int, warmup: int = 1, cooldown: int = 0) -> bool:
    """Whether step ``i`` of a uniform 1:N schedule computes in full: the first ``warmup`` steps (at least step 0;
    TaylorSeer's ``disable_cache_before_step``), the last ``cooldown`` steps of a run of ``num_steps`` (its
    ``disable_cache_after_step``: errors there reach the sample uncorrected) and every ``interval``-th step
    counted from the last warmup step (``warmup=1``: DeepCache's ``0, N, 2N, ...``)."""
    warmup = max(warmup, 1)
    if i < warmup or (cooldown and num_steps is not None and i >= num_steps - cooldown):
        return True
    return (i - warmup + 1) % interval == 0


def uniform_schedule(num_steps: int, interval: int, warmup: int = 1, cooldown: int = 0) -> list[bool]:
    """Compute (``True``) / reuse per step of a uniform schedule (:func:`computes`); by default DeepCache's
    uniform 1:N, computing at steps 0, N, 2N, ..."""
    return [computes(i, num_steps, interval, warmup, cooldown) for i in range(num_steps)]


def greedy_schedule(changes: list[float], tau: float) -> list[bool]:
    compute, acc = [], math.inf
    for e in changes:
        acc += e
        if acc > tau:
            compute.append(True)
            acc = 0.0
        else:
            compute.append(False)
    return compute


def calibrated_schedule(changes: list[float], reuse: float, forced: tuple[int, ...] | list[int] = ()) -> list[bool]:
    """Compute / reuse per step, reusing ``round(reuse * steps)`` steps (as near as ties allow) where the
    accumulated change is smallest; the steps in ``forced`` (and step 0) always compute."""
    changes = [math.inf if i in forced else e for i, e in enumerate(changes)]
    target = round(reuse * len(changes))
    finite = [e for e in changes if math.isfinite(e)]
    if target <= 0 or not finite:
        return [True] * len(changes)
    lo, hi = 0.0, sum(finite) + 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if greedy_schedule(changes, mid).count(False) >= target:
            hi = mid
        else:
            lo = mid
    return greedy_schedule(changes, hi)
