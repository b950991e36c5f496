"""Testing helpers: an exact-score Gaussian-mixture denoiser and tiny offline diffusers pipelines.

:class:`GaussianMixtureDenoiser` knows the exact posterior of a Gaussian mixture under the forward
process ``x_t = alpha_t x_0 + sigma_t eps``, so its noise prediction is the true ``eps`` (the score times
``-sigma``), and :meth:`GaussianMixtureDenoiser.solve_ode` integrates the probability-flow ODE to float
precision: sampler error can be measured against an exact solution, not against another sampler.
:class:`AnisotropicGaussianMixtureDenoiser` (:func:`make_anisotropic_mixture`) is the same with full covariances.

The ``tiny_*_pipeline`` factories build small random-weight diffusers pipelines from configs, with a
tokenizer written locally, so tests never touch the network.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .schedule import NoiseSchedule, check_prediction_type, prediction_target

SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "prediction_type": "epsilon",
}


class GaussianMixtureDenoiser(nn.Module):
    """Exact denoiser of an isotropic Gaussian mixture ``sum_k w_k N(mu_k, s_k^2 I)`` in ``dim`` dims.

    ``forward(x, t)`` takes ``x`` of shape ``[B, ...]`` (flattened to ``dim``) and training timesteps ``t``
    (a scalar or ``[B]``, integer or fractional) and returns the exact prediction of type
    ``prediction_type`` (``epsilon``, ``v_prediction``, ``sample`` or ``flow``), like a trained diffusers
    model would. Works in float64 by default.
    """

    def __init__(
        self,
        means: torch.Tensor,
        stds: torch.Tensor,
        weights: torch.Tensor,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
    ) -> None:
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must be [K, dim], got shape {tuple(means.shape)}")
        stds = torch.as_tensor(stds, dtype=torch.float64).expand(means.shape[0]).clone()
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if torch.any(stds <= 0) or torch.any(weights <= 0):
            raise ValueError("stds and weights must be positive")
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("log_weights", (weights / weights.sum()).log())
        self.schedule = schedule
        self.prediction_type = check_prediction_type(prediction_type)
        self.dim = means.shape[1]

    # ------------------------------------------------------------------ exact posterior
    def _components(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
        a, s = alpha.reshape(-1, 1, 1), sigma.reshape(-1, 1, 1)
        var = a**2 * self.stds.reshape(1, -1, 1) ** 2 + s**2  # [B,K,1]
        diff = x.unsqueeze(1) - a * self.means.unsqueeze(0)  # [B,K,D]
        log_norm = -0.5 * (diff**2).sum(-1) / var[..., 0] - 0.5 * self.dim * torch.log(2 * math.pi * var[..., 0])
        return diff, var, self.log_weights + log_norm  # log w_k N(x; a mu_k, var_k I)

    def log_density(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``log p_t(x)`` of the noised mixture at noise level (alpha, sigma); ``x`` is ``[B, dim]``."""
        return torch.logsumexp(self._components(x, alpha, sigma)[2], dim=1)

    def _flat_inputs(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
        """``x`` as ``[B, dim]`` in the mixture's dtype, and ``alpha`` / ``sigma`` as ``[B]``."""
        flat = x.reshape(x.shape[0], -1).to(self.means.dtype)
        if flat.shape[1] != self.dim:
            raise ValueError(f"x must have {self.dim} elements per sample, got {flat.shape[1]}")
        alpha = torch.as_tensor(alpha, dtype=flat.dtype, device=flat.device).expand(flat.shape[0])
        sigma = torch.as_tensor(sigma, dtype=flat.dtype, device=flat.device).expand(flat.shape[0])
        return flat, alpha, sigma

    def posterior(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
        """Exact ``(E[x0 | x], E[eps | x])`` at noise level (alpha, sigma), finite for every level."""
        flat, alpha, sigma = self._flat_inputs(x, alpha, sigma)
        diff, var, logits = self._components(flat, alpha, sigma)
        resp = torch.softmax(logits, dim=1).unsqueeze(-1)  # [B,K,1]
        a, s = alpha.reshape(-1, 1, 1), sigma.reshape(-1, 1, 1)
        x0 = (resp * (self.means + a * self.stds.reshape(1, -1, 1) ** 2 * diff / var)).sum(1)
        eps = (resp * s * diff / var).sum(1)
        return x0.reshape(x.shape).to(x.dtype), eps.reshape(x.shape).to(x.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, *args: Any, **kwargs: Any) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        x0, eps = self.posterior(x, alpha, sigma)
        return prediction_target(x0, eps, alpha.to(x.dtype), sigma.to(x.dtype), self.prediction_type)

    # ------------------------------------------------------------------ sampling and the exact ODE
    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws from the clean data distribution, ``[n, dim]``."""
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, dtype=self.means.dtype, generator=generator)
        return self.means[k] + self.stds[k, None] * noise

    def solve_ode(self, x: torch.Tensor, t_start: float, t_end: float | None, steps: int = 2000) -> torch.Tensor:
        """Integrate the probability-flow ODE exactly (RK4, float64) from timestep ``t_start`` to ``t_end``.

        Uses DDIM's form ``d(x/alpha) = eps d(sigma/alpha)`` (Song et al. 2021), integrated on a grid geometric
        in ``sigma/alpha``. ``t_end=None`` runs to clean data (``sigma = 0``), which is where a scheduler with
        ``set_alpha_to_one=True`` / ``final_sigmas_type="zero"`` ends. Error is ~1e-10 with the default steps.
        """
        sched = self.schedule
        a0 = sched.alpha(t_start).item()
        if a0 == 0:
            raise ValueError("solve_ode cannot start at zero SNR (alpha = 0); start one step later")
        nb_start = sched.sigma_bar(t_start).item()
        nb_end = 0.0 if t_end is None else sched.sigma_bar(t_end).item()
        floor = max(nb_end, 1e-4)
        grid = torch.logspace(math.log10(nb_start), math.log10(floor), steps, dtype=torch.float64).tolist()
        if nb_end < floor:
            grid += torch.linspace(floor, nb_end, 50, dtype=torch.float64)[1:].tolist()

        def eps_at(xbar: torch.Tensor, nb: float) -> torch.Tensor:
            alpha = 1.0 / math.sqrt(1.0 + nb * nb)
            return self.posterior(xbar * alpha, torch.tensor(alpha), torch.tensor(nb * alpha))[1]

        y = x.to(torch.float64) / a0
        for nb0, nb1 in zip(grid[:-1], grid[1:]):
            h = nb1 - nb0
            k1 = eps_at(y, nb0)
            k2 = eps_at(y + 0.5 * h * k1, nb0 + 0.5 * h)
            k3 = eps_at(y + 0.5 * h * k2, nb0 + 0.5 * h)
            k4 = eps_at(y + h * k3, nb1)
            y = y + h * (k1 + 2 * k2 + 2 * k3 + k4) / 6
        alpha_end = 1.0 / math.sqrt(1.0 + nb_end * nb_end)
        return (y * alpha_end).to(x.dtype)


class AnisotropicGaussianMixtureDenoiser(GaussianMixtureDenoiser):
    """Exact denoiser of ``sum_k w_k N(mu_k, Sigma_k)`` with full covariances ``Sigma_k = U_k diag(d_k) U_k^T``.

    Under ``x_t = alpha x_0 + sigma eps`` component ``k`` is ``N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I)``, so in
    ``U_k``'s basis every quantity is diagonal: ``E[x0 | x, k] = mu_k + U_k diag(alpha d / (alpha^2 d + sigma^2))
    U_k^T (x - alpha mu_k)`` and ``E[eps | x, k] = U_k diag(sigma / (alpha^2 d + sigma^2)) U_k^T (x - alpha mu_k)``;
    the mixture posterior weights them by the exact responsibilities. ``solve_ode`` and ``forward`` are the
    isotropic oracle's.
    """

    def __init__(self, means: torch.Tensor, rotations: torch.Tensor, variances: torch.Tensor,
                 weights: torch.Tensor, schedule: NoiseSchedule, prediction_type: str = "epsilon") -> None:
        variances = torch.as_tensor(variances, dtype=torch.float64)
        super().__init__(means, variances.mean(-1).sqrt(), weights, schedule, prediction_type)
        rotations = torch.as_tensor(rotations, dtype=torch.float64)
        k, d = self.means.shape
        if rotations.shape != (k, d, d) or variances.shape != (k, d):
            raise ValueError(f"rotations must be [K, dim, dim] and variances [K, dim] for means {tuple(self.means.shape)}")
        if torch.any(variances <= 0):
            raise ValueError("variances must be positive")
        self.register_buffer("rotations", rotations)
        self.register_buffer("variances", variances)

    def _components(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
        a, s = alpha.reshape(-1, 1, 1), sigma.reshape(-1, 1, 1)
        var = a**2 * self.variances.unsqueeze(0) + s**2  # [B,K,D] eigenvalues of the noised covariances
        diff = x.unsqueeze(1) - a * self.means.unsqueeze(0)  # [B,K,D]
        proj = torch.einsum("bkd,kde->bke", diff, self.rotations)  # U_k^T diff
        log_norm = -0.5 * (proj**2 / var).sum(-1) - 0.5 * torch.log(2 * math.pi * var).sum(-1)
        return proj, var, self.log_weights + log_norm

    def posterior(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
        flat, alpha, sigma = self._flat_inputs(x, alpha, sigma)
        proj, var, logits = self._components(flat, alpha, sigma)
        resp = torch.softmax(logits, dim=1).unsqueeze(-1)  # [B,K,1]
        a, s = alpha.reshape(-1, 1, 1), sigma.reshape(-1, 1, 1)
        back = lambda z: torch.einsum("bke,kde->bkd", z, self.rotations)  # noqa: E731  (U_k z)
        x0 = (resp * (self.means + back(a * self.variances * proj / var))).sum(1)
        eps = (resp * back(s * proj / var)).sum(1)
        return x0.reshape(x.shape).to(x.dtype), eps.reshape(x.shape).to(x.dtype)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=self.means.dtype, generator=generator) * self.variances[k].sqrt()
        return self.means[k] + torch.einsum("kde,ke->kd", self.rotations[k], z)


def ddpm_beta_schedules() -> list[str]:
    """The ``beta_schedule`` names the installed diffusers' ``DDPMScheduler`` implements (``laplace`` from
    diffusers 0.37), in a fixed order, so tests cover every schedule of whichever version runs them."""
    from diffusers import DDPMScheduler

    names = []
    for name in ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"):
        try:
            DDPMScheduler(num_train_timesteps=10, beta_schedule=name)
        except NotImplementedError:
            continue
        names.append(name)
    return names


def make_anisotropic_mixture(
    dim: int = 48,
    num_components: int = 5,
    scheduler_config: dict[str, Any] | None = None,
    prediction_type: str = "epsilon",
    std_range: tuple[float, float] = (0.02, 0.6),
    mean_scale: float = 1.0,
    seed: int = 0,
) -> AnisotropicGaussianMixtureDenoiser:
    """An oracle with anisotropic components: random rotations, per-direction stds log-uniform in ``std_range``.

    Means are ``mean_scale * N(0, I)``; weights uniform in [0.5, 1.5]; the schedule is the config's
    (default :data:`SD_SCHEDULER_CONFIG`).
    """
    g = torch.Generator().manual_seed(seed)
    means = mean_scale * torch.randn(num_components, dim, generator=g, dtype=torch.float64)
    rotations = torch.linalg.qr(torch.randn(num_components, dim, dim, generator=g, dtype=torch.float64))[0]
    lo, hi = math.log(std_range[0]), math.log(std_range[1])
    stds = torch.exp(lo + (hi - lo) * torch.rand(num_components, dim, generator=g, dtype=torch.float64))
    weights = 0.5 + torch.rand(num_components, generator=g, dtype=torch.float64)
    schedule = NoiseSchedule.from_config(scheduler_config or SD_SCHEDULER_CONFIG)
    return AnisotropicGaussianMixtureDenoiser(means, rotations, stds**2, weights, schedule, prediction_type)


def make_gaussian_mixture(
    dim: int = 64,
    num_components: int = 8,
    scheduler_config: dict[str, Any] | None = None,
    prediction_type: str = "epsilon",
    std_range: tuple[float, float] = (0.05, 0.3),
    seed: int = 0,
) -> GaussianMixtureDenoiser:
    """The standard oracle: ``num_components`` well-separated sharp components in ``dim`` dims.

    Means are drawn ``N(0, I)`` (so every coordinate has roughly unit scale and the components are far
    apart in ``dim`` dims); per-component stds are drawn uniformly in ``std_range``. The default schedule is Stable
    Diffusion's scaled-linear one (:data:`SD_SCHEDULER_CONFIG`).
    """
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_components, dim, generator=g, dtype=torch.float64)
    stds = std_range[0] + (std_range[1] - std_range[0]) * torch.rand(num_components, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(num_components, generator=g, dtype=torch.float64)
    schedule = NoiseSchedule.from_config(scheduler_config or SD_SCHEDULER_CONFIG)
    return GaussianMixtureDenoiser(means, stds, weights, schedule, prediction_type)


# ---------------------------------------------------------------------------------------------------
# tiny offline pipelines
# ---------------------------------------------------------------------------------------------------
def tiny_clip_tokenizer_and_encoder(hidden_size: int = 32, seed: int = 0):
    """A character-level CLIP tokenizer written to a temp dir and a random tiny ``CLIPTextModel``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    folder = Path(tempfile.mkdtemp(prefix="fastdiff-tok-"))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        projection_dim=hidden_size,
    )
    return tokenizer, CLIPTextModel(config).eval()


