"""Named architectures. Importing this package registers every model, layout and spec mixer.

Every module of this package is imported here, so a family is one file: ``models/<family>.py``
registers its models, checkpoint layouts, default weights and spec mixers when it is imported,
and nothing else has to name it. The spec language's own mixers register first (``mixlab list
--mixers`` shows them first); the families follow in alphabetical order, which is also the
order in which their broad checkpoint layouts are tried (:func:`mixlab.registry.register_layout`).
"""
from importlib import import_module
from pkgutil import iter_modules

from . import spec  # noqa: F401  (the built-in spec mixers, before the families add theirs)
from .base import FeatureExtractor, HierarchicalModel, MixlabModel, Stage
from .blocks import MetaBlock

for _module in sorted(m.name for m in iter_modules(__path__)):
    import_module(f"{__name__}.{_module}")

__all__ = ["FeatureExtractor", "HierarchicalModel", "MixlabModel", "Stage", "MetaBlock"]
