"""``mixlab arena``: compare architectures under one recipe, budget and set of seeds."""
from .runner import DEFAULT_MODELS, ArenaSettings, expand_models, measure_speed, run_arena

__all__ = ["DEFAULT_MODELS", "ArenaSettings", "expand_models", "measure_speed", "run_arena"]
