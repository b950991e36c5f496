"""Parallel-in-time sampling: solve a sampler's whole trajectory as a fixed point.

Sequential sampling folds a step map ``x_{k+1} = F_k(x_k)`` (:mod:`fastdiff.samplers.steps`) over ``K``
steps: ``K`` model calls one after the other. The trajectory ``(x_1 .. x_K)`` is also the solution of the
fixed-point system ``x_{k+1} = F_k(x_k)``, and every iteration of a fixed-point method evaluates the model
on a whole *window* of trajectory points in one batched call (a "round"). All methods here are one
linearised update over the window ``[b, b+n)`` (``x_b`` already converged):

    x_{k+1}^new = F_k(x_k^old) + J_k (x_k^new - x_k^old),     k = b .. b+n-1

solved as a linear recurrence (an associative scan, done in small matrix blocks). The choice of ``J_k``
is the method (Lim et al. 2024, DEER: Picard is Newton with ``J = I``):

* ``"picard"``: ``J = I``: the cumulative-drift update of ParaDiGMS (Shih et al. 2023, arXiv 2305.16317)
  with its sliding window and noise-variance-scaled tolerance.
* ``"jacobi"``: ``J = 0``: every step from the previous iterate, as in Jacobi decoding.
* ``"newton"``: a quasi-Newton (quasi-DEER) update with a scalar Jacobian per step and sample,
  ``J_k = a_k + input_scale_k (b_k g_k + c_k (1 - alpha_k g_k) / sigma_k)``, where ``g_k ~ d x0 / d u`` is the
  denoiser's gain: measured by a secant between the last two evaluations at that step (a per-step
  Barzilai-Borwein / Anderson(1)-type acceleration), else predicted by a Gaussian data model
  ``N(m, c^2 I)`` whose ``c^2`` is calibrated per sample from the latest secant. fastdiff's own method.
* ``"gs_jacobi"``: Gauss-Seidel over blocks of ``window`` steps, Jacobi inside a block (GS-Jacobi, Liu et al.
  2025, arXiv 2505.12849), with a per-block iteration budget from a convergence ranking metric and the
  initial guess of each block picked by an initial-guessing metric (see :func:`sample_parallel`).

New trajectory points entering the window start from a *Gaussian-model extrapolation* (``init="gaussian"``):
the step map rolled forward with the denoiser replaced by the posterior mean of ``N(m, c^2 I)`` fitted to
the last evaluation, a closed-form affine recurrence that costs no model call. ``init="copy"`` is
ParaDiGMS' "repeat the last point".

A point is accepted when its error measure is within ``tolerance`` times a noise scale, and the window
slides to the first point that is not. For Picard and Jacobi (as in ParaDiGMS) the measure is the point's
last update and the scale the step's DDPM posterior standard deviation (floored for the final steps). For
Newton it is an a-posteriori error estimate (the update times ``rho / (1 - rho)``, ``rho`` the observed
contraction at that point) carried to the final sample through the estimated Jacobians, against the final
step's scale: an error early in the trajectory counts by how much it moves the output. Every round accepts
at least one more exact step, so ``K`` rounds always suffice, and ``tolerance=0`` reproduces sequential
sampling to float precision. Nothing in a round reads device values on the host except the one packed
progress flag per ``sync_every`` rounds.

``model_switch`` (a :class:`fastdiff.samplers.pcm.ModelSwitch`, e.g. from a Picard Consistency Model) runs
the first rounds of any method with another denoiser (PCM's model switching, So et al. 2025): those rounds
apply the Picard update the PCM is trained for (or, with ``update="method"``, the method's own) but accept no
point, and the base model takes over at ``stats.switch_round``,
from where the solve is the usual one (so ``tolerance=0`` is still exact).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import torch

from .steps import Denoiser, NonFiniteLatentError, StepMap, apply_step, denoise, model_input

if TYPE_CHECKING:
    from .pcm import ModelSwitch

METHODS = ("picard", "jacobi", "newton", "gs_jacobi")
# Default tolerance per method: Newton's is an a-posteriori error estimate on the final sample, the others a
# per-step update against the step's noise scale. On the v2 embedded model 1e-4 kept Newton within rms 1e-3 of
# sequential sampling on every case of benchmarks/parallel_defaults.py (3e-4, the v1 choice: 8 of 12);
# Picard at 0.1 (ParaDiGMS' default) in 5 of 12, with more rounds.
DEFAULT_TOLERANCE = {"picard": 0.1, "jacobi": 0.1, "gs_jacobi": 0.1, "newton": 1e-4}
INITS = ("gaussian", "copy")


@dataclass
class ParallelStats:
    """What a parallel run cost. ``rounds`` are sequential (batched) model calls, ``model_evals`` the
    trajectory points evaluated in them (sequential sampling: ``rounds = model_evals = num_steps``)."""

    method: str
    num_steps: int
    window: int
    tolerance: float
    rounds: int = 0
    model_evals: int = 0
    residual: float = float("nan")  # rms update of the points changed in the last round (latent units)
    converged: bool = True  # False if a round or block budget ended the solve before the tolerance was met
    host_syncs: int = 0
    switch_round: int | None = None  # with a model_switch: the first round run on the base model alone (1-based)

    @property
    def round_speedup(self) -> float:
        """Sequential model calls per parallel round: the wall-clock speedup with free batch throughput."""
        return self.num_steps / max(self.rounds, 1)

    def as_dict(self) -> dict:
        return {**asdict(self), "round_speedup": self.round_speedup}


# ------------------------------------------------------------------------------------------- the solver
@torch.no_grad()
def sample_parallel(
    step_map: StepMap,
    denoiser: Denoiser,
    x: torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    method: str = "newton",
    window: int | None = None,
    tolerance: float | None = None,
    init: str = "gaussian",
    max_rounds: int | None = None,
    data_variance: float = 1.0,
    first_output: torch.Tensor | None = None,
    sync_every: int = 1,
    block_iters: float | None = None,
    progress: Callable[[int], None] | None = None,
    model_switch: ModelSwitch | None = None,
) -> tuple[torch.Tensor, ParallelStats]:
    """Sample ``x_K`` from ``x`` (= ``x_0``, already times ``init_noise_sigma``) by a parallel fixed-point solve.

    Runs without autograd (like a diffusers pipeline call), so a module denoiser builds no graph across rounds.

    Args:
        step_map: the sampler (:func:`fastdiff.samplers.steps.step_map_for`).
        denoiser: ``denoiser(model_input [n*B, ...], t [n*B]) -> model_output``, called once per round on the
            window's ``n`` points (point-major: items ``i*B .. i*B+B-1`` are point ``i``).
        x: initial latents ``[B, ...]``.
        noise: ``[K, B, ...]`` pre-drawn step noise for a stochastic map (:func:`~.steps.draw_noise`).
        method: one of ``"picard"``, ``"jacobi"``, ``"newton"``, ``"gs_jacobi"`` (module docstring).
        window: points per round (the batch is ``window * B``); default all ``K`` steps. For ``gs_jacobi``
            the block size.
        tolerance: accept a point when its error measure is at most ``tolerance`` times the noise scale
            (module docstring); default ``DEFAULT_TOLERANCE[method]`` (Newton 1e-4, the others 0.1). ``0`` is
            the exact mode: the result equals sequential sampling to float precision.
        init: how new points start: ``"gaussian"`` (model-based extrapolation) or ``"copy"`` (ParaDiGMS).
        max_rounds: stop after this many rounds; default ``K`` (always enough). A run it (or ``block_iters``)
            stops before convergence has ``stats.converged = False`` and issues a ``UserWarning`` naming the
            cap and the last residual.
        data_variance: prior per-coordinate data variance ``c^2`` of the Gaussian model (1 for unit-scaled data).
        first_output: the model output at ``x`` for step 0 if already computed (a pipeline's own first
            call); counted as one round and used as a free warm start.
        sync_every: read the progress flag on the host every this many rounds (windows are then advanced on
            the device, at full width); ``1`` trims the last windows exactly.
        block_iters: ``gs_jacobi`` only: a cap on Jacobi sweeps, given in full to the hardest block and to the
            others in proportion to their convergence ranking metric (:func:`block_ranking`). Default: no cap
            (every block may take as many sweeps as it has steps, which makes it exact); on diffusion
            trajectories a cap trades accuracy for rounds.
        progress: called with the number of steps accepted so far, at every host read (e.g. to drive a
            progress bar; :func:`fastdiff.parallel_sample` shows the pipeline's own bar).
        model_switch: a :class:`fastdiff.samplers.pcm.ModelSwitch`: its ``switch_round`` first rounds (after
            the free warm start) evaluate the window with ``model_switch.denoiser(j, denoiser)`` and accept
            nothing; ``stats.switch_round`` is the first round on ``denoiser`` alone. Default: none.

    Returns:
        ``(x_K, stats)``. Raises :class:`~.steps.NonFiniteLatentError` naming the step whose exact update
        is non-finite; a ``TypeError``/``ValueError`` naming the argument for a ``step_map`` that is not a
        :class:`~.steps.StepMap`, non-finite ``x`` or ``noise``, bad options, or a denoiser whose output does
        not have its input's shape (at the first round).
    """
    check_options(method, window, tolerance, init, max_rounds, sync_every, data_variance=data_variance,
                  block_iters=block_iters)
    _check(step_map, denoiser, x, noise, first_output)
    if model_switch is not None and not callable(getattr(model_switch, "denoiser", None)):
        raise TypeError(f"model_switch must be a fastdiff.samplers.pcm.ModelSwitch, got {type(model_switch).__name__}")
    num = step_map.num_steps
    window = num if window is None else min(window, num)
    tolerance = DEFAULT_TOLERANCE[method] if tolerance is None else tolerance
    solver = _Solver(step_map, denoiser, x, noise, method, window, tolerance, init, data_variance, sync_every,
                     progress, model_switch)
    if method == "gs_jacobi":
        solver.run_blocks(max_rounds, block_iters, first_output)
    else:
        solver.run_sliding(max_rounds, first_output)
    out, stats = solver.result()
    if not stats.converged:
        cause = f"max_rounds={max_rounds}" if stats.rounds >= (max_rounds or math.inf) else f"block_iters={block_iters}"
        warnings.warn(
            f"parallel sampling ({method}) stopped by {cause} before converging: the result may differ from "
            f"sequential sampling (last round's rms update {stats.residual:.3g} in latent units, tolerance "
            f"{stats.tolerance:g}, {stats.rounds} rounds for {stats.num_steps} steps); raise {cause.split('=')[0]} "
            "or leave it at its default (None) to converge",
            UserWarning, stacklevel=2,
        )
    return out, stats


def check_options(method: str, window: int | None, tolerance: float | None, init: str = "gaussian",
                  max_rounds: int | None = None, sync_every: int = 1, *, data_variance: float = 1.0,
                  block_iters: float | None = None) -> None:
    """Validate :func:`sample_parallel`'s scalar options (``None`` window / tolerance: the defaults)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if window is not None and not _is_int(window, 1):
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if tolerance is not None and not _is_number(tolerance, 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if max_rounds is not None and not _is_int(max_rounds, 1):
        raise ValueError(f"max_rounds must be an int >= 1 or None, got {max_rounds!r}")
    if not _is_int(sync_every, 1):
        raise ValueError(f"sync_every must be an int >= 1, got {sync_every!r}")
    if not _is_number(data_variance, 0) or data_variance == 0:
        raise ValueError(f"data_variance must be a finite number > 0, got {data_variance!r}")
    if block_iters is not None and (not _is_number(block_iters, 0) or block_iters == 0):
        raise ValueError(f"block_iters must be a finite number > 0 or None, got {block_iters!r}")


def _is_int(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: object, low: float) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value >= low)


def _check(sm: object, denoiser: object, x: object, noise: object, first_output: object) -> None:
    if not isinstance(sm, StepMap):
        raise TypeError(
            f"step_map must be a fastdiff StepMap (fastdiff.samplers.steps.step_map_for(scheduler) builds one from a "
            f"diffusers scheduler after set_timesteps), got {type(sm).__name__}"
        )
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable as denoiser(model_input, t) -> model_output, got "
                        f"{type(denoiser).__name__}")
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x) or x.ndim < 1:
        raise TypeError(f"x must be a floating-point tensor [B, ...], got {type(x).__name__}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x (the initial latents) contains NaN or inf")
    shape = (sm.num_steps, *x.shape)
    if sm.stochastic and noise is None:
        raise ValueError(
            f"step map {sm.name!r} is stochastic: pass noise of shape {shape} "
            "(fastdiff.samplers.steps.draw_noise draws it as the scheduler would)"
        )
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != shape:
            got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"noise must be a tensor of shape {shape} ([num_steps, *x.shape]), got {got}")
        if not bool(torch.isfinite(noise).all()):
            raise ValueError("noise (the pre-drawn step noise) contains NaN or inf")
    if first_output is not None and (not isinstance(first_output, torch.Tensor) or first_output.shape != x.shape):
        raise ValueError(f"first_output must have the latents' shape {tuple(x.shape)}")


