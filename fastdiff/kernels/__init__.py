"""fastdiff's attention kernels and attention-backend dispatch.

* :func:`set_attention_backend` / :func:`remove_attention_backend` / :func:`attention_backend_report`:
  choose, undo and inspect the attention backend of a diffusers pipeline or model
  (:mod:`fastdiff.kernels.dispatch`).
* :func:`flash_attention`: Triton flash attention, forward and backward (:mod:`.flash`).
* :func:`attention_distillation`: attention output and HASTE's attention cross-entropy to a teacher, fused,
  with gradients (:mod:`.distillation`); registered as HASTE's ``"fused"`` backend.
* :func:`chunked_attention_loss`: the same loss in plain PyTorch by row and key blocks, for CPUs and GPUs
  without triton (:mod:`.chunked`); HASTE's ``"chunked"`` backend.
* :class:`TeacherAttention`: a teacher's attention handed over as queries and keys (or probabilities)
  (:mod:`.targets`).
* :func:`int8_attention`: SageAttention-style INT8 inference attention (:mod:`.int8`).

The kernels need ``triton`` (``pip install "fastdiff[triton]"``) and a CUDA device; on CPU they run only
under ``TRITON_INTERPRET=1`` (for tests). Names are imported lazily.
"""

from __future__ import annotations

from fastdiff._package import lazy_exports

_EXPORTS = {
    "set_attention_backend": "fastdiff.kernels.dispatch",
    "remove_attention_backend": "fastdiff.kernels.dispatch",
    "attention_backend_report": "fastdiff.kernels.dispatch",
    "available_attention_backends": "fastdiff.kernels.dispatch",
    "flash_attention": "fastdiff.kernels.flash",
    "attention_reference": "fastdiff.kernels.flash",
    "TeacherAttention": "fastdiff.kernels.targets",
    "chunked_attention_loss": "fastdiff.kernels.chunked",
    "attention_distillation": "fastdiff.kernels.distillation",
    "attention_distillation_reference": "fastdiff.kernels.distillation",
    "int8_attention": "fastdiff.kernels.int8",
    "int8_attention_reference": "fastdiff.kernels.int8",
    "triton_available": "fastdiff.kernels._triton",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(globals(), "fastdiff.kernels", _EXPORTS)
