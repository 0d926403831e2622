"""`bench deepspeed` prints one JSON object with the runs and keys the issue names (tiny model, few steps)."""

from __future__ import annotations

import json

import pytest

from megatron_offload_plugin.__main__ import main
from megatron_offload_plugin.offload.nvme import aio_available

AIO_OK, AIO_WHY = aio_available()

pytestmark = pytest.mark.slow  # three DeepSpeed processes: about half a minute


@pytest.mark.skipif(not AIO_OK, reason=AIO_WHY)
def test_bench_deepspeed_json_has_the_three_runs_and_nvme_figures(tmp_path, capsys):
    cfg = json.loads(open("configs/deepspeed_layerwise_nozero_nvme.json").read())
    cfg["layerwise_offload"]["optimizer_states"]["nvme_path"] = str(tmp_path)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    code = main(["bench", "deepspeed", "--config", str(path), "--json", "--steps", "3", "--layers", "2",
                 "--hidden", "32", "--heads", "4", "--vocab", "128", "--seq", "16"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    runs = {r["name"]: r for r in result["runs"]}
    assert list(runs) == ["plain", "zero2_cpu_offload", "layerwise"]
    for run in runs.values():
        assert set(run) >= {"name", "losses", "step_time_s", "peak_rss_bytes", "optimizer_state_bytes_resident_peak"}
        assert len(run["losses"]) == 3
    assert runs["layerwise"]["losses"] == runs["plain"]["losses"]
    assert set(runs["layerwise"]) >= {"aio_read_gbps", "aio_write_gbps", "disk_read_gbps", "disk_write_gbps"}
    assert all(runs["layerwise"][k] > 0 for k in ("aio_read_gbps", "aio_write_gbps", "disk_read_gbps", "disk_write_gbps"))


def test_bench_deepspeed_refuses_a_config_without_the_section(tmp_path, capsys):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1}))
    assert main(["bench", "deepspeed", "--config", str(path)]) == 2
    assert "has no 'layerwise_offload' section" in capsys.readouterr().err
