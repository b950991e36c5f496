"""Picard Consistency Model (PCM; So, Shin, Jang & Park, CVPR 2025, arXiv 2503.19731): a trained accelerator
for parallel sampling that still converges exactly to the base model's sequential sample.

Sources. **[paper]**: the arXiv HTML (abstract, Figure 2's caption; read through the ``pages`` search corpus,
which stores the page's opening only) and, for the method section's equations, a paper-notes summary of it
(``pcm_picard_consistency_model_for_fast_parallel_sampling_of_diffusion_models.md``, CVPR 2025 paper notes, read
through the ``code`` corpus; the equations below are its transcription of the paper's). No official code was found.
**[ParaDiGMS]** Shih et al. 2023 (arXiv 2305.16317): the Picard iteration PCM accelerates. **[fastdiff]**: a choice
of ours, named as such; each has an option that restores the paper's form where the two differ.

Picard iteration [ParaDiGMS]. With the sampler's step map ``x_{k+1} = F_k(x_k, f_theta(x_k, t_k))``
(:mod:`fastdiff.samplers.steps`) over ``K`` steps, a trajectory ``X = (x_0 .. x_K)`` is updated by

    (1)  Phi(X; theta)_{k+1} = x_0 + sum_{j <= k} ( F_j(x_j, f_theta(x_j, t_j)) - x_j ),       k = 0 .. K-1

(the cumulative-drift update, ``method="picard"`` of :func:`~fastdiff.samplers.parallel.sample_parallel`), and
``X^{k+1} = Phi(X^k; theta_base)`` converges to the fixed point ``X*``: sequential sampling. (The paper writes
``k`` for the Picard iteration; here ``r`` is the iteration and ``k`` the trajectory point, as in the code.)

Picard consistency training [paper]. A dataset of base-model Picard trajectories ``{X^0, X^1, .., X^R = X*}`` is
collected first (:func:`picard_trajectories`, cached at the first training step); the PCM ``theta_PCM`` (the base
architecture initialised from ``theta_base``) is trained so that one Picard update with it, from any iterate,
lands on the fixed point:

    (2)  L(theta) = E_{X ~ D, r ~ U{0..R-1}} [ alpha(r) D(X*, Phi(X^r; theta)) ],   alpha(r) = 1 / sqrt(Var(r))

with ``D`` the (squared) L2 distance, ``alpha`` balancing the iterates' very different distances to ``X*``
(``round_weighting: inverse_std``; ``Var(r)`` is estimated as the cache's mean squared distance of round-``r``
iterates to their fixed points [fastdiff: the paper's estimator could not be read]), the weights an EMA of the
training weights (paper: decay 0.999; ``train.ema_decay``), Adam at lr 1e-4 (paper). Options [fastdiff]:
``round_weighting: none`` (``alpha = 1``), ``round_probs`` (a distribution over ``r`` in place of the uniform
one, e.g. stressing ``r = 0``, the iterate the first PCM round sees at inference), ``init`` (continue from a PCM
checkpoint), a cache of ``R`` iterates per trajectory rather than the whole trajectory to convergence, and
training on several step grids at once. The iterates are the engine's own (warm start with the base's first
output, Gaussian-model extrapolation, window = ``K``, tolerance 0). The paper fine-tunes in full ("PCM") or a LoRA
("PCM-LoRA"); fastdiff's shipped PCM is a full fine-tune (``peft`` is not a dependency).

Model switching [paper]. Picard iteration ``r`` evaluates

    (3a) feature space:  X^{r+1} = lambda(r) Phi(X^r; theta_PCM) + (1 - lambda(r)) Phi(X^r; theta_base)
    (3b) weight space:   W_r = W_base + lambda(r) Delta W   (the paper's LoRA scale; here Delta = theta_PCM - theta_base)
    (4)  lambda(r) = max(0, min(1, 1 - s r / R_s))      (the paper's linear schedule, stiffness ``s``)

``Phi`` is affine in the model output, so (3a) is the blend ``lambda f_PCM + (1 - lambda) f_base`` of the two
outputs (what :meth:`ModelSwitch.denoiser` evaluates). (4) is :data:`SCHEDULES` ``"linear"`` with
``switch_rounds = R_s / s`` (``lambda = 1 - r / switch_rounds`` while positive); ``"step"`` (1 then 0) and
``"cosine"`` are [fastdiff] options. The shipped PCM's default (its ``pcm_config.json`` ``inference``) is the
one that measured best in ``benchmarks/pcm.py``. (3b) with a full fine-tune interpolates all weights, which is
the same map as scaling a low-rank ``Delta`` [fastdiff]. (3a) needs both models in the rounds with
``0 < lambda < 1`` (two batched calls), (3b) one.

Exactness [fastdiff]. Inside :func:`~fastdiff.samplers.parallel.sample_parallel` the ``lambda > 0`` rounds
apply eq. (1) (``ModelSwitch.update = "picard"``, what the PCM is trained for, whatever the method; ``"method"``
applies the method's own update) to every point of the first window but accept none; the base model takes over
at ``stats.switch_round`` and from there the method is unchanged (every round accepts at least one exact step), so
any method works with a switch and ``tolerance=0`` reproduces sequential sampling to float precision.

Conditioning. The paper's PCM sees what the base model sees, ``(x_k, t_k)`` (eq. 2 / Fig. 2: ``Phi(X^k; theta)``
with the base architecture; no iteration index or other input is described in the sources above). It therefore
cannot be exact at ``X*`` and only its first round helps. [fastdiff] option ``conditioning: residual``
(:mod:`fastdiff.samplers.pcm.residual`, :class:`~.residual.ResidualPCM`): after the PCM's round, further
switching rounds add a corrector fed with the iterate's last update, exactly zero at the fixed point.

Checkpoints (:class:`PicardConsistencyModel`) record a fingerprint of the base weights and of the noise
schedule (``alphas_cumprod``, prediction type); using one with another base model or schedule raises a
``ValueError`` that names the mismatch.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..parallel import sample_parallel
from ..steps import Denoiser, StepMap, apply_step, denoise, model_input, sample_sequential, step_map_for

SCHEDULES = ("step", "linear", "cosine")
ROUND_WEIGHTINGS = ("inverse_std", "inverse_var", "none")
UPDATES = ("picard", "method")
VAR_FLOOR = 1e-6  # eq. 2's Var(r) floor (latent units squared)
SPACES = ("feature", "weight")
CONFIG_NAME = "pcm_config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
EMBEDDED_PCM_DIR = Path(__file__).resolve().parents[2] / "models" / "digits_pcm"


# ------------------------------------------------------------------------------------------- lambda(k)
def switch_lambdas(schedule: str = "linear", switch_rounds: int = 2) -> tuple[float, ...]:
    """``lambda(r)`` for rounds ``r = 0 .. switch_rounds-1`` (all > 0; ``lambda(r) = 0`` from ``switch_rounds`` on).

    ``"linear"``: ``1 - r / switch_rounds``, the paper's eq. (4) ``max(0, min(1, 1 - s r / R_s))`` with
    ``switch_rounds = R_s / s``; [fastdiff] ``"step"``: 1; ``"cosine"``: ``(1 + cos(pi r / switch_rounds)) / 2``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not isinstance(switch_rounds, int) or isinstance(switch_rounds, bool) or switch_rounds < 0:
        raise ValueError(f"switch_rounds must be an int >= 0, got {switch_rounds!r}")
    s = switch_rounds
    if schedule == "step":
        return (1.0,) * s
    if schedule == "linear":
        return tuple(1 - k / s for k in range(s))
    return tuple(0.5 * (1 + math.cos(math.pi * k / s)) for k in range(s))


