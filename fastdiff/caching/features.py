"""Feature reuse across sampling steps: deep UNet features (DeepCache) and transformer block residuals.

**Deep features** (DeepCache, Ma, Fang & Wang 2024, "DeepCache: Accelerating Diffusion Models for Free",
arXiv:2312.00858, Sec. 3.2-3.3). A UNet's up-sampling block ``U_m`` reads ``Concat(D_m(.), U_{m+1}(.))``
(Eq. 2): the skip branch from the down block ``D_m`` and the main branch from the deeper blocks. High-level
features of the main branch change slowly between adjacent steps, so at a full step ``t`` DeepCache keeps
``F_cache^t <- U_{m+1}^t(.)`` (Eq. 3) and at the following steps ``t-1 ..`` computes only the shallow path:
``Concat(D_m^{t-1}(.), F_cache^t)`` into ``U_m`` (Eq. 4). Uniform 1:N caching (Sec. 3.3) computes every
N-th step in full. The branch ``m`` is DeepCache's ``cache_branch_id``: ``(block, layer) = divmod(branch,
layers per down block)`` and, as in the official ``DeepCacheSDHelper`` (horseee/DeepCache), the modules
deeper than that point are served from the cache: down blocks (and the layers of the branch's block) past
it, the mid block, and the matching up-block layers; at ``branch=0`` only ``conv_in``, the last layer of the
last up block (which reads the fresh ``conv_in`` skip) and ``conv_out`` run.

**Block residuals** (transformers; after FirstBlockCache's / DBCache's residual reuse and FasterCache's
observation that block outputs change slowly between steps, Lv et al. 2024, arXiv:2410.19355): for a span of
blocks ``[start, end)`` a full step keeps ``R = h_end - h_start``; a reuse step computes the blocks before
``start`` (and from ``end`` on) and replaces the span by ``h_start + R``.

**Forecasts** (``order``, ``forecast``): at a reuse step ``t`` the kept value is not served as it is
(``order=0``) but forecast from the last ``order + 1`` full steps ``t_a, t_b, t_c`` (newest first), as
TaylorSeer does (Liu et al. 2025, "From Reusing to Forecasting: Accelerating Diffusion Models with
TaylorSeers", arXiv:2503.06923). Its Eq. 7-8 expand the feature in a Taylor series around the last full step,
``F(t) ~ sum_i F^(i)(t_a) (t - t_a)^i / i!``, with the derivatives approximated by finite differences over the
last full steps, ``F^(i)(t_a) ~ Delta^i F(t_a) / N^i``; the official code (Shenyi-Z/TaylorSeer,
``taylor_utils.derivative_approximation``) builds them recursively at each full step,
``d_{i+1}(t_a) = (d_i(t_a) - d_i(t_b)) / (t_a - t_b)`` with ``d_0 = F``, for any spacing of the full steps.

- ``forecast="taylor"`` is that formula (TaylorSeer's, here over timesteps instead of step counts);
- ``forecast="newton"`` (fastdiff's option) is the polynomial through the kept points,
  ``F(t) ~ F_a + (t - t_a) [a, b] + (t - t_a)(t - t_b) [a, b, c]`` with divided differences
  ``[a, b] = (F_a - F_b) / (t_a - t_b)``, ``[a, b, c] = ([a, b] - [b, c]) / (t_a - t_c)``. It is exact for a
  feature that is a polynomial of degree ``order`` in ``t`` whatever the spacing of the full steps; TaylorSeer's
  form treats the backward differences as derivatives at ``t_a``.

Both are the same at ``order=1``: ``F(t) ~ F_a + (t - t_a) (F_a - F_b) / (t_a - t_b)``. Either is a fixed
linear combination ``sum_j w_j F_j`` of the kept values (:func:`forecast_weights`); with fewer kept values than
``order + 1`` (the first reuse steps) the order drops to what is kept. On UNets only ``F_cache`` (the output of
the last served module, the one a computed module reads) is forecast; the other served modules feed served
modules only and return their kept outputs as they are, so a reuse step spends no arithmetic on discarded
values. Values that hold both CFG halves are forecast as one batch.

**Shallow blocks** (``shallow``, fastdiff's option, on by default when features are forecast): DeepCache's reuse
step still runs the shallow path, and there the full-resolution transformer blocks (self-attention over every
pixel, cross-attention, GEGLU feed-forward) cost far more time than their MACs suggest (on the embedded digits
UNet about 5 % of a full step's MACs but ~65 % of a reuse step's CPU time: memory-bound norms, softmax, GELU and
layout copies). With ``shallow`` each transformer block of the computed path keeps its residual
``R = h_out - h_in`` at full steps and at reuse steps returns ``h_in + R``, ``R`` forecast like the deep features
(TaylorSeer forecasts every attention and feed-forward output in this way, Liu et al. 2025); its input ``h_in``
is fresh, computed from the step's own ``conv_in`` skip, so only the block's correction is forecast.
Serving the whole attention module instead (its GroupNorm, ``proj_in`` and ``proj_out`` too, ``R`` taken around
the module) was measured and not adopted: on the digits UNet (32 images, the sweep of
``benchmarks/attention_caching.py``, 2026-12-01) it saved 0.1 point more MACs and, A/B-interleaved over 7 rounds,
1.4 points more CPU time at N=2 cooldown 2, but FD to uncached rose from 0.026 to 0.050 there and from 3.44 to
4.53 at N=2 + guidance residual k=3 (rms 0.0020 -> 0.0022, 0.026 -> 0.028).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.hooks import ModelHook

from .engine import Action, Layout, Run, map_tensors, split_layout, tensors_of, zip_tensors

FEATURE_HOOK = "fastdiff_cache_features"
FEATURE_KINDS = ("deep", "blocks")
FORECASTS = ("taylor", "newton")
MAX_ORDER = 2
_HISTORY = 2 * (MAX_ORDER + 1)  # kept entries per module: enough for order + 1 of each CFG half


def feature_kind(denoiser: torch.nn.Module) -> str | None:
    """``"deep"`` for UNets (down / mid / up blocks), ``"blocks"`` for transformers with ``transformer_blocks``."""
    if all(hasattr(denoiser, a) for a in ("down_blocks", "mid_block", "up_blocks")):
        return "deep"
    if isinstance(getattr(denoiser, "transformer_blocks", None), torch.nn.ModuleList):
        return "blocks"
    return None


def layers_per_branch_block(unet: torch.nn.Module) -> int:
    """Skip outputs per down block (resnets + downsampler): DeepCache's 3 for SD."""
    block = unet.down_blocks[0]
    return len(block.resnets) + (1 if getattr(block, "downsamplers", None) else 0)


