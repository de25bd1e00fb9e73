"""Adding a family touches only ``mixers/<family>.py``, ``models/<family>.py`` and its tests
(docs/adding-a-family.md): a toy family written into a copy of mixlab's source as those two
files, and nothing else, is a registered model, a spec mixer, an exported mixer, a checkpoint
layout with default weights and a nano model in the arena's nano-zoo line-up, and trains, without
a line changed anywhere else."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_architecture import import_cycles, violations

SRC = Path(__file__).resolve().parents[1] / "src"

MIXER = '''
"""A toy static mixer for the tests: every position receives the mean of all positions."""
from __future__ import annotations

import torch

from .base import Mixer, flatten_tokens


class MeanMixer(Mixer):
    """``y_i = mean_j x_j``: A = 1/N everywhere, one group."""

    affinity_kind = "static"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return flatten_tokens(x).mean(dim=1, keepdim=True).expand_as(flatten_tokens(x)).reshape(x.shape)

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        n = flatten_tokens(x).shape[1]
        return x.new_full((1, 1, n, n), 1.0 / n).expand(x.shape[0], -1, -1, -1)
'''

MODEL = '''
"""A toy family for the tests: a patch stem, MetaBlocks around MeanMixer, a classifier."""
from __future__ import annotations

import torch.nn as nn

from ..layers import ClassifierHead, PatchEmbed
from ..mixers.toy import MeanMixer
from ..registry import IMAGENET_MEAN_STD, register_default_weights, register_layout, register_model, register_spec_mixer
from .base import HierarchicalModel, Stage, build
from .blocks import MetaBlock
from .nano import register_nano


class ToyNet(HierarchicalModel):
    def __init__(self, img_size=32, patch_size: int = 4, in_chans: int = 3, num_classes: int = 10,
                 embed_dim: int = 16, depth: int = 2, drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        blocks = [MetaBlock(embed_dim, MeanMixer(), mlp_ratio=2.0) for _ in range(depth)]
        super().__init__(in_chans, num_classes, img_size, stem=PatchEmbed(patch_size, in_chans, embed_dim),
                         stages=[Stage(None, blocks)], norm=nn.LayerNorm(embed_dim),
                         head=ClassifierHead(embed_dim, num_classes, pool="avg", drop_rate=drop_rate),
                         feature_info=[dict(num_chs=embed_dim, reduction=patch_size, module="stages.0")],
                         stage_mixers=["mean of all positions"])


@register_model
def toy_tiny(**kwargs):
    return build(ToyNet, {}, kwargs)


# the "authors'" names of this family: blocks.N.* for stages.0.blocks.N.*, fc.* for the classifier
register_layout("authors-toy", "toy", [r"^toy_blocks\\.\\d+\\."], [
    (r"^toy_blocks\\.(\\d+)\\.(.+)$", r"stages.0.blocks.\\1.\\2"),
    (r"^fc\\.(weight|bias)$", r"head.fc.\\1"),
], model_class=ToyNet)
register_default_weights("toy_tiny", "hf-hub:example/toy_tiny", **IMAGENET_MEAN_STD)


def _spec_block(st, width, grid, ratio, drop_path, index, drop):
    return MetaBlock(width, MeanMixer(), mlp_ratio=ratio, drop_path=drop_path)


register_spec_mixer("toymean", {}, "mean of all positions (toy)", _spec_block)
register_nano("nano_toy", "patch2 / toymean:2x40 / toymean:2x80")
'''

CHECK = '''
import json, sys
import torch
import mixlab
from mixlab.cli import main
from mixlab.mixers import MeanMixer
from mixlab.models.nano import LINE_UPS
from mixlab.registry import DEFAULT_WEIGHTS, MIXERS
from mixlab.weights import detect_format
from safetensors.torch import save_file

out = sys.argv[1]
assert mixlab.list_models(family="toy") == ["toy_tiny"]
torch.manual_seed(0)
model = mixlab.create_model("toy_tiny").eval()
x = torch.randn(2, 3, 32, 32)
assert model(x).shape == (2, 10)

mixer = MeanMixer().double()
m = torch.randn(2, 4, 4, 8, dtype=torch.float64)
assert torch.allclose(mixer(m), mixer.explicit_forward(m))  # the mixer contract

spec = mixlab.create_model("spec:patch4 / toymean:1x8 / attention:1x16:heads=2", num_classes=3, img_size=16)
assert spec(torch.randn(1, 3, 16, 16)).shape == (1, 3) and "toymean" in MIXERS
assert "nano_toy" in LINE_UPS["nano-zoo"]
assert mixlab.create_model("nano_toy")(torch.randn(1, 3, 32, 32)).shape == (1, 10)

authors = {k.replace("stages.0.blocks.", "toy_blocks.").replace("head.fc.", "fc."): v
           for k, v in model.state_dict().items()}
save_file({k: v.contiguous() for k, v in authors.items()}, out + "/authors.safetensors")
assert detect_format(authors) == "authors-toy"
loaded = mixlab.create_model("toy_tiny", pretrained=out + "/authors.safetensors").eval()
assert torch.equal(loaded(x), model(x))
assert DEFAULT_WEIGHTS["toy_tiny"]["source"] == "hf-hub:example/toy_tiny"

assert main(["info", "toy_tiny"]) == 0
assert main(["train", "--model", "toy_tiny", "--data", "digits", "--epochs", "1", "--output", out, "--name", "toy",
             "--set", "data.limit_train=64", "--set", "data.limit_val=32", "--set", "data.img_size=16",
             "--set", "log.print_every=0"]) == 0
print(json.dumps(json.load(open(out + "/toy/summary.json"))["model"]))
'''


@pytest.fixture(scope="module")
def tree_with_toy(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(SRC / "mixlab", src / "mixlab", ignore=shutil.ignore_patterns("__pycache__"))
    (src / "mixlab" / "mixers" / "toy.py").write_text(textwrap.dedent(MIXER).lstrip())
    (src / "mixlab" / "models" / "toy.py").write_text(textwrap.dedent(MODEL).lstrip())
    return src


def test_the_toy_family_adds_two_files_and_nothing_else(tree_with_toy):
    ours = {p.relative_to(SRC).as_posix() for p in SRC.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    theirs = {p.relative_to(tree_with_toy).as_posix() for p in tree_with_toy.rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    assert theirs - ours == {"mixlab/mixers/toy.py", "mixlab/models/toy.py"}
    for name in ours & theirs:  # every other file is byte for byte the same
        assert (SRC / name).read_bytes() == (tree_with_toy / name).read_bytes(), name
    assert violations(tree_with_toy) == [] and import_cycles(tree_with_toy) == []


def test_the_toy_family_is_a_whole_family(tree_with_toy, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(tree_with_toy)}
    run = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert run.stdout.strip().splitlines()[-1] == '"toy_tiny"'
