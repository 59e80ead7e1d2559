"""evaluate(..., sharded=True): the gallery split over 2 gloo processes gives the
numbers of one process on the whole gallery."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pyfici.reid import evaluate

WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.distributed as dist
    from pyfici.reid import evaluate

    rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    data = torch.load(sys.argv[5], weights_only=True)
    cuts = data["cuts"]
    a, b = cuts[rank], cuts[rank + 1]
    res = {}
    for metric in ("euclidean", "cosine"):
        for protocol in ("torchreid", "market1501"):
            for tile in (None, 7):
                r = evaluate(data["q"], data["g"][a:b], data["qp"], data["gp"][a:b], data["qc"], data["gc"][a:b],
                             metric=metric, protocol=protocol, max_rank=20, tile=tile, sharded=True)
                res[f"{metric} {protocol} {tile}"] = [r.mAP, r.mINP, r.cmc.tolist(), r.num_valid,
                                                      r.per_query_ap.tolist()]
    if rank == 0:
        try:
            evaluate(data["q"], data["g"][a:b], data["qp"], data["gp"][a:b], data["qc"], data["gc"][a:b],
                     protocol="cuhk03", sharded=True)
        except ValueError as e:
            res["cuhk03 error"] = str(e)
    with open(out, "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()
""")


def _data(tmp_path):
    g = torch.Generator().manual_seed(11)
    Q, G, D = 37, 233, 12
    data = {
        "q": torch.randn(Q, D, generator=g), "g": torch.randn(G, D, generator=g),
        "qp": torch.randint(0, 15, (Q,), generator=g), "gp": torch.randint(-1, 15, (G,), generator=g),
        "qc": torch.randint(0, 4, (Q,), generator=g), "gc": torch.randint(0, 4, (G,), generator=g),
        "cuts": [0, 101, G],  # uneven slices
    }
    # exact duplicates across the two slices: ties must go to the lower global index as in one process
    data["g"][150] = data["g"][3]
    data["g"][200] = data["g"][40]
    torch.save(data, tmp_path / "data.pt")
    return data


def test_sharded_evaluate_equals_one_process(tmp_path):
    data = _data(tmp_path)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    init = (tmp_path / "pg").resolve().as_uri()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", init, str(tmp_path / f"out{r}.json"),
                               str(tmp_path / "data.pt")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    outs = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(2)]
    assert "not available with sharded=True" in outs[0].pop("cuhk03 error")
    assert outs[0] == outs[1]  # every rank reports the same numbers
    for key, (m, inp, cmc, nv, aps) in outs[0].items():
        metric, protocol, _ = key.split()
        ref = evaluate(data["q"], data["g"], data["qp"], data["gp"], data["qc"], data["gc"], metric=metric,
                       protocol=protocol, max_rank=20)
        assert nv == ref.num_valid, key
        assert m == pytest.approx(ref.mAP, abs=1e-12), key
        assert inp == pytest.approx(ref.mINP, abs=1e-12), key
        assert cmc == pytest.approx(ref.cmc.tolist(), abs=1e-12), key
        assert torch.allclose(torch.tensor(aps, dtype=torch.float64), ref.per_query_ap, equal_nan=True, atol=1e-12)


def test_sharded_needs_a_process_group():
    with pytest.raises(ValueError, match="sharded: needs an initialised torch.distributed process group"):
        evaluate(torch.randn(3, 4), torch.randn(5, 4), [0, 1, 2], [0, 1, 2, 0, 1], [0, 0, 0], [1, 1, 1, 1, 1],
                 sharded=True)
