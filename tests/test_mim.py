"""Masked image modeling: SimMIM on paper-sized ViT, Swin and ConvNeXt at small inputs, MAE on ViTs; the literal
properties (hidden pixels never reach SimMIM's output, visible pixels never reach its loss, MAE's encoder sees only
the visible tokens); parameter groups behind the wrapper; the mim task end to end (pictures, exact resume after
SIGKILL, fine-tuning from the run with its decoder left out) and its refusals of bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import kill_at_checkpoint, mixlab, train_in_this_process

from mixlab.cli import main
from mixlab.engine.optim import param_groups
from mixlab.factory import create_model
from mixlab.models.mim import MAE, SimMIM, random_mask
from mixlab.weights import load_weights

# a one-block ViT on 4x4 patches and a two-stage Swin-like spec, for the engine's tests at 16 px
TINY_VIT = "spec:patch4 / attention:1x32:heads=2,pos=abs"
TINY_SWIN = "spec:patch2 / window:1x16:heads=2,window=2 / window:1x32:heads=2,window=2,downsample=merge"
LOG = ["--set", "log.progress=false", "--set", "log.print_every=0"]
DIGITS = ["--data", "digits", "--img-size", "16", "--set", "data.limit_train=64", "--set", "data.limit_val=32",
          "--batch-size", "16", *LOG]
MAE_SMALL = ["--set", "mim.method=mae", "--set", "mim.decoder_dim=32", "--set", "mim.decoder_depth=1",
             "--set", "mim.decoder_heads=2"]

PAPER_SIZED = [  # (model, kwargs, image side, mask patch): the papers' widths and depths, small images
    ("vit_tiny_patch16_224", {}, 32, 16),
    ("swin_tiny_patch4_window7_224", {"window_size": 2}, 64, 16),
    ("convnext_tiny", {}, 64, 16),
]


def _mask(module, batch, ratio=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = random_mask(batch, module.grid[0] * module.grid[1], ratio, generator=g)
    return m.reshape(batch, *module.grid) if isinstance(module, SimMIM) else m


@pytest.mark.parametrize("name,kwargs,size,mask_patch", PAPER_SIZED)
def test_simmim_on_paper_sized_models(name, kwargs, size, mask_patch):
    torch.manual_seed(0)
    module = SimMIM(create_model(name, num_classes=0, img_size=size, **kwargs), mask_patch=mask_patch)
    x = torch.randn(2, 3, size, size)
    mask = _mask(module, 2)
    rec = module(x, mask)
    assert rec.shape == x.shape
    loss = module.loss(x, rec, mask)
    loss.backward()
    assert torch.isfinite(loss) and module.mask_token.grad is not None
    assert module.encoder.get_submodule(module.encoder.mask_stem).__class__.__name__  # the hook's module exists
    module.zero_grad()
    with torch.no_grad():
        # hidden pixels never reach the output: the mask token replaces them after the stem
        hidden = module.upsample(mask, mask_patch).unsqueeze(1)
        changed = x + hidden * torch.randn_like(x) * 5
        assert torch.equal(module(changed, mask), module(x, mask))
        # the loss reads the hidden pixels only: changing the reconstruction or the target where visible is free
        visible = 1 - hidden
        assert module.loss(x, rec + visible * 3.0, mask) == module.loss(x, rec, mask)
        assert module.loss(x + visible * 3.0, rec, mask) == module.loss(x, rec, mask)
        # and it does read them
        assert module.loss(x, rec + hidden * 3.0, mask) != module.loss(x, rec, mask)
        # the encoder alone is the model again: no mask token outside SimMIM's forward
        plain = module.encoder.forward_intermediates(x, [-1])[0]
        assert not torch.equal(plain, module.encoder.forward_intermediates(changed, [-1])[0])


@pytest.mark.parametrize("name", ["nano_botnet", "nano_cait", "nano_cetnet", "nano_coatnet", "nano_convit", "nano_cvt",
                                  "nano_lrnet", "nano_pvt", "nano_mixer"])
def test_simmim_takes_every_model_class(name):
    """The families with a class of their own (the others are specifications, like nano_mixer): the mask token
    enters at each one's mask_stem, and hidden pixels never reach the output."""
    from mixlab.engine.tasks.mim import default_mask_patch
    from mixlab.models.mim import stem_stride
    model = create_model(name, num_classes=0, img_size=32)
    module = SimMIM(model, mask_patch=default_mask_patch(32, stem_stride(model)))
    x = torch.randn(2, 3, 32, 32)
    mask = _mask(module, 2)
    module.loss(x, module(x, mask), mask).backward()
    assert module.mask_token.grad.abs().sum() > 0
    with torch.no_grad():
        module.eval()
        hidden = module.upsample(mask, module.mask_patch).unsqueeze(1)
        assert torch.equal(module(x + hidden * 3.0, mask), module(x, mask))


