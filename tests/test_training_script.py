"""The accelerate training script: config, exact resume after a kill, atomic checkpoints, DDP equivalence,
resume policy, accelerate's mixed precision, Ctrl-C."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastdiff.training import NonFiniteLossError, TrainingInterrupted, load_config, shipped_configs
from fastdiff.training.checkpoint import (
    CONFIG_FILE,
    config_differences,
    latest_checkpoint,
    list_checkpoints,
    resume_point,
)
from fastdiff.training.config import Config, find_config, flatten
from fastdiff.training.datasets import ImageFolderDataset, StepBatchSampler, batch_indices
from fastdiff.training.tracking import read_metrics
from fastdiff.training.train import mixed_precision_choice, train

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits_dit.yaml"
TINY = ["model.config.num_layers=3", "model.config.attention_head_dim=8", "model.config.num_attention_heads=2",
        "model.config.cross_attention_dim=16", "model.config.caption_channels=16", "model.config.patch_size=4",
        "align.projector_dim=16", "align.token_matching=interpolate", "train.batch_size=8", "train.warmup_steps=2",
        "eval.every=0", "log.every=1", "log.progress_bar=false", "checkpoint.every=3"]


def tiny_config(out: Path, *extra: str):
    return load_config(CONFIG, [f"output_dir={out}", *TINY, *extra])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step HASTE + Min-SNR run (terminating at step 4)."""
    out = tmp_path_factory.mktemp("reference")
    summary = train(tiny_config(out, "--haste", "--weighting", "min_snr", "--max_steps", "6", "align.stop_step=4"))
    return out, summary


def test_config_overrides_and_errors(tmp_path):
    cfg = load_config(CONFIG, ["--repa", "--weighting", "min_snr", "--max_steps", "7", "train.lr=1e-4",
                               "model.config.num_layers=2", "align.attn_pairs=[[0, 1]]"])
    assert cfg.align.repa and cfg.train.weighting == "min_snr" and cfg.train.max_steps == 7
    assert cfg.train.lr == 1e-4 and cfg.model.config == {"num_layers": 2} and cfg.align.attn_pairs == [[0, 1]]
    assert cfg.train.mixed_precision is None  # unset: accelerate's setting applies
    for argv in (["--mixed_precision", "no"], ["train.mixed_precision=no"]):  # a string, not YAML's False
        assert load_config(CONFIG, argv).train.mixed_precision == "no"
    with pytest.raises(ValueError, match="mixed_precision must be a string.*quote it"):
        load_config(CONFIG, ["--config", str(_yaml(tmp_path, "train:\n  mixed_precision: no\n"))])
    with pytest.raises(ValueError, match=r"unknown config key 'train.lrr'.*'lr'"):
        load_config(CONFIG, ["train.lrr=1"])
    with pytest.raises(ValueError, match="must be a number"):
        load_config(CONFIG, ["train.lr=fast"])
    with pytest.raises(ValueError, match="weighting must be one of"):
        train(tiny_config(tmp_path, "--weighting", "snr_plus", "--max_steps", "1"))
    with pytest.raises(ValueError, match=r"align.repa_block must be .*an int in 0\.\.2 \(3 blocks\); got 3"):
        train(tiny_config(tmp_path / "b", "--repa", "align.repa_block=3", "--max_steps", "1"))


