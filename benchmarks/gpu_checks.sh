#!/usr/bin/env bash
# The GPU checks of fastdiff's attention kernels (issue 13), one command, on a machine with a CUDA GPU:
#   bf16 / fp16 / fp32 correctness of the compiled Triton kernels against float64 (the tests' contract),
#   memory_lean: HASTE at N = 4096 and 16384 with the teacher handing over Q/K (whole training steps with
#     backend="auto" -> the fused kernel, and each HASTE attention backend) vs the materialised reference
#     (teacher probabilities; expected to run out of memory at 16384),
#   forward and forward+backward TFLOP/s of every installed backend (N = 256..16384, head dim 64 / 128, bf16),
#   peak memory and time of the fused HASTE distillation loss vs the materialised reference (N up to 16384),
#   the INT8 kernel vs SDPA flash (speed, cosine) and end-to-end sample differences.
# Sections run in that order and the JSON is rewritten after each one, so a run cut by the time limit keeps
# what it measured. Writes benchmarks/results/attention_kernels.json and a copy under $OUT when set (also
# when cut). ~5-8 min on an H100/H200; capped at LIMIT_S seconds (default 510); QUICK=1 runs fewer sizes.
#   bash benchmarks/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
RESULT=benchmarks/results/attention_kernels.json
copy_out() { if [ -n "${OUT:-}" ] && [ -f "$RESULT" ]; then cp "$RESULT" "$OUT/"; fi; }
trap copy_out EXIT
python -c "import torch, triton; assert torch.cuda.is_available(), 'benchmarks/gpu_checks.sh needs a CUDA GPU'; \
print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" || exit 1
timeout "${LIMIT_S:-510}" python benchmarks/attention_kernels.py ${QUICK:+--quick} "$@"
status=$?
if [ "$status" -eq 124 ]; then echo "gpu_checks: cut at ${LIMIT_S:-510} s; $RESULT holds the sections that finished"; fi
exit "$status"
