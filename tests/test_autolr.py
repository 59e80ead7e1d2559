"""AutoLR: the formulas against hand-computed values, and short real runs
(resume, pruning, baseline, bad input) on a tiny model and the built-in data."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from pyfici.engine import UserError
from pyfici.methods.autolr import (
    AutoLRConfig,
    auto_prune_choice,
    group_variation,
    run_autolr,
    sorting_score,
    target_variation,
    tau_at,
    update_lrs,
)
from pyfici.models import generic_groups, retrieval_head

# ----------------------------------------------------------------------------- formulas


def test_sorting_score_hand_values():
    assert sorting_score([1, 2, 3, 4]) == 1.0
    # reversed: pi = [3, 2, 1, 0], sum |r - pi(r)| = 8, S = 1 - 2*8/16 = 0
    assert sorting_score([4, 3, 2, 1]) == 0.0
    # one adjacent swap: pi = [0, 1, 3, 2], sum = 2, S = 1 - 4/16
    assert sorting_score([1, 2, 4, 3]) == 0.75
    # L = 5, pi = [1, 0, 2, 3, 4]: sum = 2, S = 1 - 4/25 = 0.84
    assert sorting_score(torch.tensor([2.0, 1.0, 3.0, 4.0, 5.0])) == 0.84
    # L = 3, v = [3, 1, 2]: pi = [1, 2, 0], sum = 1+1+2 = 4, S = 1 - 8/9 = 0.111
    assert sorting_score([3, 1, 2]) == 0.111
    assert sorting_score([3, 1, 2], decimals=None) == pytest.approx(1 - 8 / 9)
    assert sorting_score([1.0, 1.0]) == 1.0  # ties keep order (stable)
    assert sorting_score([5.0]) == 1.0


def test_tau_schedule():
    assert tau_at(0) == 0.94
    assert tau_at(1) == pytest.approx(0.94 * 0.99)
    assert tau_at(16) == pytest.approx(0.94 * 0.99**16)  # 0.8004 > 0.8: decays once more
    assert tau_at(17) == pytest.approx(0.94 * 0.99**17)  # 0.7924: stops
    assert tau_at(49) == pytest.approx(0.94 * 0.99**17)


def test_target_ramp_epoch0():
    v = torch.tensor([1.0, 2.0, 3.0, 10.0])
    t, g = target_variation(v, 0)
    # m = 2 * 1, top = 0.4 * 10 = 4, d = 2/3
    torch.testing.assert_close(t, torch.tensor([2.0, 2 + 2 / 3, 2 + 4 / 3, 4.0], dtype=torch.float64))
    assert g == {}


def test_target_ramp_non_increasing_is_clamped_and_reported():
    v = torch.tensor([5.0, 5.0, 5.0, 6.0])  # 2*min = 10 > 0.4*max = 2.4
    t, g = target_variation(v, 0)
    torch.testing.assert_close(t, torch.tensor([5.0, 5 + 1 / 3, 5 + 2 / 3, 6.0], dtype=torch.float64))
    assert g["ramp_non_increasing"] == {"from": 10.0, "to": pytest.approx(2.4)}
    t, g = target_variation(torch.full((3,), 2.0), 0)  # all equal: +10% of min per block
    torch.testing.assert_close(t, torch.tensor([2.0, 2.2, 2.4], dtype=torch.float64))


def test_target_repair_later_epochs():
    v = torch.tensor([1.0, 3.0, 2.0, 5.0, 4.0])
    t, g = target_variation(v, 3)
    # d = 1, c = 2: vbar[1] = 2 - 1 = 1; vbar[4] = 5 + 1 = 6
    torch.testing.assert_close(t, torch.tensor([1.0, 1.0, 2.0, 5.0, 6.0], dtype=torch.float64))
    assert g == {}


def test_target_repair_negative_is_raised():
    v = torch.tensor([4.0, 5.0, 1.0, 6.0])
    t, g = target_variation(v, 1)
    # d = 5/3: vbar[1] = 1 - 5/3 < 0, vbar[0] = vbar[1] - 5/3 < 0 -> raised to 0.1 * min(v)
    torch.testing.assert_close(t, torch.tensor([0.1, 0.1, 1.0, 6.0], dtype=torch.float64))
    assert g["targets_raised"]["blocks"] == [0, 1]


def test_update_lrs_in_place_with_guards():
    lrs = torch.tensor([1e-3, 1e-3, 1e-3, 1e-3], dtype=torch.float64)
    ptr = lrs.data_ptr()
    g = update_lrs(lrs, torch.tensor([1.0, 2.0, 0.0, 1.0]), torch.tensor([2.0, 1.0, 5.0, 1e6]), lr_min=1e-6, lr_max=0.1)
    assert lrs.data_ptr() == ptr
    torch.testing.assert_close(lrs, torch.tensor([2e-3, 5e-4, 1e-3, 0.1], dtype=torch.float64))
    assert g == {"zero_variation": [2], "lrs_clamped": [3]}


def test_group_variation_formula():
    a0, b0 = torch.zeros(2, 2), torch.ones(2, 2)  # sq diff 4
    a1, b1 = torch.zeros(1, 3), torch.full((1, 3), 2.0)  # sq diff 12
    a2, b2 = torch.zeros(5, 1), torch.full((5, 1), 3.0)  # sq diff 45
    v = group_variation([b0, b1, b2], [a0, a1, a2], torch.tensor([0, 0, 1]),
                        torch.tensor([7.0, 5.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(v, torch.tensor([1e6 * 4 / 7, 1e6 * math.sqrt(45) / 5, 0.0], dtype=torch.float64))


def test_auto_prune_rule():
    names = [f"b{i}" for i in range(8)]
    v = [5, 6, 7, 8, 9, 10, 1, 0.5]  # median 7.5, threshold 3.75
    allp = dict.fromkeys(names, True)
    assert auto_prune_choice(names, v, allp) == ["b7", "b6"]
    assert auto_prune_choice(names, v, {**allp, "b6": False}) == ["b7"]
    assert auto_prune_choice(names, v, allp, max_fraction=0.125) == ["b7"]
    assert auto_prune_choice(names, [5, 6, 7, 8, 9, 10, 11, 12], allp) == []


# ----------------------------------------------------------------------------- runs


class TinyNet(nn.Module):
    """stem, three shape-preserving residual blocks, a top conv, the AutoLR head."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()) for _ in range(3))
        self.top = nn.Conv2d(8, 16, 1)
        self.head = retrieval_head(16, num_classes, embed_dim=16)

    def features(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = x + b(x)
        return self.top(x).mean((2, 3))

    def forward(self, x):
        return self.head(self.features(x))


def _tiny():
    torch.manual_seed(123)
    m = TinyNet()
    g = generic_groups(m, ["stem", "blocks.0", "blocks.1", "blocks.2", "top", "head"], stem="stem", head="head")
    return m, g


@pytest.fixture(scope="module")
def split():
    pytest.importorskip("sklearn")
    from pyfici.data import builtin_retrieval

    return builtin_retrieval(size=16, per_class=6)


def _cfg(tmp_path, **kw):
    base = dict(dataset="builtin", backbone="tiny", epochs=2, batch_size=10, image_size=16, workers=0,
                quiet=True, prune="none", max_retries=2, out=str(tmp_path), eval_batch_size=32, plot=False)
    base.update(kw)
    return AutoLRConfig(**base)


def _run(cfg, split):
    m, g = _tiny()
    return run_autolr(cfg, model=m, groups=g, split=split)


def test_run_writes_metrics_plot_checkpoint(tmp_path, split):
    r = _run(_cfg(tmp_path, plot=True), split)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 2
    e1 = metrics["epochs"][1]
    for key in ("recall_at_k", "lrs", "score", "tau", "retries", "weight_variation", "cap_reached", "guards"):
        assert key in e1
    assert set(e1["recall_at_k"]) == {"1", "2", "4", "8"}
    assert list(e1["lrs"]) == ["stem", "blocks.0", "blocks.1", "blocks.2", "top", "head"]
    assert e1["tau"] == pytest.approx(0.94 * 0.99)
    assert 0 <= e1["retries"] <= 2 and e1["trials"] == e1["retries"] + 1
    assert e1["cap_reached"] == (e1["score"] < e1["tau"])
    assert (tmp_path / "autolr_lrs.png").stat().st_size > 1000
    assert (tmp_path / "checkpoint.pt").is_file()
    assert r["final"]["epoch"] == 1
    e0 = metrics["epochs"][0]
    if e0["retries"]:  # an LR update happened: stem = 0.5 * first block, head reset to 0.01
        assert e1["lrs"]["stem"] == pytest.approx(0.5 * e1["lrs"]["blocks.0"])
        assert e1["lrs"]["head"] == pytest.approx(0.01)


def test_resume_after_interruption_gives_the_same_state(tmp_path, split):
    full = _run(_cfg(tmp_path / "full", epochs=2), split)
    _run(_cfg(tmp_path / "part", epochs=1), split)
    resumed = _run(_cfg(tmp_path / "part", epochs=2, resume=True), split)
    sa, sb = full["model"].state_dict(), resumed["model"].state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)
    ha, hb = full["history"], resumed["history"]
    assert [h["lrs"] for h in ha] == [h["lrs"] for h in hb]
    assert [h["score"] for h in ha] == [h["score"] for h in hb]
    assert [h["recall_at_k"] for h in ha] == [h["recall_at_k"] for h in hb]


