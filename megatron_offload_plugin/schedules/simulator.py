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

Activation offload: OFFLOAD and RELOAD actions run on two copy channels per device,
device-to-host and host-to-device, independent of the compute stream and of each
other (a full-duplex host link), each first-in first-out in program order.  An
OFFLOAD is issued when the stream reaches it (right after its F) and starts when
its channel is free; the unit's activations are freed when it ends.  A RELOAD is
issued at its program position, starts when the H2D channel is free and its
OFFLOAD has ended, and allocates the unit again when it starts; the unit's B (or
BW) waits for it to end.  Copy times come from ``simulate(..., offload=policy)``
(see :class:`.offload.OffloadPolicy`); without them copies take no time.

Not modelled: overlap of compute with communication on the same device (a
message is a pure delay), link contention, optimizer time, and memory other
than activations (see :mod:`.costs` for the activation accounting).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from .costs import CostModel
from .deps import INPUT_GRAD_KINDS, requirements
from .ir import Action, Kind, Schedule
from .validate import is_validated, validate

if TYPE_CHECKING:
    from .offload import OffloadPolicy


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
    offload: OffloadReport | None = None  # set when the schedule offloads activations (or a policy was given)

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
            **(self.offload.to_dict() if self.offload is not None else {}),
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


def _run(schedule: Schedule, costs: CostModel, cutoff: float = float("inf"),
         transfer: Callable[[int, int], float] | None = None,
         stalls: dict[tuple[int, Action], float] | None = None) -> list[list[tuple[float, float]]]:
    """(start, end) of every action, rank by rank; raises ``_Deadlock`` if the ranks get stuck
    and :class:`Pruned` once an action ends after ``cutoff``.

    OFFLOAD and RELOAD run on the rank's D2H and H2D copy channels, not on its compute stream:
    each is issued when the stream reaches it, starts once its needs have ended and its channel
    is free, and takes ``transfer(rank, chunk)`` (0 without ``transfer``).  A B or BW of an
    offloaded unit also waits for the end of its RELOAD; the time it waited is put in ``stalls``.
    """
    placement, lowered = schedule.placement, schedule.is_lowered
    rows = schedule.ranks
    comm = costs.comm
    durations: dict[tuple[int, int, Kind], float] = {}
    plan = []
    for rank, row in enumerate(rows):
        reloaded = {a.unit for a in row if a.kind is Kind.RELOAD}
        steps = []
        for a in row:
            dkey = (rank, a.chunk, a.kind)
            duration = durations.get(dkey)
            if duration is None:
                if a.is_offload:
                    duration = transfer(rank, a.chunk) if transfer is not None else 0.0
                else:
                    duration = costs.duration(placement, rank, a)
                durations[dkey] = duration
            lane = _LANES.get(a.kind, 0)
            reload_key = None
            if reloaded and a.kind in INPUT_GRAD_KINDS and a.unit in reloaded:
                reload_key = (rank, Action(a.chunk, Kind.RELOAD, a.microbatch))
            steps.append((_needs(placement, rank, a, lowered, comm), duration, (rank, a), lane, reload_key))
        plan.append(steps)
    end: dict[tuple[int, Action], float] = {}
    times: list[list[tuple[float, float]]] = [[] for _ in rows]
    work = [sum(step[1] for step in steps if not step[3]) for steps in plan]  # device time still to run, per rank
    free = [0.0] * len(rows)
    channel = [[0.0, 0.0, 0.0] for _ in rows]  # per rank: unused, D2H free from, H2D free from
    pos = [0] * len(rows)
    left = sum(len(r) for r in rows)
    while left:
        progress = False
        for rank, steps in enumerate(plan):
            i, t = pos[rank], free[rank]
            left_work = work[rank]
            while i < len(steps):
                needs, duration, key, lane, reload_key = steps[i]
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
                    if lane:  # a copy: its channel, not the compute stream
                        lanes = channel[rank]
                        if lanes[lane] > start:
                            start = lanes[lane]
                        lanes[lane] = end[key] = start + duration
                        times[rank].append((start, start + duration))
                        i += 1
                        continue
                    if reload_key is not None:
                        reloaded_at = end[reload_key]
                        if reloaded_at > start:
                            if stalls is not None:
                                stalls[key] = reloaded_at - start
                            start = reloaded_at
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


