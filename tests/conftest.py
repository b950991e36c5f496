import os

import pytest
import torch
from diffusers import PixArtTransformer2DModel
from hypothesis import settings

# The tests run many small batches; one intra-op thread is faster for them than two on a 2-core machine.
torch.set_num_threads(1)

# Property tests: random examples locally, a fixed example set in CI (a landing must not depend on
# the draw), and a long run with HYPOTHESIS_PROFILE=stress before touching schedule maths.
settings.register_profile("default", max_examples=40, deadline=None)
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("stress", max_examples=3000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))


TINY_PIXART = dict(sample_size=8, in_channels=1, out_channels=1, patch_size=2, num_layers=3, num_attention_heads=2,
                   attention_head_dim=8, cross_attention_dim=16, caption_channels=8, norm_type="ada_norm_single",
                   num_embeds_ada_norm=1000, use_additional_conditions=False, attention_bias=True)


@pytest.fixture(scope="module")
def pixart():
    """A 3-block PixArt transformer (random weights, seed 0) and one batch of its inputs."""
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(**TINY_PIXART).eval()
    inputs = dict(hidden_states=torch.randn(2, 1, 8, 8), encoder_hidden_states=torch.randn(2, 3, 8),
                  timestep=torch.tensor([10, 500]))
    return model, inputs
