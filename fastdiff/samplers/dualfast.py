"""DualFast (Yu, Luo, Wang, Zhao, "DualFast: Dual-Speedup Framework for Fast Sampling of Diffusion Models",
arXiv:2506.13058) on DDIM, DPM-Solver++, UniPC (the paper's three) and fastdiff's accelerated DDIM.

DualFast splits the sampling error into discretisation error (what higher-order solvers reduce) and the network's
approximation error, which it finds *smaller at larger (noisier) steps*. Training-free and with no extra model
evaluation, it mixes the current noise prediction with one already made at a noisier step ``tau``.

**The paper's form** (``dualfast_variant="paper"``, the default). Sources, formula by formula (the method section of
the paper itself was not readable from this workplace; the reviews quote it):

1. Eq. 12 (quoted in the ICLR 2025 review thread, OpenReview id UACXMKAz0Z: "the coefficient of eps(x_tau) in
   equation (12) is non-positive"): ``eps_new = (1 + c_t) eps(x_t, t) - c_t eps(x_tau, tau) = eps_t + c_t (eps_t -
   eps_tau)``, with ``c_t >= 0`` (the same review, on the paper's Fig. 8).
2. Where it enters (the same review on Eq. 17: "x0 and eps are equivalent by equation (17), yet only the explicit
   eps is replaced"): only the solver's explicit first-order noise term. For DDIM ``x_s = alpha_s x0(eps_t) +
   sigma_s eps_new``: ``x0`` keeps the uncorrected prediction, so the step changes by ``sigma_s c_t (eps_t -
   eps_tau)``. For DPM-Solver++ and UniPC (data-prediction solvers) the first-order part of the update is the same
   ``alpha_s x0_t + sigma_s eps_t`` written in DDIM's form; fastdiff adds the same ``sigma_s c_t (eps_t - eps_tau)``
   to their predictor (and, for UniPC, to the corrector that recomputes the same step), leaving the higher-order
   differences uncorrected (fastdiff's reading for these two; the reviews name only DDIM's form).
3. ``tau`` (the paper's introduction and abstract: "a larger step", whose approximation error is smaller):
   ``dualfast_reference="previous"`` (default) takes ``eps_tau`` from the previous (noisier) step, ``"first"`` from
   the first, noisiest sampling step. Which one the paper uses could not be read here; the default is the one that
   measured better (below).
4. ``c_t`` (the issue's summary of the reviews and the reading notes of the PDF in ``shared/anchors.md``: it grows
   toward low noise): ``c_t = dualfast_scale * (1 - t / T)``, linear in the training timestep ``t``; the linear
   shape is fastdiff's choice. (An earlier note in ``shared/anchors.md`` says the coefficient "decays along the
   trajectory"; that schedule, ``scale t / T``, was measured too, below.)

Re-checked 2026-12-01: of the arXiv HTML (v1) only the abstract and introduction could be read here, and no official
code was found (GitHub search for "DualFast"); the four points above stay secondary-source readings.

The added term does not shrink with the step size (it adds up over the steps), so DualFast is a few-step method.
Defaults (``dualfast_scale=0.1``, ``"previous"``) were chosen on a dev oracle (scales 0.05-0.5, both references) and
on dev seeds of the digits model; ``benchmarks/few_step.py`` reports the measured rows. Re-measured in this form on
the digits model (``runs/few_step_v5``, 128 images, paired noise, DPM-Solver++ at 5 steps, FD 17.94 without): every
setting of the paper's sign raises FD-digits: scale 0.05 / 0.2 / 0.5 with ``c_t`` growing and tau the previous step
18.05 / 18.37 / 19.11, tau the first step 18.05 / 18.40 (scale 0.05 / 0.2), ``c_t`` constant 0.1 18.32 / 18.31
(previous / first), falling 0.1 (``scale t / T``) 18.10 / 18.08. On the exact-score oracle it raises the error of
every base too (few_step.md, "DualFast on an exact score"). The opposite sign lowers both (next variant).

**fastdiff's "interpolate" variant** (``dualfast_variant="interpolate"``): the same placement (the explicit noise
term only) with the opposite sign and a constant weight, ``eps_new = (1 - c) eps_t + c eps_tau``, ``c =
dualfast_scale``: the step moves toward the noisier step's prediction, whose approximation error the paper finds
smaller. Measured on the digits model (the sweep above, seed 0): DPM-Solver++ 5 steps 17.59 / 16.95 at ``c`` 0.1 /
0.3 (tau the first step, 0.2: 17.22; ``c`` growing 0.3: 17.37; falling 0.3: 17.47), 10 steps 10.08 -> 9.87 (0.3);
UniPC 5 steps 16.42 -> 15.69 (0.3); seed 1: 5 steps lower for DDIM, DPM-Solver++ and UniPC at 0.3 and 0.5 (-0.6 to
-1.6), 10 steps lower for DDIM, within +-0.1 (0.3) and +0.3..+0.4 (0.5) for DPM-Solver++ / UniPC. On the exact score
it lowers the error of DDIM, DPM-Solver++ and UniPC at 5-20 steps and raises the accelerated DDIM's from 15 steps.
``benchmarks/few_step.py`` measures it at ``dualfast_scale=0.3`` (rows ``*_dualfast_interpolate``). A measured
option, not the paper's form.

**fastdiff's earlier variant** (``dualfast_variant="prediction"``): ``eps~ = eps_t + c_t (eps_t - eps_tau)`` with
``c_t = dualfast_scale * t / T`` (largest at the noisy end), converted back to the model's prediction type so the
solver integrates the corrected prediction (``x0`` included). Kept as a named option, measured side by side in
``benchmarks/few_step.py``.

With ``dualfast_scale = 0`` every scheduler here is step for step identical to its base. Every class keeps its
base's ``set_timesteps`` signature (``timesteps=`` / ``sigmas=`` pass through pipelines as for the base).
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from typing import Any

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from ..schedule import prediction_target, x0_and_eps
from .accelerated_ddim import AcceleratedDDIMScheduler

REFERENCES = ("first", "previous")
VARIANTS = ("paper", "prediction", "interpolate")
MIN_STEPS = 5  # the "prediction" variant broke samples of the embedded digits model below 5 steps
# chosen on a dev oracle and dev seeds of the digits model (module docstring): 0.1 / "previous" keep the change on
# an exact score below the base solver's own error at 5-40 steps, where "first" and larger scales did not
DUALFAST_DEFAULTS: dict[str, Any] = {"dualfast_scale": 0.1, "dualfast_reference": "previous",
                                     "dualfast_variant": "paper"}

__all__ = [
    "AcceleratedDDIMDualFastScheduler",
    "DDIMDualFastScheduler",
    "DPMSolverMultistepDualFastScheduler",
    "DualFastMixin",
    "UniPCMultistepDualFastScheduler",
    "dualfast_coefficient",
]


def dualfast_coefficient(scale: float, timestep: float, num_train_timesteps: int, variant: str = "paper") -> float:
    """The signed weight ``c_t`` on ``eps_t - eps_tau``: ``scale (1 - t / T)`` for the paper's form (grows toward
    low noise), ``scale t / T`` for fastdiff's ``"prediction"`` variant (largest at the noisy end), ``-scale``
    (constant, toward ``eps_tau``) for fastdiff's ``"interpolate"`` variant."""
    if variant == "interpolate":
        return -float(scale)
    frac = float(timestep) / float(num_train_timesteps)
    return float(scale) * ((1.0 - frac) if variant == "paper" else frac)


