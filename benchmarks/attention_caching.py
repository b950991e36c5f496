"""Caching across sampling steps: fastdiff's cache (and its parts) against every peer, on both embedded models.

Claim under test (issue 11): on the embedded digits transformer (PixArt) and the embedded digits UNet
(UNet2DConditionModel), fastdiff's cache has the Pareto front of MACs saved vs fidelity to the uncached
samples: at 30 / 40 / 50 % MACs saved its best setting is closer to the uncached samples (FD-digits between
cached and uncached samples from the same noise) than every peer's best setting at the same or a higher
saving, with class accuracy within 0.01 of uncached at 40 %, and wall-time savings within 5 points of the
MACs savings.

Every config samples the same labels from the same initial noise (guidance 2, CFG on, DDIM); measured per
config: MACs per image (``fastdiff.studies.count_macs`` on the denoiser; MACs = FLOPs / 2; matmuls,
convolutions, attention), the sampling thread's CPU time of the quality run (``time.thread_time``, one torch
thread), FD-digits to the uncached samples, per-sample rms to the uncached samples, FD-digits to the data and
class accuracy (``fastdiff.metrics.evaluate_samples``). The front (fastdiff's and the peers' best at 30 / 40 /
50 % MACs saved, by FD and by rms) is then timed A/B-interleaved (``fastdiff.studies.measure.interleaved_seconds``:
rounds that time every front setting and the uncached run once each, medians of wall and thread-CPU time).
Peers: DeepCache (PyPI ``DeepCache``, UNet only; its ``DeepCacheSDHelper`` reads the timestep from the second
positional argument, the digits pipeline passes it by keyword, so a 3-line subclass reads it from there),
diffusers' PyramidAttentionBroadcast / FasterCache / FirstBlockCache / TaylorSeer / MagCache hooks (through
``fastdiff.studies.diffusers_cache``; TaylorSeer swept over interval, order 1 / 2 and warm-up / cool-down;
MagCache with the ratios of its own calibration mode on the calibration run, swept over its threshold; a
run that raises is recorded with its error), and the ``tgate`` package (its loaders patch the StableDiffusion
/ SDXL / PixArt pipeline classes; the digits pipelines are neither, so fastdiff's TGATE, checked against it to
2.5e-14, stands in; recorded). fastdiff's calibrated schedules are calibrated on other noise and labels than
the evaluation run.

    OMP_NUM_THREADS=1 python benchmarks/attention_caching.py                 # both models
    OMP_NUM_THREADS=1 python benchmarks/attention_caching.py --models unet   # one model (merged into the JSON)
    OMP_NUM_THREADS=1 python benchmarks/attention_caching.py --wall-only     # re-time the recorded front (idle machine)
    python benchmarks/attention_caching.py --quick                           # smoke test
    python benchmarks/attention_caching.py --sd-like                         # + the TGATE cost runs on an SD-like UNet
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import (
    DDIMScheduler,
    FasterCacheConfig,
    FirstBlockCacheConfig,
    PyramidAttentionBroadcastConfig,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

import fastdiff
from fastdiff.caching import disable_cache, disable_tgate, enable_cache, enable_tgate
from fastdiff.caching.engine import Action
from fastdiff.caching.tgate import SelfAttnSchedule, tgate_actions
from fastdiff.metrics import evaluate_samples
from fastdiff.studies.caching import diffusers_cache, magcache_ratios
from fastdiff.studies.measure import count_macs, flop_counter, interleaved_seconds
from fastdiff.testing import SD_SCHEDULER_CONFIG, tiny_clip_tokenizer_and_encoder

RESULTS = Path(__file__).parent / "results"
# TGATE drops classifier-free guidance after the gate, so the digits runs need CFG on: guidance 2, as in the
# first measurements (the embedded model's default guidance is lower and may switch CFG off).
DIGITS_GUIDANCE = 2.0
COND_WEIGHTS = (1.0, 2.0)
PROMPT = "a photograph of an astronaut riding a horse"

SD15_UNET: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}  # fmt: skip
SD_LIKE_UNET = {**SD15_UNET, "sample_size": 32, "block_out_channels": (64, 128, 256, 256), "cross_attention_dim": 256}
CONTEXT_TOKENS = 77


# ----------------------------------------------------------------------------------------------------
# measuring


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``(result, wall seconds, CPU seconds of this thread)``."""
    wall, cpu = time.perf_counter(), time.thread_time()
    out = fn()
    return out, time.perf_counter() - wall, time.thread_time() - cpu


def reduction(value: float, reference: float) -> float:
    return round(1 - value / reference, 4)


# ----------------------------------------------------------------------------------------------------
# the SD-like pipeline


def sd_like_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD-1.5's UNet layout at CPU size, a 2-layer CLIP text encoder with a 77-token context, DDIM."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer, _ = tiny_clip_tokenizer_and_encoder()
    tokenizer.model_max_length = CONTEXT_TOKENS
    torch.manual_seed(seed)
    width = SD_LIKE_UNET["cross_attention_dim"]
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CONTEXT_TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=16,
    ).eval()  # unused: runs return latents, the decoder costs the same with or without caching
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**SD_LIKE_UNET).eval(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd15_macs() -> dict[str, float]:
    """Per-step MACs of the full-size SD-1.5 UNet (64x64 latents, 77 tokens), counted on the meta device.

    A step before the gate runs the CFG batch of 2; a step after it runs batch 1 without its ``attn2`` layers
    (TGATE skips exactly those modules' forward), so both are counted from one batch-1 and one batch-2 pass.
    """
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET).eval()
    counts = {}
    for batch in (1, 2):
        x = torch.empty(batch, 4, 64, 64, device="meta")
        ctx = torch.empty(batch, CONTEXT_TOKENS, 768, device="meta")
        with flop_counter() as counter, torch.no_grad():
            unet(x, 500, encoder_hidden_states=ctx)
        flops = counter.get_flop_counts()
        cross = sum(sum(v.values()) for k, v in flops.items() if k.endswith(".attn2"))
        counts[batch] = (counter.get_total_flops() / 2, cross / 2)
    return {"cfg_step_macs": counts[2][0], "gated_step_macs": counts[1][0] - counts[1][1],
            "cross_attention_share": counts[1][1] / counts[1][0]}


