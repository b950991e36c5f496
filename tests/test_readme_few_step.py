"""The README's few-step snippet, run as written (on a tiny offline Stable Diffusion pipeline)."""

import numpy as np
import torch

from fastdiff.testing import tiny_sd_pipeline


def test_readme_few_step_snippet():
    pipe = tiny_sd_pipeline()
    # --- README: few-step samplers
    from fastdiff import make_scheduler
    from fastdiff.samplers.dualfast import UniPCMultistepDualFastScheduler

    pipe.scheduler = make_scheduler("accel_ddim", pipe.scheduler.config)  # fastdiff's few-step sampler
    image = pipe("a red digit", num_inference_steps=8, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    pipe.scheduler = make_scheduler("dpmpp_2m_dualfast", pipe.scheduler.config)  # DualFast on DPM-Solver++
    pipe.scheduler = UniPCMultistepDualFastScheduler.from_config(pipe.scheduler.config, dualfast_scale=0.1)
    image_df = pipe("a red digit", num_inference_steps=8, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    assert pipe.scheduler.config.dualfast_scale == 0.1 and pipe.scheduler.config.dualfast_variant == "paper"
    pipe.scheduler = UniPCMultistepDualFastScheduler.from_config(pipe.scheduler.config, dualfast_variant="interpolate",
                                                                 dualfast_scale=0.3)  # fastdiff's option
    image_ip = pipe("a red digit", num_inference_steps=8, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    # --- end
    assert np.isfinite(image).all() and np.isfinite(image_df).all() and np.isfinite(image_ip).all()
    assert pipe.scheduler.config.dualfast_variant == "interpolate" and pipe.scheduler.config.solver_order == 2
