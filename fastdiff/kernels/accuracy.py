"""The accuracy contract of fastdiff's kernels, shared by the tests and the GPU checks of the benchmark.

A kernel result passes when its error to a float64 reference is at most ``ratio`` (2) times the error of
the PyTorch reference computed in the kernel's dtype, plus a small floor (``FLOOR``) below which both are
rounding noise.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOOR = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def max_error(x: Tensor, exact: Tensor) -> float:
    return (x.double() - exact.double()).abs().max().item()


def close_to_reference(fast: Tensor, same_dtype: Tensor, exact: Tensor, *, ratio: float = 2.0,
                       floor: float | None = None) -> tuple[bool, dict[str, float]]:
    """``(passed, {"kernel_error", "torch_error", "bound"})`` for one output or gradient."""
    floor = FLOOR.get(same_dtype.dtype, 1e-5) if floor is None else floor
    kernel_error, torch_error = max_error(fast, exact), max_error(same_dtype, exact)
    bound = ratio * torch_error + floor
    return kernel_error <= bound, {"kernel_error": kernel_error, "torch_error": torch_error, "bound": bound}


def assert_close_to_reference(fast: Tensor, same_dtype: Tensor, exact: Tensor, what: str = "output", **kw) -> None:
    passed, info = close_to_reference(fast, same_dtype, exact, **kw)
    assert passed, f"{what}: kernel error {info['kernel_error']:.3g} > bound {info['bound']:.3g} " \
                   f"(PyTorch in {same_dtype.dtype}: {info['torch_error']:.3g})"


def cosine(x: Tensor, y: Tensor) -> float:
    """Cosine similarity of two tensors, flattened, in float64."""
    return torch.nn.functional.cosine_similarity(x.double().flatten(), y.double().flatten(), dim=0).item()
