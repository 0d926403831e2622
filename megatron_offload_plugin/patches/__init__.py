"""Every change the plugin makes to upstream code goes through this registry (see registry.py).

``megatron_core.py`` lists the patches; ``registry.py`` checks, applies and reverts them;
``versions.py`` answers which upstream version is installed and how it differs.
"""

from .registry import (
    PLUGIN_MARKER,
    Patch,
    PatchDefinitionError,
    PatchError,
    PatchSet,
    UnsupportedVersionError,
    UpstreamMismatchError,
)
from .versions import (
    backward_step_has_model_type,
    checkpointed_forward_location,
    get_forward_backward_func_takes_schedule_pg_collection,
    installed_version,
    megatron_core_version,
)

__all__ = [
    "PLUGIN_MARKER",
    "Patch",
    "PatchDefinitionError",
    "PatchError",
    "PatchSet",
    "UnsupportedVersionError",
    "UpstreamMismatchError",
    "backward_step_has_model_type",
    "checkpointed_forward_location",
    "get_forward_backward_func_takes_schedule_pg_collection",
    "installed_version",
    "megatron_core_version",
]
