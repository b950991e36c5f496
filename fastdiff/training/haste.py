"""HASTE: holistic alignment (REPA + attention-map distillation) with stage-wise termination.

Wang et al. 2025, "REPA Works Until It Doesn't: Early-Stopped, Holistic Alignment Supercharges Diffusion
Training" (arXiv:2505.16792, github.com/NUS-HPC-AI-Lab/HASTE ``loss.py``):

* ATTA, attention alignment: student blocks are paired with teacher blocks (SiT-XL 4..7 <- DINOv2-B 8..11),
  head to head (the first ``min(H_student, H_teacher)`` heads), and each student attention row is trained
  towards the teacher's: ``L_attn = mean_pairs mean_{b,h,i} CE(softmax(teacher_i), softmax(student_i))``.
* The REPA feature loss (:mod:`fastdiff.training.repa`), ``L = L_denoise + l_R L_REPA + l_A L_attn``
  (``l_R = l_A = 0.5``).
* Stage-wise termination: at a fixed iteration (250K for SiT-XL) both alignment terms are switched off and
  the teacher is never run again. Optionally a gradient-angle trigger (ours, see
  :class:`StageWiseTermination`) ends the stage once the alignment gradient stops agreeing with the
  denoising gradient.

Student attention is captured by attention processors installed for one forward pass and removed after
it. The reference backend, ``"materialized"``, forms the ``[B, H, N, N]`` logits explicitly (as HASTE's
code does). ``"chunked"`` (:mod:`fastdiff.kernels.chunked`, plain PyTorch, any device) and ``"fused"``
(the Triton kernel of :mod:`fastdiff.kernels.distillation`, registered where triton is installed) compute
the same ``(output, loss)`` without an ``N x N`` tensor. ``backend="auto"`` chooses per call: ``"fused"``
where the kernel can run (CUDA), else ``"chunked"`` from :data:`CHUNKED_MIN_TOKENS` tokens, else
``"materialized"``.

Teachers that can (the digits ViT / MAE teachers, the DINOv2 wrapper; see
:mod:`fastdiff.kernels.targets`) hand over each aligned block's queries and keys
(:class:`~fastdiff.kernels.targets.TeacherAttention`) instead of ``[B, H, N, N]`` probabilities
(``teacher_attention="auto"`` of :class:`TeacherAlignment`), so the teacher side forms no ``N x N``
tensor either; the materialised backend recomputes the probabilities from them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdiff.kernels._triton import kernel_can_run
from fastdiff.kernels.chunked import haste_chunked_backend
from fastdiff.kernels.processor import run_attention_processor
from fastdiff.kernels.targets import (
    ATTENTION_OUTPUTS,
    TeacherAttention,
    compute_dtype,
    dense_target,
    pool_attention,
    supports_attention_output,
    teacher_attention_output,
)
from fastdiff.training.repa import REPA, TOKEN_MATCHING, TeacherOutput, get_block, run_teacher, token_grid

# ------------------------------------------------------------------------------------ backends (seam)
AttentionBackend = Callable[..., "AttentionResult"]


@dataclass
class AttentionResult:
    """Output ``[B, H, N, d]`` of one attention call, the distillation loss (``None`` without a target)
    and, when asked for, the student's pre-softmax logits ``[B, H, N, N]``."""

    output: Tensor
    loss: Tensor | None = None
    logits: Tensor | None = None


def attention_cross_entropy(student_logits: Tensor, teacher_probs: Tensor) -> Tensor:
    """``mean_{b,h,i} -sum_j p_teacher[b,h,i,j] log softmax(student_logits)[b,h,i,j]`` over the first
    ``min(H_s, H_t)`` heads of each (HASTE's head-to-head pairing), in float32 (float64 inputs: float64)."""
    heads = min(student_logits.shape[1], teacher_probs.shape[1])
    dtype = compute_dtype(student_logits.dtype)
    log_q = F.log_softmax(student_logits[:, :heads].to(dtype), dim=-1)
    return -(teacher_probs[:, :heads].to(dtype) * log_q).sum(-1).mean()


