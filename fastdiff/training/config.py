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


class ConfigError(ValueError):
    """Invalid configuration values, found by :func:`validate` before anything is built; the message has one
    line per problem, each naming the key and what it allows."""

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
    # lower bound on Min-SNR's clipped SNR; null (auto): 1 at zero terminal SNR, else 0 (weighting.min_snr_floor)
    min_snr_floor: float | None = None
    timestep_sampling: str = "uniform"  # uniform | logit_normal | mode
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29


@dataclass
class AlignConfig:
    """REPA (``repa: true``) and HASTE (``haste: true``: REPA + attention distillation + termination).

    Defaults follow the papers (see :func:`fastdiff.training.modeling.default_repa_block` and
    :func:`~fastdiff.training.modeling.default_attention_pairs`): REPA aligns the output of the block at about
    1/3 of the depth (REPA, Yu et al. 2025: ``--encoder-depth`` 4 of 12 blocks for SiT-B, 8 of 24 for SiT-L),
    with weight 0.5; HASTE distils attention of up to 4 student blocks ending at the REPA block from the
    teacher's last blocks (HASTE, Wang et al. 2025: SiT-XL blocks 4..7 <- DINOv2-B blocks 8..11).
    """

    repa: bool = False
    haste: bool = False
    # digits_mae (self-supervised, shipped) | digits_vit (the shipped classifier) | a DigitsViT directory |
    # dinov2:<hub id or path>
    teacher: str = "digits_mae"
    token_matching: str = "resize"  # resize | interpolate
    repa_block: int | None = None  # 0-based student block whose output is aligned; null: about 1/3 depth
    repa_weight: float = 0.5
    projector_dim: int = 512
    attn_pairs: list | None = None  # [[student block, teacher block], ...]; null: ending at the REPA block
    attn_weight: float = 0.5
    stop_step: int | None = None  # HASTE's fixed-iteration termination (plain REPA never stops)
    grad_angle_deg: float | None = None  # optional gradient-angle termination (HASTE)
    grad_angle_every: int = 50
    # no gradient-angle stop before this step; null: 10 checks, the span of the cosine's EMA (0.9 per check)
    grad_angle_min_step: int | None = None
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


