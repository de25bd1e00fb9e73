"""Tests of the architectures (one small configuration per family, built with the classes
directly) and of the registry."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mixlab
from mixlab.models.base import FeatureExtractor
from mixlab.models.container import Container
from mixlab.models.convnext import ConvNeXt
from mixlab.models.mlp_mixer import MlpMixer
from mixlab.models.poolformer import PoolFormer
from mixlab.models.resnet import ResNet
from mixlab.models.swin import SwinTransformer
from mixlab.models.vit import VisionTransformer

IMG = 64
NUM_CLASSES = 10
_CONTAINER = dict(img_size=IMG, dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=2)

# id -> factory(**overrides); every configuration stays well under 1M parameters
CONFIGS = {
    "vit": lambda **kw: VisionTransformer(**{**dict(img_size=IMG, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                                                    num_classes=NUM_CLASSES), **kw}),
    "deit-distilled": lambda **kw: VisionTransformer(**{**dict(img_size=IMG, patch_size=8, embed_dim=64, depth=2,
                                                               num_heads=2, num_classes=NUM_CLASSES, distilled=True),
                                                        **kw}),
    # depths of 2 so that every stage has a regular and a shifted-window block
    "swin": lambda **kw: SwinTransformer(**{**dict(img_size=IMG, patch_size=4, embed_dim=16, depths=(2, 2, 2, 2),
                                                   num_heads=(1, 2, 2, 4), window_size=4, num_classes=NUM_CLASSES),
                                            **kw}),
    "convnext": lambda **kw: ConvNeXt(**{**dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64),
                                                num_classes=NUM_CLASSES), **kw}),
    "mixer": lambda **kw: MlpMixer(**{**dict(img_size=IMG, patch_size=8, embed_dim=64, depth=2,
                                             num_classes=NUM_CLASSES), **kw}),
    "poolformer": lambda **kw: PoolFormer(**{**dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64),
                                                    num_classes=NUM_CLASSES), **kw}),
    "resnet": lambda **kw: ResNet(**{**dict(depths=(1, 1, 1, 1), widths=(8, 16, 24, 32), stem_width=8,
                                            num_classes=NUM_CLASSES), **kw}),
    "container": lambda **kw: Container(**{**_CONTAINER, "stage_types": ("mixed",) * 4,
                                           "num_classes": NUM_CLASSES, **kw}),
    "container-light": lambda **kw: Container(**{**_CONTAINER, "stage_types": ("conv",) * 3 + ("mixed",),
                                                 "num_classes": NUM_CLASSES, **kw}),
    "container-pam": lambda **kw: Container(**{**_CONTAINER, "stage_types": ("mixed-dense",) * 4, "mix": "free",
                                               "num_classes": NUM_CLASSES, **kw}),
    "container-attention": lambda **kw: Container(**{**_CONTAINER, "stage_types": ("attention",) * 4,
                                                     "num_classes": NUM_CLASSES, **kw}),
}
NAMES = list(CONFIGS)
TOKEN_MODELS = ("vit", "deit-distilled")  # forward_features returns (B, P+N, C)


def build(name, seed=0, **kw):
    torch.manual_seed(seed)
    return CONFIGS[name](**kw)


def image(*size, chans=3, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    if len(size) == 1:
        size = (size[0], size[0])
    return torch.randn(batch, chans, *size, generator=g)


def check_backward(model, x, num_classes=NUM_CLASSES):
    """Forward in train mode, cross-entropy backward; every parameter gets a finite gradient."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x)
    assert out.shape == (x.shape[0], num_classes)
    assert torch.isfinite(out).all()
    loss = F.cross_entropy(out, torch.arange(x.shape[0]) % num_classes)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"parameters with non-finite gradients: {bad}"


# --------------------------------------------------------------------------------------------
# Per-family API
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_size_budget(name):
    n = sum(p.numel() for p in build(name).parameters())
    assert n < 1_000_000, f"{name} test configuration has {n} parameters"


