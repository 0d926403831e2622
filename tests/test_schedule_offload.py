"""Activation offload as schedule actions: IR, validation, placement by policy, host-link simulation."""

from __future__ import annotations

import json

import pytest

from megatron_offload_plugin.schedules import CostModel, ScheduleError, add_send_recv, remove_comms, simulate, validate
from megatron_offload_plugin.schedules.cli import main
from megatron_offload_plugin.schedules.generators import ScheduleRequest, generate
from megatron_offload_plugin.schedules.ir import OFFLOAD_KINDS, Action, Kind, Schedule
from megatron_offload_plugin.schedules.offload import (
    OffloadPolicy,
    apply_offload,
    insert_offload_actions,
    plan_offload,
)

SCHEDULES = [("1f1b", None), ("interleaved", 2), ("zb-h1", None), ("zb-v", None), ("v-half", None), ("v-min", None)]
UNIT_BYTES = 1e9  # with bandwidth 1/T GB/s, a full-share unit takes T time units


def _schedule(name: str, vpp: int | None, pp: int = 4, m: int = 8, costs: CostModel | None = None) -> Schedule:
    return generate(name, ScheduleRequest(pp, m, vpp=vpp, costs=costs or CostModel()))


def _policy(mode: str, unit_transfer: float | None, chunks: int, **kw) -> OffloadPolicy:
    """A policy whose link copies one unit of one chunk (1/chunks of the share) in ``unit_transfer``."""
    if unit_transfer is None:
        return OffloadPolicy(mode, **kw)
    return OffloadPolicy(mode, bandwidth_gbps=1.0 / (unit_transfer * chunks), unit_bytes=UNIT_BYTES, **kw)


def _hiding_transfer(schedules: list[Schedule], costs: CostModel | None = None) -> float:
    """The paper's k <= 1: a unit's copy takes no longer than its forward, and every unit full
    offload picks has a round trip (2 x transfer) inside its lifespan."""
    costs = costs or CostModel()
    out = float("inf")
    for s in schedules:
        plan = plan_offload(s, OffloadPolicy("full"), costs)
        shortest = min(x for spans in plan.lifespan.values() for x in spans.values() if x > 0)
        out = min(out, costs.f / s.placement.chunks, shortest / 2)
    return out


# -- IR and validation --------------------------------------------------------------------------


def test_offload_kinds_parse_format_and_round_trip():
    a, r = Action.parse("0OFFLOAD1"), Action.parse("1RELOAD0")
    assert (a, r) == (Action(0, Kind.OFFLOAD, 1), Action(1, Kind.RELOAD, 0))
    assert (repr(a), repr(r)) == ("0OFFLOAD1", "1RELOAD0")
    assert OFFLOAD_KINDS == {Kind.OFFLOAD, Kind.RELOAD}
    assert a.is_offload and r.is_offload and not (a.is_compute or a.is_comm or r.is_compute or r.is_comm)
    assert not Action.parse("0F1").is_offload
    assert Kind.OFFLOAD.description and Kind.RELOAD.description
    for bad in ("0OFFLOAD", "OFFLOAD1", "0OFFLOADX1", "0RELOAD1junk"):
        with pytest.raises(ValueError):
            Action.parse(bad)
    s = Schedule.parse({0: "0F0 0OFFLOAD0 0F1 0RELOAD0 0BW0 0BW1", 1: "0F0 0BW0 0F1 0BW1"})
    assert s.has_offload and Schedule.from_dict(s.to_dict()) == s
    assert s.to_dict()["actions"][0][1] == ["OFFLOAD", 0, 0]
    assert s.without_offload() == Schedule.parse({0: "0F0 0F1 0BW0 0BW1", 1: "0F0 0BW0 0F1 0BW1"})


def test_lowering_keeps_offload_actions_and_commutes_with_insertion():
    s = _schedule("interleaved", 2)
    plan = plan_offload(s, OffloadPolicy("full"))
    lowered_after = add_send_recv(insert_offload_actions(s, plan))
    assert insert_offload_actions(add_send_recv(s), plan) == lowered_after
    validate(lowered_after)
    assert remove_comms(lowered_after) == insert_offload_actions(s, plan)
    assert lowered_after.compute_only().has_offload


