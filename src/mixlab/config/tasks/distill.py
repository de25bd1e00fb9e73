"""The ``distill:`` section: the keys of knowledge distillation (``task: distill``,
``mixlab.engine.tasks.distill``). See the "Distillation" section of docs/tasks.md."""
from __future__ import annotations

from dataclasses import dataclass

from ..section import ConfigError, TaskSection


@dataclass
class DistillConfig:
    """Knowledge distillation (``task: distill``; DeiT, "Training data-efficient image transformers &
    distillation through attention"). See docs/tasks.md."""
    #: the teacher: a mixlab run directory (its best checkpoint), a weights file with mixlab metadata
    #: (.safetensors / .pth), or a registered model name (then with teacher_weights)
    teacher: str | None = None
    #: the weights of a teacher given by model name: a file or an ``hf-hub:`` id
    teacher_weights: str | None = None
    #: hard (the teacher's argmax, DeiT's default) | soft (KL divergence at temperature tau)
    type: str = "hard"
    #: weight of the distillation loss; the label loss has 1 - alpha
    alpha: float = 0.5
    #: temperature of soft distillation
    tau: float = 1.0
    #: keep the teacher's logits per training image: auto (when the training images are not augmented and
    #: there is no mixup/cutmix) | true (an error when they are) | false (YAML booleans too)
    cache: str | bool = "auto"


#: what ``distill.teacher`` may be (the messages of a missing or unusable teacher)
TEACHER_KINDS = ("a mixlab run directory (its best checkpoint), a .safetensors / .pth weights file with mixlab "
                 "metadata, or a registered model name with distill.teacher_weights (a file or hf-hub:ORG/NAME)")


def validate(cfg) -> None:
    """The checks of ``task: distill``'s keys that their types cannot express (the teacher is loaded and
    checked against the data when the run starts, by the task)."""
    dc = cfg.distill
    if not dc.teacher:
        raise ConfigError(f"task distill needs a teacher: set distill.teacher to {TEACHER_KINDS}")
    if not 0.0 <= dc.alpha <= 1.0:
        raise ConfigError(f"distill.alpha is the weight of the distillation loss, in [0, 1]; got {dc.alpha}")
    if not dc.tau > 0:
        raise ConfigError(f"distill.tau is a temperature and must be positive, got {dc.tau}")


SECTION = TaskSection(
    "distill", DistillConfig, task="distill", purpose="to distil from a teacher", validate=validate,
    choices={"type": ("hard", "soft"), "cache": ("auto", "true", "false")},
    resume_refused="the checkpoints hold a student trained against this teacher and loss")