def step_kind(step: int, gate: int | None, v2: bool) -> str:
    """What a denoising step runs: the CFG batch or the gated half batch, with or without self-attention."""
    if gate is None:
        return "cfg"
    cross, self_attn = tgate_actions(step, gate, SelfAttnSchedule() if v2 else None)
    return ("gated" if cross is Action.REUSE else "cfg") + ("+self-attn-reused" if self_attn is Action.REUSE else "")


def per_step_macs(pipe: StableDiffusionPipeline, call: Callable[..., Any]) -> list[float]:
    """MACs of the UNet at every step of one run (read from the counter at each step's end)."""
    marks: list[float] = []
    name = type(pipe.unet).__name__

    def mark(_pipe, _i, _t, kwargs):
        marks.append(sum(counter.get_flop_counts().get(name, {}).values()) / 2)
        return kwargs

    with flop_counter() as counter:
        call(callback_on_step_end=mark)
    return [b - a for a, b in zip([0.0] + marks[:-1], marks)]


def bench_sd_like(steps_and_gates: dict[int, list[int]], timed_gates: dict[int, list[int]], headline: list[tuple[int, int]],
                  repeats: int, self_attn_gate: int | None) -> dict:
    """MACs of every config and wall / CPU time of the ``timed_gates`` ones (the ``headline`` (steps, gate)
    pairs and their uncached runs ``repeats`` times, interleaved with the rest).

    MACs are counted per step in the 25-step uncached, gate-10 and TGATE-V2 runs. Every step before the gate
    and every step after it runs the same shapes, so other gates' MACs are composed from the counted per-step
    values; ``composition_max_rel_error`` checks the composition against the counted totals.
    """
    pipe = sd_like_pipeline()
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))

    def call(steps: int) -> Callable[..., Any]:
        return lambda **kw: pipe(PROMPT, num_inference_steps=steps, latents=latents.clone(), guidance_scale=7.5,
                                 output_type="latent", **kw)

    def configure(gate: int | None, v2: bool) -> None:
        disable_tgate(pipe)
        if gate is not None:
            enable_tgate(pipe, gate, self_attn={} if v2 else None)

    call(25)()  # warm-up
    counted = {}
    for config in ((25, None, False), (25, 10, False)) + (((25, self_attn_gate, True),) if self_attn_gate else ()):
        configure(*config[1:])
        counted[config] = per_step_macs(pipe, call(config[0]))
    full_step, gated_step = counted[(25, None, False)][0], counted[(25, 10, False)][-1]

    def composed(steps: int, gate: int | None) -> float:
        gate = steps if gate is None else gate
        return gate * full_step + (steps - gate) * gated_step

    def macs(steps: int, gate: int | None, v2: bool) -> tuple[float, str]:
        if (steps, gate, v2) in counted:
            return sum(counted[(steps, gate, v2)]), "counted"
        return composed(steps, gate), "composed from counted per-step MACs"

    composition_error = max(abs(sum(v) / composed(s, g) - 1) for (s, g, v2), v in counted.items() if not v2)

    configs = []
    for steps, gates in steps_and_gates.items():
        configs += [(steps, None, False)] + [(steps, g, False) for g in gates]
        if self_attn_gate is not None and steps == 25:
            configs.append((steps, self_attn_gate, True))
    is_timed = {c: c[1] is None and c[0] in timed_gates or c[1] in timed_gates.get(c[0], []) for c in configs}
    repeated = {c for c in configs if (c[0], c[1]) in headline or (c[1] is None and any(c[0] == h[0] for h in headline))}
    times: dict[tuple, list[tuple[float, float]]] = {c: [] for c in configs}
    step_times: dict[str, list[float]] = {}  # denoising step durations by kind (step_kind)
    for rep in range(repeats):  # interleaved, so slow spells of a shared machine hit every config alike
        for config in configs:
            if is_timed[config] and (rep == 0 or config in repeated):
                configure(*config[1:])
                stamps = [time.process_time()]  # CPU time: a time-sliced step is not charged for its waits
                stamp = lambda _p, _i, _t, kw: stamps.append(time.process_time()) or kw  # noqa: E731, B023
                times[config].append(timed(lambda: call(config[0])(callback_on_step_end=stamp))[1:])  # noqa: B023
                steps, gate, v2 = config
                for i, dt in enumerate(b - a for a, b in zip(stamps[1:-1], stamps[2:])):  # step 0 also encodes text
                    step_times.setdefault(step_kind(i + 1, gate, v2), []).append(dt)
    disable_tgate(pipe)
    # The fastest of many steps of a kind is its cost on an idle core: robust to a shared machine's bursts.
    fastest = {kind: min(v) for kind, v in step_times.items()}

    def step_time_estimate(steps: int, gate: int | None, v2: bool) -> float | None:
        kinds = [step_kind(i, gate, v2) for i in range(steps)]
        return sum(fastest[k] for k in kinds) if all(k in fastest for k in kinds) else None

    runs = []
    for (steps, gate, v2), samples in times.items():
        ref = (steps, None, False)
        total, source = macs(steps, gate, v2)
        run = {"method": "uncached" if gate is None else ("tgate-v2" if v2 else "tgate"), "steps": steps,
               "gate_step": gate, "gmacs_per_image": round(total / 1e9, 2),
               "macs_reduction": reduction(total, macs(*ref)[0]), "macs_source": source}
        if samples:
            wall, cpu = min(s[0] for s in samples), min(s[1] for s in samples)
            ref_wall, ref_cpu = min(s[0] for s in times[ref]), min(s[1] for s in times[ref])
            run.update({"wall_s_per_image": round(wall, 3), "cpu_s_per_image": round(cpu, 3),
                        "wall_reduction": reduction(wall, ref_wall), "cpu_reduction": reduction(cpu, ref_cpu),
                        "wall_s_all": [round(s[0], 3) for s in samples], "cpu_s_all": [round(s[1], 3) for s in samples]})
        estimate = step_time_estimate(steps, gate, v2)
        if estimate is not None:
            run.update({"step_time_estimate_s": round(estimate, 3),
                        "step_time_estimate_reduction": reduction(estimate, step_time_estimate(*ref))})
        runs.append(run)
    return {
        "pipeline": "StableDiffusionPipeline, SD-1.5 UNet layout at CPU size, random weights",
        "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in SD_LIKE_UNET.items()},
        "unet_params_m": round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 1),
        "context_tokens": CONTEXT_TOKENS, "guidance_scale": 7.5, "images_per_call": 1, "repeats": repeats,
        "per_step_gmacs": {"cfg_step": round(full_step / 1e9, 3), "gated_step": round(gated_step / 1e9, 3)},
        "composition_max_rel_error": composition_error,
        "fastest_step_seconds": {k: round(v, 4) for k, v in fastest.items()},
        "step_samples": {k: len(v) for k, v in step_times.items()},
        "timing": "wall_s_per_image: output_type='latent' (text encoder + denoising loop), min over repeats; "
                  "runs without it were not timed. step_time_estimate_s: the sum over the run's steps of the fastest "
                  "(process CPU time) step of the same kind (CFG / gated, self-attention reused or not) seen in "
                  "any timed run (denoising only); the steadier number on a shared machine",
        "runs": runs,
    }  # fmt: skip


