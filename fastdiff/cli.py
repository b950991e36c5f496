"""The ``fastdiff`` command: ``compare``, ``sample``, ``samplers``, ``train``, ``bench``.

With no model given every command runs on the embedded digits model, offline, on the CPU.

Arguments are checked before torch and diffusers are imported (a typo fails at once, ``fastdiff samplers``
lists without them); Ctrl-C prints one line and exits with status 130 (``compare`` first writes the
cells finished so far, ``train`` a checkpoint).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

# the benchmark scripts live in the source repository, next to the package; a wheel does not ship them
REPOSITORY = Path(__file__).resolve().parent.parent
BENCHMARKS_DIR = REPOSITORY / "benchmarks"
BENCHMARKS_HINT = "the benchmarks/ folder of a fastdiff source checkout (git clone, then `pip install -e .`)"


def _int_at_least(minimum: int, what: str = "an integer", why: str = "") -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what} >= {minimum}{why}, got {text!r}")
        return value

    return parse


def _step_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated step counts >= 1, e.g. 5,10,20; got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated sampler names (see `fastdiff samplers`), "
                                         f"got {text!r}")
    return names


def _check_samplers(names: Sequence[str]) -> None:
    """Unknown names fail here, before torch is imported (the registry imports neither torch nor diffusers)."""
    from .samplers.registry import sampler_spec

    for name in names:
        sampler_spec(name)


def _check_writable_dir(folder: str | Path, option: str) -> Path:
    """Create ``folder`` and check a file can be written in it, so a bad path fails before any sampling."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(f"{option} {str(folder)!r} is not a writable directory: {err.strerror or err}") from err
    return folder


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="PATH_OR_ID",
                   help="a diffusers pipeline directory or hub id, or an embedded model: digits-unet (the "
                        "class-conditional UNet) (default: the embedded digits transformer, offline)")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="prompt for text-conditioned models (repeat for several; cycled over the images)")
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

    p = sub.add_parser("compare", help="samplers x steps -> FD, class accuracy, NFE, time; table, JSON, plot "
                                       "(--model tarflow-digits: the flow's inversion strategies)")
    p.add_argument("--samplers", type=_name_list, default=None,
                   help="comma-separated sampler names (default: ddim,dpmpp_2m,unipc,deis,accel_ddim,dpmpp_2m_dualfast); "
                        "see `fastdiff samplers`")
    p.add_argument("--steps", type=_step_list, default=None, help="comma-separated step counts (default: 5,10,20)")
    p.add_argument("--num-images", type=_int_at_least(2, "an image count", " (FD needs two)"), default=None,
                   help="images per cell, >= 2 (default: 100)")
    p.add_argument("--reference-sampler", default=None, metavar="NAME",
                   help="sampler of the converged solution each cell's error is measured against (default: dpmpp_2m)")
    p.add_argument("--reference-steps", type=_int_at_least(1, "a step count"), default=None, metavar="N",
                   help="its step count (default: 100; small values only for quick checks)")
    p.add_argument("--out", default="fastdiff-out/compare", help="output folder (default: fastdiff-out/compare)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--batch1-images", type=_int_at_least(0, "an image count"), default=None, metavar="N",
                   help="--model tarflow-digits: images also inverted one at a time per sampler, for the batch-1 "
                        "wall time (default: 5; 0 skips)")
    _add_common(p)

    p = sub.add_parser("sample", help="sample a grid of digits with one sampler and save a PNG")
    p.add_argument("--sampler", default="ddim", help="sampler name (default: ddim)")
    p.add_argument("--steps", type=_int_at_least(1, "a step count"), default=50, help="inference steps (default: 50)")
    p.add_argument("--per-class", type=_int_at_least(1, "an image count"), default=8,
                   help="images per digit class (default: 8)")
    p.add_argument("--out", default="fastdiff-out/samples.png", help="output PNG")
    _add_common(p)

    sub.add_parser("samplers", help="list the sampler names")

    p = sub.add_parser("train", help="train a model (see `fastdiff train --help`)", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)

    p = sub.add_parser("bench", help="run a benchmark script from benchmarks/ of a source checkout "
                                     "(writes benchmarks/results/)")
    p.add_argument("name", nargs="?", help="benchmark name, e.g. few_step; omit to list them")
    p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _compare_flow(args: argparse.Namespace) -> int:
    """``compare --model tarflow-digits``: the flow's inversion strategies (``fastdiff.flows.compare``)."""
    from .flows.compare import FLOW_SAMPLERS, check_flow_compare_args

    for option, value in (("--steps", args.steps), ("--reference-sampler", args.reference_sampler),
                          ("--reference-steps", args.reference_steps), ("--tgate", args.tgate),
                          ("--prompt", args.prompt)):
        if value is not None:
            why = {"--steps": "a flow samples by one inversion, not in steps",
                   "--reference-sampler": "the reference is the exact sequential inversion",
                   "--reference-steps": "the reference is the exact sequential inversion",
                   "--tgate": "TGATE caches diffusion cross-attention", "--prompt": "the flow is class-conditional"}
            raise ValueError(f"{option} does not apply to --model {args.model} ({why[option]}); its samplers are "
                             f"inversion strategies: --samplers {','.join(FLOW_SAMPLERS)}")
    samplers = args.samplers or list(FLOW_SAMPLERS)
    given = {"num_images": args.num_images, "batch1_images": args.batch1_images}
    given = {k: v for k, v in given.items() if v is not None}
    check_flow_compare_args(samplers, guidance=args.guidance_scale, **{"num_images": 100, **given})
    out = _check_writable_dir(args.out, "--out")
    from rich.console import Console

    from .compare import CompareInterrupted, run_flow_compare
    from .flows.compare import render_flow_table, save_flow_outputs

    console = Console()
    try:
        result, images = run_flow_compare(samplers, model=args.model, guidance=args.guidance_scale, seed=args.seed,
                                          device=args.device, progress=not args.no_progress, **given)
    except CompareInterrupted as stop:
        if not stop.result.cells:
            print("fastdiff compare: interrupted before any cell finished; nothing written", file=sys.stderr)
        else:
            paths = save_flow_outputs(stop.result, stop.images, out)
            print(f"fastdiff compare: interrupted; wrote the {len(stop.result.cells)} finished cell(s) to "
                  f"{paths['json']}", file=sys.stderr)
        return 130
    console.print(render_flow_table(result))
    paths = save_flow_outputs(result, images, out)
    console.print(f"metric: {result.reference['metric']}; wrote {paths['json']}, {paths['plot']}, {paths['grid']}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .flows.compare import FLOW_MODELS

    if args.model in FLOW_MODELS:
        return _compare_flow(args)
    if args.batch1_images is not None:
        raise ValueError("--batch1-images applies to flow models only (--model tarflow-digits)")
    _check_samplers([*(args.samplers or ()), *([args.reference_sampler] if args.reference_sampler else [])])
    out = _check_writable_dir(args.out, "--out")
    from rich.console import Console

    from .compare import DEFAULT_REFERENCE, render_table, run_compare, save_outputs

    console = Console()
    reference = None
    if args.reference_sampler or args.reference_steps:
        reference = (args.reference_sampler or DEFAULT_REFERENCE[0], args.reference_steps or DEFAULT_REFERENCE[1])
    given = {"samplers": args.samplers, "steps": args.steps, "num_images": args.num_images,
             "reference": reference}  # the others: compare's defaults
    try:
        result, images = run_compare(
            **{k: v for k, v in given.items() if v is not None}, guidance_scale=args.guidance_scale, seed=args.seed,
            tgate=args.tgate, tgate_cond_weight=args.tgate_cond_weight, device=args.device,
            progress=not args.no_progress, model=args.model, prompts=args.prompt,
        )
    except KeyboardInterrupt as stop:  # compare.CompareInterrupted carries the finished cells
        result, images = getattr(stop, "result", None), getattr(stop, "images", None)
        if result is None or not result.cells:
            print("fastdiff compare: interrupted before any cell finished; nothing written", file=sys.stderr)
        else:
            paths = save_outputs(result, images or {}, out)
            print(f"fastdiff compare: interrupted; wrote the {len(result.cells)} finished cell(s) to {paths['json']}",
                  file=sys.stderr)
        return 130
    console.print(render_table(result))
    paths = save_outputs(result, images, out)
    note = result.settings.get("metric_note")
    console.print(f"metric: {result.cells[0].metric}" + (f" ({note})" if note else ""))
    console.print(f"wrote {paths['json']}, {paths['plot']}, {paths['grid']}")
    return 0


def _sample(args: argparse.Namespace) -> None:
    _check_samplers([args.sampler])
    out = Path(args.out)
    _check_writable_dir(out.parent, "--out's folder")
    import torch

    from .compare import DEFAULT_PROMPT, load_pipeline
    from .models.digits import DigitsPipeline
    from .samplers.registry import make_scheduler

    pipe = load_pipeline(args.model, args.device)
    pipe.scheduler = make_scheduler(args.sampler, pipe.scheduler.config)
    if args.tgate is not None:
        from .caching import enable_tgate

        enable_tgate(pipe, gate_step=args.tgate, cond_weight=args.tgate_cond_weight)
    kwargs = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
    generator = torch.Generator(args.device).manual_seed(args.seed)
    if isinstance(pipe, DigitsPipeline):  # one row per digit class
        rows = 10
        images = pipe(torch.arange(10).repeat_interleave(args.per_class), num_inference_steps=args.steps,
                      generator=generator, output_type="pt", **kwargs).images.cpu()
    else:  # one row per prompt
        prompts = args.prompt or [DEFAULT_PROMPT]
        rows = len(prompts)
        images = pipe(prompt=prompts, num_images_per_prompt=args.per_class, num_inference_steps=args.steps,
                      generator=generator, output_type="pt", **kwargs).images.float().cpu()
    grid = images.reshape(rows, args.per_class, *images.shape[1:]).permute(0, 3, 1, 4, 2).flatten(2, 3).flatten(0, 1)
    from PIL import Image

    pixels = (grid.numpy() * 255).round().astype("uint8")
    picture = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    scale = max(1, 64 // images.shape[-1])
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(out)
    print(f"wrote {out} ({args.sampler}, {args.steps} steps, {len(images)} images)")


def _bench(args: argparse.Namespace) -> int:
    scripts = sorted(p.stem for p in BENCHMARKS_DIR.glob("*.py")) if (REPOSITORY / "pyproject.toml").is_file() else []
    if not scripts:
        raise FileNotFoundError(f"no benchmark scripts next to this fastdiff ({REPOSITORY}): they are not part of "
                                f"the installed package; run `fastdiff bench` from {BENCHMARKS_HINT}")
    if not args.name:
        print("benchmarks:", ", ".join(scripts))
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
            from .training.config import load_config

            cfg = load_config(None, argv[1:])  # --help and config errors before torch is imported
            from .training.train import run

            run(cfg)
        elif command == "compare":
            return _compare(args)
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
    except KeyboardInterrupt:
        print(f"fastdiff {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fastdiff samplers | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
