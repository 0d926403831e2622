"""1F1B: Megatron-core's ``forward_backward_pipelining_without_interleaving`` order.

Rank ``r`` runs ``min(p - r - 1, m)`` warm-up forwards, then alternates one
forward and one unsplit backward (BW) while forwards remain, then the
cool-down backwards.  The order is Megatron's exactly, so the plugin runtime
can run it as the baseline every other schedule is measured against.
"""

from __future__ import annotations

from ..ir import Action, Kind, Placement, Schedule
from .registry import ScheduleRequest, check_request


def one_f_one_b_order(pp: int, rank: int, microbatches: int) -> list[Action]:
    warmup = min(pp - rank - 1, microbatches)
    order = [Action(0, Kind.F, j) for j in range(warmup)]
    for i in range(microbatches - warmup):
        order += [Action(0, Kind.F, warmup + i), Action(0, Kind.BW, i)]
    order += [Action(0, Kind.BW, j) for j in range(microbatches - warmup, microbatches)]
    return order


def one_f_one_b(request: ScheduleRequest) -> Schedule:
    check_request(request, "1f1b")
    p, m = request.pp, request.microbatches
    return Schedule(Placement.single(p), tuple(tuple(one_f_one_b_order(p, r, m)) for r in range(p)), m, name="1f1b")
