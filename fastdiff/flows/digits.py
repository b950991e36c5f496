"""The embedded digits TarFlow: loader, its sampling settings, and the export of a training run.

The weights ship in ``fastdiff/models/digits_tarflow`` (``config.json`` + safetensors, a diffusers
``ModelMixin``) next to ``sampling.json``: the default guidance, the GS-Jacobi calibration (CRM and IGM of every
block from 1000 training images) and the automatic strategy derived from it. Rebuild with

    OMP_NUM_THREADS=1 python -m fastdiff.training.train --config configs/digits_tarflow.yaml
    python -m fastdiff.flows.digits export runs/digits_tarflow/model
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .sampling import DEFAULT_TOLERANCE, BlockStrategy, Calibration, auto_strategy, calibrate
from .tarflow import TarFlow

DIGITS_TARFLOW_DIR = Path(__file__).resolve().parent.parent / "models" / "digits_tarflow"
SETTINGS_FILE = "sampling.json"
DEFAULT_GUIDANCE = 0.5  # the shipped sampling.json's (benchmarks/tarflow_sampling.py sweeps it)
CALIBRATION_IMAGES = 1000


@dataclass
class DigitsTarFlowSettings:
    """Default sampling settings of a shipped flow: guidance, stopping rule, and the GS-Jacobi calibration."""

    guidance: float
    annealed: bool
    calibration: Calibration
    strategy_options: dict = field(default_factory=dict)  # auto_strategy keywords of the shipped strategy
    criterion: str = "paper"
    tolerance: float = DEFAULT_TOLERANCE

    def strategy(self) -> list[BlockStrategy]:
        """The automatic GS-Jacobi strategy (:func:`~fastdiff.flows.sampling.auto_strategy`) of this model."""
        return auto_strategy(self.calibration, **self.strategy_options)

    def invert_kwargs(self) -> dict:
        """Keyword arguments of :func:`~fastdiff.flows.sampling.invert` / ``sample`` for the default sampler:
        GS-Jacobi with the automatic strategy, the default guidance and stopping rule."""
        return {"method": "gs_jacobi", "strategy": self.strategy(), "guidance": self.guidance,
                "annealed": self.annealed, "criterion": self.criterion, "tolerance": self.tolerance}

    def as_dict(self) -> dict:
        return {"guidance": self.guidance, "annealed": self.annealed, "criterion": self.criterion,
                "tolerance": self.tolerance, "calibration": asdict(self.calibration),
                "strategy_options": self.strategy_options, "strategy": [asdict(s) for s in self.strategy()]}

    @classmethod
    def from_dict(cls, d: dict) -> DigitsTarFlowSettings:
        return cls(float(d["guidance"]), bool(d["annealed"]), Calibration(**d["calibration"]),
                   dict(d.get("strategy_options", {})), d.get("criterion", "paper"),
                   float(d.get("tolerance", DEFAULT_TOLERANCE)))


def metric_images(images: torch.Tensor) -> torch.Tensor:
    """Flow samples in ``[-1, 1]`` -> ``[N, 1, 16, 16]`` images in ``[0, 1]`` for :func:`fastdiff.metrics.evaluate_samples`:
    clipped, and 8x8 samples upsampled bilinearly as :func:`fastdiff.data.load_digits` upsamples the data."""
    import torch.nn.functional as F

    from fastdiff.data import IMAGE_SIZE

    x = (images.clamp(-1, 1) + 1) / 2
    if x.shape[-1] != IMAGE_SIZE:
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    return x


def load_digits_tarflow(path: str | Path | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> tuple[TarFlow, DigitsTarFlowSettings]:
    """The shipped digits TarFlow (or one exported to ``path``) in eval mode, and its sampling settings."""
    root = Path(path) if path is not None else DIGITS_TARFLOW_DIR
    if not (root / "config.json").is_file() or not (root / SETTINGS_FILE).is_file():
        raise FileNotFoundError(f"no exported TarFlow at {root} (config.json and {SETTINGS_FILE}); build it with "
                                "`python -m fastdiff.flows.digits export RUN/model`")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    model = TarFlow.from_pretrained(root, local_files_only=True, use_safetensors=True)
    settings = DigitsTarFlowSettings.from_dict(json.loads((root / SETTINGS_FILE).read_text()))
    model = model.to(device) if dtype == torch.float32 else model.to(device=device, dtype=dtype)
    return model.eval(), settings


def export(model_dir: str | Path, out: str | Path = DIGITS_TARFLOW_DIR, guidance: float = DEFAULT_GUIDANCE,
           annealed: bool = True, strategy_options: dict | None = None, criterion: str = "paper",
           tolerance: float = DEFAULT_TOLERANCE) -> Path:
    """Copy a trained TarFlow (a ``save_pretrained`` directory) to ``out`` with its GS-Jacobi calibration
    (CRM, IGM and the measured Jacobi sweeps of ``CALIBRATION_IMAGES`` training images)."""
    from fastdiff.data import load_digits

    model = TarFlow.from_pretrained(model_dir, local_files_only=True).eval()
    images, _ = load_digits("train", size=model.config.sample_size)
    gen = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(images), generator=gen)[:CALIBRATION_IMAGES]
    calibration = calibrate(model, images[pick], measure=True, tolerance=tolerance, criterion=criterion)
    settings = DigitsTarFlowSettings(guidance, annealed, calibration, strategy_options or {}, criterion, tolerance)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    (out / SETTINGS_FILE).write_text(json.dumps(settings.as_dict(), indent=2) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastdiff.flows.digits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write a trained TarFlow and its GS-Jacobi calibration")
    ex.add_argument("model_dir", type=Path, help="the training run's model directory (RUN/model)")
    ex.add_argument("--out", type=Path, default=DIGITS_TARFLOW_DIR)
    ex.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    ex.add_argument("--criterion", default="paper", choices=("paper", "rms"))
    ex.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    ex.add_argument("--strategy", type=json.loads, default={},
                    help='auto_strategy keywords as JSON, e.g. \'{"ranking": "measured"}\'')
    args = parser.parse_args(argv)
    out = export(args.model_dir, args.out, args.guidance, strategy_options=args.strategy, criterion=args.criterion,
                 tolerance=args.tolerance)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()


__all__ = ["DIGITS_TARFLOW_DIR", "DigitsTarFlowSettings", "export", "load_digits_tarflow", "metric_images"]
