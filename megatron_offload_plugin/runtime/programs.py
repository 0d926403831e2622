"""Reference programs the runtime is checked against.

``one_f_one_b_programs`` takes the registered ``1f1b`` schedule (Megatron's own
1F1B order) and, with ``split=True``, turns each backward into B with its W
``w_delay`` backwards later (0: right after its B): the same arithmetic in the
same order, so a run must match Megatron's schedule bit for bit.
``all_forward_all_backward`` (GPipe order) exercises multi-chunk routing.
"""

from __future__ import annotations

from ..schedules.ir import Action, Kind, Placement

Step = Action


def delay_weight_gradients(row: list[Step], w_delay: int) -> list[Step]:
    """Each BW becomes B, and its W runs after ``w_delay`` further backwards (in order)."""
    out: list[Step] = []
    pending: list[Step] = []
    for a in row:
        if a.kind is not Kind.BW:
            out.append(a)
            continue
        out.append(Action(a.chunk, Kind.B, a.microbatch))
        pending.append(Action(a.chunk, Kind.W, a.microbatch))
        if len(pending) > w_delay:
            out.append(pending.pop(0))
    return out + pending


def one_f_one_b_programs(pp: int, chunks: int, microbatches: int, *, split: bool = False, w_delay: int = 0
                         ) -> tuple[Placement, dict[int, list[Step]]]:
    from ..schedules.generators import generate

    if chunks != 1:
        raise ValueError(f"1F1B runs one model chunk per rank; got {chunks} (use the interleaved schedule)")
    schedule = generate("1f1b", pp, microbatches)
    rows = {r: list(schedule.ranks[r]) for r in range(pp)}
    if split:
        rows = {r: delay_weight_gradients(row, w_delay) for r, row in rows.items()}
    return schedule.placement, rows


def all_forward_all_backward(placement: Placement, rank: int, microbatches: int, *, split: bool = False
                             ) -> list[Step]:
    """GPipe order over this rank's chunks: every forward by stage, then every backward by
    reverse stage, microbatches in order.  Any placement; used to check multi-chunk runs."""
    chunks = sorted(range(placement.chunks), key=lambda c: placement.stage(rank, c))
    program = [Action(c, Kind.F, m) for c in chunks for m in range(microbatches)]
    for c in reversed(chunks):
        for m in range(microbatches):
            if split:
                program += [Action(c, Kind.B, m), Action(c, Kind.W, m)]
            else:
                program.append(Action(c, Kind.BW, m))
    return program


def all_forward_all_backward_programs(pp: int, chunks: int, microbatches: int, *, split: bool = False
                                      ) -> tuple[Placement, dict[int, list[Step]]]:
    placement = Placement.interleaved(pp, chunks)
    return placement, {r: all_forward_all_backward(placement, r, microbatches, split=split) for r in range(pp)}
