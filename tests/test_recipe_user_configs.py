"""The GPT recipe builds what Megatron-LM users run: bf16, overlapped DDP, the distributed
optimizer with overlapped param gather, and TP with sequence parallelism.

Flags and validation follow Megatron-LM's ``arguments.py``; the model, DDP, optimizer and the
config hooks follow its ``training.py`` (``get_model``, ``train``).  Each configuration then
trains at PP=2: plain Megatron-core and ``apply({})`` bitwise equal, losses finite and falling,
parameters changed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_offload_plugin.integrations.megatron.recipe import GPTRecipe, add_megatron_arguments, recipe_from_args
from megatron_offload_plugin.testing.distributed import free_port, run_distributed
from megatron_offload_plugin.testing.equivalence import (
    default_config_equivalence_worker,
    describe_build_worker,
    recipe_variants_worker,
    runtime_equivalence_worker,
)

BF16 = dict(bf16=True)
OVERLAP_DISTOPT = dict(overlap_grad_reduce=True, use_distributed_optimizer=True, overlap_param_gather=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_megatron_arguments(parser)
    return parser


def test_megatron_flag_list_is_pinned():
    """A new Megatron-LM flag is a deliberate change: update this list together with the field."""
    flags = [opt for action in _parser()._actions for opt in action.option_strings if opt not in ("-h", "--help")]
    assert flags == [
        "--num-layers", "--hidden-size", "--num-attention-heads", "--ffn-hidden-size", "--seq-length",
        "--max-position-embeddings", "--hidden-dropout", "--attention-dropout",
        "--untie-embeddings-and-output-weights", "--make-vocab-size-divisible-by", "--vocab-size",
        "--micro-batch-size", "--global-batch-size", "--train-iters", "--lr", "--min-lr", "--lr-warmup-iters",
        "--lr-decay-style", "--weight-decay", "--adam-beta1", "--adam-beta2", "--clip-grad",
        "--calculate-per-token-loss", "--seed", "--log-interval",
        "--bf16", "--accumulate-allreduce-grads-in-fp32", "--grad-reduce-in-bf16", "--attention-softmax-in-fp32",
        "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--context-parallel-size",
        "--sequence-parallel", "--overlap-grad-reduce", "--use-distributed-optimizer", "--overlap-param-gather",
        "--ddp-bucket-size", "--num-layers-per-virtual-pipeline-stage", "--no-overlap-p2p-communication",
        "--recompute-granularity", "--recompute-method", "--recompute-num-layers",
        "--data-path", "--mock-data",
    ]


def test_every_recipe_field_comes_from_its_megatron_flag():
    assert recipe_from_args(_parser().parse_args([])) == GPTRecipe()
    args = _parser().parse_args([
        "--bf16", "--overlap-grad-reduce", "--use-distributed-optimizer", "--overlap-param-gather",
        "--sequence-parallel", "--tensor-model-parallel-size", "2", "--context-parallel-size", "1",
        "--ddp-bucket-size", "1000", "--grad-reduce-in-bf16", "--accumulate-allreduce-grads-in-fp32",
        "--attention-softmax-in-fp32",
    ])
    r = recipe_from_args(args)
    assert (r.bf16, r.overlap_grad_reduce, r.use_distributed_optimizer, r.overlap_param_gather) == (True,) * 4
    assert (r.sequence_parallel, r.tensor_model_parallel_size, r.context_parallel_size) == (True, 2, 1)
    assert (r.ddp_bucket_size, r.grad_reduce_in_bf16, r.accumulate_allreduce_grads_in_fp32) == (1000, True, True)
    assert r.attention_softmax_in_fp32


@pytest.mark.parametrize(
    "kwargs, world, message",
    [
        (dict(overlap_param_gather=True, overlap_grad_reduce=True), 2,
         r"--overlap-param-gather needs --use-distributed-optimizer"),
        (dict(overlap_param_gather=True, use_distributed_optimizer=True), 2,
         r"--overlap-param-gather needs --overlap-grad-reduce"),
        (dict(context_parallel_size=2), 2, r"--context-parallel-size=2: .*DotProductAttention supports only "
         r"--context-parallel-size=1.*TEDotProductAttention"),
        (dict(context_parallel_size=0), 1, r"--context-parallel-size=0: must be >= 1"),
        (dict(ddp_bucket_size=0, overlap_grad_reduce=True), 1, r"--ddp-bucket-size=0: must be a positive"),
        (dict(sequence_parallel=True, tensor_model_parallel_size=2, seq_length=33, max_position_embeddings=64), 2,
         r"--seq-length=33 is not divisible by --tensor-model-parallel-size=2"),
    ],
    ids=["param-gather-without-distopt", "param-gather-without-overlap", "context-parallel-local-spec",
         "context-parallel-zero", "bucket-size-zero", "sequence-parallel-seq-length"],
)
def test_recipe_rejects_what_megatron_lm_rejects(kwargs, world, message):
    with pytest.raises(ValueError, match=message):
        GPTRecipe(**kwargs).validate(world)


def test_sequence_parallel_at_tp1_is_turned_off_like_megatron_lm(caplog):
    recipe = GPTRecipe(sequence_parallel=True)
    with caplog.at_level(logging.WARNING):
        recipe.validate(1)
    assert not recipe.sequence_parallel_enabled
    assert "--sequence-parallel is ignored at --tensor-model-parallel-size=1" in caplog.text
    assert GPTRecipe(sequence_parallel=True, tensor_model_parallel_size=2).sequence_parallel_enabled


@pytest.mark.parametrize(
    "kwargs, fp32",
    [(dict(), False), (dict(accumulate_allreduce_grads_in_fp32=True), True), (dict(bf16=True), True),
     (dict(bf16=True, grad_reduce_in_bf16=True), False)],
    ids=["fp32", "fp32-accumulate", "bf16", "bf16-grad-reduce-in-bf16"],
)
def test_bf16_reduces_grads_in_fp32_as_megatron_lm_forces(kwargs, fp32):
    assert GPTRecipe(**kwargs).grad_reduce_in_fp32 is fp32


@pytest.mark.multiprocess
def test_build_model_wires_ddp_optimizer_and_hooks_as_megatron_lm(tiny_gpt):
    """At world 4: bf16 (PP=2, DP=2), overlap + distopt + param gather without and with
    interleaving, plain fp32, and TP=2 with sequence parallelism."""
    base = dict(tiny_gpt, global_batch_size=8, pipeline_model_parallel_size=2)
    recipes = [
        dict(base, **BF16),
        dict(base, **OVERLAP_DISTOPT, ddp_bucket_size=20000),
        dict(base, **OVERLAP_DISTOPT, num_layers_per_virtual_pipeline_stage=1),
        dict(base),
        dict(base, tensor_model_parallel_size=2, global_batch_size=4, sequence_parallel=True),
    ]
    ranks = run_distributed(describe_build_worker, 4, recipes, timeout_s=300)
    first = ranks[0]  # pipeline rank 0 (bucketing is off on later stages)
    bf16, overlap, overlap_vpp, plain, sp = first

    assert bf16["wrappers"] == [["DistributedDataParallel", "Float16Module"]]
    assert bf16["param_dtypes"] == ["torch.bfloat16"] and bf16["master_dtypes"] == ["torch.float32"]
    assert bf16["grad_buffer_dtypes"] == ["torch.float32"]  # accumulate_allreduce_grads_in_fp32
    assert bf16["optimizers"] == ["Float16OptimizerWithFloat16Params"] and bf16["inner_optimizers"] == ["AdamW"]
    assert bf16["config"] == dict(bf16=True, sequence_parallel=False, attention_softmax_in_fp32=False,
                                  params_dtype="torch.bfloat16", pipeline_dtype="torch.bfloat16")
    assert bf16["ddp"]["bucket_size"] is None  # Megatron-LM: one bucket without overlap

    assert overlap["optimizers"] == ["DistributedOptimizer"]
    assert overlap["ddp"] == dict(grad_reduce_in_fp32=False, overlap_grad_reduce=True, overlap_param_gather=True,
                                  align_param_gather=False, use_distributed_optimizer=True, bucket_size=20000)
    assert overlap["buckets_per_chunk"][0] > 1 and overlap["forward_pre_hooks"][0] > 0
    assert overlap["hooks"] == dict(
        no_sync_func="DistributedDataParallel.no_sync",
        grad_sync_func="DistributedDataParallel.start_grad_sync",
        param_sync_func=None,  # Megatron-LM: only with align_param_gather, i.e. interleaving
        finalize_model_grads_func="finalize_model_grads",
        grad_scale_func="ChainedOptimizer.scale_loss",  # get_megatron_optimizer's return value
    )
    default_bucket = max(40_000_000, 1_000_000 * 2)
    assert overlap_vpp["ddp"]["bucket_size"] == default_bucket and overlap_vpp["ddp"]["align_param_gather"]
    # Chunk 0: the shared embedding in its own bucket (distributed optimizer), the rest in one;
    # chunk 1: bucketing disabled, as Megatron-LM does for every chunk after the first.
    assert overlap_vpp["buckets_per_chunk"] == [2, 1]
    assert overlap_vpp["hooks"]["no_sync_func"] == ["DistributedDataParallel.no_sync"] * 2
    assert overlap_vpp["hooks"]["grad_sync_func"] == ["DistributedDataParallel.start_grad_sync"] * 2
    assert overlap_vpp["hooks"]["param_sync_func"] == ["DistributedDataParallel.start_param_sync"] * 2

    assert plain["wrappers"] == [["DistributedDataParallel", "GPTModel"]] and plain["param_dtypes"] == ["torch.float32"]
    assert plain["optimizers"] == ["FP32Optimizer"]
    assert {k: plain["hooks"][k] for k in ("no_sync_func", "grad_sync_func", "param_sync_func")} == dict(
        no_sync_func=None, grad_sync_func=None, param_sync_func=None)  # Megatron-LM: no_sync only with overlap

    assert sp["config"]["sequence_parallel"] is True
    marked = {n.rsplit(".", 2)[-2] for n in sp["sequence_parallel_params"]}
    # The norms (ours) and the row-parallel biases (Megatron's own); stage 0 has no final norm.
    assert marked == {"input_layernorm", "pre_mlp_layernorm", "linear_proj", "linear_fc2"}
    last_sp = ranks[-1][4]
    assert any("final_layernorm" in n for n in last_sp["sequence_parallel_params"])


USER_CONFIGS = {
    "bf16-pp2": (2, dict(pipeline_model_parallel_size=2, **BF16)),
    "overlap-distopt-paramgather-dp2-pp2": (4, dict(pipeline_model_parallel_size=2, **OVERLAP_DISTOPT,
                                                    ddp_bucket_size=20000)),
    "sequence-parallel-tp2-pp2": (4, dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                          sequence_parallel=True)),
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", list(USER_CONFIGS))
def test_user_config_trains_and_default_apply_is_bitwise_identical(name, tiny_gpt):
    world, parallel = USER_CONFIGS[name]
    recipe = dict(tiny_gpt, global_batch_size=8, **parallel)
    reports = run_distributed(default_config_equivalence_worker, world, recipe, 2, timeout_s=300)
    for report in reports:
        assert report["num_grads_compared"] > 0
        assert report["bitwise_equal"], f"{name} rank {report['rank']}: {report['mismatched']}"
        assert report["masters_changed"] == report["num_masters"] > 0, f"{name} rank {report['rank']}"
        if name.startswith("bf16"):  # LayerNorm weights at 1.0: a 3e-4 step rounds back in bf16
            assert report["params_changed"] > report["num_params"] // 2, f"{name} rank {report['rank']}"
        else:
            assert report["params_changed"] == report["num_params"], f"{name} rank {report['rank']}"
    last = reports[-1]
    assert all(loss is not None and math.isfinite(loss) for loss in last["losses"])
    assert last["losses"][1] < last["losses"][0]
    # Replicas of one shard end bitwise equal: with the distributed optimizer each rank updated
    # only its shard, so this also shows the final param all-gather ran.
    by_shard: dict[tuple[int, int], set[str]] = {}
    for report in reports:
        by_shard.setdefault((report["coords"]["tp"], report["coords"]["pp"]), set()).add(report["param_digest"])
    assert all(len(digests) == 1 for digests in by_shard.values()), by_shard


@pytest.mark.multiprocess
def test_overlap_and_distributed_optimizer_train_bitwise_like_plain_ddp(tiny_gpt):
    """DP=2 x PP=2, several buckets: overlapped reduce, sharded optimizer and param all-gathers
    in the forward pre-hooks compute exactly what plain DDP computes, loss and parameters, over
    two steps (the second forward runs on the gathered shards). Clipping off: the sharded grad
    norm sums in another order, which moves the clip factor in the last bit."""
    base = dict(tiny_gpt, global_batch_size=8, pipeline_model_parallel_size=2, clip_grad=0.0)
    reports = run_distributed(recipe_variants_worker, 4, base, dict(base, **OVERLAP_DISTOPT, ddp_bucket_size=20000),
                              2, timeout_s=300)
    for report in reports:
        assert report["params_bitwise_equal"], report
        assert report["params_changed"] > 0
    assert reports[-1]["losses"] == reports[-1]["reference_losses"]


@pytest.mark.multiprocess
def test_sequence_parallel_steps_like_plain_tensor_parallel(tiny_gpt):
    """TP=2 x PP=2 with and without --sequence-parallel, dropout off (SP draws its dropout masks
    from the TP RNG stream): the same loss, and after one step the same parameters up to fp32
    rounding (SP sums the norms' gradients over two sequence halves, then over TP). Without the
    ``sequence_parallel`` mark on the norms each TP rank would step with its half-sum."""
    base = dict(tiny_gpt, global_batch_size=8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                hidden_dropout=0.0, attention_dropout=0.0)
    reports = run_distributed(recipe_variants_worker, 4, base, dict(base, sequence_parallel=True), 1, timeout_s=300)
    for report in reports:
        assert report["max_param_rel_diff"] < 1e-6, report
        assert report["params_changed"] > 0
    assert reports[-1]["losses"] == reports[-1]["reference_losses"]


RUNTIME_ROWS = {
    # (schedule, split, world, microbatches per DP rank, recipe options)
    "zb-h1-bf16-overlap-distopt-paramgather-dp2-pp2": (
        "zb-h1", True, 4, 4, dict(pipeline_model_parallel_size=2, **BF16, **OVERLAP_DISTOPT, ddp_bucket_size=20000)),
    "interleaved-overlap-distopt-paramgather-dp2-pp2-vpp2": (
        "interleaved", False, 4, 4, dict(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1,
                                         **OVERLAP_DISTOPT)),
    "zb-h1-sequence-parallel-tp2-pp2": (
        "zb-h1", True, 4, 4, dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, sequence_parallel=True)),
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", list(RUNTIME_ROWS))
def test_plugin_runtime_matches_megatron_on_user_configs(name, tiny_gpt):
    """runtime_equivalence_worker takes the recipe options unchanged: the plugin runtime against
    Megatron's own schedule, bitwise, with the hooks Megatron-LM installs for these options
    (grad_sync_func, per-chunk param_sync_func with interleaving, pre-hook param gathers)."""
    schedule, split, world, microbatches, parallel = RUNTIME_ROWS[name]
    dp = world // (parallel.get("tensor_model_parallel_size", 1) * parallel["pipeline_model_parallel_size"])
    recipe = dict(tiny_gpt, micro_batch_size=1, global_batch_size=microbatches * dp, **parallel)
    reports = run_distributed(runtime_equivalence_worker, world, recipe, split, 0, 2, schedule, timeout_s=300)
    for report in reports:
        assert report["num_grads_compared"] > 0
        assert report["bitwise_equal"], f"{name} rank {report['rank']}: {report['mismatched']}"


@pytest.mark.multiprocess
def test_pretrain_gpt_script_takes_the_user_flags(tmp_path):
    """The flags as users type them, through torchrun and the driver: bf16 with overlapped
    reduce, the distributed optimizer and overlapped param gather at PP=2."""
    root = Path(__file__).resolve().parents[1]
    summary = tmp_path / "summary.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(root / "scripts" / "pretrain_gpt.py"),
           "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
           "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "2",
           "--pipeline-model-parallel-size", "2", "--pipeline-schedule", "megatron",
           "--bf16", "--overlap-grad-reduce", "--use-distributed-optimizer", "--overlap-param-gather",
           "--ddp-bucket-size", "20000", "--json-summary", str(summary)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = json.loads(summary.read_text())["losses"]
    assert len(losses) == 2 and all(math.isfinite(l) for l in losses) and losses[1] < losses[0]
