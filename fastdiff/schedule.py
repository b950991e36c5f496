"""Noise-schedule math: the only place in fastdiff where alpha, sigma, SNR and log-SNR are computed.

A :class:`NoiseSchedule` is built from any diffusers scheduler (or its config, or its
``alphas_cumprod``) and answers, at integer or continuous training timesteps ``t``:

* VP (DDPM family, Ho et al. 2020; Song et al. 2021): ``x_t = alpha_t x_0 + sigma_t eps`` with
  ``alpha_t^2 = alphas_cumprod[t]`` and ``alpha_t^2 + sigma_t^2 = 1``. Continuous ``t`` interpolates
  ``alphas_cumprod`` linearly between the integer points (finite and monotone, also at zero terminal
  SNR, where log-SNR is ``-inf`` at the last step).
* Flow matching (rectified flow, Liu et al. 2022; Lipman et al. 2023): ``x_t = (1 - s) x_0 + s eps`` with
  ``s = t / num_train_timesteps``: the diffusers convention, where a flow-match scheduler's timesteps are
  its (already shifted) sigmas times ``num_train_timesteps``.

It also holds the conversions between prediction types (``epsilon``, ``v_prediction``, ``sample``,
``flow``) that samplers, losses and the test oracle share. Everything is computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
KINDS = ("vp", "flow")

TimeLike = torch.Tensor | float | int | list | tuple


def _betas(config: Mapping[str, Any]) -> torch.Tensor:
    n = int(config.get("num_train_timesteps", 1000))
    trained = config.get("trained_betas")
    if trained is not None:
        return torch.as_tensor(trained, dtype=torch.float64)
    kind = config.get("beta_schedule", "linear")
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    if kind == "linear":
        return torch.linspace(start, end, n, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, betas capped at 0.999

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor(
            [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=torch.float64
        )
    if kind == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, n, dtype=torch.float64)) * (end - start) + start
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {kind!r}")


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last step has SNR exactly 0 (Lin et al. 2024, Alg. 1)."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root**2


def _config_dict(source: Any) -> dict[str, Any]:
    if hasattr(source, "config") and not isinstance(source, Mapping):
        cfg = dict(source.config)
        cfg.setdefault("_class_name", type(source).__name__)
        return cfg
    if isinstance(source, Mapping):
        return dict(source)
    raise TypeError(f"expected a diffusers scheduler or its config (a mapping), got {type(source).__name__}")


def _is_flow_config(cfg: Mapping[str, Any]) -> bool:
    return "FlowMatch" in str(cfg.get("_class_name", "")) or ("shift" in cfg and "beta_schedule" not in cfg)


class NoiseSchedule:
    """A VP or flow-matching noise schedule over training timesteps ``0 .. num_train_timesteps-1``.

    Build it with :meth:`from_config` (a diffusers scheduler or config) or :meth:`from_alphas_cumprod`.
    Every accessor takes ``t`` as a number, list or tensor of integer or fractional timesteps and returns a
    float64 tensor on ``t``'s device.
    """

    def __init__(
        self,
        kind: str = "vp",
        *,
        alphas_cumprod: torch.Tensor | None = None,
        num_train_timesteps: int | None = None,
        shift: float = 1.0,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.shift = float(shift)
        if kind == "vp":
            if alphas_cumprod is None:
                raise ValueError("a VP schedule needs alphas_cumprod")
            ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu().flatten()
            if ac.numel() < 2 or not torch.all((ac >= 0) & (ac <= 1)) or not torch.all(ac[1:] <= ac[:-1]):
                raise ValueError("alphas_cumprod must be a non-increasing sequence in [0, 1] of length >= 2")
            self.alphas_cumprod = ac
            self.num_train_timesteps = ac.numel()
        else:
            self.alphas_cumprod = None
            self.num_train_timesteps = int(num_train_timesteps or 1000)
            if self.shift <= 0:
                raise ValueError(f"shift must be > 0, got {shift}")

    # ----------------------------------------------------------------------------------------- builders
    @classmethod
    def from_config(cls, source: Any) -> NoiseSchedule:
        """From a diffusers scheduler instance or its config (VP: betas; flow match: ``shift``).

        Supports ``beta_schedule`` in ``("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")``,
        ``trained_betas`` and ``rescale_betas_zero_snr``; flow-match configs (``FlowMatch*`` schedulers).
        """
        cfg = _config_dict(source)
        if _is_flow_config(cfg):
            return cls("flow", num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
                       shift=float(cfg.get("shift", 1.0)))
        ac = torch.cumprod(1.0 - _betas(cfg), dim=0)
        if cfg.get("rescale_betas_zero_snr", False):
            ac = rescale_zero_terminal_snr(ac)
        return cls("vp", alphas_cumprod=ac)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor) -> NoiseSchedule:
        return cls("vp", alphas_cumprod=alphas_cumprod)

    # ----------------------------------------------------------------------------------------- accessors
    def _as_time(self, t: TimeLike) -> torch.Tensor:
        t = torch.as_tensor(t)
        t = t.to(torch.float64) if t.device.type != "mps" else t.float()
        upper = self.num_train_timesteps - 1 if self.kind == "vp" else self.num_train_timesteps
        if torch.any(t < 0) or torch.any(t > upper) or not torch.all(torch.isfinite(t)):
            raise ValueError(f"t must lie in [0, {upper}] for this {self.kind} schedule")
        return t

    def alpha_cumprod(self, t: TimeLike) -> torch.Tensor:
        """``alpha_t^2`` (VP: ``alphas_cumprod`` interpolated linearly; flow: ``(1 - s)^2``)."""
        return self.alpha(t) ** 2

    def alpha(self, t: TimeLike) -> torch.Tensor:
        """Signal scale ``alpha_t`` of ``x_t = alpha_t x_0 + sigma_t eps``."""
        t = self._as_time(t)
        if self.kind == "flow":
            return 1.0 - t / self.num_train_timesteps
        ac = self.alphas_cumprod.to(t.device, t.dtype)
        lo = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = t - lo
        return torch.lerp(ac[lo], ac[lo + 1], w).clamp(0, 1).sqrt()

    def sigma(self, t: TimeLike) -> torch.Tensor:
        """Noise scale ``sigma_t``."""
        if self.kind == "flow":
            return self._as_time(t) / self.num_train_timesteps
        return (1.0 - self.alpha(t) ** 2).clamp(min=0).sqrt()

    def snr(self, t: TimeLike) -> torch.Tensor:
        """``alpha_t^2 / sigma_t^2`` (``inf`` where sigma is 0, ``0`` at zero terminal SNR)."""
        return self.alpha(t) ** 2 / self.sigma(t) ** 2

    def log_snr(self, t: TimeLike) -> torch.Tensor:
        """``lambda_t = 2 log(alpha_t / sigma_t)``."""
        return 2 * (self.alpha(t).log() - self.sigma(t).log())

    def sigma_bar(self, t: TimeLike) -> torch.Tensor:
        """``sigma_t / alpha_t``: the variance-exploding noise level (Karras sigma)."""
        return self.sigma(t) / self.alpha(t)

    def shift_sigmas(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The flow-match timestep shift ``shift * s / (1 + (shift - 1) s)`` (SD3, Esser et al. 2024)."""
        return self.shift * sigmas / (1 + (self.shift - 1) * sigmas)

    def __repr__(self) -> str:
        if self.kind == "flow":
            return f"NoiseSchedule(kind='flow', num_train_timesteps={self.num_train_timesteps}, shift={self.shift})"
        return f"NoiseSchedule(kind='vp', num_train_timesteps={self.num_train_timesteps})"


