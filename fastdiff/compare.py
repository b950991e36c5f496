"""``fastdiff compare``: samplers x step counts on one model and one fixed seed set.

Every cell samples the same initial noise and class labels, so the differences between cells are the
samplers' alone. Per cell: FD (FD-digits offline), class accuracy, NFE (denoiser calls, counted with a
hook, one call = one CFG-batched evaluation), and wall time. Output: a rich table, JSON, a PNG plot of
FD against steps and a sample grid.
"""

from __future__ import annotations

import json
import platform
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .samplers.registry import available_samplers, make_scheduler

DEFAULT_SAMPLERS = ("ddim", "dpmpp_2m", "unipc", "euler", "accel_ddim", "dpmpp_2m_dualfast")
DEFAULT_STEPS = (5, 10, 20)
DEFAULT_NUM_IMAGES = 100


@dataclass
class CompareCell:
    sampler: str
    steps: int
    nfe: int
    seconds: float
    metric: str
    fd: float
    accuracy: float | None
    tgate: int | None = None


@dataclass
class CompareResult:
    cells: list[CompareCell]
    settings: dict[str, Any]
    environment: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "environment": self.environment, "cells": [asdict(c) for c in self.cells]}


def environment_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Device and library versions, recorded with every benchmark figure."""
    import diffusers

    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "device": f"{device.type}: {name}",
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }


def _check_args(samplers: Sequence[str], steps: Sequence[int], num_images: int) -> None:
    known = available_samplers()
    for name in samplers:
        if name not in known:
            raise ValueError(f"unknown sampler {name!r}; available samplers: {', '.join(known)}")
    if not samplers:
        raise ValueError("samplers must name at least one sampler")
    for n in steps:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"steps must be integers >= 1, got {n!r}")
    if not steps:
        raise ValueError("steps must contain at least one step count")
    if not isinstance(num_images, int) or num_images < 2:
        raise ValueError(f"num_images must be an int >= 2 (FD needs two or more), got {num_images!r}")


class _CallCounter:
    """Counts forward calls of a module through a removable pre-hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self._handle = module.register_forward_pre_hook(self._count)

    def _count(self, module: torch.nn.Module, args: Any) -> None:
        self.calls += 1

    def remove(self) -> None:
        self._handle.remove()


