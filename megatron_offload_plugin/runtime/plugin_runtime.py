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
from ..schedules.ir import Kind
from .executor import Step
from .forward_backward import make_forward_backward_func
from .trace import TraceRecorder
from .wgrad import WeightGradStore

# Names accepted by --pipeline-schedule that the runtime can execute.
RUNTIME_SCHEDULES = ("1f1b", "interleaved", "zb-h1", "zb-h2", "zb-v", "v-half", "v-min")
V_SCHEDULES = ("zb-v", "v-half", "v-min")
SIMULATE_ONLY = ("auto",)
_SPLITS_WEIGHT_GRADIENTS = {
    "1f1b": False, "interleaved": False, "zb-h1": True, "zb-h2": True, "zb-v": True, "v-half": True, "v-min": True,
}


def schedule_programs(name: str, pp: int, chunks: int, microbatches: int) -> tuple[Any, dict[int, list[Step]]]:
    """(placement, {rank: compute actions}) from the registry, validated."""
    from ..schedules.generators import generate

    vpp = chunks if chunks > 1 else None
    if name in V_SCHEDULES:
        if chunks != 2:
            raise ValueError(
                f"--pipeline-schedule {name} places two model chunks per pipeline rank (V shape): set "
                "--num-layers-per-virtual-pipeline-stage to num_layers / (2 x pipeline size)"
            )
        schedule = generate(name, pp, microbatches)
        programs = {r: [a for a in schedule.ranks[r] if a.is_compute] for r in range(pp)}
        return schedule.placement, programs
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
    schedule = generate(name, pp, microbatches, vpp=vpp) if vpp else generate(name, pp, microbatches)
    programs = {r: [a for a in schedule.ranks[r] if a.kind in (Kind.F, Kind.B, Kind.W, Kind.BW)] for r in range(pp)}
    return schedule.placement, programs


@dataclass
class PluginRuntime:
    name: str
    store: WeightGradStore
    recorder: TraceRecorder
    forward_backward: Callable[..., Any]
    splits_weight_gradients: bool = False
    v_placement: bool = False


def build_runtime(config: PluginConfig) -> PluginRuntime | None:
    """None for 'megatron' (Megatron's own functions run); else the runtime for the schedule."""
    name = config.schedule.pipeline_schedule
    if name == "megatron":
        return None
    if name not in RUNTIME_SCHEDULES:
        raise ValueError(
            f"--pipeline-schedule {name}: the runtime cannot run it; runnable: "
            f"{', '.join(RUNTIME_SCHEDULES)}. Simulate it with "
            f"'python -m megatron_offload_plugin simulate --schedule {name}'"
        )
    store = WeightGradStore()
    recorder = TraceRecorder(config.schedule.pipeline_trace_dir)

    def source(pp: int, chunks: int, microbatches: int) -> tuple[Any, dict[int, list[Step]]]:
        return schedule_programs(name, pp, chunks, microbatches)

    func = make_forward_backward_func(
        name, source, store, trace_sink=recorder, splits_weight_gradients=_SPLITS_WEIGHT_GRADIENTS[name]
    )
    return PluginRuntime(
        name=name, store=store, recorder=recorder, forward_backward=func,
        splits_weight_gradients=_SPLITS_WEIGHT_GRADIENTS[name],
        v_placement=name in V_SCHEDULES,
    )
