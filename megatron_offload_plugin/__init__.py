"""megatron-offload-plugin: pipeline activation offload, zero-bubble schedules and layer-wise
optimizer offload for Megatron-core and DeepSpeed, as a drop-in plugin.

    import megatron_offload_plugin
    megatron_offload_plugin.apply({"schedule": {"pipeline_schedule": "megatron"}})
    ...  # the user's Megatron training, unchanged
    megatron_offload_plugin.revert()
"""

from __future__ import annotations

__version__ = "0.1.0"

from .plugin import active_config, apply, describe, is_applied, revert

__all__ = ["__version__", "apply", "revert", "active_config", "is_applied", "describe"]
