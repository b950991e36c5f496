"""Moved to :mod:`fastdiff.caching.tgate` (caching is not a sampler); kept as a re-export."""

from fastdiff.caching.tgate import (  # noqa: F401
    SelfAttnSchedule,
    check_cond_weight,
    disable_tgate,
    enable_tgate,
    is_tgate_enabled,
)

__all__ = ["SelfAttnSchedule", "check_cond_weight", "disable_tgate", "enable_tgate", "is_tgate_enabled"]
