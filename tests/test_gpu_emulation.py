"""GPU behaviour emulated on CPU: the emulations see the defects, and the runtime passes them.

* strict p2p (NCCL semantics): a send/receive cycle is reported naming both ranks;
  Megatron's own schedules run through it, and so does every plugin schedule
  (test_runtime_equivalence.py and test_runtime_user_configs.py run under it);
* backward on a worker thread (CUDA autograd): the B/W split still defers W.
"""

from __future__ import annotations

import pytest

from megatron_offload_plugin.testing.distributed import run_distributed
from megatron_offload_plugin.testing.equivalence import default_config_equivalence_worker
from megatron_offload_plugin.testing.gpu_emulation import emulated

pytestmark = pytest.mark.multiprocess


def _send_then_receive(rank: int, world_size: int, batched: bool) -> list[float]:
    import torch
    import torch.distributed as dist

    from megatron_offload_plugin.testing.gpu_emulation import P2PDeadlock, strict_p2p

    peer = 1 - rank
    out = torch.full((1024,), float(rank + 1))
    into = torch.zeros(1024)
    with strict_p2p(timeout_s=3.0):
        try:
            if batched:
                works = dist.batch_isend_irecv([dist.P2POp(dist.isend, out, peer), dist.P2POp(dist.irecv, into, peer)])
            else:
                works = [dist.isend(out, peer), dist.irecv(into, peer)]
            for work in works:
                work.wait()
        except P2PDeadlock as exc:
            return [str(exc)]
    return into[:2].tolist()


def test_strict_p2p_reports_a_send_send_cycle_naming_both_ranks():
    reports = run_distributed(_send_then_receive, 2, False, timeout_s=120)
    for rank, report in enumerate(reports):
        assert isinstance(report[0], str), f"rank {rank} did not deadlock: {report}"
        assert "rank 0: pending [send #0 -> rank 1]" in report[0] or "rank 0" in report[0]
        assert "rank 1" in report[0] and "send #0" in report[0]


def test_strict_p2p_lets_a_batched_send_and_receive_progress_together():
    reports = run_distributed(_send_then_receive, 2, True, timeout_s=120)
    assert reports == [[2.0, 2.0], [1.0, 1.0]]


def _split_backward_on_worker_thread(rank: int, world_size: int) -> dict:
    """One Megatron ColumnParallelLinear: B inside a capture, W later, backward on a worker thread."""
    import torch

    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from megatron_offload_plugin.patches import PatchSet
    from megatron_offload_plugin.patches.megatron_core import wgrad_split_patch
    from megatron_offload_plugin.runtime.wgrad import WeightGradStore
    from megatron_offload_plugin.testing.gpu_emulation import backward_on_worker_thread

    parallel_state.initialize_model_parallel(1, 1)
    torch.manual_seed(0)
    config = ModelParallelConfig(use_cpu_initialization=True, gradient_accumulation_fusion=False)
    linear = ColumnParallelLinear(16, 8, config=config, init_method=torch.nn.init.normal_, bias=True,
                                  gather_output=True)
    x = torch.randn(4, 2, 16, requires_grad=True)
    out, _ = linear(x)
    out.square().sum().backward()
    reference = (linear.weight.grad.clone(), linear.bias.grad.clone(), x.grad.clone())
    linear.weight.grad = linear.bias.grad = x.grad = None

    store = WeightGradStore()
    patches = PatchSet(log=False)
    patches.apply([wgrad_split_patch(store)])
    try:
        with backward_on_worker_thread() as worker:
            out, _ = linear(x)
            with store.capture("mb0"):
                out.square().sum().backward()
            weight_after_b = linear.weight.grad
            queued = len(store._pending.get("mb0", []))
            ran = store.run("mb0")
            calls = worker.calls
    finally:
        patches.revert()
    store.assert_drained()
    return {
        "worker_calls": calls, "queued_in_b": queued, "ran_in_w": ran, "weight_grad_after_b": weight_after_b,
        "equal": [torch.equal(a, b) for a, b in zip((linear.weight.grad, linear.bias.grad, x.grad), reference)],
    }


def test_split_backward_defers_w_when_autograd_runs_on_a_worker_thread():
    (report,) = run_distributed(_split_backward_on_worker_thread, 1, timeout_s=120)
    assert report["worker_calls"] >= 2  # B's backward and W's accumulation both ran on the worker
    assert report["queued_in_b"] == 1 and report["ran_in_w"] == 1
    assert report["weight_grad_after_b"] is None  # W, not B, computed the weight gradient
    assert report["equal"] == [True, True, True]


@pytest.mark.parametrize(
    "parallel, microbatches",
    [(dict(pipeline_model_parallel_size=2), 4), (dict(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1), 4)],
    ids=["1f1b-pp2", "interleaved-pp2-vpp2"],
)
def test_megatron_own_schedules_pass_strict_p2p(parallel, microbatches, tiny_gpt):
    recipe = dict(tiny_gpt, micro_batch_size=1, global_batch_size=microbatches, **parallel)
    reports = run_distributed(emulated(default_config_equivalence_worker), 2, recipe, 1, timeout_s=300)
    for report in reports:
        assert report["bitwise_equal"], report["mismatched"]


def test_full_offload_with_w_inputs_passes_strict_p2p_and_worker_thread_backward(tiny_gpt):
    """Offload and reload actions between the compute actions (the plan posts after them too),
    W inputs offloaded inside B on the worker thread: bitwise against no offload."""
    from megatron_offload_plugin.testing.equivalence import offload_equivalence_worker

    sections = [{"mode": "full", "min_tensor_bytes": 1024}]
    reports = run_distributed(emulated(offload_equivalence_worker), 2, dict(tiny_gpt, global_batch_size=8,
                              pipeline_model_parallel_size=2), "zb-h1", sections, 2, timeout_s=300)
    for report in reports:
        (run,) = report["runs"]
        assert run["bitwise_equal"], run["mismatched"]
        assert run["offload"]["offloaded_bytes"] > 0
