#!/usr/bin/env bash
# FP8 linears on one H100/H200 in one command (issue 18), ~8 minutes: the gpu tests, which JAX form
# of an E4M3 GEMM runs on FP8 tensor cores (fp8_gemm.py), the DiT forward with bf16 vs FP8 block
# linears (dit_forward.py; 14B cut to 8 blocks, ms per layer is what to read), and the error of FP8
# vs bf16 linears per layer and at the output (fp8_linear_error.py; 1.3B cut to 10 blocks, 14B to 4).
#
#   bash benchmarks/fp8_h200.sh            # from the repository root; logs in ${OUT:-/tmp}/fp8_*.log
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
LOGS="${OUT:-/tmp}"
PY="${PYTHON:-python3}"
mkdir -p "$LOGS"
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, keep going on failure
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$LOGS/fp8_$name.log"
  echo "=== $name exit ${PIPESTATUS[0]}"
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
step tests 60 "$PY" -m pytest -q -p no:cacheprovider -rs tests/model/test_fp8_linear_gpu.py
step gemm 150 "$PY" benchmarks/fp8_gemm.py --iters 10 --warmup 2 --max_seconds 120 \
  --json "$LOGS/fp8_gemm.json"
step dit_13b 60 "$PY" benchmarks/dit_forward.py --cases 1.3b-480p --batch 2 \
  --linear_quant none fp8 --repeats 3
step dit_14b 100 "$PY" benchmarks/dit_forward.py --cases 14b-720p --batch 2 --num_layers 8 \
  --linear_quant none fp8 --repeats 2
step error_13b 45 "$PY" benchmarks/fp8_linear_error.py --cases 1.3b-480p --num_layers 10
step error_14b 55 "$PY" benchmarks/fp8_linear_error.py --cases 14b-720p --num_layers 4

echo
echo "################ summary ################"
tail -n 1 "$LOGS/fp8_tests.log"
sed -n '/^TFLOP\/s (ratio/,$p' "$LOGS/fp8_gemm.log"
grep -h -E '^\| (case|1\.3b-480p|14b-720p) ' "$LOGS/fp8_dit_13b.log" "$LOGS/fp8_dit_14b.log" |
  awk '/^\| case/ { if (!seen++) { print; print "|---|---|---|---|---|---|---|---|---|---|---|---|" }; next } 1'
grep -h -E 'layers, B=|^\| (layer|mean) |^DiT output' "$LOGS/fp8_error_13b.log" "$LOGS/fp8_error_14b.log"
