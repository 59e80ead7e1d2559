"""Loads the compiled modules: the CPU kernels ``pyfici._C_<isa>`` and ``pyfici._cuda``.

Neither links libtorch: functions take raw pointers (``tensor.data_ptr()``),
sizes, dtype codes (:data:`DTYPE_CODES`) and, for CUDA, the caller's stream.

The CPU kernels are built once per instruction-set level (``generic`` = x86-64,
``avx2`` = x86-64-v3, ``avx512`` = x86-64-v4; only ``generic`` off x86). At import
the generic module reports the running CPU's features and the best variant the
CPU supports is imported; ``PYFICI_CPU_ISA=generic|avx2|avx512`` forces one (a
choice the CPU cannot run, or that is not built, is refused with a clear error:
an unsupported variant is never imported). :func:`cpu_module` returns the chosen
module. See docs/cpu_dispatch.md.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import warnings

import torch

REBUILD_HINT = (
    "rebuild pyfici from its source folder with `pip install --no-build-isolation -e .` "
    "(needs cmake and a C++17 compiler; nvcc for the CUDA backend), or pass backend='torch' "
    "to use the slow reference implementation"
)

ISA_ORDER = ("native", "avx512", "avx2", "generic")  # preference, best first
_V3 = ("avx2", "fma", "bmi", "bmi2", "f16c", "movbe", "lzcnt")
ISA_REQUIRES = {
    "generic": (),
    "avx2": _V3,
    "avx512": _V3 + ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
    "native": (),  # opt-in build (PYFICI_NATIVE_ARCH) for the build machine itself
}


def _load(name: str):
    try:
        return importlib.import_module(f"pyfici.{name}"), None
    except ImportError as e:  # pragma: no cover - depends on the build
        return None, str(e)


def built_isas() -> tuple[str, ...]:
    """CPU variants present in this installation, best first."""
    out = []
    for isa in ISA_ORDER:
        try:
            if importlib.util.find_spec(f"pyfici._C_{isa}") is not None:
                out.append(isa)
        except (ImportError, ValueError):  # pragma: no cover
            pass
    return tuple(out)


def supported_isas(features: dict, built: tuple[str, ...]) -> tuple[str, ...]:
    """The built variants this CPU can run (features: the generic module's cpu_features())."""
    return tuple(isa for isa in built if all(features.get(f, False) for f in ISA_REQUIRES[isa]))


def select_isa(requested: str | None, features: dict, built: tuple[str, ...]) -> str:
    """The variant to import: ``requested`` (PYFICI_CPU_ISA) if given and runnable, else
    the best supported one. Raises ValueError with the reason otherwise."""
    ok = supported_isas(features, built)
    if requested:
        if requested not in ISA_REQUIRES:
            raise ValueError(f"PYFICI_CPU_ISA={requested!r} is not one of {tuple(ISA_REQUIRES)}")
        if requested not in built:
            raise ValueError(
                f"PYFICI_CPU_ISA={requested}: pyfici._C_{requested} is not built (built: {', '.join(built) or 'none'})"
            )
        if requested not in ok:
            missing = [f for f in ISA_REQUIRES[requested] if not features.get(f, False)]
            raise ValueError(
                f"PYFICI_CPU_ISA={requested}: this CPU cannot run it (missing {', '.join(missing)}); "
                f"it supports {', '.join(ok) or 'none'}"
            )
        return requested
    if not ok:
        raise ValueError("no CPU variant of pyfici is built")
    return ok[0]


def _load_cpu():
    """-> (module, isa, dtype codes, metric codes, built, supported, error)."""
    built = built_isas()
    if "generic" not in built:
        return None, "", {}, {}, built, (), "pyfici._C_generic is not built"
    generic, err = _load("_C_generic")
    if generic is None:
        return None, "", {}, {}, built, (), err
    features = dict(generic.cpu_features())
    supported = supported_isas(features, built)
    dcodes, mcodes = dict(generic.DTYPE_CODES), dict(generic.METRIC_CODES)
    try:
        isa = select_isa(os.environ.get("PYFICI_CPU_ISA") or None, features, built)
    except ValueError as e:
        return None, "", dcodes, mcodes, built, supported, str(e)
    mod, err = (generic, None) if isa == "generic" else _load(f"_C_{isa}")
    return mod, isa if mod is not None else "", dcodes, mcodes, built, supported, err


_C, CPU_ISA, _DTYPES, _METRICS, CPU_ISAS_BUILT, CPU_ISAS_SUPPORTED, _C_ERROR = _load_cpu()
_cuda, _CUDA_ERROR = (None, "disabled by PYFICI_NO_CUDA") if os.environ.get("PYFICI_NO_CUDA") == "1" else _load("_cuda")


def _code_tables():
    """DTYPE_CODES (torch dtype -> int) and METRIC_CODES (name -> int) from the native
    table (csrc/codes.h); every native module exports the same one."""
    dt, mt = _DTYPES, _METRICS
    if not dt and _cuda is not None:
        dt, mt = dict(_cuda.DTYPE_CODES), dict(_cuda.METRIC_CODES)
    return {getattr(torch, name): code for name, code in dt.items()}, dict(mt)


DTYPE_CODES, METRIC_CODES = _code_tables()


def cpu_error() -> str:
    """Why the CPU module is unavailable ("" when it is loaded)."""
    return "" if _C is not None else f"the CPU backend pyfici._C_<isa> is unavailable ({_C_ERROR})"


def cpu_module():
    """The CPU module of the chosen instruction-set variant, or a RuntimeError that
    says why it is unavailable and how to rebuild."""
    if _C is None:
        raise RuntimeError(f"{cpu_error()}; {REBUILD_HINT}")
    return _C


@contextlib.contextmanager
def use_isa(isa: str):
    """Run the CPU ops with the variant ``isa`` inside the block (tests use this to run
    every variant the machine supports in one process). Refuses a variant the CPU
    cannot run (ValueError), exactly as PYFICI_CPU_ISA does."""
    global _C, CPU_ISA
    generic, err = _load("_C_generic")
    if generic is None:
        raise RuntimeError(f"{cpu_error()}; {REBUILD_HINT}")
    select_isa(isa, cpu_feature_flags(), CPU_ISAS_BUILT)
    mod, err = _load(f"_C_{isa}")
    if mod is None:
        raise RuntimeError(f"pyfici._C_{isa} failed to load ({err})")
    saved = (_C, CPU_ISA)
    _C, CPU_ISA = mod, isa
    try:
        yield mod
    finally:
        _C, CPU_ISA = saved


# ---------------------------------------------------------------------------
# the CPU GEMM under the kNN tiles (docs/cpu_dispatch.md, "The GEMM")
# ---------------------------------------------------------------------------

GEMM_CHOICES = ("auto", "torch", "openblas")
OPENBLAS_PREFIX = "scipy_"  # symbol prefix of the scipy-openblas32 build (scipy_cblas_sgemm, ...)
_GEMM_FORCED: str | None = None  # set by use_gemm()
_OPENBLAS_CONFIG: dict[str, str] = {}  # module name -> the loaded OpenBLAS's configuration string
_OPENBLAS_PATH: tuple[str, str] | None = None  # (path, "") or ("", why it is unavailable), looked up once
_OPENBLAS_BAD: dict[str, str] = {}  # module name -> why its OpenBLAS is refused (failed gemm_probe)


def openblas_library() -> str:
    """Path of the OpenBLAS shared library of the ``scipy-openblas32`` package (how numpy
    and scipy ship OpenBLAS), or a RuntimeError that says how to get it."""
    global _OPENBLAS_PATH
    if _OPENBLAS_PATH is None:
        try:
            import scipy_openblas32

            lib = scipy_openblas32.get_library(fullname=True)
            _OPENBLAS_PATH = (os.path.join(scipy_openblas32.get_lib_dir(), lib), "")
        except (ImportError, OSError, IndexError) as e:
            _OPENBLAS_PATH = ("", f"the scipy-openblas32 package is not usable ({type(e).__name__}: {e}); install "
                              "it with `pip install scipy-openblas32` (wheels exist for x86-64 and aarch64 Linux)")
    if _OPENBLAS_PATH[1]:
        raise RuntimeError(_OPENBLAS_PATH[1])
    return _OPENBLAS_PATH[0]


def openblas_module():
    """The chosen CPU module with OpenBLAS loaded into it (dlopen from C++, once per module),
    or a RuntimeError with the reason. A library whose GEMM fails :func:`gemm_probe` (wrong
    results on this CPU) is refused: that reason is raised, and warned once."""
    mod = cpu_module()
    if mod.__name__ in _OPENBLAS_BAD:
        raise RuntimeError(_OPENBLAS_BAD[mod.__name__])
    if mod.__name__ not in _OPENBLAS_CONFIG:
        path = openblas_library()
        config = mod.gemm_load(path, OPENBLAS_PREFIX)
        seen = gemm_probe(functools.partial(_module_gemm, mod))
        if seen:
            why = (f"OpenBLAS ({config}) computed wrong products on this CPU in pyfici's GEMM check: {seen}; "
                   "torch.mm is used instead. OPENBLAS_CORETYPE chooses another of OpenBLAS's kernels (e.g. "
                   "NEOVERSEN1 or ARMV8 on aarch64, HASWELL on x86-64), PYFICI_GEMM=torch skips OpenBLAS")
            _OPENBLAS_BAD[mod.__name__] = why
            warnings.warn(why, RuntimeWarning, stacklevel=2)
            raise RuntimeError(why)
        _OPENBLAS_CONFIG[mod.__name__] = config
    return mod


def _module_gemm(mod, a: torch.Tensor, b: torch.Tensor, threads: int) -> torch.Tensor:
    """a @ b.T with the BLAS loaded into ``mod``, through the entry points the kernels use
    (gemm_nt with the BLAS's own threads, gemm_nt_omp with OpenMP row blocks)."""
    c = torch.full((a.shape[0], b.shape[0]), float("nan"), dtype=a.dtype)
    fn = mod.gemm_nt if threads == 1 else mod.gemm_nt_omp
    fn(DTYPE_CODES[a.dtype], a.shape[0], b.shape[0], a.shape[1], a.data_ptr(), b.data_ptr(), c.data_ptr(), threads)
    return c


# (M, N, K) of the check: odd sizes that leave partial register blocks in every direction,
# and one of several cache blocks deep enough for multi-block accumulation
GEMM_PROBE_SHAPES = ((1, 1, 1), (5, 7, 3), (37, 53, 29), (67, 131, 70), (130, 70, 300))


def gemm_probe(gemm) -> str:
    """"" when ``gemm(a, b, threads) -> a @ b.T`` is right to rounding on this CPU, else the
    first wrong case. Checked on the float32 and float64 products of
    :data:`GEMM_PROBE_SHAPES` (1 and 2 threads) against the elementwise float64 sum (no
    BLAS), with the standard bound ``|c - a.b| <= 2 K u sum |a_k b_k|`` (u the unit
    roundoff; a factor 2 of slack). Why: a BLAS kernel that is wrong on some CPU (e.g.
    OpenBLAS 0.3.34's ARMV9SME kernels, which returned NaN and wrong sums under qemu's
    aarch64 ``max`` CPU: docs/cpu_dispatch.md) would otherwise give wrong neighbours that no
    certificate can catch, since the certificates assume a GEMM that only rounds."""
    g = torch.Generator().manual_seed(0)
    for dtype, u in ((torch.float32, 2.0**-24), (torch.float64, 2.0**-53)):
        for M, N, K in GEMM_PROBE_SHAPES:
            a = torch.randn(M, K, generator=g, dtype=torch.float64)
            b = torch.randn(N, K, generator=g, dtype=torch.float64)
            a, b = a.to(dtype), b.to(dtype)
            prods = a.double()[:, None, :] * b.double()[None, :, :]
            exact = prods.sum(-1)
            bound = 2 * K * u * prods.abs().sum(-1)
            for threads in (1, 2):
                err = (gemm(a, b, threads).double() - exact).abs()
                if not bool((err <= bound).all()):  # NaN fails too
                    worst = "NaN" if bool(err.isnan().any()) else f"{float(err.max()):.3g}"
                    return (f"{str(dtype).replace('torch.', '')} {M}x{N}x{K} on {threads} thread(s): error "
                            f"{worst}, bound {float(bound.max()):.3g}")
    return ""


@functools.cache
def cpu_feature_flags() -> dict:
    """The running CPU's features (the generic module's cpu_features(), read once; {} when
    it is not built)."""
    generic, _ = _load("_C_generic")
    return dict(generic.cpu_features()) if generic is not None else {}


@functools.cache
def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) Processor", ...): /proc/cpuinfo's
    first "model name" on Linux, else platform.processor() or the machine type."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:  # not Linux
        names = []
    return names[0] if names else platform.processor() or platform.machine() or "unknown CPU"