def materialized_attention(query: Tensor, key: Tensor, value: Tensor, scale: float,
                           attn_mask: Tensor | None = None, target: Tensor | TeacherAttention | None = None,
                           keep_logits: bool = False) -> AttentionResult:
    """Reference: ``softmax(Q K^T * scale + mask) V`` with explicit logits, plus the CE to ``target``
    (teacher probabilities, or a :class:`TeacherAttention` whose probabilities are formed here)."""
    logits = (query @ key.transpose(-2, -1)) * scale
    if attn_mask is not None:
        logits = logits + attn_mask
    output = logits.softmax(-1).to(value.dtype) @ value
    loss = None if target is None else attention_cross_entropy(logits, dense_target(target))
    return AttentionResult(output, loss, logits if keep_logits else None)


_BACKENDS: dict[str, AttentionBackend] = {"materialized": materialized_attention, "chunked": haste_chunked_backend}
CHUNKED_MIN_TOKENS = 1024  # "auto" on devices without the fused kernel: the chunked loss from this many tokens


def register_attention_backend(name: str, fn: AttentionBackend) -> None:
    """Register an attention-distillation backend with :func:`materialized_attention`'s signature (e.g. a
    fused kernel under ``"fused"``, then chosen by ``backend="auto"``). It may ignore ``keep_logits``."""
    if not callable(fn):
        raise TypeError(f"backend {name!r} must be callable")
    _BACKENDS[name] = fn


def _register_fused_kernel() -> None:
    """``"fused"``: fastdiff's Triton kernel (:mod:`fastdiff.kernels.distillation`) where triton is installed;
    it runs the materialised reference where the kernel cannot (CPU), saying so once."""
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        from fastdiff.kernels.haste_backend import haste_fused_backend

        register_attention_backend("fused", haste_fused_backend)


_register_fused_kernel()


def available_attention_backends() -> tuple[str, ...]:
    return ("auto", *_BACKENDS)


def check_attention_backend(backend: str) -> str:
    """``backend`` if it is ``"auto"`` or registered, else a ValueError naming the choices."""
    if backend != "auto" and backend not in _BACKENDS:
        raise ValueError(f"attention backend must be one of {available_attention_backends()}, got {backend!r}")
    return backend


def resolve_attention_backend(backend: str = "auto", query: Tensor | None = None, keep_logits: bool = False) -> str:
    """The backend that runs a call on ``query`` ``[B, H, N, d]``: as named, or for ``"auto"``: the
    materialised reference when the logits are kept; ``"fused"`` when registered and its kernel can run on
    ``query`` (CUDA with triton; CPU only under ``TRITON_INTERPRET=1``); else ``"chunked"`` from
    :data:`CHUNKED_MIN_TOKENS` tokens; else ``"materialized"``. Without ``query``: the choice on a GPU."""
    if check_attention_backend(backend) != "auto":
        return backend
    if keep_logits:
        return "materialized"
    if "fused" in _BACKENDS and (query is None or kernel_can_run(query)):
        return "fused"
    if query is not None and max(query.shape[2], 1) >= CHUNKED_MIN_TOKENS:
        return "chunked"
    return "materialized"


# ------------------------------------------------------------------------------------------ processor
def _self_attention(block: nn.Module) -> nn.Module:
    from diffusers.models.attention_processor import Attention

    for name in ("attn1", "attn"):
        attn = getattr(block, name, None)
        if isinstance(attn, Attention) and not attn.is_cross_attention and attn.add_q_proj is None:
            return attn
    raise TypeError(f"{type(block).__name__} has no plain self-attention module (attn1/attn) to distil; "
                    "joint (SD3/Flux) attention is not supported by the attention-map loss")


