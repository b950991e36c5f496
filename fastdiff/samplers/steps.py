"""Diffusers schedulers as stateless, batched step maps over their own timestep grid.

A diffusers scheduler is a stateful object: ``step`` reads and advances a step counter, a multistep
solver keeps a history of model outputs, a stochastic one draws noise from the generator inside the
call. A parallel-in-time sampler needs the same update as a *pure function of the step index*, evaluated
for a whole window of steps at once. :func:`step_map_for` reads a configured scheduler (after
``set_timesteps``) and returns a :class:`StepMap`: per-step coefficients of one linear update

    x_{k+1} = a_k x_k + sum_{j=0..H} ( b_{k,j} x0_{k-j} + c_{k,j} eps_{k-j} ) + s_k xi_k,     k = 0..K-1

where ``(x0_k, eps_k) = x0_and_eps(model(u_k, t_k), u_k, alpha_k, sigma_k)`` with ``u_k = input_scale_k x_k``
(``scale_model_input``) and ``xi_k`` the step's Gaussian noise. Every scheduler below is this update with
its own coefficients (``H > 0`` for multistep solvers): DDIM (Song et al. 2021), DDPM (Ho et al. 2020),
Euler and Euler-ancestral (Karras et al. 2022), DPM-Solver++ 1/2/3M and its SDE variant (Lu et al. 2022),
flow-match Euler (Esser et al. 2024). The only nonlinearity is the optional clipping of ``x0``.

Noise. Stochastic schedulers draw ``randn_tensor(latents.shape, generator, device, dtype)`` once per step
(DDPM only while ``t > 0``), in step order, after the pipeline drew its initial latents. Nothing else
consumes the generator in between, so :func:`draw_noise` makes exactly those calls, in that order, up
front: the pre-drawn ``xi`` equal the ones ``pipe(..., generator=g)`` / ``scheduler.step(generator=g)``
would draw, for a single generator or a list of them, and parallel sampling with the same generator
reproduces sequential sampling (tested against ``scheduler.step`` for every map here).

New schedulers are added with :func:`register_step_map`; all schedule math comes from
:mod:`fastdiff.schedule`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from ..schedule import NoiseSchedule, x0_and_eps

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``denoiser(model_input [N, ...], t [N]) -> model_output [N, ...]``: one batched model call."""