def sd15_table(steps_and_gates: dict[int, list[int]]) -> dict:
    per_step = sd15_macs()
    rows = []
    for steps, gates in steps_and_gates.items():
        full = steps * per_step["cfg_step_macs"]
        for gate in gates:
            total = gate * per_step["cfg_step_macs"] + (steps - gate) * per_step["gated_step_macs"]
            rows.append({"steps": steps, "gate_step": gate, "tmacs_uncached": round(full / 1e12, 2),
                         "tmacs_tgate": round(total / 1e12, 2), "macs_reduction": reduction(total, full)})
    return {"model": "UNet2DConditionModel, SD-1.5 config, 64x64 latents, 77 tokens, batch 1 + CFG",
            "per_step": {k: round(v / 1e9, 2) if k.endswith("macs") else round(v, 4) for k, v in per_step.items()},
            "units": "per_step in GMACs", "rows": rows}


# ----------------------------------------------------------------------------------------------------
# the embedded digits models: configs


class DigitsDeepCacheHelper:
    """DeepCache's ``DeepCacheSDHelper`` with the timestep read from the ``timestep`` keyword (3 lines differ)."""

    def __new__(cls, pipe):
        from DeepCache import DeepCacheSDHelper

        class Helper(DeepCacheSDHelper):
            def wrap_unet_forward(self):
                self.function_dict["unet_forward"] = self.pipe.unet.forward

                def wrapped_forward(*args, **kwargs):
                    t = kwargs["timestep"].reshape(-1)[0].item()
                    self.cur_timestep = list(self.pipe.scheduler.timesteps).index(t)
                    return self.function_dict["unet_forward"](*args, **kwargs)

                self.pipe.unet.forward = wrapped_forward

        return Helper(pipe=pipe)


@dataclasses.dataclass
class Config:
    name: str
    family: str  # "reference" | "fastdiff" | "peer"
    part: str  # what it exercises
    enable: Callable[[Any], Any] | None = None  # returns an undo callable (or None: disable_cache does it)
    noise_seed: int = 0
    guidance: float | None = None


