"""An event-driven list scheduler for split (F, B, W) schedules under a memory limit.

It plays all devices forward in simulated time under the cost model.  When
a device is free it picks, among the actions whose inputs have arrived:

1. a B (input gradient: it is on the critical path), oldest microbatch first;
2. an F, if the memory rule below admits it (by ``f_order``);
3. a W (weight gradient), to fill time that would otherwise be idle
   (``fill='eager'``), or only when it surely ends before the next input can
   arrive (``fill='fit'``);

and W's run earlier whenever the next F would otherwise exceed the limit.
``prefer='F'`` swaps 1 and 2.  Every stage runs its F's, its B's and its W's
in microbatch order.  The result is the per-device order of these
decisions; the simulator, replaying it, reproduces the same timeline.

Memory rule (deadlock freedom).  Activation is held from F to W
(:mod:`..costs`).  A device counts as *committed* what its F's hold until
their B's: a W can free the rest at any time.  An F that is a microbatch's
first on the device is admitted only if, after it, committed memory still
leaves room for the microbatch's other chunks on that device
(``headroom='full'``) or for one more chunk (``headroom='one'``, less
conservative).  With ``'full'`` the oldest unfinished microbatch can always
move, so the scheduler cannot deadlock; a run that does get stuck raises
:class:`Stuck` and callers treat it as an infeasible candidate.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

from ..costs import CostModel
from ..ir import Action, Kind, Placement, Schedule
from ..simulator import Pruned

_EPS = 1e-9


class Stuck(RuntimeError):
    """The greedy policy left every device waiting (only possible with ``headroom='one'``)."""


@dataclass(frozen=True)
class GreedyPolicy:
    memory_limit: float
    fill: Literal["eager", "fit"] = "eager"
    prefer: Literal["B", "F"] = "B"
    f_order: Literal["late", "early"] = "late"  # among ready F's: latest stage first, or oldest microbatch
    headroom: Literal["full", "one"] = "full"


def greedy_schedule(placement: Placement, microbatches: int, costs: CostModel, policy: GreedyPolicy,
                    *, name: str = "greedy", cutoff: float = float("inf")) -> Schedule:
    """Build the schedule; raises :class:`~..simulator.Pruned` once an action would end after ``cutoff``."""
    return _Greedy(placement, microbatches, costs, policy, cutoff).run(name)


class _Greedy:
    def __init__(self, placement: Placement, microbatches: int, costs: CostModel, policy: GreedyPolicy,
                 cutoff: float = float("inf")) -> None:
        self.pl, self.m, self.costs, self.policy, self.cutoff = placement, microbatches, costs, policy, cutoff
        p, v = placement.pp, placement.chunks
        self.frac = [[costs.fraction(placement, d, c) for c in range(v)] for d in range(p)]
        self.dur = {k: [[costs.duration(placement, d, Action(c, k, 0)) for c in range(v)] for d in range(p)]
                    for k in (Kind.F, Kind.B, Kind.W)}
        if any(sum(row) > policy.memory_limit + _EPS for row in self.frac):
            raise ValueError(
                f"memory_limit={policy.memory_limit}: one microbatch needs {max(sum(r) for r in self.frac)} "
                "activation units on a device; no schedule fits"
            )
        # Per (device, chunk): stage, and (stage, delay) of the F input and the B input (None: none).
        self.stage = [[placement.stage(d, c) for c in range(v)] for d in range(p)]
        self.f_src: list[list[tuple[int, float] | None]] = [[None] * v for _ in range(p)]
        self.b_src: list[list[tuple[int, float] | None]] = [[None] * v for _ in range(p)]
        for d in range(p):
            for c in range(v):
                s = self.stage[d][c]
                if s > 0:
                    self.f_src[d][c] = (s - 1, costs.comm if placement.locate(s - 1)[0] != d else 0.0)
                if not placement.is_last(s):
                    self.b_src[d][c] = (s + 1, costs.comm if placement.locate(s + 1)[0] != d else 0.0)
        self.t = [0.0] * p
        self.next_f = [[0] * v for _ in range(p)]
        self.next_b = [[0] * v for _ in range(p)]
        self.pending_w: list[deque[tuple[int, int]]] = [deque() for _ in range(p)]
        self.f_end: dict[tuple[int, int], float] = {}  # (stage, mb) -> end of its F
        self.b_end: dict[tuple[int, int], float] = {}
        self.mem = [0.0] * p  # held activation (F started, W not ended)
        self.committed = [0.0] * p  # held until B
        self.first_chunk_f = [set() for _ in range(p)]  # microbatches whose F has started on the device
        self.open_need = [dict() for _ in range(p)]  # mb -> share still to allocate on the device
        self.orders: list[list[Action]] = [[] for _ in range(p)]
        self.remaining = [3 * v * microbatches for _ in range(p)]
        self.work = [microbatches * sum(self.dur[k][d][c] for k in self.dur for c in range(v)) for d in range(p)]

    # -- readiness ------------------------------------------------------------------------------
    def _f_ready(self, d: int, c: int) -> float | None:
        """Arrival time of chunk ``c``'s next F input on device ``d`` (None: not yet known)."""
        j = self.next_f[d][c]
        if j >= self.m:
            return None
        src = self.f_src[d][c]
        if src is None:
            return 0.0
        prev = self.f_end.get((src[0], j))
        return None if prev is None else prev + src[1]

    def _b_ready(self, d: int, c: int) -> float | None:
        j = self.next_b[d][c]
        if j >= self.m or j >= self.next_f[d][c]:
            return None
        own = self.f_end[(self.stage[d][c], j)]
        src = self.b_src[d][c]
        if src is None:
            return own
        nxt = self.b_end.get((src[0], j))
        if nxt is None:
            return None
        nxt += src[1]
        return own if own > nxt else nxt

    def _f_admissible(self, d: int, c: int) -> bool:
        j = self.next_f[d][c]
        frac = self.frac[d][c]
        limit = self.policy.memory_limit + _EPS
        if j in self.open_need[d]:  # a later chunk of a microbatch already admitted here
            return self.policy.headroom == "full" or self.committed[d] + frac <= limit
        rest = sum(self.frac[d]) - frac
        if self.policy.headroom == "full":
            kept = sum(self.open_need[d].values())
            return self.committed[d] + kept + frac + rest <= limit
        return self.committed[d] + frac + (max(self.frac[d]) if rest > 0 else 0.0) <= limit

    # -- actions --------------------------------------------------------------------------------
    def _put(self, d: int, action: Action, start: float) -> None:
        c, kind, j = action
        s = self.pl.stage(d, c)
        end = start + self.dur[kind][d][c]
        self.work[d] -= self.dur[kind][d][c]
        if end + self.work[d] > self.cutoff:  # this device alone cannot finish in time
            raise Pruned(f"past {self.cutoff}")
        frac = self.frac[d][c]
        if kind is Kind.F:
            self.f_end[(s, j)] = end
            self.next_f[d][c] += 1
            self.mem[d] += frac
            self.committed[d] += frac
            need = self.open_need[d]
            if j not in need:
                need[j] = sum(self.frac[d])
            need[j] -= frac
            if need[j] <= _EPS:
                del need[j]
        elif kind is Kind.B:
            self.b_end[(s, j)] = end
            self.next_b[d][c] += 1
            self.committed[d] -= frac
            self.mem[d] -= self.costs.b_releases * frac
            self.pending_w[d].append((c, j))
        else:
            self.mem[d] -= (1.0 - self.costs.b_releases) * frac
        self.t[d] = end
        self.orders[d].append(action)
        self.remaining[d] -= 1

    def _put_w(self, d: int) -> None:
        c, j = self.pending_w[d].popleft()
        self._put(d, Action(c, Kind.W, j), self.t[d])

    def _arrival_bound(self, d: int) -> float:
        """Earliest time an F or B input not yet arrived could reach device ``d``."""
        bound = float("inf")
        for c in range(self.pl.chunks):
            s = self.pl.stage(d, c)
            for kind, nxt, other in ((Kind.F, self.next_f[d][c], s - 1), (Kind.B, self.next_b[d][c], s + 1)):
                if nxt >= self.m or not 0 <= other < self.pl.num_stages:
                    continue
                known = (self.f_end if kind is Kind.F else self.b_end).get((other, nxt))
                e, ec = self.pl.locate(other)
                delay = self.costs.comm if e != d else 0.0
                if known is not None:
                    bound = min(bound, known + delay)
                else:
                    bound = min(bound, self.t[e] + self.dur[kind][e][ec] + delay)
        return bound

    def _step(self, d: int) -> bool:
        """Decide device ``d``'s next action at its free time; False if it must wait."""
        now = self.t[d] + _EPS
        stage = self.stage[d]
        b_key = f_key = None  # (sort key, chunk, microbatch)
        late = self.policy.f_order == "late"
        for c in range(len(stage)):
            r = self._b_ready(d, c)
            if r is not None and r <= now:
                key = (self.next_b[d][c], -stage[c])
                if b_key is None or key < b_key[0]:
                    b_key = (key, c, self.next_b[d][c])
            r = self._f_ready(d, c)
            if r is not None and r <= now and self._f_admissible(d, c):
                j = self.next_f[d][c]
                key = (-stage[c] if late else j, j)
                if f_key is None or key < f_key[0]:
                    f_key = (key, c, j)
        b_pick = Action(b_key[1], Kind.B, b_key[2]) if b_key else None
        f_pick = Action(f_key[1], Kind.F, f_key[2]) if f_key else None
        pick = (b_pick or f_pick) if self.policy.prefer == "B" else (f_pick or b_pick)
        if pick is not None:
            if pick.kind is Kind.F:
                frac = self.frac[d][pick.chunk]
                while self.mem[d] + frac > self.policy.memory_limit + _EPS and self.pending_w[d]:
                    self._put_w(d)
            self._put(d, pick, self.t[d])
            return True
        if self.pending_w[d]:
            w_dur = self.dur[Kind.W][d][self.pending_w[d][0][0]]
            if self.policy.fill == "eager" or self.t[d] + w_dur <= self._arrival_bound(d) + _EPS:
                self._put_w(d)
                return True
        return False

    def run(self, name: str) -> Schedule:
        p = self.pl.pp
        t, remaining = self.t, self.remaining
        live = [d for d in range(p) if remaining[d] > 0]
        blocked: set[int] = set()  # devices that cannot act at the current time
        while live:
            now = min(t[d] for d in live)
            acted = False
            for d in live:
                if t[d] <= now + _EPS and d not in blocked:
                    if self._step(d):
                        acted = True
                        if remaining[d] == 0:
                            live.remove(d)
                        break
                    blocked.add(d)
            if acted:
                continue
            # Everyone free now is waiting: move them to the next moment something can change.
            later = [t[e] for e in live if t[e] > now + _EPS]
            for d in blocked:
                for c in range(self.pl.chunks):
                    for r in (self._f_ready(d, c), self._b_ready(d, c)):
                        if r is not None and r > now + _EPS:
                            later.append(r)
            if not later:
                raise Stuck(f"greedy policy {self.policy} is stuck at t={now}")
            nxt = min(later)
            for d in blocked:
                t[d] = nxt
            blocked.clear()
        return Schedule(self.pl, tuple(tuple(o) for o in self.orders), self.m, name=name)


