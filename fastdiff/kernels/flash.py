"""Flash attention in Triton, forward and backward, with an optional fused attention-distillation target.

Forward (Dao et al. 2022, FlashAttention-2 ordering, Dao 2023): for each block of queries, stream blocks of
keys and values, keep the running row maximum ``m``, normaliser ``l`` and unnormalised output ``acc``::

    s = Q K^T * scale + mask;  m' = max(m, rowmax s);  p = exp(s - m');  l = l e^{m - m'} + rowsum p
    acc = acc e^{m - m'} + p V;  output = acc / l;  lse = m + log l        (base 2 inside the kernel)

Backward (FlashAttention-2, Alg. 2) recomputes ``P = exp(S - lse)`` blockwise from the saved ``lse``:
``dV = P^T dO``, ``dP = dO V^T``, ``D = rowsum(dO * O)``, ``dS = P * (dP - D)``, ``dQ = scale dS K``,
``dK = scale dS^T Q``; one kernel per key block accumulates ``dK, dV``, one per query block ``dQ`` (no
atomics).

Distillation target (fastdiff's addition; used by :mod:`fastdiff.kernels.distillation`): with a teacher
distribution ``T`` over the same keys, the same forward pass also returns the per-row cross-entropy
``CE_i = -sum_j T_ij log softmax(S)_ij = (sum_j T_ij) lse_i - sum_j T_ij S_ij``, and the backward adds its
gradient ``dCE_i/dS_ij = (sum_j T_ij) P_ij - T_ij`` scaled by the incoming ``dCE_i`` to ``dS`` — never an
``N x N`` tensor. ``T`` is read blockwise from teacher probabilities (``TARGET=1``) or recomputed blockwise
from teacher queries and keys (``TARGET=2``): in the forward with an online logsumexp of the teacher logits
(rescaling the running cross term ``sum_j e^{t_ij - m_t} S_ij`` as ``m_t`` grows), or from a given teacher
logsumexp; in the backward from the teacher logsumexp saved by the forward.

Supports non-causal attention, an additive or boolean mask broadcastable to ``[B, H, Nq, Nk]``, any token
counts (masked tiles), head dims 1..256 (padded to a power of two by masked loads, e.g. 72 -> 128), and
fp16 / bf16 / fp32 (fp32 products in IEEE precision, not TF32). Fully masked rows give a zero output and
zero gradients (SDPA gives NaN).
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from fastdiff.kernels._triton import (
    LOG2E,
    block_dim,
    check_attention_inputs,
    launch,
    prepare_mask,
    strides,
)
from fastdiff.kernels.targets import NO_TARGET, PROBS_TARGET, QK_TARGET, TeacherAttention


# ------------------------------------------------------------------------------------------------ forward
def _fwd_kernel(Q, K, V, M, Out, LSE, CE, TSUM, TP, TQ, TK, TLSE,
                sm_scale, t_scale,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smh, smm, smn,
                sob, soh, som, sod, stpb, stph, stpm, stpn, stqb, stqh, stqm, stqd, stkb, stkh, stkn, stkd,
                H, H_T, N_Q, N_K, D, D_T,
                HAS_MASK: tl.constexpr, TARGET: tl.constexpr, TLSE_GIVEN: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    qk_scale = sm_scale * 1.4426950408889634  # base-2 logits: exp2(s * log2 e) = exp(s)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if TARGET != 0:
        t_lim = (h < H_T).to(tl.int32)
        cross = tl.zeros([BLOCK_M], tl.float32)
        tsum = tl.zeros([BLOCK_M], tl.float32)
    if TARGET == 2:
        offs_dt = tl.arange(0, BLOCK_DT)
        dt_ok = offs_dt < D_T
        tq = tl.load(TQ + b * stqb + h * stqh + offs_m[:, None] * stqm + offs_dt[None, :] * stqd,
                     mask=(offs_m < N_Q * t_lim)[:, None] & dt_ok[None, :], other=0.0)
        if TLSE_GIVEN:
            tlse = tl.load(TLSE + pid_bh * N_Q + offs_m, mask=m_ok, other=0.0)
        else:
            mt_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < N_K
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            s2 = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        else:
            s2 = tl.dot(q, tl.trans(k)) * qk_scale
        if HAS_MASK:
            s2 += tl.load(M + b * smb + h * smh + offs_m[:, None] * smm + offs_n[None, :] * smn,
                          mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32) * 1.4426950408889634
        s2 = tl.where(n_ok[None, :], s2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s2, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s2 - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
        if TARGET != 0:
            s = s2 * 0.6931471805599453  # natural-log logits for the cross term
        if TARGET == 1:
            tp = tl.load(TP + b * stpb + h * stph + offs_m[:, None] * stpm + offs_n[None, :] * stpn,
                         mask=(offs_m < N_Q * t_lim)[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
            cross += tl.sum(tp * tl.where(tp > 0, s, 0.0), 1)
            tsum += tl.sum(tp, 1)
        if TARGET == 2:
            tk = tl.load(TK + b * stkb + h * stkh + offs_n[:, None] * stkn + offs_dt[None, :] * stkd,
                         mask=(offs_n < N_K * t_lim)[:, None] & dt_ok[None, :], other=0.0)
            if IEEE:
                t2 = tl.dot(tq, tl.trans(tk), input_precision="ieee") * (t_scale * 1.4426950408889634)
            else:
                t2 = tl.dot(tq, tl.trans(tk)) * (t_scale * 1.4426950408889634)
            t2 = tl.where(n_ok[None, :], t2, float("-inf"))
            if TLSE_GIVEN:
                tp = tl.exp2(t2 - tlse[:, None])
                cross += tl.sum(tp * tl.where(tp > 0, s, 0.0), 1)
                tsum += tl.sum(tp, 1)
            else:
                mt_new = tl.maximum(mt_i, tl.max(t2, 1))
                beta = tl.exp2(mt_i - mt_new)
                tp = tl.exp2(t2 - mt_new[:, None])
                tsum = tsum * beta + tl.sum(tp, 1)
                cross = cross * beta + tl.sum(tp * tl.where(tp > 0, s, 0.0), 1)
                mt_i = mt_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod, out.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    lse2 = tl.where(l_i == 0.0, float("inf"), m_i + tl.log2(l_safe))
    tl.store(LSE + pid_bh * N_Q + offs_m, lse2, mask=m_ok)
    if TARGET != 0:
        if TARGET == 2:
            if not TLSE_GIVEN:
                tl.store(TLSE + pid_bh * N_Q + offs_m, mt_i + tl.log2(tsum), mask=m_ok)
                cross = cross / tsum
                tsum = tsum / tsum
        ce = tsum * lse2 * 0.6931471805599453 - cross
        tl.store(CE + pid_bh * N_Q + offs_m, ce, mask=m_ok)
        tl.store(TSUM + pid_bh * N_Q + offs_m, tsum, mask=m_ok)


# ----------------------------------------------------------------------------------------------- backward
def _bwd_dkdv_kernel(Q, K, V, M, DO, DK, DV, LSE, DELTA, G, G1, TP, TQ, TK, TLSE,
                     sm_scale, t_scale,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smh, smm, smn,
                     sdob, sdoh, sdom, sdod, stpb, stph, stpm, stpn, stqb, stqh, stqm, stqd,
                     stkb, stkh, stkn, stkd,
                     H, H_T, N_Q, N_K, D, D_T,
                     HAS_MASK: tl.constexpr, TARGET: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block: ``dV = sum_m P^T dO``, ``dK = scale sum_m dS^T Q`` (DK/DV contiguous [B,H,Nk,d])."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < N_K
    d_ok = offs_d < D
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if TARGET != 0:
        t_lim = (h < H_T).to(tl.int32)
    if TARGET == 2:
        offs_dt = tl.arange(0, BLOCK_DT)
        dt_ok = offs_dt < D_T
        tk = tl.load(TK + b * stkb + h * stkh + offs_n[:, None] * stkn + offs_dt[None, :] * stkd,
                     mask=(offs_n < N_K * t_lim)[:, None] & dt_ok[None, :], other=0.0)
    for start_m in range(0, N_Q, BLOCK_M):
        offs_m = start_m + offs_m0
        m_ok = offs_m < N_Q
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :] * sdod,
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        lse2 = tl.load(LSE + pid_bh * N_Q + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + pid_bh * N_Q + offs_m, mask=m_ok, other=0.0)
        if IEEE:
            st = tl.dot(k, tl.trans(q), input_precision="ieee") * (sm_scale * 1.4426950408889634)
        else:
            st = tl.dot(k, tl.trans(q)) * (sm_scale * 1.4426950408889634)
        if HAS_MASK:
            st += tl.load(M + b * smb + h * smh + offs_m[None, :] * smm + offs_n[:, None] * smn,
                          mask=m_ok[None, :] & n_ok[:, None], other=0.0).to(tl.float32) * 1.4426950408889634
        st = tl.where(n_ok[:, None], st, float("-inf"))
        pt = tl.exp2(st - lse2[None, :])
        if IEEE:
            dv += tl.dot(pt.to(do.dtype), do, input_precision="ieee")
            dpt = tl.dot(v, tl.trans(do), input_precision="ieee")
        else:
            dv += tl.dot(pt.to(do.dtype), do)
            dpt = tl.dot(v, tl.trans(do))
        if TARGET == 0:
            dst = pt * (dpt - delta[None, :])
        else:
            g = tl.load(G + pid_bh * N_Q + offs_m, mask=m_ok, other=0.0)
            g1 = tl.load(G1 + pid_bh * N_Q + offs_m, mask=m_ok, other=0.0)
            if TARGET == 1:
                tpt = tl.load(TP + b * stpb + h * stph + offs_m[None, :] * stpm + offs_n[:, None] * stpn,
                              mask=(offs_m < N_Q * t_lim)[None, :] & n_ok[:, None], other=0.0).to(tl.float32)
            else:
                tq = tl.load(TQ + b * stqb + h * stqh + offs_m[:, None] * stqm + offs_dt[None, :] * stqd,
                             mask=(offs_m < N_Q * t_lim)[:, None] & dt_ok[None, :], other=0.0)
                tlse = tl.load(TLSE + pid_bh * N_Q + offs_m, mask=m_ok, other=float("inf"))
                if IEEE:
                    t2t = tl.dot(tk, tl.trans(tq), input_precision="ieee") * (t_scale * 1.4426950408889634)
                else:
                    t2t = tl.dot(tk, tl.trans(tq)) * (t_scale * 1.4426950408889634)
                tpt = tl.where(n_ok[:, None], tl.exp2(t2t - tlse[None, :]), 0.0)
            dst = pt * (dpt - delta[None, :] + g1[None, :]) - g[None, :] * tpt
        if IEEE:
            dk += tl.dot(dst.to(q.dtype), q, input_precision="ieee")
        else:
            dk += tl.dot(dst.to(q.dtype), q)
    out_off = pid_bh * N_K * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])


def _bwd_dq_kernel(Q, K, V, M, DO, DQ, LSE, DELTA, G, G1, TP, TQ, TK, TLSE,
                   sm_scale, t_scale,
                   sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smh, smm, smn,
                   sdob, sdoh, sdom, sdod, stpb, stph, stpm, stpn, stqb, stqh, stqm, stqd,
                   stkb, stkh, stkn, stkd,
                   H, H_T, N_Q, N_K, D, D_T,
                   HAS_MASK: tl.constexpr, TARGET: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query block: ``dQ = scale sum_n dS K`` (DQ contiguous [B,H,Nq,d])."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :] * sdod,
                 mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    lse2 = tl.load(LSE + pid_bh * N_Q + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * N_Q + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if TARGET != 0:
        t_lim = (h < H_T).to(tl.int32)
        g = tl.load(G + pid_bh * N_Q + offs_m, mask=m_ok, other=0.0)
        g1 = tl.load(G1 + pid_bh * N_Q + offs_m, mask=m_ok, other=0.0)
    if TARGET == 2:
        offs_dt = tl.arange(0, BLOCK_DT)
        dt_ok = offs_dt < D_T
        tq = tl.load(TQ + b * stqb + h * stqh + offs_m[:, None] * stqm + offs_dt[None, :] * stqd,
                     mask=(offs_m < N_Q * t_lim)[:, None] & dt_ok[None, :], other=0.0)
        tlse = tl.load(TLSE + pid_bh * N_Q + offs_m, mask=m_ok, other=float("inf"))
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < N_K
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            s2 = tl.dot(q, tl.trans(k), input_precision="ieee") * (sm_scale * 1.4426950408889634)
        else:
            s2 = tl.dot(q, tl.trans(k)) * (sm_scale * 1.4426950408889634)
        if HAS_MASK:
            s2 += tl.load(M + b * smb + h * smh + offs_m[:, None] * smm + offs_n[None, :] * smn,
                          mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32) * 1.4426950408889634
        s2 = tl.where(n_ok[None, :], s2, float("-inf"))
        p = tl.exp2(s2 - lse2[:, None])
        if IEEE:
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        else:
            dp = tl.dot(do, tl.trans(v))
        if TARGET == 0:
            ds = p * (dp - delta[:, None])
        else:
            if TARGET == 1:
                tp = tl.load(TP + b * stpb + h * stph + offs_m[:, None] * stpm + offs_n[None, :] * stpn,
                             mask=(offs_m < N_Q * t_lim)[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
            else:
                tk = tl.load(TK + b * stkb + h * stkh + offs_n[:, None] * stkn + offs_dt[None, :] * stkd,
                             mask=(offs_n < N_K * t_lim)[:, None] & dt_ok[None, :], other=0.0)
                if IEEE:
                    t2 = tl.dot(tq, tl.trans(tk), input_precision="ieee") * (t_scale * 1.4426950408889634)
                else:
                    t2 = tl.dot(tq, tl.trans(tk)) * (t_scale * 1.4426950408889634)
                tp = tl.where(n_ok[None, :], tl.exp2(t2 - tlse[:, None]), 0.0)
            ds = p * (dp - delta[:, None] + g1[:, None]) - g[:, None] * tp
        if IEEE:
            dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
        else:
            dq += tl.dot(ds.to(k.dtype), k)
    out_off = pid_bh * N_Q * D + offs_m[:, None] * D + offs_d[None, :]
    tl.store(DQ + out_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------------------------- launchers
def _common_args(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, target: TeacherAttention | None):
    tp = target.probs if target is not None and target.mode == PROBS_TARGET else None
    tq = target.query if target is not None and target.mode == QK_TARGET else None
    tk = target.key if target is not None and target.mode == QK_TARGET else None
    strides_all = (*q.stride(), *k.stride(), *v.stride(), *strides(mask))
    tstrides = (*strides(tp), *strides(tq), *strides(tk))
    return tp, tq, tk, strides_all, tstrides


def _dims(q: Tensor, k: Tensor, target: TeacherAttention | None) -> tuple[int, int, int, int, int, int]:
    b, h, n_q, d = q.shape
    h_t = target.heads if target is not None else 0
    d_t = target.query.shape[-1] if target is not None and target.mode == QK_TARGET else 1
    return h, min(h_t, h), n_q, k.shape[2], d, d_t


def forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, target: TeacherAttention | None = None):
    """Launch the forward kernel; returns ``(out, lse2, ce, tsum, tlse2)`` (lse in base 2, [B*H, Nq]; ce,
    tsum and tlse2 ``None`` without a target)."""
    b, h, n_q, d = q.shape
    _, h_t, _, n_k, _, d_t = _dims(q, k, target)
    out = torch.empty_like(q)
    dev = q.device
    lse = torch.empty(b * h, n_q, device=dev, dtype=torch.float32)
    mode = target.mode if target is not None else NO_TARGET
    ce = torch.zeros(b * h, n_q, device=dev, dtype=torch.float32) if mode else lse
    tsum = torch.zeros_like(ce) if mode else lse
    tlse_given = mode == QK_TARGET and target.lse is not None
    tlse = lse
    if mode == QK_TARGET:
        tlse = torch.zeros(b, h, n_q, device=dev, dtype=torch.float32)
        if tlse_given:
            tlse[:, :h_t] = target.lse[:, :h_t].float() * LOG2E
        tlse = tlse.view(b * h, n_q)
    tp, tq, tk, s_qkvm, s_t = _common_args(q, k, v, mask, target)
    args = (q, k, v, mask if mask is not None else q, out, lse, ce, tsum,
            tp if tp is not None else q, tq if tq is not None else q, tk if tk is not None else q, tlse,
            scale, target.scale if mode == QK_TARGET else 1.0,
            *s_qkvm, *out.stride(), *s_t, h, h_t, n_q, n_k, d, d_t)
    launch(_fwd_kernel, lambda meta: (triton_cdiv(n_q, meta["BLOCK_M"]), b * h), args, family="fwd",
           key=("N_Q", "N_K", "BLOCK_D", "TARGET", "HAS_MASK"), device_tensor=q,
           HAS_MASK=mask is not None, TARGET=mode, TLSE_GIVEN=tlse_given, IEEE=q.dtype == torch.float32,
           BLOCK_D=block_dim(d), BLOCK_DT=block_dim(d_t))
    if not mode:
        return out, lse, None, None, None
    return out, lse, ce, tsum, (tlse if mode == QK_TARGET else None)


def backward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, out: Tensor, dout: Tensor,
             lse: Tensor, target: TeacherAttention | None = None, dce: Tensor | None = None, tsum: Tensor | None = None,
             tlse: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the two backward kernels; ``dce`` is the gradient of the per-row CE ``[B*H, Nq]``."""
    b, h, n_q, d = q.shape
    _, h_t, _, n_k, _, d_t = _dims(q, k, target)
    dout = dout.contiguous() if dout.stride(-1) != 1 else dout
    delta = (dout.float() * out.float()).sum(-1).reshape(b * h, n_q)
    mode = target.mode if target is not None and dce is not None else NO_TARGET
    g = dce.float().contiguous() if mode else delta
    g1 = (g * tsum).contiguous() if mode else delta
    tp, tq, tk, s_qkvm, s_t = _common_args(q, k, v, mask, target if mode else None)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    tail = (tp if tp is not None else q, tq if tq is not None else q, tk if tk is not None else q,
            tlse if tlse is not None else lse, scale, target.scale if mode == QK_TARGET else 1.0,
            *s_qkvm, *dout.stride(), *s_t, h, h_t if mode else 0, n_q, n_k, d, d_t)
    consts = dict(HAS_MASK=mask is not None, TARGET=mode, IEEE=q.dtype == torch.float32,
                  BLOCK_D=block_dim(d), BLOCK_DT=block_dim(d_t))
    key = ("N_Q", "N_K", "BLOCK_D", "TARGET", "HAS_MASK")
    m = mask if mask is not None else q
    launch(_bwd_dkdv_kernel, lambda meta: (triton_cdiv(n_k, meta["BLOCK_N"]), b * h),
           (q, k, v, m, dout, dk, dv, lse, delta, g, g1, *tail), family="bwd", key=key, device_tensor=q, **consts)
    launch(_bwd_dq_kernel, lambda meta: (triton_cdiv(n_q, meta["BLOCK_M"]), b * h),
           (q, k, v, m, dout, dq, lse, delta, g, g1, *tail), family="bwd", key=key, device_tensor=q, **consts)
    return dq, dk, dv


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------------------------- autograd + public
class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
        out, lse, *_ = forward(q, k, v, mask, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale = mask, scale
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward(q, k, v, ctx.mask, ctx.scale, out, dout, lse)
        return dq, dk, dv, None, None


def flash_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                    scale: float | None = None) -> Tensor:
    """``softmax(Q K^T * scale + mask) V`` for ``[B, H, N, d]`` tensors by the Triton flash kernel, with
    autograd (gradients to query, key and value; the mask is a constant).

    Args:
        query, key, value: ``[B, H, Nq, d]``, ``[B, H, Nk, d]``, ``[B, H, Nk, d]``; fp16, bf16 or fp32;
            ``d <= 256``. CUDA tensors (CPU only under ``TRITON_INTERPRET=1``).
        attn_mask: ``None``, boolean (``True`` = attend) or additive float, broadcastable to
            ``[B, H, Nq, Nk]`` (``scaled_dot_product_attention``'s convention).
        scale: softmax scale, default ``1/sqrt(d)``.
    """
    check_attention_inputs(query, key, value, kernel="flash_attention")
    mask = prepare_mask(attn_mask, query, key)
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    return _FlashAttention.apply(query, key, value, mask, scale)


def attention_logits(query: Tensor, key: Tensor, attn_mask: Tensor | None = None,
                     scale: float | None = None) -> Tensor:
    """``Q K^T * scale + mask`` materialised ``[B, H, Nq, Nk]`` (boolean masks: ``False`` -> -inf)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    logits = (query @ key.transpose(-2, -1)) * scale
    if attn_mask is None:
        return logits
    return logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask


def attention_reference(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                        scale: float | None = None) -> Tensor:
    """PyTorch reference of :func:`flash_attention` (explicit logits, same mask convention)."""
    return attention_logits(query, key, attn_mask, scale).softmax(-1).to(value.dtype) @ value
