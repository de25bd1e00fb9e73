"""The parts around a spatial mixer: norms, channel MLPs, DropPath / LayerScale, stems,
embeddings and downsampling, position encodings and heads."""
from .drop import DropPath, LayerScale, drop_path, stochastic_depth_rates
from .embed import ConvEmbed, ConvStem, OverlapPatchEmbed, PatchEmbed, PatchMerging, ResNetStem
from .head import ClassifierHead
from .helpers import to_2tuple
from .mlp import ConvMlp, Mlp
from .norm import Affine, BatchNormNHWC, GroupNorm1NHWC, LayerNorm, LayerNorm2d
from .pos import AbsolutePosEmbed, ConditionalPosEnc, resample_abs_pos_embed, sincos_pos_embed_2d

__all__ = [
    "DropPath", "LayerScale", "drop_path", "stochastic_depth_rates",
    "ConvEmbed", "ConvStem", "OverlapPatchEmbed", "PatchEmbed", "PatchMerging", "ResNetStem",
    "ClassifierHead", "to_2tuple",
    "ConvMlp", "Mlp", "Affine", "BatchNormNHWC", "GroupNorm1NHWC", "LayerNorm", "LayerNorm2d",
    "AbsolutePosEmbed", "ConditionalPosEnc", "resample_abs_pos_embed", "sincos_pos_embed_2d",
]
