"""Megatron's own 1F1B order as runtime programs: the reference the runtime is checked against.

``one_f_one_b`` reproduces ``forward_backward_pipelining_without_interleaving``
(warm-up ``p - rank - 1`` forwards, then one forward one backward, then the
cool-down backwards).  With ``split=True`` each backward becomes B, and W runs
``w_delay`` backwards later (0: right after its B): the same arithmetic in the
same order, so a run must match Megatron's schedule bit for bit.
"""

from __future__ import annotations

from ..schedules.ir import Action, Kind, Placement

Step = Action


def one_f_one_b(pp: int, rank: int, microbatches: int, *, split: bool = False, w_delay: int = 0) -> list[Step]:
    warmup = min(pp - rank - 1, microbatches)
    program: list[Step] = [Action(0, Kind.F, m) for m in range(warmup)]
    next_f, pending_w = warmup, []
    for b in range(microbatches):
        if next_f < microbatches:
            program.append(Action(0, Kind.F, next_f))
            next_f += 1
        if not split:
            program.append(Action(0, Kind.BW, b))
            continue
        program.append(Action(0, Kind.B, b))
        pending_w.append(b)
        if len(pending_w) > w_delay:
            program.append(Action(0, Kind.W, pending_w.pop(0)))
    program += [Action(0, Kind.W, w) for w in pending_w]
    return program


def one_f_one_b_programs(pp: int, chunks: int, microbatches: int, *, split: bool = False, w_delay: int = 0
                         ) -> tuple[Placement, dict[int, list[Step]]]:
    if chunks != 1:
        raise ValueError(f"1F1B runs one model chunk per rank; got {chunks} (use the interleaved schedule)")
    return Placement.single(pp), {r: one_f_one_b(pp, r, microbatches, split=split, w_delay=w_delay) for r in range(pp)}


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
