"""HASTE's ``"fused"`` attention backend: :func:`fastdiff.kernels.distillation.attention_distillation`
behind :func:`fastdiff.training.haste.register_attention_backend`'s contract.

Importing this module does not import triton; the kernel modules are imported on the first call the
kernel can serve.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from torch import Tensor

from fastdiff.kernels._triton import MAX_HEAD_DIM, SUPPORTED_DTYPES, kernel_can_run

if TYPE_CHECKING:
    from fastdiff.kernels.flash import TeacherAttention

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def _fallback(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("fastdiff HASTE fused attention: %s; using the materialised reference", reason)


def haste_fused_backend(query: Tensor, key: Tensor, value: Tensor, scale: float, attn_mask: Tensor | None = None,
                        target: Tensor | TeacherAttention | None = None, keep_logits: bool = False):
    """:func:`fastdiff.training.haste.materialized_attention`'s contract, computed by the fused kernel.

    ``target`` is the teacher's probabilities ``[B, H_t, N, N]`` (what HASTE's teacher returns) or a
    :class:`TeacherAttention`. Where the kernel cannot serve the call (CPU without the interpreter, an
    unsupported dtype or head dim, ``keep_logits``), it runs the materialised reference and says so once.
    """
    from fastdiff.training.haste import AttentionResult, materialized_attention

    reason = None
    if keep_logits:
        reason = "keep_logits needs the logits"
    elif not kernel_can_run(query):
        reason = f"the kernel needs CUDA (or TRITON_INTERPRET=1 on CPU), got {query.device.type} tensors"
    elif query.dtype not in SUPPORTED_DTYPES or query.shape[-1] > MAX_HEAD_DIM:
        reason = f"unsupported dtype {query.dtype} or head_dim {query.shape[-1]}"
    is_qk_target = type(target).__name__ == "TeacherAttention"
    if reason is not None:
        if is_qk_target:
            raise ValueError(f"a TeacherAttention target needs the fused kernel, which cannot run here: {reason}")
        _fallback(reason)
        return materialized_attention(query, key, value, scale, attn_mask, target, keep_logits)
    from fastdiff.kernels.distillation import attention_distillation
    from fastdiff.kernels.flash import flash_attention

    if target is None:
        return AttentionResult(flash_attention(query, key, value, attn_mask, scale))
    if is_qk_target:
        out, loss = attention_distillation(query, key, value, teacher_query=target.query, teacher_key=target.key,
                                           teacher_scale=target.scale, teacher_lse=target.lse, attn_mask=attn_mask,
                                           scale=scale)
    else:
        out, loss = attention_distillation(query, key, value, teacher_probs=target, attn_mask=attn_mask, scale=scale)
    return AttentionResult(out, loss)
