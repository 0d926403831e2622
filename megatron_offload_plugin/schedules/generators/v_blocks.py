"""Building blocks for V schedules with controllable memory (Qi et al., "Pipeline Parallelism
with Controllable Memory").

A building block fixes, for every device ``d``, the slot of each of its six
actions for one microbatch: F and B of chunk 0 (stage ``d``) and chunk 1
(stage ``2p - 1 - d``) and the two W's.  With F, B and W of a chunk taking one
slot each, the block repeats every 6 slots (microbatch ``j`` shifted by
``6 j``) and a device is busy in every slot of the steady state.  Its
activation memory is the overlap of the repeated lifespans (F start to W end):
the shorter the lifespans, the less memory, which is what V-Min and V-Half
trade against warm-up and cool-down bubbles.

Blocks are built along the dependency chain: chunk-0 forwards from device 0
up, the turn, chunk-1 forwards back down, chunk-1 backwards up, chunk-0
backwards down, each in the first slot whose residue modulo 6 is still free
on that device, after optional gaps ``k`` (before the turn), ``g`` (between
the forward and backward passes) and ``h`` (before the backward turn); each
W takes the first free residue after its B.  A device's order is its actions
sorted by slot; the simulator then runs them as early as the costs allow.
"""

from __future__ import annotations

import itertools
from functools import lru_cache
from typing import NamedTuple

from ..ir import Action, Kind, Placement, Schedule

PERIOD = 6


class Block(NamedTuple):
    """Slots per device: ``f0``, ``f1``, ``b1``, ``b0``, ``w1``, ``w0`` (each a tuple over devices)."""

    f0: tuple[int, ...]
    f1: tuple[int, ...]
    b1: tuple[int, ...]
    b0: tuple[int, ...]
    w1: tuple[int, ...]
    w0: tuple[int, ...]

    def slots(self, d: int) -> list[tuple[int, Action]]:
        """(slot, action for microbatch 0) of device ``d``."""
        return [(self.f0[d], Action(0, Kind.F, 0)), (self.f1[d], Action(1, Kind.F, 0)),
                (self.b1[d], Action(1, Kind.B, 0)), (self.b0[d], Action(0, Kind.B, 0)),
                (self.w1[d], Action(1, Kind.W, 0)), (self.w0[d], Action(0, Kind.W, 0))]

    @property
    def span(self) -> int:
        return max(max(self.w0), max(self.w1)) + 1

    def steady_peak(self, fractions: tuple[float, float] = (0.5, 0.5)) -> float:
        """Highest activation held on any device once the block repeats (F start to W end)."""
        worst = 0.0
        for d in range(len(self.f0)):
            for t in range(PERIOD):
                held = 0.0
                for (first, last), frac in zip(((self.f0[d], self.w0[d]), (self.f1[d], self.w1[d])), fractions):
                    # microbatches j with first + 6j <= t <= last + 6j
                    held += frac * (_floor_div(t - first, PERIOD) - _ceil_div(t - last, PERIOD) + 1)
                worst = max(worst, held)
        return worst


def _floor_div(a: int, b: int) -> int:
    return a // b


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def build_block(p: int, g: int = 0, h: int = 0, k: int = 0, w0_first: bool = False) -> Block:
    used: list[set[int]] = [set() for _ in range(p)]

    def place(d: int, earliest: int) -> int:
        t = earliest
        while t % PERIOD in used[d]:
            t += 1
        used[d].add(t % PERIOD)
        return t

    f0, f1, b1, b0, w1, w0 = ([0] * p for _ in range(6))
    for d in range(p):
        f0[d] = place(d, f0[d - 1] + 1 if d else 0)
    for d in reversed(range(p)):
        f1[d] = place(d, f1[d + 1] + 1 if d < p - 1 else f0[d] + 1 + k)
    for d in range(p):
        b1[d] = place(d, b1[d - 1] + 1 if d else f1[0] + 1 + g)
    for d in reversed(range(p)):
        b0[d] = place(d, b0[d + 1] + 1 if d < p - 1 else b1[d] + 1 + h)
    for d in range(p):
        if w0_first:
            w0[d] = place(d, b0[d] + 1)
            w1[d] = place(d, b1[d] + 1)
        else:
            w1[d] = place(d, b1[d] + 1)
            w0[d] = place(d, b0[d] + 1)
    return Block(*(tuple(x) for x in (f0, f1, b1, b0, w1, w0)))


@lru_cache(maxsize=64)
def block_family(p: int) -> tuple[tuple[float, int, Block], ...]:
    """All blocks of the family for ``p`` devices as (steady peak, span, block), best first; for a
    given peak only the shortest spans are kept."""
    seen: dict[Block, tuple[float, int]] = {}
    for g, h, k, w0_first in itertools.product(range(PERIOD), range(PERIOD), range(PERIOD), (False, True)):
        block = build_block(p, g, h, k, w0_first)
        if block not in seen:
            seen[block] = (block.steady_peak(), block.span)
    ranked = sorted(((peak, span, block) for block, (peak, span) in seen.items()), key=lambda x: (x[0], x[1]))
    return tuple(ranked)


def blocks_within(p: int, memory_limit: float, keep: int = 3) -> list[Block]:
    """The ``keep`` shortest blocks whose steady peak fits ``memory_limit``."""
    fitting = [(span, peak, block) for peak, span, block in block_family(p) if peak <= memory_limit + 1e-9]
    fitting.sort(key=lambda x: (x[0], -x[1]))
    return [block for _, _, block in fitting[:keep]]


def block_schedule(block: Block, microbatches: int, *, name: str) -> Schedule:
    p = len(block.f0)
    ranks = []
    for d in range(p):
        items = [(slot + PERIOD * j, Action(a.chunk, a.kind, j))
                 for j in range(microbatches) for slot, a in block.slots(d)]
        items.sort(key=lambda x: x[0])
        ranks.append(tuple(a for _, a in items))
    return Schedule(Placement.v_shape(p), tuple(ranks), microbatches, name=name)
