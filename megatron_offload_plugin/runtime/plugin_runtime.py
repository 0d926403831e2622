"""What a plugin schedule needs at run time, built once per ``apply()``.

Schedules come from the schedule registry (:mod:`..schedules.generators`) and are
validated there; the runtime executes any schedule whose placement Megatron's
model chunks already have (one chunk per rank, or Megatron's interleaving).
V-shaped placements (zb-v, v-half, v-min) need the model built in V order, which
the runtime does not do yet: choosing one fails at ``apply()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..config import PluginConfig
from ..schedules.ir import Action, Kind
from .executor import Step
from .forward_backward import make_forward_backward_func
from .trace import TraceRecorder
from .wgrad import WeightGradStore

# Names accepted by --pipeline-schedule that the runtime can execute.
RUNTIME_SCHEDULES = ("1f1b", "interleaved", "zb-h1", "zb-h2", "zb-v", "v-half", "v-min", "auto")
V_SCHEDULES = ("zb-v", "v-half", "v-min")
_SPLITS_WEIGHT_GRADIENTS = {
    "1f1b": False, "interleaved": False, "zb-h1": True, "zb-h2": True, "zb-v": True, "v-half": True, "v-min": True,
    "auto": True,
}


class AutoPlanner:
    """``auto``: plan from equal costs, then again from the costs measured in the first runs.

    Costs come from the measured timeline of iteration ``replan_after`` (CUDA-event times on
    GPU); global rank 0's costs are broadcast to the whole world, so every rank, also
    tensor-parallel peers in other pipeline groups, plans the same schedule.  Costs are per microbatch through one
    device's full share of layers (a V chunk's measured time counts twice); communication
    is taken as 0 (waits are not separated from transfer times).
    """

    def __init__(self, memory_limit: float | None, replan_after: int) -> None:
        from ..schedules.costs import CostModel

        self.costs = CostModel()
        self.memory_limit = memory_limit
        self.replan_after = replan_after
        self.iterations = 0
        self.version = 0
        self.chosen: str | None = None

    def programs(self, pp: int, chunks: int, microbatches: int, offload: Any = None) -> tuple[Any, dict[int, list[Step]]]:
        from ..schedules.generators import generate

        if chunks not in (1, 2):
            raise ValueError(
                f"--pipeline-schedule auto plans one model chunk per rank or the V placement with two; "
                f"the model has {chunks} chunks per rank"
            )
        schedule = generate("auto", pp, microbatches, vpp=chunks, costs=self.costs, memory_limit=self.memory_limit)
        self.chosen = schedule.meta.get("chosen")
        return _runnable(schedule, offload)

    def observe(self, events: list[Any], chunks: int) -> bool:
        """After ``replan_after`` iterations, set the costs from the measured events; True if replanned."""
        from dataclasses import replace

        self.iterations += 1
        if self.replan_after <= 0 or self.iterations != self.replan_after:
            return False
        durations: dict[str, list[float]] = {"F": [], "B": [], "W": [], "BW": []}
        for e in events:
            durations[Action.parse(e.action).kind.value].append(e.end - e.start)
        mean = {k: sum(v) / len(v) for k, v in durations.items() if v}
        measured = None
        if "F" in mean and "B" in mean and "W" in mean:
            measured = (mean["F"] * chunks, mean["B"] * chunks, mean["W"] * chunks)
        measured = _agree_world_wide(measured)
        if measured is None:
            return False
        self.costs = replace(self.costs, f=measured[0], b=measured[1], w=measured[2], comm=0.0)
        self.version += 1
        return True


class _AutoSink:
    """``auto``'s trace sink: the recorder's, plus a re-plan from the measured iteration."""

    def __init__(self, recorder: TraceRecorder, planner: AutoPlanner, func_box: list[Any]) -> None:
        self.recorder = recorder
        self.planner = planner
        self.func_box = func_box
        if planner.replan_after > 0:
            recorder.extra_iterations.add(planner.replan_after - 1)

    def wanted(self) -> bool:
        return self.recorder.wanted()

    def skip(self) -> None:
        self.recorder.skip()
        self.planner.iterations += 1

    def __call__(self, trace: Any) -> None:
        self.recorder(trace)
        chunks = 1 + max((Action.parse(e.action).chunk for e in self.recorder.last_events), default=0)
        if self.planner.observe(self.recorder.last_events, chunks):
            self.func_box[0].clear_cache()  # plan again with the measured costs


def _agree_world_wide(value: Any) -> Any:
    """Global rank 0's value on every rank: each pipeline group measures its own costs, and
    tensor-parallel peers (in different pipeline groups) must run the same schedule, or their
    all-reduces pair up wrongly."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _runnable(schedule: Any, offload: Any = None) -> tuple[Any, dict[int, list[Step]]]:
    """(placement, {rank: actions the executor runs}): compute, plus OFFLOAD/RELOAD placed by the policy."""
    if offload is not None and offload.schedules_offload:
        from ..schedules.offload import insert_offload_actions, plan_offload

        plan = plan_offload(schedule, offload.policy())
        schedule = insert_offload_actions(schedule, plan, reload_lead=offload.reload_lead)
    keep = (Kind.F, Kind.B, Kind.W, Kind.BW, Kind.OFFLOAD, Kind.RELOAD)
    return schedule.placement, {r: [a for a in schedule.ranks[r] if a.kind in keep] for r in range(schedule.pp)}