@pytest.mark.parametrize("name", NAMES)
def test_forward_and_backward(name):
    model = build(name)
    x = image(IMG)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()
    check_backward(model, x)


@pytest.mark.parametrize("name", NAMES)
def test_single_channel_input(name):
    model = build(name, in_chans=1).eval()
    with torch.no_grad():
        out = model(image(IMG, chans=1))
    assert out.shape == (2, NUM_CLASSES)
    assert model.pretrained_cfg["input_size"][0] == 1
    assert len(model.pretrained_cfg["mean"]) == 1


@pytest.mark.parametrize("name", NAMES)
def test_forward_features_and_head(name):
    model = build(name).eval()
    x = image(IMG)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        logits = model.forward_head(feats)
        full = model(x)
    assert feats.shape[0] == 2 and feats.shape[-1] == model.num_features
    if name in TOKEN_MODELS:
        grid = (IMG // 8) ** 2
        assert feats.shape == (2, model.num_prefix_tokens + grid, model.num_features)
    else:
        assert feats.ndim == 4
        last = model.feature_info[-1]["reduction"]
        assert abs(feats.shape[1] - IMG / last) < 1 and abs(feats.shape[2] - IMG / last) < 1
    assert pre.shape == (2, model.num_features)
    torch.testing.assert_close(logits, full)


@pytest.mark.parametrize("name", NAMES)
def test_reset_classifier(name):
    model = build(name).eval()
    x = image(IMG)
    model.reset_classifier(5)
    assert model.num_classes == 5
    with torch.no_grad():
        assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    assert model.num_classes == 0
    with torch.no_grad():
        out = model(x)
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
    assert out.shape == (2, model.num_features)
    torch.testing.assert_close(out, pre)
    assert isinstance(model.get_classifier(), torch.nn.Identity)


@pytest.mark.parametrize("name", NAMES)
def test_feature_info_matches_intermediates(name):
    model = build(name).eval()
    with torch.no_grad():
        feats = model.forward_intermediates(image(IMG))
    n_levels = len(model.feature_info)
    assert len(feats) == n_levels
    if hasattr(model, "stages"):
        assert n_levels == len(model.stages)
    else:
        assert n_levels == len(model.blocks)
    for f, info in zip(feats, model.feature_info):
        assert f.ndim == 4 and f.shape[:2] == (2, info["num_chs"])  # NCHW
        for side in f.shape[2:]:
            assert abs(side - IMG / info["reduction"]) < 1, (f.shape, info)
    # a subset, with negative indices
    with torch.no_grad():
        last = model.forward_intermediates(image(IMG), indices=[-1])
    assert len(last) == 1 and last[0].shape == feats[-1].shape
    torch.testing.assert_close(last[0], feats[-1])
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(image(IMG), indices=[len(model.feature_info)])


@pytest.mark.parametrize("name", NAMES)
def test_feature_extractor(name):
    model = build(name).eval()
    fx = FeatureExtractor(model).eval()
    with torch.no_grad():
        feats = fx(image(IMG))
    assert isinstance(feats, list) and len(feats) == len(model.feature_info)
    assert [f.shape[1] for f in feats] == fx.channels()
    assert fx.reductions() == [i["reduction"] for i in model.feature_info]
    for f, r in zip(feats, fx.reductions()):
        assert f.ndim == 4 and all(abs(s - IMG / r) < 1 for s in f.shape[2:])
    # a chosen subset (distinct, increasing indices)
    n = len(model.feature_info)
    subset = (0, -1) if n > 1 else (-1,)
    fx2 = FeatureExtractor(build(name), out_indices=subset).eval()
    with torch.no_grad():
        feats2 = fx2(image(IMG))
    assert len(feats2) == len(subset) and [f.shape[1] for f in feats2] == fx2.channels()


def test_feature_extractor_unsorted_out_indices():
    fx = FeatureExtractor(build("convnext"), out_indices=(3, 1)).eval()
    assert fx.channels() == [64, 32]
    with torch.no_grad():
        feats = fx(image(IMG))
    assert [f.shape[1] for f in feats] == fx.channels()


def test_feature_extractor_duplicate_out_indices():
    fx = FeatureExtractor(build("mixer"), out_indices=(0, -1)).eval()
    with torch.no_grad():
        feats = fx(image(IMG))
    assert len(feats) == len(fx.feature_info) == 2


def test_create_model_features_only():
    fx = mixlab.create_model("convnext_tiny", features_only=True, out_indices=(1, 3),
                             depths=(1, 1, 1, 1), dims=(16, 32, 48, 64))
    assert isinstance(fx, FeatureExtractor)
    with torch.no_grad():
        feats = fx.eval()(image(IMG))
    assert [tuple(f.shape) for f in feats] == [(2, 32, 8, 8), (2, 64, 2, 2)]


# --------------------------------------------------------------------------------------------
# Input sizes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, size", [
    ("convnext", (68, 76)),
    ("poolformer", (67, 75)),
    ("resnet", (67, 75)),
    ("swin", (68, 76)),  # 17x19 patches: odd, padded windows and padded patch merging
    ("swin", (68, 68)),
    ("vit", (80, 72)),  # built for 64: the position embedding is resampled
    ("deit-distilled", (80, 80)),
    ("container", (72, 80)),
    ("container-light", (72, 72)),
    ("container-attention", (72, 72)),
], ids=lambda v: v if isinstance(v, str) else "x".join(map(str, v)))
def test_other_input_sizes(name, size):
    model = build(name)
    x = image(*size)
    check_backward(model, x)
    model.eval()
    with torch.no_grad():
        feats = model.forward_intermediates(x)
    for f, info in zip(feats, model.feature_info):
        assert f.shape[1] == info["num_chs"]
        for side, s in zip(f.shape[2:], size):
            assert abs(side - s / info["reduction"]) < 1, (f.shape, info, size)


