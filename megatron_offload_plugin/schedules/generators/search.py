"""Pick the best of several candidate schedules by timing each under the request's costs."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..costs import CostModel
from ..ir import Action, Kind, Placement, Schedule
from ..simulator import Pruned, quick_eval
from ..validate import ScheduleError
from .greedy import Stuck

_EPS = 1e-9


@dataclass(frozen=True)
class Scored:
    schedule: Schedule
    makespan: float
    steady_bubble_rate: float
    peak: float

    @property
    def key(self) -> tuple[float, float, float]:
        return (round(self.makespan, 9), round(self.steady_bubble_rate, 9), round(self.peak, 9))


def score(schedule: Schedule, costs: CostModel, cutoff: float = float("inf")) -> Scored:
    return Scored(schedule, *quick_eval(schedule, costs, cutoff))


Candidate = Callable[[float], Schedule]
"""Builds one candidate; the argument is the makespan it must not exceed (it may raise
:class:`~..simulator.Pruned` as soon as it would)."""


def best_schedule(
    candidates: Iterable[Candidate],
    costs: CostModel,
    *,
    memory_limit: float | None = None,
    what: str = "schedule",
    lower_bound: float | None = None,
) -> Scored:
    """The candidate with the lowest makespan (then steady bubble, then peak activation) whose
    peak fits ``memory_limit``.  A candidate whose builder gives up (``Stuck`` or another
    ``ValueError``) or is slower than the best so far (``Pruned``) is skipped.  Callers validate
    the winner (``generate`` does).  The search stops early at a candidate that reaches
    ``lower_bound`` (no schedule can be faster).
    """
    best: Scored | None = None
    for build in candidates:
        cutoff = best.makespan + _EPS if best is not None else float("inf")
        try:
            scored = score(build(cutoff), costs, cutoff)
        except ScheduleError:
            raise
        except (Stuck, ValueError, Pruned):
            continue
        if memory_limit is not None and scored.peak > memory_limit + _EPS:
            continue
        if best is None or scored.key < best.key:
            best = scored
        if lower_bound is not None and best.makespan <= lower_bound + _EPS:
            break
    if best is None:
        limit = f" within memory_limit={memory_limit}" if memory_limit is not None else ""
        raise ValueError(f"no {what} fits{limit}; raise the memory limit")
    return best


def makespan_lower_bound(placement: Placement, costs: CostModel, microbatches: int) -> float:
    """No schedule on ``placement`` finishes sooner: a device cannot start before the forwards of
    the stages ahead of its first one have run and reached it, and then has all its work to do."""
    best = 0.0
    for d in range(placement.pp):
        first = min(placement.stages[d])
        start = 0.0
        for s in range(first):
            r, c = placement.locate(s)
            start += costs.duration(placement, r, Action(c, Kind.F, 0))
            start += costs.comm if r != placement.locate(s + 1)[0] else 0.0
        work = sum(costs.duration(placement, d, Action(c, k, 0)) for c in range(placement.chunks)
                   for k in (Kind.F, Kind.B, Kind.W)) * microbatches
        best = max(best, start + work)
    return best
