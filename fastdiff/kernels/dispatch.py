"""One call to choose the attention backend of a diffusers pipeline or model: ``set_attention_backend``.

* UNets and transformers built on diffusers' ``Attention`` with the default SDPA processors
  (``AttnProcessor2_0`` / ``AttnProcessor``: UNet2DConditionModel, PixArt, the VAE, ...) get a
  :class:`DispatchAttnProcessor` that computes the same projections and norms and sends
  ``attention(q, k, v, mask, scale)`` to the chosen backend.
* Processors built on diffusers' own dispatcher (those with an ``_attention_backend`` attribute: Flux, SD3's
  newer blocks, Wan, ...) get diffusers' backend name for the backends diffusers has (``sdpa`` -> native,
  ``flash-attn`` -> flash, ...); fastdiff's kernels are not injected there, which the log says.
* Other processors (IP-adapter, added-KV, ...) are left alone, also logged.

Lossy backends (``"fastdiff-int8"``, ``"sageattention"``) are best set on the denoiser alone
(``set_attention_backend(pipe.unet, ...)``): a VAE's attention amplifies their error.

``backend="auto"`` decides per call: CPU -> PyTorch SDPA (one log line); CUDA -> ``flash-attn`` when it is
installed and serves the call (fp16/bf16, no mask, head dim <= 256), else SDPA, which picks its own
flash / cuDNN / memory-efficient kernel. fastdiff's Triton kernel and the lossy INT8 kernels are chosen by
name only (``"fastdiff-triton"``, ``"fastdiff-int8"``, ``"sageattention"``). A backend that cannot serve a
call (device, dtype, head dim, mask, autograd) runs SDPA instead and logs it once per reason. The backend
that ran is counted per call: :func:`attention_backend_report`. :func:`remove_attention_backend` restores
the original processors.
"""

from __future__ import annotations

import importlib.util
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdiff.kernels.processor import run_attention_processor

logger = logging.getLogger(__name__)

AttentionFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None", float], Tensor]


def _installed(module: str) -> Callable[[], bool]:
    return lambda: importlib.util.find_spec(module) is not None


def _half(q: Tensor) -> bool:
    return q.dtype in (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------- backends
@dataclass(frozen=True)
class Backend:
    """An attention implementation: ``run(q, k, v, mask, scale)`` on ``[B, H, N, d]``; ``refuses`` returns
    why it cannot serve a call (``None``: it can); ``diffusers_name`` is diffusers' name for it, if any."""

    name: str
    run: AttentionFn
    refuses: Callable[[Tensor, Tensor, Tensor, Tensor | None], str | None]
    installed: Callable[[], bool] = lambda: True
    install_hint: str = ""
    diffusers_name: str | None = None


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _sdpa_kernel(kind: str) -> AttentionFn:
    def run(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, kind)):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    return run


