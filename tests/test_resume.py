"""Resuming a run with changes (``mixlab train --resume RUN --lr ...``): the keys safe to change
are applied, really used and recorded in the run's config history; the others are refused,
naming the key, with nothing written; a finished run given more epochs goes on."""
from __future__ import annotations

import json
import math
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mixlab.cli import main
from mixlab.config import ConfigError, build_config
from mixlab.engine.optim import build_optimizer
from mixlab.engine.scheduler import build_scheduler

# a 0.01M-parameter spec model on 128 digits at 16 px: 4 steps an epoch, each epoch about a second
SMALL = {
    "model": {"name": "spec:patch4 / convnext:1x8 / attention:1x16:heads=2"},
    "data": {"name": "digits", "img_size": 16, "limit_train": 128, "limit_val": 64},
    "train": {"epochs": 1, "batch_size": 32},
    "optimizer": {"name": "sgd", "lr": 0.05, "weight_decay": 0.0},
    "schedule": {"name": "constant", "warmup_epochs": 0},
    "log": {"progress": "false", "print_every": 0},
}


def start(tmp_path, name="r", **overrides) -> Path:
    """Train SMALL (with ``section={key: value}`` overrides) into tmp_path/name; the run directory."""
    layer = json.loads(json.dumps(SMALL))
    for section, keys in overrides.items():
        layer[section].update(keys)
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({**layer, "output_dir": str(tmp_path), "name": name}))
    assert main(["train", str(cfg)]) == 0
    return tmp_path / name


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]


def snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_lower_lr_after_a_divergence_continues_from_the_last_good_checkpoint(tmp_path, capsys):
    run = start(tmp_path)  # one sane epoch: the checkpoint of step 4
    # two more epochs at lr 1e3 (the change is applied: the old lr would not diverge) blow up in epoch 2 or 3
    assert main(["train", "--resume", str(run), "--epochs", "3", "--lr", "1e3"]) == 3
    err = capsys.readouterr().err
    assert "the loss became" in err and "last good checkpoint" in err
    command = f"mixlab train --resume {shlex.quote(str(run))} --lr 500"  # half the lr that diverged
    assert command in err, err
    assert rows(run)[-1]["epoch"] < 3
    good = json.loads((run / "checkpoints" / "latest.json").read_text())["step"]

    # the command the message gives, with a learning rate that works
    assert main(["train", "--resume", str(run), "--lr", "0.05"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from ckpt-{good:08d}" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["steps"] == 12 and summary["lr"] == 0.05
    losses = [r["train_loss"] for r in rows(run)]
    assert [r["epoch"] for r in rows(run)] == [1, 2, 3]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    assert all(r["lr"] == 0.05 for r in rows(run)[good // 4:])  # the optimizer used the new lr
    assert yaml.safe_load((run / "config.yaml").read_text())["optimizer"]["lr"] == 0.05
    changes = [(h["key"], h["old"], h["new"], h["step"]) for h in history(run)]
    assert changes == [("optimizer.lr", 0.05, 1000.0, 4), ("train.epochs", 1, 3, 4),
                       ("optimizer.lr", 1000.0, 0.05, good)]
    assert history(run)[-1]["epoch"] == good // 4


@pytest.mark.parametrize("args, key", [(["--model", "nano_resnet"], "model.name"),
                                       (["--set", "train.seed=5"], "train.seed"),
                                       (["--batch-size", "16", "--set", "aug.mixup=0.5"], "train.batch_size")])
def test_unsafe_changes_are_refused_naming_the_key_and_writing_nothing(tmp_path, capsys, args, key):
    run = start(tmp_path)
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--epochs", "2", *args]) == 2
    err = capsys.readouterr().err
    assert key in err and "checkpoints" in err, err
    if "aug.mixup=0.5" in args:
        assert "aug.mixup" in err  # every refused key is named
    assert "train.epochs" not in err.split("Only these keys may change")[0]  # a safe change is not refused
    assert snapshot(run) == before


def test_more_epochs_on_a_finished_run_train_them_and_fewer_are_refused(tmp_path, capsys):
    run = start(tmp_path, train={"epochs": 2})
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--epochs", "1"]) == 2
    assert "already trained 2 epochs" in capsys.readouterr().err
    assert snapshot(run) == before

    assert main(["train", "--resume", str(run), "--epochs", "4", "--set", "log.print_every=2"]) == 0
    assert "already complete" not in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 4 and summary["steps"] == 16
    assert [r["epoch"] for r in rows(run)] == [1, 2, 3, 4]
    assert sorted(p.name for p in (run / "checkpoints").glob("ckpt-*.safetensors"))[-1] == "ckpt-00000016.safetensors"
    assert [(h["key"], h["old"], h["new"], h["step"], h["epoch"]) for h in history(run)] == [
        ("train.epochs", 2, 4, 8, 2), ("log.print_every", 0, 2, 8, 2)]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 4


def test_resuming_without_changes_writes_no_history(tmp_path, capsys):
    run = start(tmp_path)
    assert main(["train", "--resume", str(run)]) == 0
    assert "already complete" in capsys.readouterr().out
    assert not (run / "config_history.jsonl").exists()


def test_resume_config_diffs_the_saved_configuration(tmp_path):
    from mixlab.config import resume_config

    saved = build_config(SMALL)
    # where the run lives is not a change (train(cfg, run_dir=other, resume=True) names another run)
    same, changes = resume_config(saved, build_config(SMALL, {"name": "x", "output_dir": "y"}))
    assert changes == [] and same.to_dict() == saved.to_dict()
    cfg, changes = resume_config(saved, build_config(SMALL, overrides=["schedule.min_lr=0", "train.amp=bf16"]))
    assert changes == [("schedule.min_lr", 1e-5, 0.0), ("train.amp", "none", "bf16")]
    assert cfg.schedule.min_lr == 0.0
    with pytest.raises(ConfigError) as refused:
        resume_config(saved, build_config(SMALL, overrides=["model.drop_path_rate=0.1", "optimizer.weight_decay=0.1"]))
    assert "model.drop_path_rate" in str(refused.value) and "optimizer.weight_decay" in str(refused.value)


def test_a_new_lr_and_schedule_continue_at_the_step_reached_with_layer_decay_scales():
    model = torch.nn.Sequential()
    model.add_module("blocks", torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))
    model.add_module("head", torch.nn.Linear(2, 2))

    def built(lr, total):
        opt = build_optimizer(model, "sgd", lr=lr, weight_decay=0.0, layer_decay=0.5)
        return opt, build_scheduler(opt, "cosine", total_steps=total, warmup_steps=2, min_lr=0.0)

    opt, sched = built(1.0, 10)
    for _ in range(6):
        opt.step()
        sched.step()
    state = opt.state_dict()
    opt2, sched2 = built(0.1, 20)  # a resume with a tenth of the lr and twice the steps
    opt2.load_state_dict(state)  # brings back the old lr ...
    sched2.continue_at(6)  # ... which the new schedule, at the step reached, replaces
    scales = [g["lr_scale"] for g in opt2.param_groups]
    assert len(set(scales)) == 3  # three depths, three scales
    for g, s in zip(opt2.param_groups, scales):
        want = s * 0.5 * 0.1 * (1 + math.cos(math.pi * 4 / 18))
        assert g["lr"] == pytest.approx(want) and g["initial_lr"] == 0.1
    assert sched2.get_last_lr() == [g["lr"] for g in opt2.param_groups]
    opt2.step()
    sched2.step()
    assert opt2.param_groups[-1]["lr"] == pytest.approx(0.5 * 0.1 * (1 + math.cos(math.pi * 5 / 18)))


def test_a_run_killed_mid_epoch_goes_on_with_changes_from_its_position(tmp_path, capsys):
    # mixlab 0.1.0's run killed after the step-6 checkpoint, 2 batches into epoch 2 of 2 (4 steps an epoch)
    run = tmp_path / "interrupted"
    shutil.copytree(Path(__file__).parent / "fixtures" / "run-v0.1.0" / "interrupted", run)
    assert main(["train", "--resume", str(run), "--epochs", "1"]) == 2
    assert "already trained 1 epochs and 2 batches; give at least 2" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--epochs", "3", "--set", "schedule.min_lr=0"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 12
    assert [(h["key"], h["step"], h["epoch"], h["batch_in_epoch"]) for h in history(run)] == [
        ("schedule.min_lr", 6, 1, 2), ("train.epochs", 6, 1, 2)]
    assert rows(run)[-1]["lr"] == 0.0  # the cosine of the new length ends at the new min_lr


def test_a_yaml_file_given_with_resume_is_the_configuration_asked_for(tmp_path, capsys):
    run = start(tmp_path)
    cfg = yaml.safe_load((tmp_path / "r.yaml").read_text())
    cfg["train"]["epochs"], cfg["optimizer"]["lr"] = 2, 0.02
    (tmp_path / "more.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "more.yaml"), "--resume"]) == 0
    assert [(h["key"], h["new"]) for h in history(run)] == [("optimizer.lr", 0.02), ("train.epochs", 2)]
    cfg["model"]["name"] = "nano_resnet"
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "other.yaml"), "--resume", str(run)]) == 2
    assert "model.name" in capsys.readouterr().err