@dataclass(frozen=True)
class StepMap:
    """A sampler's update over a fixed grid of ``K`` steps (see the module docstring for the formula).

    Per-step tensors have leading dimension ``K`` (``[K, H+1]`` for ``b``/``c``), are float64 on the CPU
    and are moved/cast by :meth:`to`. ``state_alpha``/``state_sigma`` (``[K+1]``) are the noise levels of the
    sampler's own variable ``x_k = state_alpha_k x0 + state_sigma_k eps`` (VE samplers: ``alpha = 1``).
    """

    name: str
    timesteps: torch.Tensor  # [K] what the pipeline passes to the model
    input_scale: torch.Tensor  # [K] model input = input_scale * x
    alpha: torch.Tensor  # [K] noise level of the model input, for x0_and_eps
    sigma: torch.Tensor  # [K]
    a: torch.Tensor  # [K]
    b: torch.Tensor  # [K, H+1] coefficients of x0_k, x0_{k-1}, ...
    c: torch.Tensor  # [K, H+1] coefficients of eps_k, eps_{k-1}, ...
    noise_scale: torch.Tensor  # [K] s_k
    noise_drawn: torch.Tensor  # [K] bool: the scheduler draws noise at step k (even if s_k = 0)
    state_alpha: torch.Tensor  # [K+1]
    state_sigma: torch.Tensor  # [K+1]
    prediction_type: str
    init_noise_sigma: float = 1.0
    clip_sample: float | None = None
    clip_eps: bool = False  # recompute eps from the clipped x0 (use_clipped_model_output)
    noise_dtype: torch.dtype | None = None  # dtype diffusers draws noise in; None: the latents' dtype
    # derived once at construction so the update never reads device values (no host sync per round)
    terms: tuple[tuple[int, bool, bool], ...] = field(init=False, repr=False, compare=False)
    stochastic: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        used = lambda m: (m != 0).any(dim=0).tolist()  # noqa: E731
        object.__setattr__(self, "terms", tuple(
            (j, ub, uc) for j, (ub, uc) in enumerate(zip(used(self.b), used(self.c))) if ub or uc))
        object.__setattr__(self, "stochastic", bool(self.noise_drawn.any()))

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def history(self) -> int:
        """``H``: how many earlier model outputs a step reads (0 for one-step samplers)."""
        return int(self.b.shape[1]) - 1

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> StepMap:
        """Coefficients on ``device`` in ``dtype`` (timesteps keep their dtype, masks stay bool)."""
        changes = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, torch.Tensor):
                continue
            keep = f.name in ("timesteps", "noise_drawn") or dtype is None
            changes[f.name] = v.to(device=device, dtype=None if keep else dtype)
        return replace(self, **changes)

    def ancestral_variance(self) -> torch.Tensor:
        """``[K]``: variance of the DDPM posterior from level ``k`` to ``k+1`` in the state's scale,
        ``sigma_{k+1}^2 (1 - (nb_{k+1} / nb_k)^2)`` with ``nb = sigma / alpha``: ParaDiGMS's noise variance
        (Shih et al. 2023), used to scale tolerances. Zero at a final step onto clean data."""
        nb = self.state_sigma / self.state_alpha
        ratio = torch.where(nb[:-1] > 0, nb[1:] / nb[:-1], torch.zeros_like(nb[1:]))
        return (self.state_sigma[1:] ** 2 * (1 - ratio**2)).clamp(min=0)


# ------------------------------------------------------------------------------------------- the update
def denoise(sm: StepMap, k: torch.Tensor, x: torch.Tensor, model_output: torch.Tensor):
    """``(x0, eps)`` at steps ``k`` (``[W]``) from the model output on ``u = input_scale_k x`` (``[W, ...]``)."""
    u = _bcast(sm.input_scale[k], x) * x
    x0, eps = x0_and_eps(model_output, u, sm.alpha[k], sm.sigma[k], sm.prediction_type)
    if sm.clip_sample is not None:
        x0 = x0.clamp(-sm.clip_sample, sm.clip_sample)
        if sm.clip_eps:
            eps = (u - _bcast(sm.alpha[k], x) * x0) / _bcast(sm.sigma[k], x)
    return x0, eps


