"""Does a trained FICGAN generator follow its identity code? ``python -m pyfici.methods.ficgan.probe CKPT``.

A de-identifier that ignores its identity code reproduces the source face
whatever surrogate it is given (the failure of runs A-C in docs/ficgan.md), so
the k-Same guarantee of the code never reaches the image. Two checks, both
with the model's own identity encoder:

- **swap probe**: every face is generated with the code of the face ``shift``
  places on. Reported: the mean centred cosine of E_id(output) with the
  swapped code and with the source code, and the share of outputs whose
  nearest original (raw cosine) is the target / the source. A generator that
  follows its code has a high first cosine and ``nearest_is_target`` near 1.
- **k-Same outputs**: the faces de-identified with their cluster's surrogate
  (as ``pyfici deid`` does, degree 1, all levels). Reported per k: the share
  whose nearest original is the source (the re-identification rate by the
  training recognizer), the share whose nearest original is in the own cluster,
  and how often the outputs of one cluster pick the same original (1.0 would
  mean the attribute path adds nothing the recognizer uses).
"""

from __future__ import annotations

import argparse
import json

import torch


@torch.no_grad()
def identity_probe(model, x: torch.Tensor, shift: int = 17, ks=(2, 5, 10), seed: int = 0) -> dict:
    """``model``: a :class:`~pyfici.methods.ficgan.FICGAN` in eval mode; ``x``:
    faces ``[N, 3, S, S]`` in [-1, 1], N >= 2, each its own identity."""
    from pyfici.methods.ficgan.deid import k_same_partition

    n = len(x)
    if n < 2:
        raise ValueError(f"x: need at least 2 faces, got {n}")
    z = model.identity(x)
    c = model.center_codes(z)
    perm = torch.roll(torch.arange(n), shift % n or 1)
    out = model.generate(x, c[perm], centered=True)
    e = model.identity(out)
    ec = model.center_codes(e)
    near = (e @ z.T).argmax(1)
    res = {"n": n, "shift": int(shift % n or 1),
           "swap_cos_to_target": float((ec * c[perm]).sum(1).mean()),
           "swap_cos_to_source": float((ec * c).sum(1).mean()),
           "nearest_is_target": float((near == perm).float().mean()),
           "nearest_is_source": float((near == torch.arange(n)).float().mean()),
           "k_same": {}}
    for k in ks:
        if k > n:
            continue
        part = k_same_partition(c, k, seed)
        a = part.assignment
        o = model.generate(x, part.surrogates[a], centered=True)
        nn_ = (model.identity(o) @ z.T).argmax(1)
        same = []
        for cl in range(len(part.sizes)):
            members = (a == cl).nonzero().flatten()
            picks = nn_[members]
            same.append(float((picks == picks.mode().values).float().mean()))
        res["k_same"][int(k)] = {"nearest_is_source": float((nn_ == torch.arange(n)).float().mean()),
                                 "nearest_in_own_cluster": float((a[nn_] == a).float().mean()),
                                 "cluster_outputs_pick_same_original": sum(same) / len(same)}
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyfici.methods.ficgan.probe", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--input", default="builtin", help="folder of aligned faces, or 'builtin'")
    p.add_argument("--shift", type=int, default=17)
    a = p.parse_args(argv)
    from pyfici.methods.ficgan.data import load_face_folder
    from pyfici.methods.ficgan.train import load_ficgan

    model = load_ficgan(a.checkpoint)
    x, _ = load_face_folder(a.input, model.cfg.size)
    print(json.dumps(identity_probe(model, x, a.shift), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
