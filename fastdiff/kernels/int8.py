"""SageAttention-style quantized attention for inference, in Triton (forward only).

SageAttention (Zhang et al., "SageAttention: Accurate 8-Bit Attention for Plug-and-play Inference
Acceleration", ICLR 2025, arXiv:2410.02367, Sec. 3-4; official Triton code thu-ml/SageAttention v1):

1. Smooth K: ``K' = K - mean_tokens(K)`` (per batch, head and channel). Softmax is invariant to it, since
   ``q . mean(K)`` is the same for every key of a row; it removes the channel outliers that make per-block
   INT8 quantization of K inaccurate.
2. Quantize per block, symmetric INT8: ``delta = max|X_block| / 127``, ``X_int8 = round(X / delta)``, one
   scale per ``BLOCK_M`` query rows and per ``BLOCK_N`` key rows (the kernel's tiles); the softmax scale and
   ``log2 e`` are folded into Q before quantizing (as the official kernel does).
3. ``S = (Q_int8 K_int8^T) delta_Q delta_K`` with INT32 accumulation, online softmax in base 2, and
   ``P V`` with P and V in FP16 and an FP32 accumulator (SageAttention's paper also offers an FP16
   accumulator; we keep FP32, a named difference).

Accuracy contract (checked by the tests and ``benchmarks/attention_kernels.py``): output cosine similarity
``>= 0.999`` to exact attention in fp16 on random and diffusion-model inputs (per call on the embedded digits
model and a tiny SD UNet: >= 0.9999). End to end (``end_to_end`` in the benchmark JSON) use it on the
denoiser: ``set_attention_backend(pipe.unet, "fastdiff-int8")``; a VAE's single-head attention amplifies the
error (tiny SD, one step: image cosine 0.99999993 with the UNet quantized, 0.991 with the VAE's attention too).
bf16 inputs: V is rounded to fp16 for ``P V`` (values beyond fp16's range would overflow).
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from fastdiff.kernels._triton import (
    INTERPRETER_TILE,
    LOG2E,
    block_dim,
    check_attention_inputs,
    launch,
    prepare_mask,
    strides,
)
from fastdiff.kernels.flash import attention_logits, triton_cdiv

GPU_TILES = (128, 64)  # SageAttention's BLKQ, BLKK


def int8_tiles(device: torch.device) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)``: the quantization blocks of Q and K, equal to the kernel's tiles."""
    return GPU_TILES if device.type == "cuda" else (INTERPRETER_TILE, INTERPRETER_TILE)