def split_denoiser(denoiser: Denoiser, batch_size: int, group: object | None = None) -> Denoiser:
    """Split each window across the processes of a ``torch.distributed`` group.

    The window's ``n`` points (of ``batch_size`` items each) are divided into equal contiguous shares (the
    last point repeated as padding), each process evaluates its share and an ``all_gather`` assembles the
    full output, so every process runs the same solve on the same numbers.
    """
    import torch.distributed as dist

    def split(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        n = u.shape[0] // batch_size
        share = -(-n // world)
        pad = share * world - n
        uv, tv = u.view(n, batch_size, *u.shape[1:]), t.view(n, batch_size)
        if pad:
            uv = torch.cat([uv, uv[-1:].expand(pad, *uv.shape[1:])])
            tv = torch.cat([tv, tv[-1:].expand(pad, *tv.shape[1:])])
        mine = slice(rank * share, (rank + 1) * share)
        out = denoiser(uv[mine].flatten(0, 1), tv[mine].flatten(0, 1)).contiguous()
        parts = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(parts, out, group=group)
        return torch.cat(parts)[: n * batch_size]

    return split


# ------------------------------------------------------------------------------------------- math
def linear_scan(J: torch.Tensor | None, c: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Solve ``d_i = J_i d_{i-1} + c_i`` (``d_{-1} = 0``) for ``i = 0..n-1``.

    ``J`` is ``[n, B]`` (non-negative) or None for ``J = 1`` (a cumulative sum); ``c`` is ``[n, B, ...]``.
    Done as lower-triangular transfer matrices ``exp(logP_i - logP_j)`` over chunks of ``chunk`` steps with
    a carry between chunks: ``O(n * chunk)`` work, stable for any ``n``.
    """
    if J is None:
        return c.cumsum(0)
    n = c.shape[0]
    logj = J.to(torch.float64).clamp(min=1e-30).log()
    out, carry = [], None
    for s in range(0, n, chunk):
        lp = logj[s:s + chunk].cumsum(0)  # [m, B]
        m = lp.shape[0]
        gap = (lp[:, None] - lp[None, :]).masked_fill(_upper(m, c.device), -math.inf)  # [i, j, B]
        d = torch.einsum("ijb,jb...->ib...", gap.exp().to(c.dtype), c[s:s + m])
        if carry is not None:
            d = d + _b(lp.exp().to(c.dtype), d) * carry
        carry = d[-1]
        out.append(d)
    return torch.cat(out)


@functools.lru_cache(maxsize=16)
def _upper(m: int, device: torch.device) -> torch.Tensor:
    """``[m, m, 1]``: True strictly above the diagonal (the entries a causal recurrence never uses)."""
    return torch.ones(m, m, dtype=torch.bool, device=device).triu(1)[..., None]


def gaussian_gain(alpha: torch.Tensor, sigma: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """``d x0 / d u`` of the posterior mean for data ``N(m, c^2 I)`` at ``u = alpha x0 + sigma eps``:
    ``alpha c^2 / (alpha^2 c^2 + sigma^2)``. Broadcasts ``[n, 1]`` levels against ``[B]`` variances."""
    return alpha * c2 / (alpha**2 * c2 + sigma**2)


def step_jacobian(sm: StepMap, k: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """``d x_{k+1} / d x_k`` of the step map when the denoiser's gain ``d x0 / d u`` is the scalar ``gain``
    (``[n, B]``): ``a + s (b_0 g + c_0 (1 - alpha g) / sigma)``, history terms held fixed."""
    a, s, al, sg = (v[k][:, None] for v in (sm.a, sm.input_scale, sm.alpha, sm.sigma))
    return a + s * (sm.b[k, 0][:, None] * gain + sm.c[k, 0][:, None] * (1 - al * gain) / sg)


def _b(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def _rms(v: torch.Tensor) -> torch.Tensor:
    """Per ``[n, B]`` item rms over the trailing dims."""
    return v.flatten(2).pow(2).mean(-1).sqrt()


def _pad(sm: StepMap, extra: int) -> StepMap:
    """``extra`` identity steps after the last (so windows may run past the end without bounds checks)."""
    if extra == 0:
        return sm

    def rep(v: torch.Tensor, fill: float | None = None) -> torch.Tensor:
        tail = v[-1:].expand(extra, *v.shape[1:]) if fill is None else torch.full_like(v[-1:], fill).expand(
            extra, *v.shape[1:])
        return torch.cat([v, tail])

    return replace(
        sm, timesteps=rep(sm.timesteps), input_scale=rep(sm.input_scale), alpha=rep(sm.alpha), sigma=rep(sm.sigma),
        a=rep(sm.a, 1.0), b=rep(sm.b, 0.0), c=rep(sm.c, 0.0), noise_scale=rep(sm.noise_scale, 0.0),
        noise_drawn=torch.cat([sm.noise_drawn, torch.zeros(extra, dtype=torch.bool)]),
        state_alpha=rep(sm.state_alpha), state_sigma=rep(sm.state_sigma),
    )


def tolerance_scale(sm: StepMap) -> torch.Tensor:
    """``[K]``: the noise scale that ``tolerance`` multiplies for point ``k+1``: the DDPM posterior std of step
    ``k`` (ParaDiGMS' variance), floored at the smallest non-negligible one so final steps onto clean data
    (variance 0) converge to a finite tolerance too."""
    var = sm.ancestral_variance()
    positive = var[var > 1e-10 * var.max()]
    floor = positive.min() if positive.numel() else torch.tensor(1.0, dtype=var.dtype)
    return var.clamp(min=float(floor)).sqrt()


def block_ranking(sm: StepMap, block: int) -> torch.Tensor:
    """GS-Jacobi's convergence ranking metric per block of ``block`` steps: the log-SNR length
    ``sum |lambda_{k+1} - lambda_k|`` the block integrates over (how far its states move, so how many Jacobi
    sweeps a constant guess needs), normalised so the hardest block scores 1."""
    lam = 2 * (sm.state_alpha.log() - sm.state_sigma.log())
    steps = (lam[1:] - lam[:-1]).abs()
    finite = steps[torch.isfinite(steps)]
    steps = torch.where(torch.isfinite(steps), steps, finite.max() if finite.numel() else torch.ones(()))
    crm = torch.stack([steps[s:s + block].sum() for s in range(0, sm.num_steps, block)])
    return crm / crm.max().clamp(min=1e-30)


# ------------------------------------------------------------------------------------------- the solver state
class _Solver:
    """Trajectory buffers and the round primitives shared by the sliding-window and block methods."""

    def __init__(self, sm, denoiser, x, noise, method, window, tolerance, init, data_variance, sync_every, progress,
                 switch=None):
        num, self.B = sm.num_steps, x.shape[0]
        self.K, self.W, self.H = num, window, sm.history
        pad = 2 * window + 1  # room for a full window, and its extrapolation, past the last step
        self.sm = _pad(sm, pad).to(x.device, x.dtype)
        self.scale = torch.cat([tolerance_scale(sm), torch.ones(pad, dtype=torch.float64)]).to(x.device)
        self.den, self.method, self.tol, self.init = denoiser, method, float(tolerance), init
        self.sync_every, self.progress = sync_every, progress
        size = num + pad + 1
        self.traj = x.new_zeros((size, *x.shape))
        self.traj[0] = x
        self.x0s = x.new_zeros((self.H + size, *x.shape))
        self.epss = torch.zeros_like(self.x0s)
        self.noise = None if noise is None else torch.cat([noise, noise.new_zeros((size - num, *x.shape))])
        self.gain = x.new_zeros((size, self.B))
        self.c2 = x.new_full((self.B,), float(data_variance))
        self.u_last = torch.zeros_like(self.traj)  # model input of the latest evaluation at each point
        self.seen = torch.zeros(size, dtype=torch.bool, device=x.device)
        self.last_change = x.new_zeros((size, self.B))  # rms of each point's last update (Newton's estimate)
        self.tiny = (1e3 * torch.finfo(x.dtype).eps) ** 2
        self.begin = torch.zeros((), dtype=torch.long, device=x.device)
        self.last = torch.full((), num, dtype=torch.long, device=x.device)
        self.evals = torch.zeros((), dtype=torch.long, device=x.device)
        self.bad_step = torch.full((), num, dtype=torch.long, device=x.device)  # first exact non-finite step
        self.residual = torch.full((), float("nan"), dtype=torch.float64, device=x.device)
        self.stats = ParallelStats(method, num, window, float(tolerance))
        self.switch, self.current = switch, denoiser  # the denoiser of the round being evaluated

    # ---------------------------------------------------------------- one evaluation of a window
    def evaluate(self, k: torch.Tensor, xs: torch.Tensor, real: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) at points ``k`` with states ``xs`` ``[n, B, ...]``: one batched model call, of which
        ``real`` points lie on the trajectory (the rest is padding past the last step)."""
        sm = self.sm
        u = model_input(sm, k, xs)
        t = sm.timesteps.to(k.device)[k].repeat_interleave(self.B)
        inputs = u.flatten(0, 1)
        out = self.current(inputs, t)
        if not isinstance(out, torch.Tensor) or out.shape != inputs.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"denoiser returned {got} for model input of shape {tuple(inputs.shape)}: it must "
                             "return one model output per input item, of the input's shape")
        out = out.reshape(xs.shape).to(xs.dtype)
        x0, eps = denoise(sm, k, xs, out)
        if self.method == "newton":
            self.secant(k, u, x0)
        self.stats.rounds += 1
        self.evals += real
        return x0, eps

    def secant(self, k: torch.Tensor, u: torch.Tensor, x0: torch.Tensor) -> None:
        """Per-step, per-sample secant gain ``<dx0, du> / <du, du>`` between this and the last evaluation
        at the same step, clamped to ``[0, 1 / alpha]``; calibrates ``c^2`` from the latest valid one."""
        sm = self.sm
        du, dx = u - self.u_last[k], x0 - self.x0s[k + self.H]
        num, den = (du * dx).flatten(2).sum(-1), du.pow(2).flatten(2).sum(-1)
        ok = self.seen[k][:, None] & (den > self.tiny * u.pow(2).flatten(2).sum(-1).clamp(min=1e-30))
        al, sg = sm.alpha[k][:, None], sm.sigma[k][:, None]
        g = (num / den.clamp(min=1e-30)).clamp(min=0)
        g = torch.minimum(g, 1 / al)
        # c^2 implied by the gain of the latest valid secant in the window, per sample
        c2 = g * sg**2 / (al * (1 - al * g)).clamp(min=1e-12)
        last = torch.where(ok, torch.arange(len(k), device=k.device)[:, None], -1).max(0).values
        pick = c2.gather(0, last.clamp(min=0)[None])[0]
        self.c2 = torch.where(last >= 0, pick.clamp(1e-4, 1e4), self.c2)
        model = gaussian_gain(al, sg, self.c2)
        self.gain[k] = torch.where(ok, g, torch.where(self.seen[k][:, None], self.gain[k], model))

    def jacobian(self, k: torch.Tensor) -> torch.Tensor:
        """Newton's ``J_k`` (``[n, B]``): secant or Gaussian-model gain through the step's coefficients."""
        return step_jacobian(self.sm, k, self.gain[k])

    # ---------------------------------------------------------------- one linearised update
    def update(self, b: torch.Tensor, k: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, exact: int = 1):
        """New states at ``k+1`` from the evaluation at ``k = b .. b+n-1``; returns the per-point error ratio
        ``[n]`` (max over the batch; ``-inf`` where non-finite). The first ``exact`` new points are exact
        steps from converged inputs: a non-finite one there is a real failure and is remembered."""
        sm, n, H = self.sm, len(k), self.H
        self.x0s[k + H], self.epss[k + H] = x0, eps
        hist = torch.arange(-H, n, device=k.device) + b + H
        xs = self.traj[k]
        self.u_last[k], self.seen[k] = model_input(sm, k, xs), True
        f = apply_step(sm, k, xs, self.x0s[hist], self.epss[hist], None if self.noise is None else self.noise[k])
        old = self.traj[k + 1]
        c = f - old
        finite = torch.isfinite(f).flatten(1).all(1)  # [n]
        c = torch.where(_b(finite, c), c, 0.0)  # a non-finite point must not poison the scan
        new = f.clone()
        if self.method in ("jacobi", "gs_jacobi"):  # J = 0: every step from the last iterate
            delta = c
        elif self.method == "picard":  # J = 1: ParaDiGMS' cumulative drift
            delta = linear_scan(None, c)
            new[1:] += delta[:-1]
        else:
            J = self.jacobian(k)
            delta = linear_scan(J, c)
            new[1:] += _b(J[1:], f) * delta[:-1]
        finite = finite & torch.isfinite(new).flatten(1).all(1)
        if exact:
            bad = (~finite[:exact]).int()
            self.bad_step = torch.where(bad.any(), torch.minimum(self.bad_step, b + bad.argmax()), self.bad_step)
        new = torch.where(_b(finite, new), new, old)
        err = change = _rms(delta)  # [n, B]
        if self.method == "newton":
            err = self.error_estimate(k, err) * self.sensitivity()[k + 1] / self.scale[self.K - 1]
            ratio = err.amax(1)
        else:
            ratio = (err / self.scale[k][:, None]).amax(1)
        ratio = torch.where(finite, ratio.nan_to_num(math.inf), -math.inf)  # -inf marks "non-finite"
        self.traj[k + 1] = new
        self.residual = change.pow(2).mean().sqrt().to(torch.float64)
        return ratio

    def sensitivity(self) -> torch.Tensor:
        """``[size, B]``: how much an error at point ``i`` moves the final sample, ``prod_{j >= i} J_j`` over
        the estimated step Jacobians (secant gains where measured, the Gaussian model elsewhere)."""
        sm, K = self.sm, self.K
        k = torch.arange(K, device=self.traj.device)
        gain = torch.where(self.seen[:K, None], self.gain[:K], gaussian_gain(sm.alpha[:K, None], sm.sigma[:K, None],
                                                                             self.c2))
        logj = step_jacobian(sm, k, gain).clamp(min=1e-30).log()
        tail = logj.flip(0).cumsum(0).flip(0)  # log prod_{j >= i} J_j for i = 0..K-1
        sens = torch.ones_like(self.gain)
        sens[:K] = tail.exp()
        return sens

    def error_estimate(self, k: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
        """A posteriori error of the new iterate at points ``k+1`` (Newton only): with the contraction
        ``rho = |d_r| / |d_{r-1}|`` between this and the last update of a point, the remaining error is at
        most ``rho / (1 - rho) |d_r|`` for a contraction; capped at ``|d_r|`` (ParaDiGMS' measure), and ``|d_r|``
        itself on a point's first update."""
        prev = self.last_change[k + 1]
        rho = change / prev.clamp(min=1e-30)
        factor = torch.where((prev > 0) & (rho < 0.5), rho / (1 - rho), torch.ones_like(rho))
        self.last_change[k + 1] = change
        return change * factor

    # ---------------------------------------------------------------- new points
    def extend(self, start: torch.Tensor, ref: torch.Tensor | None) -> None:
        """Initialise the ``W`` points after ``start`` from ``traj[start]``: copies, or the Gaussian-model
        extrapolation around the evaluation at point ``ref`` (``None``: the prior, mean ``m = 0``). An ``x0``
        estimate at a signal-to-noise ratio below 1e-2 is too noisy to anchor the model (an eps-model's
        ``x0 = (x - sigma eps) / alpha`` amplifies its error by ``sigma / alpha``): copies are used there."""
        W, sm = self.W, self.sm
        k = start + torch.arange(W, device=start.device)
        if self.init == "copy":
            self.traj[k + 1] = self.traj[start].expand(W, *self.traj.shape[1:])
            return
        al, sg, s = sm.alpha[k][:, None], sm.sigma[k][:, None], sm.input_scale[k][:, None]
        g = gaussian_gain(al, sg, self.c2)  # [W, B]
        m, reliable = torch.zeros_like(self.traj[0]), None
        if ref is not None:
            g_r = self.gain[ref] if self.method == "newton" else gaussian_gain(sm.alpha[ref], sm.sigma[ref], self.c2)
            u_r = self.u_last[ref]
            denom = (1 - g_r * sm.alpha[ref]).clamp(min=1e-3)
            m = (self.x0s[ref + self.H] - _b(g_r, u_r) * u_r) / _b(denom, u_r)
            reliable = sm.alpha[ref] >= 0.1 * sm.sigma[ref]
        # x0_j = m + g (u_j - alpha m), eps_j = (u_j - alpha x0_j) / sigma: the step is affine in x_j
        bsum, csum = sm.b[k].sum(1)[:, None], sm.c[k].sum(1)[:, None]
        J = sm.a[k][:, None] + s * (bsum * g + csum * (1 - al * g) / sg)
        off = (bsum - csum * al / sg) * (1 - al * g)  # coefficient of m
        d = _b(off, m[None]) * m[None]
        if self.noise is not None and sm.stochastic:
            d = d + _b(sm.noise_scale[k], d) * self.noise[k]
        d[0] = d[0] + _b(J[0], d[0]) * self.traj[start]
        xs = linear_scan(J.clamp(min=0), d)
        ok = torch.isfinite(xs) if reliable is None else torch.isfinite(xs) & reliable
        self.traj[k + 1] = torch.where(ok, xs, self.traj[start].expand_as(xs))

    # ---------------------------------------------------------------- loops
    def switch_phase(self, b_host: int, limit: int) -> None:
        """Model switching: rounds ``j = 0 .. switch_round-1`` evaluate the first window with
        ``switch.denoiser(j, base)`` and apply ``switch.update`` (every point of the window moves, none is
        accepted: their inputs are not the base model's). Secant data of those rounds is dropped, so the base
        phase that follows is the plain solve from an improved initial trajectory."""
        sw, n = self.switch, min(self.W, self.K - b_host)
        if sw is None or n <= 0:
            return
        b = self.begin
        k = b + torch.arange(n, device=b.device)
        method = self.method
        for j in range(sw.switch_round):
            if self.stats.rounds >= limit:
                break
            self.current = sw.denoiser(j, self.den)
            x0, eps = self.evaluate(k, self.traj[k], n)
            # the PCM is trained for the Picard update (eq. 1 of fastdiff.samplers.pcm); "method" keeps the solver's
            self.method = "picard" if getattr(sw, "update", "picard") == "picard" else method
            self.update(b, k, x0, eps, exact=0)
            self.method = method
            self.extend(b + n, b + n - 1)
        hook = getattr(sw, "base_phase", None)  # a switch may wrap the base rounds (fastdiff.samplers.pcm.residual)
        self.current = self.den if hook is None else hook(self.den)
        self.seen.zero_()
        self.last_change.zero_()
        self.stats.switch_round = self.stats.rounds + 1

    def warm_start(self, first_output: torch.Tensor | None) -> None:
        """Round-0 initial trajectory; with a known first output, step 0 is taken exactly for free."""
        zero = self.begin
        if first_output is None:
            self.extend(zero, None)
            return
        k = zero[None]
        x0, eps = denoise(self.sm, k, self.traj[0][None], first_output[None].to(self.traj.dtype))
        self.x0s[self.H], self.epss[self.H] = x0[0], eps[0]
        self.u_last[0], self.seen[0] = model_input(self.sm, k, self.traj[:1])[0], True
        self.gain[0] = gaussian_gain(self.sm.alpha[0], self.sm.sigma[0], self.c2)
        xi = None if self.noise is None else self.noise[:1]
        self.traj[1] = apply_step(self.sm, k, self.traj[:1], self.x0s[: self.H + 1], self.epss[: self.H + 1], xi)[0]
        self.bad_step = torch.where(torch.isfinite(self.traj[1]).all(), self.bad_step, zero)
        self.stats.rounds += 1
        self.evals += 1
        self.begin = zero + 1
        self.extend(self.begin, zero)

    def run_sliding(self, max_rounds: int | None, first_output: torch.Tensor | None) -> None:
        """Picard / Jacobi / Newton: the window slides to the first point not yet within tolerance."""
        K, W = self.K, self.W
        self.warm_start(first_output)
        extra = self.switch.switch_round if self.switch is not None else 0
        limit = max_rounds if max_rounds is not None else K + 1 + extra
        b_host, n = (1 if first_output is not None else 0), min(W, K)
        self.switch_phase(b_host, limit)
        while self.stats.rounds < limit:
            if b_host >= K:
                break
            b = self.begin
            k = b + torch.arange(n, device=b.device)
            x0, eps = self.evaluate(k, self.traj[k], (K - b).clamp(min=0, max=n))
            ratio = self.update(b, k, x0, eps)
            fail = (ratio > self.tol) | (ratio == -math.inf)
            first = torch.where(fail.any(), fail.int().argmax(), n)
            # the first failing point becomes the next start (it was computed from accepted points), unless
            # it is non-finite: then its step is redone as the next window's exact first step
            bad = ratio[first.clamp(max=n - 1)] == -math.inf
            step = torch.where(first < n, first + 1 - bad.long(), n)
            end = b + n
            self.begin = torch.minimum(b + step, self.last)
            self.extend(end, end - 1)
            if self.stats.rounds % self.sync_every == 0:
                b_host = self.sync()
                n = min(W, K - b_host)
        self.stats.converged = self.sync() >= K

    def run_blocks(self, max_rounds: int | None, block_iters: float | None, first_output) -> None:
        """GS-Jacobi: blocks of ``W`` steps in order (Gauss-Seidel), Jacobi sweeps inside a block until its
        points are within tolerance or its budget is spent. The budget is the block length (enough for an
        exact block: after ``r`` sweeps its first ``r`` points are exact) or, with ``block_iters``, that cap
        scaled by the block's convergence ranking metric (:func:`block_ranking`); the first sweep picks the
        initial guess (:meth:`igm_sweep`)."""
        K, W = self.K, self.W
        crm = block_ranking(self.sm, W)[: math.ceil(K / W)]
        self.warm_start(first_output)
        extra = self.switch.switch_round if self.switch is not None else 0
        limit = max_rounds if max_rounds is not None else 2 * K + 1 + extra
        start = 1 if first_output is not None else 0
        self.switch_phase(start, limit)
        converged = True
        for blk, s in enumerate(range(0, K, W)):
            lo, hi = max(s, start), min(s + W, K)
            if lo >= hi:
                continue
            size = hi - lo
            budget = size
            if block_iters is not None and self.tol > 0:
                budget = max(1, min(size, math.ceil(block_iters * float(crm[blk]))))
            b = torch.tensor(lo, device=self.traj.device)
            k = b + torch.arange(size, device=b.device)
            done = False
            for sweep in range(budget):
                if self.stats.rounds >= limit:
                    break
                if sweep == 0:
                    ratio = self.igm_sweep(b, k)
                else:
                    ratio = self.update(b, k, *self.evaluate(k, self.traj[k], size), exact=sweep + 1)
                if (sweep + 1) % self.sync_every == 0 or sweep + 1 == budget:
                    self.stats.host_syncs += 1
                    self.check_finite()
                    if bool(((ratio <= self.tol) & (ratio > -math.inf)).all()) or sweep + 1 == size:
                        done = True
                        break
            converged = converged and done
            nonfinite = (ratio == -math.inf).int()  # accepting a block with a non-finite point is a failure
            self.bad_step = torch.where(nonfinite.any(), torch.minimum(self.bad_step, b + nonfinite.argmax()),
                                        self.bad_step)
            self.begin = torch.tensor(hi, device=b.device)
            self.extend(self.begin, self.begin - 1)
            if self.progress is not None:
                self.progress(hi)
            if self.stats.rounds >= limit and hi < K:
                converged = False
                break
        self.check_finite()
        self.stats.converged = converged

    def igm_sweep(self, b: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """A block's first Jacobi sweep, run on two initial guesses in one batched call: the Gaussian-model
        extrapolation and ParaDiGMS' copy of the block's start. The initial-guessing metric is the rms of the
        first Jacobi step ``F(X0) - X0`` (how far the guess is from its own image); the guess with the
        smaller metric is kept, per sample."""
        n, H, sm = len(k), self.H, self.sm
        guesses = (self.traj[k + 1].clone(), self.traj[b].expand(n, *self.traj.shape[1:]))
        inputs = [torch.cat([self.traj[b][None], g[:-1]]) for g in guesses]
        x0, eps = self.evaluate(torch.cat([k, k]), torch.cat(inputs), 2 * n)
        x0s, epss = x0.split(n), eps.split(n)
        noise = None if self.noise is None else self.noise[k]
        score = [
            _rms(apply_step(sm, k, xs, torch.cat([self.x0s[b:b + H], a]), torch.cat([self.epss[b:b + H], e]), noise)
                 - g).mean(0)
            for xs, g, a, e in zip(inputs, guesses, x0s, epss)
        ]
        copy = _b(score[1] < score[0], guesses[0][0])[None]  # [1, B, 1...]
        pick = lambda pair: torch.where(copy, pair[1], pair[0])  # noqa: E731
        self.traj[k] = pick(inputs)
        self.traj[k + 1] = pick(guesses)
        return self.update(b, k, pick(x0s), pick(epss))

    # ---------------------------------------------------------------- host side
    def sync(self) -> int:
        """The one device -> host read: progress and the first non-finite exact step."""
        self.stats.host_syncs += 1
        begin, bad = torch.stack([self.begin, self.bad_step]).tolist()
        if bad < self.K:
            self.raise_nonfinite(bad)
        if self.progress is not None:
            self.progress(min(begin, self.K))
        return begin

    def check_finite(self) -> None:
        bad = int(self.bad_step)
        if bad < self.K:
            self.raise_nonfinite(bad)

    def raise_nonfinite(self, step: int) -> None:
        self.finish_stats()
        raise NonFiniteLatentError(step, float(self.sm.timesteps[step]), self.stats)

    def finish_stats(self) -> None:
        self.stats.model_evals = int(self.evals)
        self.stats.residual = float(self.residual)

    def result(self) -> tuple[torch.Tensor, ParallelStats]:
        self.finish_stats()
        return self.traj[self.K].clone(), self.stats


__all__ = [
    "DEFAULT_TOLERANCE", "INITS", "METHODS", "ParallelStats", "block_ranking", "check_options", "gaussian_gain", "linear_scan", "sample_parallel",
    "split_denoiser", "step_jacobian", "tolerance_scale",
]
