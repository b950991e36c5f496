"""Benchmark results read defensively, and training curves described from their data.

Benchmarks under ``benchmarks/results/`` are rewritten as they are rerun; what a notebook says about them is
computed here from whatever the file holds (missing keys, methods and evaluations are skipped, never
assumed), so no sentence goes stale.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Curve = dict[str, list]


def load_result(path: str | Path) -> dict | None:
    """The JSON object in ``path``, or ``None`` (with a warning saying why) when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        warnings.warn(f"no benchmark result at {path}", stacklevel=2)
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        warnings.warn(f"{path} is not readable JSON: {err}", stacklevel=2)
        return None
    if not isinstance(data, dict):
        warnings.warn(f"{path} holds a {type(data).__name__}, not a JSON object", stacklevel=2)
        return None
    return data


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _evals_curve(evals: Any) -> Curve | None:
    """``{"steps", "fd"}`` of a training run's ``evals`` list (``[{"step": .., "fd": ..}, ...]``)."""
    if not isinstance(evals, list):
        return None
    points = sorted((int(e["step"]), _number(e.get("fd"))) for e in evals
                    if isinstance(e, Mapping) and _number(e.get("step")) is not None)
    points = [(s, f) for s, f in points if f is not None]
    return {"steps": [s for s, _ in points], "fd": [f for _, f in points]} if points else None


def _mean_curve(runs: Sequence[Curve]) -> Curve | None:
    """Mean and standard deviation over runs, at the steps every run evaluated."""
    if not runs:
        return None
    common = sorted(set.intersection(*(set(r["steps"]) for r in runs)))
    if not common:
        return None
    values = [[dict(zip(r["steps"], r["fd"]))[s] for r in runs] for s in common]
    mean = [sum(v) / len(v) for v in values]
    std = [math.sqrt(sum((x - m) ** 2 for x in v) / len(v)) for v, m in zip(values, mean)]
    return {"steps": common, "fd_mean": mean, "fd_std": std, "num_runs": [len(runs)] * len(common)}


def training_curves(result: Mapping[str, Any] | None) -> dict[str, Curve]:
    """FD-vs-training-steps curves per method: ``{method: {"steps", "fd_mean", "fd_std"}}``.

    ``result`` is the JSON of ``benchmarks/training_speed.py`` (its ``curves``, else the per-seed ``runs``),
    or ``{method: summary}`` with the summaries ``fastdiff.training.train.train`` returns (their ``evals``),
    or ``{method: [summary, ...]}`` over seeds. Methods without a usable curve are left out.
    """
    if not isinstance(result, Mapping):
        return {}
    out: dict[str, Curve] = {}
    curves = result.get("curves")
    if isinstance(curves, Mapping):
        for method, c in curves.items():
            if not isinstance(c, Mapping):
                continue
            steps, mean = c.get("steps"), c.get("fd_mean")
            if not isinstance(steps, list) or not isinstance(mean, list) or len(steps) != len(mean):
                continue
            std = c.get("fd_std") if isinstance(c.get("fd_std"), list) and len(c["fd_std"]) == len(steps) else None
            keep = [i for i, (s, m) in enumerate(zip(steps, mean)) if _number(s) is not None and _number(m) is not None]
            if keep:
                out[str(method)] = {"steps": [int(steps[i]) for i in keep], "fd_mean": [float(mean[i]) for i in keep],
                                    "fd_std": [_number(std[i]) or 0.0 for i in keep] if std else [0.0] * len(keep)}
        if out:
            return out
    runs = result.get("runs") if isinstance(result.get("runs"), Mapping) else result
    for method, per_seed in runs.items():
        if isinstance(per_seed, Mapping) and "evals" in per_seed:
            per_seed = [per_seed]
        elif isinstance(per_seed, Mapping):
            per_seed = list(per_seed.values())
        if not isinstance(per_seed, list):
            continue
        curve = _mean_curve([c for c in (_evals_curve(s.get("evals")) for s in per_seed if isinstance(s, Mapping)) if c])
        if curve:
            out[str(method)] = curve
    return out


def steps_to_reach(steps: Sequence[float], values: Sequence[float], target: float) -> float | None:
    """Training step at which a curve gets to ``target`` or below *and stays there*, interpolated linearly
    between evaluations (the rule of ``benchmarks/training_speed.py``: early FD curves are not monotone, so
    a first touch would credit noise). ``None`` if the last value is above ``target``."""
    if len(steps) != len(values) or not steps:
        raise ValueError(f"steps and values must be non-empty and of equal length, got {len(steps)} and {len(values)}")
    below = [v <= target for v in values]
    if not below[-1]:
        return None
    i = len(values) - 1
    while i > 0 and below[i - 1]:
        i -= 1
    if i == 0:
        return float(steps[0])
    (s0, v0), (s1, v1) = (steps[i - 1], values[i - 1]), (steps[i], values[i])
    return s0 + (s1 - s0) * (v0 - target) / (v0 - v1)


