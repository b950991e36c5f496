"""Forecasts of kept features (order 1 / 2, TaylorSeer's Taylor form and the Newton form) and the warm-up /
cool-down schedule, each against an independent reference."""

from __future__ import annotations

import math

import pytest
import torch

import fastdiff
from fastdiff.caching.features import forecast_weights
from fastdiff.caching.schedule import calibrated_schedule, uniform_schedule
from fastdiff.testing import tiny_pixart_pipeline


def combine(weights, values):
    return sum(w * v for w, v in zip(weights, values))


def test_taylor_forecast_matches_diffusers_taylorseer_state():
    """diffusers' TaylorSeerState (max_order 2, float64 factors), fed full steps 0, 1, 3 and asked for step 4 and 6."""
    TaylorSeerState = pytest.importorskip("diffusers.hooks.taylorseer_cache",
                                          reason="diffusers < 0.36 has no TaylorSeer cache").TaylorSeerState

    g = torch.Generator().manual_seed(0)
    values = {s: torch.randn(3, 5, generator=g, dtype=torch.float64) for s in (0, 1, 3)}
    state = TaylorSeerState(taylor_factors_dtype=torch.float64, max_order=2)
    for s in (0, 1, 3):
        state.current_step = s
        state.update((values[s],))
    for target in (4, 6):
        state.current_step = target
        theirs = state.predict()[0]
        ours = combine(forecast_weights(float(target), [3.0, 1.0, 0.0], 2, "taylor"), [values[3], values[1], values[0]])
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("order", [1, 2])
def test_newton_forecast_is_exact_for_polynomials_of_its_order(order):
    times = [420.0, 470.0, 600.0][: order + 1]  # newest first, uneven spacing
    coef = torch.randn(order + 1, 4, generator=torch.Generator().manual_seed(order), dtype=torch.float64)
    poly = lambda t: sum(coef[i] * (t / 1000) ** i for i in range(order + 1))  # noqa: E731
    for target in (380.0, 300.0):
        got = combine(forecast_weights(target, times, order, "newton"), [poly(t) for t in times])
        torch.testing.assert_close(got, poly(target), rtol=1e-10, atol=1e-10)
    # the Taylor form is not exact at uneven spacing (it treats backward differences as derivatives at t_a)
    if order == 2:
        taylor = combine(forecast_weights(300.0, times, 2, "taylor"), [poly(t) for t in times])
        assert (taylor - poly(300.0)).abs().max() > 1e-6


def test_forecast_weights_reduce_to_the_first_order_form_and_drop_order_when_few_points():
    assert forecast_weights(2.0, [3.0, 5.0], 1) == pytest.approx([1.5, -0.5])
    for form in ("taylor", "newton"):
        assert forecast_weights(2.0, [3.0, 5.0], 1, form) == pytest.approx([1.5, -0.5])
        assert forecast_weights(2.0, [3.0, 5.0], 2, form) == pytest.approx([1.5, -0.5])  # only two kept
        assert math.fsum(forecast_weights(1.0, [3.0, 5.0, 6.0], 2, form)) == pytest.approx(1.0)


