"""``auto``: the lowest-makespan schedule within a memory limit, for measured costs.

Given F/B/W/communication costs and ``memory_limit`` (activation units per
device, default ``p``: 1F1B's peak), it times every candidate below under the
costs and keeps the fastest whose peak fits (ties: smaller steady bubble, then
less memory):

* 1F1B and ZB-H1 (fixed orders, peak ``p``);
* the event-driven list scheduler of :mod:`.greedy` at the limit, one chunk
  per device, under each of its policies (this is the zero-bubble paper's
  heuristic family: as many warm-up forwards as memory allows, B first,
  W's to fill waits and to free memory);
* the V-placement candidates of :mod:`.v_schedules` at the limit (round-based
  V greedy, event-driven greedy, building blocks).

So it is never slower than any of them, in particular never slower than ZB-H1
when the limit admits it.  The chosen candidate is named in
``schedule.meta['chosen']``.  Options: ``vpp=1`` keeps one chunk per device,
``vpp=2`` the V placement; unset searches both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

from ..ir import Placement, Schedule
from .one_f_one_b import one_f_one_b
from .registry import ScheduleRequest, check_request
from .search import Candidate, best_schedule, makespan_lower_bound
from .v_schedules import v_candidates
from .zero_bubble import greedy_candidates, zb_h1


def _fixed(build: Callable[[], Schedule], name: str) -> Candidate:
    return lambda cutoff: replace(build(), name=name)


def auto_candidates(request: ScheduleRequest, limit: float) -> Iterator[Candidate]:
    p = request.pp
    if request.vpp in (None, 1):
        yield _fixed(lambda: zb_h1(request.with_(vpp=None)), "zb-h1")
        yield _fixed(lambda: one_f_one_b(request.with_(vpp=None)), "1f1b")
        yield from greedy_candidates(Placement.single(p), request, limit)
    if request.vpp in (None, 2) and limit >= 1:
        yield from v_candidates(request.with_(vpp=2), limit)


def auto(request: ScheduleRequest) -> Schedule:
    check_request(request, "auto", vpp=(None, 1, 2))
    p = request.pp
    limit = float(request.memory_limit) if request.memory_limit is not None else float(p)
    placements = [Placement.single(p)] if request.vpp == 1 else [Placement.v_shape(p)] if request.vpp == 2 else [
        Placement.single(p), Placement.v_shape(p)]
    bound = min(makespan_lower_bound(pl, request.costs, request.microbatches) for pl in placements)
    best = best_schedule(auto_candidates(request, limit), request.costs, memory_limit=limit,
                         what="schedule", lower_bound=bound)
    chosen = best.schedule.name
    return replace(best.schedule, name="auto", meta={**best.schedule.meta, "chosen": chosen, "memory_limit": limit})
