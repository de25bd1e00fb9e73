"""Checkpoint conversion (mixlab.weights.convert): the authors' original layouts, format
detection, resampling of position embeddings and relative position bias tables, and
what the converter must leave alone (the classifier, keys without a counterpart).

The authors' layouts are built here by renaming a random mixlab state dict with inverse
maps written from the authors' repositories (microsoft/Swin-Transformer,
facebookresearch/ConvNeXt, sail-sg/poolformer, allenai/container), independently of the
converter: converting them back must give the original tensors exactly.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import mixlab
from mixlab.layers import resample_abs_pos_embed
from mixlab.weights import architecture_kwargs, convert_state_dict, detect_format


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def meta_model(name: str, **kwargs):
    with torch.device("meta"):
        return mixlab.create_model(name, **kwargs)


def random_state_dict(model, seed: int = 0) -> dict:
    """Random tensors with the model's keys and shapes (norm weights and BatchNorm
    statistics too, so that swapping two of them is detected)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if v.dtype.is_floating_point:
            out[k] = torch.randn(v.shape, generator=g)
            if k.endswith("running_var"):
                out[k] = out[k].abs() + 0.5
        else:
            out[k] = torch.randint(0, 100, v.shape, generator=g, dtype=v.dtype)
    return out


def rename(sd: dict, rules) -> dict:
    """Apply the first matching (pattern, replacement[, tensor transform]) rule to each key."""
    out = {}
    for k, v in sd.items():
        for rule in rules:
            pat, rep = rule[0], rule[1]
            m = re.match(pat, k)
            if m:
                out[rep(m) if callable(rep) else m.expand(rep)] = rule[2](v) if len(rule) > 2 else v
                break
        else:
            raise AssertionError(f"test map has no rule for {k}")
    return out


def to_conv1x1(w: torch.Tensor) -> torch.Tensor:
    return w[:, :, None, None] if w.ndim == 2 else w


def assert_converts_back(source: dict, model, reference: dict) -> None:
    out = convert_state_dict(source, model)
    assert set(out) == set(reference), (sorted(set(out) - set(reference))[:5], sorted(set(reference) - set(out))[:5])
    for k, v in reference.items():
        assert out[k].shape == v.shape, k
        assert torch.equal(out[k], v), k
    load_strict(model, out)


def load_strict(model, sd: dict) -> None:
    """``load_state_dict(strict=True)``: every key present, every shape right (on the meta
    device the tensors are assigned, copying into meta tensors would be a no-op)."""
    model.load_state_dict(sd, strict=True, assign=next(model.parameters()).is_meta)


def timm_state_dict(name: str, **kwargs) -> dict:
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=g) if v.dtype.is_floating_point else torch.zeros(v.shape, dtype=v.dtype)
            for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------
# the authors' layouts (inverse maps: mixlab name -> the authors' name)
# ---------------------------------------------------------------------------------------
SWIN_TO_AUTHORS = [
    (r"^stem\.(.+)$", r"patch_embed.\1"),
    # the authors merge patches at the END of stage i; mixlab at the start of stage i + 1
    (r"^stages\.(\d+)\.downsample\.(.+)$", lambda m: f"layers.{int(m[1]) - 1}.downsample.{m[2]}"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mixer\.(.+)$", r"layers.\1.blocks.\2.attn.\3"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$", r"layers.\1.blocks.\2.\3"),
    (r"^norm\.(.+)$", r"norm.\1"),
    (r"^head\.fc\.(.+)$", r"head.\1"),
]

