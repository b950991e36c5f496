"""Attention kernels: throughput of each backend, the fused HASTE distillation loss vs the materialised
reference, the INT8 kernel vs SDPA flash, and (on a GPU) bf16 correctness of every fastdiff kernel.

Sections, side by side in one run, written to ``benchmarks/results/attention_kernels[_cpu].json``:

* ``throughput``: forward and forward+backward TFLOP/s of every installed backend at N = 256, 1024, 4096,
  16384, head dim 64 and 128, bf16 (FLOPs: forward ``4 B H N^2 d``, backward 2.5x the forward, as
  FlashAttention's benchmarks count them; batch x heads chosen so B N = 16384 tokens, H d = 1024).
* ``distillation``: peak memory and time (forward + backward) of HASTE's attention loss from the student's
  Q, K, V and the teacher's Q, K: the fused kernel (teacher Q/K, and teacher probabilities) and the chunked
  PyTorch loss (teacher Q/K) against the materialised reference
  (``fastdiff.training.haste.materialized_attention`` after forming the teacher's probabilities), and
  against SDPA flash attention plus the reference loss alone.
* ``memory_lean`` (CPU and GPU): HASTE's attention backends at N = 1024, 4096, 16384 (output + loss,
  forward + backward; the chunked loss with the teacher's Q/K vs the materialised reference with the
  teacher's probabilities formed) and ``haste_step``: one whole HASTE training step (teacher run, REPA +
  two attention pairs, backward) with the teacher handing over Q/K and ``backend="auto"`` vs the reference
  (teacher probabilities, ``"materialized"``). On CPU each measurement runs in a child process whose address
  space is capped (``--cpu-cap-gib``, default 4): peak memory is the child's peak resident set above its
  resident set before the call (``/proc/self/status`` VmHWM after resetting it), and a path that cannot
  allocate within the cap is recorded as such instead of exhausting a shared machine.
* ``int8``: forward time of ``fastdiff-int8`` vs SDPA flash (fp16) and output cosine similarity to the
  fp16 SDPA output; ``end_to_end``: the sample difference with ``fastdiff-int8`` (on the denoiser only, and on
  every model of the pipeline) on the embedded digits model and a tiny Stable Diffusion pipeline, same noise.
* ``correctness`` (GPU): outputs and gradients of the Triton kernels in bf16 and fp16 against float64, with
  the test suite's contract (error <= 2x PyTorch's in the same dtype, :mod:`fastdiff.kernels.accuracy`).
* ``targets``: issue 13's targets, each with its measured value and whether it is met.

On a machine without CUDA it runs everything at tiny sizes through Triton's interpreter
(``TRITON_INTERPRET=1``) and says so: those timings measure numpy, not the kernels.

    python benchmarks/attention_kernels.py            # GPU: full run (~5 min on an H100/H200)
    python benchmarks/attention_kernels.py --quick    # fewer sizes
    python benchmarks/attention_kernels.py --only memory_lean   # one section (merged into the JSON)
    bash benchmarks/gpu_checks.sh                     # the GPU checks, one command
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():  # before triton's import: the kernels then run through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff.kernels.accuracy import close_to_reference, cosine  # noqa: E402
from fastdiff.kernels.chunked import chunked_attention_loss, haste_chunked_backend  # noqa: E402
from fastdiff.kernels.dispatch import BACKENDS  # noqa: E402
from fastdiff.kernels.distillation import attention_distillation, attention_distillation_reference  # noqa: E402
from fastdiff.kernels.flash import attention_reference, flash_attention  # noqa: E402
from fastdiff.kernels.haste_backend import haste_fused_backend  # noqa: E402
from fastdiff.kernels.int8 import int8_attention  # noqa: E402
from fastdiff.kernels.targets import TeacherAttention  # noqa: E402
from fastdiff.training.haste import attention_cross_entropy, materialized_attention  # noqa: E402

RESULTS = Path(__file__).parent / "results"


# ------------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(fn: Callable[[], Any], device: torch.device, cpu_repeats: int = 2) -> float:
    """Milliseconds per call: ``triton.testing.do_bench`` on CUDA (median, L2 flushed), best of
    ``cpu_repeats`` after a warm-up on CPU."""
    if device.type == "cuda":
        return float(triton.testing.do_bench(fn, warmup=25, rep=100))
    fn()
    best = float("inf")
    for _ in range(cpu_repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def peak_memory(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak CUDA memory (MiB) allocated by ``fn`` above what was allocated before it."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def guarded(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """``(result, None)`` or ``(None, "oom")`` / ``(None, "error: ...")``."""
    try:
        return fn(), None
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, "oom"
    except (RuntimeError, ValueError) as err:
        if "out of memory" in str(err).lower():
            torch.cuda.empty_cache()
            return None, "oom"
        return None, f"error: {str(err).splitlines()[0][:200]}"


def qkv(b: int, h: int, n: int, d: int, dtype: torch.dtype, device: torch.device, grad: bool = False, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(b, h, n, d, device=device, dtype=dtype, generator=g).requires_grad_(grad) for _ in range(3)]


# -------------------------------------------------------------------------------------------- throughput
def _throughput_row(name: str, n: int, d: int, dtype: torch.dtype, device: torch.device, tokens: int,
                    width: int) -> dict | None:
    backend = BACKENDS[name]
    if not backend.installed():
        return None
    b, h = max(1, tokens // n), max(1, width // d)
    flops = 4 * b * h * n * n * d
    q, k, v = qkv(b, h, n, d, dtype, device, grad=True)
    row: dict[str, Any] = {"backend": name, "n": n, "head_dim": d, "batch": b, "heads": h, "dtype": str(dtype)}
    refusal = backend.refuses(q, k, v, None)
    if refusal is not None and "forward-only" not in refusal:
        return {**row, "skipped": refusal}

    def fwd():
        with torch.no_grad():
            return backend.run(q, k, v, None, d**-0.5)

    ms, err = guarded(lambda: bench(fwd, device))
    row.update(fwd_ms=ms, fwd_tflops=None if ms is None else flops / ms / 1e9, fwd_error=err)
    if name not in ("fastdiff-int8", "sageattention"):
        dout = torch.randn_like(q)

        def fwd_bwd():
            torch.autograd.grad(backend.run(q, k, v, None, d**-0.5), (q, k, v), dout)

        ms, err = guarded(lambda: bench(fwd_bwd, device))
        row.update(fwd_bwd_ms=ms, fwd_bwd_tflops=None if ms is None else 3.5 * flops / ms / 1e9, fwd_bwd_error=err)
    return row


def throughput(device: torch.device, sizes: list[int], dims: list[int], dtype: torch.dtype, tokens: int,
               width: int) -> list[dict]:
    names = (["sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flash-attn", "xformers", "fastdiff-triton",
              "sageattention", "fastdiff-int8"] if device.type == "cuda" else ["sdpa", "fastdiff-triton", "fastdiff-int8"])
    rows = []
    for d in dims:
        for n in sizes:
            for name in names:
                row = _throughput_row(name, n, d, dtype, device, tokens, width)
                if row is not None:
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


# ------------------------------------------------------------------------------------------ distillation
def _distillation_row(n: int, device: torch.device, dtype: torch.dtype, b: int, h: int, d: int, h_t: int,
                      d_t: int) -> dict:
    q, k, v = qkv(b, h, n, d, dtype, device, grad=True)
    tq, tk, _ = qkv(b, h_t, n, d_t, dtype, device, seed=1)
    dout = torch.randn_like(q)
    scale, t_scale = d**-0.5, d_t**-0.5

    def fused_qk():
        out, loss = attention_distillation(q, k, v, teacher_query=tq, teacher_key=tk)
        torch.autograd.grad((out * dout).sum() + loss, (q, k, v))

    def teacher_probs():
        return ((tq @ tk.transpose(-1, -2)) * t_scale).float().softmax(-1)

    def fused_probs():
        out, loss = attention_distillation(q, k, v, teacher_probs=teacher_probs())
        torch.autograd.grad((out * dout).sum() + loss, (q, k, v))

    def chunked_qk():  # the no-triton path: SDPA output + the chunked PyTorch loss
        out = BACKENDS["sdpa-flash" if device.type == "cuda" else "sdpa"].run(q, k, v, None, scale)
        loss = chunked_attention_loss(q, k, TeacherAttention(query=tq, key=tk))
        torch.autograd.grad((out * dout).sum() + loss, (q, k, v))

    def reference():  # HASTE's released path: materialised logits, the teacher's probabilities formed too
        result = materialized_attention(q, k, v, scale, None, teacher_probs())
        torch.autograd.grad((result.output * dout).sum() + result.loss, (q, k, v))

    def sdpa_flash():
        out = BACKENDS["sdpa-flash" if device.type == "cuda" else "sdpa"].run(q, k, v, None, scale)
        torch.autograd.grad(out, (q, k, v), dout)

    def reference_loss_only():
        logits = (q @ k.transpose(-1, -2)) * scale
        torch.autograd.grad(attention_cross_entropy(logits, teacher_probs()), (q, k))

    row: dict[str, Any] = {"n": n, "batch": b, "heads": h, "head_dim": d, "teacher_heads": h_t,
                           "teacher_head_dim": d_t, "dtype": str(dtype)}
    for name, fn in [("fused_teacher_qk", fused_qk), ("fused_teacher_probs", fused_probs),
                     ("chunked_teacher_qk", chunked_qk),
                     ("materialized_reference", reference), ("sdpa_flash", sdpa_flash),
                     ("reference_loss_only", reference_loss_only)]:
        mem, err = guarded(lambda fn=fn: peak_memory(fn, device))
        ms, err2 = (None, err) if err else guarded(lambda fn=fn: bench(fn, device, cpu_repeats=1))
        row[name] = {"ms": ms, "peak_mib": mem, "error": err or err2}
    return row


def distillation(device: torch.device, sizes: list[int], dtype: torch.dtype, **shape: int) -> list[dict]:
    rows = []
    for n in sizes:
        rows.append(_distillation_row(n, device, dtype, **shape))
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ------------------------------------------------------------------------------------ memory-lean HASTE
BACKEND_CASES = {  # name: (HASTE attention backend, target the teacher hands over)
    "chunked_teacher_qk": (haste_chunked_backend, "qk"),
    "fused_teacher_qk": (haste_fused_backend, "qk"),
    "materialized_reference": (materialized_attention, "probs"),
}
STEP_CASES = {"auto_teacher_qk": ("auto", "qk"), "materialized_reference": ("materialized", "probs")}


def _backend_case(name: str, n: int, device: torch.device, dtype: torch.dtype, b: int, h: int, d: int, h_t: int,
                  d_t: int) -> Callable[[], Any]:
    """Forward + backward of one HASTE attention backend (output and loss) at ``n`` tokens; the reference
    forms the teacher's probabilities from its Q/K, as a teacher handing them over would."""
    q, k, v = qkv(b, h, n, d, dtype, device, grad=True)
    tq, tk, _ = qkv(b, h_t, n, d_t, dtype, device, seed=1)
    dout = torch.randn_like(q)
    fn, handed = BACKEND_CASES[name]
    target = TeacherAttention(query=tq, key=tk, scale=d_t**-0.5)

    def run():
        result = fn(q, k, v, d**-0.5, None, target if handed == "qk" else target.dense())
        torch.autograd.grad((result.output * dout).sum() + result.loss, (q, k, v))

    return run