def test_simmim_loss_is_l1_over_hidden_pixels():
    module = SimMIM(create_model(TINY_SWIN, num_classes=0, img_size=16, in_chans=1), mask_patch=4)
    x, rec = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    mask = _mask(module, 2)
    hidden = module.upsample(mask, 4).unsqueeze(1).bool()
    assert torch.allclose(module.loss(x, rec, mask), (rec - x).abs()[hidden].mean(), atol=1e-6)


def test_mae_encoder_sees_only_the_visible_tokens_and_its_loss_reads_hidden_patches():
    torch.manual_seed(0)
    vit = create_model("vit_tiny_patch16_224", num_classes=0, img_size=64)
    mae = MAE(vit, decoder_dim=64, decoder_depth=1, decoder_heads=4, norm_pix_loss=True)
    lengths = []
    vit.blocks[0].register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    x = torch.randn(3, 3, 64, 64)
    mask = _mask(mae, 3, ratio=0.75)
    assert mask.sum(1).tolist() == [12.0] * 3  # 16 patches, 12 hidden
    pred = mae(x, mask)
    assert lengths == [1 + 4]  # the class token and the 4 visible patches: no masked token enters the encoder
    assert pred.shape == (3, 16, 16 * 16 * 3)
    loss = mae.loss(x, pred, mask)
    # per-patch normalised targets, mean squared error over the hidden patches only
    t = mae.patchify(x)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    want = ((pred - t) ** 2).mean(-1)[mask.bool()].mean()
    assert torch.allclose(loss, want, atol=1e-5)
    with torch.no_grad():  # the hidden patches' pixels never reach the prediction
        hidden = mae.unpatchify(mask.unsqueeze(-1).expand(-1, -1, 16 * 16 * 3))
        assert torch.equal(mae(x + hidden * 4.0, mask), mae(x, mask))
    # the position table is MAE's fixed sine-cosine one, not learned
    assert not vit.pos_embed.pos_embed.requires_grad
    assert torch.equal(vit.pos_embed.pos_embed[0, 0], torch.zeros(192))  # the class token's row
    assert torch.equal(mae.patchify(mae.unpatchify(t)), t)


def test_mae_refuses_a_hierarchical_model():
    with pytest.raises(ValueError, match="simmim"):
        MAE(create_model(TINY_SWIN, num_classes=0, img_size=16))
    with pytest.raises(ValueError, match="pos=abs"):
        MAE(create_model("spec:patch4 / attention:1x32:heads=2", num_classes=0, img_size=16))


