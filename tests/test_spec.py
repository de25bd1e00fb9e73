"""Model specifications: a new hybrid from a string or YAML, without writing a class."""
from __future__ import annotations

import pytest
import torch
import yaml

import mixlab
from mixlab.config import ConfigError, build_config
from mixlab.engine.trainer import train
from mixlab.models.spec import SpecError, parse_spec
from mixlab.registry import MIXERS

HYBRID = "spec:patch2 / convnext:2x16:kernel=3 / convnext:2x32:kernel=3 / attention:2x64:heads=2 / attention:1x64:heads=2"


def test_compact_string_equals_mapping(tmp_path):
    spec = {"stem": {"type": "patch", "size": 2},
            "stages": [{"mixer": "convnext", "depth": 2, "width": 16, "kernel": 3},
                       {"mixer": "convnext", "depth": 2, "width": 32, "kernel": 3},
                       {"mixer": "attention", "depth": 2, "width": 64, "heads": 2},
                       {"mixer": "attention", "depth": 1, "width": 64, "heads": 2}]}
    assert parse_spec(HYBRID[5:]) == spec
    f = tmp_path / "hybrid.yaml"
    f.write_text(yaml.safe_dump(spec))
    a = mixlab.create_model(HYBRID, img_size=32, num_classes=10)
    b = mixlab.create_model(str(f), img_size=32, num_classes=10)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert [fi["reduction"] for fi in a.feature_info] == [2, 4, 8, 16]
    assert a.stage_mixers[2].startswith("attention")


@pytest.mark.parametrize("mixer", list(MIXERS))
def test_every_mixer_builds_runs_and_trains(mixer):
    torch.manual_seed(0)
    down = "stride" if MIXERS[mixer].strided else "merge"
    m = mixlab.create_model(f"spec:conv4 / {mixer}:2x16 / {mixer}:1x32:downsample={down}", img_size=32, in_chans=1,
                            num_classes=3, drop_path_rate=0.1)
    x = torch.randn(2, 1, 32, 32)
    out = m(x)
    assert out.shape == (2, 3)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    feats = m.forward_intermediates(x)
    assert [f.shape[1:] for f in feats] == [(16, 8, 8), (32, 4, 4)]


def test_downsample_none_keeps_the_resolution():
    m = mixlab.create_model("spec:patch4 / dwconv:1x16 / attention:1x16:downsample=none,heads=2", img_size=32)
    assert [fi["reduction"] for fi in m.feature_info] == [4, 4]


@pytest.mark.parametrize("spec, message", [
    ("spec:patch4 / transformer:2x16", "unknown mixer 'transformer'; mixers: attention"),
    ("spec:patch4", "a stem and at least one stage"),
    ("spec:patchy / attention:2x16", "use patch<P>"),
    ("spec:patch4 / attention:2-16", "mixer:DEPTHxWIDTH"),
    ("spec:patch4 / attention:2x16:heads", "key=value"),
    ("spec:patch4 / attention:2x16:window=7", "unknown option(s) ['window']"),
    ("spec:patch4 / attention:2x16 / attention:2x32:downsample=none", "downsample none keeps the width"),
    ("spec:conv3 / attention:2x16", "power of two"),
    ("spec:conv2 / basic:1x16 / basic:1x32:downsample=conv", "downsample 'conv' is not one of stride, none"),
    ("spec:conv2 / convnext:1x16 / convnext:1x32:downsample=stride", "is not one of conv, merge, none"),
    ("spec:conv2 / bottleneck:1x18", "divisible by 4"),
    ("spec:patch4 / attention:1x16:pos=sin", "pos 'sin' is not one of none, abs, cpe"),
])
def test_bad_specs_are_explained(spec, message):
    with pytest.raises(SpecError) as e:
        mixlab.create_model(spec, img_size=32)
    assert message in str(e.value)


def test_token_mixing_spec_fixes_the_input_size():
    m = mixlab.create_model("spec:patch4 / mlp:1x16", img_size=32)
    with pytest.raises(ValueError, match="img_size"):
        m(torch.randn(1, 3, 64, 64))


def test_a_user_spec_trains_like_a_registered_model(tmp_path):
    cfg = build_config({"model": {"name": "spec:patch2 / convnext:1x16:kernel=3 / attention:1x32:heads=2"},
                        "data": {"name": "digits", "limit_train": 256, "limit_val": 64},
                        "train": {"epochs": 1, "batch_size": 32}, "log": {"progress": "false"},
                        "output_dir": str(tmp_path), "name": "spec-run"})
    s = train(cfg)
    assert s["params"] > 0 and s["steps"] == 8
    with pytest.raises(ConfigError, match="unknown mixer"):
        build_config({"model": {"name": "spec:patch2 / convolution:1x16"}})


