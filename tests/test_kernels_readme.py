"""The README's attention-kernel snippets, as written there (CPU: "auto" runs SDPA; kernels interpreted)."""

import pytest
import torch

import fastdiff


def test_readme_attention_backend_snippet():
    pipe = fastdiff.load_embedded_pipeline("cpu")
    fastdiff.set_attention_backend(pipe, "auto")  # or "fastdiff-int8", "fastdiff-triton", "sdpa-flash", ...
    images = pipe(class_labels=[3, 7], num_inference_steps=2, output_type="pt").images
    report = fastdiff.attention_backend_report(pipe)  # which backend ran, how often, any fallbacks
    fastdiff.remove_attention_backend(pipe)
    assert images.shape == (2, 1, 16, 16)
    assert report["transformer"]["calls"] == {"sdpa": 2 * 2 * pipe.transformer.config.num_layers}


def test_readme_fused_distillation_snippet(monkeypatch):
    pytest.importorskip("triton", reason='the kernels need triton: pip install "fastdiff[triton]"')
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = (torch.randn(1, 2, 20, 32, requires_grad=True) for _ in range(3))
    tq, tk = torch.randn(1, 2, 20, 64), torch.randn(1, 2, 20, 64)

    from fastdiff.kernels import attention_distillation

    out, loss = attention_distillation(q, k, v, teacher_query=tq, teacher_key=tk)  # never forms N x N
    loss.backward()
    assert out.shape == q.shape and loss.ndim == 0 and q.grad is not None


def test_readme_chunked_distillation_snippet():
    q, k = (torch.randn(1, 2, 300, 32, requires_grad=True) for _ in range(2))
    tq, tk = torch.randn(1, 2, 300, 64), torch.randn(1, 2, 300, 64)

    from fastdiff.kernels import TeacherAttention, chunked_attention_loss

    teacher = TeacherAttention(query=tq, key=tk)  # what a teacher hands over instead of [B, H, N, N] maps
    loss = chunked_attention_loss(q, k, teacher, block_size=128)  # HASTE's CE by row/key blocks, any device
    loss.backward()
    logits = (q @ k.transpose(-2, -1)) * 32**-0.5
    reference = -(teacher.dense() * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    assert q.grad is not None
