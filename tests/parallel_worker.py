"""Worker for ``test_parallel_distributed``: run with ``torchrun --nproc_per_node 2 parallel_worker.py OUT``.

``problem()`` is imported by the test as well, so both sides solve exactly the same trajectory.
"""

import sys

import diffusers as d
import torch
import torch.distributed as dist

import fastdiff
from fastdiff.samplers.parallel import sample_parallel, split_denoiser
from fastdiff.samplers.steps import draw_noise, step_map_for
from fastdiff.testing import SD_SCHEDULER_CONFIG, make_gaussian_mixture, tiny_ddpm_pipeline

METHODS = ("picard", "newton", "gs_jacobi")
PIPE_KW = dict(batch_size=2, num_inference_steps=6)


def problem():
    """The oracle, a 14-step DDPM step map, the start latents and the pre-drawn noise (float64)."""
    oracle = make_gaussian_mixture(dim=16, num_components=4)
    sched = d.DDPMScheduler.from_config(SD_SCHEDULER_CONFIG)
    sched.set_timesteps(14)
    sm = step_map_for(sched)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = draw_noise(sm, (3, 16), torch.Generator().manual_seed(1), dtype=torch.float64)
    return oracle, sm, x, noise


def main(out_dir):
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        oracle, sm, x, noise = problem()
        calls = []

        def counted(u, t):
            calls.append(u.shape[0])
            return oracle(u, t)

        results = {}
        for method in METHODS:
            out, stats = sample_parallel(sm, split_denoiser(counted, 3), x, noise, method=method, window=5,
                                         tolerance=0.05)
            results[method] = (out, stats.rounds, stats.model_evals)
        pipe = tiny_ddpm_pipeline()
        images = fastdiff.parallel_sample(pipe, window=3, tolerance=0.0, generator=torch.Generator().manual_seed(0),
                                          output_type="pt", **PIPE_KW).images
        torch.save({"results": results, "images": images, "max_share": max(calls)}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
