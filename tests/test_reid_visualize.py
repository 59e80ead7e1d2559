"""Feature extraction with any torch model, evaluation from saved features, and
the ranked-results pictures (PNG rows + an HTML page rendered in headless Chromium)."""

import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from pyfici.reid import (
    FeatureSet,
    evaluate,
    evaluate_features,
    extract_features,
    load_features,
    save_features,
    visualize_from_features,
    visualize_ranked_results,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _market_folder(root, n_ids=4, per_id=3, seed=0):
    """Images named as Market-1501 does: pid_c{cam}s1_{frame}_00.jpg; one colour per identity."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 255, (n_ids, 3))
    for pid in range(n_ids):
        for k in range(per_id):
            arr = np.clip(base[pid] + rng.normal(0, 12, (32, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / f"{pid + 1:04d}_c{k % 3 + 1}s1_{k:06d}_00.jpg")
    return root


class TupleNet(torch.nn.Module):
    """A model that returns a tuple with a [B, C, H, W] map first (pooled by extract_features)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(5)

    def forward(self, x):
        return self.bn(self.conv(x)), "logits"


def test_extract_features_from_folder_any_model(tmp_path):
    folder = _market_folder(tmp_path / "imgs")
    torch.manual_seed(0)
    model = TupleNet().train()
    fs = extract_features(model, folder, image_size=(32, 16), batch_size=5)
    assert model.training  # mode restored
    assert fs.features.shape == (12, 5) and fs.features.dtype == torch.float32
    assert torch.allclose(fs.features.norm(dim=1), torch.ones(12), atol=1e-5)
    assert fs.pids.tolist() == [p for p in range(1, 5) for _ in range(3)]
    assert fs.camids.tolist() == [1, 2, 3] * 4
    assert len(fs.paths) == 12 and fs.paths == sorted(fs.paths)
    # the same as doing it by hand: eval mode, mirrored batch added, L2-normalised
    from pyfici.reid.features import default_transform

    tf = default_transform((32, 16))
    x = torch.stack([tf(Image.open(p)) for p in fs.paths])
    model.eval()
    with torch.no_grad():
        ref = model(x)[0].mean((2, 3)) + model(x.flip(-1))[0].mean((2, 3))
    torch.testing.assert_close(fs.features, torch.nn.functional.normalize(ref, dim=1), rtol=1e-5, atol=1e-6)
    nf = extract_features(model, folder, image_size=(32, 16), flip=False, normalize=False)
    with torch.no_grad():
        torch.testing.assert_close(nf.features, model(x)[0].mean((2, 3)), rtol=1e-5, atol=1e-6)


def test_extract_features_from_dataset_and_dict_outputs():
    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 7

        def __getitem__(self, i):
            return torch.full((3, 4, 4), float(i)), i % 3, i % 2

    class DictNet(torch.nn.Module):
        def forward(self, x):
            return {"feat": x.flatten(1)[:, :6] + 1.0}

    fs = extract_features(DictNet(), DS(), batch_size=3, flip=False, normalize=False)
    assert fs.features.shape == (7, 6)
    assert fs.features[:, 0].tolist() == [float(i + 1) for i in range(7)]
    assert fs.pids.tolist() == [i % 3 for i in range(7)] and fs.camids.tolist() == [i % 2 for i in range(7)]
    assert fs.paths is None


def test_extract_features_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="data: .* is not a folder"):
        extract_features(TupleNet(), tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="data: no images"):
        extract_features(TupleNet(), tmp_path / "empty")
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(TupleNet(), tmp_path / "empty", batch_size=0)


def test_save_load_and_evaluate_from_saved_features(tmp_path):
    g = torch.Generator().manual_seed(1)
    q = FeatureSet(torch.randn(9, 8, generator=g), torch.arange(9) % 4, torch.zeros(9, dtype=torch.long), None)
    gal = FeatureSet(torch.randn(40, 8, generator=g), torch.arange(40) % 4, torch.ones(40, dtype=torch.long),
                     [f"g{i}.jpg" for i in range(40)])
    save_features(tmp_path / "q.pt", q)
    save_features(tmp_path / "g.pt", gal)
    lg = load_features(tmp_path / "g.pt")
    assert torch.equal(lg.features, gal.features) and lg.paths == gal.paths
    a = evaluate_features(tmp_path / "q.pt", tmp_path / "g.pt", max_rank=10)
    b = evaluate(q.features, gal.features, q.pids, gal.pids, q.camids, gal.camids, max_rank=10)
    assert a.mAP == b.mAP and torch.equal(a.cmc, b.cmc)
    (tmp_path / "bad.pt").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a pyfici feature file"):
        load_features(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="no such file"):
        load_features(tmp_path / "nope.pt")


