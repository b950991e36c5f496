"""Accelerated DDIM and DDPM (Li, Huang, Efimov, Wei, Chi, Chen, "Accelerating Convergence of Score-Based
Diffusion Models, Provably", ICML 2024, arXiv:2403.03852) as a drop-in diffusers scheduler.

Everything is written in log-SNR form, so the update is exact on any (non-uniform, custom) timestep grid and
any noise schedule. With ``lambda = log(alpha^2 / sigma^2)`` at each grid point, the quantities below are all
functions of ``lambda`` alone: ``rho = sigma / alpha = exp(-lambda / 2)``, ``v = 1 / rho``,
``alpha^2 = sigmoid(lambda)``, ``sigma = sigmoid(-lambda) ** 0.5``.

**Deterministic sampler (the probability-flow ODE, O(1/T^2)).** The ODE is exact in either of two forms
(Song et al. 2021; Lu et al. 2022)::

    noise space:  d(x / alpha) = eps(x, rho) d rho
    data space:   d(x / sigma) = x0(x, v) dv

Integrating from grid point ``t`` to the next one ``s`` with the prediction ``d`` (``eps`` or ``x0``) frozen at
its value at ``t`` is DDIM: ``x_s = alpha_s x0_t + sigma_s eps_t``. The accelerated sampler of Li et al.
instead extrapolates ``d`` linearly through the current and the previous grid point ``p`` in an interpolation
variable ``r(lambda)``::

    d(r) ~= d_t + (r - r_t) (d_t - d_p) / (r_t - r_p)

and integrates that exactly, which adds one correction term and no model evaluation::

    x_s = alpha_s x0_t + sigma_s eps_t + C (d_t - d_p)
    noise space:  C = alpha_s [F(rho_s) - F(rho_t) - r_t (rho_s - rho_t)] / (r_t - r_p),   F = int r d rho
    data space:   C = [sigma_s G(v_s) - sigma_s G(v_t) - r_t (alpha_s - sigma_s v_t)] / (r_t - r_p),   G = int r dv

with closed-form antiderivatives (``sigma_s G(v_s)`` is taken as its limit when ``sigma_s = 0``):

=================  ========================  ==========================
``r``              ``F(rho)`` (noise space)  ``G(v)`` (data space)
=================  ========================  ==========================
``alpha^2``        ``arctan(rho)``           ``v - arctan(v)``
``sigma``          ``sqrt(1 + rho^2)``       ``asinh(v)``
``lambda``         ``2 rho (1 - log rho)``   ``2 v (log v - 1)``
=================  ========================  ==========================

``solver_space="noise", interpolation="alphas_cumprod"`` is the paper's update exactly (its arcsin form is this
one with ``arcsin(sqrt(alpha^2)) = pi/2 - arctan(rho)``; on the paper's grid ``p`` is the previous grid point).
``interpolation="log_snr"`` gives the DPM-Solver(++)-2M family with exact coefficients. The default,
``solver_space="noise", interpolation="sigma"``, keeps the paper's noise-space form but extrapolates eps linearly
in ``sigma``: for unit-variance Gaussian data the ODE's eps is *exactly* linear in sigma (``eps = sigma z`` along
a trajectory), so the step is exact there for any step size, and on the Gaussian-mixture oracle it had the
lowest few-step error of the variants (``benchmarks/few_step.py``). The first step has no previous prediction and
is a DDIM step; every variant is second order on grids that refine everywhere (``tests``).

**Step-ratio limit.** At high noise ``sigma`` and ``alpha^2`` saturate (``sigma -> 1``), so on diffusers' grids the
step ahead can be 5-20 times the step behind when measured in them (linear betas, 5 steps: 17x on the second
step). An exact score tolerates that extrapolation, but a trained network's (and classifier-free guidance's) error
in ``d_t - d_p`` is amplified by the same factor and wrecked 5-step samples of the embedded digits model. As
variable-step multistep methods bound the step ratio for stability, the update extrapolates in log-SNR, whose steps
stay comparable there, wherever the step ratio in the chosen variable exceeds ``max_step_ratio`` (default 3;
``None`` disables it; ``interpolation="log_snr"`` never needs it).

**Third order (``solver_order=3``, ``interpolation="log_snr"``).** The prediction is quadratic in log-SNR through
``t``, ``p`` and the point before ``p`` (the DPM-Solver-3 / DPM-Solver++(3M) multistep form of Lu et al. 2022 with
exact weights: the Lagrange basis in ``lambda`` integrated against ``d rho`` / ``d(alpha / sigma)`` by Gauss-Legendre
quadrature, as the corrector below); the first two steps, and a step onto clean data, are second order.

**Corrector (``corrector_order`` 2, 3 or 4; deterministic sampler).** A step ``p -> t`` predicted ``x_t`` from
predictions at ``p`` and before; the model call at ``x_t`` gives ``d_t`` for free, so (as UniPC's corrector does:
Zhao et al. 2023, arXiv 2302.04867) the step ``p -> t`` is integrated again with ``d`` interpolated through ``t, p``
(and ``p'``, order 3), and ``t``'s own step starts from that corrected sample; the model is never evaluated at it.
In either space the integral is ``u_t = u_p + int d dw`` (``u = x / alpha``, ``w = rho`` for eps; ``u = x / sigma``,
``w = alpha / sigma`` for x0) with ``d`` a polynomial in log-SNR, integrated by Gauss-Legendre quadrature in
``lambda`` (exact to float64: the integrand is smooth). Log-SNR, not ``sigma`` or ``alpha^2``, because those saturate
at high noise, where interpolation through nearly equal nodes is ill-conditioned (measured: the sigma corrector blew
up at 5-8 steps). The first sample and zero-SNR / clean-data points are not corrected, nor is the output.

**Last step (``final_interpolation``; fastdiff's option).** A last step that lands at ``sigma > 0`` (DDIM's
``set_alpha_to_one=False``) may extrapolate the prediction linearly in another of the variables above (same closed
forms, second order); the default's 8-14-step regime uses ``alpha^2`` there, because x0 saturates toward clean
data, where a slope in log-SNR overshoots (:data:`FEW_STEP_REGIMES`). A last step onto clean data keeps
``interpolation`` (in data space / log-SNR that step is DDIM's, x0 held: the saturated limit; extrapolating in
``alpha^2`` there was measured slightly worse on the trained digits model).

**Stochastic sampler (the reverse SDE, O(1/T)).** The paper's accelerated DDPM injects half of the step's noise
*before* the score evaluation (``Y_t+ = Y_t + noise``; score at ``Y_t+``; DDPM mean; other half of the noise).
For a step ``t -> s`` with ``h = lambda_s - lambda_t`` the DDPM posterior variance is
``var = sigma_s^2 (1 - exp(-h))`` and the posterior mean is ``alpha_s x0 + sqrt(sigma_s^2 - var) eps``
(identical to the paper's ``(x + (1 - a) score) / sqrt(a)`` for any jump). Here ``var / 2`` lands in the output
from noise added before the evaluation (std ``(alpha_t / alpha_s) sqrt(var / 2)``, as in the official code) and
``var / 2`` after it.
A diffusers pipeline hands the scheduler the sample it evaluated the model on, so the pre-noise of step
``i + 1`` is added at the end of step ``i``; the first step (whose input the pipeline draws) is a plain DDPM
step. ``variance_type`` picks ``var``: the posterior variance (DDPM's default "fixed_small") or the paper's
``var = 1 - a`` with ``a = alpha_t^2 / alpha_s^2`` (DDPM's "fixed_large"); the last step always uses the posterior
variance so the output is not re-noised.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from diffusers import DDIMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..schedule import NoiseSchedule, add_noise, check_prediction_type, prediction_target, x0_and_eps

SOLVER_SPACES = ("noise", "data")
INTERPOLATIONS = ("sigma", "alphas_cumprod", "log_snr")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCES = ("posterior", "beta")
SOLVER_ORDERS = (1, 2, 3)
TIMESTEP_SCHEDULES = ("spacing", "karras", "auto", "log_snr")
# DDPMScheduler's variance_type values -> the variance the stochastic sampler uses ("learned*" are unsupported)
VARIANCE_TYPES = {"fixed_small": "posterior", "fixed_small_log": "posterior", "fixed_large": "beta",
                  "fixed_large_log": "beta"}

__all__ = [
    "AcceleratedDDIMScheduler",
    "StepCoefficients",
    "accelerated_step_coefficients",
    "INTERPOLATIONS",
    "SOLVER_SPACES",
]


# ------------------------------------------------------------------------------------------------------------
# the update's coefficients: a pure function of (schedule, grid)
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepCoefficients:
    """Per-step coefficients of the accelerated sampler on a grid ``t_0 > t_1 > ... > t_{N-1} -> end``.

    Step ``i`` maps ``x_i`` (at ``t_i``) to ``x_{i+1}``. With ``(x0_i, eps_i)`` the model's data and noise
    predictions at ``(x_i, t_i)`` (``fastdiff.schedule.x0_and_eps``) and ``d_i`` the one named by ``space``::

        deterministic:  x_{i+1} = alpha_next[i] x0_i + sigma_next[i] eps_i + correction[i] (d_i - d_{i-1})
        stochastic:     x_{i+1} = alpha_next[i] x0_i + eps_scale[i] eps_i + noise_std[i] z_i,   z_i ~ N(0, I)

    ``weights`` (``[N, 2]``) holds the same correction as weights on ``(d_i, d_{i-1})``: ``(C, -C)``;
    ``correction[0] == 0``. With ``solver_order=3`` the predictor is ``x_{i+1} = alpha_next[i] x0_i + sigma_next[i]
    eps_i + sum_j predictor[i, j] d_{i-j}`` instead (``predictor``, ``[N, 3]``, is then ``weights``). ``noise_std[i]`` already contains the pre-evaluation noise of step ``i + 1``. All
    tensors are float64 of length ``N``.

    ``corrector`` (``[N, W]``, ``None`` without a corrector) corrects the sample a step is given before it steps:
    ``x_i <- x_i + delta_i``, ``delta_i = sum_j corrector[i, j] d_{i-j}``, where ``d_i`` is the model's prediction at
    the uncorrected ``x_i`` (module docstring, "Corrector"); the prediction not named by ``space`` follows the
    corrected sample (noise space: ``x0_i <- x0_i + delta_i / alpha_i``; data space: ``eps_i <- eps_i + delta_i /
    sigma_i``). ``alpha`` / ``sigma`` hold the grid points' noise levels.

    ``noise_rows`` (``noise_space_steps``; data space only): the predictor of steps ``i < noise_rows`` weighs the eps
    predictions (``d = eps``), from the corrected sample with the model's eps (so there ``x0`` moves with the
    corrected sample, not eps). The data-space corrector of the step after such a step also subtracts that
    predictor's terms, through ``corrector_eps`` (``[N, W]``, weights on ``eps_i, eps_{i-1}, ...``), and the
    difference between the two spaces' first-order terms from a corrected sample, ``corrector_carry[i] *
    delta_{i-1}`` (``[N]``; ``delta_{i-1}`` the previous step's correction). Both are ``None`` when unused.
    """

    alpha_next: torch.Tensor
    sigma_next: torch.Tensor
    correction: torch.Tensor
    eps_scale: torch.Tensor
    noise_std: torch.Tensor
    space: str
    corrector: torch.Tensor | None = None
    alpha: torch.Tensor | None = None
    sigma: torch.Tensor | None = None
    predictor: torch.Tensor | None = None
    noise_rows: int = 0
    corrector_eps: torch.Tensor | None = None
    corrector_carry: torch.Tensor | None = None

    @property
    def weights(self) -> torch.Tensor:
        """``[N, W]``: the predictor's weights on ``d_i, d_{i-1}, ...`` beyond DDIM's first-order terms
        (``(C, -C)``, or the third-order row :attr:`predictor` with ``solver_order=3``)."""
        if self.predictor is not None:
            return self.predictor
        return torch.stack([self.correction, -self.correction], 1)

    @property
    def history(self) -> int:
        """How many predictions (the current one included) a step reads."""
        return max(self.weights.shape[1], 0 if self.corrector is None else self.corrector.shape[1])

    def predicts_noise(self, i: int) -> bool:
        """Whether the predictor of step ``i`` weighs eps (``d = eps``) rather than x0."""
        return self.space == "noise" or i < self.noise_rows

    def linear_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The deterministic update as ``x_{i+1} = sum_j b[i, j] x0_{i-j} + sum_j c[i, j] eps_{i-j}`` with
        ``(x0_j, eps_j)`` the model's predictions at the (uncorrected) samples it was given: ``(b, c)``, ``[N, W]``
        each, corrector included. ValueError with ``noise_rows`` (the corrector then also reads the previous
        correction: no fixed-width form)."""
        if self.noise_rows and self.corrector is not None:
            raise ValueError("linear_form: a corrector after noise_space_steps reads the previous correction too")
        b = torch.zeros(len(self.alpha_next), self.history, dtype=self.alpha_next.dtype,
                        device=self.alpha_next.device)
        c = torch.zeros_like(b)
        b[:, 0], c[:, 0] = self.alpha_next, self.sigma_next
        d = c if self.space == "noise" else b
        d[:, : self.weights.shape[1]] += self.weights
        if self.corrector is not None:  # the other prediction moves with the corrected sample
            ratio = self.alpha_next / self.alpha if self.space == "noise" else self.sigma_next / self.sigma
            d[:, : self.corrector.shape[1]] += ratio[:, None] * self.corrector
        return b, c

    def to(self, device: torch.device | str | None) -> StepCoefficients:
        names = ("alpha_next", "sigma_next", "correction", "eps_scale", "noise_std", "corrector", "alpha", "sigma",
                 "predictor", "corrector_eps", "corrector_carry")
        moved = {k: None if getattr(self, k) is None else getattr(self, k).to(device) for k in names}
        return StepCoefficients(**moved, space=self.space, noise_rows=self.noise_rows)


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


class _Point(NamedTuple):
    """A grid point's noise level: ``alpha``, ``sigma`` and log-SNR ``lam`` (all from the schedule)."""

    alpha: float
    sigma: float
    lam: float


def _noise_antiderivative(interpolation: str, p: _Point) -> float:
    """``F(rho) = int r d rho`` at ``rho = sigma / alpha`` (finite)."""
    rho = p.sigma / p.alpha
    if interpolation == "alphas_cumprod":
        return math.atan(rho)
    if interpolation == "sigma":
        return math.sqrt(1.0 + rho * rho)
    return 2.0 * rho * (1.0 + p.lam / 2) if rho > 0 else 0.0  # 2 rho (1 - log rho), log rho = -lam / 2


def _data_antiderivative_times_sigma(interpolation: str, p: _Point) -> float:
    """``sigma G(v)`` at ``v = alpha / sigma`` with ``G(v) = int r dv``, continuous at ``sigma = 0``."""
    if interpolation == "alphas_cumprod":
        return p.alpha - p.sigma * math.atan2(p.alpha, p.sigma)  # sigma (v - arctan v)
    if interpolation == "sigma":  # sigma asinh(v) = sigma log((1 + alpha) / sigma) since alpha^2 + sigma^2 = 1
        return p.sigma * math.log((1.0 + p.alpha) / p.sigma) if p.sigma > 0 else 0.0
    if p.sigma == 0:
        return math.inf  # x0 linear in log-SNR cannot be integrated to lambda = inf
    return 2.0 * p.alpha * (p.lam / 2 - 1.0)  # sigma 2 v (log v - 1)


def _interpolation_variable(interpolation: str, p: _Point) -> float:
    if interpolation == "alphas_cumprod":
        return p.alpha * p.alpha
    return p.sigma if interpolation == "sigma" else p.lam


def accelerated_step_coefficients(
    schedule: NoiseSchedule,
    timesteps: Sequence[float] | torch.Tensor,
    final_timestep: float | None = None,
    *,
    solver_space: str = "noise",
    interpolation: str = "sigma",
    lower_order_final: bool = False,
    variance: str = "posterior",
    max_step_ratio: float | None = 3.0,
    solver_order: int = 2,
    corrector_order: int = 0,
    noise_space_steps: int = 0,
    final_interpolation: str | None = None,
) -> StepCoefficients:
    """Coefficients of the accelerated DDIM / DDPM update on a grid (see the module docstring for the math).

    Args:
        schedule: the noise schedule (``NoiseSchedule.from_config(scheduler.config)``), VP kind.
        timesteps: the ``N`` training timesteps the model is evaluated at, strictly decreasing.
        final_timestep: where the last step lands: a training timestep (e.g. ``0``, DDIM's
            ``set_alpha_to_one=False``; equal to the last timestep makes the last step the identity) or ``None``
            for clean data (``sigma = 0``).
        solver_space: ``"noise"`` (extrapolate eps, the paper) or ``"data"`` (extrapolate x0).
        interpolation: the variable the prediction is linear in: ``"alphas_cumprod"`` (the paper),
            ``"sigma"`` or ``"log_snr"``.
        lower_order_final: make the last step a DDIM step.
        solver_order: ``2`` the accelerated update, ``1`` DDIM (every correction zero), ``3`` the prediction
            quadratic in log-SNR through the last three points (``interpolation="log_snr"`` only; module docstring).
        corrector_order: ``0`` no corrector; ``2``, ``3`` or ``4``: correct each sample with the prediction made at it,
            eps interpolated in log-SNR through that many points (module docstring, "Corrector"; noise space,
            deterministic only).
        max_step_ratio: where the step ahead is more than this many times the step behind, measured in the
            interpolation variable, extrapolate in log-SNR instead (``None``: never).
        noise_space_steps: with ``solver_space="data"``, the predictor of the first this many steps extrapolates
            eps instead of x0 (noise space, same interpolation and order) while the correctors stay in data space
            (:class:`StepCoefficients`, ``noise_rows``). ``0``: none.
        final_interpolation: the variable the last step's prediction is extrapolated linearly in (one of
            :data:`INTERPOLATIONS`; second order, also with ``solver_order=3``) when that step lands at a noise
            level ``sigma > 0``; ``None``: ``interpolation``. A last step onto clean data keeps ``interpolation``.
            ``lower_order_final`` takes precedence.
        variance: the stochastic sampler's per-step noise variance: ``"posterior"`` (DDPM's "fixed_small",
            ``sigma_s^2 (1 - exp(-h))``) or ``"beta"`` (DDPM's "fixed_large", ``1 - alpha_t^2 / alpha_s^2``, the
            paper's); the last step always uses the posterior variance, so the output is not re-noised.
    """
    _check_solver(solver_space, interpolation, solver_order, corrector_order)
    _check_noise_space_steps(noise_space_steps, solver_space)
    _check_final_interpolation(final_interpolation)
    _check_choice("variance", variance, VARIANCES)
    if schedule.kind != "vp":
        raise ValueError("the accelerated DDIM sampler needs a VP (DDPM-family) noise schedule")
    ts = torch.as_tensor(timesteps, dtype=torch.float64).flatten().cpu()
    if ts.numel() < 1:
        raise ValueError("timesteps must contain at least one timestep")
    if ts.numel() > 1 and not torch.all(ts[1:] < ts[:-1]):
        raise ValueError("timesteps must be strictly decreasing")
    if final_timestep is not None and final_timestep > ts[-1].item():
        raise ValueError(f"final_timestep ({final_timestep}) must not exceed the last timestep ({ts[-1].item()})")

    end = [] if final_timestep is None else [final_timestep]
    t_all = torch.cat([ts, torch.tensor(end, dtype=torch.float64)])
    points = [_Point(*v) for v in zip(schedule.alpha(t_all).tolist(), schedule.sigma(t_all).tolist(),
                                       schedule.log_snr(t_all).tolist())]
    if final_timestep is None:
        points.append(_Point(1.0, 0.0, math.inf))  # clean data
    n = ts.numel()

    final_noisy = final_interpolation is not None and points[n].sigma > 0  # final_interpolation applies

    def row_space(i: int) -> str:  # the space of step i's predictor
        return "noise" if i < noise_space_steps else solver_space

    correction, eps_scale, noise_std, var = [], [], [], []
    for i in range(n):
        (a_t, s_t, _), (a_s, s_s, _) = points[i], points[i + 1]
        # DDPM posterior: var = sigma_s^2 (1 - exp(lam_t - lam_s)), eps coefficient sqrt(sigma_s^2 - var)
        ratio = 0.0 if a_s == 0 or s_t == 0 else (s_s * s_s * a_t) / (a_s * s_t)
        posterior = max(s_s * s_s - ratio * ratio, 0.0)
        var.append(posterior if variance == "posterior" or i == n - 1 else 1.0 - (a_t / a_s) ** 2)
        eps_scale.append(ratio)
        first_order = solver_order == 1 or i == 0 or (lower_order_final and i == n - 1)
        variable = final_interpolation if final_noisy and i == n - 1 else interpolation
        correction.append(0.0 if first_order else
                          _correction(row_space(i), variable, points[i - 1], points[i], points[i + 1],
                                      max_step_ratio))
    for i in range(n):  # post-noise of step i (all of it on the first step) + pre-noise of step i + 1
        post = var[i] if i == 0 else var[i] / 2
        pre_next = ((points[i + 1].alpha / points[i + 2].alpha) ** 2 * var[i + 1] / 2
                    if i + 1 < n and points[i + 2].alpha > 0 else 0.0)
        noise_std.append(math.sqrt(post + pre_next))
    alpha_next = [p.alpha for p in points[1:]]
    sigma_next = [p.sigma for p in points[1:]]
    f64 = dict(dtype=torch.float64)
    predictor = None
    if solver_order == 3:
        predictor = [_third_order_row(row_space(i), points, correction, i, lower_order_final and i == n - 1)
                     for i in range(n)]
        if final_noisy and not lower_order_final:  # the last step: second order in final_interpolation
            predictor[-1] = [correction[-1], -correction[-1], 0.0]
    corrector = corrector_eps = corrector_carry = None
    if corrector_order:
        rows = predictor or [[c, -c] for c in correction]
        # a noise-space predictor's terms are weights on eps, not x0: the corrector after it subtracts them on eps
        same = [[0.0] * len(r) if row_space(i) != solver_space else r for i, r in enumerate(rows)]
        corrector = torch.tensor([_corrector_row(solver_space, points, same, i, corrector_order)
                                  for i in range(n)], **f64)
        if noise_space_steps and solver_space == "data":
            corrector_eps, corrector_carry = torch.zeros_like(corrector), torch.zeros(n, **f64)
            for i in range(1, n):
                if row_space(i - 1) != solver_space and corrector[i].any():
                    corrector_eps[i, 1: 1 + len(rows[i - 1])] = -torch.tensor(rows[i - 1], **f64)
                    p, t = points[i - 1], points[i]  # noise vs data first-order term from the corrected x_{i-1}
                    corrector_carry[i] = -(t.alpha / p.alpha - t.sigma / p.sigma)
    return StepCoefficients(
        alpha_next=torch.tensor(alpha_next, **f64), sigma_next=torch.tensor(sigma_next, **f64),
        correction=torch.tensor(correction, **f64), eps_scale=torch.tensor(eps_scale, **f64),
        noise_std=torch.tensor(noise_std, **f64), space=solver_space, corrector=corrector,
        alpha=torch.tensor([p.alpha for p in points[:n]], **f64), sigma=torch.tensor([p.sigma for p in points[:n]], **f64),
        predictor=None if predictor is None else torch.tensor(predictor, **f64),
        noise_rows=min(noise_space_steps, n) if solver_space == "data" else 0, corrector_eps=corrector_eps,
        corrector_carry=corrector_carry,
    )


CORRECTOR_ORDERS = (0, 2, 3, 4)
#: the update of fastdiff v2's few-step sampler (``low_step_switch``): eps linear in sigma, step-ratio limit 3
V2_UPDATE: dict[str, Any] = {"solver_space": "noise", "interpolation": "sigma", "max_step_ratio": 3.0,
                             "corrector_order": 0}
_GAUSS_LEGENDRE = np.polynomial.legendre.leggauss(32)


#: the settings a step regime (``step_regimes``) may override, per number of inference steps
REGIME_KEYS = ("solver_space", "interpolation", "solver_order", "corrector_order", "max_step_ratio",
               "timestep_schedule", "log_snr_power", "noise_space_steps", "lower_order_final",
               "final_interpolation", "evaluate_at_zero")


def _check_solver(solver_space: str, interpolation: str, solver_order: int, corrector_order: int) -> None:
    """The checks of the predictor-corrector settings (shared by the step coefficients and the scheduler)."""
    _check_choice("solver_space", solver_space, SOLVER_SPACES)
    _check_choice("interpolation", interpolation, INTERPOLATIONS)
    if isinstance(solver_order, bool) or solver_order not in SOLVER_ORDERS:
        raise ValueError(f"solver_order must be one of {SOLVER_ORDERS}, got {solver_order!r}")
    _check_corrector_order(corrector_order, solver_space)
    _check_third_order(solver_order, interpolation)


def _check_update(solver_space: str, interpolation: str, solver_order: int, corrector_order: int,
                  max_step_ratio: float | None, timestep_schedule: str, log_snr_power: float,
                  noise_space_steps: int = 0, lower_order_final: bool = False,
                  final_interpolation: str | None = None, evaluate_at_zero: bool = True) -> None:
    """The checks of the update and grid settings (shared by the scheduler's arguments and its step regimes)."""
    _check_solver(solver_space, interpolation, solver_order, corrector_order)
    for name, value in (("lower_order_final", lower_order_final), ("evaluate_at_zero", evaluate_at_zero)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool, got {value!r}")
    _check_final_interpolation(final_interpolation)
    _check_noise_space_steps(noise_space_steps, solver_space)
    if max_step_ratio is not None and (isinstance(max_step_ratio, bool) or not max_step_ratio > 0):
        raise ValueError(f"max_step_ratio must be a number > 0 or None, got {max_step_ratio!r}")
    _check_choice("timestep_schedule", timestep_schedule, TIMESTEP_SCHEDULES)
    if isinstance(log_snr_power, bool) or not isinstance(log_snr_power, int | float) or not log_snr_power > 0:
        raise ValueError(f"log_snr_power must be a number > 0, got {log_snr_power!r}")


def _check_regimes(step_regimes: Any, base: Mapping[str, Any]) -> None:
    """``step_regimes``: ``None`` or a list of ``[min_steps, settings]`` with ``min_steps`` ints >= 1, strictly
    increasing, and ``settings`` dicts over :data:`REGIME_KEYS` (each regime checked on top of ``base``)."""
    if step_regimes is None:
        return
    form = "a list of [min_steps, settings] pairs"
    if isinstance(step_regimes, str | bytes | Mapping) or not isinstance(step_regimes, Sequence):
        raise ValueError(f"step_regimes must be None or {form}, got {step_regimes!r}")
    last = 0
    for item in step_regimes:
        if (isinstance(item, str | bytes) or not isinstance(item, Sequence) or len(item) != 2
                or not isinstance(item[1], Mapping)):
            raise ValueError(f"step_regimes must be None or {form}, got the entry {item!r}")
        min_steps, settings = item
        if isinstance(min_steps, bool) or not isinstance(min_steps, int) or min_steps <= last:
            raise ValueError(f"step_regimes: min_steps must be ints >= 1, strictly increasing, got {min_steps!r}")
        unknown = sorted(set(settings) - set(REGIME_KEYS))
        if unknown:
            raise ValueError(f"step_regimes: unknown settings {unknown}; allowed: {REGIME_KEYS}")
        _check_update(**{**{k: base[k] for k in REGIME_KEYS}, **settings})
        last = min_steps


def _check_noise_space_steps(noise_space_steps: int, solver_space: str) -> None:
    if isinstance(noise_space_steps, bool) or not isinstance(noise_space_steps, int) or noise_space_steps < 0:
        raise ValueError(f"noise_space_steps must be an int >= 0, got {noise_space_steps!r}")
    if noise_space_steps and solver_space != "data":
        raise ValueError(f"noise_space_steps={noise_space_steps} needs solver_space='data', got {solver_space!r}")


def _check_final_interpolation(final_interpolation: str | None) -> None:
    if final_interpolation is not None:
        _check_choice("final_interpolation", final_interpolation, INTERPOLATIONS)


def _check_corrector_order(corrector_order: int, solver_space: str) -> None:
    if isinstance(corrector_order, bool) or corrector_order not in CORRECTOR_ORDERS:
        raise ValueError(f"corrector_order must be one of {CORRECTOR_ORDERS}, got {corrector_order!r}")


def _check_third_order(solver_order: int, interpolation: str) -> None:
    if solver_order == 3 and interpolation != "log_snr":
        raise ValueError(f"solver_order=3 needs interpolation='log_snr', got interpolation={interpolation!r}")


def _finite(p: _Point) -> bool:
    return math.isfinite(p.lam) and p.alpha > 0 and p.sigma > 0


def _third_order_row(space: str, points: Sequence[_Point], correction: Sequence[float], i: int, first_order: bool
                     ) -> list[float]:
    """Row ``i`` of :attr:`StepCoefficients.predictor`: the step ``t_i -> t_{i+1}`` with ``d`` quadratic in log-SNR
    through ``t_i, t_{i-1}, t_{i-2}`` (exact quadrature), as weights on ``d_i, d_{i-1}, d_{i-2}`` beyond DDIM's terms.
    Where three finite points are not available (the first two steps, a zero-SNR point) or the step lands on clean
    data (``lambda = inf``, no finite quadrature) it is the second-order step (``correction``)."""
    if first_order:
        return [0.0, 0.0, 0.0]
    t, s = points[i], points[i + 1]
    if i < 2 or not all(_finite(p) for p in (points[i - 2], points[i - 1], t, s)):
        return [correction[i], -correction[i], 0.0]
    scale, w_t, w_s = (s.alpha, t.sigma / t.alpha, s.sigma / s.alpha) if space == "noise" else (
        s.sigma, t.alpha / t.sigma, s.alpha / s.sigma)
    integrals = _log_snr_lagrange_integrals(space, [points[i - j].lam for j in range(3)], t.lam, s.lam)
    integrals[0] -= w_s - w_t  # DDIM's own term
    return [scale * v for v in integrals]


def _log_snr_lagrange_integrals(space: str, nodes: Sequence[float], lam_a: float, lam_b: float) -> list[float]:
    """``int L_j(lambda) du`` from ``lambda_a`` to ``lambda_b`` for the Lagrange basis ``L_j`` in log-SNR through
    ``nodes``, with ``u = rho = exp(-lambda / 2)`` (noise space, ``du = -u / 2 d lambda``) or ``u = v =
    exp(lambda / 2)`` (data space, ``du = u / 2 d lambda``), by 32-point Gauss-Legendre in ``lambda`` (a smooth
    integrand: exact to float64 for the step sizes of a sampling grid)."""
    x, w = _GAUSS_LEGENDRE
    half = 0.5 * (lam_b - lam_a)
    lam = half * x + 0.5 * (lam_a + lam_b)
    density = (-0.5 * np.exp(-lam / 2) if space == "noise" else 0.5 * np.exp(lam / 2)) * half * w
    out = []
    for j, node in enumerate(nodes):
        basis = np.ones_like(lam)
        for m, other in enumerate(nodes):
            if m != j:
                basis *= (lam - other) / (node - other)
        out.append(float((density * basis).sum()))
    return out


def _corrector_row(space: str, points: Sequence[_Point], predictor: Sequence[Sequence[float]], i: int, order: int
                   ) -> list[float]:
    """Row ``i`` of :attr:`StepCoefficients.corrector` (module docstring, "Corrector"): the corrected ``x_i``
    minus the predicted one, as weights on ``d_i, d_{i-1}, ...``; ``predictor[i]`` are the predictor's weights of
    step ``i`` beyond DDIM (:attr:`StepCoefficients.weights`)."""
    width = max(order, len(predictor[0]) + 1, 3)
    row = [0.0] * width
    k = min(order, i + 1)
    pts = [points[i - j] for j in range(k)]
    if i < 1 or any(not (math.isfinite(p.lam) and p.alpha > 0 and p.sigma > 0) for p in [*pts, points[i - 1]]):
        return row  # first point, or a zero-SNR / clean-data point: no corrector there
    t, s = points[i - 1], points[i]
    # the state u = x / alpha (noise) or x / sigma (data) moves by int d dw, w = rho (noise) or v = alpha / sigma
    scale, w_t, w_s = (s.alpha, t.sigma / t.alpha, s.sigma / s.alpha) if space == "noise" else (
        s.sigma, t.alpha / t.sigma, s.alpha / s.sigma)
    corrected = _log_snr_lagrange_integrals(space, [p.lam for p in pts], t.lam, s.lam)  # on d_i, d_{i-1}, ...
    # the predictor of step i - 1 in u: u_t + (w_s - w_t) d_t + sum_j (predictor[i - 1][j] / scale) d_{t - j}
    predicted = [0.0] + [w / scale for w in predictor[i - 1]]
    predicted[1] += w_s - w_t
    for j in range(width):
        row[j] = scale * ((corrected[j] if j < k else 0.0) - (predicted[j] if j < len(predicted) else 0.0))
    return row


def _correction(space: str, interpolation: str, p: _Point, t: _Point, s: _Point,
                max_step_ratio: float | None = None) -> float:
    """``C`` of the module docstring for the step ``t -> s`` with previous grid point ``p``."""
    r_p, r_t = _interpolation_variable(interpolation, p), _interpolation_variable(interpolation, t)
    if not math.isfinite(r_p) or not math.isfinite(r_t) or t.alpha == 0 or t.sigma == 0 or r_t == r_p:
        return 0.0  # zero-SNR point or no resolvable slope (saturated schedule): DDIM for this step
    if max_step_ratio is not None and interpolation != "log_snr":
        r_s = _interpolation_variable(interpolation, s)
        if abs(r_s - r_t) > max_step_ratio * abs(r_t - r_p):  # ill-conditioned: extrapolate in log-SNR
            return _correction(space, "log_snr", p, t, s)
    if space == "noise":
        rho_t, rho_s = t.sigma / t.alpha, s.sigma / s.alpha
        moment = (_noise_antiderivative(interpolation, s) - _noise_antiderivative(interpolation, t)
                  - r_t * (rho_s - rho_t))
        return s.alpha * moment / (r_t - r_p)
    sg_s = _data_antiderivative_times_sigma(interpolation, s)
    if not math.isfinite(sg_s):
        return 0.0  # data prediction linear in log-SNR diverges at sigma = 0: lower order on that step
    g_t = _data_antiderivative_times_sigma(interpolation, t) / t.sigma
    moment = sg_s - s.sigma * g_t - r_t * (s.alpha - s.sigma * t.alpha / t.sigma)
    return moment / (r_t - r_p)


# ------------------------------------------------------------------------------------------------------------
# timestep grids (diffusers' conventions, Lin et al. 2024 Table 2)
# ------------------------------------------------------------------------------------------------------------
def spaced_timesteps(num_inference_steps: int, num_train_timesteps: int, spacing: str, steps_offset: int = 0
                     ) -> np.ndarray:
    """Integer timesteps, decreasing, with diffusers' ``leading`` / ``trailing`` / ``linspace`` spacings."""
    _check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    n, big_t = num_inference_steps, num_train_timesteps
    if spacing == "linspace":
        ts = np.linspace(0, big_t - 1, n).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, n) * (big_t // n)).round()[::-1] + steps_offset
    else:
        ts = np.round(np.arange(big_t, 0, -big_t / n)) - 1
    return ts.astype(np.int64).copy()


def karras_timesteps(schedule: NoiseSchedule, n: int, rho: float = 7.0, include_last: bool = False,
                     ramp_power: float = 1.0) -> np.ndarray:
    """``n`` fractional timesteps whose ``sigma / alpha`` follow Karras et al. (2022, Eq. 5) from the top of the
    schedule (``t = T - 1``) toward ``t = 0``: ``(s_max^(1/rho) + i/(m-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``.

    ``rho = inf`` is its limit, levels uniform in ``log(sigma / alpha) = -lambda / 2``: a grid uniform in log-SNR
    (Lu et al. 2022, DPM-Solver, the "logSNR" time steps; :func:`log_snr_timesteps`).

    ``include_last=False`` (the sampler ends at ``t = 0``): ``m = n + 1`` points, the last one (``t = 0``) is the
    end, not a timestep. ``include_last=True`` (the sampler ends at clean data): ``m = n`` points ending at ``t = 0``.
    Each level is mapped back to a training timestep by interpolating ``log(sigma / alpha)`` between integers.
    ``ramp_power`` warps the ramp ``i / (m - 1)`` to its power (``< 1``: larger steps at the noisy end, smaller ones
    toward clean data; ``1``: the formula above).
    """
    big_t = schedule.num_train_timesteps
    t_int = torch.arange(big_t, dtype=torch.float64)
    log_sb = schedule.sigma_bar(t_int).log().numpy()
    if not np.all(np.isfinite(log_sb)) or np.any(np.diff(log_sb) <= 0):  # zero-SNR end or flat schedule
        keep = np.isfinite(log_sb) & np.concatenate([[True], np.diff(log_sb) > 0])
        t_np, log_sb = t_int.numpy()[keep], log_sb[keep]
    else:
        t_np = t_int.numpy()
    lo, hi = math.exp(log_sb[0]), math.exp(log_sb[-1])
    m = n if include_last else n + 1
    ramp = (np.linspace(0.0, 1.0, m) if m > 1 else np.zeros(1)) ** ramp_power
    if math.isinf(rho):
        log_levels = log_sb[-1] + ramp * (log_sb[0] - log_sb[-1])
    else:
        log_levels = np.log((hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho)
    ts = np.interp(log_levels, log_sb, t_np)[:n]
    ts[0] = t_np[-1]
    ts = np.maximum.accumulate(ts[::-1])[::-1].copy()  # guard monotonicity against interpolation ties
    if np.any(np.diff(ts) >= 0):
        raise ValueError(f"{n} Karras steps do not fit this schedule's {big_t} timesteps")
    return ts


def log_snr_timesteps(schedule: NoiseSchedule, n: int, include_last: bool = False, power: float = 1.0) -> np.ndarray:
    """``n`` fractional timesteps uniform in log-SNR from ``t = T - 1`` toward ``t = 0`` (:func:`karras_timesteps`
    with ``rho = inf``; same ``include_last``). ``power != 1``: log-SNR levels ``lambda_top + u^power (lambda_end -
    lambda_top)`` for ``u`` uniform in ``[0, 1]`` (``power < 1``: finer toward clean data)."""
    return karras_timesteps(schedule, n, math.inf, include_last, ramp_power=power)


# ------------------------------------------------------------------------------------------------------------
# the scheduler
# ------------------------------------------------------------------------------------------------------------
class AcceleratedDDIMScheduler(SchedulerMixin, ConfigMixin):
    """Accelerated DDIM (deterministic, O(1/T^2)) and accelerated DDPM (``stochastic=True``, O(1/T)).

    Li et al., "Accelerating Convergence of Score-Based Diffusion Models, Provably", ICML 2024. One model
    evaluation per step; the deterministic update reuses the previous step's prediction. A drop-in for any
    DDPM-family pipeline::

        pipe.scheduler = AcceleratedDDIMScheduler.from_config(pipe.scheduler.config)

    The first block of arguments is DDIM's and means the same; ``betas``, ``alphas``, ``alphas_cumprod`` and
    ``final_alpha_cumprod`` are DDIM's (computed by diffusers' own ``DDIMScheduler`` from the same config, so
    every beta schedule diffusers implements works). ``timestep_spacing`` / ``set_timesteps(timesteps=...)``
    choose the grid (custom timesteps may be fractional); the update uses the actual next grid point, so it is
    exact on non-uniform and custom grids. Schedule math comes from :class:`fastdiff.schedule.NoiseSchedule`.

    **Off-grid timesteps** (DDIM's behaviour, which diffusers' scheduler tests exercise): ``step`` at a
    timestep that is not on the grid takes one first-order step (a DDIM step; a DDPM posterior step when
    ``stochastic``) to ``t - num_train_timesteps // num_inference_steps`` (DDIM's previous timestep; clean data
    or ``alphas_cumprod[0]`` when that is negative) and does not enter the multistep history.

    Args (beyond DDIM's):
        solver_order: ``2`` (default) the accelerated update; ``1`` is DDIM / DDPM step for step.
        solver_space: ``"noise"`` (default; the paper's) extrapolates the eps prediction, ``"data"`` the x0
            prediction.
        interpolation: the variable the prediction is extrapolated linearly in: ``"sigma"`` (default),
            ``"alphas_cumprod"`` (the paper's) or ``"log_snr"``.
        lower_order_final: use a DDIM step for the last step.
        stochastic: the accelerated DDPM sampler instead of the ODE sampler.
        variance_type: the stochastic sampler's noise variance, DDPM's names: ``"fixed_small"`` (posterior
            variance, DDPM's default) or ``"fixed_large"`` (``beta``, the paper's); read from a DDPM config.
        max_step_ratio: step-ratio limit of the extrapolation (module docstring); ``None`` disables it, which is
            right only for exact scores (the oracle), where it lowers the few-step error further.
        timestep_schedule: ``"spacing"`` (``timestep_spacing``), ``"karras"`` (rho ``karras_rho``), ``"log_snr"``
            (uniform in log-SNR from the top of the schedule) or ``"auto"`` (fastdiff v2: trailing below
            ``karras_from_steps``, Karras from there).
        corrector_order: ``0`` (default) none; ``2`` / ``3``: the free corrector of the module docstring (deterministic
            sampler only; the stochastic one ignores it).
        low_step_switch: below this many inference steps ``set_timesteps`` uses fastdiff v2's few-step sampler
            instead of the configured update and grid (eps linear in sigma, step-ratio limit 3, no corrector,
            ``"auto"`` grid); ``0`` (default) never. fastdiff v3's default set 8.
        log_snr_power: warp of the ``"log_snr"`` grid (:func:`log_snr_timesteps`); ``1`` (default) uniform in log-SNR.
        step_regimes: ``None`` (default) or ``[[min_steps, settings], ...]``: for ``n`` inference steps the last
            regime with ``min_steps <= n`` overrides these settings (any of :data:`REGIME_KEYS`: the update and
            the grid; custom ``timesteps`` take the update of their count). fastdiff's default sampler is one such
            table (:data:`FEW_STEP_REGIMES`).
        noise_space_steps: with ``solver_space="data"``: the predictor of the first this many steps extrapolates
            eps (noise space; from the corrected sample with the model's eps, as UniPC's predictor does) while the
            correctors stay in data space; ``0`` (default): none (fastdiff's option; measured in
            :data:`FEW_STEP_REGIMES`).
        final_interpolation: ``None`` (default: ``interpolation``) or one of :data:`INTERPOLATIONS`: the variable
            the prediction of a last step landing at ``sigma > 0`` is extrapolated linearly in (module docstring,
            "Last step"); a step-regime setting of fastdiff's default, as is ``lower_order_final``.
        evaluate_at_zero: on a clean-data end (``set_alpha_to_one=True``) the ``"karras"`` / ``"log_snr"`` grids
            end with a model call at ``t = 0`` (``True``, default) or stop one level above it (``False``: the first
            ``n`` of the ``n + 1`` levels from the top to ``t = 0``, the last step going onto clean data from
            there, as on an ``alphas_cumprod[0]`` end); fastdiff's default sets ``False`` from 8 steps. No effect
            on other ends or grids.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        solver_order: int = 2,
        solver_space: Literal["noise", "data"] = "noise",
        interpolation: Literal["sigma", "alphas_cumprod", "log_snr"] = "sigma",
        lower_order_final: bool = False,
        stochastic: bool = False,
        variance_type: str = "fixed_small",
        max_step_ratio: float | None = 3.0,
        timestep_schedule: Literal["spacing", "karras", "auto", "log_snr"] = "spacing",
        karras_rho: float = 7.0,
        karras_from_steps: int = 10,
        corrector_order: int = 0,
        low_step_switch: int = 0,
        log_snr_power: float = 1.0,
        step_regimes: list | None = None,
        noise_space_steps: int = 0,
        final_interpolation: str | None = None,
        evaluate_at_zero: bool = True,
    ) -> None:
        check_prediction_type(prediction_type)
        if prediction_type == "flow":
            raise ValueError("prediction_type 'flow' needs a flow-matching scheduler; use epsilon, v_prediction "
                             "or sample")
        _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        base = dict(solver_space=solver_space, interpolation=interpolation, solver_order=solver_order,
                    corrector_order=corrector_order, max_step_ratio=max_step_ratio,
                    timestep_schedule=timestep_schedule, log_snr_power=log_snr_power,
                    noise_space_steps=noise_space_steps, lower_order_final=lower_order_final,
                    final_interpolation=final_interpolation, evaluate_at_zero=evaluate_at_zero)
        _check_update(**base)
        _check_regimes(step_regimes, base)
        if isinstance(low_step_switch, bool) or not isinstance(low_step_switch, int) or low_step_switch < 0:
            raise ValueError(f"low_step_switch must be an int >= 0, got {low_step_switch!r}")
        if isinstance(karras_rho, bool) or not isinstance(karras_rho, int | float) or not karras_rho > 0:
            raise ValueError(f"karras_rho must be a number > 0, got {karras_rho!r}")
        if isinstance(karras_from_steps, bool) or not isinstance(karras_from_steps, int) or karras_from_steps < 1:
            raise ValueError(f"karras_from_steps must be an int >= 1, got {karras_from_steps!r}")
        if stochastic and variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {tuple(VARIANCE_TYPES)} for the stochastic sampler, "
                             f"got {variance_type!r}")
        # DDIM's schedule, computed by diffusers itself from the same arguments (one source of truth for betas)
        ddim = DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                             beta_schedule=beta_schedule, trained_betas=trained_betas,
                             set_alpha_to_one=set_alpha_to_one, rescale_betas_zero_snr=rescale_betas_zero_snr)
        self.betas, self.alphas, self.alphas_cumprod = ddim.betas, ddim.alphas, ddim.alphas_cumprod
        self.final_alpha_cumprod = ddim.final_alpha_cumprod
        self.noise_schedule = _schedule_of(self.alphas_cumprod)
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))
        self.coefficients: StepCoefficients | None = None
        self._history: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (step index, x0, eps), newest first
        self._last_delta: tuple[int, torch.Tensor] | None = None  # (step index, the correction made there)

    # -------------------------------------------------------------------------------------------- grid
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[float] | None = None,
    ) -> None:
        """Build the sampling grid from ``num_inference_steps`` (with ``timestep_spacing``) or custom ``timesteps``.

        Custom ``timesteps`` are numbers (integers, or fractional training timesteps, kept as given), strictly
        decreasing, in ``[0, num_train_timesteps - 1]``.
        """
        big_t = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of `num_inference_steps` or `timesteps`")
        low = False
        if timesteps is not None:
            ts = _custom_timesteps(timesteps, big_t)
            settings = self.settings_for(len(ts))
        else:
            n = _step_count(num_inference_steps, big_t)
            settings = self.settings_for(n)
            low = n < self.config.low_step_switch
            schedule = "auto" if low else settings["timestep_schedule"]
            call_at_zero = self._final_timestep is None and settings["evaluate_at_zero"]
            if schedule == "log_snr":
                ts = log_snr_timesteps(self.noise_schedule, n, include_last=call_at_zero,
                                       power=settings["log_snr_power"])
            elif schedule == "karras" or (schedule == "auto" and n >= self.config.karras_from_steps):
                ts = karras_timesteps(self.noise_schedule, n, self.config.karras_rho,
                                      include_last=call_at_zero)
            else:
                spacing = "trailing" if schedule == "auto" else self.config.timestep_spacing
                ts = spaced_timesteps(n, big_t, spacing, self.config.steps_offset)
            if ts.max() > big_t - 1 or ts.min() < 0:
                raise ValueError(f"num_inference_steps={n} with steps_offset={self.config.steps_offset} and "
                                 f"timestep_spacing={self.config.timestep_spacing!r} puts timesteps outside "
                                 f"[0, {big_t - 1}]; lower steps_offset or num_inference_steps")
        cfg = self.config
        update = {k: settings[k] for k in ("solver_space", "interpolation", "max_step_ratio", "corrector_order",
                                           "noise_space_steps", "final_interpolation")}
        if cfg.stochastic:
            update["corrector_order"] = 0
        order = settings["solver_order"]
        if low:
            update, order = dict(V2_UPDATE), min(order, 2)
        self.num_inference_steps = len(ts)
        self.timesteps = torch.from_numpy(ts).to(device)
        self.coefficients = accelerated_step_coefficients(
            self.noise_schedule, ts.tolist(), self._final_timestep, lower_order_final=settings["lower_order_final"],
            solver_order=order, variance=VARIANCE_TYPES.get(cfg.variance_type, "posterior"), **update)
        self._history = []
        self._last_delta: tuple[int, torch.Tensor] | None = None

    def settings_for(self, num_inference_steps: int) -> dict[str, Any]:
        """The update and grid settings (:data:`REGIME_KEYS`) ``set_timesteps`` uses for this many steps: the
        config's, overridden by the last of ``step_regimes`` whose ``min_steps`` is at most ``num_inference_steps``."""
        out = {k: self.config[k] for k in REGIME_KEYS}
        chosen = [settings for min_steps, settings in self.config.step_regimes or [] if num_inference_steps >= min_steps]
        return {**out, **chosen[-1]} if chosen else out

    @property
    def _final_timestep(self) -> float | None:
        """DDIM's last step lands on alpha^2 = 1 (``set_alpha_to_one``, ``None`` here) or ``alphas_cumprod[0]``."""
        return None if self.config.set_alpha_to_one else 0

    # -------------------------------------------------------------------------------------------- step
    def index_for_timestep(self, timestep: float | torch.Tensor) -> int | None:
        """The grid index of ``timestep``, or ``None`` when it is not on the grid."""
        t = float(timestep.item() if isinstance(timestep, torch.Tensor) else timestep)
        hits = (self.timesteps.cpu().double() == t).nonzero()
        return int(hits[0].item()) if hits.numel() else None

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """Identity: the model takes ``x_t`` unscaled (VP schedule)."""
        return sample

    def _off_grid_coefficients(self, t: float) -> StepCoefficients:
        """One first-order step from an off-grid ``t`` to DDIM's previous timestep (class docstring)."""
        prev = t - self.config.num_train_timesteps // self.num_inference_steps
        end = self._final_timestep if prev < 0 else prev
        if end is not None and end >= t:  # t below the end point (e.g. t = 0 with set_alpha_to_one=False)
            end = None if self.config.set_alpha_to_one else t
        return accelerated_step_coefficients(self.noise_schedule, [t], end, solver_order=1,
                                             variance=VARIANCE_TYPES.get(self.config.variance_type, "posterior"))

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple:
        """One accelerated step from ``timestep`` to the next grid point.

        Returns ``DDIMSchedulerOutput(prev_sample, pred_original_sample)`` (or a tuple when ``return_dict=False``).
        """
        for name, value in (("model_output", model_output), ("sample", sample)):
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
        if self.coefficients is None:
            raise ValueError("call `set_timesteps` before `step`")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output shape {tuple(model_output.shape)} does not match sample shape "
                             f"{tuple(sample.shape)}")
        t = float(timestep.item() if isinstance(timestep, torch.Tensor) else timestep)
        i = self.index_for_timestep(t)
        c = self.coefficients if i is not None else self._off_grid_coefficients(t)
        k = 0 if i is None else i  # row of c
        dtype = sample.dtype
        x = sample.float() if dtype in (torch.float16, torch.bfloat16) else sample
        out = model_output.to(x.dtype)
        alpha_t, sigma_t = self.noise_schedule.alpha(t).item(), self.noise_schedule.sigma(t).item()
        x0, eps = x0_and_eps(out, x, alpha_t, sigma_t, self.config.prediction_type)
        if self.config.thresholding or self.config.clip_sample:
            x0 = self._clip(x0)
            eps = x0_and_eps(x0, x, alpha_t, sigma_t, "sample")[1] if sigma_t > 0 else eps
        if self.config.stochastic:
            noise = randn_tensor(sample.shape, generator=generator, device=x.device, dtype=dtype).to(x.dtype)
            prev = c.alpha_next[k].item() * x0 + c.eps_scale[k].item() * eps + c.noise_std[k].item() * noise
        else:
            if i is not None:
                self._history = ([(i, x0, eps)] + self._history)[:c.history]
                # a broken history (steps skipped or repeated) drops the terms that need the missing steps
                run = next((j for j, (idx, *_) in enumerate(self._history) if idx != i - j), len(self._history))
                last, self._last_delta = self._last_delta, None
                if c.corrector is not None:
                    row = c.corrector[i].tolist()
                    row_eps = [0.0] * len(row) if c.corrector_eps is None else c.corrector_eps[i].tolist()
                    used = max((j + 1 for j, (w, we) in enumerate(zip(row, row_eps)) if w or we), default=0)
                    if 0 < used <= run:
                        own = 2 if c.space == "noise" else 1  # the history slot of d
                        delta = sum(w * h[own] + we * h[2] for w, we, h in zip(row[:used], row_eps, self._history))
                        carry = 0.0 if c.corrector_carry is None else c.corrector_carry[i].item()
                        if carry and last is not None and last[0] == i - 1:
                            delta = delta + carry * last[1]
                        self._last_delta = (i, delta)
                        x = x + delta
                        if c.predicts_noise(i):  # the prediction this step's predictor does not weigh moves
                            x0 = x0 + delta / alpha_t
                        else:
                            eps = eps + delta / sigma_t
            prev = c.alpha_next[k].item() * x0 + c.sigma_next[k].item() * eps
            if i is not None:
                weights = c.weights[i].tolist()
                used = max((j + 1 for j, w in enumerate(weights) if w), default=0)
                if 0 < used <= run:
                    slot = 2 if c.predicts_noise(i) else 1  # eps or x0 in the history
                    for w, h in zip(weights[:used], self._history):
                        prev = prev + w * h[slot]
        prev, x0 = prev.to(dtype), x0.to(dtype)
        if not return_dict:
            return (prev, x0)
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _clip(self, x0: torch.Tensor) -> torch.Tensor:
        if self.config.thresholding:
            return DDIMScheduler._threshold_sample(self, x0)  # reuse diffusers' dynamic thresholding
        r = self.config.clip_sample_range
        return x0.clamp(-r, r)

    # -------------------------------------------------------------------------------------------- training-side
    def _alpha_sigma(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(timesteps, device=like.device).flatten()
        return (self.noise_schedule.alpha(t).to(like.dtype), self.noise_schedule.sigma(t).to(like.dtype))

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
                  ) -> torch.Tensor:
        """``alpha_t x0 + sigma_t noise`` per sample (``timesteps`` is ``[B]`` or a scalar)."""
        alpha, sigma = self._alpha_sigma(timesteps, original_samples)
        return add_noise(original_samples, noise, alpha, sigma)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target ``alpha_t noise - sigma_t x0``."""
        alpha, sigma = self._alpha_sigma(timesteps, sample)
        return prediction_target(sample, noise, alpha, sigma, "v_prediction")

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def _schedule_of(alphas_cumprod: torch.Tensor) -> NoiseSchedule:
    """The :class:`NoiseSchedule` of a DDIM ``alphas_cumprod``. A beta schedule with betas above 1 (diffusers'
    tests use ``beta_end=2``) gives values outside ``[0, 1]`` or increasing, on which DDIM itself computes NaN;
    those are clamped to ``[0, 1]`` and made non-increasing (a documented fallback, finite where DDIM is not)."""
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).clamp(0.0, 1.0).cummin(0).values
    return NoiseSchedule.from_alphas_cumprod(ac)


def _step_count(num_inference_steps: object, num_train_timesteps: int) -> int:
    """``num_inference_steps`` as an int (integral floats accepted, as DDIM does), checked."""
    value = num_inference_steps
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"`num_inference_steps` must be an int, got {type(value).__name__}")
    if not float(value).is_integer():
        raise ValueError(f"`num_inference_steps` must be a whole number, got {value}")
    n = int(value)
    if not 1 <= n <= num_train_timesteps:
        raise ValueError(f"`num_inference_steps` must be in [1, {num_train_timesteps}] (num_train_timesteps), "
                         f"got {n}")
    return n


def _custom_timesteps(timesteps: Sequence[float], num_train_timesteps: int) -> np.ndarray:
    """Custom ``timesteps`` checked: numbers, strictly decreasing, in range; int64 when all are whole."""
    if isinstance(timesteps, str | bytes) or not hasattr(timesteps, "__len__"):
        raise TypeError(f"`timesteps` must be a sequence of numbers, got {type(timesteps).__name__}")
    ts = np.asarray([float(t) for t in (timesteps.tolist() if hasattr(timesteps, "tolist") else timesteps)],
                    dtype=np.float64)
    if ts.ndim != 1 or ts.size == 0 or not np.all(np.isfinite(ts)):
        raise ValueError("`timesteps` must be a non-empty list of finite numbers")
    if np.any(ts[1:] >= ts[:-1]):
        raise ValueError("`timesteps` must be strictly decreasing")
    if ts[0] > num_train_timesteps - 1 or ts[-1] < 0:
        raise ValueError(f"`timesteps` must lie in [0, {num_train_timesteps - 1}]")
    return ts.astype(np.int64) if np.all(ts == np.round(ts)) else ts


# ------------------------------------------------------------------------------------------------------------
# named configurations (fastdiff.samplers.registry builds these by name)
# ------------------------------------------------------------------------------------------------------------
#: fastdiff's few-step sampler per number of steps (``step_regimes`` of :data:`FEW_STEP_SETTINGS`), from 8 steps on
#: log-SNR grids from the top of the schedule, one model call per step. From 8 steps chosen on dev mixtures only
#: (``runs/few_step_v4/dev.py``: five anisotropic Gaussian mixtures with other seeds, and two with other dims /
#: component counts / betas, than ``benchmarks/few_step.py``'s oracles A-C, which only score the result; no setting
#: was tuned on them), by the number of dev cells (rms over all samples and over the samples in the right component,
#: per NFE) where it beats the best diffusers scheduler:
#:
#: * 1-7 steps: fastdiff v2's sampler (:data:`V2_UPDATE`, eps linear in sigma on the trailing grid), chosen on the
#:   trained digits model: ``fastdiff compare`` (100 images, rms to dpmpp_2m x 100) at 5 / 6 steps gives 0.061 /
#:   0.046 with it against 0.091 / 0.074 with :data:`LOW_STEP_ORDER3` and 0.074 / 0.058 with UniPC. On the dev
#:   mixtures :data:`LOW_STEP_ORDER3` won more cells (10 of 16 at 5-6 steps; v2: 2), so it stays a named option
#:   (``step_regimes=[[1, LOW_STEP_ORDER3], ...]``); the trained model decides the default.
#: * 8-14 steps: x0 linear in log-SNR + the 3-point log-SNR corrector (fastdiff v3's update) on a log-SNR grid
#:   warped to power 0.9 (slightly finer toward clean data): 8 of 16 dev cells at 8-10 steps (uniform log-SNR: 4,
#:   power 1.15: 5, Karras rho 10-20: 0-3, third-order predictor: 2). The last step extrapolates x0 linearly in
#:   alpha^2 instead of log-SNR (``final_interpolation``, fastdiff v6): x0 saturates toward clean data (for a
#:   Gaussian component of std ``c``, ``x0 = c z (1 + sigma^2 / (alpha^2 c^2))^(-1/2)``, linear in ``sigma^2 = 1 -
#:   alpha^2`` to first order), so a slope in log-SNR overshoots on the last step. On the dev mixtures
#:   (``runs/few_step_v6``; rms over all / right-component samples at 8 and 10 steps, 20 cells) it won 10 cells
#:   (v5: 9; geometric mean of the ratios to the best diffusers scheduler 1.040 vs 1.113) and improved every
#:   right-component cell; a DDIM last step (``lower_order_final``) won 11 (1.024) but measured order 1.79-1.92
#:   between 10 and 80 steps (``final_interpolation``: 2.18-2.84), x0 linear in sigma on the last step 9 (1.061).
#:   A last step onto clean data (the digits models: ``set_alpha_to_one=True``) keeps the log-SNR form (DDIM
#:   there): alpha^2 there gave rms to converged 0.0375 / 0.0206 at 8 / 10 steps vs 0.0373 / 0.0205.
#:   On a clean-data end the grid stops one log-SNR level above t = 0 (``evaluate_at_zero=False``, fastdiff v6)
#:   instead of spending the last model call at t = 0 (sigma / alpha = 0.01 on the digits models' linear betas):
#:   chosen on the trained digits model (the mixtures' ends are alphas_cumprod[0], where it changes nothing):
#:   ``fastdiff compare``-style (100 images, rms / FD to dpmpp_2m x 100) at 8 / 10 steps rms 0.0287 / 0.0162 vs
#:   0.0373 / 0.0205, FD 1.17 / 0.36 vs 2.22 / 0.66 (seed 0; seed 1 at 10: 0.0157 / 0.37 vs 0.0209 / 0.67). At
#:   20 steps (15+ regime, not changed) it gave rms 0.0036 vs 0.0042 on both seeds but FD 0.0037 / 0.0042 vs
#:   0.0035 / 0.0044, equal within noise, so that regime keeps the call at t = 0.
#: * 15+ steps: x0 quadratic in log-SNR (third order) + the 3-point corrector: 14 of 16 dev cells at 15-20 steps
#:   (v3: 10); its order on a refining grid is 3-4.
#: eps quadratic in log-SNR through the last three points (noise space, third order, no corrector; the DPM-Solver-3
#: multistep form of Lu et al. 2022 with exact coefficients) on the uniform log-SNR grid: the dev mixtures' choice
#: at 1-7 steps, not the default (see :data:`FEW_STEP_REGIMES`)
LOW_STEP_ORDER3: dict[str, Any] = {"solver_space": "noise", "interpolation": "log_snr", "solver_order": 3,
                                   "corrector_order": 0}
FEW_STEP_REGIMES: list[list[Any]] = [
    [1, {**V2_UPDATE, "solver_order": 2, "timestep_schedule": "auto"}],
    [8, {"solver_space": "data", "interpolation": "log_snr", "solver_order": 2, "corrector_order": 3,
         "log_snr_power": 0.9, "final_interpolation": "alphas_cumprod", "evaluate_at_zero": False}],
    [15, {"solver_space": "data", "interpolation": "log_snr", "solver_order": 3, "corrector_order": 3}],
]

#: :data:`FEW_STEP_REGIMES` with ``noise_space_steps=2`` at 8-14 steps (eps-space predictors for the first two steps):
#: a named option, not the default. On the dev mixtures (``runs/few_step_v5``) it sent fewer samples to the wrong
#: mixture component at 8-10 steps (dev cells won 11 of 20 vs 9); on the trained digits model it was worse at 8
#: steps (``fastdiff compare``-style, 100 images, rms to dpmpp_2m x 100: 0.0389 / 0.0423 vs the default's 0.0373 /
#: 0.0387 on seeds 0 / 1; equal at 10), so the default keeps the data-space start; ``benchmarks/few_step.py`` row
#: ``accel_ddim_noise_start``.
NOISE_START_REGIMES: list[list[Any]] = [FEW_STEP_REGIMES[0], [8, {**FEW_STEP_REGIMES[1][1], "noise_space_steps": 2}],
                                        FEW_STEP_REGIMES[2]]

#: fastdiff's default few-step sampler (registry name ``accel_ddim``): :data:`FEW_STEP_REGIMES` (log-SNR grids from
#: 8 steps); the top-level update (used by nothing the regimes do not override) is the 8-14-step one.
FEW_STEP_SETTINGS: dict[str, Any] = {"solver_space": "data", "interpolation": "log_snr", "corrector_order": 3,
                                     "timestep_schedule": "log_snr", "step_regimes": FEW_STEP_REGIMES}

#: fastdiff v3's default (registry name ``accel_ddim_v3``): the data-space predictor-corrector on a uniform log-SNR
#: grid from 8 steps, fastdiff v2's sampler below.
V3_SETTINGS: dict[str, Any] = {"solver_space": "data", "interpolation": "log_snr", "corrector_order": 3,
                               "timestep_schedule": "log_snr", "low_step_switch": 8}


def few_step_update_settings(num_inference_steps: int = 20) -> dict[str, Any]:
    """The update :data:`FEW_STEP_SETTINGS` uses at this many steps (keyword arguments of
    :func:`accelerated_step_coefficients`)."""
    settings = AcceleratedDDIMScheduler.from_config({}, **FEW_STEP_SETTINGS).settings_for(num_inference_steps)
    return {k: settings[k] for k in ("solver_space", "interpolation", "solver_order", "corrector_order",
                                     "max_step_ratio", "lower_order_final", "final_interpolation")}


def few_step_scheduler(config: Mapping[str, Any], **overrides: Any) -> AcceleratedDDIMScheduler:
    """fastdiff's default few-step sampler (registry name ``accel_ddim``) from a pipeline's scheduler config.

    :data:`FEW_STEP_SETTINGS` on the config (:data:`FEW_STEP_REGIMES`: the update and grid per number of steps, each
    one model call per step; below 8 steps fastdiff v2's sampler). From 8 steps the predictors integrate a polynomial in log-SNR through the last two or three
    predictions exactly (the DPM-Solver(++) multistep family, Lu et al. 2022, arXiv 2206.00927 / 2211.01095); the
    corrector re-integrates the step that led to each sample with the prediction made at it (UniPC's idea of a free
    corrector, Zhao et al. 2023, arXiv 2302.04867; here with exact quadrature weights, not UniPC's B(h)
    approximations); the grids are uniform in log-SNR (Lu et al. 2022's "logSNR" steps), warped to power 0.9 at 8-14
    steps, where the last step extrapolates x0 in alpha^2 (onto ``alphas_cumprod[0]``) and a clean-data end is
    not evaluated at t = 0. See :data:`FEW_STEP_REGIMES` for how each choice was measured (dev mixtures from 8
    steps; the trained digits model below 8 steps and for the clean-data end).
    """
    settings = {**FEW_STEP_SETTINGS, **overrides}
    return AcceleratedDDIMScheduler.from_config(config, **settings)


def v3_scheduler(config: Mapping[str, Any], **overrides: Any) -> AcceleratedDDIMScheduler:
    """fastdiff v3's default few-step sampler (registry name ``accel_ddim_v3``, :data:`V3_SETTINGS`)."""
    return AcceleratedDDIMScheduler.from_config(config, **{**V3_SETTINGS, **overrides})


def paper_scheduler(config: Mapping[str, Any], **overrides: Any) -> AcceleratedDDIMScheduler:
    """The paper's update verbatim (registry name ``accel_ddim_paper``): eps linear in alpha-bar, no step limit."""
    settings = {"solver_space": "noise", "interpolation": "alphas_cumprod", "max_step_ratio": None, **overrides}
    return AcceleratedDDIMScheduler.from_config(config, **settings)
