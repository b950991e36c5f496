"""A self-supervised digits teacher: a :class:`DigitsViT` encoder trained as a masked autoencoder (MAE).

He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners" (arXiv:2111.06377, github.com/facebookresearch/mae
``models_mae.py``). Per image: the ``N`` patch tokens (plus position embeddings) are shuffled by
``argsort(uniform noise)`` and only the first ``N (1 - mask_ratio)`` are kept (``random_masking``); the encoder
(the teacher that ships) sees the visible tokens only; a light decoder embeds its output to the decoder
width, appends a shared learned mask token for every removed patch, unshuffles, adds decoder position
embeddings, runs its blocks and predicts each patch's pixels; the loss is the pixel MSE averaged over the
*masked* patches only (``forward_loss``, ``norm_pix_loss=False``). Labels are never used. REPA (Yu et al.
2025, Table 2) lists MAE among the encoders whose alignment speeds DiT/SiT training up.

Choices of ours for 16x16 digits (the paper's ImageNet recipe does not transfer as is): patch 4 so the token
grid (4x4) is the benchmark student's; mask ratio 0.75 (the paper's default); random-affine augmentation
instead of random-resized-crop + flip (digits are not mirror-symmetric); AdamW lr 1e-3 (MAE: 1.5e-4 x
batch/256 over 800 epochs; far too slow for a CPU budget), betas (0.9, 0.95) and weight decay 0.05 as in MAE,
linear warmup then cosine. Only the train split is used; the test split is only measured.

Options measured against the shipped recipe (test-split probe; REPA check: the unconditional testbed of
``benchmarks/training_speed.py`` at 2000 steps, paired against its stored baseline and ``digits_mae`` REPA runs of
the same seeds, ``runs/trainspeed-teacher/``; 2026-12-01). The pixels' own per-patch class R^2 is 0.462, so
tokens below 0.5 are barely more class-laden than the image:

* MAE's ``norm_pix_loss`` (``--norm-pix-loss``) at mask ratio 0.75: class R^2 0.556, attention entropy 1.46
  nats (2000 steps); at mask 0.5, 5000 steps: **0.490** / 2.05 (less sharp), REPA steps-to-target ratio
  0.60 / 0.73 (seeds 0 / 1) vs ``digits_mae``'s 0.61 / 0.67, FD of the last 2 evaluations 78.3 / 85.3 vs
  74.9 / 79.9: worse. At 4000 steps (``training_speed_teacher_normpix50_4000{,_haste}.json``): REPA 0.38 / 0.45
  / **0.57** per seed vs 0.38 / 0.42 / 0.43 (mean curve 0.44 vs 0.41), HASTE 0.36 / **0.76** (seeds 0 / 1; the
  gradient-angle stop fired at step 651 on seed 1) vs 0.38 / 0.38;
* ``--keep-blocks 3`` (the first 3 of the 6 trained blocks, :func:`keep_blocks`): **0.489** / 1.52 (sharper), REPA
  ratio 0.60 / 0.66 / 0.72 (seeds 0-2) vs 0.61 / 0.67 / 0.70, last-evaluations FD 80.8 / 80.5 / 89.5 vs
  74.9 / 79.9 / 76.7: earlier, then worse (HASTE seed 0: 0.57 vs 0.62, FD 79.0 vs 76.0). On the testbed's whole
  4000-step budget (the same runs continued, ``training_speed_teacher_keep_blocks3_4000{,_haste}.json``): REPA
  0.36 / 0.41 / **0.51** per seed vs 0.38 / 0.42 / 0.43 (mean curve 0.43 vs 0.41), HASTE 0.34 / **0.80** (seeds
  0 / 1; its gradient-angle stop fired at step 501 on seed 1, never with the shipped teacher) vs 0.38 / 0.38.

Both meet class R^2 < 0.5 and both miss the same targets at 4000 steps where the shipped teacher meets them on all
three seeds: REPA <= 0.5x on seed 2 (norm-pix by 0.07, the 3-block cut by 0.006) and HASTE <= REPA on seed 1 (the
gradient-angle stop ends HASTE's alignment early with either teacher, at step 651 / 501, never with the shipped
one). So ``digits_mae`` (0.564 / 1.66) stays the shipped teacher: on this testbed a teacher with less class
information is not a more useful target.

Rebuild the shipped teacher (about 8 minutes on one idle CPU core, 17 on a loaded one)::

    OMP_NUM_THREADS=1 python -m fastdiff.training.teachers.mae --out fastdiff/training/teachers/digits_mae
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from fastdiff.data import IMAGE_SIZE, load_digits
from fastdiff.training.teachers.probe import probe_blocks, probe_teacher
from fastdiff.training.teachers.vit import (
    MAE_TEACHER_DIR,
    DigitsViT,
    _augment,
    _Block,
    save_teacher,
    truncate_teacher,
)


def random_masking(x: Tensor, mask_ratio: float, gen: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's per-sample random masking: ``(visible [B, K, D], mask [B, N] (1 = removed), ids_restore [B, N])``."""
    b, n, d = x.shape
    keep = max(1, int(n * (1 - mask_ratio)))
    noise = torch.rand(b, n, generator=gen).to(x.device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :keep]
    visible = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, d))
    mask = torch.ones(b, n, device=x.device)
    mask[:, :keep] = 0
    return visible, torch.gather(mask, 1, ids_restore), ids_restore


