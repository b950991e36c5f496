"""Atomic checkpoints on top of ``accelerator.save_state`` and the state that makes resume exact.

A checkpoint is written into ``<root>/.tmp-step_XXXXXXXX`` by every process, then renamed to
``<root>/step_XXXXXXXX`` by the main process, and only then is ``<root>/latest`` (a one-line file,
replaced atomically) pointed at it. A kill at any moment leaves either the previous checkpoint or the new
one complete; half-written ``.tmp-*`` directories are ignored and cleaned up by the next save.

``accelerator.save_state`` stores the model(s), optimizer, LR scheduler, gradient scaler and each process's
RNG states; objects registered with ``accelerator.register_for_checkpointing`` (the EMA and
:class:`TrainingState`) ride along. The data order and the per-step noise are functions of
``(seed, step)`` (see :mod:`fastdiff.training.datasets`), so the restored step fixes them too.

Each checkpoint also stores the configuration that trained it (``fastdiff_config.json``), and
:func:`resume_point` continues a checkpoint only when asked to or when that configuration equals the
current one (``max_steps`` aside, so a longer run can continue a shorter one): a run with another
configuration never silently resumes a checkpoint it did not write.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

PREFIX, TMP_PREFIX, LATEST = "step_", ".tmp-step_", "latest"
CONFIG_FILE = "fastdiff_config.json"
# keys a run may change and still continue a checkpoint without --resume
RESUME_IGNORED = frozenset({"train.max_steps", "checkpoint.resume", "output_dir", "log.progress_bar"})


@dataclass
class TrainingState:
    """Counters restored on resume: ``step`` is the number of optimisation steps already taken."""

    step: int = 0
    samples_seen: int = 0
    termination: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen, "termination": self.termination}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        self.termination = dict(state.get("termination", {}))


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint ``<root>/latest`` points to, else the newest complete one, else ``None``."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if target.is_dir():
            return target
    found = list_checkpoints(root)
    return found[-1] if found else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(accelerator: Accelerator, root: str | Path, step: int, keep: int = 2,
                    config: Mapping[str, Any] | None = None) -> Path:
    """Save the accelerator state for ``step`` atomically; keep the newest ``keep`` checkpoints.

    ``config`` (the run's configuration) is stored with it as ``fastdiff_config.json``."""
    root = Path(root)
    final, tmp = root / checkpoint_name(step), root / f"{TMP_PREFIX}{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if config is not None:
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str) + "\n")
        if final.exists():  # re-saving the same step (e.g. after a resume): move the old copy aside first
            old = root / f"{TMP_PREFIX}old-{step:08d}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name + "\n")
        for stale in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def stored_config(checkpoint: str | Path) -> tuple[dict, Path] | None:
    """The flattened configuration ``checkpoint`` was trained with and the file it came from: its
    ``fastdiff_config.json``, else (a checkpoint written before configs were stored) the run's
    ``logs/config.json``; ``None`` if neither exists."""
    from fastdiff.training.config import flatten

    checkpoint = Path(checkpoint)
    for path in (checkpoint / CONFIG_FILE, checkpoint.parent.parent / "logs" / "config.json"):
        if path.is_file():
            return flatten(json.loads(path.read_text())), path
    return None


def config_differences(stored: Mapping[str, Any], current: Mapping[str, Any], defaults: Mapping[str, Any],
                       ignore: Collection[str] = RESUME_IGNORED) -> dict[str, tuple[Any, Any]]:
    """``{key: (stored value, current value)}`` of the flattened configs, outside ``ignore``; a key one
    side lacks (a config written before the key existed) counts as its default."""
    out = {}
    for key in sorted((stored.keys() | current.keys()) - set(ignore)):
        old, new = stored.get(key, defaults.get(key)), current.get(key, defaults.get(key))
        if old != new:
            out[key] = (old, new)
    return out


def resume_point(resume: str | None, root: str | Path, config: Mapping[str, Any],
                 defaults: Mapping[str, Any]) -> tuple[Path | None, str]:
    """The checkpoint a run continues (``None``: a fresh run) and a note for the log.

    Args:
        resume: ``checkpoint.resume``: ``"auto"``, ``"latest"``, a checkpoint directory, or ``None``.
        root: the run's checkpoint folder (``<output_dir>/checkpoints``).
        config, defaults: the run's flattened configuration and the flattened defaults.

    Raises:
        ValueError: ``"auto"`` found a checkpoint of another configuration (naming both), or ``None`` was
            asked for in a folder that already holds checkpoints (a fresh run there would mix with them).
        FileNotFoundError: an explicit checkpoint (``"latest"`` or a directory) does not exist.
    """
    root = Path(root)
    latest = latest_checkpoint(root)
    if resume is None:
        if latest is not None:
            raise ValueError(f"--no_resume: {root} already holds checkpoints of an earlier run (latest "
                             f"{latest.name}); give a new --output_dir, or delete {root.parent}, to start afresh")
        return None, ""
    if resume in ("auto", "latest"):
        if latest is None:
            if resume == "latest":
                raise FileNotFoundError(f"--resume: there is no checkpoint in {root} to continue")
            return None, ""
        target = latest
    else:
        target = Path(resume)
        if not target.is_dir():
            raise FileNotFoundError(f"checkpoint.resume: {resume!r} is not a checkpoint directory")
    asked = resume != "auto"
    found = stored_config(target)
    if found is None:
        if not asked:
            raise ValueError(f"{target} has no stored configuration to compare with this run's; pass --resume "
                             f"to continue it anyway, or a new --output_dir to start afresh")
        return target, "(its configuration is not stored)"
    stored, source = found
    diff = config_differences(stored, config, defaults)
    if not diff:
        return target, ""
    listed = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in diff.items())
    if not asked:
        raise ValueError(f"{target} was trained with another configuration ({source}) than this run's: {listed}. "
                         f"Give a new --output_dir to start afresh, or pass --resume to continue that "
                         f"checkpoint with this configuration")
    return target, f"with a different configuration than it was trained with: {listed}"
