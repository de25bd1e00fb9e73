"""The learnable tree filter (LTF v2; Song et al., NeurIPS 2020; StevenGrove/LearnableTreeFilterV2)
as a specification mixer: ``treefilter``, the generic block (pre-norm LayerNorm, residual,
MLP) around :class:`~mixlab.mixers.tree_filter.TreeFilterMixer` with a linear output
projection. Options: ``groups`` (affinity groups, one embedding channel each, as in the
authors' module). The paper uses the filter as a module inside CNNs (see
:class:`~mixlab.mixers.tree_filter.TreeFilterBlock` for ResNet); a backbone of tree-filter
blocks is mixlab's own use of it.
"""
from __future__ import annotations

from functools import partial

import torch.nn as nn

from ..mixers.tree_filter import TreeFilterBlock, TreeFilterMixer
from ..registry import register_spec_mixer
from .blocks import MetaBlock
from .nano import register_nano


def _spec_block(st, width, grid, mlp_ratio, drop_path, index, drop):
    mixer = TreeFilterMixer(width, groups=st["groups"], proj=True)
    return MetaBlock(width, mixer, mlp_ratio=mlp_ratio, norm_layer=partial(nn.LayerNorm, eps=1e-6), drop=drop,
                     drop_path=drop_path)


register_spec_mixer("treefilter", {"groups": 8},
                    "learnable tree filter v2 (MST of the grid, linear-time filtering along it)", _spec_block)

__all__ = ["TreeFilterMixer", "TreeFilterBlock"]


# -- the nano model of the arena's nano-zoo line-up ----------------------------------------
# Learnable Tree Filter v2: filtering along a minimum spanning tree of the feature grid
register_nano("nano_treefilter", "patch2 / treefilter:2x40 / treefilter:2x80 / treefilter:4x160")