def _scenario(tmp_path):
    folder = _market_folder(tmp_path / "imgs", n_ids=5, per_id=4, seed=3)
    fs = extract_features(TupleNet(), folder, image_size=(32, 16))
    qi = [0, 4, 8]
    q = FeatureSet(fs.features[qi], fs.pids[qi], fs.camids[qi], [fs.paths[i] for i in qi])
    return q, fs


def test_visualize_rows_have_the_evaluation_ranking_and_border_colours(tmp_path):
    q, g = _scenario(tmp_path)
    d = torch.cdist(q.features, g.features)
    page = visualize_ranked_results(d, q, g, tmp_path / "vis", topk=4, image_size=(32, 16), border=3)
    pngs = sorted((tmp_path / "vis" / "ranked").glob("*.png"))
    assert [p.name for p in pngs] == ["q00000.png", "q00001.png", "q00002.png"]
    text = page.read_text()
    assert text.count("<img ") == 3
    for qi, p in enumerate(pngs):
        im = np.asarray(Image.open(p).convert("RGB"))
        tw = 16 + 2 * 3
        assert im.shape[1] == tw * 5 + 12
        # expected ranking: drop same pid + same camera, sort by distance (stable)
        keep = ~((g.pids == q.pids[qi]) & (g.camids == q.camids[qi]))
        cand = torch.nonzero(keep).flatten()
        order = cand[torch.argsort(d[qi, cand], stable=True)][:4]
        for r, j in enumerate(order.tolist()):
            x0 = tw * (r + 1) + 12
            corner = tuple(int(v) for v in im[0, x0 + 1])
            want = (0, 170, 0) if int(g.pids[j]) == int(q.pids[qi]) else (210, 0, 0)
            assert corner == want, (qi, r, corner)
        assert tuple(int(v) for v in im[0, 1]) == (40, 90, 200)  # the query's border


def test_visualize_bad_inputs(tmp_path):
    q, g = _scenario(tmp_path)
    d = torch.rand(len(q), len(g))
    with pytest.raises(ValueError, match="gallery: expected 20 items"):
        visualize_ranked_results(d, q, FeatureSet(g.features[:3], g.pids[:3], g.camids[:3], g.paths[:3]), tmp_path)
    with pytest.raises(ValueError, match="query: this FeatureSet has no image paths"):
        visualize_ranked_results(d, FeatureSet(q.features, q.pids, q.camids, None), g, tmp_path)
    with pytest.raises(ValueError, match="query_indices: 7 is outside"):
        visualize_ranked_results(d, q, g, tmp_path, query_indices=[7])
    with pytest.raises(ValueError, match="topk"):
        visualize_ranked_results(d, q, g, tmp_path, topk=0)


def _render_dom(html_path, tmp_path) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--allow-file-access-from-files", f"--user-data-dir={tmp_path / 'chrome-profile'}",
           "--virtual-time-budget=5000", "--dump-dom", html_path.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_ranked_results_html_renders_in_headless_chromium_with_every_image_loaded(tmp_path):
    q, g = _scenario(tmp_path)
    page = visualize_from_features(q, g, tmp_path / "vis", topk=5, num_queries=2)
    dom = _render_dom(page, tmp_path)
    m = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert m, dom[:500]
    assert m.group(1) == m.group(2) == "2"
    # a missing picture is detected (the check can fail)
    (tmp_path / "vis" / "ranked" / "q00001.png").unlink()
    m = re.search(r'data-images-loaded="(\d+)/(\d+)"', _render_dom(page, tmp_path))
    assert m and m.group(1) == "1" and m.group(2) == "2"
