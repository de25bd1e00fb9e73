"""Fine-tuning and linear probes (docs/finetuning.md): a run starts from a run directory, a
safetensors file or a timm-layout .pth; the classifier is kept or fresh as the classes say; a linear
probe moves the head only (parameters and buffers); a resumed run does not read its source again;
bad sources are refused before anything is written."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from mixlab.arena import ArenaSettings, run_arena
from mixlab.cli import main
from mixlab.config import ConfigError, build_config, resume_config
from mixlab.engine.distributed import DistInfo
from mixlab.engine.trainer import Trainer, train
from mixlab.weights import checkpoint_metadata, load_weights, save_weights

# a ~5K-parameter ResNet-style specification with BatchNorm, on the native 8x8 digits
SPEC = "spec:conv2 / basic:1x8 / basic:1x16"
HEAD = ("head.fc.weight", "head.fc.bias")


def layer(tmp_path, name, model=SPEC, **model_keys):
    return {"model": {"name": model, **model_keys}, "data": {"name": "digits", "limit_train": 128, "limit_val": 32},
            "train": {"epochs": 1, "batch_size": 32}, "log": {"progress": "false", "print_every": 0},
            "output_dir": str(tmp_path), "name": name}


def trainer(cfg, tmp_path, name) -> Trainer:
    return Trainer(cfg, DistInfo(), tmp_path / name, False)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A trained run of SPEC on digits: the source the tests fine-tune from."""
    out = tmp_path_factory.mktemp("source")
    train(build_config(layer(out, "src")))
    return out / "src"


def best(run) -> dict:
    return load_weights(run / "checkpoints" / "best.safetensors")[0]


def test_from_a_run_directory_keeps_the_head_and_applies_layer_decay(source, tmp_path):
    cfg = build_config(layer(tmp_path, "ft", pretrained=str(source)), overrides=["optimizer.layer_decay=0.5"])
    t = trainer(cfg, tmp_path, "ft")
    start, src = t.raw_model.state_dict(), best(source)
    assert all(torch.equal(start[k], src[k]) for k in src)  # every tensor, the classifier too
    groups = t.optimizer.param_groups
    scales = {g["layer_id"]: g["lr_scale"] for g in groups}
    top = max(scales)
    assert scales[top] == 1.0 and all(scales[i] == pytest.approx(0.5 ** (top - i)) for i in scales)
    assert any("head.fc.weight" in g["names"] and g["lr_scale"] == 1.0 for g in groups)
    summary = t.run()
    assert all(g["lr"] == pytest.approx(groups[-1]["lr"] * g["lr_scale"]) for g in groups)  # the schedule scales
    p = summary["pretrained"]
    assert p["source"] == str(source) and p["kind"] == "run" and p["architecture"] == SPEC and p["head"] == "kept"
    assert p["weights"].endswith("best.safetensors") and summary["freeze"] == "none"
    assert summary["trainable_params"] == summary["params"]
    meta = load_weights(tmp_path / "ft" / "checkpoints" / "best.safetensors")[1]
    assert json.loads(meta["pretrained"]) == p and meta["freeze"] == "none"
    assert json.loads((tmp_path / "ft" / "summary.json").read_text())["pretrained"] == p


def test_a_safetensors_file_with_other_class_names_or_count_gets_a_fresh_head(source, tmp_path):
    src = best(source)
    meta = load_weights(source / "checkpoints" / "best.safetensors")[1]
    renamed = {**meta, "classes": json.dumps([f"c{i}" for i in range(10)])}
    save_weights(src, tmp_path / "names.safetensors", renamed)
    five = {**src, "head.fc.weight": src["head.fc.weight"][:5], "head.fc.bias": src["head.fc.bias"][:5]}
    save_weights(five, tmp_path / "five.safetensors",
                 checkpoint_metadata(SPEC, num_classes=5, in_chans=1, img_size=8, mean=[0.5], std=[0.5], crop_pct=1.0,
                                     interpolation="bicubic", classes=list("abcde")))
    save_weights(src, tmp_path / "same.safetensors", meta)
    for name, reason in (("names", "other classes"), ("five", "classifies 5 classes, the data has 10"),
                         ("same", None)):
        t = trainer(build_config(layer(tmp_path, name, pretrained=str(tmp_path / f"{name}.safetensors"))),
                    tmp_path, name)
        start = t.raw_model.state_dict()
        assert all(torch.equal(start[k], src[k]) for k in src if k not in HEAD)
        fresh = not torch.equal(start["head.fc.weight"], src["head.fc.weight"][:len(start["head.fc.weight"])])
        assert t.pretrained["kind"] == "file" and t.pretrained["head"] == ("fresh" if reason else "kept") and \
            fresh == bool(reason), name
        assert reason is None or reason in t.pretrained["head_reason"], t.pretrained["head_reason"]
    assert t.run()["pretrained"]["head"] == "kept"


