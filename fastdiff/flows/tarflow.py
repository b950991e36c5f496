"""TarFlow: a transformer autoregressive normalizing flow (Zhai et al. 2024, arXiv 2412.06329).

Equation by equation (paper Sec. 2-3; where a detail is only in the official code, github apple/ml-tarflow
``transformer_flow.py``, it says so):

* **Patchify**: an image ``[B, C, H, W]`` becomes a sequence of ``T = (H / p)^2`` patch tokens of ``D = C p^2``
  values (``unfold``), and back (``fold``).
* **Flow block** ``k`` (paper eq. 4-5, "MetaBlock" in the code): a causal transformer ``f_k`` over the block's
  permuted sequence ``x`` gives per-token affine parameters ``(a_t, b_t) = f_k(x_{<t})`` (the transformer output
  at ``t - 1``, shifted one step; token 0 gets ``(0, 0)``), and ``z_t = (x_t - b_t) exp(-a_t)`` with
  log-determinant ``-sum_t a_t``. The inverse is autoregressive, ``x_t = exp(a_t(x_{<t})) z_t + b_t(x_{<t})``:
  ``T - 1`` sequential transformer passes per block (:mod:`fastdiff.flows.sampling`).
* **Permutations**: block ``k`` reads the sequence in order for even ``k`` and reversed for odd ``k`` (code:
  ``PermutationIdentity`` / ``PermutationFlip``), so each token is eventually conditioned on every other one.
* **Prior and loss** (eq. 2): ``z ~ N(0, I)``; the training loss is the per-dimension negative log-likelihood
  ``0.5 mean(z^2) - sum_k mean(a^k)`` (code: ``get_loss``; the ``log(2 pi)`` constant is dropped).
* **Noise augmentation** (Sec. 3.2): training data is ``x + sigma eps``, ``eps ~ N(0, I)`` (``noise_std``).
* **Score-based denoising** (Sec. 3.2, eq. 8): a sample ``y`` of the noisy model is denoised by Tweedie's
  formula ``x = y + sigma^2 grad_y log p(y)``, with the model's own exact ``log p`` (one forward and one
  backward pass; code: ``evaluate_fid.py``, ``self_denoising_lr`` scaling the step, 1 = the optimal one).
* **Class conditioning** (code): a learned embedding per class is added to every token of every block; the
  unconditional model is the same network with the *mean* class embedding (training drops labels with
  probability ``data.class_dropout``, encoded as label ``num_classes``).
* **Guidance** (Sec. 3.3, eq. 9): the affine parameters of the conditional and unconditional passes are
  extrapolated, ``a = a_c + w (a_c - a_u)`` and ``b = b_c + w (b_c - b_u)``; with ``annealed`` guidance the
  weight grows linearly with the token index, ``w_t = w t / (T - 1)`` (code: ``annealed_guidance``, which the
  paper's FID evaluation uses).

Attention keeps an optional key/value cache (:class:`KVCache`): a pass over tokens ``[s, e)`` attends to the
cached keys of ``[0, s)`` and causally inside ``[s, e)``, which is what sequential inversion (one token per
pass) and GS-Jacobi (one segment per pass) need. The model is a diffusers ``ModelMixin``/``ConfigMixin``, so
``save_pretrained`` / ``from_pretrained`` write and read a config and safetensors weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn


@dataclass
class KVCache:
    """Keys and values of the committed prefix of one flow block, per attention layer ``[B, heads, n, d]``."""

    keys: list[Tensor | None] = field(default_factory=list)
    values: list[Tensor | None] = field(default_factory=list)

    @property
    def length(self) -> int:
        return 0 if not self.keys or self.keys[0] is None else self.keys[0].shape[2]

    def commit(self, new: list[tuple[Tensor, Tensor]]) -> None:
        """Append the keys/values a pass returned (one ``(k, v)`` per layer) to the prefix."""
        if not self.keys:
            self.keys, self.values = [None] * len(new), [None] * len(new)
        for i, (k, v) in enumerate(new):
            self.keys[i] = k if self.keys[i] is None else torch.cat([self.keys[i], k], 2)
            self.values[i] = v if self.values[i] is None else torch.cat([self.values[i], v], 2)

    def layer(self, i: int) -> tuple[Tensor, Tensor] | None:
        return None if not self.keys or self.keys[i] is None else (self.keys[i], self.values[i])


class Attention(nn.Module):
    """Pre-norm multi-head causal self-attention that can attend to a cached prefix."""

    def __init__(self, width: int, head_dim: int) -> None:
        super().__init__()
        if width % head_dim:
            raise ValueError(f"width ({width}) must be a multiple of head_dim ({head_dim})")
        self.heads = width // head_dim
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, h: Tensor, prefix: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        B, L, W = h.shape
        q, k, v = self.qkv(self.norm(h)).view(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # [B, heads, L, d]
        keys, values = (k, v) if prefix is None else (torch.cat([prefix[0], k], 2), torch.cat([prefix[1], v], 2))
        mask = None
        if L > 1 and prefix is not None:  # causal inside the new tokens, the whole prefix visible
            n = keys.shape[2]
            mask = torch.ones(L, n, dtype=torch.bool, device=h.device).tril(n - L)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=L > 1 and prefix is None)
        return self.proj(out.transpose(1, 2).reshape(B, L, W)), (k, v)


class TransformerLayer(nn.Module):
    def __init__(self, width: int, head_dim: int, expansion: int) -> None:
        super().__init__()
        self.attention = Attention(width, head_dim)
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, expansion * width), nn.GELU(),
                                 nn.Linear(expansion * width, width))

    def forward(self, h: Tensor, prefix: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        a, kv = self.attention(h, prefix)
        h = h + a
        return h + self.mlp(h), kv


class FlowBlock(nn.Module):
    """One autoregressive affine flow over a (possibly reversed) token sequence (TarFlow's MetaBlock)."""

    def __init__(self, dim: int, width: int, num_tokens: int, num_layers: int, head_dim: int, expansion: int,
                 num_classes: int, reverse: bool) -> None:
        super().__init__()
        self.reverse = reverse
        self.proj_in = nn.Linear(dim, width)
        self.pos_embed = nn.Parameter(torch.randn(num_tokens, width) * 1e-2)
        self.class_embed = nn.Parameter(torch.randn(num_classes, width) * 1e-2) if num_classes else None
        self.layers = nn.ModuleList([TransformerLayer(width, head_dim, expansion) for _ in range(num_layers)])
        self.proj_out = nn.Linear(width, 2 * dim)
        nn.init.zeros_(self.proj_out.weight)  # every block starts as the identity (official code)

    def permute(self, x: Tensor) -> Tensor:
        """Into (and, being an involution, out of) this block's token order."""
        return x.flip(1) if self.reverse else x

    def condition(self, labels: Tensor | None, batch: int) -> Tensor | None:
        """``[B, 1, width]`` class embedding; label ``num_classes`` (or ``labels=None``) is the mean (unconditional)."""
        if self.class_embed is None:
            return None
        mean = self.class_embed.mean(0)
        if labels is None:
            return mean.expand(batch, 1, -1)
        null = labels >= self.class_embed.shape[0]
        emb = self.class_embed[labels.clamp(max=self.class_embed.shape[0] - 1)]
        return torch.where(null[:, None], mean, emb)[:, None]

    def params(self, x: Tensor, start: int, cond: Tensor | None,
               cache: KVCache | None = None) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
        """One transformer pass over permuted tokens ``x = x[:, start:start+L]`` (the prefix ``[0, start)`` in
        ``cache``): ``(a, b)`` ``[B, L, dim]`` for tokens ``start+1 .. start+L`` and the pass's keys/values."""
        h = self.proj_in(x) + self.pos_embed[start:start + x.shape[1]]
        if cond is not None:
            h = h + cond
        kvs = []
        for i, layer in enumerate(self.layers):
            h, kv = layer(h, None if cache is None else cache.layer(i))
            kvs.append(kv)
        a, b = self.proj_out(h).chunk(2, -1)
        return a, b, kvs

    def forward(self, x: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data side -> noise side: ``(z, logdet)`` with ``logdet`` ``[B]`` summed over tokens and dimensions."""
        xp = self.permute(x)
        a, b, _ = self.params(xp[:, :-1], 0, self.condition(labels, x.shape[0]))
        z = torch.cat([xp[:, :1], (xp[:, 1:] - b) * torch.exp(-a)], 1)
        return self.permute(z), -a.flatten(1).sum(1)


def guided(cond: tuple[Tensor, Tensor], uncond: tuple[Tensor, Tensor] | None, weight: Tensor | float):
    """TarFlow guidance on the affine parameters: ``p_c + w (p_c - p_u)`` for ``p = a, b``."""
    if uncond is None:
        return cond
    return tuple(c + weight * (c - u) for c, u in zip(cond, uncond))


class TarFlow(ModelMixin, ConfigMixin):
    """Class-conditional TarFlow on ``[B, in_channels, sample_size, sample_size]`` images in ``[-1, 1]``.

    ``forward(x, labels) -> (z, logdet)``: the exact map to the Gaussian prior (``z`` as patch tokens
    ``[B, T, D]``, ``logdet`` ``[B]``). Inversion (sampling) lives in :mod:`fastdiff.flows.sampling`.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, sample_size: int = 16, in_channels: int = 1, patch_size: int = 2, width: int = 64,
                 num_blocks: int = 4, layers_per_block: int = 2, head_dim: int = 32, expansion: int = 4,
                 num_classes: int = 10, noise_std: float = 0.1) -> None:
        super().__init__()
        for name, v in (("sample_size", sample_size), ("patch_size", patch_size), ("num_blocks", num_blocks),
                        ("layers_per_block", layers_per_block), ("width", width), ("head_dim", head_dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if sample_size % patch_size:
            raise ValueError(f"patch_size ({patch_size}) must divide sample_size ({sample_size})")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.num_tokens = (sample_size // patch_size) ** 2
        if self.num_tokens < 2:
            raise ValueError("TarFlow needs at least 2 patch tokens (sample_size / patch_size >= 2)")
        self.token_dim = in_channels * patch_size**2
        self.blocks = nn.ModuleList([
            FlowBlock(self.token_dim, width, self.num_tokens, layers_per_block, head_dim, expansion, num_classes,
                      reverse=k % 2 == 1) for k in range(num_blocks)])

    # ------------------------------------------------------------------ image <-> tokens
    def patchify(self, images: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> ``[B, T, C p^2]``."""
        return F.unfold(images, self.config.patch_size, stride=self.config.patch_size).transpose(1, 2)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """``[B, T, C p^2]`` -> ``[B, C, H, W]``."""
        s, p = self.config.sample_size, self.config.patch_size
        return F.fold(tokens.transpose(1, 2), (s, s), p, stride=p)

    def check_labels(self, labels: Tensor | None, batch: int) -> Tensor | None:
        if labels is None:
            return None
        if not isinstance(labels, Tensor) or labels.dtype not in (torch.int32, torch.int64) or labels.shape != (batch,):
            raise TypeError(f"labels must be an integer tensor of shape ({batch},), got {labels!r}")
        if self.config.num_classes and not bool(((labels >= 0) & (labels <= self.config.num_classes)).all()):
            raise ValueError(f"labels must be in [0, {self.config.num_classes}] ({self.config.num_classes} = "
                             "unconditional)")
        return labels

    # ------------------------------------------------------------------ density
    def forward(self, images: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Images -> ``(z [B, T, D], logdet [B])`` through every block."""
        c, size = self.config.in_channels, self.config.sample_size
        if not isinstance(images, Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != (c, size, size):
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be [B, {c}, {size}, {size}] (in_channels, sample_size of this TarFlow; "
                             f"training: data.resolution must equal model.config.sample_size), got {got}")
        labels = self.check_labels(labels, images.shape[0])
        x, logdet = self.patchify(images), images.new_zeros(images.shape[0])
        for block in self.blocks:
            x, ld = block(x, labels)
            logdet = logdet + ld
        return x, logdet

    def log_prob(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        """``log p(images)`` ``[B]`` up to the constant ``-D/2 log(2 pi)`` (summed over dimensions)."""
        z, logdet = self(images, labels)
        return -0.5 * z.pow(2).flatten(1).sum(1) + logdet

    def nll(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        """Per-dimension negative log-likelihood ``[B]`` (TarFlow's training loss, up to a constant)."""
        return -self.log_prob(images, labels) / images[0].numel()

    def training_loss(self, images: Tensor, noise: Tensor, labels: Tensor | None = None) -> Tensor:
        """TarFlow's objective: mean NLL of the noise-augmented images ``images + noise_std * noise``."""
        return self.nll(images + self.config.noise_std * noise, labels).mean()

    def denoise(self, images: Tensor, labels: Tensor | None = None, step: float = 1.0) -> Tensor:
        """Tweedie's score-based denoising ``y + step sigma^2 grad log p(y)`` (``step = 1``: the optimal one)."""
        sigma2 = self.config.noise_std**2
        if sigma2 == 0 or step == 0:
            return images
        with torch.enable_grad():
            y = images.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.log_prob(y, labels).sum(), y)
        return (y + step * sigma2 * grad).detach()


# The digits at their native 8x8 resolution, one pixel per token (T = 64): a fully autoregressive flow per block.
DIGITS_TARFLOW_CONFIG: dict = {
    "sample_size": 8, "in_channels": 1, "patch_size": 1, "width": 32, "num_blocks": 4, "layers_per_block": 2,
    "head_dim": 16, "expansion": 4, "num_classes": 10, "noise_std": 0.1,
}


def build_tarflow(overrides: dict | None = None, seed: int = 0) -> TarFlow:
    """A randomly initialised digits TarFlow (``DIGITS_TARFLOW_CONFIG`` updated by ``overrides``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TarFlow(**{**DIGITS_TARFLOW_CONFIG, **(overrides or {})})


__all__ = ["DIGITS_TARFLOW_CONFIG", "FlowBlock", "KVCache", "TarFlow", "build_tarflow", "guided"]
