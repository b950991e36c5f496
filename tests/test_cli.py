import json

import pytest

from fastdiff.cli import main
from fastdiff.compare import run_compare


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    rc = main(["compare", "--samplers", "ddim,dpmpp_2m", "--steps", "2,4", "--num-images", "20", "--out", str(out),
               "--no-progress"])
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
    for name in ("fd_vs_steps.png", "samples.png"):
        assert (out / name).stat().st_size > 1000


def test_compare_is_reproducible_and_more_steps_help(compare_run):
    _, out = compare_run
    first = json.loads((out / "compare.json").read_text())["cells"]
    again, _ = run_compare(["ddim"], [2], num_images=20, progress=False)
    assert again.cells[0].fd == pytest.approx(first[0]["fd"], rel=1e-6)
    ddim = {c["steps"]: c["fd"] for c in first if c["sampler"] == "ddim"}
    assert ddim[4] < ddim[2]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "--samplers", "nope"], "unknown sampler 'nope'; available samplers: "),
        (["compare", "--steps", "0"], "steps must be integers >= 1"),
        (["compare", "--device", "cuda:7"], "device 'cuda:7'"),
        (["compare", "--device", "banana"], "device must be a torch device"),
        (["compare", "--num-images", "1"], "num_images must be an int >= 2"),
        (["compare", "--tgate", "3", "--tgate-cond-weight", "-1"], "cond_weight must be >= 0"),
        (["sample", "--tgate", "3", "--tgate-cond-weight", "-1"], "cond_weight must be >= 0"),
        (["sample", "--steps", "0"], "--steps must be >= 1"),
        (["sample", "--sampler", "nope"], "unknown sampler"),
    ],
)
def test_bad_arguments_fail_clearly(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_sample_writes_png(tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", "--steps", "3", "--per-class", "2", "--out", str(out)]) == 0
    from PIL import Image

    assert Image.open(out).size == (2 * 16 * 4, 10 * 16 * 4)


def test_samplers_lists_the_baselines(capsys):
    assert main(["samplers"]) == 0
    listed = capsys.readouterr().out
    for name in ("ddim", "dpmpp_2m", "unipc", "euler", "deis"):
        assert name in listed


def test_compare_with_tgate_gates_only_long_enough_cells_and_restores_the_pipe(compare_run):
    from fastdiff import is_tgate_enabled, load_embedded_pipeline

    _, out = compare_run
    plain = {(c["sampler"], c["steps"]): c for c in json.loads((out / "compare.json").read_text())["cells"]}
    pipe = load_embedded_pipeline()
    result, images = run_compare(["ddim", "dpmpp_2m"], [2, 4], pipe=pipe, tgate=3, num_images=20, progress=False)
    guided, _ = run_compare(["ddim"], [4], pipe=pipe, tgate=3, tgate_cond_weight=2.0, num_images=20, progress=False)
    assert guided.settings["tgate_cond_weight"] == 2.0 and guided.cells[0].fd != pytest.approx(result.cells[1].fd)
    assert not is_tgate_enabled(pipe)
    for cell in result.cells:
        ref = plain[(cell.sampler, cell.steps)]
        if cell.steps < 3:  # gate beyond the run: exactly the uncached cell
            assert cell.tgate is None and cell.fd == pytest.approx(ref["fd"], rel=1e-6)
        else:  # one CFG-halved call per step after the gate: same NFE, different samples
            assert cell.tgate == 3 and cell.nfe == ref["nfe"] and cell.fd != pytest.approx(ref["fd"], rel=1e-3)
    again, _ = run_compare(["ddim"], [4], pipe=pipe, num_images=20, progress=False)
    assert again.cells[0].fd == pytest.approx(plain[("ddim", 4)]["fd"], rel=1e-6)


def test_compare_rejects_a_bad_gate_step():
    with pytest.raises(ValueError, match="tgate must be a gate step >= 1"):
        run_compare(["ddim"], [2], tgate=0, num_images=2, progress=False)