@functools.cache
def cpu_vendor() -> str:
    """"intel", "amd" or "other" (from CPUID)."""
    f = cpu_feature_flags()
    return "intel" if f.get("intel") else "amd" if f.get("amd") else "other"


def openblas_error() -> str:
    """Why OpenBLAS cannot be used for the chosen CPU module ("" when it loads)."""
    try:
        openblas_module()
    except RuntimeError as e:
        return str(e)
    return ""


def auto_gemm(vendor: str, torch_has_mkl: bool, openblas_error: str) -> tuple[str, str]:
    """The rule behind PYFICI_GEMM=auto -> (provider, why): the OpenBLAS worker wherever
    OpenBLAS loads, torch.mm otherwise. Measured (``pyfici bench --family knn``, idle): on an
    Intel Xeon with AVX-512 the worker beats the torch.mm-per-tile path although MKL's bare
    GEMM is a little faster (the tile is scanned while in cache, no Python per tile); on an
    AMD EPYC OpenBLAS's GEMM itself is faster than MKL's. ``vendor`` and ``torch_has_mkl``
    only word the reason."""
    if not openblas_error:
        mkl = "" if torch_has_mkl else " (torch has no MKL)"
        cpu = {"intel": "Intel", "amd": "AMD"}.get(vendor)
        if cpu is None:  # aarch64, ...: the x86 rule, not measured there
            return "openblas", ("OpenBLAS loads: the tile worker measured faster than torch.mm tiles on Intel and "
                                f"AMD x86-64 CPUs (not measured on this one){mkl}")
        return "openblas", f"{cpu} CPU: the OpenBLAS tile worker measured faster than torch.mm tiles{mkl}"
    return "torch", f"OpenBLAS unavailable: {openblas_error}"