@torch.no_grad()
@pytest.mark.parametrize("forecast", ["newton", "taylor"])
def test_order2_block_reuse_matches_a_hand_written_forecast(forecast):
    """Reference: every block runs every step; at reuse steps forward hooks replace the span's output by its input
    plus the residual forecast from the last three full steps with independently written weights."""
    pixart = tiny_pixart_pipeline()
    blocks, kept, now = pixart.transformer.transformer_blocks, [], {"step": -1, "t": None}
    compute = [True, False, True, False, True, False, True, True]  # interval 2, cooldown 2 over 8 steps

    def weights(t, ts):
        if forecast == "newton" or len(ts) < 3:  # Lagrange form of the interpolating polynomial
            return [math.prod((t - tm) / (tj - tm) for m, tm in enumerate(ts) if m != j) for j, tj in enumerate(ts)]
        (a, b, c), k = ts, t - ts[0]  # TaylorSeer: f1 = (Fa - Fb)/(a - b), f1' = (Fb - Fc)/(b - c), f2 = (f1 - f1')/(a - b)
        return [1 + k / (a - b) + k * k / 2 / (a - b) ** 2,
                -k / (a - b) - k * k / 2 * (1 / (a - b) + 1 / (b - c)) / (a - b),
                k * k / 2 / ((b - c) * (a - b))]

    def pre(module, args, kwargs):
        now["step"] += 1
        now["t"] = float(kwargs["timestep"].reshape(-1)[0])

    def replace(module, args, kwargs, output):
        h = args[0] if args else kwargs["hidden_states"]
        if compute[now["step"]]:
            kept.insert(0, (now["t"], output - h))
            return None
        found = kept[:3]
        return h + combine(weights(now["t"], [t for t, _ in found]), [r for _, r in found])

    handles = [blocks[1].register_forward_hook(replace, with_kwargs=True),
               pixart.transformer.register_forward_pre_hook(pre, with_kwargs=True)]
    kw = dict(num_inference_steps=8, output_type="latent", use_resolution_binning=False, clean_caption=False)
    try:
        expected = pixart("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    finally:
        for h in handles:
            h.remove()
    ref = pixart("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    fastdiff.enable_cache(pixart, interval=2, cooldown=2, blocks=(1, 2), order=2, forecast=forecast)
    try:
        out = pixart("a cat", generator=torch.Generator().manual_seed(0), **kw).images
        assert pixart.transformer._fastdiff_cache.planner.features == compute
    finally:
        fastdiff.disable_cache(pixart)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - ref).abs().max() > 1e-4  # the forecast changed the run
    assert torch.equal(pixart("a cat", generator=torch.Generator().manual_seed(0), **kw).images, ref)


def test_warmup_and_cooldown_schedules():
    plan = lambda *a: "".join("C" if c else "." for c in uniform_schedule(*a))  # noqa: E731
    assert plan(10, 2) == "C.C.C.C.C."  # DeepCache's 1:N
    assert plan(10, 2, 1, 2) == "C.C.C.C.CC"
    assert plan(10, 2, 2) == "CC.C.C.C.C"  # TaylorSeer's disable_cache_before_step=2, cache_interval=2
    assert plan(10, 3, 3, 1) == "CCC..C..CC"
    schedule = calibrated_schedule([math.inf] + [0.1] * 9, 0.5, forced=[1, 9])
    assert schedule[0] and schedule[1] and schedule[9] and schedule.count(False) == 5


def test_combine_keeps_the_roundings_of_the_out_of_place_forms_and_never_writes_the_kept_values():
    from fastdiff.caching.features import combine

    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(64, 16, 16, 16, generator=g) for _ in range(3))
    copies = [x.clone() for x in (a, b, c)]
    w = forecast_weights(430.0, [480.0, 530.0, 630.0], 2, "newton")
    assert torch.equal(combine(w[:2], [a, b]), a + (-w[1]) * (a - b))  # the first-order form F_a + w (F_a - F_b)
    assert torch.equal(combine(w, [a, b, c]), (a + w[1] * (b - a)) + w[2] * (c - a))
    assert all(torch.equal(x, y) for x, y in zip((a, b, c), copies))
    torch.testing.assert_close(combine(w, [a.double(), b.double(), c.double()]),
                               sum(wj * x.double() for wj, x in zip(w, (a, b, c))), rtol=1e-12, atol=1e-12)


