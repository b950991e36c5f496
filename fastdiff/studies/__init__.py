"""What the notebooks measure and draw, as library code (``notebooks/`` call only public API).

* :mod:`.measure`: wall time (median of repeats, or interleaved rounds of several variants), denoiser MACs, and the denoiser's time against its batch
  size (the spare batch throughput that parallel sampling spends);
* :mod:`.plots`: sample grids and figure saving;
* :mod:`.results`: benchmark JSON read defensively, training curves and their reading;
* :mod:`.caching`: diffusers' own cache hooks (PyramidAttentionBroadcast, FasterCache, FirstBlockCache) on
  any pipeline, fastdiff's digits model included, as one removable context.

Names are imported lazily: ``import fastdiff.studies`` imports no torch.
"""

from __future__ import annotations

from fastdiff._package import lazy_exports

_EXPORTS = {
    "median_seconds": "fastdiff.studies.measure",
    "interleaved_seconds": "fastdiff.studies.measure",
    "count_macs": "fastdiff.studies.measure",
    "denoiser_batch_seconds": "fastdiff.studies.measure",
    "sample_grid": "fastdiff.studies.plots",
    "image_strip": "fastdiff.studies.plots",
    "save_figure": "fastdiff.studies.plots",
    "load_result": "fastdiff.studies.results",
    "training_curves": "fastdiff.studies.results",
    "describe_training": "fastdiff.studies.results",
    "steps_to_reach": "fastdiff.studies.results",
    "training_results": "fastdiff.studies.results",
    "markdown_table": "fastdiff.studies.results",
    "DIFFUSERS_CACHES": "fastdiff.studies.caching",
    "diffusers_cache": "fastdiff.studies.caching",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(globals(), "fastdiff.studies", _EXPORTS)
