#!/bin/bash
# Cross-build pyfici's CPU module for aarch64 (the portable `generic` variant, the only one
# CMakeLists.txt builds off x86-64) and run the op tests on it under qemu-user, on an x86-64
# Debian 12 machine with no arm64 hardware (docs/cpu_dispatch.md, "Other architectures").
#
#   bash benchmarks/aarch64_check.sh [WORKDIR]      (default /tmp/a64; needs root for apt)
#   QEMU_CPUS="max neoverse-n1" (the default) and AARCH64_TESTS="tests/..." narrow it down.
#
# What it uses: Debian's g++-aarch64-linux-gnu and qemu-user-static; Debian's arm64 python3.11
# packages unpacked into WORKDIR/root (dpkg -x, no chroot: qemu's -L prefix finds the arm64 loader
# and libraries there); torch 2.9.1 (the CPU-only aarch64 wheel) and the test dependencies from
# PyPI, installed for aarch64 with `pip install --target --platform`. The build must give no
# compiler warning. Tests that start a subprocess run it through WORKDIR/py (qemu): qemu's -0
# makes that wrapper Python's argv[0], hence sys.executable. Takes about 20 minutes on 2 cores, most of it the tests
# under emulation (once per emulated CPU, QEMU_CPUS).
set -euo pipefail
REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
W=${1:-/tmp/a64}
PY_VENV=${PY_VENV:-$REPO/.venv}   # an x86-64 venv with pybind11 and pip (the README's dev install)
mkdir -p "$W"

if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64-static >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++-aarch64-linux-gnu qemu-user-static >/dev/null
fi

# ---- an arm64 Python 3.11 (Debian's packages, unpacked)
if [ ! -x "$W/root/usr/bin/python3.11" ]; then
  dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
  apt-get update -qq
  mkdir -p "$W/debs" "$W/root"
  (cd "$W/debs" && for p in $(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances python3.11:arm64 libpython3.11-dev:arm64 libgomp1:arm64 \
        libstdc++6:arm64 2>/dev/null | grep -v '^ ' | grep -v '^<' | sort -u); do
      case $p in *:amd64) continue ;; esac
      apt-get download "$p" >/dev/null 2>&1 || true
    done)
  for f in "$W"/debs/*_arm64.deb "$W"/debs/*_all.deb; do dpkg -x "$f" "$W/root"; done
fi
# the emulated CPU: QEMU_CPU (qemu reads it) = max (every feature qemu has, SVE and SME
# included) or neoverse-n1 (Graviton2-like, Armv8.2)
cat > "$W/py" <<EOF
#!/bin/bash
export PYTHONPATH=$W/pkg:$W/site\${PYTHONPATH:+:\$PYTHONPATH}
export PYTHONHOME=$W/root/usr
exec qemu-aarch64-static -L $W/root -0 $W/py $W/root/usr/bin/python3.11 "\$@"
EOF
chmod +x "$W/py"

# ---- aarch64 wheels: torch (CPU) and what pyfici and its op tests import
if [ ! -d "$W/site/torch" ]; then
  "$PY_VENV/bin/pip" install -q --no-deps --target "$W/site" --python-version 3.11 --implementation cp \
    --abi cp311 --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
    --platform manylinux_2_17_aarch64 --only-binary=:all: torch==2.9.1 numpy tqdm pillow \
    scipy-openblas32 pytest hypothesis expecttest pygments filelock typing-extensions sympy networkx \
    jinja2 fsspec mpmath markupsafe iniconfig pluggy packaging attrs sortedcontainers 2>&1 |
    { grep -v "^WARNING: Location" || true; }
fi

# ---- cross-build the generic CPU module
cat > "$W/toolchain.cmake" <<'EOF'
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
EOF
rm -rf "$W/build"
"$PY_VENV/bin/python" -c "import pybind11" 2>/dev/null || "$PY_VENV/bin/pip" install -q pybind11
cmake -S "$REPO" -B "$W/build" -G Ninja -DCMAKE_TOOLCHAIN_FILE="$W/toolchain.cmake" -DPYFICI_NO_CUDA=ON \
  -Dpybind11_DIR="$("$PY_VENV/bin/python" -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$PY_VENV/bin/python" \
  -DPython_INCLUDE_DIR="$W/root/usr/include/python3.11" -DCMAKE_CXX_FLAGS="-isystem $W/root/usr/include" \
  -DPYTHON_MODULE_EXTENSION=.cpython-311-aarch64-linux-gnu.so >/dev/null
ninja -C "$W/build" | tee "$W/build.log" | tail -1
if grep -q "warning:" "$W/build.log"; then echo "compiler warnings in the aarch64 build:"; grep "warning:" "$W/build.log"; exit 1; fi
so=$(ls "$W"/build/_C_generic*.so)
file "$so"
ls "$W"/build/_C_*.so | grep -v _C_generic && { echo "only _C_generic must be built off x86-64"; exit 1; }

# ---- pyfici's Python package with the aarch64 module; the tests without the source tree
rm -rf "$W/pkg" "$W/t" && mkdir -p "$W/pkg" "$W/t"
cp -r "$REPO/pyfici" "$W/pkg/" && find "$W/pkg" \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
cp "$so" "$W/pkg/pyfici/_C_generic.cpython-311-aarch64-linux-gnu.so"
cp -r "$REPO/tests" "$REPO/pyproject.toml" "$W/t/"
cd "$W/t"
"$W/py" -c "import platform, torch; print(platform.machine(), 'torch', torch.__version__)"
TESTS=${AARCH64_TESTS:-"tests/test_knn.py tests/test_knn_numerics.py tests/test_k_same.py tests/test_optim.py tests/test_optim_isa.py
  tests/test_optim_masks.py tests/test_ops_distance.py tests/test_reid_rank_chunks.py tests/test_native_isa.py
  tests/test_rerank.py tests/test_gemm.py"}
for cpu in ${QEMU_CPUS:-max neoverse-n1}; do
  echo "== qemu -cpu $cpu"
  QEMU_CPU=$cpu "$W/py" -c "import sys; from pyfici.cli import main; sys.argv = ['pyfici', 'info']; main()" 2>&1 |
    grep -E "cpu_isa |cpu_gemm|cpu_knn|backend_cpu"
  # torch.compile's inductor needs a C++ compiler inside the emulated system, which it lacks
  # shellcheck disable=SC2086
  QEMU_CPU=$cpu "$W/py" -m pytest -q -p no:cacheprovider $TESTS \
    --deselect tests/test_rerank.py::test_custom_ops_opcheck_and_compile 2>&1 | tail -4
done
