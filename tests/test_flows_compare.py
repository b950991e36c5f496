"""``fastdiff compare --model tarflow-digits``: flow samplers against the sequential reference, CLI and errors."""

import json

import pytest
import torch
from test_flows_tarflow import tiny_flow

import fastdiff.compare
from fastdiff.cli import main
from fastdiff.flows import (
    DigitsTarFlowSettings,
    calibrate,
    invert,
    load_digits_tarflow,
    metric_images,
    sample,
)
from fastdiff.flows.compare import (
    FLOW_SAMPLERS,
    check_flow_compare_args,
    flow_sampler_kwargs,
    run_flow_compare,
    save_flow_outputs,
)
from fastdiff.metrics import evaluate_samples


@pytest.fixture(scope="module")
def tiny():
    """A float64 tiny flow (16 patch tokens of 2x2 pixels, 10 classes) and settings from its own calibration."""
    model = tiny_flow(num_classes=10, scale=0.05)
    cal = calibrate(model, torch.rand(8, 1, 8, 8, dtype=torch.float64) * 2 - 1, measure=True)
    return model, DigitsTarFlowSettings(guidance=1.0, annealed=True, calibration=cal, strategy_options={"easy_iters": 3})


@pytest.fixture(scope="module")
def tiny_run(tiny):
    return run_flow_compare(FLOW_SAMPLERS, flow=tiny, num_images=6, batch1_images=2, progress=False)