_LANES = {Kind.OFFLOAD: 1, Kind.RELOAD: 2}


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


def simulate(schedule: Schedule, costs: CostModel | None = None, *, offload: OffloadPolicy | None = None
             ) -> SimulationResult:
    """Validate ``schedule`` (raising :class:`.validate.ScheduleError`) and time it under ``costs``.

    ``offload`` gives the host link that OFFLOAD/RELOAD actions use (its bandwidth, bytes per
    unit, seconds per time unit); without it, or without its bandwidth, copies take no time.
    When the schedule offloads (or ``offload`` is given), :attr:`SimulationResult.offload`
    compares it with the same schedule without OFFLOAD/RELOAD.
    """
    costs = costs or CostModel()
    if not is_validated(schedule):
        validate(schedule)
    placement = schedule.placement
    transfer = None
    if offload is not None:
        def transfer(rank: int, chunk: int) -> float:
            return offload.transfer_time(costs, placement, rank, chunk)
    stalls: dict[tuple[int, Action], float] = {}
    times = _run(schedule, costs, transfer=transfer, stalls=stalls)
    timeline = tuple(
        TimelineEntry(rank, a, *times[rank][step])
        for rank, row in enumerate(schedule.ranks) for step, a in enumerate(row)
    )
    busy, windows, memory, peaks = [], [], [], []
    for rank in range(schedule.pp):
        entries = [e for e in timeline if e.rank == rank]
        compute = [e for e in entries if e.action.is_compute]
        busy.append(sum(e.end - e.start for e in compute))
        windows.append((min(e.start for e in compute), max(e.end for e in compute)) if compute else (0.0, 0.0))
        curve, peak = _memory_curve(placement, costs, rank, entries,
                                    w_offload_all=offload is not None and offload.mode == "full")
        memory.append(curve)
        peaks.append(peak)
    makespan = max((e.end for e in timeline), default=0.0)
    total_busy = sum(busy)
    span = schedule.pp * makespan
    window_sum = sum(b - a for a, b in windows)
    report = None
    if offload is not None or schedule.has_offload:
        base = simulate(schedule.without_offload(), costs)
        report = _offload_report(schedule, costs, offload, makespan, base, stalls)
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
        offload=report,
    )


def _memory_curve(placement, costs: CostModel, rank: int, entries: list[TimelineEntry], *,
                  w_offload_all: bool = False) -> tuple[tuple[tuple[float, float], ...], float]:
    """Activation units on ``rank`` after each change, and their peak.

    A compute action allocates when it starts and frees when it ends (see :mod:`.costs`); an
    OFFLOAD frees its unit when its copy ends, a RELOAD allocates it again when its copy
    starts.  An offloaded unit's W inputs wait on the host as the runtime keeps them: its B
    frees the whole unit and its W holds it only while it runs (those copies are not timed);
    with ``w_offload_all`` (policy 'full') every unit's W inputs do, as in the runtime.
    At one instant frees count before allocations.
    """
    events: list[tuple[float, int, int, float]] = []  # (time, 0 free / 1 allocate, order, units)
    split = {e.action.unit for e in entries if e.action.kind is Kind.W}
    offloaded = split if w_offload_all else {e.action.unit for e in entries if e.action.kind is Kind.OFFLOAD}
    for n, e in enumerate(entries):
        a = e.action
        if a.is_compute and a.unit in offloaded and a.unit in split and a.kind in (Kind.B, Kind.W):
            share = costs.fraction(placement, rank, a.chunk)
            if a.kind is Kind.W:
                events.append((e.start, 1, n, share))
            events.append((e.end, 0, n, -share))
        elif a.is_compute:
            up, down = costs.allocates(placement, rank, a), costs.releases(placement, rank, a)
            if up:
                events.append((e.start, 1, n, up))
            if down:
                events.append((e.end, 0, n, -down))
        elif a.kind is Kind.OFFLOAD:
            events.append((e.end, 0, n, -costs.fraction(placement, rank, a.chunk)))
        elif a.kind is Kind.RELOAD:
            events.append((e.start, 1, n, costs.fraction(placement, rank, a.chunk)))
    events.sort()
    level, curve, peak = 0.0, [(0.0, 0.0)], 0.0
    for time, _, _, delta in events:
        level += delta
        curve.append((time, level))
        if level > peak:
            peak = level
    return tuple(curve), peak