def test_parameter_groups_see_through_the_wrapper():
    vit = create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, depth=2)
    mae = MAE(vit, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    groups = param_groups(mae, weight_decay=0.05, lr=1e-3, layer_decay=0.5)
    by_name = {n: g for g in groups for n in g["names"]}
    # the model's no_weight_decay (cls token) and the wrapper's (mask token) behind the "encoder." prefix
    assert by_name["encoder.cls_token"]["weight_decay"] == 0.0
    assert by_name["mask_token"]["weight_decay"] == 0.0
    assert by_name["encoder.blocks.0.mlp.fc1.weight"]["weight_decay"] == 0.05
    # layer decay by the model's depth: patch stem 0.5^3, block 0 0.5^2, block 1 0.5; the decoder at the top
    assert by_name["encoder.patch_embed.proj.weight"]["lr_scale"] == 0.125
    assert by_name["encoder.blocks.0.mixer.qkv.weight"]["lr_scale"] == 0.25
    assert by_name["encoder.blocks.1.mixer.qkv.weight"]["lr_scale"] == 0.5
    assert by_name["decoder_pred.weight"]["lr_scale"] == 1.0
    # the frozen sine-cosine table is in no group
    assert "encoder.pos_embed.pos_embed" not in by_name


@pytest.fixture(scope="module")
def mim_run(tmp_path_factory):
    """A 2-epoch SimMIM run of the tiny Swin on digits at 16 px."""
    out = tmp_path_factory.mktemp("mim")
    r = mixlab("train", "--model", TINY_SWIN, *DIGITS, "--epochs", "2", "--set", "task=mim", "--output", str(out),
               "--name", "simmim")
    assert r.returncode == 0, r.stderr
    return out / "simmim", r.stdout


def test_mim_run_writes_pictures_and_its_metric(mim_run):
    run, stdout = mim_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "mim" and summary["mim"] == {"method": "simmim", "mask_ratio": 0.6}
    assert summary["best_val_loss"] <= summary["val_loss"] and summary["val_loss"] > 0
    assert summary["params"] > summary["backbone_params"]  # the decoder and mask token count too
    assert "inside SimMIM" in stdout
    pictures = sorted((run / "pictures").glob("*.png"))
    assert [p.name for p in pictures] == ["epoch001.png", "epoch002.png"]
    w, h = Image.open(pictures[-1]).size
    assert w > h > 0  # three rows of eight images
    _, meta = load_weights(run / "checkpoints" / "best.safetensors")
    assert meta["backbone_prefix"] == "encoder." and json.loads(meta["task_modules"]) == ["decoder", "mask_token"]
    assert meta["num_classes"] == "0"


def test_fine_tuning_from_a_mim_run_takes_the_encoder(mim_run, tmp_path):
    run, _ = mim_run
    r = mixlab("train", "--model", TINY_SWIN, *DIGITS, "--epochs", "1", "--pretrained", str(run), "--output",
               str(tmp_path), "--name", "ft", "--set", "model.freeze=backbone")
    assert r.returncode == 0, r.stderr
    assert "left out decoder.*, mask_token" in r.stdout and "fresh classifier" in r.stdout
    encoder, _ = load_weights(run / "checkpoints" / "best.safetensors")
    tuned, _ = load_weights(tmp_path / "ft" / "checkpoints" / "best.safetensors")
    backbone = {k[len("encoder."):]: v for k, v in encoder.items() if k.startswith("encoder.")}
    assert all(torch.equal(tuned[k], v) for k, v in backbone.items())  # a linear probe: the encoder as pretrained
    assert set(tuned) - set(backbone) == {"head.fc.weight", "head.fc.bias"}


def test_mim_run_evaluates_and_draws_into_the_output_folder(mim_run, tmp_path, capsys):
    run, _ = mim_run
    summary = json.loads((run / "summary.json").read_text())
    assert main(["eval", str(run), "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert f"loss {summary['best_val_loss']:.4g}" in out and "reconstructions.png" in out
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert result["loss"] == pytest.approx(summary["best_val_loss"], rel=1e-6)
    # the picture of the best checkpoint: the run's own of that epoch, pixel for pixel
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = min(rows, key=lambda row: row["val_loss"])["epoch"]
    assert (Image.open(tmp_path / "ev" / "reconstructions.png").tobytes()
            == Image.open(run / "pictures" / f"epoch{best:03d}.png").tobytes())


def test_an_arena_of_mim_runs_ranks_by_reconstruction_loss(tmp_path, monkeypatch):
    from mixlab.arena import runner

    monkeypatch.setattr(runner, "train_in_child", train_in_this_process)
    out = tmp_path / "arena"
    assert main(["arena", TINY_SWIN, TINY_VIT, "--data", "digits", "--img-size", "16", "--epochs", "1", "--no-speed",
                 "--batch-size", "16", "--set", "task=mim", "--set", "data.limit_train=64", "--set",
                 "data.limit_val=32", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["metric"]["key"] == "val_loss" and results["metric"]["mode"] == "min"
    losses = [m["val_loss_mean"] for m in results["results"]]
    table = (out / "leaderboard.md").read_text()
    assert "reconstruction loss" in table
    rows = [line for line in table.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    first = min(zip(losses, [m["label"] for m in results["results"]]))[1]
    assert first in rows[0]  # lower is better: the smaller loss ranks first
    html = (out / "index.html").read_text()
    assert "Pictures of the runs" in html and html.count("data:image/png;base64,") >= 5  # 3 plots + 2 pictures


def test_mae_sigkill_then_resume_equals_uninterrupted(tmp_path):
    args = ["--model", TINY_VIT, *DIGITS, "--epochs", "2", "--set", "task=mim", *MAE_SMALL,
            "--set", "checkpoint.every_steps=3", "--set", "aug.hflip=0.5", "--set", "mim.picture_every=0"]
    ref = mixlab("train", *args, "--output", str(tmp_path), "--name", "ref")
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "killed"
    kill_at_checkpoint([*args, "--output", str(tmp_path), "--name", "killed"], run, lambda s: s >= 5 and s % 4)
    res = mixlab("train", "--resume", str(run))
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stderr
    a, _ = load_weights(tmp_path / "ref" / "checkpoints" / "ckpt-00000008.safetensors")
    b, _ = load_weights(run / "checkpoints" / "ckpt-00000008.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (json.loads((run / "summary.json").read_text())["val_loss"]
            == json.loads((tmp_path / "ref" / "summary.json").read_text())["val_loss"])


def test_two_process_ddp_mae(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "mixlab", "pretrain", "--method", "mae", "--model", TINY_VIT, *DIGITS, "--epochs", "1",
                        *MAE_SMALL, "--output", str(tmp_path), "--name", "ddp"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["global_batch"] == 32 and s["steps"] == 2  # 64 images, half a rank
    assert r.stdout.count("epoch 1/1:") == 1 and (tmp_path / "ddp" / "pictures" / "epoch001.png").is_file()


def _folder(root: Path, images: int) -> Path:
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        for i in range(images):
            Image.new("RGB", (20, 20), (i * 30 % 255, 80, 160)).save(root / split / f"{i}.png")
    return root


def test_an_image_folder_without_class_folders(tmp_path):
    root = _folder(tmp_path / "imgs", 16)
    r = mixlab("train", "--model", TINY_SWIN, "--data", "imagefolder", "--data-root", str(root), "--img-size", "16",
               "--batch-size", "8", "--epochs", "1", "--set", "task=mim", "--output", str(tmp_path), "--name", "f",
               *LOG)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "f" / "pictures" / "epoch001.png").is_file()


@pytest.mark.parametrize("args,says", [
    (["--set", "mim.mask_ratio=1.0"], "mim.mask_ratio"),
    (["--set", "mim.mask_ratio=0"], "mim.mask_ratio"),
    (["--set", "mim.mask_patch=6"], "mim.mask_patch 6 must be a multiple"),
    (["--set", "mim.method=mae"], "MAE cannot pretrain this specification"),
    (["--set", "aug.mixup=0.8"], "mixup"),
])
def test_bad_mim_settings_are_refused_before_anything_is_written(tmp_path, capsys, args, says):
    code = main(["train", "--model", TINY_SWIN, *DIGITS, "--epochs", "1", "--set", "task=mim", *args, "--output",
                 str(tmp_path), "--name", "bad"])
    err = capsys.readouterr().err
    assert code == 2 and says in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_a_folder_without_images_and_another_architecture_are_refused(tmp_path, mim_run, capsys):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    code = main(["train", "--model", TINY_SWIN, "--data", "imagefolder", "--data-root", str(empty), "--img-size", "16",
                 "--set", "task=mim", "--output", str(tmp_path), "--name", "e"])
    err = capsys.readouterr().err
    assert code == 2 and "holds no images" in err, err
    run, _ = mim_run
    code = main(["train", "--model", TINY_VIT, *DIGITS, "--pretrained", str(run), "--output", str(tmp_path),
                 "--name", "other"])
    err = capsys.readouterr().err
    assert code == 2 and "set model.name / --model to" in err, err
    assert not (tmp_path / "other").exists() and not (tmp_path / "e").exists()
