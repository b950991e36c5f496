import os

import torch
from hypothesis import settings

# The tests run many small batches; one intra-op thread is faster for them than two on a 2-core machine.
torch.set_num_threads(1)

# Property tests: random examples locally, a fixed example set in CI (a landing must not depend on
# the draw), and a long run with HYPOTHESIS_PROFILE=stress before touching schedule maths.
settings.register_profile("default", max_examples=40, deadline=None)
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("stress", max_examples=3000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))
