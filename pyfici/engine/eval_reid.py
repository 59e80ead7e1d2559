"""``pyfici eval reid``: evaluate a trained model or saved features.

Inputs (one of):

- ``--checkpoint FILE``: ``final.pt`` or ``checkpoint.pt`` of any pyfici
  method that trains a feature extractor (AutoLR, rolling-back); the network
  is rebuilt from the file's ``model_spec`` (backbone, classes, pruned blocks,
  input size) and evaluated on ``--dataset`` (any ReID reader, or a retrieval
  reader for Recall@K; ``builtin`` means the method's own built-in set).
- ``--features FILE``: a torch file (``weights_only``) holding
  ``{"query": {"feats", "pids", "camids"}, "gallery": {...}}`` with ``feats``
  (N, D) float and ``pids`` / ``camids`` (N,) integers.

The result goes to stdout (a short table) or ``--json PATH|-``; with ``--out``
it is also written to ``OUT/eval.json``. ``--visualize N`` (needs ``--out``)
draws the top-10 gallery images of the first N queries
(``pyfici.reid.visualize_ranked_results``: ``OUT/ranked/index.html``); with
``--features`` the file's parts must then also hold ``paths`` (image files).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings

from pyfici.engine.config import add_json_argument, count_type, emit_json
from pyfici.engine.errors import UserError, require, user_errors
from pyfici.engine.files import load_checkpoint, write_json
from pyfici.engine.runtime import DEVICE_HELP, resolve_device

REID_KINDS = ("rollback", "autolr")


def _dataset_choices() -> list[str]:
    from pyfici.data.reid import REID_DATASETS
    from pyfici.data.retrieval import RETRIEVAL_DATASETS

    return list(dict.fromkeys([*REID_DATASETS, *RETRIEVAL_DATASETS]))


def add_arguments(p: argparse.ArgumentParser) -> None:
    from pyfici.reid import PROTOCOLS

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="FILE", help="final.pt or checkpoint.pt of pyfici train autolr / rollback")
    src.add_argument("--features", metavar="FILE", help="saved features: {'query': {feats, pids, camids}, 'gallery': {...}}")
    p.add_argument("--dataset", default=None, choices=_dataset_choices(),
                   help="dataset to evaluate on (default: the checkpoint's own)")
    p.add_argument("--root", default=None, help="dataset folder (not needed for builtin)")
    p.add_argument("--protocol", default="market1501", choices=list(PROTOCOLS), help="ReID protocol (default market1501)")
    p.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking")
    p.add_argument("--max-rank", type=count_type(1), default=50, help="CMC ranks kept (default 50)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--batch-size", type=count_type(1), default=64, help="feature-extraction batch size (default 64)")
    p.add_argument("--workers", type=count_type(0), default=0, help="data-loading worker processes (default 0)")
    p.add_argument("--out", default=None, help="also write OUT/eval.json (and OUT/ranked/ with --visualize)")
    p.add_argument("--visualize", type=count_type(1), default=None, metavar="N",
                   help="draw the ranked gallery of the first N queries into OUT/ranked/ (needs --out)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_json_argument(p)


def load_features(path: str) -> dict:
    """Read and check a ``--features`` file; returns ``{"query": {...}, "gallery": {...}}`` of tensors."""
    import torch

    d = load_checkpoint(path, what="--features")
    out = {}
    for part in ("query", "gallery"):
        sub = d.get(part)
        if not isinstance(sub, dict) or not all(k in sub for k in ("feats", "pids", "camids")):
            raise UserError(f"--features {path}: needs {part} = {{'feats', 'pids', 'camids'}}")
        f, p, c = (torch.as_tensor(sub[k]) for k in ("feats", "pids", "camids"))
        if f.ndim != 2 or not f.is_floating_point() or p.shape != (f.shape[0],) or c.shape != (f.shape[0],):
            raise UserError(f"--features {path}: {part} feats must be (N, D) float with (N,) pids and camids, got "
                            f"{tuple(f.shape)} {f.dtype}, {tuple(p.shape)}, {tuple(c.shape)}")
        paths = sub.get("paths")
        if paths is not None and (not isinstance(paths, (list, tuple)) or len(paths) != f.shape[0]):
            raise UserError(f"--features {path}: {part} paths must be a list of {f.shape[0]} image files")
        out[part] = (f.float(), p, c, paths)
    if out["query"][0].shape[1] != out["gallery"][0].shape[1]:
        raise UserError(f"--features {path}: query and gallery features have different widths")
    return out


def build_model(ck: dict, path: str):
    """The network of a checkpoint with a ``model_spec``, weights loaded, in eval mode."""
    from pyfici.models import build_backbone, groups_for, prune_blocks

    spec = ck.get("model_spec")
    if not isinstance(spec, dict) or not spec.get("backbone"):
        raise UserError(f"--checkpoint {path}: no model description (trained with a custom model); "
                        "extract features yourself and use --features")
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr), user_errors():
        warnings.simplefilter("ignore")  # every weight comes from the checkpoint
        model = build_backbone(spec["backbone"], "none", int(spec["num_classes"]), last_stride=int(spec["last_stride"]))
    if spec.get("pruned"):
        prune_blocks(model, groups_for(model), list(spec["pruned"]))
    try:
        model.load_state_dict(ck["model"])
    except (RuntimeError, KeyError, TypeError):
        raise UserError(f"--checkpoint {path}: its weights do not match its model description") from None
    return model.eval()


def _transform(spec: dict):
    T = require("torchvision.transforms", "vision", "evaluating a model on images")

    h, w = spec["image_size"]
    norm = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    if spec.get("resize") == "center_crop":
        return T.Compose([T.Resize(round(h * 256 / 224), interpolation=T.InterpolationMode.BICUBIC),
                          T.CenterCrop((h, w)), T.ToTensor(), norm])
    return T.Compose([T.Resize((h, w), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(), norm])


def _dataset(args, ck: dict):
    """(kind, data): kind 'reid' (a ReIDDataset) or 'retrieval' (a RetrievalSplit)."""
    from pyfici.data._image import check_images
    from pyfici.data.reid import REID_DATASETS, load_reid_dataset
    from pyfici.data.retrieval import load_retrieval_dataset

    conf = ck.get("config", {})
    name = args.dataset or conf.get("dataset", "builtin")
    spec = ck["model_spec"]
    with user_errors():
        if name == "builtin":
            if ck["kind"] == "autolr":
                return "retrieval", load_retrieval_dataset("builtin", size=max(spec["image_size"][0], 32),
                                                           per_class=conf.get("builtin_per_class", 60))
            return "reid", load_reid_dataset("builtin", num_ids=conf.get("builtin_ids", 32),
                                             num_cams=conf.get("builtin_cams", 3),
                                             images_per_cam=conf.get("builtin_images_per_cam", 3),
                                             size=tuple(spec["image_size"]), seed=conf.get("seed", 0))
        root = args.root or (conf.get("root") if args.dataset is None else None)
        if name in REID_DATASETS:
            data = load_reid_dataset(name, root)
            check_images([*data.query, *data.gallery], name)
            return "reid", data
        split = load_retrieval_dataset(name, root)
        check_images([*split.test, *(split.query or []), *(split.gallery or [])], name)
        return "retrieval", split


def evaluate_checkpoint(args) -> dict:
    from pyfici.data.reid import ReIDImageDataset
    from pyfici.engine.evaluation import (
        evaluate_reid_features,
        evaluate_retrieval,
        extract_features,
    )

    ck = load_checkpoint(args.checkpoint, kind=REID_KINDS, what="--checkpoint")
    device = resolve_device(args.device)
    model = build_model(ck, args.checkpoint).to(device)
    kind, data = _dataset(args, ck)
    tf = _transform(ck["model_spec"])
    if kind == "retrieval":
        if args.visualize:
            raise UserError(f"--visualize draws ReID rankings; --dataset {data.name} is a retrieval set")
        rec = evaluate_retrieval(model, data, tf, device, args.batch_size, args.workers)
        return {"dataset": data.name, "recall_at_k": {int(k): v for k, v in rec.items()}}
    qf, (qp, qc) = extract_features(model, ReIDImageDataset(data.query, tf), device, args.batch_size, args.workers)
    gf, (gp, gc) = extract_features(model, ReIDImageDataset(data.gallery, tf), device, args.batch_size, args.workers)
    with user_errors():
        res = evaluate_reid_features(qf, gf, qp, gp, qc, gc, args.protocol, args.max_rank, args.rerank)
    if args.visualize:
        _visualize(args, qf, gf, data.query, data.gallery)
    return {"dataset": data.name, **res.as_dict()}


def evaluate_features(args) -> dict:
    from pyfici.engine.evaluation import evaluate_reid_features

    f = load_features(args.features)
    device = resolve_device(args.device)
    (qf, qp, qc), (gf, gp, gc) = ((t.to(device) for t in f[k][:3]) for k in ("query", "gallery"))
    with user_errors():
        res = evaluate_reid_features(qf, gf, qp, gp, qc, gc, args.protocol, args.max_rank, args.rerank)
    if args.visualize:
        if f["query"][3] is None or f["gallery"][3] is None:
            raise UserError(f"--visualize with --features needs image paths: {args.features} has no query/gallery 'paths'")
        items = [list(zip(f[k][3], f[k][1].tolist(), f[k][2].tolist())) for k in ("query", "gallery")]
        _visualize(args, qf, gf, *items)
    return {"dataset": args.features, **res.as_dict()}


def _visualize(args, qf, gf, query_items, gallery_items) -> None:
    """The ranked gallery of the first ``--visualize`` queries (cosine distance, as evaluated)."""
    from pyfici.reid import visualize_ranked_results

    n = min(args.visualize, qf.shape[0])
    dist = (1 - qf[:n].float() @ gf.float().T).cpu()
    full = dist.new_full((qf.shape[0], gf.shape[0]), float("inf"))
    full[:n] = dist
    with user_errors(ValueError, FileNotFoundError, OSError):
        visualize_ranked_results(full, list(query_items), list(gallery_items), f"{args.out}/ranked",
                                 query_indices=list(range(n)), protocol=args.protocol)


def main(args: argparse.Namespace) -> int:
    from pyfici.engine.rundir import check_output_path

    if args.visualize and args.out is None:
        raise UserError("--visualize N needs --out DIR (the pictures go to DIR/ranked/)")
    if args.checkpoint:
        require("torchvision.transforms", "vision", "pyfici eval reid --checkpoint")  # before any data is read
    if args.out is not None:
        check_output_path(args.out, [("--checkpoint", args.checkpoint), ("--features", args.features),
                                     ("--root", args.root)])
    d = evaluate_checkpoint(args) if args.checkpoint else evaluate_features(args)
    if args.out is not None:
        write_json(d, f"{args.out}/eval.json")
    if args.json is not None:
        emit_json(d, args.json)
        if args.json == "-":
            return 0
    if "recall_at_k" in d:
        print(f"{d['dataset']}: " + "  ".join(f"R@{k} {100 * v:.2f}" for k, v in d["recall_at_k"].items()))
        return 0
    print(f"{d['dataset']} ({d.get('protocol')}{', re-ranked' if args.rerank else ''}): "
          f"{d.get('num_valid')}/{d.get('num_queries')} valid queries")
    for k in ("rank1", "rank5", "rank10", "mAP", "mINP"):
        if k in d:
            print(f"  {k:<6} {100 * d[k]:6.2f}")
    return 0
