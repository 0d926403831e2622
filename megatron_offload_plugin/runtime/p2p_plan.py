"""When each pipeline message is posted, and in which group: a plan proven deadlock-free under NCCL.

NCCL matches a pair of ranks' sends and receives in posting order, runs each
pair's operations on one ordered stream per process, and a send larger than
NCCL's buffer cannot finish until the peer's matching receive is running.  Two
ranks that each post "send, then receive" to each other therefore deadlock, and
so does any cycle of such waits through several pairs.  gloo buffers messages
and never shows this, so the plan is computed here as data and checked by
:func:`check_plan`, a small simulator with exactly those semantics.

The rule (:func:`plan_p2p`), Megatron's ``send_forward_recv_backward`` made
general: a message is sent right after the action that produced it; if the
rank's next operation with that peer (in its own program order) is a receive,
that receive joins the send's group (one ``batch_isend_irecv``, an NCCL group,
so both progress together); every other receive is posted right before the
action that needs it.  Receives from a peer are posted in the peer's send order
(NCCL matches by order, not by tag).  Messages between two stages on the same
rank (the turn of a V) never leave the process and are not planned.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from ..schedules.ir import Action, Kind, Placement

Key = tuple  # ("act", stage, microbatch) or ("grad", stage, microbatch): the receiving stage

BEFORE_START = -1


class P2PPlanError(RuntimeError):
    """A plan that would deadlock under NCCL's semantics, or a message nobody receives."""


@dataclass(frozen=True)
class P2POp:
    """One point-to-point operation of a rank: ``send`` to or ``recv`` from ``peer`` (pipeline ranks)."""

    kind: str  # "send" | "recv"
    peer: int
    key: Hashable

    def __str__(self) -> str:
        arrow = "->" if self.kind == "send" else "<-"
        return f"{self.kind} {self.key} {arrow} rank {self.peer}"


@dataclass
class RankPlan:
    """``posts[i]``: the group posted right after program index ``i`` (``-1``: before the first
    action); ``needs[i]``: the (peer, key) action ``i`` waits for before it runs."""

    posts: dict[int, tuple[P2POp, ...]] = field(default_factory=dict)
    needs: dict[int, tuple[int, Key]] = field(default_factory=dict)


def step_messages(step: Action, rank: int, placement: Placement) -> tuple[tuple[int, Key] | None, tuple[int, Key] | None]:
    """(what ``step`` receives, what it sends) as (peer rank, key); None where nothing, or local."""
    stage = placement.stage(rank, step.chunk)
    need = sent = None
    if step.kind is Kind.F:
        if not placement.is_first(stage):
            need = (placement.locate(stage - 1)[0], ("act", stage, step.microbatch))
        if not placement.is_last(stage):
            sent = (placement.locate(stage + 1)[0], ("act", stage + 1, step.microbatch))
    elif step.kind in (Kind.B, Kind.BW):
        if not placement.is_last(stage):
            need = (placement.locate(stage + 1)[0], ("grad", stage, step.microbatch))
        if not placement.is_first(stage):
            sent = (placement.locate(stage - 1)[0], ("grad", stage - 1, step.microbatch))
    return (None if need is None or need[0] == rank else need), (None if sent is None or sent[0] == rank else sent)


def send_orders(programs: Mapping[int, Sequence[Action]], placement: Placement) -> dict[int, dict[int, list[Key]]]:
    """``orders[dst][src]``: the keys ``src`` sends to ``dst``, in ``src``'s program order."""
    orders: dict[int, dict[int, list[Key]]] = {r: {} for r in programs}
    for src, program in programs.items():
        for step in program:
            _, sent = step_messages(step, src, placement)
            if sent is not None:
                orders.setdefault(sent[0], {}).setdefault(src, []).append(sent[1])
    return orders


@dataclass
class _RankDraft:
    """A rank's sends (fixed: right after the action that produced them) and, for each
    incoming message, the program index after which its receive is posted."""

    sends: dict[int, P2POp]
    needs: dict[int, tuple[int, Key]]
    incoming: dict[int, list[Key]]
    recv_at: dict[int, list[int]]  # peer -> post index of each message, in the peer's send order

    def hoist(self, peer: int, key: Key, index: int) -> bool:
        """Post ``key`` (and every earlier message from ``peer``) no later than ``index``."""
        n = self.incoming[peer].index(key)
        changed = False
        for j in range(n + 1):
            if self.recv_at[peer][j] > index:
                self.recv_at[peer][j] = index
                changed = True
        return changed

    def plan(self) -> RankPlan:
        posts: dict[int, list[P2POp]] = {}
        for i, op in self.sends.items():
            posts.setdefault(i, []).append(op)
        for peer in sorted(self.incoming):
            for key, at in zip(self.incoming[peer], self.recv_at[peer]):
                posts.setdefault(at, []).append(P2POp("recv", peer, key))
        return RankPlan(posts={i: tuple(posts[i]) for i in sorted(posts)}, needs=dict(self.needs))


