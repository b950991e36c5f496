"""Training configuration: typed dataclasses, a YAML file, and command-line overrides.

``load_config("configs/digits_dit.yaml", ["--repa", "train.lr=1e-4"])`` merges, in order: the defaults
below, the YAML file, the shorthand flags (``--repa``, ``--haste``, ``--weighting``, ``--max_steps``,
``--batch_size``, ``--output_dir``, ``--seed``, ``--mixed_precision``, ``--resume``, ``--resume_from``,
``--no_resume``) and ``section.key=value`` overrides. Unknown keys raise a ``ValueError`` listing the allowed
ones.

A config is a YAML path or the name of a config shipped with the package (``--config digits_dit``, see
:func:`shipped_configs`; they are the repository's ``configs/`` folder, packaged as ``fastdiff/configs``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LR_SCHEDULES = ("constant", "cosine")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
MODEL_INITS = ("default", "pixart")


@dataclass
class ModelConfig:
    """The denoiser. ``preset: digits`` is the embedded architecture (a ``PixArtTransformer2DModel`` with
    learned class tokens); otherwise ``class_name`` names a diffusers model class built from ``config`` (or
    loaded from ``pretrained``/``subfolder``). ``config`` entries override the preset's."""

    preset: str | None = "digits"
    class_name: str | None = None
    config: dict = field(default_factory=dict)
    pretrained: str | None = None
    subfolder: str | None = None
    conditioning: str = "auto"  # auto | class_tokens | class_labels | none
    num_classes: int = 10
    init: str = "default"  # default (the diffusers class's own) | pixart (PixArt-alpha's, PixArt models only)


@dataclass
class SchedulerConfig:
    """The training noise schedule: a diffusers scheduler class and config (preset defaults for digits)."""

    class_name: str = "DDPMScheduler"
    config: dict = field(default_factory=dict)
    pretrained: str | None = None


@dataclass
class DataConfig:
    dataset: str = "digits"  # digits | image_folder
    path: str | None = None  # image_folder root (class subfolders -> labels)
    split: str = "train"  # digits split
    resolution: int = 16
    channels: int = 1
    class_dropout: float = 0.1  # label -> null class, for classifier-free guidance
    num_workers: int = 0


@dataclass
class OptimConfig:
    max_steps: int = 2000
    batch_size: int = 64  # global batch, split evenly over processes
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine (after the linear warmup, down to lr * min_lr_ratio)
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0  # 0 disables
    # no | fp16 | bf16 | None: accelerate's setting (`accelerate launch --mixed_precision`, its config file or
    # ACCELERATE_MIXED_PRECISION), "no" when there is none; a value here overrides accelerate's
    mixed_precision: str | None = None
    ema_decay: float = 0.999  # 0 disables EMA
    weighting: str = "none"  # none | min_snr | soft_min_snr
    min_snr_gamma: float = 5.0
    timestep_sampling: str = "uniform"  # uniform | logit_normal | mode
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29


@dataclass
class AlignConfig:
    """REPA (``repa: true``) and HASTE (``haste: true``: REPA + attention distillation + termination)."""

    repa: bool = False
    haste: bool = False
    teacher: str = "digits_vit"  # digits_vit | a DigitsViT directory | dinov2:<hub id or path>
    token_matching: str = "resize"  # resize | interpolate
    repa_block: int = 1  # 0-based student block whose output is aligned
    repa_weight: float = 0.5
    projector_dim: int = 512
    attn_pairs: list = field(default_factory=lambda: [[1, 2], [2, 3]])  # [student block, teacher block]
    attn_weight: float = 0.5
    stop_step: int | None = None  # HASTE's fixed-iteration termination (plain REPA never stops)
    grad_angle_deg: float | None = None  # optional gradient-angle termination (HASTE)
    grad_angle_every: int = 50
    backend: str = "auto"  # attention-distillation backend
    cache_teacher: bool = False  # memoise teacher outputs per sample (datasets without augmentation)