@pytest.mark.parametrize("name, size", [("mixer", 72), ("container-pam", 72), ("mixer", 56), ("container-pam", 96)])
def test_fixed_token_count_models_reject_other_sizes(name, size):
    model = build(name).eval()
    with pytest.raises(ValueError, match="img_size"):
        model(image(size))


def test_fixed_token_count_models_at_their_built_size():
    for name in ("mixer", "container-pam"):
        model = build(name, img_size=96).eval()
        with torch.no_grad():
            assert model(image(96)).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("name, size", [("vit", 60), ("vit", (64, 68)), ("swin", 66), ("mixer", 60),
                                        ("deit-distilled", 70)],
                         ids=["vit-60", "vit-64x68", "swin-66", "mixer-60", "deit-70"])
def test_size_not_divisible_by_patch(name, size):
    model = build(name).eval()
    x = image(*size) if isinstance(size, tuple) else image(size)
    with pytest.raises(ValueError, match="patch size"):
        model(x)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_channel_count(name):
    model = build(name).eval()
    with pytest.raises(ValueError, match="in_chans"):
        model(image(IMG, chans=4))
    with pytest.raises(ValueError, match="in_chans"):
        model.forward_intermediates(image(IMG, chans=1))


@pytest.mark.parametrize("name, size", [
    ("convnext", 16), ("poolformer", 16), ("resnet", 16), ("container", 16), ("container-light", 16),
    ("vit", 4), ("swin", 2), ("mixer", 4),
])
def test_too_small_input(name, size):
    model = build(name).eval()
    with pytest.raises(ValueError, match="smaller"):
        model(image(size))


def test_bad_rank_input():
    model = build("convnext").eval()
    with pytest.raises(ValueError, match="B, C, H, W"):
        model(torch.randn(3, IMG, IMG))


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", mixlab.list_models())
def test_every_registered_model_builds_on_meta(name):
    with torch.device("meta"):
        model = mixlab.create_model(name)
    assert model.pretrained_cfg["architecture"] == name
    assert model.num_classes == (10 if name.startswith("nano_") else 1000)  # the nano family: CIFAR-10's head
    assert all(p.is_meta for p in model.parameters())
    assert mixlab.is_model(name)


