"""What must precede an action: the one rule the comm pass, the validator and the simulator share.

For an action on stage ``s`` (``s = placement.stage(rank, chunk)``), microbatch ``j``:

====================  ==================================================================
action                needs (before it starts)
====================  ==================================================================
F                     the forward of stage ``s - 1`` (none on stage 0)
B, BW                 the forward of stage ``s``, and the input gradient of stage
                      ``s + 1`` (its B or BW; none on the last stage)
W                     the B of stage ``s`` (a W after a BW is an error)
SEND_F                the F of stage ``s`` on this rank
SEND_B                the B or BW of stage ``s`` on this rank
RECV_F                the SEND_F of stage ``s - 1`` on the rank holding it
RECV_B                the SEND_B of stage ``s + 1`` on the rank holding it
OFFLOAD               the F of stage ``s`` on this rank
RELOAD                the OFFLOAD of stage ``s`` on this rank
====================  ==================================================================

An offloaded unit's B (or BW) must also come after its RELOAD; that need exists
only when the unit is offloaded, which the action alone does not tell, so
:func:`offload_requirement` states it and the validator and simulator add it.

In a compute-only schedule a need on another rank is met directly by that
rank's compute action (the message is implicit).  In a lowered schedule
(:attr:`Schedule.is_lowered`) a compute action instead needs the RECV on its
own rank, and only RECV actions reach across ranks.  Two stages on the same
rank (the turn of a V) never communicate.  ``Need.remote`` marks a need met
on another rank: the simulator adds the communication delay there.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from .ir import Action, Kind, Placement

INPUT_GRAD_KINDS: frozenset[Kind] = frozenset({Kind.B, Kind.BW})
_F = frozenset({Kind.F})


class Need(NamedTuple):
    """An action, one of ``kinds`` on ``(rank, chunk)`` for ``microbatch``, that must come first."""

    rank: int
    chunk: int
    kinds: frozenset[Kind]
    microbatch: int
    remote: bool

    def satisfied_by(self, rank: int, action: Action) -> bool:
        return (rank == self.rank and action.chunk == self.chunk and action.microbatch == self.microbatch
                and action.kind in self.kinds)

    def keys(self) -> tuple[tuple[int, Action], ...]:
        """The (rank, action) pairs any one of which meets this need."""
        return _keys(self.rank, self.chunk, self.kinds, self.microbatch)

    def __str__(self) -> str:
        alts = " or ".join(repr(a) for _, a in self.keys())
        return f"{alts} on rank {self.rank}"


@lru_cache(maxsize=1 << 14)
def _keys(rank: int, chunk: int, kinds: frozenset[Kind], microbatch: int) -> tuple[tuple[int, Action], ...]:
    return tuple((rank, Action(chunk, k, microbatch)) for k in sorted(kinds, key=lambda k: k.value))


@lru_cache(maxsize=1 << 16)
def requirements(placement: Placement, rank: int, action: Action, *, lowered: bool) -> tuple[Need, ...]:
    """The needs of ``action`` on ``rank`` (see the module table)."""
    chunk, kind, mb = action
    stage = placement.stage(rank, chunk)
    first, last = placement.is_first(stage), placement.is_last(stage)

    def here(kinds: frozenset[Kind], c: int = chunk) -> Need:
        return Need(rank, c, kinds, mb, False)

    def neighbour(other_stage: int, kinds: frozenset[Kind], recv: Kind) -> Need:
        other_rank, other_chunk = placement.locate(other_stage)
        if other_rank == rank:
            return here(kinds, other_chunk)
        if lowered:
            return here(frozenset({recv}))
        return Need(other_rank, other_chunk, kinds, mb, True)

    if kind is Kind.F:
        return () if first else (neighbour(stage - 1, _F, Kind.RECV_F),)
    if kind in INPUT_GRAD_KINDS:
        needs = [here(_F)]
        if not last:
            needs.append(neighbour(stage + 1, INPUT_GRAD_KINDS, Kind.RECV_B))
        return tuple(needs)
    if kind is Kind.W:
        return (here(frozenset({Kind.B})),)
    if kind is Kind.SEND_F:
        return (here(_F),)
    if kind is Kind.SEND_B:
        return (here(INPUT_GRAD_KINDS),)
    if kind is Kind.OFFLOAD:
        return (here(_F),)
    if kind is Kind.RELOAD:
        return (here(frozenset({Kind.OFFLOAD})),)
    if kind is Kind.RECV_F:
        if first:
            return ()
        other_rank, other_chunk = placement.locate(stage - 1)
        return (Need(other_rank, other_chunk, frozenset({Kind.SEND_F}), mb, other_rank != rank),)
    if kind is Kind.RECV_B:
        if last:
            return ()
        other_rank, other_chunk = placement.locate(stage + 1)
        return (Need(other_rank, other_chunk, frozenset({Kind.SEND_B}), mb, other_rank != rank),)
    raise ValueError(f"no dependency rule for kind {kind!r}")


def offload_requirement(rank: int, action: Action) -> Need | None:
    """The extra need of ``action`` when its unit is offloaded: a B or BW needs the unit's RELOAD."""
    if action.kind in INPUT_GRAD_KINDS:
        return Need(rank, action.chunk, frozenset({Kind.RELOAD}), action.microbatch, False)
    return None
