"""Every registered model that carries a published architecture's name matches its
parameter count (within 1%) and GMACs (within 5%) from docs/published_figures.md, a copy
of the project's reference table. Models are built on the meta device: no weights are
allocated, so even ViT-H takes a fraction of a second."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import mixlab
from mixlab.analysis import count_macs, count_params

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "published_figures.md"
SHARED = ROOT.parent / "shared" / "reference" / "published_figures.md"

# Published GMACs that no faithful configuration reproduces under the counting convention
# of the table (attention matmuls included); the measured value is documented instead.
GMACS_EXEMPT = {
    # Two blocks of global attention over 56x56 = 3136 tokens alone cost 5.0 GMACs, more
    # than half the paper's 8.1 GFLOPs; mixlab measures 11.5 (5.3 without attention matmuls).
    "container": "paper's 8.1 GFLOPs not reproducible with full attention at stride 4 (see docs/models.md)",
    # The LR-Net paper counts ResNet-50 at 4.3 GFLOPs too, where this convention gives 4.09: LR-Net-50's 4.03
    # keeps the paper's relation (about ResNet-50's cost), not its absolute figure.
    "lrnet_50": "the paper's 4.3 is its count of ResNet-50 as well (mixlab: 4.09 for resnet50, 4.03 for lrnet_50)",
}

# Published figures counted on another form of the network than the one create_model builds;
# each is measured in that form (and the trained form is checked in the family's own tests).
def _reparameterized(model):
    return model.reparameterize()  # RepLKNet: the paper's 79M / 15.3G are the inference-time network's


def _backbone(model):
    model.reset_classifier(0)  # ShiftViT: the seed's 28 / 50 / 88M exclude the classifier (see docs/models.md)
    return model


COUNTED_AS = {"replknet_31b": _reparameterized, "shiftvit_tiny": _backbone, "shiftvit_small": _backbone,
              "shiftvit_base": _backbone}


# Parameter counts the table gives rounded to whole millions (the seed's) where the paper gives one
# more digit: the model is checked against the paper's figure, which must round to the table's.
PRECISE_PARAMS = {
    "pvt_small": (24.5, "PVT paper, Table 1: 24.5M (the seed rounds it to 25)"),
    "pvt_large": (61.4, "PVT paper, Table 1: 61.4M (the seed rounds it to 61)"),
}


def _split_names(cell: str) -> list[str]:
    cell = cell.split("(")[0].strip() if "(=" not in cell else cell
    aliases = re.findall(r"\(=\s*([\w/ ]+)\)", cell)
    main = re.sub(r"\(.*?\)", "", cell).strip()
    parts = [p.strip() for p in main.split("/")]
    prefix = parts[0].rsplit("_", 1)[0] + "_" if "_" in parts[0] else ""
    names = [parts[0]] + [p if "_" in p else prefix + p for p in parts[1:]]
    for a in aliases:
        names += [x.strip() for x in a.split("/")]
    return names


def _values(cell: str) -> list[float | None]:
    return [None if v.strip() in ("—", "-", "") else float(v) for v in cell.split("/")]


def load_table() -> dict[str, tuple[float, float | None]]:
    rows = {}
    for line in TABLE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not re.match(r"^[a-z]", cells[0]) or cells[0] == "name":
            continue
        names, params, gmacs = _split_names(cells[0]), _values(cells[1]), _values(cells[2])
        for i, n in enumerate(names):
            p = params[i] if len(params) > 1 else params[0]
            g = gmacs[i] if len(gmacs) > 1 else gmacs[0]
            rows[n] = (p, g)
    return rows


FIGURES = load_table()
CHECKED = sorted(n for n in FIGURES if mixlab.is_model(n))


def test_table_parses_and_covers_issue_models():
    assert FIGURES["swin_tiny_patch4_window7_224"] == (28.29, 4.49)
    assert FIGURES["deit_small_patch16_224"] == (22.05, 4.60)
    assert FIGURES["shiftvit_base"] == (88.0, 15.2)
    assert FIGURES["cait_xxs24_224"] == (11.96, None)
    required = ["resnet50", "vit_huge_patch14_224", "deit_base_distilled_patch16_224", "convnext_base",
                "mixer_b16_224", "poolformer_m48", "container", "container_light"]
    assert all(n in CHECKED for n in required)


@pytest.mark.skipif(not SHARED.exists(), reason="no ../shared checkout beside the repository")
def test_table_is_the_projects_reference():
    assert TABLE.read_text() == SHARED.read_text()


@pytest.mark.parametrize("name", CHECKED)
def test_matches_published_figures(name):
    params_m, gmacs = FIGURES[name]
    with torch.device("meta"):
        model = COUNTED_AS.get(name, lambda m: m)(mixlab.create_model(name).eval())
        x = torch.empty(1, 3, *model.img_size)
    ours_p = count_params(model) / 1e6
    if name in PRECISE_PARAMS:
        precise = PRECISE_PARAMS[name][0]
        assert round(precise + 1e-9) == params_m, f"{name}: the table's {params_m}M is not {precise}M rounded"
        params_m = precise
    assert abs(ours_p - params_m) / params_m <= 0.01, f"{name}: {ours_p:.3f}M params vs published {params_m}M"
    if gmacs is None:
        return
    macs, _ = count_macs(model, x)
    ours_g = macs / 1e9
    if name in GMACS_EXEMPT:
        assert abs(ours_g - gmacs) / gmacs > 0.05, f"{name} now matches its GMACs: remove the exemption"
        return
    assert abs(ours_g - gmacs) / gmacs <= 0.05, f"{name}: {ours_g:.3f} GMACs vs published {gmacs}"