class AttentionCaptureProcessor:
    """A diffusers attention processor for self-attention that runs an attention-distillation backend.

    With ``target`` (teacher probabilities ``[B, H_t, N, N]`` or a :class:`TeacherAttention`) it stores
    the CE loss in ``self.loss``; with ``keep_logits`` it stores the student's logits ``[B, H, N, N]`` in
    ``self.logits``. Without either it is a plain ``scaled_dot_product_attention`` processor.
    ``self.ran`` is the backend the last call used (``"auto"`` is resolved per call).
    """

    def __init__(self, backend: str = "materialized", target: Tensor | TeacherAttention | None = None,
                 keep_logits: bool = False):
        self.backend = check_attention_backend(backend)
        self.ran: str | None = None
        self.target = target
        self.keep_logits = keep_logits
        self.loss: Tensor | None = None
        self.logits: Tensor | None = None

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, **kwargs) -> Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("AttentionCaptureProcessor handles self-attention only")
        return run_attention_processor(attn, hidden_states, None, attention_mask, temb, self._attention)

    def _attention(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                   scale: float) -> Tensor:
        if self.target is None and not self.keep_logits:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scale)
        self.ran = resolve_attention_backend(self.backend, query, self.keep_logits)
        result = _BACKENDS[self.ran](query, key, value, scale, attention_mask, self.target, self.keep_logits)
        self.loss, self.logits = result.loss, result.logits
        return result.output


@contextmanager
def capture_attention(model: nn.Module, block_indices: Sequence[int],
                      targets: Sequence[Tensor | TeacherAttention | None] | None = None,
                      backend: str = "materialized", keep_logits: bool = False) -> Iterator[list[AttentionCaptureProcessor]]:
    """Install :class:`AttentionCaptureProcessor` on the self-attention of ``block_indices`` (0-based) for
    the duration of the ``with`` block, restoring the original processors afterwards."""
    targets = list(targets) if targets is not None else [None] * len(block_indices)
    if len(targets) != len(block_indices):
        raise ValueError(f"got {len(targets)} targets for {len(block_indices)} blocks")
    modules = [_self_attention(get_block(model, i)) for i in block_indices]
    originals = [m.processor for m in modules]
    processors = [AttentionCaptureProcessor(backend, t, keep_logits) for t in targets]
    try:
        for module, proc in zip(modules, processors):
            module.set_processor(proc)
        yield processors
    finally:
        for module, original in zip(modules, originals):
            module.set_processor(original)


