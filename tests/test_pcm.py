"""Picard Consistency Model: the Picard update against the engine, model switching's exactness with every
method, the weight-space blend, checkpoint compatibility errors, the training seam and the shipped PCM."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import diffusers as d
import pytest
import torch

import fastdiff
from fastdiff.samplers.parallel import METHODS, sample_parallel
from fastdiff.samplers.pcm import (
    EMBEDDED_PCM_DIR,
    ModelSwitch,
    PicardConsistencyModel,
    digits_denoiser,
    load_embedded_pcm,
    pcm_metadata,
    picard_trajectories,
    picard_update,
    switch_lambdas,
)
from fastdiff.samplers.steps import draw_noise, sample_sequential, step_map_for
from fastdiff.testing import SD_SCHEDULER_CONFIG, make_gaussian_mixture

ORACLE = make_gaussian_mixture(dim=16, num_components=4)
OTHER = make_gaussian_mixture(dim=16, num_components=4, seed=3)  # a wrong "PCM": exactness must not depend on it


def _oracle_setup(kind: str, steps: int = 10, batch: int = 2):
    sched = (d.DDIMScheduler if kind == "ddim" else d.DDPMScheduler).from_config(SD_SCHEDULER_CONFIG)
    sched.set_timesteps(steps)
    sm = step_map_for(sched)
    x = torch.randn(batch, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = draw_noise(sm, tuple(x.shape), torch.Generator().manual_seed(1), dtype=x.dtype) if sm.stochastic else None
    return sm, x, noise, sample_sequential(sm, ORACLE, x, noise)


@pytest.fixture(scope="module")
def pipe():
    p = fastdiff.load_embedded_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def test_switch_lambdas():
    assert switch_lambdas("step", 2) == (1.0, 1.0)
    assert switch_lambdas("linear", 4) == (1.0, 0.75, 0.5, 0.25)
    assert switch_lambdas("cosine", 2) == pytest.approx((1.0, 0.5))
    assert switch_lambdas("linear", 0) == ()
    with pytest.raises(ValueError, match="schedule must be one of"):
        switch_lambdas("exp", 1)
    with pytest.raises(ValueError, match="switch_rounds"):
        switch_lambdas("step", -1)
    with pytest.raises(ValueError, match="space must be one of"):
        ModelSwitch(lambda lam: ORACLE, (1.0,), "latent")
    with pytest.raises(ValueError, match="lambdas must lie in"):
        ModelSwitch(lambda lam: ORACLE, (0.0,))
    with pytest.raises(TypeError, match="model_switch"):
        sm, x, noise, _ = _oracle_setup("ddim")
        sample_parallel(sm, ORACLE, x, model_switch=object())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_switch_keeps_tolerance_zero_exact(method, kind):
    sm, x, noise, ref = _oracle_setup(kind)
    for sw, window in ((ModelSwitch.feature(OTHER, "step", 2), sm.num_steps),
                       (ModelSwitch.feature(OTHER, "linear", 3), 4)):
        out, st = sample_parallel(sm, ORACLE, x, noise, method=method, window=window, tolerance=0.0, model_switch=sw)
        assert (out - ref).pow(2).mean().sqrt() <= 1e-10
        assert st.converged and st.switch_round == 1 + sw.switch_round  # switch rounds, then the base
    assert sample_parallel(sm, ORACLE, x, noise, method=method, tolerance=0.0)[1].switch_round is None


def test_feature_blend_calls_both_models():
    calls = []
    pcm = lambda u, t: calls.append("pcm") or 2 * ORACLE(u, t)  # noqa: E731
    base = lambda u, t: calls.append("base") or ORACLE(u, t)  # noqa: E731
    sw = ModelSwitch.feature(pcm, "linear", 2)
    u, t = torch.randn(3, 16, dtype=torch.float64), torch.full((3,), 500)
    assert torch.allclose(sw.denoiser(0, base)(u, t), 2 * ORACLE(u, t)) and calls == ["pcm"]
    assert torch.allclose(sw.denoiser(1, base)(u, t), 1.5 * ORACLE(u, t)) and calls[1:] == ["pcm", "base"]


def test_picard_update_matches_the_engine(pipe):
    """Eq. (1) on recorded iterates gives the next recorded iterate (the engine's Picard round) and fixes X*."""
    sched = d.DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(6)
    sm = step_map_for(sched)
    x, labels = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(5)), torch.tensor([1, 8])
    tr = picard_trajectories(sm, lambda lb: digits_denoiser(pipe, lb, 1.0), x, labels, rounds=3)
    assert tr.states.shape == (3, 2, 6, 1, 16, 16) and tr.reference.shape == (2, 7, 1, 16, 16)
    assert torch.equal(tr.states[:, :, 0], x[None].expand(3, -1, -1, -1, -1))
    den = digits_denoiser(pipe, labels.repeat_interleave(6), 1.0)
    k = torch.arange(6).repeat(2)
    smf = sm.to(dtype=torch.float32)

    def phi(X):
        return picard_update(smf, X, den(X.flatten(0, 1), smf.timesteps[k]).view_as(X))

    assert (phi(tr.reference[:, :6]) - tr.reference[:, 1:]).abs().max() < 1e-4
    for r in range(2):
        nxt = phi(tr.states[r])[:, :5]  # Phi(X^r) at points 1..5 = X^{r+1} at points 1..5
        assert (nxt - tr.states[r + 1][:, 1:]).abs().max() < 1e-4
    assert (tr.states[0] - tr.reference[:, :6]).abs().max() > 1e-2  # X^0 is not converged


