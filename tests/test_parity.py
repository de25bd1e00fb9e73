"""Numerical parity with timm: a timm model with random weights, its state dict converted by
``mixlab.weights.convert_state_dict`` into the mixlab model of the same name (built with
``architecture_kwargs``), gives the same eval-mode logits.

Every parameter is randomised (norm affines away from 1/0, BatchNorm statistics, layer
scales, tokens, position embeddings and bias tables at O(0.1-1)), so that no branch is
hidden behind timm's identity-like initialisation (zero-initialised last BatchNorm, layer
scales of 1e-6, a zero MLP-Mixer classifier). Each family is checked at 224 and at one
other input size; the smallest timm variant of each family keeps this file fast.
"""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")

import mixlab  # noqa: E402
from mixlab.weights import architecture_kwargs, convert_state_dict  # noqa: E402

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Random weights everywhere (in place): linear/conv weights N(0, 1/fan_in), biases
    N(0, 0.1), norm scales N(1, 0.2) and shifts N(0, 0.1), BatchNorm running mean N(0, 0.2)
    and variance U(0.5, 2), every other parameter (layer scales, class/distillation tokens,
    position embeddings, relative position bias tables) N(0, 0.3)."""
    g = torch.Generator().manual_seed(seed)
    done = set()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                mod.weight.normal_(0, mod.weight[0].numel() ** -0.5, generator=g)
                if mod.bias is not None:
                    mod.bias.normal_(0, 0.1, generator=g)
            elif isinstance(mod, _NORMS):
                if mod.weight is not None:
                    mod.weight.normal_(1, 0.2, generator=g)
                    mod.bias.normal_(0, 0.1, generator=g)
                if getattr(mod, "running_mean", None) is not None:
                    mod.running_mean.normal_(0, 0.2, generator=g)
                    mod.running_var.uniform_(0.5, 2.0, generator=g)
            else:
                continue
            done.update(id(p) for p in mod.parameters(recurse=False))
        for p in model.parameters():
            if id(p) not in done:
                p.normal_(0, 0.3, generator=g)
    return model


@pytest.fixture(autouse=True)
def _fast_init(monkeypatch):
    """Both libraries' truncated-normal initialisation is the slowest part of building a
    model on the CPU, and every initialised value is overwritten here (timm's by
    ``randomize_``, mixlab's by the strict load): make it a plain normal draw."""
    def normal_(tensor, mean, std, *bounds, generator=None, **_):
        with torch.no_grad():
            return tensor.normal_(mean, std, generator=generator)

    import timm.layers.weight_init as timm_init
    monkeypatch.setattr(torch.nn.init, "_no_grad_trunc_normal_", normal_, raising=False)
    monkeypatch.setattr(timm_init, "_trunc_normal_", normal_, raising=False)


@lru_cache(maxsize=2)
def timm_model(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """timm's ``name`` with random weights, in eval mode (cached: tests only read it)."""
    torch.manual_seed(seed)
    return randomize_(timm.create_model(name, pretrained=False, **kwargs), seed).eval()


def mixlab_from(name: str, source: nn.Module, **kwargs) -> nn.Module:
    """The mixlab model ``name`` carrying ``source``'s (timm) weights, loaded strictly."""
    sd = source.state_dict()
    model = mixlab.create_model(name, **{**architecture_kwargs(name, sd), **kwargs}).eval()
    model.load_state_dict(convert_state_dict(sd, model), strict=True)
    return model


def assert_same_logits(ours: nn.Module, theirs: nn.Module, size: int, seed: int = 1) -> None:
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert a.shape == b.shape == (1, 1000)
    scale = max(1.0, b.abs().max().item())
    err = (a - b).abs().max().item()
    assert err <= 1e-4 * scale, f"max |Δ| = {err:.3g} (logits up to {scale:.3g}) at {size}x{size}"
    assert b.std() > 1e-2 * scale  # the logits are not a constant: the check is not vacuous


# CNNs take another input size with the same weights
@pytest.mark.parametrize("name", ["resnet50", "convnext_tiny", "poolformer_s12"])
def test_cnn_parity(name):
    theirs = timm_model(name)
    ours = mixlab_from(name, theirs)
    assert_same_logits(ours, theirs, 224)
    assert_same_logits(ours, theirs, 128, seed=2)


def test_poolformer_needs_timms_head_variant():
    """timm's PoolFormer pools before its final norm: without ``head_norm='pooled'`` the
    converted weights load (same names and shapes) but give other logits."""
    theirs = timm_model("poolformer_s12")
    assert architecture_kwargs("poolformer_s12", theirs.state_dict()) == {"head_norm": "pooled"}
    with pytest.warns(UserWarning, match="head_norm='pooled'"):  # ... and the loader says so
        authors_variant = mixlab_from("poolformer_s12", theirs, head_norm="group")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = authors_variant(x), theirs(x)
    assert (a - b).abs().max() > 1e-2 * max(1.0, b.abs().max().item())


def test_vit_parity_and_position_embedding_resampling():
    theirs = timm_model("vit_tiny_patch16_224")
    ours = mixlab_from("vit_tiny_patch16_224", theirs)
    assert_same_logits(ours, theirs, 224)
    # another size: the 224 checkpoint converted into a model built for 160 (position
    # embedding resampled by the converter) == timm built for 160 given the same weights,
    # its embedding resampled by timm's own function
    from timm.layers import resample_abs_pos_embed as timm_resample
    sd = theirs.state_dict()
    sd160 = dict(sd, pos_embed=timm_resample(sd["pos_embed"], (10, 10), num_prefix_tokens=1))
    timm160 = timm.create_model("vit_tiny_patch16_224", img_size=160).eval()
    timm160.load_state_dict(sd160)
    ours160 = mixlab.create_model("vit_tiny_patch16_224", img_size=160).eval()
    ours160.load_state_dict(convert_state_dict(sd, ours160), strict=True)
    assert ours160.pos_embed.pos_embed.shape == (1, 101, 192)
    assert_same_logits(ours160, timm160, 160)


def test_deit_distilled_parity():
    theirs = timm_model("deit_tiny_distilled_patch16_224")
    ours = mixlab_from("deit_tiny_distilled_patch16_224", theirs)
    assert_same_logits(ours, theirs, 224)
    assert torch.equal(ours.head_dist.weight, theirs.head_dist.weight)
    assert torch.equal(ours.dist_token, theirs.dist_token)


def test_swin_parity():
    theirs = timm_model("swin_tiny_patch4_window7_224")
    ours = mixlab_from("swin_tiny_patch4_window7_224", theirs)
    assert_same_logits(ours, theirs, 224)
    # 128 with 4x4 windows: every stage's map (32, 16, 8, 4) a window multiple, shifted
    # windows masked in the first three stages
    theirs128 = timm_model("swin_tiny_patch4_window7_224", seed=4, img_size=128, window_size=4)
    assert architecture_kwargs("swin_tiny_patch4_window7_224", theirs128.state_dict()) == {"window_size": 4}
    ours128 = mixlab_from("swin_tiny_patch4_window7_224", theirs128, img_size=128)
    assert_same_logits(ours128, theirs128, 128)


def test_mixer_parity():
    theirs = timm_model("mixer_s16_224")
    ours = mixlab_from("mixer_s16_224", theirs)
    assert_same_logits(ours, theirs, 224)
    theirs128 = timm_model("mixer_s16_224", seed=5, img_size=128)
    assert architecture_kwargs("mixer_s16_224", theirs128.state_dict()) == {"img_size": 128}
    assert_same_logits(mixlab_from("mixer_s16_224", theirs128), theirs128, 128)
