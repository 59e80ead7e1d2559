"""Runtime instruction-set dispatch of the CPU module and the shared code table."""

import json
import os
import subprocess
import sys

import pytest
import torch

from pyfici import _native

FEATURES_V3 = {f: True for f in _native.ISA_REQUIRES["avx2"]}
FEATURES_V4 = {f: True for f in _native.ISA_REQUIRES["avx512"]}
BUILT = ("avx512", "avx2", "generic")


def _run(code: str, isa: str | None):
    env = dict(os.environ)
    env.pop("PYFICI_CPU_ISA", None)
    if isa is not None:
        env["PYFICI_CPU_ISA"] = isa
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_select_isa_picks_the_best_supported_and_refuses_the_rest():
    assert _native.select_isa(None, FEATURES_V4, BUILT) == "avx512"
    assert _native.select_isa(None, FEATURES_V3, BUILT) == "avx2"
    assert _native.select_isa(None, {}, BUILT) == "generic"
    assert _native.select_isa(None, FEATURES_V4, ("avx2", "generic")) == "avx2"
    assert _native.select_isa("generic", FEATURES_V4, BUILT) == "generic"
    with pytest.raises(ValueError, match=r"PYFICI_CPU_ISA=avx512: this CPU cannot run it \(missing avx512f"):
        _native.select_isa("avx512", FEATURES_V3, BUILT)
    with pytest.raises(ValueError, match="missing avx2, fma"):
        _native.select_isa("avx2", {}, BUILT)
    with pytest.raises(ValueError, match="is not one of"):
        _native.select_isa("sse9", FEATURES_V4, BUILT)
    with pytest.raises(ValueError, match="pyfici._C_avx512 is not built"):
        _native.select_isa("avx512", FEATURES_V4, ("generic",))


def test_the_machine_runs_the_best_variant_it_supports():
    assert _native.has_cpu()
    assert "generic" in _native.CPU_ISAS_BUILT
    if not os.environ.get("PYFICI_CPU_ISA"):
        assert _native.CPU_ISA == _native.CPU_ISAS_SUPPORTED[0]
    assert _native.cpu_module().__isa__ == _native.CPU_ISA
    d = _native.info()
    assert d["cpu_isa"] == _native.CPU_ISA
    assert d["cpu_isas_supported"].split(", ") == list(_native.CPU_ISAS_SUPPORTED)


@pytest.mark.parametrize("isa", list(_native.CPU_ISAS_SUPPORTED))
def test_each_variant_is_compiled_for_its_isa(isa):
    with _native.use_isa(isa) as mod:
        assert mod.__isa__ == isa and _native.cpu_module() is mod
        want = {"generic": "generic", "avx2": "avx2", "avx512": "avx512"}.get(isa)
        if want is not None:  # no -march=native leaking into a portable variant
            assert mod.__simd__ == want
    r = _run("from pyfici import _native; print(_native.cpu_module().__isa__, _native.CPU_ISA)", isa)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [isa, isa]


def test_forced_unknown_isa_is_a_clear_error():
    code = (
        "import torch\nfrom pyfici.ops import knn\n"
        "try:\n    knn(torch.randn(3, 2), torch.randn(5, 2), 1)\n"
        "except RuntimeError as e:\n    print('ERR', e)\n"
        "print(knn(torch.randn(3, 2), torch.randn(5, 2), 1, backend='torch')[1].shape)\n"
    )
    r = _run(code, "sse9")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ERR") and "PYFICI_CPU_ISA='sse9' is not one of" in r.stdout
    assert "[3, 1]" in r.stdout  # the torch backend still works


def test_forced_unsupported_isa_is_refused_and_never_imported():
    missing = [isa for isa in ("avx2", "avx512") if isa in _native.CPU_ISAS_BUILT and isa not in _native.CPU_ISAS_SUPPORTED]
    with pytest.raises(ValueError, match="is not one of"):
        with _native.use_isa("sse9"):
            pass
    if not missing:
        pytest.skip("this CPU runs every built variant")
    r = _run("from pyfici import _native\nprint(_native.cpu_error())", missing[-1])
    assert r.returncode == 0, r.stderr
    assert "this CPU cannot run it" in r.stdout


def test_pyfici_info_prints_the_isa():
    r = subprocess.run([sys.executable, "-m", "pyfici", "info", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["cpu_isa"] in _native.ISA_ORDER
    assert "generic" in d["cpu_isas_built"]


def test_one_code_table_for_every_module():
    assert _native.DTYPE_CODES[torch.float32] == _native.cpu_module().DTYPE_CODES["float32"]
    assert set(_native.METRIC_CODES) == {"sqeuclidean", "euclidean", "cosine", "ip"}
    assert len(set(_native.DTYPE_CODES.values())) == len(_native.DTYPE_CODES)
    for isa in _native.CPU_ISAS_SUPPORTED:
        with _native.use_isa(isa) as mod:
            assert dict(mod.DTYPE_CODES) == dict(_native.cpu_module().DTYPE_CODES)
            assert dict(mod.METRIC_CODES) == _native.METRIC_CODES
    if _native.has_cuda():
        cm = _native.cuda_module()
        assert dict(cm.DTYPE_CODES) == {str(k).removeprefix("torch."): v for k, v in _native.DTYPE_CODES.items()}
        assert dict(cm.METRIC_CODES) == _native.METRIC_CODES