@dataclass(frozen=True)
class ModelSwitch:
    """The rounds before the switch to the base model, for :func:`~fastdiff.samplers.parallel.sample_parallel`.

    Args:
        accelerated: ``lam -> denoiser``: in ``"feature"`` space the PCM denoiser (called with ``lam = 1``), in
            ``"weight"`` space the denoiser with weights ``theta_base + lam (theta_PCM - theta_base)``.
        lambdas: ``lambda(k)`` of the rounds before the switch (:func:`switch_lambdas`), each in ``(0, 1]``.
        space: ``"feature"`` (eq. 3a) or ``"weight"`` (eq. 3b).
        update: the update those rounds apply: ``"picard"`` (eq. 1, what the PCM is trained for, whatever the
            solver's method) or ``"method"`` (the solver's own, e.g. Newton's linearised update).
    """

    accelerated: Callable[[float], Denoiser]
    lambdas: tuple[float, ...] = (1.0,)
    space: str = "feature"
    update: str = "picard"

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {self.space!r}")
        if not callable(self.accelerated):
            raise TypeError(f"accelerated must be callable as accelerated(lam) -> denoiser, got "
                            f"{type(self.accelerated).__name__}")
        if self.update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {self.update!r}")
        if any(not (0 < float(v) <= 1) for v in self.lambdas):
            raise ValueError(f"lambdas must lie in (0, 1] (rounds with lambda = 0 are the base model's), got "
                             f"{self.lambdas}")

    @classmethod
    def feature(cls, pcm_denoiser: Denoiser, schedule: str = "linear", switch_rounds: int = 2) -> ModelSwitch:
        """Feature-space switching (eq. 3a) to a PCM given as a plain denoiser."""
        return cls(lambda lam: pcm_denoiser, switch_lambdas(schedule, switch_rounds), "feature")

    @property
    def switch_round(self) -> int:
        """How many rounds run before the base model takes over."""
        return len(self.lambdas)

    def denoiser(self, k: int, base: Denoiser) -> Denoiser:
        """The denoiser of switching round ``k`` (eq. 3a / 3b)."""
        lam = float(self.lambdas[k])
        if self.space == "weight" or lam == 1.0:
            return self.accelerated(lam)
        pcm = self.accelerated(1.0)
        return lambda u, t: lam * pcm(u, t) + (1 - lam) * base(u, t)


