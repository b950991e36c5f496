"""SageAttention-style INT8 attention under the CPU interpreter: its arithmetic and its accuracy contract."""

import pytest
import torch

pytest.importorskip("triton", reason='the kernels need triton: pip install "fastdiff[triton]"')

from fastdiff.kernels.accuracy import cosine, max_error  # noqa: E402
from fastdiff.kernels.flash import attention_reference  # noqa: E402
from fastdiff.kernels.int8 import int8_attention, int8_attention_reference  # noqa: E402


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(dtype, n=45, d=72, offset=3.0):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, d, generator=g) for _ in range(3))
    k = k + offset * torch.randn(1, 2, 1, d, generator=g)  # per-channel key offsets, what smoothing removes
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("masked", [False, True])
def test_kernel_computes_the_quantized_reference_and_meets_the_cosine_contract(interpret, dtype, masked):
    q, k, v = _inputs(dtype)
    mask = (torch.rand(45, 45, generator=torch.Generator().manual_seed(1)) > 0.2) if masked else None
    out = int8_attention(q, k, v, mask)
    simulated = int8_attention_reference(q, k, v, mask)
    exact = attention_reference(q.double(), k.double(), v.double(), mask)
    assert out.dtype == dtype
    # the kernel is the quantized arithmetic (P and V rounded to fp16 on top of it) ...
    assert max_error(out, simulated) <= 4e-3
    # ... and the quantization error stays within the contract
    assert cosine(out, exact) >= 0.999


def test_smoothing_k_is_what_keeps_offset_keys_accurate(interpret):
    q, k, v = _inputs(torch.float32, offset=30.0)
    exact = attention_reference(q.double(), k.double(), v.double())
    smoothed = max_error(int8_attention(q, k, v), exact)
    raw = max_error(int8_attention(q, k, v, smooth_k=False), exact)
    assert smoothed < raw / 3
    torch.testing.assert_close(int8_attention(q, k, v, smooth_k=False),
                               int8_attention_reference(q, k, v, smooth_k=False), rtol=0, atol=1e-3)


def test_forward_only(interpret):
    q, k, v = _inputs(torch.float32, n=8, d=16)
    with pytest.raises(ValueError, match=r"int8_attention is forward-only \(inference\)"):
        int8_attention(q.requires_grad_(), k, v)
    with torch.no_grad():
        assert int8_attention(q, k, v).shape == q.shape
