"""The training engine end to end on small data: what a run writes, that it learns, that
an interrupted run resumes exactly, that two processes train with DDP, and that bad input
ends with a clear message and nothing overwritten."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from helpers import kill_at_checkpoint, mixlab

from mixlab.config import build_config
from mixlab.engine.trainer import train
from mixlab.runs import evaluate_run
from mixlab.weights import load_weights

# a ~20K-parameter ConvNeXt on the native 8x8 digits: each epoch takes well under a second
TINY = {
    "model": {"name": "convnext_tiny", "kwargs": {"patch_size": 1, "dims": [16, 32], "depths": [1, 1]}},
    "data": {"name": "digits"},
    "train": {"epochs": 2, "batch_size": 32},
    "log": {"progress": "false", "print_every": 0},
}


def tiny(tmp_path, **sections):
    layer = json.loads(json.dumps(TINY))
    for key, value in sections.items():
        if isinstance(value, dict):
            layer.setdefault(key, {}).update(value)
        else:
            layer[key] = value
    layer["output_dir"] = str(tmp_path)
    return layer


def write_config(tmp_path, name="cfg.yaml", **sections) -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(tiny(tmp_path, **sections)))
    return p


def test_run_directory_has_everything(tmp_path):
    cfg = build_config(tiny(tmp_path, name="r", data={"limit_train": 256, "limit_val": 128}))
    summary = train(cfg)
    run = tmp_path / "r"
    for key in ("top1", "top5", "loss", "epochs", "train_images_per_s", "wall_s", "peak_memory_mb", "params", "gmacs"):
        assert key in summary, key
    assert json.loads((run / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["epochs"] == 2 and summary["steps"] == 2 * (256 // 32)
    assert 0 <= summary["top1"] <= summary["top5"] <= 100
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("epoch,step,lr,train_loss")
    assert yaml.safe_load((run / "config.yaml").read_text()) == cfg.to_dict()
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("ckpt-*.safetensors"))
    assert ckpts == ["ckpt-00000008.safetensors", "ckpt-00000016.safetensors"]
    assert (run / "checkpoints" / "best.safetensors").exists()
    state = torch.load(run / "checkpoints" / "ckpt-00000016.state.pt", weights_only=True)["train_state"]
    assert state["epoch"] == 2 and state["step"] == 16 and "optimizer" in state and "rng" in state
    weights, meta = load_weights(run / "checkpoints" / "ckpt-00000016.safetensors")
    assert meta["architecture"] == "convnext_tiny" and meta["num_classes"] == "10"
    # eval gives the numbers of the run's own last evaluation when pointed at the last checkpoint
    r = evaluate_run(run / "checkpoints" / "ckpt-00000016.safetensors")
    assert r["top1"] == pytest.approx(summary["top1"]) and r["images"] == 128


def test_it_learns(tmp_path):
    cfg = build_config(tiny(tmp_path, name="learn", train={"epochs": 6}), recipe="basic",
                       overrides=["aug.simple_random_crop=false", "optimizer.lr=3e-3"])
    summary = train(cfg)
    assert summary["top1"] > 85, summary  # chance is 10%


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    # 20 steps an epoch, a checkpoint every 5 steps (mid-epoch), 3 epochs
    cfg = write_config(tmp_path, train={"epochs": 3, "batch_size": 32}, checkpoint={"every_steps": 5, "keep_last": 3},
                       aug={"simple_random_crop": True, "crop_padding": 1, "mixup": 0.5, "cutmix": 0.5},
                       model={"drop_path_rate": 0.1}, data={"limit_train": 640, "limit_val": 128})
    ref = mixlab("train", str(cfg), "--name", "ref")
    assert ref.returncode == 0, ref.stderr

    run = tmp_path / "killed"
    kill_at_checkpoint([str(cfg), "--name", "killed"], run, lambda step: step >= 25 and step % 20)  # mid-epoch 2

    res = mixlab("train", "--resume", str(run))
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stdout

    a, _ = load_weights(tmp_path / "ref" / "checkpoints" / "ckpt-00000060.safetensors")
    b, _ = load_weights(run / "checkpoints" / "ckpt-00000060.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ref_sum = json.loads((tmp_path / "ref" / "summary.json").read_text())
    res_sum = json.loads((run / "summary.json").read_text())
    assert res_sum["top1"] == ref_sum["top1"] and res_sum["steps"] == ref_sum["steps"] == 60
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # the resumed epoch's train loss covers the whole epoch, as the uninterrupted run's does
    ref_rows = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in ref_rows]


def test_two_process_ddp_on_cpu(tmp_path):
    cfg = write_config(tmp_path, train={"epochs": 2, "batch_size": 16})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "mixlab", "train", str(cfg), "--name", "ddp"], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "ddp"
    s = json.loads((run / "summary.json").read_text())
    assert s["world_size"] == 2 and s["global_batch"] == 32
    assert s["steps"] == 2 * (1437 // 2 // 16)  # each rank takes half the data
    assert r.stdout.count("epoch 2/2:") == 1  # one writer
    # the evaluation covers every validation image exactly once across the two ranks
    assert evaluate_run(run)["images"] == 360
    assert len(list((run / "checkpoints").glob("ckpt-*.safetensors"))) == 2


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = write_config(tmp_path, train={"epochs": 2}, optimizer={"name": "sgd", "lr": 1e30, "weight_decay": 0.0},
                       schedule={"name": "constant"}, checkpoint={"every_steps": 1})
    r = mixlab("train", str(cfg), "--name", "nan")
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "the loss became nan" in r.stderr.lower() or "the loss became inf" in r.stderr.lower()
    assert "optimizer step" in r.stderr and "last good checkpoint" in r.stderr
    run = tmp_path / "nan"
    assert not (run / "summary.json").exists()
    for f in (run / "checkpoints").glob("ckpt-*.safetensors"):
        w, _ = load_weights(f)
        assert all(torch.isfinite(t).all() for t in w.values() if t.is_floating_point()), f


def test_existing_run_is_not_overwritten(tmp_path):
    cfg = build_config(tiny(tmp_path, name="once", data={"limit_train": 64, "limit_val": 32}, train={"epochs": 1}))
    train(cfg)
    before = (tmp_path / "once" / "summary.json").read_text()
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        train(cfg)
    assert (tmp_path / "once" / "summary.json").read_text() == before
    # resuming a finished run changes nothing either
    train(cfg, resume=True)
    assert (tmp_path / "once" / "summary.json").read_text() == before


def _image_folder(root: Path, corrupt: bool = False, empty_class: bool = False):
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            if empty_class and split == "train" and c == 1:
                continue
            for i in range(6):
                noise = (torch.rand(12, 12, 3, generator=g) * 60).to(torch.uint8).numpy()
                arr = (torch.tensor(colour, dtype=torch.uint8).expand(12, 12, 3).numpy() // 2 + noise)
                Image.fromarray(arr).save(d / f"{i}.png")
    if corrupt:
        (root / "train" / "class0" / "broken.png").write_bytes(b"\x89PNG this is not an image")


def test_corrupt_images_are_skipped_and_counted_or_stop_with_strict(tmp_path):
    _image_folder(tmp_path / "imgs", corrupt=True)
    cfg = write_config(tmp_path, data={"name": "imagefolder", "root": str(tmp_path / "imgs"), "img_size": 16},
                       train={"epochs": 1, "batch_size": 4})
    r = mixlab("train", str(cfg), "--name", "skip")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert s["skipped_images"]["train"] == 1
    r = mixlab("train", str(cfg), "--name", "strict", "--strict")
    assert r.returncode == 2 and "broken.png" in r.stderr
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize("case", ["empty-class", "missing-dir", "missing-val"])
def test_bad_data_ends_clearly_with_nothing_written(tmp_path, case):
    root = tmp_path / "imgs"
    if case == "empty-class":
        _image_folder(root, empty_class=True)
    elif case == "missing-val":
        _image_folder(root)
        import shutil
        shutil.rmtree(root / "val")
    cfg = write_config(tmp_path, data={"name": "imagefolder", "root": str(root), "img_size": 16})
    r = mixlab("train", str(cfg), "--name", "bad")
    assert r.returncode == 2
    expected = {"empty-class": "class1", "missing-dir": str(root), "missing-val": "val"}[case]
    assert expected in r.stderr
    assert not (tmp_path / "bad").exists()


def test_checkpoint_for_another_architecture_or_class_count(tmp_path):
    train(build_config(tiny(tmp_path, name="a", data={"limit_train": 64, "limit_val": 32}, train={"epochs": 1})))
    other = tiny(tmp_path, name="b", data={"limit_train": 64, "limit_val": 32}, train={"epochs": 1})
    other["model"] = {"name": "poolformer_s12", "kwargs": {"dims": [16, 32], "depths": [1, 1]}}
    # PoolFormer's stem has stride 4: run it at 16 px
    other["data"]["img_size"] = 32
    train(build_config(other))
    foreign = next((tmp_path / "a" / "checkpoints").glob("ckpt-*.safetensors"))
    r = mixlab("eval", str(tmp_path / "b"), "--json")
    assert r.returncode == 0, r.stderr
    import shutil
    target = tmp_path / "b" / "checkpoints" / "foreign.safetensors"
    shutil.copy(foreign, target)
    r = mixlab("eval", str(target))
    assert r.returncode == 2 and "convnext_tiny" in r.stderr and "poolformer_s12" in r.stderr
    # the same architecture evaluated on a dataset with another class count
    _image_folder(tmp_path / "imgs")
    r = mixlab("eval", str(tmp_path / "a"), "--data", "imagefolder", "--data-root", str(tmp_path / "imgs"))
    assert r.returncode == 2 and "10" in r.stderr and "2" in r.stderr and "class" in r.stderr


def test_accumulation_bf16_and_ema(tmp_path):
    cfg = build_config(tiny(tmp_path, name="acc", data={"limit_train": 256, "limit_val": 64},
                            train={"epochs": 1, "batch_size": 16, "accum_steps": 2, "amp": "bf16"},
                            ema={"enabled": True, "decay": 0.9}))
    s = train(cfg)
    assert s["steps"] == 256 // 16 // 2 and s["global_batch"] == 32
    assert "ema_top1" in s
    state = torch.load(next((tmp_path / "acc" / "checkpoints").glob("ckpt-*.state.pt")), weights_only=True)
    assert "ema" in state["train_state"]
    r = evaluate_run(tmp_path / "acc", use_ema=True)
    assert r["top1"] == pytest.approx(s["ema_top1"])


def test_fp16_on_cpu_is_refused(tmp_path):
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        train(build_config(tiny(tmp_path, name="fp16", train={"amp": "fp16", "device": "cpu"})))


@pytest.mark.skipif(not any(Path(p, "gcc").exists() for p in os.environ.get("PATH", "").split(":")),
                    reason="torch.compile on the CPU needs a C compiler")
def test_compile(tmp_path):
    s = train(build_config(tiny(tmp_path, name="compiled", data={"limit_train": 64, "limit_val": 32},
                                train={"epochs": 1, "compile": True})))
    assert s["steps"] == 2


def test_loaders_transform_whole_batches_unless_augmenting(tmp_path):
    """Without augmentation (the arena's recipe) both loaders transform a batch at once; with an
    augmentation only the evaluation loader does, and the training one draws per image."""
    from mixlab.engine.tasks import build_task
    plain = build_task(build_config(tiny(tmp_path, name="plain"), recipe="arena")).build_data()
    assert plain.train_loader.dataset.batched and plain.val_loader.dataset.batched
    flips = build_task(build_config(tiny(tmp_path, name="flips", aug={"hflip": 0.5}))).build_data()
    assert not flips.train_loader.dataset.batched and flips.val_loader.dataset.batched
