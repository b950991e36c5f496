"""TarFlow inversion: Jacobi / GS-Jacobi against the sequential reference, CRM / IGM, strategies, errors."""

import math

import pytest
import torch
from test_flows_tarflow import tiny_flow

from fastdiff.flows.sampling import (
    BlockStrategy,
    NonFiniteFlowError,
    auto_strategy,
    calibrate,
    invert,
    sample,
    segment_bounds,
)

LABELS = torch.tensor([0, 1, 2, 3])


@pytest.fixture(scope="module")
def flow():
    return tiny_flow()


@pytest.fixture(scope="module")
def noise():
    return torch.randn(4, 16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _rms(a, b):
    return float((a - b).pow(2).mean().sqrt())


@pytest.mark.parametrize("guidance", [0.0, 2.0])
@pytest.mark.parametrize("method, num_segments, init", [
    ("jacobi", 1, "noise"), ("gs_jacobi", 2, "zeros"), ("gs_jacobi", 5, "noise"), ("gs_jacobi", 4, "zeros"),
])
def test_tight_tolerance_reproduces_the_sequential_inverse(flow, noise, method, num_segments, init, guidance):
    reference, _ = invert(flow, noise, LABELS, method="sequential", guidance=guidance)
    x, stats = invert(flow, noise, LABELS, method=method, num_segments=num_segments, init=init,
                      tolerance=1e-9, clamp=None, guidance=guidance)
    assert _rms(x, reference) <= 1e-5
    assert all(b.converged for b in stats.blocks)
    if method == "jacobi":  # long enough to stop on the tolerance before the exact bound
        assert stats.passes < stats.sequential_passes
    exact, stats0 = invert(flow, noise, LABELS, method=method, num_segments=num_segments, init=init,
                           tolerance=0, clamp=None, guidance=guidance)
    torch.testing.assert_close(exact, reference, rtol=0, atol=1e-12)
    assert stats0.passes == stats0.sequential_passes  # every segment ran to its length


def test_a_loose_tolerance_or_budget_stops_early_and_says_so(flow, noise):
    reference, _ = invert(flow, noise, LABELS, method="sequential")
    loose, stats = invert(flow, noise, LABELS, method="jacobi", tolerance=1e-2, clamp=None)
    assert stats.passes < 15 * 3 and _rms(loose, reference) > 1e-9
    capped, capped_stats = invert(flow, noise, LABELS, method="jacobi", max_iters=2, tolerance=0, clamp=None)
    assert [b.iterations for b in capped_stats.blocks] == [[2]] * 3
    assert not any(b.converged for b in capped_stats.blocks)
    assert all(b.residual > 0 for b in capped_stats.blocks)


def test_per_block_strategy_and_stats(flow, noise):
    strategy = [BlockStrategy(1, 4, "noise"), BlockStrategy(4, None, "zeros"), BlockStrategy(15, 1, "noise")]
    _, stats = invert(flow, noise, LABELS, method="gs_jacobi", strategy=strategy, tolerance=0, clamp=None)
    by_block = {b.block: b for b in stats.blocks}
    assert [b.block for b in stats.blocks] == [2, 1, 0]  # inverted last block first
    assert by_block[0].iterations == [4] and not by_block[0].converged
    assert by_block[1].iterations == [4, 4, 4, 3] and by_block[1].converged
    assert by_block[2].iterations == [1] * 15 and by_block[2].converged  # 15 segments = sequential
    assert stats.passes == 4 + 15 + 15
    assert stats.as_dict()["pass_speedup"] == pytest.approx(45 / 34)


def test_sequential_equals_gs_jacobi_with_one_token_segments(flow, noise):
    reference, _ = invert(flow, noise, LABELS, method="sequential", guidance=1.0)
    x, _ = invert(flow, noise, LABELS, method="gs_jacobi", num_segments=15, max_iters=1, clamp=None, guidance=1.0)
    torch.testing.assert_close(x, reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n, k", [(15, 1), (15, 4), (63, 8), (7, 7), (10, 3)])
def test_segment_bounds_partition_the_unknown_tokens(n, k):
    bounds = segment_bounds(n, k)
    assert len(bounds) == k and bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(e0 == s1 for (_, e0), (s1, _) in zip(bounds, bounds[1:]))
    lengths = [e - s for s, e in bounds]
    assert max(lengths) - min(lengths) <= 1 and min(lengths) >= 1
    if (n + 1) % k == 0:  # the official code's segments: T/k tokens each, the last one shorter
        assert lengths == [(n + 1) // k] * (k - 1) + [(n + 1) // k - 1]


def test_igm_is_the_error_of_one_jacobi_step(flow):
    """IGM against an independent path: a one-block flow inverted by one Jacobi sweep from each guess."""
    one = tiny_flow(num_blocks=1, scale=0.3)
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    cal = calibrate(one, x, labels)
    z, _ = one(x, labels)
    for init in ("noise", "zeros"):
        step, _ = invert(one, z, labels, method="jacobi", max_iters=1, init=init, clamp=None)
        expected = torch.linalg.matrix_norm((step - one.patchify(x)).mean(0), ord=2)
        assert cal.igm[init][0] == pytest.approx(float(expected), rel=1e-9)


def test_crm_ranks_a_block_with_larger_weights_higher():
    model = tiny_flow(num_blocks=3, scale=0.02)
    torch.nn.init.normal_(model.blocks[1].proj_out.weight, std=0.5)
    x = torch.rand(8, 1, 8, 8, dtype=torch.float64) * 2 - 1
    cal = calibrate(model, x)
    assert max(range(3), key=lambda k: cal.crm[k]) == 1
    assert sum(cal.crm_share()) == pytest.approx(100)
    zero = tiny_flow(num_blocks=1, scale=0.0)  # W = 0: CRM = ||mean(e^-a x)|| * 0 + 0
    assert calibrate(zero, x).crm[0] == 0


def test_auto_strategy_segments_the_tough_blocks_and_picks_the_lower_igm():
    from fastdiff.flows.sampling import Calibration

    cal = Calibration(crm=[1.0, 9.0, 1.2, 0.8], igm={"noise": [1, 2, 3, 0.1], "zeros": [2, 1, 1, 0.2]},
                      num_tokens=64, num_images=10)
    strategy = auto_strategy(cal, tough_segments=8, easy_iters=5)
    assert strategy[1] == BlockStrategy(8, None, "zeros")
    assert strategy[0] == BlockStrategy(1, 5, "noise") and strategy[2] == BlockStrategy(1, 5, "zeros")
    assert strategy[3].num_segments == 1
    assert auto_strategy(cal)[0].max_iters == math.ceil(64 / 8)
    with pytest.raises(ValueError, match="tough_segments"):
        auto_strategy(cal, tough_segments=64)


def test_automatic_strategy_end_to_end_is_close_to_sequential(flow, noise):
    x = torch.rand(16, 1, 8, 8, dtype=torch.float64) * 2 - 1
    strategy = auto_strategy(calibrate(flow, x), easy_iters=15)
    reference, _ = invert(flow, noise, LABELS, method="sequential")
    out, _ = invert(flow, noise, LABELS, method="gs_jacobi", strategy=strategy, tolerance=1e-9, clamp=None)
    assert _rms(out, reference) <= 1e-5


def test_non_finite_values_name_the_block_and_iteration(flow, noise):
    bad = tiny_flow(scale=0.1)
    with torch.no_grad():
        bad.blocks[1].proj_out.bias[:4] = 1e4  # a = 1e4: exp overflows
    with pytest.raises(NonFiniteFlowError, match="block 1") as info:
        invert(bad, noise, LABELS, method="jacobi", clamp=None)
    assert (info.value.block, info.value.segment, info.value.iteration) == (1, 0, 0)
    out, _ = invert(bad, noise, LABELS, method="jacobi")  # the paper's clamp keeps it finite
    assert torch.isfinite(out).all()


def test_bad_options_fail_before_any_pass(flow, noise):
    with pytest.raises(ValueError, match="method must be one of"):
        invert(flow, noise, method="newton")
    with pytest.raises(ValueError, match=r"num_segments must be an int in \[1, 15\]"):
        invert(flow, noise, method="gs_jacobi", num_segments=16)
    with pytest.raises(ValueError, match="one BlockStrategy per block"):
        invert(flow, noise, method="gs_jacobi", strategy=[BlockStrategy()])
    with pytest.raises(ValueError, match="init must be one of"):
        invert(flow, noise, method="jacobi", init="ones")
    with pytest.raises(ValueError, match="tolerance"):
        invert(flow, noise, method="jacobi", tolerance=-1)
    with pytest.raises(ValueError, match="criterion"):
        invert(flow, noise, method="jacobi", criterion="max")
    with pytest.raises(ValueError, match=r"z must be a floating tensor \[B, 16, 4\]"):
        invert(flow, noise[:, :8])


def test_sample_draws_denoised_images(flow):
    images, stats = sample(flow, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0),
                           method="gs_jacobi", num_segments=4, guidance=1.0)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    assert stats.method == "gs_jacobi" and stats.seconds > 0
    raw, _ = sample(flow, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0),
                    method="gs_jacobi", num_segments=4, guidance=1.0, denoise=False)
    assert not torch.allclose(raw, images)
    torch.testing.assert_close(flow.denoise(raw, torch.tensor([0, 1])), images)


def test_measured_calibration_counts_the_sweeps_invert_needs():
    model = tiny_flow(sample_size=8, num_blocks=2, scale=0.1)
    x = torch.rand(8, 1, 8, 8, dtype=torch.float64) * 2 - 1
    cal = calibrate(model, x, measure=True, tolerance=1e-8, criterion="rms")
    z, _ = model(x)
    last = len(model.blocks) - 1  # inverted first: its input latents are exactly the calibration's
    _, stats = invert(model, z, method="jacobi", init=cal.best_init(last), tolerance=1e-8, criterion="rms",
                      clamp=None)
    assert stats.blocks[0].block == last and stats.blocks[0].passes == cal.jacobi_iters[last]
    assert all(1 <= n <= 15 for n in cal.jacobi_iters)
    strategy = auto_strategy(cal, ranking="measured", margin=1.0)
    assert [s.max_iters for s in strategy if s.num_segments == 1] == [n for n in cal.jacobi_iters if n < 15]
    with pytest.raises(ValueError, match="measure=True"):
        auto_strategy(calibrate(model, x), ranking="measured")