def match_attention(probs: Tensor | TeacherAttention, num_tokens: int) -> Tensor | TeacherAttention:
    """Teacher attention ``[B, H, Nt, Nt]`` (or a :class:`TeacherAttention`) on the student's grid of
    ``num_tokens`` patches.

    Equal grids pass through; a teacher grid ``f`` times finer (per side) is pooled exactly: queries are
    averaged over each ``f x f`` cell and keys summed, so rows stay distributions
    (:func:`~fastdiff.kernels.targets.pool_attention`; queries and keys are pooled lazily, blockwise, by the
    backends). Anything else raises.
    """
    n_teacher = probs.num_queries if isinstance(probs, TeacherAttention) else probs.shape[-1]
    if n_teacher == num_tokens:
        return probs
    side_t, side_s = token_grid(n_teacher, "teacher attention"), token_grid(num_tokens, "student attention")
    if side_t % side_s:
        raise ValueError(f"teacher attention over a {side_t}x{side_t} grid cannot be pooled to the student's "
                         f"{side_s}x{side_s} grid; resize the teacher's input so the grids match")
    if isinstance(probs, TeacherAttention):
        return probs.pooled(side_t // side_s)
    return pool_attention(probs, side_t // side_s)


# ---------------------------------------------------------------------------------------- termination
class StageWiseTermination:
    """When to switch the alignment losses (and the teacher) off for good.

    Args:
        stop_step: fixed-iteration trigger (HASTE's ``--early-stop-point``): alignment runs on steps
            ``< stop_step``. ``None``: never by iteration.
        grad_angle_deg: optional gradient-angle trigger (our reading of HASTE's capacity-mismatch
            argument, not in the released code): every ``check_every`` steps the training loop reports
            ``cos(grad L_denoise, grad L_align)`` on the student's parameters; once its exponential moving
            average (``ema``) falls below ``cos(grad_angle_deg)`` for ``patience`` checks in a row,
            alignment stops.
    """

    def __init__(self, stop_step: int | None = None, grad_angle_deg: float | None = None, check_every: int = 50,
                 patience: int = 3, ema: float = 0.9, min_step: int = 0) -> None:
        if stop_step is not None and (not isinstance(stop_step, int) or stop_step < 0):
            raise ValueError(f"stop_step must be None or an int >= 0, got {stop_step!r}")
        if grad_angle_deg is not None and not 0 < grad_angle_deg < 180:
            raise ValueError(f"grad_angle_deg must be in (0, 180), got {grad_angle_deg!r}")
        if check_every < 1 or patience < 1:
            raise ValueError("check_every and patience must be >= 1")
        self.stop_step, self.grad_angle_deg = stop_step, grad_angle_deg
        self.check_every, self.patience, self.ema, self.min_step = check_every, patience, ema, min_step
        self.terminated_at: int | None = None
        self.cos_ema: float | None = None
        self._below = 0

    def active(self, step: int) -> bool:
        """Whether alignment (and the teacher) runs at optimisation step ``step``; records the stop."""
        if self.terminated_at is None and self.stop_step is not None and step >= self.stop_step:
            self.terminated_at = self.stop_step
        return self.terminated_at is None

    def wants_gradient_angle(self, step: int) -> bool:
        return self.grad_angle_deg is not None and self.active(step) and step % self.check_every == 0

    def report_gradient_cosine(self, step: int, cos: float) -> None:
        self.cos_ema = cos if self.cos_ema is None else self.ema * self.cos_ema + (1 - self.ema) * cos
        self._below = self._below + 1 if self.cos_ema < math.cos(math.radians(self.grad_angle_deg)) else 0
        if self._below >= self.patience and step >= self.min_step:
            self.terminated_at = step + 1

    def state_dict(self) -> dict:
        return {"terminated_at": self.terminated_at, "cos_ema": self.cos_ema, "below": self._below}

    def load_state_dict(self, state: dict) -> None:
        self.terminated_at, self.cos_ema, self._below = state["terminated_at"], state["cos_ema"], state["below"]


def gradient_cosine(loss_a: Tensor, loss_b: Tensor, params: Sequence[Tensor]) -> float:
    """Cosine between the gradients of two losses over ``params`` (graph kept for the real backward)."""
    params = [p for p in params if p.requires_grad]
    grads = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in (loss_a, loss_b)]
    flat = [torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().float() for g, p in zip(gs, params)])
            for gs in grads]
    return F.cosine_similarity(flat[0], flat[1], dim=0).item()


