"""Train the embedded digits model (reproducible; 1800 steps took 13.4 min on a busy 2-core CPU).

    python -m fastdiff.models.train_embedded --out fastdiff/models/digits_pixart [--steps N --seed 0]

epsilon-prediction DDPM loss on the digits train split, AdamW with warmup + cosine decay, label
dropout to the null class for classifier-free guidance, and an EMA of the weights, which is what gets
saved (``save_pretrained`` layout, safetensors). The run's configuration, final loss and timing go to
``train_config.json`` next to the weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn
from tqdm.auto import tqdm

from fastdiff.data import load_digits
from fastdiff.models.digits import (
    DIGITS_SCHEDULER_CONFIG,
    build_digits_pipeline,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output directory (save_pretrained layout)")
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100, help="linear LR warmup steps (then cosine to lr/20)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema-decay", type=float, default=0.999, help="max EMA decay (warmed up as (1+k)/(10+k))")
    p.add_argument("--label-dropout", type=float, default=0.1, help="probability of the null class (for CFG)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads; 1 is 3-5x faster than 2 on a busy 2-core machine")
    p.add_argument("--transformer-config", type=json.loads, default=None,
                   help='JSON overrides of DIGITS_TRANSFORMER_CONFIG, for experiments, e.g. \'{"num_layers": 4}\'')
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1")
    return args


def _public(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    pipe = build_digits_pipeline(args.transformer_config, seed=args.seed)
    images, labels = load_digits("train", size=pipe.transformer.config.sample_size)
    model = nn.ModuleDict({"transformer": pipe.transformer, "class_embedder": pipe.class_embedder}).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    noise_scheduler = DDPMScheduler(**DIGITS_SCHEDULER_CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    null_class = pipe.class_embedder.null_class
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters, {len(images)} training images, {args.steps} steps x {args.batch_size}")

    start, losses = time.perf_counter(), []
    bar = tqdm(range(args.steps), desc="train", mininterval=2.0)
    for step in bar:
        idx = torch.randint(0, len(images), (args.batch_size,), generator=gen)
        x0, y = images[idx], labels[idx]
        y = torch.where(torch.rand(y.shape, generator=gen) < args.label_dropout, null_class, y)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = noise_scheduler.add_noise(x0, noise, t)

        pred = model["transformer"](x_t, encoder_hidden_states=model["class_embedder"](y), timestep=t).sample
        loss = F.mse_loss(pred, noise)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        losses.append(loss.item())
        if step % 20 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}", lr=f"{lr_at(step, args):.1e}")
    seconds = time.perf_counter() - start
    print(f"trained in {seconds / 60:.1f} min ({args.steps * args.batch_size / seconds:.0f} img/s)")

    pipe.register_modules(transformer=ema["transformer"], class_embedder=ema["class_embedder"])
    args.out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(args.out, safe_serialization=True)
    record = {
        "command": "python -m fastdiff.models.train_embedded",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "transformer_config": _public(pipe.transformer.config),
        "class_embedder_config": _public(pipe.class_embedder.config),
        "scheduler_config": DIGITS_SCHEDULER_CONFIG,
        "loss": "MSE(epsilon), uniform t in [0, 1000)",
        "optimizer": "AdamW(betas=(0.9, 0.99)), linear warmup then cosine to lr/20, grad-norm clip 1.0",
        "shipped_weights": "EMA",
        "parameters": n_params,
        "final_loss_mean_last_100": float(np.mean(losses[-100:])),
        "train_seconds": round(seconds, 1),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()},
    }
    (args.out / "train_config.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved EMA weights to {args.out}")


if __name__ == "__main__":
    main()
