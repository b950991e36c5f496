"""Triton flash attention (forward and backward) under the CPU interpreter against float64 and PyTorch."""

import pytest
import torch

pytest.importorskip("triton", reason='the kernels need triton: pip install "fastdiff[triton]"')

from fastdiff.kernels.accuracy import assert_close_to_reference  # noqa: E402
from fastdiff.kernels.flash import attention_reference, flash_attention  # noqa: E402


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(dtype, n_q, n_k, d, heads=2, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, d, generator=g).to(dtype).requires_grad_() for n in (n_q, n_k, n_k)]


def _mask(kind, n_q, n_k, heads):
    g = torch.Generator().manual_seed(1)
    if kind == "additive":  # broadcast over the batch
        return torch.randn(1, heads, n_q, n_k, generator=g)
    if kind == "bool":  # broadcast over batch and heads; every row keeps its first key
        mask = torch.rand(n_q, n_k, generator=g) > 0.3
        mask[:, 0] = True
        return mask
    return None


# odd token counts (several 16-tiles, ragged), head dims 72 and 80 (padded to 128), cross-attention shapes
CASES = [(37, 37, 72, "additive"), (20, 45, 32, "bool"), (33, 9, 80, None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("n_q", "n_k", "d", "mask_kind"), CASES)
def test_forward_and_backward_match_float64_as_well_as_pytorch(interpret, dtype, n_q, n_k, d, mask_kind):
    q, k, v = _inputs(dtype, n_q, n_k, d)
    mask = _mask(mask_kind, n_q, n_k, 2)
    out = flash_attention(q, k, v, mask)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    same = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out_same = attention_reference(*same, mask.to(dtype) if mask is not None and mask.is_floating_point() else mask)
    grads_same = torch.autograd.grad(out_same, same, dout)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out_exact = attention_reference(*exact, mask.double() if mask is not None and mask.is_floating_point() else mask)
    grads_exact = torch.autograd.grad(out_exact, exact, dout.double())

    assert out.dtype == dtype and out.shape == (1, 2, n_q, d)
    assert_close_to_reference(out, out_same, out_exact, "output")
    for name, g, gs, ge in zip("qkv", grads, grads_same, grads_exact):
        assert_close_to_reference(g, gs, ge, f"d{name}")


def test_fully_masked_rows_give_zero_output_and_gradient(interpret):
    q, k, v = _inputs(torch.float32, 5, 7, 16)
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[2] = False
    out = flash_attention(q, k, v, mask)
    out.sum().backward()
    assert torch.all(out[:, :, 2] == 0) and torch.isfinite(out).all()
    assert torch.all(q.grad[:, :, 2] == 0) and torch.isfinite(k.grad).all()
    torch.testing.assert_close(out[:, :, :2], attention_reference(q, k, v, mask)[:, :, :2], rtol=1e-5, atol=1e-6)


def test_bad_inputs_name_the_argument_and_what_is_supported(interpret, monkeypatch):
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(TypeError, match=r"query dtype must be one of .*float16.*got torch.float64"):
        flash_attention(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match=r"head_dim must be in 1..256, got 320"):
        big = torch.randn(1, 1, 4, 320)
        flash_attention(big, big, big)
    with pytest.raises(ValueError, match=r"key and value must have the same number of tokens"):
        flash_attention(q, q, torch.randn(1, 2, 9, 16))
    with pytest.raises(ValueError, match=r"value must be 4-D"):
        flash_attention(q, q, q[0])
    with pytest.raises(ValueError, match=r"attn_mask of shape \(3, 5\) does not broadcast"):
        flash_attention(q, q, q, torch.zeros(3, 5))
    with pytest.raises(TypeError, match=r"attn_mask must be boolean or floating point"):
        flash_attention(q, q, q, torch.zeros(8, 8, dtype=torch.int64))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match=r"needs CUDA tensors \(or CPU tensors with TRITON_INTERPRET=1"):
        flash_attention(q, q, q)