def test_resume_with_another_config_refuses(tmp_path, split):
    _run(_cfg(tmp_path, epochs=1), split)
    with pytest.raises(UserError, match=r"lr: checkpoint 0.001, this run 0.002"):
        _run(_cfg(tmp_path, epochs=2, lr=2e-3, resume=True), split)
    with pytest.raises(UserError, match="workers: checkpoint 0, this run 3"):
        _run(_cfg(tmp_path, epochs=2, workers=3, resume=True), split)
    with pytest.raises(UserError, match="nothing to resume"):
        _run(_cfg(tmp_path / "empty", resume=True), split)


def test_auto_prune_leaves_model_optimizer_checkpoint(tmp_path, split):
    # ratio huge: every shape-preserving top block qualifies; max_fraction 0.5 of 4 blocks -> 2
    # (top changes the width, so walking down stops there: nothing pruned) -> use a grouping without top
    cfg = _cfg(tmp_path, epochs=1, prune="auto", prune_ratio=1e9, prune_max_fraction=0.5)
    m = TinyNet()
    g = generic_groups(m, ["stem", "blocks.0", "blocks.1", ("blocks.2", ["blocks.2", "top"]), "head"],
                       stem="stem", head="head")
    r = run_autolr(cfg, model=m, groups=g, split=split)
    assert r["pruned"] == []  # blocks.2 spans two modules and changes width: the walk stops there
    m, g = _tiny()
    g = generic_groups(m, ["stem", "top", "blocks.0", "blocks.1", "blocks.2", "head"], stem="stem", head="head")
    r = run_autolr(_cfg(tmp_path / "b", epochs=1, prune="auto", prune_ratio=1e9, prune_max_fraction=0.5),
                   model=m, groups=g, split=split)
    assert r["pruned"] == ["blocks.2", "blocks.1"]
    assert r["groups"] == ["stem", "top", "blocks.0", "head"]
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert not any(k.startswith(("blocks.1.", "blocks.2.")) for k in ck["model"])
    assert ck["pruned"] == ["blocks.2", "blocks.1"] and len(ck["lrs"]) == 4
    h = r["history"][0]
    assert h["prune_probe"]["pruned"] == ["blocks.2", "blocks.1"] and list(h["lrs"]) == r["groups"]