def test_cells_match_an_independent_sample_call(tiny, tiny_run):
    model, settings = tiny
    result, images = tiny_run
    assert [c.sampler for c in result.cells] == list(FLOW_SAMPLERS)
    noise = torch.randn(6, 16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.arange(6) % 10
    ref, _ = sample(model, labels, noise=noise, **flow_sampler_kwargs("sequential", settings, 16))
    for c in result.cells:
        kwargs = flow_sampler_kwargs(c.sampler, settings, 16)
        out, stats = sample(model, labels, noise=noise, **kwargs)
        m = evaluate_samples(metric_images(out), labels, value_range=(0, 1), metric="digits")
        assert c.fd == pytest.approx(m.fd, rel=1e-6) and c.accuracy == pytest.approx(m.accuracy)
        assert c.passes == stats.passes and c.pass_speedup == pytest.approx(stats.pass_speedup)
        assert c.rms_to_ref == pytest.approx(float((out.clamp(-1, 1) - ref.clamp(-1, 1)).pow(2).mean().sqrt()),
                                             rel=1e-6, abs=1e-12)
        torch.testing.assert_close(images[c.sampler], metric_images(out))
        assert c.seconds > 0 and c.seconds_batch1 > 0 and c.passes_batch1 >= 1
    cells = {c.sampler: c for c in result.cells}
    assert cells["sequential"].passes == 3 * 15 and cells["sequential"].rms_to_ref == 0
    assert cells["jacobi"].converged and cells["jacobi"].passes < cells["sequential"].passes
    assert [s["max_iters"] for s in cells["gs_jacobi_auto"].strategy] == \
        [s.max_iters for s in settings.strategy()]
    assert len(cells["gs_jacobi_fixed"].blocks[0]["iterations"]) == 8  # FIXED_SEGMENTS segments
    assert result.reference["fd"] == pytest.approx(cells["sequential"].fd)


def test_winners_and_json_follow_the_diffusion_compare_layout(tiny_run, tmp_path):
    result, images = tiny_run
    winners = result.winners()
    assert winners["passes"] == min(result.cells, key=lambda c: c.passes).sampler
    assert winners["rms_to_ref"] != "sequential"  # the reference's own zero error does not win
    fd_ref = result.reference["fd"]
    equal = [c for c in result.cells if abs(c.fd - fd_ref) <= 0.02 * fd_ref]
    assert winners["passes_at_equal_fd"] == min(equal, key=lambda c: c.passes).sampler
    paths = save_flow_outputs(result, images, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert set(data) == {"settings", "environment", "reference", "winners", "cells"}
    assert data["settings"]["kind"] == "flow" and "not applicable" in data["settings"]["steps"]
    assert {"sampler", "fd", "accuracy", "seconds", "rms_to_ref", "fd_to_ref", "passes"} <= set(data["cells"][0])
    assert paths["plot"].stat().st_size > 1000 and paths["grid"].stat().st_size > 1000


def test_guidance_overrides_the_models_default(tiny):
    model, settings = tiny
    result, _ = run_flow_compare(["jacobi"], flow=tiny, num_images=2, batch1_images=0, guidance=0.0, progress=False)
    assert result.settings["guidance"] == 0.0 and result.cells[0].seconds_batch1 is None
    noise = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x, _ = invert(model, noise, torch.arange(2), **flow_sampler_kwargs("jacobi", settings, 16, guidance=0.0))
    out = model.denoise(model.unpatchify(x), torch.arange(2))
    m = evaluate_samples(metric_images(out), torch.arange(2), value_range=(0, 1), metric="digits")
    assert result.cells[0].fd == pytest.approx(m.fd, rel=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"samplers": ["ddim"]}, "unknown flow sampler 'ddim'"),
    ({"samplers": []}, "at least one flow sampler"),
    ({"samplers": ["jacobi", "jacobi"]}, "must not repeat"),
    ({"num_images": 1}, "num_images must be an int >= 2"),
    ({"batch1_images": -1}, "batch1_images must be an int >= 0"),
    ({"guidance": -1.0}, "guidance must be a number >= 0"),
])
def test_bad_arguments(kwargs, message):
    args = {"samplers": ["jacobi"], "num_images": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        check_flow_compare_args(**args)
    with pytest.raises(ValueError, match=message):
        run_flow_compare(**args, flow=("not", "used"), progress=False)


def test_the_diffusion_compare_points_flows_to_their_own_compare():
    with pytest.raises(ValueError, match="normalizing flow.*run_flow_compare"):
        fastdiff.compare.run_compare(["ddim"], [2], model="tarflow-digits", progress=False)


def run_cli(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as exit_info:
        rc = exit_info.code
    return rc, capsys.readouterr()


@pytest.mark.parametrize("extra, message", [
    (["--steps", "5"], "--steps does not apply to --model tarflow-digits"),
    (["--reference-sampler", "ddim"], "--reference-sampler does not apply"),
    (["--tgate", "3"], "--tgate does not apply"),
    (["--prompt", "a cat"], "--prompt does not apply"),
    (["--samplers", "ddim"], "unknown flow sampler 'ddim'; the flow's samplers are its inversion strategies"),
    (["--guidance-scale", "-1"], "guidance must be a number >= 0"),
])
def test_cli_refuses_diffusion_options_before_any_work(extra, message, capsys, monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("run_flow_compare was called")

    monkeypatch.setattr(fastdiff.compare, "run_flow_compare", refuse)
    rc, out = run_cli(["compare", "--model", "tarflow-digits", "--out", str(tmp_path), *extra], capsys)
    assert rc == 2 and message in out.err


def test_cli_batch1_images_is_a_flow_option(capsys, tmp_path):
    rc, out = run_cli(["compare", "--batch1-images", "2", "--out", str(tmp_path)], capsys)
    assert rc == 2 and "--batch1-images applies to flow models only" in out.err


def test_cli_compares_the_shipped_flow(capsys, tmp_path):
    rc, out = run_cli(["compare", "--model", "tarflow-digits", "--samplers", "sequential,gs_jacobi_auto",
                       "--num-images", "4", "--batch1-images", "1", "--out", str(tmp_path), "--no-progress"], capsys)
    assert rc == 0, out.err
    assert "gs_jacobi_auto" in out.out and "reference: sequential" in out.out
    data = json.loads((tmp_path / "compare.json").read_text())
    cells = {c["sampler"]: c for c in data["cells"]}
    assert cells["sequential"]["passes"] == 4 * 63  # 4 blocks x (64 tokens - 1)
    assert cells["gs_jacobi_auto"]["pass_speedup"] >= 2.5 and cells["gs_jacobi_auto"]["rms_to_ref"] < 0.05
    assert data["settings"]["guidance"] == load_digits_tarflow()[1].guidance
    assert data["reference"]["sampler"] == "sequential"
