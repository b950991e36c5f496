"""The digits TarFlow trains with the project's one training script (configs/digits_tarflow.yaml)."""

from pathlib import Path

import torch

from fastdiff.flows import TarFlow, invert
from fastdiff.training import load_config
from fastdiff.training.train import train

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits_tarflow.yaml"


def test_training_script_trains_and_exports_a_tarflow(tmp_path):
    cfg = load_config(CONFIG, [f"output_dir={tmp_path}", "--no_resume", "train.max_steps=6", "train.batch_size=8",
                               "train.warmup_steps=1", "model.config.width=16", "model.config.head_dim=8",
                               "model.config.num_blocks=2", "log.every=1", "log.progress_bar=false",
                               "checkpoint.every=0"])
    summary = train(cfg)
    losses = list(summary["losses"].values())
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # maximum likelihood makes progress from the identity initialisation
    model = TarFlow.from_pretrained(tmp_path / "model").eval()
    assert model.config.width == 16 and model.config.sample_size == 8
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    z, _ = model(x, torch.tensor([1, 2]))
    back, _ = invert(model, z, torch.tensor([1, 2]))
    torch.testing.assert_close(model.unpatchify(back), x, rtol=0, atol=1e-4)
