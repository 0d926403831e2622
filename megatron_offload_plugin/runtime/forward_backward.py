"""A drop-in for Megatron's ``forward_backward_*`` functions that runs a plugin schedule.

``make_forward_backward_func`` returns a function with exactly the keyword
arguments Megatron's schedule functions take.  It asks a program source for
every rank's list of actions (generated once per (pp, chunks, microbatches)
and cached), and runs this rank's list with :func:`.executor.run_program`.
Arguments it cannot honour fail at the call with the option's name rather
than being ignored.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..schedules.ir import Action, Kind, Placement
from .executor import Step, StepTrace, run_program
from .p2p_plan import RankPlan, plan_p2p
from .wgrad import WeightGradStore

logger = logging.getLogger(__name__)

# (pp, chunks per rank, microbatches, **options) -> (placement, {rank: [Step, ...]})
ProgramSource = Callable[..., tuple[Placement, dict[int, list[Step]]]]


class TraceSink(Protocol):
    """Receives each step's measured actions when it wants them (see ``trace.TraceRecorder``)."""

    def wanted(self) -> bool: ...

    def skip(self) -> None: ...

    def __call__(self, trace: StepTrace) -> None: ...


def forward_only_program(placement: Placement, rank: int, num_microbatches: int) -> list[Step]:
    """Evaluation: each microbatch through this rank's chunks in stage order (sends never block)."""
    chunks = sorted(range(placement.chunks), key=lambda c: placement.stage(rank, c))
    return [Action(c, Kind.F, m) for m in range(num_microbatches) for c in chunks]


def _check_v_model(name: str, chunks: Sequence[Any]) -> None:
    """With V placement the embedding and the output layer sit in two chunks of rank 0;
    Megatron ties them through the embedding group of the first and last *ranks*."""
    for chunk in chunks:
        module = chunk
        while hasattr(module, "module"):
            module = module.module
        if getattr(module, "share_embeddings_and_output_weights", False):
            raise NotImplementedError(
                f"--pipeline-schedule {name}: V placement needs --untie-embeddings-and-output-weights "
                "(tied embedding and output weights are synchronised between the first and last "
                "pipeline ranks, but V puts both on rank 0)"
            )


def _check_no_transformer_engine_linears(name: str, chunks: Sequence[Any]) -> None:
    """Transformer Engine linears compute their weight gradients inside TE's own backward,
    which the B/W split does not reach: W would silently do nothing."""
    for chunk in chunks:
        for module in chunk.modules():
            if type(module).__module__.startswith("transformer_engine") or type(module).__module__.startswith(
                "megatron.core.extensions.transformer_engine"
            ):
                raise NotImplementedError(transformer_engine_refusal(name, type(module).__name__))


def transformer_engine_refusal(name: str, layer: str) -> str:
    """Why a split schedule refuses TE layers, and the fix (Megatron-LM defaults to TE)."""
    te = sys.modules.get("transformer_engine")
    version = getattr(te, "__version__", None) if te is not None else None
    installed = f"Transformer Engine {version}" if version else "Transformer Engine"
    return (
        f"--pipeline-schedule {name} splits each linear's backward into B and W, but the model has "
        f"Transformer Engine layers ({layer}) whose weight gradients it cannot defer. With Megatron-LM, "
        "pass --transformer-impl local (its default is transformer_engine); with megatron-core, build the "
        "model with the local layer spec (get_gpt_layer_local_spec); or keep TE and use --pipeline-schedule "
        f"1f1b / interleaved / megatron. ({installed} is installed here: its own weight-gradient deferral, "
        "delay_wgrad_compute / backward_dw, is not wired into the plugin's split schedules yet.)"
    )


