"""A dependency-free accelerate tracker writing one JSON line per ``accelerator.log`` call."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from accelerate.tracking import GeneralTracker


class JSONLTracker(GeneralTracker):
    """``log_with=[JSONLTracker(run_name, logging_dir)]``: appends ``{"step", "time", **values}`` to
    ``<logging_dir>/<run_name>/metrics.jsonl`` and the run configuration to ``config.json``."""

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str | Path) -> None:
        super().__init__()
        self.dir = Path(logging_dir) / run_name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"

    @property
    def tracker(self) -> Path:
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        (self.dir / "config.json").write_text(json.dumps(values, indent=2, default=str) + "\n")

    def truncate_after(self, step: int) -> int:
        """Drop the records of steps after ``step`` (a resumed run replays them); returns how many."""
        if not self.path.is_file():
            return 0
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if (json.loads(line).get("step") or 0) <= step]
        if len(kept) != len(lines):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
        return len(lines) - len(kept)

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        record = {"step": step, "time": time.time()}
        for key, value in values.items():
            value = value.item() if hasattr(value, "item") else value
            record[key] = value if not isinstance(value, float) or math.isfinite(value) else str(value)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