def _needs_cuda(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> str | None:
    return None if q.is_cuda else f"needs CUDA tensors, got {q.device.type}"


def _flash_like(max_dim: int, mask_ok: bool = False, grad_ok: bool = True):
    def refuses(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> str | None:
        if not q.is_cuda:
            return f"needs CUDA tensors, got {q.device.type}"
        if not _half(q):
            return f"needs fp16/bf16, got {q.dtype}"
        if q.shape[-1] > max_dim:
            return f"needs head_dim <= {max_dim}, got {q.shape[-1]}"
        if mask is not None and not mask_ok:
            return "does not take an attention mask"
        if not grad_ok and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return "is forward-only (inference) and a gradient is needed"
        return None

    return refuses


def _xformers(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    import xformers.ops as xops

    return xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           scale=scale).transpose(1, 2)


def _flash_attn(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    from flash_attn import flash_attn_func

    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale).transpose(1, 2)


def _sageattention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=scale)


def _fastdiff_refuses(forward_only: bool):
    def refuses(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> str | None:
        from fastdiff.kernels._triton import MAX_HEAD_DIM, SUPPORTED_DTYPES, kernel_can_run

        if not kernel_can_run(q):
            return f"needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {q.device.type}"
        if q.dtype not in SUPPORTED_DTYPES:
            return f"needs fp16/bf16/fp32, got {q.dtype}"
        if q.shape[-1] > MAX_HEAD_DIM:
            return f"needs head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}"
        if forward_only and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return "is forward-only (inference) and a gradient is needed"
        return None

    return refuses


def _fastdiff_triton(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    from fastdiff.kernels.flash import flash_attention

    return flash_attention(q, k, v, mask, scale)


def _fastdiff_int8(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    from fastdiff.kernels.int8 import int8_attention

    return int8_attention(q, k, v, mask, scale)


def _any(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> str | None:
    return None


_TRITON = "triton"
BACKENDS: dict[str, Backend] = {b.name: b for b in [
    Backend("sdpa", _sdpa, _any, diffusers_name="native"),
    Backend("sdpa-flash", _sdpa_kernel("FLASH_ATTENTION"), _flash_like(256), diffusers_name="_native_flash"),
    Backend("sdpa-efficient", _sdpa_kernel("EFFICIENT_ATTENTION"), _needs_cuda, diffusers_name="_native_efficient"),
    Backend("sdpa-cudnn", _sdpa_kernel("CUDNN_ATTENTION"), _flash_like(128, mask_ok=True),
            diffusers_name="_native_cudnn"),
    Backend("sdpa-math", _sdpa_kernel("MATH"), _any, diffusers_name="_native_math"),
    Backend("xformers", _xformers, lambda q, k, v, m: _needs_cuda(q, k, v, m) or
            (None if m is None else "does not take an attention mask here"), _installed("xformers"),
            "pip install xformers", "xformers"),
    Backend("flash-attn", _flash_attn, _flash_like(256), _installed("flash_attn"), "pip install flash-attn", "flash"),
    Backend("sageattention", _sageattention, _flash_like(128, grad_ok=False), _installed("sageattention"),
            "pip install sageattention", "sage"),
    Backend("fastdiff-triton", _fastdiff_triton, _fastdiff_refuses(False), _installed(_TRITON),
            'pip install "fastdiff[triton]"'),
    Backend("fastdiff-int8", _fastdiff_int8, _fastdiff_refuses(True), _installed(_TRITON),
            'pip install "fastdiff[triton]"'),
]}


def available_attention_backends() -> tuple[str, ...]:
    """``"auto"`` and the backends installed here (fastdiff's own need ``triton``)."""
    return ("auto", *(name for name, b in BACKENDS.items() if b.installed()))


def choose_backend(requested: str, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[str, str]:
    """``(backend that runs, why)`` for one call."""
    if requested == "auto":
        if not q.is_cuda:
            return "sdpa", f"auto on {q.device.type}: PyTorch SDPA"
        fa = BACKENDS["flash-attn"]
        if fa.installed() and fa.refuses(q, k, v, mask) is None:
            return "flash-attn", "auto on CUDA: flash-attn installed"
        return "sdpa", "auto on CUDA: PyTorch SDPA (flash / cuDNN / memory-efficient, its own choice)"
    reason = BACKENDS[requested].refuses(q, k, v, mask)
    if reason is None:
        return requested, "requested"
    return "sdpa", f"{requested!r} {reason}; using SDPA"


class AttentionRouter:
    """Runs each call on the chosen backend, counting which ran; logs each new choice or fallback once."""

    def __init__(self, requested: str) -> None:
        self.requested = requested
        self.calls: Counter[str] = Counter()
        self.fallbacks: Counter[str] = Counter()
        self._said: set[str] = set()

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
        name, why = choose_backend(self.requested, q, k, v, mask)
        try:
            out = BACKENDS[name].run(q, k, v, mask, scale)
        except RuntimeError as err:  # e.g. a forced SDPA kernel with "No available kernel"
            if name == "sdpa":
                raise
            name, why = "sdpa", f"{name!r} failed ({str(err).splitlines()[0][:120]}); using SDPA"
            out = _sdpa(q, k, v, mask, scale)
        self.calls[name] += 1
        if self.requested not in ("auto", name):
            self.fallbacks[why] += 1
        if why not in self._said:
            self._said.add(why)
            logger.warning("fastdiff attention: running %r (%s)", name, why)
        return out


# --------------------------------------------------------------------------------------------- processor
class DispatchAttnProcessor:
    """``AttnProcessor2_0``'s computation (spatial / group / q-k norms, masks, residual, rescale) with the
    attention itself sent to an :class:`AttentionRouter` (and ``attn.scale`` honoured)."""

    def __init__(self, router: AttentionRouter) -> None:
        self.router = router

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args: Any, **kwargs: Any) -> Tensor:
        return run_attention_processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, self.router)


# ------------------------------------------------------------------------------------------- public API
@dataclass
class AttentionDispatch:
    """What :func:`set_attention_backend` installed on one model; ``remove()`` undoes it."""

    model: nn.Module
    requested: str
    router: AttentionRouter
    processors: dict[nn.Module, Any] = field(default_factory=dict)
    diffusers_backends: dict[nn.Module, Any] = field(default_factory=dict)
    untouched: Counter[str] = field(default_factory=Counter)

    def remove(self) -> None:
        for module, proc in self.processors.items():
            module.set_processor(proc)
        for proc, previous in self.diffusers_backends.items():
            proc._attention_backend = previous
        self.processors, self.diffusers_backends = {}, {}
        if getattr(self.model, "_fastdiff_attention", None) is self:
            del self.model._fastdiff_attention

    def report(self) -> dict[str, Any]:
        """``{"requested", "calls": {backend: n}, "fallbacks": {reason: n}, "modules": n, "diffusers_modules":
        n, "untouched": {processor class: n}}``."""
        return {"requested": self.requested, "calls": dict(self.router.calls), "fallbacks": dict(self.router.fallbacks),
                "modules": len(self.processors), "diffusers_modules": len(self.diffusers_backends),
                "untouched": dict(self.untouched)}


def _models(pipe_or_model: Any) -> dict[str, nn.Module]:
    if isinstance(pipe_or_model, nn.Module):
        return {type(pipe_or_model).__name__: pipe_or_model}
    components = getattr(pipe_or_model, "components", None)
    if isinstance(components, dict):
        return {name: m for name, m in components.items() if isinstance(m, nn.Module)}
    raise TypeError(f"pipe_or_model must be a diffusers pipeline or a torch.nn.Module, got {type(pipe_or_model).__name__}")


def _diffusers_backend(name: str) -> Any:
    """diffusers' backend enum for ``name``, after diffusers' own check that its package is installed."""
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
    )

    backend = AttentionBackendName(name)
    _check_attention_backend_requirements(backend)
    return backend


def _install(model: nn.Module, backend: str) -> AttentionDispatch:
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    existing = getattr(model, "_fastdiff_attention", None)
    if existing is not None:
        existing.remove()
    dispatch = AttentionDispatch(model, backend, AttentionRouter(backend))
    processor = DispatchAttnProcessor(dispatch.router)
    diffusers_name = None if backend == "auto" else BACKENDS[backend].diffusers_name  # auto: diffusers' default
    for module in model.modules():
        proc = getattr(module, "processor", None)
        if proc is None:
            continue
        if isinstance(module, Attention) and type(proc) in (AttnProcessor2_0, AttnProcessor):
            dispatch.processors[module] = proc
            module.set_processor(processor)
        elif hasattr(proc, "_attention_backend") and diffusers_name is not None:
            dispatch.diffusers_backends[proc] = proc._attention_backend
            proc._attention_backend = _diffusers_backend(diffusers_name)
        else:
            dispatch.untouched[type(proc).__name__] += 1
    if dispatch.processors or dispatch.diffusers_backends:
        model._fastdiff_attention = dispatch
    logger.info("fastdiff attention: %r on %s: %d processors routed, %d diffusers-dispatched, untouched %s",
                backend, type(model).__name__, len(dispatch.processors), len(dispatch.diffusers_backends),
                dict(dispatch.untouched) or "none")
    if dispatch.untouched:
        logger.warning("fastdiff attention: %s left with their own processors %s", type(model).__name__,
                       dict(dispatch.untouched))
    return dispatch


def set_attention_backend(pipe_or_model: Any, backend: str = "auto") -> dict[str, AttentionDispatch]:
    """Route the attention of a diffusers pipeline (all its models) or model through ``backend``.

    Args:
        pipe_or_model: a ``DiffusionPipeline`` or an ``nn.Module`` (UNet, transformer, VAE).
        backend: ``"auto"`` or one of :data:`BACKENDS` (``"sdpa"``, ``"sdpa-flash"``, ``"sdpa-efficient"``,
            ``"sdpa-cudnn"``, ``"sdpa-math"``, ``"xformers"``, ``"flash-attn"``, ``"sageattention"``,
            ``"fastdiff-triton"``, ``"fastdiff-int8"``); must be installed.

    Returns ``{model name: AttentionDispatch}`` for the models that had attention. Calling it again replaces
    the previous choice; :func:`remove_attention_backend` restores the original processors.
    """
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {tuple(BACKENDS)}, got {backend!r}")
    if backend != "auto" and not BACKENDS[backend].installed():
        raise ValueError(f"attention backend {backend!r} is not installed here ({BACKENDS[backend].install_hint}); "
                         f"installed: {available_attention_backends()}")
    out = {}
    for name, model in _models(pipe_or_model).items():
        dispatch = _install(model, backend)
        if dispatch.processors or dispatch.diffusers_backends:
            out[name] = dispatch
    return out


def remove_attention_backend(pipe_or_model: Any) -> None:
    """Restore the processors (and diffusers backends) that :func:`set_attention_backend` replaced."""
    for model in _models(pipe_or_model).values():
        dispatch = getattr(model, "_fastdiff_attention", None)
        if dispatch is not None:
            dispatch.remove()


def attention_backend_report(pipe_or_model: Any) -> dict[str, dict[str, Any]]:
    """``{model name: AttentionDispatch.report()}``: which backend each model asked for and which ran how
    often (``{}`` for models without fastdiff dispatch)."""
    out = {}
    for name, model in _models(pipe_or_model).items():
        dispatch = getattr(model, "_fastdiff_attention", None)
        if dispatch is not None:
            out[name] = dispatch.report()
    return out
