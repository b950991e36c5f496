"""Quality of an embedded digits model: FD-digits and class accuracy against guidance and steps.

    python benchmarks/embedded_model.py --label v2                    # the shipped model
    python benchmarks/embedded_model.py --pipeline DIR --label v1     # any DigitsPipeline directory
    python benchmarks/embedded_model.py --model digits-unet --label unet --guidance 1   # the shipped UNet

For every guidance scale, DDIM at each step count samples ``--num-images`` images (labels i % 10) from the
same evaluation noise (seed ``--seed``), scored by FD-digits to the train split and the digits classifier's
accuracy. The converged FD (most steps) at each guidance picks the default guidance of ``fastdiff compare``:
the scale at which the converged samples are closest to the data. Results are merged into
``benchmarks/results/embedded_model.json`` under ``--label``, so two models measured with the same seeds sit
side by side. Each record also holds the denoiser's class, parameter count and safetensors size (MB).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fastdiff.compare import environment_info
from fastdiff.metrics import evaluate_samples
from fastdiff.models.digits import (
    EMBEDDED_UNET_WEIGHTS_DIR,
    EMBEDDED_WEIGHTS_DIR,
    DigitsPipeline,
    DigitsUNetPipeline,
    load_embedded_pipeline,
    load_embedded_unet_pipeline,
)
from fastdiff.samplers.registry import make_scheduler

RESULTS = Path(__file__).parent / "results" / "embedded_model.json"
# --model: the shipped pipelines (loader, weights directory)
MODELS = {"digits": (load_embedded_pipeline, EMBEDDED_WEIGHTS_DIR),
          "digits-unet": (load_embedded_unet_pipeline, EMBEDDED_UNET_WEIGHTS_DIR)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="digits",
                   help="the shipped model measured when --pipeline is not given (default: digits, the transformer)")
    p.add_argument("--pipeline", type=Path, default=None,
                   help="a DigitsPipeline / DigitsUNetPipeline directory (default: the shipped --model)")
    p.add_argument("--label", required=True, help="key of this model in the results file, e.g. v1, v2")
    p.add_argument("--guidance", default="1,1.25,1.5,2,3", help="comma-separated guidance scales")
    p.add_argument("--steps", default="20,50", help="comma-separated DDIM step counts")
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    guidances = [float(g) for g in args.guidance.split(",")]
    steps = [int(n) for n in args.steps.split(",")]
    if args.pipeline is None:
        loader, weights_dir = MODELS[args.model]
        pipe = loader()
    else:
        weights_dir = args.pipeline
        index = json.loads((weights_dir / "model_index.json").read_text())
        cls = DigitsUNetPipeline if index["_class_name"] == "DigitsUNetPipeline" else DigitsPipeline
        pipe = cls.from_pretrained(weights_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    cfg = pipe.denoiser.config
    size = {"denoiser": type(pipe.denoiser).__name__, "params": sum(p.numel() for p in pipe.denoiser.parameters()),
            "weights_mb": sum(f.stat().st_size for f in weights_dir.rglob("*.safetensors")) / 2**20}
    labels = torch.arange(args.num_images) % 10
    noise = torch.randn(args.num_images, cfg.in_channels, cfg.sample_size, cfg.sample_size,
                        generator=torch.Generator().manual_seed(args.seed))
    rows = []
    for g in guidances:
        for n in steps:
            start = time.perf_counter()
            images = pipe(labels, num_inference_steps=n, guidance_scale=g, latents=noise.clone(), output_type="pt").images
            m = evaluate_samples(images, labels, value_range=(0, 1), metric="digits")
            rows.append({"guidance": g, "sampler": "ddim", "steps": n, "fd": m.fd, "accuracy": m.accuracy,
                         "seconds": time.perf_counter() - start})
            print(f"guidance {g:<5} ddim x {n:<3} FD-digits {m.fd:7.2f}  accuracy {m.accuracy:.3f}", flush=True)
    converged = max(steps)
    best = min((r for r in rows if r["steps"] == converged), key=lambda r: r["fd"])
    record = {"settings": {"num_images": args.num_images, "seed": args.seed, "labels": "i % 10",
                           "reference": "digits train split", "sampler": "ddim (trailing)",
                           "pipeline": str(args.pipeline or f"shipped {args.model}"),
                           "patch_size": getattr(cfg, "patch_size", None), **size},
              "environment": environment_info("cpu"), "rows": rows,
              "best_guidance_at_converged_steps": {"steps": converged, "guidance": best["guidance"], "fd": best["fd"]}}
    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    data[args.label] = record
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"best guidance at {converged} steps: {best['guidance']} (FD-digits {best['fd']:.2f}); wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
