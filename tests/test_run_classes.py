"""A run records the class names and the data configuration it was trained with (``summary.json``
and every checkpoint's metadata), and ``mixlab eval`` refuses data whose class names differ from
them unless told ``--allow-class-mismatch``: a renamed class folder is not scored silently."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from mixlab.cli import main
from mixlab.config import ConfigError, build_config
from mixlab.engine.trainer import train
from mixlab.runs import check_classes, evaluate_run
from mixlab.weights import load_weights, metadata_config

CLASSES = ["cat", "dog", "fox"]
MODEL = "spec:patch4 / convnext:1x8"


def _image_folder(root: Path, names: list[str]) -> Path:
    """train/ and val/ with 4 tiny PNGs per class, each class its own colour."""
    g = torch.Generator().manual_seed(0)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    for split in ("train", "val"):
        for name, colour in zip(names, colours):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(4):
                noise = (torch.rand(12, 12, 3, generator=g) * 60).to(torch.uint8).numpy()
                arr = torch.tensor(colour, dtype=torch.uint8).expand(12, 12, 3).numpy() // 2 + noise
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


def _rename_class(root: Path, old: str, new: str) -> None:
    for split in ("train", "val"):
        (root / split / old).rename(root / split / new)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 1-epoch run of a tiny model on a 3-class image folder."""
    tmp = tmp_path_factory.mktemp("classes")
    _image_folder(tmp / "imgs", CLASSES)
    train(build_config({"model": {"name": MODEL}, "output_dir": str(tmp), "name": "run",
                        "data": {"name": "imagefolder", "root": str(tmp / "imgs"), "img_size": 16},
                        "train": {"epochs": 1, "batch_size": 4}, "log": {"progress": "false", "print_every": 0}}))
    return tmp / "run"


def _renamed_copy(run: Path, tmp_path: Path, old: str, new: str) -> Path:
    root = tmp_path / "renamed"
    shutil.copytree(run.parent / "imgs", root)
    _rename_class(root, old, new)
    return root


def test_the_run_and_its_checkpoints_record_the_classes_and_data(run):
    ckpts = sorted((run / "checkpoints").glob("*.safetensors"))
    assert len(ckpts) >= 2  # a numbered checkpoint and best
    for path in ckpts:
        meta = load_weights(path)[1]
        assert json.loads(meta["classes"]) == CLASSES, path
        cfg = metadata_config(meta)
        assert cfg["classes"] == CLASSES and cfg["num_classes"] == 3 and cfg["input_size"] == (3, 16, 16)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["classes"] == CLASSES
    assert summary["img_size"] == 16 and summary["in_chans"] == 3 and summary["num_classes"] == 3
    assert len(summary["mean"]) == len(summary["std"]) == 3


def test_eval_on_the_same_classes_says_nothing_about_them(run, capsys):
    assert main(["eval", str(run), "--data", "imagefolder", "--data-root", str(run.parent / "imgs")]) == 0
    captured = capsys.readouterr()
    assert "top-1" in captured.out and "class" not in captured.err and "prepared otherwise" not in captured.err


def test_eval_refuses_a_renamed_class_and_names_it(run, tmp_path, capsys):
    root = _renamed_copy(run, tmp_path, "fox", "zebra")  # sorted: cat, dog, zebra
    assert main(["eval", str(run), "--data", "imagefolder", "--data-root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "class 2: trained as 'fox', the data says 'zebra'" in err
    assert "--allow-class-mismatch" in err
    assert "class 0" not in err and "class 1" not in err  # the classes that agree are not listed


def test_eval_refuses_another_number_of_classes(run, tmp_path, capsys):
    root = _image_folder(tmp_path / "four", CLASSES + ["zebra"])
    assert main(["eval", str(run), "--data", "imagefolder", "--data-root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "3 classes" in err and "4" in err and "class 3: the run has none, the data says 'zebra'" in err


def test_allow_class_mismatch_evaluates_with_a_warning(run, tmp_path, capsys):
    root = _renamed_copy(run, tmp_path, "fox", "zebra")
    assert main(["eval", str(run), "--data", "imagefolder", "--data-root", str(root), "--allow-class-mismatch"]) == 0
    captured = capsys.readouterr()
    assert "top-1" in captured.out
    assert "warning" in captured.err and "class 2: trained as 'fox', the data says 'zebra'" in captured.err
    with pytest.warns(UserWarning, match="trained as 'fox'"):
        r = evaluate_run(run, data="imagefolder", data_root=str(root), allow_class_mismatch=True)
    assert r["images"] == 12


def test_check_classes():
    check_classes(CLASSES, list(CLASSES), "run")  # the same names: nothing to say
    with pytest.raises(ConfigError, match="same names in another order.*class 0: trained as 'cat', the data says "
                                          "'dog'"):
        check_classes(CLASSES, ["dog", "cat", "fox"], "run")
    with pytest.raises(ConfigError, match="class 1: trained as 'dog', the data has none"):
        check_classes(CLASSES, ["cat"], "run")
    with pytest.warns(UserWarning, match="trained as 'cat'"):
        check_classes(CLASSES, ["dog", "cat", "fox"], "run", allow_mismatch=True)
    with pytest.warns(UserWarning, match="records no class names"):
        check_classes(None, CLASSES, "run")  # a run written before class names were recorded


def test_convert_keeps_the_class_names(run, tmp_path):
    out = tmp_path / "converted.safetensors"
    assert main(["convert", str(run / "checkpoints" / "best.safetensors"), str(out), "--model", MODEL]) == 0
    assert json.loads(load_weights(out)[1]["classes"]) == CLASSES
    # a fresh classifier for another number of classes has no names
    assert main(["convert", str(run / "checkpoints" / "best.safetensors"), str(out), "--model", MODEL,
                 "--num-classes", "5", "--force"]) == 0
    assert "classes" not in load_weights(out)[1]


def test_check_preprocessing_lists_another_size_normalisation_crop_or_interpolation():
    from mixlab.data import Preprocessing
    from mixlab.runs import check_preprocessing

    data = Preprocessing((3, 16, 16), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 1.0, "bicubic")
    assert check_preprocessing(data, data, "ckpt") == []  # the same: nothing to say
    model = Preprocessing((3, 32, 32), (0.1, 0.2, 0.3), (0.25, 0.25, 0.25), 0.875, "bilinear")
    assert check_preprocessing(model, data, "ckpt") == [
        "input 3x32x32 (the checkpoint) vs 3x16x16 (the data)",
        "mean (0.1, 0.2, 0.3) (the checkpoint) vs (0.5, 0.5, 0.5) (the data)",
        "crop 0.875 (the checkpoint) vs 1 (the data)", "interpolation bilinear (the checkpoint) vs bicubic (the data)"]
    with pytest.raises(ConfigError, match="ckpt takes 1-channel images, the evaluation data has 3"):
        check_preprocessing(Preprocessing((1, 16, 16), (0.5,), (0.25,)), data, "ckpt")
