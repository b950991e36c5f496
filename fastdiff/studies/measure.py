"""Measurements behind the notebooks' cost figures: wall time, denoiser MACs and batch throughput.

Times are wall-clock seconds on the machine that runs them (``time.perf_counter``), after untimed warm-up
calls, as the median of repeats: on a shared CPU a single run swings by tens of percent.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch


def _check_count(value: object, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def median_seconds(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    _check_count(repeats, "repeats", 1)
    _check_count(warmup, "warmup", 0)
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def denoiser_of(pipe: Any) -> torch.nn.Module:
    """The denoising network of a diffusers pipeline (``unet`` or ``transformer``), or a module as given."""
    if isinstance(pipe, torch.nn.Module):
        return pipe
    model = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if model is None:
        raise ValueError(f"pipe: {type(pipe).__name__} has neither a unet nor a transformer")
    return model


def _cpu_attention_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any,
                                  *args: Any, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter(display: bool = False) -> Any:
    """``torch.utils.flop_counter.FlopCounterMode`` that also counts CPU attention: torch's counter knows the CUDA
    fused-attention kernels but not ``aten._scaled_dot_product_flash_attention_for_cpu`` (what
    ``F.scaled_dot_product_attention`` runs on CPU), so without this every CPU attention counted 0 FLOPs. The
    formula is torch's own for the fused kernels (``sdpa_flop_count``: ``Q K^T`` and ``P V``)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    return FlopCounterMode(display=display, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
    })


def count_macs(fn: Callable[[], Any], module: torch.nn.Module | Any) -> float:
    """Multiply-accumulates spent inside ``module`` (a model, or a pipeline's denoiser) while ``fn()`` runs.

    Counted by :func:`flop_counter` (torch's ``FlopCounterMode``: matmuls, convolutions and attention, CPU
    attention included; MACs = FLOPs / 2) around each call of that module object only, so other modules (a VAE,
    a text encoder, another instance of the same class) do not count.
    """
    model = denoiser_of(module)
    flops, active = [0], []

    def enter(mod: torch.nn.Module, args: tuple) -> None:
        active.append(flop_counter())
        active[-1].__enter__()

    def leave(mod: torch.nn.Module, args: tuple, output: Any) -> None:
        counter = active.pop()
        counter.__exit__(None, None, None)
        flops[0] += counter.get_total_flops()

    handles = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave, always_call=True)]
    try:
        fn()
    finally:
        for handle in handles:
            handle.remove()
    return flops[0] / 2


def _tile(value: Any, batch: int, times: int) -> Any:
    """``value`` with every tensor whose leading dimension is ``batch`` repeated ``times`` along it."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value] * times) if value.ndim and value.shape[0] == batch else value
    if isinstance(value, Mapping):
        return {k: _tile(v, batch, times) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_tile(v, batch, times) for v in value)
    return value


def denoiser_batch_seconds(
    pipe: Any, batches: Sequence[int], *, repeats: int = 3, **call_kwargs: Any
) -> dict[int, float]:
    """Seconds of one denoiser call at ``n`` times the pipeline's own model batch, for each ``n`` in ``batches``.

    The pipeline runs once (``pipe(**call_kwargs)``, one inference step unless given) and its first denoiser
    call is recorded; that call is then replayed with every batch-sized input (latents, timesteps,
    conditioning, classifier-free-guidance halves included) tiled ``n`` times. ``n`` is the number of
    trajectory points a parallel-sampling round evaluates at once: if ``seconds[n] < n * seconds[1]`` the
    device has spare batch throughput, which is where parallel sampling's wall-clock gain comes from.
    """
    batches = [_check_count(n, "batches", 1) for n in batches]
    if not batches:
        raise ValueError("batches must hold at least one batch multiple")
    _check_count(repeats, "repeats", 1)
    model = denoiser_of(pipe)
    recorded: list[tuple[tuple, dict]] = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not recorded:
            recorded.append((args, dict(kwargs)))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pipe(**{"num_inference_steps": 1, **call_kwargs})
    finally:
        handle.remove()
    if not recorded:
        raise RuntimeError(f"{type(pipe).__name__} never called its denoiser")
    args, kwargs = recorded[0]
    first = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
    base = first.shape[0]
    seconds = {}
    with torch.no_grad():
        for n in batches:
            tiled_args, tiled_kwargs = _tile(args, base, n), _tile(kwargs, base, n)
            seconds[n] = median_seconds(lambda a=tiled_args, k=tiled_kwargs: model(*a, **k), repeats=repeats)
    return seconds


def interleaved_seconds(fns: Mapping[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1,
                        setup: Callable[[str], Any] | None = None,
                        teardown: Callable[[str], Any] | None = None,
                        rotate: bool = True) -> dict[str, dict[str, float | list[float]]]:
    """Wall and CPU seconds of each ``fns[name]()``, measured A/B-interleaved: every round times every function
    once, so a slow spell of a shared machine hits them alike. With ``rotate`` (default) round ``r`` starts at the
    ``r``-th function (modulo their number) and goes round, so no function always runs first or right after a
    given other one (a positional effect, such as the first call of a round meeting colder caches, then averages
    out instead of favouring one function); ``rotate=False`` keeps the mapping's order in every round.

    ``setup(name)`` / ``teardown(name)`` run untimed around each call (e.g. enabling a cache). ``warmup`` untimed
    rounds come first. Returns, per name, the lists ``wall`` (``time.perf_counter``) and ``cpu`` (this thread's
    CPU time, ``time.thread_time``: not charged for waits while another process has the core) and their
    medians ``wall_median`` / ``cpu_median``. Run torch with one thread for the CPU time to be the whole cost.
    """
    if not isinstance(fns, Mapping) or not fns or not all(callable(f) for f in fns.values()):
        raise TypeError("fns must be a non-empty mapping of names to callables")
    _check_count(repeats, "repeats", 1)
    _check_count(warmup, "warmup", 0)
    if not isinstance(rotate, bool):
        raise TypeError(f"rotate must be True or False, got {rotate!r}")
    out: dict[str, dict[str, Any]] = {name: {"wall": [], "cpu": []} for name in fns}
    names = list(fns)
    for round_ in range(warmup + repeats):
        shift = round_ % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            if setup is not None:
                setup(name)
            try:
                wall, cpu = time.perf_counter(), time.thread_time()
                fn()
                wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            finally:
                if teardown is not None:
                    teardown(name)
            if round_ >= warmup:
                out[name]["wall"].append(wall)
                out[name]["cpu"].append(cpu)
    for times in out.values():
        times["wall_median"] = statistics.median(times["wall"])
        times["cpu_median"] = statistics.median(times["cpu"])
    return out
