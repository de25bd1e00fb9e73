"""Spatial mixers: every one is context aggregation ``Y = (A·V)·W`` (see ``base``). Every subclass of
:class:`Mixer` defined in this package is exported here."""
from .attention import Attention, QKVAttention
from .base import Mixer, aggregate, conv_toeplitz, expand_groups, flatten_tokens
from .bot import BottleneckAttention
from .container import ContainerMixer
from .context import CrissCrossAttention, GlobalContextBlock, NonLocalBlock
from .conv import DepthwiseConv
from .conv_attention import ConvAttention
from .dwnet import DWNetMixer
from .dynamic_conv import DynamicDepthwiseConv
from .global_filter import GlobalFilter
from .gpsa import GatedPositionalAttention
from .large_kernel import ReparamLargeKernelConv
from .lewin import LEWinAttention
from .local_relation import LocalRelation
from .offset_attention import OffsetBiasAttention
from .pool import Pooling
from .rel_attention import RelativeAttention
from .shift import CycleMixer, PartialShift, SplitShiftMixer
from .sra import SpatialReductionAttention
from .talking_heads import ClassAttention, TalkingHeadsAttention
from .token_mlp import PermuteMLP, SpatialGatingMLP, TokenLinear, TokenMixingMLP
from .tree_filter import TreeFilterBlock, TreeFilterMixer
from .window import WindowAttention

__all__ = [
    "Mixer", "aggregate", "conv_toeplitz", "expand_groups", "flatten_tokens",
    # attention
    "Attention", "QKVAttention", "BottleneckAttention", "ClassAttention", "ConvAttention", "GatedPositionalAttention",
    "LEWinAttention", "OffsetBiasAttention", "RelativeAttention", "SpatialReductionAttention",
    "TalkingHeadsAttention", "WindowAttention",
    # convolutions, pooling, filters
    "DepthwiseConv", "DynamicDepthwiseConv", "DWNetMixer", "GlobalFilter", "LocalRelation", "Pooling",
    "ReparamLargeKernelConv",
    # token MLPs and shifts
    "TokenMixingMLP", "TokenLinear", "SpatialGatingMLP", "PermuteMLP", "PartialShift", "SplitShiftMixer",
    "CycleMixer",
    # mixed and global context
    "ContainerMixer", "NonLocalBlock", "CrissCrossAttention", "GlobalContextBlock", "TreeFilterMixer",
    "TreeFilterBlock",
]
