"""Training speed on digits: baseline vs Min-SNR vs REPA vs HASTE, from scratch, paired seeds, two testbeds.

    python benchmarks/training_speed.py                     # full run (JSON + PNG in benchmarks/results/)
    python benchmarks/training_speed.py --steps 60 --seeds 0 --eval-every 30 --num-samples 100 \\
        --speed-steps 10 --out /tmp/ts --work-dir /tmp/ts_runs                              # smoke
    python benchmarks/training_speed.py --reanalyse          # re-score the runs kept in --work-dir

Testbeds (``configs/digits_testbed.yaml`` and ``configs/digits_testbed_uncond.yaml``): the same small
class-conditional / unconditional ``PixArtTransformer2DModel`` (patch 4, 6 blocks, width 64) trained by
``fastdiff.training.train`` on the digits train split; REPA and HASTE use the shipped self-supervised
teacher ``digits_mae`` whose 4x4 token grid is the student's, with the paper defaults of the configs (REPA
after block 2 of 6, HASTE attention pairs ``[[0, 4], [1, 5]]``, gradient-angle termination).

Scoring (one rule, written down in the JSON's ``setup.scoring``):

* every run is evaluated every ``--eval-every`` steps: FD-digits of ``--num-samples`` EMA samples (DDIM,
  the same noise for every run and method), so FD differences between methods at one seed are paired;
* the **target** is the baseline's FD averaged over its last ``--last-evals`` evaluations (mean over seeds
  for the mean curve, the same seed's for the per-seed ratios);
* **steps to target**: the step after which a curve stays at or below the target, linearly interpolated
  between evaluations; the **ratio** is that over the baseline's own steps to the same target. It is
  computed on the mean curve over seeds (headline) and per seed against the same-seed baseline (spread);
* the paired FD change of each method against the same-seed baseline over the last evaluations.

Budget: FD of every method falls to ~150 by step 200, rises to ~200 by step 400-1000, then falls (measured on
the unconditional baseline, seed 0, with and without EMA at evaluation: 150 / 252 / 206 / 250 raw vs
150 / 212 / 207 / 205 EMA at steps 200-800, so it is a phase of training, not EMA lag). A 400-step budget ends
inside that bump and cannot score steps-to-target. The budget of each testbed is its config's
``train.max_steps`` (``--steps`` sets one for all), evaluated every 200 steps: conditional 2000, unconditional
4000 (its baseline still falls at 2000, FD 135 / 124 / 118 at steps 1600-2000, and a speed-up to "the baseline's
final FD" is only as long as the baseline is trained: REPA's 17.5x is SiT-XL/2 at 7M steps vs REPA at 400K).

Longer budgets reuse shorter runs: a run finished with the same overrides but a smaller ``--max_steps`` is
continued from its last checkpoint (:func:`extendable`; the testbeds' learning rate is constant after warmup, and
the batch and noise of each step are functions of the seed and the step, so the continued run is the longer run)
and its summary is merged (:func:`merge_summaries`, ``extended_from``).

Each run is a worker subprocess (``--worker``), so runs go in parallel (``--jobs``) and each has its own
peak-RSS figure; a short side-by-side throughput measurement follows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's fastdiff, also when another one is pip-installed
    sys.path.insert(0, str(ROOT))
TESTBEDS = {"unconditional": ROOT / "configs" / "digits_testbed_uncond.yaml",
            "conditional": ROOT / "configs" / "digits_testbed.yaml"}
RESULTS = ROOT / "benchmarks" / "results"
METHODS = {  # method -> training overrides on top of the testbed config
    "baseline": [],
    "min_snr": ["--weighting", "min_snr"],
    "repa": ["--repa"],
    "haste": ["--haste"],
}
SPEED_METHODS = {**METHODS,  # + the teacher run every step instead of memoised per sample
                 "repa_teacher_online": ["--repa", "align.cache_teacher=false"],
                 "haste_teacher_online": ["--haste", "align.cache_teacher=false"]}
# steps ratio (method / baseline) to reach the baseline's final FD; HASTE also <= REPA
TARGETS = {"unconditional": {"repa": 0.5, "haste": 0.5}, "conditional": {"repa": 0.8, "haste": 0.8, "min_snr": 0.7}}


def testbed_steps(args: argparse.Namespace, testbed: str) -> int:
    """The training budget of ``testbed``: ``--steps``, else its config's ``train.max_steps``."""
    from fastdiff.training.config import load_config

    return args.steps if args.steps is not None else load_config(TESTBEDS[testbed], args.override).train.max_steps


