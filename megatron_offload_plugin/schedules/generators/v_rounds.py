"""The round-based greedy for the V placement of ZB-V (Qi et al., "Pipeline Parallelism with
Controllable Memory"), re-derived from the published description and heuristic.

Device ``d`` holds stage ``d`` (chunk 0) and stage ``2p - 1 - d`` (chunk 1).
Actions are placed in a global order in which every cross-device input is
already placed, so each start time is known when it is placed:

* warm-up: one chunk-0 F on every device; then, from the last device down,
  extra chunk-0 F's on devices ``0..d`` while device ``d`` would otherwise
  wait for its first chunk-1 F (and memory allows), then that chunk-1 F;
  then later devices catch up on forwards, alternating chunks;
* ``2m`` rounds, each placing one B per device (the chunk whose input
  gradient is available, chunk 1's first) and then one F per device
  (chunk 1's if its input is there, else chunk 0's);
* W's are placed before an F or B whenever memory requires, whenever they fit
  in the wait for the input, and, past the wait the other devices already
  accepted ("approved bubble"), to fill it anyway; the rest close the tail.

A second pass re-runs with the per-device bubbles of the first as the
approved ones and keeps it if its largest device bubble is smaller.
``fill_f``/``fill_b`` decide whether an over-long wait before an F / a
chunk-1 B is filled; the generators try all four.

Memory follows :mod:`..costs` (held from F to W); an action that would
exceed the limit makes the candidate infeasible (:class:`Infeasible`).
"""

from __future__ import annotations

from collections import deque

from ..costs import CostModel
from ..ir import Action, Kind, Placement, Schedule
from ..simulator import Pruned

_EPS = 1e-9


class Infeasible(ValueError):
    """This heuristic cannot build a schedule for these settings (memory too tight, ...)."""


def v_rounds_schedule(pp: int, microbatches: int, costs: CostModel, memory_limit: float, *,
                      fill_f: bool = True, fill_b: bool = True, name: str = "zb-v",
                      cutoff: float = float("inf")) -> Schedule:
    best: _VRounds | None = None
    approved: list[float] | None = None
    for _ in range(16):
        try:
            run = _VRounds(pp, microbatches, costs, memory_limit, fill_f, fill_b, approved, cutoff).run()
        except Pruned:
            if best is None:
                raise
            break
        if best is not None and not run.max_bubble < best.max_bubble - _EPS:
            break
        best = run
        if approved is not None and not run.max_bubble < max(approved) - _EPS:
            break
        approved = list(run.bubble)
    if best is None:
        raise Infeasible("no round-based V schedule was built")
    return Schedule(best.pl, tuple(tuple(o) for o in best.orders), microbatches, name=name)


