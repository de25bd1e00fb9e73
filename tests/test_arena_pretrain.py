"""Arena entries MODEL@METHOD: the model fine-tuned (or linearly probed) from its own masked-image-modeling
pretraining, run once per model and method in the arena directory before the runs that start from it."""
from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from helpers import train_in_this_process

from mixlab.arena import ArenaSettings, expand_models, run_arena
from mixlab.arena import runner
from mixlab.arena.pretrain import parse_entry, pretrain_config
from mixlab.config import ConfigError, build_config, load_run_config
from mixlab.weights import load_weights

TINY_VIT = "spec:patch4 / attention:1x32:heads=2,pos=abs"
TINY_CNN = "spec:patch4 / convnext:1x16:kernel=3"
DATA = dict(data="digits", img_size=16, epochs=1, batch_size=32, measure_speed=False)
LIMITS = ["data.limit_train=64", "data.limit_val=32", "log.progress=false", "log.print_every=0"]


def test_entries_name_a_pretraining_method():
    assert parse_entry("nano_vit") == ("nano_vit", "nano_vit", None, False)
    assert parse_entry("nano_vit@mae") == ("nano_vit@mae", "nano_vit", "mae", False)
    assert parse_entry("nano_vit@simmim-probe") == ("nano_vit@simmim-probe", "nano_vit", "simmim", True)
    assert parse_entry(f"{TINY_VIT}@mae").model == TINY_VIT
    assert parse_entry("spec:patch4 / attention:1x32:heads=2 @ x/y").method is None  # not an entry's suffix
    with pytest.raises(ConfigError, match=r"nano_vit@beit: 'beit' is not a pretraining method.*nano_vit@simmim"):
        parse_entry("nano_vit@beit")
    assert expand_models(["nano@simmim", "nano_vit"])[:2] == ["nano_resnet@simmim", "nano_convnext@simmim"]
    assert "nano_vit" in expand_models(["nano@simmim", "nano_vit"])


