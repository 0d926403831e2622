"""`bench pipeline` prints one JSON object with the keys the issue names, from real runs."""

from __future__ import annotations

import json

import pytest

from megatron_offload_plugin.__main__ import main

pytestmark = pytest.mark.multiprocess


def test_bench_pipeline_json_compares_plugin_1f1b_with_megatron(capsys):
    code = main(["bench", "pipeline", "--pp", "2", "--microbatches", "4", "--schedules", "megatron,1f1b",
                 "--iterations", "2", "--layers", "4", "--hidden", "64", "--seq", "32", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    runs = {r["schedule"]: r for r in result["runs"]}
    assert set(runs) == {"megatron", "1f1b"}
    for run in runs.values():
        assert set(run) >= {"schedule", "losses", "max_rel_grad_diff_vs_megatron", "peak_activation_bytes",
                            "measured_bubble_rate", "iteration_time_s"}
        assert len(run["losses"]) == 2 and len(run["peak_activation_bytes"]) == 2
    assert runs["1f1b"]["losses"] == runs["megatron"]["losses"]
    assert runs["1f1b"]["max_rel_grad_diff_vs_megatron"] == 0.0
    assert 0.0 <= runs["1f1b"]["measured_bubble_rate"] < 1.0
    assert runs["1f1b"]["peak_activation_bytes"] == runs["megatron"]["peak_activation_bytes"]


def test_bench_rejects_an_unknown_schedule_naming_the_accepted_ones(capsys):
    assert main(["bench", "pipeline", "--schedules", "zbv"]) == 2
    assert "unknown zbv; accepted: megatron" in capsys.readouterr().err


def test_bench_pipeline_offload_runs_report_the_issue_keys(capsys):
    code = main(["bench", "pipeline", "--pp", "2", "--microbatches", "4", "--schedules", "interleaved",
                 "--activation-offload", "full", "--offload-min-tensor-bytes", "1024",
                 "--iterations", "2", "--layers", "4", "--hidden", "64", "--seq", "32", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    runs = {r["activation_offload"]: r for r in result["runs"]}
    assert set(runs) == {"none", "full"}  # 'none' is added as the reference
    full = runs["full"]
    assert set(full) >= {"schedule", "activation_offload", "peak_activation_bytes", "offloaded_bytes",
                         "host_pool_bytes", "max_rel_grad_diff_vs_no_offload", "iteration_time_s"}
    assert full["max_rel_grad_diff_vs_no_offload"] == 0.0 and full["bitwise_equal_vs_no_offload"]
    assert all(b > 0 for b in full["offloaded_bytes"]) and all(b > 0 for b in full["host_pool_bytes"])
    assert max(full["peak_activation_bytes"]) < max(runs["none"]["peak_activation_bytes"])


def test_bench_rejects_an_unknown_offload_policy(capsys):
    assert main(["bench", "pipeline", "--activation-offload", "half"]) == 2
    assert "--activation-offload: unknown half; accepted: none, selective, full" in capsys.readouterr().err