CONVNEXT_TO_AUTHORS = [
    (r"^stem\.proj\.(.+)$", r"downsample_layers.0.0.\1"),
    (r"^stem\.norm\.(.+)$", r"downsample_layers.0.1.\1"),
    (r"^stages\.(\d+)\.downsample\.pre_norm\.(.+)$", r"downsample_layers.\1.0.\2"),
    (r"^stages\.(\d+)\.downsample\.proj\.(.+)$", r"downsample_layers.\1.1.\2"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mixer\.conv\.(.+)$", r"stages.\1.\2.dwconv.\3"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.norm\.(.+)$", r"stages.\1.\2.norm.\3"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.(.+)$", r"stages.\1.\2.pwconv1.\3"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.(.+)$", r"stages.\1.\2.pwconv2.\3"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.ls\.gamma$", r"stages.\1.\2.gamma"),
    (r"^head\.norm\.(.+)$", r"norm.\1"),
    (r"^head\.fc\.(.+)$", r"head.\1"),
]

# sail-sg/poolformer: network = [stage 0, downsample, stage 1, downsample, stage 2, ...],
# the MLP as 1x1 convolutions, layer scales as bare parameters
POOLFORMER_TO_AUTHORS = [
    (r"^stem\.proj\.(.+)$", r"patch_embed.proj.\1"),
    (r"^stages\.(\d+)\.downsample\.proj\.(.+)$", lambda m: f"network.{2 * int(m[1]) - 1}.proj.{m[2]}"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.ls([12])\.gamma$",
     lambda m: f"network.{2 * int(m[1])}.{m[2]}.layer_scale_{m[3]}"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.(mlp\.fc[12]\.weight)$", lambda m: f"network.{2 * int(m[1])}.{m[2]}.{m[3]}",
     to_conv1x1),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$", lambda m: f"network.{2 * int(m[1])}.{m[2]}.{m[3]}"),
    (r"^norm\.(.+)$", r"norm.\1"),
    (r"^head\.fc\.(.+)$", r"head.\1"),
]


def container_to_authors(sd: dict) -> dict:
    """allenai/container: patch_embed1..4 (conv + LayerNorm), blocks1..4 of CBlock (static:
    conv1 1x1, `attn` = depthwise 5x5, conv2 1x1) or MixBlock (conv1 1x1 to 3C, `conv` =
    depthwise 5x5 on V, sa_weight, conv2), each with pos_embed, BatchNorm norm1/norm2 and a
    1x1-conv MLP; final BatchNorm `norm`, `head`."""
    mixed = {m[1] + "." + m[2] for k in sd if (m := re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.mixer\.sa_weight$", k))}

    def dwconv(m):
        kind = "conv" if f"{m[1]}.{m[2]}" in mixed else "attn"
        return f"blocks{int(m[1]) + 1}.{m[2]}.{kind}.{m[3]}"

    return rename(sd, [
        (r"^stem\.(proj|norm)\.(.+)$", r"patch_embed1.\1.\2"),
        (r"^stages\.(\d+)\.downsample\.proj\.(.+)$", lambda m: f"patch_embed{int(m[1]) + 1}.proj.{m[2]}"),
        (r"^stages\.(\d+)\.downsample\.post_norm\.(.+)$", lambda m: f"patch_embed{int(m[1]) + 1}.norm.{m[2]}"),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.pos\.proj\.(.+)$",
         lambda m: f"blocks{int(m[1]) + 1}.{m[2]}.pos_embed.{m[3]}"),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.mixer\.qkv\.(.+)$", lambda m: f"blocks{int(m[1]) + 1}.{m[2]}.conv1.{m[3]}",
         to_conv1x1),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.mixer\.proj\.(.+)$", lambda m: f"blocks{int(m[1]) + 1}.{m[2]}.conv2.{m[3]}",
         to_conv1x1),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.mixer\.conv\.(.+)$", dwconv),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.mixer\.sa_weight$", lambda m: f"blocks{int(m[1]) + 1}.{m[2]}.sa_weight"),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.(mlp\.fc[12]\.weight)$", lambda m: f"blocks{int(m[1]) + 1}.{m[2]}.{m[3]}",
         to_conv1x1),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$", lambda m: f"blocks{int(m[1]) + 1}.{m[2]}.{m[3]}"),
        (r"^norm\.(.+)$", r"norm.\1"),
        (r"^head\.fc\.(.+)$", r"head.\1"),
    ])


def authors_swin(name="swin_tiny_patch4_window7_224"):
    model = meta_model(name)
    ref = random_state_dict(model)
    src = rename(ref, SWIN_TO_AUTHORS)
    # the buffers the authors' checkpoints carry: every block's index, shifted blocks' masks
    for k in [k for k in src if k.endswith("attn.relative_position_bias_table")]:
        index = torch.zeros(49, 49, dtype=torch.long)
        src[k.replace("relative_position_bias_table", "relative_position_index")] = index
        if int(k.split(".")[3]) % 2:
            src[k.replace("attn.relative_position_bias_table", "attn_mask")] = torch.zeros(64, 49, 49)
    return model, ref, src


