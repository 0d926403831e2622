"""The plugin runtime and its B/W split reproduce Megatron's own 1F1B bit for bit.

Same model, seed and data; Megatron's ``forward_backward_pipelining_without_interleaving``
against the runtime executing Megatron's 1F1B order: unsplit (BW), split with W
right after B, and split with W two backwards late (W still in microbatch order,
so main_grad accumulates in the same order).
"""

from __future__ import annotations

import pytest

from megatron_offload_plugin.testing.distributed import run_distributed
from megatron_offload_plugin.testing.equivalence import runtime_equivalence_worker as _worker
from megatron_offload_plugin.testing.gpu_emulation import emulated

# Every run here, Megatron's reference included, is under the GPU emulation: NCCL-like strict
# p2p and backward on a worker thread (testing/gpu_emulation.py).
runtime_equivalence_worker = emulated(_worker)

pytestmark = pytest.mark.multiprocess


@pytest.mark.parametrize("split, w_delay", [(False, 0), (True, 0), (True, 2)], ids=["BW", "B+W", "B+W-late"])
def test_runtime_matches_megatron_1f1b_bitwise_at_pp4(split, w_delay, tiny_gpt):
    recipe = dict(tiny_gpt, global_batch_size=12, micro_batch_size=2, pipeline_model_parallel_size=4)
    reports = run_distributed(runtime_equivalence_worker, 4, recipe, split, w_delay, 2, "1f1b-order", timeout_s=300)
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


@pytest.mark.parametrize(
    "schedule, split, parallel, world, microbatches",
    [
        ("zb-h1", True, dict(pipeline_model_parallel_size=4), 4, 8),
        ("zb-h2", True, dict(pipeline_model_parallel_size=4), 4, 9),
        ("interleaved", False, dict(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1), 2, 4),
        ("zb-h1", True, dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2), 4, 4),
        ("zb-h1", True, dict(pipeline_model_parallel_size=2), 4, 6),  # DP=2 x PP=2
    ],
    ids=["zb-h1-pp4", "zb-h2-pp4", "interleaved-pp2-vpp2", "zb-h1-tp2-pp2", "zb-h1-dp2-pp2"],
)
def test_registered_schedules_match_megatron(schedule, split, parallel, world, microbatches, tiny_gpt):
    """Each rank runs its forwards in Megatron's order (same dropout masks) and its Ws in
    microbatch order (same main_grad accumulation order): bit for bit, with dropout on."""
    dp = world // (parallel.get("tensor_model_parallel_size", 1) * parallel["pipeline_model_parallel_size"])
    recipe = dict(tiny_gpt, micro_batch_size=1, global_batch_size=microbatches * dp, **parallel)
    reports = run_distributed(runtime_equivalence_worker, world, recipe, split, 0, 2, schedule, timeout_s=300)
    for report in reports:
        assert report["num_grads_compared"] > 0
        assert report["bitwise_equal"], f"{schedule} rank {report['rank']}: {report['mismatched']} (max rel {report['max_rel_diff']:.2e})"


def test_v_schedules_compute_megatron_1f1b_gradients(tiny_gpt):
    """V placement (rank r holds stages r and 2p-1-r; embedding and loss on rank 0) against
    Megatron's 1F1B at the same pipeline size, weights set by global parameter name so both
    layouts compute the same function; dropout off (the forward order differs)."""
    from megatron_offload_plugin.testing.equivalence import v_schedules_against_1f1b

    base = dict(tiny_gpt, num_layers=8, hidden_dropout=0.0, attention_dropout=0.0, micro_batch_size=1,
                global_batch_size=8, untie_embeddings_and_output_weights=True, pipeline_model_parallel_size=4)
    ref_grads, ref_loss, runs = v_schedules_against_1f1b(base, ("zb-v", "v-half", "v-min"), 4)
    for schedule, (got_grads, loss) in runs.items():
        assert got_grads.keys() == ref_grads.keys()
        for name, ref in ref_grads.items():
            rel = ((got_grads[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
            assert rel <= 1e-6, f"{schedule}: {name} differs by {rel:.2e} (relative)"
        assert loss == ref_loss, schedule  # V computes the loss on rank 0


@pytest.mark.parametrize("microbatches", [2, 4, 7], ids=["m=p", "m=2p", "m=3p+1"])
def test_zb_h1_matches_megatron_over_microbatch_counts_at_pp2(microbatches, tiny_gpt):
    recipe = dict(tiny_gpt, micro_batch_size=1, global_batch_size=microbatches, pipeline_model_parallel_size=2)
    reports = run_distributed(runtime_equivalence_worker, 2, recipe, True, 0, 2, "zb-h1", timeout_s=300)
    for report in reports:
        assert report["bitwise_equal"], f"m={microbatches} rank {report['rank']}: {report['mismatched']}"


def test_auto_replans_from_measured_costs_and_keeps_megatrons_gradients(tiny_gpt):
    """'auto' plans from equal costs, measures F/B/W in the first iteration, plans again (the
    same plan on every rank, since every rank sees the same gathered timeline), and computes
    Megatron 1F1B's gradients, with one chunk per rank and with the V placement."""
    from megatron_offload_plugin.testing.equivalence import auto_replan_worker, layout_gradients_worker

    base = dict(tiny_gpt, num_layers=8, hidden_dropout=0.0, attention_dropout=0.0, micro_batch_size=1,
                global_batch_size=8, untie_embeddings_and_output_weights=True, pipeline_model_parallel_size=4)
    reference = run_distributed(emulated(layout_gradients_worker), 4, base, timeout_s=300)
    ref_grads = {k: v for r in reference for k, v in r["grads"].items()}
    for layers_per_chunk in (None, 1):
        got = run_distributed(emulated(auto_replan_worker), 4, dict(base, num_layers_per_virtual_pipeline_stage=layers_per_chunk),
                              timeout_s=300)
        assert {r["version"] for r in got} == {1} and len({r["chosen"] for r in got}) == 1
        assert len({r["costs"] for r in got}) == 1 and all(c > 0 for c in got[0]["costs"])
        got_grads = {k: v for r in got for k, v in r["grads"].items()}
        for name, ref in ref_grads.items():
            rel = ((got_grads[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
            assert rel <= 1e-6, f"auto ({layers_per_chunk}): {name} differs by {rel:.2e}"
        assert got[0]["loss"] == reference[-1]["loss"] and got[0]["second_loss"] is not None
