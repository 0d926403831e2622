"""Checkpoints record the "layerwise_offload" section; a ZeRO-1/2 load across the change is refused clearly.

Without the guard such a load failed inside DeepSpeed with "The ZeRO checkpoint
parameter-alignment layout does not match the current
zero_optimization.parameter_alignment setting", after the module weights were
already loaded.  Real DeepSpeed engines on its CPU accelerator (gloo, one rank).
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

import deepspeed
from megatron_offload_plugin import deepspeed as mds
from megatron_offload_plugin.deepspeed.checkpoint_guard import RECORD_NAME, CheckpointLayoutError
from megatron_offload_plugin.deepspeed.tiny import GPTShape, batches, build, ds_config, train
from megatron_offload_plugin.offload.nvme import aio_available

AIO_OK, AIO_WHY = aio_available()
SHAPE = GPTShape(vocab=64, hidden=32, layers=3, heads=4, seq=16)
CPU = {"optimizer_states": {"device": "cpu"}}
OFF = {"optimizer_states": {"device": "none"}}  # a section that is there but does nothing: "without"


def _nvme(tmp_path):
    return {"optimizer_states": {"device": "nvme", "nvme_path": str(tmp_path)}}


def _saved(tmp_path, cfg, *, steps=2, initialize=None, tag="t"):
    """An engine trained ``steps`` steps and saved under tmp_path/ckpt/<tag>; its data stream continues."""
    engine = build(SHAPE, cfg, initialize=initialize)
    data = batches(SHAPE, 2)
    train(engine, steps, data)
    engine.save_checkpoint(str(tmp_path / "ckpt"), tag=tag)
    return engine, data


def _weights(engine):
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _resumed_losses(engine, cfg_steps_done=2):
    data = batches(SHAPE, 2)
    for _ in range(cfg_steps_done * engine.gradient_accumulation_steps()):
        data()
    return train(engine, 2, data)


@pytest.mark.parametrize("stage", [2, 1])
@pytest.mark.parametrize("saved_with,loaded_with", [(CPU, None), (None, CPU), (CPU, OFF)],
                         ids=["with->without", "without->with", "with->disabled"])
def test_zero12_load_across_the_section_is_refused_before_anything_loads(tmp_path, stage, saved_with, loaded_with):
    _saved(tmp_path, ds_config(stage=stage, section=saved_with))
    fresh = build(SHAPE, ds_config(stage=stage, section=loaded_with), seed=123)
    before = _weights(fresh)
    with pytest.raises(CheckpointLayoutError) as err:
        fresh.load_checkpoint(str(tmp_path / "ckpt"), tag="t")
    msg = str(err.value)
    assert msg.startswith("layerwise_offload: checkpoint ")
    assert "parameter-alignment" not in msg and "parameter_alignment" not in msg
    if saved_with is CPU:
        assert ("was saved with the 'layerwise_offload' section (optimizer_states.device='cpu') "
                f"at ZeRO stage {stage}") in msg
        assert f"this engine runs without 'layerwise_offload' optimizer_states at ZeRO stage {stage}" in msg
        assert "add the section back" in msg
    else:
        assert f"was saved without 'layerwise_offload' optimizer_states at ZeRO stage {stage}" in msg
        assert "this engine runs with the 'layerwise_offload' section (optimizer_states.device='cpu')" in msg
        assert "remove the 'layerwise_offload' section or set layerwise_offload.optimizer_states.device='none'" in msg
    assert "load_optimizer_states=False" in msg and "load_module_only=True" in msg
    after = _weights(fresh)
    assert all(torch.equal(v, before[k]) for k, v in after.items())  # refused before the module was touched
    assert fresh.global_steps == 0


def test_refusal_names_the_section_what_it_was_saved_with_and_the_fixes(tmp_path):
    _saved(tmp_path, ds_config(stage=2, bf16=True, section=CPU))
    plain = build(SHAPE, ds_config(stage=2, bf16=True), seed=123)
    with pytest.raises(CheckpointLayoutError) as err:
        plain.load_checkpoint(str(tmp_path / "ckpt"), tag="t")
    assert str(err.value) == (
        f"layerwise_offload: checkpoint '{tmp_path / 'ckpt' / 't'}' was saved with the 'layerwise_offload' section "
        "(optimizer_states.device='cpu') at ZeRO stage 2, one optimizer parameter group per layer; this engine runs "
        "without 'layerwise_offload' optimizer_states at ZeRO stage 2, DeepSpeed's own parameter groups. ZeRO-1/2 "
        "store the optimizer states and fp32 master weights as one flat partition per parameter group, so they load "
        "only into the same grouping. To resume it, add the section back (\"layerwise_offload\": "
        "{\"optimizer_states\": {\"device\": \"cpu\"}}, or 'nvme' with nvme_path: the device does not change the "
        "layout); or, to keep the module weights (and the step count and LR scheduler) and start the optimizer states "
        "afresh from the weights, call engine.load_checkpoint(..., load_optimizer_states=False) "
        "(load_module_only=True for the weights alone)"
    )


@pytest.mark.parametrize("saved_with,loaded_with", [(CPU, None), (None, CPU)], ids=["with->without", "without->with"])
@pytest.mark.parametrize("bf16", [False, True])
def test_zero0_loads_across_the_section_and_resumes_bitwise(tmp_path, saved_with, loaded_with, bf16):
    """Stage 0 keeps DeepSpeed's groups with the section: the checkpoint's layout is the same, nothing to refuse."""
    engine, data = _saved(tmp_path, ds_config(stage=0, bf16=bf16, section=saved_with))
    expected = train(engine, 2, data)
    weights = _weights(engine)
    resumed = build(SHAPE, ds_config(stage=0, bf16=bf16, section=loaded_with), seed=123)
    path, _ = resumed.load_checkpoint(str(tmp_path / "ckpt"), tag="t")
    assert path is not None
    assert _resumed_losses(resumed) == expected
    assert all(torch.equal(v, weights[k]) for k, v in resumed.module.state_dict().items())


@pytest.mark.parametrize("stage,saved_with,loaded_with", [
    (2, None, None),
    (2, OFF, None),
    pytest.param(2, CPU, "nvme", marks=pytest.mark.skipif(not AIO_OK, reason=AIO_WHY)),
    pytest.param(1, "nvme", CPU, marks=pytest.mark.skipif(not AIO_OK, reason=AIO_WHY)),
], ids=["plain->plain", "disabled->plain", "cpu->nvme", "nvme->cpu"])
def test_matching_layouts_load_and_resume_bitwise(tmp_path, stage, saved_with, loaded_with):
    """The store's device is no mismatch: 'cpu' and 'nvme' write the same states; no section == disabled section."""
    def section(s):
        return _nvme(tmp_path) if s == "nvme" else s

    engine, data = _saved(tmp_path, ds_config(stage=stage, bf16=True, section=section(saved_with)))
    expected = train(engine, 2, data)
    weights = _weights(engine)
    resumed = build(SHAPE, ds_config(stage=stage, bf16=True, section=section(loaded_with)), seed=123)
    path, _ = resumed.load_checkpoint(str(tmp_path / "ckpt"), tag="t")
    assert path is not None
    assert _resumed_losses(resumed) == expected
    assert all(torch.equal(v, weights[k]) for k, v in resumed.module.state_dict().items())