def _step_case(name: str, n: int, device: torch.device, dtype: torch.dtype, batch: int, heads: int, head_dim: int,
               teacher_dim: int, teacher_heads: int) -> Callable[[], Any]:
    """One HASTE training step of a 2-block PixArt at ``n`` tokens (patch 2) against a 2-block DigitsViT
    teacher (patch 2, random weights): teacher run, REPA (block 1) + attention pairs (0, 0), (1, 1), backward."""
    from diffusers import PixArtTransformer2DModel

    from fastdiff.training import REPA, TeacherAlignment
    from fastdiff.training.teachers.vit import DigitsViT

    side = int(round(n ** 0.5)) * 2
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        sample_size=side, in_channels=1, out_channels=1, patch_size=2, num_layers=2, num_attention_heads=heads,
        attention_head_dim=head_dim, cross_attention_dim=heads * head_dim, caption_channels=8, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, use_additional_conditions=False, attention_bias=True).to(device, dtype).train()
    teacher = DigitsViT(image_size=side, patch_size=2, dim=teacher_dim, depth=2, heads=teacher_heads,
                        num_classes=0).to(device, dtype)
    backend, handed = STEP_CASES[name]
    align = TeacherAlignment(teacher, REPA(heads * head_dim, teacher_dim, block_index=1, projector_dim=256),
                             [(0, 0), (1, 1)], backend=backend, teacher_attention=handed).to(device, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    noisy, clean = (torch.randn(batch, 1, side, side, device=device, dtype=dtype, generator=g) for _ in range(2))
    inputs = dict(hidden_states=noisy, encoder_hidden_states=torch.randn(batch, 3, 8, device=device, dtype=dtype),
                  timestep=torch.full((batch,), 500, device=device))
    params = [*model.parameters(), *align.parameters()]

    def run():
        target = align.run_teacher(clean, n)
        with align.capture(model, target):
            sample = model(**inputs).sample
        ran = [p.ran for p in align._processors]
        loss = sample.float().square().mean() + align.losses()["align"]
        torch.autograd.grad(loss, params, allow_unused=True)
        return ran

    return run


_CASES = {"backend": _backend_case, "step": _step_case}


def _proc_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(spec: dict) -> dict:
    """One CPU measurement (run by a child process): inputs built, then the address space capped at
    ``cap_gib`` above it; peak memory of the first call (peak RSS above the RSS before it: later calls
    reuse memory the allocator kept), time the faster of two calls."""
    torch.set_num_threads(1)
    shape = spec["shape"]
    fn = _CASES[spec["case"]](spec["name"], spec["n"], torch.device("cpu"), getattr(torch, spec["dtype"]), **shape)
    resource.setrlimit(resource.RLIMIT_AS, (_proc_bytes("VmSize") + int(spec["cap_gib"] * 2**30), resource.RLIM_INFINITY))
    out: dict[str, Any] = {}
    try:
        times = []
        base = _proc_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        for _ in range(2):
            t = time.perf_counter()
            ran = fn()
            times.append(time.perf_counter() - t)
            out.setdefault("peak_mib", (_proc_bytes("VmHWM") - base) / 2**20)
        out.update(ms=min(times) * 1e3, error=None)
        if ran:
            out["backends_ran"] = ran
    except (RuntimeError, MemoryError) as err:
        message = str(err).splitlines()[0][:160]
        out = {"ms": None, "peak_mib": None,
               "error": (f"cannot allocate within the {spec['cap_gib']} GiB cap" if "allocate" in message.lower()
                         or isinstance(err, MemoryError) else f"error: {message}")}
    return out


def _measure(case: str, name: str, n: int, device: torch.device, dtype: torch.dtype, shape: dict,
             cap_gib: float) -> dict:
    if device.type == "cuda":
        fn = _CASES[case](name, n, device, dtype, **shape)
        mem, err = guarded(lambda: peak_memory(fn, device))
        ms, err2 = (None, err) if err else guarded(lambda: bench(fn, device))
        out = {"ms": ms, "peak_mib": mem, "error": err or err2}
        if err is None:
            ran, _ = guarded(fn)
            if ran:
                out["backends_ran"] = ran
        del fn
        torch.cuda.empty_cache()
        return out
    spec = {"case": case, "name": name, "n": n, "dtype": str(dtype).removeprefix("torch."), "shape": shape,
            "cap_gib": cap_gib}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}  # "auto" as on any CPU: no interpreter
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"ms": None, "peak_mib": None, "error": f"child exited {proc.returncode}: {tail[0][:160]}"}
    return json.loads(lines[-1])


