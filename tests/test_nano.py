"""The nano family: one ~1.1M-parameter model per mixer for small images, written as specs."""
from __future__ import annotations

import pytest
import torch

import mixlab
from mixlab.analysis import count_params
from mixlab.arena import DEFAULT_MODELS
from mixlab.arena import expand_models
from mixlab.models.nano import NANO_SPECS, NANO_ZOO_CLASSES, NANO_ZOO_SPECS

SPECS = {**NANO_SPECS, **NANO_ZOO_SPECS}
ALL = list(SPECS) + list(NANO_ZOO_CLASSES)


def test_the_arena_line_ups_are_the_nano_family():
    assert list(DEFAULT_MODELS) == list(NANO_SPECS) and len(DEFAULT_MODELS) == 8
    assert expand_models([]) == list(DEFAULT_MODELS)
    zoo = expand_models(["nano-zoo"])
    assert sorted(zoo) == sorted(list(NANO_ZOO_SPECS) + list(NANO_ZOO_CLASSES)) and len(zoo) == 21
    assert expand_models(["nano-all", "nano_vit"]) == list(NANO_SPECS) + zoo
    assert sorted(ALL) == mixlab.list_models("nano_*")
    assert {mixlab.model_family(n) for n in SPECS} == {"nano"}


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
    if name in NANO_ZOO_CLASSES:
        return
    assert m.spec["name"] == name
    # the registered model is exactly its specification
    same = mixlab.create_model("spec:" + SPECS[name], img_size=32, in_chans=3, num_classes=10)
    assert {k: v.shape for k, v in same.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}


def mixer_calls(model, x, kind=None) -> dict:
    """Run ``model`` on ``x`` without gradients and return, for every spatial mixer (or every
    module of class ``kind``), ``{module name: (mixer, its input, its output)}`` at its first call
    (:func:`mixlab.analysis.common.first_calls`)."""
    from mixlab.analysis.common import first_calls
    from mixlab.mixers import Mixer
    kind = kind or Mixer
    return first_calls(model, x, [(k, m) for k, m in model.named_modules() if isinstance(m, kind)])


@pytest.mark.parametrize("name", ALL)
def test_every_mixer_of_every_nano_model_keeps_the_contract(name):
    """Inside a whole network (the input each mixer really sees, eval mode): every spatial
    mixer whose aggregation is exactly A·V reproduces its forward from ``affinity`` and
    ``values``; the others (MLP-Mixer's two-layer token MLP) still give a well-formed A."""
    torch.manual_seed(0)
    model = mixlab.create_model(name, img_size=16, in_chans=3, num_classes=10).eval()
    seen = mixer_calls(model, torch.randn(1, 3, 16, 16))
    if name == "nano_resnet":  # dense 3x3 convolutions mix positions and channels at once: no affinity
        assert not seen
        return
    assert seen, f"{name} has no spatial mixer"
    for key, (mixer, x, out) in seen.items():
        with torch.no_grad():
            A = mixer.affinity(x)
            N = x.shape[1] * x.shape[2] if x.ndim == 4 else x.shape[1]
            # N rows (or one per query where only some positions query: CaiT's class attention), and one
            # column per value: N, or fewer where keys and values come from a reduced map (PVT, CvT)
            M = mixer.values(x).shape[1]
            rows = out.shape[1] * out.shape[2] if out.ndim == 4 else N  # a strided mixer: one row per output
            assert A.ndim == 4 and A.shape[0] == 1 and A.shape[-2] in (1, N, rows) and A.shape[-1] == M <= N, \
                (key, A.shape)
            assert mixer.affinity_kind in ("static", "dynamic", "mixed"), key
            if mixer.exact_av:
                torch.testing.assert_close(mixer.explicit_forward(x), out, atol=2e-5, rtol=1e-4,
                                           msg=lambda m: f"{name} {key}: {m}")
