"""The fixed-point engine and the pipeline integration: exactness at tolerance 0, statistics, errors."""

from __future__ import annotations

import dataclasses
import warnings

import diffusers as d
import pytest
import torch
from diffusers.utils import BaseOutput

import fastdiff
from fastdiff.samplers.parallel import (
    METHODS,
    ParallelStats,
    block_ranking,
    linear_scan,
    sample_parallel,
    tolerance_scale,
)
from fastdiff.samplers.pipelines import ParallelPipelineOutput
from fastdiff.samplers.steps import NonFiniteLatentError, draw_noise, sample_sequential, step_map_for
from fastdiff.testing import (
    SD_SCHEDULER_CONFIG,
    make_gaussian_mixture,
    tiny_ddpm_pipeline,
    tiny_pixart_pipeline,
    tiny_sdxl_pipeline,
    tiny_vae,
)

SD = SD_SCHEDULER_CONFIG
ORACLE = make_gaussian_mixture(dim=16, num_components=4)


def _setup(make, steps, batch=3, seed=0):
    sched = make()
    sched.set_timesteps(steps)
    sm = step_map_for(sched)
    x = torch.randn(batch, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * sm.init_noise_sigma
    noise = draw_noise(sm, tuple(x.shape), torch.Generator().manual_seed(seed + 1), dtype=x.dtype)
    return sm, x, noise, sample_sequential(sm, ORACLE, x, noise)


SCHEDULERS = {
    "ddim": (lambda: d.DDIMScheduler(**SD), 12),
    "ddpm": (lambda: d.DDPMScheduler.from_config(SD), 14),
    "dpmpp_2m": (lambda: d.DPMSolverMultistepScheduler.from_config(SD), 10),
    "euler_ancestral": (lambda: d.EulerAncestralDiscreteScheduler.from_config(SD), 10),
}


# ------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sched", sorted(SCHEDULERS))
def test_tolerance_zero_reproduces_sequential(method, sched):
    sm, x, noise, ref = _setup(*SCHEDULERS[sched])
    for window, init in ((sm.num_steps, "gaussian"), (4, "copy")):
        out, stats = sample_parallel(sm, ORACLE, x, noise, method=method, window=window, tolerance=0.0, init=init)
        assert (out - ref).pow(2).mean().sqrt() <= 1e-10, (window, init)
        assert stats.converged and stats.rounds <= sm.num_steps


@pytest.mark.parametrize("method", METHODS)
def test_progress_reports_accepted_steps_up_to_all(method):
    sm, x, noise, ref = _setup(*SCHEDULERS["ddpm"])
    seen = []
    out, stats = sample_parallel(sm, ORACLE, x, noise, method=method, window=4, tolerance=0.0, progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == sm.num_steps and 0 < len(seen) <= stats.host_syncs
    assert (out - ref).pow(2).mean().sqrt() <= 1e-10


def test_parallel_sample_shows_the_pipelines_progress_bar(capsys):
    pipe = tiny_ddpm_pipeline()
    pipe.set_progress_bar_config(disable=False)
    fastdiff.parallel_sample(pipe, batch_size=1, num_inference_steps=6, window=3, tolerance=0.0,
                             generator=torch.Generator().manual_seed(0), output_type="pt")
    err = capsys.readouterr().err
    assert "parallel newton: steps accepted" in err and "6/6" in err


def test_tolerance_zero_with_a_pipeline_warm_start():
    sm, x, noise, ref = _setup(*SCHEDULERS["ddpm"])
    first = ORACLE(x, sm.timesteps[0])
    out, stats = sample_parallel(sm, ORACLE, x, noise, method="newton", window=5, tolerance=0.0, first_output=first)
    assert (out - ref).abs().max() <= 1e-10
    assert stats.rounds <= sm.num_steps


def test_async_windows_give_the_same_result():
    sm, x, noise, ref = _setup(*SCHEDULERS["ddim"])
    out, stats = sample_parallel(sm, ORACLE, x, noise, method="picard", window=5, tolerance=0.0, sync_every=3)
    assert (out - ref).abs().max() <= 1e-10
    assert stats.host_syncs < stats.rounds


# ------------------------------------------------------------------------------------------- statistics
def test_statistics_count_rounds_and_evaluations():
    sm, x, noise, ref = _setup(*SCHEDULERS["ddim"])
    K = sm.num_steps
    # a window of one point is sequential sampling: K rounds, K evaluations
    out, st = sample_parallel(sm, ORACLE, x, noise, method="picard", window=1, tolerance=0.0)
    assert (st.rounds, st.model_evals) == (K, K) and (out - ref).abs().max() <= 1e-12
    # an infinite tolerance accepts every window at once: ceil(K / W) rounds, K evaluations
    for method in ("picard", "jacobi", "newton"):
        _, st = sample_parallel(sm, ORACLE, x, noise, method=method, window=5, tolerance=1e9)
        assert (st.rounds, st.model_evals) == (-(-K // 5), K), method
    # GS-Jacobi evaluates two initial guesses on a block's first sweep
    _, st = sample_parallel(sm, ORACLE, x, noise, method="gs_jacobi", window=5, tolerance=1e9)
    assert (st.rounds, st.model_evals) == (-(-K // 5), 2 * K)
    # exact mode: every window evaluation is counted, and rounds never exceed K
    _, st = sample_parallel(sm, ORACLE, x, noise, method="jacobi", window=K, tolerance=0.0)
    assert st.rounds == K and st.model_evals == sum(K - b for b in range(K))
    assert st.round_speedup == 1.0 and st.as_dict()["rounds"] == K


def test_newton_converges_in_few_rounds():
    """The regression guard for the headline result (rms <= 1e-3 vs sequential, DDIM-50, one window)."""
    sm, x, noise, ref = _setup(lambda: d.DDIMScheduler(**SD), 50, batch=4)
    out, st = sample_parallel(sm, ORACLE, x, noise, method="newton", window=50, tolerance=0.3)
    assert (out - ref).pow(2).mean().sqrt() <= 1e-3
    assert st.rounds <= 4 and st.converged
    out, st_p = sample_parallel(sm, ORACLE, x, noise, method="picard", window=50, tolerance=0.1)
    assert (out - ref).pow(2).mean().sqrt() <= 1e-3 and st_p.rounds > st.rounds


def test_max_rounds_stops_early_and_says_so():
    sm, x, noise, _ = _setup(*SCHEDULERS["ddpm"])
    with pytest.warns(UserWarning, match=r"max_rounds=3 before converging") as record:
        _, st = sample_parallel(sm, ORACLE, x, noise, method="jacobi", window=4, tolerance=0.0, max_rounds=3)
    assert st.rounds == 3 and not st.converged
    assert len(record) == 1 and f"rms update {st.residual:.3g}" in str(record[0].message)
    # GS-Jacobi's per-block budget is the other cap that can end a solve early
    with pytest.warns(UserWarning, match=r"block_iters=1 before converging"):
        _, st = sample_parallel(sm, ORACLE, x, noise, method="gs_jacobi", window=7, tolerance=1e-9, block_iters=1)
    assert not st.converged
    with warnings.catch_warnings():  # a converged run is silent, also when max_rounds was given
        warnings.simplefilter("error")
        _, st = sample_parallel(sm, ORACLE, x, noise, method="jacobi", window=4, tolerance=0.0, max_rounds=100)
    assert st.converged


def test_parallel_sample_warns_when_max_rounds_stops_it():
    pipe = tiny_ddpm_pipeline()
    with pytest.warns(UserWarning, match=r"max_rounds=2 before converging"):
        out = fastdiff.parallel_sample(pipe, batch_size=1, num_inference_steps=8, window=3, tolerance=0.0,
                                       max_rounds=2, output_type="pt")
    assert not out.stats.converged and out.stats.rounds == 2


def test_linear_scan_matches_the_recurrence():
    g = torch.Generator().manual_seed(0)
    J = torch.rand(150, 3, generator=g, dtype=torch.float64) * 1.5
    c = torch.randn(150, 3, 4, generator=g, dtype=torch.float64)
    d_prev, ref = torch.zeros(3, 4, dtype=torch.float64), []
    for i in range(150):
        d_prev = J[i][:, None] * d_prev + c[i]
        ref.append(d_prev)
    assert torch.allclose(linear_scan(J, c, chunk=16), torch.stack(ref), rtol=1e-9, atol=1e-9)
    assert torch.allclose(linear_scan(None, c), c.cumsum(0))


def test_tolerance_scale_and_block_ranking():
    sm, *_ = _setup(*SCHEDULERS["ddim"])
    scale = tolerance_scale(sm)
    assert scale.shape == (sm.num_steps,) and bool((scale > 0).all())
    crm = block_ranking(sm, 4)
    assert crm.shape == (3,) and float(crm.max()) == 1.0


# ------------------------------------------------------------------------------------------- errors
def test_clear_errors():
    sm, x, noise, _ = _setup(*SCHEDULERS["ddpm"])
    with pytest.raises(ValueError, match="window"):
        sample_parallel(sm, ORACLE, x, noise, window=0)
    with pytest.raises(ValueError, match="tolerance"):
        sample_parallel(sm, ORACLE, x, noise, tolerance=-0.1)
    with pytest.raises(ValueError, match="method must be one of"):
        sample_parallel(sm, ORACLE, x, noise, method="anderson")
    with pytest.raises(ValueError, match="stochastic"):
        sample_parallel(sm, ORACLE, x, None)
    with pytest.raises(ValueError, match="NaN"):
        sample_parallel(sm, ORACLE, x * float("nan"), noise)


def test_clear_errors_name_the_argument():
    """issue 17 item 12: each mistake is named before (or at) the first round, never a deep failure."""
    sched = d.DDPMScheduler.from_config(SD)
    sched.set_timesteps(6)
    sm = step_map_for(sched)
    x = torch.randn(2, 16, dtype=torch.float64)
    noise = draw_noise(sm, tuple(x.shape), torch.Generator().manual_seed(0), dtype=x.dtype)
    for bad in (sched, None):
        with pytest.raises(TypeError, match=r"step_map must be a fastdiff StepMap .*step_map_for"):
            sample_parallel(bad, ORACLE, x, noise)
    with pytest.raises(TypeError, match="denoiser must be callable"):
        sample_parallel(sm, "model", x, noise)
    calls = []

    def learned_sigma(u, t):  # returns [n*B, 2C]: the variance channels were not dropped
        calls.append(u.shape[0])
        return torch.cat([ORACLE(u, t), ORACLE(u, t)], 1)

    with pytest.raises(ValueError, match=r"denoiser returned \(\d+, 32\) for model input of shape \(\d+, 16\)"):
        sample_parallel(sm, learned_sigma, x, noise, window=3)
    assert len(calls) == 1  # at the first round
    with pytest.raises(ValueError, match="denoiser returned"):  # same numel, wrong layout
        sample_parallel(sm, lambda u, t: ORACLE(u, t).reshape(-1, 2, 8), x, noise)
    bad_noise = noise.clone()
    bad_noise[4, 1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"noise \(the pre-drawn step noise\) contains NaN") as err:
        sample_parallel(sm, ORACLE, x, bad_noise)
    assert not isinstance(err.value, NonFiniteLatentError)
    with pytest.raises(ValueError, match=r"noise must be a tensor of shape \(6, 2, 16\)"):
        sample_parallel(sm, ORACLE, x, noise[:3])
    for option, value in (("tolerance", True), ("max_rounds", True), ("sync_every", True), ("window", True),
                          ("data_variance", 0.0), ("block_iters", float("nan"))):
        with pytest.raises(ValueError, match=f"{option} must be"):
            sample_parallel(sm, ORACLE, x, noise, **{option: value})


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_latents_stop_and_report_the_step(method):
    sm, x, noise, _ = _setup(*SCHEDULERS["ddim"])
    first_bad = int((sm.timesteps < 400).nonzero()[0])

    def broken(u, t):
        out = ORACLE(u, t)
        return torch.where((t < 400).reshape(-1, *([1] * (u.ndim - 1))), out * float("inf"), out)

    with pytest.raises(NonFiniteLatentError, match=f"step {first_bad}") as err:
        sample_parallel(sm, broken, x, noise, method=method, window=5, tolerance=0.1)
    assert err.value.step == first_bad and err.value.stats.rounds > 0


# ------------------------------------------------------------------------------------------- pipelines
def _same(pipe, tol=1e-5, parallel=None, **kwargs):
    torch.manual_seed(1)  # DiT's loop draws the scheduler's noise from the global generator
    ref = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.manual_seed(1)
    out = fastdiff.parallel_sample(pipe, **kwargs, generator=torch.Generator().manual_seed(0), output_type="pt",
                                   tolerance=0.0, **(parallel or {}))
    assert (torch.as_tensor(out.images) - torch.as_tensor(ref)).abs().max() <= tol
    return out


def test_sd_pipeline_with_cfg_and_a_stochastic_scheduler(sd_pipe):
    out = _same(sd_pipe, prompt="a cat", num_inference_steps=5, guidance_scale=5.0, guidance_rescale=0.3,
                height=16, width=16, parallel={"method": "newton", "window": 3})
    assert out.stats.rounds <= 5 and out.stats.method == "newton"
    sd_pipe.scheduler = d.EulerAncestralDiscreteScheduler.from_config(sd_pipe.scheduler.config)
    _same(sd_pipe, prompt=["a cat", "dog"], num_inference_steps=4, guidance_scale=3.0, height=16, width=16,
          parallel={"window": 4})
    # the pipeline object is left as it was
    assert len(sd_pipe.scheduler.timesteps) == 4 and "step" not in vars(sd_pipe.scheduler)


def test_return_dict_false_gives_the_outputs_tuple(sd_pipe):
    kwargs = dict(num_inference_steps=3, height=16, width=16, output_type="pt", window=3)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    images, stats = fastdiff.parallel_sample(sd_pipe, "a cat", return_dict=False, generator=gen(), **kwargs)
    assert images.shape == (1, 3, 16, 16) and isinstance(stats, ParallelStats) and stats.rounds >= 1
    out = fastdiff.parallel_sample(sd_pipe, "a cat", generator=gen(), **kwargs)
    assert torch.equal(out.images, images) and out.stats == stats and out.nsfw_content_detected is None


def test_parallel_sample_returns_an_output_dataclass():
    """issue 17 item 15: stats is a field of a diffusers BaseOutput, not an attribute stuck on the output."""
    pipe = tiny_ddpm_pipeline()
    out = fastdiff.parallel_sample(pipe, batch_size=1, num_inference_steps=4, window=2, output_type="np")
    assert isinstance(out, ParallelPipelineOutput) and isinstance(out, BaseOutput)
    assert list(out.keys()) == ["images", "stats"] and out["stats"] is out.stats and out["images"] is out.images
    assert out.to_tuple() == (out.images, out.stats) and "stats=ParallelStats(" in repr(out)
    assert dataclasses.is_dataclass(out) and out.stats.converged
    # the pipeline's positional arguments and return_dict=False pass through
    images, stats = fastdiff.parallel_sample(pipe, 1, None, 4, "np", False, window=2)
    assert images.shape == out.images.shape and stats.num_steps == 4


def test_pixart_and_ddpm_pipelines():
    _same(tiny_pixart_pipeline(), prompt="a cat", num_inference_steps=5, use_resolution_binning=False, height=16,
          width=16, parallel={"window": 2})
    _same(tiny_ddpm_pipeline(), batch_size=2, num_inference_steps=8, parallel={"method": "gs_jacobi", "window": 4})


def test_sdxl_pipeline():
    _same(tiny_sdxl_pipeline(), prompt="a cat", num_inference_steps=4, guidance_scale=4.0, parallel={"window": 2})


def test_dit_pipeline_doubled_state_and_stochastic_noise():
    pipe = _tiny_dit()
    _same(pipe, class_labels=[1, 7], num_inference_steps=4, guidance_scale=3.0, parallel={"window": 4})
    pipe.scheduler = d.DDPMScheduler.from_config(pipe.scheduler.config)
    _same(pipe, class_labels=[3], num_inference_steps=5, guidance_scale=1.0, parallel={"window": 3})


def test_digits_pipeline():
    from fastdiff.models.digits import build_digits_pipeline

    pipe = build_digits_pipeline({"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8,
                                  "cross_attention_dim": 16, "caption_channels": 16})
    pipe.set_progress_bar_config(disable=True)
    out = _same(pipe, class_labels=[0, 3], num_inference_steps=6, guidance_scale=2.0,
                parallel={"method": "newton", "window": 3})
    assert out.stats.model_evals >= 6
    # step callbacks run once, after the solve, on the final latents; what they return is used
    seen = []

    def zero(p, i, t, kwargs):
        seen.append((i, int(t), kwargs["latents"].clone()))
        return {"latents": torch.zeros_like(kwargs["latents"])}

    gen = torch.Generator().manual_seed(0)
    out = fastdiff.parallel_sample(pipe, [0, 3], num_inference_steps=6, generator=gen, output_type="pt",
                                   tolerance=0.0, callback_on_step_end=zero)
    assert [(i, t) for i, t, _ in seen] == [(0, int(pipe.scheduler.timesteps[0]))]
    ref = pipe([0, 3], num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert ((seen[0][2].float() / 2 + 0.5).clamp(0, 1) - ref).abs().max() <= 1e-5  # the final latents
    assert bool((out.images == 0.5).all())


def test_pipeline_errors(sd_pipe):
    with pytest.raises(ValueError, match="supported pipelines"):
        fastdiff.parallel_sample(object())
    with pytest.raises(ValueError, match="window"):
        fastdiff.parallel_sample(sd_pipe, "a cat", window=0)
    with pytest.raises(ValueError, match="tolerance"):
        fastdiff.parallel_sample(sd_pipe, "a cat", tolerance=-1.0)
    for option in ("tolerance", "max_rounds"):
        with pytest.raises(ValueError, match=f"{option} must be"):
            fastdiff.parallel_sample(sd_pipe, "a cat", **{option: True})
    sd_pipe.scheduler = d.PNDMScheduler.from_config(sd_pipe.scheduler.config)
    with pytest.raises(ValueError, match="PNDMScheduler.*supported schedulers: .*DDIMScheduler"):
        fastdiff.parallel_sample(sd_pipe, "a cat")


# ------------------------------------------------------------------------------------------- tiny pipelines
@pytest.fixture
def sd_pipe():
    from fastdiff.testing import tiny_sd_pipeline

    return tiny_sd_pipeline()


def _tiny_dit():
    torch.manual_seed(0)
    transformer = d.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000,
    ).eval()
    pipe = d.DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=d.DDIMScheduler(**SD))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_no_autograd_graph_across_rounds():
    sm, x, noise, _ = _setup(*SCHEDULERS["ddim"])
    weight = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
    out, _ = sample_parallel(sm, lambda u, t: weight * ORACLE(u, t), x, noise, method="newton", window=4)
    ref = sample_sequential(sm, lambda u, t: weight * ORACLE(u, t), x, noise)
    assert not out.requires_grad and not ref.requires_grad


def test_default_method_and_tolerance():
    sm, x, noise, ref = _setup(*SCHEDULERS["ddpm"])
    out, stats = sample_parallel(sm, ORACLE, x, noise)
    assert (stats.method, stats.tolerance) == ("newton", 1e-4) and stats.converged
    assert (out - ref).pow(2).mean().sqrt() <= 1e-3
    _, stats = sample_parallel(sm, ORACLE, x, noise, method="picard")
    assert stats.tolerance == 0.1
