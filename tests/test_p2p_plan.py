"""The runtime's p2p plan is deadlock-free under NCCL's semantics for every schedule it runs.

The checker (``p2p_plan.simulate``) steps all ranks with NCCL's rules: per pair one
ordered stream per process, a send completes only once the matching receive runs,
a batch (NCCL group) progresses as one.  The plan of today's runtime before this
change (each send posted alone after its action, receives posted lazily before
the action that needs them) is written down as data here and deadlocks at PP=2.
"""

from __future__ import annotations

import pytest

from megatron_offload_plugin.runtime.forward_backward import forward_only_program
from megatron_offload_plugin.runtime.p2p_plan import (
    P2POp, P2PPlanError, RankPlan, check_plan, plan_p2p, send_orders, step_messages,
)
from megatron_offload_plugin.runtime.plugin_runtime import AutoPlanner, schedule_programs
from megatron_offload_plugin.schedules.ir import Action


def _one_op_per_post(programs, placement) -> tuple[dict[int, RankPlan], dict[int, int]]:
    """What the runtime did before: every send posted alone right after its action; receives
    from a peer posted in its send order, lazily, right before the action that needs one.
    Action ``i`` becomes step ``3 i + 2`` of the plan; step ``3 i + 1`` posts its receives."""
    orders = send_orders(programs, placement)
    plans, lengths = {}, {}
    for rank, program in programs.items():
        plan, posted = RankPlan(), {p: 0 for p in orders.get(rank, {})}
        for i, step in enumerate(program):
            need, sent = step_messages(step, rank, placement)
            if need is not None:
                plan.needs[3 * i + 2] = need
                keys = orders[rank][need[0]]
                upto = keys.index(need[1]) + 1
                if upto > posted[need[0]]:
                    plan.posts[3 * i + 1] = tuple(P2POp("recv", need[0], k) for k in keys[posted[need[0]]:upto])
                    posted[need[0]] = upto
            if sent is not None:
                plan.posts[3 * i + 2] = (P2POp("send", *sent),)
        plans[rank], lengths[rank] = plan, 3 * len(program)
    return plans, lengths


def _schedules():
    for name, chunks in [("1f1b", 1), ("zb-h1", 1), ("zb-h2", 1), ("interleaved", 2), ("zb-v", 2),
                         ("v-half", 2), ("v-min", 2), ("auto", 1), ("auto", 2)]:
        for pp in range(2, 7):
            for m in sorted({1, 2, pp - 1, pp, pp + 1, 2 * pp, 3 * pp + 1}):
                if m < 1:
                    continue
                try:
                    if name == "auto":
                        placement, programs = AutoPlanner(None, 0).programs(pp, chunks, m)
                    else:
                        placement, programs = schedule_programs(name, pp, chunks, m)
                except ValueError:
                    continue  # a shape the generator refuses (e.g. interleaved needs m % pp == 0)
                yield f"{name}-vpp{chunks}-pp{pp}-m{m}", placement, programs


def test_every_runtime_schedule_has_a_plan_that_runs_to_the_end_under_nccl_semantics():
    checked = 0
    for label, placement, programs in _schedules():
        plan_p2p(programs, placement)  # raises P2PPlanError naming the stuck ranks
        forward_only = {r: forward_only_program(placement, r, 4) for r in programs}
        plan_p2p(forward_only, placement)
        checked += 1
    assert checked > 150


def test_posting_each_message_on_its_own_deadlocks_under_nccl_at_pp2():
    """Rank 0 sends act(mb 1) while rank 1 sends grad(mb 0): both sends wait for receives
    queued behind them (the defect of the runtime before p2p plans)."""
    placement, programs = schedule_programs("1f1b", 2, 1, 4)
    plans, lengths = _one_op_per_post(programs, placement)
    with pytest.raises(P2PPlanError, match=r"deadlocks under NCCL semantics") as err:
        check_plan(plans, lengths)
    assert "rank 0" in str(err.value) and "rank 1" in str(err.value)
    assert "send ('act', 1, 1) -> rank 1" in str(err.value)


def test_1f1b_plan_pairs_sends_with_the_next_receive_as_megatron_does():
    """Steady 1F1B on a middle rank: F's send goes with the next B's receive from the same
    peer (send_forward_recv_backward), B's send with the next F's receive
    (send_backward_recv_forward)."""
    placement, programs = schedule_programs("1f1b", 4, 1, 8)
    plan = plan_p2p(programs, placement)[1]
    steady = [plan.posts[i] for i, step in enumerate(programs[1]) if 3 <= i <= 12]
    for ops in steady:
        send, recv = ops
        assert (send.kind, recv.kind) == ("send", "recv") and send.peer == recv.peer, [str(o) for o in ops]
        assert send.key[0] != recv.key[0]  # act out, grad in (or grad out, act in)


def test_checker_names_ranks_and_pending_operations():
    plans = {
        0: RankPlan(posts={0: (P2POp("send", 1, "x"),), 1: (P2POp("recv", 1, "y"),)}, needs={2: (1, "y")}),
        1: RankPlan(posts={0: (P2POp("send", 0, "y"),), 1: (P2POp("recv", 0, "x"),)}, needs={2: (0, "x")}),
    }
    with pytest.raises(P2PPlanError) as err:
        check_plan(plans, {0: 3, 1: 3})
    text = str(err.value)
    assert "rank 0 at action" in text and "rank 1 at action" in text
    assert "send x -> rank 1" in text and "send y -> rank 0" in text


def test_a_message_nobody_sends_is_named():
    placement, programs = schedule_programs("1f1b", 2, 1, 2)
    broken = dict(programs)
    broken[0] = [a for a in programs[0] if str(a) != "0F1"]  # rank 1 still waits for act(mb 1)
    with pytest.raises(P2PPlanError, match=r"never sends it|received by no action"):
        plan_p2p(broken, placement)


def test_plan_is_the_same_on_every_rank():
    """Every rank computes every rank's plan from the same programs: deterministic."""
    placement, programs = schedule_programs("zb-v", 4, 2, 8)
    first = plan_p2p(programs, placement)
    again = plan_p2p({r: list(p) for r, p in programs.items()}, placement)
    assert {r: p.posts for r, p in first.items()} == {r: p.posts for r, p in again.items()}
    assert isinstance(programs[0][0], Action)
