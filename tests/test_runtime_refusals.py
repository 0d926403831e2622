"""Configurations a plugin schedule cannot honour fail at the first call, naming the fix."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import megatron_offload_plugin as mop
from megatron_offload_plugin.runtime.forward_backward import (
    _check_no_transformer_engine_linears,
    _check_v_model,
)
from megatron_offload_plugin.runtime.plugin_runtime import schedule_programs


def test_transformer_engine_layers_are_refused_by_split_schedules():
    FakeTE = type("Linear", (torch.nn.Module,), {"__module__": "transformer_engine.pytorch.module.linear"})
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), FakeTE())
    with pytest.raises(NotImplementedError, match="Transformer Engine layers .*local layer spec"):
        _check_no_transformer_engine_linears("zb-h1", [model])
    _check_no_transformer_engine_linears("zb-h1", [torch.nn.Sequential(torch.nn.Linear(2, 2))])


@pytest.mark.parametrize("name", ["zb-h1", "zb-h2", "zb-v", "v-half", "v-min", "auto"])
def test_transformer_engine_refusal_names_megatron_lm_flag_and_te_deferral(name, monkeypatch):
    """Megatron-LM defaults to --transformer-impl transformer_engine: the refusal names the flag to pass."""
    monkeypatch.setitem(sys.modules, "transformer_engine", types.SimpleNamespace(__version__="2.8.0"))
    FakeTE = type("TELinear", (torch.nn.Module,), {"__module__": "megatron.core.extensions.transformer_engine"})
    with pytest.raises(NotImplementedError) as err:
        _check_no_transformer_engine_linears(name, [torch.nn.Sequential(FakeTE())])
    message = str(err.value)
    assert message.startswith(f"--pipeline-schedule {name} splits each linear's backward into B and W")
    assert "pass --transformer-impl local (its default is transformer_engine)" in message
    assert "Transformer Engine 2.8.0 is installed here" in message and "delay_wgrad_compute" in message


def test_v_schedules_refuse_tied_embeddings():
    model = torch.nn.Module()
    model.share_embeddings_and_output_weights = True
    with pytest.raises(NotImplementedError, match="--untie-embeddings-and-output-weights"):
        _check_v_model("zb-v", [model])


@pytest.mark.parametrize(
    "name, chunks, message",
    [
        ("zb-v", 1, "two model chunks per pipeline rank"),
        ("interleaved", 1, "needs model chunks"),
        ("zb-h1", 2, "runs one model chunk per pipeline rank"),
    ],
)
def test_schedule_and_model_chunks_must_agree(name, chunks, message):
    with pytest.raises(ValueError, match=message):
        schedule_programs(name, 4, chunks, 8)


def test_too_few_microbatches_fail_before_anything_runs():
    with pytest.raises(ValueError, match="microbatches"):
        schedule_programs("interleaved", 4, 2, 3)


def test_unsupported_megatron_arguments_are_named():
    cfg = mop.apply({"schedule": {"pipeline_schedule": "1f1b"}, "telemetry": {"log_patches": False}})
    try:
        func = mop.active_runtime().forward_backward
        with pytest.raises(NotImplementedError, match="adjust_tensor_shapes_fn"):
            func(forward_step_func=None, data_iterator=None, model=None, num_microbatches=1, seq_length=1,
                 micro_batch_size=1, adjust_tensor_shapes_fn=lambda *a: a)
    finally:
        mop.revert()
    assert cfg.schedule.pipeline_schedule == "1f1b"


def _config(**overrides):
    from types import SimpleNamespace

    base = dict(variable_seq_lengths=False, defer_embedding_wgrad_compute=False,
                num_microbatches_with_partial_activation_checkpoints=None, mtp_num_layers=None)
    return SimpleNamespace(**{**base, **overrides})


@pytest.mark.parametrize(
    "option, value, flag",
    [
        ("variable_seq_lengths", True, "--variable-seq-lengths"),
        ("defer_embedding_wgrad_compute", True, "--defer-embedding-wgrad-compute"),
        ("num_microbatches_with_partial_activation_checkpoints", 2,
         "--num-microbatches-with-partial-activation-checkpoints"),
        ("mtp_num_layers", 1, "--mtp-num-layers"),
    ],
)
def test_megatron_options_the_runtime_does_not_honour_fail_at_the_first_step(option, value, flag):
    """Before, these were ignored: e.g. the output layer's deferred weight gradient was never
    drained (Megatron's own schedules call finish_embedding_wgrad_compute)."""
    from megatron_offload_plugin.runtime.executor import _refuse_unsupported

    _refuse_unsupported(_config())
    with pytest.raises(NotImplementedError, match=flag) as err:
        _refuse_unsupported(_config(**{option: value}))
    assert "--pipeline-schedule megatron" in str(err.value)


def test_microbatch_group_size_is_honoured_by_interleaved_and_refused_elsewhere():
    from types import SimpleNamespace

    from megatron_offload_plugin.runtime.forward_backward import _microbatch_group_size

    assert _microbatch_group_size(SimpleNamespace(microbatch_group_size_per_vp_stage=4), 2, 2) == 4
    assert _microbatch_group_size(SimpleNamespace(microbatch_group_size_per_vp_stage=2), 2, 2) is None
    assert _microbatch_group_size(SimpleNamespace(microbatch_group_size_per_vp_stage=4), 2, 1) is None
    with pytest.raises(NotImplementedError, match="--microbatch-group-size-per-virtual-pipeline-stage=4"):
        schedule_programs("zb-v", 2, 2, 8, microbatch_group_size=4)
    placement, programs = schedule_programs("interleaved", 2, 2, 8, microbatch_group_size=4)
    first_chunk1 = next(i for i, a in enumerate(programs[0]) if a.chunk == 1)
    assert [a.microbatch for a in programs[0][:first_chunk1]] == [0, 1, 2, 3]  # a group of 4 through chunk 0
