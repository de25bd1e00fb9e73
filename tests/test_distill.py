"""Distillation (``task: distill``): DeiT's hard and soft losses against a literal computation; a student
with a distillation token distils from a run directory, one without from a weights file; bad teachers are
refused before anything is written; a SIGKILLed distillation run resumes to the same weights; two DDP
processes train with a teacher; cached teacher logits give the loss of the uncached teacher."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import kill_at_checkpoint, mixlab

from mixlab.config import ConfigError, build_config
from mixlab.engine.distributed import DistInfo
from mixlab.engine.tasks.distill import DistillationTask, distillation_loss
from mixlab.engine.trainer import train
from mixlab.factory import create_model
from mixlab.runs import evaluate_run, load_run_model
from mixlab.weights import checkpoint_metadata, load_weights, save_weights

LOG = {"progress": "false", "print_every": 0}
DATA = {"name": "digits", "limit_train": 128, "limit_val": 64}
# a ~20K-parameter ConvNeXt on the native 8x8 digits (the teacher, and the student without a token)
CONVNEXT = {"name": "convnext_tiny", "kwargs": {"patch_size": 1, "dims": [16, 32], "depths": [1, 1]}}
# DeiT-Ti with its distillation token, shrunk to one block of width 32 on 2x2 patches
DEIT = {"name": "deit_tiny_distilled_patch16_224", "kwargs": {"patch_size": 2, "embed_dim": 32, "depth": 1,
                                                                "num_heads": 2}}


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    cfg = build_config({"model": CONVNEXT, "data": DATA, "train": {"epochs": 1, "batch_size": 16}, "log": LOG,
                        "output_dir": str(out), "name": "t"})
    summary = train(cfg)
    return out / "t", summary


def student(tmp_path, teacher, model=DEIT, **sections) -> dict:
    layer = {"task": "distill", "model": model, "data": dict(DATA), "train": {"epochs": 1, "batch_size": 16},
             "aug": {"simple_random_crop": False}, "log": LOG, "distill": {"teacher": str(teacher)},
             "output_dir": str(tmp_path)}
    for key, value in sections.items():
        layer[key] = {**layer.get(key, {}), **value} if isinstance(value, dict) else value
    return layer


# -- the losses ---------------------------------------------------------------------------------
def test_hard_and_soft_losses_match_a_literal_computation():
    cls = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    dist = torch.tensor([[0.3, -0.2, 1.1], [2.0, 0.1, -0.4]])
    teacher = torch.tensor([[0.0, 0.2, 3.0], [1.5, 2.5, 0.0]])  # argmax 2 and 1
    base = torch.tensor(0.7)
    alpha, tau = 0.3, 2.0

    def log_softmax(row, t):
        z = [v / t for v in row]
        lse = math.log(sum(math.exp(v) for v in z))
        return [v - lse for v in z]

    # hard: mean over the batch of -log softmax(dist)[argmax teacher]
    ce = -(log_softmax(dist[0].tolist(), 1)[2] + log_softmax(dist[1].tolist(), 1)[1]) / 2
    hard = distillation_loss(cls, dist, base, teacher, "hard", alpha, tau)
    assert hard.item() == pytest.approx((1 - alpha) * 0.7 + alpha * ce, rel=1e-6)
    # soft: tau^2 * sum over batch and classes of p_t (log p_t - log p_s), divided by batch x classes (DeiT)
    kl = 0.0
    for s_row, t_row in zip(dist.tolist(), teacher.tolist()):
        ls, lt = log_softmax(s_row, tau), log_softmax(t_row, tau)
        kl += sum(math.exp(b) * (b - a) for a, b in zip(ls, lt))
    soft = distillation_loss(cls, dist, base, teacher, "soft", alpha, tau)
    assert soft.item() == pytest.approx((1 - alpha) * 0.7 + alpha * tau * tau * kl / 6, rel=1e-6)
    assert distillation_loss(cls, dist, base, teacher, "soft", 0.0, tau).item() == pytest.approx(0.7)


# -- training -------------------------------------------------------------------------------------
def test_distilled_student_from_a_run_directory(tmp_path, teacher_run):
    teacher, teacher_summary = teacher_run
    s = train(build_config(student(tmp_path, teacher, name="s", train={"epochs": 2, "batch_size": 16})))
    d = s["distill"]
    assert s["task"] == "distill" and d["type"] == "hard" and d["alpha"] == 0.5 and d["tau"] == 1.0
    assert str(teacher) in d["teacher"]
    assert d["teacher_top1"] == teacher_summary["top1"]  # the same validation images, its own preprocessing
    assert d["cache"] is True  # no augmentation, no mixup: auto caches
    for key in ("top1", "top1_cls", "top1_dist"):
        assert 0.0 <= s[key] <= 100.0
    rows = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert all("top1_cls" in r and "top1_dist" in r for r in rows)
    # the teacher is not part of the checkpoints; the run evaluates as a classifier with both heads
    weights, _ = load_weights(tmp_path / "s" / "checkpoints" / "best.safetensors")
    assert not any(k.startswith(("teacher", "model.")) for k in weights)
    ev = evaluate_run(tmp_path / "s")
    assert ev["top1"] == s["best_top1"] and "top1_dist" in ev
    # each head's top-1 is that head's own: recomputed here from the model's heads on the same images
    task = DistillationTask(build_config(student(tmp_path, teacher, name="s2")))
    model = load_run_model(tmp_path / "s")[0]
    hits = torch.zeros(3)
    for x, y in task.build_data(with_train=False).val_loader:
        cls, dist = model.forward_heads(model.forward_features(x))
        hits += torch.tensor([(cls.argmax(1) == y).sum(), (dist.argmax(1) == y).sum(), len(y)])
    assert ev["top1_cls"] == pytest.approx(100 * hits[0].item() / hits[2].item())
    assert ev["top1_dist"] == pytest.approx(100 * hits[1].item() / hits[2].item())


def test_student_without_token_distils_from_a_weights_file_soft(tmp_path, teacher_run):
    teacher, teacher_summary = teacher_run
    file = tmp_path / "teacher.safetensors"
    shutil.copy(teacher / "checkpoints" / "best.safetensors", file)
    cfg = build_config(student(tmp_path, file, model=CONVNEXT, name="s", aug={"hflip": 0.5, "mixup": 0.2},
                               distill={"type": "soft", "tau": 2.0, "alpha": 0.7}))
    s = train(cfg)
    assert s["distill"]["type"] == "soft" and s["distill"]["cache"] is False  # augmented: no cache
    assert s["distill"]["teacher_top1"] == teacher_summary["top1"]
    assert "top1_cls" not in s  # one head: logit distillation
    # the distillation term moved the student: alpha 0 (the labels alone) trains other weights
    plain = train(build_config(student(tmp_path, file, model=CONVNEXT, name="p", aug={"hflip": 0.5, "mixup": 0.2},
                                       distill={"type": "soft", "tau": 2.0, "alpha": 0.0})))
    a, _ = load_weights(tmp_path / "s" / "checkpoints" / "best.safetensors")
    b, _ = load_weights(tmp_path / "p" / "checkpoints" / "best.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a) and plain["distill"]["alpha"] == 0.0


def test_teacher_by_model_name_with_weights(tmp_path):
    spec = "spec:patch2 / convnext:1x8"
    model = create_model(spec, num_classes=10, in_chans=1, img_size=8)
    weights = tmp_path / "spec.safetensors"
    save_weights(model.state_dict(), weights, checkpoint_metadata(
        spec, num_classes=10, in_chans=1, img_size=8, mean=[0.5], std=[0.25], crop_pct=1.0, interpolation="bicubic",
        classes=[str(i) for i in range(10)]))
    s = train(build_config(student(tmp_path, spec, name="s", distill={"teacher_weights": str(weights)})))
    assert s["distill"]["teacher"] == f"{spec} ({weights})" and s["distill"]["teacher_top1"] is not None
    task = DistillationTask(build_config(student(tmp_path, spec, distill={"teacher_weights": str(weights)})))
    data = task.build_data()
    task.setup(create_model(DEIT["name"], **task.model_kwargs(data.info)))
    # the teacher records mean 0.5 / std 0.25, the data its own: the batch is re-normalised for it
    assert task.teacher.renormalise and task.teacher.size is None
    x = torch.randn(2, 1, 8, 8)
    raw = x * task.teacher.std_s + task.teacher.mean_s
    with torch.no_grad():
        assert torch.allclose(task.teacher(x), task.teacher.model((raw - 0.5) / 0.25), atol=1e-5)


def _other_class_count_file(tmp_path) -> Path:
    model = create_model(CONVNEXT["name"], num_classes=5, in_chans=1, img_size=8, **CONVNEXT["kwargs"])
    path = tmp_path / "five.safetensors"
    save_weights(model.state_dict(), path, checkpoint_metadata(
        CONVNEXT["name"], num_classes=5, in_chans=1, img_size=8, mean=[0.5], std=[0.5], crop_pct=1.0,
        interpolation="bicubic", model_kwargs=CONVNEXT["kwargs"], classes=list("abcde")))
    return path


def test_bad_teachers_are_refused_before_anything_is_written(tmp_path, teacher_run):
    teacher, _ = teacher_run
    with pytest.raises(ConfigError, match="needs a teacher.*run directory.*weights file.*registered model name"):
        build_config({"task": "distill", "model": DEIT, "data": DATA})
    cases = [
        ({"teacher": str(_other_class_count_file(tmp_path))}, "classifies 5 classes, digits has 10"),
        ({"teacher": str(tmp_path / "missing")}, "no directory, no file and no registered model name"),
        ({"teacher": "convnext_tiny"}, "needs its trained weights.*teacher_weights"),
        ({"teacher": str(teacher), "teacher_weights": "x.safetensors"}, "brings its own weights"),
    ]
    for i, (distill, message) in enumerate(cases):
        cfg = build_config(student(tmp_path, teacher, name=f"bad{i}", distill=distill))
        with pytest.raises(ConfigError, match=message):
            train(cfg)
        assert not (tmp_path / f"bad{i}").exists()
    with pytest.raises(ConfigError, match="distill.teacher is set but task is 'classification'"):
        build_config({"model": DEIT, "data": DATA, "distill": {"teacher": str(teacher)}})
    # the arena checks the teacher once, before its directory or any run exists
    from mixlab.arena import ArenaSettings, run_arena
    arena = tmp_path / "arena"
    settings = ArenaSettings(models=["nano_resnet", "nano_vit"], data="digits", epochs=1, seeds=2, out=str(arena),
                             overrides=["task=distill", f"distill.teacher={_other_class_count_file(tmp_path)}"],
                             measure_speed=False)
    with pytest.raises(ConfigError, match="classifies 5 classes, digits has 10"):
        run_arena(settings, quiet=True)
    assert not arena.exists()
    with pytest.raises(ConfigError, match="cannot be cached"):
        train(build_config(student(tmp_path, teacher, name="c", aug={"hflip": 0.5}, distill={"cache": True})))


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, teacher_run):
    teacher, _ = teacher_run
    # 8 steps an epoch, 2 epochs, a checkpoint every 3 steps; random crops and mixup: the teacher sees them
    layer = student(tmp_path, teacher, train={"epochs": 2, "batch_size": 16}, checkpoint={"every_steps": 3},
                    aug={"simple_random_crop": True, "crop_padding": 1, "mixup": 0.5})
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(layer))
    ref = mixlab("train", str(cfg), "--name", "ref")
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "killed"
    kill_at_checkpoint([str(cfg), "--name", "killed"], run, lambda step: step >= 9 and step % 8)  # mid-epoch 2
    res = mixlab("train", "--resume", str(run))
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stdout
    a, _ = load_weights(tmp_path / "ref" / "checkpoints" / "ckpt-00000016.safetensors")
    b, _ = load_weights(run / "checkpoints" / "ckpt-00000016.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref_sum = json.loads((tmp_path / "ref" / "summary.json").read_text())
    res_sum = json.loads((run / "summary.json").read_text())
    assert res_sum["top1"] == ref_sum["top1"] and res_sum["top1_dist"] == ref_sum["top1_dist"]


def test_two_process_ddp_with_a_teacher(tmp_path, teacher_run):
    teacher, teacher_summary = teacher_run
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(student(tmp_path, teacher, train={"epochs": 1, "batch_size": 16})))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "mixlab", "train", str(cfg), "--name", "ddp"], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["steps"] == 128 // 2 // 16
    assert s["distill"]["teacher_top1"] == teacher_summary["top1"]  # measured over both ranks' shards
    assert r.stdout.count("distilling into") == 1


def test_cached_teacher_logits_give_the_uncached_loss(tmp_path, teacher_run):
    teacher, _ = teacher_run
    tasks, model = [], None
    for cache in (True, False):
        cfg = build_config(student(tmp_path, teacher, distill={"cache": cache}, train={"label_smoothing": 0.1}))
        task = DistillationTask(cfg, DistInfo())
        data = task.build_data()
        if model is None:
            torch.manual_seed(0)
            model = create_model(cfg.model.name, **task.model_kwargs(data.info))
        task.setup(model)
        tasks.append((task, data))
    (cached, data), (uncached, _) = tasks
    assert cached.use_cache and not uncached.use_cache
    model.train()
    for epoch in range(2):
        data.sampler.set_epoch(epoch)
        for i, batch in enumerate(data.train_loader):
            x, y, index = batch
            with torch.no_grad():
                a, _ = cached.loss(model, batch, seed=i)
                b, _ = uncached.loss(model, (x, y), seed=i)
            assert torch.equal(a, b), (epoch, i, a.item(), b.item())


@pytest.mark.parametrize("name, kwargs", [(DEIT["name"], DEIT["kwargs"]),
                                          ("efficientformer_l1", {"depths": [1, 1], "dims": [8, 16], "num_vit": 1})])
def test_forward_heads_are_what_forward_averages_and_returns_in_training(name, kwargs):
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, in_chans=1, img_size=16, **kwargs).eval()
    x = torch.randn(2, 1, 16, 16)
    assert model.distilled
    cls_logits, dist_logits = model.forward_heads(model.forward_features(x))
    assert torch.allclose(model(x), (cls_logits + dist_logits) / 2)
    model.train()
    model.distilled_training = True
    out = model(x)
    cls_logits, dist_logits = model.forward_heads(model.forward_features(x))  # train mode (BatchNorm)
    assert isinstance(out, tuple) and torch.equal(out[0], cls_logits) and torch.equal(out[1], dist_logits)


def test_an_arena_started_before_the_distill_section_goes_on():
    from mixlab.arena.runner import ArenaSettings, _shared_settings, _with_new_keys, base_config
    s = ArenaSettings(models=["nano_vit"], data="digits", epochs=1)
    shared = _shared_settings(s, base_config(s))
    old = json.loads(json.dumps(shared))
    del old["train_config"]["distill"]  # what an arena.json of mixlab before the distill task records
    assert _with_new_keys(old) == shared
    old["train_config"]["train"]["epochs"] = 2  # a real difference stays one
    assert _with_new_keys(old) != shared