def shared_overrides(args: argparse.Namespace, steps: int) -> list[str]:
    return ["--max_steps", str(steps), f"eval.every={args.eval_every}", f"eval.num_samples={args.num_samples}",
            f"eval.inference_steps={args.inference_steps}", "checkpoint.every=0", "checkpoint.resume=null",
            "log.progress_bar=false", *args.override]


def _without_budget(overrides: list[str]) -> tuple[list[str], int | None]:
    """``overrides`` less ``--max_steps N``, and ``N``."""
    if "--max_steps" not in overrides:
        return list(overrides), None
    i = overrides.index("--max_steps")
    return overrides[:i] + overrides[i + 2:], int(overrides[i + 1])


def extendable(testbed: str, out: Path, overrides: list[str]) -> int | None:
    """The budget of a finished run in ``out`` that a run with ``overrides`` continues instead of retraining:
    the same overrides but a smaller ``--max_steps``, a checkpoint at its last step, and a constant learning
    rate after warmup (then steps ``0..N`` of a longer run are that run: the batch and the noise of step ``s``
    are functions of ``(seed, s)``, and the optimizer, EMA, RNG and HASTE-termination state are restored from
    the checkpoint). ``None``: nothing to continue."""
    from fastdiff.training.checkpoint import latest_checkpoint
    from fastdiff.training.config import load_config

    if not ((out / "summary.json").is_file() and (out / "overrides.json").is_file()):
        return None
    (old, old_steps), (new, new_steps) = _without_budget(json.loads((out / "overrides.json").read_text())), \
        _without_budget(overrides)
    if old != new or old_steps is None or new_steps is None or old_steps >= new_steps:
        return None
    if load_config(TESTBEDS[testbed], overrides).train.lr_schedule != "constant":  # a cosine decays over the budget
        return None
    if out.is_symlink():  # a linked run (a work dir reusing another one's runs): not written through
        raise ValueError(f"{out} links to {out.resolve()}: continuing it to {new_steps} steps would rewrite that run; "
                         f"copy it into the work dir first (cp -rL)")
    latest = latest_checkpoint(out / "checkpoints")
    if latest is None or json.loads((out / "summary.json").read_text()).get("final_step") != old_steps:
        return None
    return old_steps


def merge_summaries(first: dict, then: dict) -> dict:
    """One summary of a run continued from a checkpoint: ``first``'s evaluations and losses, then ``then``'s (a
    step evaluated twice keeps the later record); times and teacher calls add up; throughput and peak memory are
    the continuation's; ``extended_from`` lists the budgets it was continued from."""
    evals = {e["step"]: e for e in first.get("evals", [])} | {e["step"]: e for e in then.get("evals", [])}
    out = {**first, **then, "evals": [evals[s] for s in sorted(evals)],
           "losses": {**{str(k): v for k, v in first.get("losses", {}).items()},  # as in summary.json
                      **{str(k): v for k, v in then.get("losses", {}).items()}},
           "extended_from": [*first.get("extended_from", []), first.get("final_step")]}
    for key in ("wall_seconds", "train_seconds", "teacher_calls", "teacher_images"):
        if first.get(key) is not None and then.get(key) is not None:
            out[key] = first[key] + then[key]
    if then.get("terminated_at") is None:
        out["terminated_at"] = first.get("terminated_at")
    return out