# ------------------------------------------------------------------------------------------- checkpoints
def fingerprint_module(module: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of a module's parameters and buffers, names and values."""
    h = hashlib.sha256()
    for name, v in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (probe, fingerprint)


def _probe(module: nn.Module) -> tuple:
    """What must stay the same for a module's fingerprint to stay valid: each parameter's and buffer's identity,
    version counter (bumped by every in-place write: ``copy_``, ``load_state_dict``, optimiser steps), storage
    pointer, shape, dtype and device, plus each floating tensor's norm (one fused device reduction and a single
    host read; it catches writes through ``.data``, which bypass the version counter)."""
    tensors = list(module.state_dict(keep_vars=True).items())
    key = tuple((name, id(t), t._version, t.data_ptr(), tuple(t.shape), t.dtype, str(t.device)) for name, t in tensors)
    floats = [t.detach() for _, t in tensors if t.is_floating_point() and t.numel()]
    with torch.no_grad():
        by_device: dict = {}
        for t in floats:  # torch._foreach_norm wants one device (and dtype) per call
            by_device.setdefault((t.device, t.dtype), []).append(t)
        norms = tuple(v for group in by_device.values()
                      for v in torch.stack(torch._foreach_norm(group)).double().cpu().tolist())
    return key, norms


def cached_fingerprint(module: nn.Module) -> str:
    """:func:`fingerprint_module`, recomputed only when :func:`_probe` says a parameter or buffer may have changed
    (the full hash reads every weight on the host: slow for a large model on an accelerator)."""
    probe = _probe(module)
    hit = _VERIFIED.get(module)
    if hit is not None and hit[0] == probe:
        return hit[1]
    fp = fingerprint_module(module)
    _VERIFIED[module] = (probe, fp)
    return fp


def fingerprint_schedule(scheduler: Any) -> dict:
    """What a PCM depends on in the noise schedule: ``alphas_cumprod`` (hashed) and the prediction type."""
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod: PCM needs a DDPM-family schedule")
    digest = hashlib.sha256(torch.as_tensor(ac).to(torch.float64).numpy().round(10).tobytes()).hexdigest()[:16]
    return {"alphas_cumprod": digest, "num_train_timesteps": int(len(ac)),
            "prediction_type": str(scheduler.config.get("prediction_type", "epsilon"))}


class PicardConsistencyModel:
    """A trained PCM predictor for one base model and noise schedule, with its model-switching settings.

    Args:
        model: the PCM denoiser network (the base architecture, fine-tuned).
        meta: what it was trained for: ``base_fingerprint``, ``schedule`` (:func:`fingerprint_schedule`),
            ``guidance_scale``, ``grids`` and the training settings.
        schedule, switch_rounds, space, update: the switching of :class:`ModelSwitch` (defaults: the checkpoint's
            ``inference`` entry, else the paper's: ``"linear"``, 2, ``"feature"``, ``"picard"``).
    """

    def __init__(self, model: nn.Module, meta: dict, schedule: str | None = None, switch_rounds: int | None = None,
                 space: str | None = None, update: str | None = None) -> None:
        inference = meta.get("inference", {})
        self.model, self.meta = model.eval().requires_grad_(False), meta
        self.schedule = schedule or inference.get("schedule", "linear")
        self.switch_rounds = inference.get("switch_rounds", 2) if switch_rounds is None else switch_rounds
        self.space = space or inference.get("space", "feature")
        self.update = update or inference.get("update", "picard")
        switch_lambdas(self.schedule, self.switch_rounds)  # validates both
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {self.space!r}")
        if self.update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {self.update!r}")
        self._blend: nn.Module | None = None

    # ---------------------------------------------------------------- io
    @classmethod
    def from_pretrained(cls, path: str | Path, **options: Any) -> PicardConsistencyModel:
        """Load a PCM directory (``pcm_config.json`` + ``diffusion_pytorch_model.safetensors``)."""
        import diffusers
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise ValueError(f"{path} is not a PCM checkpoint (no {CONFIG_NAME})")
        meta = json.loads((path / CONFIG_NAME).read_text())
        model_cls = getattr(diffusers, meta["class_name"])
        model = model_cls.from_config(meta["model_config"])
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
        return cls(model, meta, **options)

    def save_pretrained(self, path: str | Path) -> None:
        save_pcm(self.model, self.meta, path)

    # ---------------------------------------------------------------- compatibility
    def check_base(self, base_model: nn.Module, scheduler: Any) -> None:
        """Raise ``ValueError`` if ``base_model`` / ``scheduler`` are not what this PCM was trained for."""
        if type(base_model).__name__ != self.meta["class_name"]:
            raise ValueError(f"this PCM was trained for a {self.meta['class_name']} base model, got "
                             f"{type(base_model).__name__}")
        got = cached_fingerprint(base_model)
        if got != self.meta["base_fingerprint"]:
            raise ValueError(f"this PCM was trained for another base model (weights fingerprint "
                             f"{self.meta['base_fingerprint']}, the pipeline's is {got}); train one for this model "
                             "with `fastdiff train --config digits_pcm` (model.config.base)")
        want, have = self.meta["schedule"], fingerprint_schedule(scheduler)
        if want != have:
            diff = ", ".join(f"{k}: trained {want.get(k)!r}, got {have.get(k)!r}" for k in have if want.get(k) != have[k])
            raise ValueError(f"this PCM was trained for another noise schedule ({diff})")

    # ---------------------------------------------------------------- switching
    def switch(self, make_denoiser: Callable[[nn.Module], Denoiser], base_model: nn.Module) -> ModelSwitch:
        """The :class:`ModelSwitch` for a base denoiser glue ``make_denoiser(network) -> denoiser`` (the same
        conditioning / guidance with another network in place of ``base_model``)."""
        lambdas = switch_lambdas(self.schedule, self.switch_rounds)
        device = next(base_model.parameters()).device
        dtype = next(base_model.parameters()).dtype
        self.model.to(device, dtype)
        if self.space == "feature":
            pcm = make_denoiser(self.model)
            return ModelSwitch(lambda lam: pcm, lambdas, "feature", self.update)

        def at(lam: float) -> Denoiser:
            if lam == 1.0:
                return make_denoiser(self.model)
            if self._blend is None:
                self._blend = copy.deepcopy(self.model)
            self._blend.to(device, dtype)
            with torch.no_grad():
                for pb, pp, pw in zip(base_model.parameters(), self.model.parameters(), self._blend.parameters()):
                    pw.copy_(pb + lam * (pp - pb))
            return make_denoiser(self._blend)

        return ModelSwitch(at, lambdas, "weight", self.update)

    def with_options(self, **options: Any) -> PicardConsistencyModel:
        """The same PCM with other ``schedule`` / ``switch_rounds`` / ``space`` / ``update``."""
        cur = {"schedule": self.schedule, "switch_rounds": self.switch_rounds, "space": self.space,
               "update": self.update}
        return PicardConsistencyModel(self.model, self.meta, **{**cur, **options})


def save_pcm(model: nn.Module, meta: dict, path: str | Path) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path / WEIGHTS_NAME))
    (path / CONFIG_NAME).write_text(json.dumps(meta, indent=1) + "\n")


