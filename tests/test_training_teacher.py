"""The self-supervised digits teacher (MAE), its probe, and the shipped weights."""

import json
import math

import pytest
import torch

from fastdiff.training.modeling import load_teacher, shipped_teachers, teacher_depth
from fastdiff.training.teachers.mae import MAEDecoder, mae_loss, patchify, random_masking, train_mae_teacher
from fastdiff.training.teachers.probe import attention_entropy, class_mean_cosine, class_r2, probe_teacher
from fastdiff.training.teachers.vit import DigitsViT


def test_random_masking_keeps_a_random_subset_and_restores_the_order():
    x = torch.arange(2 * 16 * 3, dtype=torch.float32).view(2, 16, 3)
    visible, mask, ids_restore = random_masking(x, 0.75, torch.Generator().manual_seed(0))
    assert visible.shape == (2, 4, 3) and mask.shape == (2, 16) and (mask.sum(1) == 12).all()
    for b in range(2):  # the visible tokens are exactly the unmasked positions
        kept = {tuple(t.tolist()) for t in visible[b]}
        assert kept == {tuple(x[b, n].tolist()) for n in range(16) if mask[b, n] == 0}
    # appending placeholders and gathering with ids_restore puts every visible token back at its position
    full = torch.cat([visible, torch.full((2, 12, 3), -1.0)], 1)
    restored = torch.gather(full, 1, ids_restore[..., None].expand(-1, -1, 3))
    torch.testing.assert_close(restored[mask == 0], x[mask == 0])
    assert (restored[mask == 1] == -1).all()


def test_patchify_matches_the_encoder_patch_grid():
    images = torch.arange(16 * 16, dtype=torch.float32).view(1, 1, 16, 16)
    patches = patchify(images, 4)
    assert patches.shape == (1, 16, 16)
    torch.testing.assert_close(patches[0, 6], images[0, 0, 4:8, 8:12].flatten())  # row 1, column 2


def test_mae_loss_counts_masked_patches_only(monkeypatch):
    torch.manual_seed(0)
    encoder = DigitsViT(patch_size=4, dim=16, depth=1, heads=2, num_classes=0)
    decoder = MAEDecoder(16, 16, 16, dim=8, depth=1, heads=2)
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    seen = {}

    def exact_on_masked(latent, ids_restore):  # a decoder that is right on masked patches, wrong elsewhere
        target = patchify(images, 4)
        mask = seen["mask"]
        return torch.where(mask[..., None] == 1, target, target + 100.0)

    real_masking = random_masking

    def recording(x, ratio, gen=None):
        out = real_masking(x, ratio, gen)
        seen["mask"] = out[1]
        return out

    monkeypatch.setattr("fastdiff.training.teachers.mae.random_masking", recording)
    monkeypatch.setattr(decoder, "forward", exact_on_masked)
    assert mae_loss(encoder, decoder, images, 0.75).item() == 0.0


def test_norm_pix_loss_targets_each_patch_normalised_by_its_own_statistics(monkeypatch):
    torch.manual_seed(0)
    encoder = DigitsViT(patch_size=4, dim=16, depth=1, heads=2, num_classes=0)
    decoder = MAEDecoder(16, 16, 16, dim=8, depth=1, heads=2)
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    blocks = images.unfold(2, 4, 4).unfold(3, 4, 4).reshape(2, 16, 16)  # [B, 4x4 patches, 16 pixels], row-major
    mean, std = blocks.mean(-1, keepdim=True), blocks.std(-1, keepdim=True)  # MAE: unbiased variance, eps 1e-6
    normalised = (blocks - mean) / (std ** 2 + 1e-6) ** 0.5
    monkeypatch.setattr(decoder, "forward", lambda latent, ids_restore: normalised)
    assert mae_loss(encoder, decoder, images, 0.5, norm_pix_loss=True).item() == pytest.approx(0.0, abs=1e-10)
    assert mae_loss(encoder, decoder, images, 0.5).item() > 0.1  # the raw-pixel target differs


def test_probe_measures_label_embeddings_and_sharpness():
    labels = torch.arange(200) % 10
    embedding = torch.randn(10, 16, 8)[labels]  # tokens = a function of the label
    assert class_r2(embedding, labels) == pytest.approx(1.0)
    assert class_mean_cosine(embedding, labels) == pytest.approx(1.0)
    noise = torch.randn(2000, 16, 8)
    assert abs(class_r2(noise, torch.arange(2000) % 10)) < 0.02
    uniform = torch.full((2, 3, 16, 16), 1 / 16)
    one_hot = torch.eye(16).expand(2, 3, 16, 16)
    assert attention_entropy([uniform, one_hot]) == pytest.approx([math.log(16), 0.0], abs=1e-6)


def test_mae_training_runs_and_records_its_probe():
    net, record = train_mae_teacher(steps=2, batch_size=8, warmup_steps=1, log=None, dim=16, depth=2, heads=2,
                                    decoder={"dim": 8, "depth": 1, "heads": 2})
    assert isinstance(net, DigitsViT) and net.head is None and not any(p.requires_grad for p in net.parameters())
    assert record["architecture"]["num_classes"] == 0 and record["architecture"]["patch_size"] == 4
    assert "MAE" in record["recipe"]["objective"] and record["probe"]["num_tokens"] == 16
    with pytest.raises(ValueError, match="no classification head"):
        net.classify(torch.zeros(1, 1, 16, 16))