def _quant_kernel(X, MEAN, XQ, XS, factor, sxb, sxh, sxn, sxd, H, N, D, NB,
                  HAS_MEAN: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """One block of ``BLOCK`` rows of ``(X - mean) * factor`` to INT8 with one scale (XQ: [B*H, N, D])."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs < N)[:, None] & (offs_d < D)[None, :]
    x = tl.load(X + b * sxb + h * sxh + offs[:, None] * sxn + offs_d[None, :] * sxd, mask=ok, other=0.0)
    x = x.to(tl.float32)
    if HAS_MEAN:
        x = x - tl.load(MEAN + pid_bh * D + offs_d, mask=offs_d < D, other=0.0)[None, :]
    x = tl.where(ok, x * factor, 0.0)
    scale = tl.max(tl.max(tl.abs(x), 1), 0) / 127.0
    scale = tl.where(scale > 0, scale, 1.0)
    xq = x / scale
    xq = (xq + tl.where(xq >= 0, 0.5, -0.5)).to(tl.int8)  # round half away from zero
    tl.store(XQ + pid_bh * N * D + offs[:, None] * D + offs_d[None, :], xq, mask=ok)
    tl.store(XS + pid_bh * NB + pid, scale)


def _int8_fwd_kernel(Q8, K8, QS, KS, V, M, Out, svb, svh, svn, svd, smb, smh, smm, smn, sob, soh, som, sod,
                     H, N_Q, N_K, D, NBQ, NBK,
                     HAS_MASK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q
    d_ok = offs_d < D
    q = tl.load(Q8 + pid_bh * N_Q * D + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                other=0)
    q_scale = tl.load(QS + pid_bh * NBQ + pid_m)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < N_K
        k = tl.load(K8 + pid_bh * N_K * D + offs_n[:, None] * D + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                    other=0)
        k_scale = tl.load(KS + pid_bh * NBK + start_n // BLOCK_N)
        s2 = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32) * (q_scale * k_scale)
        if HAS_MASK:
            s2 += tl.load(M + b * smb + h * smh + offs_m[:, None] * smm + offs_n[None, :] * smn,
                          mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32) * 1.4426950408889634
        s2 = tl.where(n_ok[None, :], s2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s2 - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float16)
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod, out.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


def _quantize(x: Tensor, mean: Tensor | None, factor: float, block: int, block_d: int) -> tuple[Tensor, Tensor]:
    b, h, n, d = x.shape
    nb = triton_cdiv(n, block)
    xq = torch.empty(b * h, n, d, device=x.device, dtype=torch.int8)
    xs = torch.empty(b * h, nb, device=x.device, dtype=torch.float32)
    launch(_quant_kernel, lambda meta: (nb, b * h),
           (x, mean if mean is not None else x, xq, xs, factor, *x.stride(), h, n, d, nb),
           family="int8", key=("N", "BLOCK_D"), device_tensor=x, tiles={"BLOCK": block},
           HAS_MEAN=mean is not None, BLOCK_D=block_d)
    return xq, xs


def int8_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                   scale: float | None = None, smooth_k: bool = True) -> Tensor:
    """SageAttention-style attention: INT8 ``Q K^T`` (per-block scales, K smoothed), FP16 ``P V``.

    Inference only: raises if autograd would need a gradient. Inputs as :func:`flash_attention`
    (fp16 / bf16 / fp32, head_dim <= 256, optional boolean or additive mask); output in the input dtype.
    """
    check_attention_inputs(query, key, value, kernel="int8_attention")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise ValueError("int8_attention is forward-only (inference): call it under torch.no_grad() or with "
                         "tensors that do not require grad")
    mask = prepare_mask(attn_mask, query, key)
    b, h, n_q, d = query.shape
    n_k = key.shape[2]
    scale = d ** -0.5 if scale is None else float(scale)
    bm, bn = int8_tiles(query.device)
    bd = max(32, block_dim(d))
    mean = key.float().mean(dim=2).contiguous() if smooth_k else None
    q8, qs = _quantize(query, None, scale * LOG2E, bm, bd)
    k8, ks = _quantize(key, mean, 1.0, bn, bd)
    out = torch.empty_like(query)
    launch(_int8_fwd_kernel, lambda meta: (triton_cdiv(n_q, bm), b * h),
           (q8, k8, qs, ks, value, mask if mask is not None else value, out, *value.stride(), *strides(mask),
            *out.stride(), h, n_q, n_k, d, qs.shape[1], ks.shape[1]),
           family="int8", key=("N_Q", "N_K", "BLOCK_D", "HAS_MASK"), device_tensor=query,
           tiles={"BLOCK_M": bm, "BLOCK_N": bn}, HAS_MASK=mask is not None, BLOCK_D=bd)
    return out


def _quantize_reference(x: Tensor, block: int) -> Tensor:
    """Per-block symmetric INT8 fake-quantization along tokens (dim 2), in float64."""
    n = x.shape[2]
    blocks = []
    for start in range(0, n, block):
        xb = x[:, :, start:start + block]
        delta = xb.abs().amax(dim=(2, 3), keepdim=True) / 127
        delta = torch.where(delta > 0, delta, torch.ones_like(delta))
        r = xb / delta
        blocks.append(torch.trunc(r + torch.where(r >= 0, 0.5, -0.5)) * delta)
    return torch.cat(blocks, dim=2)


def int8_attention_reference(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                             scale: float | None = None, smooth_k: bool = True,
                             tiles: tuple[int, int] | None = None) -> Tensor:
    """PyTorch reference of :func:`int8_attention`'s arithmetic: the same smoothing and per-block
    quantization, simulated in float64, then exact softmax and ``P V`` (``tiles`` = the quantization
    blocks, default :func:`int8_tiles` of the query's device)."""
    bm, bn = tiles or int8_tiles(query.device)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    q, k = query.double() * scale, key.double()
    if smooth_k:
        k = k - k.mean(dim=2, keepdim=True)
    q, k = _quantize_reference(q, bm), _quantize_reference(k, bn)
    logits = attention_logits(q, k, attn_mask.double() if attn_mask is not None and attn_mask.is_floating_point()
                              else attn_mask, scale=1.0)
    return (logits.softmax(-1) @ value.double()).to(value.dtype)