# ------------------------------------------------------------------------------------------ workers
def worker(testbed: str, method: str, seed: int, out: Path, overrides: list[str]) -> None:
    """One training run in this process; writes ``summary.json`` next to its logs."""
    import torch

    torch.set_num_threads(1)
    from fastdiff.training.config import load_config
    from fastdiff.training.train import train

    cfg = load_config(TESTBEDS[testbed], [*overrides, *SPEED_METHODS[method], f"seed={seed}", f"output_dir={out}"])
    summary = train(cfg)
    summary["losses"] = {int(k): v for k, v in summary["losses"].items()}
    (out / "summary.json").write_text(json.dumps(summary, default=str))


def run_worker(testbed: str, method: str, seed: int, out: Path, overrides: list[str]) -> dict:
    if (out / "summary.json").is_file() and (out / "overrides.json").is_file() and \
            json.loads((out / "overrides.json").read_text()) == overrides:  # finished earlier: keep it
        return json.loads((out / "summary.json").read_text())
    shorter = extendable(testbed, out, overrides)
    earlier = json.loads((out / "summary.json").read_text()) if shorter is not None else None
    resume = ["checkpoint.resume=auto"] if shorter is not None else []  # the checkpoint of the same config
    cmd = [sys.executable, __file__, "--worker", testbed, method, str(seed), str(out), "--", *overrides, *resume]
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{testbed} {method} seed {seed} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["wall_seconds"] = time.perf_counter() - t0
    if earlier is not None:
        summary = merge_summaries(earlier, summary)
    (out / "summary.json").write_text(json.dumps(summary, default=str))
    (out / "overrides.json").write_text(json.dumps(overrides))
    final = f"final FD {summary['evals'][-1]['fd']:.2f}, " if summary["evals"] else ""
    if shorter is not None:
        final = f"continued from step {shorter}, {final}"
    print(f"  {testbed:13s} {method:9s} seed {seed}: {final}{summary['throughput_img_per_s']:.0f} img/s, "
          f"terminated at {summary.get('terminated_at')}, {summary['wall_seconds']:.0f} s", flush=True)
    return summary


# ------------------------------------------------------------------------------------------ analysis
def crossing_step(steps: list[int], values: list[float], target: float) -> float | None:
    """Step after which a curve stays at or below ``target`` (``fastdiff.studies.steps_to_reach``: the *last*
    downward crossing, interpolated; early FD curves are not monotone); ``None`` for an empty curve."""
    from fastdiff.studies.results import steps_to_reach

    return steps_to_reach(steps, values, target) if values else None


def _fd_curve(run: dict) -> tuple[list[int], list[float]]:
    return [e["step"] for e in run["evals"]], [float(e["fd"]) for e in run["evals"]]


def _ratio(needed: float | None, base: float | None) -> float | None:
    return None if needed is None or not base else needed / base


