"""The nano family: one ~1.1M-parameter model per mixer for small images, written as specs."""
from __future__ import annotations

import pytest
import torch

import mixlab
from mixlab.analysis import count_params
from mixlab.arena import DEFAULT_MODELS
from mixlab.arena import expand_models
from mixlab.models.nano import NANO_SPECS, NANO_ZOO_SPECS

ALL = list(NANO_SPECS) + list(NANO_ZOO_SPECS)


def test_the_arena_line_ups_are_the_nano_family():
    assert list(DEFAULT_MODELS) == list(NANO_SPECS) and len(DEFAULT_MODELS) == 8
    assert expand_models([]) == list(DEFAULT_MODELS)
    assert expand_models(["nano-zoo"]) == list(NANO_ZOO_SPECS)
    assert expand_models(["nano-all", "nano_vit"]) == ALL
    assert sorted(ALL) == mixlab.list_models("nano_*")
    assert {mixlab.model_family(n) for n in ALL} == {"nano"}


@pytest.mark.parametrize("size, chans", [(32, 3), (28, 1)])
def test_parameter_counts_are_comparable(size, chans):
    counts = {}
    for name in ALL:
        with torch.device("meta"):
            counts[name] = count_params(mixlab.create_model(name, img_size=size, in_chans=chans))
    assert all(1.0e6 <= c <= 1.3e6 for c in counts.values()), counts
    assert max(counts.values()) / min(counts.values()) < 1.2


@pytest.mark.parametrize("name", ALL)
def test_nano_models_run_on_small_images(name):
    torch.manual_seed(0)
    for size, chans in ((28, 1), (32, 3)):
        m = mixlab.create_model(name, img_size=size, in_chans=chans, num_classes=10)
        out = m(torch.randn(2, chans, size, size))
        assert out.shape == (2, 10) and out.isfinite().all()
    assert m.spec["name"] == name
    # the registered model is exactly its specification
    same = mixlab.create_model("spec:" + {**NANO_SPECS, **NANO_ZOO_SPECS}[name], img_size=32, in_chans=3, num_classes=10)
    assert {k: v.shape for k, v in same.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
