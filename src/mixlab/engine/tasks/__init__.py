"""Training tasks: the protocol (:class:`Task`), the registry (``TASKS``, :func:`register_task`,
:func:`get_task`) and the built-in tasks. See docs/tasks.md."""
from .base import TASKS, Metric, Task, TaskData, autocast, build_task, get_task, register_task
from .classification import ClassificationTask
from .distill import DistillationTask
from .mim import MaskedImageModeling

__all__ = ["Task", "Metric", "TaskData", "TASKS", "register_task", "get_task", "build_task", "autocast",
           "ClassificationTask", "DistillationTask", "MaskedImageModeling"]
