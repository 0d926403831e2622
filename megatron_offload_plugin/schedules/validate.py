"""Prove a schedule complete and deadlock-free before anything runs it.

:func:`validate` checks, in order:

1. every action names a chunk the rank holds and a microbatch in range, and no
   action appears twice on a rank;
2. completeness: every (stage, microbatch) has exactly one F and either one BW
   or one B and one W; a lowered schedule sends every message it receives and
   receives every message it sends;
3. activation offload: a unit (chunk, microbatch) has at most one OFFLOAD, after
   its F; it has a RELOAD if and only if it has an OFFLOAD, after the OFFLOAD and
   before the unit's B (or BW);
4. dependencies and deadlock freedom: running every rank in its own order,
   with each action waiting for what :func:`.deps.requirements` says must come
   first, reaches the end of every rank.

A failure raises :class:`ScheduleError`, whose message starts
``Rank 1, step 7: ...`` and ends with the grid of all ranks' actions with
``<-- ERROR HERE`` on that step.
"""

from __future__ import annotations

from collections import Counter

from .deps import requirements
from .ir import Action, Kind, Schedule


class ScheduleError(Exception):
    """A schedule that would fail or hang at run time; ``rank`` and ``step`` locate the fault."""

    def __init__(self, schedule: Schedule, rank: int, step: int, problem: str) -> None:
        self.rank, self.step, self.problem = rank, step, problem
        self.grid = schedule.format_grid(error_step=step, error_rank=rank)
        title = f" (schedule {schedule.name!r})" if schedule.name else ""
        super().__init__(f"Rank {rank}, step {step}: {problem}{title}\n{self.grid}")


def validate(schedule: Schedule) -> list[tuple[int, int]]:
    """Raise :class:`ScheduleError` unless ``schedule`` is complete and deadlock-free.

    Returns one dependency-respecting execution order of all actions as
    ``(rank, step)`` pairs (the simulator times actions in this order).
    """
    _check_actions(schedule)
    _check_complete(schedule)
    _check_offload(schedule)
    order = execution_order(schedule)
    object.__setattr__(schedule, "_validated", True)  # schedules are immutable: once is enough
    return order


def is_validated(schedule: Schedule) -> bool:
    """Whether :func:`validate` already passed for this very object."""
    return getattr(schedule, "_validated", False)


def _check_actions(schedule: Schedule) -> None:
    chunks, m = schedule.placement.chunks, schedule.microbatches
    for rank, row in enumerate(schedule.ranks):
        seen: set[Action] = set()
        for step, a in enumerate(row):
            if not 0 <= a.chunk < chunks:
                raise ScheduleError(schedule, rank, step, f"{a!r}: rank {rank} holds chunks 0..{chunks - 1}")
            if not 0 <= a.microbatch < m:
                raise ScheduleError(schedule, rank, step, f"{a!r}: microbatch outside 0..{m - 1}")
            if a in seen:
                raise ScheduleError(schedule, rank, step, f"{a!r} appears a second time on rank {rank}")
            seen.add(a)


def _check_complete(schedule: Schedule) -> None:
    placement, m = schedule.placement, schedule.microbatches
    for rank, row in enumerate(schedule.ranks):
        present = {(a.chunk, a.kind, a.microbatch): step for step, a in enumerate(row)}
        end = len(row)
        for chunk in range(placement.chunks):
            stage = placement.stage(rank, chunk)
            for mb in range(m):
                def has(kind: Kind) -> bool:
                    return (chunk, kind, mb) in present

                where = f"stage {stage} (rank {rank}, chunk {chunk}), microbatch {mb}"
                if not has(Kind.F):
                    raise ScheduleError(schedule, rank, end, f"{where} has no forward {Action(chunk, Kind.F, mb)!r}")
                if has(Kind.BW) and (has(Kind.B) or has(Kind.W)):
                    step = max(present.get((chunk, k, mb), -1) for k in (Kind.B, Kind.W, Kind.BW))
                    raise ScheduleError(schedule, rank, step, f"{where} has both an unsplit BW and a split B/W")
                if not has(Kind.BW):
                    for kind in (Kind.B, Kind.W):
                        if not has(kind):
                            raise ScheduleError(
                                schedule, rank, end,
                                f"{where} has no {kind.value} ({Action(chunk, kind, mb)!r}) and no BW: "
                                "each microbatch needs one F and one B and one W (or one BW) per chunk",
                            )
    if schedule.is_lowered:
        _check_messages(schedule)


