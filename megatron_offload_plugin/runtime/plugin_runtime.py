"""What a plugin schedule needs at run time, built once per ``apply()``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import PluginConfig
from .forward_backward import ProgramSource, make_forward_backward_func
from .programs import one_f_one_b_programs
from .trace import TraceRecorder
from .wgrad import WeightGradStore

# Schedules the runtime executes: name -> (program source, splits B and W).
_SOURCES: dict[str, tuple[ProgramSource, bool]] = {
    "1f1b": (one_f_one_b_programs, False),
}


def runtime_schedules() -> list[str]:
    return sorted(_SOURCES)


@dataclass
class PluginRuntime:
    name: str
    store: WeightGradStore
    recorder: TraceRecorder
    forward_backward: Callable[..., Any]
    splits_weight_gradients: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def build_runtime(config: PluginConfig) -> PluginRuntime | None:
    """None for 'megatron' (Megatron's own functions run); else the runtime for the schedule."""
    name = config.schedule.pipeline_schedule
    if name == "megatron":
        return None
    source, split = _SOURCES[name]
    store = WeightGradStore()
    recorder = TraceRecorder(config.schedule.pipeline_trace_dir)
    func = make_forward_backward_func(name, source, store, trace_sink=recorder)
    return PluginRuntime(name=name, store=store, recorder=recorder, forward_backward=func, splits_weight_gradients=split)
