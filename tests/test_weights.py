"""Reading checkpoints safely, loading them with clear errors, create_model(pretrained=...), `mixlab convert`."""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
import warnings

import pytest
import safetensors
import safetensors.torch
import torch

import mixlab
from mixlab.cli import main
from mixlab.registry import DEFAULT_WEIGHTS
from mixlab.weights import LoadResult, load_pretrained, read_checkpoint
from mixlab.weights import io as io_mod

SPEC = "spec:patch4 / convnext:1x16:kernel=3"


def tiny(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return mixlab.create_model(SPEC, **{"img_size": 32, "num_classes": 10, **kw})


def nano_resnet(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return mixlab.create_model("nano_resnet", **kw)


def randomized(model):
    """A state dict unlike any fresh initialisation (BN statistics included)."""
    g = torch.Generator().manual_seed(123)
    return {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 7).to(v.dtype)
            for k, v in model.state_dict().items()}


def assert_loaded(model, sd):
    msd = model.state_dict()
    assert set(msd) == set(sd)
    for k, v in sd.items():
        assert torch.equal(msd[k], v), k


def save(sd, path, kind):
    if kind == "safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path


# -- round trips -------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", ["safetensors", "pth", "pt", "bin", "ckpt"])
def test_round_trip_into_a_fresh_model(tmp_path, ext):
    sd = randomized(nano_resnet(0))
    path = save(sd, tmp_path / f"w.{ext}", "safetensors" if ext == "safetensors" else "torch")
    model = nano_resnet(1)
    result = load_pretrained(model, path)
    assert isinstance(result, LoadResult)
    assert_loaded(model, sd)
    assert result.format == "mixlab" and result.source == str(path)
    assert (result.missing, result.unexpected, result.mismatched, result.new_classifier) == ([], [], [], False)


def test_read_checkpoint_returns_safetensors_metadata(tmp_path):
    sd = tiny().state_dict()
    safetensors.torch.save_file(sd, str(tmp_path / "w.safetensors"), metadata={"architecture": SPEC, "x": "1"})
    got, meta = read_checkpoint(tmp_path / "w.safetensors")
    assert meta == {"architecture": SPEC, "x": "1"}
    assert set(got) == set(sd)
    got, meta = read_checkpoint(dict(sd))  # a state dict in memory
    assert set(got) == set(sd) and meta == {}


def test_load_from_a_state_dict_in_memory():
    sd = randomized(tiny(0))
    model = tiny(1)
    assert load_pretrained(model, sd).source == "<state dict>"
    assert_loaded(model, sd)


# -- refusing pickled objects ----------------------------------------------------------------------------
class Payload:
    """Unpickling this creates a marker file: proof that arbitrary code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("layout", ["beside", "top"])
def test_pickled_objects_are_refused_without_running_them(tmp_path, layout):
    marker = tmp_path / "code_ran"
    sd = tiny().state_dict()
    obj = {"model": sd, "extra": Payload(marker)} if layout == "beside" else Payload(marker)
    torch.save(obj, tmp_path / "evil.pth")
    assert not marker.exists()
    with pytest.raises(ValueError) as exc:
        read_checkpoint(tmp_path / "evil.pth")
    msg = str(exc.value)
    assert "evil.pth" in msg and "Python objects" in msg and "will not unpickle" in msg
    assert "arbitrary code" in msg and "safetensors" in msg and "weights_only=False" in msg
    with pytest.raises(ValueError, match="will not unpickle"):
        mixlab.create_model(SPEC, pretrained=str(tmp_path / "evil.pth"), img_size=32)
    assert not marker.exists()


def test_the_suggested_conversion_command_works(tmp_path):
    """A checkpoint with an argparse.Namespace (DeiT's): refused, and the printed one-liner converts it."""
    sd = randomized(tiny())
    torch.save({"model": sd, "args": argparse.Namespace(lr=0.1), "epoch": 3}, tmp_path / "deit.pth")
    with pytest.raises(ValueError, match="argparse.Namespace") as exc:
        read_checkpoint(tmp_path / "deit.pth")
    command = next(line.strip() for line in str(exc.value).splitlines() if line.strip().startswith("python -c"))
    subprocess.run(command.replace("python", sys.executable, 1), shell=True, check=True, cwd=tmp_path, timeout=60)
    got, _ = read_checkpoint(tmp_path / "deit.safetensors")
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


def test_unreadable_torch_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"certainly not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        read_checkpoint(tmp_path / "junk.pth")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.bin"):
        read_checkpoint(tmp_path / "empty.bin")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        read_checkpoint(tmp_path / "tensor.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="bad.safetensors"):
        read_checkpoint(tmp_path / "bad.safetensors")


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "nope.safetensors"))):
        read_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError) as exc:
        read_checkpoint(str(tmp_path / "w.npz"))
    for ext in (".safetensors", ".pth", ".pt", ".bin", ".ckpt", "hf-hub:"):
        assert ext in str(exc.value)
    with pytest.raises(TypeError):
        read_checkpoint(42)