def model_input(sm: StepMap, k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``scale_model_input`` for a window: ``input_scale_k x_k``."""
    return _bcast(sm.input_scale[k], x) * x


def apply_step(
    sm: StepMap, k: torch.Tensor, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x_{k+1}`` for a window of consecutive steps ``k = k_0 .. k_0+W-1``.

    ``x`` is ``[W, ...]``; ``x0``/``eps`` are ``[W+H, ...]``: the estimates at steps ``k_0-H .. k_0+W-1``
    (slots before step 0 are ignored; their coefficients are zero). ``noise`` is ``[W, ...]`` or None.
    """
    width, hist = x.shape[0], sm.history
    out = _bcast(sm.a[k], x) * x
    for j, use_b, use_c in sm.terms:
        lo = hist - j
        if use_b:
            out = out + _bcast(sm.b[k, j], x) * x0[lo:lo + width]
        if use_c:
            out = out + _bcast(sm.c[k, j], x) * eps[lo:lo + width]
    if noise is not None and sm.stochastic:
        out = out + _bcast(sm.noise_scale[k], x) * noise
    return out


def draw_noise(
    sm: StepMap, shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
) -> torch.Tensor | None:
    """``[K, *shape]`` noise for a stochastic map (``None`` for a deterministic one), drawn exactly as the
    scheduler's ``step`` would draw it, step by step, from ``generator`` (zeros where no draw happens).

    ``dtype`` is the model output's dtype; schedulers that draw in float32 regardless (DPM-Solver SDE,
    flow match) say so in ``sm.noise_dtype``.
    """
    from diffusers.utils.torch_utils import randn_tensor

    if not sm.stochastic:
        return None
    draw_dtype = sm.noise_dtype or dtype
    noise = torch.zeros((sm.num_steps, *shape), device=device, dtype=dtype)
    for k in range(sm.num_steps):
        if sm.noise_drawn[k]:
            noise[k] = randn_tensor(tuple(shape), generator=generator, device=torch.device(device), dtype=draw_dtype)
    return noise


@torch.no_grad()
def sample_sequential(
    sm: StepMap, denoiser: Denoiser, x: torch.Tensor, noise: torch.Tensor | None = None,
    return_trajectory: bool = False,
) -> torch.Tensor:
    """The reference path: fold the step map one step at a time (``K`` model calls).

    ``x`` is the initial latent (already times ``init_noise_sigma``), ``[B, ...]``. Returns ``x_K`` or, with
    ``return_trajectory``, ``[K+1, B, ...]``. Raises :class:`NonFiniteLatentError` at the first non-finite step.
    """
    sm = sm.to(x.device, x.dtype)
    hist = sm.history
    x0s = [torch.zeros_like(x)] * hist
    epss = [torch.zeros_like(x)] * hist
    traj = [x]
    for k in range(sm.num_steps):
        kk = torch.tensor([k], device=x.device)
        out = denoiser(model_input(sm, kk, x[None])[0], sm.timesteps[k].expand(x.shape[0]))
        x0, eps = denoise(sm, kk, x[None], out[None])
        x0s, epss = (x0s + [x0[0]])[-(hist + 1):], (epss + [eps[0]])[-(hist + 1):]
        xi = None if noise is None else noise[k][None]
        x = apply_step(sm, kk, x[None], torch.stack(x0s), torch.stack(epss), xi)[0]
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteLatentError(k, float(sm.timesteps[k]))
        traj.append(x)
    return torch.stack(traj) if return_trajectory else x


class NonFiniteLatentError(FloatingPointError):
    """A latent became NaN/inf; ``step`` is the 0-based index of the step that produced it."""

    def __init__(self, step: int, timestep: float, stats: Any = None) -> None:
        self.step, self.timestep, self.stats = step, timestep, stats
        super().__init__(f"non-finite latent produced by step {step} (timestep {timestep:g}); sampling stopped")


# ------------------------------------------------------------------------------------------- registry
StepMapBuilder = Callable[..., StepMap]
_BUILDERS: dict[type, StepMapBuilder] = {}


def register_step_map(*scheduler_classes: type) -> Callable[[StepMapBuilder], StepMapBuilder]:
    """Decorator: ``builder(scheduler, **options) -> StepMap`` for these scheduler classes (and subclasses)."""

    def deco(builder: StepMapBuilder) -> StepMapBuilder:
        for cls in scheduler_classes:
            _BUILDERS[cls] = builder
        return builder

    return deco


def supported_schedulers() -> list[str]:
    """Names of the scheduler classes that have a step map."""
    _load_optional_builders()
    return sorted(cls.__name__ for cls in _BUILDERS)


def step_map_for(scheduler: Any, **options: Any) -> StepMap:
    """The :class:`StepMap` of a configured diffusers scheduler (``set_timesteps`` already called).

    ``options`` are the per-call ``step`` arguments a pipeline would pass (``eta`` for DDIM). Raises
    ``ValueError`` naming the supported schedulers for any other class, or for configurations whose
    update is not a fixed linear map (e.g. dynamic thresholding).
    """
    _load_optional_builders()
    builder = next((_BUILDERS[c] for c in type(scheduler).__mro__ if c in _BUILDERS), None)
    if builder is None:
        raise ValueError(
            f"parallel sampling does not support scheduler {type(scheduler).__name__}; supported schedulers: "
            f"{', '.join(supported_schedulers())}"
        )
    if getattr(scheduler, "num_inference_steps", None) is None and not getattr(scheduler, "custom_timesteps", False):
        raise ValueError("call scheduler.set_timesteps(...) before building its step map")
    if getattr(scheduler.config, "thresholding", False):
        raise ValueError("dynamic thresholding (config.thresholding=True) is not supported by parallel sampling")
    return builder(scheduler, **options)


def _load_optional_builders() -> None:
    """fastdiff's own schedulers, registered when their modules exist (one entry each)."""
    try:
        from .accelerated_ddim import AcceleratedDDIMScheduler
    except ModuleNotFoundError as err:
        if err.name != "fastdiff.samplers.accelerated_ddim":
            raise
    else:
        _BUILDERS.setdefault(AcceleratedDDIMScheduler, _accelerated_ddim)


# ------------------------------------------------------------------------------------------- helpers
def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.dtype).reshape(v.shape + (1,) * (like.ndim - v.ndim))