class _Levels:
    """What DualFast needs from a base scheduler at one step: the model input's ``(alpha_t, sigma_t)`` and the
    coefficient of eps in the step's explicit first-order term (``None``: off the grid, no correction)."""

    __slots__ = ("alpha", "sigma", "noise_coef")

    def __init__(self, alpha: float, sigma: float, noise_coef: float | None) -> None:
        self.alpha, self.sigma, self.noise_coef = alpha, sigma, noise_coef


class DualFastMixin:
    """Adds DualFast to a scheduler's ``step`` (put it first in the bases). Subclasses implement
    :meth:`_dualfast_levels`, read *before* the base step runs."""

    _dualfast_reference_eps: torch.Tensor | None = None
    _dualfast_previous_eps: torch.Tensor | None = None
    _dualfast_pending: torch.Tensor | None = None  # the term added to the last predictor output (UniPC's corrector)

    def _dualfast_levels(self, timestep: Any, step_kwargs: dict[str, Any]) -> _Levels:
        raise NotImplementedError

    def _dualfast_reset(self) -> None:
        self._dualfast_reference_eps = self._dualfast_previous_eps = self._dualfast_pending = None
        cfg = self.config
        if cfg.dualfast_variant == "prediction" and cfg.dualfast_scale > 0 and len(self.timesteps) < MIN_STEPS:
            warnings.warn(f"DualFast (prediction variant) with {len(self.timesteps)} steps: below {MIN_STEPS} steps "
                          "it broke samples of the embedded digits model; consider dualfast_scale=0", stacklevel=3)

    def _dualfast_step(self, base_step: Any, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
                       *args: Any, **kwargs: Any) -> Any:
        if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
            bad = "model_output" if not isinstance(model_output, torch.Tensor) else "sample"
            raise TypeError(f"`{bad}` must be a torch.Tensor, got {type(locals()[bad]).__name__}")
        cfg = self.config
        if cfg.dualfast_scale == 0:
            return base_step(self, model_output, timestep, sample, *args, **kwargs)
        t = float(timestep.item() if isinstance(timestep, torch.Tensor) else timestep)
        step_kwargs = dict(zip(list(inspect.signature(base_step).parameters)[4:], args)) | kwargs
        lv = self._dualfast_levels(timestep, step_kwargs)
        x = sample.float() if sample.dtype in (torch.float16, torch.bfloat16) else sample
        x0, eps = x0_and_eps(model_output.to(x.dtype), x, lv.alpha, lv.sigma, cfg.prediction_type)
        if self._dualfast_reference_eps is None or cfg.dualfast_reference == "previous":
            reference = self._dualfast_previous_eps if cfg.dualfast_reference == "previous" else None
        else:
            reference = self._dualfast_reference_eps
        if self._dualfast_reference_eps is None:
            self._dualfast_reference_eps = eps
        self._dualfast_previous_eps = eps
        c = dualfast_coefficient(cfg.dualfast_scale, t, cfg.num_train_timesteps, cfg.dualfast_variant)
        usable = reference is not None and c != 0.0 and lv.alpha > 0 and lv.noise_coef is not None
        if cfg.dualfast_variant == "prediction":
            if usable:
                eps_corrected = eps + c * (eps - reference)
                x0 = x0_and_eps(eps_corrected, x, lv.alpha, lv.sigma, "epsilon")[0]
                model_output = prediction_target(x0, eps_corrected, lv.alpha, lv.sigma,
                                                 cfg.prediction_type).to(model_output.dtype)
            return base_step(self, model_output, timestep, sample, *args, **kwargs)
        out = base_step(self, model_output, timestep, sample, *args, **kwargs)
        if not usable:
            self._dualfast_pending = None
            return out
        term = (lv.noise_coef * c) * (eps - reference)
        self._dualfast_pending = term
        if isinstance(out, tuple):
            return (out[0] + term.to(out[0].dtype), *out[1:])
        out.prev_sample = out.prev_sample + term.to(out.prev_sample.dtype)
        return out


