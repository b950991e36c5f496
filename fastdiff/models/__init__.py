"""The embedded default model(s): configs, shipped weights and loaders."""

from fastdiff.models.digits import (
    ClassEmbedder,
    DigitsPipeline,
    build_digits_pipeline,
    load_embedded_pipeline,
)

__all__ = ["ClassEmbedder", "DigitsPipeline", "build_digits_pipeline", "load_embedded_pipeline"]