def _yaml(folder: Path, text: str) -> Path:
    path = folder / "config.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_load_by_name_from_any_directory(tmp_path, monkeypatch):
    repo_configs = CONFIG.parent
    assert shipped_configs() == sorted(p.stem for p in repo_configs.glob("*.yaml"))
    # one copy: the package's configs folder is the repository's configs/
    assert (Path(__file__).resolve().parents[1] / "fastdiff" / "configs").resolve() == repo_configs
    monkeypatch.chdir(tmp_path)
    by_path = load_config(None, ["--config", str(CONFIG)])
    for name in ("digits_dit", "digits_dit.yaml"):
        assert find_config(name).resolve() == CONFIG and load_config(None, ["--config", name]) == by_path
    assert by_path.train.max_steps == 3000 != Config().train.max_steps  # the YAML, not the built-in defaults
    with pytest.raises(FileNotFoundError, match=r"'configs/digits_dit.yaml' is neither a file.*--config digits_dit"):
        load_config(None, ["--config", "configs/digits_dit.yaml"])
    with pytest.raises(FileNotFoundError, match=r"'nope' is neither a file nor a shipped config \(.*digits_dit"):
        load_config(None, ["--config", "nope"])


def test_batches_are_a_function_of_step_and_split_over_processes():
    full = batch_indices(5, 8, 20, seed=3)
    assert torch.equal(full, batch_indices(5, 8, 20, seed=3)) and len(set(full.tolist())) == 8
    halves = [next(iter(StepBatchSampler(20, 8, 3, 5, 6, rank, 2))) for rank in (0, 1)]
    assert halves[0] + halves[1] == full.tolist()
    epoch = torch.cat([batch_indices(s, 4, 20, seed=3) for s in range(5)])
    assert sorted(epoch.tolist()) == list(range(20))  # every sample once per epoch


def test_haste_run_terminates_and_exports(reference):
    out, summary = reference
    assert summary["final_step"] == 6 and summary["terminated_at"] == 4
    assert summary["teacher_calls"] == 4  # never after termination
    records = [r for r in read_metrics(out / "logs" / "metrics.jsonl") if "loss" in r]
    assert [r["align/active"] for r in records] == [1.0] * 4 + [0.0] * 2
    assert "loss/attn" in records[0] and "loss/repa" in records[0] and "loss/attn" not in records[-1]
    assert summary["throughput_img_per_s"] > 0
    assert (out / "pipeline" / "model_index.json").is_file()


KILLER = """
import os, signal, sys
from fastdiff.training import checkpoint, load_config
from fastdiff.training.train import train

where, config_path, *argv = sys.argv[1:]
if where.startswith("step:"):  # SIGKILL right after optimisation step N
    callbacks = [lambda step, record: step == int(where[5:]) and os.kill(os.getpid(), signal.SIGKILL)]
else:  # SIGKILL between writing checkpoint N and renaming it into place
    callbacks, real = [], os.replace
    def replace(src, dst):
        if os.path.basename(src) == ".tmp-step_%08d" % int(where[11:]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)
    checkpoint.os.replace = replace
train(load_config(config_path, argv), callbacks=callbacks)
"""


def run_and_kill(where: str, out: Path, *args: str) -> None:
    """Train in a subprocess that SIGKILLs itself at ``where`` (no cleanup, no ``finally``)."""
    cmd = [sys.executable, "-c", KILLER, where, str(CONFIG), f"output_dir={out}", *TINY, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == -9, result.stderr[-3000:]


def test_resume_after_kill_reproduces_the_loss_curve(reference, tmp_path):
    _, uninterrupted = reference
    args = ("--haste", "--weighting", "min_snr", "--max_steps", "6", "align.stop_step=4")
    run_and_kill("step:4", tmp_path, *args)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000003"
    resumed = train(tiny_config(tmp_path, *args))
    assert resumed["resumed_from"].endswith("step_00000003")
    assert sorted(resumed["losses"]) == [3, 4, 5]
    for step in (3, 4, 5):  # step 3 recomputed from the restored state, then past termination
        assert resumed["losses"][step] == pytest.approx(uninterrupted["losses"][step], rel=1e-6, abs=1e-7)
    assert resumed["teacher_calls"] == 1  # step 3 only: the termination state was restored


def test_kill_during_checkpoint_write_keeps_the_last_good_one(tmp_path):
    run_and_kill("checkpoint:6", tmp_path, "--max_steps", "6")
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step_00000003"]
    assert latest_checkpoint(root).name == "step_00000003"
    assert (root / ".tmp-step_00000006" / "model.safetensors").is_file()  # written, never renamed: ignored
    resumed = train(tiny_config(tmp_path, "--max_steps", "6"))
    assert sorted(resumed["losses"]) == [3, 4, 5] and latest_checkpoint(root).name == "step_00000006"
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())


