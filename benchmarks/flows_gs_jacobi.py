"""GS-Jacobi sampling of the embedded digits TarFlow: FD-digits against transformer passes and wall clock.

Claim under test (issue 15): the automatic GS-Jacobi strategy (CRM / IGM from a calibration batch,
``fastdiff.flows.auto_strategy``) needs at least 2.5x fewer sequential transformer passes than sequential
KV-cached inversion at equal FD-digits (within 2 %), and is faster in wall clock at batch 1 on a CPU.

Side by side in one process, from the same prior noise and labels, the shipped model at its default guidance:

* ``sequential``: the reference, one token per pass with a key/value cache (``T - 1`` passes per block);
* ``jacobi``: every block Jacobi on the whole sequence (the paper's stopping rule and clamp);
* ``gs_jacobi_fixed``: every block 8 segments;
* ``gs_jacobi_auto``: the shipped automatic strategy, plus a sweep of its ``easy_iters`` budget.

For each: FD-digits and class accuracy of the denoised samples (``fastdiff.metrics.evaluate_samples``), the rms
distance of the inverted samples to the sequential ones, transformer passes per batch, and wall clock at batch
64 and at batch 1 (methods interleaved sample by sample so machine load hits them alike).

    python benchmarks/flows_gs_jacobi.py            # ~5 min on a busy CPU core
    python benchmarks/flows_gs_jacobi.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import fastdiff
from fastdiff.flows import BlockStrategy, auto_strategy, invert, load_digits_tarflow, metric_images
from fastdiff.metrics import evaluate_samples

RESULTS = Path(__file__).parent / "results"
FD_MARGIN = 0.02  # "equal FD": within 2 % of sequential inversion's


def run_method(model, noise, labels, batch, kwargs) -> dict:
    """Invert ``noise`` in chunks of ``batch``, denoise, evaluate; passes are the mean per chunk."""
    xs, passes, seconds, converged = [], [], 0.0, True
    for s in range(0, len(noise), batch):
        x, stats = invert(model, noise[s:s + batch], labels[s:s + batch], **kwargs)
        xs.append(x)
        passes.append(stats.passes)
        seconds += stats.seconds
        converged &= all(b.converged for b in stats.blocks)
        per_block = [{"block": b.block, "passes": b.passes, "iterations": b.iterations, "residual": b.residual}
                     for b in stats.blocks]
    x = torch.cat(xs)
    images = model.denoise(model.unpatchify(x), labels)
    return {"x": x, "images": images, "passes": statistics.mean(passes), "seconds": seconds,
            "sequential_passes": stats.sequential_passes, "converged": converged, "last_batch_blocks": per_block}


def batch1_times(model, noise, labels, methods: dict, num: int) -> dict:
    times = {name: [] for name in methods}
    for i in range(num):  # interleaved: every method on sample i before sample i+1
        for name, kwargs in methods.items():
            tic = time.perf_counter()
            invert(model, noise[i:i + 1], labels[i:i + 1], **kwargs)
            times[name].append(time.perf_counter() - tic)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batch1-samples", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", type=Path, default=None, help="an exported TarFlow (default: the shipped one)")
    parser.add_argument("--out", type=Path, default=RESULTS / "flows_gs_jacobi.json")
    args = parser.parse_args()
    if args.quick:
        args.num_samples, args.batch1_samples = 128, 3
    torch.set_num_threads(args.threads)
    model, settings = load_digits_tarflow(args.model)
    T = model.num_tokens
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(args.num_samples) % 10
    noise = torch.randn(args.num_samples, T, model.token_dim, generator=gen)
    shipped = settings.invert_kwargs()
    common = {k: shipped[k] for k in ("guidance", "annealed", "criterion", "tolerance")}
    cal, options = settings.calibration, settings.strategy_options
    K = len(model.blocks)
    methods = {
        "sequential": {"method": "sequential"},
        "jacobi": {"method": "jacobi"},
        "jacobi_paper_rule": {"method": "jacobi", "criterion": "paper", "tolerance": 1e-6},
        "gs_jacobi_fixed": {"method": "gs_jacobi", "strategy": [BlockStrategy(8, None, "noise")] * K},
        "gs_jacobi_auto": {"method": "gs_jacobi", "strategy": shipped["strategy"]},
        "gs_jacobi_auto_crm": {"method": "gs_jacobi", "strategy": auto_strategy(cal, **{**options, "ranking": "crm"})},
    }
    if cal.jacobi_iters is not None:
        methods["gs_jacobi_auto_measured"] = {"method": "gs_jacobi",
                                              "strategy": auto_strategy(cal, **{**options, "ranking": "measured"})}
    for easy in (2, 4):
        methods[f"gs_jacobi_auto_crm_easy{easy}"] = {
            "method": "gs_jacobi", "strategy": auto_strategy(cal, **{**options, "ranking": "crm", "easy_iters": easy})}
    rows, reference = {}, None
    for name, kwargs in methods.items():
        r = run_method(model, noise, labels, args.batch, {**common, **kwargs})
        metrics = evaluate_samples(metric_images(r["images"]), labels, value_range=(0, 1), metric="digits")
        if reference is None:
            reference = r
        rms = float((r["x"] - reference["x"]).pow(2).mean().sqrt())
        rows[name] = {"fd": metrics.fd, "accuracy": metrics.accuracy, "passes": r["passes"],
                      "pass_speedup": reference["passes"] / r["passes"], "seconds_batch": r["seconds"],
                      "wall_speedup_batch": reference["seconds"] / r["seconds"], "rms_vs_sequential": rms,
                      "converged": r["converged"], "blocks_last_batch": r["last_batch_blocks"],
                      "strategy": [vars(s) for s in kwargs.get("strategy", [])]}
        print(f"{name:24s} FD {metrics.fd:7.3f} acc {metrics.accuracy:.3f} passes {r['passes']:6.1f} "
              f"({rows[name]['pass_speedup']:.2f}x) batch-{args.batch} {r['seconds']:6.2f}s "
              f"({rows[name]['wall_speedup_batch']:.2f}x) rms {rms:.2e}", flush=True)
    b1 = batch1_times(model, noise, labels, {n: {**common, **methods[n]} for n in
                                             ("sequential", "jacobi", "gs_jacobi_fixed", "gs_jacobi_auto")},
                      args.batch1_samples)
    for name, t in b1.items():
        rows[name]["seconds_batch1"] = t
        rows[name]["wall_speedup_batch1"] = b1["sequential"] / t
        print(f"batch 1 {name:16s} {t * 1e3:7.1f} ms/sample ({b1['sequential'] / t:.2f}x)")
    fd_ref = rows["sequential"]["fd"]
    equal = {n: r for n, r in rows.items() if n != "sequential" and r["fd"] <= fd_ref * (1 + FD_MARGIN)}
    best = max(equal, key=lambda n: equal[n]["pass_speedup"]) if equal else None
    result = {
        "benchmark": "flows_gs_jacobi",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": args.threads},
        "versions": {"fastdiff": fastdiff.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "model": {"config": {k: v for k, v in model.config.items() if not k.startswith("_")}, "num_tokens": T,
                  "path": str(args.model or "shipped")},
        "settings": {k: v for k, v in settings.as_dict().items() if k != "calibration"},
        "calibration": settings.calibration.as_dict(),
        "num_samples": args.num_samples, "batch": args.batch, "batch1_samples": args.batch1_samples,
        "fd_margin": FD_MARGIN, "rows": rows,
        "claim": {"auto_pass_speedup": rows["gs_jacobi_auto"]["pass_speedup"],
                  "auto_fd_within_margin": rows["gs_jacobi_auto"]["fd"] <= fd_ref * (1 + FD_MARGIN),
                  "auto_wall_speedup_batch1": rows["gs_jacobi_auto"]["wall_speedup_batch1"],
                  "best_equal_fd": best, "best_equal_fd_pass_speedup": equal[best]["pass_speedup"] if best else None},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in rows.items():
        ax[0].scatter(r["passes"], r["fd"], label=name)
        ax[1].scatter(r["seconds_batch"], r["fd"], label=name)
    ax[0].set_xlabel("sequential transformer passes")
    ax[1].set_xlabel("wall clock, batch inversion (s)")
    for a in ax:
        a.set_ylabel("FD-digits")
        a.axhline(rows["sequential"]["fd"] * (1 + FD_MARGIN), ls="--", c="grey", lw=0.8)
    ax[0].legend(fontsize=7)
    fig.suptitle("digits TarFlow: sequential vs Jacobi vs GS-Jacobi")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