def analyse_testbed(runs: dict[str, dict[int, dict]], seeds: list[int], last: int) -> dict:
    """Curves, targets, steps-to-target ratios (mean curve + per seed, paired) and paired FD changes."""
    steps = _fd_curve(runs["baseline"][seeds[0]])[0]
    fd = {m: np.array([_fd_curve(per[s])[1] for s in seeds]) for m, per in runs.items()}  # [seed, eval]
    curves = {}
    for method, per in runs.items():
        c = {"steps": steps, "fd_mean": fd[method].mean(0).tolist(), "fd_std": fd[method].std(0).tolist(),
             "fd_per_seed": {str(s): fd[method][i].tolist() for i, s in enumerate(seeds)}}
        acc = [[e.get("accuracy") for e in per[s]["evals"]] for s in seeds]
        if all(a is not None for row in acc for a in row):
            acc = np.array(acc, dtype=float)
            c.update(accuracy_mean=acc.mean(0).tolist(), accuracy_std=acc.std(0).tolist())
        curves[method] = c
    base_mean = fd["baseline"].mean(0)
    target = float(base_mean[-last:].mean())

    def baseline_steps(curve: list[float], level: float) -> float:
        # a baseline whose FD rises at the end never "stays below" its own average: it has its final FD
        # at its last step (the budget), which is then the denominator
        crossed = crossing_step(steps, curve, level)
        return float(steps[-1]) if crossed is None else crossed

    base_steps = baseline_steps(base_mean.tolist(), target)
    seed_targets = [float(fd["baseline"][i, -last:].mean()) for i in range(len(seeds))]
    seed_base = [baseline_steps(fd["baseline"][i].tolist(), t) for i, t in enumerate(seed_targets)]
    tail = np.diff(base_mean[-(last + 1):])
    table = {}
    for method in runs:
        needed = crossing_step(steps, curves[method]["fd_mean"], target)
        per_seed = [crossing_step(steps, fd[method][i].tolist(), t) for i, t in enumerate(seed_targets)]
        if method == "baseline":  # by definition (also where its FD rises at the end)
            needed, per_seed = base_steps, list(seed_base)
        ratios = [_ratio(n, b) for n, b in zip(per_seed, seed_base)]
        finite = [r for r in ratios if r is not None]
        last_fd = fd[method][:, -last:].mean(1)  # per seed
        change = (last_fd - fd["baseline"][:, -last:].mean(1)) / fd["baseline"][:, -last:].mean(1)
        table[method] = {
            "steps_to_target_mean_curve": needed, "ratio_mean_curve": _ratio(needed, base_steps),
            "steps_to_target_per_seed": per_seed, "ratio_per_seed": ratios,
            "ratio_per_seed_mean": float(np.mean(finite)) if len(finite) == len(ratios) else None,
            "ratio_per_seed_min": min(finite) if finite else None,
            "ratio_per_seed_max": max(finite) if len(finite) == len(ratios) else None,
            "seeds_reaching_target": len(finite),
            "fd_last_evals_per_seed": last_fd.tolist(), "fd_last_evals_mean": float(last_fd.mean()),
            "fd_last_evals_std": float(last_fd.std()),
            "paired_fd_change_vs_baseline_per_seed": change.tolist(),
            "paired_fd_change_vs_baseline_mean": float(change.mean()),
            "final_fd_mean": float(fd[method][:, -1].mean()), "final_fd_std": float(fd[method][:, -1].std()),
            "terminated_at": [runs[method][s].get("terminated_at") for s in seeds],
            "throughput_img_per_s_in_run": float(np.mean([runs[method][s]["throughput_img_per_s"] for s in seeds])),
        }
        if "accuracy_mean" in curves[method]:
            table[method]["final_accuracy_mean"] = curves[method]["accuracy_mean"][-1]
    return {"target_fd": target, "target_fd_per_seed": seed_targets, "baseline_steps_to_target": base_steps,
            "baseline_steps_to_target_per_seed": seed_base, "seeds": seeds,
            "baseline_fd_falling_at_the_end": bool((tail < 0).all()),
            "baseline_fd_minimum": {"step": int(steps[int(base_mean.argmin())]), "fd": float(base_mean.min())},
            "table": table, "curves": curves}


def targets_met(testbed: str, table: dict, reliable: bool = True) -> dict:
    """Each target on the mean curve and on every seed (a seed that never gets there fails); ``None`` (not
    assessable) for every entry when ``reliable`` is false: the baseline's FD still rises at the end of the
    budget, so "steps to the baseline's final FD" credits the bump, not a speed-up."""
    if not reliable:
        return {key: None for key in targets_met(testbed, table)}
    def worst(method: str) -> float:
        r = table[method]["ratio_per_seed"]
        return math.inf if any(x is None for x in r) else max(r)

    def mean_curve(method: str) -> float:
        r = table[method]["ratio_mean_curve"]
        return math.inf if r is None else r

    out = {}
    for method, limit in TARGETS[testbed].items():
        if method in table:
            out[f"{method}<={limit}x (mean curve)"] = mean_curve(method) <= limit
            out[f"{method}<={limit}x (every seed)"] = worst(method) <= limit
    if "haste" in table and "repa" in table:
        out["haste<=repa (mean curve)"] = mean_curve("haste") <= mean_curve("repa")
        per = zip(table["haste"]["ratio_per_seed"], table["repa"]["ratio_per_seed"])
        out["haste<=repa (every seed)"] = all(h is not None and (r is None or h <= r) for h, r in per)
    return out


