"""``fastdiff compare``: samplers x step counts on one model and one fixed seed set.

Every cell samples the same initial noise and conditions, so the differences between cells are the
samplers' alone. Two kinds of measure per cell:

* **the sampler's own error**: the distance to the *converged* solution from the same noise, a
  many-step reference run (``reference_sampler`` x ``reference_steps``): rms over pixels, and (digits)
  FD-digits between the cell's samples and the reference samples. This is what a sampler comparison
  should rank: it falls to 0 as the ODE is solved more exactly, whatever the model's quality.
* **sample quality**: FD-digits to the data and class accuracy (the embedded model), which converge to the
  reference's own values as steps grow.

Also NFE (denoiser calls, counted with a hook; one call = one CFG-batched evaluation) and wall time (one
untimed warm-up call first; short cells are timed as the median of repeats). Output: a rich table with
the winner of each step count on each measure, JSON, a PNG plot of both measures against NFE with the
converged level drawn as a line, and a sample grid.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .flows.compare import FLOW_MODELS  # flow models are compared by run_flow_compare
from .samplers.registry import available_samplers, make_scheduler

DEFAULT_SAMPLERS = ("ddim", "dpmpp_2m", "unipc", "deis", "accel_ddim", "dpmpp_2m_dualfast")
DEFAULT_STEPS = (5, 10, 20)  # --steps 5,10,20,50 adds the plateau (2.4x the time)
DEFAULT_NUM_IMAGES = 100
DEFAULT_REFERENCE = ("dpmpp_2m", 100)  # second order at 100 steps: its own error is far below any cell's
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"
MIN_TIMED_SECONDS = 0.5  # cells faster than this are timed as the median of 3 runs
MEASURES = {"rms_to_ref": "rms to converged", "fd_to_ref": "FD to converged", "fd": "FD to data"}


@dataclass
class CompareCell:
    sampler: str
    steps: int
    nfe: int
    seconds: float
    metric: str
    fd: float | None  # FD to the data (None where the model has no data reference)
    accuracy: float | None
    tgate: int | None = None
    rms_to_ref: float | None = None  # rms distance to the converged (reference) samples from the same noise
    fd_to_ref: float | None = None  # FD between the cell's samples and the reference samples


@dataclass
class CompareResult:
    cells: list[CompareCell]
    settings: dict[str, Any]
    environment: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)

    def winners(self) -> dict[str, dict[int, str]]:
        """``{measure: {steps: sampler}}``: the lowest value of each measure at each step count."""
        out: dict[str, dict[int, str]] = {}
        for measure in MEASURES:
            best: dict[int, CompareCell] = {}
            for c in self.cells:
                value = getattr(c, measure)
                if value is not None and (c.steps not in best or value < getattr(best[c.steps], measure)):
                    best[c.steps] = c
            if best:
                out[measure] = {n: best[n].sampler for n in sorted(best)}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "environment": self.environment, "reference": self.reference,
                "winners": {m: {str(n): s for n, s in w.items()} for m, w in self.winners().items()},
                "cells": [asdict(c) for c in self.cells]}


class CompareInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_compare`; ``result`` and ``images`` hold the cells finished so far."""

    def __init__(self, result: CompareResult, images: dict[tuple[str, int], torch.Tensor]) -> None:
        super().__init__(f"interrupted after {len(result.cells)} cell(s)")
        self.result, self.images = result, images


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


def check_compare_args(samplers: Sequence[str], steps: Sequence[int], num_images: int,
                       reference: tuple[str, int] = DEFAULT_REFERENCE) -> None:
    """Validate names and counts (cheap: importing the sampler registry does not import torch)."""
    known = available_samplers()
    if not samplers:
        raise ValueError("samplers must name at least one sampler")
    for name in [*samplers, reference[0]]:
        if name not in known:
            raise ValueError(f"unknown sampler {name!r}; available samplers: {', '.join(known)}")
    if not steps:
        raise ValueError("steps must contain at least one step count")
    for n in [*steps, reference[1]]:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"steps must be integers >= 1, got {n!r}")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 2:
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


# embedded models reachable by name (``--model digits-unet``), offline; the default (None) is the PixArt model
EMBEDDED_MODELS = {"digits-unet": "load_embedded_unet_pipeline"}  # name -> loader in fastdiff.models.digits


