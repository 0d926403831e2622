"""Time a schedule under a cost model: timeline, makespan, both bubble rates, activation memory.

Each rank runs its actions in order, one at a time; an action starts when its
rank is free and everything :func:`.deps.requirements` names has ended (plus
``costs.comm`` for a need met on another rank).  Because a rank never
reorders, processing the actions in any dependency-respecting order (the one
:func:`.validate.validate` returns) yields the same start times as an
event-driven run; a schedule that fails validation is never timed.  A
lowered schedule (with SEND/RECV) times exactly like its compute-only form:
sends and receives take no device time, and a receive ends ``comm`` after its
send.

Bubble figures (``busy`` is the compute time of a device, ``p`` the devices):

``bubble_rate = 1 - sum(busy) / (p * makespan)``
    one iteration followed by a synchronous optimizer step; a device that
    starts late or finishes early idles for it.
``steady_bubble_rate = 1 - sum(busy) / sum(window)``
    where ``window`` is a device's own first start to last end; this is the
    zero-bubble papers' accounting, in which the idle before a device's first
    action and after its last overlaps the neighbouring iterations.

Not modelled: overlap of compute with communication on the same device (a
message is a pure delay), link contention, optimizer time, and memory other
than activations (see :mod:`.costs` for the activation accounting).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from .costs import CostModel
from .deps import requirements
from .ir import Action, Schedule
from .validate import validate


class TimelineEntry(NamedTuple):
    rank: int
    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class SimulationResult:
    schedule: Schedule
    costs: CostModel
    timeline: tuple[TimelineEntry, ...]  # rank by rank, each in execution order
    makespan: float
    busy: tuple[float, ...]  # compute time per device
    windows: tuple[tuple[float, float], ...]  # (first start, last end) per device
    bubble_rate: float
    steady_bubble_rate: float
    memory: tuple[tuple[tuple[float, float], ...], ...]  # per device: (time, activation units) after each change
    peak_activation: tuple[float, ...]

    def rank_timeline(self, rank: int) -> list[TimelineEntry]:
        return [e for e in self.timeline if e.rank == rank]

    def to_dict(self) -> dict[str, Any]:
        s = self.schedule
        return {
            "schedule": s.name,
            "pp": s.pp,
            "microbatches": s.microbatches,
            "chunks_per_rank": s.placement.chunks,
            "costs": self.costs.to_dict(),
            "makespan": _r(self.makespan),
            "bubble_rate": _r(self.bubble_rate),
            "steady_bubble_rate": _r(self.steady_bubble_rate),
            "peak_activation": [_r(x) for x in self.peak_activation],
            "busy": [_r(x) for x in self.busy],
            "windows": [[_r(a), _r(b)] for a, b in self.windows],
        }


def _r(x: float) -> float:
    return round(x, 9)


def simulate(schedule: Schedule, costs: CostModel | None = None) -> SimulationResult:
    """Validate ``schedule`` (raising :class:`.validate.ScheduleError`) and time it under ``costs``."""
    costs = costs or CostModel()
    order = validate(schedule)
    placement, lowered = schedule.placement, schedule.is_lowered
    end: dict[tuple[int, Action], float] = {}
    free = [0.0] * schedule.pp
    times: dict[tuple[int, int], tuple[float, float]] = {}
    for rank, step in order:
        action = schedule.ranks[rank][step]
        start = free[rank]
        for need in requirements(placement, rank, action, lowered=lowered):
            ready = min(end[k] for k in need.keys() if k in end)
            start = max(start, ready + (costs.comm if need.remote else 0.0))
        finish = start + costs.duration(placement, rank, action)
        end[(rank, action)] = finish
        free[rank] = finish
        times[(rank, step)] = (start, finish)

    timeline = tuple(
        TimelineEntry(rank, a, *times[(rank, step)])
        for rank, row in enumerate(schedule.ranks) for step, a in enumerate(row)
    )
    busy, windows, memory, peaks = [], [], [], []
    for rank in range(schedule.pp):
        compute = [e for e in timeline if e.rank == rank and e.action.is_compute]
        busy.append(sum(e.end - e.start for e in compute))
        windows.append((min(e.start for e in compute), max(e.end for e in compute)) if compute else (0.0, 0.0))
        level, curve, peak = 0.0, [(0.0, 0.0)], 0.0
        for e in compute:
            up = costs.allocates(placement, rank, e.action)
            if up:
                level += up
                curve.append((e.start, level))
                peak = max(peak, level)
            down = costs.releases(placement, rank, e.action)
            if down:
                level -= down
                curve.append((e.end, level))
        memory.append(tuple(curve))
        peaks.append(peak)
    makespan = max((e.end for e in timeline), default=0.0)
    total_busy = sum(busy)
    span = schedule.pp * makespan
    window_sum = sum(b - a for a, b in windows)
    return SimulationResult(
        schedule=schedule,
        costs=costs,
        timeline=timeline,
        makespan=makespan,
        busy=tuple(busy),
        windows=tuple(windows),
        bubble_rate=1.0 - total_busy / span if span > 0 else 0.0,
        steady_bubble_rate=1.0 - total_busy / window_sum if window_sum > 0 else 0.0,
        memory=tuple(memory),
        peak_activation=tuple(peaks),
    )
