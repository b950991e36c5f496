"""Training speed on digits: baseline vs Min-SNR vs REPA vs HASTE, from scratch, same seeds and budget.

    python benchmarks/training_speed.py                       # full run (writes JSON + PNG)
    python benchmarks/training_speed.py --steps 60 --seeds 0 --eval-every 30 --num-samples 100   # smoke

Every method trains the embedded architecture (a class-conditional ``PixArtTransformer2DModel``; by default
narrowed and shallowed through ``model.config`` overrides so the whole benchmark fits a CPU budget) with
``fastdiff.training.train`` on the digits train split, evaluating FD-digits of EMA samples (same evaluation
noise for every run) at fixed steps. Reported:

* FD vs steps (mean and spread over seeds), plotted;
* steps to reach the baseline's final FD, per seed (the crossing is interpolated linearly between
  evaluations), and its ratio to the baseline's own steps;
* throughput and peak memory of each method, measured side by side in fresh processes.

Each run is a worker subprocess (``--worker``), so runs can go in parallel (``--jobs``) and each has its
own peak-RSS figure.
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
CONFIG = ROOT / "configs" / "digits_dit.yaml"
RESULTS = ROOT / "benchmarks" / "results"
METHODS = {  # method -> training overrides on top of the shared ones
    "baseline": [],
    "min_snr": ["--weighting", "min_snr"],
    "repa": ["--repa"],
    "haste": ["--haste"],
}
SPEED_METHODS = {**METHODS,  # + the teacher run every step instead of memoised per sample
                 "repa_teacher_online": ["--repa", "align.cache_teacher=false"],
                 "haste_teacher_online": ["--haste", "align.cache_teacher=false"]}
TARGETS = {"min_snr": 0.7, "repa": 0.5}  # steps ratio to the baseline's final FD; HASTE: <= REPA


def shared_overrides(args: argparse.Namespace) -> list[str]:
    model = [f"model.config.{k}={v}" for k, v in json.loads(args.model_config).items()]
    return [
        "--max_steps", str(args.steps), *model,
        f"train.lr={args.lr}", f"train.batch_size={args.batch_size}", "train.warmup_steps=50",
        f"align.repa_block={args.repa_block}", f"align.attn_pairs={args.attn_pairs}",
        f"align.projector_dim={args.projector_dim}", "align.token_matching=interpolate", "align.cache_teacher=true",
        f"align.stop_step={int(args.haste_stop * args.steps)}",
        f"eval.every={args.eval_every}", f"eval.num_samples={args.num_samples}",
        f"eval.inference_steps={args.inference_steps}", "checkpoint.every=0", "checkpoint.resume=null",
        "log.every=25", "log.progress_bar=false",
    ]


# ------------------------------------------------------------------------------------------ workers
def worker(method: str, seed: int, out: Path, overrides: list[str]) -> None:
    """One training run in this process; writes ``summary.json`` next to its logs."""
    import torch

    torch.set_num_threads(1)
    from fastdiff.training.config import load_config
    from fastdiff.training.train import train

    cfg = load_config(CONFIG, [*overrides, *SPEED_METHODS[method], f"seed={seed}", f"output_dir={out}"])
    summary = train(cfg)
    summary["losses"] = {int(k): v for k, v in summary["losses"].items()}
    (out / "summary.json").write_text(json.dumps(summary, default=str))


def run_worker(method: str, seed: int, out: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, str(seed), str(out), "--", *overrides]
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} seed {seed} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["wall_seconds"] = time.perf_counter() - t0
    final = f"final FD {summary['evals'][-1]['fd']:.1f}, " if summary["evals"] else ""
    print(f"  {method:9s} seed {seed}: {final}{summary['throughput_img_per_s']:.0f} img/s, "
          f"{summary['peak_memory_mb']:.0f} MB peak RSS, {summary['wall_seconds']:.0f} s", flush=True)
    return summary


# ------------------------------------------------------------------------------------------ analysis
def crossing_step(steps: list[int], values: list[float], target: float, stay: bool = True) -> float | None:
    """Step at which a curve gets to ``target`` or below, interpolated linearly between evaluations.

    ``stay=True`` (the default, used for the ratios) takes the *last* downward crossing, after which the
    curve stays at or below ``target``: early FD curves are not monotone (blurry blobs can score as well as
    later, sharper but wrong samples), and a first touch would credit noise. ``None`` if the final value is
    above ``target`` (``stay``) or it is never reached.
    """
    below = [v <= target for v in values]
    if stay:
        if not below[-1]:
            return None
        i = len(values) - 1
        while i > 0 and below[i - 1]:
            i -= 1
    else:
        if not any(below):
            return None
        i = below.index(True)
    if i == 0:
        return float(steps[0])
    (s0, v0), (s1, v1) = (steps[i - 1], values[i - 1]), (steps[i], values[i])
    return s0 + (s1 - s0) * (v0 - target) / (v0 - v1)


def _stats(values: list[float | None]) -> tuple[float | None, float | None]:
    if any(v is None for v in values):
        return None, None
    return float(np.mean(values)), float(np.std(values))


def analyse(runs: dict[str, dict[int, dict]], seeds: list[int]) -> dict:
    """Per-seed steps to the (same-seed) baseline's final FD, their ratio to the baseline's, and curves."""
    def curve(run: dict, key: str) -> tuple[list[int], list[float]]:
        return [e["step"] for e in run["evals"]], [e[key] for e in run["evals"]]

    table = {}
    for method, per_seed in runs.items():
        needed, first, ratios = [], [], []
        for seed in seeds:
            b_steps, b_fds = curve(runs["baseline"][seed], "fd")
            target = b_fds[-1]
            steps, fds = curve(per_seed[seed], "fd")
            n = crossing_step(steps, fds, target)
            needed.append(n)
            first.append(crossing_step(steps, fds, target, stay=False))
            base = crossing_step(b_steps, b_fds, target)
            ratios.append(None if n is None else n / base)
        final_fd = [curve(per_seed[s], "fd")[1][-1] for s in seeds]
        final_acc = [curve(per_seed[s], "accuracy")[1][-1] for s in seeds]
        ratio_mean, ratio_std = _stats(ratios)
        table[method] = {
            "final_fd_mean": float(np.mean(final_fd)), "final_fd_std": float(np.std(final_fd)),
            "final_accuracy_mean": float(np.mean(final_acc)), "final_accuracy_std": float(np.std(final_acc)),
            "steps_to_baseline_final_fd": needed, "first_touch_of_baseline_final_fd": first,
            "ratio_per_seed": ratios, "ratio_mean": ratio_mean, "ratio_std": ratio_std,
            "seeds_reaching_target": sum(r is not None for r in ratios),
            "throughput_img_per_s_in_run": float(np.mean([per_seed[s]["throughput_img_per_s"] for s in seeds])),
        }
    curves = {}
    for method, per_seed in runs.items():
        steps = curve(per_seed[seeds[0]], "fd")[0]
        fd = np.array([curve(per_seed[s], "fd")[1] for s in seeds])
        acc = np.array([curve(per_seed[s], "accuracy")[1] for s in seeds])
        curves[method] = {"steps": steps, "fd_mean": fd.mean(0).tolist(), "fd_std": fd.std(0).tolist(),
                          "accuracy_mean": acc.mean(0).tolist(), "accuracy_std": acc.std(0).tolist()}
    base = curves["baseline"]
    for method, c in curves.items():
        n = crossing_step(c["steps"], c["fd_mean"], base["fd_mean"][-1])
        table[method]["ratio_on_mean_curve"] = None if n is None else n / crossing_step(
            base["steps"], base["fd_mean"], base["fd_mean"][-1])
    return {"table": table, "curves": curves}


def targets_met(table: dict) -> dict:
    """Targets on the per-seed mean ratio; a seed that never gets there counts as an infinite ratio."""
    def ratio(method: str) -> float:
        r = table[method]["ratio_mean"]
        return math.inf if r is None else r

    def on_mean_curve(method: str) -> float:
        r = table[method]["ratio_on_mean_curve"]
        return math.inf if r is None else r

    return {"min_snr<=0.7x": ratio("min_snr") <= TARGETS["min_snr"], "repa<=0.5x": ratio("repa") <= TARGETS["repa"],
            "haste<=repa": (ratio("haste"), on_mean_curve("haste")) <= (ratio("repa"), on_mean_curve("repa"))}


def speed_overrides(overrides: list[str], steps: int) -> list[str]:
    kept = [o for o in overrides if not o.startswith(("eval.every", "align.stop_step"))]
    i = kept.index("--max_steps")
    kept[i + 1] = str(steps)
    return [*kept, "eval.every=0", f"align.stop_step={steps + 1}"]  # alignment on for the whole run


def measure_speed(overrides: list[str], steps: int, work_dir: Path, repeats: int) -> None:
    """Short runs in fresh processes, methods interleaved (their summaries are read by :func:`speed_table`)."""
    for r in range(repeats):
        for method in SPEED_METHODS:
            run_worker(method, 0, work_dir / f"speed_{method}_{r}", speed_overrides(overrides, steps))


def speed_table(work_dir: Path) -> dict:
    """Median throughput and peak RSS per method, and their ratio / difference to the baseline."""
    results = {m: [json.loads(p.read_text()) for p in sorted(work_dir.glob(f"speed_{m}_[0-9]*/summary.json"))]
               for m in SPEED_METHODS}
    results = {m: r for m, r in results.items() if r}
    base_tp = np.median([r["throughput_img_per_s"] for r in results["baseline"]])
    base_mem = np.median([r["peak_memory_mb"] for r in results["baseline"]])
    speed = {}
    for method, summaries in results.items():
        tp = float(np.median([r["throughput_img_per_s"] for r in summaries]))
        mem = float(np.median([r["peak_memory_mb"] for r in summaries]))
        speed[method] = {"throughput_img_per_s": tp, "throughput_vs_baseline": tp / base_tp,
                         "peak_rss_mb": mem, "peak_rss_overhead_mb": mem - base_mem, "repeats": len(summaries)}
    return speed


def plot(analysis: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fd, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, curve in analysis["curves"].items():
        steps = np.array(curve["steps"])
        for ax, key in ((ax_fd, "fd"), (ax_acc, "accuracy")):
            mean, std = np.array(curve[f"{key}_mean"]), np.array(curve[f"{key}_std"])
            ax.plot(steps, mean, marker="o", ms=3, label=method)
            ax.fill_between(steps, np.maximum(mean - std, 1e-3), mean + std, alpha=0.15)
    ax_fd.axhline(analysis["curves"]["baseline"]["fd_mean"][-1], color="grey", ls=":", lw=1, label="baseline final")
    ax_fd.set_yscale("log")
    ax_fd.set_ylabel("FD-digits of EMA samples (lower is better)")
    ax_acc.set_ylabel("class accuracy of samples (digits classifier)")
    for ax in (ax_fd, ax_acc):
        ax.set_xlabel("training step")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def environment() -> dict:
    import accelerate
    import diffusers
    import torch

    return {"device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared)",
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "accelerate": accelerate.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--inference-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--model-config", default='{"num_layers": 4, "attention_head_dim": 16, '
                                             '"cross_attention_dim": 64, "patch_size": 4}',
                   help="JSON overrides of DIGITS_TRANSFORMER_CONFIG (same PixArt family, smaller)")
    p.add_argument("--repa-block", type=int, default=1)
    p.add_argument("--attn-pairs", default="[[0, 2], [1, 3]]")
    p.add_argument("--projector-dim", type=int, default=256)
    p.add_argument("--haste-stop", type=float, default=0.5, help="HASTE termination as a fraction of --steps")
    p.add_argument("--speed-steps", type=int, default=80)
    p.add_argument("--speed-repeats", type=int, default=2)
    p.add_argument("--jobs", type=int, default=2, help="training runs in parallel")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--work-dir", type=Path, default=Path("runs/training_speed"))
    p.add_argument("--out", type=Path, default=RESULTS / "training_speed")
    p.add_argument("--reanalyse", action="store_true", help="only re-analyse the runs stored in --work-dir")
    args = p.parse_args(argv)

    overrides = shared_overrides(args)
    t0 = time.perf_counter()
    if not args.reanalyse:
        jobs = [(m, s) for s in args.seeds for m in args.methods]
        print(f"{len(jobs)} runs of {args.steps} steps ({args.jobs} in parallel)", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            for future in [pool.submit(run_worker, m, s, args.work_dir / f"{m}_seed{s}", overrides) for m, s in jobs]:
                future.result()
        print("measuring throughput and memory side by side", flush=True)
        measure_speed(overrides, args.speed_steps, args.work_dir, args.speed_repeats)
    minutes = (time.perf_counter() - t0) / 60
    previous = args.out.with_suffix(".json")
    if args.reanalyse and previous.is_file():  # keep the wall time of the run that produced the data
        minutes = json.loads(previous.read_text()).get("total_minutes", minutes)
    report(args, overrides, minutes)


def report(args: argparse.Namespace, overrides: list[str], minutes: float) -> None:
    """Analyse the runs stored under ``--work-dir`` and write the JSON and PNG."""
    runs = {m: {s: json.loads((args.work_dir / f"{m}_seed{s}" / "summary.json").read_text()) for s in args.seeds}
            for m in args.methods}
    analysis = analyse(runs, args.seeds)
    speed = speed_table(args.work_dir)
    result = {
        "benchmark": "training_speed", "environment": environment(),
        "setup": {"steps": args.steps, "seeds": args.seeds, "batch_size": args.batch_size, "lr": args.lr,
                  "model": "PixArtTransformer2DModel (embedded digits architecture) with overrides "
                           + args.model_config, "data": "digits train split (1438 images, 16x16)",
                  "eval": f"FD-digits of {args.num_samples} EMA samples (classes balanced, DDIM "
                          f"{args.inference_steps} steps, no CFG, the same noise for every run) vs the train "
                          f"split, every {args.eval_every} steps",
                  "steps_to_target": "per seed: the step after which FD stays at or below the same-seed "
                                     "baseline's final FD (last downward crossing, linear interpolation between "
                                     "evaluations); ratio = that / the baseline's own such step",
                  "teacher": "DigitsViT (fastdiff/training/teachers/digits_vit), tokens pooled 8x8 -> student grid; "
                             "outputs memoised per training image (align.cache_teacher, no augmentation), so the "
                             "teacher runs during the first epoch only",
                  "speed": f"{args.speed_steps}-step runs in fresh processes without evaluation, methods "
                           f"interleaved, median of {args.speed_repeats}; alignment on for the whole run; with the "
                           "cache the teacher runs in the first ~23 steps (one epoch) only; peak RSS is the "
                           "whole process (imports included)",
                  "repa_block": args.repa_block, "attn_pairs": args.attn_pairs, "projector_dim": args.projector_dim,
                  "haste_stop_step": int(args.haste_stop * args.steps),
                  "attention_backend": "materialized (no fused kernel registered)",
                  "overrides": overrides},
        "table": analysis["table"], "targets_met": targets_met(analysis["table"]), "speed": speed,
        "curves": analysis["curves"],
        "runs": {m: {s: {"evals": r["evals"], "throughput_img_per_s": r["throughput_img_per_s"],
                         "terminated_at": r["terminated_at"], "teacher_calls": r["teacher_calls"],
                         "teacher_images": r.get("teacher_images")}
                     for s, r in per.items()} for m, per in runs.items()},
        "total_minutes": minutes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(analysis, args.out.with_suffix(".png"),
         f"digits, {len(args.seeds)} seeds, batch {args.batch_size}, {args.steps} steps: mean +- std over seeds")
    print(json.dumps({"table": result["table"], "targets_met": result["targets_met"], "speed": speed}, indent=1))
    print(f"wrote {args.out.with_suffix('.json')} and .png ({minutes:.1f} min)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, method, seed, out, _, *rest = sys.argv
        worker(method, int(seed), Path(out), rest)
    else:
        main()