def _requested_gemm() -> str:
    """The GEMM provider asked for: use_gemm(), else PYFICI_GEMM, else "auto"."""
    return _GEMM_FORCED or os.environ.get("PYFICI_GEMM") or "auto"


def gemm_choice() -> tuple[str, str]:
    """(provider, why) of the CPU GEMM under the kNN tiles: "torch" (torch.mm, i.e. the BLAS
    torch links, driven tile by tile from Python) or "openblas" (the C++ worker with
    scipy-openblas32's OpenBLAS). ``PYFICI_GEMM=auto|torch|openblas`` (or use_gemm()) chooses;
    a forced choice that cannot be used raises (ValueError for an unknown name,
    RuntimeError when OpenBLAS cannot be loaded)."""
    requested = _requested_gemm()
    if requested not in GEMM_CHOICES:
        raise ValueError(f"PYFICI_GEMM={requested!r} is not one of {GEMM_CHOICES}")
    if requested == "torch":
        return "torch", "forced (PYFICI_GEMM=torch)"
    if requested == "openblas":
        err = openblas_error()
        if err:
            raise RuntimeError(f"PYFICI_GEMM=openblas: OpenBLAS cannot be used ({err})")
        return "openblas", "forced (PYFICI_GEMM=openblas)"
    return auto_gemm(cpu_vendor(), torch.backends.mkl.is_available(), openblas_error())


