"""Training-engine parts: optimizers, schedules, EMA and checkpoints."""
from .checkpoint import (CheckpointError, CheckpointManager, check_compatible, load_state, load_weights, rng_state,
                         save_state, save_weights, set_rng_state)
from .ema import ModelEma, unwrap_model
from .optim import Lamb, build_optimizer, layer_ids, param_groups
from .scheduler import WarmupScheduler, build_scheduler

__all__ = [
    "build_optimizer", "param_groups", "layer_ids", "Lamb",
    "build_scheduler", "WarmupScheduler",
    "ModelEma", "unwrap_model",
    "CheckpointManager", "CheckpointError", "save_weights", "load_weights", "save_state", "load_state",
    "rng_state", "set_rng_state", "check_compatible",
]
