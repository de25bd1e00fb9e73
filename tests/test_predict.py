"""``mixlab predict`` and the model's own data configuration (issue 21): image files are prepared as
the checkpoint records (input size, mean/std, crop, interpolation) and predicted as ``mixlab eval``'s
forward pass would; bad files are reported and skipped, or stop everything with --strict; ``mixlab eval``
uses the checkpoint's data configuration unless told --data-preprocessing."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

import mixlab
from mixlab.cli import main
from mixlab.config import build_config
from mixlab.data import Preprocessing, build_datasets, build_transforms
from mixlab.engine.trainer import train
from mixlab.predict import Prediction, load_predictor, predict
from mixlab.runs import evaluate_run, load_run_model
from mixlab.weights import checkpoint_metadata, load_weights, save_weights

MODEL = "spec:patch4 / convnext:1x8"
N_PNG = 6


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 1-epoch run of a tiny model on digits at 16 px (the 8 px images are resized), validated on 64 images."""
    tmp = tmp_path_factory.mktemp("predict")
    train(build_config({"model": {"name": MODEL}, "output_dir": str(tmp), "name": "run",
                        "data": {"name": "digits", "img_size": 16, "limit_train": 64, "limit_val": 64},
                        "train": {"epochs": 1, "batch_size": 32}, "log": {"progress": "false", "print_every": 0}}))
    return tmp / "run"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """PNGs of the first digits validation images (lossless: the same pixels as the dataset), JPEGs in a
    subfolder, a truncated PNG, a text file named .png and a file of another extension (not an image)."""
    root = tmp_path_factory.mktemp("images")
    _, val, _ = build_datasets("digits")
    (root / "sub").mkdir()
    for i in range(N_PNG):
        Image.fromarray(val[i][0][0].numpy()).save(root / f"{i}.png")
    for i in range(2):
        Image.fromarray(val[i][0][0].numpy()).convert("RGB").resize((24, 24)).save(root / "sub" / f"{i}.jpg")
    whole = (root / "0.png").read_bytes()
    (root / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (root / "text.png").write_text("not an image\n")
    (root / "notes.txt").write_text("ignored: not an image extension\n")
    return root


def _softmax_of(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(x), dim=-1)


def test_run_predictions_are_eval_forward_on_the_same_images(run, images):
    predictor = load_predictor(str(run))
    assert predictor.classes == [str(i) for i in range(10)]
    assert predictor.preprocessing == Preprocessing((1, 16, 16), predictor.preprocessing.mean,
                                                    predictor.preprocessing.std, 1.0, "bicubic")
    pngs = [images / f"{i}.png" for i in range(N_PNG)]
    got = list(predict(predictor, pngs, batch_size=4, top_k=3))  # batches of 4 and 2
    assert all(isinstance(p, Prediction) for p in got) and [p.image for p in got] == list(map(str, pngs))
    # what mixlab eval computes: the run's model on the validation images through the dataset's eval transform
    model, cfg, info, _ = load_run_model(run)
    _, val, _ = build_datasets("digits", img_size=16)
    tf = build_transforms(info, False, 16)
    probs = _softmax_of(model, torch.stack([tf(val[i][0]) for i in range(N_PNG)]))
    top = probs.topk(3, dim=-1)
    for p, q, idx in zip(got, top.values, top.indices):
        assert p.indices == idx.tolist() and p.labels == [str(i) for i in idx.tolist()]
        torch.testing.assert_close(torch.tensor(p.probabilities), q, rtol=0, atol=1e-6)


def test_bad_files_are_reported_and_skipped_or_stop_with_strict(run, images, tmp_path, capsys):
    out = tmp_path / "out.json"
    assert main(["predict", str(run), str(images), "--json", "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"skipped {images / 'truncated.png'}" in err and f"skipped {images / 'text.png'}" in err
    assert f"{N_PNG + 2} image(s) predicted, 2 unreadable file(s) skipped" in err
    payload = json.loads(out.read_text())
    assert [Path(p["image"]).name for p in payload["predictions"]] == [f"{i}.png" for i in range(N_PNG)] + [
        "0.jpg", "1.jpg"]  # sorted, at any depth, the .txt file not taken
    assert {Path(s["image"]).name for s in payload["skipped"]} == {"truncated.png", "text.png"}
    assert payload["preprocessing"]["input_size"] == [1, 16, 16] and payload["preprocessing"]["crop_pct"] == 1.0
    # --strict: stops at the first, writes nothing
    strict_out = tmp_path / "strict.json"
    assert main(["predict", str(run), str(images), "--strict", "--json", "--output", str(strict_out)]) == 2
    err = capsys.readouterr().err
    assert f"unreadable image {images / 'text.png'}" in err and not strict_out.exists()  # the first, sorted
    # a file named on its own is read whatever its name; all of them good: exit status 0
    assert main(["predict", str(run), str(images / "0.png"), str(images / "sub")]) == 0


def test_json_and_csv_outputs_parse_and_top_k_is_capped(run, images, capsys):
    files = [str(images / f"{i}.png") for i in range(3)]
    assert main(["predict", str(run), *files, "--json", "--top-k", "50"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [len(p["top_k"]) for p in payload["predictions"]] == [10, 10, 10]  # capped by the 10 classes
    for p in payload["predictions"]:
        probs = [t["probability"] for t in p["top_k"]]
        assert probs == sorted(probs, reverse=True) and math.isclose(sum(probs), 1.0, rel_tol=1e-5)
    assert main(["predict", str(run), *files, "--csv", "--top-k", "2"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 6 and [r["rank"] for r in rows[:2]] == ["1", "2"] and rows[0]["image"] == files[0]
    for row, want in zip(rows[::2], payload["predictions"]):
        assert row["label"] == want["top_k"][0]["label"]
        assert math.isclose(float(row["probability"]), want["top_k"][0]["probability"], rel_tol=1e-5)
    assert main(["predict", str(run), *files, "--top-k", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["image", "top-1", "top-2"] and len(table) == 2 + 3


def test_no_images_and_bad_arguments_are_clear_errors(run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(run), str(tmp_path / "empty")]) == 2
    assert "no image files found in" in capsys.readouterr().err
    assert main(["predict", str(run), str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "img.png").write_bytes(b"")
    assert main(["predict", "nano_convnext", str(tmp_path / "img.png")]) == 2  # a name without weights
    assert "--weights" in capsys.readouterr().err
    assert main(["predict", str(run), str(tmp_path / "img.png"), "--weights", "x.safetensors"]) == 2
    assert "brings its own weights" in capsys.readouterr().err


def _hand_probs(model, path: Path, size: int, crop: float, mean: float, std: float, mode) -> torch.Tensor:
    """The probabilities of one grey image file, prepared step by step: resize of the shorter side to
    floor(size / crop), centre crop, 0..1, (x - mean) / std."""
    img = F.pil_to_tensor(Image.open(path).convert("L"))
    img = F.resize(img, [math.floor(size / crop)], interpolation=mode, antialias=True)
    img = F.center_crop(img, [size, size])
    x = (img.float() / 255 - mean) / std
    return _softmax_of(model, x[None])[0]


def test_a_registered_model_with_weights_uses_the_recorded_data_configuration(images, tmp_path, capsys):
    from torchvision.transforms import InterpolationMode

    torch.manual_seed(0)
    model = mixlab.create_model("nano_resnet", in_chans=1, img_size=28, num_classes=3).eval()
    classes = ["a", "b", "c"]
    files = []
    for name, mean, std, crop, interpolation in (("one", 0.2, 0.1, 0.875, "bilinear"), ("two", 0.7, 0.3, 1.0,
                                                                                         "bicubic")):
        meta = checkpoint_metadata("nano_resnet", num_classes=3, in_chans=1, img_size=28, mean=[mean], std=[std],
                                   crop_pct=crop, interpolation=interpolation, classes=classes)
        save_weights(model.state_dict(), tmp_path / f"{name}.safetensors", meta)
        files.append(tmp_path / f"{name}.safetensors")
    image = images / "3.png"
    got = []
    for path, (mean, std, crop, mode) in zip(files, ((0.2, 0.1, 0.875, InterpolationMode.BILINEAR),
                                                    (0.7, 0.3, 1.0, InterpolationMode.BICUBIC))):
        predictor = load_predictor("nano_resnet", weights=str(path))
        assert predictor.classes == classes
        (p,) = predict(predictor, [image], top_k=3)
        want = _hand_probs(model, image, 28, crop, mean, std, mode)
        assert p.labels == [classes[i] for i in want.argsort(descending=True).tolist()]
        torch.testing.assert_close(torch.tensor(p.probabilities), want.sort(descending=True).values, rtol=0,
                                   atol=1e-5)
        got.append(p.probabilities)
    assert max(abs(a - b) for a, b in zip(*got)) > 1e-3  # another configuration, other probabilities
    # the file alone names its model; --classes replaces the names and must count the outputs
    (tmp_path / "names.txt").write_text("x\ny\nz\n")
    assert main(["predict", str(files[0]), str(image), "--classes", str(tmp_path / "names.txt"), "--json"]) == 0
    assert {t["label"] for t in json.loads(capsys.readouterr().out)["predictions"][0]["top_k"]} == {"x", "y", "z"}
    (tmp_path / "two.txt").write_text("x\ny\n")
    assert main(["predict", str(files[0]), str(image), "--classes", str(tmp_path / "two.txt")]) == 2
    assert "names 2 classes, the model has 3 outputs" in capsys.readouterr().err


def test_convert_records_the_data_configuration_and_where_it_came_from(tmp_path, capsys):
    # a timm repository's files: weights with no metadata next to timm's config.json
    torch.manual_seed(0)
    model = mixlab.create_model("nano_resnet", in_chans=3, img_size=32, num_classes=4)
    repo = tmp_path / "repo"
    repo.mkdir()
    torch.save(model.state_dict(), repo / "pytorch_model.bin")
    (repo / "config.json").write_text(json.dumps({"architecture": "x", "pretrained_cfg": {
        "crop_pct": 0.95, "interpolation": "bilinear", "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}}))
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(repo / "pytorch_model.bin"), str(out), "--model", "nano_resnet",
                 "--img-size", "32"]) == 0
    assert "crop 0.95, bilinear" in capsys.readouterr().out
    meta = load_weights(out)[1]
    prep = Preprocessing.from_metadata(meta)
    assert prep == Preprocessing((3, 32, 32), (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 0.95, "bilinear")
    assert "config.json" in meta["preprocessing_source"]
    # without the config.json: the model's defaults, said so
    (repo / "config.json").unlink()
    assert main(["convert", str(repo / "pytorch_model.bin"), str(out), "--model", "nano_resnet",
                 "--img-size", "32", "--force"]) == 0
    meta = load_weights(out)[1]
    assert json.loads(meta["crop_pct"]) == 1.0 and "mixlab's defaults" in meta["preprocessing_source"]


def test_a_hub_checkpoint_takes_the_data_configuration_of_its_timm_config(tmp_path, monkeypatch):
    """A timm repository on the Hub: config.json's pretrained_cfg is fetched with the weights (a fake
    hf_hub_download serves a folder as the Hub's cache does), and a repository without one still loads."""
    hub = pytest.importorskip("huggingface_hub")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    torch.manual_seed(0)
    torch.save(mixlab.create_model("nano_resnet", img_size=32, num_classes=4).state_dict(),
               snapshot / "pytorch_model.bin")
    asked = []

    def fake_download(repo_id, filename, revision=None, local_files_only=False, **kw):
        asked.append(filename)
        if not (snapshot / filename).is_file():
            raise hub.utils.EntryNotFoundError(f"{filename} is not in {repo_id}")
        return str(snapshot / filename)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    model = mixlab.create_model("nano_resnet", pretrained="hf-hub:org/nano", img_size=32)
    assert "config.json" in asked and Preprocessing.from_model(model).crop_pct == 1.0  # none there: the defaults
    (snapshot / "config.json").write_text(json.dumps({"pretrained_cfg": {"crop_pct": 0.9, "interpolation": "bilinear",
                                                                         "mean": [0.5] * 3, "std": [0.5] * 3}}))
    model = mixlab.create_model("nano_resnet", pretrained="hf-hub:org/nano", img_size=32)
    assert Preprocessing.from_model(model) == Preprocessing((3, 32, 32), (0.5,) * 3, (0.5,) * 3, 0.9, "bilinear")
    assert "timm's pretrained_cfg (config.json)" in model.pretrained_cfg["data_config_source"]


def test_a_timm_checkpoint_takes_timms_cfg_of_the_default_weights():
    timm = pytest.importorskip("timm")
    timm_weights = timm.create_model("deit_tiny_patch16_224").state_dict()
    model = mixlab.create_model("deit_tiny_patch16_224", pretrained=timm_weights)
    cfg = timm.models.get_pretrained_cfg("deit_tiny_patch16_224.fb_in1k")
    assert Preprocessing.from_model(model) == Preprocessing(cfg.input_size, cfg.mean, cfg.std, cfg.crop_pct,
                                                            cfg.interpolation)
    assert "deit_tiny_patch16_224's default weights" in model.pretrained_cfg["data_config_source"]


def _with_metadata(run: Path, tmp_path: Path, **changes) -> Path:
    """A copy of the run whose best checkpoint records other metadata values (JSON-encoded)."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    best = copy / "checkpoints" / "best.safetensors"
    weights, meta = load_weights(best)
    save_weights(weights, best, {**meta, **{k: json.dumps(v) for k, v in changes.items()}})
    return copy


def test_eval_uses_the_checkpoints_data_configuration_unless_told(run, tmp_path, capsys):
    copy = _with_metadata(run, tmp_path, mean=[0.9])
    own = evaluate_run(run)
    assert own["preprocessing"] == {"used": "checkpoint", "differences": [], **Preprocessing.from_metadata(
        load_weights(run / "checkpoints" / "best.safetensors")[1]).to_dict()}
    recorded = evaluate_run(copy)
    assert recorded["preprocessing"]["used"] == "checkpoint" and recorded["preprocessing"]["mean"] == [0.9]
    assert recorded["preprocessing"]["differences"][0].startswith("mean (0.9,) (the checkpoint) vs")
    # by hand: the run's model on the validation images normalised with mean 0.9
    model, _, info, _ = load_run_model(run)
    _, val, _ = build_datasets("digits", img_size=16, limit_val=64)  # the run's validation images
    tf = build_transforms(dataclasses.replace(info, mean=(0.9,)), False, 16)
    x = torch.stack([tf(val[i][0]) for i in range(len(val))])
    y = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(x), y).item()
    assert math.isclose(recorded["loss"], loss, rel_tol=1e-5) and not math.isclose(recorded["loss"], own["loss"])
    # told to use the data's own: the run's numbers, and a note on the command line
    told = evaluate_run(copy, data_preprocessing=True)
    assert told["preprocessing"]["used"] == "data" and told["loss"] == own["loss"]
    assert main(["eval", str(copy), "--data-preprocessing"]) == 0
    err = capsys.readouterr().err
    assert "note: the images were prepared with the data's own transform" in err and "mean (0.9,)" in err
    assert main(["eval", str(copy)]) == 0
    assert "note" not in capsys.readouterr().err


def test_a_preprocessing_is_checked_and_old_checkpoints_get_their_datas():
    with pytest.raises(ValueError, match="crop_pct must be a fraction in"):
        Preprocessing((3, 8, 8), (0.5,) * 3, (0.5,) * 3, 1.5)
    with pytest.raises(ValueError, match="interpolation must be one of bicubic, bilinear, nearest"):
        Preprocessing((3, 8, 8), (0.5,) * 3, (0.5,) * 3, 1.0, "lanczos")
    with pytest.raises(ValueError, match="mean must hold one number per input channel"):
        Preprocessing((3, 8, 8), (0.5,), (0.5,) * 3)
    old = {"in_chans": "1", "img_size": "16", "mean": "[0.3]", "std": "[0.4]"}  # mixlab 0.1.0 recorded no crop
    folder = Preprocessing((1, 16, 16), (0.3,), (0.4,), 0.875, "bicubic")
    assert Preprocessing.from_metadata(old, fallback=folder) == folder
    assert Preprocessing.from_metadata(old).crop_pct == 1.0
    with pytest.raises(ValueError, match="records no mean, std"):
        Preprocessing.from_metadata({"in_chans": "1", "img_size": "16"})