def gemm_provider() -> str:
    """"torch" or "openblas": see gemm_choice()."""
    return gemm_choice()[0]


def auto_tile_gemm(vendor: str, torch_has_mkl: bool, openblas_error: str) -> tuple[str, str]:
    """The PYFICI_GEMM=auto rule for whole distance tiles scanned afterwards (evaluate's
    tiles, rerank's panels; :func:`pyfici.backends.gemm.mm_nt`) -> (provider, why):
    torch.mm on an Intel CPU with torch's MKL, else OpenBLAS where it loads. Measured
    on an Intel Xeon with AVX-512 (idle, 1054 x 15913 x 2048 and 1024 x 19281 x 2048
    products): MKL's GEMM as fast as OpenBLAS's own threads and 2-5% faster than
    OpenBLAS on OpenMP row blocks, and evaluate / rerank were slower with OpenBLAS
    under their scan. On an AMD EPYC (Zen 4, idle): OpenBLAS's GEMM 1.45-1.55x faster than
    MKL's (20,000 x 100,000 x 512), and evaluate / rerank faster on OpenBLAS tiles
    (1.28 s vs MKL tiles' GEMM alone 2.00 s; 5.11 s vs 6.46 s)."""
    if openblas_error:
        return "torch", f"OpenBLAS unavailable: {openblas_error}"
    if vendor == "intel" and torch_has_mkl:
        return "torch", "Intel CPU with MKL: MKL's GEMM measured at least as fast for whole tiles"
    mkl = " (torch has no MKL)" if not torch_has_mkl else ""
    if vendor != "amd":  # aarch64, ...: not measured there
        return "openblas", f"OpenBLAS loads{mkl}: its GEMM measured faster on AMD x86-64 (not measured on this CPU)"
    return "openblas", f"AMD CPU{mkl}: OpenBLAS's GEMM is the faster one"


