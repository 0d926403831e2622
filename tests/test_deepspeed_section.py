"""The "layerwise_offload" section: strict keys, documented defaults, conflicts, initialize/enable wiring."""

from __future__ import annotations

import inspect

import pytest

import deepspeed
from megatron_offload_plugin import deepspeed as mds
from megatron_offload_plugin.deepspeed import config as section_config
from megatron_offload_plugin.deepspeed.config import check_conflicts, parse_section
from megatron_offload_plugin.deepspeed.tiny import GPTShape, build, ds_config
from megatron_offload_plugin.patches.registry import UnsupportedVersionError

SHAPE = GPTShape(vocab=64, hidden=32, layers=2, heads=4, seq=16)


def test_defaults_are_documented_in_one_place():
    d = mds.defaults()
    assert d["optimizer_states"] == {"device": "none", "nvme_path": None, "prefetch_layers": 2,
                                     "overlap_with_backward": False}
    assert d["activations"] == {"device": "none", "nvme_path": None, "min_tensor_bytes": 1048576,
                                "prefetch_layers": None, "modules": "all"}
    for model in (section_config.OptimizerStatesConfig, section_config.ActivationsConfig,
                  section_config.LayerwiseOffloadConfig):
        assert all(f.description for f in model.model_fields.values()), model


@pytest.mark.parametrize("data,message", [
    ({"optimizer_state": {}}, "layerwise_offload.optimizer_state: unknown key; did you mean 'optimizer_states'?"),
    ({"optimizer_states": {"prefetch_layer": 1}},
     "layerwise_offload.optimizer_states.prefetch_layer: unknown key; did you mean 'prefetch_layers'?"),
    ({"activations": {"min_tensor_byte": 1}},
     "layerwise_offload.activations.min_tensor_byte: unknown key; did you mean 'min_tensor_bytes'?"),
    ({"aio": {"queue_dept": 1}}, "layerwise_offload.aio.queue_dept: unknown key; did you mean 'queue_depth'?"),
])
def test_unknown_keys_fail_naming_the_closest_valid_key(data, message):
    with pytest.raises(ValueError) as err:
        parse_section(data)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("data,message", [
    ({"optimizer_states": {"device": "disk"}}, "layerwise_offload.optimizer_states.device='disk': Input should be 'none', 'cpu' or 'nvme'"),
    ({"optimizer_states": {"device": "nvme"}}, "needs optimizer_states.nvme_path"),
    ({"optimizer_states": {"device": "cpu", "nvme_path": "/x"}}, "nvme_path is only used with device='nvme'"),
    ({"optimizer_states": {"prefetch_layers": -1}}, "prefetch_layers=-1: Input should be greater than or equal to 0"),
    ({"activations": {"modules": []}}, "activations.modules"),
])
def test_bad_values_fail_naming_the_key(data, message):
    with pytest.raises(ValueError, match=None) as err:
        parse_section(data)
    assert message in str(err.value)


@pytest.mark.parametrize("extra,message", [
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
     "zero_optimization.offload_optimizer.device='cpu' both offload the optimizer states"),
    ({"zero_optimization": {"stage": 3}}, "ZeRO-3 has its own optimizer swapping"),
    ({"fp16": {"enabled": True}}, "fp16.enabled=true is not supported yet"),
    ({"zero_optimization": {"stage": 1, "elastic_checkpoint": True}}, "elastic_checkpoint"),
])
def test_conflicting_settings_fail_clearly(extra, message):
    section = parse_section({"optimizer_states": {"device": "cpu"}})
    with pytest.raises(ValueError, match=None) as err:
        check_conflicts(section, {**extra})
    assert message in str(err.value)


def test_overlap_needs_stage_0():
    section = parse_section({"optimizer_states": {"device": "cpu", "overlap_with_backward": True}})
    with pytest.raises(ValueError, match="overlap_with_backward=true needs zero_optimization.stage=0"):
        check_conflicts(section, {"zero_optimization": {"stage": 2}})


def test_activation_offload_conflicts_with_cpu_checkpointing():
    section = parse_section({"activations": {"device": "cpu"}})
    with pytest.raises(ValueError, match="cpu_checkpointing=true both move activations"):
        check_conflicts(section, {"activation_checkpointing": {"cpu_checkpointing": True}})