def validate(cfg: Config) -> Config:
    """Check every value up front, before any model or teacher is built.

    Raises :class:`ConfigError` listing *all* problems, one line each (``key must be ...; got ...``).
    ``align.repa_block: auto`` is read as ``null`` (about 1/3 depth).
    """
    errors = list(_type_errors(cfg))
    errors += [e for e in _value_errors(cfg) if e.split(" ", 1)[0] not in {t.split(" ", 1)[0] for t in errors}]
    if errors:
        raise ConfigError("\n".join(errors))
    return cfg


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_errors(cfg: Config, node: Any = None, default: Any = None, prefix: str = ""):
    """Values whose type differs from the field's default (``train.max_steps: 1.5``, ``log.every: "10"``)."""
    node, default = (cfg, Config()) if node is None else (node, default)
    for f in dataclasses.fields(node):
        value, ref, key = getattr(node, f.name), getattr(default, f.name), prefix + f.name
        if dataclasses.is_dataclass(ref):
            yield from _type_errors(cfg, value, ref, key + ".")
        elif isinstance(ref, bool):
            if not isinstance(value, bool):
                yield f"{key} must be true or false; got {value!r}"
        elif isinstance(ref, int):
            if isinstance(value, bool) or not isinstance(value, int):
                yield f"{key} must be an integer; got {value!r}"
        elif isinstance(ref, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                yield f"{key} must be a number; got {value!r}"
        elif isinstance(ref, (list, dict)) and not isinstance(value, type(ref)):
            yield f"{key} must be a {'list' if isinstance(ref, list) else 'mapping'}; got {value!r}"
        elif isinstance(ref, str) and f.type in ("str", str) and not isinstance(value, str):
            yield f"{key} must be a string; got {value!r}"


def _value_errors(cfg: Config) -> list[str]:
    from fastdiff.data import SPLITS
    from fastdiff.training.datasets import DATASETS
    from fastdiff.training.weighting import TIMESTEP_SAMPLERS, WEIGHTINGS

    errors: list[str] = []

    def choice(key: str, value: Any, allowed: Sequence) -> None:
        if value not in allowed:
            errors.append(f"{key} must be one of {tuple(allowed)}; got {value!r}")

    def at_least(key: str, value: Any, low: float, note: str = "") -> None:
        if _number(value) and value < low:  # (a wrong type is a type error, reported already)
            errors.append(f"{key} must be >= {low:g}{note}; got {value!r}")

    def within(key: str, value: Any, ok: bool, allowed: str) -> None:
        if _number(value) and not ok:
            errors.append(f"{key} must be {allowed}; got {value!r}")

    t, m, a, d = cfg.train, cfg.model, cfg.align, cfg.data
    choice("train.weighting", t.weighting, WEIGHTINGS)
    choice("train.timestep_sampling", t.timestep_sampling, TIMESTEP_SAMPLERS)
    if t.mixed_precision is not None:
        choice("train.mixed_precision", t.mixed_precision, MIXED_PRECISIONS)
    choice("train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    choice("model.init", m.init, MODEL_INITS)
    from fastdiff.training.modeling import CONDITIONINGS

    choice("model.conditioning", m.conditioning, CONDITIONINGS)
    within("train.min_lr_ratio", t.min_lr_ratio, _number(t.min_lr_ratio) and 0 <= t.min_lr_ratio <= 1, "in [0, 1]")
    for key in ("max_steps", "batch_size"):
        at_least(f"train.{key}", getattr(t, key), 1)
    for key in ("warmup_steps",):
        at_least(f"train.{key}", getattr(t, key), 0)
    for key in ("lr", "min_snr_gamma"):
        value = getattr(t, key)
        within(f"train.{key}", value, _number(value) and value > 0, "> 0")
    if t.min_snr_floor is not None and (isinstance(t.min_snr_floor, bool) or not isinstance(t.min_snr_floor, (int, float))
                                        or t.min_snr_floor < 0):
        errors.append(f"train.min_snr_floor must be null (auto: 1 at zero terminal SNR, else 0) or a number >= 0; "
                      f"got {t.min_snr_floor!r}")
    within("train.ema_decay", t.ema_decay, _number(t.ema_decay) and 0 <= t.ema_decay < 1, "in [0, 1) (0 disables EMA)")
    at_least("train.grad_clip", t.grad_clip, 0, " (0 disables clipping)")
    if not (isinstance(t.betas, list) and len(t.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1
                                                                    for b in t.betas)):
        errors.append(f"train.betas must be a list of two numbers in [0, 1); got {t.betas!r}")

    choice("data.dataset", d.dataset, DATASETS)
    if d.dataset == "digits":
        choice("data.split", d.split, SPLITS)
        if _number(d.channels) and d.channels != 1:
            errors.append(f"data.channels must be 1 for the digits dataset; got {d.channels!r}")
    if d.dataset == "image_folder" and (d.path is None or not Path(d.path).is_dir()):
        errors.append(f"data.path must be an existing directory of images for data.dataset 'image_folder'; got {d.path!r}")
    within("data.class_dropout", d.class_dropout, _number(d.class_dropout) and 0 <= d.class_dropout < 1, "in [0, 1)")
    at_least("data.resolution", d.resolution, 1)
    at_least("data.num_workers", d.num_workers, 0)

    at_least("checkpoint.every", cfg.checkpoint.every, 0, " (0: only at the end)")
    at_least("checkpoint.keep", cfg.checkpoint.keep, 1)
    at_least("log.every", cfg.log.every, 1)
    at_least("eval.every", cfg.eval.every, 0, " (0 disables)")
    at_least("eval.num_samples", cfg.eval.num_samples, 1)
    at_least("eval.inference_steps", cfg.eval.inference_steps, 1)
    if a.repa or a.haste:
        errors += _align_errors(cfg)
    return errors


def _align_errors(cfg: Config) -> list[str]:
    from fastdiff.training.haste import available_attention_backends
    from fastdiff.training.modeling import model_depth, teacher_depth
    from fastdiff.training.repa import TOKEN_MATCHING

    a, errors = cfg.align, []
    if a.token_matching not in TOKEN_MATCHING:
        errors.append(f"align.token_matching must be one of {TOKEN_MATCHING}; got {a.token_matching!r}")
    if a.backend not in available_attention_backends():
        errors.append(f"align.backend must be one of {available_attention_backends()}; got {a.backend!r}")
    if a.repa_block == "auto":
        a.repa_block = None
    depth = model_depth(cfg)
    blocks = f"an int in 0..{depth - 1} ({depth} blocks)" if depth else "an int >= 0"
    if a.repa_block is not None and (isinstance(a.repa_block, bool) or not isinstance(a.repa_block, int)
                                     or a.repa_block < 0 or (depth and a.repa_block >= depth)):
        errors.append(f"align.repa_block must be null/auto (about 1/3 depth) or {blocks}; got {a.repa_block!r}")
    try:
        t_depth = teacher_depth(a.teacher)
    except ValueError as err:
        errors.append(str(err))
        t_depth = None
    if a.haste and a.attn_pairs is not None:
        ok = isinstance(a.attn_pairs, list) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(i, int) and not isinstance(i, bool)
                                                                 and i >= 0 for i in p) for p in a.attn_pairs)
        if not ok or not a.attn_pairs:
            errors.append("align.attn_pairs must be null (auto) or a non-empty list of [student_block, teacher_block] "
                          f"ints >= 0; got {a.attn_pairs!r}")
        else:
            if depth and any(s >= depth for s, _ in a.attn_pairs):
                errors.append(f"align.attn_pairs student blocks must be in 0..{depth - 1}; got {a.attn_pairs!r}")
            if t_depth and any(t >= t_depth for _, t in a.attn_pairs):
                errors.append(f"align.attn_pairs teacher blocks must be in 0..{t_depth - 1} (the teacher has "
                              f"{t_depth} blocks); got {a.attn_pairs!r}")
    if a.stop_step is not None and (isinstance(a.stop_step, bool) or not isinstance(a.stop_step, int)
                                    or a.stop_step < 0):
        errors.append(f"align.stop_step must be null (never) or an int >= 0; got {a.stop_step!r}")
    if a.grad_angle_deg is not None and (isinstance(a.grad_angle_deg, bool)
                                         or not isinstance(a.grad_angle_deg, (int, float))
                                         or not 0 < a.grad_angle_deg < 180):
        errors.append(f"align.grad_angle_deg must be null (off) or a number in (0, 180); got {a.grad_angle_deg!r}")
    if a.grad_angle_min_step is not None and (isinstance(a.grad_angle_min_step, bool)
                                              or not isinstance(a.grad_angle_min_step, int) or a.grad_angle_min_step < 0):
        errors.append(f"align.grad_angle_min_step must be null (10 checks) or an int >= 0; got {a.grad_angle_min_step!r}")
    for key in ("grad_angle_every", "projector_dim"):
        value = getattr(a, key)
        if _number(value) and value < 1:
            errors.append(f"align.{key} must be >= 1; got {value!r}")
    return errors


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