def memory_lean(device: torch.device, sizes: list[int], dtype: torch.dtype, backend_shape: dict, step_shape: dict,
                cap_gib: float) -> dict:
    """HASTE's attention backends and whole HASTE steps: teacher Q/K + lean loss vs the materialised reference."""
    backends = [n for n in BACKEND_CASES if device.type == "cuda" or n != "fused_teacher_qk"]
    result: dict[str, Any] = {"backend_shape": backend_shape, "step_shape": step_shape, "dtype": str(dtype),
                              "cpu_cap_gib": cap_gib if device.type != "cuda" else None, "backends": [], "haste_step": []}
    for n in sizes:
        row = {"n": n, **{name: _measure("backend", name, n, device, dtype, backend_shape, cap_gib)
                          for name in backends}}
        result["backends"].append(row)
        print(json.dumps(row), flush=True)
    for n in sizes:
        row = {"n": n, **{name: _measure("step", name, n, device, dtype, step_shape, cap_gib) for name in STEP_CASES}}
        result["haste_step"].append(row)
        print(json.dumps(row), flush=True)
    for rows in (result["backends"], result["haste_step"]):
        for row in rows:
            ref = row["materialized_reference"]
            for name, cell in row.items():
                if isinstance(cell, dict) and name != "materialized_reference" and cell.get("peak_mib") \
                        and ref.get("peak_mib"):
                    cell["memory_vs_reference"] = cell["peak_mib"] / ref["peak_mib"]
                    cell["time_vs_reference"] = cell["ms"] / ref["ms"]
    return result