def run_compare(
    samplers: Sequence[str] = DEFAULT_SAMPLERS,
    steps: Sequence[int] = DEFAULT_STEPS,
    *,
    pipe: Any = None,
    num_images: int = DEFAULT_NUM_IMAGES,
    guidance_scale: float | None = None,
    seed: int = 0,
    tgate: int | None = None,
    tgate_cond_weight: float = 0.5,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[CompareResult, dict[tuple[str, int], torch.Tensor]]:
    """Sample every (sampler, steps) cell from the same noise and labels and score it.

    Args:
        samplers: names from :func:`fastdiff.available_samplers`.
        steps: numbers of inference steps.
        pipe: a ``DigitsPipeline``; default: the embedded model.
        num_images: images per cell (class labels cycle 0..9).
        guidance_scale: CFG scale; default: the pipeline's default.
        seed: seed of the shared initial noise (and of stochastic samplers).
        tgate: gate step for TGATE cross-attention caching; cells with fewer steps run uncached.
        tgate_cond_weight: TGATE's ``cond_weight`` (:func:`fastdiff.enable_tgate`).
        device: torch device string.
        progress: show a progress bar.

    Returns:
        The result and the images of every cell (``[N, 1, H, W]`` in [0, 1]).
    """
    from .metrics import evaluate_samples
    from .models.digits import DEFAULT_GUIDANCE_SCALE, _check_device, load_embedded_pipeline
    from .samplers.tgate import check_cond_weight, disable_tgate, enable_tgate

    _check_args(samplers, steps, num_images)
    dev = _check_device(device)
    if tgate is not None and (not isinstance(tgate, int) or tgate < 1):
        raise ValueError(f"tgate must be a gate step >= 1, got {tgate!r}")
    if tgate is not None:
        check_cond_weight(tgate_cond_weight)
    pipe = pipe if pipe is not None else load_embedded_pipeline(dev)
    pipe.set_progress_bar_config(disable=True)
    guidance_scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
    labels = torch.arange(num_images) % 10
    cfg = pipe.transformer.config
    noise = torch.randn(num_images, cfg.in_channels, cfg.sample_size, cfg.sample_size,
                        generator=torch.Generator().manual_seed(seed))
    base_config = pipe.scheduler.config
    cells: list[CompareCell] = []
    images: dict[tuple[str, int], torch.Tensor] = {}
    notes: set[str] = set()
    counter = _CallCounter(pipe.transformer)
    grid = [(s, n) for s in samplers for n in steps]
    try:
        with _progress(progress, len(grid)) as advance:
            for name, n in grid:
                pipe.scheduler = make_scheduler(name, base_config)
                gated = tgate is not None and tgate <= n
                if gated:
                    enable_tgate(pipe, gate_step=tgate, cond_weight=tgate_cond_weight)
                counter.calls = 0
                start = time.perf_counter()
                try:
                    out = pipe(labels, num_inference_steps=n, guidance_scale=guidance_scale, latents=noise.clone(),
                               generator=torch.Generator(dev).manual_seed(seed + 1), output_type="pt").images
                finally:
                    if gated:
                        disable_tgate(pipe)
                seconds = time.perf_counter() - start
                with warnings.catch_warnings():  # the metric that ran is recorded in the result instead
                    warnings.simplefilter("ignore", UserWarning)
                    m = evaluate_samples(out.cpu(), labels, value_range=(0, 1))
                notes.add(m.note)
                cells.append(CompareCell(name, n, counter.calls, seconds, m.metric, m.fd, m.accuracy,
                                         tgate if gated else None))
                images[(name, n)] = out.cpu()
                advance(f"{name} x {n}")
    finally:
        counter.remove()
    settings = {"samplers": list(samplers), "steps": list(steps), "num_images": num_images,
                "guidance_scale": guidance_scale, "seed": seed, "tgate": tgate,
                "tgate_cond_weight": tgate_cond_weight if tgate is not None else None, "model": "embedded digits",
                "metric_note": "; ".join(sorted(n for n in notes if n))}
    return CompareResult(cells, settings, environment_info(dev)), images


class _progress:
    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda description: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn())
        self._bar.start()
        task = self._bar.add_task("sampling", total=self.total)
        return lambda description: self._bar.update(task, advance=1, description=description)

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self._bar.stop()


def render_table(result: CompareResult):
    """A rich table of the cells."""
    from rich.table import Table

    metric = result.cells[0].metric if result.cells else "FD"
    table = Table(title=f"fastdiff compare ({result.settings['num_images']} images, "
                        f"guidance {result.settings['guidance_scale']}, {result.environment.get('device', '')})")
    for col in ("sampler", "steps", "NFE", metric, "class acc.", "time (s)"):
        table.add_column(col, justify="left" if col == "sampler" else "right")
    for c in result.cells:
        acc = "-" if c.accuracy is None else f"{c.accuracy:.3f}"
        name = c.sampler + (f" +tgate@{c.tgate}" if c.tgate else "")
        table.add_row(name, str(c.steps), str(c.nfe), f"{c.fd:.3f}", acc, f"{c.seconds:.2f}")
    return table


def save_outputs(result: CompareResult, images: dict[tuple[str, int], torch.Tensor], out_dir: str | Path) -> dict[str, Path]:
    """Write ``compare.json``, ``fd_vs_steps.png`` and ``samples.png`` under ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "compare.json", "plot": out / "fd_vs_steps.png", "grid": out / "samples.png"}
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2))

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in result.settings["samplers"]:
        cells = [c for c in result.cells if c.sampler == name]
        ax.plot([c.nfe for c in cells], [c.fd for c in cells], marker="o", label=name)
    ax.set_xlabel("NFE (denoiser calls)")
    ax.set_ylabel(result.cells[0].metric)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("FD vs steps")
    fig.tight_layout()
    fig.savefig(paths["plot"], dpi=120)
    plt.close(fig)

    keys = list(images)
    rows = [images[k][:10, 0] for k in keys]  # one image per class
    fig, axes = plt.subplots(len(rows), 1, figsize=(6, 0.75 * len(rows) + 0.3), squeeze=False)
    for ax, key, row in zip(axes[:, 0], keys, rows):
        ax.imshow(torch.cat(list(row), dim=1).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_axis_off()
        ax.set_title(f"{key[0]} x {key[1]}", fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(paths["grid"], dpi=120)
    plt.close(fig)
    return paths
