"""The training script's rough edges (issue 12, item 5): what it prints and logs, resume records, up-front
config errors, CPU multi-process launch, Min-SNR at zero terminal SNR."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from fastdiff.training import load_config
from fastdiff.training.checkpoint import list_checkpoints
from fastdiff.training.config import ConfigError, validate
from fastdiff.training.tracking import read_metrics
from fastdiff.training.train import LaunchError, check_launch, progress_postfix, train
from fastdiff.training.weighting import loss_weight, min_snr_floor

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits_testbed.yaml"
TINY = ["model.config.num_layers=3", "train.batch_size=8", "train.warmup_steps=1", "align.projector_dim=16",
        "log.every=1", "log.progress_bar=false", "eval.num_samples=20", "eval.inference_steps=2"]


def test_eval_is_printed_and_the_logged_loss_is_the_denoising_loss(tmp_path, capsys):
    records = []
    cfg = load_config(CONFIG, [f"output_dir={tmp_path}", *TINY, "--repa", "--max_steps", "2", "eval.every=2"])
    summary = train(cfg, callbacks=[lambda step, record: records.append(record)])
    out = capsys.readouterr().out
    assert "step 2: FD-digits" in out and "class accuracy" in out
    for record in records:
        assert record["loss"] > 0 and record["grad_norm"] > 0  # the MSE, not MSE + 0.5 * (-cos)
        assert record["loss/total"] == pytest.approx(record["loss"] + 0.5 * record["loss/repa"], rel=1e-5)
        assert list(progress_postfix(record)) == ["loss", "repa", "grad"]
    assert summary["losses"][1] == records[1]["loss"]
    logged = [r for r in read_metrics(tmp_path / "logs" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2] and all("grad_norm" in r and "loss/repa" in r for r in logged)


def test_resume_drops_the_records_of_replayed_steps(tmp_path):
    common = [f"output_dir={tmp_path}", *TINY, "eval.every=0", "checkpoint.every=3", "checkpoint.resume=auto"]
    train(load_config(CONFIG, [*common, "--max_steps", "5"]))
    root = tmp_path / "checkpoints"
    # a kill after step 5 but before its checkpoint landed: only step 3 is on disk, steps 4-5 were logged
    import shutil

    shutil.rmtree(root / "step_00000005")
    (root / "latest").write_text("step_00000003\n")
    assert [c.name for c in list_checkpoints(root)] == ["step_00000003"]
    train(load_config(CONFIG, [*common, "--max_steps", "6"]))
    steps = [r["step"] for r in read_metrics(tmp_path / "logs" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_every_config_error_up_front_in_one_message(monkeypatch):
    with pytest.raises(ConfigError, match=r"^train\.max_steps must be an integer; got 1\.5$"):
        validate(load_config(CONFIG, ["train.max_steps=1.5"]))
    bad = ["train.max_steps=1.5", "train.weighting=snr", "--haste", "align.teacher=nowhere", "align.repa_block=9",
           "data.class_dropout=1.5", "eval.num_samples=0"]
    with pytest.raises(ConfigError) as err:
        validate(load_config(CONFIG, bad))
    lines = str(err.value).splitlines()
    keys = ["train.max_steps", "train.weighting", "data.class_dropout", "eval.num_samples", "align.repa_block",
            "align.teacher"]
    assert sorted(line.split(" ", 1)[0] for line in lines) == sorted(keys)
    assert any("'none', 'min_snr', 'soft_min_snr'" in line for line in lines)
    assert any("0..5 (6 blocks)" in line for line in lines) and any("'digits_mae'" in line for line in lines)

    def never(*args, **kwargs):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr("fastdiff.training.train.build_model", never)
    monkeypatch.setattr("fastdiff.training.train.build_scheduler", never)
    with pytest.raises(ConfigError):
        train(load_config(CONFIG, bad))


def test_the_script_prints_config_errors_as_lines_not_a_traceback(tmp_path, capsys):
    from fastdiff.training.train import main

    with pytest.raises(SystemExit) as stop:  # `python -m fastdiff.training.train ...`
        main(["--config", str(CONFIG), f"output_dir={tmp_path}", "train.max_steps=1.5", "train.lr_schedule=linear"])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["fastdiff train: error: train.max_steps must be an integer; got 1.5",
                     "train.lr_schedule must be one of ('constant', 'cosine'); got 'linear'"]


def test_cpu_launch_with_several_processes_but_one_started_is_refused():
    simple_launcher = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with pytest.raises(LaunchError, match="torchrun --nproc_per_node N"):
        check_launch(simple_launcher)
    check_launch({**simple_launcher, "WORLD_SIZE": "2", "RANK": "0"})  # torchrun / a working launcher
    check_launch({"ACCELERATE_USE_CPU": "True"})  # accelerate launch --cpu with one process
    check_launch({})


def test_accelerate_launch_cpu_two_processes_says_why(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fastdiff.training.train",
           "--config", str(CONFIG), f"output_dir={tmp_path}", "--max_steps", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0, result.stdout[-2000:]
    assert "started a single process" in result.stderr and "torchrun" in result.stderr
    assert not (tmp_path / "checkpoints").exists()  # refused before anything was trained


def test_min_snr_floor_at_zero_terminal_snr():
    ztsnr = DDPMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    last = torch.tensor([999])
    assert loss_weight(last, ztsnr, "min_snr", 5.0).item() == 0.0  # Hang et al. as published: never trained
    floor = min_snr_floor(None, ztsnr)
    assert floor == 1.0 and min_snr_floor(None, ztsnr, "none") == 0.0
    assert loss_weight(last, ztsnr, "min_snr", 5.0, floor=floor).item() == pytest.approx(1.0)
    assert loss_weight(last, ztsnr, "min_snr", 5.0, "sample", floor=floor).item() == pytest.approx(1.0)
    t = torch.arange(0, 1000, 37)
    # the floor only lifts weights whose clipped SNR is below it (v: w = max(min(snr, 5), 1) / (snr + 1))
    snr = (ztsnr.alphas_cumprod[t] / (1 - ztsnr.alphas_cumprod[t])).double()
    expected = torch.clamp(torch.clamp(snr, max=5.0), min=1.0) / (snr + 1)
    torch.testing.assert_close(loss_weight(t, ztsnr, "min_snr", 5.0, floor=1.0), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_weight(t, ztsnr, "min_snr", 5.0, "epsilon", floor=1.0),
                               loss_weight(t, ztsnr, "min_snr", 5.0, "epsilon"))  # epsilon is never floored
    default = DDPMScheduler()  # no zero terminal SNR: Hang et al. unchanged
    assert min_snr_floor(None, default) == 0.0
    with pytest.raises(ValueError, match="min_snr_floor"):
        min_snr_floor(-1.0, default)


def test_training_passes_the_floor_to_the_loss(tmp_path, monkeypatch):
    import fastdiff.training.train as script

    seen = []
    real = script.diffusion_loss

    def spy(*args, floor=0.0, **kwargs):
        seen.append(floor)
        return real(*args, floor=floor, **kwargs)

    monkeypatch.setattr(script, "diffusion_loss", spy)
    ztsnr = ["scheduler.config.rescale_betas_zero_snr=true", "scheduler.config.prediction_type=v_prediction",
             "--weighting", "min_snr", "--max_steps", "1", "eval.every=0"]
    train(load_config(CONFIG, [f"output_dir={tmp_path}", *TINY, *ztsnr]))
    assert seen == [1.0]
