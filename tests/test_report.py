import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from pyfici.report import Section, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _png(path, seed):
    arr = (np.random.default_rng(seed).random((20, 30, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return str(path)


def render_dom(html_path, tmp_path) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chrome-profile'}", "--virtual-time-budget=5000", "--dump-dom",
           html_path.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout


def test_report_is_self_contained(tmp_path):
    imgs = [_png(tmp_path / f"a{i}.png", i) for i in range(2)]
    p = write_report(tmp_path / "r.html", "t", [Section("s", ["para"], [(imgs[0], "one"), (imgs[1], "two")],
                                                         [("tab", [{"a": 1, "b": 0.5}])])])
    text = p.read_text()
    assert text.count("data:image/png;base64,") == 2
    assert "<table>" in text and "para" in text


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium_with_every_image_loaded(tmp_path):
    imgs = [_png(tmp_path / f"a{i}.png", i) for i in range(3)]
    p = write_report(tmp_path / "r.html", "t", [Section("s", images=[(x, x) for x in imgs])])
    dom = render_dom(p, tmp_path)
    m = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert m, dom[:500]
    assert m.group(1) == m.group(2) == "3"
    # a broken image is detected (the check can fail)
    bad = tmp_path / "bad.html"
    bad.write_text(p.read_text().replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    m = re.search(r'data-images-loaded="(\d+)/(\d+)"', render_dom(bad, tmp_path))
    assert m and m.group(1) == "2" and m.group(2) == "3"
