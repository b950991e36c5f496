"""``fastdiff compare --model tarflow-digits``: the flow's inversion strategies side by side.

A normalizing flow has no denoising steps: one sample is one inversion of every flow block, so the
diffusion compare's *samplers x steps* grid becomes a list of *inversion strategies* (``--samplers``), all
inverting the same prior noise with the same labels at the same guidance:

* ``sequential``: KV-cached token-by-token inversion, ``T - 1`` transformer passes per block: the exact
  inverse, so it is also the **reference** every cell's own error is measured against (rms over pixels of
  the inverted samples and FD-digits between the cell's and the reference's samples), as the diffusion
  compare measures against its converged many-step run;
* ``jacobi``: every block Jacobi on the whole sequence;
* ``gs_jacobi_fixed``: every block GS-Jacobi with ``FIXED_SEGMENTS`` segments (the same strategy everywhere);
* ``gs_jacobi_auto``: the shipped automatic strategy (CRM / IGM calibration, :func:`~fastdiff.flows.auto_strategy`).

All use the model's default stopping rule (the paper's criterion and tolerance) and clamp. Per cell: sequential
transformer passes (a guided pass counts once: conditional and unconditional are batched), FD-digits to the
data and class accuracy, the two reference errors, wall time of the whole batch (inversion and the denoising
step; one untimed warm-up call first, cells under ``MIN_TIMED_SECONDS`` timed as the median of 3 runs) and,
where GS-Jacobi pays on a CPU, wall time and passes at batch 1 (the strategies interleaved image by image so
machine load hits them alike; median). The JSON has the diffusion compare's top-level keys (``settings``,
``environment``, ``reference``, ``winners``, ``cells``); ``winners`` is one sampler per measure (no step counts)
plus ``passes_at_equal_fd``, the fewest passes among the cells within ``FD_MARGIN`` of the reference's FD.

Torch is imported inside the functions, so the CLI checks arguments (:func:`check_flow_compare_args`) first.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FLOW_MODELS = ("tarflow-digits",)  # --model names served by this module (the shipped digits TarFlow)
FLOW_SAMPLERS = ("sequential", "jacobi", "gs_jacobi_fixed", "gs_jacobi_auto")
REFERENCE_SAMPLER = "sequential"
FIXED_SEGMENTS = 8
DEFAULT_NUM_IMAGES = 100
DEFAULT_BATCH1_IMAGES = 5
FD_MARGIN = 0.02  # "equal FD": within 2 % of the sequential inversion's (issue 15)
MEASURES = {"rms_to_ref": "rms to sequential", "fd_to_ref": "FD to sequential", "fd": "FD to data",
            "passes": "passes", "seconds": "time", "seconds_batch1": "time at batch 1"}


def check_flow_compare_args(samplers: Sequence[str], num_images: int, batch1_images: int = DEFAULT_BATCH1_IMAGES,
                            guidance: float | None = None) -> None:
    """Validate names and counts without importing torch."""
    if not samplers:
        raise ValueError(f"samplers must name at least one flow sampler: {', '.join(FLOW_SAMPLERS)}")
    for name in samplers:
        if name not in FLOW_SAMPLERS:
            raise ValueError(f"unknown flow sampler {name!r}; the flow's samplers are its inversion strategies: "
                             f"{', '.join(FLOW_SAMPLERS)}")
    if len(set(samplers)) != len(samplers):
        raise ValueError(f"samplers must not repeat a name, got {list(samplers)}")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 2:
        raise ValueError(f"num_images must be an int >= 2 (FD needs two or more), got {num_images!r}")
    if isinstance(batch1_images, bool) or not isinstance(batch1_images, int) or batch1_images < 0:
        raise ValueError(f"batch1_images must be an int >= 0 (0 skips the batch-1 timing), got {batch1_images!r}")
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                                 or guidance != guidance or guidance < 0):
        raise ValueError(f"guidance must be a number >= 0 (TarFlow's guidance weight, 0 = none), got {guidance!r}")


def flow_sampler_kwargs(name: str, settings: Any, num_tokens: int, guidance: float | None = None) -> dict:
    """:func:`~fastdiff.flows.invert` keywords of flow sampler ``name`` with the model's default stopping rule,
    guidance (or ``guidance``) and annealing (``settings``: a :class:`~fastdiff.flows.DigitsTarFlowSettings`)."""
    if name not in FLOW_SAMPLERS:
        raise ValueError(f"unknown flow sampler {name!r}; available: {', '.join(FLOW_SAMPLERS)}")
    shipped = settings.invert_kwargs()
    common = {k: shipped[k] for k in ("annealed", "criterion", "tolerance")}
    common["guidance"] = shipped["guidance"] if guidance is None else float(guidance)
    method = {"sequential": {"method": "sequential"}, "jacobi": {"method": "jacobi"},
              "gs_jacobi_fixed": {"method": "gs_jacobi", "num_segments": min(FIXED_SEGMENTS, num_tokens - 1)},
              "gs_jacobi_auto": {"method": "gs_jacobi", "strategy": shipped["strategy"]}}[name]
    return {**common, **method}


@dataclass
class FlowCompareCell:
    sampler: str
    passes: float  # sequential transformer passes of the batch inversion
    pass_speedup: float  # sequential passes / passes
    seconds: float  # wall time of the batch (inversion + denoising)
    metric: str
    fd: float
    accuracy: float
    rms_to_ref: float  # rms over pixels ([-1, 1] range) to the sequential inversion from the same noise
    fd_to_ref: float
    converged: bool  # every segment of every block met the tolerance (or ran to its exact length)
    seconds_batch1: float | None = None  # median per image at batch 1
    passes_batch1: float | None = None  # mean per image at batch 1
    strategy: list[dict] = field(default_factory=list)  # per block, gs_jacobi only
    blocks: list[dict] = field(default_factory=list)  # per-block stats of the batch inversion


@dataclass
class FlowCompareResult:
    cells: list[FlowCompareCell]
    settings: dict[str, Any]
    environment: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)

    def winners(self) -> dict[str, str]:
        """``{measure: sampler}``: the lowest value of each measure (the reference's own errors excluded), and
        ``passes_at_equal_fd``: the fewest passes among cells within ``FD_MARGIN`` of the reference's FD."""
        out: dict[str, str] = {}
        for measure in MEASURES:
            cells = [c for c in self.cells if getattr(c, measure) is not None
                     and not (measure in ("rms_to_ref", "fd_to_ref") and c.sampler == REFERENCE_SAMPLER)]
            if cells:
                out[measure] = min(cells, key=lambda c: getattr(c, measure)).sampler
        fd_ref = self.reference.get("fd")
        if fd_ref is not None:
            equal = [c for c in self.cells if abs(c.fd - fd_ref) <= FD_MARGIN * fd_ref]
            if equal:
                out["passes_at_equal_fd"] = min(equal, key=lambda c: c.passes).sampler
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "environment": self.environment, "reference": self.reference,
                "winners": self.winners(), "cells": [asdict(c) for c in self.cells]}


