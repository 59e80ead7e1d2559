"""Ranked-results pictures: for each query, a row of its top-k gallery images
(green border: same identity, red: another), with their distances, written as
one PNG per query plus an ``index.html`` that shows them all."""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pyfici.ops._validate import as_tensor, check_ndim, check_not_meta
from pyfici.reid.features import FeatureSet

GREEN = (0, 170, 0)
RED = (210, 0, 0)
QUERY_BORDER = (40, 90, 200)
TEXT_H = 16


def _items(name: str, data) -> list[tuple[object, int, int]]:
    """FeatureSet (with paths) or a sequence of (image path or PIL image, pid, camid)."""
    if isinstance(data, FeatureSet):
        if data.paths is None:
            raise ValueError(f"{name}: this FeatureSet has no image paths (extract it from a folder or a "
                             "dataset with .paths, or pass (image, pid, camid) items)")
        return list(zip(data.paths, data.pids.tolist(), data.camids.tolist()))
    if not isinstance(data, Sequence):
        raise TypeError(f"{name}: expected a FeatureSet or a sequence of (image, pid, camid), got {type(data).__name__}")
    out = []
    for i, it in enumerate(data):
        if not isinstance(it, (tuple, list)) or len(it) < 3:
            raise ValueError(f"{name}: item {i} is not an (image, pid, camid) tuple")
        out.append((it[0], int(it[1]), int(it[2])))
    return out


def _load(img, size: tuple[int, int]):
    from PIL import Image

    h, w = size
    if isinstance(img, (str, os.PathLike)):
        try:
            with Image.open(img) as im:
                im = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read image {str(img)!r}: {e}") from None
    elif isinstance(img, Image.Image):
        im = img.convert("RGB")
    else:
        raise TypeError(f"expected an image path or PIL image, got {type(img).__name__}")
    return im.resize((w, h), Image.BILINEAR)


def _tile(im, colour, label: str, size: tuple[int, int], border: int):
    from PIL import Image, ImageDraw

    h, w = size
    t = Image.new("RGB", (w + 2 * border, h + 2 * border + TEXT_H), (255, 255, 255))
    ImageDraw.Draw(t).rectangle([0, 0, w + 2 * border - 1, h + 2 * border - 1], fill=colour)
    t.paste(im, (border, border))
    ImageDraw.Draw(t).text((2, h + 2 * border + 2), label, fill=(0, 0, 0))
    return t


