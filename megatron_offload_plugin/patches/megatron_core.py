"""Every replacement the plugin makes in Megatron-core, listed in one place.

Each entry is a :class:`Patch`: the upstream attribute it replaces, the
megatron-core versions it was checked against, why it exists, and a factory
that builds the replacement from the original.  ``patches_for(config)`` picks
the ones a configuration needs; :mod:`megatron_offload_plugin.plugin` applies
them through the registry, which checks versions and conflicts first.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from typing import TYPE_CHECKING

from ..config import PluginConfig
from .registry import Patch

if TYPE_CHECKING:
    from ..runtime.plugin_runtime import PluginRuntime

SUPPORTED_MEGATRON_CORE = ">=0.16,<0.20"

SCHEDULE_DISPATCH = "pp-schedule-dispatch"
GET_FORWARD_BACKWARD_FUNC = "megatron.core.pipeline_parallel.schedules:get_forward_backward_func"

# Marks every callable the plugin installs, so tests and users can tell them apart.
PLUGIN_MARKER = "__megatron_offload_plugin__"


def make_schedule_dispatcher(
    config: PluginConfig, runtime_func: Callable[..., Any] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Factory for the ``get_forward_backward_func`` replacement.

    Megatron-LM binds ``get_forward_backward_func`` by ``from ... import`` and
    calls it every iteration, so replacing it (and every rebinding site) is the
    one place where a plugin schedule can be chosen per call.  For
    ``pipeline_schedule='megatron'`` it returns exactly Megatron's own function.
    """
    schedule = config.schedule.pipeline_schedule

    def factory(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def get_forward_backward_func(*args: Any, **kwargs: Any) -> Callable[..., Any]:
            megatron_func = original(*args, **kwargs)
            if runtime_func is None:
                return megatron_func
            from megatron.core.pipeline_parallel import schedules

            if megatron_func is schedules.forward_backward_no_pipelining:
                return megatron_func  # no pipeline, nothing to schedule
            return runtime_func

        setattr(get_forward_backward_func, PLUGIN_MARKER, SCHEDULE_DISPATCH)
        return get_forward_backward_func

    return factory


def patches_for(config: PluginConfig, runtime: "PluginRuntime | None" = None) -> list[Patch]:
    """The patches a configuration needs, in the order they are applied."""
    patches = []
    if runtime is not None and runtime.splits_weight_gradients:
        patches.append(wgrad_split_patch(runtime.store))
    return patches + [
        Patch(
            name=SCHEDULE_DISPATCH,
            target=GET_FORWARD_BACKWARD_FUNC,
            make_replacement=make_schedule_dispatcher(config, runtime.forward_backward if runtime else None),
            versions=SUPPORTED_MEGATRON_CORE,
            reason=f"pipeline schedule '{config.schedule.pipeline_schedule}'",
            rebind_imported=True,
            extra_sites=("megatron.core.pipeline_parallel:get_forward_backward_func",),
        )
    ]


WGRAD_SPLIT = "linear-wgrad-split"
LINEAR_BACKWARD = (
    "megatron.core.tensor_parallel.layers:LinearWithGradAccumulationAndAsyncCommunication.backward"
)


def wgrad_split_patch(store: Any) -> Patch:
    """Column/RowParallelLinear backward that defers the weight GEMM while ``store`` captures a B."""

    def factory(original: Callable[..., Any]) -> Callable[..., Any]:
        from megatron.core.tensor_parallel import layers

        from ..runtime.wgrad import make_split_backward

        # Keep upstream's autocast handling of backward (custom_bwd) around the split version.
        return layers.custom_bwd(make_split_backward(original, store))

    return Patch(
        name=WGRAD_SPLIT,
        target=LINEAR_BACKWARD,
        make_replacement=factory,
        versions=SUPPORTED_MEGATRON_CORE,
        reason="B/W split: input gradients in B, weight gradients in W",
        rebind_imported=False,
    )
