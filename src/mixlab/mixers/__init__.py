"""Spatial mixers: every one is context aggregation ``Y = (A·V)·W`` (see ``base``).

Every subclass of :class:`Mixer` defined in a module of this package is exported here: the
modules are imported one by one, so a family's mixer is one file (``mixers/<family>.py``) that
nothing else has to name. ``mixlab.mixers.__all__`` lists them (with the helpers of ``base``).
"""
from importlib import import_module
from pkgutil import iter_modules

from .base import Mixer, aggregate, conv_toeplitz, expand_groups, flatten_tokens

__all__ = ["Mixer", "aggregate", "conv_toeplitz", "expand_groups", "flatten_tokens"]

for _info in sorted(iter_modules(__path__), key=lambda m: m.name):
    _module = import_module(f"{__name__}.{_info.name}")
    for _name, _obj in sorted(vars(_module).items()):
        if isinstance(_obj, type) and issubclass(_obj, Mixer) and _obj is not Mixer \
                and _obj.__module__ == _module.__name__:
            globals()[_name] = _obj
            __all__.append(_name)
del _info, _module, _name, _obj
