"""The embedded default model: a class-conditional PixArt-style transformer on 16x16 digits.

Architecture after PixArt-alpha (Chen et al., 2023, arXiv:2310.00426): a DiT whose blocks use
adaLN-single timestep modulation, self-attention over 2x2 patches and cross-attention to a condition
sequence. Here the "caption" is a short learned token sequence per class (``ClassEmbedder``), with an
extra null class for classifier-free guidance (Ho & Salimans, 2022, arXiv:2207.12598). The
transformer is diffusers' ``PixArtTransformer2DModel`` unchanged; the weights ship inside the package
(``fastdiff/models/digits_pixart``) and are trained by the one training script,
``fastdiff train --config digits_embedded`` (``configs/digits_embedded.yaml``), whose exported
``pipeline/`` directory is what ships.

The embedded UNet (:class:`DigitsUNetPipeline`, ``fastdiff/models/digits_unet``) is the same task with
diffusers' ``UNet2DConditionModel`` as the denoiser: Stable Diffusion's block layout (Rombach et al., 2022,
arXiv:2112.10752) shrunk to 16x16 -> 8x8 -> 4x4 (``DIGITS_UNET_CONFIG``), the same class tokens, null class,
DDPM schedule, data and training script (``fastdiff train --config digits_unet``). It shares
``DigitsPipeline``'s sampling loop (a subclass whose denoiser is ``unet``), so what takes the transformer
pipeline takes it too.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    ImagePipelineOutput,
    PixArtTransformer2DModel,
    UNet2DConditionModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

# diffusers' step-end callback: (pipe, step_index, timestep, callback_kwargs) -> callback_kwargs to use
StepEndCallback = Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict]

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # label used for the unconditional branch of classifier-free guidance
# measured (benchmarks/embedded_model.py): the converged FD-digits is lowest without guidance (3.7 at 50 DDIM
# steps; 6.2 at 1.25, 27 at 1.5, 69 at 2); guidance sharpens digits past the data and raises class accuracy
DEFAULT_GUIDANCE_SCALE = 1.0
OUTPUT_TYPES = ("pil", "pt", "np")
EMBEDDED_WEIGHTS_DIR = Path(__file__).with_name("digits_pixart")
EMBEDDED_UNET_WEIGHTS_DIR = Path(__file__).with_name("digits_unet")

DIGITS_CLASS_EMBEDDER_CONFIG: dict = {"num_classes": NUM_CLASSES, "num_tokens": 4, "embed_dim": 64}

DIGITS_TRANSFORMER_CONFIG: dict = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "patch_size": 2,  # 8x8 = 64 tokens; patch 4 (16 tokens, v1) left checker artifacts at the patch seams
    "num_layers": 6,
    "num_attention_heads": 4,
    "attention_head_dim": 32,  # hidden size 128
    "cross_attention_dim": 128,  # = hidden: PixArt projects the captions to the hidden size first
    "caption_channels": DIGITS_CLASS_EMBEDDER_CONFIG["embed_dim"],
    "norm_type": "ada_norm_single",
    "num_embeds_ada_norm": 1000,
    "use_additional_conditions": False,
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "dropout": 0.0,
}

# The embedded UNet (fastdiff/models/digits_unet, configs/digits_unet.yaml): Stable Diffusion's block layout at
# 16x16 -> 8x8 -> 4x4: cross-attention to the class tokens at the two shallow levels and in the mid block, a
# plain ResNet level at the deepest resolution, so both deep-feature reuse across steps (DeepCache: recompute
# the shallowest level, reuse the cached upsampled deep features) and cross-attention caching (TGATE) apply.
DIGITS_UNET_CONFIG: dict = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (16, 48, 96),  # 1.71M parameters; a thin 16x16 level keeps a CPU training step cheap
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": DIGITS_CLASS_EMBEDDER_CONFIG["embed_dim"],
    "attention_head_dim": (1, 3, 6),  # diffusers' name for the number of heads per level: 16 channels per head
}

# DDPM training schedule; the shipped sampler is DDIM with this config (any scheduler can be swapped in).
DIGITS_SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "timestep_spacing": "trailing",
}


class ClassEmbedder(ModelMixin, ConfigMixin):
    """Class labels -> a learned token sequence ``[B, num_tokens, embed_dim]`` for cross-attention.

    Labels ``0..num_classes-1`` are the digits; label ``num_classes`` is the null ("no class") token
    sequence used for the unconditional half of classifier-free guidance.
    """

    @register_to_config
    def __init__(self, num_classes: int = NUM_CLASSES, num_tokens: int = 4, embed_dim: int = 64):
        super().__init__()
        self.embedding = nn.Embedding(num_classes + 1, num_tokens * embed_dim)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def forward(self, class_labels: torch.Tensor) -> torch.Tensor:
        if class_labels.dtype not in (torch.int32, torch.int64) or class_labels.ndim != 1:
            raise TypeError(f"class_labels must be a 1-D integer tensor, got {class_labels.dtype} {tuple(class_labels.shape)}")
        if class_labels.numel() and (class_labels.min() < 0 or class_labels.max() > self.null_class):
            raise ValueError(f"class_labels must lie in 0..{self.null_class} ({self.null_class} = null class)")
        tokens = self.embedding(class_labels)
        return tokens.view(-1, self.config.num_tokens, self.config.embed_dim)


def _component_types(cls: type[DiffusionPipeline]) -> type[DiffusionPipeline]:
    """Give ``cls.__init__`` its component classes as annotations instead of strings: this module's
    ``from __future__ import annotations`` leaves strings, which diffusers < 0.37 skips when it reads the
    component types in ``from_pretrained`` (a ``KeyError`` naming the component); later versions resolve them."""
    cls.__init__.__annotations__ = typing.get_type_hints(cls.__init__)
    return cls


@_component_types
class DigitsPipeline(DiffusionPipeline):
    """Class-conditional sampling of 16x16 digits with classifier-free guidance.

    Components: ``transformer`` (``PixArtTransformer2DModel``), ``class_embedder`` (``ClassEmbedder``)
    and ``scheduler`` (any diffusers scheduler; DDIM by default). The CFG batch is ``[uncond; cond]``
    as in Stable Diffusion, and ``guidance_scale <= 1`` runs the conditional half only.
    """

    model_cpu_offload_seq = "class_embedder->transformer"
    _callback_tensor_inputs = ["latents", "encoder_hidden_states"]
    denoiser_name = "transformer"  # the component the sampling loop calls (``DigitsUNetPipeline``: ``unet``)

    def __init__(self, transformer: PixArtTransformer2DModel, class_embedder: ClassEmbedder, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(transformer=transformer, class_embedder=class_embedder, scheduler=scheduler)

    @property
    def denoiser(self) -> nn.Module:
        """The denoising network: ``transformer`` here, ``unet`` in :class:`DigitsUNetPipeline`."""
        return getattr(self, self.denoiser_name)

    def _labels_tensor(self, class_labels: int | list[int] | torch.Tensor) -> torch.Tensor:
        if isinstance(class_labels, torch.Tensor):
            if class_labels.is_floating_point() or class_labels.is_complex() or class_labels.ndim > 1:
                raise TypeError("class_labels tensor must be a 0-D or 1-D integer tensor")
            labels = class_labels.reshape(-1).long().cpu()
        elif isinstance(class_labels, (int, np.integer)) and not isinstance(class_labels, bool):
            labels = torch.tensor([int(class_labels)])
        elif isinstance(class_labels, (list, tuple)) and all(
            isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in class_labels
        ):
            labels = torch.tensor([int(c) for c in class_labels], dtype=torch.long)
        else:
            raise TypeError(f"class_labels must be an int, a list of ints or an integer tensor, got {class_labels!r}")
        if labels.numel() == 0:
            raise ValueError("class_labels must not be empty")
        n = self.class_embedder.config.num_classes
        bad = labels[(labels < 0) | (labels >= n)]
        if bad.numel():
            raise ValueError(f"class_labels must lie in 0..{n - 1}, got {sorted(set(bad.tolist()))}")
        return labels

    def encode_class_labels(
        self,
        class_labels: int | list[int] | torch.Tensor,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
    ) -> torch.Tensor:
        """``encoder_hidden_states`` for the transformer: ``[B, T, D]``, or ``[2B, T, D]`` as
        ``[uncond; cond]`` with CFG, where ``B = len(class_labels) * num_images_per_prompt``."""
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt!r}")
        labels = self._labels_tensor(class_labels).repeat_interleave(num_images_per_prompt)
        if do_classifier_free_guidance:
            labels = torch.cat([torch.full_like(labels, self.class_embedder.null_class), labels])
        labels = labels.to(self.class_embedder.device)
        return self.class_embedder(labels).to(self.denoiser.dtype)

    def predict_noise(
        self,
        latents: torch.Tensor,
        t: float | torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    ) -> torch.Tensor:
        """One guided denoiser call: ``eps = uncond + s * (cond - uncond)``, or ``cond`` if ``s <= 1``.

        ``t`` is a scalar or a ``[B]`` tensor (one timestep per sample, e.g. a parallel-sampling
        window); ``encoder_hidden_states`` comes from ``encode_class_labels`` with matching CFG.
        """
        do_cfg = guidance_scale > 1
        batch = latents.shape[0]
        expected = 2 * batch if do_cfg else batch
        if encoder_hidden_states.shape[0] != expected:
            raise ValueError(
                f"encoder_hidden_states has batch {encoder_hidden_states.shape[0]}, expected {expected} for "
                f"{batch} latents with guidance_scale={guidance_scale} (CFG needs [uncond; cond])"
            )
        t = torch.as_tensor(t, device=latents.device)
        if t.numel() not in (1, batch):
            raise ValueError(f"t must be a scalar or hold one timestep per latent ({batch}), got shape {tuple(t.shape)}")
        t = t.reshape(-1).expand(batch)
        model_input = torch.cat([latents, latents]) if do_cfg else latents
        timestep = torch.cat([t, t]) if do_cfg else t
        # the class tokens are in the denoiser's compute dtype (encode_class_labels casts them; the denoiser could not
        # take them otherwise), so the input follows them, as diffusers' pipelines take the latents' dtype from the
        # prompt embeddings; ``self.denoiser.dtype`` would walk every submodule at every step (ModelMixin.dtype looks
        # for layerwise-casting hooks: ~1.4 ms per call on the digits UNet, a tenth of a cached step)
        out = self.denoiser(
            model_input.to(encoder_hidden_states.dtype),
            encoder_hidden_states=encoder_hidden_states,
            timestep=timestep,
            return_dict=False,
        )[0].to(latents.dtype)
        if not do_cfg:
            return out
        uncond, cond = out.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: StepEndCallback | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        """Sample digits of the given classes.

        Args:
            class_labels: digit(s) 0..9; images come out in label order, ``num_images_per_prompt`` each.
            num_inference_steps: number of scheduler steps (>= 1).
            guidance_scale: classifier-free guidance scale; ``<= 1`` disables CFG.
            num_images_per_prompt: images per label.
            generator: torch generator(s) for the initial noise and stochastic schedulers.
            latents: optional initial noise ``[B, 1, 16, 16]`` (before ``init_noise_sigma`` scaling).
            output_type: ``"pil"``, ``"pt"`` (``[B, 1, 16, 16]`` in [0, 1]) or ``"np"`` (``[B, 16, 16, 1]``).
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
            callback_on_step_end: called after every denoising step as diffusers pipelines do,
                ``callback_on_step_end(pipe, step_index, timestep, callback_kwargs)`` with ``callback_kwargs``
                holding the tensors named in ``callback_on_step_end_tensor_inputs``; it returns a dict, whose
                ``"latents"`` / ``"encoder_hidden_states"`` entries (if any) replace those tensors for the
                following steps. A diffusers ``PipelineCallback`` brings its own tensor inputs.
            callback_on_step_end_tensor_inputs: which of ``"latents"`` and ``"encoder_hidden_states"`` (the
                CFG batch ``[uncond; cond]`` of class tokens) the callback receives; default ``["latents"]``.
        """
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise TypeError(f"guidance_scale must be a number (<= 1 disables CFG), got {guidance_scale!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        tensor_inputs = self._check_step_end_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        do_cfg = guidance_scale > 1
        device = self._execution_device
        encoder_hidden_states = self.encode_class_labels(class_labels, num_images_per_prompt, do_cfg)

        cfg, dtype = self.denoiser.config, self.denoiser.dtype
        shape = (encoder_hidden_states.shape[0] // (2 if do_cfg else 1), cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        else:
            latents = latents.to(device=device, dtype=dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        self._num_timesteps = len(self.scheduler.timesteps)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = self.scheduler.scale_model_input(latents, t)
            model_output = self.predict_noise(model_input, t, encoder_hidden_states, guidance_scale)
            latents = self.scheduler.step(model_output, t, latents, **step_kwargs, return_dict=False)[0]
            if callback_on_step_end is not None:
                tensors = {"latents": latents, "encoder_hidden_states": encoder_hidden_states}
                tensors = self._run_step_end_callback(callback_on_step_end, i, t, tensors, tensor_inputs)
                latents, encoder_hidden_states = tensors["latents"], tensors["encoder_hidden_states"]

        image = (latents.float() / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    @property
    def num_timesteps(self) -> int:
        """Denoising steps of the current (or last) call, as diffusers pipelines expose it to callbacks."""
        return self._num_timesteps

    def _check_step_end_callback(self, callback: object, tensor_inputs: object) -> list[str]:
        """The tensor names the step-end callback receives, validated as diffusers' ``check_inputs`` does."""
        if callback is not None and not callable(callback):
            raise TypeError("callback_on_step_end must be callable as callback(pipe, step_index, timestep, "
                            f"callback_kwargs) -> dict, or a diffusers PipelineCallback; got {type(callback).__name__}")
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback.tensor_inputs
        if isinstance(tensor_inputs, str) or not isinstance(tensor_inputs, (list, tuple)):
            raise TypeError(f"callback_on_step_end_tensor_inputs must be a list of names from "
                            f"{self._callback_tensor_inputs}, got {tensor_inputs!r}")
        unknown = [k for k in tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be in {self._callback_tensor_inputs}, "
                             f"got {unknown}")
        return list(tensor_inputs)

    def _run_step_end_callback(self, callback: StepEndCallback, step_index: int, timestep: torch.Tensor,
                               tensors: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
        """Call the step-end callback with the requested tensors; its returned entries replace them."""
        outputs = callback(self, step_index, timestep, {k: tensors[k] for k in names})
        if not isinstance(outputs, Mapping):
            raise TypeError(f"callback_on_step_end must return a dict (e.g. the callback_kwargs it was given), got "
                            f"{type(outputs).__name__} at step {step_index}")
        new = dict(tensors)
        for name, old in tensors.items():
            value = outputs.get(name, old)
            if not isinstance(value, torch.Tensor) or value.shape != old.shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"callback_on_step_end returned {name!r} of {got} at step {step_index}; it must be "
                                 f"a tensor of shape {tuple(old.shape)}")
            new[name] = value
        return new


