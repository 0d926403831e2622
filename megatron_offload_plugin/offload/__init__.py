"""Activation offload: the engine (saved tensors per unit, device <-> host), its host pool, copy streams.

One engine serves every caller: pipeline schedules (unit = model chunk x
microbatch), checkpointed regions and layer-wise offload (unit = one call).
"""

from .engine import OffloadEngine, OffloadStateError, OffloadStats
from .host_pool import ALIGNMENT, HostPool, HostPoolExhausted, aligned

__all__ = [
    "ALIGNMENT",
    "HostPool",
    "HostPoolExhausted",
    "OffloadEngine",
    "OffloadStateError",
    "OffloadStats",
    "aligned",
]