def _refuse_microbatch_groups(name: str, group: int | None, pp: int) -> None:
    """Only Megatron's interleaved order groups microbatches per virtual stage."""
    if group is not None:
        raise NotImplementedError(
            f"--microbatch-group-size-per-virtual-pipeline-stage={group} with --pipeline-schedule {name}: only "
            f"the interleaved order groups microbatches; leave it at the pipeline size ({pp})"
        )


def schedule_programs(
    name: str, pp: int, chunks: int, microbatches: int, offload: Any = None, *,
    microbatch_group_size: int | None = None,
) -> tuple[Any, dict[int, list[Step]]]:
    """(placement, {rank: actions}) from the registry, validated; offload actions placed by ``offload``'s policy."""
    from ..schedules.generators import generate

    if name != "interleaved":
        _refuse_microbatch_groups(name, microbatch_group_size, pp)

    vpp = chunks if chunks > 1 else None
    if name in V_SCHEDULES:
        if chunks != 2:
            raise ValueError(
                f"--pipeline-schedule {name} places two model chunks per pipeline rank (V shape): set "
                "--num-layers-per-virtual-pipeline-stage to num_layers / (2 x pipeline size)"
            )
        return _runnable(generate(name, pp, microbatches), offload)
    if name == "interleaved" and vpp is None:
        raise ValueError(
            "--pipeline-schedule interleaved needs model chunks: set "
            "--num-layers-per-virtual-pipeline-stage (Megatron's interleaving)"
        )
    if name != "interleaved" and vpp is not None:
        raise ValueError(
            f"--pipeline-schedule {name} runs one model chunk per pipeline rank; remove "
            "--num-layers-per-virtual-pipeline-stage or use --pipeline-schedule interleaved"
        )
    options = {"microbatch_group_size": microbatch_group_size} if microbatch_group_size is not None else {}
    schedule = generate(name, pp, microbatches, vpp=vpp, options=options) if vpp else generate(name, pp, microbatches)
    return _runnable(schedule, offload)


@dataclass
class PluginRuntime:
    name: str
    store: WeightGradStore
    recorder: TraceRecorder
    forward_backward: Callable[..., Any]
    splits_weight_gradients: bool = False
    v_placement: bool = False
    planner: AutoPlanner | None = None
    offload: Any = None  # offload.activation.ActivationOffload, or None


def build_runtime(config: PluginConfig, offload: Any = None) -> PluginRuntime | None:
    """None for 'megatron' (Megatron's own functions run); else the runtime for the schedule.

    ``offload``: the configuration's :class:`~..offload.activation.ActivationOffload`, whose
    policy places OFFLOAD/RELOAD actions in every program and whose engine the executor uses.
    """
    name = config.schedule.pipeline_schedule
    if name == "megatron":
        if offload is not None and offload.schedules_offload:
            raise ValueError(
                f"--activation-offload {config.activation_offload.mode} runs inside the plugin's pipeline "
                "schedules; --pipeline-schedule megatron (Megatron's own functions) has no offload actions. "
                "Choose one of: " + ", ".join(RUNTIME_SCHEDULES) + " (or --checkpoint-offload alone)"
            )
        return None
    if name not in RUNTIME_SCHEDULES:
        raise ValueError(
            f"--pipeline-schedule {name}: the runtime cannot run it; runnable: "
            f"{', '.join(RUNTIME_SCHEDULES)}. Simulate it with "
            f"'python -m megatron_offload_plugin simulate --schedule {name}'"
        )
    store = WeightGradStore()
    recorder = TraceRecorder(config.schedule.pipeline_trace_dir)
    planner = AutoPlanner(config.schedule.auto_memory_limit, config.schedule.auto_replan_after) if name == "auto" else None

    def source(pp: int, chunks: int, microbatches: int, *, microbatch_group_size: int | None = None
               ) -> tuple[Any, dict[int, list[Step]]]:
        if planner is not None:
            _refuse_microbatch_groups(name, microbatch_group_size, pp)
            return planner.programs(pp, chunks, microbatches, offload)
        return schedule_programs(name, pp, chunks, microbatches, offload, microbatch_group_size=microbatch_group_size)

    sink: Any = recorder
    func_box: list[Any] = []
    if planner is not None:
        sink = _AutoSink(recorder, planner, func_box)

    func = make_forward_backward_func(
        name, source, store, trace_sink=sink, splits_weight_gradients=_SPLITS_WEIGHT_GRADIENTS[name], offload=offload
    )
    func_box.append(func)
    return PluginRuntime(
        name=name, store=store, recorder=recorder, forward_backward=func,
        splits_weight_gradients=_SPLITS_WEIGHT_GRADIENTS[name],
        # auto may choose the V placement for a two-chunk model; the V patches only act
        # when two virtual stages are configured, so they are harmless for one chunk.
        v_placement=name in V_SCHEDULES or name == "auto",
        planner=planner,
        offload=offload,
    )
