"""Small helpers shared by the package's modules: lazy re-exports and saving a shipped network."""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `import fastdiff` goes through this module and must not import torch
    from torch import nn


def lazy_exports(
    module_globals: dict[str, Any], module_name: str, exports: Mapping[str, str], submodules: Iterable[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Return ``(__getattr__, __dir__)`` for a package that re-exports ``name -> submodule`` lazily.

    Each name is imported on first access and then cached in ``module_globals``. ``submodules`` names
    subpackages reachable as attributes (``fastdiff.training``) without an explicit ``import`` first.
    """
    submodules = frozenset(submodules)
    names = sorted({*exports, *submodules})

    def getattr_(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
        elif name in submodules:
            value = importlib.import_module(f"{module_name}.{name}")
        else:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        module_globals[name] = value
        return value

    def dir_() -> list[str]:
        return names

    return getattr_, dir_


def subpackages(package_path: Iterable[str]) -> tuple[str, ...]:
    """The names of the subpackages (directories with an ``__init__.py``) on a package's ``__path__``."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(list(package_path)) if m.ispkg))


def save_network(net: nn.Module, record: dict, out: str | Path) -> Path:
    """Write ``net``'s weights as ``model.safetensors`` and ``record`` as ``config.json`` into ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(record, indent=2) + "\n")
    return out
