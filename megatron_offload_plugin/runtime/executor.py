"""Execute one rank's program of F / B / W / BW actions on Megatron-core model chunks.

This is the plugin's drop-in for Megatron's ``forward_backward_*`` functions.
It reuses Megatron's own ``forward_step`` and ``backward_step`` (loss scaling
by microbatches or tokens, ``grad_scale_func``, ``deallocate_pipeline_outputs``,
``collect_non_loss_data``) and honours the same hooks: ``no_sync_func`` (single
or per chunk), ``grad_sync_func``, ``param_sync_func`` and
``finalize_model_grads_func``.  What differs is only the order of work, and W:
inside a B action the linears' weight gradients are queued
(:mod:`.wgrad`), and the W action delivers them through autograd's own
accumulation node, so they land where Megatron puts them.

Per-(chunk, microbatch) state is kept in dicts that each action pops, and the
step ends by checking that nothing is left (no activation, no queued weight
gradient, no unread message).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..schedules.ir import Action, Kind, Placement
from .grad_sync import GradSync
from .p2p import Mailbox
from .p2p_plan import BEFORE_START, RankPlan
from .wgrad import WeightGradStore

# The runtime executes the compute actions of the schedule IR; communication is
# derived from them and posted as the p2p plan says (see :mod:`.p2p_plan`).
Step = Action


class RuntimeStateError(RuntimeError):
    """The program asked for something the runtime state cannot give (a bug, not user input)."""


@dataclass
class TraceEvent:
    rank: int
    action: str
    start: float
    end: float


@dataclass
class StepTrace:
    events: list[TraceEvent] = field(default_factory=list)
    clock: str = "host-perf-counter"


def _backward_step_fn() -> Callable[..., Any]:
    """Megatron's backward_step, with or without ``model_type`` (dropped in megatron-core 0.17)."""
    import inspect

    from megatron.core.pipeline_parallel import schedules

    params = inspect.signature(schedules.backward_step).parameters
    if "model_type" in params:
        from megatron.core.enums import ModelType

        return lambda i, o, g, config: schedules.backward_step(i, o, g, ModelType.encoder_or_decoder, config)
    return lambda i, o, g, config: schedules.backward_step(i, o, g, config)


def _refuse_unsupported(config: Any) -> None:
    """Options of Megatron's schedules this runtime does not honour fail here, named."""
    refused = {
        "variable_seq_lengths": ("--variable-seq-lengths", "messages have one shape per step here"),
        "defer_embedding_wgrad_compute": (
            "--defer-embedding-wgrad-compute", "its output-layer weight gradient is drained only by Megatron's own schedules"),
        "num_microbatches_with_partial_activation_checkpoints": (
            "--num-microbatches-with-partial-activation-checkpoints", "the runtime does not vary checkpointing per microbatch"),
    }
    for attr, (flag, why) in refused.items():
        value = getattr(config, attr, None)
        if value not in (None, False):
            raise NotImplementedError(
                f"{flag} ({attr}={value!r}) with a plugin pipeline schedule: {why}; unset it or use "
                "--pipeline-schedule megatron"
            )
    if getattr(config, "mtp_num_layers", None):
        raise NotImplementedError(
            f"--mtp-num-layers ({config.mtp_num_layers}) with a plugin pipeline schedule: multi-token prediction "
            "layers are placed by Megatron's own schedules; unset it or use --pipeline-schedule megatron"
        )


def _next_compute(program: Sequence[Step]) -> list[Step | None]:
    """The next compute action after each index (None after the last)."""
    following: list[Step | None] = [None] * len(program)
    for i in range(len(program) - 2, -1, -1):
        after = program[i + 1]
        following[i] = after if after.is_compute else following[i + 1]
    return following


def _w_right_after_b(program: Sequence[Step], following: Sequence[Step | None]) -> set[tuple[int, int]]:
    """Units whose W is the next compute action after their B (nothing to offload between)."""
    return {(s.chunk, s.microbatch) for i, s in enumerate(program)
            if s.kind is Kind.B and following[i] == Action(s.chunk, Kind.W, s.microbatch)}