def test_a_timm_layout_pth_is_converted_and_its_position_embedding_resampled(tmp_path):
    timm = pytest.importorskip("timm")
    arch = {"patch_size": 2, "embed_dim": 16, "depth": 2, "num_heads": 2}
    torch.manual_seed(0)
    theirs = timm.create_model("vit_tiny_patch16_224", num_classes=5, in_chans=1, img_size=4, **arch).state_dict()
    torch.save({"model": theirs, "epoch": 3}, tmp_path / "timm.pth")  # a training checkpoint of timm's train.py
    cfg = build_config(layer(tmp_path, "vit", model="vit_tiny_patch16_224", kwargs=arch,
                             pretrained=str(tmp_path / "timm.pth")))
    t = trainer(cfg, tmp_path, "vit")
    p = t.pretrained
    assert p["format"] == "timm" and p["head"] == "fresh" and p["architecture"] is None
    assert any("pos_embed" in k for k in p["resized"])
    start = t.raw_model.state_dict()
    assert torch.equal(start["blocks.1.mlp.fc2.weight"], theirs["blocks.1.mlp.fc2.weight"])
    assert start["head.fc.weight"].shape[0] == 10
    assert t.run()["pretrained"]["format"] == "timm"


def test_a_linear_probe_moves_the_head_only(source, tmp_path):
    cfg = build_config(layer(tmp_path, "probe", pretrained=str(source), freeze="backbone"),
                       overrides=["model.drop_rate=0.5", "optimizer.weight_decay=0.5"])
    t = trainer(cfg, tmp_path, "probe")
    head = sum(t.raw_model.state_dict()[k].numel() for k in HEAD)
    assert sum(p.numel() for g in t.optimizer.param_groups for p in g["params"]) == head
    summary = t.run()
    assert summary["trainable_params"] == head < summary["params"] and summary["freeze"] == "backbone"
    src = best(source)
    for ckpt in (tmp_path / "probe" / "checkpoints").glob("*.safetensors"):
        after = load_weights(ckpt)[0]
        assert set(after) == set(src)
        moved = [k for k in src if not torch.equal(after[k], src[k])]  # parameters and buffers (BatchNorm's too)
        assert sorted(moved) == sorted(HEAD), (ckpt.name, moved)


def test_a_resumed_fine_tuned_run_does_not_read_its_source_again(source, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    args = ["train", "--model", SPEC, "--data", "digits", "--pretrained", str(copy), "--output", str(tmp_path),
            "--name", "ft", "--epochs", "1", "--set", "data.limit_train=128", "--set", "data.limit_val=32",
            "--set", "log.progress=false", "--set", "model.freeze=backbone"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"starting from the run {copy} ({SPEC}), mixlab layout, its classifier kept" in out
    assert "params, 170 trainable," in out
    shutil.rmtree(copy)
    assert main(["train", "--resume", str(tmp_path / "ft"), "--epochs", "2"]) == 0
    assert "starting from" not in capsys.readouterr().out
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["pretrained"]["source"] == str(copy)


def test_bad_sources_are_refused_before_anything_is_written(source, tmp_path, capsys):
    with pytest.raises(ConfigError, match="model.pretrained: .*nowhere' does not exist"):
        build_config(layer(tmp_path, "x", pretrained=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match="model.freeze: 'all' is not one of none, backbone"):
        build_config(layer(tmp_path, "x", freeze="all"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="model.pretrained: .*empty has no checkpoint"):
        train(build_config(layer(tmp_path, "x", pretrained=str(tmp_path / "empty"))))
    other = layer(tmp_path, "x", model="spec:conv2 / basic:1x8 / basic:1x24", pretrained=str(source))
    with pytest.raises(ConfigError) as e:
        train(build_config(other))
    msg = str(e.value)
    assert "does not fit" in msg and "shape mismatch" in msg and "stages.1.blocks.0" in msg and SPEC in msg
    assert not (tmp_path / "x").exists()
    bad = ["train", "--model", SPEC, "--pretrained", str(tmp_path / "nowhere"), "--output", str(tmp_path)]
    assert main(bad) == 2 and "does not exist" in capsys.readouterr().err
    saved = build_config(layer(tmp_path, "x", pretrained=str(source)))
    with pytest.raises(ConfigError, match="model.freeze .*'none' -> 'backbone': the optimizer state"):
        resume_config(saved, build_config(layer(tmp_path, "x", pretrained=str(source), freeze="backbone")))


def test_freeze_without_pretrained_is_a_baseline_with_a_note(tmp_path, capsys):
    t = trainer(build_config(layer(tmp_path, "rand", freeze="backbone")), tmp_path, "rand")
    assert t.pretrained is None and t.trainable == 170 and t.frozen
    assert "randomly initialised network" in capsys.readouterr().out


def test_the_arena_starts_one_model_from_a_source(source, tmp_path):
    with pytest.raises(ConfigError, match="trains one model"):
        run_arena(ArenaSettings(models=[SPEC, "nano_resnet"], epochs=1, out=str(tmp_path / "a"),
                                overrides=[f"model.pretrained={source}"]), quiet=True)
    with pytest.raises(ConfigError, match="does not fit"):
        run_arena(ArenaSettings(models=["nano_resnet"], epochs=1, out=str(tmp_path / "b"),
                                overrides=[f"model.pretrained={source}"]), quiet=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
