"""Caching across sampling steps, as removable hooks over diffusers' hook registry.

- :mod:`fastdiff.caching.cache`: fastdiff's cache (:func:`enable_cache`, :func:`calibrate_cache`), composed of
  deep-feature / block-residual reuse, CFG-residual reuse, TGATE and a calibrated schedule;
- :mod:`fastdiff.caching.tgate`: TGATE / TGATE-V2 (:func:`enable_tgate`), one part of that cache;
- :mod:`fastdiff.caching.engine`: the run state, step plans, denoiser hook and scheduler taps they share.
"""

from .cache import CacheSettings, calibrate_cache, disable_cache, enable_cache, is_cache_enabled
from .schedule import Calibration
from .tgate import SelfAttnSchedule, disable_tgate, enable_tgate, is_tgate_enabled, tgate_actions

__all__ = ["CacheSettings", "Calibration", "SelfAttnSchedule", "calibrate_cache", "disable_cache", "disable_tgate",
           "enable_cache", "enable_tgate", "is_cache_enabled", "is_tgate_enabled", "tgate_actions"]
