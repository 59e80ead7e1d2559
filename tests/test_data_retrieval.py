"""Retrieval dataset readers on tiny fake trees in the official layouts, and the built-in data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pyfici.data import (
    BuiltinRetrieval,
    RetrievalImageDataset,
    aircraft,
    builtin_images,
    builtin_retrieval,
    cars196,
    cub200,
    inshop,
    load_retrieval_dataset,
    sop,
)


def _png(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(seed).integers(0, 255, (6, 5, 3), dtype=np.uint8)
    Image.fromarray(a).save(path)


def _cub_tree(root: Path) -> Path:
    base = root / "CUB_200_2011"
    lines, labels = [], []
    i = 0
    for c in (1, 2, 100, 101, 150, 200):
        for k in range(2):
            i += 1
            rel = f"{c:03d}.Bird_{c}/Bird_{c}_{k}.png"
            _png(base / "images" / rel, i)
            lines.append(f"{i} {rel}")
            labels.append(f"{i} {c}")
    base.mkdir(parents=True, exist_ok=True)
    (base / "images.txt").write_text("\n".join(lines) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return base


def test_cub200_split_and_relabel(tmp_path):
    _cub_tree(tmp_path)
    s = cub200(tmp_path)
    assert len(s.train) == 6 and len(s.test) == 6
    assert sorted({y for _, y in s.train}) == [0, 1, 2]  # classes 1, 2, 100 relabelled
    assert sorted({y for _, y in s.test}) == [101, 150, 200]
    assert s.ks == (1, 2, 4, 8, 16, 32)
    img, y = RetrievalImageDataset(s.train)[0]
    assert img.mode == "RGB" and img.size == (5, 6)


def test_cub200_errors_name_the_file(tmp_path):
    base = _cub_tree(tmp_path)
    (base / "image_class_labels.txt").unlink()
    with pytest.raises(FileNotFoundError, match="image_class_labels.txt"):
        cub200(tmp_path)
    (base / "image_class_labels.txt").write_text("1 notanumber\n")
    with pytest.raises(ValueError, match=r"image_class_labels.txt:1"):
        cub200(tmp_path)
    with pytest.raises(FileNotFoundError, match="images.txt"):
        cub200(tmp_path / "nothing")


def test_missing_image_names_the_file(tmp_path):
    _cub_tree(tmp_path)
    s = cub200(tmp_path)
    Path(s.train[0][0]).unlink()
    with pytest.raises(FileNotFoundError, match="Bird_1_0.png"):
        RetrievalImageDataset(s.train)[0]


def test_cars196_from_mat(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    recs = []
    for i, c in enumerate([1, 1, 98, 99, 196, 196]):
        rel = f"car_ims/{i:06d}.jpg"
        _png(tmp_path / rel, i)
        recs.append((rel, 1, 2, 3, 4, c, 0))
    dt = [("relative_im_path", "O"), ("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"),
          ("class", "O"), ("test", "O")]
    annos = np.array([recs], dtype=dt)
    scipy_io.savemat(str(tmp_path / "cars_annos.mat"), {"annotations": annos})
    s = cars196(tmp_path)
    assert len(s.train) == 3 and len(s.test) == 3
    assert sorted({y for _, y in s.test}) == [99, 196]
    assert s.train[0][0].endswith("car_ims/000000.jpg")
    scipy_io.savemat(str(tmp_path / "cars_annos.mat"), {"other": np.zeros(2)})
    with pytest.raises(ValueError, match="cars_annos.mat.*annotations"):
        cars196(tmp_path)
    (tmp_path / "cars_annos.mat").unlink()
    with pytest.raises(FileNotFoundError, match="cars_annos.mat"):
        cars196(tmp_path)


def test_sop(tmp_path):
    base = tmp_path / "Stanford_Online_Products"
    base.mkdir()
    hdr = "image_id class_id super_class_id path\n"
    (base / "Ebay_train.txt").write_text(hdr + "1 1 1 bicycle_final/111_0.JPG\n2 1 1 bicycle_final/111_1.JPG\n3 7 2 chair_final/7_0.JPG\n")
    (base / "Ebay_test.txt").write_text(hdr + "4 11319 1 bicycle_final/9_0.JPG\n5 11319 1 bicycle_final/9_1.JPG\n")
    s = sop(tmp_path)
    assert [y for _, y in s.train] == [0, 0, 1]
    assert [y for _, y in s.test] == [11319, 11319]
    assert s.ks == (1, 10, 100, 1000)
    (base / "Ebay_test.txt").write_text("no header\n")
    with pytest.raises(ValueError, match="Ebay_test.txt"):
        sop(tmp_path)
    (base / "Ebay_train.txt").unlink()
    with pytest.raises(FileNotFoundError, match="Ebay_train.txt"):
        sop(tmp_path)


def test_inshop_query_gallery(tmp_path):
    (tmp_path / "Eval").mkdir()
    rows = [("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
            ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
            ("img/MEN/Denim/id_00000080/01_1_front.jpg", "id_00000080", "query"),
            ("img/MEN/Denim/id_00000080/01_2_side.jpg", "id_00000080", "gallery"),
            ("img/MEN/Denim/id_00000081/01_2_side.jpg", "id_00000081", "gallery")]
    text = f"{len(rows)}\nimage_name item_id evaluation_status\n" + "".join(f"{a}  {b}  {c}\n" for a, b, c in rows)
    (tmp_path / "Eval" / "list_eval_partition.txt").write_text(text)
    s = inshop(tmp_path)
    assert len(s.train) == 2 and len(s.query) == 1 and len(s.gallery) == 2
    assert s.query[0][1] == s.gallery[0][1] != s.gallery[1][1]
    assert s.ks == (1, 10, 20, 30, 40, 50)
    (tmp_path / "Eval" / "list_eval_partition.txt").write_text(text + "img/x.jpg id_1 validation\n")
    with pytest.raises(ValueError, match=r"list_eval_partition.txt:8"):
        inshop(tmp_path)


def test_aircraft_variant_split(tmp_path):
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True)
    (data / "images_variant_trainval.txt").write_text("0034309 707-320\n0034958 737-200\n0037511 A300B4\n")
    (data / "images_variant_test.txt").write_text("1514522 707-320\n0056978 Tu-154\n")
    s = aircraft(tmp_path)
    assert s.info["train_variants"] == ["707-320", "737-200"]
    assert s.info["test_variants"] == ["A300B4", "Tu-154"]
    assert len(s.train) == 3 and len(s.test) == 2
    assert s.train[0][0].endswith("images/0034309.jpg")
    (data / "images_variant_test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="images_variant_test.txt"):
        aircraft(tmp_path)


def test_load_dispatch_errors(tmp_path):
    with pytest.raises(ValueError, match="--root"):
        load_retrieval_dataset("cub200")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_retrieval_dataset("cub200", tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown retrieval dataset"):
        load_retrieval_dataset("imagenet", tmp_path)


def test_builtin_retrieval_is_real_digits():
    pytest.importorskip("sklearn")
    s = builtin_retrieval(size=16, per_class=5)
    assert len(s.train) == 25 and len(s.test) == 25
    assert {y for _, y in s.train} == set(range(5)) and {y for _, y in s.test} == set(range(5, 10))
    im = s.train[0][0]
    assert im.size == (16, 16) and im.mode == "RGB"
    ds = BuiltinRetrieval("test", size=16, per_class=3)
    assert len(ds) == 15 and ds.ks == (1, 2, 4, 8)
    with pytest.raises(ValueError, match="per_class"):
        builtin_retrieval(per_class=1)


def test_builtin_images():
    ims = builtin_images()
    assert len(ims) == 119 and all(im.mode == "RGB" for im in ims)
    assert ims[0].size == (512, 512)  # astronaut
    assert ims[-1].size == (25, 25)  # an LFW face
    assert len(builtin_images(3)) == 3 and len(builtin_images(30)) == 30
    with pytest.raises(ValueError, match="n must be"):
        builtin_images(1000)