def _draft(rank: int, program: Sequence[Action], placement: Placement, incoming: Mapping[int, Sequence[Key]]) -> _RankDraft:
    """The first draft, Megatron's pairing: a receive joins the group of the send just before
    it when that send goes to the same peer and no action communicates in between
    (``send_forward_recv_backward``); otherwise it is posted right before the action that
    needs it."""
    sends: dict[int, P2POp] = {}
    needs: dict[int, tuple[int, Key]] = {}
    for i, step in enumerate(program):
        need, sent = step_messages(step, rank, placement)
        if need is not None:
            needs[i] = need
        if sent is not None:
            sends[i] = P2POp("send", *sent)
    draft = _RankDraft(sends, needs, {p: list(k) for p, k in incoming.items()},
                       {p: [len(program)] * len(k) for p, k in incoming.items()})
    needed = {need for need in needs.values()}
    for peer, keys in incoming.items():
        for key in keys:
            if (peer, key) not in needed:
                raise P2PPlanError(f"rank {rank}: {key} sent to it by rank {peer} is received by no action")
    last_send: int | None = None  # index of the latest action that sent, if nothing communicated since
    for i in range(len(program)):
        if i in needs:
            peer, key = needs[i]
            if peer not in draft.incoming or key not in draft.incoming[peer]:
                raise P2PPlanError(f"rank {rank}: action {i} waits for {key} from rank {peer}, which never sends it")
            joins = last_send is not None and sends[last_send].peer == peer
            draft.hoist(peer, key, last_send if joins else i - 1)
        if i in sends:
            last_send = i
        elif i in needs:
            last_send = None
    return draft


def plan_p2p(programs: Mapping[int, Sequence[Action]], placement: Placement, *, max_repairs: int = 10_000
             ) -> dict[int, RankPlan]:
    """Every rank's plan, checked under NCCL's semantics.

    The draft (see :func:`_draft`) is run through :func:`simulate`; while it deadlocks, a
    receive that a stuck send waits for is posted earlier (joining the group at the head of
    that pair's stream, or posted where its rank stopped), and the plan is run again.  Every
    rank computes the same plan from the same programs.  Raises :class:`P2PPlanError` if
    no repair helps.
    """
    orders = send_orders(programs, placement)
    drafts = {r: _draft(r, programs[r], placement, orders.get(r, {})) for r in programs}
    lengths = {r: len(programs[r]) for r in programs}
    for _ in range(max_repairs):
        plans = {r: d.plan() for r, d in drafts.items()}
        stuck = simulate(plans, lengths)
        if stuck is None:
            return plans
        if not any([drafts[rank].hoist(peer, key, index) for rank, peer, key, index in stuck.repairs]):
            raise P2PPlanError(stuck.describe())
    raise P2PPlanError(f"no deadlock-free p2p plan after {max_repairs} repairs")


def check_plan(plans: Mapping[int, RankPlan], lengths: Mapping[int, int]) -> None:
    """Raise :class:`P2PPlanError` naming the stuck ranks and operations if ``plans`` deadlock."""
    stuck = simulate(plans, lengths)
    if stuck is not None:
        raise P2PPlanError(stuck.describe())


@dataclass
class Deadlock:
    """Where a simulation stopped: each rank's position and unfinished groups, and the repairs
    (rank, peer, key, post index) that would let a stuck send meet its receive."""

    ranks: dict[int, str]
    repairs: list[tuple[int, int, Key, int]]

    def describe(self) -> str:
        return "p2p plan deadlocks under NCCL semantics:\n  " + "\n  ".join(self.ranks[r] for r in sorted(self.ranks))


