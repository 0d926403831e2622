"""``apply(config)`` / ``revert()``: the one switch between plain Megatron-core and the plugin.

The active application is process state by nature (it patches modules every
caller shares), so it lives here and nowhere else.  ``apply`` validates the
configuration and every patch before touching anything; with the default
configuration it installs only the schedule dispatcher, which hands back
Megatron's own schedule functions, so results stay bitwise those of Megatron.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import PluginConfig, config_from_mapping

logger = logging.getLogger("megatron_offload_plugin")

_LOCK = threading.Lock()


@dataclass
class _Application:
    config: PluginConfig
    patch_set: Any  # patches.PatchSet
    runtime: Any  # runtime.plugin_runtime.PluginRuntime | None
    offload: Any = None  # offload.activation.ActivationOffload | None


_ACTIVE: _Application | None = None


def _as_config(config: PluginConfig | Mapping[str, Any] | None) -> PluginConfig:
    if config is None:
        return PluginConfig()
    if isinstance(config, PluginConfig):
        return config
    if isinstance(config, Mapping):
        return config_from_mapping(config, source="megatron_offload_plugin.apply()")
    raise TypeError(
        f"megatron_offload_plugin.apply(config=...): expected a PluginConfig, a mapping or None, "
        f"got {type(config).__name__}"
    )


def apply(config: PluginConfig | Mapping[str, Any] | None = None) -> PluginConfig:
    """Patch Megatron-core for ``config``; idempotent for the same config.

    Raises ``PatchError``/``UnsupportedVersionError`` (nothing changed) when the
    installed megatron-core or a combination of options is not supported, and
    ``RuntimeError`` if the plugin is already applied with another configuration.
    """
    global _ACTIVE
    from .patches import PatchSet
    from .patches.megatron_core import patches_for

    cfg = _as_config(config)
    with _LOCK:
        if _ACTIVE is not None:
            if _ACTIVE.config == cfg:
                return cfg
            raise RuntimeError(
                "megatron_offload_plugin is already applied with another configuration; "
                "call megatron_offload_plugin.revert() first"
            )
        from .runtime.plugin_runtime import build_runtime

        from .offload.activation import make_activation_offload

        offload = make_activation_offload(cfg.activation_offload)
        runtime = build_runtime(cfg, offload)
        patch_set = PatchSet(log=cfg.telemetry.log_patches)
        patch_set.apply(patches_for(cfg, runtime, offload))
        _ACTIVE = _Application(config=cfg, patch_set=patch_set, runtime=runtime, offload=offload)
    return cfg


def revert() -> None:
    """Restore every patched upstream object (idempotent)."""
    global _ACTIVE
    with _LOCK:
        if _ACTIVE is None:
            return
        _ACTIVE.patch_set.revert()
        if _ACTIVE.offload is not None:
            _ACTIVE.offload.close()
        _ACTIVE = None


def active_config() -> PluginConfig | None:
    return _ACTIVE.config if _ACTIVE is not None else None


def active_runtime() -> Any:
    """The plugin runtime of the active application (None with Megatron's own schedules)."""
    return _ACTIVE.runtime if _ACTIVE is not None else None


def active_offload() -> Any:
    """The activation offload of the active application (engine, statistics), or None."""
    return _ACTIVE.offload if _ACTIVE is not None else None


def is_applied() -> bool:
    return _ACTIVE is not None


def describe() -> str:
    """One line for logs: what is applied."""
    if _ACTIVE is None:
        return "plugin not applied (plain Megatron-core)"
    cfg = _ACTIVE.config
    return (
        f"pipeline-schedule={cfg.schedule.pipeline_schedule} "
        f"activation-offload={cfg.activation_offload.mode} "
        f"patches={','.join(_ACTIVE.patch_set.names()) or 'none'}"
    )
