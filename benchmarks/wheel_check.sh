#!/bin/bash
# Build a wheel from a clean clone (default flags: no -march=native), install it in a fresh venv
# and run the op tests under each forced ISA (AVX2 and generic code on any x86-64 machine that has
# them). Usage: benchmarks/wheel_check.sh [REV]; uses /tmp/wheelsrc, /tmp/dist, /tmp/wheelenv.
set -euo pipefail
REV=${1:-HEAD}
rm -rf /tmp/wheelsrc /tmp/dist /tmp/wheelenv
git clone -q "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)" /tmp/wheelsrc && cd /tmp/wheelsrc && git checkout -q "$REV"
python3 -m venv /tmp/wheelenv && . /tmp/wheelenv/bin/activate
pip install -q --upgrade pip
start=$(date +%s)
pip wheel . -w /tmp/dist --no-deps 2>&1 | tail -3
echo "wheel built in $(( $(date +%s) - start )) s: $(ls /tmp/dist)"
unzip -l /tmp/dist/pyfici-*.whl | grep -E "\.so$" || true
pip install -q /tmp/dist/pyfici-*.whl pytest hypothesis expecttest faiss-cpu 2>&1 | tail -2
# the tests and the pytest config only, without the package source: they import the installed wheel
rm -rf /tmp/wheeltests && mkdir /tmp/wheeltests && cp -r /tmp/wheelsrc/tests /tmp/wheelsrc/pyproject.toml /tmp/wheeltests/
cd /tmp/wheeltests && python -c "import pyfici; assert 'wheelenv' in pyfici.__file__, pyfici.__file__; print(pyfici.__file__)"
python -c "import pyfici, sys; print(pyfici.__file__)"
objdump -d /tmp/wheelenv/lib/python3.11/site-packages/pyfici/_C_avx2*.so | grep -c zmm | sed 's/^/zmm instructions in _C_avx2: /' || true
objdump -d /tmp/wheelenv/lib/python3.11/site-packages/pyfici/_C_generic*.so | grep -cE "ymm|zmm" | sed 's/^/ymm+zmm instructions in _C_generic: /' || true
TESTS="tests/test_knn.py tests/test_knn_numerics.py tests/test_k_same.py tests/test_optim.py tests/test_optim_isa.py tests/test_optim_masks.py tests/test_ops_distance.py tests/test_reid_rank_chunks.py tests/test_native_isa.py tests/test_rerank.py"
for isa in avx2 generic; do
  echo "== PYFICI_CPU_ISA=$isa"
  PYFICI_CPU_ISA=$isa pyfici info | grep -E "cpu_isa|cpu_gemm"
  (cd /tmp/wheeltests && PYFICI_CPU_ISA=$isa python -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tail -2)
done
