"""Two CPU processes (gloo) split every window and return exactly what one process returns."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import diffusers as d
import torch

from fastdiff.samplers.parallel import sample_parallel
from fastdiff.samplers.steps import draw_noise, step_map_for
from fastdiff.testing import SD_SCHEDULER_CONFIG, make_gaussian_mixture, tiny_ddpm_pipeline

WORKER = textwrap.dedent('''
    import sys

    import diffusers as d
    import torch
    import torch.distributed as dist

    import fastdiff
    from fastdiff.samplers.parallel import sample_parallel, split_denoiser
    from fastdiff.samplers.steps import draw_noise, step_map_for
    from fastdiff.testing import SD_SCHEDULER_CONFIG, make_gaussian_mixture, tiny_ddpm_pipeline


    def main(out_dir):
        dist.init_process_group("gloo")
        try:
            rank = dist.get_rank()
            oracle = make_gaussian_mixture(dim=16, num_components=4)
            sched = d.DDPMScheduler.from_config(SD_SCHEDULER_CONFIG)
            sched.set_timesteps(14)
            sm = step_map_for(sched)
            x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            noise = draw_noise(sm, (3, 16), torch.Generator().manual_seed(1), dtype=torch.float64)
            calls = []

            def counted(u, t):
                calls.append(u.shape[0])
                return oracle(u, t)

            results = {}
            for method in ("picard", "newton", "gs_jacobi"):
                out, stats = sample_parallel(sm, split_denoiser(counted, 3), x, noise, method=method, window=5,
                                             tolerance=0.05)
                results[method] = (out, stats.rounds, stats.model_evals)
            pipe = tiny_ddpm_pipeline()
            images = fastdiff.parallel_sample(pipe, batch_size=2, num_inference_steps=6, window=3, tolerance=0.0,
                                              generator=torch.Generator().manual_seed(0), output_type="pt").images
            torch.save({"results": results, "images": images, "max_share": max(calls)}, f"{out_dir}/rank{rank}.pt")
        finally:
            dist.destroy_process_group()


    if __name__ == "__main__":
        main(sys.argv[1])
''')


def test_two_processes_equal_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]

    oracle = make_gaussian_mixture(dim=16, num_components=4)
    sched = d.DDPMScheduler.from_config(SD_SCHEDULER_CONFIG)
    sched.set_timesteps(14)
    sm = step_map_for(sched)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = draw_noise(sm, (3, 16), torch.Generator().manual_seed(1), dtype=torch.float64)
    for method in ("picard", "newton", "gs_jacobi"):
        out, stats = sample_parallel(sm, oracle, x, noise, method=method, window=5, tolerance=0.05)
        for rank in ranks:
            got, rounds, evals = rank["results"][method]
            assert (got - out).abs().max() <= 1e-12, method
            assert (rounds, evals) == (stats.rounds, stats.model_evals), method
    # each process evaluated half of every call: at most 5 of GS-Jacobi's 10-point first sweeps, 3 samples each
    assert all(rank["max_share"] == 5 * 3 for rank in ranks)

    pipe = tiny_ddpm_pipeline()
    ref = pipe(batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="pt").images
    for rank in ranks:
        assert (rank["images"] - ref).abs().max() <= 1e-5
