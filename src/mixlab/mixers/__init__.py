"""Spatial mixers: every one is context aggregation ``Y = (A·V)·W`` (see ``base``)."""
from .attention import Attention
from .base import Mixer, aggregate, conv_toeplitz, expand_groups, flatten_tokens
from .container import ContainerMixer
from .conv import DepthwiseConv
from .mlp import TokenMixingMLP
from .pool import Pooling
from .window import WindowAttention

__all__ = ["Mixer", "aggregate", "conv_toeplitz", "expand_groups", "flatten_tokens", "Attention",
           "WindowAttention", "DepthwiseConv", "TokenMixingMLP", "Pooling", "ContainerMixer"]