def run_program(
    *,
    program: Sequence[Step],
    plan: RankPlan,
    placement: Placement,
    rank: int,
    store: WeightGradStore,
    forward_step_func: Callable[..., Any],
    data_iterator: Any,
    model: Any,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
    collect_non_loss_data: bool = False,
    force_all_reduce: bool | None = False,
    trace: StepTrace | None = None,
    offload: Any = None,
    first_val_step: bool | None = None,
) -> list[Any]:
    """Run ``program`` (this rank's list of :class:`Step`) and return Megatron's forward data store.

    ``offload`` (an :class:`~megatron_offload_plugin.offload.activation.ActivationOffload`):
    the units named by the program's OFFLOAD actions are captured during their F, moved
    to the host at OFFLOAD, brought back at RELOAD (or on demand before their B), and
    forgotten after it; checkpointed regions inside an F chain per unit.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.utils import get_model_config

    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    iterators = list(data_iterator) if isinstance(data_iterator, (list, tuple)) else [data_iterator]
    if len(chunks) != placement.chunks or len(iterators) != len(chunks):
        raise RuntimeStateError(
            f"rank {rank}: the schedule places {placement.chunks} model chunk(s) per rank, "
            f"got {len(chunks)} chunk(s) and {len(iterators)} data iterator(s)"
        )
    config = get_model_config(chunks[0])
    _refuse_unsupported(config)
    vpp = len(chunks) > 1
    backward_step = _backward_step_fn()
    group = parallel_state.get_pipeline_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    cp_size = parallel_state.get_context_parallel_world_size()
    seq = seq_length // cp_size  # each context-parallel rank holds its share of the sequence
    if config.sequence_parallel:
        seq //= tp
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    mailbox = Mailbox(
        rank=rank,
        group=group,
        plan=plan,
        shape=(seq, micro_batch_size, config.hidden_size),
        dtype=config.pipeline_dtype,
        device=device,
    )
    forward_data_store: list[Any] = []
    total_num_tokens = torch.zeros([], dtype=torch.int, device=device)
    activations: dict[tuple[int, int], tuple[Any, Any]] = {}
    next_microbatch = [0] * len(chunks)
    offloaded_units = {(s.chunk, s.microbatch) for s in program if s.kind is Kind.OFFLOAD}
    following_compute = _next_compute(program)
    # What W keeps between B and W moves to the host for the offloaded units, and with 'full'
    # for every unit whose W does not run right after its B (nothing to gain there).
    w_offload_units = ({(s.chunk, s.microbatch) for s in program if s.kind is Kind.B}
                       - _w_right_after_b(program, following_compute)) if (
        offload is not None and offload.config.mode == "full") else offloaded_units
    engine = None
    if offload is not None and not forward_only and (offloaded_units or w_offload_units or offload.regions is not None):
        engine = offload.engine(p for chunk in chunks for p in chunk.parameters())
    regions = offload.regions if offload is not None else None
    if regions is not None and getattr(config, "recompute_granularity", None) != "full":
        raise ValueError(
            "--checkpoint-offload offloads what Megatron's full recompute keeps; this model has "
            f"recompute_granularity={getattr(config, 'recompute_granularity', None)!r}. Add "
            "--recompute-granularity full --recompute-method uniform|block, or drop --checkpoint-offload"
        )
    w_offloaded: set[tuple[int, int]] = set()  # units whose W inputs wait on the host
    sync = None if forward_only else GradSync(config, chunks, program, pp_rank=rank)
    param_sync = config.param_sync_func if (vpp and not forward_only) else None

    def do_forward(step: Step) -> None:
        c, m = step.chunk, step.microbatch
        if m != next_microbatch[c]:
            raise RuntimeStateError(
                f"rank {rank}: F for chunk {c} runs microbatch {m} but the data iterator is at "
                f"{next_microbatch[c]}; a schedule must run each chunk's forwards in microbatch order"
            )
        next_microbatch[c] += 1
        stage = placement.stage(rank, c)
        if m == 0 and param_sync is not None:  # start each chunk's parameter all-gather before its first use
            (param_sync[c] if isinstance(param_sync, list) else param_sync)(chunks[c].parameters())
        input_tensor = None
        if not placement.is_first(stage):
            src, _ = placement.locate(stage - 1)
            input_tensor = mailbox.recv(src, ("act", stage, m))
        unit = (c, m)
        captured = engine is not None and unit in offloaded_units and not forward_only
        with contextlib.ExitStack() as scope:
            if captured:
                scope.enter_context(engine.capture(unit))
            if regions is not None:
                scope.enter_context(regions.group((rank, c, m)))
            output_tensor, num_tokens = forward_step(c, m, input_tensor)
        if captured:
            engine.hold(unit, input_tensor)  # the received input: backward needs it as its leaf
        if num_tokens is not None:
            total_num_tokens.add_(num_tokens)
        if not placement.is_last(stage):
            dst, _ = placement.locate(stage + 1)
            mailbox.send(dst, ("act", stage + 1, m), output_tensor)
        if forward_only:
            return
        schedules.deallocate_output_tensor(output_tensor, config.deallocate_pipeline_outputs)
        activations[(c, m)] = (input_tensor, output_tensor)

    def forward_step(c: int, m: int, input_tensor: Any) -> tuple[Any, Any]:
        stage = placement.stage(rank, c)
        return schedules.forward_step(
            forward_step_func,
            iterators[c],
            chunks[c],
            num_microbatches,
            input_tensor,
            forward_data_store,
            config,
            cp_size,
            collect_non_loss_data,
            None,
            is_first_microbatch=schedules.check_first_val_step(first_val_step, forward_only, m == 0),
            current_microbatch=m,
            vp_stage=c if vpp else None,
            is_last_stage=placement.is_last(stage),
        )

    def do_backward(step: Step) -> None:
        c, m = step.chunk, step.microbatch
        stage = placement.stage(rank, c)
        try:
            input_tensor, output_tensor = activations.pop((c, m))
        except KeyError:
            raise RuntimeStateError(f"rank {rank}: {step} has no forward activations (F never ran)") from None
        grad = None
        if not placement.is_last(stage):
            src, _ = placement.locate(stage + 1)
            grad = mailbox.recv(src, ("grad", stage, m))
        offloaded = engine is not None and (c, m) in offloaded_units
        if offloaded:
            engine.ensure_resident((c, m))
        with contextlib.ExitStack() as scope:
            offload_w = step.kind is Kind.B and engine is not None and (c, m) in w_offload_units
            if step.kind is Kind.B:
                scope.enter_context(store.capture((c, m)))
                if offload_w:  # what W keeps (layer inputs, output grads) waits on the host too
                    scope.enter_context(engine.capture(("W", c, m)))
            input_grad = backward_step(input_tensor, output_tensor, grad, config)
        if offloaded:
            engine.release((c, m))
        if offload_w:
            engine.offload(("W", c, m))
            w_offloaded.add((c, m))
        if not placement.is_first(stage):
            dst, _ = placement.locate(stage - 1)
            mailbox.send(dst, ("grad", stage - 1, m), input_grad)

    def do_weight(step: Step) -> None:
        unit = (step.chunk, step.microbatch)
        if unit in w_offloaded:
            engine.ensure_resident(("W", *unit))
        store.run(unit)
        if unit in w_offloaded:
            w_offloaded.discard(unit)
            engine.release(("W", *unit))

    def prefetch_weight_inputs(index: int) -> None:
        """Reload a W's kept tensors one compute action ahead of it."""
        following = following_compute[index]
        if following is not None and following.kind is Kind.W and (following.chunk, following.microbatch) in w_offloaded:
            key = ("W", following.chunk, following.microbatch)
            if engine.is_offloaded(key):
                engine.reload(key)

    def do_offload(step: Step) -> None:
        if engine is not None and not forward_only:
            engine.offload((step.chunk, step.microbatch))

    def do_reload(step: Step) -> None:
        if engine is not None and not forward_only:
            engine.reload((step.chunk, step.microbatch))

    handlers: dict[Kind, Callable[[Step], None]] = {
        Kind.F: do_forward, Kind.B: do_backward, Kind.BW: do_backward, Kind.W: do_weight,
        Kind.OFFLOAD: do_offload, Kind.RELOAD: do_reload,
    }
    from .trace import ActionTimer

    timer = ActionTimer(trace, rank) if trace is not None else None
    if timer is not None:
        trace.clock = timer.clock
    try:
        mailbox.post(BEFORE_START)
        for index, step in enumerate(program):
            if step.kind in (Kind.OFFLOAD, Kind.RELOAD):
                handlers[step.kind](step)
                mailbox.post(index)  # the plan may post a receive after any action
                continue
            if not step.is_compute or (forward_only and step.kind is not Kind.F):
                mailbox.post(index)  # communication is derived from the compute actions
                continue
            if sync is not None:
                sync.before(index, step)
            if w_offloaded and offload.reload_lead > 0:
                prefetch_weight_inputs(index)
            if timer is not None:
                timer.start()
            with torch.profiler.record_function(f"PP:{step}"):
                handlers[step.kind](step)
            if timer is not None:
                timer.end(str(step))
            mailbox.post(index)
            if sync is not None:
                sync.after(index, step)
        mailbox.finish()
        if timer is not None:
            timer.finish()
        if activations and not forward_only:
            raise RuntimeStateError(f"rank {rank}: activations never consumed by a backward: {sorted(activations)}")
        store.assert_drained()
        if offload is not None and not forward_only:
            offload.step_finished()
    finally:
        if sync is not None:
            sync.close()

    if config.finalize_model_grads_func is not None and not forward_only:
        config.finalize_model_grads_func(
            chunks,
            total_num_tokens if config.calculate_per_token_loss else None,
            force_all_reduce=force_all_reduce,
        )
    return forward_data_store