def test_create_model_swin_tiny_runs_on_cpu():
    torch.manual_seed(0)
    model = mixlab.create_model("swin_tiny_patch4_window7_224", num_classes=10, drop_path_rate=0.1, img_size=64)
    model.eval()
    with torch.no_grad():
        out = model(image(64, batch=1))
    assert out.shape == (1, 10)
    assert torch.isfinite(out).all()


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(KeyError) as exc:
        mixlab.create_model("swin_tiny_patch4_window7")
    assert isinstance(exc.value, ValueError)
    msg = str(exc.value)
    assert "swin_tiny_patch4_window7_224" in msg
    assert "swin_tiny_patch4_window7" in msg
    assert not mixlab.is_model("swin_tiny_patch4_window7")


def test_unknown_keyword_suggests_the_right_one():
    with pytest.raises(TypeError, match="num_classes") as exc:
        mixlab.create_model("convnext_tiny", num_clases=10)
    assert "num_clases" in str(exc.value)


def test_pretrained_without_default_weights():
    with pytest.raises(ValueError, match="no default pretrained weights"):
        mixlab.create_model("nano_resnet", pretrained=True)


def test_list_models_patterns():
    assert mixlab.list_models("convnext*") == ["convnext_base", "convnext_small", "convnext_tiny"]
    assert mixlab.list_models("CONVNEXT*") == ["convnext_base", "convnext_small", "convnext_tiny"]
    assert set(mixlab.list_models("distilled")) == {"deit_tiny_distilled_patch16_224",
                                                    "deit_small_distilled_patch16_224",
                                                    "deit_base_distilled_patch16_224"}
    everything = mixlab.list_models()
    assert everything == sorted(everything) and len(everything) == len(set(everything))
    assert set(mixlab.list_models(family="swin")) == {n for n in everything if n.startswith("swin")}
    assert mixlab.model_family("resnet50") == "resnet"


def test_deit_distilled_heads():
    torch.manual_seed(0)
    model = mixlab.create_model("deit_tiny_distilled_patch16_224", img_size=64, patch_size=8, embed_dim=64, depth=2,
                                num_heads=2, num_classes=10)
    x = image(64)
    model.train()
    model.distilled_training = True
    out = model(x)
    assert isinstance(out, tuple) and len(out) == 2
    assert all(o.shape == (2, 10) for o in out)
    assert not torch.equal(out[0], out[1])

    model.eval()
    with torch.no_grad():
        y = model(x)
        feats = model.forward_features(x)
        cls_logits = model.head.fc(feats[:, 0])
        dist_logits = model.head_dist(feats[:, 1])
    assert isinstance(y, torch.Tensor) and y.shape == (2, 10)
    torch.testing.assert_close(y, (cls_logits + dist_logits) / 2)

    model.train()
    model.distilled_training = False
    assert isinstance(model(x), torch.Tensor)


# --------------------------------------------------------------------------------------------
# Stochastic depth
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, kw", [
    ("vit", dict(depth=4)),
    ("swin", {}),
    ("convnext", dict(depths=(2, 2, 2, 2), layer_scale=1.0)),
    ("container", {}),
], ids=["vit", "swin", "convnext", "container"])
def test_drop_path(name, kw):
    model = build(name, drop_path_rate=0.5, **kw)
    x = image(IMG, batch=8)
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert not torch.equal(a, b), "drop path had no effect in train mode"
    model.eval()
    with torch.no_grad():
        c, d = model(x), model(x)
    torch.testing.assert_close(c, d, atol=0, rtol=0)


def test_drop_path_rate_validation():
    with pytest.raises(ValueError):
        build("vit", drop_path_rate=1.0, depth=2)


def test_forward_intermediates_rejects_empty_indices():
    with pytest.raises(ValueError, match="no feature indices"):
        build("convnext").forward_intermediates(image(IMG), [])
