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

``order=1`` extrapolates a kept value linearly in the timestep from the last two full steps,
``F(t) ~ F(t_a) + (t - t_a) (F(t_a) - F(t_b)) / (t_a - t_b)`` (the first-order term of TaylorSeer's
forecast, Liu et al. 2025, arXiv:2503.06923, Eq. 8, written over timesteps instead of step counts).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import ModelHook

from .engine import Action, Layout, Run, split_layout, tensors_of, zip_tensors

FEATURE_HOOK = "fastdiff_cache_features"
FEATURE_KINDS = ("deep", "blocks")
_HISTORY = 4  # kept entries per module: enough for two of each CFG half


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
    """The outermost modules DeepCache serves from the cache at reuse steps for skip branch ``branch``."""
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


class History:
    """The last few values one module produced at full steps, each with its timestep and rows."""

    def __init__(self) -> None:
        self.entries: list[tuple[float | None, Layout, Any]] = []

    def push(self, t: float | None, layout: Layout, value: Any) -> None:
        self.entries.insert(0, (t, layout, value))
        del self.entries[_HISTORY:]

    def load(self, run: Run, want: Layout, order: int) -> Any | None:
        if want is Layout.BOTH:
            uncond, cond = self.load(run, Layout.UNCOND, order), self.load(run, Layout.COND, order)
            if uncond is None or cond is None:
                found = self._values(run, want)
                return None if not found else self._extrapolate(run, found, order)
            return zip_tensors(uncond, cond, lambda u, c: torch.cat([u, c]))
        found = self._values(run, want)
        return None if not found else self._extrapolate(run, found, order)

    def _values(self, run: Run, want: Layout) -> list[tuple[float | None, Any]]:
        out = []
        for t, layout, value in self.entries:
            v = split_layout(value, run.resolve(layout), want)
            if v is not None:
                out.append((t, v))
        return out[:2]

    @staticmethod
    def _extrapolate(run: Run, found: list[tuple[float | None, Any]], order: int) -> Any:
        (ta, va) = found[0]
        if order == 0 or len(found) < 2 or run.timestep is None or ta is None or found[1][0] in (None, ta):
            return va
        tb, vb = found[1]
        w = (run.timestep - ta) / (ta - tb)
        return zip_tensors(va, vb, lambda a, b: a + w * (a - b))


class FeatureHook(ModelHook):
    """On one UNet module deeper than the cached branch: compute and keep, or serve the kept output."""

    def __init__(self, run: Run, key: Any, order: int) -> None:
        super().__init__()
        self.run, self.key, self.order = run, key, order

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        run = self.run
        history = run.store.get(self.key)
        if run.plan.features is Action.REUSE and history is not None:
            value = history.load(run, run.layout or Layout.SINGLE, self.order)
            if value is not None:
                run.counts["reused"] += 1
                return value
        out = self.fn_ref.original_forward(*args, **kwargs)
        if run.layout is not None:  # inside a denoiser call of a run
            run.counts["computed"] += 1
            run.store.setdefault(self.key, History()).push(run.timestep, run.layout, out)
        return out


class SpanHook(ModelHook):
    """On a transformer block of the cached span ``[start, end)``: the first block keeps its input and, at
    reuse steps, returns ``input + R``; inner blocks then pass their input through; the last block keeps
    ``R = output - input of the first``."""

    def __init__(self, run: Run, key: Any, first: bool, last: bool, order: int) -> None:
        super().__init__()
        self.run, self.key, self.first, self.last, self.order = run, key, first, last, order

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
                residual = history.load(run, run.layout, self.order)
            run.store[(self.key, "serving")] = residual is not None
            if residual is not None:
                run.counts["reused"] += 1
                out = hidden + residual
                return out
        if run.store.get((self.key, "serving")):
            return hidden
        out = self.fn_ref.original_forward(*args, **kwargs)
        run.counts["computed"] += 1
        if self.last:
            run.store.setdefault(self.key, History()).push(run.timestep, run.layout, out - run.store[span_in])
        return out


def feature_hooks(denoiser: torch.nn.Module, run: Run, kind: str, branch: int, blocks: tuple[int, int],
                  order: int) -> list[tuple[Any, ModelHook, str]]:
    if kind == "deep":
        return [(m, FeatureHook(run, ("deep", i), order), FEATURE_HOOK)
                for i, m in enumerate(deep_modules(denoiser, branch))]
    start, end = blocks
    return [(denoiser.transformer_blocks[i], SpanHook(run, ("span", start, end), i == start, i == end - 1, order),
             FEATURE_HOOK) for i in range(start, end)]


def feature_snapshot(run: Run) -> torch.Tensor | None:
    """The newest kept features of every module, flattened into one vector (for calibration)."""
    parts = []
    for history in run.store.values():
        if isinstance(history, History) and history.entries:
            parts += [x.reshape(-1).float() for x in tensors_of(history.entries[0][2])]
    return torch.cat(parts) if parts else None
