"""Noise-schedule math: the only place in fastdiff where alpha, sigma, SNR and log-SNR are computed.

A :class:`NoiseSchedule` is built from any diffusers scheduler (or its config, or its
``alphas_cumprod``) and answers, at integer or continuous training timesteps ``t``:

* VP (DDPM family, Ho et al. 2020; Song et al. 2021): ``x_t = alpha_t x_0 + sigma_t eps`` with
  ``alpha_t^2 = alphas_cumprod[t]``, the scheduler's own ``alphas_cumprod`` (read, never re-derived from
  its config, so any beta schedule diffusers implements works), and ``alpha_t^2 + sigma_t^2 = 1``. Continuous ``t`` interpolates
  ``alphas_cumprod`` linearly between the integer points (finite and monotone, also at zero terminal
  SNR, where log-SNR is ``-inf`` at the last step).
* Flow matching (rectified flow, Liu et al. 2022; Lipman et al. 2023): ``x_t = (1 - s) x_0 + s eps`` with
  ``s = t / num_train_timesteps``: the diffusers convention, where a flow-match scheduler's timesteps are
  its (already shifted) sigmas times ``num_train_timesteps``.

It also holds the conversions between prediction types (``epsilon``, ``v_prediction``, ``sample``,
``flow``) that samplers, losses and the test oracle share. Everything is computed in float64 (from the
scheduler's float32 ``alphas_cumprod``, the values diffusers itself samples and trains with).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
KINDS = ("vp", "flow")
_TERMINAL_CLAMP = 2.0**-24  # diffusers' smallest terminal alpha_bar (zero-SNR schedules of DPM-Solver & co.)

TimeLike = torch.Tensor | float | int | list | tuple


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


def _scheduler_from_config(cfg: Mapping[str, Any]) -> Any:
    """The diffusers scheduler a VP config describes: the class its ``_class_name`` names when diffusers has
    it, else ``DDPMScheduler`` (the DDPM family's reference, which implements every beta schedule), built
    from the config's entries that class takes."""
    import diffusers

    named = getattr(diffusers, str(cfg.get("_class_name", "")), None)
    is_scheduler = isinstance(named, type) and issubclass(named, diffusers.SchedulerMixin)
    cls = named if is_scheduler else diffusers.DDPMScheduler
    params = inspect.signature(cls.__init__).parameters
    try:
        return cls(**{k: v for k, v in cfg.items() if k in params})
    except NotImplementedError as err:  # diffusers' answer to an unknown beta_schedule
        raise ValueError(f"beta_schedule {cfg.get('beta_schedule')!r} is not implemented by diffusers' "
                         f"{cls.__name__}") from err


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
            # non-increasing up to 2**-24: DPM-Solver-type schedulers clamp a zero terminal alpha_bar to 2**-24,
            # which can lie just above the step before it
            if (ac.numel() < 2 or not torch.all((ac >= 0) & (ac <= 1))
                    or not torch.all(ac[1:] <= ac[:-1] + _TERMINAL_CLAMP)):
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
        """From a diffusers scheduler instance or its config: the scheduler is the source of truth.

        VP: the scheduler's own ``alphas_cumprod``, so every beta schedule diffusers implements (``linear``,
        ``scaled_linear``, ``squaredcos_cap_v2``, ``sigmoid``, ``laplace``, ``trained_betas``,
        ``rescale_betas_zero_snr`` ...) is read, never re-derived. A config mapping is first turned into the
        scheduler it describes (the class named by ``_class_name``, else ``DDPMScheduler``). Flow matching
        (``FlowMatch*`` schedulers, or a config with ``shift`` and no ``beta_schedule``): ``shift`` and
        ``num_train_timesteps`` from the config.
        """
        cfg = _config_dict(source)
        if _is_flow_config(cfg):
            return cls("flow", num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
                       shift=float(cfg.get("shift", 1.0)))
        scheduler = _scheduler_from_config(cfg) if isinstance(source, Mapping) else source
        alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
        if alphas_cumprod is None:
            raise TypeError(
                f"{type(scheduler).__name__} has no alphas_cumprod: expected a DDPM-family (VP) scheduler or a "
                "flow-matching one"
            )
        return cls("vp", alphas_cumprod=alphas_cumprod)

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
