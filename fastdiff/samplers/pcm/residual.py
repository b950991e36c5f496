"""Iterate-residual PCM [fastdiff]: a PCM correction usable in every switching round, exactly zero at the fixed point.

Why. The paper's PCM (:mod:`fastdiff.samplers.pcm`, So et al. 2025) sees only a trajectory point and its timestep,
``f_PCM(x_k, t_k)``. Started from the fixed point ``X*`` it still moves it (the shipped digits PCM by rms ~0.05),
so only its first round helps and the rounds after it must be the base model's. The paper conditions the PCM on
nothing else (its eq. 2 / Fig. 2: ``Phi(X^k; theta_PCM)``, the base architecture; sources as in
:mod:`fastdiff.samplers.pcm`); this module is fastdiff's own option, not the paper's method.

What. Round ``r >= jump_rounds`` of the switch evaluates, on the same window and in the same batched call,

    (R1)  f_r(x_k) = f_base(x_k, t_k) + s_k N_theta([u_k, rho_k / s_k], t_k),    rho = U^r - U^{r-1},  s_k = rms(rho_k)

with ``U^r`` the model inputs of round ``r`` (``input_scale * X^r``) and ``rho`` the last update of the iterate: the
correction is **exactly zero** when the iterate stops moving (so ``X*`` is a fixed point of every round, whatever
``theta``) and positively homogeneous in ``rho`` (a correction learnt on large updates scales down with them,
as the linearised ideal ``-(dF/dx - 1) e / b`` scales with the error ``e``). The first ``jump_rounds`` rounds are
the paper's PCM (its own checkpoint, :class:`~fastdiff.samplers.pcm.PicardConsistencyModel`), whose update has no
predecessor. ``N_theta`` is the base architecture with a second input channel (zero-initialised), its first
``num_layers`` blocks initialised from the base and a zero-initialised output projection (so ``N = 0`` at the
start of training), stored in float16.

Training (eq. 2 of the paper with (R1) as the model): cached sequences ``X^0`` (the engine's initial iterate),
``X^1 = Phi(X^0; theta_jump)`` (the round the corrector follows at inference), ``X^{r+1} = Phi(X^r; theta_base)``;
the loss is ``alpha(r) D(X*, Phi(X^r; f_r))`` with ``rho = X^r - X^{r-1}`` and the base outputs at ``X^r`` cached.
Inference is :class:`ResidualSwitch`, a :class:`~fastdiff.samplers.pcm.ModelSwitch` whose rounds remember the
previous round's inputs. ``mode="switch"``: the corrected rounds are switching rounds (the window is fixed; they
accept nothing and the base model finishes the solve). ``mode="accept"``: they are the solver's first
``residual_rounds`` rounds after the jump (through the solver's ``base_phase`` hook), ``rho`` taken per timestep,
with no correction on the window's first point, whose input is converged, so the one exact step per round stays
exact. Either way ``tolerance=0`` reproduces sequential sampling.

Measured (``benchmarks/pcm.py --residual``, digits DDIM-25/50/100, held-out seeds): after the jump, three rounds of
base + corrector leave 1.3x / 2.0x / 2.2x less trajectory error than three base rounds (DDIM-25 / 50 / 100), but
the rounds to rms 1e-3 of sequential change by -1 to +2 depending on the case and solver: no consistent saving,
so no corrector is shipped (train one with ``fastdiff train --config digits_pcm_residual``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..steps import Denoiser, StepMap, model_input
from . import (
    CONFIG_NAME,
    ModelSwitch,
    PicardConsistencyModel,
    Trajectories,
    cached_fingerprint,
    digits_denoiser,
    picard_update,
    resolve_pcm,
    switch_lambdas,
)

WEIGHTS_NAME = "corrector.safetensors"
FORMAT = "fastdiff-pcm-residual-1"
SCALE_FLOOR = 1e-12
MODES = ("switch", "accept")


def residual_network(base: nn.Module, num_layers: int | None = None) -> nn.Module:
    """``N_theta`` of (R1): the base architecture with ``in_channels + 1`` inputs (the residual direction), its first
    ``num_layers`` blocks copied from ``base``, the new input channel and the output projection zero-initialised."""
    cfg = dict(base.config)
    layers = int(cfg["num_layers"] if num_layers is None else num_layers)
    if not 1 <= layers <= int(cfg["num_layers"]):
        raise ValueError(f"num_layers must be in 1..{cfg['num_layers']}, got {num_layers!r}")
    c = int(cfg["in_channels"])
    net = type(base).from_config({**cfg, "in_channels": 2 * c, "out_channels": cfg.get("out_channels") or c,
                                  "num_layers": layers})
    own = net.state_dict()
    for name, v in base.state_dict().items():
        if name not in own:
            continue  # blocks past num_layers
        if own[name].shape == v.shape:
            own[name] = v.clone()
        elif v.ndim == 4 and own[name].shape[1] == 2 * v.shape[1]:  # the patch embedding's input channels
            own[name] = torch.cat([v, torch.zeros_like(v)], 1)
    for name in own:
        if name.startswith("proj_out"):
            own[name] = torch.zeros_like(own[name])
    net.load_state_dict(own)
    return net


class ResidualCorrector(nn.Module):
    """A module that quacks like the base denoiser network: ``forward(hidden_states, ...)`` returns
    ``base(...) + s N([u, rho / s], ...)`` ((R1); only the correction when ``base`` is ``None``), with the residual
    ``rho`` (``[B, C, ...]``, the model-input batch without CFG duplication) set in :attr:`residual` before the call."""

    def __init__(self, inner: nn.Module, base: nn.Module | None = None) -> None:
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "_base", base)  # not a submodule: its weights are not the corrector's
        self.residual: torch.Tensor | None = None
        self.config = base.config if base is not None else inner.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.inner.parameters()).dtype

    def forward(self, hidden_states: torch.Tensor, *args: Any, return_dict: bool = True, **kwargs: Any):
        rho = self.residual
        if rho is None:
            raise RuntimeError("ResidualCorrector: set .residual before calling it")
        rho = rho.to(hidden_states)
        if rho.shape[0] != hidden_states.shape[0]:  # CFG batch [uncond; cond]: the same residual for both halves
            rho = rho.repeat(hidden_states.shape[0] // rho.shape[0], *([1] * (rho.ndim - 1)))
        s = rho.flatten(1).pow(2).mean(1).sqrt().view(-1, *([1] * (rho.ndim - 1)))
        direction = rho / s.clamp(min=SCALE_FLOOR)
        out = s * self.inner(torch.cat([hidden_states, direction], 1), *args, return_dict=False, **kwargs)[0]
        if self._base is not None:
            out = self._base(hidden_states, *args, return_dict=False, **kwargs)[0] + out
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=out)
        return (out,)


@dataclass(frozen=True)
class ResidualSwitch(ModelSwitch):
    """Model switching with the paper's PCM for the first ``jump_rounds`` rounds and (R1) for the rest.

    ``accelerated(lam)`` gives the jump PCM's denoiser; ``corrected(rho)`` the denoiser of (R1) for residual
    ``rho`` (model-input space, the window's layout). Each solve starts at round 0, which resets the memory of the
    previous round's inputs."""

    corrected: Callable[[torch.Tensor], Denoiser] | None = None
    jump_rounds: int = 1
    base_rounds: int = 0
    _last: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not callable(self.corrected):
            raise TypeError("corrected must be callable as corrected(residual) -> denoiser")
        if not isinstance(self.jump_rounds, int) or not 1 <= self.jump_rounds <= len(self.lambdas):
            raise ValueError(f"jump_rounds must be an int in 1..{len(self.lambdas)}, got {self.jump_rounds!r}")
        if not isinstance(self.base_rounds, int) or self.base_rounds < 0:
            raise ValueError(f"base_rounds must be an int >= 0, got {self.base_rounds!r}")

    def denoiser(self, k: int, base: Denoiser) -> Denoiser:
        if k == 0:
            self._last.clear()
        inner = super().denoiser(k, base) if k < self.jump_rounds else None

        def f(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            prev_u = self._last.get("u")
            self._last["u"] = u.detach().clone()
            self._remember(u, t)
            if k < self.jump_rounds:
                return inner(u, t)
            rho = u - prev_u if prev_u is not None and prev_u.shape == u.shape else torch.zeros_like(u)
            return self.corrected(rho)(u, t)

        return f

    def _remember(self, u: torch.Tensor, t: torch.Tensor) -> None:
        """The latest inputs at each timestep (items of one trajectory point share their timestep; a window padded
        past the last step repeats the last timestep, so only a timestep's first ``B`` items are kept)."""
        by_t = self._last.setdefault("by_t", {})
        batch = int((t == t[0]).sum())
        for v in t.unique().tolist():
            by_t[v] = u[t == v][:batch].detach().clone()

    def base_phase(self, base: Denoiser) -> Denoiser:
        """The denoiser of the rounds after the switch (the solver's hook): for ``base_rounds`` rounds (R1) with
        ``rho`` = each point's inputs minus its previous inputs (zero for a point not evaluated before) and no
        correction on the window's first point (its input is converged: the solver's one exact step per round
        stays exact, so points are accepted as usual and ``tolerance=0`` is still sequential sampling); then
        ``base``."""
        if self.base_rounds == 0:
            return base
        calls = [0]

        def f(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if calls[0] >= self.base_rounds:
                return base(u, t)
            calls[0] += 1
            by_t = self._last.setdefault("by_t", {})
            rho = torch.zeros_like(u)
            first = t == t[0]  # the window's first point (point-major layout)
            for v in t.unique().tolist():
                hit = by_t.get(v)
                here = t == v
                copies = int(here.sum()) // max(1, 0 if hit is None else hit.shape[0])
                if hit is not None and copies * hit.shape[0] == int(here.sum()) and not bool((here & first).any()):
                    rho[here] = u[here] - hit.repeat(copies, *([1] * (hit.ndim - 1)))
            self._remember(u, t)
            return self.corrected(rho)(u, t)

        return f


class ResidualPCM:
    """The iterate-residual PCM: a paper PCM for the jump rounds plus the (R1) corrector for the rounds after.

    Args:
        jump: the paper's PCM (:class:`~fastdiff.samplers.pcm.PicardConsistencyModel`).
        inner: ``N_theta`` (:func:`residual_network`).
        meta: what it was trained for (base / schedule fingerprints as in :func:`~fastdiff.samplers.pcm.pcm_metadata`,
            the jump PCM's weights fingerprint, ``inference``).
        jump_rounds, residual_rounds: switching rounds of each kind (defaults: the checkpoint's ``inference``).
    """

    def __init__(self, jump: PicardConsistencyModel, inner: nn.Module, meta: dict, jump_rounds: int | None = None,
                 residual_rounds: int | None = None, mode: str | None = None) -> None:
        inference = meta.get("inference", {})
        self.jump, self.inner, self.meta = jump, inner.eval().requires_grad_(False), meta
        self.jump_rounds = int(inference.get("jump_rounds", 1) if jump_rounds is None else jump_rounds)
        self.residual_rounds = int(inference.get("residual_rounds", 1) if residual_rounds is None else residual_rounds)
        self.mode = mode or inference.get("mode", "switch")
        if self.jump_rounds < 1 or self.residual_rounds < 0:
            raise ValueError(f"jump_rounds must be >= 1 and residual_rounds >= 0, got {self.jump_rounds}, "
                             f"{self.residual_rounds}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        # "switch": the corrected rounds are switching rounds (accept nothing); "accept": they are the solver's first
        # rounds after the switch (points accepted as usual)
        self.switch_rounds = self.jump_rounds + (self.residual_rounds if self.mode == "switch" else 0)

    # ---------------------------------------------------------------- io
    @classmethod
    def from_pretrained(cls, path: str | Path, **options: Any) -> ResidualPCM:
        """Load a residual PCM directory (``pcm_config.json`` with ``format`` :data:`FORMAT` + the corrector's
        float16 weights); its ``jump`` entry names the jump PCM (``"embedded"`` or a directory)."""
        import diffusers
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads((path / CONFIG_NAME).read_text()) if (path / CONFIG_NAME).is_file() else {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a residual PCM checkpoint (no {CONFIG_NAME} with format {FORMAT!r})")
        jump_ref = meta["jump"]["path"]
        jump = resolve_pcm(jump_ref if jump_ref == "embedded" else path / jump_ref)
        if cached_fingerprint(jump.model) != meta["jump"]["fingerprint"]:
            raise ValueError(f"the jump PCM at {jump_ref!r} is not the one this corrector was trained after "
                             f"(fingerprint {meta['jump']['fingerprint']})")
        inner = getattr(diffusers, meta["class_name"]).from_config(meta["model_config"])
        inner.load_state_dict({k: v.float() for k, v in load_file(str(path / WEIGHTS_NAME)).items()})
        return cls(jump, inner, meta, **options)

    def save_pretrained(self, path: str | Path) -> None:
        save_residual(self.inner, self.meta, path)

    # ---------------------------------------------------------------- compatibility / switching
    def check_base(self, base_model: nn.Module, scheduler: Any) -> None:
        """As :meth:`PicardConsistencyModel.check_base` (the jump PCM's and the corrector's records)."""
        self.jump.check_base(base_model, scheduler)
        PicardConsistencyModel(self.inner, self.meta).check_base(base_model, scheduler)

    def switch(self, make_denoiser: Callable[[nn.Module], Denoiser], base_model: nn.Module) -> ResidualSwitch:
        """The :class:`ResidualSwitch` for a denoiser glue ``make_denoiser(network) -> denoiser``."""
        device, dtype = next(base_model.parameters()).device, next(base_model.parameters()).dtype
        p = next(self.inner.parameters())
        if (p.device, p.dtype) != (device, dtype):
            self.inner.to(device, dtype)
        jump = self.jump.with_options(schedule="step", switch_rounds=self.jump_rounds, space="feature",
                                      update="picard").switch(make_denoiser, base_model)
        corrector = ResidualCorrector(self.inner, base_model)
        glued = make_denoiser(corrector)

        def corrected(rho: torch.Tensor) -> Denoiser:
            def f(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                corrector.residual = rho
                try:
                    return glued(u, t)
                finally:
                    corrector.residual = None

            return f

        return ResidualSwitch(jump.accelerated, switch_lambdas("step", self.switch_rounds), "feature", "picard",
                              corrected=corrected, jump_rounds=self.jump_rounds,
                              base_rounds=self.residual_rounds if self.mode == "accept" else 0)

    def with_options(self, **options: Any) -> ResidualPCM:
        cur = {"jump_rounds": self.jump_rounds, "residual_rounds": self.residual_rounds, "mode": self.mode}
        return ResidualPCM(self.jump, self.inner, self.meta, **{**cur, **options})


def save_residual(inner: nn.Module, meta: dict, path: str | Path) -> None:
    """Write a residual PCM directory: ``pcm_config.json`` and the corrector's weights in float16."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().half().contiguous() for k, v in inner.state_dict().items()},
              str(path / WEIGHTS_NAME))
    (path / CONFIG_NAME).write_text(json.dumps(meta, indent=1) + "\n")


# ------------------------------------------------------------------------------------------- training data
@dataclass
class ResidualData:
    """Cached (R1) training data of one step grid: ``states[r, i]`` = ``X^{r+1}``, ``prev[r, i]`` = ``X^r``,
    ``base_out[r, i]`` the base outputs at ``X^{r+1}`` (points ``0..K-1``), ``reference[i]`` = ``X*``."""

    step_map: StepMap
    states: torch.Tensor  # [R, N, K, ...]
    prev: torch.Tensor  # [R, N, K, ...]
    base_out: torch.Tensor  # [R, N, K, ...]
    reference: torch.Tensor  # [N, K+1, ...]
    labels: torch.Tensor  # [N]
    alpha: torch.Tensor | None = None


@torch.no_grad()
def residual_sequences(trajectories: Trajectories, jump_network: nn.Module, pipe: Any, rounds: int,
                       guidance_scale: float = 1.0, chunk: int = 16, corrector: nn.Module | None = None) -> ResidualData:
    """``X^1 = Phi(X^0; jump)`` (the base output at point 0, as the engine's warm start), then ``rounds - 1`` base
    Picard rounds, from the cached initial iterates ``trajectories.states[0]``; with the base outputs at each.
    With ``corrector`` (an ``N_theta``, e.g. the one being continued) the later rounds are (R1)'s, as at inference
    (on-policy iterates)."""
    only = None if corrector is None else ResidualCorrector(corrector, None)
    sm = trajectories.step_map.to(dtype=trajectories.states.dtype)
    X0_all, N = trajectories.states[0], trajectories.states.shape[1]
    states, prevs, outs = [], [], []
    for s in range(0, N, chunk):
        X, lab = X0_all[s:s + chunk], trajectories.labels[s:s + chunk]
        jump = _outputs(pipe, sm, X, lab, jump_network, guidance_scale)
        jump[:, 0] = _outputs(pipe, sm, X[:, :1], lab, None, guidance_scale)[:, 0]  # the engine's warm start
        prev, cur = X, _picard_round(sm, X, jump)
        seq_s, seq_p, seq_o = [], [], []
        for _ in range(rounds):
            out = _outputs(pipe, sm, cur, lab, None, guidance_scale)
            seq_s.append(cur)
            seq_p.append(prev)
            seq_o.append(out)
            if only is not None:
                K = cur.shape[1]
                k = torch.arange(K).repeat(len(cur))
                only.residual = model_input(sm, k, cur.flatten(0, 1)) - model_input(sm, k, prev.flatten(0, 1))
                corr = _outputs(pipe, sm, cur, lab, only, guidance_scale)
                only.residual = None
                corr[:, 0] = 0  # the warm start's point
                out = out + corr
            prev, cur = cur, _picard_round(sm, cur, out)
        states.append(torch.stack(seq_s))
        prevs.append(torch.stack(seq_p))
        outs.append(torch.stack(seq_o))
    return ResidualData(sm, torch.cat(states, 1), torch.cat(prevs, 1), torch.cat(outs, 1),
                        trajectories.reference, trajectories.labels.clone())


def _outputs(pipe: Any, sm: StepMap, Z: torch.Tensor, labels: torch.Tensor, network: nn.Module | None,
             guidance_scale: float) -> torch.Tensor:
    """Model outputs at the points ``0..P-1`` of trajectories ``Z`` (``[N, P, ...]``)."""
    n, P = Z.shape[:2]
    k = torch.arange(P).repeat(n)
    den = digits_denoiser(pipe, labels.repeat_interleave(P), guidance_scale, network)
    return den(model_input(sm, k, Z.flatten(0, 1)), sm.timesteps[k]).view_as(Z)


def _picard_round(sm: StepMap, Z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The next iterate (points ``0..K-1``) from eq. (1)."""
    return torch.cat([Z[:, :1], picard_update(sm, Z, out)[:, :-1]], 1)


def residual_loss(data: ResidualData, corrector: ResidualCorrector, pipe: Any, idx: torch.Tensor, r: torch.Tensor,
                  guidance_scale: float = 1.0) -> torch.Tensor:
    """Per-trajectory ``D(X*, Phi(X^r; f_r))`` of (R1) (squared L2, mean over points) for trajectories ``idx`` at
    rounds ``r`` (indices into ``data.states``)."""
    device = next(corrector.parameters()).device
    states, prev = data.states[r, idx].to(device), data.prev[r, idx].to(device)
    base_out = data.base_out[r, idx].to(device)
    n, K = states.shape[:2]
    sm = data.step_map.to(device, states.dtype)
    k = torch.arange(K, device=device).repeat(n)
    u = model_input(sm, k, states.flatten(0, 1))
    corrector.residual = u - model_input(sm, k, prev.flatten(0, 1))
    try:
        den = digits_denoiser(pipe, data.labels[idx].repeat_interleave(K), guidance_scale, corrector)
        corr = den(u, sm.timesteps[k]).view_as(states)
    finally:
        corrector.residual = None
    corr = corr * (torch.arange(K, device=device) > 0).view(1, K, *([1] * (states.ndim - 2))).to(corr)  # warm start
    phi = picard_update(sm, states, base_out + corr)
    return (phi - data.reference[idx, 1:].to(device)).pow(2).flatten(1).mean(1)


def residual_metadata(inner: nn.Module, base_model: nn.Module, scheduler: Any, jump: PicardConsistencyModel,
                      jump_path: str, guidance_scale: float, grids, training: dict, inference: dict) -> dict:
    from . import pcm_metadata

    meta = pcm_metadata(base_model, scheduler, guidance_scale, grids, training, inference)
    meta.update(format=FORMAT, class_name=type(inner).__name__, model_config=dict(inner.config),
                jump={"path": jump_path, "fingerprint": cached_fingerprint(jump.model)},
                method="[fastdiff] iterate-residual corrector (R1) after the paper's PCM jump rounds")
    return meta


__all__ = [
    "ResidualCorrector", "ResidualData", "ResidualPCM", "ResidualSwitch", "residual_loss", "residual_network", "residual_sequences", "save_residual",
]
