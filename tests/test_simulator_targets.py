"""The issue's simulator targets at pp=4, 16 microbatches, F=B=W=1, no communication, via the CLI."""

from __future__ import annotations

import json

import pytest

from megatron_offload_plugin.__main__ import main

P, M = 4, 16


def _simulate(capsys, schedule: str, *extra: str) -> dict:
    assert main(["simulate", "--schedule", schedule, "--pp", str(P), "--microbatches", str(M), *extra, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_1f1b_bubble_is_p_minus_1_over_m_plus_p_minus_1_with_peak_p_on_device_0(capsys):
    r = _simulate(capsys, "1f1b")
    assert r["bubble_rate"] == pytest.approx((P - 1) / (M + P - 1), abs=1e-3)
    assert r["peak_activation"][0] == P


def test_zb_h1_bubble_is_a_third_of_1f1b_at_1f1b_memory(capsys):
    r = _simulate(capsys, "zb-h1")
    # Bubble (p-1)(F+B-W) over a makespan of 3m + (p-1)(F+B-W) time units.
    assert r["bubble_rate"] == pytest.approx((P - 1) / (3 * M + P - 1), abs=2e-3)
    assert max(r["peak_activation"]) <= P


def test_zb_h2_has_no_steady_bubble_within_2p_minus_1_activations(capsys):
    r = _simulate(capsys, "zb-h2")
    assert r["steady_bubble_rate"] <= 0.005 and max(r["peak_activation"]) <= 2 * P - 1


def test_zb_v_reaches_the_two_chunk_floor_at_peak_p(capsys):
    r = _simulate(capsys, "zb-v")
    assert r["bubble_rate"] <= 0.032 and r["steady_bubble_rate"] <= 0.005
    assert max(r["peak_activation"]) <= P


@pytest.mark.parametrize("schedule, bound", [("v-half", P / 2 + 1), ("v-min", P / 3 + 1)])
def test_memory_controllable_v_schedules_stay_under_their_bound(capsys, schedule, bound):
    r = _simulate(capsys, schedule)
    assert max(r["peak_activation"]) <= bound


def test_plot_and_dump_are_written(capsys, tmp_path):
    png, dump = tmp_path / "t.png", tmp_path / "t.json"
    _simulate(capsys, "zb-h1", "--plot", str(png), "--dump-schedule", str(dump))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(dump.read_text())
