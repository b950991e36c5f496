"""TGATE: exact before the gate, cached cross-attention and halved batch after it, clean removal, errors.

The reference path is a hand-written TGATE denoising loop (:func:`manual_tgate`), after the authors'
patched ``StableDiffusionPipeline.__call__`` (HaozheLiu-ST/T-GATE, ``tgate/SD.py``).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.models.attention_processor import AttnProcessor2_0

import fastdiff
from fastdiff.caching import is_tgate_enabled
from fastdiff.caching.engine import Action
from fastdiff.caching.tgate import SelfAttnSchedule, tgate_actions
from fastdiff.models import build_digits_pipeline
from fastdiff.testing import tiny_ddpm_pipeline, tiny_pixart_pipeline, tiny_sd_pipeline

STEPS, GATE = 6, 3
PIXART_KW = {"use_resolution_binning": False, "clean_caption": False}


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def pixart():
    return tiny_pixart_pipeline()


@pytest.fixture(scope="module")
def digits():
    pipe = build_digits_pipeline({"num_layers": 2})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(autouse=True)
def _always_disable(request):
    yield
    for name in ("sd", "pixart", "digits"):
        if name in request.fixturenames:
            fastdiff.disable_tgate(request.getfixturevalue(name))


class CountingProcessor:
    """Wraps a processor and logs ``(kind, batch)`` for every attention call that really runs."""

    def __init__(self, inner, log: list):
        self.inner, self.log = inner, log

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        self.log.append(("cross" if encoder_hidden_states is not None else "self", hidden_states.shape[0]))
        return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def counting(model) -> tuple[list, dict]:
    """Install counting processors on ``model``; returns the log and the original processors."""
    original, log = model.attn_processors, []
    model.set_attn_processor({k: CountingProcessor(v, log) for k, v in original.items()})
    return log, original


def sd_latents(sd, seed: int = 0, n: int = 1) -> torch.Tensor:
    return torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def sd_run(sd, latents, steps=STEPS, **kwargs):
    """Final latents and the latents after every step."""
    trace = []

    def record(pipe, i, t, kw):
        trace.append(kw["latents"].clone())
        return kw

    out = sd("a cat", num_inference_steps=steps, latents=latents.clone(), output_type="latent",
             callback_on_step_end=record, **kwargs).images
    return out, trace


# ----------------------------------------------------------------------------------------------------
# the schedule


def reference_scheduler(cur_step, gate_step, sp_interval, fi_interval, warm_up):
    """``tgate_scheduler`` of HaozheLiu-ST/T-GATE (``tgate/tgate_utils.py``), as (cross, self) actions."""
    if cur_step < gate_step - 1:
        if cur_step < warm_up:
            sa = Action.COMPUTE
        elif cur_step == warm_up or cur_step % sp_interval == 0:
            sa = Action.CACHE
        else:
            sa = Action.REUSE
        return Action.COMPUTE, sa
    if cur_step == gate_step - 1:
        return Action.CACHE_GATE, Action.CACHE_GATE
    return Action.REUSE, Action.CACHE if cur_step % fi_interval == 0 else Action.REUSE


def test_schedule_matches_reference():
    for gate in (1, 2, 5, 10, 25):
        for sched in (SelfAttnSchedule(), SelfAttnSchedule(0, 1, 1), SelfAttnSchedule(1, 3, 2)):
            for step in range(30):
                ref = reference_scheduler(step, gate, sched.sp_interval, sched.fi_interval, sched.warm_up)
                assert tgate_actions(step, gate, sched) == ref
            assert all(tgate_actions(s, gate, None)[1] is Action.COMPUTE for s in range(30))


# ----------------------------------------------------------------------------------------------------
# exactness before the gate, caching and batch halving after it


@torch.no_grad()
def manual_tgate(sd, latents, steps, gate, guidance, negative=None, cond_weight=0.5):
    """TGATE written out as a loop (reference path): CFG up to the gate, then the uncond branch alone with
    every cross-attention output replaced by the mean of its halves at step ``gate - 1`` (or, for
    ``cond_weight`` w, by ``u + w (c - u)``)."""
    unet = sd.unet
    cond, uncond = sd.encode_prompt("a cat", "cpu", latents.shape[0], True, negative_prompt=negative)
    sched = DDIMScheduler.from_config(sd.scheduler.config)
    sched.set_timesteps(steps)
    cache, phase = {}, {"mode": "pass"}

    class Oracle:
        def __init__(self, name):
            self.name, self.inner = name, AttnProcessor2_0()

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kw):
            if phase["mode"] == "replay":
                return cache[self.name]
            out = self.inner(attn, hidden_states, encoder_hidden_states, **kw)
            if phase["mode"] == "store":
                u, c = out.chunk(2)
                cache[self.name] = (u + c) / 2 if cond_weight == 0.5 else u + cond_weight * (c - u)
            return out

    original = unet.attn_processors
    unet.set_attn_processor({k: Oracle(k) if "attn2" in k else v for k, v in original.items()})
    try:
        x = latents.clone()
        for i, t in enumerate(sched.timesteps):
            if i < gate:
                phase["mode"] = "store" if i == gate - 1 else "pass"
                u, c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
                eps = u + guidance * (c - u)
            else:
                phase["mode"] = "replay"
                eps = unet(x, t, encoder_hidden_states=uncond).sample
            x = sched.step(eps, t, x).prev_sample
    finally:
        unet.set_attn_processor(dict(original))
    return x


def test_sd_exact_before_gate_and_matches_reference_loop(sd):
    latents = sd_latents(sd, n=2)
    kwargs = {"negative_prompt": "a dog", "num_images_per_prompt": 2, "guidance_scale": 5.0}
    ref, ref_trace = sd_run(sd, latents, **kwargs)
    expected = manual_tgate(sd, latents, STEPS, GATE, 5.0, negative="a dog")
    fastdiff.enable_tgate(sd, gate_step=GATE)
    out, trace = sd_run(sd, latents, **kwargs)
    for i in range(GATE):  # latents after steps 0 .. gate-1 come from full CFG steps
        assert (trace[i] - ref_trace[i]).abs().max() <= 1e-6, i
    assert (out - ref).abs().max() > 1e-4  # and after the gate they do differ
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cond_weight", [1.0, 2.0])
def test_cond_weight_mixes_the_kept_halves(sd, cond_weight):
    latents = sd_latents(sd)
    mean = manual_tgate(sd, latents, STEPS, GATE, 5.0)
    expected = manual_tgate(sd, latents, STEPS, GATE, 5.0, cond_weight=cond_weight)
    fastdiff.enable_tgate(sd, gate_step=GATE, cond_weight=cond_weight)
    out, _ = sd_run(sd, latents, guidance_scale=5.0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - mean).abs().max() > 1e-4


def test_sd_cross_attention_skipped_and_batch_halved(sd):
    log, original = counting(sd.unet)
    try:
        fastdiff.enable_tgate(sd, gate_step=GATE)
        sd_run(sd, sd_latents(sd, n=3), num_images_per_prompt=3)
    finally:
        sd.unet.set_attn_processor(dict(original))
    n_cross = sum("attn2" in k for k in original)
    cross = [b for kind, b in log if kind == "cross"]
    self_batches = [b for kind, b in log if kind == "self"]
    assert cross == [6] * (n_cross * GATE)  # computed only before the gate, on the [uncond; cond] batch of 2 x 3
    per_step = len(self_batches) // STEPS
    assert self_batches == [6] * (per_step * GATE) + [3] * (per_step * (STEPS - GATE))


def test_sd_no_guidance(sd):
    latents = sd_latents(sd, n=2)
    log, original = counting(sd.unet)
    try:
        ref, ref_trace = sd_run(sd, latents, num_images_per_prompt=2, guidance_scale=1.0)
        log.clear()
        fastdiff.enable_tgate(sd, gate_step=GATE)
        out, trace = sd_run(sd, latents, num_images_per_prompt=2, guidance_scale=1.0)
    finally:
        sd.unet.set_attn_processor(dict(original))
    for i in range(GATE):
        assert (trace[i] - ref_trace[i]).abs().max() <= 1e-6
    assert (out - ref).abs().max() > 0
    n_cross = sum("attn2" in k for k in original)
    assert [b for kind, b in log if kind == "cross"] == [2] * (n_cross * GATE)
    assert {b for kind, b in log if kind == "self"} == {2}  # nothing to halve without CFG


def test_pixart_and_digits(pixart, digits):
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    kw = dict(num_inference_steps=STEPS, output_type="latent", num_images_per_prompt=2, **PIXART_KW)
    ref = pixart("a cat", generator=gen(), **kw).images
    log, original = counting(pixart.transformer)
    try:
        fastdiff.enable_tgate(pixart, gate_step=GATE)
        out = pixart("a cat", generator=gen(), **kw).images
    finally:
        pixart.transformer.set_attn_processor(dict(original))
    layers = pixart.transformer.config.num_layers
    assert [b for kind, b in log if kind == "cross"] == [4] * (layers * GATE)
    assert [b for kind, b in log if kind == "self"][-1] == 2
    assert out.shape == ref.shape and (out - ref).abs().max() > 0

    steps = []
    inner = digits.scheduler.step

    def step(model_output, timestep, sample, **kwargs):
        steps.append(inner(model_output, timestep, sample, **kwargs)[0].clone())
        return (steps[-1],)

    digits.scheduler.step = step
    log, original = counting(digits.transformer)
    try:
        digits([3, 4], num_inference_steps=STEPS, guidance_scale=2.0, generator=gen(), output_type="pt")
        ref_steps, steps[:], log[:] = list(steps), [], []
        fastdiff.enable_tgate(digits, gate_step=GATE)
        digits([3, 4], num_inference_steps=STEPS, guidance_scale=2.0, generator=gen(), output_type="pt")
    finally:
        fastdiff.disable_tgate(digits)
        del digits.scheduler.step
        digits.transformer.set_attn_processor(dict(original))
    for i in range(GATE):
        assert torch.equal(steps[i], ref_steps[i])
    assert [b for kind, b in log if kind == "cross"] == [4] * (2 * GATE)
    assert [b for kind, b in log if kind == "self"][-2:] == [2, 2]


def test_self_attention_schedule_v2(sd):
    schedule = {"warm_up": 1, "sp_interval": 2, "fi_interval": 2}
    log, original = counting(sd.unet)
    n_self = sum("attn1" in k for k in original)
    steps, gate = 8, 5
    try:
        fastdiff.enable_tgate(sd, gate_step=gate, self_attn=schedule)
        sd_run(sd, sd_latents(sd), steps=steps)
    finally:
        sd.unet.set_attn_processor(dict(original))
    computed = [b for kind, b in log if kind == "self"]
    expected = []
    for step in range(steps):
        action = tgate_actions(step, gate, SelfAttnSchedule(**schedule))[1]
        if action is not Action.REUSE:
            expected += [2 if step < gate else 1] * n_self
    assert computed == expected and len(expected) < n_self * steps


# ----------------------------------------------------------------------------------------------------
# lifecycle: removal, re-enabling, state reset, scheduler swaps, bare denoisers


def test_enable_disable_reenable_restores_pipeline(sd):
    latents = sd_latents(sd, seed=1)
    unet, sched = sd.unet, sd.scheduler
    processors = unet.attn_processors
    dicts = {name: set(m.__dict__) for name, m in unet.named_modules()}
    sched_dict = set(sched.__dict__)
    ref, _ = sd_run(sd, latents)

    fastdiff.enable_tgate(sd, gate_step=GATE)
    assert is_tgate_enabled(sd)
    first, _ = sd_run(sd, latents)
    second, _ = sd_run(sd, latents)  # state is reset between calls
    fastdiff.enable_tgate(sd, gate_step=GATE)  # enabling again replaces, never stacks
    third, _ = sd_run(sd, latents)
    fastdiff.disable_tgate(sd)
    fastdiff.disable_tgate(sd)  # no-op
    after, _ = sd_run(sd, latents)

    assert torch.equal(first, second) and torch.equal(first, third)
    assert torch.equal(after, ref)
    assert all(processors[k] is v for k, v in unet.attn_processors.items())
    assert {name: set(m.__dict__) for name, m in unet.named_modules()} == dicts
    assert set(sched.__dict__) == sched_dict and not is_tgate_enabled(sd)


def test_scheduler_swapped_after_enable(sd):
    latents = sd_latents(sd, seed=2)
    original = sd.scheduler
    try:
        sd.scheduler = DPMSolverMultistepScheduler.from_config(original.config)
        _, ref_trace = sd_run(sd, latents)
        sd.scheduler = original
        fastdiff.enable_tgate(sd, gate_step=GATE)
        sd.scheduler = DPMSolverMultistepScheduler.from_config(original.config)
        out, trace = sd_run(sd, latents)
        out2, _ = sd_run(sd, latents)
    finally:
        fastdiff.disable_tgate(sd)
        sd.scheduler = original
    for i in range(GATE):
        assert (trace[i] - ref_trace[i]).abs().max() <= 1e-6
    assert torch.equal(out, out2) and (trace[-1] - ref_trace[-1]).abs().max() > 0
    assert "step" not in original.__dict__


def test_bare_denoiser_matches_pipeline_mode(sd):
    latents = sd_latents(sd, n=2)
    fastdiff.enable_tgate(sd, gate_step=GATE)
    via_pipe, _ = sd_run(sd, latents, negative_prompt="a dog", num_images_per_prompt=2)
    fastdiff.disable_tgate(sd)
    fastdiff.enable_tgate(sd.unet, gate_step=GATE)
    via_model, _ = sd_run(sd, latents, negative_prompt="a dog", num_images_per_prompt=2)
    via_model2, _ = sd_run(sd, latents, negative_prompt="a dog", num_images_per_prompt=2)  # a larger timestep starts a new run
    fastdiff.disable_tgate(sd.unet)
    assert torch.equal(via_pipe, via_model) and torch.equal(via_model, via_model2)


@torch.no_grad()
def test_loop_that_sets_timesteps_once(sd):
    """A hand-written loop reusing one ``set_timesteps`` for two runs: the second starts afresh."""
    text = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3))

    def loop():
        x = sd_latents(sd, seed=3)
        for t in sd.scheduler.timesteps:
            u, c = sd.unet(torch.cat([x, x]), t, encoder_hidden_states=text).sample.chunk(2)
            x = sd.scheduler.step(u + 4.0 * (c - u), t, x).prev_sample
        return x

    fastdiff.enable_tgate(sd, gate_step=GATE)
    sd.scheduler.set_timesteps(STEPS)
    first, second = loop(), loop()
    assert torch.equal(first, second)


# ----------------------------------------------------------------------------------------------------
# errors


def test_errors(sd):
    with pytest.raises(ValueError, match="gate_step"):
        fastdiff.enable_tgate(sd, gate_step=0)
    with pytest.raises(TypeError, match="gate_step"):
        fastdiff.enable_tgate(sd, gate_step=2.5)
    with pytest.raises(ValueError, match="unknown keys"):
        fastdiff.enable_tgate(sd, gate_step=2, self_attn={"warmup": 2})
    with pytest.raises(ValueError, match="sp_interval"):
        fastdiff.enable_tgate(sd, gate_step=2, self_attn={"sp_interval": 0})
    with pytest.raises(ValueError, match="cond_weight must be >= 0"):
        fastdiff.enable_tgate(sd, gate_step=2, cond_weight=-1)
    with pytest.raises(TypeError, match="cond_weight must be a finite number"):
        fastdiff.enable_tgate(sd, gate_step=2, cond_weight=float("nan"))
    with pytest.raises(TypeError, match="pipe_or_model"):
        fastdiff.enable_tgate("not a pipeline", gate_step=2)
    with pytest.raises(ValueError, match="no cross-attention"):
        fastdiff.enable_tgate(tiny_ddpm_pipeline(), gate_step=2)
    assert not is_tgate_enabled(sd)

    fastdiff.enable_tgate(sd, gate_step=STEPS + 1)  # the bound is known once the pipeline sets its timesteps
    with pytest.raises(ValueError, match=rf"gate_step must lie in \[1, {STEPS}\]"):
        sd_run(sd, sd_latents(sd))
    fastdiff.enable_tgate(sd, gate_step=STEPS)  # = steps is allowed (and changes nothing)
    sd_run(sd, sd_latents(sd))

    x, text = torch.zeros(1, 4, 16, 16), torch.zeros(1, 16, 32)
    sd.scheduler.set_timesteps(STEPS)
    t0, t1 = sd.scheduler.timesteps[:2]
    sd.scheduler.step(sd.unet(x, t0, encoder_hidden_states=text).sample, t0, x)
    sd.unet(x, t1, encoder_hidden_states=text)
    with pytest.raises(RuntimeError, match="twice in one scheduler step"):  # e.g. separate CFG passes
        sd.unet(x, t1, encoder_hidden_states=text)


def test_joint_attention_unsupported():
    from diffusers import SD3Transformer2DModel

    sd3 = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
    )
    with pytest.raises(ValueError, match="joint"):
        fastdiff.enable_tgate(sd3, gate_step=2)
    assert not hasattr(sd3, "_diffusers_hook")


def test_bare_denoiser_rejects_parallel_timesteps(digits):
    fastdiff.enable_tgate(digits.transformer, gate_step=2)
    try:
        x = torch.zeros(2, 1, 16, 16)
        ctx = digits.encode_class_labels([1, 2], do_classifier_free_guidance=False)
        with pytest.raises(ValueError, match="one timestep per denoiser call"):
            digits.transformer(x, encoder_hidden_states=ctx, timestep=torch.tensor([900, 800]))
    finally:
        fastdiff.disable_tgate(digits.transformer)
