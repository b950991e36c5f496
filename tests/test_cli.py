import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

import fastdiff.compare
from fastdiff.cli import main
from fastdiff.compare import run_compare

# the cells' FD to the data does not depend on the converged reference: a cheap one where only that is checked
CHEAP_REFERENCE = ("ddim", 4)


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    rc = main(["compare", "--samplers", "ddim,dpmpp_2m", "--steps", "2,4", "--num-images", "20", "--out", str(out),
               "--reference-sampler", CHEAP_REFERENCE[0], "--reference-steps", str(CHEAP_REFERENCE[1]), "--no-progress"])
    return rc, out


def test_compare_writes_table_json_and_plots(compare_run):
    rc, out = compare_run
    assert rc == 0
    data = json.loads((out / "compare.json").read_text())
    cells = data["cells"]
    assert [(c["sampler"], c["steps"]) for c in cells] == [("ddim", 2), ("ddim", 4), ("dpmpp_2m", 2), ("dpmpp_2m", 4)]
    assert all(c["nfe"] == c["steps"] for c in cells)  # one CFG-batched denoiser call per step
    assert all(c["fd"] > 0 and 0 <= c["accuracy"] <= 1 and c["seconds"] > 0 for c in cells)
    assert data["cells"][0]["metric"] == "FD-digits"
    assert {"device", "torch", "diffusers", "date"} <= set(data["environment"])
    assert (data["reference"]["sampler"], data["reference"]["steps"]) == CHEAP_REFERENCE
    for name in ("fd_vs_steps.png", "samples.png"):
        assert (out / name).stat().st_size > 1000


def test_compare_is_reproducible_and_more_steps_help(compare_run):
    _, out = compare_run
    first = json.loads((out / "compare.json").read_text())["cells"]
    again, _ = run_compare(["ddim"], [2], num_images=20, progress=False, reference=CHEAP_REFERENCE)
    assert again.cells[0].fd == pytest.approx(first[0]["fd"], rel=1e-6)
    ddim = {c["steps"]: c["fd"] for c in first if c["sampler"] == "ddim"}
    assert ddim[4] < ddim[2]


