"""The README's parallel-sampling snippet, run line for line (tests/test_readme.py checks the lines match)."""

import torch


def test_readme_parallel_snippet():
    # --- README: parallel sampling
    import fastdiff

    pipe = fastdiff.load_embedded_pipeline()
    out = fastdiff.parallel_sample(pipe, [3, 7], num_inference_steps=8, window=4)   # newton, tolerance 1e-4
    images, stats = out.images, out.stats   # ParallelPipelineOutput (a diffusers BaseOutput): images and ParallelStats
    images, stats = fastdiff.parallel_sample(pipe, [3, 7], num_inference_steps=8, return_dict=False)
    out = fastdiff.parallel_sample(pipe, [3, 7], num_inference_steps=8, method="picard", tolerance=0.1)  # ParaDiGMS
    # --- end
    assert stats.converged and len(images) == 2
    sequential = pipe([3, 7], num_inference_steps=8, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    parallel = fastdiff.parallel_sample(pipe, [3, 7], num_inference_steps=8, window=4, output_type="pt",
                                        generator=torch.Generator().manual_seed(0)).images
    assert (sequential - parallel).abs().max() < 2e-2
