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


def _teacher_targets(kind):
    from fastdiff.kernels.targets import TeacherAttention

    if kind == "probs":
        return [torch.softmax(torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(i)), -1) for i in (5, 6)]
    fine = 64 if kind == "pooled" else 16  # pooled: an 8x8 teacher grid read on the student's 4x4
    qk = [TeacherAttention(query=torch.randn(2, 2, fine, 12, generator=torch.Generator().manual_seed(i)),
                           key=torch.randn(2, 2, fine, 12, generator=torch.Generator().manual_seed(i + 10)))
          for i in (5, 6)]
    return [t.pooled(2) for t in qk] if kind == "pooled" else qk


def _haste_step(model, inputs, backend, kind="probs"):
    targets = _teacher_targets(kind)
    model.zero_grad(set_to_none=True)
    with haste.capture_attention(model, [0, 2], targets, backend=backend) as procs:
        sample = model(**inputs).sample
    loss = torch.stack([p.loss for p in procs]).mean()
    (sample.square().mean() + loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return sample.detach(), loss.detach(), grads


@pytest.mark.parametrize("kind", ["probs", "qk", "pooled"])
def test_haste_fused_backend_matches_the_materialised_path(interpret, pixart, monkeypatch, kind):
    model, inputs = pixart
    monkeypatch.setitem(haste._BACKENDS, "fused", haste_fused_backend)
    assert haste.resolve_attention_backend("auto", inputs["hidden_states"]) == "fused"
    fused = _haste_step(model, inputs, "auto", kind)
    reference = _haste_step(model, inputs, "materialized", kind)
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
    from fastdiff.kernels.targets import TeacherAttention

    qk = TeacherAttention(query=torch.randn(1, 2, 6, 4), key=torch.randn(1, 2, 6, 4))
    with caplog.at_level(logging.WARNING):
        got = haste_fused_backend(q, q, q, 0.3, None, qk)  # queries and keys: the memory-lean chunked loss
    torch.testing.assert_close(got.loss, haste.materialized_attention(q, q, q, 0.3, None, qk).loss)
    assert "using the chunked PyTorch loss" in caplog.records[-1].message


def test_haste_training_with_the_fused_kernel_and_teacher_queries_and_keys(interpret, pixart, monkeypatch):
    """Two HASTE optimisation steps (digits ViT teacher handing over Q/K, the fused kernel) against the
    reference (teacher probabilities, materialised loss): the same losses step by step."""
    import copy

    from fastdiff.training import REPA, TeacherAlignment
    from fastdiff.training.teachers.vit import DigitsViT

    monkeypatch.setitem(haste._BACKENDS, "fused", haste_fused_backend)
    clean = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))

    def train(teacher_attention, backend):
        model, inputs = copy.deepcopy(pixart[0]).train(), pixart[1]
        torch.manual_seed(1)
        teacher = DigitsViT(image_size=8, patch_size=2, dim=16, depth=3, heads=2, num_classes=0)
        align = TeacherAlignment(teacher, REPA(16, 16, block_index=1, projector_dim=8), [(0, 1), (1, 2)],
                                 backend=backend, teacher_attention=teacher_attention)
        opt = torch.optim.SGD([*model.parameters(), *align.parameters()], lr=0.1)
        record = []
        for _ in range(2):
            target = align.run_teacher(clean, 16)
            with align.capture(model, target):
                sample = model(**inputs).sample
            ran = [p.ran for p in align._processors]
            losses = align.losses()
            total = sample.square().mean() + losses["align"]
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            record.append([losses["attn"].item(), total.item()])
        assert ran == [backend] * 2 and align.teacher_attention == teacher_attention
        return torch.tensor(record, dtype=torch.float64)

    torch.testing.assert_close(train("qk", "fused"), train("probs", "materialized"), rtol=1e-5, atol=1e-6)
