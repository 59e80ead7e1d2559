"""Benchmarks of family 2 (exact kNN, k-nearest averaging, k-Same) against what
users run today: the bare GEMM alone with each CPU BLAS (chunked ``torch.mm``, i.e.
MKL where torch links it, and OpenBLAS from scipy-openblas32 through pyfici's loader,
same chunks; the floor), chunked ``torch.mm`` + ``topk`` + gather + mean, and
faiss-cpu ``IndexFlatIP.search`` + mean; pyfici itself with each GEMM provider
(``PYFICI_GEMM``), and, where the default runs the bfloat16 selection pass
(``PYFICI_KNN_BF16``), the float32 pass on each provider and the bare bfloat16 GEMM. Unit-norm embeddings (as FICGAN's identity codes), cosine / inner
product, k = 10. The peak memory knn_average adds beyond its inputs and output is
measured in a fresh process per provider and printed (and kept in the case note)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys

import torch

from pyfici import _native
from pyfici.bench import Case
from pyfici.deid import k_same
from pyfici.ops import knn, knn_average

# (Q, G, D, k) for knn_average; N for k_same
SIZES = {
    "small": {"avg": (2000, 10000, 512, 10), "ksame": 10000},
    "full": {"avg": (20000, 100000, 512, 10), "ksame": 100000},
    "small-cuda": {"avg": (50000, 50000, 512, 10), "ksame": 0},
    "full-cuda": {"avg": (1000000, 1000000, 512, 10), "ksame": 0},
}
CHUNK = 1024  # query rows per torch.mm chunk in the anchors ([1024, G] float32 output)
MEASURE_MEMORY = True  # the knn_average case measures its peak extra memory (one extra run per GEMM)


def unit_rows(n: int, d: int, seed: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1).to(device)


def mm_alone(x: torch.Tensor, y: torch.Tensor, chunk: int = CHUNK):
    out = torch.empty((min(chunk, x.shape[0]), y.shape[0]), dtype=x.dtype, device=x.device)

    def run():
        for q0 in range(0, x.shape[0], chunk):
            xq = x[q0 : q0 + chunk]
            torch.mm(xq, y.T, out=out[: xq.shape[0]])
        return out

    return run


def openblas_alone(x: torch.Tensor, y: torch.Tensor, chunk: int = CHUNK):
    """The same chunked product as mm_alone with OpenBLAS (multi-threaded), or None."""
    try:
        mod = _native.openblas_module()
    except RuntimeError:
        return None
    out = torch.empty((min(chunk, x.shape[0]), y.shape[0]), dtype=x.dtype)
    code, G, D, threads = _native.DTYPE_CODES[x.dtype], y.shape[0], x.shape[1], torch.get_num_threads()

    def run():
        for q0 in range(0, x.shape[0], chunk):
            rows = min(chunk, x.shape[0] - q0)
            mod.gemm_nt(code, rows, G, D, x[q0].data_ptr(), y.data_ptr(), out.data_ptr(), threads)
        return out

    return run


def with_gemm(name: str, fn, knn_bf16: str | None = None):
    """fn run with the GEMM provider ``name`` (and PYFICI_KNN_BF16=knn_bf16 when given; else
    the process's own choice, so that a PYFICI_KNN_BF16 set by the user holds for every row)."""
    def run():
        bf16 = _native.use_knn_bf16(knn_bf16) if knn_bf16 else contextlib.nullcontext()
        with _native.use_gemm(name), bf16:
            return fn()

    return run


def bf16_selection(Q: int, G: int, D: int) -> bool:
    """Whether pyfici's default CPU kNN runs the bfloat16 selection pass at this size."""
    from pyfici.backends import knn as kb

    return kb.use_bf16(torch.float32, Q, G, D, "cpu")


def variants(Q: int, G: int, D: int) -> tuple[str, list[tuple[str, str, str | None]]]:
    """(label of the default CPU path, [(label, gemm, PYFICI_KNN_BF16 or None)] of the other
    paths worth timing): with the bf16 selection the default, the float32 selection on each
    GEMM provider; else the providers other than the default."""
    if bf16_selection(Q, G, D):
        return "bf16 selection", [(f"float32 selection, gemm {g}", g, "off") for g in gemm_providers()]
    return f"gemm {_native.gemm_provider()}", [
        (f"gemm {g}", g, None) for g in gemm_providers() if g != _native.gemm_provider()]


def mm_alone_bf16(x: torch.Tensor, y: torch.Tensor, chunk: int = CHUNK):
    """mm_alone on bfloat16 copies of the inputs (made once, outside the timing): the floor of
    the bf16 selection pass."""
    xb, yb = x.bfloat16(), y.bfloat16()
    return mm_alone(xb, yb, chunk)


def gemm_providers() -> list[str]:
    """The CPU GEMM providers usable here (torch always)."""
    return ["torch"] + ([] if _native.openblas_error() else ["openblas"])


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


def measure_peak_extra(Q: int, G: int, D: int, k: int) -> None:
    """Prints the peak resident memory (MB) one knn_average call adds to this process: the
    peak is reset (/proc/self/clear_refs, Linux) after the inputs exist and a small call
    has loaded every library, so only the call's own buffers count."""
    import gc

    from pyfici.ops import knn_average

    x = unit_rows(Q, D, 0, "cpu")
    y = unit_rows(G, D, 1, "cpu")
    knn_average(x[:64], y[:4096], k, metric="cosine", check_values=False)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS")
    out = knn_average(x, y, k, metric="cosine", check_values=False)
    extra_kb = _status_kb("VmHWM") - base - out.numel() * out.element_size() // 1024
    print(f"{extra_kb / 1024:.1f}")


def peak_extra_mb(Q: int, G: int, D: int, k: int, gemm: str, knn_bf16: str | None = None) -> str:
    """measure_peak_extra in a fresh process with PYFICI_GEMM=gemm (and PYFICI_KNN_BF16 when
    given): '<MB> MB' or why not."""
    if not os.path.exists("/proc/self/clear_refs"):
        return "n/a (needs Linux /proc)"
    code = f"from pyfici.benchcases.knn import measure_peak_extra as m; m({Q}, {G}, {D}, {k})"
    env = dict(os.environ, PYFICI_GEMM=gemm)
    if knn_bf16:
        env["PYFICI_KNN_BF16"] = knn_bf16
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        return f"n/a ({r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode})"
    return f"{float(r.stdout.split()[-1]):.0f} MB"


def mm_topk_mean(x: torch.Tensor, y: torch.Tensor, k: int, chunk: int = CHUNK):
    out = torch.empty((min(chunk, x.shape[0]), y.shape[0]), dtype=x.dtype, device=x.device)
    res = torch.empty_like(x)

    def run():
        for q0 in range(0, x.shape[0], chunk):
            xq = x[q0 : q0 + chunk]
            s = torch.mm(xq, y.T, out=out[: xq.shape[0]])
            idx = s.topk(k, dim=1).indices
            res[q0 : q0 + chunk] = torch.nn.functional.normalize(y[idx].sum(1), dim=1)
        return res

    return run


def faiss_search_mean(x: torch.Tensor, y: torch.Tensor, k: int):
    try:
        import faiss  # type: ignore
    except Exception:
        return None
    faiss.omp_set_num_threads(torch.get_num_threads())
    xn, yn = x.numpy(), y.numpy()
    index = faiss.IndexFlatIP(y.shape[1])
    index.add(yn)

    def run():
        _, idx = index.search(xn, k)
        nb = y[torch.from_numpy(idx)]
        return torch.nn.functional.normalize(nb.sum(1), dim=1)

    return run


def cases(size: str, device: str) -> list[Case]:
    key = size if device == "cpu" else f"{size}-cuda"
    Q, G, D, k = SIZES[key]["avg"]
    full = size == "full"
    out: list[Case] = []

    ours = "pyfici knn_average"
    default, others = variants(Q, G, D) if device == "cpu" else ("", [])
    if device == "cpu":
        ours += f" ({default})"
    avg_case = Case("knn", f"knn_average Q={Q} G={G} D={D} k={k}", lambda: setup_avg(), ours=ours,
                    note="cosine, unit-norm rows", repeats=2 if full else 3)

    def setup_avg():
        x = unit_rows(Q, D, 0, device)
        y = unit_rows(G, D, 1, device)
        fns = {ours: lambda: knn_average(x, y, k, metric="cosine", check_values=False)}
        if device == "cpu":
            mem = []
            runs = [(default, _native.gemm_provider(), None)] + others
            for label, gemm, bf16 in runs:
                if MEASURE_MEMORY:
                    mb = peak_extra_mb(Q, G, D, k, gemm, bf16)
                    mem.append(f"{label}: {mb}")
                    print(f"[bench]   knn_average peak extra memory, {label}: {mb}", file=sys.stderr, flush=True)
            for label, gemm, bf16 in others:
                fns[f"pyfici knn_average ({label})"] = with_gemm(
                    gemm, lambda: knn_average(x, y, k, metric="cosine", check_values=False), bf16)
            if mem:
                avg_case.note = f"cosine, unit-norm rows; peak extra memory {', '.join(mem)}"
        fns["chunked torch.mm alone"] = mm_alone(x, y)
        if device == "cpu":
            f = openblas_alone(x, y)
            if f is not None:
                fns["chunked OpenBLAS sgemm alone"] = f
            if default == "bf16 selection":
                fns["chunked torch.mm alone, bfloat16 inputs"] = mm_alone_bf16(x, y)
        fns["torch.mm + topk + gather + mean"] = mm_topk_mean(x, y, k)
        if device == "cpu":
            f = faiss_search_mean(x, y, k)
            if f is not None:
                fns["faiss IndexFlatIP.search + mean"] = (f, 1) if full else f
        return fns

    out.append(avg_case)

    def setup_knn():
        x = unit_rows(Q, D, 0, device)
        y = unit_rows(G, D, 1, device)

        def topk_only():
            buf = torch.empty((min(CHUNK, Q), G), device=device)
            vals, idx = [], []
            for q0 in range(0, Q, CHUNK):
                xq = x[q0 : q0 + CHUNK]
                v, i = torch.mm(xq, y.T, out=buf[: xq.shape[0]]).topk(k, dim=1)
                vals.append(v)
                idx.append(i)
            return torch.cat(vals), torch.cat(idx)

        fns = {"pyfici knn (ip)": lambda: knn(x, y, k, metric="ip", check_values=False)}
        for label, gemm, bf16 in others:
            fns[f"pyfici knn (ip, {label})"] = with_gemm(gemm, lambda: knn(x, y, k, metric="ip", check_values=False),
                                                       bf16)
        fns["torch.mm + topk"] = topk_only
        return fns

    out.append(Case("knn", f"knn ip Q={Q} G={G} D={D} k={k}", setup_knn, ours="pyfici knn (ip)",
                    note=default, repeats=2 if full else 3))

    N = SIZES[key]["ksame"]
    if N and device == "cpu":

        def setup_ksame():
            e = unit_rows(N, D, 2, device)
            return {
                "pyfici k_same (greedy)": lambda: k_same(e, k),
                "one all-vs-all knn pass": lambda: knn(e, e, k, metric="cosine", check_values=False),
            }

        out.append(Case("knn", f"k_same N={N} D={D} k={k}", setup_ksame, ours="pyfici k_same (greedy)",
                        note="target: <= 0.35x one all-vs-all knn pass (lists only for the ~N/k seeds)", repeats=1 if full else 3, warmup=0 if full else 1))
    return out