def speed_overrides(overrides: list[str], steps: int) -> list[str]:
    kept = [o for o in overrides if not o.startswith("eval.every")]
    kept[kept.index("--max_steps") + 1] = str(steps)
    return [*kept, "eval.every=0", "align.grad_angle_deg=null", "align.stop_step=null"]  # alignment on throughout


def measure_speed(overrides: list[str], steps: int, work_dir: Path, repeats: int) -> None:
    """Short runs in fresh processes, methods interleaved (their summaries are read by :func:`speed_table`)."""
    for r in range(repeats):
        for method in SPEED_METHODS:
            run_worker("conditional", method, 0, work_dir / f"speed_{method}_{r}", speed_overrides(overrides, steps))


def speed_table(work_dir: Path) -> dict:
    """Median throughput and peak RSS per method, and their ratio / difference to the baseline."""
    results = {m: [json.loads(p.read_text()) for p in sorted(work_dir.glob(f"speed_{m}_[0-9]*/summary.json"))]
               for m in SPEED_METHODS}
    results = {m: r for m, r in results.items() if r}
    if "baseline" not in results:
        return {}
    base_tp = np.median([r["throughput_img_per_s"] for r in results["baseline"]])
    base_mem = np.median([r["peak_memory_mb"] for r in results["baseline"]])
    speed = {}
    for method, summaries in results.items():
        tp = float(np.median([r["throughput_img_per_s"] for r in summaries]))
        mem = float(np.median([r["peak_memory_mb"] for r in summaries]))
        speed[method] = {"throughput_img_per_s": tp, "throughput_vs_baseline": tp / base_tp,
                         "peak_rss_mb": mem, "peak_rss_overhead_mb": mem - base_mem, "repeats": len(summaries)}
    return speed


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    beds = list(result["testbeds"])
    fig, axes = plt.subplots(1, len(beds), figsize=(5.5 * len(beds), 4.2), squeeze=False)
    for ax, bed in zip(axes[0], beds):
        section = result["testbeds"][bed]
        for method, curve in section["curves"].items():
            steps, mean, std = np.array(curve["steps"]), np.array(curve["fd_mean"]), np.array(curve["fd_std"])
            ratio = section["table"][method]["ratio_mean_curve"]
            label = f"{method} ({'n/a' if ratio is None else f'{ratio:.2f}x'})"
            ax.plot(steps, mean, marker="o", ms=3, label=label)
            ax.fill_between(steps, np.maximum(mean - std, 1e-3), mean + std, alpha=0.15)
        ax.axhline(section["target_fd"], color="grey", ls=":", lw=1, label="target (baseline, last evals)")
        ax.set_yscale("log")
        ax.set_title(f"{bed}: FD-digits, mean +- std over {len(section['seeds'])} seeds", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("FD-digits of EMA samples (lower is better)")
        ax.legend(fontsize=7, title="steps to target vs baseline", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def environment() -> dict:
    import accelerate
    import diffusers
    import torch

    return {"device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared)",
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "accelerate": accelerate.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds")}


def methods_of(args: argparse.Namespace, testbed: str) -> list[str]:
    return [m for m in args.methods if f"{testbed}:{m}" not in args.skip]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--testbeds", nargs="+", default=list(TESTBEDS), choices=list(TESTBEDS))
    p.add_argument("--steps", type=int, default=None,
                   help="training budget of every testbed (default: each testbed config's train.max_steps)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--inference-steps", type=int, default=10)
    p.add_argument("--last-evals", type=int, default=2, help="evaluations averaged into the target and final FD")
    p.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    p.add_argument("--speed-steps", type=int, default=60)
    p.add_argument("--speed-repeats", type=int, default=0, help="0: no side-by-side speed runs (in-run throughput only)")
    p.add_argument("--jobs", type=int, default=2, help="training runs in parallel")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--skip", nargs="*", default=["unconditional:min_snr"], metavar="TESTBED:METHOD",
                   help="runs left out (default: Min-SNR unconditional; its target is on the conditional testbed)")
    p.add_argument("--work-dir", type=Path, default=Path("runs/trainspeed-v5"))
    p.add_argument("--out", type=Path, default=RESULTS / "training_speed")
    p.add_argument("--reanalyse", action="store_true", help="only re-analyse the runs stored in --work-dir")
    p.add_argument("--total-minutes", type=float, default=None,
                   help="with --reanalyse: the wall time of the invocation(s) that trained the runs (default: the "
                        "previous JSON's)")
    args = p.parse_args(argv)
    if "baseline" not in args.methods:
        raise SystemExit("--methods must include baseline (every ratio is against it)")

    overrides = {bed: shared_overrides(args, testbed_steps(args, bed)) for bed in args.testbeds}
    t0 = time.perf_counter()
    if not args.reanalyse:
        jobs = [(b, m, s) for b in args.testbeds for s in args.seeds for m in methods_of(args, b)]
        budgets = ", ".join(f"{b} {_without_budget(o)[1]}" for b, o in overrides.items())
        print(f"{len(jobs)} runs, steps: {budgets} ({args.jobs} in parallel)", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_worker, b, m, s, args.work_dir / b / f"{m}_seed{s}", overrides[b])
                       for b, m, s in jobs]
            for future in futures:
                future.result()
        if args.speed_repeats:
            print("measuring throughput and memory side by side", flush=True)
            measure_speed(shared_overrides(args, args.speed_steps), args.speed_steps, args.work_dir,
                          args.speed_repeats)
    minutes = (time.perf_counter() - t0) / 60
    previous = args.out.with_suffix(".json")
    if args.reanalyse and args.total_minutes is not None:
        minutes = args.total_minutes
    elif args.reanalyse and previous.is_file():  # keep the wall time of the run that produced the data
        minutes = json.loads(previous.read_text()).get("total_minutes", minutes)
    report(args, overrides, minutes)


def report(args: argparse.Namespace, overrides: dict[str, list[str]], minutes: float) -> dict:
    """Analyse the runs stored under ``--work-dir`` and write the JSON and PNG."""
    from fastdiff.training.config import load_config

    testbeds, runs_out = {}, {}
    for bed in args.testbeds:
        seeds = [s for s in args.seeds  # complete seeds only
                 if all((args.work_dir / bed / f"{m}_seed{s}" / "summary.json").is_file() for m in methods_of(args, bed))]
        if not seeds:
            print(f"{bed}: no seed has every method finished; left out")
            continue
        runs = {m: {s: json.loads((args.work_dir / bed / f"{m}_seed{s}" / "summary.json").read_text())
                    for s in seeds} for m in methods_of(args, bed)}
        section = analyse_testbed(runs, seeds, args.last_evals)
        section["targets"] = {k: v for k, v in TARGETS[bed].items() if k in runs}
        section["targets_met"] = targets_met(bed, section["table"])
        section["targets_met_reliable"] = section["baseline_fd_falling_at_the_end"]
        if not section["targets_met_reliable"]:
            section["targets_met_if_read_literally"] = section["targets_met"]
            section["targets_met"] = targets_met(bed, section["table"], reliable=False)
        cfg = load_config(TESTBEDS[bed], overrides[bed])
        section["config"] = str(TESTBEDS[bed].relative_to(ROOT))
        section["steps"] = _without_budget(overrides[bed])[1]
        section["conditioning"] = cfg.model.conditioning
        testbeds[bed] = section
        runs_out[bed] = {m: {str(s): {"evals": r["evals"], "throughput_img_per_s": r["throughput_img_per_s"],
                                      "terminated_at": r["terminated_at"], "teacher_calls": r["teacher_calls"],
                                      "teacher_images": r.get("teacher_images"), "wall_seconds": r.get("wall_seconds")}
                             for s, r in per.items()} for m, per in runs.items()}
    headline = next(iter(testbeds))
    cfg = load_config(TESTBEDS[headline], overrides[headline])
    budgets = {bed: _without_budget(overrides[bed])[1] for bed in testbeds}
    from fastdiff.training.teachers import SHIPPED_TEACHERS

    teacher = json.loads((Path(SHIPPED_TEACHERS.get(cfg.align.teacher, cfg.align.teacher)) / "config.json").read_text())
    result = {
        "benchmark": "training_speed", "environment": environment(),
        "layout": "testbeds.<testbed>.curves.<method> = {steps, fd_mean, fd_std, fd_per_seed{seed: [fd]}, "
                  "accuracy_mean?}; testbeds.<testbed>.table.<method> = ratios and FDs; testbeds.<testbed>."
                  "targets_met; runs.<testbed>.<method>.<seed>.evals = raw evaluations; top-level curves/table = "
                  f"the {headline!r} testbed's (headline); speed = throughput and peak RSS side by side",
        "setup": {"steps": budgets[headline] if len(set(budgets.values())) == 1 else budgets, "seeds": args.seeds,
                  "steps_per_testbed": budgets,
                  "seeds_scored": {b: s["seeds"] for b, s in testbeds.items()},  # complete seeds only
                  "methods": {b: methods_of(args, b) for b in args.testbeds},
                  "skipped": args.skip,
                  "model": f"PixArtTransformer2DModel {cfg.model.config} (preset digits), batch "
                           f"{cfg.train.batch_size}, lr {cfg.train.lr}, warmup {cfg.train.warmup_steps}, EMA "
                           f"{cfg.train.ema_decay}", "data": "digits train split (1438 images, 16x16)",
                  "eval": f"FD-digits of {args.num_samples} EMA samples (DDIM {args.inference_steps} steps, no CFG; "
                          "conditional: classes balanced) vs the train split, the same noise for every run, every "
                          f"{args.eval_every} steps",
                  "scoring": f"target = baseline FD averaged over the last {args.last_evals} evaluations; steps to "
                             "target = the step after which a curve stays at or below it (last downward crossing, "
                             "linear interpolation between evaluations); ratio = that / the baseline's own steps to "
                             "the same target (its last step when its FD rises at the end and never stays below "
                             "its own average); on the mean curve over seeds (target from the mean baseline curve) "
                             "and per seed against the same-seed baseline (paired); paired FD change = (method - "
                             "baseline) / baseline of the last-evaluations FD, same seed",
                  "teacher": {"name": cfg.align.teacher, "objective": teacher["recipe"]["objective"],
                              "architecture": teacher["architecture"], "probe": teacher.get("probe")},
                  "alignment": {"repa_block": "auto (about 1/3 depth)" if cfg.align.repa_block is None
                                else cfg.align.repa_block,
                                "attn_pairs": "auto" if cfg.align.attn_pairs is None else cfg.align.attn_pairs,
                                "repa_weight": cfg.align.repa_weight, "attn_weight": cfg.align.attn_weight,
                                "projector_dim": cfg.align.projector_dim, "stop_step": cfg.align.stop_step,
                                "grad_angle_deg": cfg.align.grad_angle_deg, "token_matching": cfg.align.token_matching,
                                "cache_teacher": cfg.align.cache_teacher},
                  "speed": f"{args.speed_steps}-step conditional runs in fresh processes without evaluation, "
                           f"methods interleaved, median of {args.speed_repeats}; alignment on for the whole run; "
                           "peak RSS is the whole process (imports included)",
                  "overrides": overrides[headline], "overrides_per_testbed": overrides},
        "testbeds": testbeds, "curves": testbeds[headline]["curves"], "table": testbeds[headline]["table"],
        "targets_met": {bed: s["targets_met"] for bed, s in testbeds.items()},
        "speed": speed_table(args.work_dir), "runs": runs_out, "total_minutes": minutes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    for bed, section in testbeds.items():
        print(f"{bed}: target FD {section['target_fd']:.2f} at step {section['baseline_steps_to_target']}")
        for method, row in section["table"].items():
            print(f"  {method:9s} ratio {row['ratio_mean_curve']} per seed {row['ratio_per_seed']} "
                  f"FD(last) {row['fd_last_evals_mean']:.2f} change {row['paired_fd_change_vs_baseline_mean']:+.1%}")
        print(f"  targets: {section['targets_met']}")
    print(f"wrote {args.out.with_suffix('.json')} and .png ({minutes:.1f} min)")
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, testbed, method, seed, out, _, *rest = sys.argv
        worker(testbed, method, int(seed), Path(out), rest)
    else:
        main()
