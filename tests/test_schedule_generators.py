"""Schedule generators: registry, validity over a grid, Megatron's own orders, the issue's targets."""

from __future__ import annotations

from functools import lru_cache

import pytest

from megatron_offload_plugin.schedules import (
    CostModel,
    Kind,
    ScheduleRequest,
    SimulationResult,
    available_schedules,
    generate,
    get_generator,
    register_schedule,
    simulate,
)
from megatron_offload_plugin.schedules.generators import registry

ALL = ["1f1b", "interleaved", "zb-h1", "zb-h2", "zb-v", "v-half", "v-min", "auto"]
UNIFORM = CostModel(1, 1, 1, 0)
UNEVEN = CostModel(f=1, b=1.5, w=0.7, comm=0.05)


@lru_cache(maxsize=None)
def run(name: str, p: int, m: int, costs: CostModel = UNIFORM, **kw) -> SimulationResult:
    vpp = kw.pop("vpp", 2 if name == "interleaved" else None)
    return simulate(generate(name, p, m, vpp=vpp, costs=costs, **kw), costs)


def grid():
    for p in range(2, 9):
        for m in range(p, 3 * p + 2):
            yield p, m


def interleaved_accepts(p: int, m: int, group: int) -> bool:
    """Megatron-core's conditions on forward_backward_pipelining_with_interleaving."""
    return p <= group <= m and (m % group == 0 or m % group >= p)


# -- registry ----------------------------------------------------------------------------------
def test_registry_lists_the_issue_schedules_in_order():
    assert available_schedules()[: len(ALL)] == ALL


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ValueError) as info:
        get_generator("zbv")
    assert str(info.value) == ("schedule='zbv': unknown schedule; did you mean 'zb-v'? accepted: "
                               + ", ".join(available_schedules()))


def test_registering_twice_needs_overwrite_and_warns():
    fn = get_generator("1f1b")
    with pytest.raises(ValueError, match="already registered"):
        register_schedule("1f1b", fn)
    try:
        register_schedule("test-copy", fn)
        with pytest.warns(UserWarning, match="replacing"):
            register_schedule("test-copy", fn, overwrite=True)
        assert generate("test-copy", 2, 2).name == "test-copy"
    finally:
        registry._REGISTRY.pop("test-copy", None)


# -- every generator, every (pp, microbatches) -------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_every_generator_is_valid_over_the_grid(name):
    """generate() runs the validator: complete (one F, B, W per chunk and microbatch, or BW)
    and deadlock-free; the simulation then finishes every action."""
    checked = 0
    for p, m in grid():
        if name == "interleaved" and not interleaved_accepts(p, m, p):
            continue
        r = run(name, p, m)
        chunks = r.schedule.placement.chunks
        split = name not in ("1f1b", "interleaved")
        per_rank = m * chunks * (3 if split else 2)
        assert all(len(row) == per_rank for row in r.schedule.ranks), (name, p, m)
        assert r.busy == pytest.approx([3.0 * m] * p)
        checked += 1
    assert checked >= 21


BUDGETS = {
    "1f1b": lambda p: p,
    "zb-h1": lambda p: p,
    "zb-h2": lambda p: 2 * p - 1,
    "zb-v": lambda p: p,
    "v-half": lambda p: p / 2 + 1,
    "v-min": lambda p: p / 3 + 1,
    "auto": lambda p: p,
}


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_peak_activation_stays_within_each_schedules_budget(name):
    for p, m in grid():
        assert max(run(name, p, m).peak_activation) <= BUDGETS[name](p) + 1e-9, (name, p, m)


# -- Megatron's own orders, re-derived from its loop -------------------------------------------
def megatron_1f1b(p: int, rank: int, m: int) -> list[str]:
    """forward_backward_pipelining_without_interleaving: warm-up, 1F1B steady state, cool-down."""
    warmup = min(p - rank - 1, m)
    remaining = m - warmup
    out, fwd, bwd = [], 0, 0
    for _ in range(warmup):
        out.append(f"0F{fwd}")
        fwd += 1
    for _ in range(remaining):
        out.append(f"0F{fwd}")
        fwd += 1
        out.append(f"0BW{bwd}")
        bwd += 1
    for _ in range(warmup):
        out.append(f"0BW{bwd}")
        bwd += 1
    return out


