"""Fused attention distillation (HASTE's "fused" backend) against float64 and the materialised path."""

import logging

import pytest
import torch

pytest.importorskip("triton", reason='the kernels need triton: pip install "fastdiff[triton]"')

from fastdiff.kernels.accuracy import assert_close_to_reference  # noqa: E402
from fastdiff.kernels.distillation import attention_distillation, attention_distillation_reference  # noqa: E402
from fastdiff.kernels.haste_backend import haste_fused_backend  # noqa: E402
from fastdiff.training import haste  # noqa: E402


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _case(dtype, n=29, d=72, heads=3, teacher_heads=2, d_t=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n, d, generator=g).to(dtype).requires_grad_() for _ in range(3))
    tq, tk = (torch.randn(1, teacher_heads, n, d_t, generator=g).to(dtype) for _ in range(2))
    logits = (tq.double() @ tk.double().transpose(-1, -2)) * d_t**-0.5
    return (q, k, v), (tq, tk), logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("teacher", ["probs", "qk", "qk+lse"])
def test_output_loss_and_gradients_match_float64_as_well_as_pytorch(interpret, dtype, teacher):
    (q, k, v), (tq, tk), t_logits = _case(dtype)
    probs = t_logits.softmax(-1)
    kw = {"teacher_probs": probs.float()} if teacher == "probs" else {"teacher_query": tq, "teacher_key": tk}
    if teacher == "qk+lse":
        kw["teacher_lse"] = t_logits.logsumexp(-1).float()
    mask = torch.randn(1, 1, 29, 29, generator=torch.Generator().manual_seed(3))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(dtype)

    def run(fn, inputs, teacher_probs, mask):
        out, loss = fn(*inputs, attn_mask=mask, **({"teacher_probs": teacher_probs} if fn is not attention_distillation
                                                    else kw))
        return (out, loss, *torch.autograd.grad((out * dout.to(out.dtype)).sum() + 5 * loss, inputs))

    fused = run(attention_distillation, (q, k, v), None, mask)
    same = run(attention_distillation_reference, [t.detach().clone().requires_grad_() for t in (q, k, v)],
               probs.to(dtype), mask.to(dtype))
    exact = run(attention_distillation_reference, [t.detach().double().requires_grad_() for t in (q, k, v)],
                probs, mask.double())
    assert fused[1].ndim == 0 and fused[1].dtype == torch.float32
    for name, f, s, e in zip(["output", "loss", "dq", "dk", "dv"], fused, same, exact):
        assert_close_to_reference(f, s, e, name)


def test_per_row_loss_is_head_to_head_over_the_first_teacher_heads(interpret):
    (q, k, v), (tq, tk), _ = _case(torch.float32, n=18, d=16, heads=2, teacher_heads=3, d_t=16)
    _, rows = attention_distillation(q, k, v, teacher_query=tq, teacher_key=tk, reduction="none")
    _, ref = attention_distillation_reference(q, k, v, teacher_query=tq, teacher_key=tk, reduction="none")
    assert rows.shape == (1, 2, 18)
    torch.testing.assert_close(rows, ref.float(), rtol=1e-5, atol=1e-5)
    _, self_ce = attention_distillation(q, k, v, teacher_query=q.detach(), teacher_key=k.detach(), scale=0.25,
                                        teacher_scale=0.25, reduction="none")
    assert torch.all(self_ce <= rows + 1e-5)  # CE to itself is its entropy, the minimum over teachers


def test_bad_teachers_are_refused(interpret):
    (q, k, v), (tq, tk), _ = _case(torch.float32, n=8, d=16)
    with pytest.raises(ValueError, match="exactly one teacher"):
        attention_distillation(q, k, v)
    with pytest.raises(ValueError, match=r"teacher_probs must be \[batch=1, teacher_heads, 8, 8\]"):
        attention_distillation(q, k, v, teacher_probs=torch.rand(1, 2, 8, 9))
    with pytest.raises(ValueError, match="teacher_query and teacher_key must be given together"):
        attention_distillation(q, k, v, teacher_query=tq)
    with pytest.raises(ValueError, match="reduction must be one of"):
        attention_distillation(q, k, v, teacher_query=tq, teacher_key=tk, reduction="sum")


def _haste_step(model, inputs, backend):
    targets = [torch.softmax(torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(i)), -1) for i in (5, 6)]
    model.zero_grad(set_to_none=True)
    with haste.capture_attention(model, [0, 2], targets, backend=backend) as procs:
        sample = model(**inputs).sample
    loss = torch.stack([p.loss for p in procs]).mean()
    (sample.square().mean() + loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return sample.detach(), loss.detach(), grads


def test_haste_fused_backend_matches_the_materialised_path(interpret, pixart, monkeypatch):
    model, inputs = pixart
    monkeypatch.setitem(haste._BACKENDS, "fused", haste_fused_backend)
    assert haste.resolve_attention_backend("auto") == "fused"
    fused = _haste_step(model, inputs, "auto")
    reference = _haste_step(model, inputs, "materialized")
    torch.testing.assert_close(fused[0], reference[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused[1], reference[1], rtol=1e-5, atol=1e-6)
    assert fused[2].keys() == reference[2].keys() and len(fused[2]) > 10
    for name in reference[2]:
        torch.testing.assert_close(fused[2][name], reference[2][name], rtol=1e-4, atol=1e-6, msg=name)


def test_haste_fused_backend_falls_back_on_cpu_without_the_interpreter(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 2, 6, 8)
    target = torch.softmax(torch.randn(1, 2, 6, 6), -1)
    with caplog.at_level(logging.WARNING):
        got = haste_fused_backend(q, q, q, 0.3, None, target)
        haste_fused_backend(q, q, q, 0.3, None, target)
    expected = haste.materialized_attention(q, q, q, 0.3, None, target)
    torch.testing.assert_close(got.loss, expected.loss)
    assert [r.message for r in caplog.records].count(
        "fastdiff HASTE fused attention: the kernel needs CUDA (or TRITON_INTERPRET=1 on CPU), got cpu tensors; "
        "using the materialised reference") <= 1