def load_pipeline(model: str | None = None, device: str | torch.device = "cpu"):
    """The embedded digits pipeline (``model=None``), an embedded model by name (``"digits-unet"``: the
    class-conditional UNet), or any diffusers pipeline from a local directory or a hub id
    (``DiffusionPipeline.from_pretrained``; hub ids need the network)."""
    from .models import digits
    from .models.digits import _check_device, load_embedded_pipeline

    dev = _check_device(device)
    if model is None:
        return load_embedded_pipeline(dev)
    if model in EMBEDDED_MODELS:
        return getattr(digits, EMBEDDED_MODELS[model])(dev)
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise ValueError(f"model {model!r} is neither a diffusers pipeline directory nor a reachable hub id: "
                         f"{err}") from err
    return pipe.to(dev)


def run_flow_compare(*args: Any, **kwargs: Any):
    """``fastdiff compare --model tarflow-digits``: :func:`fastdiff.flows.compare.run_flow_compare` (a flow's
    samplers are its inversion strategies, ``sequential`` the reference; there are no step counts)."""
    from .flows.compare import run_flow_compare as run

    return run(*args, **kwargs)


class _Target:
    """How to call one pipeline with fixed noise: the digits pipeline takes class labels, others prompts."""

    def __init__(self, pipe: Any, num_images: int, seed: int, prompts: Sequence[str] | None) -> None:
        from .models.digits import DigitsPipeline

        self.pipe, self.is_digits = pipe, isinstance(pipe, DigitsPipeline)
        self.denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if self.denoiser is None:
            raise ValueError(f"model: {type(pipe).__name__} has neither a unet nor a transformer to sample with")
        cfg = self.denoiser.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)
        size = (size, size) if isinstance(size, int) else size
        self.noise = torch.randn(num_images, cfg.in_channels, *size, generator=torch.Generator().manual_seed(seed))
        if self.is_digits:
            self.labels = torch.arange(num_images) % 10
            self.conditions: dict[str, Any] = {"class_labels": self.labels}
        else:
            prompts = list(prompts or [DEFAULT_PROMPT])
            self.labels = None
            self.conditions = {"prompt": [prompts[i % len(prompts)] for i in range(num_images)]}
        self.seed = seed

    def __call__(self, num_inference_steps: int, guidance_scale: float | None) -> torch.Tensor:
        kwargs = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
        device = self.pipe.device
        out = self.pipe(**self.conditions, num_inference_steps=num_inference_steps, latents=self.noise.clone(),
                        generator=torch.Generator(device).manual_seed(self.seed + 1), output_type="pt",
                        **kwargs).images
        return out.float().cpu()


