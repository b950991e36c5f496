"""The public API: every exported name resolves lazily, unknown names fail clearly; the wheel."""

import importlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fastdiff
import fastdiff.training
from fastdiff.training import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("package", [fastdiff, fastdiff.training])
def test_every_export_resolves(package):
    for name in package.__all__:
        if name != "__version__":
            assert getattr(package, name) is getattr(importlib.import_module(package._EXPORTS[name]), name)
    assert set(dir(package)) <= {*package.__all__, *getattr(package, "_SUBPACKAGES", ())}
    with pytest.raises(AttributeError, match=f"{package.__name__!r} has no attribute 'no_such_name'"):
        package.no_such_name  # noqa: B018


def test_import_is_lazy():
    code = ("import sys, fastdiff; "
            "print('torch' in sys.modules, 'diffusers' in sys.modules, 'accelerate' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]


def test_subpackages_are_attributes_of_a_bare_import():
    """`import fastdiff; fastdiff.training.diffusion_loss(...)` as the README writes it, without torch at import."""
    code = ("import sys, fastdiff; torch_at_import = 'torch' in sys.modules; "
            "names = [fastdiff.training.__name__, fastdiff.samplers.__name__]; torch_after = 'torch' in sys.modules; "
            "print(torch_at_import, torch_after, names, fastdiff.training.diffusion_loss is fastdiff.diffusion_loss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "['fastdiff.training',", "'fastdiff.samplers']", "True"]


def test_every_subpackage_resolves():
    on_disk = sorted(p.parent.name for p in Path(fastdiff.__file__).parent.glob("*/__init__.py"))
    assert list(fastdiff._SUBPACKAGES) == on_disk and {"training", "samplers", "kernels", "flows"} <= set(on_disk)
    for name in on_disk:
        assert getattr(fastdiff, name) is importlib.import_module(f"fastdiff.{name}")
        assert name in dir(fastdiff)


def _built_wheel(tmp_path: Path) -> Path:
    """`pip wheel` of a copy of the package sources (the checkout itself stays untouched)."""
    pytest.importorskip("setuptools", reason="building offline needs setuptools in this environment")
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("fastdiff", "configs"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("fastdiff-*.whl")
    return wheel


def test_wheel_ships_configs_and_weights_and_finds_configs_by_name(tmp_path):
    wheel = _built_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    configs = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert sorted(n.rsplit("/", 1)[1] for n in names if n.endswith(".yaml")) == configs  # one copy each
    assert all(f"fastdiff/configs/{name}" in names for name in configs)
    weights = sorted(str(p.relative_to(REPO)) for p in (REPO / "fastdiff").rglob("*.safetensors"))
    assert weights and all(w in names for w in weights)
    # installed from the wheel, run from a folder without configs/: by name works, bench says where to look
    site, cwd = tmp_path / "site", tmp_path / "elsewhere"
    zipfile.ZipFile(wheel).extractall(site)
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = ("import fastdiff, json; from fastdiff.training import load_config; "
            "print(json.dumps([fastdiff.__file__, load_config(None, ['--config', 'digits_dit']).to_dict()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd, check=True)
    where, loaded = json.loads(out.stdout)
    assert Path(where).is_relative_to(site)
    assert loaded == load_config(REPO / "configs" / "digits_dit.yaml").to_dict()
    bench = subprocess.run([sys.executable, "-m", "fastdiff", "bench"], capture_output=True, text=True, env=env, cwd=cwd)
    assert bench.returncode == 2 and "not part of the installed package" in bench.stderr
    assert "benchmarks/ folder of a fastdiff source checkout" in bench.stderr


def test_oldest_constraints_pin_pyprojects_floors():
    """`constraints-oldest.txt` (`make test-oldest`, run by CI) pins exactly the `>=` floors of pyproject.toml."""
    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads TOML")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = dict(dep.split(">=") for dep in deps if ">=" in dep)
    lines = (REPO / "constraints-oldest.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if line.strip() and not line.startswith("#"))
    assert {"diffusers", "transformers", "accelerate"} <= set(pins)
    assert all(floors.get(name) == version for name, version in pins.items()), (pins, floors)