def test_info_accepts_a_spec(capsys):
    from mixlab.cli import main
    assert main(["info", "spec:patch2 / convnext:2x32 / attention:2x64:heads=2", "--img-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "16x16" in out and "attention (global) (heads=2)" in out


def test_default_run_name_of_a_spec_is_a_safe_file_name():
    from mixlab.engine.trainer import model_slug
    assert model_slug("spec:patch2 / convnext:2x32 / attention:2x64:heads=2") == \
        "spec-patch2-convnext-2x32-attention-2x64-heads-2"
    assert model_slug("configs/my_hybrid.yaml") == "my_hybrid"
    long = model_slug("spec:patch4" + " / attention:2x64" * 10)
    assert len(long) <= 60 and "/" not in long


def test_resnet_blocks_downsample_inside_their_first_block():
    m = mixlab.create_model("spec:conv2 / basic:2x16 / bottleneck:2x64", img_size=28, in_chans=1, num_classes=10)
    assert [fi["reduction"] for fi in m.feature_info] == [2, 4]
    first = m.stages[1].blocks[0]
    assert first.conv2.stride == (2, 2) and first.downsample is not None  # ResNet v1.5: the 3x3 strides
    assert isinstance(m.stages[1].downsample, torch.nn.Identity)
    assert [f.shape[-2:] for f in m.forward_intermediates(torch.randn(1, 1, 28, 28))] == [(14, 14), (7, 7)]


def test_position_encodings_of_a_stage():
    m = mixlab.create_model("spec:patch4 / attention:1x32:heads=2,pos=abs / attention:1x64:heads=2,pos=cpe",
                            img_size=32)
    keys = list(m.state_dict())
    assert "stages.0.downsample.pos.pos_embed" in keys
    assert m.state_dict()["stages.0.downsample.pos.pos_embed"].shape == (1, 64, 32)
    assert any(k.startswith("stages.1.downsample.1.proj") for k in keys)  # conv downsample, then CPE
    assert "pos=abs" in m.stage_mixers[0]
    # without a position encoding global attention is permutation-equivariant; with one it is not
    x = torch.randn(1, 3, 32, 32)
    assert m(torch.randn(1, 3, 48, 48)).shape == (1, 1000)  # the embedding is resampled to a 12x12 grid
    plain = mixlab.create_model("spec:patch4 / attention:1x32:heads=2", img_size=32).eval()
    flipped = x.view(1, 3, 8, 4, 8, 4).flip(4).reshape(1, 3, 32, 32)  # the 4x4 patches in mirrored order
    assert torch.allclose(plain(x), plain(flipped), atol=1e-5)
    m.eval()
    assert not torch.allclose(m(x), m(flipped), atol=1e-5)


def test_mac_counting_on_meta_does_not_poison_window_attention():
    """MACs are counted on the meta device; window attention caches its masks per size and
    must not keep meta tensors that a real forward would then fail on."""
    from mixlab.analysis import count_macs
    name = "spec:patch2 / window:1x16:heads=2,window=4 / window:2x32:heads=2,window=4"
    with torch.device("meta"):
        meta = mixlab.create_model(name, img_size=28)
        count_macs(meta, torch.empty(1, 3, 28, 28))
    assert mixlab.create_model(name, img_size=28)(torch.randn(1, 3, 28, 28)).isfinite().all()


def test_a_registered_spec_mixer_builds_and_is_checked():
    """Families in their own modules add mixers to the specification language."""
    from mixlab import registry
    seen = []

    def block(st, width, grid, ratio, dp, index, drop):
        seen.append((width, grid, st["kernel"], index))
        return mixlab.models.MetaBlock(width, mixlab.mixers.DepthwiseConv(width, st["kernel"]), mlp_ratio=ratio)

    registry.register_spec_mixer("mydw", {"kernel": 3}, "my depthwise conv", block)
    try:
        m = mixlab.create_model("spec:patch2 / mydw:2x16 / mydw:1x32:kernel=5", img_size=32, num_classes=4)
        assert seen == [(16, (16, 16), 3, 0), (16, (16, 16), 3, 1), (32, (8, 8), 5, 0)]
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 4)
        assert m.stage_mixers[1] == "my depthwise conv (kernel=5)"
        with pytest.raises(SpecError, match=r"unknown option\(s\) \['heads'\]"):
            mixlab.create_model("spec:patch2 / mydw:1x16:heads=2")
        with pytest.raises(ValueError, match="already registered"):
            registry.register_spec_mixer("attention", {}, "again", block)
    finally:
        registry.MIXERS.pop("mydw")


def test_a_strided_spec_mixer_takes_the_stage_input_and_a_check():
    """``strided`` mixers downsample in their first block (ResNet's way) and may hold a context
    module in every block; ``check`` refuses stages the block cannot be built for."""
    from mixlab import registry
    calls = []

    def block(st, width, grid, ratio, dp, index, drop, *, in_chs, stride, context):
        calls.append((in_chs, width, stride, context is not None))
        return mixlab.models.resnet.BasicBlock(in_chs, width, stride, dp, context)

    registry.register_spec_mixer("mybasic", {}, "my basic block", block, strided=True,
                                 check=lambda st: "width must be even" if st["width"] % 2 else None)
    try:
        m = mixlab.create_model("spec:conv4 / mybasic:1x8 / mybasic:2x16:context=se,context_placement=block",
                                img_size=32, num_classes=3)
        assert calls == [(8, 8, 1, False), (8, 16, 2, True), (16, 16, 1, True)]
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 3)
        with pytest.raises(SpecError, match=r"stage 0 \(mybasic\): width must be even"):
            mixlab.create_model("spec:conv4 / mybasic:1x9")
        with pytest.raises(SpecError, match="downsample 'merge' is not one of stride, none"):
            mixlab.create_model("spec:conv4 / mybasic:1x8 / mybasic:1x16:downsample=merge")
    finally:
        registry.MIXERS.pop("mybasic")