def _f64(v: Any) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float64).detach().cpu().clone()


def _vp_from_sigma_bar(nb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha, sigma)`` of the VP process with ``sigma / alpha = nb`` (the Karras/VE noise level)."""
    alpha = (1 + nb**2).rsqrt()
    return alpha, nb * alpha


def _make(
    name: str, scheduler: Any, *, timesteps: torch.Tensor, input_scale: torch.Tensor, alpha: torch.Tensor,
    sigma: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None,
    noise_scale: torch.Tensor | None = None, noise_drawn: torch.Tensor | None = None, state_alpha: torch.Tensor,
    state_sigma: torch.Tensor, prediction_type: str | None = None, clip: bool = False, **extra: Any,
) -> StepMap:
    num = timesteps.shape[0]
    b = b.reshape(num, -1)
    c = torch.zeros_like(b) if c is None else c.reshape(num, -1)
    width = max(b.shape[1], c.shape[1])
    pad = lambda m: torch.cat([m, torch.zeros(num, width - m.shape[1], dtype=m.dtype)], 1)  # noqa: E731
    cfg = scheduler.config
    ptype = prediction_type or cfg.get("prediction_type", "epsilon")
    if ptype == "flow_prediction":
        ptype = "flow"
    return StepMap(
        name=name, timesteps=timesteps.detach().cpu().clone(), input_scale=input_scale, alpha=alpha, sigma=sigma,
        a=a, b=pad(b), c=pad(c), noise_scale=torch.zeros(num, dtype=torch.float64) if noise_scale is None else noise_scale,
        noise_drawn=torch.zeros(num, dtype=torch.bool) if noise_drawn is None else noise_drawn,
        state_alpha=state_alpha, state_sigma=state_sigma, prediction_type=ptype,
        init_noise_sigma=float(getattr(scheduler, "init_noise_sigma", 1.0)),
        clip_sample=float(cfg.get("clip_sample_range", 1.0)) if clip and cfg.get("clip_sample", False) else None,
        **extra,
    )


# ------------------------------------------------------------------------------------------- builders
def _register_diffusers_builders() -> None:
    import diffusers as d

    register_step_map(d.DDIMScheduler, d.DDIMParallelScheduler)(_ddim)
    register_step_map(d.DDPMScheduler, d.DDPMParallelScheduler)(_ddpm)
    register_step_map(d.EulerDiscreteScheduler)(_euler)
    register_step_map(d.EulerAncestralDiscreteScheduler)(_euler_ancestral)
    register_step_map(d.DPMSolverMultistepScheduler)(_dpm_multistep)
    register_step_map(d.FlowMatchEulerDiscreteScheduler)(_flow_match_euler)


def _ddim(scheduler: Any, eta: float = 0.0, use_clipped_model_output: bool = False, **_: Any) -> StepMap:
    """DDIM (Song et al. 2021, eq. 12). As ``DDIMScheduler.step``: the previous timestep is
    ``t - num_train_timesteps // num_inference_steps`` and the last step lands on ``final_alpha_cumprod``."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    cfg, sched = scheduler.config, NoiseSchedule.from_config(scheduler)
    t = scheduler.timesteps.long().cpu()
    prev = t - cfg.num_train_timesteps // scheduler.num_inference_steps
    final = torch.tensor(1.0, dtype=torch.float64) if cfg.set_alpha_to_one else sched.alpha_cumprod(0)
    ab = sched.alpha_cumprod(t)
    ab_prev = torch.where(prev >= 0, sched.alpha_cumprod(prev.clamp(min=0)), final)
    var = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
    std = eta * var.sqrt()
    state_alpha = torch.cat([ab.sqrt(), ab_prev[-1:].sqrt()])
    return _make(
        "ddim", scheduler, timesteps=t, input_scale=torch.ones(len(t), dtype=torch.float64), alpha=sched.alpha(t),
        sigma=sched.sigma(t), a=torch.zeros(len(t), dtype=torch.float64), b=ab_prev.sqrt(),
        c=(1 - ab_prev - std**2).clamp(min=0).sqrt(), noise_scale=std,
        noise_drawn=torch.full((len(t),), eta > 0), state_alpha=state_alpha,
        state_sigma=(1 - state_alpha**2).clamp(min=0).sqrt(), clip=True, clip_eps=bool(use_clipped_model_output),
    )


