"""The measuring helpers the caching benchmark shares with the notebooks: interleaved timing and diffusers'
cache hooks (TaylorSeer included) as one removable context."""

from __future__ import annotations

import pytest
import torch

from fastdiff.studies.caching import diffusers_cache, magcache_ratios
from fastdiff.studies.measure import count_macs, flop_counter, interleaved_seconds
from fastdiff.testing import tiny_pixart_pipeline


def pixart_sampler(steps):
    pipe = tiny_pixart_pipeline()
    kw = dict(num_inference_steps=steps, output_type="latent", use_resolution_binning=False, clean_caption=False)
    return pipe, lambda: pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images


def test_interleaved_seconds_alternates_rotates_and_wraps_every_call():
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    out = interleaved_seconds(fns, repeats=3, warmup=1, setup=lambda n: calls.append(f"+{n}"),
                              teardown=lambda n: calls.append(f"-{n}"))
    wrapped = lambda order: [x for n in order for x in (f"+{n}", n, f"-{n}")]  # noqa: E731
    # one warm-up round, then three timed rounds, each starting one function later
    assert calls == wrapped("abc") + wrapped("bca") + wrapped("cab") + wrapped("abc")
    for t in out.values():
        assert len(t["wall"]) == len(t["cpu"]) == 3 and t["wall_median"] >= 0 and t["cpu_median"] >= 0
    calls.clear()
    interleaved_seconds(fns, repeats=2, warmup=0, rotate=False)
    assert calls == list("abc") * 2
    with pytest.raises(TypeError, match="rotate must be True or False"):
        interleaved_seconds(fns, rotate=1)
    with pytest.raises(TypeError, match="fns"):
        interleaved_seconds({})
    with pytest.raises(ValueError, match="repeats"):
        interleaved_seconds(fns, repeats=0)


@torch.no_grad()
def test_diffusers_cache_takes_any_config_and_restores_the_pipeline():
    pytest.importorskip("diffusers.hooks.taylorseer_cache", reason="diffusers < 0.36 has no TaylorSeer cache")
    from diffusers import TaylorSeerCacheConfig

    pipe, sample = pixart_sampler(6)
    ref = sample()
    make = lambda ts: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2, max_order=2,  # noqa: E731
                                            taylor_factors_dtype=torch.float32,
                                            cache_identifiers=[r"transformer_blocks\.\d+"])
    with diffusers_cache(pipe, make) as config:
        assert isinstance(config, TaylorSeerCacheConfig)
        first, second = sample(), sample()
    assert (first - ref).abs().max() > 0 and torch.equal(first, second)  # reset between trajectories
    assert torch.equal(sample(), ref)
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in pipe.transformer.modules())
    with pytest.raises(ValueError, match="name must be one of"):
        with diffusers_cache(pipe, "taylorseer"):
            pass


@torch.no_grad()
def test_magcache_calibrates_with_its_own_mode_then_skips_and_restores():
    pytest.importorskip("diffusers.hooks.mag_cache", reason="diffusers < 0.37 has no MagCache")
    from diffusers import MagCacheConfig

    from fastdiff.testing import tiny_sd_pipeline

    pipe, sample = pixart_sampler(8)
    ref = sample()
    ratios = magcache_ratios(pipe, sample, 8)
    assert len(ratios) == 8 and ratios[0] == 1.0 and all(0.5 < r < 2 for r in ratios)
    assert torch.equal(sample(), ref)  # calibration skips nothing and is removed
    with diffusers_cache(pipe, lambda _: MagCacheConfig(mag_ratios=ratios, num_inference_steps=8, threshold=0.5)):
        first, second = sample(), sample()
    assert (first - ref).abs().max() > 0 and torch.equal(first, second) and torch.equal(sample(), ref)
    sd = tiny_sd_pipeline(sample_size=8)
    with pytest.raises(ValueError, match="MagCache calibrated nothing on UNet2DConditionModel"):
        magcache_ratios(sd, lambda: sd("a cat", num_inference_steps=2, output_type="latent"), 2)


def test_count_macs_counts_cpu_attention():
    """torch's FlopCounterMode alone counts 0 for ``F.scaled_dot_product_attention`` on CPU; fastdiff's counter
    counts its two matmuls (Q K^T and P V), forward and backward, as torch does for the fused CUDA kernels."""
    from torch.utils.flop_counter import FlopCounterMode

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    b, h, n, m, d, e = 2, 3, 10, 7, 4, 4  # e == d: the CPU flash kernel (else SDPA falls back to unfused math)
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, h, m, d), torch.randn(b, h, m, e)
    attention = Attention()
    assert count_macs(lambda: attention(q, k, v), attention) == b * h * n * m * (d + e)
    with torch.no_grad():
        reference = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, -1) @ v  # the same matmuls, unfused
    with FlopCounterMode(display=False) as unfused:
        torch.softmax(q @ k.transpose(-1, -2) / d**0.5, -1) @ v
    torch.testing.assert_close(attention(q, k, v), reference)
    assert 2 * count_macs(lambda: attention(q, k, v), attention) == unfused.get_total_flops()
    for x in (q, k, v):
        x.requires_grad_(True)
    with flop_counter() as counter:
        attention(q, k, v).sum().backward()
    # torch's formula for fused backward kernels: Q K^T recomputed, then dP, dV, dQ, dK
    backward = 2 * b * h * n * m * (3 * d + 2 * e)
    assert counter.get_total_flops() == unfused.get_total_flops() + backward
