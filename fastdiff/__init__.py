"""fastdiff: faster sampling and training of diffusion models inside Hugging Face diffusers.

The public API is re-exported here and imported lazily, so ``import fastdiff`` stays cheap; the
subpackages (``fastdiff.training``, ``fastdiff.samplers``, ...) are attributes without an import of their own.
"""

from __future__ import annotations

from fastdiff._package import lazy_exports, subpackages

__version__ = "0.1.0"

_EXPORTS = {
    "NoiseSchedule": "fastdiff.schedule",
    "load_digits": "fastdiff.data",
    "DigitsPipeline": "fastdiff.models.digits",
    "build_digits_pipeline": "fastdiff.models.digits",
    "load_embedded_pipeline": "fastdiff.models.digits",
    "DigitsUNetPipeline": "fastdiff.models.digits",
    "build_digits_unet_pipeline": "fastdiff.models.digits",
    "load_embedded_unet_pipeline": "fastdiff.models.digits",
    "evaluate_samples": "fastdiff.metrics",
    "frechet_distance": "fastdiff.metrics",
    "class_accuracy": "fastdiff.metrics",
    "available_samplers": "fastdiff.samplers.registry",
    "make_scheduler": "fastdiff.samplers.registry",
    "register_sampler": "fastdiff.samplers.registry",
    "AcceleratedDDIMScheduler": "fastdiff.samplers.accelerated_ddim",
    "parallel_sample": "fastdiff.samplers.pipelines",
    "enable_tgate": "fastdiff.caching",
    "disable_tgate": "fastdiff.caching",
    "is_tgate_enabled": "fastdiff.caching",
    "enable_cache": "fastdiff.caching",
    "disable_cache": "fastdiff.caching",
    "is_cache_enabled": "fastdiff.caching",
    "calibrate_cache": "fastdiff.caching",
    "DDIMDualFastScheduler": "fastdiff.samplers.dualfast",
    "DPMSolverMultistepDualFastScheduler": "fastdiff.samplers.dualfast",
    "AcceleratedDDIMDualFastScheduler": "fastdiff.samplers.dualfast",
    "sample_parallel": "fastdiff.samplers.parallel",
    "ParallelStats": "fastdiff.samplers.parallel",
    "PicardConsistencyModel": "fastdiff.samplers.pcm",
    "ModelSwitch": "fastdiff.samplers.pcm",
    "load_embedded_pcm": "fastdiff.samplers.pcm",
    "ResidualPCM": "fastdiff.samplers.pcm.residual",
    "step_map_for": "fastdiff.samplers.steps",
    "diffusion_loss": "fastdiff.training.weighting",
    "set_attention_backend": "fastdiff.kernels.dispatch",
    "remove_attention_backend": "fastdiff.kernels.dispatch",
    "attention_backend_report": "fastdiff.kernels.dispatch",
}

# subpackages resolve as attributes too (``fastdiff.training.diffusion_loss`` after a bare ``import fastdiff``)
_SUBPACKAGES = subpackages(__path__)

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__, __dir__ = lazy_exports(globals(), "fastdiff", _EXPORTS, _SUBPACKAGES)
