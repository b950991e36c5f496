"""Loss weighting over noise levels (Min-SNR-gamma and friends) and training-timestep samplers.

Every weighting is a weight ``w_x0(t)`` on the *data-space* error ``||x0 - x0_hat||^2``; a model trained on
another target sees it converted through the schedule (``x_t = alpha x0 + sigma eps``):

* ``sample`` (x0):           ``||x0 - x0_hat||^2``                    -> ``w = w_x0``
* ``epsilon``:               ``||x0 - x0_hat||^2 = snr^-1 ||e - e_hat||^2`` -> ``w = w_x0 / snr``
* ``v_prediction`` (VP) and ``flow`` (velocity ``eps - x0``): ``||x0 - x0_hat||^2 = sigma^2 ||v - v_hat||^2``
  -> ``w = w_x0 sigma^2`` (for VP this is ``w_x0 / (snr + 1)``).

Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy",
arXiv:2303.09556) is ``w_x0 = min(snr, gamma)``. With ``snr = alpha^2 / sigma^2`` the three forms are

* x0:  ``min(alpha^2, gamma sigma^2) / sigma^2``  (``= gamma`` where ``alpha^2 >= gamma sigma^2``)
* eps: ``min(alpha^2, gamma sigma^2) / alpha^2``  (``= 1``     where ``alpha^2 <= gamma sigma^2``)
* v, flow velocity: ``min(alpha^2, gamma sigma^2)`` (rectified flow: ``min((1-s)^2, gamma s^2)``)

written so that no branch divides by zero: at zero terminal SNR (``alpha = 0``) eps gets 1 and v gets 0,
the limits of ``min(snr, g)/snr`` and ``min(snr, g)/(snr+1)``, where the naive forms (diffusers' example
scripts, diffusers issue #9451) compute 0/0.

``soft_min_snr`` (Crowson et al. 2024, HDiT, arXiv:2401.11605) replaces the min by
``w_x0 = snr gamma / (snr + gamma) = gamma alpha^2 / (alpha^2 + gamma sigma^2)``.

**Floor at zero terminal SNR.** For x0, v and flow targets Min-SNR's weight goes to 0 with the SNR, and at a
zero-terminal-SNR schedule (Lin et al. 2024, ``rescale_betas_zero_snr=True``) it is exactly 0 at the last
timestep: a v-model never trains the step every trailing-spacing sampler starts from (diffusers issue #9451,
"SNR gamma in v_prediction": the weight of the high-noise half is close to 0). ``floor`` lifts the clipped
SNR to at least ``floor``: ``w_x0 = max(min(snr, gamma), floor)`` (and ``max(snr gamma / (snr + gamma),
floor)`` for ``soft_min_snr``), i.e. ``max(min(snr, gamma), floor) / (snr + 1)`` for v. ``floor = 1`` is the
``max(min(SNR, 5), 1)`` proposed in TiankaiHang/Min-SNR-Diffusion-Training issue #2 and diffusers PR #5096
("flooring the SNR weights to 1"), which weights the v error at ``snr <= 1`` like the epsilon objective
does (``1 / (snr + 1)``, 1 at the terminal step). Epsilon weights are never 0 (``min(1, gamma / snr)``) and
are not floored. :func:`min_snr_floor` picks the training script's default: 1 for VP schedules with zero
terminal SNR, 0 (Hang et al. unchanged) otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from fastdiff.schedule import PREDICTION_TYPES, NoiseSchedule, check_prediction_type

WEIGHTINGS = ("none", "min_snr", "soft_min_snr")
TIMESTEP_SAMPLERS = ("uniform", "logit_normal", "mode")

_Form = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # (alpha^2, sigma^2, gamma) -> weight


def _min_snr_x0(a2: torch.Tensor, s2: torch.Tensor, g: float) -> torch.Tensor:
    clipped = a2 >= g * s2
    return torch.where(clipped, torch.full_like(a2, g), a2 / torch.where(clipped, 1.0, s2))


def _min_snr_eps(a2: torch.Tensor, s2: torch.Tensor, g: float) -> torch.Tensor:
    unclipped = a2 <= g * s2
    return torch.where(unclipped, torch.ones_like(a2), g * s2 / torch.where(unclipped, 1.0, a2))


def _min_snr_v(a2: torch.Tensor, s2: torch.Tensor, g: float) -> torch.Tensor:
    return torch.minimum(a2, g * s2)


def _soft_min_snr_x0(a2: torch.Tensor, s2: torch.Tensor, g: float) -> torch.Tensor:
    return g * a2 / (a2 + g * s2)


def _soft_min_snr_eps(a2: torch.Tensor, s2: torch.Tensor, g: float) -> torch.Tensor:
    return g * s2 / (a2 + g * s2)


def _soft_min_snr_v(a2: torch.Tensor, s2: torch.Tensor, g: float) -> torch.Tensor:
    return g * a2 * s2 / (a2 + g * s2)


def _ones(a2: torch.Tensor, s2: torch.Tensor, g: float) -> torch.Tensor:
    return torch.ones_like(a2)


# weighting -> prediction type -> closed form; "flow" shares the v form (both have x0 error = sigma * v error)
_FORMS: dict[str, dict[str, _Form]] = {
    "none": dict.fromkeys(PREDICTION_TYPES, _ones),
    "min_snr": {"sample": _min_snr_x0, "epsilon": _min_snr_eps, "v_prediction": _min_snr_v, "flow": _min_snr_v},
    "soft_min_snr": {"sample": _soft_min_snr_x0, "epsilon": _soft_min_snr_eps, "v_prediction": _soft_min_snr_v,
                     "flow": _soft_min_snr_v},
}


def min_snr_floor(floor: float | None, scheduler: object, weighting: str = "min_snr") -> float:
    """The floor on the clipped SNR: ``floor`` if given, else (``None``, auto) 1.0 for a VP schedule whose
    last ``alphas_cumprod`` is 0 (zero terminal SNR) and a weighting other than ``none``, else 0.0."""
    if floor is not None:
        if isinstance(floor, bool) or not (isinstance(floor, (int, float)) and math.isfinite(floor) and floor >= 0):
            raise ValueError(f"train.min_snr_floor must be null (auto) or a number >= 0, got {floor!r}")
        return float(floor)
    schedule = _schedule(scheduler)
    zero_terminal = schedule.kind == "vp" and float(schedule.alphas_cumprod[-1]) == 0.0
    return 1.0 if zero_terminal and weighting != "none" else 0.0


def _apply_floor(weight: torch.Tensor, a2: torch.Tensor, s2: torch.Tensor, prediction_type: str,
                 floor: float) -> torch.Tensor:
    """``w_x0 -> max(w_x0, floor)`` expressed in the target's space (x0: ``floor``; v, flow: ``floor sigma^2``)."""
    if floor <= 0 or prediction_type == "epsilon":
        return weight
    return torch.maximum(weight, floor * (s2 if prediction_type in ("v_prediction", "flow") else torch.ones_like(s2)))