def _perturbed_pcm(pipe, scale=1e-2):
    model = copy.deepcopy(pipe.transformer)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g) * p.std().nan_to_num(0.0))
    return PicardConsistencyModel(model, pcm_metadata(pipe.transformer, pipe.scheduler, grids=[("ddim", 4)]))


@pytest.mark.parametrize("space", ["feature", "weight"])
def test_parallel_sample_with_pcm_is_exact(pipe, space):
    pcm = _perturbed_pcm(pipe).with_options(schedule="linear", switch_rounds=2, space=space)
    kw = dict(num_inference_steps=8, guidance_scale=2.0, output_type="pt")
    ref = pipe([3, 5], generator=torch.Generator().manual_seed(0), **kw).images
    out = fastdiff.parallel_sample(pipe, [3, 5], generator=torch.Generator().manual_seed(0), pcm=pcm, method="newton",
                                   tolerance=0.0, **kw)
    assert (out.images - ref).abs().max() < 1e-4
    assert out.stats.switch_round == 4  # the pipeline's first call, two switching rounds, then the base
    if space == "weight":  # lambda = 0.5 in the second round: the blend holds the mean of the two weight sets
        for pb, pp, pw in zip(pipe.transformer.parameters(), pcm.model.parameters(), pcm._blend.parameters()):
            assert torch.allclose(pw, 0.5 * (pb + pp), atol=1e-6)


def _assert_checks_base(loaded, pipe) -> None:
    """``loaded.check_base`` accepts the right base and refuses changed weights and another beta schedule."""
    loaded.check_base(pipe.transformer, pipe.scheduler)  # the right base: no error
    other = copy.deepcopy(pipe.transformer)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="another base model"):
        loaded.check_base(other, pipe.scheduler)
    cosine = d.DDIMScheduler.from_config({**pipe.scheduler.config, "beta_schedule": "squaredcos_cap_v2"})
    with pytest.raises(ValueError, match="another noise schedule"):
        loaded.check_base(pipe.transformer, cosine)