def _create_pipeline_communicator() -> None:
    """NCCL creates a group's communicator at its first operation, and a ``batch_isend_irecv``
    that is the group's first operation must be joined by every rank of it (torch's rule);
    the runtime's first batches involve some ranks only, so a barrier creates it first."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_pipeline_model_parallel_group()
    if dist.get_backend(group) == "nccl":
        dist.barrier(group=group)


def _microbatch_group_size(config: Any, pp: int, chunks: int) -> int | None:
    """Megatron's ``microbatch_group_size_per_vp_stage`` when it is not the default (the pipeline
    size); the program source honours it (interleaved) or refuses it."""
    group = getattr(config, "microbatch_group_size_per_vp_stage", None)
    if chunks < 2 or group is None or group == pp:
        return None
    return int(group)


def make_forward_backward_func(
    name: str,
    source: ProgramSource,
    store: WeightGradStore,
    *,
    trace_sink: TraceSink | None = None,
    splits_weight_gradients: bool = False,
    offload: Any = None,
) -> Callable[..., list[Any]]:
    """Megatron's schedule-function signature, running the plugin schedule ``name``."""
    checked: set[str] = set()

    @functools.lru_cache(maxsize=16)
    def plans_for(pp: int, chunks: int, microbatches: int, group: int | None, forward_only: bool
                  ) -> tuple[Placement, dict[int, list[Step]], dict[int, RankPlan]]:
        """The programs and their p2p plan (checked deadlock-free under NCCL), once per shape."""
        options = {} if group is None else {"microbatch_group_size": group}
        placement, programs = source(pp, chunks, microbatches, **options)
        if forward_only:
            programs = {r: forward_only_program(placement, r, microbatches) for r in range(pp)}
        return placement, programs, plan_p2p(programs, placement)

    def forward_backward(
        *,
        forward_step_func: Callable[..., Any],
        data_iterator: Any,
        model: Any,
        num_microbatches: int,
        seq_length: int,
        micro_batch_size: int,
        decoder_seq_length: int | None = None,
        forward_only: bool = False,
        collect_non_loss_data: bool = False,
        first_val_step: bool | None = None,
        adjust_tensor_shapes_fn: Callable[..., Any] | None = None,
        p2p_communicator: Any = None,
        pg_collection: Any = None,
        force_all_reduce: bool | None = False,
    ) -> list[Any]:
        from megatron.core import parallel_state

        unsupported = {
            "decoder_seq_length": decoder_seq_length,
            "adjust_tensor_shapes_fn": adjust_tensor_shapes_fn,
            "p2p_communicator": p2p_communicator,
            "pg_collection": pg_collection,
        }
        given = [k for k, v in unsupported.items() if v is not None]
        if given:
            raise NotImplementedError(
                f"--pipeline-schedule={name}: the plugin runtime does not take {', '.join(given)} "
                "(encoder-decoder models and custom process-group collections); use "
                "--pipeline-schedule megatron for this run"
            )
        from megatron.core.utils import get_model_config

        chunks: Sequence[Any] = model if isinstance(model, (list, tuple)) else [model]
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        rank = parallel_state.get_pipeline_model_parallel_rank()
        config = get_model_config(chunks[0])
        group = _microbatch_group_size(config, pp, len(chunks))
        placement, programs, plans = plans_for(pp, len(chunks), num_microbatches, group, bool(forward_only))
        if name not in checked:
            if placement.shape == "v":
                _check_v_model(name, chunks)
            if splits_weight_gradients:
                from ..patches.megatron_core import check_ddp_hooks_split_aware

                _check_no_transformer_engine_linears(name, chunks)
                check_ddp_hooks_split_aware(chunks, name)
            _create_pipeline_communicator()
            checked.add(name)
        timers = getattr(config, "timers", None)
        if timers is not None:
            timers("forward-backward", log_level=1).start(barrier=config.barrier_with_L1_time)
        trace = StepTrace() if trace_sink is not None and trace_sink.wanted() else None
        result = run_program(
            program=programs[rank],
            plan=plans[rank],
            placement=placement,
            rank=rank,
            store=store,
            forward_step_func=forward_step_func,
            data_iterator=data_iterator,
            model=model,
            num_microbatches=num_microbatches,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
            collect_non_loss_data=collect_non_loss_data,
            force_all_reduce=force_all_reduce,
            trace=trace,
            offload=offload,
            first_val_step=first_val_step,
        )
        if timers is not None:
            timers("forward-backward").stop()
        if trace is not None:
            trace_sink(trace)
        elif trace_sink is not None:
            trace_sink.skip()
        return result

    forward_backward.__name__ = f"forward_backward_{name.replace('-', '_')}"
    forward_backward.clear_cache = plans_for.cache_clear  # type: ignore[attr-defined]  # auto re-plans by clearing it
    return forward_backward
