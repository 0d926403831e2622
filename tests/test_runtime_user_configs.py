"""Plugin schedules in the configurations users run, against Megatron's own schedule, bitwise.

Megatron DDP with ``--overlap-grad-reduce`` (the B/W split used to stop at DDP's
"param.grad being None" assert at the first B, and 1f1b failed at iteration 2 when
``grad_sync_func`` launched a reduction the hooks had already launched), the
distributed optimizer with ``--overlap-param-gather``, bf16, TP with sequence
parallelism.  The config hooks are set as Megatron-LM's ``train()`` sets them
(``no_sync_func``, ``grad_sync_func = start_grad_sync``, ``param_sync_func``,
``finalize_model_grads_func``), and every run is under the GPU emulation (strict
NCCL-like p2p, backward on a worker thread), Megatron's reference run included.
"""

from __future__ import annotations

import pytest

from megatron_offload_plugin.testing.distributed import run_distributed
from megatron_offload_plugin.testing.equivalence import runtime_equivalence_worker
from megatron_offload_plugin.testing.gpu_emulation import emulated

pytestmark = pytest.mark.multiprocess

OVERLAP = dict(overlap_grad_reduce=True)
DISTOPT = dict(overlap_grad_reduce=True, use_distributed_optimizer=True, overlap_param_gather=True)


@pytest.mark.parametrize(
    "schedule, world, options",
    [
        ("1f1b", 2, dict(pipeline_model_parallel_size=2, global_batch_size=4, **OVERLAP)),
        ("zb-h1", 4, dict(pipeline_model_parallel_size=2, global_batch_size=8, **DISTOPT)),
        ("interleaved", 2, dict(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1,
                                global_batch_size=4, **DISTOPT)),
        ("zb-h1", 4, dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, sequence_parallel=True,
                          global_batch_size=4, bf16=True)),
        ("zb-h2", 2, dict(pipeline_model_parallel_size=2, global_batch_size=5, bf16=True, **OVERLAP)),
    ],
    ids=["1f1b-pp2-overlap", "zb-h1-dp2-pp2-distopt", "interleaved-pp2-vpp2-distopt", "zb-h1-tp2-sp-pp2-bf16",
         "zb-h2-pp2-bf16-overlap"],
)
def test_plugin_schedule_matches_megatron_in_user_configuration(schedule, world, options, tiny_gpt):
    recipe = dict(tiny_gpt, micro_batch_size=1, **options)
    split = schedule not in ("1f1b", "interleaved")
    reports = run_distributed(emulated(runtime_equivalence_worker), world, recipe, split, 0, 2, schedule, timeout_s=400)
    for report in reports:
        assert report["num_grads_compared"] > 0
        assert report["bitwise_equal"], f"{schedule} rank {report['rank']}: {report['mismatched']}"
        assert all(loss is None or loss == loss for loss in report["losses"])  # finite, not NaN


def test_v_schedules_in_bf16_give_megatron_1f1b_gradients_bitwise(tiny_gpt):
    """bf16 (Float16Module, bf16 p2p) with the V placement: on weights set by global name, the
    V schedules' gradients equal Megatron 1F1B's bit for bit; the loss is on rank 0."""
    from megatron_offload_plugin.testing.equivalence import v_schedules_against_1f1b

    base = dict(tiny_gpt, hidden_dropout=0.0, attention_dropout=0.0, micro_batch_size=1, global_batch_size=4,
                untie_embeddings_and_output_weights=True, pipeline_model_parallel_size=2, bf16=True)
    ref_grads, ref_loss, runs = v_schedules_against_1f1b(base, ("zb-v", "v-half", "v-min"), 2)
    for schedule, (got_grads, loss) in runs.items():
        assert got_grads.keys() == ref_grads.keys()
        different = [name for name, ref in ref_grads.items() if not bool((got_grads[name] == ref).all())]
        assert not different, f"{schedule}: {different[:5]}"
        assert loss == ref_loss, schedule