def run_compare(
    samplers: Sequence[str] = DEFAULT_SAMPLERS,
    steps: Sequence[int] = DEFAULT_STEPS,
    *,
    pipe: Any = None,
    model: str | None = None,
    num_images: int = DEFAULT_NUM_IMAGES,
    guidance_scale: float | None = None,
    seed: int = 0,
    reference: tuple[str, int] = DEFAULT_REFERENCE,
    prompts: Sequence[str] | None = None,
    tgate: int | None = None,
    tgate_cond_weight: float = 0.5,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[CompareResult, dict[tuple[str, int], torch.Tensor]]:
    """Sample every (sampler, steps) cell from the same noise and conditions and score it.

    Args:
        samplers: names from :func:`fastdiff.available_samplers`.
        steps: numbers of inference steps.
        pipe: a pipeline object; default: ``model``, else the embedded digits model.
        model: a diffusers pipeline directory or hub id (used when ``pipe`` is None).
        num_images: images per cell (class labels cycle 0..9 on the digits model).
        guidance_scale: CFG scale; default: the pipeline's default.
        seed: seed of the shared initial noise (and of stochastic samplers).
        reference: ``(sampler, steps)`` of the converged solution every cell is measured against.
        prompts: prompts (cycled) for text-conditioned pipelines; ignored by the digits model.
        tgate: gate step for TGATE cross-attention caching; cells with fewer steps run uncached.
        tgate_cond_weight: TGATE's ``cond_weight`` (:func:`fastdiff.enable_tgate`).
        device: torch device string.
        progress: show a progress bar.

    Returns:
        The result and the images of every cell (``[N, C, H, W]`` in [0, 1]); key ``("reference", n)``
        holds the reference images.

    Raises:
        CompareInterrupted: on Ctrl-C, carrying the cells finished so far.
    """
    from .caching.tgate import check_cond_weight, disable_tgate, enable_tgate

    if model in FLOW_MODELS:
        raise ValueError(f"model {model!r} is a normalizing flow: compare its inversion strategies with "
                         "fastdiff.compare.run_flow_compare (samplers, no step counts)")
    samplers, steps = list(samplers), list(steps)
    check_compare_args(samplers, steps, num_images, reference)
    if tgate is not None and (isinstance(tgate, bool) or not isinstance(tgate, int) or tgate < 1):
        raise ValueError(f"tgate must be a gate step >= 1, got {tgate!r}")
    if tgate is not None:
        check_cond_weight(tgate_cond_weight)
    pipe = pipe if pipe is not None else load_pipeline(model, device)
    pipe.set_progress_bar_config(disable=True)
    target = _Target(pipe, num_images, seed, prompts)
    if guidance_scale is None and target.is_digits:
        from .models.digits import DEFAULT_GUIDANCE_SCALE

        guidance_scale = DEFAULT_GUIDANCE_SCALE
    base_config = pipe.scheduler.config
    base_scheduler = pipe.scheduler
    notes: set[str] = set()
    cells: list[CompareCell] = []
    images: dict[tuple[str, int], torch.Tensor] = {}
    settings = {"samplers": samplers, "steps": steps, "num_images": num_images, "guidance_scale": guidance_scale,
                "seed": seed, "noise": f"torch.randn([{num_images}, {', '.join(map(str, target.noise.shape[1:]))}], "
                                       f"generator seed {seed}); stochastic samplers: generator seed {seed + 1}",
                "conditions": "class labels i % 10" if target.is_digits else {"prompts": target.conditions["prompt"][:10]},
                "reference": {"sampler": reference[0], "steps": reference[1]},
                "timing": f"one untimed warm-up call; cells under {MIN_TIMED_SECONDS} s: median of 3 runs",
                "tgate": tgate, "tgate_cond_weight": tgate_cond_weight if tgate is not None else None,
                "model": "embedded digits" if model is None and target.is_digits else (model or type(pipe).__name__)}
    result = CompareResult(cells, settings, environment_info(pipe.device))
    counter = _CallCounter(target.denoiser)
    grid = [(s, n) for s in samplers for n in steps]
    try:
        with _progress(progress, len(grid) + 1) as advance:
            pipe.scheduler = make_scheduler(samplers[0], base_config)
            target(1, guidance_scale)  # warm-up: first-call allocations and lazy inits stay out of the timings
            pipe.scheduler = make_scheduler(reference[0], base_config)
            ref_images = target(reference[1], guidance_scale)
            images[("reference", reference[1])] = ref_images
            ref_metrics = _quality(ref_images, target, notes)
            result.reference = {"sampler": reference[0], "steps": reference[1], **ref_metrics}
            advance(f"reference {reference[0]} x {reference[1]}")
            for name, n in grid:
                pipe.scheduler = make_scheduler(name, base_config)
                gated = tgate is not None and tgate <= n
                if gated:
                    enable_tgate(pipe, gate_step=tgate, cond_weight=tgate_cond_weight)
                try:
                    out, seconds, nfe = _timed(target, counter, n, guidance_scale)
                finally:
                    if gated:
                        disable_tgate(pipe)
                quality = _quality(out, target, notes)
                rms = float((out - ref_images).pow(2).mean().sqrt() * 2)  # in the model's [-1, 1] data range
                fd_ref = _fd_to(out, ref_images) if target.is_digits else None
                cells.append(CompareCell(name, n, nfe, seconds, quality["metric"], quality["fd"], quality["accuracy"],
                                         tgate if gated else None, rms, fd_ref))
                images[(name, n)] = out
                advance(f"{name} x {n}")
    except KeyboardInterrupt as err:
        settings["interrupted"] = True
        raise CompareInterrupted(result, images) from err
    finally:
        counter.remove()
        pipe.scheduler = base_scheduler
    settings["metric_note"] = "; ".join(sorted(n for n in notes if n))
    return result, images


def _timed(target: _Target, counter: _CallCounter, n: int, guidance_scale: float | None):
    counter.calls = 0
    start = time.perf_counter()
    out = target(n, guidance_scale)
    seconds, nfe = time.perf_counter() - start, counter.calls
    if seconds < MIN_TIMED_SECONDS:
        runs = [seconds]
        for _ in range(2):
            start = time.perf_counter()
            target(n, guidance_scale)
            runs.append(time.perf_counter() - start)
        seconds = statistics.median(runs)
    return out, seconds, nfe


def _quality(images: torch.Tensor, target: _Target, notes: set[str]) -> dict[str, Any]:
    """FD-digits to the test split and class accuracy (digits), or nothing (no data reference)."""
    if not target.is_digits:
        return {"metric": "none (no data reference)", "fd": None, "accuracy": None}
    from .metrics import evaluate_samples

    with warnings.catch_warnings():  # the metric that ran is recorded in the result instead
        warnings.simplefilter("ignore", UserWarning)
        m = evaluate_samples(images, target.labels, value_range=(0, 1), metric="digits")
    notes.add(m.note)
    return {"metric": m.metric, "fd": m.fd, "accuracy": m.accuracy}


def _fd_to(images: torch.Tensor, reference: torch.Tensor) -> float:
    from .metrics import frechet_distance

    return frechet_distance(images, reference, value_range=(0, 1), feature="digits")


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


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render_table(result: CompareResult):
    """A rich table of the cells; the best value of each measure at each step count is bold and starred."""
    from rich.table import Table

    metric = result.cells[0].metric if result.cells else "FD"
    ref = result.reference
    table = Table(title=f"fastdiff compare: {result.settings['num_images']} images, guidance "
                        f"{result.settings['guidance_scale']}, {result.environment.get('device', '')}")
    columns = ["sampler", "steps", "NFE", "rms to conv.", "FD to conv.", f"{metric.split('-')[0]} to data", "acc.",
               "time s"]
    for col in columns:
        table.add_column(col, justify="left" if col == "sampler" else "right")
    winners = result.winners()
    def mark(c: CompareCell, measure: str) -> str:
        value = getattr(c, measure)
        won = winners.get(measure, {}).get(c.steps) == c.sampler
        return f"[bold]*{_fmt(value)}[/bold]" if won and value is not None else _fmt(value)

    for c in result.cells:
        name = c.sampler + (f" +tgate@{c.tgate}" if c.tgate else "")
        table.add_row(name, str(c.steps), str(c.nfe), mark(c, "rms_to_ref"), mark(c, "fd_to_ref"), mark(c, "fd"),
                      _fmt(c.accuracy), f"{c.seconds:.2f}")
    table.caption = (f"conv. = converged: {ref.get('sampler')} x {ref.get('steps')} from the same noise"
                     + (f" ({metric} {_fmt(ref.get('fd'))}, acc. {_fmt(ref.get('accuracy'))})" if ref.get("fd") else "")
                     + "; * best at that step count")
    return table


def save_outputs(result: CompareResult, images: dict[tuple[str, int], torch.Tensor], out_dir: str | Path) -> dict[str, Path]:
    """Write ``compare.json``, ``fd_vs_steps.png`` and ``samples.png`` under ``out_dir``."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "compare.json", "plot": out / "fd_vs_steps.png", "grid": out / "samples.png"}
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2))

    has_fd = any(c.fd is not None for c in result.cells)
    fig, axes = plt.subplots(1, 2 if has_fd else 1, figsize=(11 if has_fd else 6, 4), squeeze=False)
    ax_err = axes[0, 0]
    ref = result.reference
    for name in result.settings["samplers"]:
        cells = [c for c in result.cells if c.sampler == name]
        if not cells:
            continue
        nfe = [c.nfe for c in cells]
        line = ax_err.plot(nfe, [c.rms_to_ref for c in cells], marker="o", label=name)[0]
        if has_fd:
            axes[0, 1].plot(nfe, [c.fd for c in cells], marker="o", label=name, color=line.get_color())
    ax_err.set_title(f"sampler error: rms to the converged solution ({ref.get('sampler')} x {ref.get('steps')})",
                     fontsize=9)
    ax_err.set_ylabel("rms to converged (same noise)")
    if has_fd:
        ax = axes[0, 1]
        if ref.get("fd") is not None:
            ax.axhline(ref["fd"], color="k", linestyle="--", linewidth=1, label="converged")
        ax.set_title(f"sample quality: {result.cells[0].metric} to data", fontsize=9)
        ax.set_ylabel(result.cells[0].metric)
    ticks = sorted({c.nfe for c in result.cells})
    for ax in axes[0]:
        ax.set_xlabel("NFE (denoiser calls)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths["plot"], dpi=120)
    plt.close(fig)

    keys = [k for k in images if k[0] == "reference"] + [k for k in images if k[0] != "reference"]
    rows = [images[k][:10] for k in keys]  # the first ten images (one per class on digits)
    fig, axes = plt.subplots(len(rows), 1, figsize=(6, 0.75 * len(rows) + 0.3), squeeze=False)
    for ax, key, row in zip(axes[:, 0], keys, rows):
        strip = torch.cat(list(row), dim=-1).permute(1, 2, 0)  # [H, 10 W, C]
        ax.imshow(strip[..., 0].numpy() if strip.shape[-1] == 1 else strip.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_axis_off()
        ax.set_title(f"{key[0]} x {key[1]}" + (" (converged)" if key[0] == "reference" else ""), fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(paths["grid"], dpi=120)
    plt.close(fig)
    return paths