@pytest.mark.parametrize(("row", "step", "words"), [
    ("0OFFLOAD0 0F0 0F1 0RELOAD0 0BW0 0BW1", 0, "comes before 0F0"),
    ("0F0 0OFFLOAD0 0F1 0BW0 0BW1", 1, "has no 0RELOAD0"),
    ("0F0 0F1 0RELOAD0 0BW0 0BW1", 2, "has no 0OFFLOAD0"),
    ("0F0 0RELOAD0 0OFFLOAD0 0F1 0BW0 0BW1", 1, "comes before 0OFFLOAD0"),
    ("0F0 0OFFLOAD0 0F1 0BW0 0RELOAD0 0BW1", 4, "comes after 0BW0"),
    ("0F0 0OFFLOAD0 0OFFLOAD0 0F1 0RELOAD0 0BW0 0BW1", 2, "appears a second time"),
])
def test_validator_rejects_misplaced_offload_actions(row, step, words):
    with pytest.raises(ScheduleError) as info:
        validate(Schedule.parse({0: row, 1: "0F0 0BW0 0F1 0BW1"}))
    assert (info.value.rank, info.value.step) == (0, step)
    assert words in str(info.value)


def test_reload_may_sit_right_before_a_split_b_and_w_still_follows():
    validate(Schedule.parse({0: "0F0 0OFFLOAD0 0RELOAD0 0B0 0W0"}))


# -- policy and plan ----------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "words"), [
    (dict(mode="half"), "activation_offload='half': unknown mode; accepted: none, full, selective"),
    (dict(mode="selective", fraction=1.5), "offload_fraction=1.5: must be in (0, 1]"),
    (dict(mode="selective", fraction=0.0), "offload_fraction=0.0: must be in (0, 1]"),
    (dict(mode="full", fraction=0.5), "only activation_offload='selective' takes it"),
    (dict(mode="selective", fraction=0.5, chunks=(0,)), "give one or the other"),
    (dict(mode="selective", chunks=(-1,)), "offload_chunks=(-1,)"),
    (dict(mode="full", bandwidth_gbps=10.0), "needs activation_bytes"),
    (dict(mode="full", bandwidth_gbps=-1.0, unit_bytes=1.0), "offload_bandwidth=-1.0: must be a positive"),
])
def test_policy_errors_name_the_option_value_and_what_is_accepted(kwargs, words):
    with pytest.raises(ValueError, match=None) as info:
        OffloadPolicy(**kwargs)
    assert words in str(info.value)


def test_chunks_are_checked_against_the_placement():
    with pytest.raises(ValueError, match=r"offload_chunks=\[2\]: chunk 2 does not exist; each rank holds chunks 0..1"):
        plan_offload(_schedule("zb-v", None), OffloadPolicy("selective", chunks=(2,)))


def test_full_offloads_every_unit_with_a_positive_lifespan_and_none_nothing():
    s = _schedule("1f1b", None)
    full = plan_offload(s, OffloadPolicy("full"))
    for rank, spans in full.lifespan.items():
        assert full.units[rank] == {u for u, x in spans.items() if x > 0}
    assert full.units[3] == frozenset()  # last stage of 1F1B: each B follows its F at once
    assert plan_offload(s, OffloadPolicy("none")).count == 0
    assert insert_offload_actions(s, plan_offload(s, OffloadPolicy("none"))) == s


def test_selective_takes_the_longest_lived_units_that_fit_up_to_the_fraction():
    s = _schedule("interleaved", 2)
    transfer = 0.5
    plan = plan_offload(s, _policy("selective", transfer, 2, fraction=0.25))
    for rank, spans in plan.lifespan.items():
        chosen = plan.units[rank]
        fitting = [u for u, x in spans.items() if x >= 2 * transfer]
        assert len(chosen) == min(len(fitting), 4)  # 25% of 16 units
        assert all(2 * plan.transfer[rank][u] <= spans[u] for u in chosen)
        assert min(spans[u] for u in chosen) >= max((spans[u] for u in fitting if u not in chosen), default=0)
    assert plan.not_hidden == {}
    by_chunk = plan_offload(s, OffloadPolicy("selective", chunks=(1,)))
    assert all(u[0] == 1 for units in by_chunk.units.values() for u in units)
    assert json.loads(json.dumps(plan.to_dict()))["offloaded_units"] == plan.count


