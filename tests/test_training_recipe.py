"""The embedded model's recipe in the one training script: LR schedule, PixArt initialisation, its config."""

import math
from pathlib import Path

import pytest

from fastdiff.training.config import OptimConfig, load_config, validate
from fastdiff.training.modeling import build_model
from fastdiff.training.train import lr_factor

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "digits_embedded.yaml"


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    cfg = OptimConfig(max_steps=1100, warmup_steps=100, lr_schedule="cosine", min_lr_ratio=0.05)
    assert lr_factor(0, cfg) == pytest.approx(0.01)
    assert lr_factor(99, cfg) == pytest.approx(1.0)
    assert lr_factor(600, cfg) == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(1100, cfg) == pytest.approx(0.05)
    values = [lr_factor(s, cfg) for s in range(100, 1101)]
    assert values == sorted(values, reverse=True)


def test_constant_schedule_is_flat_after_warmup():
    cfg = OptimConfig(max_steps=50, warmup_steps=10)
    assert [lr_factor(s, cfg) for s in (9, 10, 49)] == [1.0, 1.0, 1.0]


def test_pixart_init_zeroes_the_outputs_and_checks_the_model():
    cfg = load_config(CONFIG, ["model.config.num_layers=1"])
    model = build_model(cfg)
    assert model.proj_out.weight.abs().max() == 0
    assert model.transformer_blocks[0].attn2.to_out[0].weight.abs().max() == 0
    default = build_model(load_config(CONFIG, ["model.config.num_layers=1", "model.init=default"]))
    assert default.proj_out.weight.abs().max() > 0
    bad = load_config(None, ["model.preset=null", "model.class_name=UNet2DModel", "model.init=pixart"])
    with pytest.raises(ValueError, match="model.init='pixart' needs a PixArtTransformer2DModel"):
        build_model(bad)


@pytest.mark.parametrize("override, message", [
    ("train.lr_schedule=linear", "train.lr_schedule must be one of"),
    ("train.min_lr_ratio=2", "train.min_lr_ratio must be in"),
    ("model.init=xavier", "model.init must be one of"),
])
def test_bad_recipe_values_fail_clearly(override, message):
    with pytest.raises(ValueError, match=message):
        validate(load_config(CONFIG, [override]))


def test_the_shipped_model_is_what_the_config_trains():
    """The embedded weights' architecture is the preset the config builds (patch 2, no v1 patch-4 seams)."""
    import json

    from fastdiff.models.digits import EMBEDDED_WEIGHTS_DIR

    shipped = json.loads((EMBEDDED_WEIGHTS_DIR / "transformer" / "config.json").read_text())
    built = build_model(load_config(CONFIG)).config
    for key in ("patch_size", "num_layers", "num_attention_heads", "attention_head_dim", "sample_size"):
        assert shipped[key] == built[key], key
    record = json.loads((EMBEDDED_WEIGHTS_DIR / "train_config.json").read_text())
    assert record["config"]["train"]["max_steps"] == load_config(CONFIG).train.max_steps