def patchify(images: Tensor, patch: int) -> Tensor:
    """``[B, C, S, S] -> [B, (S/p)^2, p*p*C]``, row-major patches (MAE's ``patchify``)."""
    b, c, s, _ = images.shape
    g = s // patch
    x = images.reshape(b, c, g, patch, g, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, g * g, patch * patch * c)


class MAEDecoder(nn.Module):
    """MAE's decoder: embed to ``dim``, insert mask tokens, unshuffle, add positions, blocks, predict pixels."""

    def __init__(self, encoder_dim: int, num_patches: int, patch_pixels: int, dim: int = 64, depth: int = 2,
                 heads: int = 4, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, num_patches, dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_pixels)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        x = self.embed(latent)
        b, k, d = x.shape
        n = ids_restore.shape[1]
        x = torch.cat([x, self.mask_token.expand(b, n - k, d)], dim=1)
        x = torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, d)) + self.pos
        for block in self.blocks:
            x, _ = block(x)
        return self.pred(self.norm(x))


def mae_loss(encoder: DigitsViT, decoder: MAEDecoder, images: Tensor, mask_ratio: float,
             gen: torch.Generator | None = None, norm_pix_loss: bool = False) -> Tensor:
    """Pixel MSE on the masked patches (MAE ``forward_loss``). ``norm_pix_loss``: MAE's option (its Table 1c,
    better representations): each target patch is normalised by its own mean and variance,
    ``(x - mean) / sqrt(var + 1e-6)`` over the patch's pixels."""
    tokens = encoder.patch_embed(images)
    visible, mask, ids_restore = random_masking(tokens, mask_ratio, gen)
    pred = decoder(encoder.encode(visible).tokens, ids_restore)
    target = patchify(images, encoder.patch_size)
    if norm_pix_loss:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)  # MAE: unbiased var
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = (pred - target).pow(2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


def train_mae_teacher(steps: int = 5000, batch_size: int = 128, lr: float = 1e-3, warmup_steps: int = 300,
                      weight_decay: float = 0.05, mask_ratio: float = 0.75, max_shift: float = 1.5,
                      max_rotate: float = 10.0, max_scale: float = 0.1, seed: int = 0,
                      decoder: dict | None = None, log: Callable[[str], None] | None = print,
                      log_every: int = 250, norm_pix_loss: bool = False, probe_every: int = 0,
                      **architecture: int) -> tuple[DigitsViT, dict]:
    """Train the MAE teacher on the digits train split; returns ``(encoder, record)``.

    ``architecture`` overrides :class:`DigitsViT`'s (defaults here: patch 4, width 128, depth 6, 4 heads, no
    head); ``decoder`` overrides :class:`MAEDecoder`'s. The record holds the recipe, the probe of
    :func:`~fastdiff.training.teachers.probe.probe_teacher` on the test split, and the loss curve (with the
    probe's class R^2 and attention entropy every ``probe_every`` steps when > 0).
    """
    arch = {"image_size": IMAGE_SIZE, "patch_size": 4, "dim": 128, "depth": 6, "heads": 4, "mlp_ratio": 4,
            "num_classes": 0, **architecture}
    dec_cfg = {"dim": 64, "depth": 2, "heads": 4, "mlp_ratio": 4, **(decoder or {})}
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    encoder = DigitsViT(**arch)
    dec = MAEDecoder(arch["dim"], encoder.grid ** 2, arch["patch_size"] ** 2, **dec_cfg)
    x_train, _ = load_digits("train")
    x_test, y_test = load_digits("test")
    params = [*encoder.parameters(), *dec.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    test_gen_seed = 12345
    curve, t0, order, pos = [], time.perf_counter(), torch.randperm(len(x_train), generator=gen), 0
    for step in range(steps):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(x_train), generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        x = _augment(x_train[idx], gen, max_shift, max_rotate, max_scale)
        loss = mae_loss(encoder, dec, x, mask_ratio, gen, norm_pix_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        probe_now = bool(probe_every) and (step + 1) % probe_every == 0
        if (step + 1) % log_every == 0 or step + 1 == steps or probe_now:
            with torch.no_grad():
                test = mae_loss(encoder.eval(), dec.eval(), x_test, mask_ratio,
                                torch.Generator().manual_seed(test_gen_seed), norm_pix_loss).item()
            point = {"step": step + 1, "train_loss": round(loss.item(), 5), "test_loss": round(test, 5)}
            if probe_now:
                probe = probe_teacher(encoder)
                point.update(class_r2=probe["class_r2"], attention_entropy=probe["attention_entropy_mean"])
            encoder.train(), dec.train()
            curve.append(point)
            if log is not None:
                extra = "".join(f"  {k} {point[k]:.3f}" for k in ("class_r2", "attention_entropy") if k in point)
                log(f"step {step + 1:5d}  loss {loss.item():.4f}  test masked MSE {test:.4f}{extra}  "
                    f"{time.perf_counter() - t0:.0f}s")
    encoder.eval().requires_grad_(False)
    recipe = dict(objective="MAE (He et al. 2022): pixel MSE on masked patches, encoder sees visible patches only"
                  + (" (norm_pix_loss: per-patch normalised targets)" if norm_pix_loss else ""),
                  norm_pix_loss=norm_pix_loss, steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, lr_schedule="warmup+cosine",
                  optimizer="AdamW(betas=(0.9, 0.95))", weight_decay=weight_decay, mask_ratio=mask_ratio,
                  augmentation=dict(max_shift=max_shift, max_rotate=max_rotate, max_scale=max_scale), seed=seed,
                  decoder=dec_cfg, data="fastdiff.data.load_digits('train') (1438 images), no labels; test split "
                  "only measured",
                  command="OMP_NUM_THREADS=1 python -m fastdiff.training.teachers.mae --out DIR"
                  + (f" --steps {steps}" if steps != 5000 else "") + (f" --seed {seed}" if seed else "")
                  + (f" --mask-ratio {mask_ratio}" if mask_ratio != 0.75 else "")
                  + (" --norm-pix-loss" if norm_pix_loss else "")
                  + (f" --depth {arch['depth']}" if arch["depth"] != 6 else ""))
    record = {"architecture": arch, "recipe": recipe,
              "outputs": f"tokens: final LayerNorm of the {encoder.grid ** 2} patch tokens (all visible); "
                         "attentions: per-block softmax(QK^T/sqrt d)",
              "probe": probe_teacher(encoder), "curve": curve,
              "num_parameters": sum(p.numel() for p in encoder.parameters()),
              "train_seconds": round(time.perf_counter() - t0, 1), "versions": {"torch": torch.__version__}}
    return encoder, record


def keep_blocks(encoder: DigitsViT, record: dict, blocks: int) -> tuple[DigitsViT, dict]:
    """The trained encoder cut to its first ``blocks`` blocks (:func:`~fastdiff.training.teachers.vit.truncate_teacher`)
    and its record updated: architecture depth, the probe of the cut encoder, the full encoder's probe and the
    class R^2 of every block (:func:`~fastdiff.training.teachers.probe.probe_blocks`), and the command."""
    cut = truncate_teacher(encoder, blocks)
    full_depth = len(encoder.blocks)
    recipe = dict(record["recipe"], command=record["recipe"]["command"] + f" --keep-blocks {blocks}")
    return cut, {**record, "architecture": {**record["architecture"], "depth": blocks}, "recipe": recipe,
                 "outputs": f"tokens: the output of block {blocks} of the {full_depth} trained, through the final "
                            f"LayerNorm, {cut.grid ** 2} patch tokens; attentions: per-block softmax(QK^T/sqrt d) of "
                            f"blocks 1..{blocks}",
                 "probe": probe_teacher(cut), "trained_encoder": {"depth": full_depth, "probe": record["probe"],
                                                                 "class_r2_per_block": probe_blocks(encoder)},
                 "num_parameters": sum(p.numel() for p in cut.parameters())}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m fastdiff.training.teachers.mae --out DIR``: train and save the MAE digits teacher."""
    parser = argparse.ArgumentParser(prog="python -m fastdiff.training.teachers.mae", description=main.__doc__)
    parser.add_argument("--out", type=Path, default=MAE_TEACHER_DIR)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--norm-pix-loss", action="store_true", help="MAE's per-patch normalised pixel targets")
    parser.add_argument("--depth", type=int, default=6, help="encoder blocks")
    parser.add_argument("--probe-every", type=int, default=0, help="probe the test split every N steps (0: end)")
    parser.add_argument("--keep-blocks", type=int, default=None,
                        help="ship the encoder's first K blocks only (its tokens: block K's output; default: all)")
    args = parser.parse_args(argv)
    if args.keep_blocks is not None and not 1 <= args.keep_blocks <= args.depth:
        parser.error(f"--keep-blocks must be in 1..{args.depth} (--depth); got {args.keep_blocks}")
    torch.set_num_threads(1)
    net, record = train_mae_teacher(steps=args.steps, seed=args.seed, mask_ratio=args.mask_ratio,
                                    norm_pix_loss=args.norm_pix_loss, probe_every=args.probe_every, depth=args.depth)
    if args.keep_blocks is not None:
        net, record = keep_blocks(net, record, args.keep_blocks)
    out = save_teacher(net, record, args.out)
    probe = record["probe"]
    print(f"wrote {out}: class R^2 of tokens {probe['class_r2']:.3f}, attention entropy "
          f"{probe['attention_entropy_mean']:.3f} nats (uniform {probe['uniform_entropy']:.3f}), "
          f"{(out / 'model.safetensors').stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
