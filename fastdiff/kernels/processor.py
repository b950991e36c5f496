"""The computation of diffusers' ``AttnProcessor2_0`` around the attention itself, in one place.

:func:`run_attention_processor` does the spatial / group / cross / q-k norms, the mask preparation, the head
split, the output projection, the residual and the rescale, and hands ``attention(q, k, v, mask, scale)``
(``[B, H, N, D]`` in, ``[B, H, N, D]`` out) to the caller: the backend dispatch
(:class:`fastdiff.kernels.dispatch.DispatchAttnProcessor`) and HASTE's attention capture
(:class:`fastdiff.training.haste.AttentionCaptureProcessor`) differ only in that function.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

AttentionCore = Callable[[Tensor, Tensor, Tensor, "Tensor | None", float], Tensor]


def run_attention_processor(attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None,
                            attention_mask: Tensor | None, temb: Tensor | None, attention: AttentionCore) -> Tensor:
    """One diffusers ``Attention`` forward with ``attention`` as the attention kernel (``attn.scale`` honoured)."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    image_layout = hidden_states.ndim == 4
    if image_layout:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    batch, kv_tokens, _ = context.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, kv_tokens, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if encoder_hidden_states is not None and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    head_dim = key.shape[-1] // attn.heads

    def heads(x: Tensor) -> Tensor:
        return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

    query, key, value = heads(query), heads(key), heads(value)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = attention(query, key, value, attention_mask, attn.scale)
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if image_layout:
        out = out.transpose(-1, -2).reshape(b, c, h, w)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor
