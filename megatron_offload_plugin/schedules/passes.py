"""Lowering passes: ``Schedule -> Schedule`` functions that never mutate their input.

Generators emit compute actions only (F, B, W, BW); :func:`add_send_recv`
adds the messages between ranks, using :func:`.deps.requirements` to learn
which compute action needs which remote result.
"""

from __future__ import annotations

from .deps import requirements
from .ir import Action, Kind, Schedule


class ScheduleLoweringError(ValueError):
    """A pass was given a schedule it cannot lower."""


def add_send_recv(schedule: Schedule) -> Schedule:
    """Add ``SEND_F``/``SEND_B`` right after each producer whose result another rank needs,
    and ``RECV_F``/``RECV_B`` right before each consumer that needs it.

    Sends are asynchronous and receives block, so a receive placed just before
    its consumer waits exactly as long as the consumer would have waited: the
    lowered schedule runs in the same time as the compute-only one (and the
    validator checks both).  Stages on the same rank exchange nothing.

    >>> s = add_send_recv(Schedule.parse({0: "0F0 0F1", 1: "0F0 0F1"}))
    >>> s.format(1)
    '0RECV_F0 0F0 0RECV_F1 0F1'
    """
    if schedule.is_lowered:
        raise ScheduleLoweringError(f"schedule {schedule.name or ''!s} already has communication actions")
    placement = schedule.placement
    # Producers whose result crosses ranks: (rank, chunk, microbatch, 'F' or 'B').
    sends: set[tuple[int, int, int, str]] = set()
    recvs: dict[tuple[int, Action], list[Action]] = {}
    for rank, row in enumerate(schedule.ranks):
        for action in row:
            for need in requirements(placement, rank, action, lowered=False):
                if not need.remote:
                    continue
                forward = Kind.F in need.kinds
                sends.add((need.rank, need.chunk, need.microbatch, "F" if forward else "B"))
                recv = Action(action.chunk, Kind.RECV_F if forward else Kind.RECV_B, action.microbatch)
                recvs.setdefault((rank, action), []).append(recv)

    new_ranks = []
    for rank, row in enumerate(schedule.ranks):
        out: list[Action] = []
        for action in row:
            out.extend(recvs.get((rank, action), ()))
            out.append(action)
            if action.kind is Kind.F and (rank, action.chunk, action.microbatch, "F") in sends:
                out.append(Action(action.chunk, Kind.SEND_F, action.microbatch))
            elif action.kind in (Kind.B, Kind.BW) and (rank, action.chunk, action.microbatch, "B") in sends:
                out.append(Action(action.chunk, Kind.SEND_B, action.microbatch))
        new_ranks.append(out)
    return schedule.replace_ranks(new_ranks)


def remove_comms(schedule: Schedule) -> Schedule:
    """The inverse of :func:`add_send_recv`: keep compute actions only."""
    return schedule.compute_only()


def split_backward(schedule: Schedule) -> Schedule:
    """Turn every unsplit ``BW`` into ``B`` followed immediately by its ``W`` (same order of work)."""
    new_ranks = []
    for row in schedule.ranks:
        out: list[Action] = []
        for a in row:
            if a.kind is Kind.BW:
                out += [Action(a.chunk, Kind.B, a.microbatch), Action(a.chunk, Kind.W, a.microbatch)]
            else:
                out.append(a)
        new_ranks.append(out)
    return schedule.replace_ranks(new_ranks)