def fastdiff_configs(kind: str, cal: Any, steps: int, full: bool, cal_all: Any = None) -> list[Config]:
    """fastdiff's settings: each part alone, the forecast order and schedule swept, then combinations aimed at the
    30 / 40 / 50 % savings. ``Nn_cK`` = uniform interval n with the last K steps computed (``cooldown``)."""
    feats = "deep" if kind == "unet" else "blocks"
    c: list[Config] = []

    def add(name: str, part: str, **kw: Any) -> None:
        c.append(Config(name, "fastdiff", part, lambda pipe, kw=kw: enable_cache(pipe, **kw)))

    gate = steps * 2 // 5
    c.append(Config(f"tgate gate {gate} guidance residual", "fastdiff", "tgate+residual",
                    lambda p: enable_tgate(p, gate, guidance="residual")))
    add("guidance residual k=2", "guidance", features=None, guidance="residual", guidance_interval=2)
    if full:
        add("guidance residual k=3", "guidance", features=None, guidance="residual", guidance_interval=3)
    # every block (transformer) / DeepCache's branch 0 (UNet): order and schedule
    tag = "all blocks" if kind == "transformer" else feats
    span = {"blocks": (0, 6)} if kind == "transformer" else {}
    for n, orders in ((2, (0, 1, 2)), (3, (1, 2))):
        for order in orders if full else (order for order in orders if order != 1):
            add(f"{tag} N={n} order {order}", f"{feats}+order{order}", interval=n, order=order, forecast="newton", **span)
    for n, cool in ((2, 2), (3, 2), (3, 3)) if full else ((2, 2), (3, 2)):
        add(f"{tag} N={n} cooldown {cool} order 2", f"{feats}+order2+cooldown", interval=n, cooldown=cool, order=2,
            forecast="newton", **span)
    if kind == "unet":  # the shallow blocks' part: the same schedules without it
        for n, cool in ((2, 2), (3, 3)) if full else ((2, 2),):
            add(f"{tag} N={n} cooldown {cool} order 2 shallow off", f"{feats}+order2+cooldown-shallow", interval=n,
                cooldown=cool, order=2, forecast="newton", shallow=False)
    if full:
        add(f"{tag} N=2 cooldown 2 order 2 taylor", f"{feats}+order2(taylor)+cooldown", interval=2, cooldown=2,
            order=2, forecast="taylor", **span)
        add(f"{tag} N=2 cooldown 2 order 1", f"{feats}+order1+cooldown", interval=2, cooldown=2, order=1, **span)
        for cool, k in ((2, 2), (0, 2), (2, 3), (0, 3)):  # towards 50 %: cond-only CFG steps on top of the features
            add(f"{tag} N=2 cooldown {cool} order 2 + guidance residual k={k}", "combined", interval=2, cooldown=cool,
                order=2, forecast="newton", guidance="residual", guidance_interval=k, **span)
        calibrated = cal_all if kind == "transformer" else cal
        for r in (0.45, 0.55):
            add(f"{tag} cal. {r} cooldown 2 order 2", f"{feats}+schedule+order2", calibration=calibrated, reuse=r,
                cooldown=2, order=2, forecast="newton", **span)
    return c


def peer_configs(kind: str, steps: int, full: bool, mag_ratios: Callable[[], list[float]] | None = None) -> list[Config]:
    """Every peer that runs on the model: DeepCache (UNet) and diffusers' hooks (through
    :func:`fastdiff.studies.caching.diffusers_cache`), TaylorSeer swept over interval, order and warm-up /
    cool-down (its ``disable_cache_before_step`` / ``disable_cache_after_step``), MagCache with the ratios of its
    own calibration mode (``mag_ratios()``, on the calibration labels and noise) swept over its threshold."""
    from diffusers import MagCacheConfig, TaylorSeerCacheConfig

    c: list[Config] = []

    def diffusers_peer(name: str, make: Callable[[Any], Any]) -> None:
        def enable(p, make=make):
            context = diffusers_cache(p, make)
            context.__enter__()
            return lambda: context.__exit__(None, None, None)
        c.append(Config(name, "peer", "diffusers", enable))

    if kind == "unet":
        for n in ((2, 3, 4) if full else (2,)):
            def deepcache(p, n=n):
                helper = DigitsDeepCacheHelper(p)
                helper.set_params(cache_interval=n, cache_branch_id=0)
                helper.enable()
                return helper.disable
            c.append(Config(f"DeepCache N={n}", "peer", "DeepCache (PyPI)", deepcache))
    diffusers_peer("diffusers PAB", lambda ts: PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, cross_attention_block_skip_range=4,
        spatial_attention_timestep_skip_range=(100, 800), cross_attention_timestep_skip_range=(100, 800),
        current_timestep_callback=ts))
    faster = (("FasterCache", (-1, 681), (-1, 781), 5), ("FasterCache wide", (-1, 901), (-1, 901), 5))
    for name, spatial, uncond, skip in faster if full and kind == "transformer" else faster[:1]:
        diffusers_peer(f"diffusers {name}", lambda ts, spatial=spatial, uncond=uncond, skip=skip: FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=spatial,
            current_timestep_callback=ts, attention_weight_callback=lambda _: 0.3,
            unconditional_batch_skip_range=skip, unconditional_batch_timestep_skip_range=uncond, tensor_format="BCHW"))
    for th in ((0.1, 0.2) if full and kind == "transformer" else (0.1,)):
        diffusers_peer(f"diffusers FirstBlockCache {th}", lambda ts, th=th: FirstBlockCacheConfig(threshold=th))
    # UNet blocks return tuples TaylorSeer cannot forecast: its modules there are the resnets, samplers and mid block
    blocks = (r"(down_blocks|up_blocks)\.\d+\.(resnets|downsamplers|upsamplers)\.\d+|mid_block" if kind == "unet"
              else r"transformer_blocks\.\d+")
    sweep = [(2, 1, 2, None), (3, 1, 2, None), (2, 2, 2, None), (3, 2, 2, None), (2, 2, 1, 2), (3, 2, 1, 2)]
    for n, order, before, cool in sweep if full else sweep[:1]:
        after = None if cool is None else steps - cool
        name = f"diffusers TaylorSeer N={n} order {order} warmup {before}" + (f" cooldown {cool}" if cool else "")
        diffusers_peer(name, lambda ts, n=n, order=order, before=before, after=after: TaylorSeerCacheConfig(
            cache_interval=n, disable_cache_before_step=before, disable_cache_after_step=after, max_order=order,
            taylor_factors_dtype=torch.float32, cache_identifiers=[blocks]))
    if kind == "unet":
        diffusers_peer("diffusers TaylorSeer defaults", lambda ts: TaylorSeerCacheConfig(taylor_factors_dtype=torch.float32))
    if mag_ratios is not None:  # defaults: max_skip_steps 3, retention_ratio 0.2; threshold 0.06 is the default
        for th in ((0.06, 0.12, 0.24) if full and kind == "transformer" else (0.06,)):
            diffusers_peer(f"diffusers MagCache {th}", lambda ts, th=th: MagCacheConfig(
                threshold=th, mag_ratios=mag_ratios(), num_inference_steps=steps))
    return c


