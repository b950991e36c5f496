"""TGATE's five rough edges of issue 11 (item 4), each a case that failed before fastdiff.caching."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from diffusers.callbacks import SDCFGCutoffCallback

import fastdiff
from fastdiff.testing import tiny_sd_pipeline

STEPS = 6


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline(sample_size=8)


@pytest.fixture(autouse=True)
def _always_disable(sd):
    yield
    fastdiff.disable_cache(sd)


def latents(seed=0, n=1):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def run(sd, steps=STEPS, **kw):
    return sd("a cat", num_inference_steps=steps, latents=latents(), output_type="latent", guidance_scale=5.0, **kw).images


@pytest.mark.parametrize("cutoff", [1, 2, 3, 4])  # before, at (gate - 1) and after the gate
def test_cfg_cutoff_callback_at_or_after_the_gate(sd, cutoff):
    """Was: RuntimeError 'cannot reshape tensor of 0 elements' (the guidance decision used the previous step's
    layout and halved a batch of 1). Now each call's own rows decide; before the gate TGATE is exact."""
    gate = 3
    callback = lambda: SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=cutoff)  # noqa: E731
    ref = run(sd, callback_on_step_end=callback())
    fastdiff.enable_tgate(sd, gate_step=gate)
    out = run(sd, callback_on_step_end=callback())
    assert out.shape == ref.shape and torch.isfinite(out).all()
    if cutoff < gate - 1:  # CFG off from step cutoff + 1 < gate on: TGATE's gate keeps a single-branch output
        assert (out - ref).abs().max() > 0


def test_img2img_gate_counts_the_steps_that_run(sd):
    """Was: gate_step checked against all 10 scheduled steps, so gate 8 of the 5 that run was accepted and did
    nothing. Now the bound is the steps that run (strength 0.5 of 10 -> 5)."""
    img2img = StableDiffusionImg2ImgPipeline(**sd.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32)
    kw = dict(image=image, strength=0.5, num_inference_steps=10, output_type="latent", guidance_scale=5.0)
    ref = img2img("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    fastdiff.enable_tgate(img2img, gate_step=8)
    with pytest.raises(ValueError, match=r"gate_step must lie in \[1, 5\]"):
        img2img("a cat", generator=torch.Generator().manual_seed(0), **kw)
    fastdiff.enable_tgate(img2img, gate_step=5)  # = the steps that run: allowed, changes nothing
    same = img2img("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    fastdiff.enable_tgate(img2img, gate_step=2)  # gates within the run
    gated = img2img("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    fastdiff.disable_tgate(img2img)
    assert torch.equal(same, ref) and (gated - ref).abs().max() > 0


def test_direct_denoiser_calls_after_a_run(sd):
    """Was: two direct ``pipe.unet(...)`` calls after a pipeline run raised 'called twice in one scheduler step'.
    Now calls outside a run's steps are uncached and exact."""
    x, text = latents(), torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
    expected = [sd.unet(x, t, encoder_hidden_states=text).sample for t in (900, 500)]
    fastdiff.enable_tgate(sd, gate_step=2)
    run(sd)
    got = [sd.unet(x, t, encoder_hidden_states=text).sample for t in (900, 500)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_deepcopy_then_disable_the_copy(sd):
    """Was: ``disable_tgate(copy)`` left the copy's scheduler methods as a bare sentinel object. Now the copy
    comes back clean and exact, and the original keeps its TGATE."""
    ref = run(sd)
    fastdiff.enable_tgate(sd, gate_step=3)
    gated = run(sd)
    twin = copy.deepcopy(sd)
    fastdiff.disable_tgate(twin)
    assert not fastdiff.is_tgate_enabled(twin)
    assert {"step", "set_timesteps"}.isdisjoint(twin.scheduler.__dict__)
    assert not any(hasattr(m, "_diffusers_hook") for m in twin.unet.modules())
    assert torch.equal(run(twin), ref)
    assert torch.equal(run(sd), gated)


def test_gate_step_accepts_integral_numbers(sd):
    """Was: ``gate_step=np.int64(5)`` was a TypeError."""
    fastdiff.enable_tgate(sd, gate_step=np.int64(3))
    gated = run(sd)
    fastdiff.enable_tgate(sd, gate_step=3)
    assert torch.equal(gated, run(sd))
    for bad in (True, 2.0, "3"):
        with pytest.raises(TypeError, match="gate_step"):
            fastdiff.enable_tgate(sd, gate_step=bad)
