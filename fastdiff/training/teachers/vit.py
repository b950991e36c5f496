"""``DigitsViT``: the small offline REPA/HASTE teacher, its training recipe and loader.

A plain pre-norm ViT (Dosovitskiy et al. 2021) without CLS token: patch tokens are mean-pooled for the
classification head used in training, and the normalised patch tokens are the REPA target. Each block
also returns its attention probabilities, the HASTE target, or with ``attention_output = "qk"`` its queries
and keys (:class:`~fastdiff.kernels.targets.TeacherAttention`; the block then attends with
``scaled_dot_product_attention`` and no ``N x N`` tensor is formed).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdiff._package import save_network
from fastdiff.data import IMAGE_SIZE, NUM_CLASSES, load_digits
from fastdiff.kernels.targets import ATTENTION_OUTPUTS, TeacherAttention
from fastdiff.training.repa import TeacherOutput

TEACHER_DIR = Path(__file__).with_name("digits_vit")
MAE_TEACHER_DIR = Path(__file__).with_name("digits_mae")  # the MAE teacher (teachers/mae.py)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor, attention_output: str = "probs") -> tuple[Tensor, Tensor | TeacherAttention]:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scale = (d // self.heads) ** -0.5
        if attention_output == "qk":  # same attention, never materialised; hand over Q and K
            attn = TeacherAttention(query=q, key=k, scale=scale)
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        else:
            attn = (q @ k.transpose(-2, -1) * scale).softmax(-1)  # [B, H, N, N]
            out = attn @ v
        x = x + self.proj(out.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x)), attn


class DigitsViT(nn.Module):
    """ViT over ``patch_size`` patches of ``[B, 1, S, S]`` images in [-1, 1]; returns a :class:`TeacherOutput`.

    ``forward`` accepts any side divisible by ``patch_size`` (position embeddings are resized bicubically),
    so REPA's "resize the image to match tokens" works as for DINOv2.
    """

    def __init__(self, image_size: int = IMAGE_SIZE, patch_size: int = 2, dim: int = 64, depth: int = 4,
                 heads: int = 4, mlp_ratio: int = 4, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.patch_size, self.grid = patch_size, image_size // patch_size
        self.embed = nn.Conv2d(1, dim, patch_size, stride=patch_size)
        self.pos = nn.Parameter(torch.randn(1, dim, self.grid, self.grid) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes else None  # None: self-supervised (MAE) teacher
        # "probs": attentions are [B, H, N, N] probabilities; "qk": TeacherAttention (queries and keys)
        self.attention_output = "probs"

    @property
    def embed_dim(self) -> int:
        return self.norm.normalized_shape[0]

    def patch_embed(self, images: Tensor) -> Tensor:
        """Patch tokens plus position embeddings ``[B, N, D]`` (row-major grid)."""
        x = self.embed(images)
        pos = self.pos if x.shape[-2:] == self.pos.shape[-2:] else F.interpolate(
            self.pos, size=x.shape[-2:], mode="bicubic", align_corners=False)
        return (x + pos).flatten(2).transpose(1, 2)

    def encode(self, x: Tensor) -> TeacherOutput:
        """The blocks and final LayerNorm over embedded tokens ``x`` (all of them, or MAE's visible subset)."""
        if self.attention_output not in ATTENTION_OUTPUTS:
            raise ValueError(f"attention_output must be one of {ATTENTION_OUTPUTS}, got {self.attention_output!r}")
        attentions = []
        for block in self.blocks:
            x, attn = block(x, self.attention_output)
            attentions.append(attn)
        return TeacherOutput(tokens=self.norm(x), attentions=attentions)

    def forward(self, images: Tensor) -> TeacherOutput:
        return self.encode(self.patch_embed(images))

    def classify(self, images: Tensor) -> Tensor:
        if self.head is None:
            raise ValueError("this DigitsViT has no classification head (num_classes=0: a self-supervised teacher)")
        return self.head(self(images).tokens.mean(1))


# ----------------------------------------------------------------------------------------- training
def _augment(x: Tensor, gen: torch.Generator, max_shift: float, max_rotate: float, max_scale: float) -> Tensor:
    """Random affine (shift in pixels, rotation in degrees, scale) of images in [-1, 1], black padding."""
    b = x.shape[0]
    u = (torch.rand(b, 4, generator=gen) * 2 - 1).unbind(1)
    angle, scale = u[0] * math.radians(max_rotate), 1 + u[1] * max_scale
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    shift = torch.stack([u[2], u[3]], 1) * (2 * max_shift / x.shape[-1])
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False) - 1


