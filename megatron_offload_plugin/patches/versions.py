"""Installed upstream versions and the upstream differences patches must respect."""

from __future__ import annotations

import importlib.metadata
import inspect

from packaging.version import Version


def installed_version(distribution: str) -> Version | None:
    try:
        return Version(importlib.metadata.version(distribution))
    except importlib.metadata.PackageNotFoundError:
        return None


def megatron_core_version() -> Version | None:
    return installed_version("megatron-core")


def backward_step_has_model_type() -> bool:
    """megatron-core < 0.17: ``backward_step(input, output, grad, model_type, config)``."""
    from megatron.core.pipeline_parallel import schedules

    return "model_type" in inspect.signature(schedules.backward_step).parameters


def checkpointed_forward_location() -> str:
    """Block-level recompute: a TransformerBlock method up to 0.17, ``recompute.py`` from 0.18."""
    version = megatron_core_version()
    if version is not None and version >= Version("0.18"):
        return "megatron.core.transformer.recompute:checkpointed_forward"
    return "megatron.core.transformer.transformer_block:TransformerBlock._checkpointed_forward"


def get_forward_backward_func_takes_schedule_pg_collection() -> bool:
    """0.19 adds ``schedule_pg_collection`` to ``get_forward_backward_func``."""
    from megatron.core.pipeline_parallel import schedules

    params = inspect.signature(schedules.get_forward_backward_func).parameters
    return "schedule_pg_collection" in params