@_component_types
class DigitsUNetPipeline(DigitsPipeline):
    """:class:`DigitsPipeline` with a class-conditional ``UNet2DConditionModel`` as the denoiser.

    Components: ``unet``, ``class_embedder``, ``scheduler``. The sampling loop, classifier-free guidance,
    arguments and outputs are ``DigitsPipeline``'s (inherited, so code accepting a ``DigitsPipeline``
    accepts this one); only the component the loop calls differs.
    """

    model_cpu_offload_seq = "class_embedder->unet"
    denoiser_name = "unet"

    def __init__(self, unet: UNet2DConditionModel, class_embedder: ClassEmbedder, scheduler: SchedulerMixin):
        DiffusionPipeline.__init__(self)  # DigitsPipeline's __init__ registers a transformer
        self.register_modules(unet=unet, class_embedder=class_embedder, scheduler=scheduler)


def digits_pipeline_for(denoiser: nn.Module, class_embedder: ClassEmbedder, scheduler: SchedulerMixin) -> DigitsPipeline:
    """The class-token digits pipeline around ``denoiser``: a :class:`DigitsUNetPipeline` for a
    ``UNet2DConditionModel``, else a :class:`DigitsPipeline` (transformers)."""
    cls = DigitsUNetPipeline if isinstance(denoiser, UNet2DConditionModel) else DigitsPipeline
    return cls(denoiser, class_embedder, scheduler)


