"""The plugin runtime and its B/W split reproduce Megatron's own 1F1B bit for bit.

Same model, seed and data; Megatron's ``forward_backward_pipelining_without_interleaving``
against the runtime executing Megatron's 1F1B order: unsplit (BW), split with W
right after B, and split with W two backwards late (W still in microbatch order,
so main_grad accumulates in the same order).
"""

from __future__ import annotations

import pytest

from megatron_offload_plugin.testing.distributed import run_distributed
from megatron_offload_plugin.testing.equivalence import runtime_equivalence_worker

pytestmark = pytest.mark.multiprocess


@pytest.mark.parametrize("split, w_delay", [(False, 0), (True, 0), (True, 2)], ids=["BW", "B+W", "B+W-late"])
def test_runtime_matches_megatron_1f1b_bitwise_at_pp4(split, w_delay, tiny_gpt):
    recipe = dict(tiny_gpt, global_batch_size=12, micro_batch_size=2, pipeline_model_parallel_size=4)
    reports = run_distributed(runtime_equivalence_worker, 4, recipe, split, w_delay, 2, timeout_s=300)
    for report in reports:
        assert report["num_grads_compared"] > 0
        assert report["bitwise_equal"], f"rank {report['rank']}: {report['mismatched']}"
    assert reports[-1]["losses"] == reports[-1]["reference_losses"]


@pytest.mark.parametrize("split", [False, True], ids=["BW", "B+W"])
def test_runtime_routes_interleaved_chunks_like_megatron_at_pp2_vpp2(split, tiny_gpt):
    """Two chunks per rank (interleaved placement): every message between virtual stages,
    including rank 1 -> rank 0 between chunks, reaches the right chunk and microbatch.

    Dropout is off: a rank's chunks draw from one RNG stream, so a schedule that orders
    forwards across chunks differently from Megatron draws different dropout masks."""
    recipe = dict(tiny_gpt, hidden_dropout=0.0, attention_dropout=0.0, global_batch_size=8, micro_batch_size=2, pipeline_model_parallel_size=2,
                  num_layers_per_virtual_pipeline_stage=1)
    reports = run_distributed(runtime_equivalence_worker, 2, recipe, split, 0, 2, "gpipe", timeout_s=300)
    for report in reports:
        assert report["num_grads_compared"] > 0
        assert report["bitwise_equal"], f"rank {report['rank']}: {report['mismatched']}"
