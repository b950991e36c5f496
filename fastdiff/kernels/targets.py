"""What a teacher hands to attention distillation: its attention distribution, dense or as queries and keys.

HASTE's attention target for one aligned block is the teacher's ``T = softmax(Q_t K_t^T * scale_t)`` over
patch tokens (Wang et al. 2025, arXiv:2505.16792). A teacher can hand it over as the dense probabilities
``[B, H_t, N, N]`` (what HASTE's released code does) or, without ever forming an ``N x N`` tensor, as its
queries ``[B, H_t, N, d_t]`` and keys with their softmax scale (:class:`TeacherAttention`), from which the
fused kernel (:mod:`fastdiff.kernels.distillation`) and the chunked PyTorch loss
(:mod:`fastdiff.kernels.chunked`) recompute ``T`` blockwise.

A teacher opts in by having an ``attention_output`` attribute (``"probs"`` by default, ``"qk"`` to return
:class:`TeacherAttention` objects instead of probability tensors in ``TeacherOutput.attentions``);
:func:`teacher_attention_output` sets it for one call. This module needs only torch (no triton).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor, nn

NO_TARGET, PROBS_TARGET, QK_TARGET = 0, 1, 2
ATTENTION_OUTPUTS = ("probs", "qk")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype attention losses are computed in: float32 for half types, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def pool_attention(probs: Tensor, factor: int) -> Tensor:
    """Attention ``[B, H, Nt, Nt]`` over a square grid pooled to the grid ``factor`` times coarser per side:
    queries averaged over each ``factor x factor`` cell, keys summed (rows stay distributions)."""
    if factor == 1:
        return probs
    b, h, n_t = probs.shape[0], probs.shape[1], probs.shape[-1]
    side_t = round(n_t ** 0.5)
    side_s = side_t // factor
    grid = probs.reshape(b, h, side_s, factor, side_s, factor, side_s, factor, side_s, factor)
    return grid.mean(dim=(3, 5)).sum(dim=(-3, -1)).reshape(b, h, side_s * side_s, side_s * side_s)


def cell_indices(side: int, factor: int, device: torch.device | None = None) -> Tensor:
    """``[side^2, factor^2]``: the row-major indices, on the grid ``factor`` times finer, of each cell of a
    ``side x side`` grid (the tokens :func:`pool_attention` pools into that cell)."""
    fine = side * factor
    cy, cx = torch.arange(side, device=device).repeat_interleave(side), torch.arange(side, device=device).repeat(side)
    oy, ox = torch.arange(factor, device=device).repeat_interleave(factor), torch.arange(factor, device=device).repeat(factor)
    return (cy[:, None] * factor + oy[None, :]) * fine + cx[:, None] * factor + ox[None, :]


@dataclass(eq=False)
class TeacherAttention:
    """A teacher attention distribution, for fused or chunked distillation without an ``N x N`` tensor.

    Either ``probs`` ``[B, H_t, Nq, Nk]`` (dense, rows sum to 1), or the teacher's ``query``
    ``[B, H_t, Nq_t, d_t]`` and ``key`` ``[B, H_t, Nk_t, d_t]`` with their softmax ``scale`` (default
    ``1/sqrt(d_t)``) and optionally the natural-log logsumexp ``lse`` ``[B, H_t, Nq_t]`` of the teacher's
    logits. ``pool > 1`` (queries and keys only) says the teacher's square token grid is ``pool`` times
    finer per side than the student's: the target is then :func:`pool_attention` of the teacher's
    distribution (what :func:`fastdiff.training.haste.match_attention` does to dense maps). The teacher is
    a constant: its tensors are detached.
    """

    probs: Tensor | None = None
    query: Tensor | None = None
    key: Tensor | None = None
    scale: float | None = None
    lse: Tensor | None = None
    pool: int = 1

    def __post_init__(self) -> None:
        if (self.probs is None) == (self.query is None or self.key is None):
            raise ValueError("TeacherAttention needs probs, or query and key (not both)")
        if self.probs is not None and self.pool != 1:
            raise ValueError("pool applies to queries and keys only; pool dense probabilities with pool_attention")
        if self.query is not None and self.scale is None:
            self.scale = self.query.shape[-1] ** -0.5
        if not isinstance(self.pool, int) or self.pool < 1:
            raise ValueError(f"pool must be an int >= 1, got {self.pool!r}")

    @property
    def mode(self) -> int:
        return PROBS_TARGET if self.probs is not None else QK_TARGET

    @property
    def heads(self) -> int:
        return (self.probs if self.probs is not None else self.query).shape[1]

    @property
    def batch(self) -> int:
        return (self.probs if self.probs is not None else self.query).shape[0]

    @property
    def num_queries(self) -> int:
        """Query tokens of the target (on the student's grid)."""
        n = (self.probs if self.probs is not None else self.query).shape[2]
        return n // (self.pool * self.pool)

    @property
    def num_keys(self) -> int:
        n = self.probs.shape[3] if self.probs is not None else self.key.shape[2]
        return n // (self.pool * self.pool)

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}

    def map(self, fn: Callable[[Tensor], Tensor]) -> TeacherAttention:
        """A copy with ``fn`` applied to every tensor (e.g. ``lambda t: t[i]`` or ``.to(device)``)."""
        return replace(self, **{name: fn(t) for name, t in self.tensors().items()})

    @staticmethod
    def stack(items: Sequence[TeacherAttention]) -> TeacherAttention:
        """Per-sample teachers (tensors without the batch dimension, as after ``map(lambda t: t[i])``)
        stacked into a batch."""
        first = items[0]
        return replace(first, **{name: torch.stack([it.tensors()[name] for it in items]) for name in first.tensors()})

    def pooled(self, factor: int) -> TeacherAttention:
        """The same teacher read on a grid ``factor`` times coarser per side."""
        if self.probs is not None:
            return replace(self, probs=pool_attention(self.probs, factor))
        return replace(self, pool=self.pool * factor)

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """The target probabilities ``[B, H_t, Nq, Nk]``, materialised (the reference path). From queries
        and keys: ``softmax(Q K^T * scale)`` computed as the digits teachers compute it, then pooled."""
        if self.probs is not None:
            return self.probs if dtype is None else self.probs.to(dtype)
        dtype = compute_dtype(self.query.dtype) if dtype is None else dtype
        q, k = self.query.to(dtype), self.key.to(dtype)
        return pool_attention((q @ k.transpose(-2, -1) * self.scale).softmax(-1), self.pool)