def test_shipped_mae_teacher_is_self_supervised_small_and_on_the_student_grid():
    path = shipped_teachers()["digits_mae"]
    weights = path / "model.safetensors"
    assert weights.stat().st_size <= 10 * 2**20
    record = json.loads((path / "config.json").read_text())
    assert record["architecture"]["num_classes"] == 0 and "MAE" in record["recipe"]["objective"]
    teacher = load_teacher("digits_mae")
    out = teacher(torch.zeros(2, 1, 16, 16))
    assert out.tokens.shape[1] == 16 == (16 // 4) ** 2  # the 4x4 grid of a patch-4 student on 16x16
    assert teacher_depth("digits_mae") == len(out.attentions) == 6
    probe = probe_teacher(teacher)  # the stored probe is what the shipped weights give
    for key in ("class_r2", "attention_entropy_mean", "uniform_entropy"):
        assert probe[key] == pytest.approx(record["probe"][key], abs=2e-3)
    assert probe["attention_entropy_mean"] < 0.75 * probe["uniform_entropy"]  # sharp, unlike the classifier's
    old = json.loads((shipped_teachers()["digits_vit"] / "config.json").read_text())
    assert probe["class_r2"] < probe_teacher(load_teacher("digits_vit"))["class_r2"] - 0.2 and "classification" in \
        old["recipe"]["objective"]


def test_the_documented_teacher_command_writes_a_loadable_teacher(tmp_path, capsys):
    from fastdiff.training.teachers.mae import main

    main(["--out", str(tmp_path / "t"), "--steps", "2"])  # README: python -m fastdiff.training.teachers.mae --out DIR
    assert "class R^2 of tokens" in capsys.readouterr().out
    teacher = load_teacher(str(tmp_path / "t"))
    assert teacher.patch_size == 4 and len(teacher.blocks) == 6


def test_teacher_command_options_reach_the_recipe_and_the_probe_curve(tmp_path, capsys):
    from fastdiff.training.teachers.mae import main

    main(["--out", str(tmp_path / "t"), "--steps", "2", "--norm-pix-loss", "--mask-ratio", "0.5", "--depth", "2",
          "--probe-every", "1"])
    record = json.loads((tmp_path / "t" / "config.json").read_text())
    assert record["recipe"]["norm_pix_loss"] is True and record["recipe"]["mask_ratio"] == 0.5
    assert record["architecture"]["depth"] == 2 and len(load_teacher(str(tmp_path / "t")).blocks) == 2
    assert record["recipe"]["command"].endswith("--steps 2 --mask-ratio 0.5 --norm-pix-loss --depth 2")
    assert [("class_r2" in p, "attention_entropy" in p) for p in record["curve"]] == [(True, True)] * 2
    assert record["curve"][-1]["class_r2"] == record["probe"]["class_r2"]


def test_truncated_teacher_is_the_full_encoder_stopped_after_k_blocks():
    from fastdiff.training.teachers.vit import truncate_teacher

    torch.manual_seed(0)
    full = DigitsViT(patch_size=4, dim=16, depth=3, heads=2, num_classes=10).eval()
    cut = truncate_teacher(full, 2)
    assert len(cut.blocks) == 2 and cut.head is None and not any(p.requires_grad for p in cut.parameters())
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    with torch.no_grad():  # reference: the full encoder's own blocks, run by hand
        x = full.patch_embed(images)
        for block in full.blocks[:2]:
            x, attn = block(x)
        out = cut(images)
    torch.testing.assert_close(out.tokens, full.norm(x))
    torch.testing.assert_close(out.attentions[-1], attn)
    for bad in (0, 4, 1.5, True):
        with pytest.raises(ValueError, match="blocks must be an int in 1..3"):
            truncate_teacher(full, bad)


def test_probe_blocks_is_the_probe_of_each_truncation():
    from fastdiff.training.teachers.probe import probe_blocks
    from fastdiff.training.teachers.vit import truncate_teacher

    torch.manual_seed(0)
    full = DigitsViT(patch_size=4, dim=16, depth=2, heads=2, num_classes=0).eval()
    assert probe_blocks(full) == [pytest.approx(probe_teacher(truncate_teacher(full, k))["class_r2"], abs=1e-4)
                                  for k in (1, 2)]


def test_keep_blocks_option_ships_the_first_blocks_and_records_both_probes(tmp_path, capsys):
    from fastdiff.training.teachers.mae import main

    main(["--out", str(tmp_path / "t"), "--steps", "2", "--depth", "3", "--keep-blocks", "2"])
    record = json.loads((tmp_path / "t" / "config.json").read_text())
    teacher = load_teacher(str(tmp_path / "t"))
    assert len(teacher.blocks) == 2 == record["architecture"]["depth"] == teacher_depth(str(tmp_path / "t"))
    assert record["recipe"]["command"].endswith("--depth 3 --keep-blocks 2")
    assert record["trained_encoder"]["depth"] == 3 and len(record["trained_encoder"]["class_r2_per_block"]) == 3
    assert record["probe"]["class_r2"] == pytest.approx(record["trained_encoder"]["class_r2_per_block"][1], abs=1e-4)
    assert record["probe"]["class_r2"] == pytest.approx(probe_teacher(teacher)["class_r2"], abs=1e-4)
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "u"), "--steps", "2", "--depth", "3", "--keep-blocks", "4"])
    assert "--keep-blocks must be in 1..3" in capsys.readouterr().err