def _check_offload(schedule: Schedule) -> None:
    """OFFLOAD after F, RELOAD iff OFFLOAD, after it and before the unit's B/BW (positions on the rank)."""
    for rank, row in enumerate(schedule.ranks):
        if not any(a.is_offload for a in row):
            continue
        step_of = {a: step for step, a in enumerate(row)}
        for step, a in enumerate(row):
            if not a.is_offload:
                continue
            chunk, mb = a.unit
            f = step_of.get(Action(chunk, Kind.F, mb), len(row))
            offload = step_of.get(Action(chunk, Kind.OFFLOAD, mb))
            reload = step_of.get(Action(chunk, Kind.RELOAD, mb))
            backward = min(step_of.get(Action(chunk, k, mb), len(row)) for k in (Kind.B, Kind.BW))
            b_name = repr(row[backward]) if backward < len(row) else "its B"
            if a.kind is Kind.OFFLOAD:
                if step < f:
                    raise ScheduleError(schedule, rank, step,
                                        f"{a!r} comes before {Action(chunk, Kind.F, mb)!r}: an OFFLOAD copies the "
                                        "activations its F saved, so it must follow that F")
                if reload is None:
                    raise ScheduleError(schedule, rank, step,
                                        f"{a!r} has no {Action(chunk, Kind.RELOAD, mb)!r}: an offloaded unit needs "
                                        f"a RELOAD before {b_name}")
            else:
                if offload is None:
                    raise ScheduleError(schedule, rank, step,
                                        f"{a!r} has no {Action(chunk, Kind.OFFLOAD, mb)!r}: a RELOAD brings back "
                                        "what an OFFLOAD moved, so it needs one earlier on the rank")
                if step < offload:
                    raise ScheduleError(schedule, rank, step,
                                        f"{a!r} comes before {Action(chunk, Kind.OFFLOAD, mb)!r}: it must follow "
                                        "the OFFLOAD it undoes")
                if step > backward:
                    raise ScheduleError(schedule, rank, step,
                                        f"{a!r} comes after {b_name}, which reads the reloaded activations: "
                                        "the RELOAD must come before the unit's B (or BW)")


def _check_messages(schedule: Schedule) -> None:
    """Every SEND has its RECV on the neighbour's rank and vice versa."""
    received: Counter[tuple[int, Action]] = Counter()
    for rank, row in enumerate(schedule.ranks):
        for a in row:
            if a.kind in (Kind.RECV_F, Kind.RECV_B):
                for need in requirements(schedule.placement, rank, a, lowered=True):
                    received.update(need.keys())
    for rank, row in enumerate(schedule.ranks):
        for step, a in enumerate(row):
            if a.kind in (Kind.SEND_F, Kind.SEND_B) and received[(rank, a)] != 1:
                raise ScheduleError(schedule, rank, step, f"{a!r} is sent but no rank posts the matching receive")


def execution_order(schedule: Schedule) -> list[tuple[int, int]]:
    """Run every rank in order, each action after its needs; raise on a deadlock."""
    placement, lowered = schedule.placement, schedule.is_lowered
    rows = schedule.ranks
    needs = [[requirements(placement, r, a, lowered=lowered) for a in row] for r, row in enumerate(rows)]
    done: set[tuple[int, Action]] = set()
    pos = [0] * len(rows)
    order: list[tuple[int, int]] = []
    progress = True
    while progress:
        progress = False
        for rank, row in enumerate(rows):
            while pos[rank] < len(row):
                step = pos[rank]
                if not all(any(k in done for k in n.keys()) for n in needs[rank][step]):
                    break
                done.add((rank, row[step]))
                order.append((rank, step))
                pos[rank] += 1
                progress = True
    if all(p == len(row) for p, row in zip(pos, rows)):
        return order
    _raise_deadlock(schedule, pos, needs, done)
    raise AssertionError("unreachable")


def _raise_deadlock(schedule: Schedule, pos: list[int], needs: list, done: set) -> None:
    everywhere = {(r, a) for r, row in enumerate(schedule.ranks) for a in row}
    blocked = []
    for rank, row in enumerate(schedule.ranks):
        if pos[rank] == len(row):
            continue
        step = pos[rank]
        missing = [n for n in needs[rank][step] if not any(k in done for k in n.keys())]
        blocked.append((rank, step, row[step], missing))
    # Name the root cause when there is an obvious one: something no rank will ever run, or
    # something later on the same rank (the rank's own order is wrong).
    for rank, step, action, missing in blocked:
        absent = [n for n in missing if not any(k in everywhere for k in n.keys())]
        if absent:
            raise ScheduleError(schedule, rank, step,
                                f"{action!r} needs {absent[0]}, which is not in the schedule")
    for rank, step, action, missing in blocked:
        later = [n for n in missing if n.rank == rank]
        if later:
            raise ScheduleError(schedule, rank, step,
                                f"{action!r} needs {later[0]}, which comes later on the same rank")
    rank, step, action, missing = blocked[0]
    others = "; ".join(f"rank {r} step {s} {a!r} waits for {m[0]}" for r, s, a, m in blocked[1:])
    raise ScheduleError(
        schedule, rank, step,
        f"deadlock: {action!r} waits for {missing[0]}, which waits behind it"
        + (f" ({others})" if others else ""),
    )
