"""Every command and snippet in the README runs (at small sizes), so the README cannot drift from the code.

* ```` ```python ```` blocks are executed as written, each in a fresh namespace (they are self-contained);
  a block right after ``<!-- readme: compile-only (reason) -->`` needs the network or a GPU and is only
  compiled; one after ``<!-- readme: tested-in (tests/test_x.py) -->`` is run, line for line, by that test
  (checked here: every line of the block appears there).
* ```` ```bash ```` blocks: every command line is run through the real entry point with small-size
  arguments appended (later options win in argparse), from a temporary working directory. ``make`` lines
  are what CI runs (`.ci/run`): the test checks they name real Makefile targets; ``pip install`` lines name
  real extras; ``bash script`` lines name a script that parses (GPU checks).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"(?:<!-- readme: (?P<kind>compile-only|tested-in) \((?P<reason>[^)]+)\) -->\s*)?"
                   r"```(?P<lang>\w+)\n(?P<body>.*?)```", re.S)

# appended to each README command of that kind, so it runs in seconds
SMALL = {
    "fastdiff compare": ["--num-images", "4", "--steps", "2", "--reference-steps", "3", "--no-progress"],
    "fastdiff sample": ["--per-class", "1", "--steps", "2"],
    "fastdiff train": ["--max_steps", "2", "eval.every=0", "checkpoint.every=0", "log.progress_bar=false"],
    "python -m fastdiff.training.train": ["--max_steps", "2", "eval.every=0", "checkpoint.every=0",
                                          "log.progress_bar=false"],
}
LAUNCHERS = ("torchrun", "accelerate")  # run their module in one process: the launcher itself is tested elsewhere


def blocks(lang: str) -> list[tuple[str, str | None]]:
    return [(m["body"], m["kind"] and f"{m['kind']}: {m['reason']}") for m in FENCE.finditer(README)
            if m["lang"] == lang]


def commands() -> list[str]:
    lines = []
    for body, _ in blocks("bash"):
        for line in body.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def test_readme_starts_with_the_two_setup_commands():
    first = blocks("bash")[0][0].split("\n")
    assert [line.split()[:2] for line in first if line.strip()] == [["make", "compare"], ["make", "test"]]
    assert README.index("```bash") < 200


@pytest.mark.parametrize("source, reason", blocks("python"), ids=lambda v: (v or "")[:40].replace("\n", " "))
def test_python_snippet_runs(source, reason, tmp_path, monkeypatch):
    code = compile(source, "README.md", "exec")
    if reason and reason.startswith("tested-in: "):
        test_file = (ROOT / reason.removeprefix("tested-in: ")).read_text()
        tested = {line.strip() for line in test_file.splitlines()}
        missing = [line for line in source.splitlines() if line.strip() and line.strip() not in tested]
        assert not missing, f"README lines not run by {reason}: {missing}"
        return
    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(tmp_path)
    exec(code, {"__name__": "readme"})


def _checked_without_running(words: list[str]) -> bool:
    """``make``, ``pip install`` and ``bash script`` lines: check what they name exists instead of running them."""
    if words[0] == "make":
        assert re.search(rf"^{re.escape(words[1])}:", (ROOT / "Makefile").read_text(), re.M), words
    elif words[:2] == ["pip", "install"]:
        extras = re.findall(r"^(\w+) = \[", (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1]
                            .split("\n[")[0], re.M)
        for extra in re.findall(r"\[([\w,]+)\]", words[-1])[0].split(","):
            assert extra in extras, f"README installs extra {extra!r}; pyproject has {extras}"
    elif words[0] == "bash":
        script = ROOT / words[1]
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, f"{script} is not a valid bash script"
    else:
        return False
    return True


def _argv(line: str, tmp_path: Path) -> list[str] | None:
    words = shlex.split(line)
    if _checked_without_running(words):
        return None
    if words[0] in LAUNCHERS:
        module = words.index("-m")
        words = ["python", *words[module:]]
    key = " ".join(words[:2]) if words[0] == "fastdiff" else " ".join(words[:3])
    extra = list(SMALL.get(key, []))
    if key == "fastdiff compare" and "tarflow-digits" in words:  # a flow has no steps (fastdiff.flows.compare)
        extra = ["--num-images", "4", "--batch1-images", "1", "--no-progress"]
    if key in ("fastdiff train", "python -m fastdiff.training.train"):
        extra.append(f"output_dir={tmp_path / 'run'}")
    if words[0] == "fastdiff":
        return [sys.executable, "-m", "fastdiff", *words[1:], *extra]
    assert words[:2] == ["python", "-m"], f"README command {line!r}: no rule to run it in tests/test_readme.py"
    return [sys.executable, *words[1:], *extra]


@pytest.mark.parametrize("line", commands())
def test_shell_command_runs(line, tmp_path):
    argv = _argv(line, tmp_path)
    if argv is None:
        return
    out = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, f"{line}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
