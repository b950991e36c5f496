"""The chunked PyTorch attention-distillation loss (HASTE's "chunked" backend) against the materialised reference."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastdiff.kernels.accuracy import assert_close_to_reference
from fastdiff.kernels.chunked import chunked_attention_loss, haste_chunked_backend
from fastdiff.kernels.targets import TeacherAttention
from fastdiff.training import haste


def _reference(q, k, target, mask=None, reduction="mean"):
    """The materialised loss: explicit ``[B, H, N, N]`` logits, the teacher's probabilities formed."""
    logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    probs = target.dense(q.dtype) if isinstance(target, TeacherAttention) else target.to(q.dtype)
    pairs = min(q.shape[1], probs.shape[1])
    log_q = logits[:, :pairs].log_softmax(-1)
    t = probs[:, :pairs]
    ce = -torch.where(t > 0, t * log_q, torch.zeros_like(log_q)).sum(-1)
    return ce.mean() if reduction == "mean" else ce


def _teacher(kind, b=2, heads=2, n=23, d_t=6, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    fine = n * 4 if kind == "pooled" else n
    tq, tk = (torch.randn(b, heads, fine, d_t, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    qk = TeacherAttention(query=tq, key=tk, scale=0.4)
    if kind == "probs":
        return qk.dense()
    if kind == "qk+lse":
        return TeacherAttention(query=tq, key=tk, scale=0.4,
                                lse=(tq.double() @ tk.double().transpose(-2, -1) * 0.4).logsumexp(-1).to(dtype))
    return qk.pooled(2) if kind == "pooled" else qk


@pytest.mark.parametrize("kind, mask_kind", [(kind, mask) for kind in ("probs", "qk", "qk+lse", "pooled")
                                             for mask in (None, "additive")] + [("probs", "bool")])
def test_loss_and_gradients_equal_the_materialised_reference_in_float64(kind, mask_kind):
    n = 16 if kind == "pooled" else 23  # the pooled teacher: 8x8 grid onto the student's 4x4
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    target = _teacher(kind, n=n)  # 2 teacher heads vs 3 student heads: the first 2 pair up
    mask = None
    if mask_kind == "additive":
        mask = torch.randn(1, 3, n, n, generator=g, dtype=torch.float64)
    elif mask_kind == "bool":
        mask = torch.rand(n, n, generator=g) > 0.3
        mask[:, 0] = True  # and a teacher without mass where the student may not attend (else the CE is inf)
        target = target * mask
        target = target / target.sum(-1, keepdim=True)
    for block in (5, 64):  # several partial blocks, and one block
        loss = chunked_attention_loss(q, k, target, attn_mask=mask, block_size=block)
        ref = _reference(q, k, target, mask)
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
        grads, ref_grads = (torch.autograd.grad(x, (q, k)) for x in (loss, ref))
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    rows = chunked_attention_loss(q, k, target, attn_mask=mask, reduction="none", block_size=7)
    torch.testing.assert_close(rows, _reference(q, k, target, mask, "none"), rtol=1e-12, atol=1e-12)
    assert rows.shape == (2, 2, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_half_and_single_precision_within_the_kernels_accuracy_contract(dtype):
    g = torch.Generator().manual_seed(0)
    q64, k64 = (torch.randn(1, 2, 40, 16, generator=g, dtype=torch.float64) for _ in range(2))
    target64 = _teacher("qk", b=1, n=40, d_t=16)
    target = target64.map(lambda t: t.to(dtype))

    def run(q, k, fn, tgt):
        q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
        loss = fn(q, k, tgt)
        return (loss, *torch.autograd.grad(loss, (q, k)))

    fast = run(q64.to(dtype), k64.to(dtype), lambda q, k, t: chunked_attention_loss(q, k, t, block_size=16), target)
    same = run(q64.to(dtype), k64.to(dtype), _reference, target)
    exact = run(q64, k64, _reference, target64)
    assert fast[1].dtype == dtype
    for name, f, s, e in zip(["loss", "dq", "dk"], fast, same, exact):
        assert_close_to_reference(f, s, e, name)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_n_by_n_tensor_is_formed_forward_or_backward():
    n, block = 256, 32
    q, k = (torch.randn(1, 2, n, 8, requires_grad=True) for _ in range(2))
    tq, tk = torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
    with _LargestTensor() as seen:
        loss = chunked_attention_loss(q, k, TeacherAttention(query=tq, key=tk), block_size=block)
        loss.backward()
    assert 0 < seen.largest <= 2 * block * n  # [1, 2, 32, 32] blocks and the [1, 2, N, d] inputs / gradients
    with _LargestTensor() as dense:
        _reference(q, k, TeacherAttention(query=tq, key=tk)).backward()
    assert dense.largest >= 2 * n * n  # the reference does form them


def test_haste_chunked_backend_and_auto_choice(pixart):
    model, inputs = pixart
    targets = [TeacherAttention(query=torch.randn(2, 2, 16, 6), key=torch.randn(2, 2, 16, 6)) for _ in range(2)]

    def step(backend):
        model.zero_grad(set_to_none=True)
        with haste.capture_attention(model, [0, 2], targets, backend=backend) as procs:
            sample = model(**inputs).sample
        loss = torch.stack([p.loss for p in procs]).mean()
        (sample.square().mean() + loss).backward()
        return sample.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                if p.grad is not None}, [p.ran for p in procs]

    chunked, reference = step("chunked"), step("materialized")
    assert chunked[3] == ["chunked"] * 2 and reference[3] == ["materialized"] * 2
    torch.testing.assert_close(chunked[0], reference[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked[1], reference[1], rtol=1e-6, atol=1e-6)
    assert chunked[2].keys() == reference[2].keys() and len(chunked[2]) > 10
    for name in reference[2]:
        torch.testing.assert_close(chunked[2][name], reference[2][name], rtol=1e-4, atol=1e-6, msg=name)
    assert step("auto")[3] == [haste.resolve_attention_backend("auto", torch.zeros(1, 1, 16, 8))] * 2


def test_auto_picks_the_chunked_loss_on_cpu_for_long_sequences(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    long, short = torch.zeros(1, 1, haste.CHUNKED_MIN_TOKENS, 8), torch.zeros(1, 1, 64, 8)
    assert haste.resolve_attention_backend("auto", long) == "chunked"
    assert haste.resolve_attention_backend("auto", short) == "materialized"
    assert haste.resolve_attention_backend("auto", long, keep_logits=True) == "materialized"
    assert haste.resolve_attention_backend("materialized", long) == "materialized"
    q = torch.randn(1, 2, 12, 8)
    result = haste_chunked_backend(q, q, q, 0.3, None, torch.softmax(torch.randn(1, 2, 12, 12), -1), keep_logits=True)
    assert result.logits is not None  # keep_logits is served by the reference


def test_bad_inputs_are_refused():
    q = torch.randn(1, 2, 8, 4)
    target = TeacherAttention(query=torch.randn(1, 2, 8, 4), key=torch.randn(1, 2, 8, 4))
    with pytest.raises(ValueError, match="the teacher covers batch 1, 8 queries x 8 keys; the student has batch 1, 9"):
        chunked_attention_loss(torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4), target)
    with pytest.raises(ValueError, match="reduction must be one of"):
        chunked_attention_loss(q, q, target, reduction="sum")
    with pytest.raises(ValueError, match="block_size must be None or an int >= 1"):
        chunked_attention_loss(q, q, target, block_size=0)
    with pytest.raises(ValueError, match=r"key \(1, 2, 8, 3\) must share batch, heads, head_dim"):
        chunked_attention_loss(q, torch.randn(1, 2, 8, 3), target)
    with pytest.raises(TypeError, match="query must be a floating-point"):
        chunked_attention_loss(q.long(), q, target)
    with pytest.raises(ValueError, match="needs probs, or query and key"):
        TeacherAttention(query=q)
    with pytest.raises(ValueError, match="pool applies to queries and keys only"):
        TeacherAttention(probs=torch.rand(1, 2, 8, 8), pool=2)
