"""Pipeline schedules as data: IR, generators, lowering passes, validator, simulator.

Flow: a generator (``generate('zb-v', pp=4, microbatches=16)``) emits per-rank
compute actions; passes (``add_send_recv``) add communication and
(``insert_offload_actions``, planned by ``plan_offload``) activation offload; ``validate``
proves the schedule complete and deadlock-free; ``simulate`` times it under a
``CostModel``; ``plot_timeline`` draws it.  Torch-free: nothing here imports
torch or Megatron.
"""

from __future__ import annotations

from typing import Any

from .costs import CostModel
from .deps import Need, requirements
from .generators import (
    ScheduleGenerator,
    ScheduleRequest,
    available_schedules,
    describe_schedules,
    generate,
    get_generator,
    register_schedule,
)
from .ir import OFFLOAD_KINDS, Action, Kind, Placement, Schedule, parse_actions, schedule_from_dict
from .offload import OffloadPlan, OffloadPolicy, apply_offload, insert_offload_actions, plan_offload
from .passes import add_send_recv, remove_comms, split_backward
from .simulator import OffloadReport, SimulationResult, TimelineEntry, simulate
from .validate import ScheduleError, validate

__all__ = [
    "Action",
    "CostModel",
    "Kind",
    "Need",
    "OFFLOAD_KINDS",
    "OffloadPlan",
    "OffloadPolicy",
    "OffloadReport",
    "Placement",
    "Schedule",
    "ScheduleError",
    "ScheduleGenerator",
    "ScheduleRequest",
    "SimulationResult",
    "TimelineEntry",
    "add_send_recv",
    "apply_offload",
    "available_schedules",
    "describe_schedules",
    "generate",
    "get_generator",
    "insert_offload_actions",
    "parse_actions",
    "plan_offload",
    "plot_timeline",
    "register_schedule",
    "remove_comms",
    "requirements",
    "schedule_from_dict",
    "simulate",
    "split_backward",
    "validate",
]


def __getattr__(name: str) -> Any:
    if name == "plot_timeline":  # matplotlib is imported only when a figure is drawn
        from .plot import plot_timeline

        return plot_timeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