def test_plain_deepspeed_checkpoint_has_no_record_and_loads_into_a_plain_engine_bitwise(tmp_path):
    assert not mds.is_enabled()
    engine, data = _saved(tmp_path, ds_config(stage=2, bf16=True), initialize=deepspeed.initialize)  # no plugin
    assert not (tmp_path / "ckpt" / "t" / RECORD_NAME).exists()
    expected = train(engine, 2, data)
    weights = _weights(engine)
    resumed = build(SHAPE, ds_config(stage=2, bf16=True), seed=123)  # the plugin's initialize, guarded
    path, _ = resumed.load_checkpoint(str(tmp_path / "ckpt"), tag="t")
    assert path is not None
    assert _resumed_losses(resumed) == expected
    assert all(torch.equal(v, weights[k]) for k, v in resumed.module.state_dict().items())


def test_plain_deepspeed_checkpoint_counts_as_saved_without_the_section(tmp_path):
    _saved(tmp_path, ds_config(stage=2), initialize=deepspeed.initialize)
    with_section = build(SHAPE, ds_config(stage=2, section=CPU), seed=123)
    with pytest.raises(CheckpointLayoutError, match=(
            r"was saved without the 'layerwise_offload' section \(it has no layerwise_offload.json\) at ZeRO, "
            r"DeepSpeed's own parameter groups; this engine runs with the 'layerwise_offload' section")):
        with_section.load_checkpoint(str(tmp_path / "ckpt"), tag="t")