# ----------------------------------------------------------------------------------------------------
# the embedded digits models: measuring


def load_model(kind: str) -> tuple[Any, str]:
    from fastdiff.models import digits

    try:
        pipe = digits.load_embedded_pipeline() if kind == "transformer" else digits.load_embedded_unet_pipeline()
        weights = "embedded (trained)"
    except FileNotFoundError as err:  # weights not shipped yet: cost numbers stay valid, quality ones do not
        print(f"warning: {err}; using random weights", file=sys.stderr)
        pipe = digits.build_digits_pipeline() if kind == "transformer" else digits.build_digits_unet_pipeline()
        weights = "random (embedded weights missing: quality figures meaningless)"
    pipe.set_progress_bar_config(disable=True)
    return pipe, weights


class Bench:
    """One embedded model with its evaluation noise and labels, its calibrations and every config to measure."""

    def __init__(self, kind: str, num_images: int, steps: int, full: bool = True) -> None:
        self.kind, self.steps = kind, steps
        self.pipe, self.weights = load_model(kind)
        self.labels = torch.arange(num_images) % 10
        self.noises = [torch.randn(num_images, 1, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
        # calibration on other noise and labels than the evaluation run
        self.cal_labels = (torch.arange(10) * 3 + 1) % 10
        cal_noise = torch.randn(10, 1, 16, 16, generator=torch.Generator().manual_seed(7))
        call = dict(latents=cal_noise, output_type="pt")
        self.cal = fastdiff.calibrate_cache(self.pipe, self.cal_labels, steps, DIGITS_GUIDANCE, **call)
        cal_all = None if kind == "unet" else fastdiff.calibrate_cache(  # every block's residual
            self.pipe, self.cal_labels, steps, DIGITS_GUIDANCE, blocks=(0, 6), **call)
        self.configs = [Config("uncached", "reference", "-"),
                        Config("uncached, noise seed 1", "reference", "chance spread", noise_seed=1)][: 2 if full else 1]
        @functools.cache  # MagCache's calibration, run once when a MagCache setting is first enabled
        def mag_ratios() -> list[float]:
            return magcache_ratios(self.pipe, lambda: self.pipe(self.cal_labels, steps, DIGITS_GUIDANCE, **call), steps)

        self.configs += fastdiff_configs(kind, self.cal, steps, full, cal_all) + peer_configs(kind, steps, full, mag_ratios)

    def sample(self, cfg: Config, n: int) -> torch.Tensor:
        return self.pipe(self.labels[:n], self.steps, cfg.guidance or DIGITS_GUIDANCE,
                         latents=self.noises[cfg.noise_seed][:n], output_type="pt").images

    def enabled(self, cfg: Config) -> Callable[[], None]:
        """Enable ``cfg`` on the pipeline; returns what disables it again."""
        undo = cfg.enable(self.pipe) if cfg.enable else None

        def disable() -> None:
            if callable(undo):
                undo()
            disable_cache(self.pipe)
        return disable

    def by_name(self, names: list[str]) -> list[Config]:
        known = {c.name: c for c in self.configs}
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"no such {self.kind} settings: {missing}")
        return [known[n] for n in names]


def bench_model(kind: str, num_images: int, steps: int, full: bool, macs_images: int = 2,
                only: list[str] | None = None, wall_images: int = 32, wall_repeats: int = 5) -> dict:
    bench = Bench(kind, num_images, steps, full)
    pipe, denoiser, labels = bench.pipe, bench.pipe.denoiser, bench.labels
    configs = bench.configs
    if only:
        configs = [c for c in configs if c.name == "uncached" or c.name in only]

    rows, ref = [], {}
    for cfg in configs:
        row: dict[str, Any] = {"name": cfg.name, "family": cfg.family, "part": cfg.part}
        disable = None
        try:
            disable = bench.enabled(cfg)
            macs = count_macs(lambda: bench.sample(cfg, macs_images), denoiser) / macs_images  # noqa: B023
            images, _, cpu = timed(lambda: bench.sample(cfg, num_images))  # noqa: B023
        except Exception as err:  # a peer that does not run on this model: record why
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
            continue
        finally:
            if disable is not None:
                disable()
            disable_cache(pipe)
        metrics = evaluate_samples(images, labels, metric="digits")
        if cfg.name == "uncached":
            ref = {"images": images, "macs": macs, "cpu": cpu}
        to_ref = 0.0 if cfg.name == "uncached" else evaluate_samples(images, reference=ref["images"], metric="digits").fd
        rms = (images - ref["images"]).pow(2).flatten(1).mean(1).sqrt().mean().item()
        row.update({
            "gmacs_per_image": round(macs / 1e9, 4), "macs_saved": reduction(macs, ref["macs"]),
            "cpu_s_per_image": round(cpu / num_images, 4), "cpu_saved": reduction(cpu, ref["cpu"]),
            "fd_to_uncached": round(to_ref, 4), "rms_to_uncached": round(rms, 5), "fd_to_data": round(metrics.fd, 3),
            "accuracy": round(metrics.accuracy, 4),
        })  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    deep_check = deepcache_agreement(pipe, steps) if kind == "unet" else None
    section = {
        "pipeline": f"{type(pipe).__name__} ({type(denoiser).__name__} + class tokens), DDIM {steps} steps",
        "weights": bench.weights, "num_images": num_images, "steps": steps, "guidance_scale": DIGITS_GUIDANCE,
        "macs_counted_on": f"{macs_images} images, per image", "fd_metric": "FD-digits (64-d DigitsFeatureNet features)",
        "timing": f"cpu_saved: this thread's CPU time of the quality run ({num_images} images, 1 thread), once per "
                  "config; the front's wall and CPU times are measured A/B-interleaved in 'wall' (see wall_times)",
        "calibration": {"labels": bench.cal_labels.tolist(), "noise_seed": 7, "feature_rate": bench.cal.feature_rate,
                        "guidance_rate": bench.cal.guidance_rate, "mid_timesteps": bench.cal.mid_timesteps},
        "fastdiff_vs_deepcache_package": deep_check,
        "tgate_package": "not run: tgate 1.0.0's loaders (TgateSDLoader, TgatePixArtAlphaLoader, ...) patch those "
                         "diffusers pipeline classes; the digits pipelines are neither. fastdiff's TGATE matches it to "
                         "2.5e-14 on SD / SDXL / PixArt (issue 11)",
        "runs": rows,
    }  # fmt: skip
    section["targets"] = targets(section)
    if wall_repeats:
        section["wall"] = wall_times(bench, front_names(section), wall_images, wall_repeats)
    return section


def front_names(section: dict) -> list[str]:
    """The settings on the front: fastdiff's and the peers' best at 30 / 40 / 50 %, by FD and by rms."""
    names: list[str] = []
    for entry in section["targets"].values():
        if isinstance(entry, dict) and "fastdiff_best" in entry:
            for key in ("fastdiff_best", "peer_best", "fastdiff_best_rms", "peer_best_rms"):
                if entry.get(key) and entry[key]["name"] not in names:
                    names.append(entry[key]["name"])
    return names


def wall_times(bench: Bench, names: list[str], num_images: int, repeats: int) -> dict:
    """Wall and thread-CPU time of ``names`` and the uncached run, A/B-interleaved (one untimed round, then
    ``repeats`` rounds, each timing every setting once), medians; savings next to the MACs saved."""
    known = {c.name for c in bench.configs}
    configs = bench.by_name(["uncached"] + [n for n in names if n != "uncached" and n in known])
    undo: dict[str, Callable[[], None]] = {}
    fns = {c.name: (lambda c=c: bench.sample(c, num_images)) for c in configs}
    by_name = {c.name: c for c in configs}
    times = interleaved_seconds(fns, repeats=repeats, warmup=1,
                                setup=lambda name: undo.__setitem__(name, bench.enabled(by_name[name])),
                                teardown=lambda name: undo.pop(name)())
    macs, kept = {}, {}  # recounted with the current counter (CPU attention included), so MACs and time match
    for c in configs:
        disable = bench.enabled(c)
        try:
            macs[c.name], kept[c.name] = kept_megabytes(  # one counted run gives both
                lambda c=c: count_macs(lambda: bench.sample(c, 1), bench.pipe.denoiser))
        finally:
            disable()
    ref = times["uncached"]
    rows = {}
    for name, t in times.items():
        rows[name] = {"macs_saved": reduction(macs[name], macs["uncached"]), "kept_mb_per_image": kept[name],
                      "wall_s": round(t["wall_median"], 4), "cpu_s": round(t["cpu_median"], 4),
                      "wall_saved": reduction(t["wall_median"], ref["wall_median"]),
                      "cpu_saved": reduction(t["cpu_median"], ref["cpu_median"]),
                      "wall_saved_range": [reduction(max(t["wall"]), ref["wall_median"]),
                                           reduction(min(t["wall"]), ref["wall_median"])],
                      "wall_saved_per_round": [reduction(x, r) for x, r in zip(t["wall"], ref["wall"])],
                      "wall_s_all": [round(x, 3) for x in t["wall"]], "cpu_s_all": [round(x, 3) for x in t["cpu"]]}
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "not_retimed": [n for n in names if n not in known],  # recorded rows of settings no longer swept
            "num_images": num_images, "repeats": repeats, "threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "method": "A/B-interleaved rounds (every setting once per round, each round starting one setting later "
                      "than the last, after one untimed round), median; "
                      "wall: time.perf_counter, cpu: time.thread_time of the sampling thread; wall_saved_range: "
                      "the slowest and fastest round against the uncached median; wall_saved_per_round: each round "
                      "against that round's uncached run; macs_saved: recounted here (1 image + CFG, "
                      "fastdiff.studies.measure.count_macs, CPU attention included); kept_mb_per_image: the peak "
                      "MB of values fastdiff's feature cache keeps during a 1-image run (null: none kept)",
            "runs": rows}


def kept_megabytes(sample: Callable[[], Any]) -> tuple[Any, float | None]:
    """``sample()``'s result and the peak megabytes of the values fastdiff's feature cache keeps (its per-module
    histories) meanwhile; ``None`` when it keeps none (uncached, TGATE, peers)."""
    from fastdiff.caching import features
    from fastdiff.caching.engine import tensors_of

    histories: dict[int, Any] = {}
    peak = [0]
    push = features.History.push

    def watched(self, *args):
        push(self, *args)
        histories[id(self)] = self
        total = sum(x.numel() * x.element_size() for h in histories.values() for _, _, v in h.entries
                    for x in tensors_of(v))
        peak[0] = max(peak[0], total)

    features.History.push = watched
    try:
        out = sample()
    finally:
        features.History.push = push
    return out, (round(peak[0] / 2**20, 3) if histories else None)


def deepcache_agreement(pipe: Any, steps: int) -> dict | None:
    """fastdiff's deep-feature reuse (uniform N, branch 0) against the DeepCache package, same noise: max |diff|."""
    try:
        import DeepCache  # noqa: F401
    except ImportError:
        return None
    noise = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    out = {}
    for n in (2, 3):
        helper = DigitsDeepCacheHelper(pipe)
        helper.set_params(cache_interval=n, cache_branch_id=0)
        helper.enable()
        theirs = pipe([1, 2, 3, 4], steps, DIGITS_GUIDANCE, latents=noise, output_type="pt").images
        helper.disable()
        enable_cache(pipe, interval=n, order=0)  # DeepCache serves the kept features as they are
        ours = pipe([1, 2, 3, 4], steps, DIGITS_GUIDANCE, latents=noise, output_type="pt").images
        disable_cache(pipe)
        out[f"N={n}"] = float((ours - theirs).abs().max())
    return {"max_abs_diff_images": out}


# ----------------------------------------------------------------------------------------------------
# the front, targets, table, plot


def best_at(rows: list[dict], family: str, level: float, key: str = "fd_to_uncached") -> dict | None:
    ok = [r for r in rows if r["family"] == family and key in r and r["macs_saved"] >= level]
    return min(ok, key=lambda r: r[key], default=None)


FIELDS = ("name", "macs_saved", "fd_to_uncached", "rms_to_uncached", "accuracy")


def targets(section: dict) -> dict:
    """The front at 30 / 40 / 50 % MACs saved: fastdiff's best setting at >= that saving against every peer's,
    judged on FD-digits to the uncached samples (the issue's target) and, as the steadier check, on per-sample rms."""
    rows = section["runs"]
    ref = next(r for r in rows if r["name"] == "uncached")
    out: dict[str, Any] = {"judged_on": "fd_to_uncached (target); rms_to_uncached reported beside it (steadier)"}
    for level in (0.3, 0.4, 0.5):
        entry: dict[str, Any] = {}
        for key, suffix in (("fd_to_uncached", ""), ("rms_to_uncached", "_rms")):
            ours, peer = best_at(rows, "fastdiff", level, key), best_at(rows, "peer", level, key)
            entry[f"fastdiff_best{suffix}"] = ours and {k: ours[k] for k in FIELDS}
            entry[f"peer_best{suffix}"] = peer and {k: peer[k] for k in FIELDS}
            entry[f"met{suffix}"] = bool(ours) and (peer is None or ours[key] < peer[key])
        if level == 0.4 and entry["fastdiff_best"]:
            entry["accuracy_uncached"] = ref["accuracy"]
            entry["accuracy_within_0.01"] = abs(entry["fastdiff_best"]["accuracy"] - ref["accuracy"]) <= 0.01
        out[f"front_at_{int(level * 100)}pct"] = entry
    return out


def macs_saved_by_name(section: dict) -> dict[str, float]:
    """MACs saved per setting: the sweep's, replaced by the wall timing's recount where there is one (the same
    counter as the timed runs)."""
    macs = {r["name"]: r["macs_saved"] for r in section["runs"] if "macs_saved" in r}
    wall = section.get("wall") or {"runs": {}}
    macs.update({name: t["macs_saved"] for name, t in wall["runs"].items() if "macs_saved" in t})
    return macs


def timing_targets(section: dict) -> dict | None:
    """Wall / CPU savings of the interleaved front timing against the MACs saved (target: within 5 points)."""
    wall = section.get("wall")
    if not wall:
        return None
    macs = macs_saved_by_name(section)
    gaps = {name: {"macs_saved": macs[name], "wall_saved": t["wall_saved"], "cpu_saved": t["cpu_saved"],
                   "gap_wall": round(macs[name] - t["wall_saved"], 4), "gap_cpu": round(macs[name] - t["cpu_saved"], 4)}
            for name, t in wall["runs"].items() if name in macs and name != "uncached"}
    fastdiff = [g for n, g in gaps.items() if next(r for r in section["runs"] if r["name"] == n)["family"] == "fastdiff"]
    return {"per_setting": gaps,
            "fastdiff_max_gap_wall": max((g["gap_wall"] for g in fastdiff), key=abs, default=None),
            "fastdiff_max_gap_cpu": max((g["gap_cpu"] for g in fastdiff), key=abs, default=None),
            "met_wall": all(abs(g["gap_wall"]) <= 0.05 for g in fastdiff),
            "met_cpu": all(abs(g["gap_cpu"]) <= 0.05 for g in fastdiff)}


def markdown(result: dict) -> str:
    lines = []
    for model, section in result["models"].items():
        lines += [f"### {model}: {section['pipeline']}, {section['weights']}, {section['num_images']} images", "",
                  "| family | setting | MACs saved | CPU saved | FD to uncached | rms to uncached | FD to data | acc |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in section["runs"]:
            if "error" in r:
                lines.append(f"| {r['family']} | {r['name']} | fails: {r['error'][:90]} | | | | | |")
                continue
            lines.append(f"| {r['family']} | {r['name']} | {100 * r['macs_saved']:.1f} % | {100 * r['cpu_saved']:.1f} % | "
                         f"{r['fd_to_uncached']:.4f} | {r['rms_to_uncached']:.5f} | {r['fd_to_data']:.2f} | "
                         f"{r['accuracy']:.3f} |")
        wall = section.get("wall")
        if wall:
            macs = macs_saved_by_name(section)
            lines += ["", f"Front settings timed A/B-interleaved ({wall['num_images']} images, {wall['repeats']} rounds, "
                      f"median, {wall['threads']} thread, load average {wall['load_average']}, {wall['date']}):", "",
                      "| setting | MACs saved | wall saved | wall saved, rounds | thread-CPU saved | wall s | CPU s | "
                      "kept MB / image |", "|---|---|---|---|---|---|---|---|"]
            for name, t in wall["runs"].items():
                spread = t.get("wall_saved_range")
                spread = f"{100 * spread[0]:.1f} to {100 * spread[1]:.1f} %" if spread else ""
                lines.append(f"| {name} | {100 * macs.get(name, 0):.1f} % | {100 * t['wall_saved']:.1f} % | {spread} | "
                             f"{100 * t['cpu_saved']:.1f} % | {t['wall_s']:.2f} | {t['cpu_s']:.2f} | "
                             f"{t.get('kept_mb_per_image', 'not measured') or '-'} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, (model, section) in zip(axes[0], models.items()):
        for family, style in (("fastdiff", dict(c="tab:blue", marker="o")), ("peer", dict(c="tab:red", marker="s"))):
            rows = [r for r in section["runs"] if r["family"] == family and "fd_to_uncached" in r]
            ax.scatter([100 * r["macs_saved"] for r in rows], [max(r["fd_to_uncached"], 1e-3) for r in rows],
                       label=family, **style)
            for r in rows:
                ax.annotate(r["name"], (100 * r["macs_saved"], max(r["fd_to_uncached"], 1e-3)), fontsize=5, alpha=0.7)
        ax.set_yscale("log")
        ax.set_xlabel("MACs saved (%)")
        ax.set_ylabel("FD-digits to uncached samples (log)")
        ax.set_title(f"{model} ({section['weights'].split(' (')[0]}), {section['steps']} DDIM steps")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: few images, one setting per part")
    parser.add_argument("--models", nargs="+", default=["transformer", "unet"], choices=["transformer", "unet"])
    parser.add_argument("--num-images", type=int, default=None, help="samples per config (default 32)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="run only these settings (and uncached); their rows replace those of the existing JSON")
    parser.add_argument("--wall-only", action="store_true",
                        help="only re-measure wall / CPU time of the recorded front settings (interleaved) into the JSON")
    parser.add_argument("--wall-images", type=int, default=32, help="images per timed run (default 32)")
    parser.add_argument("--wall-repeats", type=int, default=5, help="interleaved timing rounds (default 5; 0: none)")
    parser.add_argument("--sd-like", action="store_true", help="also the TGATE cost runs on an SD-like UNet (slow)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "attention_caching.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    num_images = args.num_images or (8 if args.quick else 32)
    start = time.perf_counter(), time.thread_time()
    result: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.wall_only:
        missing = [k for k in args.models if "runs" not in result.get("models", {}).get(k, {})]
        if missing:
            raise SystemExit(f"--wall-only re-times recorded settings: {args.out} has no results for {missing}")
        for kind in args.models:
            section = result["models"][kind]
            bench = Bench(kind, args.wall_images, section["steps"], full=True)
            section["wall"] = wall_times(bench, front_names(section), args.wall_images, max(args.wall_repeats, 1))
            section["timing_targets"] = timing_targets(section)
            print(json.dumps({kind: section["timing_targets"]}, indent=1), flush=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(markdown(result))
        return result
    result.update({
        "benchmark": "attention_caching",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                   "gpu": "none: no GPU was lent to this session; every number is CPU",
                   "note": "a 2-core machine shared with other jobs: wall time swings; thread-CPU time is the steadier"},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "fastdiff": fastdiff.__version__},
    })  # fmt: skip
    result.setdefault("models", {})
    result.pop("digits", None)  # the v1 layout
    result.pop("targets", None)
    result["sd15_full_size_macs"] = sd15_table({25: [5, 10, 15, 20], 50: [10, 25, 40]})
    if args.sd_like:
        result["sd_like"] = bench_sd_like({25: [5, 10, 15, 20]}, {25: [5, 10, 15, 20]}, [(25, 10)], 1, self_attn_gate=10)
    for kind in args.models:
        section = bench_model(kind, num_images, args.steps, full=not args.quick, only=args.only,
                              wall_images=min(args.wall_images, num_images), wall_repeats=args.wall_repeats)
        if args.only and kind in result["models"]:  # merge: the new rows replace same-named ones
            old = result["models"][kind]
            new_rows = {r["name"]: r for r in section["runs"] if r["name"] != "uncached"}
            old_uncached = next(r for r in old["runs"] if r["name"] == "uncached")
            for r in new_rows.values():  # savings relative to this run's own uncached, side by side
                r["rerun"] = {"date": result["date"], "uncached_in_rerun": next(x for x in section["runs"]
                                                                                if x["name"] == "uncached")}
            old["runs"] = [r for r in old["runs"] if r["name"] not in new_rows] + list(new_rows.values())
            old["runs"][0] = old_uncached
            old["targets"] = targets(old)
            section = old
        section["timing_targets"] = timing_targets(section)
        section["date"] = result["date"]
        result["models"][kind] = section
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")  # after each model: a partial run keeps its part
    result["runtime_s"] = {"wall": round(time.perf_counter() - start[0], 1), "cpu": round(time.thread_time() - start[1], 1)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    plot(result, args.out.with_suffix(".png"))
    print(markdown(result))
    print(json.dumps({k: v["targets"] for k, v in result["models"].items()}, indent=1))
    return result


if __name__ == "__main__":
    main()
