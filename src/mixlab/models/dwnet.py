"""DWNet (Han et al., "On the Connection between Local Attention and Dynamic Depth-wise
Convolution", ICLR 2022; arXiv 2106.04263 "Demystifying Local Vision Transformer"): Swin's
macro architecture with each window-attention block replaced by a depthwise-convolution
block, static (``dwconv_*``) or with kernels predicted from the input (``ddwconv_*``).

The block (the authors' ``SpatialBlock`` / ``DWBlock``, Atten4Vis/DemystifyLocalViT
``models/dwnet.py``)::

    x = x + DropPath(BN(1x1(ReLU(BN(dwconv7x7(ReLU(BN(1x1(x)))))))))    # no norm before it
    x = x + DropPath(MLP(BN(x)))                                         # BatchNorm, not LN

1x1 convolutions without bias, a 7x7 depthwise convolution with bias (the window size of
Swin), BatchNorm everywhere inside the blocks; Swin's 4x4 patch embedding with LayerNorm,
patch merging with LayerNorm between stages, a final LayerNorm, average pooling and a
linear classifier.

The spatial mixer is the 1x1 -> dwconv -> 1x1 unit (:class:`mixlab.mixers.dwnet.DWNetMixer`): its values are
``ReLU(BN(W_in·x))``, its affinity the depthwise convolution's Toeplitz matrix per channel
(static, or per sample for the dynamic variant), its output transform
``BN(W_out·ReLU(BN(· + bias)))``. Every part but A·V acts on each position alone, so
``explicit_forward == forward`` exactly.

Weights: the authors' checkpoints (``dwnet_tiny_224.pth`` ...) convert with
``mixlab.weights.convert_state_dict`` (layout ``'authors-dwnet'``, registered here).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from ..layers import BatchNormNHWC, ClassifierHead, DropPath, Mlp, PatchEmbed, PatchMerging, stochastic_depth_rates
from ..layers.fuse import bn_scale_shift
from ..mixers import DWNetMixer
from ..registry import register_layout, register_model, register_spec_mixer
from .base import HierarchicalModel, Stage, build, init_weights_vit
from .nano import register_nano


class DWNetBlock(nn.Module):
    """``x + DropPath(mixer(x))``, then ``x + DropPath(MLP(BN(x)))`` (the authors'
    ``SpatialBlock``: no norm before the mixer, BatchNorm before the MLP)."""

    def __init__(self, dim: int, kernel_size: int = 7, dynamic: bool = False, mlp_ratio: float = 4.0,
                 reduction: int = 4, drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.mixer = DWNetMixer(dim, kernel_size, dynamic, reduction)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm = BatchNormNHWC(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mixer(x))
        return x + self.drop_path(self.mlp(self.norm(x)))

    @torch.no_grad()
    def fold_batchnorm(self) -> None:
        """Fold the BatchNorm before the MLP into its first linear layer (eval mode, exact)."""
        self.mixer.fold_batchnorm()
        if isinstance(self.norm, nn.BatchNorm2d):
            s, t = bn_scale_shift(self.norm)
            fc1 = self.mlp.fc1
            fc1.bias.add_(fc1.weight @ t)
            fc1.weight.mul_(s)
            self.norm = nn.Identity()


class DWNet(HierarchicalModel):
    """DWNet: Swin-T/B's stem, stages and head with (dynamic) depthwise-convolution blocks.
    Any input size divisible by the patch size works (patch merging pads odd maps)."""

    def __init__(self, img_size=224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths=(2, 2, 6, 2), kernel_size: int = 7, dynamic: bool = False,
                 reduction: int = 4, mlp_ratio: float = 4.0, drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        norm = partial(nn.LayerNorm, eps=1e-5)
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        dpr = stochastic_depth_rates(drop_path_rate, depths)
        stages, info = [], []
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            blocks = [DWNetBlock(dim, kernel_size, dynamic, mlp_ratio, reduction, drop_rate, dpr[i][j])
                      for j in range(depth)]
            stages.append(Stage(PatchMerging(dims[i - 1], dim, norm) if i else None, blocks))
            info.append(dict(num_chs=dim, reduction=patch_size * 2 ** i, module=f"stages.{i}"))
        kind = "dynamic depthwise conv" if dynamic else "depthwise conv"
        super().__init__(in_chans, num_classes, img_size,
                         stem=PatchEmbed(patch_size, in_chans, embed_dim, norm_layer=norm),
                         stages=stages, norm=norm(dims[-1]),
                         head=ClassifierHead(dims[-1], num_classes, pool="avg", drop_rate=drop_rate),
                         feature_info=info, stage_mixers=[f"{kind} {kernel_size}x{kernel_size} (1x1-dw-1x1, BN)"]
                         * len(depths))
        self.min_input_size = patch_size
        self.apply(init_weights_vit)  # linear layers only; convolutions keep PyTorch's default, as the authors'

    def fuse(self) -> "DWNet":
        """Fold every BatchNorm into a neighbouring linear map (eval mode, exact): the 1x1
        convolutions', the depthwise convolution's (or the dynamic kernels'), and the one
        before each MLP into the MLP's first layer."""
        super().fuse()
        for m in self.modules():
            if isinstance(m, DWNetBlock):
                m.fold_batchnorm()
        return self


@register_model
def dwconv_tiny(**kwargs):
    """DWNet-T: Swin-T with 7x7 depthwise-convolution blocks (24.17M, 3.77 GMACs; the authors'
    README: 24M / 3.8G)."""
    return build(DWNet, dict(embed_dim=96, depths=(2, 2, 6, 2)), kwargs)


@register_model
def dwconv_base(**kwargs):
    """DWNet-B: Swin-B with 7x7 depthwise-convolution blocks (74.35M, 12.87 GMACs; README: 74M / 12.9G)."""
    return build(DWNet, dict(embed_dim=128, depths=(2, 2, 18, 2)), kwargs)


@register_model
def ddwconv_tiny(**kwargs):
    """Dynamic DWNet-T: 7x7 kernels predicted per sample and channel (51.13M, 3.77 GMACs;
    README: 51M / 3.8G)."""
    return build(DWNet, dict(embed_dim=96, depths=(2, 2, 6, 2), dynamic=True), kwargs)


@register_model
def ddwconv_base(**kwargs):
    """Dynamic DWNet-B (161.60M, 12.94 GMACs; README: 162M / 13.0G)."""
    return build(DWNet, dict(embed_dim=128, depths=(2, 2, 18, 2), dynamic=True), kwargs)


# ---------------------------------------------------------------------------------------------
# specifications: the DWNet block as a stage mixer
# ---------------------------------------------------------------------------------------------
def _spec_block(dynamic: bool):
    def block(st, width, grid, ratio, dp, index, drop):
        return DWNetBlock(width, st["kernel"], dynamic, ratio, st.get("reduction", 4), drop, dp)
    return block


register_spec_mixer("dwconv_block", {"kernel": 7}, "DWNet block: 1x1-BN-ReLU-dwconv-BN-ReLU-1x1-BN, BN-MLP",
                    _spec_block(False))
register_spec_mixer("ddwconv", {"kernel": 7, "reduction": 4},
                    "DWNet block with dynamic depthwise conv (kernels from the pooled input)", _spec_block(True))


# ---------------------------------------------------------------------------------------------
# the authors' checkpoints (Atten4Vis/DemystifyLocalViT): Swin's layout (patch merging at the
# end of stage i, `head`), the unit under `attn2conv`, the MLP's BatchNorm as `bn`
# ---------------------------------------------------------------------------------------------
def _blk(m) -> str:
    return f"stages.{m[1]}.blocks.{m[2]}"


_UNIT = {"conv0": "proj_in", "bn0": "bn_in", "bn": "bn", "conv2": "proj_out", "bn2": "bn_out"}
_DYNAMIC = {"conv1": "reduce", "bn": "bn", "conv2": "expand"}

_AUTHORS_DWNET = [
    (r"^patch_embed\.(proj|norm)\.(.+)$", r"stem.\1.\2"),
    (r"^layers\.(\d+)\.downsample\.(.+)$", lambda m: f"stages.{int(m[1]) + 1}.downsample.{m[2]}"),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.attn2conv\.(conv0|bn0|bn|conv2|bn2)\.(.+)$",
     lambda m: f"{_blk(m)}.mixer.{_UNIT[m[3]]}.{m[4]}"),
    # the static depthwise convolution, or the dynamic one's generator and bias
    (r"^layers\.(\d+)\.blocks\.(\d+)\.attn2conv\.conv\.weight$", r"stages.\1.blocks.\2.mixer.conv.conv.weight"),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.attn2conv\.conv\.bias$",
     (r"stages.\1.blocks.\2.mixer.conv.conv.bias", r"stages.\1.blocks.\2.mixer.conv.bias")),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.attn2conv\.conv\.(conv1|bn|conv2)\.(.+)$",
     lambda m: f"{_blk(m)}.mixer.conv.{_DYNAMIC[m[3]]}.{m[4]}"),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.bn\.(.+)$", lambda m: f"{_blk(m)}.norm.{m[3]}"),
    (r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$", lambda m: f"{_blk(m)}.{m[3]}"),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
]

register_layout("authors-dwnet", "dwnet", [r"^layers\.\d+\.blocks\.\d+\.attn2conv\."], _AUTHORS_DWNET,
                model_class=DWNet)


# -- the nano model of the arena's nano-zoo line-up ----------------------------------------
# DWNet: Swin's skeleton with a 7x7 depthwise convolution (BatchNorm, ReLU) in place of windows
register_nano("nano_dwnet", ("patch2 / dwconv_block:2x40 / dwconv_block:3x80:downsample=merge"
                             " / dwconv_block:3x160:downsample=merge"))
# dynamic DWNet: the depthwise kernel is predicted from the pooled input, per image
register_nano("nano_ddwnet", ("patch2 / ddwconv:2x40:reduction=8 / ddwconv:2x80:downsample=merge,reduction=8"
                              " / ddwconv:2x160:downsample=merge,reduction=8"))