def test_conflict_is_raised_by_initialize():
    cfg = ds_config(stage=2, section={"optimizer_states": {"device": "cpu"}},
                    zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}})
    with pytest.raises(ValueError, match="both offload the optimizer states"):
        build(SHAPE, cfg)


def test_missing_nvme_path_fails_at_initialize_naming_it(tmp_path):
    missing = tmp_path / "no_such_dir"
    cfg = ds_config(section={"optimizer_states": {"device": "nvme", "nvme_path": str(missing)}})
    with pytest.raises(ValueError, match=f"layerwise_offload.optimizer_states.nvme_path='{missing}': directory does not exist"):
        build(SHAPE, cfg)


def test_initialize_has_deepspeeds_signature():
    ours = inspect.signature(mds.initialize)
    theirs = inspect.signature(deepspeed.initialize)
    assert list(ours.parameters) == list(theirs.parameters)
    assert [p.default for p in ours.parameters.values()] == [p.default for p in theirs.parameters.values()]


def test_initialize_returns_deepspeeds_four_tuple():
    from megatron_offload_plugin.deepspeed.tiny import TinyGPT, init_single_process_dist

    init_single_process_dist()
    result = mds.initialize(model=TinyGPT(SHAPE), config=ds_config(section={"optimizer_states": {"device": "cpu"}}))
    assert isinstance(result, tuple) and len(result) == 4
    engine, optimizer, loader, scheduler = result
    assert optimizer is engine.optimizer and loader is None and scheduler is None
    assert isinstance(engine.optimizer, mds.LayerwiseOffloadOptimizer)


def test_without_the_section_initialize_is_plain_deepspeed():
    engine = build(SHAPE, ds_config())
    assert mds.layerwise_optimizer(engine) is None
    assert not isinstance(engine.optimizer, mds.LayerwiseOffloadOptimizer)


def test_enable_makes_plain_deepspeed_initialize_honour_the_section():
    original = deepspeed.initialize
    try:
        mds.enable()
        mds.enable()  # idempotent
        assert deepspeed.initialize is not original and mds.is_enabled()
        engine = build(SHAPE, ds_config(section={"optimizer_states": {"device": "cpu"}}), initialize=deepspeed.initialize)
        assert isinstance(mds.layerwise_optimizer(engine), mds.LayerwiseOffloadOptimizer)
        assert list(inspect.signature(deepspeed.initialize).parameters) == list(inspect.signature(original).parameters)
    finally:
        mds.disable()
        mds.disable()  # idempotent
    assert deepspeed.initialize is original and not mds.is_enabled()
    engine = build(SHAPE, ds_config(section={"optimizer_states": {"device": "cpu"}}), initialize=deepspeed.initialize)
    assert mds.layerwise_optimizer(engine) is None  # reverted: DeepSpeed ignores the section again


def test_enable_refuses_an_unsupported_deepspeed(monkeypatch):
    from packaging.version import Version

    from megatron_offload_plugin.deepspeed import wiring

    monkeypatch.setattr(wiring, "installed_version", lambda dist: Version("0.14.0"))
    with pytest.raises(UnsupportedVersionError, match=r"supports deepspeed >=0.19,<0.20, installed 0.14.0"):
        mds.enable()
    assert not mds.is_enabled()


def test_activation_modules_that_match_nothing_fail_at_initialize_naming_the_pattern():
    cfg = ds_config(section={"activations": {"device": "cpu", "modules": ["blocks.*"]}})
    with pytest.raises(ValueError, match=r"layerwise_offload.activations.modules: 'blocks.\*' matches no module"):
        build(SHAPE, cfg)


@pytest.mark.parametrize("how", ["config_path", "args"])
def test_section_is_read_from_a_config_file_and_from_args(tmp_path, how):
    import argparse
    import json

    from megatron_offload_plugin.deepspeed.tiny import TinyGPT, init_single_process_dist

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds_config(section={"optimizer_states": {"device": "cpu"}})))
    init_single_process_dist()
    kwargs = {"config": str(path)} if how == "config_path" else {"args": argparse.Namespace(deepspeed_config=str(path))}
    engine, *_ = mds.initialize(model=TinyGPT(SHAPE), **kwargs)
    assert isinstance(mds.layerwise_optimizer(engine), mds.LayerwiseOffloadOptimizer)