def tiny_vae():
    """A random-weight 2-level ``AutoencoderKL`` (4 latent channels, 2x down-sampling), in eval mode."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=16,
    ).eval()


def tiny_sdxl_pipeline(seed: int = 0):
    """A random-weight ``StableDiffusionXLPipeline`` (two CLIP text encoders, a text-time conditioned UNet at 8x8
    latents, Euler), offline."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    tokenizer, text_encoder = tiny_clip_tokenizer_and_encoder(hidden_size=32, seed=seed)
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(text_encoder.config).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=80, cross_attention_dim=64,
        norm_num_groups=16,
    ).eval()
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler.from_config(SD_SCHEDULER_CONFIG),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd_pipeline(seed: int = 0, sample_size: int = 16, block_channels: tuple[int, ...] = (32, 64)):
    """A random-weight ``StableDiffusionPipeline`` (UNet2DCondition + VAE + CLIP) built from configs, offline."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer, text_encoder = tiny_clip_tokenizer_and_encoder(seed=seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=block_channels, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=16,
    )
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(
        unet=unet.eval(), vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pixart_pipeline(seed: int = 0, sample_size: int = 8):
    """A random-weight ``PixArtAlphaPipeline`` (transformer + VAE + tiny T5) built from configs, offline."""
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=sample_size, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        in_channels=4, out_channels=8, caption_channels=32, cross_attention_dim=16, use_additional_conditions=False,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=16,
    )
    text_encoder = T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
    pipe = PixArtAlphaPipeline(
        tokenizer=_CharTokenizer(vocab_size=64), text_encoder=text_encoder.eval(), vae=vae.eval(),
        transformer=transformer.eval(), scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_ddpm_pipeline(seed: int = 0, sample_size: int = 8):
    """A random-weight unconditional ``DDPMPipeline`` (UNet2DModel) built from config."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=sample_size, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    pipe = DDPMPipeline(unet=unet.eval(), scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _CharTokenizer:
    """The slice of a HF tokenizer that ``PixArtAlphaPipeline.encode_prompt`` uses, char-level, offline."""

    model_max_length = 16

    def __init__(self, vocab_size: int = 64) -> None:
        self.vocab_size = vocab_size

    def _ids(self, text: str, max_length: int) -> list[int]:
        ids = [2 + (ord(c) % (self.vocab_size - 3)) for c in text.lower()][: max_length - 1] + [1]
        return ids + [0] * (max_length - len(ids))

    def __call__(self, text, padding=None, max_length=None, truncation=True, add_special_tokens=True,
                 return_tensors="pt", return_attention_mask=True, **kwargs):
        from transformers import BatchEncoding

        texts = [text] if isinstance(text, str) else list(text)
        length = max_length or self.model_max_length
        ids = torch.tensor([self._ids(t, length) for t in texts])
        return BatchEncoding({"input_ids": ids, "attention_mask": (ids != 0).long()})

    def batch_decode(self, ids, **kwargs) -> list[str]:
        return ["" for _ in ids]


def run_with_hooks(call: Callable[..., Any], handles: list[Any], step: dict[str, int] | None = None) -> Any:
    """``call()`` with torch hook ``handles`` in place, removed afterwards (also on error). With ``step``, the call
    gets ``callback_on_step_end`` that sets ``step["i"]`` to the index of the next denoiser step, so reference hooks
    written against a pipeline know which step they are in."""
    kwargs = {} if step is None else {"callback_on_step_end": lambda _p, i, _t, kw: step.update(i=i + 1) or kw}
    try:
        return call(**kwargs)
    finally:
        for handle in handles:
            handle.remove()
