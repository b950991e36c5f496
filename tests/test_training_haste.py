"""HASTE: attention capture equals the materialised softmax(QK^T/sqrt d), the CE loss, pooling, termination."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastdiff.training import (
    REPA,
    StageWiseTermination,
    TeacherAlignment,
    TeacherOutput,
    attention_cross_entropy,
    capture_attention,
    register_attention_backend,
)
from fastdiff.training.haste import (
    TeacherCache,
    gradient_cosine,
    match_attention,
    materialized_attention,
    resolve_attention_backend,
)


@torch.no_grad()
def test_captured_logits_equal_materialised_attention_of_the_same_module(pixart):
    model, inputs = pixart
    attn = model.transformer_blocks[1].attn1
    seen = {}
    handle = attn.register_forward_pre_hook(lambda m, args, kwargs: seen.update(x=args[0]), with_kwargs=True)
    reference = model(**inputs).sample
    original = attn.processor
    with capture_attention(model, [1], keep_logits=True) as (proc,):
        captured = model(**inputs).sample
    handle.remove()
    x, heads = seen["x"], attn.heads
    q = attn.to_q(x).unflatten(-1, (heads, -1)).transpose(1, 2)
    k = attn.to_k(x).unflatten(-1, (heads, -1)).transpose(1, 2)
    expected = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    torch.testing.assert_close(proc.logits, expected)
    torch.testing.assert_close(proc.logits.softmax(-1).sum(-1), torch.ones(2, heads, 16))
    torch.testing.assert_close(captured, reference, rtol=1e-5, atol=1e-6)  # the model computes the same thing
    assert attn.processor is original  # restored


def test_materialised_attention_matches_sdpa_and_cross_entropy_matches_formula():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 10, 8).unbind(0)
    teacher = torch.randn(2, 3, 10, 10).softmax(-1)  # 3 teacher heads vs 4 student heads
    result = materialized_attention(q, k, v, 8**-0.5, target=teacher, keep_logits=True)
    torch.testing.assert_close(result.output, F.scaled_dot_product_attention(q, k, v))
    log_q = result.logits[:, :3].log_softmax(-1)
    torch.testing.assert_close(result.loss, -(teacher * log_q).sum(-1).mean())  # head to head, first 3
    assert attention_cross_entropy(torch.log(teacher), teacher) <= result.loss  # CE is minimised at the teacher


def test_attention_distillation_trains_towards_the_teacher(pixart):
    model, inputs = pixart
    target = torch.full((2, 2, 16, 16), 1 / 16)
    with capture_attention(model, [0, 2], [target, target]) as procs:
        model(**inputs)
    loss = torch.stack([p.loss for p in procs]).mean()
    loss.backward()
    assert model.transformer_blocks[0].attn1.to_q.weight.grad is not None
    assert loss.item() >= math.log(16) - 1e-5  # CE against the uniform distribution >= its entropy
    model.zero_grad(set_to_none=True)


def test_match_attention_pools_finer_teacher_grids_exactly():
    torch.manual_seed(0)
    teacher = torch.randn(1, 2, 64, 64).softmax(-1)  # 8x8 grid
    pooled = match_attention(teacher, 16)  # onto 4x4
    torch.testing.assert_close(pooled.sum(-1), torch.ones(1, 2, 16))
    grid = teacher.reshape(1, 2, 8, 8, 8, 8)
    # query cell (0, 0) = teacher queries (0..1, 0..1); key cell (1, 2) = teacher keys (2..3, 4..5)
    expected = grid[:, :, 0:2, 0:2, 2:4, 4:6].sum((-1, -2)).mean((-1, -2))
    torch.testing.assert_close(pooled[:, :, 0, 1 * 4 + 2], expected)
    assert match_attention(teacher, 64) is teacher
    with pytest.raises(ValueError, match="cannot be pooled"):
        match_attention(teacher, 36)  # 8x8 -> 6x6
    with pytest.raises(ValueError, match="square"):
        match_attention(torch.rand(1, 1, 65, 65), 16)


class CountingTeacher(torch.nn.Module):
    """A teacher with random-projection tokens and attention maps that counts its calls."""

    patch_size, embed_dim = 2, 6

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.proj = torch.nn.Linear(4, 6)

    def forward(self, images):
        self.calls += 1
        tokens = self.proj(F.unfold(images, 2, stride=2).transpose(1, 2))
        attn = (tokens @ tokens.transpose(1, 2)).softmax(-1)
        return TeacherOutput(tokens, [attn[:, None].expand(-1, 2, -1, -1)] * 4)


def test_termination_stops_running_the_teacher(pixart):
    model, inputs = pixart
    teacher = CountingTeacher()
    align = TeacherAlignment(teacher, REPA(16, 6, block_index=1, projector_dim=8), [(0, 2), (1, 3)],
                             termination=StageWiseTermination(stop_step=3))
    original = [b.attn1.processor for b in model.transformer_blocks]
    for step in range(6):
        if align.active(step):
            target = align.run_teacher(inputs["hidden_states"], 16)
            with align.capture(model, target):
                model(**inputs)
            losses = align.losses()
            assert set(losses) == {"repa", "attn", "align"}
        else:
            model(**inputs)
    assert teacher.calls == 3 and align.termination.terminated_at == 3
    assert [b.attn1.processor for b in model.transformer_blocks] == original
    assert not any(b._forward_hooks for b in model.transformer_blocks)
    with pytest.raises(ValueError, match="teacher block index must be in 0..3"):
        TeacherAlignment(teacher, None, [(0, 7)]).run_teacher(inputs["hidden_states"], 16)
    with pytest.raises(ValueError, match="block_index must be an int in 0..2"):
        TeacherAlignment(teacher, None, [(5, 0)]).check(model)


def test_teacher_cache_runs_the_teacher_once_per_sample():
    teacher = CountingTeacher()
    align = TeacherAlignment(teacher, REPA(16, 6, block_index=1, projector_dim=8), [(0, 2)])
    images = torch.randn(6, 1, 8, 8)
    cache = TeacherCache()

    def run(x):
        return align.run_teacher(x, 16)

    first, ran = cache([0, 1, 2], images[:3], run)
    again, ran_again = cache([2, 1, 5], images[[2, 1, 5]], run)
    direct = run(images[[2, 1, 5]])
    assert (ran, ran_again, teacher.calls, len(cache)) == (3, 1, 3, 4)  # 3rd call is `direct`
    torch.testing.assert_close(again.tokens, direct.tokens)
    torch.testing.assert_close(again.attentions[0], direct.attentions[0])


def test_gradient_angle_trigger_and_state_roundtrip():
    term = StageWiseTermination(grad_angle_deg=90, check_every=10, patience=2, ema=0.0)
    assert term.wants_gradient_angle(0) and not term.wants_gradient_angle(5)
    term.report_gradient_cosine(0, 0.5)
    term.report_gradient_cosine(10, -0.1)
    assert term.active(11)
    term.report_gradient_cosine(20, -0.2)
    assert term.terminated_at == 21 and not term.active(21)
    fresh = StageWiseTermination(grad_angle_deg=90)
    fresh.load_state_dict(term.state_dict())
    assert fresh.terminated_at == 21
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    assert gradient_cosine((w**2).sum(), -(w**2).sum(), [w]) == pytest.approx(-1.0)
    assert gradient_cosine(w[0] * 3, w[1], [w]) == pytest.approx(0.0)


def test_backend_seam():
    assert resolve_attention_backend("auto") in ("materialized", "fused")
    with pytest.raises(ValueError, match="attention backend must be one of"):
        resolve_attention_backend("flash9")
    calls = []

    def fake_fused(q, k, v, scale, attn_mask=None, target=None, keep_logits=False):
        calls.append(1)
        return materialized_attention(q, k, v, scale, attn_mask, target, keep_logits)

    from fastdiff.training import haste

    register_attention_backend("fused", fake_fused)
    try:
        assert resolve_attention_backend("auto") == "fused"
        q = torch.randn(1, 2, 4, 8)
        haste._BACKENDS["fused"](q, q, q, 0.35)
        assert calls
    finally:
        haste._BACKENDS.pop("fused")


# ------------------------------------------------------------------ teacher queries/keys instead of N x N maps
def _digits_vit(patch_size=2):
    from fastdiff.training.teachers.vit import DigitsViT

    torch.manual_seed(1)
    return DigitsViT(image_size=8, patch_size=patch_size, dim=16, depth=3, heads=2, num_classes=0).eval()


def test_teachers_hand_over_queries_and_keys_whose_softmax_is_their_attention():
    from transformers import Dinov2Config, Dinov2Model

    from fastdiff.kernels.targets import TeacherAttention, teacher_attention_output
    from fastdiff.training.teachers import HFViTTeacher

    images = torch.randn(3, 1, 8, 8)
    config = Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                          patch_size=2, image_size=8)
    dino = HFViTTeacher(Dinov2Model._from_config(config, attn_implementation="eager"), output_attentions=True)
    for teacher in (_digits_vit(), dino):
        with torch.no_grad():
            probs = teacher(images)
            with teacher_attention_output(teacher, "qk"):
                qk = teacher(images)
        assert teacher.attention_output == "probs"  # restored
        assert len(qk.attentions) == len(probs.attentions) > 1
        assert all(isinstance(a, TeacherAttention) and a.query.shape == (3, 2, 16, 8) for a in qk.attentions)
        torch.testing.assert_close(qk.tokens, probs.tokens, rtol=1e-5, atol=1e-5)
        for a, p in zip(qk.attentions, probs.attentions):
            torch.testing.assert_close(a.dense(), p, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot hand over queries and keys"):
        with teacher_attention_output(CountingTeacher(), "qk"):
            pass


def test_alignment_asks_teachers_for_queries_and_keys_and_caches_them():
    from fastdiff.kernels.targets import TeacherAttention

    teacher = _digits_vit()
    images = torch.randn(4, 1, 8, 8)
    qk = TeacherAlignment(teacher, None, [(0, 1), (1, 2)])
    probs = TeacherAlignment(teacher, None, [(0, 1), (1, 2)], teacher_attention="probs")
    assert (qk.teacher_attention, probs.teacher_attention) == ("qk", "probs")
    assert TeacherAlignment(CountingTeacher(), None, [(0, 1)]).teacher_attention == "probs"
    with pytest.raises(ValueError, match="teacher_attention='qk' needs a teacher"):
        TeacherAlignment(CountingTeacher(), None, [(0, 1)], teacher_attention="qk")
    with pytest.raises(ValueError, match="teacher_attention must be one of"):
        TeacherAlignment(teacher, None, [(0, 1)], teacher_attention="dense")
    a, p = qk.run_teacher(images, 16), probs.run_teacher(images, 16)
    assert all(isinstance(t, TeacherAttention) for t in a.attentions)
    for t, dense in zip(a.attentions, p.attentions):
        torch.testing.assert_close(t.dense(), dense, rtol=1e-5, atol=1e-6)
    cache = TeacherCache()
    cache([0, 1, 2], images[:3], lambda x: qk.run_teacher(x, 16))
    again, ran = cache([2, 0, 3], images[[2, 0, 3]], lambda x: qk.run_teacher(x, 16))
    direct = qk.run_teacher(images[[2, 0, 3]], 16)
    assert ran == 1
    for c, d in zip(again.attentions, direct.attentions):
        torch.testing.assert_close(c.query, d.query)
        torch.testing.assert_close(c.key, d.key)
    pooled = match_attention(TeacherAttention(query=torch.randn(1, 2, 64, 4), key=torch.randn(1, 2, 64, 4)), 16)
    assert pooled.pool == 2 and pooled.num_queries == 16
    torch.testing.assert_close(pooled.dense(), match_attention(pooled.pooled(1).__class__(
        query=pooled.query, key=pooled.key).dense(), 16))


def _train(pixart, teacher_attention, backend, steps=4, patch_size=2, token_matching="resize"):
    """A few HASTE steps (REPA + two attention pairs, Adam) from the same start; the losses per step."""
    import copy

    model = copy.deepcopy(pixart[0]).train()
    inputs = pixart[1]
    torch.manual_seed(0)
    align = TeacherAlignment(_digits_vit(patch_size), REPA(16, 16, block_index=1, projector_dim=8), [(0, 1), (1, 2)],
                             backend=backend, teacher_attention=teacher_attention, token_matching=token_matching)
    opt = torch.optim.Adam([*model.parameters(), *align.parameters()], lr=1e-2)
    clean = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    record = []
    for _ in range(steps):
        target = align.run_teacher(clean, 16)
        with align.capture(model, target):
            sample = model(**inputs).sample
        losses = align.losses()
        total = sample.square().mean() + losses["align"]
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        record.append([losses["repa"].item(), losses["attn"].item(), total.item()])
    return torch.tensor(record, dtype=torch.float64), model


@pytest.mark.parametrize("token_matching, patch_size", [("resize", 2), ("interpolate", 1)])
def test_haste_training_is_unchanged_by_the_teacher_qk_path_and_the_chunked_loss(pixart, token_matching, patch_size):
    """Step-by-step losses of the reference (teacher probabilities, materialised loss) and of the teacher's
    queries and keys with the materialised and the chunked loss; interpolate: a 2x finer teacher grid, pooled."""
    kw = dict(patch_size=patch_size, token_matching=token_matching)
    reference, ref_model = _train(pixart, "probs", "materialized", **kw)
    for teacher_attention, backend in [("qk", "materialized"), ("qk", "chunked"), ("probs", "chunked")]:
        got, model = _train(pixart, teacher_attention, backend, **kw)
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6, msg=f"{teacher_attention}/{backend}")
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            if name.endswith("to_k.bias"):  # softmax is blind to it: its gradient is rounding noise, which Adam
                continue                    # normalises to full-size steps (and which changes no output)
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    assert reference[-1, 1] < reference[0, 1]  # the attention loss does train
