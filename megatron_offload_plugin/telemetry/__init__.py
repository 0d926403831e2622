"""Measurements the plugin reports: activation memory (and, later, offload traffic)."""

from .activation_memory import (
    ActivationTracker,
    CudaAllocatorTracker,
    NullTracker,
    SavedTensorTracker,
    TrackerMode,
    make_activation_tracker,
)

__all__ = [
    "ActivationTracker",
    "CudaAllocatorTracker",
    "NullTracker",
    "SavedTensorTracker",
    "TrackerMode",
    "make_activation_tracker",
]
