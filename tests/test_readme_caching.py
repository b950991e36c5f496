"""The README's TGATE snippet, run line for line (tests/test_readme.py checks the lines match)."""

import torch


def test_readme_tgate_snippet():
    # --- README: attention caching
    import fastdiff

    pipe = fastdiff.load_embedded_pipeline()
    fastdiff.enable_tgate(pipe, gate_step=3, cond_weight=2.0)      # TGATE; self_attn=True for TGATE-V2
    images = pipe([3, 7], num_inference_steps=6, guidance_scale=2.0).images
    fastdiff.disable_tgate(pipe)                                   # the pipeline is exactly as before
    # --- end
    assert len(images) == 2 and not fastdiff.is_tgate_enabled(pipe)
    _assert_like_a_fresh_pipeline(pipe, 6)


def test_readme_cache_snippet():
    # --- README: fastdiff's cache
    import fastdiff

    pipe = fastdiff.load_embedded_pipeline()
    cal = fastdiff.calibrate_cache(pipe, [1, 4], num_inference_steps=8, guidance_scale=2.0)  # one uncached run
    fastdiff.enable_cache(pipe, calibration=cal, reuse=0.5, order=1, guidance="residual", guidance_reuse=0.7)
    images = pipe([3, 7], num_inference_steps=8, guidance_scale=2.0).images
    fastdiff.disable_cache(pipe)                                   # the pipeline is exactly as before
    # --- end
    assert len(images) == 2 and not fastdiff.is_cache_enabled(pipe)
    _assert_like_a_fresh_pipeline(pipe, 8)


def test_readme_forecast_snippet():
    # --- README: fastdiff's cache, forecast
    import fastdiff

    pipe = fastdiff.load_embedded_pipeline()
    fastdiff.enable_cache(pipe, interval=2, cooldown=2)  # every block forecast (order 2) every 2nd step, last 2 computed
    images = pipe([3, 7], num_inference_steps=8, guidance_scale=2.0).images
    fastdiff.disable_cache(pipe)                                   # the pipeline is exactly as before
    # --- end
    assert len(images) == 2 and not fastdiff.is_cache_enabled(pipe)
    _assert_like_a_fresh_pipeline(pipe, 8)


def _assert_like_a_fresh_pipeline(pipe, steps: int) -> None:
    """After disabling, the pipeline samples exactly what a freshly loaded one does from the same noise."""
    import fastdiff

    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    after = pipe([3, 7], num_inference_steps=steps, guidance_scale=2.0, latents=noise.clone(), output_type="pt").images
    fresh = fastdiff.load_embedded_pipeline()([3, 7], num_inference_steps=steps, guidance_scale=2.0,
                                              latents=noise.clone(), output_type="pt").images
    assert torch.equal(after, fresh)