def test_non_finite_loss_stops_with_the_step(tmp_path, monkeypatch):
    import fastdiff.training.train as train_module

    real = train_module.diffusion_loss
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train_module, "diffusion_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 2"):
        train(tiny_config(tmp_path, "--max_steps", "5"))


def test_image_folder_dataset(tmp_path):
    from PIL import Image

    for cls, value in (("cats", 0), ("dogs", 255)):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (20, 12), (value, value, value)).save(tmp_path / cls / "a.png")
    ds = ImageFolderDataset(tmp_path, resolution=8, channels=3)
    (x0, y0), (x1, y1) = ds[0], ds[1]
    assert x0.shape == (3, 8, 8) and ds.classes == ["cats", "dogs"] and (y0, y1) == (0, 1)
    assert x0.min() == -1 and x1.max() == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path / "empty", 8)


def test_two_gloo_processes_equal_one_process(reference, tmp_path):
    """torchrun --nproc_per_node 2 with the same global batch reproduces the single-process run."""
    ref_out, ref = reference
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "fastdiff.training.train", "--config", str(CONFIG), f"output_dir={tmp_path}", *TINY,
           "--haste", "--weighting", "min_snr", "--max_steps", "6", "align.stop_step=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout + result.stderr
    losses = {r["step"] - 1: r["loss"] for r in read_metrics(tmp_path / "logs" / "metrics.jsonl") if "loss" in r}
    for step, value in ref["losses"].items():
        assert losses[step] == pytest.approx(value, rel=1e-5, abs=1e-6)
    a = load_file(ref_out / "checkpoints" / "step_00000006" / "model.safetensors")
    b = load_file(tmp_path / "checkpoints" / "step_00000006" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith("to_k.bias"):
            # softmax is shift-invariant per row, so a key bias has zero gradient in exact arithmetic: its
            # float-noise gradient differs between the runs and Adam scales any noise to an lr-sized step
            continue
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("model", ["dit", "unet"])
def test_other_diffusers_models_from_config_and_pretrained(tmp_path, model):
    if model == "dit":
        spec = ["model.class_name=DiTTransformer2DModel", "model.config.num_layers=1", "model.config.sample_size=16",
                "model.config.num_attention_heads=2", "model.config.attention_head_dim=8",
                "model.config.in_channels=1", "model.config.out_channels=2", "model.config.patch_size=4",
                "model.config.num_embeds_ada_norm=10", "--repa", "align.repa_block=0", "align.projector_dim=8"]
    else:
        spec = ["model.class_name=UNet2DModel", "model.config.sample_size=16", "model.config.in_channels=1",
                "model.config.out_channels=1", "model.config.block_out_channels=[8, 16]",
                "model.config.norm_num_groups=4", "model.config.layers_per_block=1",
                "model.config.down_block_types=[DownBlock2D, DownBlock2D]",
                "model.config.up_block_types=[UpBlock2D, UpBlock2D]"]
    common = ["model.preset=null", "train.batch_size=4", "--max_steps", "2", "eval.every=0", "log.progress_bar=false",
              "align.token_matching=interpolate"]
    summary = train(load_config(CONFIG, [f"output_dir={tmp_path / 'a'}", *common, *spec]))
    assert summary["final_step"] == 2 and all(map(math.isfinite, summary["losses"].values()))
    exported = tmp_path / "a" / "model"
    assert (exported / "config.json").is_file()
    again = train(load_config(CONFIG, [f"output_dir={tmp_path / 'b'}", *common, *spec, f"model.pretrained={exported}"]))
    assert again["final_step"] == 2


def test_fastdiff_train_command_passes_everything_to_the_script(tmp_path, capsys):
    from fastdiff.cli import main

    assert main(["train", "--config", str(CONFIG), f"output_dir={tmp_path}", *TINY, "--max_steps", "2"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "logs" / "metrics.jsonl") if "loss" in r][-1] == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0 and "--max_steps" in capsys.readouterr().out
    assert main(["train", "--config", str(CONFIG), "train.lrr=1"]) == 2
    assert "fastdiff train: error:" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- resume policy (#17)
def test_another_config_never_resumes_a_checkpoint_silently(tmp_path, capsys):
    """The issue's sequence: a REPA run, then a Min-SNR run into the same output_dir."""
    train(tiny_config(tmp_path, "--repa", "--max_steps", "2"))
    logged_config = (tmp_path / "logs" / "config.json").read_text()
    stored = json.loads((tmp_path / "checkpoints" / "step_00000002" / CONFIG_FILE).read_text())
    assert stored["align"]["repa"] is True and stored["train"]["max_steps"] == 2
    with pytest.raises(ValueError) as err:
        train(tiny_config(tmp_path, "--weighting", "min_snr", "--max_steps", "2"))
    message = str(err.value)
    assert f"step_00000002/{CONFIG_FILE}" in message and "--resume" in message and "--output_dir" in message
    assert "align.repa: True there, False now" in message and "train.weighting: 'none' there, 'min_snr' now" in message
    assert (tmp_path / "logs" / "config.json").read_text() == logged_config  # not rewritten by the refused run
    # the same config with more steps continues
    longer = train(tiny_config(tmp_path, "--repa", "--max_steps", "3"))
    assert longer["resumed_from"].endswith("step_00000002") and sorted(longer["losses"]) == [2]
    # asked to: continues the other config's checkpoint, and says so
    capsys.readouterr()
    forced = train(tiny_config(tmp_path, "--repa", "--resume", "--weighting", "min_snr", "--max_steps", "4"))
    assert forced["resumed_from"].endswith("step_00000003") and sorted(forced["losses"]) == [3]
    assert "with a different configuration than it was trained with: train.weighting" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--no_resume: .* already holds checkpoints of an earlier run"):
        train(tiny_config(tmp_path, "--repa", "--max_steps", "5", "--no_resume"))
    with pytest.raises(FileNotFoundError, match="--resume: there is no checkpoint"):
        train(tiny_config(tmp_path / "empty", "--max_steps", "1", "--resume"))
    picked = train(tiny_config(tmp_path / "other", "--resume_from", str(tmp_path / "checkpoints" / "step_00000004"),
                               "--repa", "--max_steps", "5"))
    assert picked["resumed_from"].endswith("step_00000004") and sorted(picked["losses"]) == [4]
    with pytest.raises(FileNotFoundError, match="'nowhere' is not a checkpoint directory"):
        train(tiny_config(tmp_path / "b", "--resume_from", "nowhere", "--max_steps", "1"))
    for both in (["--resume", "--no_resume"], ["--resume", "--resume_from", "x"]):
        with pytest.raises(SystemExit):
            load_config(CONFIG, both)


def test_resume_point_for_checkpoints_without_a_stored_config(tmp_path):
    """Checkpoints written before configs were stored compare against the run's logs/config.json."""
    cfg = tiny_config(tmp_path)
    config, defaults = flatten(cfg.to_dict()), flatten(Config().to_dict())
    (tmp_path / "checkpoints" / "step_00000004").mkdir(parents=True)
    root = tmp_path / "checkpoints"
    with pytest.raises(ValueError, match="has no stored configuration"):
        resume_point("auto", root, config, defaults)
    assert resume_point("latest", root, config, defaults)[0].name == "step_00000004"
    old = {k: v for k, v in config.items() if k != "train.lr_schedule"}  # a key added since: its default
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "config.json").write_text(json.dumps({**old, "train.max_steps": 1}))
    assert resume_point("auto", root, config, defaults) == (root / "step_00000004", "")
    assert config_differences(old, {**config, "train.lr_schedule": "cosine"}, defaults) == {
        "train.lr_schedule": ("constant", "cosine")}
    (tmp_path / "logs" / "config.json").write_text(json.dumps({**old, "train.lr": 1.0}))
    with pytest.raises(ValueError, match=r"train.lr: 1.0 there, 0.001 now"):
        resume_point("auto", root, config, defaults)


# ------------------------------------------------------------------------------------ mixed precision (#17)
@pytest.mark.parametrize("configured, launched, value, note", [
    (None, None, None, "mixed precision no (neither train.mixed_precision nor accelerate sets one)"),
    (None, "bf16", None, "mixed precision bf16 (accelerate's setting; train.mixed_precision is unset)"),
    ("no", "bf16", "no", "mixed precision no (train.mixed_precision overrides accelerate's bf16)"),
    ("fp16", "fp16", "fp16", "mixed precision fp16 (train.mixed_precision)"),
])
def test_mixed_precision_defers_to_accelerate_unless_configured(configured, launched, value, note):
    environ = {} if launched is None else {"ACCELERATE_MIXED_PRECISION": launched}
    assert mixed_precision_choice(configured, environ) == (value, note)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change: reset it around a test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_accelerate_launch_mixed_precision_is_respected(tmp_path, monkeypatch, capsys, fresh_accelerate_state):
    # `accelerate launch --mixed_precision bf16` (or its config file) reaches the script as this variable
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    summary = train(tiny_config(tmp_path, "--max_steps", "1"))
    assert summary["mixed_precision"] == "bf16" and math.isfinite(summary["losses"][0])
    assert "mixed precision bf16 (accelerate's setting" in capsys.readouterr().out
    stored = json.loads((tmp_path / "checkpoints" / "step_00000001" / CONFIG_FILE).read_text())
    assert stored["train"]["mixed_precision"] == "bf16"


# ----------------------------------------------------------------------------------------- Ctrl-C (#17)
def test_sigterm_saves_a_checkpoint_logs_the_step_and_restores_the_handlers(tmp_path):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    terminate = [lambda step, record: step == 1 and os.kill(os.getpid(), signal.SIGTERM)]
    with pytest.raises(TrainingInterrupted) as stop:
        train(tiny_config(tmp_path, "--max_steps", "50", "log.every=100", "checkpoint.every=0"), callbacks=terminate)
    assert (stop.value.signum, stop.value.step, stop.value.checkpoint.name) == (signal.SIGTERM, 2, "step_00000002")
    assert latest_checkpoint(tmp_path / "checkpoints") == stop.value.checkpoint
    assert sorted(stop.value.summary["losses"]) == [0, 1]
    assert [r["step"] for r in read_metrics(tmp_path / "logs" / "metrics.jsonl") if "loss" in r] == [2]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("fastdiff")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "fastdiff"]


def test_ctrl_c_in_the_fastdiff_train_command_checkpoints_and_exits_with_one_line(tmp_path):
    args = [f"output_dir={tmp_path}", *TINY, "--max_steps", "100000", "checkpoint.every=0"]
    metrics = tmp_path / "logs" / "metrics.jsonl"
    proc = subprocess.Popen([*_console_script(), "train", "--config", str(CONFIG), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    saved = latest_checkpoint(tmp_path / "checkpoints")
    assert last.startswith("fastdiff train: SIGINT after step ") and last.endswith(
        f"saved {saved}; run the same command again to continue")
    step = int(saved.name[5:])
    assert [r["step"] for r in read_metrics(metrics) if "loss" in r][-1] == step
    resumed = train(tiny_config(tmp_path, "--max_steps", str(step + 1), "checkpoint.every=0"))
    assert resumed["resumed_from"] == str(saved) and sorted(resumed["losses"]) == [step]