def _with_dualfast(base: type) -> Any:
    """Decorator for ``class X(DualFastMixin, base)``: an ``__init__`` taking ``base``'s arguments plus the DualFast
    ones (all saved in the config), and ``step`` / ``set_timesteps`` with ``base``'s signatures, so diffusers
    pipelines pass them the same keyword arguments (``eta``, ``generator``, ``timesteps``, ``sigmas``)."""

    def decorate(cls: type) -> type:
        base_init, base_step, base_set_timesteps = base.__init__, base.step, base.set_timesteps

        def __init__(self: Any, *args: Any, dualfast_scale: float = DUALFAST_DEFAULTS["dualfast_scale"],
                     dualfast_reference: str = DUALFAST_DEFAULTS["dualfast_reference"],
                     dualfast_variant: str = DUALFAST_DEFAULTS["dualfast_variant"], **kwargs: Any) -> None:
            if isinstance(dualfast_scale, bool) or not isinstance(dualfast_scale, int | float):
                raise TypeError(f"dualfast_scale must be a number, got {type(dualfast_scale).__name__}")
            if not dualfast_scale >= 0 or math.isinf(dualfast_scale):
                raise ValueError(f"dualfast_scale must be a finite number >= 0, got {dualfast_scale}")
            if dualfast_reference not in REFERENCES:
                raise ValueError(f"dualfast_reference must be one of {REFERENCES}, got {dualfast_reference!r}")
            if dualfast_variant not in VARIANTS:
                raise ValueError(f"dualfast_variant must be one of {VARIANTS}, got {dualfast_variant!r}")
            base_init(self, *args, **kwargs)
            self.register_to_config(dualfast_scale=float(dualfast_scale), dualfast_reference=dualfast_reference,
                                    dualfast_variant=dualfast_variant)

        params = list(inspect.signature(base_init).parameters.values())
        extra = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in DUALFAST_DEFAULTS.items()]
        __init__.__signature__ = inspect.Signature(params + extra)  # what ConfigMixin.from_config reads

        @functools.wraps(base_step)
        def step(self: Any, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any,
                 **kwargs: Any) -> Any:
            return self._dualfast_step(base_step, model_output, timestep, sample, *args, **kwargs)

        @functools.wraps(base_set_timesteps)  # keeps the signature pipelines inspect for timesteps= / sigmas=
        def set_timesteps(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = base_set_timesteps(self, *args, **kwargs)
            self._dualfast_reset()
            return result

        step.__doc__ = f"``{base.__name__}.step`` plus DualFast (see :mod:`fastdiff.samplers.dualfast`)."
        cls.__init__, cls.step, cls.set_timesteps = __init__, step, set_timesteps
        return cls

    return decorate


def _alpha_sigma(alpha_cumprod: float) -> tuple[float, float]:
    return math.sqrt(alpha_cumprod), math.sqrt(max(1.0 - alpha_cumprod, 0.0))


@_with_dualfast(DDIMScheduler)
class DDIMDualFastScheduler(DualFastMixin, DDIMScheduler):
    """diffusers' ``DDIMScheduler`` with DualFast: ``x_s = alpha_s x0_t + sqrt(1 - abar_s - std^2) eps_new + std z``
    (DDIM's Eq. 12 with ``eta``; the noise level comes from the scheduler's own ``alphas_cumprod``)."""

    def _dualfast_levels(self, timestep: Any, step_kwargs: dict[str, Any]) -> _Levels:
        t = int(timestep)
        prev = t - self.config.num_train_timesteps // self.num_inference_steps
        abar_t = float(self.alphas_cumprod[t])
        abar_s = float(self.alphas_cumprod[prev]) if prev >= 0 else float(self.final_alpha_cumprod)
        eta = float(step_kwargs.get("eta", 0.0))
        var = float(self._get_variance(t, prev)) * eta * eta if eta else 0.0
        return _Levels(*_alpha_sigma(abar_t), math.sqrt(max(1.0 - abar_s - var, 0.0)))


class _SigmaGridDualFast(DualFastMixin):
    """DualFast's levels from the ``sigmas`` of diffusers' multistep solvers (any spacing: Karras, exponential, custom)."""

    def _dualfast_levels(self, timestep: Any, step_kwargs: dict[str, Any]) -> _Levels:
        i = self.step_index if self.step_index is not None else self.index_for_timestep(timestep)
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self.sigmas[i])
        _, sigma_s = self._sigma_to_alpha_sigma_t(self.sigmas[i + 1])
        return _Levels(float(alpha_t), float(sigma_t), float(sigma_s))