def train_digits_teacher(epochs: int = 30, batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 0.05,
                         max_shift: float = 2.0, max_rotate: float = 12.0, max_scale: float = 0.12, seed: int = 0,
                         log: Callable[[str], None] | None = print, **architecture: int) -> tuple[DigitsViT, dict]:
    """Train :class:`DigitsViT` to classify the digits train split (AdamW, one-cycle LR, random affine).

    Returns ``(teacher, record)``; the record holds the architecture, recipe and train/test accuracy (the
    test split is only measured).
    """
    recipe = dict(objective="classification (cross-entropy on mean-pooled patch tokens)", epochs=epochs,
                  batch_size=batch_size, lr=lr, weight_decay=weight_decay, max_shift=max_shift,
                  max_rotate=max_rotate, max_scale=max_scale, seed=seed, optimizer="AdamW", lr_schedule="OneCycle",
                  data="fastdiff.data.load_digits('train') (1438 images); test split only for accuracy",
                  command="python -m fastdiff.training.teachers --out DIR")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = DigitsViT(**architecture)
    x_train, y_train = load_digits("train")
    x_test, y_test = load_digits("test")
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    total_steps = epochs * math.ceil(len(x_train) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        for idx in torch.randperm(len(x_train), generator=gen).split(batch_size):
            x = _augment(x_train[idx], gen, max_shift, max_rotate, max_scale)
            loss = F.cross_entropy(net.classify(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if log is not None and (epoch + 1) % 5 == 0:
            log(f"epoch {epoch + 1:3d}  loss {loss.item():.4f}  test acc {_accuracy(net, x_test, y_test):.4f}  "
                f"{time.perf_counter() - t0:.0f}s")
    net.eval().requires_grad_(False)
    arch = dict(image_size=IMAGE_SIZE, patch_size=net.patch_size, dim=net.embed_dim, depth=len(net.blocks),
                heads=net.blocks[0].heads, mlp_ratio=net.blocks[0].mlp[0].out_features // net.embed_dim,
                num_classes=net.head.out_features if net.head is not None else 0)
    record = {"architecture": arch, "recipe": recipe,
              "outputs": "tokens: final LayerNorm of the 64 patch tokens; attentions: per-block softmax(QK^T/sqrt d)",
              "accuracy": {"train": round(_accuracy(net, x_train, y_train), 4),
                           "test": round(_accuracy(net, x_test, y_test), 4)},
              "num_parameters": sum(p.numel() for p in net.parameters()),
              "train_seconds": round(time.perf_counter() - t0, 1), "versions": {"torch": torch.__version__}}
    return net, record


@torch.no_grad()
def _accuracy(net: DigitsViT, images: Tensor, labels: Tensor) -> float:
    was_training = net.training
    net.eval()
    acc = (net.classify(images).argmax(1) == labels).float().mean().item()
    net.train(was_training)
    return acc


def truncate_teacher(net: DigitsViT, blocks: int) -> DigitsViT:
    """A frozen copy of ``net`` with its first ``blocks`` blocks only (then its final LayerNorm): its tokens are
    the trained encoder's block-``blocks`` features. Earlier blocks of a ViT carry more of the image's local
    content and less of its class (``probe.class_r2`` falls with depth), which is what a REPA target that is
    not a label embedding needs. The head (if any) is dropped."""
    if isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks <= len(net.blocks):
        raise ValueError(f"blocks must be an int in 1..{len(net.blocks)} (the teacher's depth); got {blocks!r}")
    first = net.blocks[0]
    out = DigitsViT(image_size=net.grid * net.patch_size, patch_size=net.patch_size, dim=net.embed_dim,
                    depth=blocks, heads=first.heads, mlp_ratio=first.mlp[0].out_features // net.embed_dim,
                    num_classes=0)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("head.")}
    out.load_state_dict({k: v for k, v in state.items()
                         if not k.startswith("blocks.") or int(k.split(".")[1]) < blocks})
    out.attention_output = net.attention_output
    return out.eval().requires_grad_(False)


def save_teacher(net: DigitsViT, record: dict, out: str | Path) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``out``."""
    return save_network(net, record, out)


def load_digits_teacher(path: str | Path = TEACHER_DIR, device: str | torch.device = "cpu") -> DigitsViT:
    """The shipped (or a rebuilt) :class:`DigitsViT`, frozen and in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no teacher weights in {path}; build them with "
                                f"`python -m fastdiff.training.teachers --out {path}`")
    record = json.loads((path / "config.json").read_text())
    net = DigitsViT(**record["architecture"])
    net.load_state_dict(load_file(path / "model.safetensors"))
    return net.to(device).eval().requires_grad_(False)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m fastdiff.training.teachers --out DIR``: train and save the digits teacher."""
    parser = argparse.ArgumentParser(prog="python -m fastdiff.training.teachers", description=main.__doc__)
    parser.add_argument("--out", type=Path, default=TEACHER_DIR)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    net, record = train_digits_teacher(epochs=args.epochs, seed=args.seed)
    out = save_teacher(net, record, args.out)
    print(f"wrote {out}: test accuracy {record['accuracy']['test']:.4f}, "
          f"{(out / 'model.safetensors').stat().st_size / 1024:.0f} KiB")