def megatron_interleaved(p: int, rank: int, m: int, v: int, group: int) -> list[str]:
    """forward_backward_pipelining_with_interleaving: virtual microbatch k runs table entry k;
    backward k runs the mirrored chunk, and pops that chunk's oldest stored input."""
    mb_table, chunk_table = [], []
    first = 0
    while first < m:  # get_schedule_table
        last = m if first + group >= m else first + group
        for c in range(v):
            for mb in range(first, last):
                mb_table.append(mb)
                chunk_table.append(c)
        first += group
    total = m * v
    warmup = (p - rank - 1) * 2 + (v - 1) * group  # get_pp_rank_microbatches
    if warmup >= total:
        warmup = total
    remaining = total - warmup
    stored: dict[int, list[int]] = {c: [] for c in range(v)}
    out: list[str] = []

    def forward(k: int) -> None:
        c = chunk_table[k % total]
        stored[c].append(mb_table[k])
        out.append(f"{c}F{mb_table[k]}")

    def backward(k: int) -> None:
        c = v - 1 - chunk_table[k % total]
        out.append(f"{c}BW{stored[c].pop(0)}")

    for k in range(warmup):
        forward(k)
    for k in range(remaining):
        forward(k + warmup)
        backward(k)
    for k in range(remaining, total):
        backward(k)
    return out


@pytest.mark.parametrize("p", range(1, 9))
def test_1f1b_is_megatrons_order(p):
    for m in range(1, 3 * p + 2):
        s = generate("1f1b", p, m)
        for rank in range(p):
            assert s.format(rank).split() == megatron_1f1b(p, rank, m), (p, m, rank)


@pytest.mark.parametrize("p", range(2, 9))
@pytest.mark.parametrize("v", [2, 3, 4])
def test_interleaved_is_megatrons_order(p, v):
    checked = 0
    for m in range(p, 4 * p + 2):
        for group in sorted({p, p + 1, m}):
            if not interleaved_accepts(p, m, group):
                continue
            s = generate("interleaved", p, m, vpp=v, options={"microbatch_group_size": group})
            assert s.placement.stages[1][1] == p + 1  # stage c * p + r
            for rank in range(p):
                assert s.format(rank).split() == megatron_interleaved(p, rank, m, v, group), (p, v, m, group, rank)
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("p, m, group", [(4, 6, 4), (4, 3, 4), (4, 8, 9), (4, 9, 3), (3, 7, 3)])
def test_interleaved_refuses_what_megatron_refuses(p, m, group):
    assert not interleaved_accepts(p, m, group)
    with pytest.raises(ValueError, match=f"microbatches={m}: Megatron's interleaved schedule needs"):
        generate("interleaved", p, m, vpp=2, options={"microbatch_group_size": group})


def test_interleaved_needs_chunks():
    with pytest.raises(ValueError, match="vpp=None: the interleaved schedule needs --vpp >= 2"):
        generate("interleaved", 4, 8)


@pytest.mark.parametrize("name, vpp, message", [
    ("1f1b", 2, "vpp=2: schedule '1f1b' accepts vpp unset or 1"),
    ("zb-h1", 2, "vpp=2: schedule 'zb-h1' accepts vpp unset or 1"),
    ("zb-v", 3, "vpp=3: schedule 'zb-v' accepts vpp unset or 2"),
    ("v-min", 4, "vpp=4: schedule 'v-min' accepts vpp unset or 2"),
])
def test_a_configuration_a_schedule_cannot_run_fails_at_start(name, vpp, message):
    with pytest.raises(ValueError, match=message):
        generate(name, 4, 8, vpp=vpp)


def test_request_rejects_nonsense():
    with pytest.raises(ValueError, match="microbatches=0: must be a positive integer"):
        ScheduleRequest(4, 0)
    with pytest.raises(ValueError, match="no schedule fits within memory_limit=0.5"):
        generate("auto", 4, 8, memory_limit=0.5)


# -- structure --------------------------------------------------------------------------------
def test_zb_h1_keeps_1f1b_order_of_f_and_b():
    s, base = generate("zb-h1", 4, 10), generate("1f1b", 4, 10)
    for rank in range(4):
        fb = [a for a in s.ranks[rank] if a.kind in (Kind.F, Kind.B)]
        assert [(a.kind if a.kind is Kind.F else Kind.BW, a.microbatch) for a in fb] == \
            [(a.kind, a.microbatch) for a in base.ranks[rank]]


