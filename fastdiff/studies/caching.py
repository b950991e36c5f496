"""diffusers' own cache hooks on any pipeline's denoiser, as one removable context, to compare with TGATE.

diffusers ships PyramidAttentionBroadcast (Zhao et al. 2024), FasterCache (Lv et al. 2024) and FirstBlockCache
(ParaAttention) as hooks (``diffusers.hooks.apply_*``), enabled by ``model.enable_cache(config)`` on models
that subclass ``CacheMixin``. Two things a pipeline that diffusers did not write lacks: the current timestep
(PAB and FasterCache ask a callback for it) and a cache context around the denoiser calls. This module
supplies both: a forward pre-hook reads the timestep of each denoiser call (and resets the hooks' state when a
new trajectory starts, i.e. the timestep rises), and every call runs in the cache context ``"cfg"`` (the
classifier-free-guidance halves are one batch, as in the embedded digits pipeline and SD).
The settings are those of diffusers' documentation examples, on a 0..1000 timestep range.
"""

from __future__ import annotations

import ast
import io
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from typing import Any

import torch

from ..caching.engine import invalidate_registry_caches
from .measure import denoiser_of

DIFFUSERS_CACHES = ("pab", "fastercache", "firstblockcache")


class _CurrentTimestep:
    """Reads the timestep of each denoiser call and runs the call in the cache context ``"cfg"``; resets the
    cache hooks' state first when a new trajectory starts (the timestep rises)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.value, self._context = model, float("inf"), None
        self.handles = [model.register_forward_pre_hook(self._enter, with_kwargs=True),
                        model.register_forward_hook(self._exit, always_call=True)]

    def _enter(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        from diffusers.hooks import HookRegistry
        from diffusers.models.cache_utils import CacheMixin

        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        value = float(torch.as_tensor(t).reshape(-1)[0]) if t is not None else self.value
        if value > self.value:  # a new trajectory: drop what the previous one cached
            HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks(recurse=True)
        self.value = value
        self._context = CacheMixin.cache_context(module, "cfg")  # resetting clears the context: set it per call
        self._context.__enter__()

    def _exit(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None

    def __call__(self) -> float:
        return self.value if math.isfinite(self.value) else 1000.0

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def diffusers_cache_config(name: str, timestep: Any) -> Any:
    """The diffusers cache config called ``name`` (one of :data:`DIFFUSERS_CACHES`), its documentation's settings,
    with ``timestep`` as the current-timestep callback."""
    from diffusers import FasterCacheConfig, FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

    if name == "pab":
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, cross_attention_block_skip_range=4,
            spatial_attention_timestep_skip_range=(100, 800), cross_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=timestep)
    if name == "fastercache":
        return FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
            current_timestep_callback=timestep, attention_weight_callback=lambda _: 0.3,
            unconditional_batch_skip_range=5, unconditional_batch_timestep_skip_range=(-1, 781), tensor_format="BCHW")
    if name == "firstblockcache":
        return FirstBlockCacheConfig(threshold=0.05)
    raise ValueError(f"name must be one of {DIFFUSERS_CACHES}, got {name!r}")


_CACHE_HOOKS = (("PyramidAttentionBroadcastConfig", "apply_pyramid_attention_broadcast"),
                ("FasterCacheConfig", "apply_faster_cache"), ("FirstBlockCacheConfig", "apply_first_block_cache"),
                ("TaylorSeerCacheConfig", "apply_taylorseer_cache"), ("MagCacheConfig", "apply_mag_cache"))


def _enable(model: torch.nn.Module, config: Any) -> None:
    """``CacheMixin.enable_cache``, also for a model that does not subclass ``CacheMixin`` (PixArt in 0.42)."""
    import diffusers
    from diffusers import hooks
    from diffusers.models.cache_utils import CacheMixin

    if isinstance(model, CacheMixin):
        model.enable_cache(config)
        return
    # each config with its hook, where the installed diffusers has it (TaylorSeer from 0.36, MagCache from 0.37)
    hook_of = {getattr(diffusers, c): getattr(hooks, f) for c, f in _CACHE_HOOKS if hasattr(diffusers, c)}
    if type(config) not in hook_of:
        raise TypeError(f"config must be one of this diffusers' cache configs {[c.__name__ for c in hook_of]}, "
                        f"got {type(config).__name__}")
    apply = hook_of[type(config)]
    model._cache_config = config  # what CacheMixin.disable_cache reads; set first: a failing apply is undone too
    apply(model, config)
    invalidate_registry_caches(model)


@contextmanager
def diffusers_cache(pipe: Any, name: str | Callable[[Callable[[], float]], Any]) -> Iterator[Any]:
    """Inside the block, ``pipe``'s denoiser runs with diffusers' cache hook ``name``; afterwards it is as before.

    ``name``: ``"pab"`` (PyramidAttentionBroadcast), ``"fastercache"`` or ``"firstblockcache"`` (the
    documentation's settings), or a callable that takes the current-timestep callback and returns any diffusers
    cache config (these three, ``TaylorSeerCacheConfig`` or ``MagCacheConfig``), for other settings. Yields the diffusers config.
    FasterCache skips the unconditional half of a CFG batch, so use it with guidance on.
    """
    from diffusers.hooks import HookRegistry
    from diffusers.models.cache_utils import CacheMixin

    if not callable(name) and name not in DIFFUSERS_CACHES:
        raise ValueError(f"name must be one of {DIFFUSERS_CACHES} or a callable returning a diffusers cache config, "
                         f"got {name!r}")
    model = denoiser_of(pipe)
    if getattr(model, "_cache_config", None) is not None:
        raise ValueError(f"{type(model).__name__} already has a diffusers cache enabled; disable it first")
    timestep = _CurrentTimestep(model)
    try:
        config = name(timestep) if callable(name) else diffusers_cache_config(name, timestep)
    except BaseException:
        timestep.remove()
        raise
    try:
        _enable(model, config)
        HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)
        yield config
    finally:
        if getattr(model, "_cache_config", None) is not None:
            CacheMixin.disable_cache(model)
        timestep.remove()


def magcache_ratios(pipe: Any, call: Callable[[], Any], num_inference_steps: int) -> list[float]:
    """diffusers MagCache's own calibration (``MagCacheConfig(calibrate=True)``, which skips nothing and prints the
    per-step residual magnitude ratios at the end of the run): runs ``call()`` once on ``pipe`` and returns those
    ratios, for ``MagCacheConfig(mag_ratios=...)``. Raises a ``ValueError`` where MagCache hooks nothing (it hooks
    top-level transformer-block lists only: not UNets)."""
    from diffusers import MagCacheConfig

    printed = io.StringIO()
    with redirect_stdout(printed):
        with diffusers_cache(pipe, lambda _: MagCacheConfig(calibrate=True, num_inference_steps=num_inference_steps)):
            call()
    found = re.search(r"mag_ratios=\.\.\.\):\s*(\[[^\]]*\])", printed.getvalue())
    if found is None:
        raise ValueError(f"MagCache calibrated nothing on {type(denoiser_of(pipe)).__name__}: diffusers' apply_mag_cache "
                         "hooks top-level transformer_blocks lists only")
    return [float(x) for x in ast.literal_eval(found.group(1))]
