"""Named architectures. Importing this package registers every model."""
from . import container, convnext, mlp_mixer, nano, poolformer, resnet, swin, vit  # noqa: F401
from . import (cait, convit, cyclemlp, dwnet, efficientformer, gfnet, gmlp, replknet, resmlp, s2mlp,  # noqa: F401
               shiftvit, vip)
from . import botnet, cetnet, coatnet, cvt, lrnet, pvt, tree_filter, vit_c  # noqa: F401
from .base import FeatureExtractor, HierarchicalModel, MixlabModel, Stage
from .blocks import MetaBlock

__all__ = ["FeatureExtractor", "HierarchicalModel", "MixlabModel", "Stage", "MetaBlock"]