@pytest.mark.parametrize("how", [{"load_optimizer_states": False}, {"load_module_only": True}])
@pytest.mark.parametrize("saved_with,loaded_with", [(CPU, None), (None, CPU)], ids=["with->without", "without->with"])
def test_module_weights_load_across_the_section_at_zero2(tmp_path, how, saved_with, loaded_with):
    """What the refusal offers works: the weights come over exactly, the optimizer starts afresh from them."""
    engine, _ = _saved(tmp_path, ds_config(stage=2, section=saved_with))
    weights = _weights(engine)
    fresh = build(SHAPE, ds_config(stage=2, section=loaded_with), seed=123)
    path, _ = fresh.load_checkpoint(str(tmp_path / "ckpt"), tag="t", **how)
    assert path is not None
    assert all(torch.equal(v, weights[k]) for k, v in fresh.module.state_dict().items())
    assert fresh.global_steps == (0 if how.get("load_module_only") else engine.global_steps)
    opt = mds.layerwise_optimizer(fresh)
    with opt.master_weights_resident(writes=False) if opt is not None else contextlib.nullcontext():
        zero = fresh.optimizer  # the masters were refreshed from the loaded weights (an fp32 run: exactly)
        for master, params in zip(zero.single_partition_of_fp32_groups, zero.bit16_groups, strict=True):
            flat = torch.cat([p.detach().flatten() for p in params])
            assert torch.equal(master.detach()[:flat.numel()], flat)
    losses = train(fresh, 1, batches(SHAPE, 2))
    assert all(torch.isfinite(torch.tensor(losses)))


def test_latest_and_default_tags_are_resolved_as_deepspeed_does(tmp_path):
    engine = build(SHAPE, ds_config(stage=2, section=CPU))
    train(engine, 1, batches(SHAPE, 2))
    engine.save_checkpoint(str(tmp_path / "ckpt"))  # tag: global_step1, and 'latest' names it
    record = json.loads((tmp_path / "ckpt" / "global_step1" / RECORD_NAME).read_text())
    assert record == {"format": 1, "layerwise_offload": {"optimizer_states": {"device": "cpu"},
                                                         "activations": {"device": "none"}},
                      "zero_stage": 2, "zero_param_groups": "per_layer"}
    assert (tmp_path / "ckpt" / "latest").read_text() == "global_step1"
    with pytest.raises(CheckpointLayoutError, match="global_step1"):
        build(SHAPE, ds_config(stage=2), seed=123).load_checkpoint(str(tmp_path / "ckpt"))
    path, _ = build(SHAPE, ds_config(stage=2, section=CPU), seed=123).load_checkpoint(str(tmp_path / "ckpt"))
    assert path is not None
    # no 'latest' at all: DeepSpeed's own answer (a warning, nothing loaded)
    assert build(SHAPE, ds_config(stage=2)).load_checkpoint(str(tmp_path / "empty")) == (None, None)


def test_stage0_record_has_no_zero_partitions(tmp_path):
    _saved(tmp_path, ds_config(stage=0, section=CPU))
    record = json.loads((tmp_path / "ckpt" / "t" / RECORD_NAME).read_text())
    assert record["zero_stage"] == 0 and record["zero_param_groups"] is None


def test_enabled_plain_deepspeed_initialize_without_the_section_is_guarded(tmp_path):
    _saved(tmp_path, ds_config(stage=2, section=CPU))
    try:
        mds.enable()
        plain = build(SHAPE, ds_config(stage=2), seed=123, initialize=deepspeed.initialize)
    finally:
        mds.disable()
    with pytest.raises(CheckpointLayoutError, match="layerwise_offload"):
        plain.load_checkpoint(str(tmp_path / "ckpt"), tag="t")


def test_check_whole_vetoes_a_save_before_anything_is_written(tmp_path):
    """A stand-in for the optimizer's check_whole() (set on the real optimizer instance); the guard asks it
    before DeepSpeed writes any file, so a veto leaves no half-written tag folder."""
    engine = build(SHAPE, ds_config(stage=2, section=CPU))
    train(engine, 1, batches(SHAPE, 2))
    opt = mds.layerwise_optimizer(engine)
    calls = []

    def whole():
        calls.append(1)

    def not_whole():
        raise RuntimeError("layerwise_offload: layer 2's states are in flight")

    opt.check_whole = whole
    engine.save_checkpoint(str(tmp_path / "ok"), tag="t")
    assert calls and (tmp_path / "ok" / "t" / RECORD_NAME).exists()  # the optimizer's state_dict may ask too
    opt.check_whole = not_whole
    with pytest.raises(RuntimeError, match="in flight"):
        engine.save_checkpoint(str(tmp_path / "vetoed"), tag="t")
    assert not (tmp_path / "vetoed" / "t").exists() and not (tmp_path / "vetoed" / "latest").exists()


def test_an_unreadable_record_is_refused_naming_the_file(tmp_path):
    _saved(tmp_path, ds_config(stage=2, section=CPU))
    (tmp_path / "ckpt" / "t" / RECORD_NAME).write_text("{not json")
    with pytest.raises(CheckpointLayoutError, match=r"layerwise_offload.json: unreadable layerwise_offload checkpoint"):
        build(SHAPE, ds_config(stage=2, section=CPU), seed=123).load_checkpoint(str(tmp_path / "ckpt"), tag="t")