def check_weighting(weighting: str) -> str:
    """``weighting`` if it is one of :data:`WEIGHTINGS`, else a ``ValueError`` listing them."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    return weighting


def _check_options(weighting: str, gamma: float, prediction_type: str | None) -> str:
    """Validate the weighting options shared by :func:`loss_weight` and :func:`diffusion_loss` (also where
    ``weighting="none"`` would not use them); returns ``weighting``."""
    check_weighting(weighting)
    if isinstance(gamma, bool) or not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
    if prediction_type is not None:
        check_prediction_type(prediction_type)
    return weighting


def _schedule(scheduler: object) -> NoiseSchedule:
    return scheduler if isinstance(scheduler, NoiseSchedule) else NoiseSchedule.from_config(scheduler)


def scheduler_prediction_type(scheduler: object) -> str:
    """The target a diffusers scheduler trains for: its ``prediction_type``, or ``flow`` for flow matching."""
    if _schedule(scheduler).kind == "flow":
        return "flow"
    if isinstance(scheduler, NoiseSchedule):
        return "epsilon"
    config = scheduler if isinstance(scheduler, Mapping) else scheduler.config
    return check_prediction_type(config.get("prediction_type", "epsilon"))


def loss_weight(
    timesteps: torch.Tensor,
    scheduler: object,
    weighting: str = "min_snr",
    gamma: float = 5.0,
    prediction_type: str | None = None,
    floor: float = 0.0,
) -> torch.Tensor:
    """Per-sample loss weights ``[B]`` (float64) for the MSE on ``prediction_type``'s target.

    Args:
        timesteps: training timesteps ``[B]`` (integer for VP schedulers, continuous for flow matching).
        scheduler: a diffusers scheduler, its config, or a :class:`~fastdiff.schedule.NoiseSchedule`.
        weighting: one of :data:`WEIGHTINGS`.
        gamma: the Min-SNR clip (Hang et al. use 5), > 0.
        prediction_type: ``epsilon``, ``v_prediction``, ``sample`` or ``flow``; default: the scheduler's.
        floor: lower bound on the clipped SNR (see the module docstring; 0: Hang et al. as published).
    """
    forms = _FORMS[_check_options(weighting, gamma, prediction_type)]
    schedule = _schedule(scheduler)
    prediction_type = check_prediction_type(prediction_type or scheduler_prediction_type(scheduler))
    alpha, sigma = schedule.alpha(timesteps), schedule.sigma(timesteps)
    a2, s2 = alpha**2, sigma**2
    weight = forms[prediction_type](a2, s2, float(gamma))
    return weight if weighting == "none" else _apply_floor(weight, a2, s2, prediction_type, float(floor))


def min_snr_weight(timesteps: torch.Tensor, scheduler: object, gamma: float = 5.0,
                   prediction_type: str | None = None) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023): ``loss_weight(..., weighting="min_snr")``."""
    return loss_weight(timesteps, scheduler, "min_snr", gamma, prediction_type)