# --------------------------------------------------------------------------------- prediction types
def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return prediction_type


def _bcast(v: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, device=like.device, dtype=like.dtype)
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim)) if v.ndim else v


def x0_and_eps(
    model_output: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor | float, sigma: torch.Tensor | float,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Data and noise estimates ``(x0_hat, eps_hat)`` from a model output at noise level (alpha, sigma).

    ``alpha``/``sigma`` are scalars or ``[B]`` tensors broadcast over the trailing dims of ``x``.
    ``flow`` means a velocity ``v = eps - x0`` (flow matching, ``alpha = 1 - sigma``).
    """
    check_prediction_type(prediction_type)
    a, s = _bcast(alpha, x), _bcast(sigma, x)
    if prediction_type == "epsilon":
        return (x - s * model_output) / a, model_output
    if prediction_type == "sample":
        return model_output, (x - a * model_output) / s
    if prediction_type == "v_prediction":
        return a * x - s * model_output, s * x + a * model_output
    return x - s * model_output, x + a * model_output  # flow velocity


def prediction_target(
    x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor | float, sigma: torch.Tensor | float,
    prediction_type: str,
) -> torch.Tensor:
    """The regression target a model of ``prediction_type`` is trained on."""
    check_prediction_type(prediction_type)
    a, s = _bcast(alpha, x0), _bcast(sigma, x0)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return a * noise - s * x0
    return noise - x0


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor | float,
              sigma: torch.Tensor | float) -> torch.Tensor:
    """``alpha x0 + sigma noise`` broadcast over the batch."""
    return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * noise
