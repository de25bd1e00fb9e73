"""Measurements on models: parameters and MACs (more analyses arrive with their issues)."""
from .complexity import ModelProfile, PartProfile, activation_bytes, count_macs, count_params, profile_model

__all__ = ["ModelProfile", "PartProfile", "activation_bytes", "count_macs", "count_params", "profile_model"]
