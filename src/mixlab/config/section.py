"""What a task's own configuration section is made of (:class:`TaskSection`), and the configuration's error.

The fixed sections (``model:``, ``data:``, ``train:``, ...) are fields of :class:`mixlab.config.Config`. A task
that needs keys of its own (``distill:`` for ``task: distill``, ``mim:`` for masked image modeling) declares
them as a :class:`TaskSection` instead of editing the fixed part: the dataclass of its keys, a check of their
values, why they cannot change on resume, and the task that reads them. ``mixlab.config`` registers it, and
from then on a ``Config`` carries it as an attribute like the fixed sections, and merging YAML layers and
``--set``, ``to_dict``/``config.yaml``, ``config_from_dict``, ``validate`` and ``resume_config`` all read it.

This module imports nothing of mixlab and nothing of its own package, so that the sections of
``mixlab.config.tasks`` can import it while the package imports them (no circle).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says which key and why."""


@dataclass(frozen=True)
class TaskSection:
    """A configuration section owned by a task, declared once beside the task's other settings.

    ``name`` is the section's key (``distill``: ``cfg.distill``, ``--set distill.alpha=0.3``), ``type`` the
    dataclass of its keys with their defaults and annotations (merging checks values against them, as for the
    fixed sections). ``validate(cfg)`` checks what types alone cannot (it gets the whole configuration, so it
    can look across sections) and raises :class:`ConfigError`; it runs when ``cfg.task`` is ``task`` (always
    when ``task`` is None). ``choices`` maps a key to its valid values, checked with the fixed sections'
    choices whatever the task (a key whose annotation admits ``bool`` compares in lower case, so YAML's
    ``true`` reads as ``"true"``, as ``log.progress`` does). ``resume_refused`` says why the section cannot
    change when a run resumes, ``resume_safe`` names the keys that may (the others are refused).

    ``task`` ties the section to one task: while the configuration names another, a key of the section that
    differs from its default is an error ("distill.teacher is set but task is 'classification'; set task:
    distill to distil from a teacher, or leave distill.teacher out"; ``purpose`` is the "to distil from a
    teacher" part, may be empty).
    """
    name: str
    type: type
    resume_refused: str
    validate: Callable[[Any], None] | None = None
    resume_safe: tuple[str, ...] = ()
    task: str | None = None
    purpose: str = ""
    choices: dict[str, tuple] = field(default_factory=dict)

    def __post_init__(self):
        if not self.name.isidentifier() or self.name.startswith("_"):
            raise ValueError(f"a configuration section's name is a key of config.yaml and a Python attribute, "
                             f"got {self.name!r}")
        if not (isinstance(self.type, type) and dataclasses.is_dataclass(self.type)):
            raise ValueError(f"section {self.name!r}: its type must be a dataclass of its keys, got {self.type!r}")
        try:
            self.type()
        except TypeError as e:
            raise ValueError(f"section {self.name!r}: every key of {self.type.__name__} needs a default ({e})") \
                from None
        if not isinstance(self.resume_refused, str) or not self.resume_refused.strip():
            raise ValueError(f"section {self.name!r}: say why it cannot change on resume (resume_refused)")
        keys = {f.name for f in dataclasses.fields(self.type)}
        for what, names in (("resume_safe", self.resume_safe), ("choices", self.choices)):
            unknown = sorted(set(names) - keys)
            if unknown:
                raise ValueError(f"section {self.name!r}: {what} names {unknown}, which are not keys of "
                                 f"{self.type.__name__} ({', '.join(sorted(keys))})")
        object.__setattr__(self, "resume_safe", tuple(self.resume_safe))

    def changed_keys(self, obj) -> list[str]:
        """The keys of ``obj`` (an instance of :attr:`type`) whose values differ from the defaults, in order."""
        default = self.type()
        return [f.name for f in dataclasses.fields(self.type) if getattr(obj, f.name) != getattr(default, f.name)]
