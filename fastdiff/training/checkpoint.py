"""Atomic checkpoints on top of ``accelerator.save_state`` and the state that makes resume exact.

A checkpoint is written into ``<root>/.tmp-step_XXXXXXXX`` by every process, then renamed to
``<root>/step_XXXXXXXX`` by the main process, and only then is ``<root>/latest`` (a one-line file,
replaced atomically) pointed at it. A kill at any moment leaves either the previous checkpoint or the new
one complete; half-written ``.tmp-*`` directories are ignored and cleaned up by the next save.

``accelerator.save_state`` stores the model(s), optimizer, LR scheduler, gradient scaler and each process's
RNG states; objects registered with ``accelerator.register_for_checkpointing`` (the EMA and
:class:`TrainingState`) ride along. The data order and the per-step noise are functions of
``(seed, step)`` (see :mod:`fastdiff.training.datasets`), so the restored step fixes them too.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator

PREFIX, TMP_PREFIX, LATEST = "step_", ".tmp-step_", "latest"


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


def save_checkpoint(accelerator: Accelerator, root: str | Path, step: int, keep: int = 2) -> Path:
    """Save the accelerator state for ``step`` atomically; keep the newest ``keep`` checkpoints."""
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
