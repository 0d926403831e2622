"""megatron-offload-plugin: pipeline activation offload, zero-bubble schedules and layer-wise
optimizer offload for Megatron-core and DeepSpeed, as a drop-in plugin.

    import megatron_offload_plugin
    megatron_offload_plugin.apply({"schedule": {"pipeline_schedule": "megatron"}})
    ...  # the user's Megatron training, unchanged
    megatron_offload_plugin.revert()
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "apply", "revert", "active_config", "active_runtime", "is_applied", "describe"]


def __getattr__(name: str) -> Any:
    # Importing the package stays cheap (no megatron/pydantic) until the API is used.
    if name in __all__:
        from . import plugin

        return getattr(plugin, name)
    raise AttributeError(f"module 'megatron_offload_plugin' has no attribute {name!r}")
