"""The accelerate training script: config, exact resume after a kill, atomic checkpoints, DDP equivalence."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastdiff.training import NonFiniteLossError, load_config
from fastdiff.training.checkpoint import latest_checkpoint, list_checkpoints
from fastdiff.training.datasets import ImageFolderDataset, StepBatchSampler, batch_indices
from fastdiff.training.tracking import read_metrics
from fastdiff.training.train import train

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
    assert cfg.train.mixed_precision == "no"
    with pytest.raises(ValueError, match=r"unknown config key 'train.lrr'.*'lr'"):
        load_config(CONFIG, ["train.lrr=1"])
    with pytest.raises(ValueError, match="must be a number"):
        load_config(CONFIG, ["train.lr=fast"])
    with pytest.raises(ValueError, match="weighting must be one of"):
        train(tiny_config(tmp_path, "--weighting", "snr_plus", "--max_steps", "1"))
    with pytest.raises(ValueError, match="block_index must be an int in 0..2"):
        train(tiny_config(tmp_path / "b", "--repa", "align.repa_block=3", "--max_steps", "1"))


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
