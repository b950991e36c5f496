#!/usr/bin/env bash
# The GPU checks of fastdiff's attention kernels (issue 13), one command, on a machine with a CUDA GPU:
#   bf16 / fp16 / fp32 correctness of the compiled Triton kernels against float64 (the tests' contract),
#   forward and forward+backward TFLOP/s of every installed backend (N = 256..16384, head dim 64 / 128, bf16),
#   peak memory and time of the fused HASTE distillation loss vs the materialised reference (N up to 16384),
#   the INT8 kernel vs SDPA flash (speed, cosine) and end-to-end sample differences.
# Writes benchmarks/results/attention_kernels.json (and a copy under $OUT when set). ~5-8 min on an H100/H200;
# QUICK=1 runs N = 1024, 4096 only.
#   bash benchmarks/gpu_checks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, triton; assert torch.cuda.is_available(), 'benchmarks/gpu_checks.sh needs a CUDA GPU'; \
print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
python benchmarks/attention_kernels.py ${QUICK:+--quick} "$@"
if [ -n "${OUT:-}" ]; then cp benchmarks/results/attention_kernels.json "$OUT/"; fi