def test_authors_swin_layout():
    model, ref, src = authors_swin()
    assert "layers.0.downsample.reduction.weight" in src and "layers.3.downsample.reduction.weight" not in src
    assert detect_format(src) == "authors-swin"
    assert_converts_back(src, model, ref)
    # without a classifier (a backbone checkpoint) the merge position still tells the layout
    headless = {k: v for k, v in src.items() if not k.startswith("head.")}
    assert detect_format(headless) == "authors-swin"


def test_authors_convnext_layout():
    model = meta_model("convnext_tiny")
    ref = random_state_dict(model)
    src = rename(ref, CONVNEXT_TO_AUTHORS)
    assert detect_format(src) == "authors-convnext"
    assert_converts_back(src, model, ref)


@pytest.mark.parametrize("head_norm", ["group", "pooled"])
def test_authors_poolformer_layout(head_norm):
    model = meta_model("poolformer_s12", head_norm=head_norm)
    ref = random_state_dict(model)
    # the authors' final GroupNorm is `norm`; a 'pooled' model takes it as its head norm
    as_group = {("norm." + k[len("head.norm."):] if k.startswith("head.norm.") else k): v for k, v in ref.items()}
    src = rename(as_group, POOLFORMER_TO_AUTHORS)
    assert src["network.0.0.mlp.fc1.weight"].shape == (256, 64, 1, 1)
    assert {k.split(".")[1] for k in src if k.startswith("network.")} == {str(i) for i in range(7)}
    assert detect_format(src) == "authors-poolformer"
    assert architecture_kwargs("poolformer_s12", src) == {}
    assert_converts_back(src, model, ref)


@pytest.mark.parametrize("name", ["container_light", "container"])
def test_authors_container_layout(name):
    model = meta_model(name)
    ref = random_state_dict(model)
    src = container_to_authors(ref)
    assert detect_format(src) == "authors-container"
    assert_converts_back(src, model, ref)


def authors_container_forward(sd: dict, x: torch.Tensor, heads: int = 16) -> torch.Tensor:
    """The allenai/container network (container_v1_light) evaluated from its own state dict."""
    def conv(t, p, **kw):
        return F.conv2d(t, sd[p + ".weight"], sd[p + ".bias"], **kw)

    def bn(t, p):
        return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                            False, 0.0, 1e-5)

    for s in range(1, 5):
        k = sd[f"patch_embed{s}.proj.weight"].shape[-1]
        x = conv(x, f"patch_embed{s}.proj", stride=k)
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], sd[f"patch_embed{s}.norm.weight"],
                         sd[f"patch_embed{s}.norm.bias"], 1e-5).permute(0, 3, 1, 2)
        j = 0
        while f"blocks{s}.{j}.norm1.weight" in sd:
            p = f"blocks{s}.{j}"
            B, C, H, W = x.shape
            x = x + conv(x, p + ".pos_embed", padding=1, groups=C)
            h = bn(x, p + ".norm1")
            if p + ".sa_weight" in sd:  # MixBlock
                qkv = conv(h, p + ".conv1")
                static = conv(qkv[:, 2 * C:], p + ".conv", padding=2, groups=C)
                q, kk, v = qkv.flatten(2).transpose(1, 2).reshape(B, H * W, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
                a = ((q @ kk.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(-1)
                dyn = (a @ v).transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)
                g = torch.sigmoid(sd[p + ".sa_weight"])
                h = conv(g * dyn + (1 - g) * static, p + ".conv2")
            else:  # CBlock
                h = conv(conv(conv(h, p + ".conv1"), p + ".attn", padding=2, groups=C), p + ".conv2")
            x = x + h
            x = x + conv(F.gelu(conv(bn(x, p + ".norm2"), p + ".mlp.fc1")), p + ".mlp.fc2")
            j += 1
    x = bn(x, "norm").flatten(2).mean(-1)
    return F.linear(x, sd["head.weight"], sd["head.bias"])


def test_authors_container_numerics():
    """Converted authors' Container-Light weights compute the authors' network."""
    model = meta_model("container_light")
    g = torch.Generator().manual_seed(3)
    ref = {}  # weights N(0, 1/fan_in), norm scales around 1, BatchNorm statistics random
    for k, v in model.state_dict().items():
        if not v.dtype.is_floating_point:
            ref[k] = torch.zeros(v.shape, dtype=v.dtype)
        elif "norm" in k and k.endswith(("weight", "running_var")):
            ref[k] = torch.rand(v.shape, generator=g) + 0.5
        elif v.ndim >= 2:
            ref[k] = torch.randn(v.shape, generator=g) * v[0].numel() ** -0.5
        else:
            ref[k] = torch.randn(v.shape, generator=g) * 0.3
    src = container_to_authors(ref)
    load_strict(model, convert_state_dict(src, model))
    model.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x), authors_container_forward(src, x)
    assert torch.isfinite(theirs).all() and theirs.std() > 0.1
    assert (ours - theirs).abs().max() <= 1e-4 * max(1.0, theirs.abs().max().item())


# ---------------------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet50", "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
                                  "swin_tiny_patch4_window7_224", "convnext_tiny", "mixer_s16_224", "poolformer_s12",
                                  "container", "container_light", "nano_vit", "nano_hybrid", "nano_poolformer"])