def test_the_pretraining_takes_the_arenas_data_but_every_training_image():
    base = build_config({"model": {"name": "nano_vit", "kwargs": {"depth": 2}}, "data": {"name": "digits",
                         "img_size": 32}, "train": {"epochs": 5, "device": "cpu"}}, recipe="arena",
                        overrides=["data.limit_train=500", "data.limit_val=100", "optimizer.lr=0.5"])
    cfg = pretrain_config(base, "nano_vit", "simmim")
    assert (cfg.task, cfg.mim.method, cfg.recipe, cfg.train.seed, cfg.train.epochs) == ("mim", "simmim", "simmim", 0, 5)
    assert cfg.data.limit_train is None and cfg.data.limit_val == 100 and cfg.data.img_size == 32
    assert cfg.model.kwargs == {"depth": 2} and cfg.optimizer.lr != 0.5  # the architecture, not the arena's recipe
    assert cfg.train.batch_size == 128 and cfg.schedule.warmup_epochs == pytest.approx(0.5)  # SimMIM's 10 of 100
    cfg = pretrain_config(base, "nano_vit", "mae", epochs=8, batch_size=16, overrides=["schedule.warmup_epochs=2"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.schedule.warmup_epochs) == (8, 16, 2)
    assert cfg.mim.norm_pix_loss  # MAE's recipe


def test_bad_entries_are_refused_before_anything_is_written(tmp_path):
    def refused(match, models, **kw):
        out = tmp_path / "a"
        with pytest.raises(ConfigError, match=match):
            run_arena(ArenaSettings(models=models, out=str(out), **{**DATA, **kw}), quiet=True)
        assert not out.exists()
    refused("MAE cannot pretrain", [f"{TINY_CNN}@mae"])
    refused("an arena of task mim is itself the pretraining", [f"{TINY_VIT}@mae"], overrides=["task=mim"])
    (tmp_path / "w.safetensors").write_bytes(b"")
    refused("use one or the other", [f"{TINY_VIT}@mae"], overrides=[f"model.pretrained={tmp_path / 'w.safetensors'}"])
    refused("the line-up has none", [TINY_VIT], pretrain_epochs=2)
    refused(r"--pretrain-set\): mim.mask_ratio", [f"{TINY_VIT}@simmim"], pretrain_overrides=["mim.mask_ratio=2"])


def test_an_arena_of_scratch_simmim_and_probe(tmp_path, monkeypatch):
    """One pretraining for both entries, on every training image; the fine-tuned and probed runs start from its
    encoder (the probe keeps it exactly); the report lists the pretraining; a rerun trains nothing; other
    pretraining settings in the same directory are refused."""
    monkeypatch.setattr(runner, "train_in_child", train_in_this_process)
    out = tmp_path / "arena"
    models = [TINY_VIT, f"{TINY_VIT}@simmim", f"{TINY_VIT}@simmim-probe"]
    s = ArenaSettings(models=models, out=str(out), overrides=LIMITS, pretrain_overrides=["mim.picture_images=2"],
                      **DATA)
    result = run_arena(s, quiet=True)
    assert result["failed"] == []
    [pre] = list((out / "pretrain").iterdir())
    cfg = load_run_config(pre)
    assert (cfg.task, cfg.mim.method, cfg.data.limit_train) == ("mim", "simmim", None)
    assert json.loads((pre / "summary.json").read_text())["val_loss"] > 0
    encoder, _ = load_weights(pre / "checkpoints" / "best.safetensors")
    encoder = {k[len("encoder."):]: v for k, v in encoder.items() if k.startswith("encoder.")}
    for entry, frozen in ((models[1], False), (models[2], True)):
        run = out / "runs" / runner.model_slug(entry) / "seed0"
        rc = load_run_config(run)
        assert rc.model.name == TINY_VIT and rc.model.pretrained == str(pre.resolve()) and rc.data.limit_train == 64
        assert rc.model.freeze == ("backbone" if frozen else "none")
        w, _ = load_weights(run / "checkpoints" / "best.safetensors")
        same = [torch.equal(w[k], v) for k, v in encoder.items() if k in w]
        assert len(same) == len(encoder) - sum(k.startswith("head") for k in encoder)
        assert all(same) if frozen else not all(same)
    scratch, _ = load_weights(out / "runs" / runner.model_slug(TINY_VIT) / "seed0" / "checkpoints" / "best.safetensors")
    assert not torch.equal(scratch["stem.proj.weight"], encoder["stem.proj.weight"])
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["pretraining"] == {"epochs": 1, "overrides": ["mim.picture_images=2"]}
    entries = {r["model"]: r for r in data["results"]}
    assert "pretraining" not in entries[TINY_VIT]
    for m in models[1:]:
        p = entries[m]["pretraining"]
        assert p["method"] == "simmim" and p["run"] == str(pre) and p["probe"] == m.endswith("-probe")
        assert entries[m]["picture"] == str(pre / "pictures" / "epoch001.png")
    md = (out / "leaderboard.md").read_text()
    assert f"| {pre.name} | {runner.model_label(models[1])}, {runner.model_label(models[2])} | simmim | 1 |" in md
    assert "<h2>Pretraining</h2>" in (out / "index.html").read_text()

    monkeypatch.setattr(runner, "train_in_child", lambda *a: pytest.fail("a finished run was trained again"))
    assert run_arena(s, quiet=True)["failed"] == []
    with pytest.raises(ConfigError, match="holds a pretraining with other settings"):
        run_arena(ArenaSettings(**{**s.__dict__, "pretrain_epochs": 2}), quiet=True)


def test_runs_wait_for_their_pretraining_and_a_failed_one_fails_its_entries(tmp_path, monkeypatch):
    """With two jobs, an entry's runs start only after its pretraining has finished, while runs that need none
    go on beside it; when the pretraining fails, its entries are failed without being tried."""
    started, lock = [], threading.Lock()

    def fake(run_dir, tag, quiet, threads, running, gpu, fail_pretraining=False):
        pre = run_dir.parent.name == "pretrain"
        with lock:
            started.append((tag, time.monotonic()))
        if pre:
            time.sleep(0.5)
            if fail_pretraining:
                return 1
        (run_dir / "summary.json").write_text(json.dumps({"val_loss": 0.5} if pre else {"top1": 50.0}))
        return 0

    monkeypatch.setattr(runner, "train_in_child", fake)
    models = [f"{TINY_VIT}@simmim", TINY_CNN, f"{TINY_VIT}@simmim-probe"]
    s = ArenaSettings(models=models, out=str(tmp_path / "a"), jobs=2, seeds=2, overrides=LIMITS, **DATA)
    assert run_arena(s, quiet=True)["failed"] == []
    tags = [t for t, _ in started]
    assert tags[0].startswith("[pretraining") and len(tags) == 7
    done = started[0][1] + 0.5
    label = runner.model_label(TINY_VIT)
    assert all(t >= done for tag, t in started if f"{label}@" in tag)
    assert any(t < done for tag, t in started if runner.model_label(TINY_CNN) in tag)  # beside the pretraining

    started.clear()
    monkeypatch.setattr(runner, "train_in_child", lambda *a: fake(*a, fail_pretraining=True))
    result = run_arena(ArenaSettings(**{**s.__dict__, "out": str(tmp_path / "b")}), quiet=True)
    assert sorted(result["failed"]) == sorted(models[::2])
    assert [t for t, _ in started if "@" in t] == []
    status = {r["model"]: r["status"] for r in result["results"]}
    assert status[TINY_CNN] == "done" and status[models[0]].startswith("failed: its pretraining failed")