def run_cli(argv, capsys) -> tuple[int, str]:
    """``fastdiff argv`` in-process: (exit status, stderr); argparse's own errors exit with 2 too."""
    try:
        rc = main(argv)
    except SystemExit as exit_info:
        rc = exit_info.code
    return rc, capsys.readouterr().err


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if any sampling starts: bad arguments must be refused before."""
    def refuse(*args, **kwargs):
        raise AssertionError("run_compare was called")

    monkeypatch.setattr(fastdiff.compare, "run_compare", refuse)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "--samplers", "nope"], "unknown sampler 'nope'; available samplers: "),
        (["compare", "--reference-sampler", "nope"], "unknown sampler 'nope'; available samplers: "),
        (["compare", "--reference-steps", "0"], "argument --reference-steps: expected a step count >= 1"),
        (["compare", "--samplers", ""], "argument --samplers: expected comma-separated sampler names"),
        (["compare", "--samplers", " , "], "argument --samplers: expected comma-separated sampler names"),
        (["compare", "--steps", "0"], "argument --steps: expected comma-separated step counts >= 1"),
        (["compare", "--steps", ""], "argument --steps: expected comma-separated step counts >= 1"),
        (["compare", "--steps", "5,x"], "argument --steps: expected comma-separated step counts >= 1"),
        (["compare", "--num-images", "0"], "argument --num-images: expected an image count >= 2 (FD needs two)"),
        (["compare", "--num-images", "1"], "argument --num-images: expected an image count >= 2"),
        (["sample", "--steps", "0"], "argument --steps: expected a step count >= 1, got '0'"),
        (["sample", "--per-class", "0"], "argument --per-class: expected an image count >= 1"),
        (["sample", "--sampler", "nope"], "unknown sampler 'nope'"),
    ],
)
def test_bad_arguments_fail_clearly_before_any_work(argv, message, capsys, no_work):
    rc, err = run_cli(argv, capsys)
    assert rc == 2 and message in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "--device", "cuda:7"], "device 'cuda:7'"),
        (["compare", "--device", "banana"], "device must be a torch device"),
        (["compare", "--tgate", "3", "--tgate-cond-weight", "-1"], "cond_weight must be >= 0"),
        (["sample", "--tgate", "3", "--tgate-cond-weight", "-1"], "cond_weight must be >= 0"),
    ],
)
def test_bad_values_fail_clearly(argv, message, capsys):
    rc, err = run_cli(argv, capsys)
    assert rc == 2 and message in err


def test_an_unwritable_out_fails_before_sampling(tmp_path, capsys, no_work):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    rc, err = run_cli(["compare", "--samplers", "ddim", "--steps", "2", "--out", str(blocker / "out")], capsys)
    assert rc == 2 and f"--out '{blocker / 'out'}' is not a writable directory" in err
    rc, err = run_cli(["sample", "--out", str(blocker / "grid.png")], capsys)
    assert rc == 2 and "--out's folder" in err and "is not a writable directory" in err


def _interrupting_run_compare(finished: bool):
    """run_compare as it behaves on Ctrl-C: ``CompareInterrupted`` with the cells done so far (or a bare
    KeyboardInterrupt before any finished)."""
    real = fastdiff.compare.run_compare

    def fake(samplers, steps, **kwargs):
        if not finished:
            raise KeyboardInterrupt
        kwargs.update(num_images=4, reference=CHEAP_REFERENCE)
        result, images = real(samplers[:1], steps[:1], **kwargs)
        interrupted = getattr(fastdiff.compare, "CompareInterrupted", None)
        if interrupted is not None:
            raise interrupted(result, images)
        stop = KeyboardInterrupt()  # the same contract before compare.CompareInterrupted exists
        stop.result, stop.images = result, images
        raise stop

    return fake


@pytest.mark.parametrize("finished", [True, False])
def test_ctrl_c_during_compare_writes_the_finished_cells_and_exits_130(tmp_path, capsys, monkeypatch, finished):
    monkeypatch.setattr(fastdiff.compare, "run_compare", _interrupting_run_compare(finished))
    argv = ["compare", "--samplers", "ddim,euler", "--steps", "2,3", "--out", str(tmp_path), "--no-progress"]
    rc, err = run_cli(argv, capsys)
    assert rc == 130 and len(err.strip().splitlines()) == 1
    if finished:
        cells = json.loads((tmp_path / "compare.json").read_text())["cells"]
        assert [(c["sampler"], c["steps"]) for c in cells] == [("ddim", 2)]
        assert f"interrupted; wrote the 1 finished cell(s) to {tmp_path / 'compare.json'}" in err
    else:
        assert "interrupted before any cell finished; nothing written" in err
        assert not (tmp_path / "compare.json").exists()


def test_sample_writes_png(tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", "--steps", "3", "--per-class", "2", "--out", str(out)]) == 0
    from PIL import Image

    assert Image.open(out).size == (2 * 16 * 4, 10 * 16 * 4)


def _imported_modules(stderr: str) -> set[str]:
    """Top-level names of the modules a ``PYTHONPROFILEIMPORTTIME=1`` process imported."""
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("fastdiff")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "fastdiff"]


@pytest.mark.parametrize(
    "argv, rc, message, heavy",
    [
        (["samplers"], 0, "dpmpp_2m", False),
        (["compare", "--samplers", "nope"], 2, "unknown sampler 'nope'", False),
        (["compare", "--num-images", "0"], 2, "expected an image count >= 2", False),
        (["compare", "--out", "/dev/null/out"], 2, "is not a writable directory", False),
        (["sample", "--sampler", "nope"], 2, "unknown sampler 'nope'", False),
        (["train", "--config", "nope"], 2, "'nope' is neither a file nor a shipped config", False),
        (["compare", "--device", "banana"], 2, "device must be a torch device", True),  # the check can see torch
    ],
)
def test_console_script_answers_before_importing_torch(argv, rc, message, heavy):
    """The real `fastdiff` script in a fresh process: listing and argument errors import neither torch nor
    diffusers (checked in the import log, not by timing)."""
    result = subprocess.run([*_console_script(), *argv], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == rc, result.stderr[-2000:]
    assert message in result.stdout + result.stderr
    imported = _imported_modules(result.stderr)
    assert "fastdiff" in imported
    assert bool(imported & {"torch", "diffusers"}) == heavy


def test_samplers_lists_the_baselines(capsys):
    assert main(["samplers"]) == 0
    listed = capsys.readouterr().out
    for name in ("ddim", "dpmpp_2m", "unipc", "euler", "deis"):
        assert name in listed


def test_compare_with_tgate_gates_only_long_enough_cells_and_restores_the_pipe():
    from fastdiff import is_tgate_enabled, load_embedded_pipeline

    pipe = load_embedded_pipeline()
    cheap = {"num_images": 20, "progress": False, "reference": CHEAP_REFERENCE, "guidance_scale": 2.0}  # TGATE drops CFG
    plain = {(c.sampler, c.steps): asdict(c) for c in run_compare(["ddim", "dpmpp_2m"], [2, 4], pipe=pipe, **cheap)[0].cells}
    result, images = run_compare(["ddim", "dpmpp_2m"], [2, 4], pipe=pipe, tgate=3, **cheap)
    guided, _ = run_compare(["ddim"], [4], pipe=pipe, tgate=3, tgate_cond_weight=2.0, **cheap)
    assert guided.settings["tgate_cond_weight"] == 2.0 and guided.cells[0].fd != pytest.approx(result.cells[1].fd)
    assert not is_tgate_enabled(pipe)
    for cell in result.cells:
        ref = plain[(cell.sampler, cell.steps)]
        if cell.steps < 3:  # gate beyond the run: exactly the uncached cell
            assert cell.tgate is None and cell.fd == pytest.approx(ref["fd"], rel=1e-6)
        else:  # one CFG-halved call per step after the gate: same NFE, different samples
            assert cell.tgate == 3 and cell.nfe == ref["nfe"] and cell.fd != pytest.approx(ref["fd"], rel=1e-3)
    again, _ = run_compare(["ddim"], [4], pipe=pipe, **cheap)
    assert again.cells[0].fd == pytest.approx(plain[("ddim", 4)]["fd"], rel=1e-6)


def test_compare_rejects_a_bad_gate_step():
    with pytest.raises(ValueError, match="tgate must be a gate step >= 1"):
        run_compare(["ddim"], [2], tgate=0, num_images=2, progress=False)


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    from fastdiff.testing import tiny_sd_pipeline

    folder = tmp_path_factory.mktemp("tiny_sd") / "sd"
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


def test_compare_and_sample_take_any_pipeline_directory(tiny_sd_dir, tmp_path):
    """--model: a local diffusers pipeline; with no data reference it is ranked by its error to the reference."""
    out = tmp_path / "cmp"
    rc = main(["compare", "--model", str(tiny_sd_dir), "--prompt", "a cat", "--samplers", "ddim", "--steps", "2,4",
               "--num-images", "2", "--reference-steps", "8", "--guidance-scale", "3", "--out", str(out), "--no-progress"])
    assert rc == 0
    data = json.loads((out / "compare.json").read_text())
    assert data["settings"]["model"] == str(tiny_sd_dir)
    assert [c["fd"] for c in data["cells"]] == [None, None]
    assert data["cells"][1]["rms_to_ref"] < data["cells"][0]["rms_to_ref"]
    grid = tmp_path / "grid.png"
    assert main(["sample", "--model", str(tiny_sd_dir), "--prompt", "a cat", "--prompt", "a dog", "--per-class", "2",
                 "--steps", "2", "--out", str(grid)]) == 0
    from PIL import Image

    assert Image.open(grid).size == (2 * 16 * 4, 2 * 16 * 4)  # 2 prompts x 2 images of 16 px, scaled 4x


def test_model_that_is_not_a_pipeline_fails_clearly(tmp_path, capsys):
    assert main(["compare", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "neither a diffusers pipeline directory nor a reachable hub id" in capsys.readouterr().err


def test_compare_help_names_the_real_defaults(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no line wrapping inside the lists
    from fastdiff.cli import build_parser
    from fastdiff.compare import DEFAULT_SAMPLERS, DEFAULT_STEPS

    text = build_parser()._subparsers._group_actions[0].choices["compare"].format_help().replace("\n", " ")
    text = " ".join(text.split())
    assert f"(default: {','.join(DEFAULT_SAMPLERS)})" in text
    assert f"(default: {','.join(map(str, DEFAULT_STEPS))})" in text


def test_samplers_into_a_closed_pipe_exits_quietly(monkeypatch):
    """`fastdiff samplers | head -1`: the reader has left; the CLI exits with 141 instead of a BrokenPipeError."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    with os.fdopen(write_end, "w", buffering=1) as closed_pipe:
        monkeypatch.setattr(sys, "stdout", closed_pipe)
        assert main(["samplers"]) == 141