def tile_gemm_choice() -> tuple[str, str]:
    """(provider, why) for whole tiles (mm_nt): PYFICI_GEMM when forced (a forced
    choice that cannot be used raises, as for :func:`gemm_choice`), else
    :func:`auto_tile_gemm`."""
    choice = gemm_choice()  # validates and applies a forced choice
    if _requested_gemm() != "auto":
        return choice
    return auto_tile_gemm(cpu_vendor(), torch.backends.mkl.is_available(), openblas_error())


def tile_gemm_provider() -> str:
    """"torch" or "openblas": see tile_gemm_choice()."""
    return tile_gemm_choice()[0]


@contextlib.contextmanager
def use_gemm(name: str):
    """Run the CPU ops with the GEMM provider ``name`` (auto, torch, openblas) inside the
    block, as PYFICI_GEMM does; a choice that cannot be used raises on entry."""
    global _GEMM_FORCED
    saved = _GEMM_FORCED
    _GEMM_FORCED = name
    try:
        gemm_choice()
        yield name
    finally:
        _GEMM_FORCED = saved


def gemm_info() -> str:
    """One line for ``pyfici info``: the provider in use, why, and the library."""
    try:
        name, why = gemm_choice()
    except (ValueError, RuntimeError) as e:
        return f"unusable: {e}"
    if name == "openblas":
        lib = _OPENBLAS_CONFIG.get(cpu_module().__name__, "")
        return f"openblas ({why}; {lib})"
    blas = "MKL" if torch.backends.mkl.is_available() else "torch's BLAS"
    return f"torch.mm ({blas}; {why})"