def load_embedded_pcm(**options: Any) -> PicardConsistencyModel:
    """The shipped PCM of the embedded digits model (``fastdiff/models/digits_pcm``)."""
    return PicardConsistencyModel.from_pretrained(EMBEDDED_PCM_DIR, **options)


def resolve_pcm(pcm: Any) -> PicardConsistencyModel:
    """A :class:`PicardConsistencyModel` (or :class:`~.residual.ResidualPCM`) from itself, ``"embedded"`` (the shipped
    digits PCM) or a directory (a residual PCM's by its ``pcm_config.json`` format)."""
    from .residual import FORMAT as RESIDUAL_FORMAT
    from .residual import ResidualPCM

    if isinstance(pcm, (PicardConsistencyModel, ResidualPCM)):
        return pcm
    if isinstance(pcm, (str, Path)):
        if str(pcm) == "embedded":
            return load_embedded_pcm()
        config = Path(pcm) / CONFIG_NAME
        if config.is_file() and json.loads(config.read_text()).get("format") == RESIDUAL_FORMAT:
            return ResidualPCM.from_pretrained(pcm)
        return PicardConsistencyModel.from_pretrained(pcm)
    raise TypeError(f"pcm must be a PicardConsistencyModel, a ResidualPCM, a PCM directory or 'embedded', got "
                    f"{type(pcm).__name__}")