def test_reload_goes_lead_compute_actions_before_its_backward_and_after_its_offload():
    s = _schedule("1f1b", None)
    plan = plan_offload(s, OffloadPolicy("full"))
    for lead in (0, 1, 2):
        row = insert_offload_actions(s, plan, reload_lead=lead).ranks[0]
        for chunk, mb in plan.units[0]:
            i = row.index(Action(chunk, Kind.RELOAD, mb))
            b = row.index(Action(chunk, Kind.BW, mb))
            between = [a for a in row[i:b] if a.is_compute]
            f = row.index(Action(chunk, Kind.F, mb))
            assert row[f + 1] == Action(chunk, Kind.OFFLOAD, mb)
            assert len(between) == lead or len([a for a in row[f:b] if a.is_compute]) - 1 == len(between)


def test_slow_link_moves_the_reload_earlier_to_hide_it():
    s = _schedule("1f1b", None)
    fast = insert_offload_actions(s, plan_offload(s, _policy("full", 0.5, 1)))
    slow = insert_offload_actions(s, plan_offload(s, _policy("full", 2.0, 1)))
    gap = {}
    for name, t in (("fast", fast), ("slow", slow)):
        row = t.ranks[0]
        gap[name] = sum(row.index(Action(0, Kind.BW, mb)) - row.index(Action(0, Kind.RELOAD, mb)) for mb in range(8))
    assert gap["slow"] > gap["fast"]


# -- simulation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "vpp"), SCHEDULES)
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_offload_within_k_le_1_hides_and_does_not_raise_peak(name, vpp, mode):
    s = _schedule(name, vpp)
    transfer = _hiding_transfer([s])
    offloaded, plan, result = apply_offload(s, _policy(mode, transfer, s.placement.chunks))
    report = result.offload
    base = simulate(s)
    assert plan.not_hidden == {}
    assert report.not_hidden == {}
    assert report.makespan_no_offload == base.makespan
    assert report.added_makespan_rel <= 0.01
    assert report.offloaded_units == plan.count > 0
    assert report.peak_activation_no_offload == base.peak_activation
    assert all(p <= q + 1e-9 for p, q in zip(result.peak_activation, base.peak_activation))
    assert report.offloaded_bytes == tuple(
        UNIT_BYTES * sum(1 / s.placement.chunks for _ in plan.units[r]) for r in range(s.pp))


@pytest.mark.parametrize(("name", "vpp"), SCHEDULES)
def test_tiny_bandwidth_exposes_reloads(name, vpp):
    s = _schedule(name, vpp)
    _, plan, result = apply_offload(s, _policy("full", 50.0, s.placement.chunks))
    assert plan.not_hidden and result.offload.not_hidden
    assert result.offload.added_makespan > 0
    assert sum(result.offload.exposed) > 0


def test_transfers_without_bandwidth_take_no_time_and_free_memory_at_once():
    s = _schedule("interleaved", 2)
    _, _, result = apply_offload(s, OffloadPolicy("full"))
    assert result.offload.added_makespan == 0
    for e in result.timeline:
        if e.action.kind is Kind.OFFLOAD:
            assert e.end == e.start
    assert max(result.peak_activation) == 1.0  # one F's share at a time (1/2) plus the reloaded unit


def test_channels_are_fifo_and_b_waits_for_its_reload():
    s = _schedule("1f1b", None)
    _, _, result = apply_offload(s, _policy("full", 3.0, 1))
    ends: dict[tuple[int, Action], float] = {}
    for rank in range(s.pp):
        for kind in (Kind.OFFLOAD, Kind.RELOAD):
            copies = [e for e in result.rank_timeline(rank) if e.action.kind is kind]
            assert all(a.end <= b.start + 1e-9 for a, b in zip(copies, copies[1:]))
            assert all(abs(e.end - e.start - 3.0) < 1e-9 for e in copies)
        for e in result.rank_timeline(rank):
            ends[(rank, e.action)] = e.end
            if e.action.kind is Kind.BW and (rank, Action(e.action.chunk, Kind.RELOAD, e.action.microbatch)) in ends:
                assert e.start >= ends[(rank, Action(e.action.chunk, Kind.RELOAD, e.action.microbatch))] - 1e-9


@pytest.mark.parametrize(("name", "vpp"), [
    ("1f1b", None), ("interleaved", 2), ("v-half", None), ("v-min", None), ("zb-h1", None), ("zb-v", None),
])
def test_full_offload_peak_stays_flat_as_pp_grows(name, vpp):
    """PipeOffload's claim; for zero-bubble schedules it holds because W's inputs wait on the host too."""
    peaks = {}
    for pp in (2, 4):
        s = _schedule(name, vpp, pp=pp)
        peaks[pp] = max(apply_offload(s, OffloadPolicy("full"))[2].peak_activation)
    assert peaks[4] <= 1.1 * peaks[2]


