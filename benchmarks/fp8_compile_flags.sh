#!/usr/bin/env bash
# The model's FP8 linear at a 14B/720p shape (fp8_gemm.py's "(b) model, linear": activations
# quantized inside the jitted function) under several XLA flag sets: compile + run time, the GEMM
# kernels XLA chose (--show_hlo), TFLOP/s against bf16 in the same process. Issue 18: under the
# default flags this form did not finish compiling (XLA's GPU autotuner). Every run is cut at
# ${LIMIT:-120} s. Run from the repository root on a GPU:
#     bash benchmarks/fp8_compile_flags.sh [SHAPE]
set -u
shape=${1:-14b-qkvo}
root=$(cd "$(dirname "$0")/.." && pwd) || exit 1
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root/benchmarks" || exit 1
for flags in "--xla_gpu_autotune_level=0" "--xla_gpu_enable_triton_gemm=false" \
    "--xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=0" ""; do
  echo "=== XLA_FLAGS='$flags' shape $shape"
  start=$(date +%s)
  XLA_FLAGS="$flags" timeout "${LIMIT:-120}" python3 fp8_gemm.py --shapes "$shape" \
      --forms bf16 "(b) model, GEMM" "(b) model, linear" --show_hlo --iters 10 --xla_defaults 2>&1 \
      | grep -v "^[WI][0-9]" | tail -30
  echo "--- rc ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s"
done
