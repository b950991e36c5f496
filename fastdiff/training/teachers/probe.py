"""How much a teacher's tokens are a label embedding, and how sharp its attention is.

* ``class_r2``: the fraction of the variance of the patch tokens explained by the class label, position by
  position: ``1 - sum_{i,n} |y_in - m_{c(i),n}|^2 / sum_{i,n} |y_in - m_n|^2`` with ``m_{c,n}`` the mean token
  of class ``c`` at position ``n`` and ``m_n`` the mean token at ``n``. 1 means the tokens are a function of the
  label (a label embedding), 0 that the label says nothing about them.
* ``class_mean_cosine``: mean ``cos(y_in, m_{c(i),n})``, how well "predict the class's mean token" already
  scores on REPA's cosine objective.
* ``attention_entropy``: mean entropy (nats) of each block's attention rows, against ``log N`` (uniform).

:func:`probe_blocks` gives the class R^2 of every block's output of a :class:`DigitsViT` (through its final
LayerNorm), which is what choosing the teacher's depth (``teachers.vit.truncate_teacher``) is read from.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdiff.data import load_digits
from fastdiff.training.repa import as_teacher_output


def class_r2(tokens: Tensor, labels: Tensor) -> float:
    """Per-position class R^2 of ``tokens [M, N, D]`` given ``labels [M]`` (see the module docstring)."""
    tokens = tokens.double()
    total = (tokens - tokens.mean(0, keepdim=True)).pow(2).sum()
    residual = torch.zeros((), dtype=torch.float64)
    for c in labels.unique():
        group = tokens[labels == c]
        residual = residual + (group - group.mean(0, keepdim=True)).pow(2).sum()
    return float(1 - residual / total)


def class_mean_cosine(tokens: Tensor, labels: Tensor) -> float:
    """Mean cosine of each token to its class's mean token at the same position."""
    means = torch.stack([tokens[labels == c].mean(0) for c in range(int(labels.max()) + 1)])
    return float(F.cosine_similarity(tokens, means[labels], dim=-1).mean())


def attention_entropy(attentions: list[Tensor]) -> list[float]:
    """Mean row entropy (nats) of each ``[B, H, N, N]`` attention map."""
    return [float(-(a.clamp_min(1e-12).log() * a).sum(-1).mean()) for a in attentions]


@torch.no_grad()
def probe_teacher(teacher: nn.Module, split: str = "test") -> dict:
    """``class_r2`` (raw and of L2-normalised tokens), ``class_mean_cosine`` and attention entropies on
    the digits ``split`` at the teacher's native resolution."""
    images, labels = load_digits(split)
    out = as_teacher_output(teacher.eval()(images))
    tokens = out.tokens
    n = tokens.shape[1]
    entropy = attention_entropy(out.attentions)
    return {"split": split, "num_images": len(images), "num_tokens": n,
            "class_r2": round(class_r2(tokens, labels), 4),
            "class_r2_normalized_tokens": round(class_r2(F.normalize(tokens, dim=-1), labels), 4),
            "class_mean_cosine": round(class_mean_cosine(tokens, labels), 4),
            "attention_entropy_per_block": [round(e, 4) for e in entropy],
            "attention_entropy_mean": round(sum(entropy) / len(entropy), 4) if entropy else None,
            "uniform_entropy": round(math.log(n), 4)}


@torch.no_grad()
def probe_blocks(teacher: nn.Module, split: str = "test") -> list[float]:
    """Class R^2 of the output of each block ``k`` of a ``DigitsViT`` passed through its final LayerNorm (the
    tokens of the teacher truncated to ``k + 1`` blocks), on the digits ``split``."""
    images, labels = load_digits(split)
    x, r2 = teacher.eval().patch_embed(images), []
    for block in teacher.blocks:
        x, _ = block(x)
        r2.append(round(class_r2(teacher.norm(x), labels), 4))
    return r2
