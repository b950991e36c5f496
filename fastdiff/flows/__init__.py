"""Autoregressive normalizing flows (TarFlow) and their sequential, Jacobi and GS-Jacobi inversion.

    from fastdiff.flows import load_digits_tarflow, sample
    model, settings = load_digits_tarflow()
    images, stats = sample(model, labels, method="gs_jacobi", strategy=settings.strategy(),
                           guidance=settings.guidance)

``fastdiff compare --model tarflow-digits`` (:mod:`fastdiff.flows.compare`) puts the inversion strategies side by
side; ``benchmarks/tarflow_sampling.py`` measures them at batch 1 and 64.
"""

from __future__ import annotations

from fastdiff._package import lazy_exports

_EXPORTS = {
    "TarFlow": "fastdiff.flows.tarflow",
    "KVCache": "fastdiff.flows.tarflow",
    "DIGITS_TARFLOW_CONFIG": "fastdiff.flows.tarflow",
    "build_tarflow": "fastdiff.flows.tarflow",
    "invert": "fastdiff.flows.sampling",
    "sample": "fastdiff.flows.sampling",
    "calibrate": "fastdiff.flows.sampling",
    "auto_strategy": "fastdiff.flows.sampling",
    "segment_bounds": "fastdiff.flows.sampling",
    "BlockStrategy": "fastdiff.flows.sampling",
    "BlockStats": "fastdiff.flows.sampling",
    "FlowStats": "fastdiff.flows.sampling",
    "Calibration": "fastdiff.flows.sampling",
    "NonFiniteFlowError": "fastdiff.flows.sampling",
    "load_digits_tarflow": "fastdiff.flows.digits",
    "DigitsTarFlowSettings": "fastdiff.flows.digits",
    "metric_images": "fastdiff.flows.digits",
    "run_flow_compare": "fastdiff.flows.compare",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(globals(), "fastdiff.flows", _EXPORTS)