def load_flow(model: str = "tarflow-digits", device: str = "cpu"):
    """``(TarFlow, settings)`` of a flow model name (``FLOW_MODELS``)."""
    if model not in FLOW_MODELS:
        raise ValueError(f"model {model!r} is not a flow model; available: {', '.join(FLOW_MODELS)}")
    from fastdiff.models.digits import _check_device

    from .digits import load_digits_tarflow

    return load_digits_tarflow(device=_check_device(device))


def run_flow_compare(
    samplers: Sequence[str] = FLOW_SAMPLERS,
    *,
    model: str = "tarflow-digits",
    flow: tuple[Any, Any] | None = None,
    num_images: int = DEFAULT_NUM_IMAGES,
    guidance: float | None = None,
    seed: int = 0,
    batch1_images: int = DEFAULT_BATCH1_IMAGES,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[FlowCompareResult, dict[str, Any]]:
    """Invert the same prior noise with every flow sampler and score it against the sequential inverse.

    Args:
        samplers: names from ``FLOW_SAMPLERS`` (inversion strategies; a flow has no step counts).
        model: a name from ``FLOW_MODELS`` (used when ``flow`` is None).
        flow: ``(TarFlow, DigitsTarFlowSettings)`` to compare instead of ``model``.
        num_images: images per cell (labels cycle 0..9), inverted as one batch.
        guidance: TarFlow guidance weight (0 = none); default: the model's.
        seed: seed of the shared prior noise.
        batch1_images: images inverted one at a time per sampler for the batch-1 timing (0: skip).
        device: torch device string.
        progress: show a progress bar.

    Returns:
        The result and the images of every cell (``[N, 1, 16, 16]`` in [0, 1], as FD-digits sees them); key
        ``"reference"`` holds the sequential inversion's.

    Raises:
        CompareInterrupted: on Ctrl-C, carrying the cells finished so far.
    """
    import torch

    from fastdiff.compare import MIN_TIMED_SECONDS, CompareInterrupted, _fd_to, _progress, environment_info
    from fastdiff.metrics import evaluate_samples

    from .digits import metric_images
    from .sampling import invert

    samplers = list(samplers)
    check_flow_compare_args(samplers, num_images, batch1_images, guidance)
    net, settings = flow if flow is not None else load_flow(model, device)
    param = next(net.parameters())
    T, D = net.num_tokens, net.token_dim
    noise = torch.randn(num_images, T, D, generator=torch.Generator().manual_seed(seed), dtype=param.dtype)
    noise, labels = noise.to(param.device), torch.arange(num_images, device=param.device) % 10
    kwargs = {name: flow_sampler_kwargs(name, settings, T, guidance) for name in {*samplers, REFERENCE_SAMPLER}}
    w = kwargs[REFERENCE_SAMPLER]["guidance"]

    def run(name: str, z, y):
        x, stats = invert(net, z, y, **kwargs[name])
        return net.denoise(net.unpatchify(x), y), x, stats

    def timed(name: str):
        tic = time.perf_counter()
        out = run(name, noise, labels)
        seconds = time.perf_counter() - tic
        if seconds < MIN_TIMED_SECONDS:
            runs = [seconds]
            for _ in range(2):
                tic = time.perf_counter()
                run(name, noise, labels)
                runs.append(time.perf_counter() - tic)
            seconds = statistics.median(runs)
        return (*out, seconds)

    def quality(images):
        with warnings.catch_warnings():  # small sample counts: the metric's own warning, recorded as the note
            warnings.simplefilter("ignore", UserWarning)
            return evaluate_samples(images, labels.cpu(), value_range=(0, 1), metric="digits")

    settings_out = {
        "kind": "flow", "model": model if flow is None else type(net).__name__, "samplers": samplers,
        "steps": "not applicable: a flow samples by one inversion; samplers are inversion strategies",
        "num_images": num_images, "guidance": w, "annealed": kwargs[REFERENCE_SAMPLER]["annealed"],
        "criterion": kwargs[REFERENCE_SAMPLER]["criterion"], "tolerance": kwargs[REFERENCE_SAMPLER]["tolerance"],
        "fixed_segments": min(FIXED_SEGMENTS, T - 1), "seed": seed, "num_tokens": T, "fd_margin": FD_MARGIN,
        "noise": f"torch.randn([{num_images}, {T}, {D}], generator seed {seed})", "conditions": "class labels i % 10",
        "reference": {"sampler": REFERENCE_SAMPLER, "note": "the exact inverse"},
        "timing": f"one untimed warm-up call; cells under {MIN_TIMED_SECONDS} s: median of 3 runs; batch 1: "
                  f"median over {batch1_images} images, samplers interleaved",
        "batch1_images": batch1_images,
    }
    cells: list[FlowCompareCell] = []
    images: dict[str, Any] = {}
    result = FlowCompareResult(cells, settings_out, environment_info(param.device))
    try:
        with _progress(progress, len(samplers) + 1 + (batch1_images > 0)) as advance, torch.no_grad():
            invert(net, noise[:1], labels[:1], method="jacobi", max_iters=1)  # warm-up, untimed
            net.denoise(net.unpatchify(noise[:1]), labels[:1])
            ref_out, ref_x, ref_stats, ref_seconds = timed(REFERENCE_SAMPLER)
            images["reference"] = ref_images = metric_images(ref_out).cpu()
            ref_m = quality(ref_images)
            result.reference = {"sampler": REFERENCE_SAMPLER, "passes": ref_stats.passes, "metric": ref_m.metric,
                                "fd": ref_m.fd, "accuracy": ref_m.accuracy, "seconds": ref_seconds}
            advance(f"reference {REFERENCE_SAMPLER}")
            for name in samplers:
                if name == REFERENCE_SAMPLER:
                    out, x, stats, seconds = ref_out, ref_x, ref_stats, ref_seconds
                else:
                    out, x, stats, seconds = timed(name)
                shown = metric_images(out).cpu()
                m = quality(shown)
                rms = float((out.clamp(-1, 1) - ref_out.clamp(-1, 1)).pow(2).mean().sqrt())
                cells.append(FlowCompareCell(
                    name, stats.passes, stats.pass_speedup, seconds, m.metric, m.fd, m.accuracy, rms,
                    max(0.0, _fd_to(shown, ref_images)),  # FD >= 0: the matrix square root's round-off
                    all(b.converged for b in stats.blocks),
                    strategy=[asdict(s) for s in kwargs[name].get("strategy", [])],
                    blocks=[{"block": b.block, "passes": b.passes, "iterations": b.iterations,
                             "residual": b.residual, "converged": b.converged} for b in stats.blocks]))
                images[name] = shown
                advance(name)
            if batch1_images:
                times: dict[str, list[float]] = {name: [] for name in samplers}
                passes: dict[str, list[int]] = {name: [] for name in samplers}
                for i in range(min(batch1_images, num_images)):  # interleaved: every sampler on image i first
                    for name in samplers:
                        tic = time.perf_counter()
                        _, _, stats = run(name, noise[i:i + 1], labels[i:i + 1])
                        times[name].append(time.perf_counter() - tic)
                        passes[name].append(stats.passes)
                for c in cells:
                    c.seconds_batch1 = statistics.median(times[c.sampler])
                    c.passes_batch1 = statistics.mean(passes[c.sampler])
                advance("batch 1")
    except KeyboardInterrupt as err:
        settings_out["interrupted"] = True
        raise CompareInterrupted(result, images) from err
    settings_out["metric_note"] = ref_m.note
    return result, images


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def render_flow_table(result: FlowCompareResult):
    """A rich table of the cells; the best value of each measure is bold and starred."""
    from rich.table import Table

    s, ref = result.settings, result.reference
    table = Table(title=f"fastdiff compare {s['model']}: {s['num_images']} images, guidance {s['guidance']}, "
                        f"{result.environment.get('device', '')}")
    columns = ["sampler", "passes", "rms to seq", "FD", "acc.", f"s b={s['num_images']}", "s b=1"]
    for col in columns:
        table.add_column(col, justify="left" if col == "sampler" else "right", no_wrap=col == "sampler")
    winners = result.winners()
    capped = [c.sampler for c in result.cells if not c.converged]

    def mark(c: FlowCompareCell, measure: str, spec: str = ".3f") -> str:
        value = getattr(c, measure)
        won = winners.get(measure) == c.sampler
        return f"[bold]*{_fmt(value, spec)}[/bold]" if won and value is not None else _fmt(value, spec)

    for c in result.cells:
        table.add_row(c.sampler, mark(c, "passes", "g") + f" ({c.pass_speedup:.1f}x)", mark(c, "rms_to_ref", ".1e"),
                      mark(c, "fd"), _fmt(c.accuracy), mark(c, "seconds", ".2f"), mark(c, "seconds_batch1", ".3f"))
    caption = [f"reference: {ref.get('sampler')} inversion ({ref.get('metric', 'FD')} {_fmt(ref.get('fd'))}, acc. "
               f"{_fmt(ref.get('accuracy'))})",
               f"fewest passes within {100 * FD_MARGIN:.0f}% of its FD: {winners.get('passes_at_equal_fd', '-')}",
               f"* best; FD: {ref.get('metric', 'FD')} to the data; s b=N: wall time of the batch, b=1: per image"]
    if capped:
        caption.append(f"stopped by an iteration budget before the tolerance: {', '.join(capped)}")
    table.caption = "; ".join(caption)
    return table


def save_flow_outputs(result: FlowCompareResult, images: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``compare.json``, ``fd_vs_passes.png`` and ``samples.png`` under ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "compare.json", "plot": out / "fd_vs_passes.png", "grid": out / "samples.png"}
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2))

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for c in result.cells:
        axes[0].scatter(c.passes, c.fd, label=c.sampler)
        axes[1].scatter(c.seconds_batch1 if c.seconds_batch1 is not None else c.seconds, c.fd, label=c.sampler)
    fd_ref = result.reference.get("fd")
    for ax in axes:
        if fd_ref is not None:
            ax.axhspan(fd_ref * (1 - FD_MARGIN), fd_ref * (1 + FD_MARGIN), color="grey", alpha=0.15,
                       label=f"sequential FD +- {100 * FD_MARGIN:.0f}%")
        ax.set_ylabel(result.reference.get("metric", "FD"))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_xlabel("sequential transformer passes")
    has_b1 = any(c.seconds_batch1 is not None for c in result.cells)
    axes[1].set_xlabel("wall time per image at batch 1 (s)" if has_b1 else "wall time of the batch (s)")
    fig.suptitle(f"{result.settings['model']}: inversion strategies", fontsize=9)
    fig.tight_layout()
    fig.savefig(paths["plot"], dpi=120)
    plt.close(fig)

    keys = list(images)
    fig, axes = plt.subplots(max(len(keys), 1), 1, figsize=(6, 0.75 * max(len(keys), 1) + 0.3), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        strip = torch.cat(list(images[key][:10]), dim=-1)[0]  # the first ten images: one per class
        ax.imshow(strip.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_axis_off()
        ax.set_title(key + (" (sequential, exact)" if key == "reference" else ""), fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(paths["grid"], dpi=120)
    plt.close(fig)
    return paths


__all__ = ["FLOW_MODELS", "FLOW_SAMPLERS", "FlowCompareCell", "FlowCompareResult", "check_flow_compare_args",
           "flow_sampler_kwargs", "load_flow", "render_flow_table", "run_flow_compare", "save_flow_outputs"]
