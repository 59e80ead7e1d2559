"""Rolling-back: roll-back semantics, schedule validation, resume across a period
boundary, triplet loss, CLI. Tiny ResNet (one BasicBlock per stage) on 32x16
built-in images, so the whole file runs in well under a minute on 2 cores."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from pyfici.data.reid import builtin_reid
from pyfici.engine import UserError
from pyfici.engine.files import load_checkpoint
from pyfici.methods import rollback as rb
from pyfici.methods.rollback import (
    Period,
    RollbackConfig,
    batch_hard_triplet_loss,
    default_schedule,
    pretrained_state,
    released_schedule,
    resolve_schedule,
    roll_back_,
    run,
)
from pyfici.models import groups_for, resnet_groups, retrieval_head

SIZE = (32, 16)


class TinyReIDNet(torch.nn.Module):
    """A ResNet-shaped net (conv1, bn1, layer1..4 of one small block each) with the
    rolling-back head; grouped by pyfici.models.resnet_groups."""

    def __init__(self, num_classes: int):
        super().__init__()
        nn = torch.nn
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8)
        chans = [8, 8, 16, 16, 16]
        for i in range(4):
            stride = 2 if i in (1, 2) else 1
            block = nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 3, stride, 1, bias=False), nn.BatchNorm2d(chans[i + 1]),
                                  nn.ReLU())
            setattr(self, f"layer{i + 1}", nn.Sequential(block))
        self.head = retrieval_head(16, num_classes, embed_dim=16)

    def layer_groups(self):
        return resnet_groups(self)

    def features(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean((2, 3))

    def forward(self, x):
        return self.head(self.features(x))


def tiny_model(num_classes: int) -> torch.nn.Module:
    """Deterministic init: the "pre-trained" trunk is identical on every build."""
    torch.manual_seed(123)
    return TinyReIDNet(num_classes)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions are dominated by thread hand-offs; one thread is several times
    faster here (and immune to a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    return builtin_reid(num_ids=8, num_cams=2, images_per_cam=2, size=SIZE)


def cfg(tmp_path, **kw) -> RollbackConfig:
    base = dict(dataset="builtin", epochs_per_period=1, batch_size=4, image_size=SIZE, workers=0, device="cpu",
                out=str(tmp_path), eval_every=0, quiet=True, seed=3)
    base.update(kw)
    return RollbackConfig(**base)


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.train()
    model(torch.randn(4, 3, *SIZE) * 3 + 1)  # moves every BN's running stats and num_batches_tracked


def test_roll_back_restores_weights_and_bn_stats_of_reset_groups_only():
    model = tiny_model(5)
    groups = groups_for(model)
    pre = pretrained_state(model, groups)
    assert not any(k.startswith("head.") for k in pre)
    _perturb(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reset = ["layer3.0", "layer4.0"]
    n = roll_back_(model, groups, reset, pre)
    after = model.state_dict()
    reset_keys = [k for k in after if k.startswith(("layer3.", "layer4."))]
    assert n == len(reset_keys) > 0
    for suffix in ("weight", "running_mean", "running_var", "num_batches_tracked"):  # the perturbation moved them
        assert any(k.endswith(suffix) and not torch.equal(before[k], pre[k]) for k in reset_keys), suffix
    assert any(k.endswith("running_mean") for k in reset_keys) and any(k.endswith("num_batches_tracked") for k in reset_keys)
    for k, v in after.items():
        if k in reset_keys:
            assert torch.equal(v, pre[k]), k
        else:
            assert torch.equal(v, before[k]), k  # kept groups and the head untouched


def test_schedule_presets_and_validation():
    model = tiny_model(5)
    groups = groups_for(model)
    periods = resolve_schedule(released_schedule(), groups)
    assert len(periods) == 4
    assert periods[0].reset == () and periods[0].lr["head"] == 0.1 and periods[0].lr["layer2.0"] == 0.01
    assert periods[1].reset == ("layer1.0", "layer2.0", "layer3.0", "layer4.0")
    assert periods[1].lr == {"stem": 0.001, "layer1.0": 0.01, "layer2.0": 0.01, "layer3.0": 0.01, "layer4.0": 0.01, "head": 0.01}
    assert periods[3].kept == ("stem", "layer1.0", "layer2.0", "head") and periods[3].reset == ("layer3.0", "layer4.0")
    assert default_schedule(groups) == released_schedule()

    def bad(period_list, match):
        with pytest.raises(ValueError, match=match):
            resolve_schedule(period_list, groups)

    ok = released_schedule()
    p2 = ok[1]
    bad([ok[0], Period(p2.kept, p2.reset + ("layer5",), p2.lr)], r"'layer5', which the backbone lacks")
    bad([ok[0], Period(("stem",), p2.reset, p2.lr)], r"\['head'\] are neither kept nor reset")
    bad([ok[0], Period(p2.kept + ("layer1",), p2.reset, p2.lr)], "listed twice")
    bad([ok[0], Period(("stem",), p2.reset + ("head",), p2.lr)], "never re-initialised")
    bad([Period(p2.kept, p2.reset, p2.lr)], "period 1 starts from the pre-trained state")
    bad([Period(ok[0].kept, (), {"stem": 0.1, "head": 0.1})], "no learning rate for group 'layer1.0'")
    bad([Period(ok[0].kept, (), {**ok[0].lr, "head": -1.0})], "positive")
    bad([Period(ok[0].kept, (), {**ok[0].lr, "fc9": 1.0})], "lr names groups the backbone lacks")
    # the most specific LR wins
    per = resolve_schedule([Period(ok[0].kept, (), {**ok[0].lr, "layer1.0": 0.5})], groups)[0]
    assert per.lr["layer1.0"] == 0.5 and per.lr["layer1.0"] != per.lr["layer2.0"]
    # generic (non-ResNet) grouping: blocks split into 4 stages
    from pyfici.models import LayerGroups

    g = LayerGroups([("stem", ["a"])] + [(f"b{i}", [f"b{i}"]) for i in range(8)] + [("head", ["h"])])
    sched = resolve_schedule(default_schedule(g), g)
    assert [len(p.reset) for p in sched] == [0, 8, 6, 4]


def test_bad_schedule_refused_before_training(tmp_path, data):
    sched = [released_schedule()[0], Period(("stem", "head"), ("layer1", "layer2", "layer3", "layer9"), {"stem": 1, "layer": 1, "head": 1})]
    with pytest.raises(UserError, match="layer9"):
        run(cfg(tmp_path), model_fn=tiny_model, data=data, schedule=sched)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_run_rolls_back_at_period_start_and_resume_across_boundary(tmp_path, data, monkeypatch):
    # uninterrupted: 3 periods x 1 epoch (the released schedule's first 3 periods)
    sched = released_schedule()[:3]
    starts = []
    from pyfici.methods.rollback import train as rb_train

    real = rb_train._make_optimizer

    def spy(c, model, groups, period):
        starts.append({k: v.clone() for k, v in model.state_dict().items()})
        return real(c, model, groups, period)

    monkeypatch.setattr(rb_train, "_make_optimizer", spy)
    full = run(cfg(tmp_path / "full"), model_fn=tiny_model, data=data, schedule=sched)
    assert full["rollback_epochs"] == [1, 2] and len(starts) == 3
    # interrupted at the end of period 1, then resumed
    part = run(cfg(tmp_path / "part", stop_after_epochs=1), model_fn=tiny_model, data=data, schedule=sched)
    assert part["completed_epochs"] == 1
    ck = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert ck["epoch"] == 1
    starts.clear()
    res = run(cfg(tmp_path / "part", resume=True), model_fn=tiny_model, data=data, schedule=sched)
    assert res["completed_epochs"] == 3 and res["rollback_epochs"] == [1, 2]
    # at the start of period 2: layer1-4 are the pre-trained values again, stem and head kept
    pre = tiny_model(data.num_train_pids).state_dict()
    s2 = starts[0]
    for k, v in s2.items():
        if k.startswith(("layer1.", "layer2.", "layer3.", "layer4.")):
            assert torch.equal(v, pre[k]), k
        else:
            assert torch.equal(v, ck["model"][k]), k
    assert not torch.equal(s2["head.0.weight"], pre["head.0.weight"])  # head never re-initialised
    # the resumed run reproduces the uninterrupted one bit for bit
    for k, v in full["model"].state_dict().items():
        assert torch.equal(v, res["model"].state_dict()[k]), k
    assert [e["loss"] for e in res["epochs"]] == [e["loss"] for e in full["epochs"]]
    m = json.loads((tmp_path / "part" / "metrics.json").read_text())
    assert m["evaluations"][-1]["epoch"] == 3 and {"mAP", "rank1", "period"} <= set(m["evaluations"][-1])
    assert (tmp_path / "part" / "curves.png").stat().st_size > 1000


def test_resume_mid_period_and_config_mismatch(tmp_path, data):
    sched = released_schedule()[:2]
    full = run(cfg(tmp_path / "a", epochs_per_period=2), model_fn=tiny_model, data=data, schedule=sched)
    run(cfg(tmp_path / "b", epochs_per_period=2, stop_after_epochs=3), model_fn=tiny_model, data=data, schedule=sched)
    with pytest.raises(UserError, match="lr_gamma: checkpoint 0.1, this run 0.5"):
        run(cfg(tmp_path / "b", epochs_per_period=2, resume=True, lr_gamma=0.5), model_fn=tiny_model, data=data, schedule=sched)

    def other_pretrained(n):
        torch.manual_seed(999)
        return TinyReIDNet(n)

    with pytest.raises(UserError, match="workers: checkpoint 0, this run 1"):
        run(cfg(tmp_path / "b", epochs_per_period=2, resume=True, workers=1), model_fn=tiny_model, data=data,
            schedule=sched)
    with pytest.raises(UserError, match="pre-trained weights differ"):
        run(cfg(tmp_path / "b", epochs_per_period=2, resume=True), model_fn=other_pretrained, data=data, schedule=sched)
    res = run(cfg(tmp_path / "b", epochs_per_period=2, resume=True), model_fn=tiny_model, data=data, schedule=sched)
    for k, v in full["model"].state_dict().items():
        assert torch.equal(v, res["model"].state_dict()[k]), k


def test_baseline_same_epochs_one_period(tmp_path, data):
    res = run(cfg(tmp_path, baseline=True, eval_every=2), model_fn=tiny_model, data=data, schedule=released_schedule()[:2])
    assert res["total_epochs"] == 2 and res["rollback_epochs"] == []
    assert {e["period"] for e in res["epochs"]} == {1}
    assert res["epochs"][0]["lr"]["head"] == 0.1
    assert [e["epoch"] for e in res["evaluations"]] == [0, 2] and 0.0 <= res["final"]["mAP"] <= 1.0


def test_batch_hard_triplet_matches_brute_force():
    torch.manual_seed(0)
    f = torch.randn(12, 7, dtype=torch.float64, requires_grad=True)
    pids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 5])  # pid 5 has no positive: skipped
    loss = batch_hard_triplet_loss(f, pids, margin=0.3)
    d = torch.cdist(f, f)
    terms = []
    for i in range(12):
        pos = [j for j in range(12) if pids[j] == pids[i] and j != i]
        if not pos:
            continue
        neg = [j for j in range(12) if pids[j] != pids[i]]
        terms.append(torch.relu(d[i, pos].max() - d[i, neg].min() + 0.3))
    ref = torch.stack(terms).mean()
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert f.grad is not None and torch.isfinite(f.grad).all()


def test_triplet_pk_training_runs(tmp_path, data):
    res = run(cfg(tmp_path, triplet=True, p=2, k=2), model_fn=tiny_model, data=data, schedule=released_schedule()[:2])
    assert res["completed_epochs"] == 2 and all(e["loss"] > 0 for e in res["epochs"])


def test_cli_train_eval_and_bad_inputs(tmp_path, capsys):
    from pyfici.cli import main

    out = tmp_path / "cli"
    args = ["train", "rollback", "--dataset", "builtin", "--builtin-ids", "8", "--backbone", "resnet18",
            "--pretrained", "none", "--epochs-per-period", "1", "--image-size", "32", "16", "--batch-size", "8",
            "--workers", "0", "--device", "cpu", "--out", str(out), "--quiet", "--stop-after-epochs", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
        assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
        assert main(args + ["--resume", "--lr-gamma", "0.3"]) == 2
        assert "lr_gamma" in capsys.readouterr().err
        assert main(["eval", "reid", "--checkpoint", str(out / "checkpoint.pt"), "--device", "cpu", "--workers", "0", "--json", "-"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert {"mAP", "mINP", "rank1", "rank5", "rank10"} <= set(d)
    ev = tmp_path / "ev"
    assert main(["eval", "reid", "--checkpoint", str(out / "checkpoint.pt"), "--device", "cpu", "--visualize", "2",
                 "--out", str(ev), "--json", str(tmp_path / "r.json")]) == 0
    assert (ev / "ranked" / "index.html").is_file() and len(list((ev / "ranked").rglob("*.png"))) == 2
    assert json.loads((tmp_path / "r.json").read_text())["mAP"] == d["mAP"] == json.loads((ev / "eval.json").read_text())["mAP"]
    assert main(["eval", "reid", "--checkpoint", str(out / "checkpoint.pt"), "--visualize", "2"]) == 2
    assert "needs --out" in capsys.readouterr().err
    assert main(["train", "rollback", "--dataset", "market1501", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "rollback", "--dataset", "market1501", "--out", str(tmp_path / "x")]) == 2
    assert "--root" in capsys.readouterr().err


def test_demo_helper_returns_both_runs(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = rb.demo(out=tmp_path, epochs_per_period=1, image_size=SIZE, model_fn=tiny_model,
                      builtin_ids=8, builtin_cams=2, builtin_images_per_cam=2, batch_size=8)
    assert set(res) == {"rollback", "baseline"}
    for r in res.values():
        assert r["total_epochs"] == 4 and len(r["cmc"]) > 0 and "model" not in r
        assert {"mAP", "rank1"} <= set(r["final"]) and r["seconds_per_epoch"] > 0
    assert res["rollback"]["rollback_epochs"] == [1, 2, 3] and res["baseline"]["rollback_epochs"] == []
    assert (tmp_path / "rollback" / "metrics.json").is_file() and (tmp_path / "baseline" / "curves.png").is_file()


def test_efficientnet_default_schedule():
    pytest.importorskip("efficientnet_lite_pytorch")
    from pyfici.models import build_backbone

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_backbone("efficientnet_lite0", "none", 4)
    groups = groups_for(model)
    periods = resolve_schedule(default_schedule(groups), groups)
    assert [len(p.reset) for p in periods] == [0, 17, 13, 9]
    assert periods[2].kept == ("stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head")
    assert periods[3].reset[0] == "blocks.8" and periods[3].reset[-1] == "top"
    assert periods[1].lr["stem"] == 0.001 and periods[1].lr["top"] == 0.01 and periods[0].lr["head"] == 0.1


def test_checkpoint_saved_before_final_evaluation_and_resumed_eval(tmp_path, data, monkeypatch):
    from pyfici.methods.rollback import train as rb_train

    real = rb_train.RollbackTrainer.evaluate

    def failing(self, epoch, period):
        raise RuntimeError("evaluation died")

    monkeypatch.setattr(rb_train.RollbackTrainer, "evaluate", failing)
    sched = released_schedule()[:2]
    with pytest.raises(RuntimeError, match="evaluation died"):
        run(cfg(tmp_path), model_fn=tiny_model, data=data, schedule=sched)
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["epoch"] == 2 and ck["pending_eval"] and not (tmp_path / "final.pt").exists()
    monkeypatch.setattr(rb_train.RollbackTrainer, "evaluate", real)
    res = run(cfg(tmp_path, resume=True), model_fn=tiny_model, data=data, schedule=sched)
    assert [e["epoch"] for e in res["evaluations"]] == [2] and (tmp_path / "final.pt").is_file()
    full = run(cfg(tmp_path / "full"), model_fn=tiny_model, data=data, schedule=sched)
    assert res["final"] == full["final"]


def test_torchrun_two_processes(tmp_path):
    """Data-parallel rolling-back under torchrun (gloo on CPU): rank 0 writes the run folder."""
    import os
    import shutil
    import subprocess

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    out = tmp_path / "ddp"
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "pyfici", "train", "rollback", "--dataset", "builtin",
           "--builtin-ids", "8", "--backbone", "resnet18", "--pretrained", "none", "--epochs-per-period", "1",
           "--image-size", "32", "16", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--out", str(out),
           "--quiet", "--stop-after-epochs", "2", "--eval-every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path),
                         executable=None)
    assert res.returncode == 0, res.stderr[-2000:]
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2 and not (out / ".pyfici.lock").exists()
