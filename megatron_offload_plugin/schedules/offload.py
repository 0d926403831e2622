"""Activation offload as schedule actions: which units to offload, and where OFFLOAD/RELOAD go.

A *unit* is one (chunk, microbatch) pair on a rank: the activations its F saves
and its B (or BW) reads.  Offloading a unit copies them to the host after the F
(``OFFLOAD``) and back before the B (``RELOAD``); while they are on the host the
device holds none of them.  Following PipeOffload (Wan et al. 2024, "PipeOffload:
Improving Scalability of Pipeline Parallelism with Memory Optimization"):

* the *lifespan* of a unit is the time from its F's end to its B's start (BW for
  an unsplit backward) in the schedule simulated without offload;
* the host link is full duplex: device-to-host (D2H) and host-to-device (H2D)
  copies run on separate channels, each taking ``transfer`` =
  ``unit_bytes x chunk share / bandwidth`` for a unit, so a unit's round trip
  (offload then reload) hides when ``2 x transfer <= lifespan``;
* ``full`` offloads every unit whose lifespan is positive.  A unit whose B
  starts as soon as its F ends (the last stage of 1F1B, the turn of a V) is kept:
  its activations are needed at once, so offloading it would only stall the B
  and cannot lower the peak (the F allocates the unit before any copy starts).
  Units whose round trip does not fit are offloaded anyway and listed in
  :attr:`OffloadPlan.not_hidden`;
* ``selective`` ranks each rank's units by lifespan, longest first (they hold
  memory longest and hide their copies best), and offloads those whose round trip
  fits until ``fraction`` of the rank's units is reached; ``chunks=`` instead
  takes the units of the given local chunks, again skipping any whose round trip
  does not fit (selective never plans an exposed copy).

:func:`plan_offload` picks the units; :func:`insert_offload_actions` writes them
into a schedule; :func:`.simulator.simulate` with ``offload=policy`` times the
copies on per-rank D2H/H2D channels and reports the memory saved and the time
added.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .costs import CostModel
from .ir import Action, Kind, Placement, Schedule

if TYPE_CHECKING:
    from .simulator import SimulationResult

Unit = tuple[int, int]  # (chunk, microbatch) on one rank
OFFLOAD_MODES = ("none", "full", "selective")
DEFAULT_SELECTIVE_FRACTION = 0.5


@dataclass(frozen=True)
class OffloadPolicy:
    """What to offload and how fast the host link is.

    ``bandwidth_gbps`` is the host link in GB/s (10^9 bytes per second) each
    direction, full duplex; ``None`` makes transfers take no time.
    ``unit_bytes`` is the activation bytes of one microbatch through one
    device's full layer share (the simulator's memory unit), so a chunk's unit
    is ``unit_bytes x`` its share; ``time_unit_s`` converts seconds into the cost
    model's time unit.
    """

    mode: Literal["none", "full", "selective"] = "none"
    fraction: float | None = None
    chunks: tuple[int, ...] | None = None
    bandwidth_gbps: float | None = None
    unit_bytes: float | None = None
    time_unit_s: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in OFFLOAD_MODES:
            raise ValueError(f"activation_offload={self.mode!r}: unknown mode; accepted: {', '.join(OFFLOAD_MODES)}")
        if self.chunks is not None:
            chunks = tuple(self.chunks)
            if not chunks or any(not isinstance(c, int) or isinstance(c, bool) or c < 0 for c in chunks):
                raise ValueError(f"offload_chunks={self.chunks!r}: must be a non-empty list of local chunk "
                                 "indices (integers >= 0)")
            object.__setattr__(self, "chunks", tuple(sorted(set(chunks))))
        if self.mode != "selective":
            for name in ("fraction", "chunks"):
                if getattr(self, name) is not None:
                    raise ValueError(f"offload_{name}={getattr(self, name)!r}: only activation_offload='selective' "
                                     f"takes it, not {self.mode!r}")
        if self.fraction is not None and self.chunks is not None:
            raise ValueError(f"offload_fraction={self.fraction!r} and offload_chunks={list(self.chunks)!r}: "
                             "give one or the other (a share of each rank's units, or whole chunks)")
        if self.fraction is not None and not (isinstance(self.fraction, (int, float)) and 0 < self.fraction <= 1):
            raise ValueError(f"offload_fraction={self.fraction!r}: must be in (0, 1]")
        if self.bandwidth_gbps is not None:
            if not (isinstance(self.bandwidth_gbps, (int, float)) and self.bandwidth_gbps > 0):
                raise ValueError(f"offload_bandwidth={self.bandwidth_gbps!r}: must be a positive number of GB/s "
                                 "(or unset for transfers that take no time)")
            if self.unit_bytes is None:
                raise ValueError(f"offload_bandwidth={self.bandwidth_gbps!r} needs activation_bytes (the bytes of "
                                 "one microbatch's activations on one device) to turn bytes into time")
        if self.unit_bytes is not None and not (isinstance(self.unit_bytes, (int, float)) and self.unit_bytes > 0):
            raise ValueError(f"activation_bytes={self.unit_bytes!r}: must be a positive number of bytes")
        if not (isinstance(self.time_unit_s, (int, float)) and self.time_unit_s > 0):
            raise ValueError(f"time_unit_s={self.time_unit_s!r}: must be a positive number of seconds")

    @property
    def selective_fraction(self) -> float | None:
        """The share selective mode aims for (``None`` when it selects by chunk)."""
        if self.mode != "selective" or self.chunks is not None:
            return None
        return DEFAULT_SELECTIVE_FRACTION if self.fraction is None else float(self.fraction)

    def unit_share_bytes(self, costs: CostModel, placement: Placement, rank: int, chunk: int) -> float | None:
        """Bytes of one unit of ``chunk`` on ``rank`` (``None`` without ``unit_bytes``)."""
        if self.unit_bytes is None:
            return None
        return self.unit_bytes * costs.fraction(placement, rank, chunk)

    def transfer_time(self, costs: CostModel, placement: Placement, rank: int, chunk: int) -> float:
        """One-way copy time of one unit of ``chunk`` on ``rank``, in cost-model time units."""
        if self.bandwidth_gbps is None:
            return 0.0
        nbytes = self.unit_share_bytes(costs, placement, rank, chunk)
        return nbytes / (self.bandwidth_gbps * 1e9) / self.time_unit_s

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode}
        if self.mode == "selective":
            if self.chunks is not None:
                out["chunks"] = list(self.chunks)
            else:
                out["fraction"] = self.selective_fraction
        for name in ("bandwidth_gbps", "unit_bytes"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.time_unit_s != 1.0:
            out["time_unit_s"] = self.time_unit_s
        return out


@dataclass(frozen=True)
class OffloadPlan:
    """Which units each rank offloads, and the figures the choice was made on.

    ``lifespan`` and ``transfer`` cover every unit of every rank; ``not_hidden``
    lists offloaded units whose round trip exceeds their lifespan (full mode);
    ``times`` (start, end) of each compute action in the schedule simulated
    without offload, which :func:`insert_offload_actions` uses to place RELOADs.
    """

    units: dict[int, frozenset[Unit]]
    lifespan: dict[int, dict[Unit, float]]
    transfer: dict[int, dict[Unit, float]]
    not_hidden: dict[int, tuple[Unit, ...]]
    policy: OffloadPolicy | None = field(default=None, compare=False)
    times: Mapping[int, Mapping[Action, tuple[float, float]]] | None = field(default=None, compare=False, repr=False)

    @property
    def count(self) -> int:
        return sum(len(u) for u in self.units.values())

    def to_dict(self) -> dict[str, Any]:
        ranks = sorted(self.lifespan)
        return {
            "policy": self.policy.to_dict() if self.policy is not None else None,
            "offloaded_units": self.count,
            "units": [[list(u) for u in sorted(self.units.get(r, ()))] for r in ranks],
            "lifespan": [[[c, m, round(x, 9)] for (c, m), x in sorted(self.lifespan[r].items())] for r in ranks],
            "transfer": [[[c, m, round(x, 9)] for (c, m), x in sorted(self.transfer[r].items())] for r in ranks],
            "not_hidden": [[list(u) for u in self.not_hidden.get(r, ())] for r in ranks],
        }


def unit_lifespans(schedule: Schedule, costs: CostModel) -> tuple[dict[int, dict[Unit, float]],
                                                                   dict[int, dict[Action, tuple[float, float]]]]:
    """Per rank, each unit's F end to B (or BW) start, and each compute action's (start, end),
    from ``schedule`` simulated under ``costs`` without offload."""
    from .simulator import simulate  # the simulator imports this module's policy lazily too

    result = simulate(schedule.without_offload(), costs)
    times: dict[int, dict[Action, tuple[float, float]]] = {r: {} for r in range(schedule.pp)}
    for e in result.timeline:
        if e.action.is_compute:
            times[e.rank][e.action] = (e.start, e.end)
    lifespan: dict[int, dict[Unit, float]] = {}
    for rank, acts in times.items():
        spans: dict[Unit, float] = {}
        for a, (_, f_end) in acts.items():
            if a.kind is Kind.F:
                b = acts.get(Action(a.chunk, Kind.B, a.microbatch)) or acts.get(Action(a.chunk, Kind.BW, a.microbatch))
                spans[a.unit] = max(0.0, b[0] - f_end)
        lifespan[rank] = spans
    return lifespan, times


def plan_offload(schedule: Schedule, policy: OffloadPolicy, costs: CostModel | None = None) -> OffloadPlan:
    """Choose the units to offload on each rank (see the module notes for the modes)."""
    costs = costs or CostModel()
    placement = schedule.placement
    if policy.chunks is not None:
        bad = [c for c in policy.chunks if c >= placement.chunks]
        if bad:
            raise ValueError(f"offload_chunks={list(policy.chunks)!r}: chunk {bad[0]} does not exist; each rank "
                             f"holds chunks 0..{placement.chunks - 1}")
    lifespan, times = unit_lifespans(schedule, costs)
    transfer = {r: {u: policy.transfer_time(costs, placement, r, u[0]) for u in spans}
                for r, spans in lifespan.items()}
    units: dict[int, frozenset[Unit]] = {}
    not_hidden: dict[int, tuple[Unit, ...]] = {}
    for rank, spans in lifespan.items():
        def fits(u: Unit) -> bool:
            return 2 * transfer[rank][u] <= spans[u] + 1e-9  # noqa: B023 (used inside the loop only)

        live = [u for u in sorted(spans) if spans[u] > 1e-9]
        if policy.mode == "none":
            chosen: list[Unit] = []
        elif policy.mode == "full":
            chosen = live
            missed = tuple(u for u in chosen if not fits(u))
            if missed:
                not_hidden[rank] = missed
        elif policy.chunks is not None:
            chosen = [u for u in live if u[0] in policy.chunks and fits(u)]
        else:
            target = math.ceil(policy.selective_fraction * len(spans) - 1e-9)
            ranked = sorted(live, key=lambda u: (-spans[u], u))
            chosen = [u for u in ranked if fits(u)][:target]
        units[rank] = frozenset(chosen)
    return OffloadPlan(units=units, lifespan=lifespan, transfer=transfer, not_hidden=not_hidden,
                       policy=policy, times=times)


def insert_offload_actions(schedule: Schedule, plan: OffloadPlan, reload_lead: int = 1) -> Schedule:
    """``schedule`` with an OFFLOAD right after each planned unit's F and a RELOAD before its B.

    The RELOAD goes ``reload_lead`` compute actions before the unit's B (or BW):
    with lead 1, before the compute action that precedes the B, so the copy runs
    during that action instead of stalling the B.  When the plan knows the
    transfer time and the schedule's timing, the lead grows until the gap from
    the RELOAD's position (the end of the compute action before it) to the B's
    start covers the copy, never below ``reload_lead``.  It is clamped to stay
    after the unit's OFFLOAD.  A RELOAD issued early re-occupies device memory
    early, so the lead is the smallest that hides the copy.

    In a lowered schedule the OFFLOAD follows the F's SEND_F and the RELOAD goes
    before the RECVs of the compute action it precedes, the places
    :func:`.passes.add_send_recv` would leave them in, so offload and lowering
    commute.
    """
    if not isinstance(reload_lead, int) or isinstance(reload_lead, bool) or reload_lead < 0:
        raise ValueError(f"reload_lead={reload_lead!r}: must be an integer >= 0 (compute actions before the B)")
    if schedule.has_offload:
        raise ValueError(f"schedule {schedule.name!r} already has OFFLOAD/RELOAD actions; insert into the schedule "
                         "without them (Schedule.without_offload())")
    new_ranks = []
    for rank, row in enumerate(schedule.ranks):
        units = plan.units.get(rank, frozenset())
        if not units:
            new_ranks.append(row)
            continue
        compute = [i for i, a in enumerate(row) if a.is_compute]
        index_of = {row[i]: k for k, i in enumerate(compute)}  # compute action -> its index among compute
        times = (plan.times or {}).get(rank, {})
        after: dict[int, Action] = {}  # row position -> OFFLOAD to put after it
        before: dict[int, list[tuple[int, Action]]] = {}  # compute index -> RELOADs (by B order) before it
        spans: list[tuple[int, int, Unit]] = []  # (compute index of F, of B/BW, unit)
        for chunk, mb in sorted(units):
            f = Action(chunk, Kind.F, mb)
            b = Action(chunk, Kind.B, mb)
            if b not in index_of:
                b = Action(chunk, Kind.BW, mb)
            if f not in index_of or b not in index_of:
                raise ValueError(f"rank {rank}: unit (chunk {chunk}, microbatch {mb}) has no F and B/BW to offload "
                                 "between")
            spans.append((index_of[f], index_of[b], (chunk, mb)))
            pos = compute[index_of[f]]
            while pos + 1 < len(row) and row[pos + 1].kind is Kind.SEND_F and row[pos + 1].unit == (chunk, mb):
                pos += 1
            after[pos] = Action(chunk, Kind.OFFLOAD, mb)
        transfer = plan.transfer.get(rank, {})
        timed = all(row[i] in times for i in compute) and any(transfer.get(u, 0.0) > 0 for _, _, u in spans)
        offloaded_at: dict[Unit, float] = {}
        if timed:  # estimate the D2H queue: copies in F order, each after its F and the one before
            d2h = 0.0
            for kf, _, u in sorted(spans):
                d2h = offloaded_at[u] = max(times[row[compute[kf]]][1], d2h) + transfer.get(u, 0.0)
        h2d, last_target = 0.0, 0
        for kf, kb, u in sorted(spans, key=lambda x: x[1]):  # RELOADs in the order their B run
            lead = reload_lead
            if timed:
                t = transfer.get(u, 0.0)
                b_start = times[row[compute[kb]]][0]

                def reload_end(lead: int) -> float:
                    k = max(kb - lead, kf + 1, last_target)  # noqa: B023 (called in this iteration only)
                    issue = times[row[compute[k - 1]]][1]
                    return max(issue, offloaded_at[u], h2d) + t  # noqa: B023

                while kb - lead > max(kf + 1, last_target) and reload_end(lead) > b_start + 1e-9:
                    lead += 1
                h2d = reload_end(lead)
            # never before (or at) the F, so the OFFLOAD comes first; never before an earlier B's RELOAD
            target = max(kb - lead, kf + 1, last_target)
            last_target = target
            before.setdefault(target, []).append((kb, Action(u[0], Kind.RELOAD, u[1])))
        out: list[Action] = []
        compute_at = {i: k for k, i in enumerate(compute)}
        pending: list[Action] = []
        for i, a in enumerate(row):
            k = compute_at.get(i)
            if k is not None:
                reloads = [r for _, r in sorted(before.get(k, ()))]
                # before the RECVs that lead up to this compute action
                j = len(pending)
                while j > 0 and pending[j - 1].kind in (Kind.RECV_F, Kind.RECV_B):
                    j -= 1
                pending[j:j] = reloads
            pending.append(a)
            if i in after:
                pending.append(after[i])
        out.extend(pending)
        new_ranks.append(out)
    return schedule.replace_ranks(new_ranks)


def apply_offload(schedule: Schedule, policy: OffloadPolicy, costs: CostModel | None = None,
                  reload_lead: int = 1) -> tuple[Schedule, OffloadPlan, SimulationResult]:
    """Plan, insert and simulate: ``(schedule with OFFLOAD/RELOAD, plan, simulation)``.

    With ``mode='none'`` the schedule is returned as given, simulated with the policy so the
    result still carries an (empty) offload report.
    """
    from .simulator import simulate

    costs = costs or CostModel()
    plan = plan_offload(schedule, policy, costs)
    offloaded = insert_offload_actions(schedule.without_offload(), plan, reload_lead) if plan.count else schedule
    return offloaded, plan, simulate(offloaded, costs, offload=policy)
