"""Interleaved 1F1B: Megatron-core's ``forward_backward_pipelining_with_interleaving`` order.

Each rank holds ``v = vpp`` chunks; stage ``c * p + r`` is chunk ``c`` of rank
``r``.  Megatron walks a table of "virtual microbatches" (``get_schedule_table``):
microbatches are taken in groups of ``g`` (``microbatch_group_size_per_vp_stage``,
default ``p``); a group runs through chunk 0, then chunk 1, ..., the last
group being whatever remains.  Forward ``k`` runs entry ``k`` of the table on
its chunk; backward ``k`` runs entry ``k`` on the mirrored chunk ``v - 1 - c``.
Rank ``r`` runs ``2 (p - r - 1) + (v - 1) g`` warm-up forwards (capped at
``m v``), then one forward and one backward (BW) per step, then the remaining
backwards.

Megatron refuses ``g`` outside ``[p, m]`` and a last group smaller than ``p``
(other than none); so does this generator, with the same rules.

Options: ``microbatch_group_size`` (default ``pp``).
"""

from __future__ import annotations

from ..ir import Action, Kind, Placement, Schedule
from .registry import ScheduleRequest


def schedule_table(microbatches: int, chunks: int, group: int) -> list[tuple[int, int]]:
    """(microbatch, chunk) for each virtual microbatch, in Megatron's order."""
    table = []
    for first in range(0, microbatches, group):
        last = min(first + group, microbatches)
        table += [(mb, c) for c in range(chunks) for mb in range(first, last)]
    return table


def check_interleaved(pp: int, vpp: int | None, microbatches: int, group: int) -> None:
    if vpp is None or vpp < 2:
        raise ValueError(f"vpp={vpp}: the interleaved schedule needs --vpp >= 2 model chunks per rank")
    if pp < 2:
        raise ValueError(f"pp={pp}: the interleaved schedule needs pp >= 2")
    if not pp <= group <= microbatches:
        raise ValueError(
            f"microbatches={microbatches}: Megatron's interleaved schedule needs the microbatch group size "
            f"({group}) in [pp={pp}, microbatches={microbatches}]; use at least {max(pp, group)} microbatches"
        )
    remainder = microbatches % group
    if 0 < remainder < pp:
        raise ValueError(
            f"microbatches={microbatches}: Megatron's interleaved schedule needs microbatches % group size "
            f"({microbatches} % {group} = {remainder}) to be 0 or >= pp={pp}; use a multiple of {group} "
            f"or a remainder of at least {pp}"
        )


def interleaved_order(pp: int, rank: int, microbatches: int, chunks: int, group: int) -> list[Action]:
    table = schedule_table(microbatches, chunks, group)
    total = len(table)
    warmup = min(2 * (pp - rank - 1) + (chunks - 1) * group, total)

    def forward(k: int) -> Action:
        mb, c = table[k]
        return Action(c, Kind.F, mb)

    def backward(k: int) -> Action:
        mb, c = table[k]
        return Action(chunks - 1 - c, Kind.BW, mb)

    order = [forward(k) for k in range(warmup)]
    for k in range(total - warmup):
        order += [forward(warmup + k), backward(k)]
    order += [backward(k) for k in range(total - warmup, total)]
    return order


def interleaved(request: ScheduleRequest) -> Schedule:
    p, m, v = request.pp, request.microbatches, request.vpp
    group = int(request.options.get("microbatch_group_size", p))
    check_interleaved(p, v, m, group)
    chunks = int(v)  # checked above: at least 2
    ranks = tuple(tuple(interleaved_order(p, r, m, chunks, group)) for r in range(p))
    return Schedule(Placement.interleaved(p, chunks), ranks, m, name="interleaved",
                    meta={"microbatch_group_size": group})
