"""The embedded digits model: shipped weights, DigitsPipeline contract, CFG, scheduler swaps, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image

from fastdiff.models import ClassEmbedder, DigitsPipeline, build_digits_pipeline, load_embedded_pipeline
from fastdiff.models.digits import DIGITS_TRANSFORMER_CONFIG, EMBEDDED_WEIGHTS_DIR, NULL_CLASS

STEPS = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny batches: one thread is as fast as two on an idle CPU and ~50x faster on a busy shared one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def pipe() -> DigitsPipeline:
    pipe = load_embedded_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe: DigitsPipeline, labels=(3, 7), seed: int = 0, **kwargs) -> torch.Tensor:
    kwargs = {"num_inference_steps": STEPS, "output_type": "pt", **kwargs}
    labels = labels if isinstance(labels, torch.Tensor) else list(labels)
    return pipe(labels, generator=torch.Generator().manual_seed(seed), **kwargs).images


def batch_sizes(module: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    sizes: list[int] = []
    handle = module.register_forward_hook(lambda mod, args, kwargs, out: sizes.append(args[0].shape[0]), with_kwargs=True)
    return sizes, handle


def test_shipped_weights_are_small_safetensors_and_load_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = [p for p in EMBEDDED_WEIGHTS_DIR.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} == {"transformer", "class_embedder"}
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert sum(p.stat().st_size for p in weights) <= 10 * 2**20
    pipe = load_embedded_pipeline()
    assert isinstance(pipe.class_embedder, ClassEmbedder) and isinstance(pipe.scheduler, DDIMScheduler)
    assert {k: pipe.transformer.config[k] for k in DIGITS_TRANSFORMER_CONFIG} == DIGITS_TRANSFORMER_CONFIG


def test_seed_determinism(pipe):
    a, b, c = sample(pipe, seed=0), sample(pipe, seed=0), sample(pipe, seed=1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_explicit_latents_match_generator(pipe):
    latents = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(pipe, seed=0), pipe([3, 7], num_inference_steps=STEPS, latents=latents, output_type="pt").images)


def test_output_types(pipe):
    pt = sample(pipe, num_images_per_prompt=2)
    assert pt.shape == (4, 1, 16, 16) and pt.dtype == torch.float32 and 0 <= pt.min() and pt.max() <= 1
    npy = sample(pipe, output_type="np")
    assert isinstance(npy, np.ndarray) and npy.shape == (2, 16, 16, 1) and 0 <= npy.min() and npy.max() <= 1
    pil = sample(pipe, output_type="pil")
    assert len(pil) == 2 and all(isinstance(im, Image.Image) and im.size == (16, 16) for im in pil)
    out = pipe(5, num_inference_steps=1, output_type="pt", return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (1, 1, 16, 16)
    assert sample(pipe, labels=torch.tensor([1, 2, 3])).shape == (3, 1, 16, 16)


def test_classifier_free_guidance_batches(pipe):
    sizes, handle = batch_sizes(pipe.transformer)
    try:
        plain = sample(pipe, guidance_scale=1.0)
        assert sizes == [2] * STEPS  # no unconditional half
        sizes.clear()
        guided = sample(pipe, guidance_scale=3.0)
        assert sizes == [4] * STEPS  # [uncond; cond]
    finally:
        handle.remove()
    assert not torch.allclose(plain, guided)


def test_encode_and_predict_noise(pipe):
    ctx = pipe.encode_class_labels([3, 7], num_images_per_prompt=2, do_classifier_free_guidance=True)
    assert ctx.shape == (8, 4, 64)
    null = pipe.class_embedder(torch.tensor([NULL_CLASS]))
    assert torch.equal(ctx[:4], null.expand(4, -1, -1)) and torch.equal(ctx[4:6], ctx[4:5].expand(2, -1, -1))
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900, 600, 300, 10])
    batched = pipe.predict_noise(x, t, ctx, guidance_scale=2.0)  # one timestep per sample
    for i in range(4):
        single = pipe.predict_noise(x[i : i + 1], int(t[i]), ctx[[i, 4 + i]], guidance_scale=2.0)
        torch.testing.assert_close(batched[i : i + 1], single, atol=1e-5, rtol=1e-4)
    # guided = uncond + s * (cond - uncond)
    cond = pipe.predict_noise(x, t, ctx[4:], guidance_scale=1.0)
    uncond = pipe.predict_noise(x, t, ctx[:4], guidance_scale=1.0)
    torch.testing.assert_close(batched, uncond + 2.0 * (cond - uncond), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        pipe.predict_noise(x, t, ctx[4:], guidance_scale=2.0)


@pytest.mark.parametrize(
    "scheduler_cls",
    [
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        UniPCMultistepScheduler,
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
    ],
)
def test_any_scheduler(pipe, scheduler_cls):
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    a, b = sample(pipe), sample(pipe)
    assert a.shape == (2, 1, 16, 16) and torch.isfinite(a).all()
    assert torch.equal(a, b)  # stochastic schedulers draw from the generator too


def test_pipelines_are_independent():
    a, b = load_embedded_pipeline(), load_embedded_pipeline()
    a.scheduler = EulerDiscreteScheduler.from_config(a.scheduler.config)
    with torch.no_grad():
        a.transformer.proj_out.bias.add_(1.0)
    assert isinstance(b.scheduler, DDIMScheduler)
    assert not torch.equal(a.transformer.proj_out.bias, b.transformer.proj_out.bias)


def test_samples_are_recognisable(pipe):
    metrics = pytest.importorskip("fastdiff.metrics")
    try:
        metrics.load_feature_net()
    except FileNotFoundError:
        pytest.skip("digits classifier weights not shipped")
    images = sample(pipe, labels=range(10), num_inference_steps=20, num_images_per_prompt=2)
    assert metrics.class_accuracy(images, torch.arange(10).repeat_interleave(2)) >= 0.8


def test_build_random_pipeline():
    a, b = build_digits_pipeline(seed=0), build_digits_pipeline(seed=0)
    for (name, p), q in zip(a.transformer.named_parameters(), b.transformer.parameters()):
        assert torch.equal(p, q), name
    small = build_digits_pipeline({"num_layers": 1, "num_attention_heads": 2}, seed=1)
    small.set_progress_bar_config(disable=True)
    assert small.transformer.config.cross_attention_dim == 64
    assert sample(small, num_inference_steps=2).shape == (2, 1, 16, 16)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"class_labels": 10}, "class_labels"),
        ({"class_labels": [1, -1]}, "class_labels"),
        ({"class_labels": []}, "class_labels"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"output_type": "jpg"}, "output_type"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
        ({"latents": torch.zeros(1, 1, 8, 8)}, "latents"),
    ],
)
def test_bad_arguments(pipe, kwargs, match):
    kwargs = {"class_labels": [3], "num_inference_steps": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_bad_label_type(pipe):
    with pytest.raises(TypeError, match="class_labels"):
        pipe("three", num_inference_steps=1)
    with pytest.raises(TypeError, match="class_labels"):
        pipe(torch.tensor([1.0]), num_inference_steps=1)


@pytest.mark.parametrize("device", ["gpu0", "cuda:99", "banana"])
def test_bad_device(device):
    with pytest.raises(ValueError, match="device"):
        load_embedded_pipeline(device=device)


def test_bad_dtype():
    with pytest.raises(ValueError, match="dtype"):
        load_embedded_pipeline(dtype=torch.int64)
