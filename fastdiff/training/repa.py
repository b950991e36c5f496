"""REPA: representation alignment of a diffusion transformer's hidden states to a frozen encoder.

Yu et al. 2025, "Representation Alignment for Generation: Training Diffusion Transformers Is Easier Than
You Think" (arXiv:2410.06940, github.com/sihyun-yu/REPA). The hidden state ``h`` after one block of the
denoiser is mapped by a small MLP projector to the teacher's width and pulled towards the teacher's patch
tokens ``y`` of the clean image: ``L_REPA = -mean_{b, n} cos(proj(h_{b,n}), y_{b,n})``, added to the
denoising loss with weight 0.5 (REPA's default).

The hidden state is read by a forward hook on ``model.transformer_blocks[block_index]`` (or ``blocks`` /
``layers``), so any diffusers transformer works unchanged: PixArt, DiT, SD3 (image stream of a joint block),
Flux, the embedded digits model. ``block_index`` is 0-based: REPA's ``--encoder-depth 8`` is
``block_index=7``. Teachers are any ``nn.Module`` mapping images to patch tokens ``[B, N, D]`` (or to a
:class:`TeacherOutput`); see :mod:`fastdiff.training.teachers`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from fastdiff.kernels.targets import TeacherAttention

TOKEN_MATCHING = ("resize", "interpolate")
BLOCK_LIST_NAMES = ("transformer_blocks", "blocks", "layers")


@dataclass
class TeacherOutput:
    """What a teacher returns: patch tokens ``[B, N, D]`` and, for HASTE, one entry per block over the same
    ``N`` patch tokens (no CLS/register tokens): attention probabilities ``[B, H, N, N]`` (rows sum to 1), or,
    from a teacher with ``attention_output = "qk"``, a :class:`~fastdiff.kernels.targets.TeacherAttention`
    (its queries and keys; the ``N x N`` map is never formed)."""

    tokens: Tensor
    attentions: list[Tensor | TeacherAttention] = field(default_factory=list)


def as_teacher_output(output: Tensor | TeacherOutput) -> TeacherOutput:
    if isinstance(output, TeacherOutput):
        return output
    if isinstance(output, Tensor) and output.ndim == 3:
        return TeacherOutput(tokens=output)
    raise TypeError(f"a teacher must return patch tokens [B, N, D] or a TeacherOutput, got {type(output).__name__}"
                    + (f" of shape {tuple(output.shape)}" if isinstance(output, Tensor) else ""))


# ----------------------------------------------------------------------------------------- blocks, hook
def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The main stack of transformer blocks of a diffusers transformer (``transformer_blocks`` etc.)."""
    for name in BLOCK_LIST_NAMES:
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    raise TypeError(f"{type(model).__name__} has no block list (looked for {BLOCK_LIST_NAMES}); "
                    "REPA/HASTE need a transformer denoiser (PixArt, DiT, SD3, Flux, ...)")


def get_block(model: nn.Module, block_index: int) -> nn.Module:
    """``find_blocks(model)[block_index]`` with a clear error for an index out of range (0-based)."""
    blocks = find_blocks(model)
    if not isinstance(block_index, int) or isinstance(block_index, bool) or not 0 <= block_index < len(blocks):
        raise ValueError(f"block_index must be an int in 0..{len(blocks) - 1} ({type(model).__name__} has "
                         f"{len(blocks)} blocks), got {block_index!r}")
    return blocks[block_index]


def _image_stream(output: Tensor | tuple) -> Tensor:
    # PixArt/DiT blocks return the hidden state; SD3/Flux joint blocks return (context, image) states.
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[-1], Tensor):
        return output[-1]
    raise TypeError(f"cannot read a hidden state from a block output of type {type(output).__name__}")


class BlockOutputHook:
    """Forward hook keeping the hidden state ``[B, N, D]`` produced by one block (removable).

    ``hook.output`` is the last captured state (``None`` before the first forward); gradients flow through
    it. Use as a context manager or call :meth:`remove`; the output stays readable after removal.
    """

    def __init__(self, model: nn.Module, block_index: int) -> None:
        self.block_index = block_index
        self.output: Tensor | None = None
        self._handle = get_block(model, block_index).register_forward_hook(self._store)

    def _store(self, module: nn.Module, args: tuple, output: Tensor | tuple) -> None:
        self.output = _image_stream(output)

    def remove(self) -> None:
        """Detach the hook (the last captured ``output`` stays readable)."""
        self._handle.remove()

    def __enter__(self) -> BlockOutputHook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# ------------------------------------------------------------------------------------ projector, tokens
class Projector(nn.Sequential):
    """REPA's projector: ``Linear(D, hidden) - SiLU - Linear(hidden, hidden) - SiLU - Linear(hidden, out)``
    (REPA uses hidden 2048, out 768 for DINOv2-B)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048) -> None:
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim), nn.SiLU(),
                         nn.Linear(hidden_dim, out_dim))


def token_grid(num_tokens: int, name: str = "tokens") -> int:
    """Side of the square patch grid holding ``num_tokens`` tokens (``ValueError`` if not a square)."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{name}: {num_tokens} tokens do not form a square patch grid, so student and teacher "
                         "tokens cannot be matched spatially")
    return side