# -- containers and prefixes -------------------------------------------------------------------------
def test_containers_are_unwrapped(tmp_path):
    sd, other = randomized(tiny()), tiny(5).state_dict()
    cases = {
        "model": ({"model": sd, "epoch": 4, "optimizer": {"state": {}}}, "model"),
        "state_dict": ({"state_dict_ema": other, "state_dict": sd}, "state_dict"),
        "prefers model over model_ema": ({"model_ema": other, "model": sd}, "model"),
        "ema only": ({"model_ema": sd, "epoch": 1}, "model_ema"),
        "module": ({"module": sd}, "module"),
        "net": ({"net": sd}, "net"),
        "nested": ({"state_dict": {"model": sd}, "epoch": 2}, "state_dict/model"),
    }
    for name, (obj, container) in cases.items():
        torch.save(obj, tmp_path / "c.pth")
        got, meta = read_checkpoint(tmp_path / "c.pth")
        assert meta["container"] == container, name
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd), name


def test_ddp_prefix_stripped_and_non_tensors_dropped(tmp_path):
    sd = randomized(tiny())
    torch.save({**{f"module.{k}": v for k, v in sd.items()}, "module.epoch": 3}, tmp_path / "ddp.pth")
    got, meta = read_checkpoint(tmp_path / "ddp.pth")
    assert set(got) == set(sd) and meta["stripped_prefix"] == "module."
    assert "module.epoch" in meta["dropped"]
    model = tiny(1)
    load_pretrained(model, tmp_path / "ddp.pth")
    assert_loaded(model, sd)
    # a prefix on only some keys is a real name, not a wrapper's
    partial = {"module.x": torch.zeros(1), "y": torch.zeros(1)}
    assert set(read_checkpoint(partial)[0]) == {"module.x", "y"}


def test_no_tensors_is_an_error(tmp_path):
    torch.save({"epoch": 3, "model": {}}, tmp_path / "e.pth")
    with pytest.raises(ValueError, match="no tensors"):
        read_checkpoint(tmp_path / "e.pth")
    with pytest.raises(ValueError, match="no tensors"):
        read_checkpoint({})