def test_baseline_is_one_lr_one_trial(tmp_path, split):
    r = _run(_cfg(tmp_path, epochs=1, baseline=True, tau0=2.0, plot=False), split)
    for h in r["history"]:
        assert h["retries"] == 0 and h["tau"] is None
        assert set(h["lrs"].values()) == {1e-3, 1e-2} and h["lrs"]["head"] == 1e-2


def test_impossible_tau_hits_the_retry_cap(tmp_path, split):
    r = _run(_cfg(tmp_path, epochs=1, tau0=1.5, max_retries=2), split)
    h = r["history"][0]
    assert h["retries"] == 2 and h["cap_reached"] and h["trials"] == 3
    assert h["score"] == max(h["trial_scores"])  # the best trial is kept
    assert "target" in h["guards"]
    # the LRs carried on are the accepted (best) trial's, not the last update's
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["lrs"].tolist() == list(h["lrs"].values())


def test_bn_eval_flag_keeps_running_stats(tmp_path, split):
    m, g = _tiny()
    before = m.stem[1].running_mean.clone()
    r = run_autolr(_cfg(tmp_path, epochs=1, bn_eval=True, max_retries=0), model=m, groups=g, split=split)
    torch.testing.assert_close(r["model"].stem[1].running_mean, before)
    m, g = _tiny()
    r = run_autolr(_cfg(tmp_path / "t", epochs=1, max_retries=0), model=m, groups=g, split=split)
    assert not torch.equal(r["model"].stem[1].running_mean, before)


