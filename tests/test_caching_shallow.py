"""Shallow blocks: at deep-feature reuse steps the transformer blocks the shallow path still runs serve their kept
residual (forecast), against a hand-written reference; which blocks; defaults and errors."""

from __future__ import annotations

import pytest
import torch

import fastdiff
from fastdiff.caching.features import deep_modules, num_branches, shallow_blocks
from fastdiff.testing import run_with_hooks, tiny_pixart_pipeline, tiny_sd_pipeline

STEPS = 6


@pytest.fixture(scope="module")
def sd():
    pipe = tiny_sd_pipeline(sample_size=8)
    yield pipe
    fastdiff.disable_cache(pipe)


def run(sd, **kw):
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return sd("a cat", num_inference_steps=STEPS, guidance_scale=5.0, latents=noise, output_type="latent", **kw).images


def test_shallow_blocks_are_every_transformer_block_outside_the_served_modules(sd):
    names = {id(m): n for n, m in sd.unet.named_modules()}
    every = {n for n, m in sd.unet.named_modules() if n.endswith("transformer_blocks.0")}
    for branch in range(num_branches(sd.unet)):
        served = {names[id(m)] for top in deep_modules(sd.unet, branch) for m in top.modules()}
        found = {names[id(m)] for m in shallow_blocks(sd.unet, branch)}
        assert found == every - served and found, branch
    # branch 0: only the last up block's last attention reads the fresh conv_in skip
    assert [names[id(m)] for m in shallow_blocks(sd.unet, 0)] == ["up_blocks.1.attentions.1.transformer_blocks.0"]


@torch.no_grad()
def test_shallow_reuse_matches_serving_the_block_residual_by_hand(sd):
    """Reference: every step computes the whole UNet; at reuse steps forward hooks replace the served modules'
    outputs by those of the last full step (DeepCache) and the shallow block's output by its fresh input plus the
    residual it had at the last full step (order 0: the kept residual as it is)."""
    modules, block = deep_modules(sd.unet, 0), shallow_blocks(sd.unet, 0)[0]
    kept, step = {}, {"i": 0}

    def serve(module, args, output):
        if step["i"] % 2:
            return kept[module]
        kept[module] = output

    def residual(module, args, kwargs, output):
        h = args[0] if args else kwargs["hidden_states"]
        if step["i"] % 2:
            return h + kept["residual"]
        kept["residual"] = output - h

    handles = [m.register_forward_hook(serve) for m in modules] + [block.register_forward_hook(residual, with_kwargs=True)]
    expected = run_with_hooks(lambda **kw: run(sd, **kw), handles, step)
    fastdiff.enable_cache(sd, interval=2, order=0)
    deepcache = run(sd)
    fastdiff.enable_cache(sd, interval=2, order=0, shallow=True)
    calls, step["i"] = [], 0
    try:
        out = run_with_hooks(lambda **kw: run(sd, **kw),
                             [block.attn1.register_forward_pre_hook(lambda *_: calls.append(step["i"]))], step)
    finally:
        fastdiff.disable_cache(sd)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert (out - deepcache).abs().max() > 1e-4  # serving the block changed the run
    assert calls == [0, 2, 4]  # the block's attention ran at full steps only


def test_shallow_defaults_follow_the_forecast_and_bad_values_are_refused(sd):
    settings = lambda: sd.unet._fastdiff_cache.settings.shallow  # noqa: E731
    for kw, want in ((dict(), True), (dict(order=0), False), (dict(order=0, shallow=True), True),
                     (dict(shallow=False), False), (dict(tgate=3), False)):
        fastdiff.enable_cache(sd, **kw)
        assert settings() is want, kw
    fastdiff.disable_cache(sd)
    with pytest.raises(TypeError, match="shallow must be None, True or False"):
        fastdiff.enable_cache(sd, shallow="yes")
    with pytest.raises(ValueError, match="tgate"):
        fastdiff.enable_cache(sd, shallow=True, tgate=3)
    with pytest.raises(ValueError, match="features='deep'"):
        fastdiff.enable_cache(sd, features=None, guidance="residual", shallow=True)
    with pytest.raises(ValueError, match="features='deep'"):
        fastdiff.enable_cache(tiny_pixart_pipeline(), shallow=True)
    assert not fastdiff.is_cache_enabled(sd)
