"""Numerical parity with timm for ResMLP and gMLP (random timm weights, converted by
``mixlab.weights.convert_state_dict``, strict load, same eval-mode logits), and the
converter's handling of their layouts. Vision Permutator is not in timm: its own state
dict must be detected as mixlab's.

Token-mixing layers fix the input size, so a checkpoint fits only a model built for its
size: timm's ResMLP built for 128 px converts into a mixlab ResMLP built for 128 px, and a
224 px checkpoint is refused by a 128 px model with the loader's shape-mismatch error
(nothing is resampled: a learned N x N token matrix has no meaningful resampling).
"""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

import mixlab  # noqa: E402
import mixlab.models.gmlp  # noqa: E402,F401  (registers gmlp_*)
import mixlab.models.resmlp  # noqa: E402,F401  (registers resmlp_*)
import mixlab.models.vip  # noqa: E402,F401  (registers vip_*)
from mixlab.weights import architecture_kwargs, convert_state_dict, detect_format  # noqa: E402
from mixlab.weights.load import load_state  # noqa: E402
from test_parity import _fast_init, assert_same_logits, mixlab_from, timm_model  # noqa: E402,F401


def test_resmlp_parity_at_224():
    theirs = timm_model("resmlp_12_224")
    sd = theirs.state_dict()
    assert detect_format(sd) == "timm"
    assert architecture_kwargs("resmlp_12_224", sd) == {}
    ours = mixlab_from("resmlp_12_224", theirs)
    assert_same_logits(ours, theirs, 224)
    assert detect_format(ours.state_dict()) == "mixlab"
    # the affine "norms" and layer scales really came across (not left at 1 / 0 / 0.1)
    blk = ours.stages[0].blocks[5]
    assert torch.equal(blk.norm2.alpha, theirs.blocks[5].norm2.alpha)
    assert torch.equal(blk.ls1.gamma, theirs.blocks[5].ls1)
    assert torch.equal(blk.mixer.proj.weight, theirs.blocks[5].linear_tokens.weight)


def test_resmlp_parity_at_another_size_and_a_clear_refusal():
    theirs = timm_model("resmlp_12_224", seed=3, img_size=128)
    ours = mixlab_from("resmlp_12_224", theirs, img_size=128)
    assert ours.stages[0].blocks[0].mixer.proj.weight.shape == (64, 64)
    assert_same_logits(ours, theirs, 128, seed=2)
    # a 128 px checkpoint does not fit a model built for 224 px: the loader lists the token layers
    model224 = mixlab.create_model("resmlp_12_224")
    with pytest.raises(ValueError, match=r"shape mismatch.*\n.*mixer\.proj\.weight: \(64, 64\) vs \(196, 196\)"):
        load_state(model224, theirs.state_dict())
    # and a model built for 128 px refuses a 224 px image, saying how to build it
    with pytest.raises(ValueError, match="img_size"):
        ours(torch.randn(1, 3, 224, 224))


def test_gmlp_parity_at_224():
    theirs = timm_model("gmlp_s16_224")
    sd = theirs.state_dict()
    assert detect_format(sd) == "timm"
    ours = mixlab_from("gmlp_s16_224", theirs)
    assert_same_logits(ours, theirs, 224)
    assert detect_format(ours.state_dict()) == "mixlab"
    gate = theirs.blocks[7].mlp_channels.gate
    mixer = ours.stages[0].blocks[7].mixer
    assert torch.equal(mixer.proj.weight, gate.proj.weight) and torch.equal(mixer.norm.bias, gate.norm.bias)


def test_gmlp_parity_at_another_size():
    theirs = timm_model("gmlp_s16_224", seed=5, img_size=160)
    ours = mixlab_from("gmlp_s16_224", theirs, img_size=160)
    assert ours.stages[0].blocks[0].mixer.proj.weight.shape == (100, 100)
    assert_same_logits(ours, theirs, 160, seed=4)


def test_conversion_refuses_the_other_family():
    sd = timm_model("resmlp_12_224").state_dict()
    with torch.device("meta"):
        gmlp = mixlab.create_model("gmlp_s16_224")
    with pytest.raises(ValueError, match="timm resmlp checkpoint"):
        convert_state_dict(sd, gmlp)


@pytest.mark.parametrize("name", ["vip_s7", "resmlp_24_224", "gmlp_b16_224"])
def test_own_state_dicts_are_mixlab(name):
    with torch.device("meta"):
        model = mixlab.create_model(name)
    sd = model.state_dict()
    assert detect_format(sd) == "mixlab"
    # a mixlab checkpoint converts to itself, names unchanged
    assert list(convert_state_dict(sd, model)) == list(sd)
