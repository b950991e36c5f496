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
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
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


def test_predict_noise_runs_the_denoiser_in_its_own_dtype():
    """A float64 pipeline given float32 latents: the denoiser runs in float64 (the dtype of the class tokens,
    which encode_class_labels casts to the denoiser's), the output comes back in the latents' float32."""
    pipe = load_embedded_pipeline().to(dtype=torch.float64)
    ctx = pipe.encode_class_labels([3, 7], do_classifier_free_guidance=False)
    assert ctx.dtype == torch.float64
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    seen = []
    handle = pipe.denoiser.register_forward_pre_hook(
        lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).dtype), with_kwargs=True)
    try:
        out = pipe.predict_noise(x, 500, ctx, guidance_scale=1.0)
    finally:
        handle.remove()
    assert seen == [torch.float64] and out.dtype == torch.float32
    with torch.no_grad():
        reference = pipe.denoiser(x.double(), encoder_hidden_states=ctx, timestep=torch.tensor([500, 500]),
                                  return_dict=False)[0].float()
    torch.testing.assert_close(out, reference)


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


# ------------------------------------------------------------------ callback_on_step_end (issue 17, item 15)
def test_callback_on_step_end_sees_every_step(pipe):
    calls = []

    def record(p, i, t, kwargs):
        calls.append((p, i, int(t), sorted(kwargs), kwargs["latents"].clone(), p.num_timesteps))
        return kwargs

    ref = sample(pipe)
    out = sample(pipe, callback_on_step_end=record)
    assert torch.equal(out, ref)  # returning the kwargs unchanged changes nothing
    assert [c[1:4] for c in calls] == [(i, int(t), ["latents"]) for i, t in enumerate(pipe.scheduler.timesteps)]
    assert all(c[0] is pipe and c[5] == STEPS for c in calls)
    # what the callback saw at the last step are the final latents
    assert torch.allclose((calls[-1][4] / 2 + 0.5).clamp(0, 1), ref)


def _recorder(store: dict):
    def record(p, i, t, kwargs):
        store[i] = kwargs["latents"].clone()
        return kwargs

    return record


def test_callback_on_step_end_may_replace_latents_and_conditioning(pipe):
    # latents: swapping in another seed's state after step 0 continues that seed's (deterministic DDIM) trajectory
    other = {}
    seed1 = sample(pipe, seed=1, callback_on_step_end=_recorder(other))
    swapped = sample(pipe, seed=0, callback_on_step_end=lambda p, i, t, kw: {"latents": other[0]} if i == 0 else kw)
    torch.testing.assert_close(swapped, seed1, rtol=0, atol=1e-6)
    assert not torch.allclose(swapped, sample(pipe, seed=0))
    # conditioning, replaced after step 0: labels (3, 7) for step 0, then (5, 1); the same as a (5, 1) run whose
    # state after step 0 is swapped for the (3, 7) run's
    from fastdiff.models.digits import DEFAULT_GUIDANCE_SCALE

    ehs = pipe.encode_class_labels([5, 1], do_classifier_free_guidance=DEFAULT_GUIDANCE_SCALE > 1)

    def relabel(p, i, t, kw):
        assert kw["encoder_hidden_states"].shape == ehs.shape and sorted(kw) == ["encoder_hidden_states"]
        return {"encoder_hidden_states": ehs}

    relabelled = sample(pipe, labels=(3, 7), callback_on_step_end=relabel,
                        callback_on_step_end_tensor_inputs=["encoder_hidden_states"])
    after_step0 = {}
    sample(pipe, labels=(3, 7), callback_on_step_end=_recorder(after_step0))
    reference = sample(pipe, labels=(5, 1),
                       callback_on_step_end=lambda p, i, t, kw: {"latents": after_step0[0]} if i == 0 else kw)
    torch.testing.assert_close(relabelled, reference, rtol=0, atol=1e-6)
    assert not torch.allclose(relabelled, sample(pipe, labels=(3, 7)))


class _Zero(PipelineCallback):
    tensor_inputs = ["latents"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        if step_index == pipeline.num_timesteps - 1:
            callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
        return callback_kwargs


def test_diffusers_pipeline_callbacks_work(pipe):
    out = sample(pipe, callback_on_step_end=MultiPipelineCallbacks([_Zero()]))
    assert bool((out == 0.5).all())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"callback_on_step_end": "print"}, TypeError, "callback_on_step_end must be callable"),
        ({"callback_on_step_end_tensor_inputs": ["prompt_embeds"]}, ValueError,
         r"callback_on_step_end_tensor_inputs must be in \['latents', 'encoder_hidden_states'\], got \['prompt_embeds'\]"),
        ({"callback_on_step_end_tensor_inputs": "latents"}, TypeError, "callback_on_step_end_tensor_inputs must be a list"),
        ({"callback_on_step_end": lambda p, i, t, kw: None}, TypeError, "callback_on_step_end must return a dict"),
        ({"callback_on_step_end": lambda p, i, t, kw: {"latents": kw["latents"][:1]}}, ValueError,
         r"callback_on_step_end returned 'latents' of \(1, 1, 16, 16\) at step 0; it must be a tensor of shape \(2, 1, 16, 16\)"),
    ],
)
def test_bad_callbacks_are_named(pipe, kwargs, error, match):
    sizes, handle = batch_sizes(pipe.transformer)
    try:
        with pytest.raises(error, match=match):
            sample(pipe, **kwargs)
    finally:
        handle.remove()
    validated_up_front = "callback_on_step_end must be callable" in match or "tensor_inputs" in match
    assert len(sizes) == (0 if validated_up_front else 1)