def resize_for_teacher(images: Tensor, student_tokens: int, patch_size: int) -> Tensor:
    """Resize images so a teacher with ``patch_size`` produces the student's square token grid (REPA)."""
    side = token_grid(student_tokens, "student") * patch_size
    if images.shape[-2:] == (side, side):
        return images
    return F.interpolate(images, size=(side, side), mode="bicubic", align_corners=False)


def match_tokens(teacher_tokens: Tensor, num_tokens: int) -> Tensor:
    """Teacher tokens ``[B, Nt, D]`` on the student's grid of ``num_tokens`` (bilinear on the 2-D grid)."""
    n_teacher = teacher_tokens.shape[1]
    if n_teacher == num_tokens:
        return teacher_tokens
    side_t, side_s = token_grid(n_teacher, "teacher"), token_grid(num_tokens, "student")
    grid = teacher_tokens.transpose(1, 2).reshape(teacher_tokens.shape[0], -1, side_t, side_t)
    grid = F.interpolate(grid, size=(side_s, side_s), mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2)


@torch.no_grad()
def run_teacher(teacher: nn.Module, images: Tensor, student_tokens: int, token_matching: str = "resize") -> TeacherOutput:
    """The teacher's output for clean ``images`` with its tokens on the student's grid of ``student_tokens``.

    ``token_matching="resize"`` resizes the images so a teacher with a ``patch_size`` attribute yields the
    student's grid (REPA's recipe; teachers without ``patch_size`` get the images as they are);
    ``"interpolate"`` feeds the images unchanged. Remaining differences are interpolated
    (:func:`match_tokens`). Attention maps are returned as the teacher produced them.
    """
    if token_matching not in TOKEN_MATCHING:
        raise ValueError(f"token_matching must be one of {TOKEN_MATCHING}, got {token_matching!r}")
    patch = getattr(teacher, "patch_size", None)
    if token_matching == "resize" and isinstance(patch, int):
        images = resize_for_teacher(images, student_tokens, patch)
    out = as_teacher_output(teacher(images))
    return TeacherOutput(match_tokens(out.tokens, student_tokens), out.attentions)


def negative_cosine(projected: Tensor, teacher_tokens: Tensor) -> Tensor:
    """``-mean_{b, n} cos(projected[b, n], teacher[b, n])`` (REPA's projection loss), in float32."""
    if projected.shape != teacher_tokens.shape:
        raise ValueError(f"projected {tuple(projected.shape)} and teacher tokens {tuple(teacher_tokens.shape)} "
                         "must have the same shape")
    return -F.cosine_similarity(projected.float(), teacher_tokens.float(), dim=-1).mean()


# ------------------------------------------------------------------------------------------------ REPA
class REPA(nn.Module):
    """Trainable part of REPA (the projector) plus the hook that feeds it.

    Usage inside a training step (``N`` = the student's token count)::

        target = run_teacher(teacher, clean_images, N).tokens      # no grad; grids matched
        with repa.capture(model):
            out = model(noisy, ...)
        loss = denoising_loss + repa.weight * repa.loss(target)

    Args:
        hidden_dim: width ``D`` of the student's hidden state at ``block_index``.
        teacher_dim: width of the teacher's tokens.
        block_index: 0-based block whose output is aligned.
        projector_dim: projector hidden width.
        weight: coefficient of the REPA loss (``lambda``; 0.5 in the paper).
    """

    def __init__(self, hidden_dim: int, teacher_dim: int, block_index: int, projector_dim: int = 2048,
                 weight: float = 0.5) -> None:
        super().__init__()
        self.projector = Projector(hidden_dim, teacher_dim, projector_dim)
        self.block_index = block_index
        self.weight = float(weight)
        self._hook: BlockOutputHook | None = None

    @contextmanager
    def capture(self, model: nn.Module) -> Iterator[BlockOutputHook]:
        """Hook ``model``'s block ``block_index`` for the duration of one forward pass."""
        hook = BlockOutputHook(model, self.block_index)
        self._hook = hook
        try:
            yield hook
        finally:
            hook.remove()

    def loss(self, teacher_tokens: Tensor) -> Tensor:
        """``-cos`` between the projected captured hidden state and ``teacher_tokens`` ``[B, N, D]``."""
        if self._hook is None or self._hook.output is None:
            raise RuntimeError("no hidden state captured: run the model inside `with repa.capture(model):` first")
        hidden = self._hook.output
        if hidden.ndim != 3:
            raise ValueError(f"block {self.block_index} output has shape {tuple(hidden.shape)}, expected [B, N, D]")
        if teacher_tokens.shape[1] != hidden.shape[1]:
            teacher_tokens = match_tokens(teacher_tokens, hidden.shape[1])
        projected = self.projector(hidden.to(self.projector[0].weight.dtype))
        return negative_cosine(projected, teacher_tokens)