# -- DeiT's distillation token on a specified model -------------------------------------------------------------
def test_a_distilled_spec_model_has_deits_token_and_second_head(tmp_path):
    plain = mixlab.create_model("nano_vit", img_size=16, in_chans=1, num_classes=10)
    model = mixlab.create_model("nano_vit", distilled=True, img_size=16, in_chans=1, num_classes=10)
    width = 128
    # one token and one linear head more than nano_vit, nothing else
    assert (sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
            == width + width * 10 + 10)
    assert model.no_weight_decay() == {"dist_token"}
    x = torch.randn(3, 1, 16, 16)
    model.eval()
    seq = model.forward_features(x)
    assert seq.shape == (3, 1 + 4 * 4, width)  # the token first, then the 4x4 grid
    cls, dist = model.forward_heads(seq)
    torch.testing.assert_close(cls, model.head.fc(seq[:, 1:].mean(1)))  # class head: average of grid tokens
    torch.testing.assert_close(dist, model.head_dist(seq[:, 0]))  # distillation head: the token
    torch.testing.assert_close(model(x), (cls + dist) / 2)  # inference averages the two (DeiT)
    model.train()
    assert model(x).shape == (3, 10)  # without distilled_training, training sees the average too
    model.distilled_training = True
    out = model(x)
    assert isinstance(out, tuple) and len(out) == 2
    # the token is mixed with the grid by attention: changing it changes the class head's logits
    model.eval()
    before = model.forward_heads(model.forward_features(x))[0]
    with torch.no_grad():
        model.dist_token.add_(torch.randn_like(model.dist_token))  # not a constant: LayerNorm removes those
    assert not torch.allclose(model.forward_heads(model.forward_features(x))[0], before)
    # feature maps leave the token out
    assert [tuple(t.shape) for t in model.forward_intermediates(x)] == [(3, width, 4, 4)]
    model.reset_classifier(4)
    assert model(x).shape == (3, 4) and model.head_dist.out_features == 4


def test_distilled_in_a_yaml_spec_and_refused_where_no_token_fits(tmp_path):
    path = tmp_path / "hybrid.yaml"
    path.write_text(yaml.safe_dump({"stem": {"type": "conv", "size": 2},
                                    "stages": [{"mixer": "convnext", "depth": 1, "width": 16},
                                               {"mixer": "attention", "depth": 1, "width": 32, "heads": 2,
                                                "pos": "cpe"}],
                                    "head": {"pool": "avg", "distilled": True}}))
    model = mixlab.create_model(str(path), img_size=16, num_classes=3)
    assert model.distilled and model.forward_features(torch.randn(2, 3, 16, 16)).shape == (2, 1 + 16, 32)
    assert not mixlab.create_model(str(path), img_size=16, num_classes=3, distilled=False).distilled
    with pytest.raises(SpecError, match="global attention, but the last stage is convnext"):
        mixlab.create_model("spec:patch4 / attention:1x32:heads=2 / convnext:1x64", distilled=True)
    path.write_text(yaml.safe_dump({"stages": [{"mixer": "attention", "depth": 1, "width": 32}], "head": {"dist": 1}}))
    with pytest.raises(SpecError, match="distilled: true"):
        mixlab.create_model(str(path))