# --------------------------------------------------------------------------------------------------- int8
def _int8_row(n: int, d: int, device: torch.device, tokens: int, width: int) -> dict:
    b, h = max(1, tokens // n), max(1, width // d)
    q, k, v = qkv(b, h, n, d, torch.float16, device)
    exact = BACKENDS["sdpa-flash" if device.type == "cuda" else "sdpa"]
    with torch.no_grad():
        ref = exact.run(q, k, v, None, d**-0.5)
        out = int8_attention(q, k, v)
        t_int8, e1 = guarded(lambda: bench(lambda: int8_attention(q, k, v), device))
        t_sdpa, e2 = guarded(lambda: bench(lambda: exact.run(q, k, v, None, d**-0.5), device))
    return {"n": n, "head_dim": d, "batch": b, "heads": h, "int8_ms": t_int8, f"{exact.name}_ms": t_sdpa,
            "speedup": None if not (t_int8 and t_sdpa) else t_sdpa / t_int8, "cosine_to_fp16": cosine(out, ref),
            "error": e1 or e2}


def int8_kernel(device: torch.device, sizes: list[int], dims: list[int], tokens: int, width: int) -> list[dict]:
    rows = []
    for d in dims:
        for n in sizes:
            rows.append(_int8_row(n, d, device, tokens, width))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def end_to_end(device: torch.device, steps: int, images: int) -> list[dict]:
    """Same-noise samples (``images`` per model) with the default processors and with ``fastdiff-int8`` on the
    denoiser only (UNet / transformer) and on every model of the pipeline (the VAE's attention too)."""
    from fastdiff.testing import tiny_sd_pipeline

    rows = []
    pipes = {"embedded_digits": fastdiff.load_embedded_pipeline(device, torch.float16 if device.type == "cuda"
                                                                else torch.float32),
             "tiny_sd": tiny_sd_pipeline().to(device)}
    for name, pipe in pipes.items():
        def sample(pipe=pipe, name=name):
            g = torch.Generator(device="cpu").manual_seed(0)
            if name == "tiny_sd":
                prompts = ["a digit", "a photo of a cat", "a red square", "noise"][:images]
                return pipe(prompts, num_inference_steps=steps, generator=g, output_type="pt").images
            return pipe(class_labels=list(range(images)), num_inference_steps=steps, generator=g,
                        output_type="pt").images

        with torch.no_grad():
            base = sample()
            denoiser = pipe.unet if name == "tiny_sd" else pipe.transformer
            for scope, target in [("denoiser", denoiser), ("pipeline", pipe)]:
                if scope == "pipeline" and len(fastdiff.set_attention_backend(pipe, "sdpa")) == 1:
                    fastdiff.remove_attention_backend(pipe)
                    continue  # no attention outside the denoiser: same as the row above
                fastdiff.set_attention_backend(target, "fastdiff-int8")
                quant = sample()
                report = fastdiff.attention_backend_report(target)
                fastdiff.remove_attention_backend(target)
                diff = quant.double() - base.double()
                rows.append({"model": name, "int8_on": scope, "steps": steps, "images": images,
                             "max_abs_diff": diff.abs().max().item(), "rms_diff": diff.square().mean().sqrt().item(),
                             "rms_sample": base.double().square().mean().sqrt().item(), "cosine": cosine(quant, base),
                             "calls": {k: r["calls"] for k, r in report.items()}})
                print(json.dumps(rows[-1]), flush=True)
    return rows


# -------------------------------------------------------------------------------------------- correctness
def _correctness_row(dtype: torch.dtype, device: torch.device, b: int, h: int, n_q: int, n_k: int, d: int,
                     mask_kind: str | None) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device=device, generator=g).to(dtype).requires_grad_() for n in (n_q, n_k, n_k))
    mask = None
    if mask_kind == "additive":
        mask = torch.randn(1, h, n_q, n_k, device=device, generator=g)
    elif mask_kind == "bool":
        mask = torch.rand(n_q, n_k, device=device, generator=g) > 0.3
        mask[:, 0] = True
    dout = torch.randn(b, h, n_q, d, device=device, generator=g).to(dtype)
    floating = mask is not None and mask.is_floating_point()
    masks = {"fast": mask, "same": mask.to(dtype) if floating else mask, "exact": mask.double() if floating else mask}

    def copies(kind: str) -> list[torch.Tensor]:
        if kind == "fast":
            return [q, k, v]
        return [t.detach().to(torch.float64 if kind == "exact" else dtype).requires_grad_() for t in (q, k, v)]

    checks: dict[str, tuple[bool, dict]] = {}
    runs = {}
    for kind in ("fast", "same", "exact"):
        inputs = copies(kind)
        out = (flash_attention if kind == "fast" else attention_reference)(*inputs, masks[kind])
        runs[kind] = (out, *torch.autograd.grad(out, inputs, dout.to(out.dtype)))
    for i, name in enumerate(["out", "dq", "dk", "dv"]):
        checks[name] = close_to_reference(runs["fast"][i], runs["same"][i], runs["exact"][i])
    if n_q == n_k:  # the fused distillation on the same case, teacher given by queries and keys
        tq, tk = (torch.randn(b, h, n_q, 64, device=device, generator=g).to(dtype) for _ in range(2))
        for kind in ("fast", "same", "exact"):
            inputs = copies(kind)
            if kind == "fast":
                out, loss = attention_distillation(*inputs, teacher_query=tq, teacher_key=tk, attn_mask=mask)
            else:
                cast = torch.float64 if kind == "exact" else dtype
                out, loss = attention_distillation_reference(*inputs, teacher_query=tq.to(cast), teacher_key=tk.to(cast),
                                                             attn_mask=masks[kind])
            runs[kind] = (out, loss, *torch.autograd.grad((out * dout.to(out.dtype)).sum() + loss, inputs))
        for i, name in enumerate(["distill_out", "distill_loss", "distill_dq", "distill_dk", "distill_dv"]):
            checks[name] = close_to_reference(runs["fast"][i], runs["same"][i], runs["exact"][i])
    if dtype != torch.float32:
        with torch.no_grad():
            c = cosine(int8_attention(q.detach(), k.detach(), v.detach(), mask), runs["exact"][0])
        checks["int8_cosine"] = (c >= 0.999, {"cosine": c})
    return {"dtype": str(dtype), "shape": [b, h, n_q, n_k, d], "mask": mask_kind,
            "passed": all(c[0] for c in checks.values()), "failed": [n for n, c in checks.items() if not c[0]],
            "checks": {n: c[1] for n, c in checks.items()}}


