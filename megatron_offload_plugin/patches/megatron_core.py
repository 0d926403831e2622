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
        patches.append(ddp_split_hook_patch(runtime.store))
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


DDP_SPLIT_HOOK = "ddp-grad-hook-split"
DDP_MAKE_HOOK = "megatron.core.distributed.distributed_data_parallel:DistributedDataParallel._make_backward_post_hook"


def ddp_split_hook_patch(store: Any) -> Patch:
    """Megatron DDP's grad hook, skipping the one empty call B makes for a split weight.

    The hook runs on each parameter's accumulation node and, with ``overlap_grad_reduce``,
    asserts a gradient arrived and counts the parameter ready; in B a split weight gets
    none (its W delivers it later through the same node, and the hook runs then).
    """

    def factory(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def _make_backward_post_hook(self: Any, param: Any) -> Callable[..., Any]:
            hook = original(self, param)
            setattr(self, SPLIT_AWARE_DDP, True)

            def hook_after_w(*unused: Any) -> None:
                if store.owes_gradient(param):
                    return
                hook(*unused)

            setattr(hook_after_w, PLUGIN_MARKER, DDP_SPLIT_HOOK)
            return hook_after_w

        return _make_backward_post_hook

    return Patch(
        name=DDP_SPLIT_HOOK,
        target=DDP_MAKE_HOOK,
        make_replacement=factory,
        versions=SUPPORTED_MEGATRON_CORE,
        reason="B/W split with Megatron DDP: a weight's grad hook runs when W delivers its gradient",
        rebind_imported=False,
    )


SPLIT_AWARE_DDP = "_megatron_offload_plugin_split_aware_hooks"


def check_ddp_hooks_split_aware(chunks: Any, name: str) -> None:
    """A Megatron DDP built before ``apply()`` has upstream's hooks: with ``overlap_grad_reduce``
    the first B would stop at upstream's assert; say what to do at the first step instead."""
    from megatron.core.distributed import DistributedDataParallel

    for chunk in chunks:
        if isinstance(chunk, DistributedDataParallel) and chunk.ddp_config.overlap_grad_reduce and not getattr(
            chunk, SPLIT_AWARE_DDP, False
        ):
            raise RuntimeError(
                f"--pipeline-schedule {name} with --overlap-grad-reduce: the model's DistributedDataParallel "
                "was built before megatron_offload_plugin.apply(), so its grad hooks do not know that W "
                "delivers the weight gradients; apply the plugin before building the model (or launch "
                "through python -m megatron_offload_plugin.launch)"
            )


V_LAYER_OFFSET = "v-layer-offset"
V_NUM_LAYERS = "v-num-layers"
V_LAST_STAGE = "v-last-stage"
V_PP_LAST_STAGE = "v-pp-last-stage"
V_PP_LAST_RANK = "v-pp-last-rank"
V_TIED_EMBEDDINGS = "v-refuse-tied-embeddings"

# Modules that import the pipeline_parallel.utils functions by name in megatron-core 0.16.1
# through 0.19.0 (checked in each release); listed so that apply() fails loudly if a release
# stops doing so, instead of leaving a copy unpatched.  Other by-name imports (Megatron-LM's
# training.py, the schedules) are found by rebind_imported.
_PP_LAST_STAGE_SITES = (
    "megatron.core.distributed.finalize_model_grads:is_pp_last_stage",
    "megatron.core.models.common.language_module.language_module:is_pp_last_stage",
)
_PP_LAST_RANK_SITES = ("megatron.core.distributed.finalize_model_grads:get_pp_last_rank",)


def _v_stage(pp_size: int, pp_rank: int, vp_stage: int) -> int:
    return pp_rank if vp_stage == 0 else 2 * pp_size - 1 - pp_rank


def _v_configured() -> bool:
    """Two virtual stages in Megatron's parallel state: the one case the V patches answer for.

    The patches are applied only for V schedules (and 'auto', which picks V for two chunks),
    so two virtual stages mean the V placement; anything else gets Megatron's own answers.
    """
    from megatron.core import parallel_state

    return parallel_state.get_virtual_pipeline_model_parallel_world_size() == 2


def _v_config(config: Any, vp_stage: Any) -> bool:
    """The same test for functions that get the model config and a virtual stage."""
    return vp_stage is not None and config.virtual_pipeline_model_parallel_size == 2


def _v_layers(config: Any, pp_rank: int | None, vp_stage: int) -> tuple[int, int]:
    """(offset of the first layer, number of layers) of chunk ``vp_stage`` of ``pp_rank`` in V order.

    The 2p stages share the layers equally, with ``account_for_embedding_in_pipeline_split``
    and ``account_for_loss_in_pipeline_split`` counting the embedding (V stage 0) and the loss
    (V stage 2p-1) as one layer each, as Megatron counts them for its own first and last
    stage; under V both sit on rank 0, so both options lighten rank 0's two chunks.
    """
    if (
        config.pipeline_model_parallel_layout
        or config.num_layers_in_first_pipeline_stage is not None
        or config.num_layers_in_last_pipeline_stage is not None
    ):
        raise NotImplementedError(
            "V-shaped schedules need an even layer split: unset pipeline_model_parallel_layout, "
            "num_layers_in_first_pipeline_stage and num_layers_in_last_pipeline_stage"
        )
    if pp_rank is None:
        from megatron.core import parallel_state

        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    p = config.pipeline_model_parallel_size
    embedding = int(bool(config.account_for_embedding_in_pipeline_split))
    loss = int(bool(config.account_for_loss_in_pipeline_split))
    total, stages = config.num_layers + embedding + loss, 2 * p
    if total % stages:
        counted = "".join(
            f" + 1 ({option})"
            for option, on in (("account_for_embedding_in_pipeline_split", embedding),
                               ("account_for_loss_in_pipeline_split", loss))
            if on
        )
        raise ValueError(
            f"V placement: num_layers={config.num_layers}{counted} = {total} must split evenly over "
            f"2 x pipeline_model_parallel_size = {stages} stages; choose num_layers so that the total "
            f"is a multiple of {stages}"
        )
    per_stage = total // stages
    stage = _v_stage(p, pp_rank, vp_stage)
    offset = stage * per_stage - (embedding if stage > 0 else 0)
    count = per_stage - (embedding if stage == 0 else 0) - (loss if stage == stages - 1 else 0)
    return offset, count


# The factories hold no state, so v_placement_patches() returns equal Patches on every call and
# applying them again to the same PatchSet is a no-op.


def _v_offset_factory(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def get_transformer_layer_offset(config: Any, vp_stage: Any = None, pp_rank: Any = None) -> int:
        if not _v_config(config, vp_stage):
            return original(config, vp_stage=vp_stage, pp_rank=pp_rank)
        return _v_layers(config, pp_rank, vp_stage)[0]

    return get_transformer_layer_offset


def _v_num_layers_factory(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def get_num_layers_to_build(config: Any, vp_stage: Any = None, pp_rank: Any = None) -> int:
        if not _v_config(config, vp_stage):
            return original(config, vp_stage=vp_stage, pp_rank=pp_rank)
        return _v_layers(config, pp_rank, vp_stage)[1]

    return get_num_layers_to_build


def _v_last_stage_factory(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def is_pipeline_last_stage(ignore_virtual: bool = True, vp_stage: Any = None) -> bool:
        from megatron.core import parallel_state

        if not _v_configured() or (not ignore_virtual and vp_stage is None):
            return original(ignore_virtual=ignore_virtual, vp_stage=vp_stage)
        on_rank0 = parallel_state.get_pipeline_model_parallel_rank() == 0
        return on_rank0 if ignore_virtual else on_rank0 and vp_stage == 1

    return is_pipeline_last_stage


def _v_pp_last_stage_factory(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def is_pp_last_stage(pp_group: Any) -> bool:
        if not _v_configured():
            return original(pp_group)
        from megatron.core.utils import get_pg_rank

        return get_pg_rank(pp_group) == 0

    return is_pp_last_stage


def _v_pp_last_rank_factory(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def get_pp_last_rank(pp_group: Any) -> int:
        if not _v_configured():
            return original(pp_group)
        import torch

        return torch.distributed.get_process_group_ranks(pp_group)[0]

    return get_pp_last_rank


def _v_tied_embeddings_factory(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def setup_embeddings_and_output_layer(self: Any) -> None:
        tied = self.share_embeddings_and_output_weights and self.config.pipeline_model_parallel_size > 1
        if tied and _v_configured():
            raise NotImplementedError(
                "V placement (--pipeline-schedule zb-v, v-half, v-min, or auto with two chunks per rank) "
                "puts the embedding and the output layer in two chunks of pipeline rank 0, but "
                "share_embeddings_and_output_weights=True ties them through Megatron's embedding group "
                "of the first and last pipeline ranks; add --untie-embeddings-and-output-weights "
                "(share_embeddings_and_output_weights=False)"
            )
        original(self)

    return setup_embeddings_and_output_layer


def v_placement_patches() -> list[Patch]:
    """Build and train model chunks in V order: rank r holds stages r (chunk 0) and 2p-1-r (chunk 1).

    Megatron assumes its interleaved order, where the last stage is chunk vp-1 of rank p-1.
    Under V (two virtual stages configured) the patched functions answer:

    * ``get_transformer_layer_offset(config, vp_stage, pp_rank)`` and
      ``get_num_layers_to_build(config, vp_stage, pp_rank)``: V stage s = r (chunk 0) or
      2p-1-r (chunk 1) holds the s-th equal share of the layers, with the ``account_for_*``
      options counted as in :func:`_v_layers` (``vp_stage=None`` keeps Megatron's answer).
    * ``parallel_state.is_pipeline_last_stage``: with ``vp_stage``, True only for chunk 1 of
      rank 0; with ``ignore_virtual=True`` ("does this rank hold the last stage"), True on
      rank 0, which holds the loss and returns the reduced losses (Megatron-LM's train_step
      averages them where this is True).  ``ignore_virtual=False`` without ``vp_stage`` keeps
      Megatron's assert.
    * ``pipeline_parallel.utils.is_pp_last_stage(pp_group)``: True on pipeline rank 0.  Every
      caller in megatron-core 0.16 that places or casts the last stage joins it with
      ``is_vp_last_stage(vp_stage)`` (Megatron-LM's get_model for post_process, Float16Module's
      fp32 upcast, LanguageModule's embedding group), so the pair is True exactly for chunk 1
      of rank 0.  ``is_vp_first/last_stage`` and ``is_pp_first_stage`` need no change: under V
      the first stage is still chunk 0 of rank 0 and the last is still chunk vp-1 = 1.
      (``get_pp_next_rank`` asks it too and returns None on rank 0; nothing in core calls it.)
    * ``pipeline_parallel.utils.get_pp_last_rank(pp_group)``: the global rank of pipeline
      rank 0, where ``finalize_model_grads`` must broadcast the per-token-loss token count from.

    Megatron's schedules also ask these functions, but under V the plugin runtime replaces them.

    Tied embedding and output weights are refused when a chunk is built
    (``LanguageModule.setup_embeddings_and_output_layer``): Megatron ties them by an
    all-reduce over the embedding group of the first and last pipeline ranks, but under V
    both live on rank 0, so rank 0 would wait in that all-reduce for a peer that never joins.
    """
    return [
        Patch(
            name=V_LAYER_OFFSET,
            target="megatron.core.transformer.transformer_layer:get_transformer_layer_offset",
            make_replacement=_v_offset_factory,
            versions=SUPPORTED_MEGATRON_CORE,
            reason="V placement: layer numbers of each (rank, chunk)",
        ),
        Patch(
            name=V_NUM_LAYERS,
            target="megatron.core.transformer.transformer_block:get_num_layers_to_build",
            make_replacement=_v_num_layers_factory,
            versions=SUPPORTED_MEGATRON_CORE,
            reason="V placement: layers of each (rank, chunk), account_for_* on rank 0's two chunks",
        ),
        Patch(
            name=V_LAST_STAGE,
            target="megatron.core.parallel_state:is_pipeline_last_stage",
            make_replacement=_v_last_stage_factory,
            versions=SUPPORTED_MEGATRON_CORE,
            reason="V placement: the loss chunk is chunk 1 of pipeline rank 0",
        ),
        Patch(
            name=V_PP_LAST_STAGE,
            target="megatron.core.pipeline_parallel.utils:is_pp_last_stage",
            make_replacement=_v_pp_last_stage_factory,
            versions=SUPPORTED_MEGATRON_CORE,
            reason="V placement: pipeline rank 0 holds the last stage (output layer, loss, fp32 upcast)",
            extra_sites=_PP_LAST_STAGE_SITES,
        ),
        Patch(
            name=V_PP_LAST_RANK,
            target="megatron.core.pipeline_parallel.utils:get_pp_last_rank",
            make_replacement=_v_pp_last_rank_factory,
            versions=SUPPORTED_MEGATRON_CORE,
            reason="V placement: the token count for per-token loss lives on pipeline rank 0",
            extra_sites=_PP_LAST_RANK_SITES,
        ),
        Patch(
            name=V_TIED_EMBEDDINGS,
            target=(
                "megatron.core.models.common.language_module.language_module:"
                "LanguageModule.setup_embeddings_and_output_layer"
            ),
            make_replacement=_v_tied_embeddings_factory,
            versions=SUPPORTED_MEGATRON_CORE,
            reason="V placement: refuse tied embeddings at build instead of hanging in their all-reduce",
            rebind_imported=False,
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
