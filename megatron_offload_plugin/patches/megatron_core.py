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
    from ..offload.activation import ActivationOffload
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
                if config.activation_offload.mode != "none":
                    raise ValueError(
                        f"--activation-offload {config.activation_offload.mode} offloads pipeline units; this "
                        "run has no pipeline parallelism (pipeline_model_parallel_size 1). Use "
                        "--checkpoint-offload with recompute, or --activation-offload none"
                    )
                return megatron_func  # no pipeline, nothing to schedule
            return runtime_func

        setattr(get_forward_backward_func, PLUGIN_MARKER, SCHEDULE_DISPATCH)
        return get_forward_backward_func

    return factory


def patches_for(
    config: PluginConfig,
    runtime: "PluginRuntime | None" = None,
    activation_offload: "ActivationOffload | None" = None,
) -> list[Patch]:
    """The patches a configuration needs, in the order they are applied."""
    patches = []
    if runtime is not None and runtime.splits_weight_gradients:
        patches.append(wgrad_split_patch(runtime.store))
    if runtime is not None and runtime.v_placement:
        patches += v_placement_patches()
    if activation_offload is not None and activation_offload.regions is not None:
        patches.append(checkpoint_offload_patch(activation_offload.regions))
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


V_LAYER_OFFSET = "v-layer-offset"
V_LAST_STAGE = "v-last-stage"


def _v_stage(pp_size: int, pp_rank: int, vp_stage: int) -> int:
    return pp_rank if vp_stage == 0 else 2 * pp_size - 1 - pp_rank


def v_placement_patches() -> list[Patch]:
    """Build model chunks in V order: rank r holds stages r (chunk 0) and 2p-1-r (chunk 1).

    Megatron numbers layers and picks the loss chunk for its interleaved order; with V,
    chunk 1 of rank r starts at layer (2p-1-r) x layers-per-chunk and the loss chunk is
    chunk 1 of rank 0.  Only calls that name a virtual stage change.
    """

    def offset_factory(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def get_transformer_layer_offset(config: Any, vp_stage: Any = None, pp_rank: Any = None) -> int:
            if vp_stage is None or config.virtual_pipeline_model_parallel_size != 2:
                return original(config, vp_stage=vp_stage, pp_rank=pp_rank)
            if (
                config.pipeline_model_parallel_layout
                or config.num_layers_in_first_pipeline_stage is not None
                or config.num_layers_in_last_pipeline_stage is not None
            ):
                raise NotImplementedError(
                    "V-shaped schedules need an even layer split: unset pipeline_model_parallel_layout, "
                    "num_layers_in_first_pipeline_stage and num_layers_in_last_pipeline_stage"
                )
            from megatron.core import parallel_state

            if pp_rank is None:
                pp_rank = parallel_state.get_pipeline_model_parallel_rank()
            p = config.pipeline_model_parallel_size
            return _v_stage(p, pp_rank, vp_stage) * (config.num_layers // (2 * p))

        return get_transformer_layer_offset

    def last_stage_factory(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def is_pipeline_last_stage(ignore_virtual: bool = True, vp_stage: Any = None) -> bool:
            from megatron.core import parallel_state

            if ignore_virtual or vp_stage is None or parallel_state.get_virtual_pipeline_model_parallel_world_size() != 2:
                return original(ignore_virtual=ignore_virtual, vp_stage=vp_stage)
            return parallel_state.get_pipeline_model_parallel_rank() == 0 and vp_stage == 1

        return is_pipeline_last_stage

    return [
        Patch(
            name=V_LAYER_OFFSET,
            target="megatron.core.transformer.transformer_layer:get_transformer_layer_offset",
            make_replacement=offset_factory,
            versions=SUPPORTED_MEGATRON_CORE,
            reason="V placement: layer numbers of each (rank, chunk)",
        ),
        Patch(
            name=V_LAST_STAGE,
            target="megatron.core.parallel_state:is_pipeline_last_stage",
            make_replacement=last_stage_factory,
            versions=SUPPORTED_MEGATRON_CORE,
            reason="V placement: the loss chunk is chunk 1 of pipeline rank 0",
        ),
    ]


CHECKPOINT_OFFLOAD = "checkpoint-offload"


def checkpoint_offload_patch(regions: Any) -> Patch:
    """``tensor_parallel.checkpoint`` whose kept inputs are offloaded until recompute needs them.

    Upstream refuses offload together with recompute; here the region's saved inputs
    are copied to host after its forward and reloaded when backward reaches its
    output (the previous region prefetched), so the recompute sees the same bytes.
    """

    def factory(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def checkpoint(function: Callable[..., Any], distribute_saved_activations: bool, *args: Any) -> Any:
            return regions.run(original, function, distribute_saved_activations, *args)

        setattr(checkpoint, PLUGIN_MARKER, CHECKPOINT_OFFLOAD)
        return checkpoint

    return Patch(
        name=CHECKPOINT_OFFLOAD,
        target="megatron.core.tensor_parallel:checkpoint",
        make_replacement=factory,
        versions=SUPPORTED_MEGATRON_CORE,
        reason="--checkpoint-offload: recomputed regions keep their inputs on the host",
        rebind_imported=True,
        extra_sites=("megatron.core.tensor_parallel.random:checkpoint",),
    )
