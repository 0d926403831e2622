"""Schedule generators, registered by name (see :mod:`.registry`)."""

from __future__ import annotations

from .registry import (
    ScheduleGenerator,
    ScheduleRequest,
    available_schedules,
    describe_schedules,
    generate,
    get_generator,
    register_schedule,
)
from .auto import auto
from .interleaved import interleaved
from .one_f_one_b import one_f_one_b
from .v_schedules import v_half, v_min, zb_v
from .zero_bubble import zb_h1, zb_h2

register_schedule("1f1b", one_f_one_b, description="Megatron-core's 1F1B order (unsplit backward); peak p")
register_schedule("interleaved", interleaved,
                  description="Megatron-core's interleaved 1F1B order over --vpp chunks per rank")
register_schedule("zb-h1", zb_h1, description="zero bubble H1: 1F1B memory (p), W's moved into the bubbles")
register_schedule("zb-h2", zb_h2, description="zero bubble H2: 2p-1 activations, no bubble inside each device's window")
register_schedule("zb-v", zb_v, description="zero bubble V: V placement (stages i and 2p-1-i), peak p")
register_schedule("v-half", v_half, description="V schedule with about half of 1F1B's activation memory (p/2+1)")
register_schedule("v-min", v_min, description="V schedule with about a third of 1F1B's activation memory (p/3+1)")
register_schedule("auto", auto, description="fastest schedule found for the given costs within --memory-limit")

__all__ = [
    "ScheduleGenerator",
    "ScheduleRequest",
    "available_schedules",
    "describe_schedules",
    "generate",
    "get_generator",
    "register_schedule",
]
