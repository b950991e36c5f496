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
    from fastdiff.kernels.targets import TeacherAttention

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def _fallback(reason: str, instead: str = "the materialised reference") -> None:
    if (reason, instead) not in _warned:
        _warned.add((reason, instead))
        logger.warning("fastdiff HASTE fused attention: %s; using %s", reason, instead)


def haste_fused_backend(query: Tensor, key: Tensor, value: Tensor, scale: float, attn_mask: Tensor | None = None,
                        target: Tensor | TeacherAttention | None = None, keep_logits: bool = False):
    """:func:`fastdiff.training.haste.materialized_attention`'s contract, computed by the fused kernel.

    ``target`` is the teacher's probabilities ``[B, H_t, N, N]`` or a :class:`TeacherAttention` (the
    teacher's queries and keys: nothing ``N x N`` anywhere). Where the kernel cannot serve the call (CPU
    without the interpreter, an unsupported dtype or head dim, ``keep_logits``) it runs the materialised
    reference for probabilities and the chunked PyTorch loss (:mod:`fastdiff.kernels.chunked`) for queries
    and keys, and says so once. A teacher pooled from a finer grid (``pool > 1``) is served by the chunked
    loss beside the flash kernel's output.
    """
    from fastdiff.kernels.chunked import chunked_attention_loss, haste_chunked_backend
    from fastdiff.kernels.targets import TeacherAttention
    from fastdiff.training.haste import AttentionResult, materialized_attention

    reason = None
    if keep_logits:
        reason = "keep_logits needs the logits"
    elif not kernel_can_run(query):
        reason = f"the kernel needs CUDA (or TRITON_INTERPRET=1 on CPU), got {query.device.type} tensors"
    elif query.dtype not in SUPPORTED_DTYPES or query.shape[-1] > MAX_HEAD_DIM:
        reason = f"unsupported dtype {query.dtype} or head_dim {query.shape[-1]}"
    is_qk_target = isinstance(target, TeacherAttention) and target.probs is None
    if reason is not None:
        if is_qk_target and not keep_logits:
            _fallback(reason, "the chunked PyTorch loss")
            return haste_chunked_backend(query, key, value, scale, attn_mask, target)
        _fallback(reason)
        return materialized_attention(query, key, value, scale, attn_mask, target, keep_logits)
    from fastdiff.kernels.distillation import attention_distillation
    from fastdiff.kernels.flash import flash_attention

    if isinstance(target, TeacherAttention) and target.probs is not None:
        target = target.probs
    if target is None:
        return AttentionResult(flash_attention(query, key, value, attn_mask, scale))
    if is_qk_target and target.pool > 1:
        output = flash_attention(query, key, value, attn_mask, scale)
        return AttentionResult(output, chunked_attention_loss(query, key, target, attn_mask=attn_mask, scale=scale))
    if is_qk_target:
        out, loss = attention_distillation(query, key, value, teacher_query=target.query, teacher_key=target.key,
                                           teacher_scale=target.scale, teacher_lse=target.lse, attn_mask=attn_mask,
                                           scale=scale)
    else:
        out, loss = attention_distillation(query, key, value, teacher_probs=target, attn_mask=attn_mask, scale=scale)
    return AttentionResult(out, loss)