def _ddpm(scheduler: Any, **_: Any) -> StepMap:
    """DDPM ancestral sampling (Ho et al. 2020, eq. 6-7) over the scheduler's grid (custom timesteps too);
    the previous timestep is the next grid entry, as ``DDPMScheduler.previous_timestep``."""
    cfg, sched = scheduler.config, NoiseSchedule.from_config(scheduler)
    vtype = cfg.variance_type
    if vtype not in ("fixed_small", "fixed_small_log", "fixed_large"):
        raise ValueError(
            f"DDPM variance_type {vtype!r} is not supported by parallel sampling; use 'fixed_small', "
            "'fixed_small_log' or 'fixed_large'"
        )
    t = scheduler.timesteps.long().cpu()
    prev = torch.cat([t[1:], torch.tensor([-1])])
    ab = sched.alpha_cumprod(t)
    ab_prev = torch.where(prev >= 0, sched.alpha_cumprod(prev.clamp(min=0)), torch.ones_like(ab))
    alpha_t = ab / ab_prev
    beta_t = 1 - alpha_t
    var = ((1 - ab_prev) / (1 - ab) * beta_t).clamp(min=1e-20)
    std = beta_t.sqrt() if vtype == "fixed_large" else var.sqrt()
    drawn = t > 0
    state_alpha = torch.cat([ab.sqrt(), ab_prev[-1:].sqrt()])
    return _make(
        "ddpm", scheduler, timesteps=t, input_scale=torch.ones(len(t), dtype=torch.float64), alpha=sched.alpha(t),
        sigma=sched.sigma(t), a=alpha_t.sqrt() * (1 - ab_prev) / (1 - ab), b=ab_prev.sqrt() * beta_t / (1 - ab),
        noise_scale=torch.where(drawn, std, torch.zeros_like(std)), noise_drawn=drawn, state_alpha=state_alpha,
        state_sigma=(1 - state_alpha**2).clamp(min=0).sqrt(), clip=True,
    )


def _karras_grid(scheduler: Any) -> dict[str, torch.Tensor]:
    """The VE grid of Euler-type schedulers: the sample is ``x_vp / alpha`` and the model sees ``x_vp``."""
    nb = _f64(scheduler.sigmas)
    alpha, sigma = _vp_from_sigma_bar(nb[:-1])
    return dict(
        timesteps=scheduler.timesteps.cpu(), input_scale=alpha, alpha=alpha, sigma=sigma,
        state_alpha=torch.ones_like(nb), state_sigma=nb,
    )


def _euler(scheduler: Any, **_: Any) -> StepMap:
    """Euler on the probability-flow ODE in ``sigma``-space (Karras et al. 2022, Alg. 1 without churn)."""
    g = _karras_grid(scheduler)
    nb = g["state_sigma"]
    ratio = nb[1:] / nb[:-1]
    return _make("euler", scheduler, **g, a=ratio, b=1 - ratio)


