"""Building the denoiser, its conditioning and the alignment from a :class:`~fastdiff.training.config.Config`.

Any diffusers UNet or transformer can be trained; how class labels reach it depends on the model:

* ``class_tokens``: a learned token sequence per class (``fastdiff.models.digits.ClassEmbedder``) fed as
  ``encoder_hidden_states`` to cross-attention (PixArt, the embedded digits model, ``UNet2DConditionModel``).
* ``class_labels``: the model's own class embedding (``DiTTransformer2DModel``, ``UNet2DModel`` with
  ``num_class_embeds``); DiT also applies its own label dropout.
* ``none``: unconditional. Models without cross-attention (``UNet2DModel``) get no condition at all;
  cross-attention models (PixArt, ``UNet2DConditionModel``), which cannot run without
  ``encoder_hidden_states``, get one constant all-zero token (:func:`build_null_context`: a frozen
  one-class ``ClassEmbedder`` with zero weights, so the sampling pipeline is the class-token one, label 0).

Everything trainable lives in one :class:`TrainModule`, so DDP / FSDP (through accelerate) wrap a single
module and the alignment losses are computed inside its ``forward``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from fastdiff.training.config import Config
from fastdiff.training.haste import StageWiseTermination, TeacherAlignment
from fastdiff.training.repa import REPA, TeacherOutput

CONDITIONINGS = ("auto", "class_tokens", "class_labels", "none")
_CROSS_ATTENTION_MODELS = ("PixArtTransformer2DModel", "UNet2DConditionModel")
_CLASS_LABEL_MODELS = ("DiTTransformer2DModel",)
SUPPORTED_MODELS = (*_CROSS_ATTENTION_MODELS, *_CLASS_LABEL_MODELS, "UNet2DModel")
GRAD_ANGLE_WARMUP_CHECKS = 10  # align.grad_angle_min_step null: 1 / (1 - 0.9), the span of the cosine's EMA


def build_model(cfg: Config) -> nn.Module:
    """The diffusers denoiser (randomly initialised from a config with seed ``cfg.seed``, or pretrained)."""
    import diffusers

    m = cfg.model
    if m.preset == "digits_tarflow":  # a normalizing flow (fastdiff.flows), trained on its own objective
        from fastdiff.flows.tarflow import build_tarflow

        return build_tarflow(m.config, cfg.seed)
    if m.preset == "digits_pcm":  # a Picard Consistency Model of a frozen base (fastdiff.samplers.pcm)
        from fastdiff.samplers.pcm import PCMTrainer

        return PCMTrainer(m.config)
    if m.preset is not None:
        if m.preset != "digits":
            raise ValueError(f"model.preset must be 'digits', 'digits_tarflow', 'digits_pcm' or null, got {m.preset!r}")
        from fastdiff.models.digits import DIGITS_TRANSFORMER_CONFIG

        class_name, config = "PixArtTransformer2DModel", {**DIGITS_TRANSFORMER_CONFIG, **m.config}
    else:
        class_name, config = m.class_name, dict(m.config)
    model_cls = getattr(diffusers, class_name or "", None)
    if class_name not in SUPPORTED_MODELS or model_cls is None:
        raise ValueError(f"model.class_name must be one of {SUPPORTED_MODELS} (or use model.preset: digits), "
                         f"got {class_name!r}")
    if m.pretrained is not None:
        return model_cls.from_pretrained(m.pretrained, subfolder=m.subfolder)
    if m.init == "pixart" and class_name != "PixArtTransformer2DModel":
        raise ValueError(f"model.init='pixart' needs a PixArtTransformer2DModel, got {class_name}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = model_cls(**config)
        if m.init == "pixart":
            from fastdiff.models.digits import init_pixart_weights

            init_pixart_weights(model)
    return model


def resolve_conditioning(model: nn.Module, conditioning: str) -> str:
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"model.conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
    if conditioning != "auto":
        return conditioning
    name = type(model).__name__
    if name in _CROSS_ATTENTION_MODELS:
        return "class_tokens"
    if name in _CLASS_LABEL_MODELS or getattr(model.config, "num_class_embeds", None):
        return "class_labels"
    return "none"


def build_class_embedder(model: nn.Module, num_classes: int, seed: int) -> nn.Module:
    from fastdiff.models.digits import DIGITS_CLASS_EMBEDDER_CONFIG, ClassEmbedder

    width = getattr(model.config, "caption_channels", None) or model.config.cross_attention_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return ClassEmbedder(num_classes=num_classes, num_tokens=DIGITS_CLASS_EMBEDDER_CONFIG["num_tokens"],
                             embed_dim=int(width))


def build_null_context(model: nn.Module) -> nn.Module:
    """The unconditional context of a cross-attention model: a frozen ``ClassEmbedder`` with one class
    (label 0, what every sample gets) mapping to one all-zero token of the caption width."""
    from fastdiff.models.digits import ClassEmbedder

    width = getattr(model.config, "caption_channels", None) or model.config.cross_attention_dim
    embedder = ClassEmbedder(num_classes=1, num_tokens=1, embed_dim=int(width))
    nn.init.zeros_(embedder.embedding.weight)
    return embedder.requires_grad_(False)


def needs_context(model: nn.Module) -> bool:
    """Whether ``model`` cannot run without ``encoder_hidden_states`` (cross-attention denoisers)."""
    return type(model).__name__ in _CROSS_ATTENTION_MODELS


def build_scheduler(cfg: Config):
    """The diffusers noise scheduler of the training process."""
    import diffusers

    s = cfg.scheduler
    scheduler_cls = getattr(diffusers, s.class_name, None)
    if scheduler_cls is None or not s.class_name.endswith("Scheduler"):
        raise ValueError(f"scheduler.class_name must name a diffusers scheduler, got {s.class_name!r}")
    if s.pretrained is not None:
        return scheduler_cls.from_pretrained(s.pretrained, subfolder="scheduler")
    base = {}
    if cfg.model.preset == "digits" and "FlowMatch" not in s.class_name:
        from fastdiff.models.digits import DIGITS_SCHEDULER_CONFIG

        base = dict(DIGITS_SCHEDULER_CONFIG)
    return scheduler_cls(**{**base, **s.config})


def patch_tokens(model: nn.Module, sample_size: int) -> int:
    """Number of patch tokens a patchifying transformer makes from a ``sample_size`` square input."""
    patch = getattr(model.config, "patch_size", None)
    if not patch:
        raise ValueError(f"REPA/HASTE need a patchifying transformer; {type(model).__name__} has no patch_size")
    return (sample_size // patch) ** 2


def hidden_width(model: nn.Module) -> int:
    c = model.config
    if getattr(c, "num_attention_heads", None) and getattr(c, "attention_head_dim", None):
        return int(c.num_attention_heads * c.attention_head_dim)
    raise ValueError(f"cannot infer the hidden width of {type(model).__name__} (no num_attention_heads / "
                     "attention_head_dim in its config)")


def shipped_teachers() -> dict[str, Path]:
    """The teachers shipped with fastdiff, by ``align.teacher`` name."""
    from fastdiff.training.teachers import SHIPPED_TEACHERS

    return dict(SHIPPED_TEACHERS)


def _teacher_dir(name: str) -> Path:
    path = shipped_teachers().get(name, Path(name))
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ValueError(f"align.teacher must be one of {tuple(shipped_teachers())}, 'dinov2:<hub id or path>' or a "
                         f"DigitsViT directory (config.json + model.safetensors); got {name!r}")
    return path


def load_teacher(name: str, device: torch.device | str = "cpu") -> nn.Module:
    """A shipped teacher (``digits_mae``, ``digits_vit``), a directory with a ``DigitsViT``, or
    ``dinov2:<hub id or path>``."""
    from fastdiff.training.teachers import load_digits_teacher, load_dinov2_teacher

    if name.startswith("dinov2:"):  # training reads HASTE's target as queries and keys ("qk"): SDPA, no maps
        return load_dinov2_teacher(name.split(":", 1)[1], device=device)
    return load_digits_teacher(_teacher_dir(name), device=device)


def teacher_depth(name: str) -> int | None:
    """Number of blocks of the named teacher, read from its ``config.json`` (``None`` for DINOv2 names:
    known only once loaded); a ``ValueError`` naming ``align.teacher`` if there is no such teacher."""
    if name.startswith("dinov2:"):
        return None
    return int(json.loads((_teacher_dir(name) / "config.json").read_text())["architecture"]["depth"])


def model_depth(cfg: Config) -> int | None:
    """Number of transformer blocks the configured model will have, where the config says (else ``None``)."""
    m = cfg.model
    if m.preset == "digits":
        from fastdiff.models.digits import DIGITS_TRANSFORMER_CONFIG

        return int({**DIGITS_TRANSFORMER_CONFIG, **m.config}["num_layers"])
    n = m.config.get("num_layers") if m.preset is None and m.pretrained is None else None
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def default_repa_block(depth: int) -> int:
    """REPA's alignment depth, about 1/3 of the blocks: output of block ``max(1, depth // 3)`` (0-based index
    ``max(1, depth // 3) - 1``). REPA (Yu et al. 2025, Sec. 4.2 / Table 2 and the repo's ``--encoder-depth``):
    4 of 12 blocks for SiT-B/2, 8 of 24 for SiT-L/2 (and 8 of 28 for SiT-XL/2, where this rule gives 9)."""
    return max(1, depth // 3) - 1


def default_attention_pairs(repa_block: int, teacher_blocks: int) -> list[list[int]]:
    """HASTE's attention pairs: the ``k = min(4, repa_block + 1, teacher_blocks)`` student blocks ending at the
    REPA block, each paired with the teacher's last ``k`` blocks in order (HASTE, Wang et al. 2025, and its
    ``train.py`` defaults: SiT-XL/2 blocks 4..7, REPA at block 8 (index 7), from DINOv2-B blocks 8..11 of 12)."""
    k = max(1, min(4, repa_block + 1, teacher_blocks))
    return [[repa_block - k + 1 + i, teacher_blocks - k + i] for i in range(k)]


def _module_depth(teacher: nn.Module) -> int | None:
    blocks = getattr(teacher, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return len(blocks)
    config = getattr(getattr(teacher, "model", None), "config", None)
    return getattr(config, "num_hidden_layers", None)


def build_alignment(cfg: Config, model: nn.Module, device: torch.device | str = "cpu") -> TeacherAlignment | None:
    """REPA (``align.repa``) or HASTE (``align.haste``) for ``model``, or ``None``."""
    a = cfg.align
    if not (a.repa or a.haste):
        return None
    teacher = load_teacher(a.teacher, device)
    teacher_dim = getattr(teacher, "embed_dim", None)
    if teacher_dim is None:
        raise ValueError("the teacher must expose its token width as `embed_dim`")
    from fastdiff.training.repa import find_blocks

    repa_block = default_repa_block(len(find_blocks(model))) if a.repa_block is None else a.repa_block
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 2)
        repa = REPA(hidden_width(model), int(teacher_dim), repa_block, a.projector_dim, a.repa_weight)
    pairs, termination = (), None
    if a.haste:  # plain REPA aligns for the whole run; stop_step / grad_angle_deg are HASTE's
        if a.attn_pairs is None:
            t_depth = _module_depth(teacher)
            if t_depth is None:
                raise ValueError("align.attn_pairs: cannot infer the teacher's depth; set the pairs explicitly")
            pairs = [tuple(p) for p in default_attention_pairs(repa_block, t_depth)]
        else:
            pairs = [tuple(p) for p in a.attn_pairs]
        # the cosine's EMA starts at the first check's value: no stop before it has averaged ~10 checks (with
        # cosines of +-0.03 around +0.02, three early checks below 0 ended HASTE at step 101 on one seed)
        min_step = GRAD_ANGLE_WARMUP_CHECKS * a.grad_angle_every if a.grad_angle_min_step is None else a.grad_angle_min_step
        termination = StageWiseTermination(a.stop_step, a.grad_angle_deg, check_every=a.grad_angle_every,
                                           min_step=min_step)
    alignment = TeacherAlignment(teacher, repa, pairs, a.attn_weight, termination, a.backend, a.token_matching)
    alignment.check(model)
    return alignment


class TrainModule(nn.Module):
    """Denoiser + class embedder + alignment projector: the one module an accelerator prepares.

    ``forward(noisy, timesteps, labels, target)`` returns ``(prediction, aux_losses)``; ``target`` (a
    :class:`TeacherOutput`) switches the alignment capture on for this call.
    """

    def __init__(self, model: nn.Module, conditioning: str, class_embedder: nn.Module | None = None,
                 alignment: TeacherAlignment | None = None) -> None:
        super().__init__()
        self.model, self.conditioning = model, conditioning
        self.class_embedder, self.alignment = class_embedder, alignment

    def condition(self, labels: Tensor) -> dict:
        if self.conditioning == "class_tokens":
            return {"encoder_hidden_states": self.class_embedder(labels)}
        if self.conditioning == "none" and self.class_embedder is not None:  # the null context
            return {"encoder_hidden_states": self.class_embedder(torch.zeros_like(labels))}
        if self.conditioning == "class_labels":
            return {"class_labels": labels}
        return {}

    def denoise(self, noisy: Tensor, timesteps: Tensor, labels: Tensor) -> Tensor:
        out = self.model(noisy, timestep=timesteps, **self.condition(labels), return_dict=False)[0]
        channels = noisy.shape[1]
        return out[:, :channels] if out.shape[1] == 2 * channels else out  # drop learned variance

    def forward(self, noisy: Tensor, timesteps: Tensor, labels: Tensor,
                target: TeacherOutput | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if is_flow(self.model):  # called as (images, noise, labels): the flow's own loss
            return self.model.training_loss(noisy, timesteps, labels), {}
        if target is None or self.alignment is None:
            return self.denoise(noisy, timesteps, labels), {}
        with self.alignment.capture(self.model, target):
            prediction = self.denoise(noisy, timesteps, labels)
        return prediction, self.alignment.losses()


def is_flow(model: nn.Module) -> bool:
    """A model with its own objective (``training_loss(images, noise, labels)``, e.g. ``fastdiff.flows.TarFlow``)
    instead of the diffusion loss."""
    return callable(getattr(model, "training_loss", None))


def null_label(conditioning: str, num_classes: int) -> int | None:
    """The label meaning "no class" (classifier-free guidance dropout), or ``None`` if unused."""
    return num_classes if conditioning == "class_tokens" else None


def num_parameters(module: nn.Module) -> str:
    n = sum(p.numel() for p in module.parameters())
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K" if n >= 1e3 else str(n)


__all__ = ["TrainModule", "build_alignment", "build_class_embedder", "build_model", "build_null_context",
           "build_scheduler", "default_attention_pairs", "default_repa_block", "hidden_width", "is_flow",
           "load_teacher", "model_depth", "needs_context", "null_label", "patch_tokens", "resolve_conditioning",
           "shipped_teachers", "teacher_depth"]