# -- fitting the model -------------------------------------------------------------------------------
def test_missing_unexpected_and_mis_shaped_keys_are_listed():
    model = nano_resnet(0)
    sd = randomized(model)
    sd.pop("stem.convs.1.weight")
    sd["extra.weight"] = torch.zeros(2)
    key = "stages.0.blocks.0.conv1.weight"
    sd[key] = torch.zeros(3, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as exc:
        load_pretrained(model, sd)
    msg = str(exc.value)
    assert "1 missing key(s)" in msg and "stem.convs.1.weight" in msg
    assert "1 unexpected key(s)" in msg and "extra.weight" in msg
    assert "1 shape mismatch(es)" in msg and f"{key}: (3, 3) vs" in msg
    assert "nano_resnet" in msg and "format" in msg and "strict=False" in msg
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # nothing was loaded

    result = load_pretrained(model, sd, strict=False)
    assert result.missing == ["stem.convs.1.weight"]
    assert result.unexpected == ["extra.weight"]
    assert len(result.mismatched) == 1 and result.mismatched[0].startswith(key)
    msd = model.state_dict()
    assert torch.equal(msd["head.fc.weight"], sd["head.fc.weight"])  # what fits was loaded
    assert torch.equal(msd[key], before[key]) and torch.equal(msd["stem.convs.1.weight"], before["stem.convs.1.weight"])


def test_long_listings_are_cut():
    sd = {f"junk.{i}": torch.zeros(1) for i in range(50)}
    sd.update(tiny().state_dict())
    with pytest.raises(ValueError) as exc:
        load_pretrained(tiny(), sd)
    msg = str(exc.value)
    assert "50 unexpected key(s)" in msg and "junk.19" in msg and "junk.20\n" not in msg and "30 more" in msg


def test_missing_batchnorm_counters_are_not_an_error():
    sd = {k: v for k, v in randomized(nano_resnet(0)).items() if not k.endswith("num_batches_tracked")}
    model = nano_resnet(1)
    result = load_pretrained(model, sd)
    assert result.missing == []
    msd = model.state_dict()
    assert all(torch.equal(msd[k], v) for k, v in sd.items())


def test_another_number_of_classes_keeps_a_fresh_classifier():
    sd = randomized(tiny(0, num_classes=10))
    model = tiny(1, num_classes=7)
    fresh = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("head.fc")}
    with pytest.warns(UserWarning, match="new classifier of 7 classes.*checkpoint.* has 10"):
        result = load_pretrained(model, sd)
    assert result.new_classifier and sorted(result.dropped) == ["head.fc.bias", "head.fc.weight"]
    msd = model.state_dict()
    for k, v in fresh.items():
        assert torch.equal(msd[k], v)
    assert all(torch.equal(msd[k], v) for k, v in sd.items() if not k.startswith("head.fc"))

    model = tiny(1, num_classes=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = load_pretrained(model, sd, num_classes_from_checkpoint=True)
    assert model.num_classes == 10 and not result.new_classifier
    assert_loaded(model, sd)


def test_distilled_heads_follow_the_classifier():
    torch.manual_seed(0)
    src = mixlab.create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=1, num_classes=10)
    model = mixlab.create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=1, num_classes=4)
    with pytest.warns(UserWarning, match="4 classes"):
        result = load_pretrained(model, src.state_dict())
    assert {"head.fc.weight", "head_dist.weight"} <= set(result.dropped)
    assert model.head_dist.weight.shape[0] == 4