def _euler_ancestral(scheduler: Any, **_: Any) -> StepMap:
    """Euler ancestral (Karras et al. 2022; k-diffusion ``sample_euler_ancestral``): Euler to ``sigma_down``,
    then noise ``sigma_up``. The scheduler draws noise at every step."""
    g = _karras_grid(scheduler)
    nb = g["state_sigma"]
    s_from, s_to = nb[:-1], nb[1:]
    up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2).clamp(min=0).sqrt()
    down = (s_to**2 - up**2).clamp(min=0).sqrt()
    ratio = down / s_from
    return _make("euler_ancestral", scheduler, **g, a=ratio, b=1 - ratio, noise_scale=up,
                 noise_drawn=torch.ones(len(ratio), dtype=torch.bool))


def _dpm_multistep(scheduler: Any, **_: Any) -> StepMap:
    """DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095) multistep of order 1-3, ODE or SDE variant, as
    ``DPMSolverMultistepScheduler``: lower orders at the start and, where configured, at the end."""
    cfg = scheduler.config
    algo, order, kind = cfg.algorithm_type, int(cfg.solver_order), cfg.solver_type
    if algo not in ("dpmsolver++", "sde-dpmsolver++"):
        raise ValueError(f"DPMSolverMultistepScheduler algorithm_type {algo!r} is not supported by parallel "
                         "sampling; use 'dpmsolver++' or 'sde-dpmsolver++'")
    if order not in (1, 2, 3) or (order == 3 and algo == "sde-dpmsolver++" and kind != "midpoint"):
        raise ValueError(f"unsupported DPM-Solver order/solver_type: {order}/{kind}")
    s = _f64(scheduler.sigmas)
    al, sg = (1 - s, s) if cfg.use_flow_sigmas else _vp_from_sigma_bar(s)
    input_scale = torch.ones(len(s) - 1, dtype=torch.float64)  # the state is the model input (VP or flow)
    lam = al.log() - sg.log()  # half log-SNR, +inf at a final sigma of 0
    num = len(s) - 1
    a = torch.zeros(num, dtype=torch.float64)
    b = torch.zeros(num, 3, dtype=torch.float64)
    noise = torch.zeros(num, dtype=torch.float64)
    sde = algo == "sde-dpmsolver++"
    for i in range(num):
        final = i == num - 1 and (cfg.euler_at_final or (cfg.lower_order_final and num < 15)
                                  or cfg.final_sigmas_type == "zero")
        second = i == num - 2 and cfg.lower_order_final and num < 15
        use = 1 if (order == 1 or i < 1 or final) else 2 if (order == 2 or i < 2 or second) else 3
        h = lam[i + 1] - lam[i]
        e = torch.exp(-h)
        if sde:
            a[i] = sg[i + 1] / sg[i] * e
            phi1, phi2 = al[i + 1] * (1 - e**2), al[i + 1] * ((1 - e**2) / (-2 * h) + 1)
            phi3 = al[i + 1] * ((1 - e**2 - 2 * h) / (2 * h) ** 2 - 0.5)
            noise[i] = sg[i + 1] * (1 - e**2).clamp(min=0).sqrt()
            mid2 = 0.5 * phi1
        else:
            a[i] = sg[i + 1] / sg[i]
            phi1 = -al[i + 1] * (e - 1)
            phi2 = al[i + 1] * ((e - 1) / h + 1)
            phi3 = -al[i + 1] * ((e - 1 + h) / h**2 - 0.5)
            mid2 = 0.5 * phi1
        coef = torch.zeros(3, dtype=torch.float64)
        coef[0] = phi1
        if use == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            d1 = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64) / r0
            coef += (mid2 if kind == "midpoint" else phi2) * d1
        elif use == 3:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            d10 = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64) / r0
            d11 = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64) / r1
            coef += phi2 * (d10 + r0 / (r0 + r1) * (d10 - d11)) + phi3 * (d10 - d11) / (r0 + r1)
        b[i] = coef
    b = b[:, :order]
    return _make(
        f"{algo}_{order}m", scheduler, timesteps=scheduler.timesteps.cpu(), input_scale=input_scale, alpha=al[:-1],
        sigma=sg[:-1], a=a, b=b, noise_scale=noise, noise_drawn=torch.full((num,), sde), state_alpha=al,
        state_sigma=sg, prediction_type="flow" if cfg.prediction_type == "flow_prediction" else cfg.prediction_type,
        noise_dtype=torch.float32,
    )


