"""The validator: every broken schedule is refused with its rank, its step and the grid."""

from __future__ import annotations

import pytest

from megatron_offload_plugin.schedules import (
    Action,
    Kind,
    Placement,
    Schedule,
    ScheduleError,
    add_send_recv,
    validate,
)


def _refused(rows, **kw) -> ScheduleError:
    with pytest.raises(ScheduleError) as info:
        validate(Schedule.parse(rows, **kw))
    return info.value


def test_a_good_schedule_passes_lowered_or_not():
    s = Schedule.parse({0: "0F0 0F1 0B0 0W0 0B1 0W1", 1: "0F0 0B0 0F1 0B1 0W0 0W1"})
    order = validate(s)
    assert len(order) == 12
    validate(add_send_recv(s))


def test_error_names_rank_step_and_marks_the_grid():
    err = _refused({0: "0F0 0BW0", 1: "0BW0 0F0"})
    assert (err.rank, err.step) == (1, 0)
    assert str(err).startswith("Rank 1, step 0: 0BW0 needs 0F0 on rank 1, which comes later on the same rank")
    assert "<-- ERROR HERE" in err.grid and "[0BW0]" in err.grid


def test_deadlock_between_ranks_is_found():
    # rank 0 waits for microbatch 0's gradient; rank 1 first waits for microbatch 1's forward
    err = _refused({0: "0F0 0BW0 0F1 0BW1", 1: "0F1 0F0 0BW0 0BW1"})
    assert (err.rank, err.step) == (0, 1)
    assert "deadlock: 0BW0 waits for 0B0 or 0BW0 on rank 1" in err.problem
    assert "rank 1 step 0 0F1 waits for 0F1 on rank 0" in err.problem


def test_missing_w_is_incomplete():
    err = _refused({0: "0F0 0B0"})
    assert "no W" in err.problem and err.step == 2


def test_missing_forward_is_incomplete():
    err = _refused({0: "0F0 0BW0", 1: "0F0 0BW0"}, microbatches=2)
    assert "microbatch 1 has no forward" in err.problem


def test_w_before_its_b_never_runs():
    err = _refused({0: "0F0 0W0 0B0"})
    assert (err.rank, err.step) == (0, 1) and "0B0 on rank 0" in err.problem


def test_w_after_bw_is_refused():
    err = _refused({0: "0F0 0BW0 0W0"})
    assert "both an unsplit BW and a split B/W" in err.problem


def test_duplicate_and_out_of_range_actions():
    assert "second time" in _refused({0: "0F0 0F0 0BW0"}).problem
    assert "holds chunks 0..0" in _refused({0: "0F0 1F0 0BW0"}, placement=Placement.single(1)).problem
    assert "microbatch outside" in _refused({0: "0F0 0BW0 0F5"}, microbatches=2).problem


def test_send_without_receive_is_refused():
    s = add_send_recv(Schedule.parse({0: "0F0 0BW0", 1: "0F0 0BW0"}))
    rank1 = [a for a in s.ranks[1] if a.kind is not Kind.RECV_F]
    with pytest.raises(ScheduleError) as info:
        validate(s.replace_ranks([s.ranks[0], rank1]))
    assert (info.value.rank, info.value.step) == (0, 1)
    assert "0SEND_F0 is sent but no rank posts the matching receive" in str(info.value)

    rank0 = [a for a in s.ranks[0] if a.kind is not Kind.SEND_F]
    with pytest.raises(ScheduleError) as info:
        validate(s.replace_ranks([rank0, rank1]))
    assert "0F0 needs 0RECV_F0 on rank 1, which is not in the schedule" in str(info.value)

    extra = s.replace_ranks([s.ranks[0] + (Action(0, Kind.SEND_F, 0),), s.ranks[1]])
    with pytest.raises(ScheduleError, match="appears a second time"):
        validate(extra)