def test_a_model_without_classifier_ignores_the_checkpoints():
    sd = randomized(tiny())
    model = tiny(1, num_classes=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = load_pretrained(model, sd)
    assert sorted(result.dropped) == ["head.fc.bias", "head.fc.weight"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items() if not k.startswith("head.fc"))


def test_a_checkpoint_without_classifier_warns():
    sd = {k: v for k, v in randomized(tiny()).items() if not k.startswith("head.fc")}
    model = tiny(1)
    with pytest.warns(UserWarning, match="no classifier"):
        assert load_pretrained(model, sd).new_classifier


def test_resized_tensors_are_reported(monkeypatch):
    sd = randomized(tiny())
    key = "stages.0.blocks.0.mixer.conv.weight"
    target = tiny().state_dict()[key]

    def fake_convert(state_dict, model):  # renames everything, "resamples" one tensor
        out = {k[len("old."):]: v for k, v in state_dict.items()}
        out[key] = torch.ones(target.shape)
        return out

    monkeypatch.setattr("mixlab.weights.load.convert_state_dict", fake_convert)
    src = {f"old.{k}": (torch.zeros(1, 2, 3) if k == key else v) for k, v in sd.items()}
    model = tiny(1)
    assert load_pretrained(model, src).resized == [key]
    assert torch.equal(model.state_dict()[key], torch.ones(target.shape))


def test_wrapped_models_load_into_the_inner_one():
    sd = randomized(tiny())
    features = mixlab.create_model(SPEC, img_size=32, features_only=True)
    load_pretrained(features, sd)
    assert all(torch.equal(features.model.state_dict()[k], v) for k, v in sd.items() if not k.startswith("head.fc"))


# -- create_model(pretrained=...) ---------------------------------------------------------------------
def test_create_model_with_a_file(tmp_path):
    sd = randomized(nano_resnet())
    path = save(sd, tmp_path / "w.safetensors", "safetensors")
    model = mixlab.create_model("nano_resnet", pretrained=str(path))
    assert_loaded(model, sd)
    assert model.pretrained_cfg["source"] == str(path) and model.pretrained_cfg["architecture"] == "nano_resnet"
    assert model.pretrained_cfg["source_format"] == "mixlab"
    model = mixlab.create_model("nano_resnet", pretrained=path)  # a Path too
    assert_loaded(model, sd)
    model = mixlab.create_model("nano_resnet", pretrained=sd)
    assert model.pretrained_cfg["source"] == "<state dict>"


def test_create_model_takes_the_checkpoints_classes_unless_told(tmp_path):
    sd = randomized(tiny(num_classes=100))
    model = mixlab.create_model(SPEC, img_size=32, pretrained=sd)  # the spec's default would be 1000
    assert model.num_classes == 100
    assert_loaded(model, sd)
    with pytest.warns(UserWarning, match="new classifier of 3 classes"):
        model = mixlab.create_model(SPEC, img_size=32, num_classes=3, pretrained=sd)
    assert model.num_classes == 3


def test_create_model_features_only_with_weights():
    sd = randomized(tiny())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no word about a classifier the extractor does not have
        features = mixlab.create_model(SPEC, img_size=32, pretrained=sd, features_only=True)
    reference = tiny(3)
    reference.load_state_dict(sd)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got, want = features(x), reference.forward_intermediates(x)
    assert len(got) == len(want) and all(torch.allclose(a, b) for a, b in zip(got, want))


def test_create_model_reads_mixlab_metadata(tmp_path):
    sd = randomized(tiny(img_size=48))
    meta = {"mean": json.dumps([0.1, 0.2, 0.3]), "std": json.dumps([0.4, 0.5, 0.6]), "input_size": "[3, 48, 48]"}
    safetensors.torch.save_file(sd, str(tmp_path / "w.safetensors"), metadata=meta)
    model = mixlab.create_model(SPEC, pretrained=str(tmp_path / "w.safetensors"))
    cfg = model.pretrained_cfg
    assert cfg["mean"] == (0.1, 0.2, 0.3) and cfg["std"] == (0.4, 0.5, 0.6) and cfg["input_size"] == (3, 48, 48)
    assert model.img_size == (48, 48)


def test_architecture_kwargs_are_merged_and_conflicts_refused(monkeypatch):
    sd = randomized(tiny(in_chans=1))
    monkeypatch.setattr("mixlab.factory.architecture_kwargs", lambda name, state_dict: {"in_chans": 1})
    model = mixlab.create_model(SPEC, img_size=32, pretrained=sd)
    assert model.in_chans == 1
    model = mixlab.create_model(SPEC, img_size=32, in_chans=1, pretrained=sd)  # agreeing is fine
    with pytest.raises(ValueError, match="in_chans=1.*in_chans=3 was passed"):
        mixlab.create_model(SPEC, img_size=32, in_chans=3, pretrained=sd)


def test_adaptable_architecture_kwargs_follow_the_caller(monkeypatch):
    """img_size (and window_size) are adapted to by the conversion: the caller's value wins
    unless the weights then do not fit (an MLP-Mixer's token MLP depends on the input size)."""
    monkeypatch.setattr("mixlab.factory.architecture_kwargs", lambda name, state_dict: {"img_size": 64})
    sd = randomized(tiny(img_size=64))
    assert mixlab.create_model(SPEC, pretrained=sd).img_size == (64, 64)
    assert mixlab.create_model(SPEC, img_size=32, pretrained=sd).img_size == (32, 32)  # convolutions: any size
    torch.manual_seed(0)
    mixer = mixlab.create_model("nano_mixer", img_size=64).state_dict()
    with pytest.raises(ValueError, match="(?s)made for img_size=64 .img_size=32 was passed.*shape mismatch"):
        mixlab.create_model("nano_mixer", img_size=32, pretrained=mixer)
    assert mixlab.create_model("nano_mixer", pretrained=mixer).img_size == (64, 64)


def test_pretrained_true_without_default_weights():
    with pytest.raises(ValueError, match="no default pretrained weights.*nano_convnext.*hf-hub:"):
        mixlab.create_model("nano_convnext", pretrained=True)
    with pytest.raises(ValueError, match="no default pretrained weights"):
        mixlab.create_model(SPEC, pretrained=True)


def test_default_weights_table():
    assert DEFAULT_WEIGHTS["convnext_tiny"]["source"] == "hf-hub:timm/convnext_tiny.fb_in1k"
    assert DEFAULT_WEIGHTS["resnet50"]["source"] == "hf-hub:timm/resnet50.a1_in1k"
    for name, entry in DEFAULT_WEIGHTS.items():
        assert mixlab.is_model(name), name
        assert entry["source"].startswith(f"hf-hub:timm/{name}."), name
        assert len(entry["mean"]) == len(entry["std"]) == 3


def test_top_level_export():
    assert mixlab.load_pretrained is load_pretrained and "load_pretrained" in mixlab.__all__


# -- the Hugging Face Hub -------------------------------------------------------------------------------
def test_hub_ids_are_parsed():
    assert io_mod.parse_hub_id("hf-hub:org/name") == ("org/name", None, None)
    assert io_mod.parse_hub_id("hf-hub:org/name@v1.0") == ("org/name", "v1.0", None)
    assert io_mod.parse_hub_id("hf-hub:org/name@main/sub/w.bin") == ("org/name", "main", "sub/w.bin")
    with pytest.raises(ValueError, match="not a Hub id"):
        io_mod.parse_hub_id("hf-hub:justname")


def test_hub_offline_is_a_clear_error(monkeypatch):
    pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    start = time.perf_counter()
    with pytest.raises(ValueError) as exc:
        read_checkpoint("hf-hub:mixlab-tests/no-such-model@v2")
    msg = str(exc.value)
    assert "offline" in msg and "local file" in msg and "mixlab-tests/no-such-model" in msg
    with pytest.raises(ValueError, match="offline"):
        mixlab.create_model("resnet50", pretrained=True)
    assert time.perf_counter() - start < 10


def test_hub_env_is_honoured_at_call_time(monkeypatch):
    """HF_HUB_OFFLINE set after huggingface_hub was imported still means: no network."""
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_download(repo_id, filename, revision=None, local_files_only=False, **kw):
        calls.append(local_files_only)
        raise hub.utils.LocalEntryNotFoundError("not in cache")

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="offline"):
        read_checkpoint("hf-hub:org/name")
    assert calls == [True, True]


