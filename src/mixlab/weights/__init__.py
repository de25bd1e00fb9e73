"""Weights from the ecosystem: safe reading, conversion from timm's and the authors' names,
loading with clear errors."""
from .convert import architecture_kwargs, convert_state_dict, detect_format
from .load import DEFAULT_WEIGHTS, LoadResult, load_pretrained, read_checkpoint

__all__ = ["architecture_kwargs", "convert_state_dict", "detect_format",
           "DEFAULT_WEIGHTS", "LoadResult", "load_pretrained", "read_checkpoint"]