# ------------------------------------------------------------------------------------------- training data
@contextlib.contextmanager
def using_network(pipe: Any, attr: str, module: nn.Module) -> Iterator[None]:
    """``pipe.<attr>`` replaced by ``module`` inside the block (the pipeline's own glue around another network)."""
    original = getattr(pipe, attr)
    pipe.__dict__[attr] = module  # diffusers registers modules as plain attributes
    try:
        yield
    finally:
        pipe.__dict__[attr] = original


def digits_denoiser(pipe: Any, labels: torch.Tensor, guidance_scale: float,
                    network: nn.Module | None = None) -> Denoiser:
    """``(u [n*B], t [n*B]) -> eps`` of a ``DigitsPipeline`` on ``B`` class labels (window-major), optionally
    with another transformer in place of ``pipe.transformer``."""
    ehs = pipe.encode_class_labels(labels.tolist(), 1, guidance_scale > 1)
    batch = len(labels)

    def f(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = u.shape[0] // batch
        e = torch.cat([ehs[:batch].repeat(n, 1, 1), ehs[batch:].repeat(n, 1, 1)]) if guidance_scale > 1 \
            else ehs.repeat(n, 1, 1)
        with using_network(pipe, "transformer", network) if network is not None else contextlib.nullcontext():
            return pipe.predict_noise(u, t, e, guidance_scale)

    return f


@dataclass
class Trajectories:
    """Base-model Picard iterates of one step grid: ``states[r, i]`` is ``X^r`` (``[K, ...]``, points ``0..K-1``)
    of trajectory ``i``, ``reference[i]`` its fixed point ``X*`` (``[K+1, ...]``), ``labels[i]`` its class."""

    step_map: StepMap
    states: torch.Tensor  # [R, N, K, ...]
    reference: torch.Tensor  # [N, K+1, ...]
    labels: torch.Tensor  # [N]
    alpha: torch.Tensor | None = None  # eq. 2's alpha(r) per round, filled in by PCMTrainer


@torch.no_grad()
def picard_trajectories(step_map: StepMap, denoiser_for: Callable[[torch.Tensor], Denoiser], x: torch.Tensor,
                        labels: torch.Tensor, rounds: int, chunk: int = 16) -> Trajectories:
    """The base model's Picard iterates ``X^0 .. X^{rounds-1}`` and fixed points for initial latents ``x``.

    Runs :func:`~fastdiff.samplers.parallel.sample_parallel` (``method="picard"``, window ``K``, tolerance 0,
    the base model's first output as warm start: the iterates parallel sampling itself starts from) with a
    recording denoiser: round ``r``'s inputs are ``X^r`` on its window; points before the window are
    converged, i.e. equal to ``X*``. ``denoiser_for(labels)`` is the base denoiser for a chunk's labels."""
    import warnings

    K = step_map.num_steps
    states, refs = [], []
    sm = step_map.to(x.device, x.dtype)
    for s in range(0, len(x), chunk):
        xb, lb = x[s:s + chunk], labels[s:s + chunk]
        den = denoiser_for(lb)
        ref = sample_sequential(sm, den, xb, return_trajectory=True)  # [K+1, B, ...]
        rec: list[torch.Tensor] = []
        recording = _recorder(sm, den, ref, rec, len(xb))
        first = den(model_input(sm, torch.zeros(1, dtype=torch.long), xb[None])[0], sm.timesteps[:1].expand(len(xb)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # stopped on purpose by max_rounds
            sample_parallel(sm, recording, xb, method="picard", window=K, tolerance=0.0, first_output=first,
                            max_rounds=rounds + 1)
        rec = rec[:rounds] if K > 1 else [ref[:1]]
        while len(rec) < rounds:  # converged before `rounds`: the remaining iterates are the fixed point
            rec.append(ref[:K])
        states.append(torch.stack(rec).transpose(1, 2))  # [R, B, K, ...]
        refs.append(ref.transpose(0, 1))
    return Trajectories(step_map, torch.cat(states, 1), torch.cat(refs), labels.clone())


def _recorder(sm: StepMap, den: Denoiser, ref: torch.Tensor, rec: list, batch: int) -> Denoiser:
    """``den``, appending each call's full iterate (converged prefix from ``ref`` + the window's states) to ``rec``."""
    K = sm.num_steps

    def recording(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = u.shape[0] // batch
        b = int((sm.timesteps == t[0].to(sm.timesteps.dtype)).nonzero()[0])
        k = b + torch.arange(min(n, K - b))
        xs = u.view(n, batch, *u.shape[1:])[: K - b] / _bc(sm.input_scale[k], u)
        rec.append(torch.cat([ref[:b], xs]))
        return den(u, t)

    return recording


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim))).to(like.dtype)


def picard_update(sm: StepMap, states: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Eq. (1) for a batch of full trajectories: ``states`` ``[N, K, ...]`` (points ``0..K-1``) and the model
    output at them ``[N, K, ...]`` -> ``Phi(X)`` at points ``1..K`` (``[N, K, ...]``). One-step samplers only."""
    if sm.history:
        raise ValueError(f"Picard consistency training supports one-step samplers (DDIM, DDPM), got {sm.name!r}")
    K = sm.num_steps
    k = torch.arange(K, device=states.device)
    xs, out = states.transpose(0, 1), output.transpose(0, 1)  # [K, N, ...]
    x0, eps = denoise(sm, k, xs, out)
    drift = apply_step(sm, k, xs, x0, eps) - xs
    return (xs[:1] + drift.cumsum(0)).transpose(0, 1)


# ------------------------------------------------------------------------------------------- training module
DEFAULT_TRAIN_CONFIG: dict = {
    "base": "embedded",  # the base DigitsPipeline: "embedded" or a saved pipeline directory
    "grids": [["ddim", 25], ["ddim", 50], ["ddim", 100]],  # step grids whose Picard trajectories are learned
    "trajectories": [96, 48, 24],  # trajectories per grid (cached at the first step)
    "rounds": 6,  # R: iterates X^0 .. X^{R-1} of each trajectory
    "points_per_step": 100,  # trajectory points per training step (trajectories = points // K)
    "guidance_scale": 1.0,
    "seed": 1234,  # the cache's initial latents (benchmarks use other seeds)
    "init": "base",  # [paper] initialised from the base weights; or a PCM directory / "embedded" to continue from
    "round_weighting": "inverse_std",  # [paper] alpha(k) = 1 / sqrt(Var(k)) (eq. 2); "none": [fastdiff] alpha = 1
    "round_probs": None,  # [paper] None: k ~ U{0..R-1}; [fastdiff] a probability per round (e.g. stress round 0)
    "inference": {"schedule": "linear", "switch_rounds": 2, "space": "feature"},
    # [fastdiff] "residual": train the iterate-residual corrector of fastdiff.samplers.pcm.residual after the jump PCM
    "conditioning": "none",  # [paper] the PCM sees (x_k, t_k) only
    "jump": "embedded",  # conditioning "residual": the paper PCM whose round the corrector follows
    "num_layers": None,  # conditioning "residual": transformer blocks of the corrector (None: the base's)
}
CONDITIONINGS = ("none", "residual")


class PCMTrainer(nn.Module):
    """Picard consistency training (eq. 2) through ``fastdiff.training.train``'s model-with-own-objective seam.

    ``training_loss(images, noise, labels)`` ignores the data batch (PCM is data-free: targets come from the
    frozen base model) and takes one step's trajectories from the cache built at the first call;
    ``save_pretrained`` writes a :class:`PicardConsistencyModel` checkpoint (the training script's EMA weights).
    Only ``self.model`` (a copy of the base transformer) is trained; the base pipeline is held outside the
    module's parameters.
    """

    def __init__(self, config: dict | None = None) -> None:
        super().__init__()
        cfg = {**DEFAULT_TRAIN_CONFIG, **(config or {})}
        unknown = set(cfg) - set(DEFAULT_TRAIN_CONFIG)
        if unknown:
            raise ValueError(f"unknown PCM model.config keys {sorted(unknown)}; allowed: {sorted(DEFAULT_TRAIN_CONFIG)}")
        grids = [tuple(g) for g in cfg["grids"]]
        if any(len(g) != 2 or g[0] not in ("ddim", "ddpm") or not isinstance(g[1], int) or g[1] < 1 for g in grids):
            raise ValueError(f"model.config.grids must be [kind, steps] pairs with kind 'ddim' or 'ddpm', got {cfg['grids']}")
        if len(cfg["trajectories"]) != len(grids):
            raise ValueError("model.config.trajectories needs one count per grid")
        if not isinstance(cfg["rounds"], int) or cfg["rounds"] < 1:
            raise ValueError(f"model.config.rounds must be an int >= 1, got {cfg['rounds']!r}")
        if cfg["round_weighting"] not in ROUND_WEIGHTINGS:
            raise ValueError(f"model.config.round_weighting must be one of {ROUND_WEIGHTINGS}, got "
                             f"{cfg['round_weighting']!r}")
        probs = cfg["round_probs"]
        if probs is not None and (len(probs) != cfg["rounds"] or any(not (float(v) >= 0) for v in probs)
                                  or not sum(probs) > 0):
            raise ValueError(f"model.config.round_probs must be None or {cfg['rounds']} non-negative weights (one "
                             f"per round), got {probs!r}")
        if cfg["conditioning"] not in CONDITIONINGS:
            raise ValueError(f"model.config.conditioning must be one of {CONDITIONINGS}, got {cfg['conditioning']!r}")
        self.cfg, self.grids = cfg, grids
        pipe = _load_base(cfg["base"])
        object.__setattr__(self, "_pipe", pipe)  # frozen, not a submodule: no optimizer / EMA state for it
        self._cache = None
        self._gen = torch.Generator().manual_seed(int(cfg["seed"]) + 1)
        self._step = 0
        if cfg["conditioning"] == "residual":
            self._init_residual(cfg, pipe)
            return
        self.model = copy.deepcopy(pipe.transformer).requires_grad_(True)
        if cfg["init"] != "base":  # continue from a PCM checkpoint of this base model
            start = resolve_pcm(cfg["init"])  # "embedded": the shipped PCM
            start.check_base(pipe.transformer, pipe.scheduler)
            self.model.load_state_dict(start.model.state_dict())
        self.config = self.model.config  # the training script reads model.config (sample size, channels)

    def _init_residual(self, cfg: dict, pipe: Any) -> None:
        """conditioning "residual": ``self.model`` is the corrector ``N_theta`` of :mod:`.residual`."""
        from .residual import ResidualCorrector, ResidualPCM, residual_network

        jump = resolve_pcm(cfg["jump"])
        jump.check_base(pipe.transformer, pipe.scheduler)
        object.__setattr__(self, "_jump", jump)
        self.model = residual_network(pipe.transformer, cfg["num_layers"]).requires_grad_(True)
        if cfg["init"] != "base":
            start = ResidualPCM.from_pretrained(cfg["init"])
            start.check_base(pipe.transformer, pipe.scheduler)
            self.model.load_state_dict(start.inner.state_dict())
        object.__setattr__(self, "_corrector", ResidualCorrector(self.model, None))
        self.config = pipe.transformer.config  # the data the training script paces with: the base's shape

    @property
    def pipe(self):
        return self._pipe

    def _grid_map(self, kind: str, steps: int) -> StepMap:
        from diffusers import DDIMScheduler, DDPMScheduler

        sched = (DDIMScheduler if kind == "ddim" else DDPMScheduler).from_config(self.pipe.scheduler.config)
        sched.set_timesteps(steps)
        return step_map_for(sched)

    def build_cache(self) -> list[Trajectories]:
        pipe, g = self.pipe, float(self.cfg["guidance_scale"])
        shape = (self.config.in_channels, self.config.sample_size, self.config.sample_size)
        gen = torch.Generator().manual_seed(int(self.cfg["seed"]))
        out = []
        for (kind, steps), n in zip(self.grids, self.cfg["trajectories"]):
            if kind == "ddpm":
                raise ValueError("Picard consistency training on stochastic (DDPM) grids is not supported")
            x = torch.randn((n, *shape), generator=gen)
            labels = torch.arange(n) % 10
            rounds = 1 if self.cfg["conditioning"] == "residual" else self.cfg["rounds"]  # residual: X^0 only
            out.append(picard_trajectories(self._grid_map(kind, steps), lambda lb: digits_denoiser(pipe, lb, g),
                                           x, labels, rounds))
            if self.cfg["conditioning"] == "residual":
                from .residual import residual_sequences

                on_policy = self.model if self.cfg["init"] != "base" else None  # continued: (R1) iterates
                out[-1] = residual_sequences(out[-1], self._jump.model, pipe, self.cfg["rounds"], g,
                                             corrector=on_policy)
            print(f"PCM cache: {kind.upper()}-{steps}, {n} trajectories x {self.cfg['rounds']} iterates", flush=True)
        return out

    def training_loss(self, images: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Eq. (2) on one grid's trajectories (grids in turn, trajectories and rounds drawn at random)."""
        if self._cache is None:
            self._cache = self.build_cache()
        data = self._cache[self._step % len(self._cache)]
        self._step += 1
        R, N, K = data.states.shape[:3]
        n = max(1, int(self.cfg["points_per_step"]) // K)
        idx = torch.randint(N, (n,), generator=self._gen)
        if self.cfg["round_probs"] is None:
            r = torch.randint(R, (n,), generator=self._gen)
        else:
            r = torch.multinomial(torch.tensor(self.cfg["round_probs"], dtype=torch.float64), n, True,
                                  generator=self._gen)
        if self.cfg["conditioning"] == "residual":
            from .residual import residual_loss

            err = residual_loss(data, self._corrector, self.pipe, idx, r, float(self.cfg["guidance_scale"]))
            return (self._alpha(data)[r].to(err) * err).mean()
        device = next(self.model.parameters()).device
        states = data.states[r, idx].to(device)  # [n, K, ...]
        target = data.reference[idx, 1:].to(device)
        sm = data.step_map.to(device, states.dtype)
        k = torch.arange(K, device=device).repeat(n)  # item-major: trajectory i, point k
        u = model_input(sm, k, states.flatten(0, 1))
        t = sm.timesteps[k]
        lab = data.labels[idx].repeat_interleave(K)
        den = digits_denoiser(self.pipe, lab, float(self.cfg["guidance_scale"]), self.model)
        out = den(u, t).view_as(states)
        phi = picard_update(sm, states, out)
        err = (phi - target).pow(2).flatten(1).mean(1)  # D: squared L2 per trajectory
        return (self._alpha(data)[r].to(err) * err).mean()

    def _alpha(self, data: Trajectories) -> torch.Tensor:
        """``alpha(k)`` of eq. 2 per round: ``1 / sqrt(Var(k))`` with ``Var(k)`` the mean squared distance of the
        cache's round-``k`` iterates to their fixed points, floored at :data:`VAR_FLOOR` (rms 1e-3: converged
        iterates would otherwise weigh by float noise) [paper: the weighting; fastdiff: this estimate of Var and
        its floor], normalised to mean 1 over the rounds; all ones for ``round_weighting: none``."""
        R = data.states.shape[0]
        if self.cfg["round_weighting"] == "none":
            return torch.ones(R)
        if data.alpha is None:
            var = (data.states - data.reference[None, :, :-1]).pow(2).flatten(2).mean((1, 2))
            a = var.clamp(min=VAR_FLOOR).rsqrt()
            if self.cfg["round_weighting"] == "inverse_var":  # [fastdiff] 1 / Var(r): every round's relative error
                a = a.pow(2)
            data.alpha = a / a.mean()
        return data.alpha

    def save_pretrained(self, path: str | Path) -> None:
        if self.cfg["conditioning"] == "residual":
            from .residual import residual_metadata, save_residual

            jump = "embedded" if self.cfg["jump"] == "embedded" else str(Path(self.cfg["jump"]).resolve())
            meta = residual_metadata(self.model, self.pipe.transformer, self.pipe.scheduler, self._jump, jump,
                                     float(self.cfg["guidance_scale"]), self.grids, self.metadata()["training"],
                                     self.cfg["inference"])
            save_residual(self.model, meta, path)
            return
        save_pcm(self.model, self.metadata(), path)

    def metadata(self) -> dict:
        return pcm_metadata(self.pipe.transformer, self.pipe.scheduler, float(self.cfg["guidance_scale"]),
                            self.grids, {k: self.cfg[k] for k in ("trajectories", "rounds", "points_per_step", "seed",
                                                                  "base", "init", "round_weighting", "round_probs",
                                                                  "conditioning", "jump", "num_layers")}, self.cfg["inference"])


def pcm_metadata(base_model: nn.Module, scheduler: Any, guidance_scale: float = 1.0,
                 grids: Sequence[tuple[str, int]] = (), training: dict | None = None,
                 inference: dict | None = None) -> dict:
    """What a PCM checkpoint records: the base architecture and its fingerprint, the schedule's fingerprint,
    the guidance and grids it was trained on, and its default switching (``inference``)."""
    return {
        "format": "fastdiff-pcm-1", "class_name": type(base_model).__name__, "model_config": dict(base_model.config),
        "base_fingerprint": fingerprint_module(base_model), "schedule": fingerprint_schedule(scheduler),
        "guidance_scale": float(guidance_scale), "grids": [list(g) for g in grids], "training": dict(training or {}),
        "inference": dict(inference or {}),
        "paper": "So et al., PCM: Picard Consistency Model, CVPR 2025, arXiv 2503.19731",
    }


def _load_base(base: str):
    if base == "embedded":
        from fastdiff.models.digits import load_embedded_pipeline

        pipe = load_embedded_pipeline()
    else:
        from fastdiff.models.digits import DigitsPipeline

        pipe = DigitsPipeline.from_pretrained(base, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.transformer, pipe.class_embedder):
        m.requires_grad_(False).eval()
    return pipe


__all__ = [
    "DEFAULT_TRAIN_CONFIG", "EMBEDDED_PCM_DIR", "SCHEDULES", "SPACES", "ModelSwitch", "PCMTrainer",
    "PicardConsistencyModel", "Trajectories", "digits_denoiser", "fingerprint_module", "fingerprint_schedule",
    "cached_fingerprint", "load_embedded_pcm", "pcm_metadata", "picard_trajectories", "picard_update", "resolve_pcm", "save_pcm", "switch_lambdas",
    "using_network",
]