def diffusion_loss(
    model_output: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: object,
    weighting: str = "min_snr",
    gamma: float = 5.0,
    prediction_type: str | None = None,
    reduction: str = "mean",
    floor: float = 0.0,
) -> torch.Tensor:
    """Weighted denoising MSE, for use inside any diffusers training loop.

    ``loss = mean_b( w(t_b) * mean_pixels((model_output_b - target_b)^2) )`` with ``w`` from
    :func:`loss_weight`; the MSE is computed in float32 (or the inputs' wider dtype).

    Args:
        model_output, target: ``[B, ...]`` prediction and regression target (e.g. from
            :func:`fastdiff.schedule.prediction_target`).
        timesteps: ``[B]`` training timesteps the samples were noised at.
        scheduler: the diffusers scheduler (or config / ``NoiseSchedule``) of the noising process.
        weighting: ``"none"``, ``"min_snr"`` or ``"soft_min_snr"``.
        gamma: Min-SNR clip value.
        prediction_type: override of the scheduler's ``prediction_type`` (``flow`` for flow matching).
        reduction: ``"mean"`` (a scalar) or ``"none"`` (per-sample ``[B]``).
        floor: lower bound on the clipped SNR of ``min_snr`` / ``soft_min_snr`` (see :func:`min_snr_floor`).
    """
    _check_options(weighting, gamma, prediction_type)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be one of ('mean', 'none'), got {reduction!r}")
    for name, value in (("model_output", model_output), ("target", target)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor [B, ...], got {_describe(value)}")
        if value.ndim < 2:
            raise ValueError(f"{name} must have a batch dimension and at least one sample dimension ([B, ...]), "
                             f"got shape {tuple(value.shape)}")
    if model_output.shape != target.shape:
        raise ValueError(f"model_output {tuple(model_output.shape)} and target {tuple(target.shape)} differ in shape")
    timesteps = torch.as_tensor(timesteps, device=model_output.device).reshape(-1)
    if timesteps.numel() != model_output.shape[0]:
        raise ValueError(f"timesteps must hold one value per sample ({model_output.shape[0]}), got {timesteps.numel()}")
    dtype = torch.promote_types(model_output.dtype, torch.float32)
    per_sample = (model_output.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(1)
    if weighting != "none":
        per_sample = per_sample * loss_weight(timesteps, scheduler, weighting, gamma, prediction_type, floor).to(dtype)
    return per_sample.mean() if reduction == "mean" else per_sample


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


# ------------------------------------------------------------------------------------------ timesteps
def sample_unit_times(
    batch_size: int,
    sampler: str = "uniform",
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``u in [0, 1)^B`` from a training-time density (diffusers' ``compute_density_for_timestep_sampling``).

    ``uniform``; ``logit_normal``: ``sigmoid(N(logit_mean, logit_std))`` (Esser et al. 2024, SD3);
    ``mode``: ``1 - u - mode_scale (cos^2(pi u / 2) - 1 + u)`` (SD3's mode sampling with heavy tails).
    """
    if sampler not in TIMESTEP_SAMPLERS:
        raise ValueError(f"timestep sampler must be one of {TIMESTEP_SAMPLERS}, got {sampler!r}")
    if sampler == "logit_normal":
        z = torch.randn(batch_size, generator=generator, device=device) * logit_std + logit_mean
        return torch.sigmoid(z)
    u = torch.rand(batch_size, generator=generator, device=device)
    if sampler == "mode":
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def sample_timesteps(
    batch_size: int,
    scheduler: object,
    sampler: str = "uniform",
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    **density_kwargs: float,
) -> torch.Tensor:
    """Training timesteps ``[B]`` for ``scheduler``: integers ``0..N-1`` (VP) or ``shift(u) * N`` (flow match).

    ``u`` comes from :func:`sample_unit_times` (``density_kwargs``: ``logit_mean``, ``logit_std``,
    ``mode_scale``); VP timesteps are ``floor(u N)``, so ``uniform`` is the usual ``randint(0, N)``.
    """
    schedule = _schedule(scheduler)
    u = sample_unit_times(batch_size, sampler, generator=generator, device=device, **density_kwargs)
    n = schedule.num_train_timesteps
    if schedule.kind == "flow":
        return schedule.shift_sigmas(u.double()).float() * n
    return (u * n).long().clamp(0, n - 1)