# ------------------------------------------------------------------------------------- teacher cache
class TeacherCache:
    """Per-sample memo of teacher outputs, keyed by dataset index.

    The teacher sees the *clean* image, so without data augmentation its output for a sample never
    changes: computing it once per sample (the first epoch) instead of once per step removes the teacher
    from the steady-state cost. Held in host memory: ``N x (tokens + attention maps)`` (maps as the teacher
    hands them over: probabilities, or queries and keys); only for datasets without random augmentation.
    """

    def __init__(self) -> None:
        self._tokens: dict[int, Tensor] = {}
        self._attentions: dict[int, list[Tensor | TeacherAttention]] = {}

    def __len__(self) -> int:
        return len(self._tokens)

    def __call__(self, indices: Sequence[int], images: Tensor,
                 run: Callable[[Tensor], TeacherOutput]) -> tuple[TeacherOutput, int]:
        """Outputs for ``images`` (dataset ``indices``), running ``run`` on the misses; returns
        ``(output, number of images the teacher actually ran on)``."""
        indices = [int(i) for i in indices]
        missing = [j for j, i in enumerate(indices) if i not in self._tokens]
        if missing:
            out = run(images[missing])
            for row, j in enumerate(missing):  # clone: a view would keep the whole batch alive
                self._tokens[indices[j]] = out.tokens[row].detach().cpu().clone()
                self._attentions[indices[j]] = [
                    a.map(lambda t, row=row: t[row].detach().cpu().clone()) if isinstance(a, TeacherAttention)
                    else a[row].detach().cpu().clone() for a in out.attentions]
        device = images.device
        tokens = torch.stack([self._tokens[i] for i in indices]).to(device)
        levels = len(self._attentions[indices[0]])
        attentions = []
        for k in range(levels):
            items = [self._attentions[i][k] for i in indices]
            attentions.append(TeacherAttention.stack(items).map(lambda t: t.to(device))
                              if isinstance(items[0], TeacherAttention) else torch.stack(items).to(device))
        return TeacherOutput(tokens, attentions), len(missing)


