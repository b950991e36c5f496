"""Training accelerators for diffusers models: Min-SNR weighting, REPA, HASTE and an accelerate script.

* :func:`diffusion_loss` / :func:`loss_weight` / :func:`sample_timesteps` (Hang et al. 2023, Min-SNR-gamma)
* :class:`REPA` (Yu et al. 2025) and :class:`TeacherAlignment` / :class:`StageWiseTermination` for HASTE
  (Wang et al. 2025)
* :func:`main` (``python -m fastdiff.training.train --config digits_dit``); the loop itself is
  ``fastdiff.training.train.train(config)`` (the submodule ``train`` shadows a package-level function name)

Names are imported lazily so ``import fastdiff.training`` does not pull in accelerate.
"""

from __future__ import annotations

from fastdiff._package import lazy_exports

_EXPORTS = {
    "diffusion_loss": "fastdiff.training.weighting",
    "loss_weight": "fastdiff.training.weighting",
    "min_snr_weight": "fastdiff.training.weighting",
    "sample_timesteps": "fastdiff.training.weighting",
    "WEIGHTINGS": "fastdiff.training.weighting",
    "TIMESTEP_SAMPLERS": "fastdiff.training.weighting",
    "REPA": "fastdiff.training.repa",
    "Projector": "fastdiff.training.repa",
    "BlockOutputHook": "fastdiff.training.repa",
    "TeacherOutput": "fastdiff.training.repa",
    "run_teacher": "fastdiff.training.repa",
    "negative_cosine": "fastdiff.training.repa",
    "TeacherAlignment": "fastdiff.training.haste",
    "StageWiseTermination": "fastdiff.training.haste",
    "TeacherCache": "fastdiff.training.haste",
    "AttentionCaptureProcessor": "fastdiff.training.haste",
    "capture_attention": "fastdiff.training.haste",
    "attention_cross_entropy": "fastdiff.training.haste",
    "register_attention_backend": "fastdiff.training.haste",
    "load_digits_teacher": "fastdiff.training.teachers",
    "load_dinov2_teacher": "fastdiff.training.teachers",
    "Config": "fastdiff.training.config",
    "load_config": "fastdiff.training.config",
    "shipped_configs": "fastdiff.training.config",
    "main": "fastdiff.training.train",
    "NonFiniteLossError": "fastdiff.training.train",
    "TrainingInterrupted": "fastdiff.training.train",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(globals(), "fastdiff.training", _EXPORTS)