def tile_gemm_info() -> str:
    """One line for ``pyfici info``: the provider of whole distance tiles (mm_nt) and why."""
    try:
        name, why = tile_gemm_choice()
    except (ValueError, RuntimeError) as e:
        return f"unusable: {e}"
    return f"{'openblas' if name == 'openblas' else 'torch.mm'} ({why})"


# ---------------------------------------------------------------------------
# the kNN selection pass in bfloat16 (docs/ops_knn.md, "The bfloat16 selection")
# ---------------------------------------------------------------------------

KNN_BF16_CHOICES = ("auto", "on", "off")
_KNN_BF16_FORCED: str | None = None  # set by use_knn_bf16()


@functools.cache
def knn_bf16_probe() -> str:
    """"" when torch's CPU bfloat16 GEMM (torch.mm of bfloat16 matrices) follows the error
    model the bf16 certificate assumes (float32 accumulation of the exact bf16 products,
    one rounding to bfloat16 at the end: ``|s - x.y| <= u_b |x.y| + (1 + u_b) g_D sum |x_d y_d|``
    with ``u_b = 2^-8``, ``g_D = D 2^-24 / (1 - D 2^-24)``), else what was seen. Checked once
    per process on positive data (partial sums only grow, so any intermediate rounding of a
    partial sum to bfloat16 would show) at a depth with several K blocks."""
    g = torch.Generator().manual_seed(0)
    D = 1500
    a = (torch.rand(64, D, generator=g) + 0.25).bfloat16()
    b = (torch.rand(160, D, generator=g) + 0.25).bfloat16()
    try:
        s = torch.mm(a, b.T)
    except RuntimeError as e:
        return f"torch.mm of bfloat16 matrices failed on the CPU ({e})"
    if s.dtype != torch.bfloat16:
        return f"torch.mm of bfloat16 matrices returned {s.dtype}"
    ad, bd = a.double(), b.double()
    exact = ad @ bd.T
    gam = D * 2.0**-24 / (1 - D * 2.0**-24)
    bound = 2.0**-8 * exact.abs() + (1 + 2.0**-8) * gam * (ad.abs() @ bd.abs().T)
    worst = float(((s.double() - exact).abs() / bound).max())
    if not worst <= 1.0:
        return f"torch's bfloat16 GEMM rounds more than once (error {worst:.2f}x the one-rounding bound)"
    return ""


def auto_knn_bf16(features: dict, mkldnn: bool, probe_error: str) -> tuple[bool, str]:
    """The PYFICI_KNN_BF16=auto rule -> (on, why): the bfloat16 selection pass on a CPU with
    bfloat16 matrix instructions (AMX-BF16 or AVX512-BF16) where torch has oneDNN and its
    bfloat16 GEMM passes :func:`knn_bf16_probe`. Measured on an Intel Xeon with AMX
    (``pyfici bench --family knn``): torch's bf16 GEMM runs 2 TFLOP/s on 2 cores against
    0.24 for float32. Elsewhere bfloat16 is emulated and slower than float32."""
    hw = "AMX-BF16" if features.get("amx_bf16") else "AVX512-BF16" if features.get("avx512bf16") else ""
    if not hw:
        return False, "no bfloat16 matrix instructions (AMX-BF16 / AVX512-BF16) on this CPU"
    if not mkldnn:
        return False, "torch has no oneDNN (mkldnn), so no fast bfloat16 GEMM"
    if probe_error:
        return False, probe_error
    return True, f"{hw}: torch's bfloat16 GEMM (oneDNN) selects the candidates"


