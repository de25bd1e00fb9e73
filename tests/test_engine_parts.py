"""Tests of the training-engine parts: optimizers, schedules, EMA, checkpoints."""
from __future__ import annotations

import collections
import io
import json
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from mixlab.engine import (CheckpointManager, Lamb, ModelEma, build_optimizer, build_scheduler, layer_ids, load_state,
                           param_groups, rng_state, save_state, set_rng_state, unwrap_model)
from mixlab.weights import CheckpointError, check_compatible, load_weights, save_weights
from mixlab.models.convnext import ConvNeXt
from mixlab.models.vit import VisionTransformer


def small_vit(num_classes: int = 5) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=num_classes)


def small_convnext(depths=(1, 1, 1, 1)) -> ConvNeXt:
    torch.manual_seed(0)
    return ConvNeXt(depths=depths, dims=(8, 16, 24, 32), num_classes=5)


class Holder(nn.Module):
    """A trivial wrapper with a ``.module``, like DistributedDataParallel."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def weights_only_roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# -- layer ids and parameter groups -----------------------------------------------------------------------
def test_layer_ids_vit():
    ids, n = layer_ids(small_vit())
    assert n == 4  # 2 blocks + embedding + head
    for name in ("cls_token", "pos_embed.pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"):
        assert ids[name] == 0
    assert ids["blocks.0.mixer.qkv.weight"] == 1 and ids["blocks.1.mlp.fc2.bias"] == 2
    for name in ("norm.weight", "head.fc.weight", "head.fc.bias"):
        assert ids[name] == 3
    assert layer_ids(Holder(small_vit()))[0] == ids  # wrappers are removed


def test_layer_ids_convnext_runs_over_stages():
    model = small_convnext(depths=(1, 2, 1, 1))
    ids, n = layer_ids(model)
    assert n == 5 + 2
    assert all(ids[k] == 0 for k in ids if k.startswith("stem."))
    assert ids["stages.0.blocks.0.mlp.fc1.weight"] == 1
    assert ids["stages.1.downsample.proj.weight"] == 2 == ids["stages.1.blocks.0.mixer.conv.weight"]
    assert ids["stages.1.blocks.1.ls.gamma"] == 3
    assert ids["stages.2.downsample.proj.weight"] == 4
    assert ids["stages.3.blocks.0.mlp.fc2.weight"] == 5
    assert ids["head.fc.weight"] == ids["head.norm.weight"] == 6
    # ids never decrease along the network
    order = [ids[k] for k, _ in model.named_parameters()]
    assert order == sorted(order)


def _decay_of(groups) -> dict[str, float]:
    return {name: g["weight_decay"] for g in groups for name in g["names"]}


def test_param_groups_weight_decay_exclusions():
    vit = small_vit()
    groups = param_groups(vit, weight_decay=0.05, lr=1e-3)
    wd = _decay_of(groups)
    assert sorted(wd) == sorted(n for n, _ in vit.named_parameters())  # every parameter exactly once
    for name in ("pos_embed.pos_embed", "cls_token", "norm.weight", "norm.bias", "blocks.0.norm1.weight",
                 "blocks.0.mixer.qkv.bias", "head.fc.bias", "patch_embed.proj.bias"):
        assert wd[name] == 0.0, name
    for name in ("blocks.0.mixer.qkv.weight", "blocks.1.mlp.fc1.weight", "patch_embed.proj.weight", "head.fc.weight"):
        assert wd[name] == 0.05, name
    assert all(g["lr"] == 1e-3 and g["lr_scale"] == 1.0 and g["params"] for g in groups)

    cnx = small_convnext()
    wd = _decay_of(param_groups(cnx, weight_decay=0.1, lr=1e-3, no_decay_names={"stem"}))
    assert wd["stages.0.blocks.0.ls.gamma"] == 0.0  # LayerScale
    assert wd["stages.0.blocks.0.mixer.conv.weight"] == 0.1  # depthwise conv kernel
    assert wd["stages.1.downsample.proj.weight"] == 0.1
    assert wd["stem.proj.weight"] == 0.0  # no_decay_names covers the whole module


def test_param_groups_layer_decay():
    groups = param_groups(small_vit(), weight_decay=0.05, lr=2e-3, layer_decay=0.5)
    assert all(g["params"] for g in groups)
    scales = {name: g["lr_scale"] for g in groups for name in g["names"]}
    assert scales["head.fc.weight"] == 1.0 and scales["norm.weight"] == 1.0
    assert scales["blocks.1.mixer.qkv.weight"] == 0.5
    assert scales["blocks.0.mixer.qkv.weight"] == 0.25
    assert scales["pos_embed.pos_embed"] == scales["patch_embed.proj.weight"] == 0.125
    assert all(g["lr"] == 2e-3 for g in groups)  # the scheduler applies lr_scale
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups(small_vit(), 0.05, 1e-3, layer_decay=1.5)


# -- optimizers ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["adamw", "sgd", "lamb", "adam"])
def test_optimizers_reduce_a_loss(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    lr = {"adamw": 0.01, "adam": 0.01, "sgd": 0.02, "lamb": 0.05}[name]  # LAMB's lr is relative to ||w||
    opt = build_optimizer(model, name, lr=lr, weight_decay=1e-4)
    first = None
    for _ in range(30):
        loss = nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert nn.functional.mse_loss(model(x), y).item() < 0.7 * first


def test_build_optimizer_kinds_and_unknown_name():
    model = small_vit()
    assert isinstance(build_optimizer(model, "adamw"), torch.optim.AdamW)
    sgd = build_optimizer(model, "SGD", momentum=0.9)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"]
    assert isinstance(build_optimizer(model, "lamb"), Lamb)
    with pytest.raises(ValueError, match="adamw.*sgd.*lamb.*adam"):
        build_optimizer(model, "adagrad")


def _lamb_reference(w, grads, lr, betas, eps, wd):
    """LAMB written out step by step, for a single tensor."""
    w = w.clone().double()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        r = (m / (1 - betas[0] ** t)) / (torch.sqrt(v / (1 - betas[1] ** t)) + eps) + wd * w
        w_norm, r_norm = w.norm().item(), r.norm().item()
        trust = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
        w = w - lr * trust * r
    return w


def test_lamb_matches_the_formula():
    lr, betas, eps, wd = 0.1, (0.9, 0.999), 1e-6, 0.1
    w0 = torch.tensor([3.0, 4.0])
    grads = [torch.tensor([0.1, -0.2]), torch.tensor([0.3, 0.05]), torch.tensor([-0.1, 0.4])]
    p = nn.Parameter(w0.clone())
    opt = Lamb([p], lr=lr, betas=betas, eps=eps, weight_decay=wd, max_grad_norm=None)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(p.detach().double(), _lamb_reference(w0, grads, lr, betas, eps, wd))

    # one step by hand: m_hat = g, v_hat = g^2, so r = g / (|g| + eps) + wd * w
    g = grads[0]
    r = g / (g.abs() + eps) + wd * w0
    expected = w0 - lr * (w0.norm() / r.norm()) * r
    p = nn.Parameter(w0.clone())
    opt = Lamb([p], lr=lr, betas=betas, eps=eps, weight_decay=wd, max_grad_norm=None)
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), expected)
    # the step length is lr * ||w||, whatever the gradient's scale
    torch.testing.assert_close((p.detach() - w0).norm(), torch.tensor(lr * 5.0))


def test_lamb_trust_ratio_is_one_for_zero_weights_and_clipping():
    p = nn.Parameter(torch.zeros(3))  # ||w|| = 0: trust ratio 1, plain Adam step of length lr per element
    opt = Lamb([p], lr=0.01, weight_decay=0.5, max_grad_norm=None)
    p.grad = torch.tensor([1.0, -2.0, 0.5])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.01, 0.01, -0.01]), atol=1e-7, rtol=1e-5)

    # global clipping: a gradient of norm 10 is scaled to norm 1 before the moments
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(1))
    opt = Lamb([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], max_grad_norm=1.0)
    a.grad, b.grad = torch.tensor([6.0, 0.0]), torch.tensor([8.0])
    opt.step()
    torch.testing.assert_close(opt.state[a]["exp_avg"], torch.tensor([0.06, 0.0]))
    torch.testing.assert_close(opt.state[b]["exp_avg"], torch.tensor([0.08]))

    # always_adapt=False: no trust ratio where weight_decay is 0 (the plain Adam step)
    p = nn.Parameter(torch.full((2,), 10.0))
    opt = Lamb([p], lr=0.01, weight_decay=0.0, max_grad_norm=None, always_adapt=False)
    p.grad = torch.tensor([1.0, -1.0])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([9.99, 10.01]))


def test_lamb_state_dict_roundtrip_weights_only():
    torch.manual_seed(0)
    model = small_vit()
    x = torch.randn(2, 3, 32, 32)

    def step(m, opt):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()

    opt = build_optimizer(model, "lamb", lr=1e-3, layer_decay=0.7)
    step(model, opt)
    sd = weights_only_roundtrip(opt.state_dict())
    clone = small_vit()
    clone.load_state_dict(model.state_dict())
    opt2 = build_optimizer(clone, "lamb", lr=1e-3, layer_decay=0.7)
    opt2.load_state_dict(sd)
    step(model, opt)
    step(clone, opt2)
    for (n, a), b in zip(model.named_parameters(), clone.parameters()):
        torch.testing.assert_close(a, b, msg=n)


# -- schedules ----------------------------------------------------------------------------------------------
def _two_group_optimizer(lr: float = 0.1) -> torch.optim.Optimizer:
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    return torch.optim.SGD([{"params": [a], "lr_scale": 1.0}, {"params": [b], "lr_scale": 0.5}], lr=lr)


def _lrs(sched, steps: int) -> list[list[float]]:
    out = [list(sched.get_last_lr())]
    for _ in range(steps):
        sched.optimizer.step()
        sched.step()
        out.append(list(sched.get_last_lr()))
    return out


def test_cosine_schedule_values():
    opt = _two_group_optimizer(0.1)
    sched = build_scheduler(opt, "cosine", total_steps=110, warmup_steps=10, warmup_lr=0.001, min_lr=0.01)
    lrs = _lrs(sched, 120)
    expect = {0: 0.001, 5: 0.001 + 0.099 * 0.5, 10: 0.1, 60: (0.1 + 0.01) / 2, 110: 0.01, 120: 0.01}
    for t, value in expect.items():
        assert lrs[t][0] == pytest.approx(value), t
        assert lrs[t][1] == pytest.approx(0.5 * value), t  # lr_scale applies to the whole schedule
    assert lrs[35][0] == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * 25 / 100)))
    assert max(l[0] for l in lrs) == pytest.approx(0.1)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.005)


def test_constant_and_step_schedules():
    lrs = _lrs(build_scheduler(_two_group_optimizer(0.1), "constant", warmup_steps=4, warmup_lr=0.0), 10)
    assert [l[0] for l in lrs[:5]] == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])
    assert lrs[10][0] == pytest.approx(0.1) and lrs[10][1] == pytest.approx(0.05)
    lrs = _lrs(build_scheduler(_two_group_optimizer(0.1), "step", step_milestones=[20, 40], gamma=0.1), 45)
    assert lrs[19][0] == pytest.approx(0.1) and lrs[20][0] == pytest.approx(0.01) and lrs[40][0] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="cosine.*constant.*step"):
        build_scheduler(_two_group_optimizer(), "linear", total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        build_scheduler(_two_group_optimizer(), "cosine")


def test_scheduler_state_roundtrip_continues_exactly():
    kw = dict(total_steps=50, warmup_steps=5, warmup_lr=1e-4, min_lr=1e-3)
    opt = _two_group_optimizer()
    sched = build_scheduler(opt, "cosine", **kw)
    _lrs(sched, 20)
    saved = weights_only_roundtrip({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    expected = _lrs(sched, 30)

    opt2 = _two_group_optimizer()
    sched2 = build_scheduler(opt2, "cosine", **kw)  # built before loading, as a trainer does
    opt2.load_state_dict(saved["optimizer"])
    sched2.load_state_dict(saved["scheduler"])
    assert _lrs(sched2, 30) == expected
    assert [g["lr"] for g in opt2.param_groups] == expected[-1]


# -- EMA -------------------------------------------------------------------------------------------------------
def _ema_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def _set_weights(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
        model[1].running_mean.fill_(value)
        model[1].num_batches_tracked.fill_(int(value * 10))


def test_ema_matches_hand_computed_average():
    model = _ema_model()
    ema = ModelEma(model, decay=0.75)
    values = [1.0, 2.0, 4.0, 0.5]
    expected = None
    for v in values:
        _set_weights(model, v)
        ema.update(model)
        expected = v if expected is None else 0.75 * expected + 0.25 * v  # the first update copies
    assert ema.updates == 4
    for p in ema.module.parameters():
        torch.testing.assert_close(p, torch.full_like(p, expected))
    torch.testing.assert_close(ema.module[1].running_mean, torch.full((2,), expected))  # buffers averaged
    assert ema.module[1].num_batches_tracked.item() == 5  # integer buffers copied
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


def test_ema_keeps_integer_buffers_exact():
    # Swin's relative_position_index: a float EMA written back into an integer tensor truncates
    from mixlab.models.swin import SwinTransformer
    model = SwinTransformer(img_size=32, embed_dim=8, depths=(2,), num_heads=(2,), window_size=4, num_classes=3)
    ema = ModelEma(model, decay=0.9999)
    for _ in range(3):
        ema.update(model)
    for (name, a), b in zip(ema.module.named_buffers(), model.buffers()):
        assert torch.equal(a, b), name


def test_ema_warmup_decay():
    model = _ema_model()
    ema = ModelEma(model, decay=0.9, warmup=True)
    assert ema.decay_at(1) == pytest.approx(2 / 11) and ema.decay_at(1000) == 0.9
    expected = None
    for n, v in enumerate([1.0, 3.0, -2.0, 5.0]):
        _set_weights(model, v)
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))
        expected = v if expected is None else d * expected + (1 - d) * v
    torch.testing.assert_close(ema.module[0].weight, torch.full((2, 3), expected))


def test_ema_unwraps_wrappers_and_checks_the_model():
    model = _ema_model()
    ema = ModelEma(Holder(model), decay=0.5)
    assert isinstance(ema.module, nn.Sequential)
    _set_weights(model, 1.0)
    ema.update(Holder(model))
    _set_weights(model, 3.0)
    ema.update(Holder(Holder(model)))
    torch.testing.assert_close(ema.module[0].bias, torch.full((2,), 2.0))
    assert unwrap_model(torch.compile(Holder(model))) is model
    with pytest.raises(ValueError, match="does not match"):
        ModelEma(model).update(nn.Linear(3, 2))


def test_ema_state_roundtrip():
    model = _ema_model()
    ema = ModelEma(model, decay=0.5)
    for v in (1.0, 2.0):
        _set_weights(model, v)
        ema.update(model)
    sd = weights_only_roundtrip(ema.state_dict())
    ema2 = ModelEma(_ema_model(), decay=0.5)
    ema2.load_state_dict(sd)
    assert ema2.updates == 2
    _set_weights(model, 4.0)
    ema.update(model)
    ema2.update(model)
    for a, b in zip(ema.module.state_dict().values(), ema2.module.state_dict().values()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ema2.module[0].weight, torch.full((2, 3), 0.5 * 1.5 + 0.5 * 4.0))


# -- checkpoints ---------------------------------------------------------------------------------------------
def test_save_load_weights_with_shared_and_strided_tensors(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    sd = {"a": base, "tied": base, "view": base[1], "t": base.t()}
    save_weights(sd, tmp_path / "w.safetensors", {"architecture": "x", "note": "ok"})
    loaded, meta = load_weights(tmp_path / "w.safetensors")
    assert meta == {"architecture": "x", "note": "ok"}
    for k, v in sd.items():
        torch.testing.assert_close(loaded[k], v)
    with pytest.raises(TypeError, match="'epoch'"):
        save_weights(sd, tmp_path / "w2.safetensors", {"epoch": 3})


def test_atomic_save_survives_a_crash(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_weights({"x": torch.ones(2)}, path)
    ckpt = CheckpointManager(tmp_path / "ckpt")
    first = ckpt.save({"x": torch.ones(2)}, {"n": 1}, epoch=0, step=1)

    def crash(src, dst):
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        save_weights({"x": torch.zeros(2)}, path)
    with pytest.raises(OSError, match="simulated"):
        save_state({"x": 2}, tmp_path / "s.pt")
    with pytest.raises(OSError, match="simulated"):
        ckpt.save({"x": torch.zeros(2)}, {"n": 2}, epoch=0, step=2)
    monkeypatch.undo()

    torch.testing.assert_close(load_weights(path)[0]["x"], torch.ones(2))  # the previous file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "w.safetensors"]  # no temporary files left
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.endswith(".tmp")]
    assert ckpt.latest() == first
    weights, state, _ = ckpt.load()
    assert state == {"n": 1} and weights["x"].tolist() == [1.0, 1.0]


def test_manager_rotation_best_and_latest(tmp_path):
    ckpt = CheckpointManager(tmp_path, keep_last=2, keep_best=True, mode="max")
    assert ckpt.latest() is None and ckpt.best_metric is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        ckpt.load()
    metrics = [0.5, 0.7, 0.6, None]
    for i, m in enumerate(metrics, start=1):
        ckpt.save({"w": torch.full((2,), float(i))}, {"i": i}, epoch=i, step=10 * i, metric=m)
    assert ckpt.complete_steps() == [30, 40]  # keep_last
    assert ckpt.latest() == tmp_path / "ckpt-00000040"
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 40
    assert ckpt.best_metric == 0.7
    best = json.loads((tmp_path / "best.json").read_text())
    assert (best["metric"], best["epoch"], best["step"]) == (0.7, 2, 20)
    torch.testing.assert_close(load_weights(tmp_path / "best.safetensors")[0]["w"], torch.full((2,), 2.0))
    assert CheckpointManager(tmp_path).best_metric == 0.7  # survives a restart

    low = CheckpointManager(tmp_path / "min", keep_last=1, mode="min")
    for step, m in ((1, 3.0), (2, 1.0), (3, 2.0)):
        low.save({"w": torch.full((1,), float(step))}, {}, epoch=0, step=step, metric=m)
    assert low.best_metric == 1.0 and low.complete_steps() == [3]
    torch.testing.assert_close(load_weights(tmp_path / "min" / "best.safetensors")[0]["w"], torch.full((1,), 2.0))


def test_latest_ignores_partial_checkpoints(tmp_path):
    ckpt = CheckpointManager(tmp_path, keep_last=3)
    ckpt.save({"w": torch.ones(1)}, {}, epoch=0, step=1)
    ckpt.save({"w": torch.ones(1)}, {}, epoch=0, step=2)
    (tmp_path / "ckpt-00000002.state.pt").unlink()  # interrupted before the state was written
    save_weights({"w": torch.ones(1)}, tmp_path / "ckpt-00000005.safetensors")
    assert ckpt.latest() == tmp_path / "ckpt-00000001"
    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt.load("ckpt-00000002")
    ckpt.save({"w": torch.ones(1)}, {}, epoch=0, step=3)  # cleans the older partial one
    assert not (tmp_path / "ckpt-00000002.safetensors").exists()
    assert ckpt.latest() == tmp_path / "ckpt-00000003"


def test_manager_load_returns_what_was_saved(tmp_path):
    model = small_vit()
    opt = build_optimizer(model, "adamw")
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    sched = build_scheduler(opt, "cosine", total_steps=10)
    train_state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": 3, "rng": rng_state()}
    ckpt = CheckpointManager(tmp_path)
    stem = ckpt.save(model.state_dict(), train_state, epoch=3, step=7, metric=12.5,
                     metadata={"architecture": "tiny_vit"})
    assert stem.name == "ckpt-00000007"
    for path in (None, stem, "ckpt-00000007", stem.with_name(stem.name + ".safetensors")):
        weights, state, meta = ckpt.load(path)
        assert weights.keys() == model.state_dict().keys()
        for k, v in model.state_dict().items():
            torch.testing.assert_close(weights[k], v)
        assert state["epoch"] == 3 and state["scheduler"] == sched.state_dict()
        torch.testing.assert_close(state["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
        assert meta["architecture"] == "tiny_vit" and meta["epoch"] == "3" and meta["step"] == "7"
        assert float(meta["metric"]) == 12.5


def test_save_state_rejects_unloadable_values(tmp_path):
    ok = {"t": torch.ones(2), "p": nn.Parameter(torch.ones(1)), "nested": [1, 2.5, None, "s", (True, 3 + 1j)],
          "set": {1, 2}, "bytes": b"x", "size": torch.Size([2, 3]), "dtype": torch.float16,
          "device": torch.device("cpu"), "od": collections.OrderedDict(a=1)}
    save_state(ok, tmp_path / "ok.pt")
    back = load_state(tmp_path / "ok.pt")
    assert back["nested"] == ok["nested"] and back["size"] == ok["size"] and back["od"] == ok["od"]
    with pytest.raises(TypeError, match=r"\['sched'\]\['fn'\].*function"):
        save_state({"a": 1, "sched": {"fn": lambda step: step}}, tmp_path / "bad.pt")
    with pytest.raises(TypeError, match=r"\['arr'\].*numpy"):
        save_state({"arr": np.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(TypeError, match=r"\['loss'\]\[0\].*float64"):
        save_state({"loss": [np.float64(1.0)]}, tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()
    with pytest.raises(TypeError, match="train_state"):
        CheckpointManager(tmp_path / "c").save({"w": torch.ones(1)}, {"f": print}, epoch=0, step=0)
    assert CheckpointManager(tmp_path / "c").latest() is None and not list((tmp_path / "c").glob("ckpt-*"))


def test_rng_state_roundtrip():
    state = weights_only_roundtrip(rng_state())

    def draw():
        return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(3).tolist(),
                torch.rand(3).tolist(), torch.randint(0, 1000, (4,)).tolist())

    first = draw()
    set_rng_state(state)
    assert draw() == first


def _vit_with_arch(num_classes=5, arch="tiny_vit"):
    model = small_vit(num_classes)
    model.pretrained_cfg["architecture"] = arch
    return model


def test_check_compatible():
    model = _vit_with_arch()
    sd = model.state_dict()
    check_compatible(model, sd, {"architecture": "tiny_vit"})
    check_compatible(Holder(model), sd)

    with pytest.raises(CheckpointError, match="'other_vit'.*'tiny_vit'"):
        check_compatible(model, sd, {"architecture": "other_vit"})

    missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc1.weight"}
    listed = r"key\(s\) \(in the {}, not in the {}\):\n\s+{}$"  # the fit report's listing: one name a line
    fc1 = r"blocks\.1\.mlp\.fc1\.weight"
    with pytest.raises(CheckpointError, match="(?m)1 missing " + listed.format("model", "checkpoint", fc1)):
        check_compatible(model, missing)
    extra = r"extra\.weight"
    with pytest.raises(CheckpointError, match="(?m)1 unexpected " + listed.format("checkpoint", "model", extra)):
        check_compatible(model, {**sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"more"):  # long lists are cut, with a count
        check_compatible(model, {"module." + k: v for k, v in sd.items()})

    other = _vit_with_arch(num_classes=10).state_dict()
    with pytest.raises(CheckpointError) as err:
        check_compatible(model, other)
    msg = str(err.value)
    assert "head.fc.weight" in msg and "10 classes" in msg and "the model 5" in msg