@dataclass
class CheckpointConfig:
    every: int = 500  # 0: only at the end
    keep: int = 2
    # auto: the latest checkpoint in output_dir if its stored config equals this one (max_steps aside), a
    #       ValueError naming both if it differs, a fresh run if there is none
    # latest (--resume): the latest checkpoint in output_dir whatever its config
    # a checkpoint directory (--resume_from DIR): that one, whatever its config
    # null (--no_resume): a fresh run; a ValueError if output_dir already holds checkpoints
    resume: str | None = "auto"


@dataclass
class LogConfig:
    every: int = 10
    trackers: list = field(default_factory=lambda: ["jsonl"])  # jsonl, tensorboard, wandb, ...
    project: str = "fastdiff"
    progress_bar: bool = True


@dataclass
class EvalConfig:
    """FD-digits of samples during training (digits-family models only)."""

    every: int = 0  # 0 disables
    num_samples: int = 500
    inference_steps: int = 20
    guidance_scale: float = 1.0
    use_ema: bool = True
    seed: int = 1234  # the same evaluation noise for every run


@dataclass
class Config:
    seed: int = 0
    output_dir: str = "runs/fastdiff"
    cpu: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def flatten(values: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}``; values that are not scalars become strings."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return flat


def _choice(value: Any, name: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def validate(cfg: Config) -> Config:
    """Check names and ranges up front, so a typo fails before any model is built."""
    from fastdiff.training.repa import TOKEN_MATCHING
    from fastdiff.training.weighting import TIMESTEP_SAMPLERS, check_weighting

    check_weighting(cfg.train.weighting)
    _choice(cfg.train.timestep_sampling, "train.timestep_sampling", TIMESTEP_SAMPLERS)
    if cfg.train.mixed_precision is not None:
        _choice(cfg.train.mixed_precision, "train.mixed_precision", MIXED_PRECISIONS)
    _choice(cfg.train.lr_schedule, "train.lr_schedule", LR_SCHEDULES)
    _choice(cfg.model.init, "model.init", MODEL_INITS)
    if not 0 <= cfg.train.min_lr_ratio <= 1:
        raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {cfg.train.min_lr_ratio}")
    _choice(cfg.align.token_matching, "align.token_matching", TOKEN_MATCHING)
    for name in ("max_steps", "batch_size"):
        if getattr(cfg.train, name) < 1:
            raise ValueError(f"train.{name} must be >= 1, got {getattr(cfg.train, name)}")
    if cfg.train.lr <= 0 or cfg.train.min_snr_gamma <= 0:
        raise ValueError("train.lr and train.min_snr_gamma must be > 0")
    if not 0 <= cfg.data.class_dropout < 1:
        raise ValueError(f"data.class_dropout must be in [0, 1), got {cfg.data.class_dropout}")
    if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in cfg.align.attn_pairs):
        raise ValueError(f"align.attn_pairs must be a list of [student_block, teacher_block], got {cfg.align.attn_pairs}")
    return cfg