def test_values_with_both_cfg_halves_forecast_as_one_batch_equal_each_half_concatenated():
    from fastdiff.caching.engine import Layout, Run
    from fastdiff.caching.features import History

    g = torch.Generator().manual_seed(1)
    history, run = History(), Run(timestep=300.0)
    for t in (600.0, 500.0, 400.0):
        history.push(t, Layout.BOTH, (torch.randn(4, 3, generator=g), (torch.randn(4, 2, 2, generator=g),)))
    for order in (0, 1, 2):
        whole = history.load(run, Layout.BOTH, order, "newton")
        halves = [history.load(run, half, order, "newton") for half in (Layout.UNCOND, Layout.COND)]
        assert torch.equal(whole[0], torch.cat([halves[0][0], halves[1][0]]))
        assert torch.equal(whole[1][0], torch.cat([halves[0][1][0], halves[1][1][0]]))
    assert history.load(run, Layout.BOTH, 0) is history.entries[0][2]  # served as kept: no copy
    history.push(350.0, Layout.COND, (torch.randn(2, 3, generator=g), (torch.randn(2, 2, 2, generator=g),)))
    mixed = history.load(Run(timestep=320.0), Layout.BOTH, 1, "newton")  # halves kept at different steps
    kept = {t: v[0] for t, _, v in history.entries}
    uncond = combine(forecast_weights(320.0, [400.0, 500.0], 1, "newton"), [kept[400.0][:2], kept[500.0][:2]])
    cond = combine(forecast_weights(320.0, [350.0, 400.0], 1, "newton"), [kept[350.0], kept[400.0][2:]])
    torch.testing.assert_close(mixed[0], torch.cat([uncond, cond]), rtol=1e-6, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("guidance", [None, "residual"])
def test_deep_reuse_forecasting_only_f_cache_equals_forecasting_every_served_module(guidance):
    """Reference: the same cache with every served module forecast (as before). Only DeepCache's F_cache reaches a
    module that runs, so forecasting the others changes nothing: equal bit for bit, for every skip branch."""
    from diffusers.hooks import HookRegistry

    from fastdiff.caching.features import FEATURE_HOOK, deep_modules, num_branches
    from fastdiff.testing import tiny_sd_pipeline

    sd = tiny_sd_pipeline(sample_size=8)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sample = lambda: sd(["a cat", "a dog"], num_inference_steps=7, guidance_scale=5.0, latents=noise,  # noqa: E731
                        output_type="latent").images
    ref = sample()
    kw = dict(interval=2, cooldown=1, order=2, guidance=guidance, guidance_interval=3)
    for branch in range(num_branches(sd.unet)):
        fastdiff.enable_cache(sd, branch=branch, **kw)
        hooks = [HookRegistry.check_if_exists_or_initialize(m).get_hook(FEATURE_HOOK)
                 for m in deep_modules(sd.unet, branch)]
        assert [h.order for h in hooks] == [0] * (len(hooks) - 1) + [2]
        fast = sample()
        for h in hooks:
            h.order = 2  # forecast every served module
        every = sample()
        fastdiff.disable_cache(sd)
        assert torch.equal(fast, every) and (fast - ref).abs().max() > 0, branch


@torch.no_grad()
def test_histories_keep_only_what_their_forecast_reads(monkeypatch):
    """A module forecast at order k keeps its newest values until each CFG half is held by k + 1 of them (an order-0
    module keeps one, not six): nothing a forecast reads is dropped, so the samples equal those of a cache keeping six
    values per module (the earlier rule), with cond-only (guidance residual) steps in between."""
    from fastdiff.caching import features
    from fastdiff.caching.engine import Layout
    from fastdiff.testing import tiny_sd_pipeline

    sd = tiny_sd_pipeline(sample_size=8)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sample = lambda: sd(["a cat", "a dog"], num_inference_steps=9, guidance_scale=5.0, latents=noise,  # noqa: E731
                        output_type="latent").images
    kw = dict(interval=2, cooldown=1, order=2, guidance="residual", guidance_interval=3)
    held = lambda layouts, rows: sum(rows in features._HOLDS[x] for x in layouts)  # noqa: E731
    states, pushes, push = [], {}, features.History.push

    def watched(self, *args):
        push(self, *args)
        pushes[id(self)] = pushes.get(id(self), 0) + 1
        states.append((self.order, pushes[id(self)], [layout for _, layout, _ in self.entries]))

    monkeypatch.setattr(features.History, "push", watched)
    fastdiff.enable_cache(sd, **kw)
    pruned = sample()
    fastdiff.disable_cache(sd)
    assert {order for order, _, _ in states} == {0, 2} and Layout.COND in {x for *_, kept in states for x in kept}
    for order, pushed, kept in states:
        enough = lambda ls, k=order + 1: min(held(ls, "uncond"), held(ls, "cond")) >= k  # noqa: E731
        assert enough(kept) or len(kept) in (pushed, features._HISTORY), kept  # all there is, or the cap
        assert not enough(kept[:-1]), kept  # the oldest value kept is still needed
    assert max(len(kept) for order, _, kept in states if order == 0) < features._HISTORY

    def keep_six(self, t, layout, value):  # the earlier rule
        self.entries.insert(0, (t, layout, value))
        del self.entries[features._HISTORY:]

    monkeypatch.setattr(features.History, "push", keep_six)
    fastdiff.enable_cache(sd, **kw)
    six = sample()
    fastdiff.disable_cache(sd)
    assert torch.equal(pruned, six)
