"""The digits TarFlow trains with the project's one training script (configs/digits_tarflow.yaml)."""

from pathlib import Path

import pytest
import torch

from fastdiff.flows import TarFlow, digits, invert, load_digits_tarflow, metric_images, sample
from fastdiff.training import load_config
from fastdiff.training.train import train

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits_tarflow.yaml"


TINY = ["--no_resume", "train.max_steps=6", "train.batch_size=8", "train.warmup_steps=1", "model.config.width=16",
        "model.config.head_dim=8", "model.config.num_blocks=2", "log.every=1", "log.progress_bar=false",
        "checkpoint.every=0"]


@pytest.mark.parametrize("size, patch", [(8, 1), (16, 2)])  # the shipped 8x8 flow, and 16x16 in 2x2 patches
def test_training_script_trains_and_exports_a_tarflow(tmp_path, size, patch):
    cfg = load_config(CONFIG, [f"output_dir={tmp_path}", *TINY, f"data.resolution={size}",
                               f"model.config.sample_size={size}", f"model.config.patch_size={patch}"])
    summary = train(cfg)
    losses = list(summary["losses"].values())
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # maximum likelihood makes progress from the identity initialisation
    model = TarFlow.from_pretrained(tmp_path / "model").eval()
    assert model.config.width == 16 and model.config.sample_size == size
    assert (model.num_tokens, model.token_dim) == (64, patch**2)  # 64 tokens either way
    x = torch.rand(2, 1, size, size) * 2 - 1
    z, _ = model(x, torch.tensor([1, 2]))
    back, _ = invert(model, z, torch.tensor([1, 2]))
    torch.testing.assert_close(model.unpatchify(back), x, rtol=0, atol=1e-4)


def test_a_16x16_patch_2_flow_exports_loads_and_samples(tmp_path, monkeypatch):
    cfg = load_config(CONFIG, [f"output_dir={tmp_path / 'run'}", *TINY, "train.max_steps=2", "data.resolution=16",
                               "model.config.sample_size=16", "model.config.patch_size=2"])
    train(cfg)
    monkeypatch.setattr(digits, "CALIBRATION_IMAGES", 16)  # the shipped export calibrates on 1000
    out = digits.export(tmp_path / "run" / "model", tmp_path / "exported", guidance=0.5)
    model, settings = load_digits_tarflow(out)
    assert model.config.patch_size == 2 and settings.calibration.num_images == 16
    labels = torch.tensor([3, 7])
    images, stats = sample(model, labels, generator=torch.Generator().manual_seed(0), **settings.invert_kwargs())
    assert images.shape == (2, 1, 16, 16) and stats.num_tokens == 64
    assert metric_images(images).shape == (2, 1, 16, 16)  # FD-digits' size already: no upsampling


def test_data_resolution_must_match_the_flow(tmp_path):
    cfg = load_config(CONFIG, [f"output_dir={tmp_path}", *TINY, "data.resolution=16"])  # the flow is 8x8
    with pytest.raises(ValueError, match=r"images must be \[B, 1, 8, 8\].*data.resolution"):
        train(cfg)
