"""ZB-H1 and ZB-H2 (Qi et al., "Zero Bubble Pipeline Parallelism"): one chunk per rank, B and W split.

ZB-H1 keeps 1F1B's order of F and B and its peak memory (``p`` microbatches
on every rank) and moves the W's: rank ``r`` runs the usual ``p - r - 1``
warm-up forwards, then F, B and, ``r`` backwards late, the W of an earlier
microbatch; its last ``r`` W's fill the cool-down.  With uniform costs its
bubble is ``(p - 1)(F + B - W)``, a third of 1F1B's ``(p - 1)(F + B + W)``.
The order does not depend on costs.

ZB-H2 allows ``2p - 1`` microbatches of activations: more warm-up forwards
fill the bubble before the first B and the W's fill the tail, turning the
trapezoid into a parallelogram with no idle time inside each device's own
window (``steady_bubble_rate`` 0 with uniform costs).  It is built by the
event-driven list scheduler of :mod:`.greedy` under that memory limit with
the request's costs, keeping the fastest of its policies.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from ..ir import Action, Kind, Placement, Schedule
from .greedy import GreedyPolicy, greedy_schedule
from .registry import ScheduleRequest, check_request
from .search import best_schedule, makespan_lower_bound


def zb_h1_order(pp: int, rank: int, microbatches: int) -> list[Action]:
    warmup = min(pp - rank - 1, microbatches)
    order = [Action(0, Kind.F, j) for j in range(warmup)]
    w_done = 0
    for i in range(microbatches):
        if warmup + i < microbatches:
            order.append(Action(0, Kind.F, warmup + i))
        order.append(Action(0, Kind.B, i))
        if i >= rank:  # W runs `rank` backwards late: rank r then holds p activations at most
            order.append(Action(0, Kind.W, i - rank))
            w_done += 1
    order += [Action(0, Kind.W, j) for j in range(w_done, microbatches)]
    return order


def zb_h1(request: ScheduleRequest) -> Schedule:
    check_request(request, "zb-h1")
    p, m = request.pp, request.microbatches
    return Schedule(Placement.single(p), tuple(tuple(zb_h1_order(p, r, m)) for r in range(p)), m, name="zb-h1")


GREEDY_POLICIES = list(itertools.product(("eager", "fit"), ("B", "F"), ("full", "one")))


def greedy_candidates(placement: Placement, request: ScheduleRequest, limit: float):
    for fill, prefer, headroom in GREEDY_POLICIES:
        policy = GreedyPolicy(limit, fill=fill, prefer=prefer, headroom=headroom)
        label = f"greedy({placement.shape}, fill={fill}, prefer={prefer}, headroom={headroom})"
        yield lambda cutoff, policy=policy, label=label: greedy_schedule(
            placement, request.microbatches, request.costs, policy, name=label, cutoff=cutoff)


def zb_h2(request: ScheduleRequest) -> Schedule:
    check_request(request, "zb-h2")
    p = request.pp
    limit = float(2 * p - 1)
    best = best_schedule(greedy_candidates(Placement.single(p), request, limit),
                         request.costs, memory_limit=limit, what="zb-h2 schedule",
                         lower_bound=makespan_lower_bound(Placement.single(p), request.costs, request.microbatches))
    return replace(best.schedule, name="zb-h2", meta={"chosen": best.schedule.name, "memory_budget": limit})
