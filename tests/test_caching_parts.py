"""fastdiff's cache, part by part: each against a reference path, bit-exact removal, schedulers, pipeline
features (num_images_per_prompt, callbacks, img2img, SDXL denoising_end), parallel sampling refused, schedules and
errors."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.callbacks import SDCFGCutoffCallback

import fastdiff
from fastdiff.caching.features import deep_modules
from fastdiff.caching.schedule import Calibration, calibrated_schedule, uniform_schedule
from fastdiff.testing import run_with_hooks, tiny_pixart_pipeline, tiny_sd_pipeline

STEPS = 6
PARTS = {
    "deep": dict(interval=2),
    "deep order 1": dict(interval=2, order=1),
    "deep order 2 newton, warmup, cooldown": dict(interval=2, order=2, warmup=2, cooldown=1),
    "deep order 2 taylor": dict(interval=2, order=2, forecast="taylor"),
    "deep, shallow blocks off": dict(interval=2, shallow=False),
    "deep + guidance residual (shallow blocks on CFG halves)": dict(interval=2, guidance="residual", guidance_interval=3),
    "guidance": dict(features=None, guidance="residual", guidance_interval=2),
    "tgate residual": dict(features=None, tgate={"gate_step": 3, "guidance": "residual"}),
    "all": dict(interval=3, guidance="residual", guidance_interval=2, tgate=4),
}


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline(sample_size=8)


@pytest.fixture(scope="module")
def pixart():
    return tiny_pixart_pipeline()


@pytest.fixture(autouse=True)
def _always_disable(request):
    yield
    for name in ("sd", "pixart"):
        if name in request.fixturenames:
            fastdiff.disable_cache(request.getfixturevalue(name))


def latents(seed=0, n=1):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def run(sd, steps=STEPS, n=1, **kw):
    kw.setdefault("guidance_scale", 5.0)
    return sd("a cat", num_inference_steps=steps, latents=latents(n=n), output_type="latent", **kw).images


def state(module):
    return {name: set(m.__dict__) for name, m in module.named_modules()}


@pytest.mark.parametrize("part", list(PARTS))
def test_each_part_changes_the_run_and_disabling_restores_it_bit_exactly(sd, part):
    ref, before, sched = run(sd, n=2, num_images_per_prompt=2), state(sd.unet), set(sd.scheduler.__dict__)
    fastdiff.enable_cache(sd, **PARTS[part])
    cached = run(sd, n=2, num_images_per_prompt=2)
    assert fastdiff.is_cache_enabled(sd) and torch.isfinite(cached).all() and (cached - ref).abs().max() > 0
    assert torch.equal(cached, run(sd, n=2, num_images_per_prompt=2))  # no state leaks between calls
    fastdiff.disable_cache(sd)
    assert torch.equal(run(sd, n=2, num_images_per_prompt=2), ref)
    assert state(sd.unet) == before and set(sd.scheduler.__dict__) == sched and not fastdiff.is_cache_enabled(sd)


def test_no_reuse_is_exact(sd, pixart):
    ref = run(sd)
    fastdiff.enable_cache(sd, interval=1)
    assert torch.equal(run(sd), ref)
    kw = dict(num_inference_steps=4, output_type="latent", use_resolution_binning=False, clean_caption=False)
    ref = pixart("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    fastdiff.enable_cache(pixart, interval=1)
    assert torch.equal(pixart("a cat", generator=torch.Generator().manual_seed(0), **kw).images, ref)


@torch.no_grad()
def test_deep_reuse_matches_serving_the_deep_modules_by_hand(sd):
    """Reference: every step computes the whole UNet, and forward hooks replace the outputs of the modules
    DeepCache serves (deeper than branch 0) with those of the last full step at reuse steps."""
    modules, kept, step = deep_modules(sd.unet, 0), {}, {"i": 0}

    def replace(module, args, output):
        if step["i"] % 2:
            return kept[module]
        kept[module] = output

    expected = run_with_hooks(lambda **kw: run(sd, **kw), [m.register_forward_hook(replace) for m in modules], step)
    fastdiff.enable_cache(sd, interval=2, order=0)
    assert torch.equal(run(sd), expected)
    names = {id(m): n for n, m in sd.unet.named_modules()}
    served = sorted(names[id(m)] for m in modules)
    # branch 0: only conv_in, the last up block's last layer (reading the conv_in skip) and conv_out stay fresh
    assert served == sorted(["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0",
                             "up_blocks.1.attentions.0", "up_blocks.1.resnets.0"])


def test_deep_reuse_matches_the_deepcache_package(sd):
    deepcache = pytest.importorskip("DeepCache")
    helper = deepcache.DeepCacheSDHelper(pipe=sd)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    try:
        theirs = run(sd, steps=7)
    finally:
        helper.disable()
    fastdiff.enable_cache(sd, interval=3, order=0)
    assert torch.equal(run(sd, steps=7), theirs)


@torch.no_grad()
def test_block_residual_reuse_matches_a_hand_written_span(pixart):
    """Reference: blocks [1, 2) of 2 are recomputed every step, and at reuse steps the span's output is replaced by
    its input plus the residual kept at the last full step."""
    blocks, kept, step = pixart.transformer.transformer_blocks, {}, {"i": 0}

    def replace(module, args, kwargs, output):
        h = args[0] if args else kwargs["hidden_states"]
        if step["i"] % 2:
            return h + kept["r"]
        kept["r"] = output - h

    handles = [blocks[1].register_forward_hook(replace, with_kwargs=True),
               pixart.transformer.register_forward_pre_hook(lambda *_: step.update(i=step["i"] + 1))]
    step["i"] = -1  # the pre-hook counts denoiser calls: one per step
    kw = dict(num_inference_steps=5, output_type="latent", use_resolution_binning=False, clean_caption=False)
    try:
        expected = pixart("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    finally:
        for h in handles:
            h.remove()
    fastdiff.enable_cache(pixart, interval=2, blocks=(1, 2), order=0)
    out = pixart("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_guidance_residual_rebuilds_uncond_from_the_kept_residual(sd):
    """At a COND step the denoiser runs the conditional half only and returns ``[cond + (u - c)_kept; cond]``."""
    x = latents()
    text = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(2))
    sched = sd.scheduler
    sched.set_timesteps(4)
    t0, t1 = sched.timesteps[:2]
    u0, c0 = sd.unet(torch.cat([x, x]), t0, encoder_hidden_states=text).sample.chunk(2)
    c1 = sd.unet(x, t1, encoder_hidden_states=text[1:]).sample
    fastdiff.enable_cache(sd, features=None, guidance="residual", guidance_interval=4)
    sched.set_timesteps(4)
    out0 = sd.unet(torch.cat([x, x]), t0, encoder_hidden_states=text).sample
    sched.step(out0[1:], t0, x)
    out1 = sd.unet(torch.cat([x, x]), t1, encoder_hidden_states=text).sample
    assert torch.equal(out0, torch.cat([u0, c0]))
    torch.testing.assert_close(out1, torch.cat([c1 + (u0 - c0), c1]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scheduler", [DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                                       UniPCMultistepScheduler])
def test_every_scheduler(sd, scheduler):
    original = sd.scheduler
    sd.scheduler = scheduler.from_config(original.config)
    try:
        ref = run(sd, steps=4)
        fastdiff.enable_cache(sd, **PARTS["all"] | {"tgate": 3})
        out = run(sd, steps=4)
        counts = sd.unet._fastdiff_cache.run.counts
    finally:
        fastdiff.disable_cache(sd)
        sd.scheduler = original
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 0 and counts["reused"] > 0


def test_cfg_cutoff_callback_and_calibrated_schedule(sd):
    cal = fastdiff.calibrate_cache(sd, "a cat", num_inference_steps=8, latents=latents(5), output_type="latent",
                                   guidance_scale=5.0)
    assert cal.kind == "deep" and len(cal.feature_rate) == 7 and len(cal.guidance_rate) == 7
    fastdiff.enable_cache(sd, calibration=cal, reuse=0.5, guidance="residual", guidance_reuse=0.5)
    out = run(sd, steps=8, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=4))
    planner = sd.unet._fastdiff_cache.planner
    assert torch.isfinite(out).all() and planner.features.count(False) == 4 and planner.features[0]
    run(sd, steps=12)  # other step counts reuse the calibration
    assert planner.features.count(False) == 6


def test_schedules():
    assert uniform_schedule(7, 3) == [True, False, False, True, False, False, True]
    changes = [float("inf"), 5.0, 0.1, 0.1, 0.1, 5.0, 0.1, 0.1]
    schedule = calibrated_schedule(changes, 0.5)
    assert schedule[0] and schedule.count(False) >= 4
    assert not any(schedule[i] for i in (2, 3, 6, 7)) or schedule.count(False) > 4  # reuse where change is small
    cal = Calibration.from_changes([900.0, 600.0, 300.0], [0, 0.3, 0.6], [0, 0.1, 0.2], "deep", 0, None)
    assert cal.changes([900.0, 600.0, 300.0], "features")[1:] == pytest.approx([0.3, 0.6])


def _compute_pattern(pipe, call) -> str:
    """Per denoiser call, ``C`` where the mid block (a served module at branch 0) ran, ``R`` where it was served."""
    marks = []
    hooks = [pipe.unet.register_forward_pre_hook(lambda module, args: marks.append("R")),
             pipe.unet.mid_block.resnets[0].register_forward_hook(lambda module, args, out: marks.__setitem__(-1, "C"))]
    out = run_with_hooks(call, hooks)
    return "".join(marks), out


@torch.no_grad()
def test_schedule_spans_the_steps_that_run_img2img_and_denoising_end(sd):
    """The uniform schedule and its cool-down are laid over the steps that run: 5 of 10 at img2img strength 0.5,
    and SDXL's ``denoising_end=0.5``; every run differs from uncached and disabling restores it bit for bit."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from fastdiff.testing import tiny_sdxl_pipeline

    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    img2img = StableDiffusionImg2ImgPipeline(**sd.components)
    img2img.set_progress_bar_config(disable=True)
    sdxl = tiny_sdxl_pipeline()
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    calls = {
        "img2img": (img2img, lambda: img2img("a cat", image=image, strength=0.5, num_inference_steps=10,
                                             guidance_scale=5.0, output_type="latent",
                                             generator=torch.Generator().manual_seed(0)).images),
        "sdxl": (sdxl, lambda: sdxl("a cat", num_inference_steps=10, denoising_end=0.5, guidance_scale=5.0,
                                    latents=noise, output_type="latent").images),
    }
    expected = "".join("C" if c else "R" for c in uniform_schedule(5, 2, cooldown=2))
    assert expected == "CRCCC"
    for name, (pipe, call) in calls.items():
        plain, ref = _compute_pattern(pipe, call)
        assert plain == "CCCCC", name
        fastdiff.enable_cache(pipe, interval=2, cooldown=2)
        try:
            cached, out = _compute_pattern(pipe, call)
        finally:
            fastdiff.disable_cache(pipe)
        assert cached == expected, (name, cached)
        assert (out - ref).abs().max() > 0, name
        assert torch.equal(call(), ref), name