def as_teacher_attention(target: Tensor | TeacherAttention) -> TeacherAttention:
    return target if isinstance(target, TeacherAttention) else TeacherAttention(probs=target)


def dense_target(target: Tensor | TeacherAttention) -> Tensor:
    """Teacher probabilities ``[B, H_t, N, N]`` of a dense or query/key target."""
    return target.dense() if isinstance(target, TeacherAttention) else target


def supports_attention_output(teacher: nn.Module) -> bool:
    """Whether ``teacher`` can hand over its queries and keys (it has an ``attention_output`` attribute)."""
    return getattr(teacher, "attention_output", None) in ATTENTION_OUTPUTS


@contextmanager
def teacher_attention_output(teacher: nn.Module, mode: str) -> Iterator[None]:
    """Run ``teacher`` with ``attention_output = mode`` (``"probs"`` or ``"qk"``) for the ``with`` block."""
    if mode not in ATTENTION_OUTPUTS:
        raise ValueError(f"attention_output must be one of {ATTENTION_OUTPUTS}, got {mode!r}")
    if not supports_attention_output(teacher):
        if mode == "probs":
            yield
            return
        raise ValueError(f"{type(teacher).__name__} cannot hand over queries and keys (no attention_output "
                         "attribute); use teacher_attention='probs'")
    previous = teacher.attention_output
    teacher.attention_output = mode
    try:
        yield
    finally:
        teacher.attention_output = previous