def init_pixart_weights(transformer: PixArtTransformer2DModel) -> None:
    """PixArt-alpha's initialisation (after DiT): xavier linears, N(0, 0.02) timestep MLPs, zero
    cross-attention outputs and final projection. diffusers' class keeps PyTorch's defaults (it is
    meant for loading checkpoints). One change: the caption (class-token) projection stays xavier,
    not N(0, 0.02), so the zero-initialised cross-attention starts with O(1) values and the class
    condition is picked up within a short CPU training run."""
    for module in transformer.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    patch = transformer.pos_embed.proj
    nn.init.xavier_uniform_(patch.weight.view(patch.weight.shape[0], -1))
    nn.init.zeros_(patch.bias)
    t_embed = transformer.adaln_single.emb.timestep_embedder
    for linear in [t_embed.linear_1, t_embed.linear_2, transformer.adaln_single.linear]:
        nn.init.normal_(linear.weight, std=0.02)
    for linear in [block.attn2.to_out[0] for block in transformer.transformer_blocks] + [transformer.proj_out]:
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)


def build_digits_pipeline(transformer_config: dict | None = None, seed: int = 0) -> DigitsPipeline:
    """A randomly initialised ``DigitsPipeline`` with a DDIM scheduler.

    ``transformer_config`` overrides entries of ``DIGITS_TRANSFORMER_CONFIG``; ``cross_attention_dim``
    follows the hidden size (heads x head_dim) and the class embedder's width follows
    ``caption_channels`` unless given explicitly.
    """
    config = {**DIGITS_TRANSFORMER_CONFIG, **(transformer_config or {})}
    if "cross_attention_dim" not in (transformer_config or {}):
        config["cross_attention_dim"] = config["num_attention_heads"] * config["attention_head_dim"]
    embedder_config = {**DIGITS_CLASS_EMBEDDER_CONFIG, "embed_dim": config["caption_channels"]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = PixArtTransformer2DModel(**config)
        init_pixart_weights(transformer)
        class_embedder = ClassEmbedder(**embedder_config)
    return DigitsPipeline(transformer, class_embedder, DDIMScheduler(**DIGITS_SCHEDULER_CONFIG))


def build_digits_unet_pipeline(unet_config: dict | None = None, seed: int = 0) -> DigitsUNetPipeline:
    """A randomly initialised :class:`DigitsUNetPipeline` (diffusers' own UNet initialisation, as the training
    script builds it) with a DDIM scheduler.

    ``unet_config`` overrides entries of ``DIGITS_UNET_CONFIG``; the class embedder's width follows
    ``cross_attention_dim``.
    """
    if unet_config is not None and not isinstance(unet_config, Mapping):
        raise TypeError(f"unet_config must be a dict of UNet2DConditionModel arguments, got {type(unet_config).__name__}")
    config = {**DIGITS_UNET_CONFIG, **(unet_config or {})}
    embedder_config = {**DIGITS_CLASS_EMBEDDER_CONFIG, "embed_dim": config["cross_attention_dim"]}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**config)
        class_embedder = ClassEmbedder(**embedder_config)
    return DigitsUNetPipeline(unet, class_embedder, DDIMScheduler(**DIGITS_SCHEDULER_CONFIG))