# ------------------------------------------------------------------------------------- the alignment
class TeacherAlignment(nn.Module):
    """REPA and/or attention distillation against one frozen teacher, with optional termination.

    * REPA (Yu et al. 2025): ``repa`` set, no ``attention_pairs``, no ``termination``.
    * HASTE (Wang et al. 2025): ``repa`` + ``attention_pairs`` + ``termination``.

    Per training step::

        if align.active(step):
            target = align.run_teacher(clean_images, student_tokens)   # teacher: no grad
            with align.capture(model, target):
                prediction = model(noisy, ...)
            aux = align.losses()            # {"repa": ..., "attn": ..., "align": weighted sum}
        else:
            prediction = model(noisy, ...)  # teacher not run, no hooks, no processors

    Args:
        teacher: frozen ``nn.Module`` images -> patch tokens / :class:`TeacherOutput`.
        repa: the :class:`REPA` module (projector + block hook), or ``None`` for attention only.
        attention_pairs: ``(student_block, teacher_block)`` pairs, 0-based.
        attention_weight: coefficient ``l_A`` of the attention loss.
        termination: a :class:`StageWiseTermination`, or ``None`` to align for the whole run.
        backend: attention-distillation backend (``"auto"``: per call, see :func:`resolve_attention_backend`).
        token_matching: ``"resize"`` the teacher's input to the student's grid, or ``"interpolate"``
            its tokens (see :func:`fastdiff.training.repa.run_teacher`).
        teacher_attention: how the teacher hands over its attention: ``"qk"`` its queries and keys per
            block (:class:`TeacherAttention`, no ``N x N`` tensor; the teacher must support it), ``"probs"``
            the dense ``[B, H, N, N]`` probabilities (HASTE's released code, the reference), ``"auto"``:
            ``"qk"`` when the teacher supports it (:func:`~fastdiff.kernels.targets.supports_attention_output`).

    The teacher is held outside the module tree (not saved in checkpoints, not wrapped by DDP): move it
    to the device yourself.
    """

    def __init__(self, teacher: nn.Module, repa: REPA | None = None,
                 attention_pairs: Sequence[tuple[int, int]] = (), attention_weight: float = 0.5,
                 termination: StageWiseTermination | None = None, backend: str = "auto",
                 token_matching: str = "resize", teacher_attention: str = "auto") -> None:
        super().__init__()
        if repa is None and not attention_pairs:
            raise ValueError("TeacherAlignment needs REPA, attention pairs, or both")
        if token_matching not in TOKEN_MATCHING:
            raise ValueError(f"token_matching must be one of {TOKEN_MATCHING}, got {token_matching!r}")
        self.token_matching = token_matching
        self.teacher = [teacher.eval().requires_grad_(False)]  # a list: not a submodule, never trained/saved
        self.repa = repa
        self.attention_pairs = [(int(s), int(t)) for s, t in attention_pairs]
        self.attention_weight = float(attention_weight)
        self.termination = termination
        self.backend = check_attention_backend(backend)
        if teacher_attention not in ("auto", *ATTENTION_OUTPUTS):
            raise ValueError(f"teacher_attention must be one of {('auto', *ATTENTION_OUTPUTS)}, got {teacher_attention!r}")
        if teacher_attention == "qk" and not supports_attention_output(teacher):
            raise ValueError(f"teacher_attention='qk' needs a teacher that hands over queries and keys (an "
                             f"attention_output attribute); {type(teacher).__name__} has none: use 'probs' or 'auto'")
        if teacher_attention == "auto":
            teacher_attention = "qk" if supports_attention_output(teacher) else "probs"
        self.teacher_attention = teacher_attention
        self._target: TeacherOutput | None = None
        self._processors: list[AttentionCaptureProcessor] = []

    @property
    def teacher_module(self) -> nn.Module:
        return self.teacher[0]

    def active(self, step: int) -> bool:
        return self.termination is None or self.termination.active(step)

    def check(self, model: nn.Module) -> None:
        """Validate block indices against ``model`` and the teacher (clear errors before training)."""
        if self.repa is not None:
            get_block(model, self.repa.block_index)
        for s, _ in self.attention_pairs:
            _self_attention(get_block(model, s))

    @torch.no_grad()
    def run_teacher(self, images: Tensor, student_tokens: int) -> TeacherOutput:
        """Run the teacher on clean ``images``; tokens and attention maps (probabilities or
        :class:`TeacherAttention`, per ``teacher_attention``) matched to ``student_tokens``."""
        mode = self.teacher_attention if self.attention_pairs else "probs"
        with teacher_attention_output(self.teacher_module, mode):
            out = run_teacher(self.teacher_module, images, student_tokens, self.token_matching)
        if not self.attention_pairs:
            return TeacherOutput(out.tokens)  # drop attention maps nobody reads (they would be cached)
        depth = len(out.attentions)
        attentions = []
        for _, t in self.attention_pairs:
            if not 0 <= t < depth:
                raise ValueError(f"teacher block index must be in 0..{depth - 1} (the teacher returned {depth} "
                                 f"attention maps), got {t}")
            attentions.append(match_attention(out.attentions[t], student_tokens))
        return TeacherOutput(out.tokens, attentions)

    @contextmanager
    def capture(self, model: nn.Module, target: TeacherOutput) -> Iterator[None]:
        """Hook the REPA block and install attention processors on ``model`` for one forward pass."""
        self._target = target
        repa_ctx = self.repa.capture(model) if self.repa is not None else nullcontext()
        blocks = [s for s, _ in self.attention_pairs]
        attn_ctx = capture_attention(model, blocks, target.attentions, self.backend) if blocks else nullcontext([])
        with repa_ctx, attn_ctx as processors:
            self._processors = processors
            yield

    def losses(self) -> dict[str, Tensor]:
        """``{"repa", "attn", "align"}`` for the last captured forward (``align`` is the weighted sum)."""
        if self._target is None:
            raise RuntimeError("no captured forward: call run_teacher and run the model inside capture() first")
        out: dict[str, Tensor] = {}
        total = 0.0
        if self.repa is not None:
            out["repa"] = self.repa.loss(self._target.tokens)
            total = total + self.repa.weight * out["repa"]
        if self.attention_pairs:
            missing = [s for (s, _), p in zip(self.attention_pairs, self._processors) if p.loss is None]
            if missing:
                raise RuntimeError(f"student blocks {missing} ran no self-attention during the captured forward")
            out["attn"] = torch.stack([p.loss for p in self._processors]).mean()
            total = total + self.attention_weight * out["attn"]
        out["align"] = total
        self._target, self._processors = None, []
        return out
