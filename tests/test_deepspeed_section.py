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


# ---------------------------------------------------------------- input checks (issue 11: 5, 6, 8)


@pytest.mark.parametrize("data,message", [
    ({"optimizer_states": {"prefetch_layers": "2"}},
     "layerwise_offload.optimizer_states.prefetch_layers='2': Input should be a valid integer"),
    ({"optimizer_states": {"prefetch_layers": True}},
     "layerwise_offload.optimizer_states.prefetch_layers=True: Input should be a valid integer"),
    ({"optimizer_states": {"overlap_with_backward": "yes"}},
     "layerwise_offload.optimizer_states.overlap_with_backward='yes': Input should be a valid boolean"),
    ({"activations": {"min_tensor_bytes": 1.0}},
     "layerwise_offload.activations.min_tensor_bytes=1.0: Input should be a valid integer"),
    ({"activations": {"prefetch_layers": "0"}},
     "layerwise_offload.activations.prefetch_layers='0': Input should be a valid integer"),
])
def test_values_of_the_wrong_type_are_refused_not_coerced(data, message):
    with pytest.raises(ValueError) as err:
        parse_section(data)
    assert message in str(err.value)


def test_unknown_key_without_a_close_match_lists_the_accepted_keys_after_a_semicolon():
    with pytest.raises(ValueError) as err:
        parse_section({"optimizer_states": {"zzz": 1}})
    assert str(err.value) == ("layerwise_offload.optimizer_states.zzz: unknown key; accepted: device, nvme_path, "
                              "prefetch_layers, overlap_with_backward")


def test_fp16_enabled_auto_is_refused_with_layerwise_optimizer_states():
    section = parse_section({"optimizer_states": {"device": "cpu"}})
    with pytest.raises(ValueError) as err:
        check_conflicts(section, {"fp16": {"enabled": "auto"}})
    assert str(err.value).startswith("fp16.enabled='auto': unresolved")
    assert "set fp16.enabled to true or false" in str(err.value)


def test_fp16_enabled_is_read_as_deepspeed_reads_it():
    section = parse_section({"optimizer_states": {"device": "cpu"}})
    with pytest.raises(ValueError, match="fp16.enabled=true is not supported yet"):
        check_conflicts(section, {"fp16": {"enabled": "true"}})  # DeepSpeed's lax config turns this into True
    check_conflicts(section, {"fp16": {"enabled": False}, "bf16": {"enabled": "auto"}})  # bf16: no check depends on it
    check_conflicts(parse_section({}), {"fp16": {"enabled": "auto"}})  # section off: nothing depends on it


def test_zero_stage_auto_is_refused_naming_the_key():
    section = parse_section({"optimizer_states": {"device": "cpu"}})
    with pytest.raises(ValueError) as err:
        check_conflicts(section, {"zero_optimization": {"stage": "auto"}})
    assert str(err.value).startswith("zero_optimization.stage='auto': unresolved")


@pytest.mark.parametrize("aio,message", [
    ({"block_size": 1000}, "layerwise_offload.aio.block_size=1000: not a multiple of 512"),
    ({"block_size": 0}, "layerwise_offload.aio.block_size=0: expected a positive integer"),
    ({"queue_depth": 0}, "layerwise_offload.aio.queue_depth=0: expected a positive integer"),
    ({"queue_depth": -3}, "layerwise_offload.aio.queue_depth=-3: expected a positive integer"),
    ({"queue_depth": 100000}, "layerwise_offload.aio.queue_depth=100000: "),
])
def test_aio_values_the_kernel_or_odirect_refuse_fail_at_config_time(aio, message, monkeypatch, tmp_path):
    max_nr = tmp_path / "aio-max-nr"
    max_nr.write_text("65536\n")
    monkeypatch.setattr(section_config, "AIO_MAX_NR_PATH", max_nr)
    with pytest.raises(ValueError) as err:
        parse_section({"optimizer_states": {"device": "nvme", "nvme_path": str(tmp_path)}, "aio": aio})
    assert message in str(err.value)
    if "queue_depth" in aio and aio["queue_depth"] > 0:
        assert "fs.aio-max-nr=65536" in str(err.value) and str(max_nr) in str(err.value)


def test_aio_queue_depth_bound_counts_every_handle_and_thread(monkeypatch, tmp_path):
    max_nr = tmp_path / "aio-max-nr"
    max_nr.write_text("1024\n")
    monkeypatch.setattr(section_config, "AIO_MAX_NR_PATH", max_nr)
    nvme = {"device": "nvme", "nvme_path": str(tmp_path)}
    # one tier: 2 handles (read, write) x 2 threads x 256 events = 1024, exactly the limit
    parse_section({"optimizer_states": nvme, "aio": {"queue_depth": 256, "intra_op_parallelism": 2}})
    # both tiers on NVMe: two swappers, 2048 events
    with pytest.raises(ValueError) as err:
        parse_section({"optimizer_states": nvme, "activations": nvme,
                       "aio": {"queue_depth": 256, "intra_op_parallelism": 2}})
    assert "2048 events" in str(err.value) and "queue_depth at most 128" in str(err.value)


def test_aio_queue_depth_is_not_bounded_where_the_kernel_limit_is_unknown(monkeypatch, tmp_path):
    monkeypatch.setattr(section_config, "AIO_MAX_NR_PATH", tmp_path / "absent")
    parse_section({"optimizer_states": {"device": "nvme", "nvme_path": str(tmp_path)}, "aio": {"queue_depth": 100000}})


def test_deepspeeds_own_aio_section_is_checked_when_it_is_the_one_used(tmp_path):
    section = parse_section({"optimizer_states": {"device": "nvme", "nvme_path": str(tmp_path)}})
    with pytest.raises(ValueError) as err:
        check_conflicts(section, {"aio": {"block_size": 1000}})
    assert str(err.value).startswith("aio.block_size=1000: not a multiple of 512")
    assert "DeepSpeed's top-level 'aio' section" in str(err.value)
    # a section of its own takes precedence: DeepSpeed's is then not used, nor checked
    own = parse_section({"optimizer_states": {"device": "nvme", "nvme_path": str(tmp_path)}, "aio": {}})
    check_conflicts(own, {"aio": {"block_size": 1000}})
    check_conflicts(parse_section({"optimizer_states": {"device": "cpu"}}), {"aio": {"block_size": 1000}})
