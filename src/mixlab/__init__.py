"""mixlab: vision backbones as context aggregation, ``Y = X + (A·V)·W``.

>>> import mixlab
>>> model = mixlab.create_model("swin_tiny_patch4_window7_224", num_classes=10)
>>> mixlab.list_models("convnext*")
['convnext_base', 'convnext_small', 'convnext_tiny']
"""
from . import layers, mixers, models  # noqa: F401  (registers the models)
from .factory import create_model
from .registry import is_model, list_models, model_family, register_model
from .version import __version__
from .weights import load_pretrained

__all__ = ["create_model", "list_models", "is_model", "model_family", "register_model", "load_pretrained",
           "__version__"]
