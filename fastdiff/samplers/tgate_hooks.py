"""Moved to :mod:`fastdiff.caching.tgate` and :mod:`fastdiff.caching.engine`; kept as a re-export."""

from fastdiff.caching.engine import Action  # noqa: F401
from fastdiff.caching.tgate import AttentionCacheHook, SelfAttnSchedule, tgate_actions  # noqa: F401

__all__ = ["Action", "AttentionCacheHook", "SelfAttnSchedule", "tgate_actions"]
