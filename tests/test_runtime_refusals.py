"""Configurations a plugin schedule cannot honour fail at the first call, naming the fix."""

from __future__ import annotations

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
