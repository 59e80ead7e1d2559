import json
import subprocess
import sys

from pyfici import _native
from pyfici.cli import main


def test_info_lists_backends(capsys):
    assert main(["info", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    for key in ("pyfici", "torch", "triton", "backend_cpu", "backend_cuda", "backend_triton", "devices"):
        assert key in d
    assert d["backend_cpu"].startswith("built")


def test_python_m_pyfici_info():
    out = subprocess.run([sys.executable, "-m", "pyfici", "info"], capture_output=True, text=True, check=True).stdout
    assert "backend_cpu" in out and "torch" in out


def test_cuda_module_compiled_when_nvcc_present():
    # CI builds on a machine with nvcc: the CUDA module must be built and importable
    import shutil

    if shutil.which("nvcc") is None:
        import pytest

        pytest.skip("no nvcc on this machine")
    assert _native.has_cuda(), _native._CUDA_ERROR
    assert "80" in _native.cuda_module().__archs__


def test_bench_small_prints_table(capsys):
    assert main(["bench", "--family", "reid", "--size", "small", "--device", "cpu", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "anchor/pyfici" in out and "pyfici evaluate_distmat" in out
