"""fastdiff.set_attention_backend on tiny diffusers models: same outputs as the default processors, the
backend that ran is reported, fallbacks are logged once, removal restores the processors."""

import logging

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

import fastdiff
from fastdiff.kernels.dispatch import BACKENDS, DispatchAttnProcessor, available_attention_backends

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=8,
                 norm_num_groups=8)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = UNet2DConditionModel(**TINY_UNET).eval()
    inputs = dict(sample=torch.randn(2, 4, 8, 8), timestep=torch.tensor([10, 700]),
                  encoder_hidden_states=torch.randn(2, 5, 16))
    return model, inputs


def _messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "fastdiff.kernels.dispatch"]


@torch.no_grad()
def test_auto_on_cpu_runs_sdpa_reports_it_and_is_removable(unet, caplog):
    model, inputs = unet
    reference = model(**inputs).sample
    with caplog.at_level(logging.WARNING, logger="fastdiff.kernels.dispatch"):
        installed = fastdiff.set_attention_backend(model, "auto")
        out = model(**inputs).sample
        model(**inputs)
    assert set(installed) == {"UNet2DConditionModel"}
    assert all(isinstance(p, DispatchAttnProcessor) for p in model.attn_processors.values())
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    report = fastdiff.attention_backend_report(model)["UNet2DConditionModel"]
    assert report["requested"] == "auto" and report["fallbacks"] == {}
    assert report["calls"] == {"sdpa": 2 * len(model.attn_processors)}
    assert _messages(caplog).count("fastdiff attention: running 'sdpa' (auto on cpu: PyTorch SDPA)") == 1
    fastdiff.remove_attention_backend(model)
    assert all(type(p) is AttnProcessor2_0 for p in model.attn_processors.values())
    assert fastdiff.attention_backend_report(model) == {}
    torch.testing.assert_close(model(**inputs).sample, reference, rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("backend", ["sdpa-math", "sdpa-flash"])
def test_named_backends_match_and_unservable_calls_fall_back_once(unet, backend, caplog):
    model, inputs = unet
    reference = model(**inputs).sample
    with caplog.at_level(logging.WARNING, logger="fastdiff.kernels.dispatch"):
        fastdiff.set_attention_backend(model, backend)
        out = model(**inputs).sample
        model(**inputs)
    try:
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
        report = fastdiff.attention_backend_report(model)["UNet2DConditionModel"]
        if backend == "sdpa-math":
            assert report["calls"] == {"sdpa-math": 2 * len(model.attn_processors)}
        else:  # the flash kernel needs CUDA and half precision: SDPA, said once
            assert report["calls"] == {"sdpa": 2 * len(model.attn_processors)}
            why = "'sdpa-flash' needs CUDA tensors, got cpu; using SDPA"
            assert report["fallbacks"] == {why: 2 * len(model.attn_processors)}
            assert _messages(caplog).count(f"fastdiff attention: running 'sdpa' ({why})") == 1
    finally:
        fastdiff.remove_attention_backend(model)


def test_pipelines_and_bad_arguments():
    from fastdiff.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    installed = fastdiff.set_attention_backend(pipe, "sdpa")
    assert {"unet", "vae"} <= set(installed)
    assert set(fastdiff.attention_backend_report(pipe)) == set(installed)
    fastdiff.remove_attention_backend(pipe)
    assert fastdiff.attention_backend_report(pipe) == {}
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of \('sdpa', 'sdpa-flash'"):
        fastdiff.set_attention_backend(pipe, "flash9")
    with pytest.raises(TypeError, match="pipe_or_model must be a diffusers pipeline or a torch.nn.Module"):
        fastdiff.set_attention_backend("unet")
    missing = [name for name, b in BACKENDS.items() if not b.installed()]
    if missing:
        with pytest.raises(ValueError, match=f"attention backend {missing[0]!r} is not installed here"):
            fastdiff.set_attention_backend(pipe, missing[0])
    assert available_attention_backends()[:2] == ("auto", "sdpa")


triton_only = pytest.mark.skipif(not BACKENDS["fastdiff-triton"].installed(),
                                 reason='the kernels need triton: pip install "fastdiff[triton]"')


@triton_only
@pytest.mark.parametrize("backend", ["fastdiff-triton", "fastdiff-int8"])
def test_fastdiff_kernels_serve_a_transformer_with_a_text_mask(pixart, backend, monkeypatch):
    model, inputs = pixart
    inputs = {**inputs, "encoder_attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}
    with torch.no_grad():
        reference = model(**inputs).sample
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fastdiff.set_attention_backend(model, backend)
    try:
        with torch.no_grad():
            out = model(**inputs).sample
        report = fastdiff.attention_backend_report(model)["PixArtTransformer2DModel"]
        assert report["calls"] == {backend: 2 * model.config.num_layers}
        tol = 1e-5 if backend == "fastdiff-triton" else 2e-2
        torch.testing.assert_close(out, reference, rtol=tol, atol=tol)
    finally:
        fastdiff.remove_attention_backend(model)


@triton_only
def test_forward_only_kernel_falls_back_when_training(pixart, monkeypatch, caplog):
    model, inputs = pixart
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reference = model(**inputs).sample
    fastdiff.set_attention_backend(model, "fastdiff-int8")
    try:
        with caplog.at_level(logging.WARNING, logger="fastdiff.kernels.dispatch"):
            out = model(**inputs).sample
        out.mean().backward()
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
        report = fastdiff.attention_backend_report(model)["PixArtTransformer2DModel"]
        assert report["calls"] == {"sdpa": 2 * model.config.num_layers}
        assert _messages(caplog) == ["fastdiff attention: running 'sdpa' ('fastdiff-int8' is forward-only (inference) "
                                     "and a gradient is needed; using SDPA)"]
    finally:
        fastdiff.remove_attention_backend(model)
        model.zero_grad(set_to_none=True)


@torch.no_grad()
def test_diffusers_dispatched_processors_get_diffusers_backend_names():
    from diffusers import FluxTransformer2DModel
    from diffusers.models.attention_dispatch import AttentionBackendName

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                   axes_dims_rope=[4, 4, 8]).eval()
    inputs = dict(hidden_states=torch.randn(1, 16, 4), encoder_hidden_states=torch.randn(1, 3, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3),
                  txt_ids=torch.zeros(3, 3))
    reference = model(**inputs).sample
    installed = fastdiff.set_attention_backend(model, "sdpa-math")
    report = installed["FluxTransformer2DModel"].report()
    assert report["diffusers_modules"] == 2 and report["modules"] == 0
    assert {p._attention_backend for p in model.attn_processors.values()} == {AttentionBackendName("_native_math")}
    torch.testing.assert_close(model(**inputs).sample, reference, rtol=1e-5, atol=1e-6)
    fastdiff.remove_attention_backend(model)
    assert {p._attention_backend for p in model.attn_processors.values()} == {None}