@dataclass(frozen=True)
class OffloadReport:
    """What offloading activations did to one simulated schedule.

    ``not_hidden`` lists, per rank, the units whose B (or BW) waited for their RELOAD, and
    ``exposed`` the total time those B waited; ``added_makespan`` compares with the same
    schedule simulated without OFFLOAD/RELOAD.  ``offloaded_bytes`` (per rank, one way) needs
    the policy's ``unit_bytes``.
    """

    policy: OffloadPolicy | None
    units: dict[int, frozenset[tuple[int, int]]]
    makespan_no_offload: float
    added_makespan: float
    added_makespan_rel: float
    peak_activation_no_offload: tuple[float, ...]
    not_hidden: dict[int, tuple[tuple[int, int], ...]]
    exposed: tuple[float, ...]
    offloaded_bytes: tuple[float, ...] | None
    no_offload: SimulationResult = field(repr=False, compare=False)

    @property
    def offloaded_units(self) -> int:
        return sum(len(u) for u in self.units.values())

    def to_dict(self) -> dict[str, Any]:
        ranks = sorted(self.units)
        out: dict[str, Any] = {
            "activation_offload": self.policy.to_dict() if self.policy is not None else None,
            "offloaded_units": self.offloaded_units,
            "offloaded_units_per_rank": [len(self.units[r]) for r in ranks],
            "makespan_no_offload": _r(self.makespan_no_offload),
            "added_makespan": _r(self.added_makespan),
            "added_makespan_rel": _r(self.added_makespan_rel),
            "not_hidden": [[list(u) for u in self.not_hidden.get(r, ())] for r in ranks],
            "exposed_reload_time": [_r(x) for x in self.exposed],
            "peak_activation_no_offload": [_r(x) for x in self.peak_activation_no_offload],
        }
        if self.offloaded_bytes is not None:
            out["offloaded_bytes"] = [_r(x) for x in self.offloaded_bytes]
        return out


def _offload_report(schedule: Schedule, costs: CostModel, policy: OffloadPolicy | None, makespan: float,
                    base: SimulationResult, stalls: dict[tuple[int, Action], float]) -> OffloadReport:
    units = {r: frozenset(a.unit for a in row if a.kind is Kind.OFFLOAD) for r, row in enumerate(schedule.ranks)}
    not_hidden: dict[int, list[tuple[int, int]]] = {}
    exposed = [0.0] * schedule.pp
    for (rank, action), waited in sorted(stalls.items()):
        if waited > 1e-9:
            not_hidden.setdefault(rank, []).append(action.unit)
            exposed[rank] += waited
    offloaded_bytes = None
    if policy is not None and policy.unit_bytes is not None:
        offloaded_bytes = tuple(
            sum(policy.unit_share_bytes(costs, schedule.placement, r, c) for c, _ in units[r])
            for r in range(schedule.pp))
    added = makespan - base.makespan
    return OffloadReport(
        policy=policy,
        units=units,
        makespan_no_offload=base.makespan,
        added_makespan=added,
        added_makespan_rel=added / base.makespan if base.makespan > 0 else 0.0,
        peak_activation_no_offload=base.peak_activation,
        not_hidden={r: tuple(u) for r, u in not_hidden.items()},
        exposed=tuple(exposed),
        offloaded_bytes=offloaded_bytes,
        no_offload=base,
    )
