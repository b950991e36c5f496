"""TarFlow model: exact invertibility, log-determinant, KV cache, denoising step, serialisation."""

import pytest
import torch

from fastdiff.flows.sampling import invert
from fastdiff.flows.tarflow import KVCache, TarFlow


def tiny_flow(sample_size=8, num_blocks=3, num_classes=3, noise_std=0.1, scale=0.05, seed=0) -> TarFlow:
    """A random float64 TarFlow whose blocks are not the identity (the output projection starts at zero)."""
    torch.manual_seed(seed)
    model = TarFlow(sample_size=sample_size, patch_size=2, width=32, num_blocks=num_blocks, layers_per_block=1,
                    head_dim=16, num_classes=num_classes, noise_std=noise_std)
    for block in model.blocks:
        torch.nn.init.normal_(block.proj_out.weight, std=scale)
        if block.class_embed is not None:
            torch.nn.init.normal_(block.class_embed, std=0.5)
    return model.double().eval()


def test_patchify_round_trip():
    model = tiny_flow()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    tokens = model.patchify(x)
    assert tokens.shape == (2, 16, 4)
    assert torch.equal(model.unpatchify(tokens), x)


@pytest.mark.parametrize("channels, size, patch", [(1, 8, 1), (1, 16, 2), (3, 8, 2), (2, 12, 3)])
def test_patch_tokens_are_row_major_patches_channel_first(channels, size, patch):
    """Patchify against an independent reshape: token ``i * (s/p) + j`` is patch row i, column j, its values
    channel-major then row-major inside the patch; any patch size, and the inverse flow round-trips."""
    torch.manual_seed(0)
    model = TarFlow(sample_size=size, in_channels=channels, patch_size=patch, width=16, num_blocks=2,
                    layers_per_block=1, head_dim=8, num_classes=0).double().eval()
    for block in model.blocks:
        torch.nn.init.normal_(block.proj_out.weight, std=0.05)
    x = torch.rand(2, channels, size, size, dtype=torch.float64) * 2 - 1
    n = size // patch
    expected = x.view(2, channels, n, patch, n, patch).permute(0, 2, 4, 1, 3, 5).reshape(2, n * n, -1)
    assert torch.equal(model.patchify(x), expected)
    assert (model.num_tokens, model.token_dim) == (n * n, channels * patch**2)
    z, _ = model(x)
    back, _ = invert(model, z, method="jacobi", tolerance=0, clamp=None)
    torch.testing.assert_close(model.unpatchify(back), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("labels", [None, torch.tensor([0, 2, 3])])
def test_forward_then_sequential_inverse_is_identity(labels):
    model = tiny_flow()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 2 - 1
    z, _ = model(x, labels)
    assert not torch.allclose(z, model.patchify(x))  # the flow does something
    back, stats = invert(model, z, labels, method="sequential")
    torch.testing.assert_close(model.unpatchify(back), x, rtol=0, atol=1e-12)
    assert stats.passes == stats.sequential_passes == 3 * 15


def test_logdet_matches_autograd_jacobian():
    model = tiny_flow(sample_size=4, num_blocks=2, scale=0.3)
    x = torch.rand(1, 1, 4, 4, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([1])
    _, logdet = model(x, labels)
    jac = torch.autograd.functional.jacobian(lambda v: model(v.view(1, 1, 4, 4), labels)[0].flatten(), x.flatten())
    sign, logabs = torch.linalg.slogdet(jac)
    assert sign > 0
    torch.testing.assert_close(logdet[0], logabs, rtol=0, atol=1e-10)
    # triangular in each block's own order: the Jacobian is not diagonal, so the test is not trivial
    assert jac.sub(torch.diag(jac.diagonal())).abs().max() > 1e-3


@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_kv_cache_equals_recomputing_the_prefix(guidance):
    model = tiny_flow()
    z = torch.randn(3, 16, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 3])
    cached, _ = invert(model, z, labels, method="sequential", guidance=guidance)
    full, _ = invert(model, z, labels, method="sequential", guidance=guidance, use_cache=False)
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-12)


def test_segment_pass_with_cache_equals_one_full_pass():
    block = tiny_flow().blocks[0]
    x = torch.randn(2, 10, 4, dtype=torch.float64)
    a, b, _ = block.params(x, 0, None)
    cache = KVCache()
    parts = []
    for s, e in [(0, 3), (3, 4), (4, 10)]:
        pa, pb, kvs = block.params(x[:, s:e], s, None, cache)
        cache.commit(kvs)
        parts.append(torch.cat([pa, pb], -1))
    assert cache.length == 10
    torch.testing.assert_close(torch.cat(parts, 1), torch.cat([a, b], -1), rtol=0, atol=1e-12)


def test_unconditional_label_is_the_mean_class_embedding():
    model = tiny_flow()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    null = torch.full((2,), 3)
    torch.testing.assert_close(model(x, null)[0], model(x, None)[0])
    assert not torch.allclose(model(x, torch.tensor([0, 0]))[0], model(x, None)[0])


def test_denoise_is_tweedie_on_an_identity_flow():
    """Identity blocks (zero output projection and bias): log p(y) = -|y|^2 / 2, so the step is y - sigma^2 y."""
    torch.manual_seed(0)
    model = TarFlow(sample_size=4, patch_size=2, width=16, num_blocks=2, layers_per_block=1, head_dim=8,
                    num_classes=0, noise_std=0.2).double()
    for block in model.blocks:
        torch.nn.init.zeros_(block.proj_out.bias)
    y = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(model.denoise(y), y - 0.04 * y)
    torch.testing.assert_close(model.denoise(y, step=0.5), y - 0.02 * y)


def test_training_loss_is_the_nll_of_noise_augmented_data_and_trains():
    model = tiny_flow().float().train()
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    noise = torch.randn_like(x)
    loss = model.training_loss(x, noise, torch.arange(8) % 3)
    torch.testing.assert_close(loss, model.nll(x + 0.1 * noise, torch.arange(8) % 3).mean())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_save_and_load_round_trip(tmp_path):
    model = tiny_flow()
    model.save_pretrained(tmp_path)
    loaded = TarFlow.from_pretrained(tmp_path).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)


def test_bad_inputs():
    model = tiny_flow()
    with pytest.raises(ValueError, match="patch_size"):
        TarFlow(sample_size=9, patch_size=2)
    with pytest.raises(ValueError, match="labels must be in"):
        model(torch.zeros(1, 1, 8, 8, dtype=torch.float64), torch.tensor([7]))
    with pytest.raises(ValueError, match=r"images must be \[B, 1, 8, 8\]"):
        model(torch.zeros(1, 1, 16, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="labels"):
        model(torch.zeros(1, 1, 8, 8, dtype=torch.float64), torch.tensor([0.5]))
