"""Parallel-in-time sampling: fastdiff's Picard / Jacobi / GS-Jacobi / Newton against diffusers' ParaDiGMS.

Claim under test: at the same final error against sequential sampling (rms <= 1e-3), fastdiff's solver needs
at most half the rounds (sequential batched model calls) of ParaDiGMS (Shih et al. 2023), and its per-round
overhead outside the model call is under 5 % of a round.

Side by side in one process, from the same initial noise and the same step noise:

* ``paradigms``: a faithful reproduction of the denoising loop of diffusers'
  ``pipelines/deprecated/stable_diffusion_variants/pipeline_stable_diffusion_paradigms.py`` with
  ``DDIMParallelScheduler`` / ``DDPMParallelScheduler.batch_step_no_noise`` (sliding window, cumulative drifts,
  tolerance scaled by the scheduler's variance, one ``.item()`` per round). Its error is measured against *its
  own* sequential fixed point (the same loop with ``parallel=1``), which for DDIM is not ``DDIMScheduler.step``
  (its last step uses ``alpha = 1``, not ``final_alpha_cumprod``); that systematic gap is reported separately.
* fastdiff's ``picard``, ``jacobi``, ``gs_jacobi`` and ``newton`` (``fastdiff.samplers.parallel``), measured
  against sequential ``scheduler.step`` sampling with the same noise.

Each method runs down a ladder of tolerances (largest first) and its best result is the fewest rounds with
rms <= 1e-3. Two models:

(a) the Gaussian-mixture oracle (``make_gaussian_mixture(dim=64, num_components=8)``, exact eps, SD scaled-linear
    betas, float64), DDIM-25/50/100/200 and DDPM-1000;
(b) the embedded digits model (``fastdiff.load_embedded_pipeline``, classifier-free guidance 2, float32).

Plus, on the embedded model: per-round overhead outside the model call, model-call time against window size
(the batch throughput that parallel sampling spends) and wall-clock against sequential sampling. With
``--device cuda`` the same runs time on the GPU, and an SD-1.5-sized UNet (random weights, fp16) is timed too.

    python benchmarks/parallel_sampling.py            # default, ~15 min on 2 busy CPU cores
    python benchmarks/parallel_sampling.py --quick    # smoke test, ~2 min
    python benchmarks/parallel_sampling.py --device cuda --full
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DDIMParallelScheduler, DDIMScheduler, DDPMParallelScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

import fastdiff
from fastdiff.samplers.parallel import sample_parallel
from fastdiff.samplers.steps import draw_noise, sample_sequential, step_map_for
from fastdiff.testing import SD_SCHEDULER_CONFIG, make_gaussian_mixture

RESULTS = Path(__file__).parent / "results"
TARGET_RMS = 1e-3
LADDER = (3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)  # the oracle: every method, every value
DECADES = (1.0, 0.1, 0.01, 0.001, 1e-4)  # the embedded model: down to the first success, then one refinement
Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------- ParaDiGMS
@torch.no_grad()
def paradigms_loop(kind: str, config: dict, steps: int, model: Model, latents: torch.Tensor,
                   generator: torch.Generator | None, parallel: int, tolerance: float,
                   timer: list[float] | None = None) -> tuple[torch.Tensor, int, int]:
    """diffusers' ParaDiGMS denoising loop (``StableDiffusionParadigmsPipeline.__call__``, step 7), with the
    UNet + guidance replaced by ``model(x [n*B, ...], t [n*B])``. Returns ``(x_K, rounds, evaluations)``."""
    scheduler = (DDIMParallelScheduler if kind == "ddim" else DDPMParallelScheduler).from_config(config)
    scheduler.set_timesteps(steps, device=latents.device)
    T, B = len(scheduler.timesteps), latents.shape[0]
    parallel = min(parallel, T)
    begin_idx, end_idx = 0, parallel
    buf = torch.stack([latents] * (T + 1))
    noise_array = torch.zeros_like(buf)
    for j in range(T):
        base_noise = randn_tensor(shape=latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        noise_array[j] = (scheduler._get_variance(scheduler.timesteps[j]) ** 0.5) * base_noise
    inverse_variance_norm = 1.0 / torch.tensor(
        [scheduler._get_variance(scheduler.timesteps[j]) for j in range(T)] + [0]).to(noise_array.device)
    inverse_variance_norm = inverse_variance_norm[:, None] / noise_array[0, 0].numel()
    scaled_tolerance = tolerance**2
    rounds = evals = 0
    while begin_idx < T:
        parallel_len = end_idx - begin_idx
        block_latents = buf[begin_idx:end_idx]
        block_t = scheduler.timesteps[begin_idx:end_idx, None].repeat(1, B)
        model_input = scheduler.scale_model_input(block_latents, block_t)
        start = time.perf_counter()
        model_output = model(model_input.flatten(0, 1), block_t.flatten(0, 1))
        if timer is not None:
            _sync(latents.device)
            timer.append(time.perf_counter() - start)
        block_latents_denoise = scheduler.batch_step_no_noise(
            model_output=model_output, timesteps=block_t.flatten(0, 1), sample=block_latents.flatten(0, 1),
        ).reshape(block_latents.shape)
        delta = block_latents_denoise - block_latents
        cumulative_delta = torch.cumsum(delta, dim=0)
        cumulative_noise = torch.cumsum(noise_array[begin_idx:end_idx], dim=0)
        if scheduler._is_ode_scheduler:
            cumulative_noise = 0
        block_latents_new = buf[begin_idx][None,] + cumulative_delta + cumulative_noise
        cur_error = torch.linalg.norm(
            (block_latents_new - buf[begin_idx + 1: end_idx + 1]).reshape(parallel_len, B, -1), dim=-1).pow(2)
        error_ratio = cur_error * inverse_variance_norm[begin_idx + 1: end_idx + 1]
        error_ratio = torch.nn.functional.pad(error_ratio, (0, 0, 0, 1), value=1e9)
        any_error_at_time = torch.max(error_ratio > scaled_tolerance, dim=1).values.int()
        ind = torch.argmax(any_error_at_time).item()
        new_begin_idx = begin_idx + min(1 + ind, parallel)
        new_end_idx = min(new_begin_idx + parallel, T)
        buf[begin_idx + 1: end_idx + 1] = block_latents_new
        buf[end_idx: new_end_idx + 1] = buf[end_idx][None,]
        rounds, evals = rounds + 1, evals + parallel_len
        begin_idx, end_idx = new_begin_idx, new_end_idx
    return buf[-1], rounds, evals


# ------------------------------------------------------------------------------------------- one study
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


@torch.no_grad()
def trajectory(model: Model, config: dict, kind: str, steps: int, x: torch.Tensor, seed: int = 7):
    """``(step map, step noise, sequential reference x_K)`` for a ``kind`` ("ddim"/"ddpm") run of ``steps``."""
    sched = (DDIMScheduler if kind == "ddim" else DDPMScheduler).from_config(config)
    sched.set_timesteps(steps)
    sm = step_map_for(sched)
    noise = draw_noise(sm, tuple(x.shape), torch.Generator(x.device).manual_seed(seed), x.device, x.dtype)
    return sm, noise, sample_sequential(sm, model, x, noise)


@torch.no_grad()
def compare(model: Model, config: dict, kind: str, steps: int, window: int, x: torch.Tensor,
            methods: list[str], ladder: tuple[float, ...], full_ladder: set[str], seed: int = 7) -> dict:
    """All methods on one (sampler, steps, window): every tolerance tried, and the best at rms <= 1e-3."""
    sm, noise, reference = trajectory(model, config, kind, steps, x, seed)
    own, *_ = paradigms_loop(kind, config, steps, model, x, torch.Generator(x.device).manual_seed(seed), 1, 0.1)
    out: dict[str, Any] = {"sampler": f"{kind.upper()}-{steps}", "kind": kind, "steps": steps, "window": window,
                           "paradigms_fixed_point_vs_scheduler_step_rms": _rms(own, reference), "methods": {}}
    for method in methods:
        runs: list[dict] = []
        tols = list(ladder)
        while tols:
            tol = tols.pop(0)
            start = time.perf_counter()
            if method == "paradigms":
                y, rounds, evals = paradigms_loop(kind, config, steps, model, x,
                                                  torch.Generator(x.device).manual_seed(seed), window, tol)
                err, err_step = _rms(y, own), _rms(y, reference)
            else:
                y, st = sample_parallel(sm, model, x, noise, method=method, window=window, tolerance=tol)
                rounds, evals, err = st.rounds, st.model_evals, _rms(y, reference)
                err_step = err
            runs.append({"tolerance": tol, "rounds": rounds, "evals": evals, "rms": err,
                         "rms_vs_scheduler_step": err_step, "seconds": round(time.perf_counter() - start, 3)})
            if err <= TARGET_RMS and method not in full_ladder:
                # first success on a decade ladder: also try halfway (log) back to the last failure, then stop
                previous = [r["tolerance"] for r in runs[:-1] if r["rms"] > TARGET_RMS]
                mid = (tol * previous[-1]) ** 0.5 if previous else None
                tols = [mid] if mid and previous[-1] / tol > 4 and mid not in [r["tolerance"] for r in runs] else []
        ok = [r for r in runs if r["rms"] <= TARGET_RMS]
        best = min(ok, key=lambda r: (r["rounds"], r["evals"])) if ok else None
        out["methods"][method] = {"runs": runs, "best": best}
        _print_method(out["sampler"], window, method, runs, best)
    base = out["methods"].get("paradigms", {}).get("best")
    for res in out["methods"].values():
        if base and res["best"]:
            res["rounds_vs_paradigms"] = res["best"]["rounds"] / base["rounds"]
    return out


def _best_tol(study: dict, method: str = "newton") -> float:
    """The tolerance at which ``method`` met the target in ``study`` (else its smallest tried)."""
    res = study["methods"][method]
    return (res["best"] or min(res["runs"], key=lambda r: r["tolerance"]))["tolerance"]


def _print_method(sampler: str, window: int, method: str, runs: list[dict], best: dict | None) -> None:
    ladder = " ".join(f"{r['tolerance']:g}:{r['rounds']}/{r['rms']:.0e}" for r in runs)
    tail = f"best {best['rounds']} rounds, {best['evals']} evals" if best else "never within 1e-3"
    print(f"  {sampler:10s} W{window:<3d} {method:10s} {tail:28s} | tol:rounds/rms {ladder}", flush=True)


# ------------------------------------------------------------------------------------------- the models
def oracle_model(device: torch.device) -> tuple[Model, dict, torch.Tensor]:
    oracle = make_gaussian_mixture(dim=64, num_components=8).to(device)
    return oracle, dict(SD_SCHEDULER_CONFIG), oracle.sample_data(1)


def digits_model(device: torch.device, batch: int, weights: str | None, guidance: float = 2.0):
    """The embedded pipeline as ``model(x, t)``: ``predict_noise`` with CFG on ``batch`` digit classes."""
    from fastdiff.models.digits import DigitsPipeline

    if weights:
        pipe = DigitsPipeline.from_pretrained(weights, local_files_only=True).to(device)
        source = str(weights)
    else:
        pipe = fastdiff.load_embedded_pipeline(device)
        source = "fastdiff.load_embedded_pipeline()"
    pipe.set_progress_bar_config(disable=True)
    ehs = pipe.encode_class_labels(list(range(batch)), 1, True)

    def model(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = u.shape[0] // batch
        e = torch.cat([ehs[:batch].repeat(n, 1, 1), ehs[batch:].repeat(n, 1, 1)])
        return pipe.predict_noise(u, t, e, guidance)

    return pipe, model, dict(pipe.scheduler.config), source


# ------------------------------------------------------------------------------------------- costs
@torch.no_grad()
def overhead(model: Model, config: dict, kind: str, steps: int, window: int, x: torch.Tensor, tol: float) -> dict:
    """Where a parallel solve's time goes: model calls, the gaps between consecutive calls (the per-round
    work outside the model: the update, the scan, the extrapolation, the host sync) and the one-off set-up
    before the first call and wrap-up after the last. Best of three runs."""
    sched = (DDIMScheduler if kind == "ddim" else DDPMScheduler).from_config(config)
    sched.set_timesteps(steps)
    sm = step_map_for(sched)
    noise = draw_noise(sm, tuple(x.shape), torch.Generator(x.device).manual_seed(7), x.device, x.dtype)
    res = {}
    for method in ("picard", "newton", "paradigms"):
        best = None
        for _ in range(3):
            calls: list[tuple[float, float]] = []
            timed = _timed(model, calls, x.device)
            _sync(x.device)
            t0 = time.perf_counter()
            if method == "paradigms":
                _, rounds, _ = paradigms_loop(kind, config, steps, timed, x,
                                              torch.Generator(x.device).manual_seed(7), window, tol)
            else:
                rounds = sample_parallel(sm, timed, x, noise, method=method, window=window, tolerance=tol)[1].rounds
            _sync(x.device)
            t1 = time.perf_counter()
            gaps = [b[0] - a[1] for a, b in zip(calls[:-1], calls[1:])]
            model_s = sum(b - a for a, b in calls)
            gap = sum(gaps) / max(len(gaps), 1)
            row = {"rounds": rounds, "seconds": round(t1 - t0, 4), "model_seconds": round(model_s, 4),
                   "model_ms_per_round": round(1e3 * model_s / len(calls), 3),
                   "overhead_per_round_ms": round(1e3 * gap, 3),
                   "overhead_fraction": round(gap / (gap + model_s / len(calls)), 4),
                   "setup_and_wrapup_ms": round(1e3 * (calls[0][0] - t0 + t1 - calls[-1][1]), 3)}
            if best is None or row["seconds"] < best["seconds"]:
                best = row
        res[method] = best
        print(f"  overhead {kind.upper()}-{steps} W{window} {method:9s} {best}", flush=True)
    return {"sampler": f"{kind.upper()}-{steps}", "window": window, "tolerance": tol, "methods": res}


def exact_newton(model: Model, config: dict, steps: int, x: torch.Tensor, rounds: int, methods: list[str]) -> dict:
    """Newton with the *exact* per-step Jacobians (autograd, ``D x D`` per point) on a full window, against
    fastdiff's methods run for the same number of rounds (tolerance 0, no early acceptance): how fast any
    Jacobian approximation could possibly converge. DDIM, one sample, small latents only."""
    from fastdiff.samplers.steps import apply_step, denoise, model_input

    sched = DDIMScheduler.from_config(config)
    sched.set_timesteps(steps)
    sm = step_map_for(sched).to(x.device, x.dtype)
    K, dim = sm.num_steps, x[0].numel()
    with torch.no_grad():
        ref = sample_sequential(sm, model, x, return_trajectory=True)
    k = torch.arange(K, device=x.device)

    def step(xs: torch.Tensor) -> torch.Tensor:
        xs = xs.view(K, *x.shape)
        x0, eps = denoise(sm, k, xs, model(model_input(sm, k, xs).flatten(0, 1), sm.timesteps[k]).view_as(xs))
        return apply_step(sm, k, xs, x0, eps).view(K, dim)

    traj = x.reshape(1, dim).repeat(K + 1, 1)
    errors = []
    for _ in range(rounds):
        xs = traj[:-1].clone().requires_grad_(True)
        f = step(xs)
        jac = torch.zeros(K, dim, dim, device=x.device)
        for c in range(0, dim, 32):
            rows = min(32, dim - c)
            basis = torch.zeros(rows, K, dim, device=x.device)
            basis[torch.arange(rows), :, c + torch.arange(rows)] = 1.0
            jac[:, c:c + rows] = torch.autograd.grad(f, xs, basis, is_grads_batched=True, retain_graph=True)[0] \
                .transpose(0, 1)
        f = f.detach()
        new = traj.clone()
        for i in range(K):
            new[i + 1] = f[i] + jac[i] @ (new[i] - traj[i])
        traj = new
        errors.append(_rms(traj[-1], ref[-1].reshape(dim)))
    out = {"sampler": f"DDIM-{steps}", "window": steps, "rms_by_round": {"exact_newton": errors}}
    noise = None
    with torch.no_grad():
        for method in methods:
            out["rms_by_round"][method] = [
                _rms(sample_parallel(sm, model, x, noise, method=method, window=steps, tolerance=0.0,
                                     max_rounds=r)[0], ref[-1]) for r in range(1, rounds + 1)]
    print("  exact Newton bound", out, flush=True)
    return out


def _timed(model: Model, log: list[tuple[float, float]], device: torch.device) -> Model:
    """``model``, logging each call's (start, end) wall time."""

    def timed(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _sync(device)
        start = time.perf_counter()
        y = model(u, t)
        _sync(device)
        log.append((start, time.perf_counter()))
        return y

    return timed


@torch.no_grad()
def throughput(model: Model, x: torch.Tensor, windows: list[int], repeats: int = 3) -> list[dict]:
    """Seconds per model call against the number of trajectory points in it (the parallel sampler's batch)."""
    rows = []
    for w in windows:
        u = x.repeat(w, *([1] * (x.ndim - 1)))
        t = torch.full((u.shape[0],), 500, device=x.device)
        model(u, t)
        _sync(x.device)
        start = time.perf_counter()
        for _ in range(repeats):
            model(u, t)
        _sync(x.device)
        sec = (time.perf_counter() - start) / repeats
        rows.append({"points": w, "seconds_per_call": round(sec, 5)})
    base = rows[0]["seconds_per_call"]
    for r in rows:
        r["spare_throughput"] = round(base * r["points"] / r["seconds_per_call"], 3)  # 1 = none spare
    print("  throughput", rows, flush=True)
    return rows


@torch.no_grad()
def wall_clock(pipe: Any, kind: str, steps: int, window: int, batch: int, tol: float, method: str = "newton") -> dict:
    """``pipe(...)`` against ``fastdiff.parallel_sample(pipe, ...)``, same generator, best of two."""
    config = dict(pipe.scheduler.config)
    pipe.scheduler = (DDIMScheduler if kind == "ddim" else DDPMScheduler).from_config(config)
    kwargs = dict(class_labels=list(range(batch)), num_inference_steps=steps, output_type="pt")
    times = {}
    for name in ("sequential", "parallel"):
        best = float("inf")
        for _ in range(2):
            _sync(pipe.device)
            start = time.perf_counter()
            if name == "sequential":
                ref = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
            else:
                out = fastdiff.parallel_sample(pipe, **kwargs, generator=torch.Generator().manual_seed(0),
                                               method=method, window=window, tolerance=tol)
            _sync(pipe.device)
            best = min(best, time.perf_counter() - start)
        times[name] = best
    res = {"sampler": f"{kind.upper()}-{steps}", "window": window, "batch": batch, "method": method,
           "tolerance": tol, "sequential_s": round(times["sequential"], 3), "parallel_s": round(times["parallel"], 3),
           "speedup": round(times["sequential"] / times["parallel"], 3), "rounds": out.stats.rounds,
           "image_rms_vs_sequential": _rms(out.images, ref)}
    print("  wall clock", res, flush=True)
    return res


@torch.no_grad()
def sd15_wall_clock(device: torch.device, steps: int, window: int, batches: list[int]) -> list[dict]:
    """An SD-1.5-sized UNet (random weights, fp16, 64x64 latents, 77x768 context), CFG 7.5: sequential DDIM
    against fastdiff's Newton solve, wall clock. For the GPU (far too slow on a CPU)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).to(device, torch.float16).eval()
    rows = []
    for batch in batches:
        model = _sd_denoiser(unet, torch.randn(2 * batch, 77, 768, device=device, dtype=torch.float16), batch)
        sched = DDIMScheduler(**SD_SCHEDULER_CONFIG)
        sched.set_timesteps(steps)
        sm = step_map_for(sched)
        x = torch.randn(batch, 4, 64, 64, device=device)
        times = {}
        for name in ("sequential", "parallel"):
            _sync(device)
            start = time.perf_counter()
            if name == "sequential":
                sample_sequential(sm, model, x)
            else:
                _, st = sample_parallel(sm, model, x, method="newton", window=window, tolerance=0.1)
            _sync(device)
            times[name] = time.perf_counter() - start
        rows.append({"batch": batch, "steps": steps, "window": window, "rounds": st.rounds,
                     "sequential_s": round(times["sequential"], 3), "parallel_s": round(times["parallel"], 3),
                     "speedup": round(times["sequential"] / times["parallel"], 3)})
        print("  sd15", rows[-1], flush=True)
    return rows


def _sd_denoiser(unet: Any, ctx: torch.Tensor, batch: int, guidance: float = 7.5) -> Model:
    """Stable Diffusion's CFG step for a window: ``[uncond; cond]`` per trajectory point."""

    def model(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = u.shape[0] // batch
        uv, tv = u.view(n, 1, batch, *u.shape[1:]), t.view(n, 1, batch)
        inp = torch.cat([uv, uv], 1).flatten(0, 2).half()
        out = unet(inp, torch.cat([tv, tv], 1).flatten(), encoder_hidden_states=ctx.repeat(n, 1, 1)).sample.float()
        out = out.view(n, 2, batch, *u.shape[1:])
        return (out[:, 0] + guidance * (out[:, 1] - out[:, 0])).flatten(0, 1)

    return model


# ------------------------------------------------------------------------------------------- report
def summarize(studies: list[dict]) -> list[dict]:
    rows = []
    for s in studies:
        row = {"sampler": s["sampler"], "window": s["window"], "batch": s.get("batch")}
        for m, r in s["methods"].items():
            b = r["best"]
            row[m] = None if b is None else {"rounds": b["rounds"], "evals": b["evals"], "rms": b["rms"],
                                             "tolerance": b["tolerance"]}
        base = row.get("paradigms")
        new = row.get("newton")
        row["newton_rounds_vs_paradigms"] = (new["rounds"] / base["rounds"]) if base and new else None
        rows.append(row)
    return rows


def markdown_table(title: str, rows: list[dict], methods: list[str]) -> str:
    head = "| sampler | window | batch | " + " | ".join(methods) + " | newton / paradigms |"
    lines = [f"**{title}** (rounds / model evaluations at rms <= 1e-3 vs sequential)", "", head,
             "|" + "---|" * (len(methods) + 4)]
    for r in rows:
        cells = []
        for m in methods:
            c = r.get(m, "n/a")
            cells.append("not run" if c == "n/a" else "never" if c is None else f"{c['rounds']} / {c['evals']}")
        ratio = r["newton_rounds_vs_paradigms"]
        lines.append(f"| {r['sampler']} | {r['window']} | {r['batch']} | " + " | ".join(cells)
                     + f" | {'-' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(lines)


COLORS = {"paradigms": "k", "picard": "tab:blue", "jacobi": "tab:gray", "gs_jacobi": "tab:olive",
          "newton": "tab:red"}


def plot(studies: list[dict], path: Path) -> None:
    """Error against rounds for every method and tolerance, one panel per study."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cols = 6
    rows = -(-len(studies) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat[len(studies):]:
        ax.axis("off")
    for ax, s in zip(axes.flat, studies):
        for m, r in s["methods"].items():
            runs = sorted(r["runs"], key=lambda x: x["rounds"])
            ax.plot([x["rounds"] for x in runs], [max(x["rms"], 1e-9) for x in runs], "o-", ms=2.5, lw=1,
                    color=COLORS.get(m), label=m)
        ax.axhline(TARGET_RMS, color="k", lw=0.5, ls="--")
        ax.set(xscale="log", yscale="log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{s.get('model', '')} {s['sampler']} W{s['window']} B{s.get('batch', '')}", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes[:, 0]:
        ax.set_ylabel("rms vs sequential", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("rounds", fontsize=7)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--full", action="store_true", help="every method on every embedded configuration")
    p.add_argument("--oracle-batch", type=int, default=8)
    p.add_argument("--digits-batch", type=int, default=1, help="digit classes per run (CFG doubles the batch)")
    p.add_argument("--digits-weights", default=None, help="a DigitsPipeline folder (default: the shipped model)")
    p.add_argument("--skip-digits", action="store_true")
    p.add_argument("--exact-newton", action="store_true",
                   help="also the exact-Jacobian Newton bound on the embedded model (DDIM-25, ~15 min more)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: the machine may be shared, and tiny ops stall on a busy thread pool)")
    p.add_argument("--out", type=Path, default=RESULTS / "parallel_sampling.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.time()
    methods = ["paradigms", "picard", "jacobi", "gs_jacobi", "newton"]

    print("(a) Gaussian-mixture oracle, float64", flush=True)
    oracle, config, _ = oracle_model(device)
    x = torch.randn(args.oracle_batch, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
    oracle_cases = [("ddim", 25, 25), ("ddim", 50, 32), ("ddim", 100, 32), ("ddim", 200, 32), ("ddpm", 1000, 48),
                    ("ddpm", 1000, 80)]
    if args.quick:
        oracle_cases = [("ddim", 25, 25), ("ddim", 50, 32)]
    oracle_studies = []
    for kind, steps, window in oracle_cases:
        slow = {"jacobi", "gs_jacobi"} if steps >= 1000 else set()
        ms = [m for m in methods if not (args.quick and m in slow)]
        s = compare(oracle, config, kind, steps, window, x, ms, LADDER,
                    full_ladder={"paradigms", "picard", "newton"} - slow)
        s["model"], s["batch"] = "oracle", args.oracle_batch
        oracle_studies.append(s)
    if not args.quick:
        print("(a') the same oracle, a batch of 64 (it holds samples near a mode boundary)", flush=True)
        x64 = torch.randn(64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
        s = compare(oracle, config, "ddim", 50, 32, x64, ["paradigms", "picard", "newton"],
                    LADDER + (3e-4, 1e-4, 3e-5, 1e-5), full_ladder={"paradigms", "picard", "newton"})
        s["model"], s["batch"] = "oracle", 64
        oracle_studies.append(s)

    digits: dict[str, Any] = {"skipped": True}
    if not args.skip_digits:
        print("(b) embedded digits model, float32, CFG 2", flush=True)
        pipe, model, dconfig, source = digits_model(device, args.digits_batch, args.digits_weights)
        xd = torch.randn(args.digits_batch, 1, 16, 16, generator=torch.Generator().manual_seed(0)).to(device)
        cases = [("ddim", 25, 25), ("ddim", 50, 32), ("ddim", 100, 32), ("ddim", 200, 32), ("ddpm", 1000, 80)]
        if args.quick:
            cases = [("ddim", 25, 25)]
        studies = []
        for kind, steps, window in cases:
            ms = methods if args.full or steps <= 50 else ["paradigms", "picard", "newton"]
            s = compare(model, dconfig, kind, steps, window, xd, ms, DECADES, full_ladder=set())
            s["model"], s["batch"] = "digits", args.digits_batch
            studies.append(s)
        print("(c) costs on the embedded model", flush=True)
        costs = {
            "overhead": [overhead(model, dconfig, "ddim", 100, 32, xd, 0.1)]
            + ([] if args.quick else [overhead(model, dconfig, "ddpm", 1000, 80, xd, 1.0)]),
            "throughput": throughput(model, xd, [1, 2, 4, 8, 16, 32, 64] if not args.quick else [1, 8, 32]),
            "wall_clock": [wall_clock(pipe, s["kind"], s["steps"], s["window"], args.digits_batch, _best_tol(s))
                           for s in studies if s["steps"] in (25 if args.quick else 50, 100)],
        }
        digits = {"weights": source, "batch": args.digits_batch, "guidance_scale": 2.0, "studies": studies,
                  "summary": summarize(studies), "costs": costs}
        if args.exact_newton:
            print("(e) exact-Jacobian Newton on the embedded model", flush=True)
            digits["exact_newton_bound"] = exact_newton(model, dconfig, 25, xd[:1], 6, ["picard", "newton"])
    sd15 = None
    if device.type == "cuda":
        print("(d) SD-1.5-sized UNet, fp16", flush=True)
        sd15 = sd15_wall_clock(device, 100, 32, [1, 4])

    summary = summarize(oracle_studies)
    report = {
        "meta": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(),
            "gpu": "none lent to this session: CPU only; run with --device cuda for the wall-clock study"
            if device.type != "cuda" else torch.cuda.get_device_name(device),
            "cpu_threads": torch.get_num_threads(),
            "python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
            "fastdiff": fastdiff.__version__, "seconds": round(time.time() - started, 1),
            "target_rms": TARGET_RMS, "tolerance_ladder": list(LADDER), "embedded_ladder": list(DECADES),
            "args": {k: str(v) for k, v in vars(args).items()},
        },
        "oracle": {"batch": args.oracle_batch, "studies": oracle_studies, "summary": summary},
        "digits": digits,
        "sd15": sd15 if sd15 is not None else "not run: needs --device cuda",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    plot(oracle_studies + (digits.get("studies") or []), args.out.with_suffix(".png"))
    print()
    print(markdown_table("oracle", summary, methods))
    if digits.get("summary"):
        print()
        print(markdown_table("embedded digits model", digits["summary"], methods))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
