"""TarFlow sampling (issue 15): sequential vs Jacobi vs GS-Jacobi (fixed and automatic) on the embedded digits flow.

Claims under test: the automatic GS-Jacobi strategy (CRM / IGM from a calibration batch,
``fastdiff.flows.auto_strategy``) needs at least 2.5x fewer sequential transformer passes than sequential
KV-cached inversion at equal FD-digits (within 2 %) and is faster in wall clock at batch 1 on a CPU; Jacobi and
GS-Jacobi with a tight tolerance reproduce the sequential inverse (rms <= 1e-5 in float64); the flow samples
recognisable digits (class accuracy >= 0.9 at its default guidance).

Side by side in one process, from the same prior noise and labels, the shipped model at its default guidance and
stopping rule, the samplers of ``fastdiff compare --model tarflow-digits`` (``fastdiff.flows.compare``):

* ``sequential``: the reference, one token per pass with a key/value cache (``T - 1`` passes per block);
* ``jacobi``: every block Jacobi on the whole sequence;
* ``gs_jacobi_fixed``: every block 8 segments;
* ``gs_jacobi_auto``: the shipped automatic strategy (CRM ranking), plus two variants of it: ``ranking="measured"``
  (fastdiff's option) and ``easy_iters=4`` (a smaller budget for the non-tough blocks).

Batch 64: all samples in chunks of 64, every sampler on a chunk before the next chunk (machine load hits them
alike); FD-digits and class accuracy of the denoised samples (``fastdiff.metrics.evaluate_samples``, 8x8 samples
upsampled to 16x16 as the data is), rms of the inverted tokens to the sequential ones, transformer passes per
chunk and inversion wall clock (the denoising step, identical for all, is not in it). Batch 1: the first
``--batch1-samples`` samples one at a time, interleaved the same way: median wall clock, mean passes, rms to
sequential. Guidance: the automatic strategy at guidance 0, 0.5, 1 and 2 on the first ``--guidance-samples``
(FD-digits, class accuracy), for the choice of the default. float64: the model in double precision, Jacobi and GS-Jacobi (8 segments, and 5, which does not divide
the 63 unknown tokens) at tolerance 1e-12 without the clamp, rms to the float64 sequential inverse.

    OMP_NUM_THREADS=1 python benchmarks/tarflow_sampling.py            # ~15 min on one busy CPU core
    python benchmarks/tarflow_sampling.py --quick                      # smoke test
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
from fastdiff.flows import auto_strategy, invert, load_digits_tarflow, metric_images
from fastdiff.flows.compare import FD_MARGIN, FLOW_SAMPLERS, flow_sampler_kwargs
from fastdiff.metrics import evaluate_samples

RESULTS = Path(__file__).parent / "results"
ACCURACY_TARGET, PASS_TARGET, RMS_TARGET = 0.9, 2.5, 1e-5


def samplers(settings, num_tokens: int) -> dict[str, dict]:
    out = {name: flow_sampler_kwargs(name, settings, num_tokens) for name in FLOW_SAMPLERS}
    auto, cal, options = out["gs_jacobi_auto"], settings.calibration, settings.strategy_options
    if cal.jacobi_iters is not None:
        out["gs_jacobi_auto_measured"] = {**auto, "strategy": auto_strategy(cal, **{**options, "ranking": "measured"})}
    out["gs_jacobi_auto_easy4"] = {**auto, "strategy": auto_strategy(cal, **{**options, "easy_iters": 4})}
    return out


def batch_runs(model, noise, labels, batch: int, methods: dict) -> dict:
    """Every method on chunk i before chunk i + 1: inverted tokens, passes and inversion seconds per chunk."""
    runs = {name: {"x": [], "passes": [], "seconds": [], "converged": True, "blocks": None} for name in methods}
    for s in range(0, len(noise), batch):
        for name, kwargs in methods.items():
            x, stats = invert(model, noise[s:s + batch], labels[s:s + batch], **kwargs)
            r = runs[name]
            r["x"].append(x)
            r["passes"].append(stats.passes)
            r["seconds"].append(stats.seconds)
            r["converged"] &= all(b.converged for b in stats.blocks)
            r["blocks"] = [{"block": b.block, "passes": b.passes, "iterations": b.iterations,
                            "residual": b.residual, "converged": b.converged} for b in stats.blocks]
        print(f"  chunk {s // batch + 1}/{-(-len(noise) // batch)} done", flush=True)
    for r in runs.values():
        r["x"] = torch.cat(r["x"])
    return runs


def batch1_runs(model, noise, labels, num: int, methods: dict) -> dict:
    times = {name: [] for name in methods}
    passes = {name: [] for name in methods}
    xs = {name: [] for name in methods}
    for i in range(num):  # interleaved: every method on sample i before sample i + 1
        for name, kwargs in methods.items():
            tic = time.perf_counter()
            x, stats = invert(model, noise[i:i + 1], labels[i:i + 1], **kwargs)
            times[name].append(time.perf_counter() - tic)
            passes[name].append(stats.passes)
            xs[name].append(x)
    ref = torch.cat(xs["sequential"])
    return {name: {"seconds": statistics.median(times[name]), "seconds_all": times[name],
                   "passes": statistics.mean(passes[name]),
                   "rms_vs_sequential": float((torch.cat(xs[name]) - ref).pow(2).mean().sqrt())} for name in methods}


def float64_check(model, settings, noise, labels) -> dict:
    """Tight-tolerance Jacobi / GS-Jacobi against the sequential inverse, all in float64."""
    m64 = model.double()
    z = noise.double()
    common = {"guidance": settings.guidance, "annealed": settings.annealed}
    ref, _ = invert(m64, z, labels, method="sequential", **common)
    out = {}
    for name, kw in {"jacobi": {"method": "jacobi"}, "gs_jacobi_8_segments": {"method": "gs_jacobi", "num_segments": 8},
                     "gs_jacobi_5_segments": {"method": "gs_jacobi", "num_segments": 5}}.items():
        x, stats = invert(m64, z, labels, tolerance=1e-12, clamp=None, **kw, **common)
        out[name] = {"rms_vs_sequential": float((x - ref).pow(2).mean().sqrt()), "passes": stats.passes,
                     "converged": all(b.converged for b in stats.blocks)}
    model.float()
    return {"num_samples": len(z), "tolerance": 1e-12, "clamp": None, "rows": out}


def guidance_sweep(model, settings, noise, labels, batch: int, weights) -> dict:
    """FD-digits and class accuracy of the shipped automatic strategy at several guidance weights."""
    out = {}
    for w in weights:
        kwargs = flow_sampler_kwargs("gs_jacobi_auto", settings, model.num_tokens, guidance=w)
        xs = [invert(model, noise[s:s + batch], labels[s:s + batch], **kwargs)[0] for s in range(0, len(noise), batch)]
        images = model.denoise(model.unpatchify(torch.cat(xs)), labels)
        m = evaluate_samples(metric_images(images), labels, value_range=(0, 1), metric="digits")
        out[str(w)] = {"fd": m.fd, "accuracy": m.accuracy}
        print(f"guidance {w:4.2f}: FD {m.fd:7.3f} acc {m.accuracy:.3f}", flush=True)
    return {"sampler": "gs_jacobi_auto", "num_samples": len(noise), "default": settings.guidance, "rows": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=1536)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batch1-samples", type=int, default=48)
    parser.add_argument("--float64-samples", type=int, default=8)
    parser.add_argument("--guidance-samples", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", type=Path, default=None, help="an exported TarFlow (default: the shipped one)")
    parser.add_argument("--out", type=Path, default=RESULTS / "tarflow_sampling.json")
    args = parser.parse_args()
    if args.quick:
        args.num_samples, args.batch, args.batch1_samples, args.float64_samples = 32, 16, 2, 2
        args.guidance_samples = 32
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, settings = load_digits_tarflow(args.model)
    T = model.num_tokens
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(args.num_samples) % 10
    noise = torch.randn(args.num_samples, T, model.token_dim, generator=gen)
    methods = samplers(settings, T)
    invert(model, noise[:1], labels[:1], method="jacobi", max_iters=1)  # warm-up, untimed

    exact = float64_check(model, settings, noise[:args.float64_samples], labels[:args.float64_samples])
    for name, r in exact["rows"].items():
        print(f"float64 {name:22s} rms {r['rms_vs_sequential']:.2e} passes {r['passes']}", flush=True)

    runs = batch_runs(model, noise, labels, args.batch, methods)
    ref_x = runs["sequential"]["x"]
    rows = {}
    for name, r in runs.items():
        images = model.denoise(model.unpatchify(r["x"]), labels)
        m = evaluate_samples(metric_images(images), labels, value_range=(0, 1), metric="digits")
        seconds = sum(r["seconds"])
        rows[name] = {"fd": m.fd, "accuracy": m.accuracy, "passes": statistics.mean(r["passes"]),
                      "seconds_batch": seconds, "rms_vs_sequential": float((r["x"] - ref_x).pow(2).mean().sqrt()),
                      "converged": r["converged"], "blocks_last_chunk": r["blocks"],
                      "strategy": [vars(s) for s in methods[name].get("strategy", [])]}
    seq = rows["sequential"]
    for name, row in rows.items():
        row["pass_speedup"] = seq["passes"] / row["passes"]
        row["wall_speedup_batch"] = seq["seconds_batch"] / row["seconds_batch"]
        print(f"{name:24s} FD {row['fd']:7.3f} acc {row['accuracy']:.3f} passes {row['passes']:6.1f} "
              f"({row['pass_speedup']:.2f}x) batch-{args.batch} {row['seconds_batch']:6.2f}s "
              f"({row['wall_speedup_batch']:.2f}x) rms {row['rms_vs_sequential']:.2e}", flush=True)

    b1 = batch1_runs(model, noise, labels, args.batch1_samples, methods)
    for name, r in b1.items():
        rows[name]["batch1"] = {**r, "wall_speedup": b1["sequential"]["seconds"] / r["seconds"],
                                "pass_speedup": b1["sequential"]["passes"] / r["passes"]}
        print(f"batch 1 {name:24s} {r['seconds'] * 1e3:7.1f} ms/sample ({b1['sequential']['seconds'] / r['seconds']:.2f}x)"
              f" passes {r['passes']:.1f} rms {r['rms_vs_sequential']:.2e}", flush=True)

    sweep = guidance_sweep(model, settings, noise[:args.guidance_samples], labels[:args.guidance_samples],
                           args.batch, (0.0, 0.5, 1.0, 2.0))

    fd_ref = seq["fd"]
    within = {n: abs(r["fd"] - fd_ref) <= FD_MARGIN * fd_ref for n, r in rows.items()}
    equal = [n for n in rows if n != "sequential" and within[n]]
    best = max(equal, key=lambda n: rows[n]["pass_speedup"]) if equal else None
    auto = rows["gs_jacobi_auto"]
    claims = {
        "auto_pass_speedup": auto["pass_speedup"], "auto_pass_speedup_target": PASS_TARGET,
        "auto_fd": auto["fd"], "sequential_fd": fd_ref, "auto_fd_within_margin": within["gs_jacobi_auto"],
        "auto_wall_speedup_batch1": auto["batch1"]["wall_speedup"],
        "auto_wall_speedup_batch64": auto["wall_speedup_batch"],
        "accuracy_at_default_guidance": seq["accuracy"], "auto_accuracy": auto["accuracy"],
        "float64_max_rms": max(r["rms_vs_sequential"] for r in exact["rows"].values()),
        "best_equal_fd": best, "best_equal_fd_pass_speedup": rows[best]["pass_speedup"] if best else None,
    }
    claims["met"] = {
        "pass_speedup_at_equal_fd": claims["auto_pass_speedup"] >= PASS_TARGET and claims["auto_fd_within_margin"],
        "wall_speedup_batch1": claims["auto_wall_speedup_batch1"] > 1,
        "accuracy": claims["accuracy_at_default_guidance"] >= ACCURACY_TARGET and auto["accuracy"] >= ACCURACY_TARGET,
        "float64_rms": claims["float64_max_rms"] <= RMS_TARGET,
    }
    result = {
        "benchmark": "tarflow_sampling",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": args.threads,
                   "note": "a CPU shared with other jobs; samplers interleaved chunk by chunk"},
        "versions": {"fastdiff": fastdiff.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "model": {"config": {k: v for k, v in model.config.items() if not k.startswith("_")}, "num_tokens": T,
                  "path": str(args.model or "shipped")},
        "settings": {k: v for k, v in settings.as_dict().items() if k != "calibration"},
        "calibration": settings.calibration.as_dict(),
        "num_samples": args.num_samples, "batch": args.batch, "batch1_samples": args.batch1_samples,
        "fd_margin": FD_MARGIN, "seconds_total": time.perf_counter() - start, "rows": rows, "float64": exact,
        "guidance_sweep": sweep,
        "claims": claims,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.batch, args.out.with_suffix(".png"))
    print(json.dumps(claims, indent=1))
    print(f"wrote {args.out} in {result['seconds_total']:.0f} s")


def plot(rows: dict, batch: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    for name, r in rows.items():
        ax[0].scatter(r["passes"], r["fd"], label=name)
        ax[1].scatter(r["seconds_batch"], r["fd"], label=name)
        ax[2].scatter(r["batch1"]["seconds"], r["fd"], label=name)
    ax[0].set_xlabel(f"sequential transformer passes (batch {batch})")
    ax[1].set_xlabel(f"inversion wall clock, all samples at batch {batch} (s)")
    ax[2].set_xlabel("inversion wall clock per sample at batch 1 (s)")
    for a in ax:
        a.set_ylabel("FD-digits")
        fd = rows["sequential"]["fd"]
        a.axhspan(fd * (1 - FD_MARGIN), fd * (1 + FD_MARGIN), color="grey", alpha=0.15)
        a.grid(True, alpha=0.3)
    ax[0].legend(fontsize=7)
    fig.suptitle("digits TarFlow: sequential vs Jacobi vs GS-Jacobi (band: sequential FD +- 2 %)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
