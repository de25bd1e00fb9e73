"""Training-engine parts: optimizers, schedules, EMA and checkpoints."""
from ..models.base import unwrap_model
from .checkpoint import CheckpointManager, load_state, rng_state, save_state, set_rng_state
from .ema import ModelEma
from .optim import Lamb, build_optimizer, layer_ids, param_groups
from .scheduler import WarmupScheduler, build_scheduler

__all__ = [
    "build_optimizer", "param_groups", "layer_ids", "Lamb",
    "build_scheduler", "WarmupScheduler",
    "ModelEma", "unwrap_model",
    "CheckpointManager", "save_state", "load_state", "rng_state", "set_rng_state",
]