@_with_dualfast(DPMSolverMultistepScheduler)
class DPMSolverMultistepDualFastScheduler(_SigmaGridDualFast, DPMSolverMultistepScheduler):
    """diffusers' ``DPMSolverMultistepScheduler`` (DPM-Solver++ 2M/3M) with DualFast added to its update."""


@_with_dualfast(UniPCMultistepScheduler)
class UniPCMultistepDualFastScheduler(_SigmaGridDualFast, UniPCMultistepScheduler):
    """diffusers' ``UniPCMultistepScheduler`` with DualFast in its predictor and in the corrector that recomputes
    the same step (so the correction is not dropped when UniC re-derives ``x_s`` from the previous sample)."""

    def multistep_uni_c_bh_update(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        corrected = super().multistep_uni_c_bh_update(*args, **kwargs)
        if self.config.dualfast_variant != "prediction" and self._dualfast_pending is not None:
            corrected = corrected + self._dualfast_pending.to(corrected.dtype)
        return corrected


@_with_dualfast(AcceleratedDDIMScheduler)
class AcceleratedDDIMDualFastScheduler(DualFastMixin, AcceleratedDDIMScheduler):
    """:class:`~fastdiff.samplers.accelerated_ddim.AcceleratedDDIMScheduler` with DualFast in its first-order
    noise term (``sigma_next``; ``eps_scale`` when stochastic)."""

    def _dualfast_levels(self, timestep: Any, step_kwargs: dict[str, Any]) -> _Levels:
        t = float(timestep)
        i = self.index_for_timestep(t)
        alpha, sigma = self.noise_schedule.alpha(t).item(), self.noise_schedule.sigma(t).item()
        if i is None or self.coefficients is None:
            return _Levels(alpha, sigma, None)
        c = self.coefficients
        return _Levels(alpha, sigma, (c.eps_scale if self.config.stochastic else c.sigma_next)[i].item())
