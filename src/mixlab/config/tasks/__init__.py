"""The configuration sections of the built-in tasks, one module each, named after its task's module in
``mixlab.engine.tasks`` (``distill.py``: ``task: distill``'s ``distill:`` section).

Every module of this package is imported here and declares its section as ``SECTION``, a
:class:`mixlab.config.section.TaskSection`; ``mixlab.config`` registers them all when it is imported, so a
task's section is one file and nothing else names it. They live here, inside the configuration's layer, and
not beside their tasks in the engine: ``mixlab.config`` must know every section before it builds a
configuration, and it may not import the engine (docs/architecture.md). The task imports what it needs of
its section from here.
"""
from importlib import import_module
from pkgutil import iter_modules

#: the sections of the built-in tasks, in the order of their modules' names
BUILT_IN = [import_module(f"{__name__}.{m}").SECTION for m in sorted(m.name for m in iter_modules(__path__))]
