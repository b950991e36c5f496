"""Inverting a TarFlow: sequential (the reference), Jacobi and GS-Jacobi, with CRM / IGM strategy selection.

Sampling draws ``z ~ N(0, I)`` and inverts the flow blocks last to first. In its own token order a block's
inverse is the causal recurrence ``x_0 = z_0``, ``x_{t+1} = exp(a_{t+1}(x_{<=t})) z_{t+1} + b_{t+1}(x_{<=t})``
(:mod:`fastdiff.flows.tarflow`). Three ways to solve it (GS-Jacobi: Liu & Qin 2025, arXiv 2505.12849, official
code github encoreus/GS-Jacobi_for_TarFlow ``GS_Jacobi_sampling.py``, whose formulas the names below follow):

* ``"sequential"``: one token per transformer pass with a key/value cache, ``T - 1`` passes per block (the
  TarFlow paper's sampler; ``use_cache=False`` recomputes the prefix every pass, the cache's own reference).
* ``"jacobi"`` (paper Sec. 3.1): every token from the previous iterate at once,
  ``x^{k+1}_{t+1} = exp(a_{t+1}(x^k_{<=t})) z_{t+1} + b_{t+1}(x^k_{<=t})``, one causal pass per iteration. Token
  ``t`` is exact after ``t`` iterations, so ``T - 1`` iterations reproduce the sequential inverse exactly.
* ``"gs_jacobi"`` (Sec. 3.3, "modular GS-Jacobi"): the ``T - 1`` unknown tokens are split into ``num_segments``
  contiguous segments; Jacobi inside a segment (attending to the converged earlier segments through the cache),
  Gauss-Seidel across segments. ``num_segments=1`` is Jacobi, ``T - 1`` is sequential. A segment count that does
  not divide ``T`` is handled by segments whose lengths differ by one; when it divides, the segments are the
  official code's (the last one token shorter). A segment never needs more sweeps than its length (it is exact
  then), so its budget is ``min(max_iters, length)``.

Each Jacobi update is clamped to ``[-clamp, clamp]`` (``clamp=3`` in the official code; ``None`` disables it) and
a segment stops when the paper's criterion ``||x^{k+1} - x^k||_F / (B D) <= tolerance`` (``D`` the token size;
``criterion="paper"``, tolerance ``1e-6`` as in the code) holds, or at its budget. ``criterion="rms"`` (fastdiff's
option) uses the largest per-sample rms update instead, which does not change meaning with the batch size.
A non-finite value raises :class:`NonFiniteFlowError` naming the block, segment and iteration.

**Strategy** (Sec. 4): the *convergence ranking metric* of block ``k`` (code: ``CRN``),
``CRM_k = ||mean_batch(exp(-a) * x)||_2 * ||W_a||_2 + ||W_b||_2`` (``x`` the block's input on a calibration
batch of data, ``W_a, W_b`` the scale and shift halves of the output projection, spectral norms), ranks how
hard a block is to iterate; the *initial guessing metric* ``IGM_k(init) = ||mean_batch(J(x^0) - x)||_2`` is the
error of one Jacobi step ``J`` from an initial guess ``x^0`` against the true inverse, for ``init="noise"``
(``x^0 = z``, the code's guess 0) and ``"zeros"`` (``x^0 = (z_0, 0, ..., 0)``, guess 1). :func:`auto_strategy`
turns them into the paper's ``[tough-segments-iterations-else]`` strategies: blocks whose CRM is at least
``tough_ratio`` times the mean are segmented, the others get a small Jacobi budget, and every block starts from
its lower-IGM guess. (The paper picks the tough blocks by inspecting the CRM table; the ratio rule and the
default budgets are fastdiff's.) fastdiff's option ``ranking="measured"`` replaces the CRM by a measurement:
:func:`calibrate` with ``measure=True`` runs Jacobi on the calibration batch's own latents (whose exact inverse is
the data) and counts the sweeps each block needs; each block's budget is that count times a margin.

Why this is not :mod:`fastdiff.samplers.parallel`: that engine solves a diffusion trajectory
``x_{k+1} = F_k(x_k)`` whose step map is affine in the model output with a bounded multistep history, one
model call per trajectory point. A TarFlow block's token ``t + 1`` depends on *all* earlier tokens through
attention and one transformer pass evaluates a whole segment (with the prefix in a key/value cache), so the
recurrence is not a :class:`~fastdiff.samplers.steps.StepMap`; its Jacobi update (``J = 0``) needs none of
that engine's scan or window machinery, and its ranking metric is a different quantity (the engine's
``block_ranking`` measures log-SNR length along a diffusion trajectory).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from .tarflow import FlowBlock, KVCache, TarFlow, guided

METHODS = ("sequential", "jacobi", "gs_jacobi")
INITS = ("noise", "zeros")
CRITERIA = ("paper", "rms")
DEFAULT_TOLERANCE = 1e-6  # the official code's ebound


class NonFiniteFlowError(FloatingPointError):
    """A flow inversion produced NaN/inf; ``block``, ``segment`` and ``iteration`` say where (0-based)."""

    def __init__(self, block: int, segment: int, iteration: int) -> None:
        self.block, self.segment, self.iteration = block, segment, iteration
        super().__init__(f"non-finite value while inverting flow block {block} (segment {segment}, iteration "
                         f"{iteration}); try init='zeros', a clamp, more segments or a lower guidance")


@dataclass
class BlockStrategy:
    """How one flow block is inverted: ``num_segments`` GS segments, at most ``max_iters`` Jacobi sweeps per
    segment (``None``: the segment length, i.e. exact) and the initial guess ``init``."""

    num_segments: int = 1
    max_iters: int | None = None
    init: str = "noise"


@dataclass
class BlockStats:
    """What inverting one block cost: ``passes`` transformer passes (sequential: ``T - 1``), the sweeps of each
    segment, the largest final update (the stopping criterion's value) and whether every segment met the
    tolerance or ran to its exact length."""

    block: int
    num_segments: int
    init: str
    passes: int
    iterations: list[int] = field(default_factory=list)
    residual: float = 0.0
    converged: bool = True


@dataclass
class FlowStats:
    method: str
    num_tokens: int
    blocks: list[BlockStats] = field(default_factory=list)
    seconds: float = 0.0  # inversion wall clock (without denoising)

    @property
    def passes(self) -> int:
        """Sequential transformer passes of the inversion (a guided pass counts once: cond and uncond batched)."""
        return sum(b.passes for b in self.blocks)

    @property
    def sequential_passes(self) -> int:
        return len(self.blocks) * (self.num_tokens - 1)

    @property
    def pass_speedup(self) -> float:
        return self.sequential_passes / max(self.passes, 1)

    def as_dict(self) -> dict:
        return {**asdict(self), "passes": self.passes, "sequential_passes": self.sequential_passes,
                "pass_speedup": self.pass_speedup}


# ------------------------------------------------------------------------------------------- checks
def _check_strategy(s: BlockStrategy, num_tokens: int, where: str) -> None:
    if not isinstance(s, BlockStrategy):
        raise TypeError(f"{where} must be a BlockStrategy, got {s!r}")
    if not isinstance(s.num_segments, int) or not 1 <= s.num_segments <= num_tokens - 1:
        raise ValueError(f"{where}.num_segments must be an int in [1, {num_tokens - 1}] (the number of unknown "
                         f"tokens; a count that does not divide them gives segments differing by one), got "
                         f"{s.num_segments!r}")
    if s.max_iters is not None and (not isinstance(s.max_iters, int) or s.max_iters < 1):
        raise ValueError(f"{where}.max_iters must be an int >= 1 or None, got {s.max_iters!r}")
    if s.init not in INITS:
        raise ValueError(f"{where}.init must be one of {INITS}, got {s.init!r}")


def segment_bounds(num_unknown: int, num_segments: int) -> list[tuple[int, int]]:
    """Input-token ranges ``[s, e)`` of the segments (outputs ``s+1 .. e``): ``num_unknown`` split into
    ``num_segments`` contiguous parts, the longer ones first."""
    base, extra = divmod(num_unknown, num_segments)
    bounds, s = [], 0
    for i in range(num_segments):
        e = s + base + (i < extra)
        bounds.append((s, e))
        s = e
    return bounds


def initial_guess(z: Tensor, init: str) -> Tensor:
    """GS-Jacobi's initial iterate (permuted tokens): the noise itself, or zeros after the known token 0."""
    return z.clone() if init == "noise" else torch.cat([z[:, :1], torch.zeros_like(z[:, 1:])], 1)


# ------------------------------------------------------------------------------------------- one block
class _Block:
    """Inverts one flow block: its conditioning (cond and uncond stacked for guidance) and guided passes."""

    def __init__(self, block: FlowBlock, labels: Tensor | None, batch: int, guidance: float, annealed: bool,
                 num_tokens: int):
        self.block, self.B, self.T = block, batch, num_tokens
        self.guide = guidance != 0
        cond = block.condition(labels, batch)
        if self.guide and cond is not None:
            cond = torch.cat([cond, block.condition(None, batch)])
        self.cond, self.guidance, self.annealed = cond, guidance, annealed

    def weight(self, start: int, length: int, like: Tensor) -> Tensor | float:
        """Guidance weight of output tokens ``start+1 .. start+length`` (annealed: ``w t / (T - 1)``)."""
        if not self.annealed:
            return self.guidance
        t = torch.arange(start + 1, start + length + 1, device=like.device, dtype=like.dtype)
        return (self.guidance * t / (self.T - 1))[None, :, None]

    def params(self, x: Tensor, start: int, cache: KVCache | None) -> tuple[Tensor, Tensor, list]:
        """Guided ``(a, b)`` for output tokens ``start+1 .. start+L`` from inputs ``x [B, L, D]``: one pass."""
        if self.guide:
            x = torch.cat([x, x])
        a, b, kvs = self.block.params(x, start, self.cond, cache)
        if self.guide:
            uncond = (a[self.B:], b[self.B:])
            a, b = guided((a[:self.B], b[:self.B]), uncond, self.weight(start, a.shape[1], a))
        return a, b, kvs


def _update_size(delta: Tensor, criterion: str) -> float:
    if criterion == "paper":  # ||dx||_F / (B * D), the official code's `diff`
        return float(delta.norm() / (delta.shape[0] * delta.shape[-1]))
    return float(delta.flatten(1).pow(2).mean(1).sqrt().max())


def _invert_sequential(blk: _Block, z: Tensor, use_cache: bool) -> Tensor:
    x = z.clone()
    cache = KVCache() if use_cache else None
    for t in range(blk.T - 1):
        if use_cache:
            a, b, kvs = blk.params(x[:, t:t + 1], t, cache)
            cache.commit(kvs)
        else:  # the reference for the cache: the whole prefix again, keep the last output
            a, b, _ = blk.params(x[:, :t + 1], 0, None)
            a, b = a[:, -1:], b[:, -1:]
        x[:, t + 1:t + 2] = torch.exp(a) * z[:, t + 1:t + 2] + b
    return x


def _invert_segments(blk: _Block, z: Tensor, strategy: BlockStrategy, tolerance: float, criterion: str,
                     clamp: float | None, index: int, stats: BlockStats) -> Tensor:
    x = initial_guess(z, strategy.init)
    cache = KVCache()
    for seg, (s, e) in enumerate(segment_bounds(blk.T - 1, strategy.num_segments)):
        length = e - s
        budget = length if strategy.max_iters is None else min(strategy.max_iters, length)
        change, kvs, it = math.inf, None, 0
        for it in range(budget):  # noqa: B007 (read after the loop)
            a, b, kvs = blk.params(x[:, s:e], s, cache)
            new = torch.exp(a) * z[:, s + 1:e + 1] + b
            if clamp is not None:
                new = new.clamp(-clamp, clamp)
            if not bool(torch.isfinite(new).all()):
                raise NonFiniteFlowError(index, seg, it)
            change = _update_size(new - x[:, s + 1:e + 1], criterion)
            x[:, s + 1:e + 1] = new
            if change <= tolerance:
                break
        cache.commit(kvs)  # the last sweep's keys/values (official code); exact once the segment is
        stats.iterations.append(it + 1)
        stats.residual = max(stats.residual, change)
        stats.converged &= change <= tolerance or it + 1 == length
    stats.passes = sum(stats.iterations)
    return x


# ------------------------------------------------------------------------------------------- public API
@torch.no_grad()
def invert(
    model: TarFlow,
    z: Tensor,
    labels: Tensor | None = None,
    *,
    method: str = "sequential",
    strategy: Sequence[BlockStrategy] | None = None,
    num_segments: int = 1,
    max_iters: int | None = None,
    init: str = "noise",
    tolerance: float = DEFAULT_TOLERANCE,
    criterion: str = "paper",
    clamp: float | None = 3.0,
    guidance: float = 0.0,
    annealed: bool = True,
    use_cache: bool = True,
) -> tuple[Tensor, FlowStats]:
    """Map prior samples ``z [B, T, D]`` (patch tokens) to data tokens through every block's inverse.

    Args:
        model: the :class:`~fastdiff.flows.tarflow.TarFlow`.
        z: ``[B, T, D]`` prior noise.
        labels: ``[B]`` class labels (``num_classes`` = unconditional) or ``None`` (unconditional).
        method: ``"sequential"`` (the reference), ``"jacobi"`` or ``"gs_jacobi"`` (module docstring).
        strategy: ``gs_jacobi``: one :class:`BlockStrategy` per block, indexed like ``model.blocks`` (e.g. from
            :func:`auto_strategy`); default every block ``BlockStrategy(num_segments, max_iters, init)``.
        num_segments, max_iters, init: the strategy of every block when ``strategy`` is not given (``jacobi``
            uses one segment).
        tolerance, criterion: the stopping rule of a segment (module docstring); ``tolerance=0`` runs every
            segment to its exact length.
        clamp: bound of each Jacobi update (the paper's 3), ``None`` for none; the sequential method never clamps.
        guidance, annealed: TarFlow guidance weight on ``(a, b)`` (0 = none) and its linear annealing over tokens.
        use_cache: ``sequential`` only: ``False`` recomputes the prefix every pass (the cache's reference).

    Returns:
        ``(x [B, T, D], stats)``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if clamp is not None and not clamp > 0:
        raise ValueError(f"clamp must be > 0 or None, got {clamp!r}")
    T, D = model.num_tokens, model.token_dim
    if not isinstance(z, Tensor) or not z.is_floating_point() or z.ndim != 3 or tuple(z.shape[1:]) != (T, D):
        raise ValueError(f"z must be a floating tensor [B, {T}, {D}] (patch tokens), got "
                         f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
    if not bool(torch.isfinite(z).all()):
        raise ValueError("z contains NaN or inf")
    labels = model.check_labels(labels, z.shape[0])
    K = len(model.blocks)
    if method == "jacobi":
        num_segments = 1
    if method != "sequential":
        if strategy is None or method == "jacobi":
            strategy = [BlockStrategy(num_segments, max_iters, init) for _ in range(K)]
        strategy = list(strategy)
        if len(strategy) != K:
            raise ValueError(f"strategy must have one BlockStrategy per block ({K}), got {len(strategy)}")
        for k, s in enumerate(strategy):
            _check_strategy(s, T, f"strategy[{k}]")

    stats = FlowStats(method, T)
    tic = time.perf_counter()
    x = z
    for k in reversed(range(K)):
        block = model.blocks[k]
        blk = _Block(block, labels, z.shape[0], guidance, annealed, T)
        zp = block.permute(x)
        if method == "sequential":
            xp = _invert_sequential(blk, zp, use_cache)
            stats.blocks.append(BlockStats(k, T - 1, "sequential", T - 1, [1] * (T - 1)))
        else:
            s = strategy[k]
            bs = BlockStats(k, s.num_segments, s.init, 0)
            xp = _invert_segments(blk, zp, s, tolerance, criterion, clamp, k, bs)
            stats.blocks.append(bs)
        x = block.permute(xp)
    stats.seconds = time.perf_counter() - tic
    return x, stats


def sample(
    model: TarFlow,
    labels: Tensor | None = None,
    *,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    denoise: bool = True,
    denoise_step: float = 1.0,
    **invert_kwargs,
) -> tuple[Tensor, FlowStats]:
    """Draw images ``[B, C, H, W]`` in ``[-1, 1]`` (not clipped): prior noise, :func:`invert`, then TarFlow's
    score-based denoising step (``denoise_step`` scales it, 1 = Tweedie's optimal step).

    ``labels`` ``[B]`` (or ``None`` with ``num_samples`` for unconditional samples); ``noise`` ``[B, T, D]``
    overrides the draw from ``generator``; ``invert_kwargs`` go to :func:`invert` (method, strategy, guidance...).
    """
    n = labels.shape[0] if isinstance(labels, Tensor) else num_samples
    if noise is None:
        if not isinstance(n, int) or n < 1:
            raise ValueError("pass labels [B], noise [B, T, D] or num_samples >= 1")
        param = next(model.parameters())
        noise = torch.randn((n, model.num_tokens, model.token_dim), generator=generator, dtype=param.dtype)
        noise = noise.to(param.device)
    x, stats = invert(model, noise, labels, **invert_kwargs)
    images = model.unpatchify(x)
    if denoise:
        images = model.denoise(images, labels, denoise_step)
    return images, stats


# ------------------------------------------------------------------------------------------- CRM / IGM
@dataclass
class Calibration:
    """CRM per block and IGM per block and initial guess, from a calibration batch (index = ``model.blocks``).

    ``jacobi_iters`` (fastdiff's addition, ``measure=True``): the Jacobi sweeps each block needed on the
    calibration batch, from its lower-IGM guess, to meet ``tolerance`` under ``criterion``."""

    crm: list[float]
    igm: dict[str, list[float]]
    num_tokens: int
    num_images: int
    jacobi_iters: list[int] | None = None
    tolerance: float | None = None
    criterion: str | None = None

    def crm_share(self) -> list[float]:
        """Each block's CRM as a percentage of the total (the paper's table)."""
        total = sum(self.crm)
        return [100 * c / total for c in self.crm]

    def best_init(self, k: int) -> str:
        return min(INITS, key=lambda name: self.igm[name][k])

    def as_dict(self) -> dict:
        return {**asdict(self), "crm_share": self.crm_share()}


def _spectral(m: Tensor) -> float:
    return float(torch.linalg.matrix_norm(m.double(), ord=2))


@torch.no_grad()
def calibrate(model: TarFlow, images: Tensor, labels: Tensor | None = None, *, measure: bool = False,
              tolerance: float = DEFAULT_TOLERANCE, criterion: str = "paper") -> Calibration:
    """GS-Jacobi's CRM and IGM of every block from a batch of data ``images`` ``[N, C, H, W]`` in ``[-1, 1]``
    (the paper uses ~1000 training images; the official code passes them without labels). ``measure=True`` also
    counts the Jacobi sweeps each block needs to invert the batch's own latents to ``tolerance``."""
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ValueError("images must be a tensor [N, C, H, W] in [-1, 1]")
    labels = model.check_labels(labels, images.shape[0])
    crm, igm, latents = [], {name: [] for name in INITS}, []
    x = model.patchify(images)
    for block in model.blocks:
        xp = block.permute(x)
        cond = block.condition(labels, x.shape[0])
        a, b, _ = block.params(xp[:, :-1], 0, cond)
        a_full = torch.cat([torch.zeros_like(a[:, :1]), a], 1)
        zp = torch.cat([xp[:, :1], (xp[:, 1:] - b) * torch.exp(-a)], 1)
        w_a, w_b = block.proj_out.weight.chunk(2, 0)
        crm.append(_spectral((torch.exp(-a_full) * xp).mean(0)) * _spectral(w_a) + _spectral(w_b))
        for name in INITS:
            guess = initial_guess(zp, name)
            ga, gb, _ = block.params(guess[:, :-1], 0, cond)
            step = torch.cat([zp[:, :1], torch.exp(ga) * zp[:, 1:] + gb], 1)
            igm[name].append(_spectral((step - xp).mean(0)))
        latents.append(zp)
        x = block.permute(zp)
    cal = Calibration(crm, igm, model.num_tokens, images.shape[0])
    if measure:
        cal.jacobi_iters, cal.tolerance, cal.criterion = [], tolerance, criterion
        for k, block in enumerate(model.blocks):
            stats = BlockStats(k, 1, cal.best_init(k), 0)
            blk = _Block(block, labels, x.shape[0], 0.0, False, model.num_tokens)
            _invert_segments(blk, latents[k], BlockStrategy(1, None, stats.init), tolerance, criterion, None, k, stats)
            cal.jacobi_iters.append(stats.passes)
    return cal


RANKINGS = ("crm", "measured")


def auto_strategy(
    calibration: Calibration,
    *,
    ranking: str = "crm",
    tough_ratio: float = 2.0,
    tough_segments: int = 8,
    tough_iters: int | None = None,
    easy_iters: int | None = None,
    margin: float = 1.5,
) -> list[BlockStrategy]:
    """Per-block strategies from a :class:`Calibration`.

    ``ranking="crm"`` (the paper's ``[tough-segments-iters-else]`` form): a block is *tough* when its CRM is at
    least ``tough_ratio`` times the mean CRM; it gets ``tough_segments`` segments with ``tough_iters`` sweeps each
    (``None``: the segment length, so only the tolerance stops it). The others run Jacobi on the whole sequence
    for at most ``easy_iters`` sweeps (default ``ceil(T / 8)``).

    ``ranking="measured"`` (fastdiff's option; needs ``calibrate(..., measure=True)``): every block runs Jacobi on
    the whole sequence with a budget of ``margin`` times the sweeps it needed on the calibration batch; a block
    whose budget would reach ``T - 1`` (Jacobi no faster than sequential) gets ``tough_segments`` segments.

    Every block starts from the initial guess with the lower IGM.
    """
    T = calibration.num_tokens
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}")
    if not tough_ratio > 0:
        raise ValueError(f"tough_ratio must be > 0, got {tough_ratio!r}")
    if not isinstance(tough_segments, int) or not 1 <= tough_segments <= T - 1:
        raise ValueError(f"tough_segments must be an int in [1, {T - 1}], got {tough_segments!r}")
    easy_iters = math.ceil(T / 8) if easy_iters is None else easy_iters
    if not isinstance(easy_iters, int) or easy_iters < 1:
        raise ValueError(f"easy_iters must be an int >= 1, got {easy_iters!r}")
    if ranking == "measured":
        if calibration.jacobi_iters is None:
            raise ValueError("ranking='measured' needs a calibration made with calibrate(..., measure=True)")
        if not margin >= 1:
            raise ValueError(f"margin must be >= 1, got {margin!r}")
        out = []
        for k, iters in enumerate(calibration.jacobi_iters):
            budget = math.ceil(margin * iters)
            tough = budget >= T - 1
            out.append(BlockStrategy(tough_segments if tough else 1, tough_iters if tough else budget,
                                     calibration.best_init(k)))
        return out
    mean = sum(calibration.crm) / len(calibration.crm)
    out = []
    for k, c in enumerate(calibration.crm):
        init = calibration.best_init(k)
        if c >= tough_ratio * mean:
            out.append(BlockStrategy(tough_segments, tough_iters, init))
        else:
            out.append(BlockStrategy(1, easy_iters, init))
    return out


__all__ = ["BlockStats", "BlockStrategy", "Calibration", "FlowStats", "NonFiniteFlowError", "auto_strategy",
           "calibrate", "initial_guess", "invert", "sample", "segment_bounds"]
