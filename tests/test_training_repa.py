"""REPA: the block hook reads the right hidden state, loss = -cos, token matching and its errors."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

from fastdiff.training import REPA, BlockOutputHook, TeacherOutput, negative_cosine, run_teacher
from fastdiff.training.repa import get_block, match_tokens, token_grid


def manual_block_outputs(model: PixArtTransformer2DModel, inputs: dict) -> list[torch.Tensor]:
    """PixArt's forward up to and through each block, written out by hand."""
    x = model.pos_embed(inputs["hidden_states"])
    timestep, _ = model.adaln_single(inputs["timestep"], None, batch_size=x.shape[0], hidden_dtype=x.dtype)
    context = model.caption_projection(inputs["encoder_hidden_states"]).view(x.shape[0], -1, x.shape[-1])
    outputs = []
    for block in model.transformer_blocks:
        x = block(x, encoder_hidden_states=context, timestep=timestep)
        outputs.append(x)
    return outputs


@torch.no_grad()
def test_hook_reads_the_chosen_block(pixart):
    model, inputs = pixart
    expected = manual_block_outputs(model, inputs)
    for index in range(3):
        with BlockOutputHook(model, index) as hook:
            model(**inputs)
            torch.testing.assert_close(hook.output, expected[index])
    assert not any(block._forward_hooks for block in model.transformer_blocks)  # removed


def test_repa_loss_is_negative_cosine_and_trains_the_projector(pixart):
    model, inputs = pixart
    torch.manual_seed(1)
    repa = REPA(hidden_dim=16, teacher_dim=12, block_index=1, projector_dim=32)
    target = torch.randn(2, 16, 12)
    with repa.capture(model):
        model(**inputs)
    loss = repa.loss(target)
    with torch.no_grad():
        hidden = manual_block_outputs(model, inputs)[1]
        expected = -F.cosine_similarity(repa.projector(hidden), target, dim=-1).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None for p in repa.projector.parameters())
    assert negative_cosine(target, target).item() == pytest.approx(-1.0)
    assert negative_cosine(target, -target).item() == pytest.approx(1.0)


def test_block_index_out_of_range(pixart):
    model, _ = pixart
    for bad in (3, -1, 1.0):
        with pytest.raises(ValueError, match=r"block_index must be an int in 0\.\.2 .*3 blocks"):
            BlockOutputHook(model, bad)
    with pytest.raises(TypeError, match="no block list"):
        get_block(torch.nn.Linear(2, 2), 0)


def test_token_matching_interpolates_and_rejects_non_square():
    teacher = torch.randn(2, 64, 5)  # 8x8 grid
    same = match_tokens(teacher, 64)
    assert same is teacher
    down = match_tokens(teacher, 16)
    grid = teacher.transpose(1, 2).reshape(2, 5, 8, 8)
    torch.testing.assert_close(down, F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2))  # exact 2x: cell mean
    assert match_tokens(teacher, 256).shape == (2, 256, 5)
    with pytest.raises(ValueError, match="do not form a square"):
        match_tokens(torch.randn(2, 65, 5), 64)  # e.g. a CLS token left in
    with pytest.raises(ValueError, match="student: 48 tokens"):
        match_tokens(teacher, 48)
    assert token_grid(64) == 8


class PatchTeacher(torch.nn.Module):
    """Patchify with ``patch_size`` and return the raw patches as tokens."""

    patch_size = 2

    def forward(self, images):
        return F.unfold(images, self.patch_size, stride=self.patch_size).transpose(1, 2)


def test_run_teacher_resizes_to_the_student_grid():
    images = torch.randn(2, 1, 16, 16)
    out = run_teacher(PatchTeacher(), images, student_tokens=16)  # student 4x4 -> teacher input 8x8
    assert out.tokens.shape == (2, 16, 4)
    interp = run_teacher(PatchTeacher(), images, student_tokens=16, token_matching="interpolate")
    assert interp.tokens.shape == (2, 16, 4)  # 64 teacher tokens pooled onto 16
    with pytest.raises(ValueError, match="token_matching"):
        run_teacher(PatchTeacher(), images, 16, token_matching="crop")
    with pytest.raises(TypeError, match="teacher must return"):
        run_teacher(lambda x: x, images, 16)


@torch.no_grad()
def test_hook_on_dit_and_sd3_image_stream():
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    with BlockOutputHook(dit, 1) as hook:
        dit(torch.randn(2, 1, 8, 8), timestep=torch.tensor([1, 2]), class_labels=torch.tensor([0, 3]))
    assert hook.output.shape == (2, 16, 16)
    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=8, out_channels=4).eval()
    with BlockOutputHook(sd3, 0) as hook:
        sd3(torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 5, 16), pooled_projections=torch.randn(2, 8),
            timestep=torch.tensor([1, 2]))
    assert hook.output.shape == (2, 16, 16)  # the image tokens, not the 5 context tokens


@torch.no_grad()
def test_hf_dinov2_wrapper_drops_prefix_tokens_and_renormalises():
    from transformers import Dinov2Config, Dinov2Model

    from fastdiff.training.teachers import HFViTTeacher

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                          patch_size=2, image_size=8)
    config._attn_implementation = "eager"
    teacher = HFViTTeacher(Dinov2Model(config), output_attentions=True)
    out = run_teacher(teacher, torch.rand(2, 1, 12, 12) * 2 - 1, student_tokens=16)  # resized to 8x8
    assert isinstance(out, TeacherOutput)
    assert out.tokens.shape == (2, 16, 16) and len(out.attentions) == 2
    assert out.attentions[0].shape == (2, 2, 16, 16)
    torch.testing.assert_close(out.attentions[1].sum(-1), torch.ones(2, 2, 16))


@torch.no_grad()
def test_dinov2_loads_with_sdpa_unless_it_returns_attention_maps(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    from fastdiff.kernels.targets import teacher_attention_output
    from fastdiff.training.modeling import load_teacher
    from fastdiff.training.teachers import load_dinov2_teacher

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                          patch_size=2, image_size=8)
    Dinov2Model(config).save_pretrained(tmp_path)
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    maps = load_dinov2_teacher(str(tmp_path), output_attentions=True)
    assert maps.model.config._attn_implementation == "eager"
    reference = maps(images)
    for fast in (load_dinov2_teacher(str(tmp_path)), load_teacher(f"dinov2:{tmp_path}")):
        assert fast.model.config._attn_implementation == "sdpa"
        out = fast(images)
        assert out.attentions == []
        torch.testing.assert_close(out.tokens, reference.tokens)
        with teacher_attention_output(fast, "qk"):  # HASTE's target from the projections, equal to the maps
            qk = fast(images)
        for got, want in zip(qk.attentions, reference.attentions, strict=True):
            torch.testing.assert_close(got.dense(), want)
    assert load_dinov2_teacher(str(tmp_path), attn_implementation="eager").model.config._attn_implementation == "eager"


def test_shipped_digits_teacher_loads_and_classifies():
    from fastdiff.data import load_digits
    from fastdiff.training.teachers import load_digits_teacher

    teacher = load_digits_teacher()
    images, labels = load_digits("test")
    with torch.no_grad():
        accuracy = (teacher.classify(images).argmax(1) == labels).float().mean().item()
        out = teacher(images[:4])
    assert accuracy > 0.9
    assert out.tokens.shape == (4, 64, teacher.embed_dim) and len(out.attentions) == len(teacher.blocks)