def test_detect_mixlab(name):
    sd = meta_model(name).state_dict()
    assert detect_format(sd) == "mixlab"
    out = convert_state_dict(sd, meta_model(name))  # passes through
    assert list(out) == list(sd) and all(out[k] is sd[k] for k in sd)


@pytest.mark.parametrize("name", ["resnet50", "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
                                  "swin_tiny_patch4_window7_224", "convnext_tiny", "mixer_s16_224", "poolformer_s12"])
def test_detect_timm(name):
    sd = timm_state_dict(name)
    assert detect_format(sd) == "timm"
    model = meta_model(name, **architecture_kwargs(name, sd))
    load_strict(model, convert_state_dict(sd, model))


def test_detect_unrecognised_and_wrapped():
    with pytest.raises(ValueError, match="unrecognised state dict layout.*foo.weight") as err:
        detect_format({"foo.weight": torch.zeros(2), "bar.bias": torch.zeros(2)})
    # the message lists what the families registered, the first ones' too
    _, timm, authors = str(err.value).split("; ")
    assert set(timm.split("families ")[1].split(", ")) >= {"resnet", "vit", "swin", "convnext", "mlp_mixer",
                                                          "poolformer", "cait", "efficientformer"}
    assert set(authors.split("names of ")[1].split(", ")) >= {"swin", "convnext", "poolformer", "container", "pvt"}
    with pytest.raises(ValueError, match="empty"):
        detect_format({})
    with pytest.raises(ValueError, match="unrecognised"):
        convert_state_dict({"encoder.layer.0.weight": torch.zeros(2)}, meta_model("resnet50"))
    _, _, src = authors_swin()
    assert detect_format({"model": src}) == "authors-swin"
    assert detect_format({f"module.{k}": v for k, v in src.items()}) == "authors-swin"


def test_checkpoint_of_another_family_is_refused():
    sd = timm_state_dict("resnet50")
    with pytest.raises(ValueError, match="timm resnet checkpoint.*convnext"):
        convert_state_dict(sd, meta_model("convnext_tiny"))


# ---------------------------------------------------------------------------------------
# resampling, and what is left alone
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [8, 12])
def test_swin_relative_position_bias_resampled(window):
    model, ref, src = authors_swin()
    heads = ref["stages.0.blocks.0.mixer.relative_position_bias_table"].shape[1]
    src["layers.0.blocks.0.attn.relative_position_bias_table"] = torch.full((169, heads), 0.25)
    ramp = torch.arange(13.0)
    table = (ramp[:, None] * 2 + ramp[None, :]).reshape(169, 1).repeat(1, heads)  # 2*dy + dx, offsets 0..12
    src["layers.0.blocks.1.attn.relative_position_bias_table"] = table
    assert architecture_kwargs("swin_tiny_patch4_window7_224", src) == {}
    big = meta_model("swin_tiny_patch4_window7_224", window_size=window)
    out = convert_state_dict(src, big)
    load_strict(big, out)
    n = (2 * window - 1) ** 2
    for i, heads_i in enumerate((3, 6, 12, 24)):
        assert out[f"stages.{i}.blocks.0.mixer.relative_position_bias_table"].shape == (n, heads_i)
    const = out["stages.0.blocks.0.mixer.relative_position_bias_table"]
    assert torch.allclose(const, torch.full_like(const, 0.25), atol=1e-6)
    resampled = out["stages.0.blocks.1.mixer.relative_position_bias_table"].reshape(2 * window - 1, 2 * window - 1,
                                                                                   heads)
    c = window - 1
    assert torch.allclose(resampled[c, c], torch.full((heads,), 18.0), atol=1e-4)  # offset (0, 0) stays at its value
    assert (resampled[1:, c, 0] > resampled[:-1, c, 0]).all() and (resampled[c, 1:, 0] > resampled[c, :-1, 0]).all()
    # a random table: each head's (13, 13) grid of offsets bicubically resampled on its own
    rand = ref["stages.2.blocks.3.mixer.relative_position_bias_table"]
    got = out["stages.2.blocks.3.mixer.relative_position_bias_table"]
    for h in range(rand.shape[1]):
        want = F.interpolate(rand[:, h].reshape(1, 1, 13, 13), size=(2 * window - 1,) * 2, mode="bicubic",
                             align_corners=False)
        assert torch.allclose(got[:, h], want.flatten(), atol=1e-5), h
    # the same window: the tables pass unchanged
    same = convert_state_dict(src, model)
    assert torch.equal(same["stages.0.blocks.1.mixer.relative_position_bias_table"], table)
    # a checkpoint trained with another window asks for it
    big_sd = {k: v for k, v in out.items()}
    assert architecture_kwargs("swin_tiny_patch4_window7_224", big_sd) == {"window_size": window}


