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
    lw = runs["layerwise"]
    for d in ("read", "write"):  # figures of the training steps' own transfers, next to the disk probe
        assert lw[f"disk_{d}_gbps"] > 0
        assert 0 <= lw[f"aio_timed_{d}_bytes_alone"] <= lw[f"aio_timed_{d}_bytes"] <= lw[f"aio_{d}_bytes"]
        assert (lw[f"aio_{d}_gbps_alone"] is None) == (lw[f"aio_timed_{d}_bytes_alone"] == 0)
        if lw[f"aio_timed_{d}_bytes"]:  # tiny layers: a wait may never block, then there is no figure
            assert lw[f"aio_{d}_gbps"] > 0
            assert lw[f"aio_{d}_vs_disk"] == pytest.approx(lw[f"aio_{d}_gbps"] / lw[f"disk_{d}_gbps"])
        else:
            assert lw[f"aio_{d}_gbps"] is None and lw[f"aio_{d}_vs_disk"] is None
    # every step writes every layer's states; the steps after the first read them back
    assert lw["aio_write_bytes"] >= 3 * lw["optimizer_state_bytes"]
    assert lw["aio_read_bytes"] >= 2 * lw["optimizer_state_bytes"]
    assert lw["aio_wait_s"] >= 0
    assert lw["aio_timed_rw_bytes"] <= lw["aio_read_bytes"] + lw["aio_write_bytes"]
    assert (lw["aio_rw_gbps"] is None) == (lw["aio_timed_rw_bytes"] == 0)
    assert "aio_bytes_read" not in lw  # the after-training re-measure is gone


@pytest.mark.skipif(not AIO_OK, reason=AIO_WHY)
def test_bench_deepspeed_reports_the_selected_layers_activation_peak(tmp_path, capsys):
    cfg = json.loads(open("configs/deepspeed_layerwise_activations_nvme.json").read())
    act = cfg["layerwise_offload"]["activations"]
    act["nvme_path"], act["min_tensor_bytes"] = str(tmp_path), 0
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    code = main(["bench", "deepspeed", "--config", str(path), "--json", "--runs", "plain,layerwise", "--steps", "2",
                 "--layers", "4", "--hidden", "32", "--heads", "4", "--vocab", "128", "--seq", "32"])
    assert code == 0
    runs = {r["name"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]}
    plain, lw = runs["plain"], runs["layerwise"]
    assert plain["activation_offload"] == "none" and lw["activation_offload"] == "nvme"
    assert lw["losses_bitwise_equal_to_plain"] and "activation_selected_peak_layers" not in plain
    assert plain["activation_layer_bytes"] > 0
    assert lw["peak_saved_activation_bytes"] < plain["peak_saved_activation_bytes"]
    assert 0 < lw["activation_selected_peak_layers"] <= 1.0  # the target: at most one layer's worth


def test_io_figures_put_in_training_aio_next_to_the_disk_probe():
    from megatron_offload_plugin.bench.deepspeed import _io_figures
    from megatron_offload_plugin.offload.nvme import DirectionStats, IOStats

    io = IOStats(read=DirectionStats(bytes=3000, batches=3, timed_bytes=2000, timed_batches=2, timed_seconds=1e-6,
                                     alone_timed_bytes=1000, alone_timed_seconds=2e-7),
                 write=DirectionStats(bytes=1000, batches=1),
                 both=DirectionStats(bytes=4000, batches=3, timed_bytes=3000, timed_batches=1, timed_seconds=3e-6))
    out = _io_figures(io, disk_write=4.0, disk_read=2.5)
    assert out["aio_read_gbps"] == pytest.approx(2.0) and out["aio_read_vs_disk"] == pytest.approx(0.8)
    assert (out["aio_read_bytes"], out["aio_timed_read_bytes"], out["disk_read_gbps"]) == (3000, 2000, 2.5)
    assert out["aio_read_gbps_alone"] == pytest.approx(5.0) and out["aio_timed_read_bytes_alone"] == 1000
    assert out["aio_write_gbps_alone"] is None
    assert (out["aio_write_gbps"], out["aio_write_vs_disk"], out["aio_write_bytes"]) == (None, None, 1000)
    assert out["aio_rw_gbps"] == pytest.approx(1.0) and out["aio_timed_rw_bytes"] == 3000


def test_bench_deepspeed_refuses_a_config_without_the_section(tmp_path, capsys):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1}))
    assert main(["bench", "deepspeed", "--config", str(path)]) == 2
    assert "has no 'layerwise_offload' section" in capsys.readouterr().err
