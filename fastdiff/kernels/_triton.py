"""Shared plumbing of fastdiff's Triton kernels: availability, input checks, masks and launching.

Kernels are written as plain Python functions in Triton's language and launched either compiled on a CUDA
device (``triton.jit``, autotuned over a few tile configurations) or, for CPU tensors while
``TRITON_INTERPRET=1`` is set *at call time*, through Triton's interpreter (numpy on the CPU, fixed small
tiles). Choosing per call, instead of at import, lets a test enable the interpreter for itself only.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def triton_available() -> bool:
    """Whether the ``triton`` package is installed (``pip install "fastdiff[triton]"``)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set now (kernels then run on CPU tensors, slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def kernel_can_run(tensor: Tensor) -> bool:
    """Whether a fastdiff kernel can run on ``tensor``'s device now: CUDA with triton, or CPU under
    the interpreter."""
    if not triton_available():
        return False
    if tensor.is_cuda:
        return True
    return tensor.device.type == "cpu" and interpreter_enabled()


def require_triton() -> None:
    if not triton_available():
        raise ImportError('fastdiff\'s attention kernels need triton: pip install "fastdiff[triton]"')


def check_attention_inputs(query: Tensor, key: Tensor, value: Tensor, *, dtypes: Sequence[torch.dtype] = SUPPORTED_DTYPES,
                           kernel: str = "fastdiff attention") -> None:
    """Validate ``[B, H, N, d]`` query / key / value for a kernel; raises TypeError / ValueError naming the
    argument and what is supported."""
    require_triton()
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{kernel}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{kernel}: {name} must be 4-D [batch, heads, tokens, head_dim], got shape "
                             f"{tuple(t.shape)}")
        if t.dtype not in dtypes:
            raise TypeError(f"{kernel}: {name} dtype must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
        if t.dtype != query.dtype:
            raise TypeError(f"{kernel}: {name} dtype {t.dtype} differs from query dtype {query.dtype}")
        if t.device != query.device:
            raise ValueError(f"{kernel}: {name} is on {t.device}, query on {query.device}")
    b, h, _, d = query.shape
    if key.shape[:2] != (b, h) or value.shape[:2] != (b, h):
        raise ValueError(f"{kernel}: batch and heads of query {tuple(query.shape)}, key {tuple(key.shape)} and "
                         f"value {tuple(value.shape)} must match")
    if key.shape[2] != value.shape[2]:
        raise ValueError(f"{kernel}: key and value must have the same number of tokens, got {key.shape[2]} "
                         f"and {value.shape[2]}")
    if key.shape[3] != d or value.shape[3] != d:
        raise ValueError(f"{kernel}: query, key and value must share head_dim, got {d}, {key.shape[3]}, "
                         f"{value.shape[3]}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{kernel}: head_dim must be in 1..{MAX_HEAD_DIM}, got {d}")
    if query.shape[2] == 0 or key.shape[2] == 0:
        raise ValueError(f"{kernel}: query and key need at least one token")
    check_device(query, kernel)


def check_device(tensor: Tensor, kernel: str) -> None:
    if tensor.is_cuda:
        return
    if tensor.device.type == "cpu" and interpreter_enabled():
        return
    raise ValueError(f"{kernel}: query is on {tensor.device}; the Triton kernel needs CUDA tensors "
                     "(or CPU tensors with TRITON_INTERPRET=1, Triton's slow interpreter, for tests)")


def prepare_mask(mask: Tensor | None, query: Tensor, key: Tensor, name: str = "attn_mask") -> Tensor | None:
    """An additive float mask broadcast (as a view, strides 0 where broadcast) to ``[B, H, Nq, Nk]``.

    Boolean masks follow ``scaled_dot_product_attention``: ``True`` = attend, ``False`` = masked (-inf).
    The mask is a constant: no gradient flows to it.
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, device=mask.device, dtype=torch.float32).masked_fill(~mask, float("-inf"))
    elif not mask.is_floating_point():
        raise TypeError(f"{name} must be boolean or floating point, got {mask.dtype}")
    if mask.device != query.device:
        raise ValueError(f"{name} is on {mask.device}, query on {query.device}")
    shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    if mask.ndim <= 4:
        try:
            return mask.detach().expand(shape)
        except RuntimeError:
            pass
    raise ValueError(f"{name} of shape {tuple(mask.shape)} does not broadcast to [batch, heads, q_tokens, "
                     f"k_tokens] = {list(shape)}")


def block_dim(d: int) -> int:
    """Head dims are padded (by masked loads, no copy) to the next power of two, at least 16."""
    return max(16, 1 << (d - 1).bit_length())


def strides(t: Tensor | None, n: int = 4) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


# ---------------------------------------------------------------------------------------------- launching
INTERPRETER_TILE = 16  # BLOCK_M = BLOCK_N under the interpreter: small, so test sizes span several tiles


def autotune_enabled() -> bool:
    """``FASTDIFF_TRITON_AUTOTUNE=0`` runs each kernel with its first (conservative) configuration instead of
    autotuning over all of them: much less compilation, e.g. for correctness checks."""
    return os.environ.get("FASTDIFF_TRITON_AUTOTUNE", "1") != "0"


@functools.cache
def _compiled(fn: Callable, configs_key: str, key: tuple[str, ...], autotune: bool = True) -> Any:
    import triton

    configs = [triton.Config(dict(kw), num_warps=w, num_stages=s) for kw, w, s in _CONFIGS[configs_key]]
    return triton.autotune(configs=configs if autotune else configs[:1], key=list(key))(triton.jit(fn))


@functools.cache
def _interpreted(fn: Callable) -> Any:
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn)


# (meta-parameters, num_warps, num_stages) per kernel family, for the GPU autotuner
_CONFIGS: dict[str, list[tuple[tuple[tuple[str, int], ...], int, int]]] = {
    "fwd": [((("BLOCK_M", bm), ("BLOCK_N", bn)), w, s)
            for bm, bn, w, s in [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
                                 (128, 32, 4, 4), (64, 32, 4, 4)]],
    "bwd": [((("BLOCK_M", bm), ("BLOCK_N", bn)), w, s)
            for bm, bn, w, s in [(64, 64, 4, 2), (64, 64, 8, 3), (32, 64, 4, 3), (64, 128, 8, 2),
                                 (128, 64, 8, 2), (32, 32, 4, 3)]],
    "int8": [((), w, s) for w, s in [(4, 3), (8, 3), (4, 4), (8, 4)]],
}


def launch(fn: Callable, grid: Callable[[dict], tuple[int, ...]], args: Sequence[Any], *, family: str,
           key: tuple[str, ...], device_tensor: Tensor, tiles: dict[str, int] | None = None, **constexprs: Any) -> None:
    """Run kernel ``fn`` compiled and autotuned (CUDA) or interpreted (CPU, ``TRITON_INTERPRET=1``).

    ``tiles`` fixes tile sizes (families whose configs do not tune them); under the interpreter tiles are
    16 unless fixed.
    """
    if device_tensor.is_cuda:
        _compiled(fn, family, key, autotune_enabled())[grid](*args, **(tiles or {}), **constexprs)
        return
    check_device(device_tensor, fn.__name__)
    meta = {"BLOCK_M": INTERPRETER_TILE, "BLOCK_N": INTERPRETER_TILE} if family != "int8" else {}
    meta.update(tiles or {})
    with _jit_functions_interpreted():
        _interpreted(fn)[grid({**meta, **constexprs})](*args, **meta, **constexprs)


@contextlib.contextmanager
def _jit_functions_interpreted() -> Iterator[None]:
    """While a kernel is interpreted, run the ``triton.jit`` helpers it calls (``tl.zeros``, ``tl.sum``, ...)
    interpreted too. Triton makes them interpreted only when ``TRITON_INTERPRET=1`` was set before triton
    was imported; this makes the interpreter usable when it is switched on later (e.g. by one test)."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.__call__
    JITFunction.__call__ = lambda self, *a, **kw: _interpreted(self.fn)(*a, **kw)
    try:
        yield
    finally:
        JITFunction.__call__ = original