def num_branches(unet: torch.nn.Module) -> int:
    return len(unet.down_blocks) * layers_per_branch_block(unet)


def deep_modules(unet: torch.nn.Module, branch: int) -> list[torch.nn.Module]:
    """The outermost modules DeepCache serves from the cache at reuse steps for skip branch ``branch``, in the
    order they run; the last one's output is DeepCache's ``F_cache``, the only one a computed module reads."""
    block_id, layer_id = divmod(branch, layers_per_branch_block(unet))
    skipped: list[torch.nn.Module] = []
    for i, block in enumerate(unet.down_blocks):
        if i > block_id or (i == block_id and layer_id == 0):
            skipped.append(block)
        elif i == block_id:
            for j, resnet in enumerate(block.resnets):
                if j >= layer_id:
                    skipped.append(resnet)
                    attentions = getattr(block, "attentions", None)
                    if attentions is not None and j < len(attentions):
                        skipped.append(attentions[j])
            skipped += list(getattr(block, "downsamplers", None) or [])
    skipped.append(unet.mid_block)
    n = len(unet.up_blocks)
    for i, block in enumerate(unet.up_blocks):
        rev = n - 1 - i
        if rev > block_id:
            skipped.append(block)
        elif rev == block_id:
            layers = len(block.resnets)
            for j, resnet in enumerate(block.resnets):
                if layers - 1 - j > layer_id:
                    skipped.append(resnet)
                    attentions = getattr(block, "attentions", None)
                    if attentions is not None and j < len(attentions):
                        skipped.append(attentions[j])
    return skipped