@pytest.mark.parametrize("name,prefix", [("vit_tiny_patch16_224", 1), ("deit_tiny_distilled_patch16_224", 2)])
def test_vit_position_embedding_resampled(name, prefix):
    sd = timm_state_dict(name)
    pos = sd["pos_embed"]
    assert pos.shape == (1, prefix + 196, 192)
    model = meta_model(name, img_size=160)
    out = convert_state_dict(sd, model)
    load_strict(model, out)
    new = out["pos_embed.pos_embed"]
    assert new.shape == (1, prefix + 100, 192)
    assert torch.equal(new[:, :prefix], pos[:, :prefix])  # class (and distillation) token embeddings kept
    grid = pos[:, prefix:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(10, 10), mode="bicubic", align_corners=False, antialias=True)
    assert torch.allclose(new[:, prefix:], expected.permute(0, 2, 3, 1).reshape(1, 100, 192), atol=1e-5)
    assert torch.allclose(new, resample_abs_pos_embed(pos, 10, num_prefix_tokens=prefix), atol=1e-6)
    assert architecture_kwargs(name, sd) == {}
    assert architecture_kwargs(name, {**sd, "pos_embed": new}) == {"img_size": 160}


def test_classifier_is_not_resized():
    sd = timm_state_dict("deit_tiny_distilled_patch16_224")
    model = meta_model("deit_tiny_distilled_patch16_224", num_classes=10)
    out = convert_state_dict(sd, model)
    assert out["head.fc.weight"].shape == (1000, 192) and out["head_dist.weight"].shape == (1000, 192)
    assert torch.equal(out["head.fc.weight"], sd["head.weight"])
    sd = timm_state_dict("resnet50")
    out = convert_state_dict(sd, meta_model("resnet50", num_classes=0))
    # named as mixlab's classifier even where the model has none: the loader decides
    assert out["head.fc.weight"].shape == (1000, 2048) and "fc.weight" not in out


def test_keys_without_counterpart_keep_their_names_and_buffers_are_dropped():
    model, ref, src = authors_swin("swin_small_patch4_window7_224")  # 18 blocks in stage 3
    src["some_extra.weight"] = torch.zeros(3)
    out = convert_state_dict(src, meta_model("swin_tiny_patch4_window7_224"))
    assert "layers.2.blocks.6.attn.qkv.weight" in out and "layers.2.blocks.17.norm1.bias" in out
    assert "stages.2.blocks.5.mixer.qkv.weight" in out and "stages.2.blocks.6.mixer.qkv.weight" not in out
    assert "some_extra.weight" in out
    assert not any(k.endswith(("relative_position_index", "attn_mask")) for k in out)
    # timm's PoolFormer head norm goes to the final norm of the authors' variant
    sd = timm_state_dict("poolformer_s12")
    with pytest.warns(UserWarning, match="normalises after pooling"):
        out = convert_state_dict(sd, meta_model("poolformer_s12"))
    assert torch.equal(out["norm.weight"], sd["head.norm.weight"]) and "head.norm.weight" not in out


