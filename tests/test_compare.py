"""``fastdiff.compare``: the sampler's own error against a converged reference, winners, Ctrl-C, any pipeline."""

import json

import pytest

from fastdiff.compare import CompareInterrupted, run_compare, save_outputs


@pytest.fixture(scope="module")
def small_run():
    return run_compare(["ddim", "dpmpp_2m"], [2, 4, 8], num_images=20, reference=("dpmpp_2m", 16), progress=False)


def test_error_to_the_converged_solution_falls_with_steps(small_run):
    result, images = small_run
    ref = images[("reference", 16)]
    for name in ("ddim", "dpmpp_2m"):
        cells = [c for c in result.cells if c.sampler == name]
        rms = [c.rms_to_ref for c in cells]
        assert rms == sorted(rms, reverse=True) and rms[-1] < 0.5 * rms[0]
        for c in cells:  # the recorded rms is the rms over pixels in the [-1, 1] data range
            expected = float((images[(name, c.steps)] - ref).pow(2).mean().sqrt() * 2)
            assert c.rms_to_ref == pytest.approx(expected, rel=1e-6)
            assert c.fd_to_ref >= 0
    assert result.reference["sampler"] == "dpmpp_2m" and result.reference["steps"] == 16
    assert result.reference["fd"] > 0 and 0 <= result.reference["accuracy"] <= 1


def test_winners_are_the_lowest_value_per_step_count(small_run):
    result, _ = small_run
    winners = result.winners()
    for measure in ("rms_to_ref", "fd_to_ref", "fd"):
        for steps, name in winners[measure].items():
            values = {c.sampler: getattr(c, measure) for c in result.cells if c.steps == steps}
            assert values[name] == min(values.values())


def test_json_records_reference_noise_timing_and_winners(small_run, tmp_path):
    result, images = small_run
    paths = save_outputs(result, images, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["reference"]["steps"] == 16 and "fd" in data["reference"]
    assert set(data["winners"]) == {"rms_to_ref", "fd_to_ref", "fd"}
    assert "seed 0" in data["settings"]["noise"] and "warm-up" in data["settings"]["timing"]
    assert {"rms_to_ref", "fd_to_ref", "fd", "accuracy", "seconds"} <= set(data["cells"][0])
    assert paths["plot"].stat().st_size > 1000 and paths["grid"].stat().st_size > 1000


def test_warm_up_is_not_timed(monkeypatch):
    """The first cell's time excludes first-call costs: a warm-up call runs before any timed cell."""
    import fastdiff.compare as compare

    calls = []
    original = compare._Target.__call__

    def spy(self, n, guidance_scale):
        calls.append(n)
        return original(self, n, guidance_scale)

    monkeypatch.setattr(compare._Target, "__call__", spy)
    run_compare(["ddim"], [3], num_images=4, reference=("ddim", 4), progress=False)
    assert calls[:2] == [1, 4] and 3 in calls[2:]  # warm-up (1 step), then the reference, then the cell


def test_ctrl_c_keeps_finished_cells(monkeypatch):
    import fastdiff.compare as compare

    original, seen = compare._quality, []

    def interrupt_on_third(images, target, notes):
        seen.append(1)
        if len(seen) == 3:  # reference, first cell, then Ctrl-C during the second cell's scoring
            raise KeyboardInterrupt
        return original(images, target, notes)

    monkeypatch.setattr(compare, "_quality", interrupt_on_third)
    with pytest.raises(CompareInterrupted) as info:
        run_compare(["ddim"], [2, 3], num_images=4, reference=("ddim", 4), progress=False)
    assert isinstance(info.value, KeyboardInterrupt)
    assert [(c.sampler, c.steps) for c in info.value.result.cells] == [("ddim", 2)]
    assert ("ddim", 2) in info.value.images and info.value.result.settings["interrupted"]


@pytest.mark.parametrize("kwargs, message", [
    ({"samplers": []}, "at least one sampler"),
    ({"steps": []}, "at least one step count"),
    ({"steps": [True]}, "steps must be integers"),
    ({"reference": ("nope", 10)}, "unknown sampler 'nope'"),
    ({"reference": ("ddim", 0)}, "steps must be integers"),
    ({"num_images": 1}, "num_images must be an int >= 2"),
])
def test_bad_arguments(kwargs, message):
    args = {"samplers": ["ddim"], "steps": [2], "num_images": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        run_compare(args.pop("samplers"), args.pop("steps"), progress=False, **args)


def test_any_diffusers_pipeline_from_a_directory(tmp_path):
    """A tiny Stable Diffusion pipeline saved to disk: no data reference, so it is ranked by its error."""
    from fastdiff.testing import tiny_sd_pipeline

    tiny_sd_pipeline().save_pretrained(tmp_path / "sd")
    result, images = run_compare(["ddim", "dpmpp_2m"], [2, 6], model=str(tmp_path / "sd"), num_images=2,
                                 reference=("dpmpp_2m", 12), guidance_scale=3.0, prompts=["a cat"], progress=False)
    assert all(c.fd is None and c.accuracy is None and c.fd_to_ref is None for c in result.cells)
    assert all(c.nfe == c.steps for c in result.cells)  # one CFG-batched UNet call per step
    for name in ("ddim", "dpmpp_2m"):
        rms = [c.rms_to_ref for c in result.cells if c.sampler == name]
        assert rms[1] < rms[0]
    assert images[("ddim", 2)].shape[1] == 3
    assert result.settings["model"] == str(tmp_path / "sd")
    assert set(result.winners()) == {"rms_to_ref"}
    save_outputs(result, images, tmp_path / "out")


def test_unknown_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="neither a diffusers pipeline directory"):
        run_compare(["ddim"], [2], model=str(tmp_path / "missing"), num_images=2, progress=False)