def shallow_blocks(unet: torch.nn.Module, branch: int) -> list[torch.nn.Module]:
    """The transformer blocks (``transformer_blocks`` of the down / up blocks' attention modules) that still run at
    reuse steps for skip branch ``branch``: those of the shallow path, outside every module DeepCache serves."""
    served = {id(m) for top in deep_modules(unet, branch) for m in top.modules()}
    found: list[torch.nn.Module] = []
    for block in [*unet.down_blocks, *unet.up_blocks]:
        for attention in getattr(block, "attentions", None) or []:
            if id(attention) not in served:
                found += list(getattr(attention, "transformer_blocks", None) or [])
    return found


def check_branch(unet: torch.nn.Module, branch: Any) -> int:
    from .engine import check_integral

    n = num_branches(unet)
    branch = check_integral(branch, "branch", 0, f"an int in [0, {n - 1}] (DeepCache's cache_branch_id)")
    if branch >= n:
        raise ValueError(f"branch must be an int in [0, {n - 1}] (DeepCache's cache_branch_id), got {branch}")
    return branch


def check_blocks(transformer: torch.nn.Module, blocks: Any) -> tuple[int, int]:
    n = len(transformer.transformer_blocks)
    if blocks is None:  # every block: measured closest to uncached per MAC saved (benchmarks/attention_caching.py)
        return (0, n)
    if (not isinstance(blocks, (tuple, list)) or len(blocks) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in blocks)):
        raise TypeError(f"blocks must be a (start, end) pair of ints with 0 <= start < end <= {n}, got {blocks!r}")
    start, end = blocks
    if not 0 <= start < end <= n:
        raise ValueError(f"blocks must satisfy 0 <= start < end <= {n} (the transformer's blocks), got {blocks!r}")
    return start, end


# ----------------------------------------------------------------------------------------------------
# what is kept


def forecast_weights(t: float, times: list[float], order: int, forecast: str = "taylor") -> list[float]:
    """Weights ``w_j`` of the forecast ``F(t) ~ sum_j w_j F(times[j])`` from kept values at ``times`` (newest
    first) at the given ``order`` (see the module docstring); the order drops to ``len(times) - 1`` if fewer
    are kept. Computed by running the forecast on unit vectors, so each weight is the formula's, exactly."""
    k = min(order, len(times) - 1)
    units = [[1.0 if i == j else 0.0 for i in range(k + 1)] for j in range(k + 1)]
    lin = lambda a, x, b, y: [a * u + b * v for u, v in zip(x, y)]  # noqa: E731 - a x + b y
    if forecast == "newton":
        table, out, basis = [units[j] for j in range(k + 1)], list(units[0]), 1.0
        for level in range(1, k + 1):  # divided differences [j, ..., j + level]
            table = [lin(1 / (times[j] - times[j + level]), table[j], -1 / (times[j] - times[j + level]), table[j + 1])
                     for j in range(k + 1 - level)]
            basis *= t - times[level - 1]
            out = lin(1.0, out, basis, table[0])
        return out
    # TaylorSeer: d_{i+1}(t_a) = (d_i(t_a) - d_i(t_b)) / (t_a - t_b), each d_i(t_b) as built at that full step
    derivs = [[units[j]] for j in range(k + 1)]  # derivs[j][i]: the i-th derivative estimate at full step j
    for j in range(k - 1, -1, -1):
        for i in range(k - j):
            prev = derivs[j + 1][i]
            step = times[j] - times[j + 1]
            derivs[j].append(lin(1 / step, derivs[j][i], -1 / step, prev))
    out = [0.0] * (k + 1)
    for i, d in enumerate(derivs[0]):
        out = lin(1.0, out, (t - times[0]) ** i / math.factorial(i), d)
    return out


