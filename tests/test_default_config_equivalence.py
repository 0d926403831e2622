"""apply() of the default config leaves real Megatron-core training bitwise unchanged.

Each rank trains the same tiny GPT twice from the same seed, once on plain
Megatron-core and once after ``megatron_offload_plugin.apply()``, and compares
every loss, every parameter gradient (``main_grad``, before the optimizer step)
and every parameter after the step with ``torch.equal``.
"""

from __future__ import annotations

import pytest

from megatron_offload_plugin.testing.distributed import run_distributed
from megatron_offload_plugin.testing.equivalence import default_config_equivalence_worker

pytestmark = pytest.mark.multiprocess

LAYOUTS = {
    "pp2": (2, dict(pipeline_model_parallel_size=2)),
    "pp4": (4, dict(pipeline_model_parallel_size=4)),
    "pp2_vpp2": (2, dict(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1)),
    "tp2_pp2": (4, dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)),
    "dp2_pp2": (4, dict(pipeline_model_parallel_size=2)),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_default_config_is_bitwise_identical_to_plain_megatron(layout, tiny_gpt):
    world, parallel = LAYOUTS[layout]
    recipe = dict(tiny_gpt, global_batch_size=8, **parallel)
    reports = run_distributed(default_config_equivalence_worker, world, recipe, 2, timeout_s=300)
    for report in reports:
        assert report["num_grads_compared"] > 0
        assert report["bitwise_equal"], f"{layout} rank {report['rank']}: {report['mismatched']}"
    last = reports[-1]
    assert all(loss is not None for loss in last["losses"])  # the last stage saw the losses
    assert last["losses"] == last["reference_losses"]