def test_hub_unreachable_tries_the_network_once(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_download(repo_id, filename, revision=None, local_files_only=False, **kw):
        calls.append((filename, local_files_only))
        raise hub.utils.LocalEntryNotFoundError("connection error and not in cache")

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ValueError, match="could not be reached.*pass the local file"):
        read_checkpoint("hf-hub:org/name")
    assert calls == [("model.safetensors", False), ("pytorch_model.bin", True)]


def test_hub_download_falls_back_to_pytorch_model_bin(monkeypatch, tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    sd = randomized(tiny())
    torch.save(sd, tmp_path / "pytorch_model.bin")

    def fake_download(repo_id, filename, revision=None, local_files_only=False, **kw):
        assert (repo_id, revision) == ("org/name", "abc")
        if filename == "model.safetensors":
            raise hub.utils.EntryNotFoundError("404")
        return str(tmp_path / filename)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    got, meta = read_checkpoint("hf-hub:org/name@abc")
    assert meta["hub_file"] == "pytorch_model.bin" and meta["hub_repo"] == "org/name"
    assert all(torch.equal(got[k], v) for k, v in sd.items())
    model = mixlab.create_model(SPEC, img_size=32, pretrained="hf-hub:org/name@abc")
    assert_loaded(model, sd)
    assert model.pretrained_cfg["source"] == "hf-hub:org/name@abc"


def test_hub_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ValueError, match=re.escape("pip install 'mixlab[hub]'")):
        read_checkpoint("hf-hub:timm/resnet50.a1_in1k")