def simulate(plans: Mapping[int, RankPlan], lengths: Mapping[int, int]) -> Deadlock | None:
    """Run the plans under NCCL's point-to-point semantics; None if every rank finishes.

    Each rank's host walks its program: before action ``i`` it waits for the receive of
    ``needs[i]``; after it, it posts ``posts[i]`` (``posts[-1]`` at the start).  A group
    enters the ordered stream of every pair (rank, peer) it touches and starts when it heads
    all of them; a send completes once the peer's matching receive (same pair, same
    position in order) has started, a receive once the matching send has; the group ends
    when all its operations have, and leaves its streams.  At the end of its program a
    rank waits for all it posted.
    """
    streams: dict[tuple[int, int], list[int]] = {}
    groups: dict[int, tuple[int, int, tuple[P2POp, ...]]] = {}  # gid -> (rank, post index, ops)
    active: dict[int, None] = {}  # unfinished groups, in posting order
    started: set[int] = set()
    done_ops: set[tuple[int, int]] = set()
    posted_count: dict[tuple[int, int, str], int] = {}
    started_count: dict[tuple[int, int, str], int] = {}
    op_number: dict[tuple[int, int], int] = {}
    recv_of: dict[tuple[int, Key], tuple[int, int]] = {}
    pc = {r: -1 for r in plans}
    opened: set[int] = set()
    next_gid = 0

    def post(rank: int, index: int) -> None:
        nonlocal next_gid
        ops = plans[rank].posts[index]
        gid, next_gid = next_gid, next_gid + 1
        groups[gid] = (rank, index, ops)
        active[gid] = None
        for j, op in enumerate(ops):
            stream = streams.setdefault((rank, op.peer), [])
            if not stream or stream[-1] != gid:
                stream.append(gid)
            k = (rank, op.peer, op.kind)
            op_number[(gid, j)] = posted_count.get(k, 0)
            posted_count[k] = posted_count.get(k, 0) + 1
            if op.kind == "recv":
                recv_of[(rank, op.key)] = (gid, j)

    def host_step(rank: int) -> bool:
        plan = plans[rank]
        moved = False
        if rank not in opened:
            opened.add(rank)
            if BEFORE_START in plan.posts:
                post(rank, BEFORE_START)
            moved = True
        while pc[rank] + 1 < lengths[rank]:
            i = pc[rank] + 1
            if i in plan.needs:
                where = recv_of.get((rank, plan.needs[i][1]))
                if where is None or where not in done_ops:
                    return moved
            pc[rank] = i
            if i in plan.posts:
                post(rank, i)
            moved = True
        return moved

    def progress() -> bool:
        moved = False
        for gid in list(active):
            rank, _, ops = groups[gid]
            if gid not in started:
                if not all(streams[(rank, op.peer)][0] == gid for op in ops):
                    continue
                started.add(gid)
                for op in ops:
                    k = (rank, op.peer, op.kind)
                    started_count[k] = started_count.get(k, 0) + 1
                moved = True
        for gid in list(active):
            if gid not in started:
                continue
            rank, _, ops = groups[gid]
            for j, op in enumerate(ops):
                other = "recv" if op.kind == "send" else "send"
                if (gid, j) not in done_ops and started_count.get((op.peer, rank, other), 0) > op_number[(gid, j)]:
                    done_ops.add((gid, j))
                    moved = True
            if all((gid, j) in done_ops for j in range(len(ops))):
                del active[gid]
                for peer in {op.peer for op in ops}:
                    streams[(rank, peer)].pop(0)
                moved = True
        return moved

    while True:
        moved = False
        for rank in plans:
            moved |= host_step(rank)
        moved |= progress()
        if not active and all(pc[r] + 1 >= lengths[r] for r in plans):
            return None
        if not moved:
            return _deadlock(plans, groups, active, started, done_ops, streams, recv_of, pc)


def _deadlock(plans, groups, active, started, done_ops, streams, recv_of, pc) -> Deadlock:
    ranks: dict[int, str] = {}
    for rank in plans:
        pending = [f"[{', '.join(map(str, ops))}]" + ("" if gid in started else " (not started)")
                   for gid, (r, _, ops) in groups.items() if r == rank and gid in active]
        waiting = plans[rank].needs.get(pc[rank] + 1)
        ranks[rank] = (f"rank {rank} at action {pc[rank] + 1}"
                       + (f" waiting for {waiting[1]} from rank {waiting[0]}" if waiting else " (done)")
                       + f"; pending: {', '.join(pending) or 'none'}")
    repairs: list[tuple[int, int, Key, int]] = []
    for gid in sorted(started & active.keys()):
        rank, _, ops = groups[gid]
        for j, op in enumerate(ops):
            if op.kind != "send" or (gid, j) in done_ops:
                continue
            peer, key = op.peer, op.key
            where = recv_of.get((peer, key))
            if where is None:  # not posted yet: post it where the peer stopped
                repairs.append((peer, rank, key, pc[peer]))
                continue
            head = streams.get((peer, rank), [])
            if head and head[0] != where[0]:  # behind another group on that pair: join the head group
                repairs.append((peer, rank, key, groups[head[0]][1]))
    return Deadlock(ranks, repairs)