def test_cli_bad_inputs(tmp_path, capsys):
    from pyfici.cli import main

    (tmp_path / "cub").mkdir()
    rc = main(["train", "autolr", "--dataset", "cub200", "--root", str(tmp_path / "cub"), "--out", str(tmp_path / "o"),
               "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "images.txt" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(UserError, match="--prune released is the ResNet-50 preset"):
        AutoLRConfig(backbone="resnet18", prune="released").check()


def test_cli_resnet18_builtin_runs(tmp_path, capsys):
    pytest.importorskip("torchvision")
    from pyfici.cli import main

    rc = main(["train", "autolr", "--dataset", "builtin", "--backbone", "resnet18", "--epochs", "1",
               "--image-size", "32", "--per-class", "2", "--batch-size", "10", "--max-retries", "0",
               "--workers", "0", "--out", str(tmp_path), "--quiet", "--prune", "none"])
    assert rc == 0
    cap = capsys.readouterr()
    assert "epoch 0: S=" in cap.err and "R@1=" in cap.err and "done: 1 epochs" in cap.out
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert len(m["epochs"][0]["lrs"]) == 1 + 8 + 1


def test_query_gallery_protocol_inshop_style(tmp_path, split):
    from pyfici.data import RetrievalSplit

    test = split.test
    query = [it for i, it in enumerate(test) if i % 3 == 0]
    gallery = [it for i, it in enumerate(test) if i % 3 != 0]
    qg = RetrievalSplit("qg", split.train, test, (1, 10, 20), query=query, gallery=gallery)
    m, g = _tiny()
    r = run_autolr(_cfg(tmp_path, epochs=1, max_retries=0), model=m, groups=g, split=qg)
    rec = r["history"][0]["recall_at_k"]
    assert set(rec) == {1, 10, 20} and 0 <= rec[1] <= rec[10] <= rec[20] == 1.0


def test_demo_compare_small():
    pytest.importorskip("torchvision")
    from pyfici.methods.autolr import demo_compare

    with pytest.warns(UserWarning):
        res = demo_compare(epochs=1, image_size=32, per_class=2, backbone="resnet18", max_retries=0,
                           prune="none", batch_size=10)
    assert set(res) == {"autolr", "baseline"}
    for r in res.values():
        assert "model" not in r and 1 in r["history"][0]["recall_at_k"]