def _coerce(value: Any, default: Any, key: str, annotation: Any = None) -> Any:
    """Parse a command-line string into the type of the field's default (or, for ``str | None`` fields
    such as ``train.mixed_precision``, keep the string: YAML would read ``no`` as ``False``)."""
    is_text = isinstance(default, str) or (isinstance(annotation, str) and annotation.startswith("str"))
    if is_text and isinstance(value, bool):
        raise ValueError(f"{key} must be a string, got {value!r}: quote it in YAML (e.g. \"no\")")
    if not isinstance(value, str):
        return value
    if value in ("null", "None", "~"):
        return None
    if is_text:
        return value
    parsed = yaml.safe_load(value) if value != "" else None
    if isinstance(default, bool):
        if not isinstance(parsed, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return parsed
    if isinstance(default, (int, float)) or default is None:
        for number in (int, float):
            try:
                return number(value)
            except ValueError:
                pass
        if isinstance(default, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
    return parsed


def _check_key(obj: Any, key: str, prefix: str) -> None:
    names = {f.name for f in dataclasses.fields(obj)}
    if key not in names:
        raise ValueError(f"unknown config key {prefix + key!r}; allowed under {prefix or 'the top level'!r}: "
                         f"{sorted(names)}")


def _merge(obj: Any, values: dict, prefix: str = "") -> None:
    annotations = {f.name: f.type for f in dataclasses.fields(obj)}
    for key, value in values.items():
        _check_key(obj, key, prefix)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{prefix + key} must be a mapping, got {value!r}")
            _merge(current, value, f"{prefix}{key}.")
        else:
            setattr(obj, key, _coerce(value, current, prefix + key, annotations[key]))


def _set_dotted(config: Config, dotted: str, value: str) -> None:
    """Set ``a.b.c=value``; inside free-form mappings (``model.config``) any key is allowed."""
    *path, last = dotted.split(".")
    node: Any = config
    for depth, part in enumerate(path):
        if isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            _check_key(node, part, ".".join(path[:depth]) + "." if depth else "")
            node = getattr(node, part)
    if isinstance(node, dict):
        node[last] = yaml.safe_load(value)
    else:
        _merge(node, {last: value}, ".".join(path) + "." if path else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastdiff.training.train",
        description="Train a diffusers denoiser with Min-SNR / REPA / HASTE (accelerate). Extra arguments of the "
                    "form section.key=value override the YAML config, e.g. train.lr=1e-4 model.config.num_layers=4.")
    parser.add_argument("--config", help="a YAML file, or the name of a shipped config: "
                        + ", ".join(shipped_configs()) + " (e.g. --config digits_dit)")
    parser.add_argument("--repa", action="store_true", help="REPA feature alignment (align.repa=true)")
    parser.add_argument("--haste", action="store_true", help="HASTE: REPA + attention distillation + termination")
    parser.add_argument("--weighting", help="loss weighting: none | min_snr | soft_min_snr")
    parser.add_argument("--max_steps", type=int)
    parser.add_argument("--batch_size", type=int, help="global batch size")
    parser.add_argument("--output_dir")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--mixed_precision", choices=MIXED_PRECISIONS,
                        help="default: accelerate's (accelerate launch --mixed_precision / its config file), else no")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_const", const="latest",
                        help="continue the latest checkpoint in output_dir even if it was trained with a different "
                             "config. Default: continue only a checkpoint of the same config (max_steps aside), "
                             "error if output_dir holds another config's")
    resume.add_argument("--resume_from", metavar="CHECKPOINT", help="continue this checkpoint directory")
    resume.add_argument("--no_resume", action="store_true",
                        help="start fresh (an error if output_dir already holds checkpoints)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def load_config(path: str | Path | None = None, argv: Sequence[str] = ()) -> Config:
    """Defaults <- YAML ``path`` <- command-line ``argv`` (flags and ``key=value``)."""
    args = build_parser().parse_intermixed_args(list(argv))
    config = Config()
    path = args.config or path
    if path is not None:
        path = find_config(path)
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a YAML mapping")
        _merge(config, values)
    flags = {"align.repa": args.repa or None, "align.haste": args.haste or None, "train.weighting": args.weighting,
             "train.max_steps": args.max_steps, "train.batch_size": args.batch_size, "output_dir": args.output_dir,
             "seed": args.seed, "train.mixed_precision": args.mixed_precision}
    for key, value in flags.items():
        if value is not None:
            _set_dotted(config, key, str(value))
    if args.no_resume:
        config.checkpoint.resume = None
    elif args.resume or args.resume_from:
        config.checkpoint.resume = args.resume or args.resume_from
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"overrides must look like section.key=value, got {item!r}")
        _set_dotted(config, key.lstrip("-"), value)
    return config


def _shipped_dir():
    return importlib.resources.files("fastdiff") / "configs"


def shipped_configs() -> list[str]:
    """Names of the configs shipped with the package (``configs/*.yaml`` of the repository)."""
    folder = _shipped_dir()
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")) if folder.is_dir() else []


def find_config(name_or_path: str | Path) -> Path:
    """A config file: ``name_or_path`` if it is a file, else the shipped config of that name
    (``digits_dit`` or ``digits_dit.yaml``). Raises ``FileNotFoundError`` listing the shipped names."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if stem in shipped:
        if path.parent == Path("."):
            return Path(str(_shipped_dir() / f"{stem}.yaml"))
        hint = f"; the shipped config of that name is --config {stem}"
    else:
        hint = ""
    raise FileNotFoundError(f"config {str(name_or_path)!r} is neither a file nor a shipped config "
                            f"({', '.join(shipped) or 'none found'}){hint}")
