"""Gallery sharded over torch.distributed (gloo, 2 CPU processes).

The ranks meet through a FileStore in the test's tmp dir, not a TCPStore on a free
port: a port picked by one process can be taken by another before rank 0 binds it,
and a CI run once aborted rank 0, the TCPStore's host, at teardown ("terminate
called without an active exception", SIGABRT; not reproduced locally). Both
ranks also pass a barrier before destroying the group, so neither tears down while
the other still has a collective in flight.
"""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyfici.ops import knn, knn_average, reference


def _worker(rank: int, world: int, init: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(23, 9, generator=gen, dtype=torch.float64)
        y = torch.randn(101, 9, generator=gen, dtype=torch.float64)
        # uneven shards, plus duplicates across the shard boundary (ties -> lower global index)
        y[60] = y[10]
        cut = 47
        shard = y[:cut] if rank == 0 else y[cut:]
        for backend in ("cpu", "torch"):
            _run(x, y, shard, backend, os.path.join(out_dir, f"{backend}-rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run(x, y, shard, backend, path):
    gen = torch.Generator().manual_seed(1)
    res = {}
    for metric in ("sqeuclidean", "cosine", "ip"):
        res[f"knn-{metric}"] = tuple(knn(x, shard, 7, metric=metric, sharded=True, tile=256, backend=backend))
        res[f"self-{metric}"] = tuple(knn(y[:23], shard, 5, metric=metric, exclude_self=True, sharded=True,
                                          backend=backend))
    w = torch.rand(7, generator=gen, dtype=torch.float64)
    res["avg"] = knn_average(x, shard, 7, sharded=True, backend=backend)
    res["avg-w"] = knn_average(x, shard, 7, weights=w, spherical=False, metric="sqeuclidean", sharded=True,
                               backend=backend)
    res["w"] = w
    # k larger than one shard but not the whole gallery
    res["bigk"] = tuple(knn(x, shard, 80, sharded=True, backend=backend))
    try:
        knn(x, shard, 102, sharded=True, backend=backend)
        res["err"] = ""
    except ValueError as e:
        res["err"] = str(e)
    torch.save(res, path)


def test_sharded_knn_gloo_two_processes(tmp_path):
    init = (tmp_path / "pg").resolve().as_uri()
    mp.spawn(_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(23, 9, generator=gen, dtype=torch.float64)
    y = torch.randn(101, 9, generator=gen, dtype=torch.float64)
    y[60] = y[10]
    for backend, rank in [(b, r) for b in ("cpu", "torch") for r in range(2)]:
        res = torch.load(tmp_path / f"{backend}-rank{rank}.pt", weights_only=True)
        for metric in ("sqeuclidean", "cosine", "ip"):
            rv, ri = reference.knn(x, y, 7, metric)
            v, i = res[f"knn-{metric}"]
            assert torch.equal(i, ri), (rank, metric)
            assert torch.allclose(v, rv)
            rv, ri = reference.knn(y[:23], y, 5, metric, exclude_self=True)
            v, i = res[f"self-{metric}"]
            assert torch.equal(i, ri), (rank, metric, "self")
        assert torch.allclose(res["avg"], reference.knn_average(x, y, 7, "cosine", True))
        assert torch.allclose(res["avg-w"], reference.knn_average(x, y, 7, "sqeuclidean", False, res["w"]))
        assert torch.equal(res["bigk"][1], reference.knn(x, y, 80)[1])
        assert "k: must be in [1, 101]" in res["err"]