@pytest.mark.parametrize("p, m", [(2, 2), (3, 7), (4, 16), (8, 8), (8, 25)])
def test_zb_h1_bubble_is_a_third_of_1f1b(p, m):
    f = b = w = 1.0
    assert run("zb-h1", p, m).makespan == pytest.approx(m * (f + b + w) + (p - 1) * (f + b - w))
    assert run("1f1b", p, m).makespan == pytest.approx(m * (f + b + w) + (p - 1) * (f + b + w))


def test_v_schedules_use_the_v_placement():
    s = generate("zb-v", 3, 6)
    assert s.placement.stages == ((0, 5), (1, 4), (2, 3))


# -- the issue's targets at pp=4, 16 microbatches, F=B=W=1, no communication --------------------
P, M, F, B, W = 4, 16, 1.0, 1.0, 1.0
WORK = M * (F + B + W)


def test_target_1f1b():
    r = run("1f1b", P, M)
    assert r.bubble_rate == pytest.approx((P - 1) / (M + P - 1), abs=0.001)  # 3/19
    assert r.peak_activation[0] == P


def test_target_zb_h1():
    r = run("zb-h1", P, M)
    bubble = (P - 1) * (F + B - W)
    assert r.bubble_rate == pytest.approx(bubble / (WORK + bubble), abs=0.002)  # 3/51
    assert max(r.peak_activation) <= P


def test_target_zb_h2():
    r = run("zb-h2", P, M)
    assert r.steady_bubble_rate <= 0.005
    assert max(r.peak_activation) <= 2 * P - 1


def test_target_zb_v():
    r = run("zb-v", P, M)
    floor = (P - 1) * F / 2  # the start of the last device on the two-chunk V
    assert r.bubble_rate <= floor / (WORK + floor) + 0.002  # 1.5 / 49.5 = 0.0303
    assert r.bubble_rate <= 0.032
    assert r.steady_bubble_rate <= 0.005
    assert max(r.peak_activation) <= P


def test_target_v_half_and_v_min():
    assert max(run("v-half", P, M).peak_activation) <= P / 2 + 1
    assert max(run("v-min", P, M).peak_activation) <= P / 3 + 1
    # less memory costs time, never correctness
    assert run("zb-v", P, M).makespan <= run("v-half", P, M).makespan <= run("v-min", P, M).makespan


def test_auto_finds_the_zero_bubble_v_with_uniform_costs():
    assert run("auto", P, M).makespan == pytest.approx(run("zb-v", P, M).makespan)


# -- uneven costs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("p, m", [(2, 4), (4, 8), (4, 16), (6, 12), (8, 16)])
def test_auto_under_memory_limit_p_is_never_worse_than_zb_h1(p, m):
    a = run("auto", p, m, UNEVEN, memory_limit=float(p))
    assert a.makespan <= run("zb-h1", p, m, UNEVEN).makespan + 1e-9
    assert max(a.peak_activation) <= p


@pytest.mark.parametrize("limit", [1.0, 2.0, 3.0, 5.5, 7.0])
def test_auto_respects_any_memory_limit(limit):
    r = run("auto", 4, 12, UNEVEN, memory_limit=limit)
    assert max(r.peak_activation) <= limit
    assert r.schedule.meta["chosen"]


# Makespans of the published greedy V schedule (sail-sg/zero-bubble-pipeline-parallelism @39f2c18,
# zbv.PipelineGraph.create_schedule: best of its fill_b x fill_f variants, default max_mem = 2p
# chunk activations = p units, costs halved per chunk), replayed in our simulator.
PUBLISHED_ZBV = {
    # (p, m): (makespan, peak) at F=1, B=1.5, W=0.7, comm=0.05
    (2, 8): (26.5, 2.0),
    (4, 8): (28.6, 4.0),
    (4, 16): (54.2, 4.0),
    (6, 12): (43.45, 6.0),
    (8, 24): (84.05, 8.0),
}


@pytest.mark.parametrize("p, m", sorted(PUBLISHED_ZBV))
def test_zb_v_is_no_worse_than_the_published_greedy_v(p, m):
    makespan, peak = PUBLISHED_ZBV[(p, m)]
    r = run("zb-v", p, m, UNEVEN)
    assert max(r.peak_activation) <= peak
    assert r.makespan <= makespan + 1e-9
