"""The simulator: timing rule, both bubble figures, activation accounting, cost model."""

from __future__ import annotations

import pytest

from megatron_offload_plugin.schedules import (
    CostModel,
    Placement,
    Schedule,
    ScheduleError,
    add_send_recv,
    generate,
    simulate,
)


def test_two_stage_single_microbatch_by_hand():
    # device 0: F [0,1) ... BW [4,6); device 1: F [1,2), BW [2,4)
    r = simulate(Schedule.parse({0: "0F0 0BW0", 1: "0F0 0BW0"}))
    assert [(e.rank, repr(e.action), e.start, e.end) for e in r.timeline] == [
        (0, "0F0", 0.0, 1.0), (0, "0BW0", 4.0, 6.0), (1, "0F0", 1.0, 2.0), (1, "0BW0", 2.0, 4.0)]
    assert r.makespan == 6.0 and r.busy == (3.0, 3.0)
    assert r.bubble_rate == pytest.approx(1 - 6 / (2 * 6))  # 1 - busy / (devices x makespan)
    assert r.windows == ((0.0, 6.0), (1.0, 4.0))
    assert r.steady_bubble_rate == pytest.approx(1 - 6 / (6 + 3))  # idle inside each device's own window


@pytest.mark.parametrize("p, m", [(2, 2), (4, 16), (8, 9)])
@pytest.mark.parametrize("f, b, w", [(1, 1, 1), (1, 1.5, 0.7), (2, 3, 1)])
def test_1f1b_makespan_matches_its_closed_form(p, m, f, b, w):
    r = simulate(generate("1f1b", p, m), CostModel(f, b, w))
    assert r.makespan == pytest.approx((m + p - 1) * (f + b + w))
    with_comm = simulate(generate("1f1b", p, m), CostModel(f, b, w, comm=0.5))
    # the first forward and the last backward each cross p - 1 links
    assert with_comm.makespan >= r.makespan + 2 * (p - 1) * 0.5 - 1e-9
    assert with_comm.busy == pytest.approx([m * (f + b + w)] * p)  # a delay, not device time


def test_lowered_schedule_times_exactly_like_compute_only():
    costs = CostModel(1, 1.5, 0.7, 0.05)
    for name in ("1f1b", "zb-h1", "zb-v"):
        s = generate(name, 4, 8, costs=costs)
        plain, lowered = simulate(s, costs), simulate(add_send_recv(s), costs)
        assert lowered.makespan == pytest.approx(plain.makespan)
        assert lowered.peak_activation == plain.peak_activation
        assert lowered.bubble_rate == pytest.approx(plain.bubble_rate)


def test_activation_is_held_from_f_start_to_w_end():
    r = simulate(Schedule.parse({0: "0F0 0F1 0B0 0B1 0W0 0W1"}))
    assert r.memory[0] == ((0.0, 0.0), (0.0, 1.0), (1.0, 2.0), (5.0, 1.0), (6.0, 0.0))
    assert r.peak_activation == (2.0,)


def test_b_releases_moves_part_of_the_release_to_b():
    s = Schedule.parse({0: "0F0 0B0 0F1 0B1 0W0 0W1"})
    assert simulate(s).peak_activation == (2.0,)
    assert simulate(s, CostModel(b_releases=0.75)).peak_activation == (1.25,)


def test_unsplit_backward_frees_all_at_its_end():
    r = simulate(Schedule.parse({0: "0F0 0F1 0BW0 0BW1"}))
    assert r.memory[0][-2:] == ((4.0, 1.0), (6.0, 0.0))


def test_a_chunk_costs_and_holds_its_fraction():
    s = Schedule.parse({0: "0F0 1F0 1BW0 0BW0"}, placement=Placement.interleaved(1, 2))
    r = simulate(s, CostModel(f=2, b=1, w=1))
    assert [(e.start, e.end) for e in r.timeline] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert r.peak_activation == (1.0,)
    weighted = simulate(s, CostModel(f=2, b=1, w=1, stage_weights=(0.25, 0.75)))
    assert [e.end - e.start for e in weighted.timeline] == [0.5, 1.5, 1.5, 0.5]


def test_comm_delay_applies_only_between_devices():
    # V placement on one... two devices: the turn on device 1 has no delay
    s = Schedule.parse({0: "0F0 1F0 1B0 0B0 1W0 0W0", 1: "0F0 1F0 1B0 0B0 1W0 0W0"},
                       placement=Placement.v_shape(2))
    r = simulate(s, CostModel(comm=10))
    t = {(e.rank, repr(e.action)): (e.start, e.end) for e in r.timeline}
    assert t[(1, "0F0")] == (10.5, 11.0)
    assert t[(1, "1F0")] == (11.0, 11.5)  # same device: no delay
    assert t[(0, "1F0")] == (21.5, 22.0)


def test_invalid_schedule_is_never_timed():
    with pytest.raises(ScheduleError):
        simulate(Schedule.parse({0: "0F0 0B0"}))


def test_cost_model_rejects_nonsense():
    with pytest.raises(ValueError, match="cost f=0"):
        CostModel(f=0)
    with pytest.raises(ValueError, match="comm=-1"):
        CostModel(comm=-1)


def test_result_dict_carries_the_reported_figures():
    d = simulate(generate("zb-h1", 4, 8)).to_dict()
    assert {"makespan", "bubble_rate", "steady_bubble_rate", "peak_activation", "busy", "windows"} <= set(d)
