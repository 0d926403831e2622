"""Time a schedule under a cost model: timeline, makespan, both bubble rates, activation memory.

Each rank runs its actions in order, one at a time; an action starts when its
rank is free and everything :func:`.deps.requirements` names has ended (plus
``costs.comm`` for a need met on another rank).  Because a rank never
reorders, sweeping the ranks and advancing each as far as its inputs allow
yields the same start times as an event-driven run.  A schedule is validated
(:func:`.validate.validate`) before it is timed.  A
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
from functools import lru_cache
from typing import Any, NamedTuple

from .costs import CostModel
from .deps import requirements
from .ir import Action, Kind, Schedule
from .validate import is_validated, validate


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


class _Deadlock(RuntimeError):
    pass


class Pruned(Exception):
    """Timing stopped: the schedule already runs past the cutoff it was given."""


@lru_cache(maxsize=1 << 16)
def _needs(placement, rank: int, action: Action, lowered: bool, comm: float):
    return tuple((n.keys(), comm if n.remote else 0.0) for n in requirements(placement, rank, action, lowered=lowered))


def _run(schedule: Schedule, costs: CostModel, cutoff: float = float("inf")) -> list[list[tuple[float, float]]]:
    """(start, end) of every action, rank by rank; raises ``_Deadlock`` if the ranks get stuck
    and :class:`Pruned` once an action ends after ``cutoff``."""
    placement, lowered = schedule.placement, schedule.is_lowered
    rows = schedule.ranks
    comm = costs.comm
    durations: dict[tuple[int, int, Kind], float] = {}
    plan = []
    for rank, row in enumerate(rows):
        steps = []
        for a in row:
            dkey = (rank, a.chunk, a.kind)
            duration = durations.get(dkey)
            if duration is None:
                duration = durations[dkey] = costs.duration(placement, rank, a)
            steps.append((_needs(placement, rank, a, lowered, comm), duration, (rank, a)))
        plan.append(steps)
    end: dict[tuple[int, Action], float] = {}
    times: list[list[tuple[float, float]]] = [[] for _ in rows]
    work = [sum(step[1] for step in steps) for steps in plan]  # device time still to run, per rank
    free = [0.0] * len(rows)
    pos = [0] * len(rows)
    left = sum(len(r) for r in rows)
    while left:
        progress = False
        for rank, steps in enumerate(plan):
            i, t = pos[rank], free[rank]
            left_work = work[rank]
            while i < len(steps):
                needs, duration, key = steps[i]
                start = t
                for alternatives, delay in needs:
                    ready = None
                    for k in alternatives:
                        e = end.get(k)
                        if e is not None:
                            ready = e
                            break
                    if ready is None:
                        break
                    if ready + delay > start:
                        start = ready + delay
                else:
                    t = start + duration
                    left_work -= duration
                    if t + left_work > cutoff:
                        raise Pruned(f"past {cutoff}")
                    end[key] = t
                    times[rank].append((start, t))
                    i += 1
                    continue
                break
            if i != pos[rank]:
                left -= i - pos[rank]
                pos[rank], free[rank], work[rank] = i, t, left_work
                progress = True
        if not progress:
            raise _Deadlock("no rank can move")
    return times


def quick_eval(schedule: Schedule, costs: CostModel, cutoff: float = float("inf")) -> tuple[float, float, float]:
    """(makespan, steady bubble rate, highest peak activation) without validating first.

    For ranking candidates a generator built; a deadlocked schedule raises ``ValueError``, one
    that runs past ``cutoff`` raises :class:`Pruned`.  Always :func:`simulate` (or validate)
    the one you keep.
    """
    try:
        times = _run(schedule, costs, cutoff)
    except _Deadlock:
        raise ValueError(f"schedule {schedule.name!r} deadlocks") from None
    busy = window = makespan = peak = 0.0
    pl = schedule.placement
    deltas: dict[tuple[int, int, Kind], tuple[float, float]] = {}
    for rank, row in enumerate(schedule.ranks):
        first, last, level = None, 0.0, 0.0
        for a, (s, e) in zip(row, times[rank]):
            if not a.is_compute:
                continue
            busy += e - s
            first = s if first is None else first
            last = e
            key = (rank, a.chunk, a.kind)
            d = deltas.get(key)
            if d is None:
                d = deltas[key] = (costs.allocates(pl, rank, a), costs.releases(pl, rank, a))
            level += d[0]
            if level > peak:
                peak = level
            level -= d[1]
        if first is not None:
            window += last - first
        makespan = max(makespan, last)
    return makespan, (1.0 - busy / window if window > 0 else 0.0), peak


def simulate(schedule: Schedule, costs: CostModel | None = None) -> SimulationResult:
    """Validate ``schedule`` (raising :class:`.validate.ScheduleError`) and time it under ``costs``."""
    costs = costs or CostModel()
    if not is_validated(schedule):
        validate(schedule)
    placement = schedule.placement
    times = _run(schedule, costs)
    timeline = tuple(
        TimelineEntry(rank, a, *times[rank][step])
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
