"""The checkpoint room: reading and writing weight files (:mod:`~mixlab.weights.io`), whether a
state dict fits a model (:mod:`~mixlab.weights.fit`), conversion from timm's and the authors'
names (:mod:`~mixlab.weights.convert`), loading with clear errors (:mod:`~mixlab.weights.load`)."""
from .convert import architecture_kwargs, convert_state_dict, detect_format
from .fit import FitReport, check_compatible, fit_lines, fit_report
from .io import (CheckpointError, checkpoint_metadata, describe_source, load_metadata, load_weights, metadata_config,
                 read_checkpoint, save_weights, timm_data_config)
from .load import LoadResult, load_pretrained, load_state

__all__ = ["architecture_kwargs", "convert_state_dict", "detect_format",
           "FitReport", "check_compatible", "fit_lines", "fit_report",
           "CheckpointError", "checkpoint_metadata", "describe_source", "load_metadata", "load_weights", "metadata_config",
           "read_checkpoint", "save_weights", "timm_data_config",
           "LoadResult", "load_pretrained", "load_state"]
