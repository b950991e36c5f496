"""Memory-lean attention distillation in plain PyTorch: HASTE's per-row cross-entropy by row and key blocks.

The loss is HASTE's attention alignment (Wang et al. 2025, arXiv:2505.16792, ``loss.py`` of
NUS-HPC-AI-Lab/HASTE), head to head over the first ``min(H_student, H_teacher)`` heads::

    L = mean_{b, h < H_pair, i} CE_i,   CE_i = -sum_j T_ij log softmax(S)_ij = tsum_i lse_i - sum_j T_ij S_ij

with ``S = Q K^T * scale + mask``, ``lse_i = logsumexp_j S_ij``, ``tsum_i = sum_j T_ij`` (1 for a teacher
distribution) and ``0 log 0 = 0``. It is computed the way the fused Triton kernel computes it
(:mod:`fastdiff.kernels.flash`, ``TARGET`` modes), with PyTorch ops on ``[B, H_pair, r, c]`` blocks: for each
block of ``r`` query rows, an online logsumexp of the student's logits over blocks of ``c`` keys (running
maximum ``m`` and sum ``l``: ``m' = max(m, rowmax s)``, ``l' = l e^{m - m'} + rowsum e^{s - m'}``) and the
cross term ``sum_j T_ij S_ij`` accumulated block by block. A teacher given by queries and keys has its
probabilities recomputed per block, ``T = exp(Q_t K_t^T scale_t - lse_t)``, after a first blockwise pass
for its logsumexp ``lse_t`` (skipped when the teacher hands it over). The backward is written out, again
blockwise (the gradient of ``CE_i`` to ``S_ij`` is ``tsum_i P_ij - T_ij``, ``P = exp(S - lse)``)::

    dS = dCE_i (tsum_i P_ij - T_ij),   dQ = scale dS K,   dK = scale dS^T Q

so no tensor larger than ``B x H_pair x r x c`` is formed, forward or backward, and nothing ``N x N`` is
saved. Runs on any device PyTorch runs on (CPU, GPUs without triton); ``float64`` inputs are computed in
``float64``, half types in ``float32``. :func:`haste_chunked_backend` is HASTE's ``"chunked"`` attention
backend (the attention output from ``scaled_dot_product_attention``, the loss from here).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdiff.kernels._triton import prepare_mask
from fastdiff.kernels.targets import TeacherAttention, as_teacher_attention, cell_indices, compute_dtype

REDUCTIONS = ("mean", "none")
BLOCK_ELEMENTS = 1 << 22  # default block: about 4M elements (16 MiB in float32) per [B, H_pair, r, c] tensor


def default_block_size(batch_heads: int, n: int) -> int:
    """Rows (= keys) per block so that a ``[B, H_pair, r, r]`` block holds about ``BLOCK_ELEMENTS``."""
    side = max(16, 1 << int(math.log2(max(1.0, math.sqrt(BLOCK_ELEMENTS / max(1, batch_heads))))))
    return min(side, n)


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


class _TeacherBlocks:
    """Blockwise reader of a teacher distribution on the student's grid, over the first ``pairs`` heads,
    batch and heads flattened (``[B * H_pair, r, c]`` blocks)."""

    def __init__(self, target: TeacherAttention, pairs: int, dtype: torch.dtype, block: int) -> None:
        self.target, self.dtype = target, dtype
        if target.probs is not None:
            self.probs = target.probs[:, :pairs].flatten(0, 1)
            return
        self.tq = (target.query[:, :pairs].to(dtype) * float(target.scale)).flatten(0, 1)  # scale folded in
        self.tk_t = target.key[:, :pairs].to(dtype).flatten(0, 1).transpose(-2, -1)
        self.pool = target.pool
        if self.pool > 1:
            device = self.tq.device
            self.rows = cell_indices(math.isqrt(target.num_queries), self.pool, device)
            self.keys = cell_indices(math.isqrt(target.num_keys), self.pool, device)
        self.neg_lse = -(target.lse[:, :pairs].to(dtype).flatten(0, 1) if target.lse is not None
                         else self._logsumexp(block))

    def _logsumexp(self, block: int) -> Tensor:
        """The teacher's natural-log logsumexp per (fine) query row, combined over key blocks."""
        n_q, n_k = self.tq.shape[1], self.tk_t.shape[2]
        out = torch.full(self.tq.shape[:2], float("-inf"), device=self.tq.device, dtype=self.dtype)
        for rows in _blocks(n_q, block):
            for keys in _blocks(n_k, block):
                t = self.tq[:, rows] @ self.tk_t[:, :, keys]
                out[:, rows] = torch.logaddexp(out[:, rows], torch.logsumexp(t, -1))
        return out

    def block(self, rows: slice, keys: slice) -> Tensor:
        """``T[:, rows, keys]`` ``[B * H_pair, r, c]`` in the compute dtype (a fresh tensor)."""
        if self.target.probs is not None:
            return self.probs[:, rows, keys].to(self.dtype, copy=True)
        if self.pool == 1:
            return torch.baddbmm(self.neg_lse[:, rows, None], self.tq[:, rows], self.tk_t[:, :, keys]).exp_()
        f2 = self.pool * self.pool
        fine_rows, fine_keys = self.rows[rows].reshape(-1), self.keys[keys].reshape(-1)
        p = torch.baddbmm(self.neg_lse[:, fine_rows, None], self.tq[:, fine_rows], self.tk_t[:, :, fine_keys]).exp_()
        return p.view(p.shape[0], -1, f2, fine_keys.numel() // f2, f2).sum(-1).mean(2)  # keys summed, queries averaged


def _logits(q: Tensor, k_t: Tensor, mask: Tensor | None, rows: slice, keys: slice) -> Tensor:
    """Student logits ``[B * H_pair, r, c]`` (``q`` pre-scaled, ``k_t`` transposed)."""
    if mask is None:
        return q[:, rows] @ k_t[:, :, keys]
    return torch.baddbmm(mask[:, rows, keys].to(q.dtype), q[:, rows], k_t[:, :, keys])


def _flat(x: Tensor, pairs: int, dtype: torch.dtype) -> Tensor:
    return x[:, :pairs].to(dtype).flatten(0, 1)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, mask: Tensor | None, scale: float, target: TeacherAttention,
                block: int) -> Tensor:
        b, pairs = q.shape[0], min(q.shape[1], target.heads)
        dtype = compute_dtype(q.dtype)
        qs, ks = _flat(q.detach(), pairs, dtype) * scale, _flat(k.detach(), pairs, dtype)  # scale folded into q
        ks_t = ks.transpose(-2, -1)
        if mask is not None:  # teacher mass on keys the student masks out (-inf) counts as 0 in the cross term
            mask = mask[:, :pairs].reshape(b * pairs, *mask.shape[2:])
        teacher = _TeacherBlocks(target, pairs, dtype, block)
        tblock = max(1, block // (target.pool * target.pool))  # pooled teachers read pool^2 x more per block
        n_q, n_k = qs.shape[1], ks.shape[1]
        lse = torch.full((b * pairs, n_q), float("-inf"), device=q.device, dtype=dtype)
        tsum, cross = torch.zeros_like(lse), torch.zeros_like(lse)
        for rows in _blocks(n_q, tblock):
            tk_rows = torch.zeros(b * pairs, rows.stop - rows.start, ks.shape[2], device=q.device, dtype=dtype)
            for keys in _blocks(n_k, tblock):
                s = _logits(qs, ks_t, mask, rows, keys)
                lse[:, rows] = torch.logaddexp(lse[:, rows], torch.logsumexp(s, -1))
                t = teacher.block(rows, keys)
                tsum[:, rows] += t.sum(-1)
                tk_rows.baddbmm_(t, ks[:, keys])  # sum_j T_ij k_j: the cross term q_i . sum_j T_ij k_j
                if mask is not None:
                    m = mask[:, rows, keys].to(dtype)
                    cross[:, rows] += (t * m.masked_fill(torch.isneginf(m), 0.0)).sum(-1)
            cross[:, rows] += (qs[:, rows] * tk_rows).sum(-1)
        ce = tsum * lse - cross
        ctx.save_for_backward(q, k, lse, tsum)
        ctx.mask, ctx.scale, ctx.teacher, ctx.block, ctx.pairs = mask, scale, teacher, tblock, pairs
        return ce.view(b, pairs, n_q)

    @staticmethod
    def backward(ctx, dce: Tensor):
        q, k, lse, tsum = ctx.saved_tensors
        pairs, scale, teacher, mask = ctx.pairs, ctx.scale, ctx.teacher, ctx.mask
        dtype = lse.dtype
        qs, ks = _flat(q, pairs, dtype) * scale, _flat(k, pairs, dtype)
        ks_t = ks.transpose(-2, -1)
        g = dce.to(dtype).flatten(0, 1)
        g_tsum, neg_lse = (g * tsum)[..., None], -torch.where(torch.isneginf(lse), 0.0, lse)[..., None]
        dq, dk = torch.zeros_like(qs), torch.zeros_like(ks)
        for rows in _blocks(qs.shape[1], ctx.block):
            for keys in _blocks(ks.shape[1], ctx.block):
                s = _logits(qs, ks_t, mask, rows, keys)
                ds = s.add_(neg_lse[:, rows]).exp_().mul_(g_tsum[:, rows])  # dCE_i tsum_i P_ij ...
                ds.sub_(teacher.block(rows, keys).mul_(g[:, rows, None]))  # ... - dCE_i T_ij
                dq[:, rows].baddbmm_(ds, ks[:, keys])
                dk[:, keys].baddbmm_(ds.transpose(-2, -1), qs[:, rows])  # qs carries the scale of dK
        grad_q, grad_k = torch.zeros_like(q), torch.zeros_like(k)
        b = q.shape[0]
        grad_q[:, :pairs] = (dq * scale).view(b, pairs, *dq.shape[1:]).to(q.dtype)
        grad_k[:, :pairs] = dk.view(b, pairs, *dk.shape[1:]).to(k.dtype)
        return grad_q, grad_k, None, None, None, None


def _check(query: Tensor, key: Tensor, target: TeacherAttention, block_size: int | None) -> None:
    for name, t in (("query", query), ("key", key)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"chunked attention loss: {name} must be a floating-point torch.Tensor")
        if t.ndim != 4:
            raise ValueError(f"chunked attention loss: {name} must be [batch, heads, tokens, head_dim], got "
                             f"{tuple(t.shape)}")
    b, h, n_q, d = query.shape
    if key.shape[:2] != (b, h) or key.shape[3] != d or key.device != query.device:
        raise ValueError(f"chunked attention loss: key {tuple(key.shape)} must share batch, heads, head_dim and "
                         f"device with query {tuple(query.shape)}")
    n_k = key.shape[2]
    if target.batch != b or target.num_queries != n_q or target.num_keys != n_k:
        raise ValueError(f"chunked attention loss: the teacher covers batch {target.batch}, {target.num_queries} "
                         f"queries x {target.num_keys} keys; the student has batch {b}, {n_q} x {n_k}")
    for name, t in target.tensors().items():
        if t.device != query.device:
            raise ValueError(f"chunked attention loss: teacher {name} is on {t.device}, query on {query.device}")
    if target.query is not None and target.key.shape[1] != target.query.shape[1]:
        raise ValueError("chunked attention loss: teacher query and key must have the same heads")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be None or an int >= 1, got {block_size!r}")


def chunked_attention_loss(query: Tensor, key: Tensor, target: Tensor | TeacherAttention, *,
                           attn_mask: Tensor | None = None, scale: float | None = None, reduction: str = "mean",
                           block_size: int | None = None) -> Tensor:
    """HASTE's attention cross-entropy of the student's ``softmax(Q K^T * scale + mask)`` to ``target``,
    blockwise (never an ``N x N`` tensor), with gradients to ``query`` and ``key``.

    Args:
        query, key: the student's ``[B, H, Nq, d]`` / ``[B, H, Nk, d]``, any floating dtype and device.
        target: teacher probabilities ``[B, H_t, Nq, Nk]`` or a :class:`TeacherAttention` (queries and keys,
            optionally pooled from a finer grid).
        attn_mask: the student's mask, boolean (``True`` = attend) or additive, broadcastable to
            ``[B, H, Nq, Nk]``.
        scale: the student's softmax scale, default ``1/sqrt(d)``.
        reduction: ``"mean"`` (HASTE's loss, a scalar) or ``"none"`` (per row, ``[B, H_pair, Nq]``).
        block_size: rows and keys per block (default :func:`default_block_size`).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    target = as_teacher_attention(target)
    _check(query, key, target, block_size)
    mask = prepare_mask(attn_mask, query, key)
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    pairs = min(query.shape[1], target.heads)
    block = block_size or default_block_size(query.shape[0] * pairs, max(query.shape[2], key.shape[2]))
    ce = _ChunkedCrossEntropy.apply(query, key, mask, scale, target, block)
    return ce.mean() if reduction == "mean" else ce


def haste_chunked_backend(query: Tensor, key: Tensor, value: Tensor, scale: float, attn_mask: Tensor | None = None,
                          target: Tensor | TeacherAttention | None = None, keep_logits: bool = False):
    """HASTE's ``"chunked"`` backend (:func:`fastdiff.training.haste.materialized_attention`'s contract):
    the output from ``scaled_dot_product_attention``, the loss from :func:`chunked_attention_loss`.
    ``keep_logits`` needs the logits, so it runs the materialised reference."""
    from fastdiff.training.haste import AttentionResult, materialized_attention

    if keep_logits:
        return materialized_attention(query, key, value, scale, attn_mask, target, keep_logits)
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
    loss = None if target is None else chunked_attention_loss(query, key, target, attn_mask=attn_mask, scale=scale)
    return AttentionResult(output, loss)
