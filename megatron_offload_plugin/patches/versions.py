"""Installed upstream versions, and the upstream differences the patches must respect.

Each helper answers from a version table (so a patch can reason about a version
that is not installed), and, for the installed megatron-core, also inspects the
code and raises :class:`~.registry.UpstreamMismatchError` if the two disagree:
a wrong table entry or an unusual build is caught at apply time, not mid-step.

Sources of truth: the 0.16 side is the installed megatron-core 0.16.1
(``pipeline_parallel/schedules.py``: ``backward_step(input_tensor, output_tensor,
output_tensor_grad, model_type, config)`` and ``get_forward_backward_func(pp_size,
vp_size)``; ``transformer/transformer_block.py``: ``TransformerBlock._checkpointed_forward``,
no ``transformer/recompute.py``).  The 0.17-0.19 sides come from the design notes
(DESIGN.md, "Upstream facts"); they were not checked against those releases here,
which is why the installed one is always cross-checked by inspection.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from typing import Any

from packaging.version import InvalidVersion, Version

MEGATRON_CORE = "megatron-core"

# First megatron-core minor release with each change (compared on (major, minor), so a
# 0.18.0rc0 build counts as 0.18: pre-releases already carry the new layout).
BACKWARD_STEP_DROPS_MODEL_TYPE = (0, 17)
CHECKPOINTED_FORWARD_MOVES_TO_RECOMPUTE = (0, 18)
GET_FORWARD_BACKWARD_FUNC_ADDS_SCHEDULE_PG_COLLECTION = (0, 19)

BLOCK_CHECKPOINTED_FORWARD = "megatron.core.transformer.transformer_block:TransformerBlock._checkpointed_forward"
RECOMPUTE_CHECKPOINTED_FORWARD = "megatron.core.transformer.recompute:checkpointed_forward"


def installed_version(distribution: str) -> Version | None:
    """The installed version of ``distribution`` (pip name), or None if it is not installed."""
    try:
        raw = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    try:
        return Version(raw)
    except InvalidVersion as err:
        from .registry import UnsupportedVersionError

        raise UnsupportedVersionError(
            f"{distribution} reports version {raw!r}, which is not a PEP 440 version; "
            f"reinstall {distribution} from a release"
        ) from err


def megatron_core_version() -> Version | None:
    """The installed megatron-core version, or None."""
    return installed_version(MEGATRON_CORE)


def backward_step_has_model_type(version: Version | str | None = None) -> bool:
    """``schedules.backward_step`` takes ``model_type`` before 0.17 (dropped in 0.17).

    ``version=None`` means the installed megatron-core, cross-checked against its signature.
    """
    answer = not _at_least(version, BACKWARD_STEP_DROPS_MODEL_TYPE)
    if version is None:
        from megatron.core.pipeline_parallel import schedules

        _cross_check("backward_step has 'model_type'", answer,
                     _has_parameter(schedules.backward_step, "model_type"))
    return answer


def checkpointed_forward_location(version: Version | str | None = None) -> str:
    """Where block-level recompute lives: a TransformerBlock method before 0.18, ``recompute.py`` after.

    From 0.18 ``transformer_block`` imports ``checkpointed_forward`` by name, so a patch on the
    returned location should keep ``rebind_imported=True``.
    """
    new = _at_least(version, CHECKPOINTED_FORWARD_MOVES_TO_RECOMPUTE)
    location = RECOMPUTE_CHECKPOINTED_FORWARD if new else BLOCK_CHECKPOINTED_FORWARD
    if version is None:
        _cross_check(f"{location} exists", True, _location_exists(location))
    return location


def get_forward_backward_func_takes_schedule_pg_collection(version: Version | str | None = None) -> bool:
    """``schedules.get_forward_backward_func`` gains ``schedule_pg_collection`` in 0.19."""
    answer = _at_least(version, GET_FORWARD_BACKWARD_FUNC_ADDS_SCHEDULE_PG_COLLECTION)
    if version is None:
        from megatron.core.pipeline_parallel import schedules

        _cross_check("get_forward_backward_func has 'schedule_pg_collection'", answer,
                     _has_parameter(schedules.get_forward_backward_func, "schedule_pg_collection"))
    return answer


# ---------------------------------------------------------------------------------------------


def _at_least(version: Version | str | None, release: tuple[int, int]) -> bool:
    """``version`` (None: installed megatron-core) is ``release`` or later, pre-releases included."""
    resolved = _resolve(version)
    return tuple(resolved.release[:2]) >= release


def _resolve(version: Version | str | None) -> Version:
    if isinstance(version, Version):
        return version
    if isinstance(version, str):
        return Version(version)
    installed = megatron_core_version()
    if installed is None:
        from .registry import UnsupportedVersionError

        raise UnsupportedVersionError(
            f"{MEGATRON_CORE} is not installed; install it (pip install '{MEGATRON_CORE}>=0.16,<0.20')"
        )
    return installed


def _cross_check(fact: str, expected: bool, found: bool) -> None:
    """Raise if the version table and the installed code disagree about ``fact``."""
    if expected == found:
        return
    from .registry import UpstreamMismatchError

    raise UpstreamMismatchError(
        f"{MEGATRON_CORE} {megatron_core_version()}: the version table says {fact} is {expected}, "
        f"but the installed code says {found}. This build differs from the release it claims to be; "
        "install a released megatron-core or update megatron_offload_plugin/patches/versions.py"
    )


def _has_parameter(function: Any, name: str) -> bool:
    return name in inspect.signature(function).parameters


def _location_exists(location: str) -> bool:
    """Whether ``module:Class.attr`` imports and is defined there (not inherited)."""
    module_name, _, path = location.partition(":")
    try:
        owner: Any = importlib.import_module(module_name)
    except ImportError:
        return False
    for part in path.split("."):
        namespace = getattr(owner, "__dict__", {})
        if part not in namespace:
            return False
        owner = namespace[part]
    return True
