#!/usr/bin/env bash
# GPU check, for the lent GPU machine (no network; torch, triton, nvcc present):
#   bash benchmarks/gpu_check.sh
# builds pyfici, runs the GPU tests and the GPU benchmarks, writes the full
# results to $OUT (or ./gpu_out) and prints a short table last. Budget: < 8 min.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
t0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if ! pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "gpu_check: BUILD FAILED"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
python -m pyfici info | tee "$OUT/info.txt"
timeout 240 python -m pytest -m gpu -q -x tests -p no:cacheprovider > "$OUT/pytest_gpu.log" 2>&1
echo "gpu tests: rc=$? ($(tail -1 "$OUT/pytest_gpu.log"))"
timeout 300 python -m pyfici bench --device cuda --size full --json "$OUT/bench.json" \
  > "$OUT/bench.txt" 2> "$OUT/bench.err"
echo "bench: rc=$? after $(( $(date +%s) - t0 )) s"
echo "=== pyfici GPU benchmark table ($(head -1 "$OUT/gpu.txt")) ==="
cat "$OUT/bench.txt"
