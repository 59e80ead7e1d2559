"""ReID dataset readers on tiny fake trees in the official layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pyfici.data.reid import (
    PKSampler,
    ReIDImageDataset,
    builtin_reid,
    cuhk03_np,
    dukemtmc,
    load_reid_dataset,
    market1501,
    msmt17,
)


def _img(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 4, 3), value, np.uint8)).save(path)


def _market_tree(base: Path, ext: str = ".jpg") -> None:
    tr, q, g = base / "bounding_box_train", base / "query", base / "bounding_box_test"
    for name in ["0002_c1s1_000451_03", "0002_c2s1_000301_01", "0007_c3s3_077419_03", "0010_c6s4_002452_02",
                 "-1_c1s1_000401_03", "0000_c1s1_000151_01"]:
        _img(tr / (name + ext))
    for name in ["0001_c1s1_001051_00", "0003_c4s6_015641_00"]:
        _img(q / (name + ext))
    for name in ["0001_c2s1_000301_01", "0003_c5s3_015240_04", "0000_c1s1_000151_01", "-1_c3s1_000401_03",
                 "0001_c1s1_001051_02"]:
        _img(g / (name + ext))
    (tr / "Thumbs.db").write_text("not an image")


def test_market1501_layout_junk_and_distractors(tmp_path):
    base = tmp_path / "Market-1501-v15.09.15"
    _market_tree(base)
    for root in (tmp_path, base):
        ds = market1501(root)
        # junk (-1) left out everywhere, distractor (0) out of train
        assert sorted(p for _, p, _ in ds.train) == [0, 0, 1, 2]
        assert ds.train_pid_names == [2, 7, 10]
        assert ds.num_train_pids == 3
        assert sorted((p, c) for _, p, c in ds.train) == [(0, 0), (0, 1), (1, 2), (2, 5)]
        assert sorted((p, c) for _, p, c in ds.query) == [(1, 0), (3, 3)]
        # distractor stays in the gallery as a negative, junk is gone
        assert sorted((p, c) for _, p, c in ds.gallery) == [(0, 0), (1, 0), (1, 1), (3, 4)]
        assert all(Path(x).is_file() for x, _, _ in ds.train + ds.query + ds.gallery)


def test_duke_and_cuhk03(tmp_path):
    base = tmp_path / "DukeMTMC-reID"
    for split, names in {
        "bounding_box_train": ["0001_c2_f0046182", "0001_c8_f0046300", "0005_c1_f0000001"],
        "query": ["0006_c1_f0000002"],
        "bounding_box_test": ["0006_c2_f0000003", "0100_c7_f0000004"],
    }.items():
        for n in names:
            _img(base / split / (n + ".jpg"))
    ds = dukemtmc(tmp_path)
    assert sorted((p, c) for _, p, c in ds.train) == [(0, 1), (0, 7), (1, 0)]
    assert [(p, c) for _, p, c in ds.gallery] == [(6, 1), (100, 6)]

    for variant in ("detected", "labeled"):
        b = tmp_path / "cuhk03-np" / variant
        for split, names in {
            "bounding_box_train": ["0001_c1_1", "0001_c2_2", "0003_c1_1"],
            "query": ["0010_c1_1"],
            "bounding_box_test": ["0010_c2_1", "0011_c2_3"],
        }.items():
            for n in names:
                _img(b / split / (n + ".png"))
    ds = cuhk03_np(tmp_path, "labeled")
    assert ds.name == "CUHK03-NP-labeled"
    assert ds.num_train_pids == 2 and len(ds.gallery) == 2
    assert "labeled" in ds.train[0][0]
    ds2 = load_reid_dataset("cuhk03-detected", tmp_path / "cuhk03-np")
    assert "detected" in ds2.train[0][0]
    with pytest.raises(ValueError, match="variant"):
        cuhk03_np(tmp_path, "both")


@pytest.mark.parametrize("version", ["MSMT17_V1", "MSMT17_V2"])
def test_msmt17(tmp_path, version):
    base = tmp_path / version
    tr, te = ("train", "test") if version.endswith("V1") else ("mask_train_v2", "mask_test_v2")
    lists = {
        "list_train.txt": ["0000/0000_000_01_0303morning_0015_0.jpg 0", "0000/0000_001_05_0303morning_0016_0.jpg 0",
                           "0004/0004_000_15_0303noon_0100_1.jpg 4"],
        "list_val.txt": ["0000/0000_002_02_0303morning_0020_0.jpg 0"],
        "list_query.txt": ["0000/0000_000_03_0303morning_0015_0.jpg 0"],
        "list_gallery.txt": ["0000/0000_010_04_0303morning_0015_0.jpg 0", "0007/0007_010_12_0303morning_0015_0.jpg 7"],
    }
    for fname, lines in lists.items():
        base.mkdir(parents=True, exist_ok=True)
        (base / fname).write_text("\n".join(lines) + "\n")
    (base / tr).mkdir()
    (base / te).mkdir()
    ds = msmt17(tmp_path)
    assert sorted((p, c) for _, p, c in ds.train) == [(0, 0), (0, 1), (0, 4), (1, 14)]
    assert ds.train_pid_names == [0, 4]
    assert [(p, c) for _, p, c in ds.query] == [(0, 2)]
    assert [(p, c) for _, p, c in ds.gallery] == [(0, 3), (7, 11)]
    assert ds.train[0][0].startswith(str(base / tr))
    assert ds.query[0][0].startswith(str(base / te))


def test_bad_inputs_name_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        market1501(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="bounding_box_train"):
        market1501(tmp_path)
    # a split missing
    (tmp_path / "m" / "bounding_box_train").mkdir(parents=True)
    _img(tmp_path / "m" / "bounding_box_train" / "0002_c1s1_000451_03.jpg")
    with pytest.raises(FileNotFoundError, match=r"m/query"):
        market1501(tmp_path / "m")
    # an empty folder
    (tmp_path / "m" / "query").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        market1501(tmp_path / "m")
    # a malformed name
    _img(tmp_path / "m" / "query" / "person12.jpg")
    with pytest.raises(ValueError, match="person12.jpg"):
        market1501(tmp_path / "m")
    # a camera out of range
    (tmp_path / "m" / "query" / "person12.jpg").unlink()
    _img(tmp_path / "m" / "query" / "0003_c9s1_000451_03.jpg")
    with pytest.raises(ValueError, match="camera 9"):
        market1501(tmp_path / "m")
    # MSMT17: missing list file and malformed line
    with pytest.raises(FileNotFoundError, match="list_train.txt"):
        msmt17(tmp_path)
    (tmp_path / "MSMT17_V1" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="list_train.txt"):
        msmt17(tmp_path)
    (tmp_path / "MSMT17_V1" / "list_train.txt").write_text("0000/0000_000_01_x.jpg\n")
    with pytest.raises(ValueError, match="line 1"):
        msmt17(tmp_path)
    with pytest.raises(ValueError, match="--root"):
        load_reid_dataset("market1501", None)
    with pytest.raises(ValueError, match="unknown ReID dataset"):
        load_reid_dataset("viper", tmp_path)


def test_builtin_reid_is_deterministic_and_well_formed():
    a = builtin_reid(num_ids=10, num_cams=3, images_per_cam=2, size=(32, 16))
    b = builtin_reid(num_ids=10, num_cams=3, images_per_cam=2, size=(32, 16))
    assert a.num_train_pids == 5 and a.num_train_cams == 3
    assert len(a.train) == 5 * 3 * 2 and len(a.query) == 5 * 3 and len(a.gallery) == 5 * 3
    assert {p for _, p, _ in a.query} == {p for _, p, _ in a.gallery} == set(range(5, 10))
    assert not {p for _, p, _ in a.train} & {p for _, p, _ in a.query}
    for (x, p, c), (y, q, d) in zip(a.train + a.query, b.train + b.query):
        assert (p, c) == (q, d) and x.size == (16, 32)
        assert np.array_equal(np.asarray(x), np.asarray(y))
    # camera views of one identity differ
    v0, v1 = (np.asarray(x, np.float32) for x, p, c in a.train[:4:2])
    assert np.abs(v0 - v1).mean() > 1.0
    with pytest.raises(ValueError, match="num_cams"):
        builtin_reid(num_cams=1)


def test_image_dataset_and_pk_sampler(tmp_path):
    _market_tree(tmp_path)
    ds = market1501(tmp_path)
    img, pid, cam = ReIDImageDataset(ds.train, transform=np.asarray)[0]
    assert img.shape == (8, 4, 3) and (pid, cam) == ds.train[0][1:]
    pids = [0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4]
    s = PKSampler(pids, p=2, k=3, seed=1)
    batches = list(s)
    assert len(batches) == len(s) == 2
    for batch in batches:
        assert len(batch) == 6
        got = [pids[i] for i in batch]
        assert len(set(got)) == 2 and all(got.count(p) == 3 for p in set(got))
    assert list(s) == batches
    s.set_epoch(1)
    assert [sorted(b) for b in s] != [sorted(b) for b in batches] or len(set(pids)) < 3
    r0 = list(PKSampler(pids, 2, 2, seed=3, rank=0, world_size=2))
    r1 = list(PKSampler(pids, 2, 2, seed=3, rank=1, world_size=2))
    assert len(r0) == len(r1) == 1 and r0 != r1
    with pytest.raises(ValueError, match="only 5"):
        PKSampler(pids, p=6, k=2)