def list_replay(schedule: Schedule, costs: CostModel, memory_limit: float, *,
                fill: Literal["eager", "fit"] = "fit", window: int | None = None,
                name: str | None = None, cutoff: float = float("inf")) -> Schedule:
    """Re-time ``schedule`` as a priority list: each device, when free, runs the earliest action
    of its own order (within ``window`` places) that is ready, instead of waiting for the next
    one.  Each stage keeps F, B and W in microbatch order; an F runs only if it fits
    ``memory_limit`` with one more chunk to spare; a W (which only frees memory) runs out of
    turn only when it ends before the next action's input can arrive (``fill='fit'``) or
    whenever the device would idle (``'eager'``).  Used to squeeze the warm-up and cool-down of
    a fixed pattern under real costs.  Raises :class:`Stuck` if the devices deadlock.
    """
    return _Replay(schedule, costs, memory_limit, fill, window, cutoff).run(name or schedule.name)


class _Replay:
    def __init__(self, schedule: Schedule, costs: CostModel, limit: float, fill: str, window: int | None,
                 cutoff: float) -> None:
        self.s, self.costs, self.limit, self.fill, self.cutoff = schedule, costs, limit, fill, cutoff
        pl = schedule.placement
        self.pl = pl
        self.window = window or 6 * pl.chunks
        self.todo = [list(row) for row in schedule.ranks]
        self.t = [0.0] * pl.pp
        self.mem = [0.0] * pl.pp
        self.end: dict[tuple[int, Kind, int], float] = {}  # (stage, F/B, mb)
        self.done_b: set[tuple[int, int]] = set()
        self.orders: list[list[Action]] = [[] for _ in range(pl.pp)]
        self.spare = [max(costs.fraction(pl, d, c) for c in range(pl.chunks)) for d in range(pl.pp)]
        self.work = [sum(costs.duration(pl, d, a) for a in row) for d, row in enumerate(schedule.ranks)]

    def _ready(self, d: int, a: Action) -> float | None:
        s = self.pl.stage(d, a.chunk)
        comm = self.costs.comm
        if a.kind is Kind.F:
            if s == 0:
                return 0.0
            e = self.end.get((s - 1, Kind.F, a.microbatch))
            return None if e is None else e + (comm if self.pl.locate(s - 1)[0] != d else 0.0)
        if a.kind in (Kind.B, Kind.BW):
            own = self.end.get((s, Kind.F, a.microbatch))
            if own is None:
                return None
            if self.pl.is_last(s):
                return own
            e = self.end.get((s + 1, Kind.B, a.microbatch))
            return None if e is None else max(own, e + (comm if self.pl.locate(s + 1)[0] != d else 0.0))
        return 0.0 if (s, a.microbatch) in self.done_b else None

    def _start(self, d: int, i: int, start: float) -> None:
        a = self.todo[d].pop(i)
        pl, costs = self.pl, self.costs
        s = pl.stage(d, a.chunk)
        end = start + costs.duration(pl, d, a)
        self.work[d] -= end - start
        if end + self.work[d] > self.cutoff:
            raise Pruned(f"past {self.cutoff}")
        self.mem[d] += costs.allocates(pl, d, a) - costs.releases(pl, d, a)
        if a.kind is Kind.F:
            self.end[(s, Kind.F, a.microbatch)] = end
        elif a.kind in (Kind.B, Kind.BW):
            self.end[(s, Kind.B, a.microbatch)] = end
            self.done_b.add((s, a.microbatch))
        self.t[d] = end
        self.orders[d].append(a)

    def _step(self, d: int) -> bool:
        now = self.t[d]
        todo = self.todo[d]
        heads: set[tuple[int, Kind]] = set()
        head_arrival = None
        for i, a in enumerate(todo[: self.window]):
            key = (a.chunk, a.kind)
            if key in heads:
                continue
            heads.add(key)
            r = self._ready(d, a)
            if i == 0:
                head_arrival = r
            if r is None or r > now + _EPS:
                continue
            if a.kind is Kind.F:
                frac = self.costs.allocates(self.pl, d, a)
                spare = 0.0 if i == 0 else self.spare[d]
                if self.mem[d] + frac + spare > self.limit + _EPS:
                    continue
            elif a.kind is Kind.W and i > 0 and self.fill == "fit":
                dur = self.costs.duration(self.pl, d, a)
                if head_arrival is None or now + dur > head_arrival + _EPS:
                    continue
            self._start(d, i, now)
            return True
        return False

    def run(self, name: str) -> Schedule:
        p = self.pl.pp
        blocked: set[int] = set()
        while True:
            live = [d for d in range(p) if self.todo[d]]
            if not live:
                break
            now = min(self.t[d] for d in live)
            acted = False
            for d in live:
                if self.t[d] <= now + _EPS and d not in blocked:
                    if self._step(d):
                        acted = True
                        break
                    blocked.add(d)
            if acted:
                continue
            later = [self.t[e] for e in live if self.t[e] > now + _EPS]
            for d in blocked:
                for a in self.todo[d][: self.window]:
                    r = self._ready(d, a)
                    if r is not None and r > now + _EPS:
                        later.append(r)
            if not later:
                raise Stuck(f"list replay of {name!r} is stuck at t={now}")
            nxt = min(later)
            for d in blocked:
                self.t[d] = nxt
            blocked.clear()
        return self.s.replace_ranks(self.orders, name=name)
