"""Schedule IR, dependency rule and lowering passes: compact strings in, compact strings out."""

from __future__ import annotations

import pytest

from megatron_offload_plugin.schedules import (
    Action,
    Kind,
    Placement,
    Schedule,
    add_send_recv,
    remove_comms,
    requirements,
    schedule_from_dict,
    split_backward,
)
from megatron_offload_plugin.schedules.ir import KIND_DESCRIPTIONS


# -- Action ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, action",
    [
        ("0F1", Action(0, Kind.F, 1)),
        ("1B0", Action(1, Kind.B, 0)),
        ("1W0", Action(1, Kind.W, 0)),
        ("0BW3", Action(0, Kind.BW, 3)),
        ("12F345", Action(12, Kind.F, 345)),
        ("1SEND_F0", Action(1, Kind.SEND_F, 0)),
        ("0RECV_B7", Action(0, Kind.RECV_B, 7)),
    ],
)
def test_action_compact_form_round_trips(text, action):
    assert Action.parse(text) == action
    assert repr(action) == text == str(action)


@pytest.mark.parametrize("text", ["1F0junk", "2Fx", "F1", "0X1", "", "0 F1", "0f1", "-1F0", "0BWW1"])
def test_action_parse_rejects_anything_but_the_full_form(text):
    with pytest.raises(ValueError, match="is not an action"):
        Action.parse(text)


def test_every_kind_has_one_letter_entry_and_a_description():
    assert set(KIND_DESCRIPTIONS) == set(Kind)
    for kind in Kind:
        assert Action.parse(f"0{kind.value}0").kind is kind


def test_actions_are_hashable_values():
    assert {Action.parse("0F1"), Action(0, Kind.F, 1)} == {Action(0, Kind.F, 1)}


# -- Placement ----------------------------------------------------------------------------------
def test_v_placement_puts_stages_i_and_2p_minus_1_minus_i_on_device_i():
    pl = Placement.v_shape(4)
    assert [pl.stages[i] for i in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    assert pl.locate(7) == (0, 1) and pl.locate(4) == (3, 1)


def test_interleaved_placement_is_megatrons():
    pl = Placement.interleaved(4, 2)
    assert pl.stage(1, 1) == 5 and pl.locate(5) == (1, 1)
    assert Placement.single(3).stages == ((0,), (1,), (2,))


def test_placement_rejects_a_stage_held_twice():
    with pytest.raises(ValueError, match="exactly once"):
        Placement(((0, 1), (1, 2)))


# -- Schedule -------------------------------------------------------------------------------------
def test_schedule_parse_and_format():
    s = Schedule.parse({0: "0F0 0F1 0BW0 0BW1", 1: "0F0 0BW0 0F1 0BW1"})
    assert s.pp == 2 and s.microbatches == 2 and s.placement == Placement.single(2)
    assert s.format(1) == "0F0 0BW0 0F1 0BW1"
    assert Schedule.parse(["0F0,0BW0"]).format(0) == "0F0 0BW0"


def test_schedule_json_round_trip_uses_type_microbatch_chunk():
    s = Schedule.parse({0: "0F0 1F0 1B0 0B0 1W0 0W0", 1: "0F0 1F0 1B0 0B0 1W0 0W0"},
                       placement=Placement.v_shape(2), name="v")
    data = s.to_dict()
    assert data["actions"][0][:2] == [["F", 0, 0], ["F", 0, 1]]
    assert data["placement"] == [[0, 3], [1, 2]]
    back = schedule_from_dict(data)
    assert back == s and back.placement.shape == "v"


def test_grid_marks_the_error_step():
    s = Schedule.parse({0: "0F0 0BW0", 1: "0F0 0BW0"})
    grid = s.format_grid(error_step=1, error_rank=0)
    line = [ln for ln in grid.splitlines() if "ERROR" in ln][0]
    assert line.startswith("Step 1:") and "[0BW0]" in line and line.endswith("<-- ERROR HERE")


# -- dependency rule -----------------------------------------------------------------------------
def test_requirements_follow_the_stage_chain():
    pl = Placement.single(3)
    assert requirements(pl, 0, Action.parse("0F2"), lowered=False) == ()
    (need,) = requirements(pl, 1, Action.parse("0F2"), lowered=False)
    assert (need.rank, need.remote, str(need)) == (0, True, "0F2 on rank 0")
    own, grad = requirements(pl, 1, Action.parse("0B2"), lowered=False)
    assert str(own) == "0F2 on rank 1" and str(grad) == "0B2 or 0BW2 on rank 2"
    assert [str(n) for n in requirements(pl, 2, Action.parse("0BW0"), lowered=False)] == ["0F0 on rank 2"]
    assert [str(n) for n in requirements(pl, 2, Action.parse("0W0"), lowered=False)] == ["0B0 on rank 2"]


def test_lowered_compute_needs_its_local_receive():
    pl = Placement.single(2)
    assert [str(n) for n in requirements(pl, 1, Action.parse("0F0"), lowered=True)] == ["0RECV_F0 on rank 1"]
    (need,) = requirements(pl, 1, Action.parse("0RECV_F0"), lowered=True)
    assert str(need) == "0SEND_F0 on rank 0" and need.remote


def test_v_turn_is_local():
    pl = Placement.v_shape(2)
    (need,) = requirements(pl, 1, Action.parse("1F0"), lowered=True)
    assert str(need) == "0F0 on rank 1" and not need.remote


# -- passes ---------------------------------------------------------------------------------------
def test_send_recv_follows_forward():
    s = add_send_recv(Schedule.parse({0: "0F0 0F1", 1: "0F0 0F1"}))
    assert s.format(0) == "0F0 0SEND_F0 0F1 0SEND_F1"
    assert s.format(1) == "0RECV_F0 0F0 0RECV_F1 0F1"


def test_send_recv_for_backward_and_nothing_across_the_v_turn():
    s = Schedule.parse({0: "0F0 1F0 1B0 0B0 1W0 0W0", 1: "0F0 1F0 1B0 0B0 1W0 0W0"},
                       placement=Placement.v_shape(2))
    lowered = add_send_recv(s)
    assert lowered.format(0) == "0F0 0SEND_F0 1RECV_F0 1F0 1B0 1SEND_B0 0RECV_B0 0B0 1W0 0W0"
    assert lowered.format(1) == "0RECV_F0 0F0 1F0 1SEND_F0 1RECV_B0 1B0 0B0 0SEND_B0 1W0 0W0"
    assert remove_comms(lowered) == s


def test_passes_never_mutate_their_input():
    s = Schedule.parse({0: "0F0 0BW0", 1: "0F0 0BW0"})
    before = s.to_dict()
    add_send_recv(s)
    split_backward(s)
    assert s.to_dict() == before


def test_split_backward_puts_w_right_after_b():
    s = split_backward(Schedule.parse({0: "0F0 0BW0"}))
    assert s.format(0) == "0F0 0B0 0W0"


def test_lowering_twice_is_refused():
    s = add_send_recv(Schedule.parse({0: "0F0 0BW0", 1: "0F0 0BW0"}))
    with pytest.raises(ValueError, match="already has communication"):
        add_send_recv(s)
