"""fastdiff.studies: the measurements, result readers and plots behind the notebooks."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fastdiff
from fastdiff.studies import (
    count_macs,
    denoiser_batch_seconds,
    describe_training,
    diffusers_cache,
    image_strip,
    load_result,
    markdown_table,
    median_seconds,
    sample_grid,
    save_figure,
    steps_to_reach,
    training_curves,
    training_results,
)
from fastdiff.studies.measure import _tile


@pytest.fixture(scope="module")
def pipe():
    p = fastdiff.load_embedded_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def test_median_seconds_calls_and_validates() -> None:
    calls = []
    assert median_seconds(lambda: calls.append(1), repeats=3, warmup=2) >= 0
    assert len(calls) == 5
    with pytest.raises(ValueError, match="repeats"):
        median_seconds(lambda: None, repeats=0)
    with pytest.raises(TypeError, match="fn"):
        median_seconds(3)


def test_count_macs_counts_only_the_module() -> None:
    inner, outer = torch.nn.Linear(8, 4, bias=False), torch.nn.Linear(4, 3, bias=False)
    x = torch.randn(5, 8)
    assert count_macs(lambda: outer(inner(x)), inner) == 5 * 8 * 4  # outer's 5 * 4 * 3 is not counted
    assert count_macs(lambda: outer(inner(x)), outer) == 5 * 4 * 3


def test_tile_repeats_batch_tensors_only() -> None:
    x, scalar, other = torch.randn(2, 3), torch.tensor(5.0), torch.randn(7, 1)
    out = _tile((x, {"t": scalar, "nested": [x, other]}), batch=2, times=3)
    assert out[0].shape == (6, 3) and torch.equal(out[0][2:4], x)
    assert out[1]["t"] is scalar and out[1]["nested"][1] is other and out[1]["nested"][0].shape == (6, 3)


def test_denoiser_batch_seconds_replays_the_pipeline_call(pipe) -> None:
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(a[0].shape[0]),
                                                        with_kwargs=True)
    try:
        seconds = denoiser_batch_seconds(pipe, [1, 3], repeats=1, class_labels=[1, 2], guidance_scale=2.0)
    finally:
        handle.remove()
    assert sorted(seconds) == [1, 3] and all(s > 0 for s in seconds.values())
    assert seen[0] == 4  # the pipeline's own call: 2 labels x CFG
    assert set(seen[1:]) == {4, 12}  # replays at 1x and 3x that batch (warm-up + timed)
    with pytest.raises(ValueError, match="batches"):
        denoiser_batch_seconds(pipe, [0], class_labels=[1])


def test_image_strip_and_grid(tmp_path) -> None:
    x = torch.rand(12, 1, 16, 16)
    strip = image_strip(x, 10)
    assert strip.shape == (16, 160)
    assert torch.allclose(torch.from_numpy(strip[:, 16:32]), x[1, 0])
    assert image_strip(torch.rand(3, 3, 8, 8), 2).shape == (8, 16, 3)
    with pytest.raises(ValueError, match="images"):
        image_strip(torch.rand(2, 16, 16))
    fig = sample_grid({("a", "5"): x, ("a", "10"): x, ("b", "5"): x}, count=4, title="t")
    assert len(fig.axes) == 4  # 2 rows x 2 columns, one blank
    path = save_figure(fig, tmp_path / "sub" / "grid.png")
    assert path.is_file() and path.stat().st_size > 0
    with pytest.raises(ValueError, match="mapping"):
        sample_grid({})


def test_steps_to_reach_takes_the_last_downward_crossing() -> None:
    steps, fd = [100, 200, 300, 400], [50.0, 30.0, 45.0, 20.0]
    assert steps_to_reach(steps, fd, 40.0) == pytest.approx(300 + 100 * (45 - 40) / (45 - 20))  # not the touch at 200
    assert steps_to_reach(steps, fd, 60.0) == 100.0
    assert steps_to_reach(steps, [50.0, 10.0, 30.0, 45.0], 40.0) is None  # ends above the target
    with pytest.raises(ValueError, match="equal length"):
        steps_to_reach([1, 2], [1.0], 1.0)


def _summary(fds, steps=(10, 20, 30)):
    return {"evals": [{"step": s, "fd": f} for s, f in zip(steps, fds)]}


def test_training_curves_from_every_shape(tmp_path) -> None:
    bench = {"curves": {"baseline": {"steps": [10, 20], "fd_mean": [9.0, 4.0], "fd_std": [1.0, 0.5]},
                        "broken": {"steps": [10], "fd_mean": [1.0, 2.0]}}}
    assert training_curves(bench) == {"baseline": {"steps": [10, 20], "fd_mean": [9.0, 4.0], "fd_std": [1.0, 0.5]}}
    runs = {"runs": {"baseline": {"0": _summary([9.0, 6.0, 4.0]), "1": _summary([7.0, 4.0, 2.0])}}}
    c = training_curves(runs)["baseline"]
    assert c["steps"] == [10, 20, 30] and c["fd_mean"] == [8.0, 5.0, 3.0] and c["fd_std"] == [1.0, 1.0, 1.0]
    live = training_curves({"baseline": _summary([5.0, 3.0, float("nan")]), "other": {"evals": "nonsense"}})
    assert live == {"baseline": {"steps": [10, 20], "fd_mean": [5.0, 3.0], "fd_std": [0.0, 0.0], "num_runs": [1, 1]}}
    assert training_curves(None) == {} and training_curves({"environment": {"device": "cpu"}}) == {}
    assert training_results({"cond": bench, "note": "x"}) == {"cond": bench}
    assert training_results(bench) == {"": bench}
    split = {"environment": {"date": "d"}, "curves": bench["curves"], "testbeds": {"a": bench, "b": {"x": 1}}}
    assert training_results(split) == {"a": {"environment": {"date": "d"}, **bench}}
    # a testbed scored on fewer seeds than the file's setup.seeds reports its own (setup.seeds_scored)
    scored = {"setup": {"seeds": [0, 1, 2], "seeds_scored": {"a": [0, 1]}}, "testbeds": {"a": bench, "c": bench}}
    per = training_results(scored)
    assert per["a"]["setup"]["seeds"] == [0, 1] and per["c"]["setup"]["seeds"] == [0, 1, 2]
    # ... and a testbed with its own budget its own steps (setup.steps_per_testbed)
    budgets = {"setup": {"steps": {"a": 40, "c": 20}, "steps_per_testbed": {"a": 40, "c": 20}},
               "testbeds": {"a": bench, "c": bench}}
    per = training_results(budgets)
    assert per["a"]["setup"]["steps"] == 40 and per["c"]["setup"]["steps"] == 20


def test_describe_training_is_computed_from_the_data() -> None:
    result = {"environment": {"device": "cpu: test", "date": "2026-01-01"}, "setup": {"steps": 30, "seeds": [0]},
              "runs": {"baseline": {"0": _summary([10.0, 8.0, 6.0])}, "min_snr": {"0": _summary([9.0, 6.0, 4.0])},
                       "repa": {"0": _summary([12.0, 11.0, 9.0])}},
              "speed": {"min_snr": {"throughput_vs_baseline": 0.98}}}
    lines = describe_training(result)
    assert lines[0] == "30 training steps, 1 seed(s); cpu: test, 2026-01-01"
    assert lines[1] == "baseline: final FD 6.0 at step 30"
    # min_snr reaches 6.0 at step 20 (exactly), the baseline at 30: 0.67x
    assert lines[2] == "min_snr: final FD 4.0 at step 30; reaches the baseline's final FD (6.0) at 0.67x its steps (mean curve); throughput 0.98x"
    assert lines[3] == "repa: final FD 9.0 at step 30; does not reach the baseline's final FD (6.0)"
    assert describe_training({}) == ["no training curves in this result"]
    # a baseline whose FD rises at the end: steps to its final FD would measure the bump (as the benchmark says)
    bump = {"runs": {"baseline": {"0": _summary([10.0, 5.0, 7.0])}, "repa": {"0": _summary([9.0, 6.0, 6.5])}}}
    assert describe_training(bump)[1] == ("repa: final FD 6.5 at step 30; steps to the baseline's final FD not "
                                          "assessable: its FD rises at the end (best 5.0, final 7.0)")


def test_load_result_is_defensive(tmp_path) -> None:
    good = tmp_path / "r.json"
    good.write_text(json.dumps({"a": 1}))
    assert load_result(good) == {"a": 1}
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1]")
    for name in ("missing.json", "bad.json", "list.json"):
        with pytest.warns(UserWarning):
            assert load_result(tmp_path / name) is None


def test_markdown_table() -> None:
    table = markdown_table([{"a": 1, "b": 0.123456, "c": None}, {"a": "x", "b": math.inf}])
    assert table.splitlines() == ["| a | b | c |", "|---|---|---|", "| 1 | 0.123 |  |", "| x | inf |  |"]
    assert markdown_table([]) == "(no rows)"


def test_diffusers_cache_changes_the_run_and_is_removed(pipe) -> None:
    def run():
        return pipe([1, 7], num_inference_steps=6, guidance_scale=2.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    reference = run()
    with diffusers_cache(pipe, "pab") as config:
        assert type(config).__name__ == "PyramidAttentionBroadcastConfig"
        first, second = run(), run()
    assert not torch.allclose(first, reference)  # attention is broadcast across steps
    assert torch.equal(first, second)  # each trajectory starts from a clean cache
    assert torch.equal(run(), reference) and pipe.transformer._cache_config is None  # removed: as before
    with pytest.raises(ValueError, match="name must be one of"):
        with diffusers_cache(pipe, "deepcache"):
            pass
    with pytest.raises(TypeError, match="config must be one of this diffusers' cache configs"):
        with diffusers_cache(pipe, lambda timestep: object()):  # not a diffusers cache config
            pass
    assert torch.equal(run(), reference) and pipe.transformer._cache_config is None