GPU_CASES = [(1, 2, 37, 37, 72, "additive"), (2, 4, 300, 300, 64, None), (1, 2, 129, 77, 80, "bool"),
             (1, 2, 1000, 1000, 128, None), (1, 2, 4096, 4096, 64, None)]


def correctness(device: torch.device, dtypes: list[torch.dtype], cases: list[tuple] = GPU_CASES) -> list[dict]:
    """Kernel vs float64, bounded by PyTorch's own error in the same dtype (the tests' contract)."""
    rows = []
    previous = os.environ.get("FASTDIFF_TRITON_AUTOTUNE")
    os.environ["FASTDIFF_TRITON_AUTOTUNE"] = "0"  # one configuration per kernel: correctness, not speed
    try:
        for dtype in dtypes:
            for case in cases:
                rows.append(_correctness_row(dtype, device, *case))
                print(json.dumps({k: rows[-1][k] for k in ("dtype", "shape", "mask", "passed", "failed")}), flush=True)
    finally:
        if previous is None:
            os.environ.pop("FASTDIFF_TRITON_AUTOTUNE")
        else:
            os.environ["FASTDIFF_TRITON_AUTOTUNE"] = previous
    return rows


# ------------------------------------------------------------------------------------------------ targets
def targets(result: dict) -> dict[str, dict]:
    out: dict[str, dict] = {}
    tp = result.get("throughput", [])
    for kind, key, goal in [("forward", "fwd_tflops", 0.8), ("forward+backward", "fwd_bwd_tflops", 0.7)]:
        ratios = []
        for row in tp:
            if row["backend"] != "fastdiff-triton" or row["n"] < 1024 or row.get(key) is None:
                continue
            base = next((r for r in tp if r["backend"] == "sdpa-flash" and r["n"] == row["n"]
                         and r["head_dim"] == row["head_dim"] and r.get(key)), None)
            if base:
                ratios.append({"n": row["n"], "head_dim": row["head_dim"], "ratio": row[key] / base[key]})
        worst = min((r["ratio"] for r in ratios), default=None)
        out[f"triton_{kind}_vs_sdpa_flash"] = {"target": f">= {goal}x at N >= 1024", "ratios": ratios,
                                               "worst": worst, "met": worst is not None and worst >= goal}
    for row in result.get("distillation", []):
        if row["n"] != 4096:
            continue
        fused, ref = row["fused_teacher_qk"], row["materialized_reference"]
        mem_ok = None if not (fused["peak_mib"] and ref["peak_mib"]) else fused["peak_mib"] <= ref["peak_mib"] / 10
        budget = None if row["sdpa_flash"]["ms"] is None or row["reference_loss_only"]["ms"] is None else \
            row["sdpa_flash"]["ms"] + row["reference_loss_only"]["ms"]
        out["distillation_memory_n4096"] = {"target": "<= 1/10 of the materialised reference",
                                            "fused_mib": fused["peak_mib"], "reference_mib": ref["peak_mib"],
                                            "met": mem_ok}
        out["distillation_time_n4096"] = {"target": "<= SDPA flash fwd+bwd + reference loss", "fused_ms": fused["ms"],
                                          "budget_ms": budget, "met": None if budget is None or fused["ms"] is None
                                          else fused["ms"] <= budget}
    big = next((r for r in result.get("distillation", []) if r["n"] == 16384), None)
    if big is not None:
        out["distillation_runs_n16384"] = {"target": "fused runs where the reference runs out of memory",
                                           "fused": big["fused_teacher_qk"]["error"] or "ran",
                                           "reference": big["materialized_reference"]["error"] or "ran",
                                           "met": big["fused_teacher_qk"]["error"] is None}
    lean = result.get("memory_lean")
    if lean:
        for key, lean_name in (("backends", "chunked_teacher_qk"), ("haste_step", "auto_teacher_qk")):
            big = next((r for r in lean[key] if r["n"] == 16384), None)
            if big is None:
                continue
            lean_cell, ref = big[lean_name], big["materialized_reference"]
            out[f"{key}_{lean_name}_runs_n16384"] = {
                "target": "runs at N = 16384 where the materialised reference runs out of memory",
                "lean": lean_cell["error"] or "ran", "reference": ref["error"] or "ran",
                "backends_ran": lean_cell.get("backends_ran"), "met": lean_cell["error"] is None}
    int8 = [r for r in result.get("int8", []) if r["n"] >= 4096]
    out["int8_faster_than_sdpa_flash_n4096"] = {
        "target": "speedup > 1 and cosine >= 0.999 at N >= 4096",
        "rows": [{k: r[k] for k in ("n", "head_dim", "speedup", "cosine_to_fp16")} for r in int8],
        "met": bool(int8) and all((r["speedup"] or 0) > 1 and r["cosine_to_fp16"] >= 0.999 for r in int8)}
    if result.get("correctness"):
        out["kernel_correctness"] = {"target": "every check within 2x PyTorch's error in the same dtype "
                                               "(GPU: bf16, fp16, fp32; CPU interpreter: fp32, fp16)",
                                        "met": all(r["passed"] for r in result["correctness"])}
    if result["mode"] != "gpu":  # interpreter timings and no memory figures: nothing to judge
        for name, target in out.items():
            if name != "kernel_correctness" and "_runs_n16384" not in name:
                target["met"] = None
                target["why"] = "not measurable without a GPU (interpreter timings, no CUDA memory statistics)"
    return out