def _check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:0', got {device!r}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use 'cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available; use 'cpu'")
    return dev


def _load_shipped(pipeline_cls: type[DigitsPipeline], weights_dir: Path, config_name: str,
                  device: str | torch.device, dtype: torch.dtype) -> DigitsPipeline:
    """A fresh ``pipeline_cls`` from the package directory ``weights_dir``, offline."""
    dev = _check_device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype (torch.float32, torch.float16, torch.bfloat16), got {dtype!r}")
    if not (weights_dir / "model_index.json").is_file():
        raise FileNotFoundError(
            f"embedded weights missing at {weights_dir}; train them with "
            f"`fastdiff train --config {config_name}` and copy runs/{config_name}/pipeline there"
        )
    from diffusers.utils import logging as diffusers_logging

    verbosity, bars = diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()  # three tiny local components: no "Loading pipeline components" bar
    try:
        pipe = pipeline_cls.from_pretrained(weights_dir, local_files_only=True, use_safetensors=True, dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if bars:
            diffusers_logging.enable_progress_bar()
    return pipe.to(dev)


def load_embedded_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> DigitsPipeline:
    """The shipped, trained ``DigitsPipeline``, loaded offline from the package directory.

    Every call returns a fresh pipeline, so mutating one (new scheduler, hooks) never affects another.
    """
    return _load_shipped(DigitsPipeline, EMBEDDED_WEIGHTS_DIR, "digits_embedded", device, dtype)


def load_embedded_unet_pipeline(device: str | torch.device = "cpu",
                                dtype: torch.dtype = torch.float32) -> DigitsUNetPipeline:
    """The shipped, trained :class:`DigitsUNetPipeline` (``fastdiff/models/digits_unet``, trained by
    ``fastdiff train --config digits_unet``), loaded offline; a fresh pipeline on every call."""
    return _load_shipped(DigitsUNetPipeline, EMBEDDED_UNET_WEIGHTS_DIR, "digits_unet", device, dtype)
