"""fastdiff: faster sampling and training of diffusion models inside Hugging Face diffusers.

The public API is re-exported here and imported lazily, so ``import fastdiff`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "NoiseSchedule": "fastdiff.schedule",
    "load_digits": "fastdiff.data",
    "DigitsPipeline": "fastdiff.models.digits",
    "build_digits_pipeline": "fastdiff.models.digits",
    "load_embedded_pipeline": "fastdiff.models.digits",
    "evaluate_samples": "fastdiff.metrics",
    "frechet_distance": "fastdiff.metrics",
    "class_accuracy": "fastdiff.metrics",
    "available_samplers": "fastdiff.samplers.registry",
    "make_scheduler": "fastdiff.samplers.registry",
    "register_sampler": "fastdiff.samplers.registry",
    "AcceleratedDDIMScheduler": "fastdiff.samplers.accelerated_ddim",
    "parallel_sample": "fastdiff.samplers.pipelines",
    "enable_tgate": "fastdiff.samplers.tgate",
    "disable_tgate": "fastdiff.samplers.tgate",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
