"""V-shape schedules: ZB-V, V-Half and V-Min (Qi et al., "Pipeline Parallelism with Controllable
Memory").  Device ``i`` holds virtual stages ``i`` and ``2p - 1 - i``; each chunk
costs half of the device's F, B and W.

Each generator keeps the fastest schedule, under the request's costs, among
those its candidates produce within its activation budget (units of one
microbatch through one device's full share of layers):

========  ================  ==========================================================
name      budget            candidates
========  ================  ==========================================================
zb-v      ``p``             round-based V greedy (:mod:`.v_rounds`), event-driven
                            greedy (:mod:`.greedy`), building blocks (:mod:`.v_blocks`)
v-half    ``p / 2 + 1``     building blocks, round-based and event-driven greedy
v-min     ``p / 3 + 1``     building blocks, round-based and event-driven greedy
========  ================  ==========================================================

Budgets are rounded down to half units (a chunk's activation).  The
event-driven greedy fits any budget of at least one unit, so every budget is
met; where no building block fits it (V-Min at ``p = 2, 5, 8``) the schedule is
slower than the block-based one at the same ``p`` would be.
"""

from __future__ import annotations

import math
from dataclasses import replace
from collections.abc import Iterator

from ..costs import CostModel
from ..ir import Placement, Schedule
from ..simulator import quick_eval
from .greedy import GreedyPolicy, greedy_schedule, list_replay
from .registry import ScheduleRequest, check_request
from .search import Candidate, best_schedule, makespan_lower_bound
from .v_blocks import Block, block_schedule, blocks_within
from .v_rounds import v_rounds_schedule
from .zero_bubble import GREEDY_POLICIES


def half_units(x: float) -> float:
    return math.floor(x * 2 + 1e-9) / 2


def v_candidates(request: ScheduleRequest, budget: float) -> Iterator[Candidate]:
    """Builders of V-placement schedules within ``budget``; each names its method."""
    p, m, costs = request.pp, request.microbatches, request.costs
    for fill_f in (True, False):
        for fill_b in (True, False):
            label = f"v-rounds(fill_f={fill_f}, fill_b={fill_b})"
            yield lambda cutoff, ff=fill_f, fb=fill_b, label=label: v_rounds_schedule(
                p, m, costs, budget, fill_f=ff, fill_b=fb, name=label, cutoff=cutoff)
    if costs.stage_weights is None:  # blocks assume equal chunks
        blocks = blocks_within(p, budget)
        for i, block in enumerate(blocks):
            yield lambda cutoff, block=block, i=i: block_schedule(block, m, name=f"block{i}")
        if blocks:
            yield lambda cutoff: _replay_best_block(blocks, m, costs, budget, cutoff)
    placement = Placement.v_shape(p)
    for fill, prefer, headroom in GREEDY_POLICIES:
        policy = GreedyPolicy(budget, fill=fill, prefer=prefer, headroom=headroom)
        label = f"greedy(v, fill={fill}, prefer={prefer}, headroom={headroom})"
        yield lambda cutoff, policy=policy, label=label: greedy_schedule(
            placement, m, costs, policy, name=label, cutoff=cutoff)


def _replay_best_block(blocks: list[Block], m: int, costs: CostModel, budget: float, cutoff: float) -> Schedule:
    """The block fastest under ``costs``, its warm-up and cool-down squeezed by :func:`list_replay`."""
    timed = [(quick_eval(block_schedule(b, m, name=""), costs)[0], i) for i, b in enumerate(blocks)]
    _, i = min(timed)
    return list_replay(block_schedule(blocks[i], m, name=f"block{i}"), costs, budget, fill="eager", window=6,
                       name=f"block{i}+replay", cutoff=cutoff)


def _v_schedule(request: ScheduleRequest, name: str, budget: float) -> Schedule:
    check_request(request, name, vpp=(None, 2))
    if budget < 1:
        raise ValueError(f"{name} at pp={request.pp}: budget {budget} is below one microbatch's activations")
    bound = makespan_lower_bound(Placement.v_shape(request.pp), request.costs, request.microbatches)
    best = best_schedule(v_candidates(request, budget), request.costs, memory_limit=budget,
                         what=f"{name} schedule", lower_bound=bound)
    return replace(best.schedule, name=name, meta={"chosen": best.schedule.name, "memory_budget": budget})


def zb_v(request: ScheduleRequest) -> Schedule:
    return _v_schedule(request, "zb-v", float(request.pp))


def v_half(request: ScheduleRequest) -> Schedule:
    return _v_schedule(request, "v-half", half_units(request.pp / 2 + 1))


def v_min(request: ScheduleRequest) -> Schedule:
    return _v_schedule(request, "v-min", half_units(request.pp / 3 + 1))
