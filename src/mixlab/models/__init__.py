"""Named architectures. Importing this package registers every model, layout and spec mixer.

The order of the imports is the order of registration: the spec language's own mixers first
(``mixlab list --mixers`` shows them in that order), and among the broad checkpoint layouts
(:func:`mixlab.registry.register_layout`) the order in which they are tried.
"""
from . import spec  # noqa: F401  (the built-in spec mixers, before the families add theirs)
from . import container, convnext, mlp_mixer, nano, poolformer, resnet, swin, vit  # noqa: F401
from . import (cait, convit, cyclemlp, dwnet, efficientformer, gfnet, gmlp, replknet, resmlp, s2mlp,  # noqa: F401
               shiftvit, vip)
from . import botnet, cetnet, coatnet, cvt, lrnet, pvt, tree_filter, vit_c  # noqa: F401
from .base import FeatureExtractor, HierarchicalModel, MixlabModel, Stage
from .blocks import MetaBlock

__all__ = ["FeatureExtractor", "HierarchicalModel", "MixlabModel", "Stage", "MetaBlock"]
