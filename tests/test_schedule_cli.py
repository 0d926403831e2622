"""``python -m megatron_offload_plugin simulate``: JSON on stdout, PNG and schedule dump on disk."""

from __future__ import annotations

import json

import pytest

from megatron_offload_plugin.schedules import generate, schedule_from_dict
from megatron_offload_plugin.schedules.cli import build_parser, main

BASE = ["--pp", "4", "--microbatches", "16"]


def _json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_simulate_prints_one_json_object(capsys):
    out = _json(capsys, ["--schedule", "1f1b", *BASE, "--json"])
    assert out["schedule"] == "1f1b" and out["pp"] == 4 and out["microbatches"] == 16
    assert out["makespan"] == 57.0
    assert out["bubble_rate"] == pytest.approx(3 / 19, abs=1e-9)
    assert out["peak_activation"] == [4.0, 3.0, 2.0, 1.0]
    assert set(out["definitions"]) >= {"bubble_rate", "steady_bubble_rate", "peak_activation"}


def test_costs_and_memory_limit_flags(capsys):
    argv = ["--schedule", "auto", *BASE, "--cost-f", "1", "--cost-b", "1.5", "--cost-w", "0.7",
            "--cost-comm", "0.05", "--memory-limit", "4", "--json"]
    out = _json(capsys, argv)
    assert out["costs"] == {"f": 1.0, "b": 1.5, "w": 0.7, "comm": 0.05}
    assert out["fits_memory_limit"] and max(out["peak_activation"]) <= 4
    zb_h1 = _json(capsys, ["--schedule", "zb-h1", *BASE, "--cost-f", "1", "--cost-b", "1.5", "--cost-w", "0.7",
                           "--cost-comm", "0.05", "--json"])
    assert out["makespan"] <= zb_h1["makespan"]
    assert out["chosen"]


def test_a_fixed_schedule_reports_whether_it_fits(capsys):
    out = _json(capsys, ["--schedule", "zb-h2", *BASE, "--memory-limit", "4", "--json"])
    assert out["fits_memory_limit"] is False and out["max_peak_activation"] == 7.0


def test_plot_and_dump_are_written(capsys, tmp_path):
    png, dump = tmp_path / "zbv.png", tmp_path / "zbv.json"
    out = _json(capsys, ["--schedule", "zb-v", *BASE, "--plot", str(png), "--dump-schedule", str(dump), "--json"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    data = json.loads(dump.read_text())
    assert data["placement"] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert data["actions"][0][0] == ["F", 0, 0]  # [type, microbatch, chunk]
    assert [len(r) for r in data["timeline"]] == [len(r) for r in data["actions"]]
    assert data["result"]["makespan"] == out["makespan"] == 49.5
    assert schedule_from_dict(data) == generate("zb-v", 4, 16)


def test_with_comms_lowers_without_changing_the_timing(capsys, tmp_path):
    dump = tmp_path / "s.json"
    out = _json(capsys, ["--schedule", "zb-h1", *BASE, "--with-comms", "--dump-schedule", str(dump), "--json"])
    assert out["makespan"] == 51.0
    kinds = {a[0] for row in json.loads(dump.read_text())["actions"] for a in row}
    assert {"SEND_F", "RECV_F", "SEND_B", "RECV_B"} <= kinds


def test_unknown_schedule_suggests_the_closest(capsys):
    assert main(["--schedule", "zbv", *BASE]) == 2
    err = capsys.readouterr().err
    assert "--schedule='zbv': unknown schedule; did you mean 'zb-v'? accepted: 1f1b, interleaved" in err


def test_a_configuration_the_schedule_cannot_run_fails_at_start(capsys):
    assert main(["--schedule", "interleaved", "--pp", "4", "--microbatches", "3", "--vpp", "2", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "microbatches=3: Megatron's interleaved schedule needs" in captured.err
    assert main(["--schedule", "zb-v", *BASE, "--vpp", "3"]) == 2
    assert "accepts vpp unset or 2" in capsys.readouterr().err


def test_group_size_only_for_interleaved(capsys):
    assert main(["--schedule", "interleaved", "--pp", "2", "--microbatches", "5", "--vpp", "2",
                 "--microbatch-group-size", "3", "--json"]) == 0
    capsys.readouterr()
    assert main(["--schedule", "1f1b", *BASE, "--microbatch-group-size", "3"]) == 2


def test_plain_output_is_a_short_table(capsys):
    assert main(["--schedule", "zb-h1", *BASE]) == 0
    text = capsys.readouterr().out
    assert "makespan            51" in text and "bubble_rate" in text


def test_required_flags_and_no_abbreviations():
    with pytest.raises(SystemExit):
        main(["--schedule", "1f1b", "--pp", "4"])
    with pytest.raises(SystemExit):
        main(["--schedule", "1f1b", "--pp", "4", "--micro", "8"])


def test_cli_flag_set_is_frozen():
    flags = {s for a in build_parser()._actions for s in a.option_strings}
    assert flags == {
        "-h", "--help", "--schedule", "--pp", "--microbatches", "--vpp", "--microbatch-group-size",
        "--cost-f", "--cost-b", "--cost-w", "--cost-comm", "--memory-limit", "--with-comms", "--plot",
        "--dump-schedule", "--json",
        "--activation-offload", "--offload-fraction", "--offload-chunks", "--offload-bandwidth",
        "--activation-bytes", "--time-unit-s",
    }


def test_package_entry_point_dispatches_simulate(capsys):
    from megatron_offload_plugin.__main__ import main as package_main

    assert package_main(["simulate", "--schedule", "v-min", *BASE, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert max(out["peak_activation"]) <= 4 / 3 + 1