def describe_training(result: Mapping[str, Any] | None, baseline: str = "baseline") -> list[str]:
    """Sentences on a training-speed result, computed from its data: each method's final FD, and the steps it
    needs to reach the baseline's final FD as a fraction of the baseline's steps (on the mean curve), plus
    its throughput against the baseline where the result has one."""
    curves = training_curves(result)
    if not curves:
        return ["no training curves in this result"]
    lines = []
    env = result.get("environment") if isinstance(result, Mapping) else None
    setup = result.get("setup") if isinstance(result, Mapping) else None
    if isinstance(env, Mapping) or isinstance(setup, Mapping):
        env, setup = env or {}, setup or {}
        seeds = setup.get("seeds")
        lines.append(f"{setup.get('steps', '?')} training steps, {len(seeds) if isinstance(seeds, list) else '?'} "
                     f"seed(s); {env.get('device', 'device unknown')}, {env.get('date', 'date unknown')}")
    base = curves.get(baseline)
    target = base["fd_mean"][-1] if base else None
    # as benchmarks/training_speed.py: if the baseline ends above its best FD, "steps to its final FD" measures
    # that bump, not a speed-up
    rising = bool(base) and len(base["fd_mean"]) > 1 and target > base["fd_mean"][-2]
    speed = result.get("speed") if isinstance(result, Mapping) and isinstance(result.get("speed"), Mapping) else {}
    for method, c in curves.items():
        final, spread = c["fd_mean"][-1], c["fd_std"][-1]
        text = f"{method}: final FD {final:.1f}" + (f" ± {spread:.1f}" if spread else "") + f" at step {c['steps'][-1]}"
        if base and method != baseline and rising:
            text += (f"; steps to the {baseline}'s final FD not assessable: its FD rises at the end "
                     f"(best {min(base['fd_mean']):.1f}, final {target:.1f})")
        elif base and method != baseline:
            reached = steps_to_reach(c["steps"], c["fd_mean"], target)
            own = steps_to_reach(base["steps"], base["fd_mean"], target)
            text += (f"; reaches the {baseline}'s final FD ({target:.1f}) at {reached / own:.2f}x its steps (mean curve)"
                     if reached is not None and own else f"; does not reach the {baseline}'s final FD ({target:.1f})")
        ratio = _number(speed.get(method, {}).get("throughput_vs_baseline")) if isinstance(speed.get(method), Mapping) else None
        if ratio is not None and method != baseline:
            text += f"; throughput {ratio:.2f}x"
        lines.append(text)
    return lines


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                   digits: int = 3) -> str:
    """A GitHub-markdown table of ``rows`` (dicts), one column per key of ``columns`` (default: the first
    row's keys); floats are rounded to ``digits`` significant digits, ``None`` shows as a blank."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0])

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _scored_setup(shared: Mapping[str, Any], testbed: Any) -> dict[str, Any]:
    """``{"setup": ...}`` with ``seeds`` replaced by the seeds this testbed was scored on (``setup.seeds_scored``,
    written when a testbed ran on fewer seeds than the file's ``setup.seeds``) and ``steps`` by its own budget
    (``setup.steps_per_testbed``, written when the testbeds' budgets differ), else nothing."""
    setup = shared.get("setup")
    if not isinstance(setup, Mapping):
        return {}
    own = dict(setup)
    scored, budgets = setup.get("seeds_scored"), setup.get("steps_per_testbed")
    if isinstance(scored, Mapping) and isinstance(scored.get(testbed), list):
        own["seeds"] = list(scored[testbed])
    if isinstance(budgets, Mapping) and budgets.get(testbed) is not None:
        own["steps"] = budgets[testbed]
    return {"setup": own} if own != setup else {}


def training_results(data: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    """The training-speed results inside a benchmark JSON: one per testbed when it has ``testbeds`` (each with the
    file's ``environment`` / ``setup`` / ``speed`` unless it has its own), else ``{"": data}`` when it holds curves
    itself, else ``{section: sub_result}`` for each section one level down that does."""
    if not isinstance(data, Mapping):
        return {}
    testbeds = data.get("testbeds")
    if isinstance(testbeds, Mapping):
        shared = {k: data[k] for k in ("environment", "setup", "speed") if k in data}
        found = {str(k): {**shared, **_scored_setup(shared, k), **v} for k, v in testbeds.items()
                 if isinstance(v, Mapping) and training_curves(v)}
        if found:
            return found
    if training_curves(data) and ("curves" in data or "runs" in data):
        return {"": data}
    return {str(k): v for k, v in data.items()
            if isinstance(v, Mapping) and ("curves" in v or "runs" in v) and training_curves(v)}
