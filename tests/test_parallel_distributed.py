"""Two CPU processes (gloo) split every window and return exactly what one process returns."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from parallel_worker import METHODS, PIPE_KW, problem

from fastdiff.samplers.parallel import sample_parallel
from fastdiff.testing import tiny_ddpm_pipeline

WORKER = Path(__file__).with_name("parallel_worker.py")


def test_two_processes_equal_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]

    oracle, sm, x, noise = problem()
    for method in METHODS:
        out, stats = sample_parallel(sm, oracle, x, noise, method=method, window=5, tolerance=0.05)
        for rank in ranks:
            got, rounds, evals = rank["results"][method]
            assert (got - out).abs().max() <= 1e-12, method
            assert (rounds, evals) == (stats.rounds, stats.model_evals), method
    # each process evaluated half of every call: at most 5 of GS-Jacobi's 10-point first sweeps, 3 samples each
    assert all(rank["max_share"] == 5 * 3 for rank in ranks)

    pipe = tiny_ddpm_pipeline()
    ref = pipe(generator=torch.Generator().manual_seed(0), output_type="pt", **PIPE_KW).images
    for rank in ranks:
        # the pipeline's own output type (older diffusers' DDPMPipeline returns numpy even for output_type="pt")
        assert type(rank["images"]) is type(ref)
        assert (torch.as_tensor(rank["images"]) - torch.as_tensor(ref)).abs().max() <= 1e-5