def _flow_match_euler(scheduler: Any, **_: Any) -> StepMap:
    """Flow-matching Euler (Liu et al. 2022; Esser et al. 2024): ``x' = x + (s' - s) v``, written as
    ``x' = (s'/s) x + (1 - s'/s) x0``; with ``stochastic_sampling``, ``x' = (1 - s') x0 + s' xi``."""
    cfg = scheduler.config
    s = _f64(scheduler.sigmas)
    num = len(s) - 1
    sched = NoiseSchedule("flow", num_train_timesteps=cfg.num_train_timesteps)
    t = s * cfg.num_train_timesteps
    alpha, sigma = sched.alpha(t), sched.sigma(t)
    common = dict(timesteps=scheduler.timesteps.cpu(), input_scale=torch.ones(num, dtype=torch.float64),
                  alpha=alpha[:-1], sigma=sigma[:-1], state_alpha=alpha, state_sigma=sigma, prediction_type="flow",
                  noise_dtype=torch.float32)
    if cfg.stochastic_sampling:
        return _make("flow_match_euler_sde", scheduler, **common, a=torch.zeros(num, dtype=torch.float64),
                     b=1 - s[1:], noise_scale=s[1:], noise_drawn=torch.ones(num, dtype=torch.bool))
    ratio = s[1:] / s[:-1]
    return _make("flow_match_euler", scheduler, **common, a=ratio, b=1 - ratio)


def _accelerated_ddim(scheduler: Any, **_: Any) -> StepMap:
    """fastdiff's accelerated DDIM / DDPM (Li et al. 2024, arXiv 2403.03852), from the coefficients its
    scheduler computes with the pure ``accelerated_step_coefficients`` in ``set_timesteps``:
    ``x' = alpha' x0 + sigma' eps + C (d - d_prev)`` (``d`` = eps or x0), or, stochastic,
    ``x' = alpha' x0 + e eps + s xi`` with noise drawn at every step."""
    cfg, coef = scheduler.config, scheduler.coefficients
    sched = scheduler.noise_schedule  # the scheduler's own (sanitised) schedule
    t = scheduler.timesteps.cpu()  # integer or fractional, as the scheduler steps them
    num = len(t)
    zero = torch.zeros(num, dtype=torch.float64)
    state_alpha = torch.cat([sched.alpha(t), coef.alpha_next[-1:]])
    state_sigma = torch.cat([sched.sigma(t), coef.sigma_next[-1:]])
    common = dict(timesteps=t, input_scale=torch.ones(num, dtype=torch.float64), alpha=sched.alpha(t),
                  sigma=sched.sigma(t), a=zero, state_alpha=state_alpha, state_sigma=state_sigma, clip=True,
                  clip_eps=True)
    if cfg.stochastic:
        return _make("accelerated_ddpm", scheduler, **common, b=coef.alpha_next, c=coef.eps_scale,
                     noise_scale=coef.noise_std, noise_drawn=torch.ones(num, dtype=torch.bool))
    b, c = coef.linear_form()  # the multistep update, its corrector (if any) included
    return _make("accelerated_ddim", scheduler, **common, b=b, c=c)


_register_diffusers_builders()

__all__ = [
    "Denoiser", "NonFiniteLatentError", "StepMap", "apply_step", "denoise", "draw_noise", "model_input",
    "register_step_map", "sample_sequential", "step_map_for", "supported_schedulers",
]
