"""DeepSpeed integration: the ``"layerwise_offload"`` config section.

Either call :func:`initialize` (``deepspeed.initialize``'s signature and return
values) or call :func:`enable` once so that plain ``deepspeed.initialize`` honours
the section (HF Trainer, Accelerate, Megatron-DeepSpeed need no change).
The section's keys and defaults are documented in :mod:`.config`.
"""

from __future__ import annotations

from ..offload.nvme import NvmeIOError
from .checkpoint_guard import CheckpointLayoutError
from .config import SECTION, ActivationsConfig, LayerwiseOffloadConfig, OptimizerStatesConfig, defaults, parse_section
from .optimizer import LayerwiseOffloadOptimizer
from .wiring import (
    DEEPSPEED_VERSIONS,
    disable,
    enable,
    initialize,
    is_enabled,
    layerwise_optimizer,
    section_from_config,
    wire_activations,
)

__all__ = [
    "SECTION",
    "ActivationsConfig",
    "LayerwiseOffloadConfig",
    "OptimizerStatesConfig",
    "LayerwiseOffloadOptimizer",
    "CheckpointLayoutError",
    "NvmeIOError",
    "DEEPSPEED_VERSIONS",
    "defaults",
    "parse_section",
    "initialize",
    "enable",
    "disable",
    "is_enabled",
    "layerwise_optimizer",
    "section_from_config",
    "wire_activations",
]