SECTIONS = ("correctness", "memory_lean", "throughput", "distillation", "int8", "end_to_end")


def _sections(device: torch.device, quick: bool, cap_gib: float) -> dict[str, Callable[[], Any]]:
    """What each section runs on this device (GPU: full sizes; CPU: interpreter at tiny sizes, and the
    memory-lean PyTorch paths at N = 1024, 4096, 16384)."""
    if device.type == "cuda":
        sizes = [1024, 4096] if quick else [256, 1024, 4096, 16384]
        bf16 = torch.bfloat16
        return {
            "correctness": lambda: correctness(device, [bf16, torch.float16, torch.float32]),
            "memory_lean": lambda: memory_lean(device, [4096] if quick else [4096, 16384], bf16,
                                               dict(b=2, h=16, d=72, h_t=12, d_t=64),
                                               dict(batch=2, heads=16, head_dim=72, teacher_dim=768, teacher_heads=12),
                                               cap_gib),
            "throughput": lambda: throughput(device, sizes, [64, 128], bf16, tokens=16384, width=1024),
            "distillation": lambda: distillation(device, [1024, 4096] if quick else [1024, 4096, 16384], bf16, b=2,
                                                 h=16, d=72, h_t=12, d_t=64),
            "int8": lambda: int8_kernel(device, sizes, [64, 128], tokens=16384, width=1024),
            "end_to_end": lambda: end_to_end(device, steps=25, images=4),
        }
    f32 = torch.float32
    return {
        "correctness": lambda: correctness(device, [f32, torch.float16], GPU_CASES[:1]),
        "memory_lean": lambda: memory_lean(device, [1024, 4096] if quick else [1024, 4096, 16384], f32,
                                           dict(b=1, h=2, d=64, h_t=2, d_t=64),
                                           dict(batch=1, heads=2, head_dim=32, teacher_dim=64, teacher_heads=2), cap_gib),
        "throughput": lambda: throughput(device, [64], [64], f32, tokens=64, width=128),
        "distillation": lambda: distillation(device, [64], f32, b=1, h=2, d=72, h_t=2, d_t=64),
        "int8": lambda: int8_kernel(device, [64], [64], tokens=64, width=128),
        "end_to_end": lambda: end_to_end(device, steps=1, images=1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes (GPU: N = 1024, 4096)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=None,
                        help="run these sections only, merged into the existing JSON")
    parser.add_argument("--cpu-cap-gib", type=float, default=4.0,
                        help="CPU memory_lean: address-space cap of each measuring child process (GiB)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(json.loads(args.child))), flush=True)
        return {}
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    out = args.out or RESULTS / ("attention_kernels.json" if cuda else "attention_kernels_cpu.json")
    result: dict[str, Any] = json.loads(out.read_text()) if args.only and out.is_file() else {}
    if cuda:
        result.update(mode="gpu", note="compiled Triton kernels, autotuned; bf16 throughput")
    else:
        torch.set_num_threads(1)
        result.update(mode="cpu-interpreter",
                      note="NO GPU: Triton kernels ran through TRITON_INTERPRET=1 (numpy) at tiny sizes in fp32; "
                           "timings measure the interpreter, not the kernels, and no kernel target can be judged. "
                           "memory_lean measures the PyTorch paths (chunked loss, teacher Q/K) against the "
                           "materialised reference on one CPU thread, peak memory as child-process RSS. "
                           "Run benchmarks/gpu_checks.sh on a GPU.")
    result.update({
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
                     "cuda": torch.version.cuda, "backends": [n for n, b in BACKENDS.items() if b.installed()]},
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name, run in _sections(device, args.quick, args.cpu_cap_gib).items():
        if args.only and name not in args.only:
            continue
        t = time.perf_counter()
        result[name] = run()
        result.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t, 1)
        result["targets"] = targets(result)
        result["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        out.write_text(json.dumps(result, indent=2) + "\n")  # after every section: partial runs keep results
    print(json.dumps(result["targets"], indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
