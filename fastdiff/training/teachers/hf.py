"""Hugging Face ``transformers`` ViTs (DINOv2, as in REPA and HASTE) as REPA/HASTE teachers.

Real use (downloads once into the HF cache; nothing in fastdiff needs it offline)::

    teacher = load_dinov2_teacher("facebook/dinov2-base")     # 768-d tokens, patch 14, 12 heads
    # REPA: images are resized to (student grid) x 14 so teacher tokens match the student's
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastdiff.kernels.targets import TeacherAttention
from fastdiff.training.repa import TeacherOutput

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class HFViTTeacher(nn.Module):
    """Wrap a ``transformers`` ViT-style model (``Dinov2Model`` etc.) as a teacher.

    Takes images in [-1, 1] (1 or 3 channels), normalises them with ImageNet statistics and returns the
    final patch tokens (prefix tokens, CLS and registers, dropped). With ``output_attentions=True`` it
    also returns each layer's patch-to-patch attention, renormalised over patches (HASTE's target); the
    wrapped model must then use eager attention. With ``attention_output = "qk"`` it returns, for every
    layer, the patch tokens' queries and keys instead (:class:`~fastdiff.kernels.targets.TeacherAttention`,
    read by hooks on the layers' query / key projections): the softmax of their scaled products is exactly
    the renormalised patch-to-patch attention, and no ``N x N`` tensor is formed by fastdiff (load the
    model with ``attn_implementation="sdpa"`` so the model itself forms none either).
    """

    def __init__(self, model: nn.Module, output_attentions: bool = False) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        config = model.config
        self.patch_size = int(config.patch_size)
        self.embed_dim = int(config.hidden_size)
        self.num_prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self.output_attentions = output_attentions
        self.attention_output = "probs"
        self.num_heads = int(config.num_attention_heads)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _projections(self) -> list[tuple[nn.Module, nn.Module]]:
        """(query, key) projection of every layer, in order (transformers 5 ``q_proj``/``k_proj``, 4 ``query``/``key``)."""
        pairs = []
        for module in self.model.modules():
            for q_name, k_name in (("q_proj", "k_proj"), ("query", "key")):
                q, k = getattr(module, q_name, None), getattr(module, k_name, None)
                if isinstance(q, nn.Linear) and isinstance(k, nn.Linear):
                    pairs.append((q, k))
        if not pairs:
            raise TypeError(f"{type(self.model).__name__}: no query/key projections found to hand over")
        return pairs

    def _forward_qk(self, x: Tensor) -> TeacherOutput:
        captured: list[list[Tensor]] = []
        handles = []
        for q_proj, k_proj in self._projections():
            slot: list[Tensor] = []
            captured.append(slot)
            handles += [m.register_forward_hook(lambda mod, args, out, slot=slot: slot.append(out))
                        for m in (q_proj, k_proj)]
        try:
            out = self.model(pixel_values=x)
        finally:
            for handle in handles:
                handle.remove()
        p = self.num_prefix_tokens
        attentions = []
        for q, k in captured:
            q, k = (t[:, p:].unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k))
            attentions.append(TeacherAttention(query=q, key=k, scale=q.shape[-1] ** -0.5))
        return TeacherOutput(tokens=out.last_hidden_state[:, p:], attentions=attentions)

    def forward(self, images: Tensor) -> TeacherOutput:
        x = (images.expand(-1, 3, -1, -1) + 1) / 2
        x = (x - self.mean) / self.std
        if self.attention_output == "qk":
            return self._forward_qk(x)
        out = self.model(pixel_values=x, output_attentions=self.output_attentions)
        p = self.num_prefix_tokens
        attentions = []
        for attn in out.attentions or ():
            patch = attn[:, :, p:, p:]
            attentions.append(patch / patch.sum(-1, keepdim=True))
        return TeacherOutput(tokens=out.last_hidden_state[:, p:], attentions=attentions)


def load_dinov2_teacher(name_or_path: str = "facebook/dinov2-base", output_attentions: bool = False,
                        device: str | torch.device = "cpu", **from_pretrained_kwargs) -> HFViTTeacher:
    """DINOv2 through ``transformers.AutoModel``. With ``output_attentions`` (attention maps returned, the
    ``"probs"`` HASTE target) the model runs eager attention, which forms them; otherwise SDPA, which forms no
    ``N x N`` tensor (REPA's tokens, and HASTE's ``"qk"`` target, read from the query / key projections). An
    ``attn_implementation`` in ``from_pretrained_kwargs`` overrides either."""
    from transformers import AutoModel

    from_pretrained_kwargs.setdefault("attn_implementation", "eager" if output_attentions else "sdpa")
    model = AutoModel.from_pretrained(name_or_path, **from_pretrained_kwargs)
    return HFViTTeacher(model, output_attentions=output_attentions).to(device)