def test_parallel_sample_is_refused(sd):
    fastdiff.enable_cache(sd)
    with pytest.raises(ValueError, match="parallel"):
        fastdiff.parallel_sample(sd, "a cat", num_inference_steps=4, method="picard", window=4, latents=latents(),
                                 output_type="latent")


def test_errors(sd, pixart):
    cases = [
        (dict(features="blocks"), ValueError, "features='blocks'"),
        (dict(features="fast"), ValueError, "features must be"),
        (dict(interval=0), ValueError, "interval"),
        (dict(order=3), ValueError, "order must be 0"),
        (dict(forecast="linear"), ValueError, "forecast must be one of"),
        (dict(warmup=0), ValueError, "warmup"),
        (dict(cooldown=-1), ValueError, "cooldown"),
        (dict(cooldown=1.5), TypeError, "cooldown"),
        (dict(reuse=0.5), ValueError, "calibration"),
        (dict(reuse=1.5), ValueError, "reuse must be a fraction"),
        (dict(guidance="cfg"), ValueError, "guidance must be"),
        (dict(branch=99), ValueError, "branch must be"),
        (dict(tgate={"gate": 3}), ValueError, "tgate must be"),
        (dict(tgate={"gate_step": 3, "guidance": "keep"}), ValueError, "guidance must be one of"),
    ]
    for kwargs, err, match in cases:
        with pytest.raises(err, match=match):
            fastdiff.enable_cache(sd, **kwargs)
    with pytest.raises(ValueError, match="blocks must satisfy"):
        fastdiff.enable_cache(pixart, blocks=(1, 5))
    with pytest.raises(TypeError, match="pipe_or_model"):
        fastdiff.enable_cache("pipe")
    assert not fastdiff.is_cache_enabled(sd) and not any(hasattr(m, "_diffusers_hook") for m in sd.unet.modules())