def test_checkpoint_for_another_model_or_schedule(pipe, tmp_path):
    pcm = _perturbed_pcm(pipe)
    pcm.save_pretrained(tmp_path / "pcm")
    loaded = PicardConsistencyModel.from_pretrained(tmp_path / "pcm")
    _assert_checks_base(loaded, pipe)
    vpred = d.DDIMScheduler.from_config({**pipe.scheduler.config, "prediction_type": "v_prediction"})
    with pytest.raises(ValueError, match="prediction_type"):
        loaded.check_base(pipe.transformer, vpred)
    swapped = copy.copy(pipe)
    swapped.__dict__["scheduler"] = d.DDIMScheduler.from_config({**pipe.scheduler.config,
                                                                "beta_schedule": "squaredcos_cap_v2"})
    with pytest.raises(ValueError, match="another noise schedule"):
        fastdiff.parallel_sample(swapped, [1], num_inference_steps=4, pcm=tmp_path / "pcm")
    with pytest.raises(ValueError, match="not a PCM checkpoint"):
        PicardConsistencyModel.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="pcm must be"):
        fastdiff.parallel_sample(pipe, [1], num_inference_steps=4, pcm=3)


def test_training_seam_and_export(tmp_path):
    """``fastdiff.training.train`` with ``model.preset: digits_pcm``: eq. (2) is trained and exported."""
    from fastdiff.training.config import load_config
    from fastdiff.training.train import train

    cfg = load_config("digits_pcm", [
        f"output_dir={tmp_path}", "train.max_steps=2", "train.warmup_steps=1", "checkpoint.every=0",
        "log.every=1", "log.progress_bar=false"])
    cfg.model.config.update({"grids": [["ddim", 4]], "trajectories": [2], "rounds": 2, "points_per_step": 8,
                             "round_probs": [0.5, 0.5]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = train(cfg)
    assert summary["final_step"] == 2 and all(v > 0 for v in summary["losses"].values())
    pcm = PicardConsistencyModel.from_pretrained(tmp_path / "model")
    base = fastdiff.load_embedded_pipeline()
    pcm.check_base(base.transformer, base.scheduler)
    assert pcm.meta["grids"] == [["ddim", 4]] and pcm.meta["inference"]["switch_rounds"] == 1


def test_shipped_pcm(pipe):
    size = sum(f.stat().st_size for f in EMBEDDED_PCM_DIR.rglob("*") if f.is_file())  # with residual/
    assert size <= 10 * 2**20
    pcm = load_embedded_pcm()
    pcm.check_base(pipe.transformer, pipe.scheduler)
    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(99))
    out = fastdiff.parallel_sample(pipe, [4], num_inference_steps=10, latents=x, pcm="embedded", tolerance=0.0,
                                   output_type="pt")
    ref = pipe([4], num_inference_steps=10, latents=x, output_type="pt").images
    assert (out.images - ref).abs().max() < 1e-4 and out.stats.switch_round == 2 + pcm.switch_rounds


def test_readme_snippet():
    """The README's PCM snippet, as printed there."""
    import fastdiff

    pipe = fastdiff.load_embedded_pipeline()
    out = fastdiff.parallel_sample(pipe, [3, 7], num_inference_steps=25, pcm="embedded")
    print(out.stats.rounds, out.stats.switch_round)  # rounds in all; the first round on the base model alone
    assert out.stats.converged and out.stats.switch_round == 2 + load_embedded_pcm().switch_rounds
    assert len(out.images) == 2


@pytest.mark.parametrize("method", ["picard", "newton"])
def test_switch_round_is_the_picard_update(method):
    """With ``update="picard"`` a switching round is eq. (1) with the PCM's outputs, whatever the method;
    ``update="method"`` applies the method's own update instead (different for Newton)."""
    sm, x, noise, _ = _oracle_setup("ddim")
    K, B = sm.num_steps, x.shape[0]
    assert torch.all(sm.input_scale == 1)
    seen = []
    pcm = lambda u, t: seen.append((u, OTHER(u, t))) or seen[-1][1]  # noqa: E731
    first = ORACLE(x, sm.timesteps[:1].expand(B))
    runs = {}
    for update in ("picard", "method"):
        seen.clear()
        sw = dataclasses.replace(ModelSwitch.feature(pcm, "step", 1), update=update)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # stopped on purpose after the switching round
            runs[update], st = sample_parallel(sm, ORACLE, x, method=method, first_output=first, max_rounds=2,
                                               model_switch=sw)
        assert st.rounds == 2 and st.switch_round == 3 and len(seen) == 1  # warm start, PCM round
    u, out = (v.view(K - 1, B, -1) for v in seen[0])  # points 1..K-1 of X^0
    states = torch.cat([x[None], u]).transpose(0, 1)  # [B, K, 16]
    outputs = torch.cat([first[None], out]).transpose(0, 1)
    phi = picard_update(sm.to(dtype=x.dtype), states, outputs)
    assert (runs["picard"] - phi[:, -1]).abs().max() < 1e-10
    if method == "newton":
        assert (runs["method"] - phi[:, -1]).abs().max() > 1e-6
    with pytest.raises(ValueError, match="update must be one of"):
        ModelSwitch(lambda lam: OTHER, (1.0,), update="newton")


def test_base_check_is_cached_but_sees_changed_weights(pipe, monkeypatch):
    """The full weight hash runs once per base model; any later write to a base weight is still caught."""
    import fastdiff.samplers.pcm as pcm_mod

    pcm = _perturbed_pcm(pipe)
    base = copy.deepcopy(pipe.transformer)
    calls = []
    full = pcm_mod.fingerprint_module
    monkeypatch.setattr(pcm_mod, "fingerprint_module", lambda m: calls.append(1) or full(m))
    for _ in range(3):
        pcm.check_base(base, pipe.scheduler)
    assert len(calls) == 1
    weight = next(base.parameters())
    for change in ("inplace", "data", "load_state_dict"):
        edited = copy.deepcopy(base.state_dict())
        if change == "inplace":
            with torch.no_grad():
                weight.add_(1e-3)
        elif change == "data":  # bypasses the version counter: the norm probe catches it
            weight.data.mul_(1.01)
        else:
            edited[next(iter(edited))] = edited[next(iter(edited))] + 1e-3
            base.load_state_dict(edited)
        with pytest.raises(ValueError, match="another base model"):
            pcm.check_base(base, pipe.scheduler)
        base.load_state_dict(pipe.transformer.state_dict())  # restored: accepted again
        pcm.check_base(base, pipe.scheduler)


def test_training_options(tmp_path):
    """eq. (2)'s alpha(r) = 1 / sqrt(Var(r)) (normalised), round_probs, init from a PCM checkpoint, bad options."""
    from fastdiff.samplers.pcm import PCMTrainer

    tiny = {"grids": [["ddim", 4]], "trajectories": [2], "rounds": 3, "points_per_step": 8}
    t = PCMTrainer(tiny)
    loss = t.training_loss(None, None, None)
    data = t._cache[0]
    var = (data.states - data.reference[None, :, :-1]).pow(2).flatten(2).mean((1, 2)).clamp(min=1e-6)
    assert torch.allclose(data.alpha, var.rsqrt() / var.rsqrt().mean()) and data.alpha[-1] > data.alpha[0]
    assert loss.requires_grad and torch.isfinite(loss)
    assert torch.equal(PCMTrainer({**tiny, "round_weighting": "none"})._alpha(data), torch.ones(3))
    only0 = PCMTrainer({**tiny, "round_weighting": "none", "round_probs": [1, 0, 0]})
    only0._cache = [data]
    with torch.no_grad():  # round 0 only: the loss of X^0 alone
        sm, K = data.step_map.to(dtype=torch.float32), 4
        X = data.states[0]
        den = digits_denoiser(only0.pipe, data.labels.repeat_interleave(K), 1.0, only0.model)
        phi = picard_update(sm, X, den(X.flatten(0, 1), sm.timesteps[torch.arange(K).repeat(2)]).view_as(X))
        per = (phi - data.reference[:, 1:]).pow(2).flatten(1).mean(1)
        got = float(only0.training_loss(None, None, None))  # two trajectories drawn with replacement
        assert got in [pytest.approx(float(v), rel=1e-4) for v in (per[0], per[1], per.mean())]
    pcm = _perturbed_pcm(only0.pipe)
    pcm.save_pretrained(tmp_path / "pcm")
    cont = PCMTrainer({**tiny, "init": str(tmp_path / "pcm")})
    assert all(torch.equal(a, b) for a, b in zip(cont.model.state_dict().values(), pcm.model.state_dict().values()))
    for bad, match in (({"round_weighting": "sqrt"}, "round_weighting"), ({"round_probs": [1, 0]}, "round_probs"),
                       ({"round_probs": [0, 0, 0]}, "round_probs")):
        with pytest.raises(ValueError, match=match):
            PCMTrainer({**tiny, **bad})


# ------------------------------------------------------------------------------ iterate-residual PCM [fastdiff]
def _residual_pcm(pipe, layers=2, seed=0):
    """A residual PCM with random (non-zero) corrector weights after a perturbed jump PCM."""
    from fastdiff.samplers.pcm.residual import ResidualPCM, residual_metadata, residual_network

    jump = _perturbed_pcm(pipe)
    inner = residual_network(pipe.transformer, layers)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in inner.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    meta = residual_metadata(inner, pipe.transformer, pipe.scheduler, jump, "jump", 1.0, [("ddim", 4)], {},
                             {"jump_rounds": 1, "residual_rounds": 2})
    return ResidualPCM(jump, inner, meta)


def test_residual_network_starts_as_zero_correction(pipe):
    from fastdiff.samplers.pcm.residual import ResidualCorrector, residual_network

    inner = residual_network(pipe.transformer, 3)
    assert inner.config.in_channels == 2 and inner.config.num_layers == 3
    assert torch.equal(inner.pos_embed.proj.weight[:, :1], pipe.transformer.pos_embed.proj.weight)
    u = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    c = ResidualCorrector(inner, pipe.transformer)
    c.residual = torch.randn_like(u)
    e, t = pipe.encode_class_labels([1, 2, 3], 1, False), torch.tensor([900, 500, 20])
    base = pipe.transformer(u, encoder_hidden_states=e, timestep=t, return_dict=False)[0]
    assert torch.equal(c(u, encoder_hidden_states=e, timestep=t).sample, base)  # zero output projection
    with pytest.raises(ValueError, match="num_layers"):
        residual_network(pipe.transformer, 7)


def test_residual_correction_is_zero_at_rest_and_homogeneous(pipe):
    """(R1): no correction when the iterate did not move; the correction scales with the residual (c > 0)."""
    from fastdiff.samplers.pcm.residual import ResidualCorrector

    inner = _residual_pcm(pipe).inner
    u = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    rho = 0.1 * torch.randn_like(u)
    rho[1] = 0  # one item at rest
    e, t = pipe.encode_class_labels([1, 2, 3, 4], 1, False), torch.tensor([900, 500, 200, 20])
    base = pipe.transformer(u, encoder_hidden_states=e, timestep=t, return_dict=False)[0]
    c = ResidualCorrector(inner, pipe.transformer)
    outs = []
    for scale in (1.0, 3.0):
        c.residual = scale * rho
        outs.append(c(u, encoder_hidden_states=e, timestep=t, return_dict=False)[0] - base)
    assert torch.equal(outs[0][1], torch.zeros_like(outs[0][1]))
    assert outs[0].abs().amax((1, 2, 3))[[0, 2, 3]].min() > 1e-4  # a real correction elsewhere
    assert torch.allclose(outs[1], 3 * outs[0], atol=1e-5)
    only = ResidualCorrector(inner)  # the training form: the correction alone
    only.residual = rho
    assert torch.allclose(only(u, encoder_hidden_states=e, timestep=t).sample, outs[0], atol=1e-6)


@pytest.mark.parametrize("mode", ["switch", "accept"])
@pytest.mark.parametrize("method", ["picard", "newton"])
def test_parallel_sample_with_residual_pcm_is_exact(pipe, method, mode):
    rp = _residual_pcm(pipe).with_options(mode=mode)
    kw = dict(num_inference_steps=8, guidance_scale=2.0, output_type="pt")
    ref = pipe([3, 5], generator=torch.Generator().manual_seed(0), **kw).images
    out = fastdiff.parallel_sample(pipe, [3, 5], generator=torch.Generator().manual_seed(0), pcm=rp, method=method,
                                   tolerance=0.0, **kw)
    assert (out.images - ref).abs().max() < 1e-4
    # warm start, jump round, two corrector rounds ("switch"), then the base; "accept": corrected solver rounds
    assert out.stats.switch_round == (2 + 1 + 2 if mode == "switch" else 2 + 1)
    with pytest.raises(ValueError, match="mode must be one of"):
        rp.with_options(mode="both")


def test_residual_accept_mode_rounds():
    """mode "accept": the solver's first ``base_rounds`` rounds after the switch get rho = inputs minus the same
    point's previous inputs (none on the window's first point, whose input is converged), then the plain base."""
    from fastdiff.samplers.pcm.residual import ResidualSwitch

    sm, x, _, ref = _oracle_setup("ddim")
    B = x.shape[0]
    calls = []

    def corrected(rho):
        def f(u, t):
            calls.append((u.clone(), t.clone(), rho.clone()))
            return ORACLE(u, t) + 0.5 * rho
        return f

    base_calls = []
    base = lambda u, t: base_calls.append(1) or ORACLE(u, t)  # noqa: E731
    sw = ResidualSwitch(lambda lam: OTHER, (1.0,), corrected=corrected, jump_rounds=1, base_rounds=2)
    first = ORACLE(x, sm.timesteps[:1].expand(B))
    out, st = sample_parallel(sm, base, x, method="picard", tolerance=0.0, first_output=first, model_switch=sw)
    assert (out - ref).abs().max() < 1e-10 and st.switch_round == 3
    assert len(calls) == 2 and len(base_calls) == st.rounds - 4  # warm start, jump, two corrected rounds
    (u1, t1, r1), (u2, t2, r2) = calls
    assert torch.equal(r1[:B], torch.zeros_like(r1[:B])) and torch.equal(r2[:B], torch.zeros_like(r2[:B]))
    assert r1[B:].abs().max() > 0  # the jump moved the iterate
    for v in t2[B:].unique():  # round 2's residual: its inputs minus round 1's at the same timestep
        assert torch.equal(r2[t2 == v], u2[t2 == v] - u1[t1 == v][:B])  # (round 1's window is padded: last point x2)
    assert r1[-2 * B:-B].abs().max() > 0  # the last real point of the padded window is corrected too
    assert sw.base_phase(base) is not base
    assert ResidualSwitch(lambda lam: OTHER, (1.0,), corrected=corrected).base_phase(base) is base
    with pytest.raises(ValueError, match="base_rounds"):
        ResidualSwitch(lambda lam: OTHER, (1.0,), corrected=corrected, base_rounds=-1)


def test_residual_switch_feeds_the_last_update():
    """Round j >= jump_rounds gets rho = (inputs of round j) - (inputs of round j-1); a new solve starts afresh."""
    from fastdiff.samplers.pcm.residual import ResidualSwitch

    sm, x, _, ref = _oracle_setup("ddim")
    seen, rhos = [], []

    def jump(u, t):
        seen.append(u.clone())
        return OTHER(u, t)

    def corrected(rho):
        def f(u, t):
            seen.append(u.clone())
            rhos.append(rho.clone())
            return ORACLE(u, t) + 0.5 * rho  # any correction that vanishes at rest
        return f

    sw = ResidualSwitch(lambda lam: jump, (1.0, 1.0, 1.0), corrected=corrected, jump_rounds=1)
    first = ORACLE(x, sm.timesteps[:1].expand(x.shape[0]))
    for _ in range(2):
        seen.clear()
        rhos.clear()
        out, st = sample_parallel(sm, ORACLE, x, method="picard", tolerance=0.0, first_output=first, model_switch=sw)
        assert (out - ref).abs().max() < 1e-10 and st.switch_round == 5
        assert len(seen) == 3 and len(rhos) == 2
        assert torch.equal(rhos[0], seen[1] - seen[0]) and torch.equal(rhos[1], seen[2] - seen[1])
    with pytest.raises(ValueError, match="jump_rounds"):
        ResidualSwitch(lambda lam: jump, (1.0,), corrected=corrected, jump_rounds=2)
    with pytest.raises(TypeError, match="corrected"):
        ResidualSwitch(lambda lam: jump, (1.0,))


def test_residual_checkpoint_roundtrip_and_errors(pipe, tmp_path):
    from fastdiff.samplers.pcm import resolve_pcm
    from fastdiff.samplers.pcm.residual import ResidualPCM

    rp = _residual_pcm(pipe)
    rp.jump.save_pretrained(tmp_path / "r" / "jump")
    rp.save_pretrained(tmp_path / "r")
    loaded = resolve_pcm(tmp_path / "r")
    assert isinstance(loaded, ResidualPCM) and loaded.switch_rounds == 3
    for a, b in zip(loaded.inner.state_dict().values(), rp.inner.state_dict().values()):
        assert torch.allclose(a, b.half().float())  # stored in float16
    _assert_checks_base(loaded, pipe)
    _perturbed_pcm(pipe, scale=2e-2).save_pretrained(tmp_path / "r" / "jump")  # not the jump it was trained after
    with pytest.raises(ValueError, match="not the one this corrector was trained after"):
        ResidualPCM.from_pretrained(tmp_path / "r")
    with pytest.raises(ValueError, match="not a residual PCM"):
        ResidualPCM.from_pretrained(tmp_path / "r" / "jump")


def test_residual_training_loss_starts_at_the_base_round():
    """conditioning "residual": with the zero-initialised corrector, eq. (2)'s loss is the base Picard round's
    distance to X* from the cached iterates (X^1 = the jump PCM's round); it trains (non-zero gradient)."""
    from fastdiff.samplers.pcm import PCMTrainer

    t = PCMTrainer({"conditioning": "residual", "grids": [["ddim", 4]], "trajectories": [2], "rounds": 2,
                    "points_per_step": 8, "num_layers": 1, "round_weighting": "none", "round_probs": [1, 0]})
    loss = t.training_loss(None, None, None)
    data = t._cache[0]
    sm = data.step_map.to(dtype=torch.float32)
    phi = picard_update(sm, data.states[0], data.base_out[0])
    per = (phi - data.reference[:, 1:]).pow(2).flatten(1).mean(1)
    assert float(loss.detach()) in [pytest.approx(float(v), rel=1e-4) for v in (per[0], per[1], per.mean())]
    assert torch.equal(data.states[1][:, 1:], phi[:, :-1])  # X^2 = Phi(X^1; base)
    assert torch.equal(data.prev[1], data.states[0])
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in t.model.parameters())
    with pytest.raises(ValueError, match="conditioning"):
        PCMTrainer({"conditioning": "round"})



def test_residual_config_trains():
    """configs/digits_pcm_residual.yaml (the README's command) builds the residual trainer after the shipped PCM."""
    from fastdiff.samplers.pcm import PCMTrainer
    from fastdiff.training.config import load_config

    cfg = load_config("digits_pcm_residual", [])
    mc = {**cfg.model.config, "grids": [["ddim", 4]], "trajectories": [2], "rounds": 2, "points_per_step": 8,
          "round_probs": [0.5, 0.5]}
    assert cfg.model.preset == "digits_pcm" and mc["conditioning"] == "residual" and mc["jump"] == "embedded"
    t = PCMTrainer(mc)
    assert t.model.config.in_channels == 2 and t.model.config.num_layers == mc["num_layers"]
    loss = t.training_loss(None, None, None)
    assert torch.isfinite(loss) and loss.requires_grad
    meta = t.metadata()["training"]
    assert meta["conditioning"] == "residual" and meta["num_layers"] == mc["num_layers"]
