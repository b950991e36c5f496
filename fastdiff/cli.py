"""The ``fastdiff`` command: ``compare``, ``sample``, ``train``, ``bench``.

With no model given every command runs on the embedded digits model, offline, on the CPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: 0)")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the model's)")
    p.add_argument("--tgate", type=int, default=None, metavar="GATE_STEP",
                   help="cache cross-attention after this step and drop CFG (TGATE)")
    p.add_argument("--tgate-cond-weight", type=float, default=0.5, metavar="W",
                   help="with --tgate: keep uncond + W (cond - uncond) at the gate (default 0.5, the paper's mean; "
                        "the guidance scale keeps CFG's effect)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compare", help="samplers x steps -> FD, class accuracy, NFE, time; table, JSON, plot")
    p.add_argument("--samplers", type=_name_list, default=None,
                   help="comma-separated sampler names (default: ddim,dpmpp_2m,unipc,euler,accel_ddim,dpmpp_2m_dualfast); "
                        "see `fastdiff samplers`")
    p.add_argument("--steps", type=_int_list, default=None, help="comma-separated step counts (default: 5,10,20)")
    p.add_argument("--num-images", type=int, default=None, help="images per cell (default: 100)")
    p.add_argument("--out", default="fastdiff-out/compare", help="output folder (default: fastdiff-out/compare)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_common(p)

    p = sub.add_parser("sample", help="sample a grid of digits with one sampler and save a PNG")
    p.add_argument("--sampler", default="ddim", help="sampler name (default: ddim)")
    p.add_argument("--steps", type=int, default=50, help="inference steps (default: 50)")
    p.add_argument("--per-class", type=int, default=8, help="images per digit class (default: 8)")
    p.add_argument("--out", default="fastdiff-out/samples.png", help="output PNG")
    _add_common(p)

    sub.add_parser("samplers", help="list the sampler names")

    p = sub.add_parser("train", help="train a model (see `fastdiff train --help`)", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)

    p = sub.add_parser("bench", help="run a benchmark script from benchmarks/ (writes benchmarks/results/)")
    p.add_argument("name", nargs="?", help="benchmark name, e.g. few_step; omit to list them")
    p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _compare(args: argparse.Namespace) -> None:
    from rich.console import Console

    from .compare import (
        DEFAULT_NUM_IMAGES,
        DEFAULT_SAMPLERS,
        DEFAULT_STEPS,
        render_table,
        run_compare,
        save_outputs,
    )

    console = Console()
    result, images = run_compare(
        args.samplers or list(DEFAULT_SAMPLERS), args.steps or list(DEFAULT_STEPS),
        num_images=args.num_images or DEFAULT_NUM_IMAGES, guidance_scale=args.guidance_scale, seed=args.seed,
        tgate=args.tgate, tgate_cond_weight=args.tgate_cond_weight, device=args.device,
        progress=not args.no_progress,
    )
    console.print(render_table(result))
    paths = save_outputs(result, images, args.out)
    note = result.settings["metric_note"]
    console.print(f"metric: {result.cells[0].metric}" + (f" ({note})" if note else ""))
    console.print(f"wrote {paths['json']}, {paths['plot']}, {paths['grid']}")


def _sample(args: argparse.Namespace) -> None:
    import torch

    from .models.digits import _check_device, load_embedded_pipeline
    from .samplers.registry import make_scheduler

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {args.per_class}")
    pipe = load_embedded_pipeline(_check_device(args.device))
    pipe.scheduler = make_scheduler(args.sampler, pipe.scheduler.config)
    if args.tgate is not None:
        from .samplers.tgate import enable_tgate

        enable_tgate(pipe, gate_step=args.tgate, cond_weight=args.tgate_cond_weight)
    kwargs = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
    labels = torch.arange(10).repeat_interleave(args.per_class)
    images = pipe(labels, num_inference_steps=args.steps, generator=torch.Generator(args.device).manual_seed(args.seed),
                  output_type="pt", **kwargs).images.cpu()
    rows = images[:, 0].reshape(10, args.per_class, *images.shape[2:])
    grid = torch.cat([torch.cat(list(r), dim=1) for r in rows], dim=0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.fromarray((grid.numpy() * 255).round().astype("uint8")).resize(
        (grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(out)
    print(f"wrote {out} ({args.sampler}, {args.steps} steps, {len(labels)} images)")


def _bench(args: argparse.Namespace) -> int:
    scripts = sorted(p.stem for p in BENCHMARKS_DIR.glob("*.py")) if BENCHMARKS_DIR.is_dir() else []
    if not args.name:
        print("benchmarks:", ", ".join(scripts) if scripts else "(none found: run from a source checkout)")
        return 0
    if args.name not in scripts:
        raise ValueError(f"unknown benchmark {args.name!r}; available: {', '.join(scripts) or 'none'}")
    return subprocess.call([sys.executable, str(BENCHMARKS_DIR / f"{args.name}.py"), *args.args])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # everything after `train` belongs to the training script's own parser (argparse.REMAINDER drops options)
    args = None if argv[:1] == ["train"] else build_parser().parse_args(argv)
    command = "train" if args is None else args.command
    try:
        if command == "train":
            from .training.train import main as train_main

            train_main(argv[1:])
        elif command == "compare":
            _compare(args)
        elif command == "sample":
            _sample(args)
        elif command == "samplers":
            from .samplers.registry import available_samplers, sampler_spec

            for name in available_samplers():
                print(f"{name:<22} {sampler_spec(name).description}")
        elif command == "bench":
            return _bench(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"fastdiff {command}: error: {err}", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main())
