"""The embedded default model(s): configs, shipped weights and loaders."""

from fastdiff.models.digits import (
    ClassEmbedder,
    DigitsPipeline,
    DigitsUNetPipeline,
    build_digits_pipeline,
    build_digits_unet_pipeline,
    load_embedded_pipeline,
    load_embedded_unet_pipeline,
)

__all__ = ["ClassEmbedder", "DigitsPipeline", "DigitsUNetPipeline", "build_digits_pipeline", "build_digits_unet_pipeline",
           "load_embedded_pipeline", "load_embedded_unet_pipeline"]