def visualize_ranked_results(
    distmat,
    query,
    gallery,
    out_dir: str | os.PathLike,
    *,
    topk: int = 10,
    num_queries: int | None = None,
    query_indices: Sequence[int] | None = None,
    protocol: str = "market1501",
    image_size: tuple[int, int] = (128, 64),
    border: int = 4,
    title: str = "Ranked results",
) -> Path:
    """Write ``out_dir/ranked/q{index}.png`` for each chosen query and
    ``out_dir/index.html`` showing them; returns the HTML path.

    distmat: [Q, G] distances (tensor or array; lower = closer).
    query / gallery: :class:`FeatureSet` with image paths, or sequences of
    ``(image path or PIL image, pid, camid)``. The gallery is ranked as the
    evaluation ranks it: items with the query's pid and camera are dropped
    (``protocol="market1501"`` also drops pid -1 junk; ``"torchreid"`` keeps
    it), ties go to the lower gallery index. Each row shows the query (blue
    border) then the ``topk`` nearest gallery images, green when the pid is
    the query's, red otherwise, with rank and distance under each.
    Queries: ``query_indices``, else the first ``num_queries`` (default all).
    """
    if protocol not in ("market1501", "torchreid"):
        raise ValueError(f"protocol: expected 'market1501' or 'torchreid', got {protocol!r}")
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk: must be an int >= 1, got {topk!r}")
    d = as_tensor("distmat", distmat)
    check_not_meta("distmat", d)
    check_ndim("distmat", d, 2, "Q,G")
    d = d.detach().cpu().double()
    q_items = _items("query", query)
    g_items = _items("gallery", gallery)
    Q, G = d.shape
    if len(q_items) != Q:
        raise ValueError(f"query: expected {Q} items (rows of distmat), got {len(q_items)}")
    if len(g_items) != G:
        raise ValueError(f"gallery: expected {G} items (columns of distmat), got {len(g_items)}")
    if query_indices is None:
        n = Q if num_queries is None else int(num_queries)
        if n < 1:
            raise ValueError(f"num_queries: must be >= 1, got {num_queries}")
        query_indices = range(min(n, Q))
    sel = [int(i) for i in query_indices]
    for i in sel:
        if not 0 <= i < Q:
            raise ValueError(f"query_indices: {i} is outside [0, {Q})")
    out = Path(out_dir)
    (out / "ranked").mkdir(parents=True, exist_ok=True)
    g_pid = np.asarray([p for _, p, _ in g_items])
    g_cam = np.asarray([c for _, _, c in g_items])
    rows = []
    from PIL import Image

    for qi in sel:
        q_img, q_pid, q_cam = q_items[qi]
        row = d[qi].numpy()
        keep = ~((g_pid == q_pid) & (g_cam == q_cam))
        if protocol == "market1501":
            keep &= g_pid != -1
        cand = np.nonzero(keep)[0]
        order = cand[np.argsort(row[cand], kind="stable")][:topk]
        tiles = [_tile(_load(q_img, image_size), QUERY_BORDER, f"query {q_pid}", image_size, border)]
        hits = 0
        for r, j in enumerate(order.tolist()):
            ok = g_pid[j] == q_pid
            hits += int(ok)
            tiles.append(_tile(_load(g_items[j][0], image_size), GREEN if ok else RED,
                               f"{r + 1}: {row[j]:.3f}", image_size, border))
        gap = 12
        W = sum(t.width for t in tiles) + gap
        canvas = Image.new("RGB", (W, tiles[0].height), (255, 255, 255))
        x = 0
        for k, t in enumerate(tiles):
            canvas.paste(t, (x, 0))
            x += t.width + (gap if k == 0 else 0)
        name = f"q{qi:05d}.png"
        canvas.save(out / "ranked" / name)
        label = q_img if isinstance(q_img, (str, os.PathLike)) else f"query {qi}"
        rows.append((name, str(label), q_pid, q_cam, hits, len(order)))
    page = out / "index.html"
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p>{len(rows)} queries, top {topk}; green: same identity, red: another; "
            f"protocol {html.escape(protocol)}.</p>"]
    for name, label, pid, cam, hits, k in rows:
        body.append(f'<figure><img src="ranked/{html.escape(name)}" alt="{html.escape(label)}">'
                    f"<figcaption>{html.escape(label)} &mdash; pid {pid}, camera {cam}: "
                    f"{hits} of the top {k} are true matches</figcaption></figure>")
    script = ("<script>window.addEventListener('load', function () {"
              "var im = document.images, ok = 0;"
              "for (var i = 0; i < im.length; i++) if (im[i].complete && im[i].naturalWidth > 0) ok++;"
              "document.body.setAttribute('data-images-loaded', ok + '/' + im.length);});</script>")
    page.write_text("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
                    f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif}}"
                    "figure{margin:0 0 16px 0}img{display:block}</style></head><body>\n"
                    + "\n".join(body) + "\n" + script + "\n</body></html>\n", encoding="utf-8")
    return page


def visualize_from_features(query: FeatureSet, gallery: FeatureSet, out_dir, *, metric: str = "cosine", **kwargs):
    """:func:`visualize_ranked_results` with the distances of two feature sets
    (``pyfici.ops.pairwise_distance`` of ``metric``, only the chosen query rows)."""
    from pyfici.ops import pairwise_distance

    qi = kwargs.pop("query_indices", None)
    n = kwargs.pop("num_queries", None)
    if qi is None:
        qi = list(range(len(query) if n is None else min(int(n), len(query))))
    sel = torch.as_tensor(list(qi), dtype=torch.int64)
    d = torch.full((len(query), len(gallery)), float("inf"))
    d[sel] = pairwise_distance(query.features[sel], gallery.features, metric).float()
    return visualize_ranked_results(d, query, gallery, out_dir, query_indices=list(qi), **kwargs)
