"""benchmarks/training_speed.py: per-testbed budgets and runs continued to a longer budget instead of retrained."""

import argparse
import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.config.num_layers=3", "train.batch_size=8", "train.warmup_steps=1", "align.projector_dim=16",
        "log.every=1", "eval.num_samples=20", "eval.inference_steps=2"]


@pytest.fixture()
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("training_speed_budget", ROOT / "benchmarks" / "training_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.calls = []

    def in_process(cmd, **_):  # the worker subprocess, run here (same code path, no interpreter start-up)
        testbed, method, seed, out, _, *rest = cmd[cmd.index("--worker") + 1:]
        module.calls.append(rest)
        module.worker(testbed, method, int(seed), Path(out), rest)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(module.subprocess, "run", in_process)
    return module


def overrides(bench, steps, *extra):
    args = argparse.Namespace(eval_every=2, num_samples=20, inference_steps=2, override=[*TINY, *extra])
    return bench.shared_overrides(args, steps)


def test_a_longer_budget_continues_the_shorter_run_and_matches_a_fresh_one(bench, tmp_path):
    short = bench.run_worker("unconditional", "repa", 0, tmp_path / "a", overrides(bench, 2))
    extended = bench.run_worker("unconditional", "repa", 0, tmp_path / "a", overrides(bench, 4))
    fresh = bench.run_worker("unconditional", "repa", 0, tmp_path / "b", overrides(bench, 4))
    assert "checkpoint.resume=auto" in bench.calls[1] and "checkpoint.resume=auto" not in bench.calls[2]
    assert extended["extended_from"] == [2] and "extended_from" not in fresh
    assert [e["step"] for e in extended["evals"]] == [e["step"] for e in fresh["evals"]] == [2, 4]
    assert extended["evals"][0] == short["evals"][0]
    continued, again = ({int(k): v for k, v in r["losses"].items()} for r in (extended, fresh))
    assert sorted(continued) == sorted(again) == [0, 1, 2, 3]
    for step in (0, 1, 2, 3):  # steps 0..1 from the first run, 2..3 continued from its checkpoint
        assert continued[step] == pytest.approx(again[step], rel=1e-5, abs=1e-7)
    assert extended["evals"][1]["fd"] == pytest.approx(fresh["evals"][1]["fd"], rel=1e-4)
    assert extended["teacher_calls"] == fresh["teacher_calls"]
    # the same budget again: kept, not rerun
    assert bench.run_worker("unconditional", "repa", 0, tmp_path / "a", overrides(bench, 4)) == extended
    assert len(bench.calls) == 3


def test_only_the_same_config_with_a_constant_lr_is_continued(bench, tmp_path):
    bench.run_worker("unconditional", "baseline", 0, tmp_path / "a", overrides(bench, 2))
    assert bench.extendable("unconditional", tmp_path / "a", overrides(bench, 4)) == 2
    assert bench.extendable("unconditional", tmp_path / "a", overrides(bench, 2)) is None  # not longer
    assert bench.extendable("unconditional", tmp_path / "a", overrides(bench, 4, "train.lr=0.002")) is None
    assert bench.extendable("unconditional", tmp_path / "a", overrides(bench, 4, "train.lr_schedule=cosine")) is None
    assert bench.extendable("unconditional", tmp_path / "missing", overrides(bench, 4)) is None
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "linked").symlink_to(tmp_path / "a")  # another work dir's run, reused by a link
    with pytest.raises(ValueError, match="links to .* copy it into the work dir"):
        bench.extendable("unconditional", tmp_path / "work" / "linked", overrides(bench, 4))


def test_merged_summary_keeps_every_evaluation_once():
    spec = importlib.util.spec_from_file_location("training_speed_merge", ROOT / "benchmarks" / "training_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    first = {"evals": [{"step": 2, "fd": 9.0}, {"step": 4, "fd": 8.0}], "losses": {"1": 0.5}, "final_step": 4,
             "wall_seconds": 10.0, "teacher_calls": 3, "terminated_at": 3, "throughput_img_per_s": 1.0}
    then = {"evals": [{"step": 4, "fd": 7.0}, {"step": 6, "fd": 6.0}], "losses": {"5": 0.4}, "final_step": 6,
            "wall_seconds": 5.0, "teacher_calls": 0, "terminated_at": None, "throughput_img_per_s": 2.0}
    merged = bench.merge_summaries(first, then)
    assert merged["evals"] == [{"step": 2, "fd": 9.0}, {"step": 4, "fd": 7.0}, {"step": 6, "fd": 6.0}]
    assert merged["losses"] == {"1": 0.5, "5": 0.4} and merged["final_step"] == 6 and merged["extended_from"] == [4]
    assert merged["wall_seconds"] == 15.0 and merged["teacher_calls"] == 3 and merged["terminated_at"] == 3
    assert merged["throughput_img_per_s"] == 2.0


def test_budget_defaults_to_each_testbed_config(bench):
    from fastdiff.training import load_config

    args = argparse.Namespace(steps=None, override=[])
    for bed, path in bench.TESTBEDS.items():
        assert bench.testbed_steps(args, bed) == load_config(path).train.max_steps
    assert bench.testbed_steps(argparse.Namespace(steps=7, override=[]), "conditional") == 7