def knn_bf16_choice() -> tuple[bool, str, bool]:
    """(on, why, forced) for the CPU kNN selection pass: PYFICI_KNN_BF16=auto|on|off (or
    use_knn_bf16()); "on" runs it on any CPU (exact results everywhere; fast only with
    bfloat16 hardware) and raises RuntimeError if torch's bf16 GEMM fails the probe (the
    certificate would not hold); auto: :func:`auto_knn_bf16`, and only for products big
    enough to repay the conversions (pyfici.backends.knn.BF16_MIN_WORK)."""
    requested = _KNN_BF16_FORCED or os.environ.get("PYFICI_KNN_BF16") or "auto"
    if requested not in KNN_BF16_CHOICES:
        raise ValueError(f"PYFICI_KNN_BF16={requested!r} is not one of {KNN_BF16_CHOICES}")
    if requested == "off":
        return False, "forced (PYFICI_KNN_BF16=off)", True
    if requested == "on":
        err = knn_bf16_probe()
        if err:
            raise RuntimeError(f"PYFICI_KNN_BF16=on: the bfloat16 selection cannot be certified here ({err})")
        return True, "forced (PYFICI_KNN_BF16=on)", True
    features = cpu_feature_flags()
    on, why = auto_knn_bf16(features, torch.backends.mkldnn.is_available(), "")
    if on:  # the probe only where the rule would use it
        on, why = auto_knn_bf16(features, True, knn_bf16_probe())
    return on, why, False


@contextlib.contextmanager
def use_knn_bf16(mode: str):
    """Run the CPU kNN ops with PYFICI_KNN_BF16=``mode`` (auto, on, off) inside the block;
    a choice that cannot be used raises on entry."""
    global _KNN_BF16_FORCED
    saved = _KNN_BF16_FORCED
    _KNN_BF16_FORCED = mode
    try:
        knn_bf16_choice()
        yield mode
    finally:
        _KNN_BF16_FORCED = saved


def knn_bf16_info() -> str:
    """One line for ``pyfici info``: whether the kNN selection runs in bfloat16, and why."""
    try:
        on, why, _ = knn_bf16_choice()
    except (ValueError, RuntimeError) as e:
        return f"unusable: {e}"
    return f"{'bf16' if on else 'float32'} ({why})"


def cuda_module():
    """The CUDA module, or a RuntimeError that says how to rebuild."""
    if _cuda is None:
        raise RuntimeError(
            f"pyfici._cuda (the CUDA backend) is not built or failed to load ({_CUDA_ERROR}); {REBUILD_HINT}"
        )
    return _cuda


def has_cpu() -> bool:
    return _C is not None


def has_cuda() -> bool:
    return _cuda is not None


def has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def num_threads() -> int:
    return max(1, torch.get_num_threads())


def stream_ptr(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def info() -> dict:
    """What is built and importable, for ``pyfici info``."""
    import pyfici

    d: dict = {
        "pyfici": pyfici.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        "cpu_model": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        d["triton"] = triton.__version__
    except Exception as e:
        d["triton"] = f"not importable ({type(e).__name__})"
    d["backend_cpu"] = (
        f"built ({_C.__compiler__}, OpenMP max threads {_C.max_threads()})" if _C else f"missing: {_C_ERROR}"
    )
    d["cpu_isa"] = CPU_ISA or "none"
    d["cpu_isas_built"] = ", ".join(CPU_ISAS_BUILT) or "none"
    d["cpu_isas_supported"] = ", ".join(CPU_ISAS_SUPPORTED) or "none"
    d["cpu_gemm"] = gemm_info() if _C is not None else "none (no CPU module)"
    d["cpu_tile_gemm"] = tile_gemm_info() if _C is not None else "none (no CPU module)"
    d["cpu_knn_select"] = knn_bf16_info() if _C is not None else "none (no CPU module)"
    if _cuda is not None:
        d["backend_cuda"] = f"built (archs {_cuda.__archs__}, cudart {_cuda.runtime_version()})"
    else:
        d["backend_cuda"] = f"missing: {_CUDA_ERROR}"
    d["backend_triton"] = "importable" if has_triton() else "missing (pip install triton)"
    d["backend_torch"] = "always"
    return d
