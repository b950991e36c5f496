"""Fused attention distillation: the student's attention output and its cross-entropy to a teacher's
attention distribution, in one flash-attention pass, with gradients to the student's Q, K and V.

The loss is HASTE's attention alignment (Wang et al. 2025, arXiv:2505.16792; ``loss.py`` of
NUS-HPC-AI-Lab/HASTE), head to head over the first ``min(H_student, H_teacher)`` heads::

    L = mean_{b, h < H_pair, i} CE_i,   CE_i = -sum_j T_ij log softmax(S)_ij,   S = Q K^T * scale + mask

with ``T`` the teacher's attention probabilities, given as a tensor or as the teacher's queries and keys
(``T = softmax(Q_t K_t^T * scale_t)``, recomputed blockwise). The kernel (the ``TARGET`` modes of
:mod:`fastdiff.kernels.flash`) keeps the student's online logsumexp and, for teacher queries and
keys, the teacher's; ``CE_i = (sum_j T_ij) lse_i - sum_j T_ij S_ij``; the backward adds
``dCE_i (sum_j T_ij P_ij - T_ij)`` to ``dS``. No ``N x N`` tensor is formed by fastdiff (teacher
probabilities passed as a tensor are only read, blockwise). ``0 log 0`` counts as 0.

:func:`fastdiff.kernels.haste_backend.haste_fused_backend` adapts it to HASTE's backend seam.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdiff.kernels import flash as fa
from fastdiff.kernels._triton import SUPPORTED_DTYPES, check_attention_inputs, prepare_mask
from fastdiff.kernels.targets import TeacherAttention, compute_dtype

REDUCTIONS = ("mean", "none")


class _FusedDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, target: TeacherAttention):
        out, lse, ce, tsum, tlse = fa.forward(q, k, v, mask, scale, target)
        b, h, n_q, _ = q.shape
        pairs = min(h, target.heads)
        ctx.save_for_backward(q, k, v, out, lse, tsum, tlse if tlse is not None else lse)
        ctx.mask, ctx.scale, ctx.target, ctx.pairs = mask, scale, target, pairs
        return out, ce.view(b, h, n_q)[:, :pairs]

    @staticmethod
    def backward(ctx, dout: Tensor | None, dce: Tensor | None):
        q, k, v, out, lse, tsum, tlse = ctx.saved_tensors
        b, h, n_q, _ = q.shape
        dout = torch.zeros_like(out) if dout is None else dout
        full = torch.zeros(b, h, n_q, device=q.device, dtype=torch.float32)
        if dce is not None:
            full[:, :ctx.pairs] = dce
        dq, dk, dv = fa.backward(q, k, v, ctx.mask, ctx.scale, out, dout, lse, ctx.target,
                                 full.view(b * h, n_q), tsum, tlse)
        return dq, dk, dv, None, None, None


def _teacher(query: Tensor, key: Tensor, teacher_probs: Tensor | None, teacher_query: Tensor | None,
             teacher_key: Tensor | None, teacher_scale: float | None, teacher_lse: Tensor | None) -> TeacherAttention:
    b, _, n_q, _ = query.shape
    n_k = key.shape[2]
    if (teacher_probs is None) == (teacher_query is None and teacher_key is None):
        raise ValueError("give exactly one teacher: teacher_probs, or teacher_query with teacher_key")
    if teacher_probs is not None:
        if not isinstance(teacher_probs, Tensor) or not teacher_probs.is_floating_point():
            raise TypeError("teacher_probs must be a floating-point torch.Tensor")
        if teacher_probs.ndim != 4 or teacher_probs.shape[0] != b or teacher_probs.shape[2:] != (n_q, n_k):
            raise ValueError(f"teacher_probs must be [batch={b}, teacher_heads, {n_q}, {n_k}], got "
                             f"{tuple(teacher_probs.shape)}")
        if teacher_probs.device != query.device:
            raise ValueError(f"teacher_probs is on {teacher_probs.device}, query on {query.device}")
        return TeacherAttention(probs=teacher_probs.detach())
    if teacher_query is None or teacher_key is None:
        raise ValueError("teacher_query and teacher_key must be given together")
    for name, t, n in (("teacher_query", teacher_query, n_q), ("teacher_key", teacher_key, n_k)):
        if not isinstance(t, Tensor) or t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be a tensor of dtype {[str(d) for d in SUPPORTED_DTYPES]}")
        if t.ndim != 4 or t.shape[0] != b or t.shape[2] != n:
            raise ValueError(f"{name} must be [batch={b}, teacher_heads, {n}, teacher_head_dim], got {tuple(t.shape)}")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device}, query on {query.device}")
    if teacher_key.shape[1] != teacher_query.shape[1] or teacher_key.shape[3] != teacher_query.shape[3]:
        raise ValueError("teacher_query and teacher_key must share heads and head_dim")
    if teacher_key.dtype != teacher_query.dtype:
        raise TypeError("teacher_query and teacher_key must share a dtype")
    if teacher_query.shape[3] > 256:
        raise ValueError(f"teacher head_dim must be <= 256, got {teacher_query.shape[3]}")
    if teacher_lse is not None and tuple(teacher_lse.shape) != tuple(teacher_query.shape[:3]):
        raise ValueError(f"teacher_lse must be [batch, teacher_heads, q_tokens] = {list(teacher_query.shape[:3])}, "
                         f"got {tuple(teacher_lse.shape)}")
    return TeacherAttention(query=teacher_query.detach(), key=teacher_key.detach(), scale=teacher_scale,
                            lse=None if teacher_lse is None else teacher_lse.detach())


def attention_distillation(query: Tensor, key: Tensor, value: Tensor, *, teacher_probs: Tensor | None = None,
                           teacher_query: Tensor | None = None, teacher_key: Tensor | None = None,
                           teacher_scale: float | None = None, teacher_lse: Tensor | None = None,
                           attn_mask: Tensor | None = None, scale: float | None = None,
                           reduction: str = "mean") -> tuple[Tensor, Tensor]:
    """Student attention output ``[B, H, Nq, d]`` and its cross-entropy to the teacher, fused.

    Args:
        query, key, value: the student's ``[B, H, N, d]`` tensors (as :func:`flash_attention`).
        teacher_probs: teacher attention probabilities ``[B, H_t, Nq, Nk]``; or
        teacher_query, teacher_key: the teacher's ``[B, H_t, Nq, d_t]`` / ``[B, H_t, Nk, d_t]`` (any
            ``d_t <= 256``) with ``teacher_scale`` (default ``1/sqrt(d_t)``) and optionally its logsumexp
            ``teacher_lse`` ``[B, H_t, Nq]`` (natural log), which skips the teacher's online logsumexp.
        attn_mask: the student's mask (boolean or additive), as in :func:`flash_attention`.
        scale: the student's softmax scale, default ``1/sqrt(d)``.
        reduction: ``"mean"`` (HASTE's loss, a scalar) or ``"none"`` (per row, ``[B, H_pair, Nq]``).

    The teacher is a constant (no gradients to it). Returns ``(output, loss)``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_attention_inputs(query, key, value, kernel="attention_distillation")
    target = _teacher(query, key, teacher_probs, teacher_query, teacher_key, teacher_scale, teacher_lse)
    mask = prepare_mask(attn_mask, query, key)
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    out, ce = _FusedDistillation.apply(query, key, value, mask, scale, target)
    return out, (ce.mean() if reduction == "mean" else ce)


def attention_distillation_reference(query: Tensor, key: Tensor, value: Tensor, *, teacher_probs: Tensor | None = None,
                                     teacher_query: Tensor | None = None, teacher_key: Tensor | None = None,
                                     teacher_scale: float | None = None, attn_mask: Tensor | None = None,
                                     scale: float | None = None, reduction: str = "mean") -> tuple[Tensor, Tensor]:
    """PyTorch reference of :func:`attention_distillation`: materialises the ``[B, H, Nq, Nk]`` logits (the
    loss in float32, float64 for float64 inputs)."""
    logits = fa.attention_logits(query, key, attn_mask, scale)
    out = logits.softmax(-1).to(value.dtype) @ value
    if teacher_probs is None:
        t_scale = teacher_query.shape[-1] ** -0.5 if teacher_scale is None else teacher_scale
        teacher_probs = ((teacher_query @ teacher_key.transpose(-2, -1)) * t_scale).float().softmax(-1)
    pairs = min(query.shape[1], teacher_probs.shape[1])
    log_q = logits[:, :pairs].to(compute_dtype(logits.dtype)).log_softmax(-1)
    t = teacher_probs[:, :pairs].to(log_q.dtype)
    ce = -torch.where(t > 0, t * log_q, torch.zeros_like(log_q)).sum(-1)
    return out, (ce.mean() if reduction == "mean" else ce)
