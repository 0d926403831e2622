"""PipeOffload on real Megatron-core models (gloo, CPU): bitwise equal to the same schedule
without offload, with lower resident activation memory on every stage."""

from __future__ import annotations

import pytest

from megatron_offload_plugin import plugin as plugin_api
from megatron_offload_plugin.testing.distributed import run_distributed
from megatron_offload_plugin.testing.equivalence import offload_equivalence_worker

SMALL = 1024  # the tiny model's tensors are below the 64 KiB default


def _check(reports, sections):
    for report in reports:
        for run in report["runs"]:
            where = f"rank {report['rank']} {run['section']}"
            assert run["num_grads_compared"] > 0
            assert run["bitwise_equal"], f"{where}: {run['mismatched']}"
            assert run["losses"] == report["reference_losses"], where
            assert run["peak_activation_bytes"] <= report["reference_peak_activation_bytes"], where
    by_section = {i: [r["runs"][i] for r in reports] for i in range(len(sections))}
    return by_section


@pytest.mark.multiprocess
def test_interleaved_offload_is_bitwise_and_lowers_every_stage(tiny_gpt):
    recipe = dict(tiny_gpt, hidden_dropout=0.0, attention_dropout=0.0, global_batch_size=16,
                  pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1)
    sections = [
        {"mode": "full", "min_tensor_bytes": SMALL},
        {"mode": "selective", "min_tensor_bytes": SMALL},
        {"mode": "selective", "chunks": "0", "min_tensor_bytes": SMALL},
    ]
    reports = run_distributed(offload_equivalence_worker, 2, recipe, "interleaved", sections, 2, timeout_s=300)
    runs = _check(reports, sections)
    reference_max = max(r["reference_peak_activation_bytes"] for r in reports)
    full_max = max(r["peak_activation_bytes"] for r in runs[0])
    selective_max = max(r["peak_activation_bytes"] for r in runs[1])
    assert full_max < selective_max < reference_max
    for run in runs[0]:
        stats = run["offload"]
        assert stats["offloaded_bytes"] == stats["reloaded_bytes"] > 0
        assert stats["host_pool_bytes"] > 0


@pytest.mark.multiprocess
def test_nvme_tier_offload_is_bitwise_with_nothing_kept_in_the_host_pool(tiny_gpt, tmp_path):
    from megatron_offload_plugin.offload import nvme

    ok, why = nvme.aio_available()
    if not ok:
        pytest.skip(why)
    nvme.load_aio_op()  # build DeepSpeed's aio op once here (minutes the first time), not in each rank
    recipe = dict(tiny_gpt, hidden_dropout=0.0, attention_dropout=0.0, global_batch_size=8,
                  pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1)
    sections = [{"mode": "full", "min_tensor_bytes": SMALL},
                {"mode": "full", "min_tensor_bytes": SMALL, "nvme_path": str(tmp_path)}]
    reports = run_distributed(offload_equivalence_worker, 2, recipe, "interleaved", sections, 2, timeout_s=300)
    runs = _check(reports, sections)
    for on_host, on_nvme in zip(runs[0], runs[1]):
        assert on_nvme["peak_activation_bytes"] == on_host["peak_activation_bytes"]
        assert on_nvme["offload"]["nvme_written_bytes"] == on_host["offload"]["offloaded_bytes"] > 0
        assert on_nvme["offload"]["host_pool_bytes"] == 0
    assert list(tmp_path.iterdir()) == []  # the per-run folders are gone


@pytest.mark.multiprocess
def test_zero_bubble_offload_moves_what_w_keeps_and_stays_bitwise(tiny_gpt):
    recipe = dict(tiny_gpt, global_batch_size=12, pipeline_model_parallel_size=2)
    sections = [{"mode": "full", "min_tensor_bytes": SMALL}]
    reports = run_distributed(offload_equivalence_worker, 2, recipe, "zb-h1", sections, 2, timeout_s=300)
    runs = _check(reports, sections)
    for report, run in zip(reports, runs[0]):
        assert run["peak_activation_bytes"] < report["reference_peak_activation_bytes"]
        # every stage (the last one too) offloads at least what its W's keep
        assert run["offload"]["offloaded_bytes"] > 0


@pytest.mark.multiprocess
def test_checkpoint_offload_is_bitwise_equal_to_recompute_alone(tiny_gpt):
    recipe = dict(tiny_gpt, global_batch_size=8, pipeline_model_parallel_size=2, recompute_granularity="full",
                  recompute_method="uniform", recompute_num_layers=1)
    sections = [
        {"checkpoint_offload": True, "min_tensor_bytes": SMALL},
        {"checkpoint_offload": True, "mode": "full", "min_tensor_bytes": SMALL},
    ]
    reports = run_distributed(offload_equivalence_worker, 2, recipe, "1f1b", sections, 2, timeout_s=300)
    runs = _check(reports, sections)
    for run in runs[0]:
        assert run["offload"]["offloaded_bytes"] > 0 and run["offload"]["on_demand_reloads"] == 0


def test_offload_with_megatrons_own_schedule_fails_at_apply():
    with pytest.raises(ValueError, match=r"--activation-offload full runs inside the plugin's pipeline schedules"):
        plugin_api.apply({"activation_offload": {"mode": "full"}, "telemetry": {"log_patches": False}})
    assert not plugin_api.is_applied()


def test_selective_options_are_checked_together():
    from megatron_offload_plugin.config import config_from_mapping

    with pytest.raises(ValueError, match=r"set one of --offload-fraction or --offload-chunks, not both"):
        config_from_mapping({"activation_offload": {"mode": "selective", "fraction": 0.5, "chunks": "0"}}, source="test")
    with pytest.raises(ValueError, match=r"only applies to --activation-offload selective; got --activation-offload full"):
        config_from_mapping({"activation_offload": {"mode": "full", "fraction": 0.5}}, source="test")


@pytest.mark.multiprocess
def test_checkpoint_offload_without_recompute_fails_naming_the_options(tiny_gpt):
    from megatron_offload_plugin.testing.distributed import DistributedRunError

    recipe = dict(tiny_gpt, global_batch_size=4, pipeline_model_parallel_size=2)
    with pytest.raises(DistributedRunError, match="--checkpoint-offload offloads what Megatron's full recompute keeps"):
        run_distributed(offload_equivalence_worker, 2, recipe, "1f1b", [{"checkpoint_offload": True}], 1,
                        timeout_s=300)