@pytest.mark.parametrize(("name", "vpp"), [("zb-h1", None), ("zb-v", None)])
def test_full_offload_peak_stays_flat_for_zero_bubble_when_b_frees_the_activations(name, vpp):
    costs = CostModel(b_releases=1.0)
    peaks = {pp: max(apply_offload(_schedule(name, vpp, pp=pp, costs=costs), OffloadPolicy("full"), costs)[2]
                     .peak_activation) for pp in (2, 4)}
    assert peaks[4] <= 1.1 * peaks[2]


def test_full_offload_peak_at_k_1_is_the_same_from_pp_4_on():
    """With copies as slow as the forward, an offload still in flight overlaps the next F and a reload."""
    peaks = {}
    for pp in (2, 4, 8):
        s = _schedule("1f1b", None, pp=pp, m=2 * pp)
        peaks[pp] = max(apply_offload(s, _policy("full", 1.0, 1))[2].peak_activation)
    assert peaks[8] <= 1.1 * peaks[4]
    assert peaks[4] > 1.1 * peaks[2]  # pp=2 overlaps less: its warm-up is two forwards


def test_selective_half_on_interleaved_lowers_the_peak():
    s = _schedule("interleaved", 2)
    _, _, result = apply_offload(s, _policy("selective", _hiding_transfer([s]), 2, fraction=0.5))
    base = max(result.offload.peak_activation_no_offload)
    assert max(result.peak_activation) < base


@pytest.mark.xfail(strict=True, reason=(
    "measured 3.0 vs 5.5 (0.545x): the longest-lived half of rank 0's units is offloaded, but at the end of warm-up "
    "it still holds 6 short-lived chunk-units"))
def test_selective_half_on_interleaved_halves_the_peak():
    s = _schedule("interleaved", 2)
    _, _, result = apply_offload(s, _policy("selective", _hiding_transfer([s]), 2, fraction=0.5))
    assert max(result.peak_activation) <= 0.5 * max(result.offload.peak_activation_no_offload)


def test_schedules_without_offload_simulate_as_before():
    s = _schedule("zb-v", None)
    result = simulate(s)
    assert result.offload is None
    assert "added_makespan" not in result.to_dict()


# -- CLI ----------------------------------------------------------------------------------------

BASE = ["--pp", "4", "--microbatches", "8"]


def test_cli_json_reports_offload(capsys):
    assert main(["--schedule", "interleaved", "--vpp", "2", *BASE, "--activation-offload", "full",
                 "--offload-bandwidth", "1", "--activation-bytes", "1e9", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("activation_offload", "offloaded_units", "added_makespan", "added_makespan_rel", "not_hidden",
                "peak_activation", "peak_activation_no_offload", "offloaded_bytes"):
        assert key in out
    assert out["activation_offload"]["mode"] == "full" and out["offloaded_units"] > 0
    assert max(out["peak_activation"]) < max(out["peak_activation_no_offload"])
    assert out["not_hidden"] == [[], [], [], []]


def test_cli_selective_chunks_plot_and_dump(tmp_path, capsys):
    png, dump = tmp_path / "t.png", tmp_path / "d.json"
    assert main(["--schedule", "zb-v", *BASE, "--activation-offload", "selective", "--offload-chunks", "0",
                 "--with-comms", "--plot", str(png), "--dump-schedule", str(dump), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["activation_offload"] == {"mode": "selective", "chunks": [0]}
    assert png.stat().st_size > 0
    kinds = {a[0] for row in json.loads(dump.read_text())["actions"] for a in row}
    assert {"OFFLOAD", "RELOAD", "SEND_F"} <= kinds
    validate(Schedule.from_dict(json.loads(dump.read_text())))


@pytest.mark.parametrize(("argv", "words"), [
    (["--activation-offload", "selective", "--offload-fraction", "1.5"], "--offload-fraction=1.5: must be in (0, 1]"),
    (["--activation-offload", "selective", "--offload-chunks", "3"], "--offload-chunks=[3]: chunk 3 does not exist"),
    (["--activation-offload", "full", "--offload-bandwidth", "10"], "needs --activation-bytes"),
    (["--offload-fraction", "0.5"], "need --activation-offload"),
])
def test_cli_offload_errors_name_the_flag(argv, words, capsys):
    assert main(["--schedule", "1f1b", *BASE, *argv]) == 2
    assert words in capsys.readouterr().err