# which rows a kept value holds, for pruning: PENDING (step 0) becomes BOTH or SINGLE, so it counts for all
_HOLDS = {Layout.BOTH: ("uncond", "cond"), Layout.COND: ("cond",), Layout.UNCOND: ("uncond",),
          Layout.SINGLE: ("single",), Layout.PENDING: ("uncond", "cond", "single")}


class History:
    """The last few values one module produced at full steps, each with its timestep and rows.

    Only what a forecast of ``order`` can read is kept: the newest values until each CFG half (or the batch
    without CFG) is held by ``order + 1`` of them, ``_HISTORY`` at most; older ones are dropped, so their memory is
    freed (an order-0 module keeps one value, not six)."""

    def __init__(self, order: int = MAX_ORDER) -> None:
        self.entries: list[tuple[float | None, Layout, Any]] = []
        self.order = order

    def push(self, t: float | None, layout: Layout, value: Any) -> None:
        self.entries.insert(0, (t, layout, value))
        held = {"uncond": 0, "cond": 0, "single": 0}
        for i, (_, kept, _) in enumerate(self.entries[:_HISTORY]):
            for rows in _HOLDS[kept]:
                held[rows] += 1
            if min(held["uncond"], held["cond"]) > self.order or held["single"] > self.order:
                del self.entries[i + 1:]
                return
        del self.entries[_HISTORY:]

    def load(self, run: Run, want: Layout, order: int, forecast: str = "taylor") -> Any | None:
        if want is Layout.BOTH:
            newest = self.entries[: order + 1]
            if newest and all(run.resolve(layout) is Layout.BOTH for _, layout, _ in newest):
                # every value the forecast reads holds both CFG halves at the same timesteps: forecasting the
                # whole batch at once is, element for element, forecasting each half and concatenating them
                return self._extrapolate(run, [(t, v) for t, _, v in newest], order, forecast)
            uncond, cond = self.load(run, Layout.UNCOND, order, forecast), self.load(run, Layout.COND, order, forecast)
            if uncond is None or cond is None:
                found = self._values(run, want, order)
                return None if not found else self._extrapolate(run, found, order, forecast)
            return zip_tensors(uncond, cond, lambda u, c: torch.cat([u, c]))
        found = self._values(run, want, order)
        return None if not found else self._extrapolate(run, found, order, forecast)

    def _values(self, run: Run, want: Layout, order: int) -> list[tuple[float | None, Any]]:
        out = []
        for t, layout, value in self.entries:
            v = split_layout(value, run.resolve(layout), want)
            if v is not None:
                out.append((t, v))
        return out[: order + 1]

    @staticmethod
    def _extrapolate(run: Run, found: list[tuple[float | None, Any]], order: int, forecast: str) -> Any:
        times = []
        for t, _ in found:  # distinct known timesteps only: a forecast divides by their differences
            if t is None or t in times:
                break
            times.append(t)
        if order == 0 or len(times) < 2 or run.timestep is None:
            return found[0][1]
        weights = forecast_weights(run.timestep, times, order, forecast)
        values = [v for _, v in found[: len(weights)]]
        flat = [tensors_of(v) for v in values]
        combined = iter([combine(weights, [f[i] for f in flat]) for i in range(len(flat[0]))])
        return map_tensors(values[0], lambda _: next(combined))


def combine(weights: list[float], values: list[torch.Tensor]) -> torch.Tensor:
    """``sum_j w_j F_j`` (newest ``F_a = values[0]`` first, ``sum_j w_j = 1``) as ``F_a + w (F_a - F_b)`` at first
    order and ``F_a + sum_{j >= 1} w_j (F_j - F_a)`` above, with one new tensor per term (the others in place:
    the same roundings as the out-of-place expressions); the kept values are never written."""
    a = values[0]
    if len(values) == 2:
        return torch.sub(a, values[1]).mul_(-weights[1]).add_(a)
    out = None
    for w, v in zip(weights[1:], values[1:]):
        term = torch.sub(v, a).mul_(w)
        out = term.add_(a) if out is None else out.add_(term)
    return out


