"""The name tables are a leaf, and weights files have one room (mixlab.weights): one metadata
writer for training runs and ``mixlab convert``, one fit report for loading and for resuming."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import mixlab
from mixlab import registry
from mixlab.cli import main
from mixlab.config import build_config
from mixlab.engine.trainer import train
from mixlab.weights import (CheckpointError, check_compatible, checkpoint_metadata, fit_lines, fit_report, load_state,
                            load_weights, metadata_config, save_weights)
from mixlab.weights.fit import classifier_prefixes

FIXTURES = Path(__file__).parent / "fixtures" / "run-v0.1.0"
#: what CheckpointManager adds to a training checkpoint's metadata, and mixlab convert to its output
MANAGER_KEYS = {"epoch", "step", "metric", "checkpoint_id"}
CONVERT_KEYS = {"source", "source_format", "preprocessing_source"}


def test_the_registry_imports_no_mixlab_module():
    path = Path(registry.__file__)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("mixlab"), ast.unparse(node)
        elif isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] == "mixlab" for a in node.names), ast.unparse(node)
    # loaded on its own, it brings in nothing of mixlab (lazy imports inside functions included: they run here)
    code = ("import importlib.util, sys\n"
            "spec = importlib.util.spec_from_file_location('registry_alone', sys.argv[1])\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['registry_alone'] = m; spec.loader.exec_module(m)\n"
            "m.register_model(lambda **kw: None)\n"
            "m.register_layout('timm', 'x', [r'^a\\.'], [], model_class=int)\n"
            "m.register_spec_mixer('x', {}, 'x', print)\n"
            "m.register_default_weights('x', 'hf-hub:a/b', mean=(0.5,), std=(0.5,))\n"
            "assert m.default_weights('x')['source'] == 'hf-hub:a/b' and m.family_of_class(bool) == 'x'\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] == 'mixlab'))\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_training_runs_and_convert_write_the_same_metadata(tmp_path):
    layer = yaml.safe_load((FIXTURES / "train.yaml").read_text())
    layer.update(output_dir=str(tmp_path), name="run", log={"progress": "false", "print_every": 0})
    layer["train"]["epochs"] = 1
    train(build_config(layer))
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("ckpt-*.safetensors"))[-1]
    _, trained = load_weights(ckpt)
    arch = layer["model"]["name"]
    assert main(["convert", str(ckpt), str(tmp_path / "converted.safetensors"), "--model", arch]) == 0
    _, converted = load_weights(tmp_path / "converted.safetensors")
    written = checkpoint_metadata(arch, num_classes=10, in_chans=1, img_size=16, mean=[0.5], std=[0.5],
                                  crop_pct=1.0, interpolation="bicubic", classes=[str(i) for i in range(10)])
    # a training checkpoint also says what its run learnt and what of the model trained
    assert set(trained) - MANAGER_KEYS - {"task", "freeze"} == set(converted) - CONVERT_KEYS == set(written)
    assert trained["task"] == "classification" and trained["freeze"] == "none"
    # and they say the same about the network
    assert metadata_config(trained) == metadata_config(converted)
    assert metadata_config(trained)["input_size"] == (1, 16, 16) and metadata_config(trained)["num_classes"] == 10
    assert json.loads(trained["img_size"]) == 16 and json.loads(converted["input_size"]) == [1, 16, 16]
    assert converted["source"] == str(ckpt) and converted["source_format"] == "mixlab"


def test_metadata_of_mixlab_0_1_0_still_reads():
    _, meta = load_weights(FIXTURES / "complete" / "checkpoints" / "ckpt-00000008.safetensors")
    assert "input_size" not in meta  # 0.1.0's trainer wrote in_chans and img_size
    cfg = metadata_config(meta)
    assert cfg["input_size"] == (1, 16, 16) and cfg["num_classes"] == 10 and len(cfg["mean"]) == len(cfg["std"]) == 1
    # 0.1.0's mixlab convert wrote input_size alone
    old_convert = {"architecture": "resnet50", "input_size": "[3, 224, 192]", "mean": "[0.5, 0.5, 0.5]",
                   "std": "[0.5, 0.5, 0.5]", "num_classes": "1000", "source_format": "timm"}
    assert metadata_config(old_convert) == {"mean": (0.5,) * 3, "std": (0.5,) * 3, "input_size": (3, 224, 192),
                                            "num_classes": 1000}
    model = mixlab.create_model(meta["architecture"], pretrained=FIXTURES / "complete" / "checkpoints" /
                                "ckpt-00000008.safetensors")
    assert model.in_chans == 1 and model.num_classes == 10 and model.pretrained_cfg["mean"] == cfg["mean"]


def test_a_checkpoint_is_rebuilt_with_the_model_arguments_it_records(tmp_path):
    # a run with model.kwargs writes them into every checkpoint; outside the run (predict, eval --data, a
    # teacher file, convert) create_model builds the model with them, and convert records them again
    kwargs = {"patch_size": 1, "dims": [8, 16], "depths": [1, 1]}
    model = mixlab.create_model("convnext_tiny", num_classes=10, in_chans=1, img_size=8, **kwargs)
    path = tmp_path / "small.safetensors"
    save_weights(model.state_dict(), path, checkpoint_metadata(
        "convnext_tiny", num_classes=10, in_chans=1, img_size=8, mean=[0.5], std=[0.5], crop_pct=1.0,
        interpolation="bicubic", model_kwargs=kwargs))
    assert metadata_config(load_weights(path)[1])["model_kwargs"] == kwargs
    rebuilt = mixlab.create_model("convnext_tiny", pretrained=path)
    assert rebuilt.pretrained_cfg["model_kwargs"] == kwargs
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))
    assert main(["convert", str(path), str(tmp_path / "out.safetensors"), "--model", "convnext_tiny"]) == 0
    assert metadata_config(load_weights(tmp_path / "out.safetensors")[1])["model_kwargs"] == kwargs
    # another architecture's arguments are not applied: the weights must fit the model asked for
    with pytest.raises(ValueError, match="does not fit"):
        mixlab.create_model("convnext_small", pretrained=path)


def test_non_square_images_are_written_as_height_and_width():
    meta = checkpoint_metadata("resnet50", num_classes=3, in_chans=3, img_size=(32, 48), mean=[0.1] * 3,
                               std=[0.2] * 3, crop_pct=0.9, interpolation="bilinear", model_kwargs={"drop_rate": 0.1},
                               note="x")
    assert json.loads(meta["img_size"]) == [32, 48] and json.loads(meta["input_size"]) == [3, 32, 48]
    assert json.loads(meta["model_kwargs"]) == {"drop_rate": 0.1} and meta["note"] == "x"
    assert metadata_config(meta)["input_size"] == (3, 32, 48)
    with pytest.raises(TypeError, match="strings"):
        checkpoint_metadata("resnet50", num_classes=3, in_chans=3, img_size=32, mean=[0], std=[1], crop_pct=1.0,
                            interpolation="bicubic", epoch=3)


def test_loading_and_resuming_give_one_fit_report():
    model = mixlab.create_model("spec:patch2 / convnext:1x8 / convnext:1x16", img_size=16, num_classes=3)
    sd = dict(model.state_dict())
    del sd["norm.weight"]
    sd["stem.proj.bias"] = torch.zeros(5)
    sd["extra.weight"] = torch.zeros(2)
    report = fit_report(model.state_dict(), sd, classifier_prefixes(model))
    assert report.missing == ["norm.weight"] and report.unexpected == ["extra.weight"]
    assert report.mismatched == ["stem.proj.bias: (5,) vs (8,)"] and report.classifier == []
    lines = fit_lines(report)
    assert len(lines) == 3
    with pytest.raises(CheckpointError) as resuming:
        check_compatible(model, sd)
    with pytest.raises(ValueError) as loading:
        load_state(model, sd)
    for line in lines:
        assert line in str(resuming.value) and line in str(loading.value)
    # a classifier of other classes: resuming says how to build the model for it
    sd = {**model.state_dict(), "head.fc.weight": torch.zeros(7, 16), "head.fc.bias": torch.zeros(7)}
    report = fit_report(model.state_dict(), sd, classifier_prefixes(model))
    assert len(report.mismatched) == 2 and len(report.classifier) == 1
    with pytest.raises(CheckpointError, match="the checkpoint has 7 classes, the model 3; build the model with "
                                              "num_classes=7"):
        check_compatible(model, sd)