class _VRounds:
    def __init__(self, p: int, m: int, costs: CostModel, limit: float, fill_f: bool, fill_b: bool,
                 approved: list[float] | None, cutoff: float = float("inf")) -> None:
        self.p, self.m, self.costs, self.limit, self.cutoff = p, m, costs, limit, cutoff
        self.fill_f, self.fill_b = fill_f, fill_b
        self.pl = Placement.v_shape(p)
        self.approved = approved if approved is not None else [-1.0] * p
        self.max_approved = max(self.approved)
        self.t = [0.0] * p
        self.mem = [0.0] * p
        self.bubble = [0.0] * p
        self.count = [{(k, c): 0 for k in (Kind.F, Kind.B, Kind.W) for c in (0, 1)} for _ in range(p)]
        self.end: dict[tuple[Kind, int, int, int], float] = {}  # (kind, chunk, device, mb)
        self.pending_w: list[deque[tuple[int, int]]] = [deque() for _ in range(p)]
        self.orders: list[list[Action]] = [[] for _ in range(p)]
        self.work = [m * sum(costs.duration(self.pl, d, Action(c, k, 0))
                             for c in (0, 1) for k in (Kind.F, Kind.B, Kind.W)) for d in range(p)]

    # -- the dependency of the next (kind, chunk) on device d --------------------------------------
    def _dep(self, d: int, kind: Kind, chunk: int, mb: int) -> tuple[Kind, int, int, int] | None:
        """The cross-device (or turn) input of ``kind`` on ``chunk`` of device ``d`` for ``mb``."""
        p = self.p
        if kind is Kind.F:
            if chunk == 0:
                return (Kind.F, 0, d - 1, mb) if d > 0 else None
            return (Kind.F, 1, d + 1, mb) if d < p - 1 else (Kind.F, 0, d, mb)
        if kind is Kind.B:
            if chunk == 1:
                return (Kind.B, 1, d - 1, mb) if d > 0 else (Kind.F, 1, d, mb)
            return (Kind.B, 0, d + 1, mb) if d < p - 1 else (Kind.B, 1, d, mb)
        return (Kind.B, chunk, d, mb)

    def _ready(self, d: int, kind: Kind, chunk: int) -> float | None:
        """When the next ``kind`` on ``chunk`` of ``d`` could start given its input (None: not placed)."""
        mb = self.count[d][(kind, chunk)]
        dep = self._dep(d, kind, chunk, mb)
        if dep is None:
            return 0.0
        end = self.end.get(dep)
        if end is None:
            return None
        return end + (self.costs.comm if dep[2] != d else 0.0)

    def _max_bubble(self, d: int) -> float:
        return max(max(self.bubble), self.max_approved - self.approved[d])

    # -- placing -------------------------------------------------------------------------------
    def _put(self, d: int, kind: Kind, chunk: int) -> None:
        mb = self.count[d][(kind, chunk)]
        if mb >= self.m:
            raise Infeasible(f"device {d} has no {kind.value} left on chunk {chunk}")
        action = Action(chunk, kind, mb)
        frac = self.costs.fraction(self.pl, d, chunk)
        if kind is Kind.F:
            if self.mem[d] + frac > self.limit + _EPS:
                raise Infeasible(f"device {d} would exceed memory_limit={self.limit}")
            if chunk == 1 and self.count[d][(Kind.F, 0)] <= mb:
                raise Infeasible("chunk 1 forward before chunk 0's")
        if kind is Kind.B and self.count[d][(Kind.F, chunk)] <= mb:
            raise Infeasible("backward before its forward")
        ready = self._ready(d, kind, chunk)
        if ready is None:
            raise Infeasible(f"device {d}: {action!r} placed before its input")
        start = max(self.t[d], ready)
        if self.count[d][(Kind.F, 0)] > 0:
            self.bubble[d] += start - self.t[d]
        end = start + self.costs.duration(self.pl, d, action)
        self.work[d] -= end - start
        if end + self.work[d] > self.cutoff:
            raise Pruned(f"past {self.cutoff}")
        self.end[(kind, chunk, d, mb)] = end
        self.t[d] = end
        self.count[d][(kind, chunk)] += 1
        self.orders[d].append(action)
        if kind is Kind.F:
            self.mem[d] += frac
        elif kind is Kind.B:
            self.mem[d] -= self.costs.b_releases * frac
            self.pending_w[d].append((chunk, mb))
        else:
            self.mem[d] -= (1.0 - self.costs.b_releases) * frac

    def _put_w(self, d: int) -> None:
        chunk, _ = self.pending_w[d].popleft()
        self._put(d, Kind.W, chunk)

    def _w_cost(self, d: int) -> float:
        chunk = self.pending_w[d][0][0]
        return self.costs.duration(self.pl, d, Action(chunk, Kind.W, 0))

    def _fill_then_put(self, d: int, kind: Kind, chunk: int, fill_long_wait: bool) -> None:
        ready = self._ready(d, kind, chunk)
        if ready is not None and self._dep(d, kind, chunk, self.count[d][(kind, chunk)]) is not None:
            while self.pending_w[d] and ready >= self.t[d] + self._w_cost(d) - _EPS:
                self._put_w(d)
            if self.pending_w[d] and ready - self.t[d] > self._max_bubble(d) - self.bubble[d] and fill_long_wait:
                self._put_w(d)
        self._put(d, kind, chunk)

    def _frac(self, d: int, chunk: int) -> float:
        return self.costs.fraction(self.pl, d, chunk)

    # -- phases --------------------------------------------------------------------------------
    def _warmup(self) -> None:
        p, m = self.p, self.m
        for d in range(p):
            self._put(d, Kind.F, 0)
        for d in reversed(range(p)):
            if d < p - 1:
                arrival = self._ready(d, Kind.F, 1)
                if arrival is None:
                    raise Infeasible(f"device {d}: the turn's forward is not placed")
                f_cost = self.costs.duration(self.pl, d, Action(0, Kind.F, 0))
                while (self.mem[d] + self._frac(d, 0) * (2 + 2 * d) <= self.limit + _EPS
                       and self.t[d] + f_cost <= arrival + _EPS and self.count[d][(Kind.F, 0)] < m):
                    for e in range(d + 1):
                        self._put(e, Kind.F, 0)
            self._put(d, Kind.F, 1)
        chunk = 0
        for d in range(1, p):
            for _ in range(4 * m + 4):
                f_here = self.count[d][(Kind.F, 0)] + self.count[d][(Kind.F, 1)]
                f_prev = self.count[d - 1][(Kind.F, 0)] + self.count[d - 1][(Kind.F, 1)]
                if not (f_here < f_prev or self.count[d][(Kind.F, 1)] <= self.count[d - 1][(Kind.F, 1)] < m):
                    break
                for e in reversed(range(d, p)):
                    if self.count[e][(Kind.F, chunk)] < m:
                        self._put(e, Kind.F, chunk)
                chunk = 1 - chunk
            else:
                raise Infeasible("warm-up does not converge")

    def _round(self) -> None:
        p, m = self.p, self.m
        for d in range(p):
            while self.pending_w[d] and self.mem[d] > self.limit + _EPS:
                self._put_w(d)
        chunk0_devices, chunk1_devices = [], []
        for d in range(p):
            b0, b1 = self.count[d][(Kind.B, 0)], self.count[d][(Kind.B, 1)]
            if b0 >= b1:
                chunk1_devices.append(d)
            elif d == p - 1 or (Kind.B, 0, d + 1, b0) in self.end or b1 >= m:
                chunk0_devices.append(d)
            else:
                chunk1_devices.append(d)
        for d, chunk in [(d, 0) for d in reversed(chunk0_devices)] + [(d, 1) for d in chunk1_devices]:
            if self.count[d][(Kind.B, chunk)] >= m or self.count[d][(Kind.F, chunk)] <= self.count[d][(Kind.B, chunk)]:
                continue
            if self._ready(d, Kind.B, chunk) is None:
                continue
            self._fill_then_put(d, Kind.B, chunk, fill_long_wait=(chunk == 0 or self.fill_b))
        for d in range(p):
            f0, f1 = self.count[d][(Kind.F, 0)], self.count[d][(Kind.F, 1)]
            if f1 >= m:
                continue
            if f1 >= f0:
                chunk = 0
            elif d == p - 1 or self._ready(d, Kind.F, 1) is not None:
                chunk = 1
            elif f0 < m and self._ready(d, Kind.F, 0) is not None:
                chunk = 0
            else:
                continue
            if self._ready(d, Kind.F, chunk) is None:
                continue
            frac = self._frac(d, chunk)
            while self.mem[d] + frac > self.limit + _EPS:
                if not self.pending_w[d]:
                    raise Infeasible(f"device {d} is full with no W left to free memory")
                self._put_w(d)
            self._fill_then_put(d, Kind.F, chunk, fill_long_wait=self.fill_f)

    def run(self) -> _VRounds:
        self._warmup()
        for _ in range(2 * self.m):
            self._round()
        for d in range(self.p):
            while self.pending_w[d]:
                self._put_w(d)
        if any(len(o) != 6 * self.m for o in self.orders):
            raise Infeasible("rounds ended before every action was placed")
        return self

    @property
    def max_bubble(self) -> float:
        return max(self.bubble)