def test_architecture_kwargs():
    assert architecture_kwargs("poolformer_s12", timm_state_dict("poolformer_s12")) == {"head_norm": "pooled"}
    assert architecture_kwargs("poolformer_s12", meta_model("poolformer_s12").state_dict()) == {}
    pooled = meta_model("poolformer_s12", head_norm="pooled").state_dict()
    assert architecture_kwargs("poolformer_s12", pooled) == {"head_norm": "pooled"}
    for name in ("resnet50", "convnext_tiny", "swin_tiny_patch4_window7_224", "mixer_s16_224", "vit_tiny_patch16_224"):
        assert architecture_kwargs(name, timm_state_dict(name)) == {}, name
    assert architecture_kwargs("mixer_s16_224", meta_model("mixer_s16_224", img_size=160).state_dict()) == {
        "img_size": 160}


def test_poolformer_head_norm_option():
    group, pooled = meta_model("poolformer_s12"), meta_model("poolformer_s12", head_norm="pooled")
    count = sum(p.numel() for p in group.parameters())
    assert count == sum(p.numel() for p in pooled.parameters())
    assert "norm.weight" in group.state_dict() and "head.norm.weight" in pooled.state_dict()
    assert "norm.weight" not in pooled.state_dict() and "head.norm.weight" not in group.state_dict()
    small = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=5)
    torch.manual_seed(0)
    a = mixlab.create_model("poolformer_s12", **small).eval()
    b = mixlab.create_model("poolformer_s12", head_norm="pooled", **small).eval()
    b.load_state_dict({("head.norm." + k[5:] if k.startswith("norm.") else k): v for k, v in a.state_dict().items()})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ya, yb = a(x), b(x)
    # pooling then LayerNorm over channels: the normalised pooled vector, scaled and shifted
    feats = a.stages[-1](a.stages[-2](a.stages[-3](a.stages[-4](a.stem(x))))).mean(dim=(1, 2))
    ref = F.linear(F.layer_norm(feats, (32,), a.norm.weight, a.norm.bias, 1e-6), a.head.fc.weight, a.head.fc.bias)
    assert torch.allclose(yb, ref, atol=1e-5) and not torch.allclose(ya, yb, atol=1e-3)
    with pytest.raises(ValueError, match="head_norm"):
        mixlab.create_model("poolformer_s12", head_norm="layer")
    assert math.isclose(count / 1e6, 11.9, abs_tol=0.05)


@pytest.mark.parametrize("name", mixlab.list_models())
def test_every_registered_models_own_state_dict_is_mixlab_format(name):
    with torch.device("meta"):
        model = mixlab.create_model(name)
    assert detect_format(model.state_dict()) == "mixlab"


def test_timm_poolformer_weights_into_the_authors_head_warn():
    sd = timm_state_dict("poolformer_s12")
    with pytest.warns(UserWarning, match="head_norm='pooled'"):
        convert_state_dict(sd, meta_model("poolformer_s12"))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the matching head: no warning
        convert_state_dict(sd, meta_model("poolformer_s12", head_norm="pooled"))


def test_a_registered_layout_is_detected_and_converted(monkeypatch):
    """Families defined in their own modules teach the converter their timm names."""
    from mixlab import registry
    from mixlab.models.poolformer import PoolFormer
    monkeypatch.setattr(registry, "LAYOUTS", [])
    monkeypatch.setattr(registry, "MODEL_CLASSES", {})

    class Tiny(PoolFormer):
        pass

    model = Tiny(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), num_classes=3)
    renamed = {k.replace("stages.", "levels.").replace("blocks.", "units."): v for k, v in model.state_dict().items()}
    renamed = {("odd." + k if k.startswith("levels") else k): v for k, v in renamed.items()}
    registry.register_layout("timm", "tiny", [r"^odd\.levels\."],
                             [(r"^odd\.levels\.(\d+)\.units\.(.+)$", r"stages.\1.blocks.\2"),
                              (r"^odd\.levels\.(\d+)\.(.+)$", r"stages.\1.\2")], model_class=Tiny)
    assert detect_format(renamed) == "timm"
    out = convert_state_dict(renamed, model)
    assert out.keys() == model.state_dict().keys()
    assert all(torch.equal(out[k], v) for k, v in model.state_dict().items())
    # a mixlab PoolFormer is not of that family
    with pytest.raises(ValueError, match="timm tiny checkpoint"):
        convert_state_dict(renamed, PoolFormer(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), num_classes=3))
    # the family's own names are recognised as mixlab's before any other layout
    registry.register_layout("timm", "tiny2", [r"^stem\."], [], mixlab_patterns=[r"^stem\.proj\."])
    assert detect_format({"stem.proj.weight": torch.zeros(1)}) == "mixlab"