class FeatureHook(ModelHook):
    """On one UNet module deeper than the cached branch: compute and keep, or serve the kept output (forecast at
    ``order > 0``; :func:`feature_hooks` gives the modules whose outputs only feed other served modules order 0)."""

    def __init__(self, run: Run, key: Any, order: int, forecast: str = "taylor") -> None:
        super().__init__()
        self.run, self.key, self.order, self.forecast = run, key, order, forecast

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        run = self.run
        history = run.store.get(self.key)
        if run.plan.features is Action.REUSE and history is not None:
            value = history.load(run, run.layout or Layout.SINGLE, self.order, self.forecast)
            if value is not None:
                run.counts["reused"] += 1
                return value
        out = self.fn_ref.original_forward(*args, **kwargs)
        if run.layout is not None:  # inside a denoiser call of a run
            run.counts["computed"] += 1
            run.store.setdefault(self.key, History(self.order)).push(run.timestep, run.layout, out)
        return out


class SpanHook(ModelHook):
    """On a transformer block of the cached span ``[start, end)`` (or one shallow UNet block, a span of one): the
    first block keeps its input and, at reuse steps, returns ``input + R``; inner blocks then pass their input
    through; the last block keeps ``R = output - input of the first`` (forecasting ``R`` and adding the fresh
    input measured closer to the uncached samples than forecasting the span's output, as TaylorSeer does per
    module: FD 0.0048 vs 0.0062, rms 0.0012 vs 0.0014, order-2 Newton, 9 of 20 steps, embedded digits
    transformer, 64 images)."""

    def __init__(self, run: Run, key: Any, first: bool, last: bool, order: int, forecast: str = "taylor") -> None:
        super().__init__()
        self.run, self.key, self.first, self.last, self.order, self.forecast = run, key, first, last, order, forecast

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        run = self.run
        hidden = args[0] if args else kwargs["hidden_states"]
        if run.layout is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        span_in = (self.key, "in")
        if self.first:
            run.store[span_in] = hidden
            history = run.store.get(self.key)
            residual = None
            if run.plan.features is Action.REUSE and history is not None:
                residual = history.load(run, run.layout, self.order, self.forecast)
            run.store[(self.key, "serving")] = residual is not None
            if residual is not None:
                run.counts["reused"] += 1
                return hidden + residual
        if run.store.get((self.key, "serving")):
            return hidden
        out = self.fn_ref.original_forward(*args, **kwargs)
        run.counts["computed"] += 1
        if self.last:
            run.store.setdefault(self.key, History(self.order)).push(run.timestep, run.layout, out - run.store[span_in])
        return out


def feature_hooks(denoiser: torch.nn.Module, run: Run, kind: str, branch: int, blocks: tuple[int, int],
                  order: int, forecast: str = "taylor", shallow: bool = False) -> list[tuple[Any, ModelHook, str]]:
    if kind == "deep":
        # Only the last served module's output (DeepCache's F_cache = U_{m+1}(.), Eq. 3-4) reaches a module that
        # runs at reuse steps; the others feed served modules only and are served as kept, without a forecast.
        modules = deep_modules(denoiser, branch)
        hooks: list[tuple[Any, ModelHook, str]] = [
            (m, FeatureHook(run, ("deep", i), order if i == len(modules) - 1 else 0, forecast), FEATURE_HOOK)
            for i, m in enumerate(modules)]
        if shallow:
            hooks += [(b, SpanHook(run, ("shallow", i), True, True, order, forecast), FEATURE_HOOK)
                      for i, b in enumerate(shallow_blocks(denoiser, branch))]
        return hooks
    start, end = blocks
    return [(denoiser.transformer_blocks[i],
             SpanHook(run, ("span", start, end), i == start, i == end - 1, order, forecast), FEATURE_HOOK)
            for i in range(start, end)]


def feature_snapshot(run: Run) -> torch.Tensor | None:
    """The newest kept features of every module, flattened into one vector (for calibration)."""
    parts = []
    for history in run.store.values():
        if isinstance(history, History) and history.entries:
            parts += [x.reshape(-1).float() for x in tensors_of(history.entries[0][2])]
    return torch.cat(parts) if parts else None
