"""The public API: every exported name resolves lazily, unknown names fail clearly."""

import importlib
import subprocess
import sys

import pytest

import fastdiff
import fastdiff.training


@pytest.mark.parametrize("package", [fastdiff, fastdiff.training])
def test_every_export_resolves(package):
    for name in package.__all__:
        if name != "__version__":
            assert getattr(package, name) is getattr(importlib.import_module(package._EXPORTS[name]), name)
    assert set(dir(package)) <= set(package.__all__)
    with pytest.raises(AttributeError, match=f"{package.__name__!r} has no attribute 'no_such_name'"):
        package.no_such_name  # noqa: B018


def test_import_is_lazy():
    code = ("import sys, fastdiff; "
            "print('torch' in sys.modules, 'diffusers' in sys.modules, 'accelerate' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False"]