# -- mixlab convert ------------------------------------------------------------------------------------
def test_cli_convert_round_trip(tmp_path, capsys):
    sd = randomized(nano_resnet())
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 9}, tmp_path / "train.pth")
    dst = tmp_path / "out" / "nano.safetensors"
    assert main(["convert", str(tmp_path / "train.pth"), str(dst), "--model", "nano_resnet"]) == 0
    out = capsys.readouterr().out
    assert str(dst) in out and f"{len(sd)} tensors" in out and "parameters" in out and "mixlab" in out
    assert out.count("\n") == 1
    with safetensors.safe_open(str(dst), "pt") as f:
        meta = f.metadata()
    assert meta["architecture"] == "nano_resnet" and meta["source"] == str(tmp_path / "train.pth")
    assert meta["source_format"] == "mixlab" and json.loads(meta["input_size"]) == [3, 32, 32]
    assert json.loads(meta["mean"]) == [0.485, 0.456, 0.406] and len(json.loads(meta["std"])) == 3
    assert meta["num_classes"] == "10" and meta["mixlab_version"] == mixlab.__version__
    model = mixlab.create_model("nano_resnet", pretrained=str(dst))
    assert_loaded(model, sd)
    assert [p.name for p in dst.parent.iterdir()] == ["nano.safetensors"]  # no temporary file left

    # refusing to overwrite, then --force
    mtime = dst.stat().st_mtime_ns
    assert main(["convert", str(tmp_path / "train.pth"), str(dst), "--model", "nano_resnet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixlab convert: error:") and "exists" in err and "--force" in err
    assert dst.stat().st_mtime_ns == mtime
    assert main(["convert", str(tmp_path / "train.pth"), str(dst), "--model", "nano_resnet", "--force"]) == 0


def test_cli_convert_spec_model_and_options(tmp_path, capsys):
    sd = randomized(tiny(img_size=32, num_classes=10))
    src = save(sd, tmp_path / "w.safetensors", "safetensors")
    dst = tmp_path / "spec.safetensors"
    assert main(["convert", str(src), str(dst), "--model", SPEC, "--img-size", "32"]) == 0
    capsys.readouterr()
    model = mixlab.create_model(SPEC, pretrained=str(dst))  # input size and classes from the file
    assert model.img_size == (32, 32) and model.num_classes == 10
    assert_loaded(model, sd)
    assert main(["convert", str(src), str(tmp_path / "five.safetensors"), "--model", SPEC, "--img-size", "32",
                 "--num-classes", "5"]) == 0
    assert "warning: a new classifier of 5 classes" in capsys.readouterr().err


def test_cli_convert_refusals(tmp_path, capsys):
    sd = randomized(tiny())
    src = save(sd, tmp_path / "w.safetensors", "safetensors")
    for dst in ("out.pth", "out"):
        assert main(["convert", str(src), str(tmp_path / dst), "--model", SPEC]) == 2
        assert ".safetensors" in capsys.readouterr().err
    # weights of another architecture: the listing, and nothing written
    assert main(["convert", str(src), str(tmp_path / "x.safetensors"), "--model", "nano_resnet"]) == 2
    err = capsys.readouterr().err
    assert "does not fit the model 'nano_resnet'" in err and "missing key(s)" in err
    assert not (tmp_path / "x.safetensors").exists()
    assert main(["convert", str(tmp_path / "absent.pth"), str(tmp_path / "y.safetensors"), "--model", SPEC]) == 2
    assert "absent.pth" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", str(src), str(tmp_path / "z.safetensors")])  # --model is required
