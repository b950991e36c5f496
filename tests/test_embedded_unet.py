"""The embedded class-conditional UNet: config budget, DigitsUNetPipeline contract, shipped weights, training
export, and the tools that take the digits pipeline (compare, metrics, parallel_sample, TGATE)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDIMScheduler, UNet2DConditionModel

from fastdiff.models import (
    DigitsPipeline,
    DigitsUNetPipeline,
    build_digits_unet_pipeline,
    load_embedded_unet_pipeline,
)
from fastdiff.models.digits import (
    DIGITS_CLASS_EMBEDDER_CONFIG,
    DIGITS_SCHEDULER_CONFIG,
    DIGITS_UNET_CONFIG,
    EMBEDDED_UNET_WEIGHTS_DIR,
    digits_pipeline_for,
)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits_unet.yaml"


@pytest.fixture(scope="module")
def random_pipe() -> DigitsUNetPipeline:
    pipe = build_digits_unet_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def shipped() -> DigitsUNetPipeline:
    pipe = load_embedded_unet_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, labels=(3, 7), seed=0, steps=3, **kwargs) -> torch.Tensor:
    kwargs = {"num_inference_steps": steps, "output_type": "pt", **kwargs}
    return pipe(list(labels), generator=torch.Generator().manual_seed(seed), **kwargs).images


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def test_config_is_sd_like_and_within_the_size_budget(random_pipe, tmp_path):
    unet = random_pipe.unet
    assert isinstance(unet, UNet2DConditionModel)
    cfg = unet.config
    assert "CrossAttnDownBlock2D" in cfg.down_block_types and cfg.down_block_types[-1] == "DownBlock2D"
    assert cfg.up_block_types[0] == "UpBlock2D" and cfg.up_block_types[-1] == "CrossAttnUpBlock2D"
    assert cfg.mid_block_type == "UNetMidBlock2DCrossAttn" and len(cfg.block_out_channels) == 3
    assert cfg.cross_attention_dim == random_pipe.class_embedder.config.embed_dim == DIGITS_CLASS_EMBEDDER_CONFIG["embed_dim"]
    params = sum(p.numel() for p in unet.parameters())
    assert 1_000_000 <= params <= 2_000_000
    random_pipe.save_pretrained(tmp_path)
    size = sum(p.stat().st_size for p in tmp_path.rglob("*.safetensors"))
    assert size <= 10 * 2**20
    # the training config is the model's one source of truth
    config = yaml.safe_load(CONFIG.read_text())
    assert config["model"]["class_name"] == "UNet2DConditionModel"
    assert config["model"]["conditioning"] == "class_tokens"
    assert config["model"]["config"] == {k: _plain(v) for k, v in DIGITS_UNET_CONFIG.items()}
    assert config["scheduler"]["config"] == DIGITS_SCHEDULER_CONFIG
    with pytest.raises(TypeError, match="unet_config"):
        build_digits_unet_pipeline(unet_config=[("layers_per_block", 2)])


def test_pipeline_is_a_digits_pipeline_with_a_unet(random_pipe):
    assert isinstance(random_pipe, DigitsPipeline) and random_pipe.denoiser is random_pipe.unet
    assert set(random_pipe.components) == {"unet", "class_embedder", "scheduler"}
    assert isinstance(random_pipe.scheduler, DDIMScheduler)
    assert type(digits_pipeline_for(random_pipe.unet, random_pipe.class_embedder, random_pipe.scheduler)) is DigitsUNetPipeline


def test_pipeline_determinism_and_guidance(random_pipe):
    a, b = sample(random_pipe, seed=1), sample(random_pipe, seed=1)
    assert a.shape == (2, 1, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, sample(random_pipe, seed=2))
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, random_pipe([3, 7], num_inference_steps=3, latents=noise, output_type="pt").images)
    assert torch.equal(build_digits_unet_pipeline(seed=0).unet.conv_in.weight, random_pipe.unet.conv_in.weight)
    # CFG batch [uncond; cond] through the unet = the guided combination of two separate calls
    latents, t = torch.randn(2, 1, 16, 16), torch.tensor(500)
    ehs = random_pipe.encode_class_labels([3, 7])
    guided = random_pipe.predict_noise(latents, t, ehs, guidance_scale=2.5)
    uncond = random_pipe.predict_noise(latents, t, ehs[:2], guidance_scale=1.0)
    cond = random_pipe.predict_noise(latents, t, ehs[2:], guidance_scale=1.0)
    torch.testing.assert_close(guided, uncond + 2.5 * (cond - uncond), rtol=1e-4, atol=1e-5)


def test_shipped_weights_load_offline_and_sample_recognisable_digits(shipped, monkeypatch):
    from fastdiff.metrics import class_accuracy

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = [p for p in EMBEDDED_UNET_WEIGHTS_DIR.rglob("*.safetensors")]
    assert {p.parent.name for p in weights} == {"unet", "class_embedder"}
    assert sum(p.stat().st_size for p in weights) <= 10 * 2**20
    assert isinstance(shipped, DigitsUNetPipeline)
    assert {k: _plain(v) for k, v in DIGITS_UNET_CONFIG.items()} == {k: _plain(shipped.unet.config[k]) for k in DIGITS_UNET_CONFIG}
    labels = list(range(10)) * 2
    images = sample(shipped, labels, steps=20)
    accuracy = class_accuracy(images, torch.tensor(labels), value_range=(0, 1))
    assert accuracy >= 0.85, accuracy
    assert load_embedded_unet_pipeline() is not load_embedded_unet_pipeline()  # fresh on every call
    with pytest.raises(ValueError, match="dtype"):
        load_embedded_unet_pipeline(dtype=torch.int8)


def test_compare_model_digits_unet_tiny(tmp_path):
    from fastdiff.cli import main
    from fastdiff.compare import load_pipeline, run_compare

    assert isinstance(load_pipeline("digits-unet"), DigitsUNetPipeline)
    result, images = run_compare(["ddim"], [2], model="digits-unet", num_images=4, reference=("ddim", 3),
                                 progress=False)
    cell = result.cells[0]
    assert result.settings["model"] == "digits-unet" and cell.nfe == 2 and cell.accuracy is not None
    assert images[("ddim", 2)].shape == (4, 1, 16, 16)
    assert main(["compare", "--model", "digits-unet", "--samplers", "ddim", "--steps", "2", "--num-images", "2",
                 "--reference-steps", "2", "--no-progress", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "compare.json").is_file()


def test_parallel_sample_and_tgate_accept_the_unet_pipeline(random_pipe):
    import fastdiff
    from fastdiff.metrics import evaluate_samples

    reference = sample(random_pipe, steps=4, guidance_scale=2.0)
    out = fastdiff.parallel_sample(random_pipe, [3, 7], num_inference_steps=4, guidance_scale=2.0, tolerance=0,
                                   generator=torch.Generator().manual_seed(0), output_type="pt")
    torch.testing.assert_close(out.images, reference, rtol=0, atol=1e-5)
    fastdiff.enable_tgate(random_pipe, gate_step=2)
    gated = sample(random_pipe, steps=4, guidance_scale=2.0)
    fastdiff.disable_tgate(random_pipe)
    assert not torch.equal(gated, reference)
    assert torch.equal(sample(random_pipe, steps=4, guidance_scale=2.0), reference)
    metrics = evaluate_samples(reference, [3, 7], value_range=(0, 1), metric="digits")
    assert metrics.fd > 0 and metrics.accuracy is not None


def test_training_exports_a_unet_pipeline(tmp_path):
    from fastdiff.training import load_config
    from fastdiff.training.modeling import build_model
    from fastdiff.training.train import train

    cfg = load_config(CONFIG, [f"output_dir={tmp_path}", "--max_steps", "2", "train.batch_size=8",
                               "train.warmup_steps=1", "eval.every=2", "eval.num_samples=10", "eval.inference_steps=2",
                               "checkpoint.every=0", "log.progress_bar=false"])
    summary = train(cfg)
    assert summary["final_step"] == 2 and summary["evals"][-1]["step"] == 2  # evaluation samples the UNet
    pipe = DigitsUNetPipeline.from_pretrained(tmp_path / "pipeline")
    assert set(pipe.components) == {"unet", "class_embedder", "scheduler"}
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.beta_end == DIGITS_SCHEDULER_CONFIG["beta_end"]
    initial = build_model(cfg).state_dict()
    trained = pipe.unet.state_dict()
    assert initial.keys() == trained.keys()
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)  # the trained (EMA) weights were saved
    pipe.set_progress_bar_config(disable=True)
    assert sample(pipe, steps=2).shape == (2, 1, 16, 16)
