"""The plugin config: one validated object from flags, YAML/JSON files and a DeepSpeed section.

Every user mistake (misspelled key or flag, refused value, wrong file) fails at
once with a message naming the key, the value, what is accepted and the closest
valid spelling.
"""

from __future__ import annotations

import argparse
import json
import re

import pytest
import yaml
from pydantic import BaseModel, Field, ValidationError

from megatron_offload_plugin.config import (
    ActivationOffloadConfig,
    PluginArgumentParser,
    PluginConfig,
    ScheduleConfig,
    TelemetryConfig,
    add_plugin_arguments,
    config_from_args,
    config_from_deepspeed,
    config_from_mapping,
    iter_options,
    load_config_file,
    plugin_flags,
    split_plugin_argv,
    to_flags,
    to_mapping,
)
from megatron_offload_plugin.config import model as config_model

NON_DEFAULT = {
    "schedule": {"pipeline_schedule": "1f1b", "pipeline_trace_dir": "traces"},
    "telemetry": {"activation_memory": "off", "log_patches": False},
}
NON_DEFAULT_FLAGS = [
    "--pipeline-schedule", "1f1b",
    "--pipeline-trace", "traces",
    "--activation-memory-tracker", "off",
    "--no-offload-plugin-log-patches",
]
NON_DEFAULT_YAML = """\
schedule:
  pipeline_schedule: 1f1b
  pipeline_trace_dir: traces
telemetry:
  activation_memory: off   # YAML 1.1 would read this as false
  log_patches: false
"""


def _parser() -> PluginArgumentParser:
    parser = PluginArgumentParser(prog="pretrain_gpt.py")
    parser.add_argument("--num-layers", type=int)
    return add_plugin_arguments(parser)


def _parse(argv: list[str]) -> PluginConfig:
    return config_from_args(_parser().parse_args(argv))


def _error(data: object, source: str = "run.yaml") -> str:
    with pytest.raises(ValueError) as err:
        config_from_mapping(data, source=source)  # type: ignore[arg-type]
    return str(err.value)


# ---------------------------------------------------------------- the option table


def test_flag_list_is_pinned():
    """A new flag is a deliberate change: update this list together with the field."""
    assert list(plugin_flags()) == [
        "--offload-plugin-config",
        "--pipeline-schedule",
        "--pipeline-trace",
        "--pipeline-memory-limit",
        "--auto-replan-after",
        "--activation-offload",
        "--offload-fraction",
        "--offload-chunks",
        "--offload-min-tensor-bytes",
        "--offload-host-pool-bytes",
        "--offload-nvme-path",
        "--offload-reload-lead",
        "--checkpoint-offload",
        "--no-checkpoint-offload",
        "--activation-memory-tracker",
        "--offload-plugin-log-patches",
        "--no-offload-plugin-log-patches",
    ]


def test_file_keys_are_pinned():
    """File and DeepSpeed keys are public too: renaming one breaks users' configs."""
    assert [opt.dotted for opt in iter_options()] == [
        "schedule.pipeline_schedule",
        "schedule.pipeline_trace_dir",
        "schedule.auto_memory_limit",
        "schedule.auto_replan_after",
        "activation_offload.mode",
        "activation_offload.fraction",
        "activation_offload.chunks",
        "activation_offload.min_tensor_bytes",
        "activation_offload.host_pool_bytes",
        "activation_offload.nvme_path",
        "activation_offload.reload_lead",
        "activation_offload.checkpoint_offload",
        "telemetry.activation_memory",
        "telemetry.log_patches",
    ]


def test_every_option_has_help_text_and_a_dashed_flag():
    for opt in iter_options():
        assert opt.help.strip(), opt.dotted
        assert re.fullmatch(r"--[a-z0-9]+(-[a-z0-9]+)*", opt.flag), opt.flag


def test_every_model_forbids_unknown_keys_and_is_frozen():
    for model in (PluginConfig, ScheduleConfig, ActivationOffloadConfig, TelemetryConfig):
        assert model.model_config.get("extra") == "forbid", model.__name__
        assert model.model_config.get("frozen") is True, model.__name__


def test_field_without_flag_is_a_programming_error():
    class Section(BaseModel):
        knob: int = Field(1, description="A knob.")

    with pytest.raises(TypeError, match=r"Section\.knob: json_schema_extra\['flag'\] must be a dashed flag"):
        config_model._option("section", Section, "knob", Section.model_fields["knob"])


def test_field_without_description_is_a_programming_error():
    class Section(BaseModel):
        knob: int = Field(1, json_schema_extra={"flag": "--knob"})

    with pytest.raises(TypeError, match=r"Section\.knob: add description="):
        config_model._option("section", Section, "knob", Section.model_fields["knob"])


def test_choices_come_from_the_literal():
    by_key = {opt.dotted: opt for opt in iter_options()}
    assert by_key["telemetry.activation_memory"].choices == ("auto", "saved-tensors", "cuda", "off")
    assert by_key["telemetry.log_patches"].is_bool and by_key["telemetry.log_patches"].choices is None


def test_default_config_is_default_and_a_changed_one_is_not():
    assert PluginConfig().is_default()
    assert not config_from_mapping({"telemetry": {"log_patches": False}}, source="t").is_default()


def test_config_is_immutable():
    cfg = PluginConfig()
    with pytest.raises(ValidationError):
        cfg.telemetry.log_patches = False  # type: ignore[misc]


# ---------------------------------------------------------------- mapping errors


def test_unknown_top_level_key_names_source_closest_key_and_accepted_keys():
    assert _error({"activaton_offload": {}}) == (
        "offload-plugin config (run.yaml): unknown key 'activaton_offload'; did you mean 'activation_offload'? "
        "accepted: activation_offload, schedule, telemetry"
    )


def test_unknown_nested_key_names_the_dotted_key_and_closest_field():
    message = _error({"telemetry": {"activation_memmory": "off"}})
    assert message == (
        "offload-plugin config (run.yaml): unknown key 'telemetry.activation_memmory'; "
        "did you mean 'activation_memory'? accepted: activation_memory, log_patches"
    )


def test_unknown_key_without_a_close_match_still_lists_accepted_keys():
    assert _error({"optimizer": {}}).endswith(
        "unknown key 'optimizer'; accepted: activation_offload, schedule, telemetry"
    )


def test_invalid_choice_names_dotted_key_value_and_accepted_values():
    message = _error({"schedule": {"pipeline_schedule": "gpipe"}})
    assert message.startswith(
        "offload-plugin config (run.yaml): schedule.pipeline_schedule='gpipe': not accepted; accepted: 'megatron'"
    )


def test_invalid_choice_close_to_a_valid_one_suggests_it():
    assert "telemetry.activation_memory='saved-tensor': not accepted; did you mean 'saved-tensors'? accepted: " \
        "'auto', 'saved-tensors', 'cuda', 'off'" in _error({"telemetry": {"activation_memory": "saved-tensor"}})


def test_invalid_bool_says_true_or_false():
    assert "telemetry.log_patches='maybe': not accepted; accepted: true or false" in _error(
        {"telemetry": {"log_patches": "maybe"}}
    )


def test_invalid_value_hides_pydantic_but_keeps_it_as_cause():
    with pytest.raises(ValueError) as err:
        config_from_mapping({"schedule": {"pipeline_schedule": "zbv"}}, source="t")
    assert isinstance(err.value.__cause__, ValidationError)
    assert "pydantic" not in str(err.value) and "\n" not in str(err.value)


def test_value_errors_can_name_the_flag_instead_of_the_key():
    with pytest.raises(ValueError, match=r"\(command line\): --pipeline-schedule='zbv': not accepted"):
        config_from_mapping(
            {"schedule": {"pipeline_schedule": "zbv"}},
            source="command line", key_names={"schedule.pipeline_schedule": "--pipeline-schedule"},
        )


def test_section_must_be_a_mapping():
    assert "'schedule' must be a mapping of options (pipeline_schedule, pipeline_trace_dir, auto_memory_limit, auto_replan_after), got 'megatron'" in _error(
        {"schedule": "megatron"}
    )


def test_top_level_must_be_a_mapping():
    assert "expected a mapping of sections (schedule, activation_offload, telemetry), got list" in _error([1])


def test_empty_section_header_means_defaults():
    assert config_from_mapping({"telemetry": None}, source="t").is_default()


# ---------------------------------------------------------------- files


def test_bad_file_suffix_names_the_path_and_accepted_suffixes(tmp_path):
    path = tmp_path / "plugin.toml"
    path.write_text("")
    with pytest.raises(ValueError) as err:
        load_config_file(path)
    assert str(path) in str(err.value) and "unknown file type; accepted: .yaml, .yml, .json" in str(err.value)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "missing.yaml"
    with pytest.raises(ValueError) as err:
        load_config_file(path)
    assert f"'{path}': file not found; expected an existing .yaml, .yml or .json file" in str(err.value)


def test_directory_is_not_a_config_file(tmp_path):
    folder = tmp_path / "plugin.yaml"
    folder.mkdir()
    with pytest.raises(ValueError, match="not a file"):
        load_config_file(folder)


def test_unparsable_file_names_the_path(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json': cannot parse"):
        load_config_file(path)


def test_file_errors_name_the_file_as_source(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("activaton_offload: {}\n")
    with pytest.raises(ValueError, match=rf"offload-plugin config \({re.escape(str(path))}\): unknown key"):
        load_config_file(path)


@pytest.mark.parametrize(
    "name, text",
    [
        ("dup.yaml", "telemetry:\n  log_patches: true\n  log_patches: false\n"),
        ("dup.json", '{"telemetry": {"log_patches": true, "log_patches": false}}'),
    ],
)
def test_duplicate_keys_in_a_file_are_refused(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match="duplicate key 'log_patches'"):
        load_config_file(path)


def test_yaml_reads_off_and_no_as_strings_not_booleans(tmp_path):
    path = tmp_path / "plugin.yml"
    path.write_text("telemetry:\n  activation_memory: off\n")
    assert load_config_file(path).telemetry.activation_memory == "off"


def test_empty_yaml_file_is_the_default_config(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert load_config_file(path).is_default()


def test_suffix_is_case_insensitive(tmp_path):
    path = tmp_path / "PLUGIN.JSON"
    path.write_text(json.dumps(NON_DEFAULT))
    assert load_config_file(path) == config_from_mapping(NON_DEFAULT, source="t")


# ---------------------------------------------------------------- DeepSpeed


def test_deepspeed_without_the_section_is_the_default():
    assert config_from_deepspeed({"train_batch_size": 8, "zero_optimization": {"stage": 1}}).is_default()


def test_deepspeed_section_is_strict_like_the_file():
    ds = {"train_batch_size": 8, "offload_plugin": {"telemetry": {"log_patchs": False}}}
    with pytest.raises(ValueError) as err:
        config_from_deepspeed(ds)
    message = str(err.value)
    assert "section 'offload_plugin'" in message
    assert "unknown key 'telemetry.log_patchs'; did you mean 'log_patches'?" in message


def test_deepspeed_section_name_can_be_chosen():
    assert config_from_deepspeed({"my_plugin": NON_DEFAULT}, section="my_plugin") == config_from_mapping(
        NON_DEFAULT, source="t"
    )


def test_deepspeed_missing_file_names_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"ds\.json': file not found"):
        config_from_deepspeed(tmp_path / "ds.json")


def test_deepspeed_section_must_be_a_mapping():
    with pytest.raises(ValueError, match="expected a mapping of sections"):
        config_from_deepspeed({"offload_plugin": "1f1b"})


# ---------------------------------------------------------------- three ways, one object


def test_flags_yaml_json_and_deepspeed_give_equal_configs(tmp_path):
    yaml_file = tmp_path / "plugin.yaml"
    yaml_file.write_text(NON_DEFAULT_YAML)
    json_file = tmp_path / "plugin.json"
    json_file.write_text(json.dumps(NON_DEFAULT))
    ds_file = tmp_path / "ds_config.json"
    ds_file.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "offload_plugin": NON_DEFAULT}))

    from_flags = _parse(NON_DEFAULT_FLAGS)
    others = {
        "yaml": load_config_file(yaml_file),
        "json": load_config_file(json_file),
        "deepspeed dict": config_from_deepspeed({"offload_plugin": NON_DEFAULT}),
        "deepspeed file": config_from_deepspeed(ds_file),
        "config file flag": _parse(["--offload-plugin-config", str(yaml_file)]),
    }
    assert not from_flags.is_default()
    assert {name: cfg for name, cfg in others.items() if cfg != from_flags} == {}


def test_cli_flags_override_file_values_and_keep_the_rest(tmp_path):
    path = tmp_path / "plugin.yaml"
    path.write_text(NON_DEFAULT_YAML)
    cfg = _parse(["--offload-plugin-config", str(path), "--activation-memory-tracker", "saved-tensors",
                  "--offload-plugin-log-patches"])
    assert cfg.telemetry.activation_memory == "saved-tensors"
    assert cfg.telemetry.log_patches is True
    assert cfg.schedule == ScheduleConfig(pipeline_schedule="1f1b", pipeline_trace_dir="traces")


def test_flags_default_to_none_so_only_given_flags_count():
    ns = _parser().parse_args([])
    plugin_values = {k: v for k, v in vars(ns).items() if k.startswith("offload_plugin")}
    assert plugin_values and set(plugin_values.values()) == {None}
    assert config_from_args(ns).is_default()


def test_add_plugin_arguments_returns_the_parser_for_megatron_extra_args_provider():
    parser = argparse.ArgumentParser(allow_abbrev=False)
    assert add_plugin_arguments(parser) is parser


def test_config_from_args_needs_the_plugin_arguments():
    with pytest.raises(TypeError, match=r"add_plugin_arguments\(parser\)"):
        config_from_args(argparse.Namespace(num_layers=4))


# ---------------------------------------------------------------- round trips


def test_mapping_round_trips():
    cfg = config_from_mapping(NON_DEFAULT, source="t")
    assert config_from_mapping(to_mapping(cfg), source="t") == cfg
    assert yaml.safe_load(yaml.safe_dump(to_mapping(cfg))) == to_mapping(cfg)


def test_flags_round_trip_through_the_parser():
    cfg = config_from_mapping(NON_DEFAULT, source="t")
    assert _parse(to_flags(cfg)) == cfg


def test_to_flags_lists_only_non_default_values():
    assert to_flags(PluginConfig()) == []
    assert to_flags(config_from_mapping({"telemetry": {"log_patches": False}}, source="t")) == [
        "--no-offload-plugin-log-patches"
    ]
    assert to_flags(config_from_mapping(NON_DEFAULT, source="t")) == NON_DEFAULT_FLAGS


def test_to_flags_output_is_taken_whole_by_split_plugin_argv():
    flags = to_flags(config_from_mapping(NON_DEFAULT, source="t"))
    assert split_plugin_argv(flags) == (flags, [])


# ---------------------------------------------------------------- splitting a Megatron-LM command line


def test_split_takes_plugin_flags_with_values_and_keeps_the_rest_in_order():
    ours, rest = split_plugin_argv([
        "--num-layers", "8", "--pipeline-schedule=1f1b", "--lr", "1e-3", "--activation-offload", "none",
        "--no-offload-plugin-log-patches", "--offload-plugin-config", "p.yaml", "--bf16",
    ])
    assert ours == ["--pipeline-schedule=1f1b", "--activation-offload", "none", "--no-offload-plugin-log-patches",
                    "--offload-plugin-config", "p.yaml"]
    assert rest == ["--num-layers", "8", "--lr", "1e-3", "--bf16"]


@pytest.mark.parametrize(
    "typo, flag",
    [
        ("--pipeline-schedul", "--pipeline-schedule"),
        ("--activation-ofload=none", "--activation-offload"),
        ("--pipeline-sched", "--pipeline-schedule"),  # an abbreviation: Megatron-LM refuses those too
    ],
)
def test_split_refuses_a_near_miss_of_a_plugin_flag(typo, flag):
    name = typo.partition("=")[0]
    with pytest.raises(ValueError) as err:
        split_plugin_argv(["--num-layers", "8", typo, "megatron"])
    assert str(err.value) == f"unknown option '{name}'; did you mean '{flag}'?"


def test_split_passes_on_megatron_flags_that_only_look_similar():
    argv = ["--pipeline-model-parallel-size", "4", "--pipeline-dtype", "bf16", "--fine-grained-activation-offloading"]
    assert split_plugin_argv(argv) == ([], argv)


def test_split_never_takes_a_declared_foreign_flag_for_a_typo():
    argv = ["--activation-offloading"]
    with pytest.raises(ValueError):
        split_plugin_argv(argv)
    assert split_plugin_argv(argv, foreign_flags={"--activation-offloading"}) == ([], argv)


@pytest.mark.parametrize("argv", [["--pipeline-schedule"], ["--pipeline-schedule", "--num-layers", "4"]])
def test_split_refuses_a_plugin_flag_without_its_value(argv):
    with pytest.raises(ValueError, match="option '--pipeline-schedule' expects a value; accepted: megatron, 1f1b"):
        split_plugin_argv(argv)


def test_split_refuses_a_value_on_a_bool_flag():
    with pytest.raises(ValueError, match="option '--offload-plugin-log-patches' takes no value"):
        split_plugin_argv(["--offload-plugin-log-patches=false"])


def test_split_leaves_everything_after_double_dash_alone():
    assert split_plugin_argv(["--bf16", "--", "--pipeline-schedul"]) == ([], ["--bf16", "--", "--pipeline-schedul"])


# ---------------------------------------------------------------- parser


def test_parser_suggests_the_closest_option_for_an_unknown_one(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["--pipeline-schedul", "megatron"])
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    # The typo's value ("megatron") is not reported as a second problem.
    assert last_line == (
        "pretrain_gpt.py: error: unrecognized argument '--pipeline-schedul'; did you mean '--pipeline-schedule'?"
    )


def test_parser_suggests_among_all_its_options_not_only_the_plugins(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--num-layer=4"])
    assert "unrecognized argument '--num-layer'; did you mean '--num-layers'?" in capsys.readouterr().err


def test_parser_refuses_abbreviations(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--pipeline-sched", "megatron"])
    assert "unrecognized argument '--pipeline-sched'" in capsys.readouterr().err


def test_parser_refuses_an_unaccepted_choice(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--pipeline-schedule", "zbv"])
    assert "--pipeline-schedule: invalid choice: 'zbv'" in capsys.readouterr().err


def test_parse_known_args_still_returns_unknown_arguments():
    _, extras = _parser().parse_known_args(["--pipeline-schedul", "x"])
    assert extras == ["--pipeline-schedul", "x"]


def test_shipped_configs_validate():
    from pathlib import Path

    from megatron_offload_plugin.config import config_from_deepspeed, load_config_file

    root = Path(__file__).resolve().parents[1] / "configs"
    assert load_config_file(root / "plugin_default.yaml").is_default()
    assert config_from_deepspeed(root / "deepspeed_with_plugin_section.json").is_default()


# ---------------------------------------------------------------- strict types (issue 11, item 5)


@pytest.mark.parametrize("data,message", [
    ({"schedule": {"auto_replan_after": "2"}},
     "schedule.auto_replan_after='2': not accepted; input should be a valid integer"),
    ({"schedule": {"auto_replan_after": True}},
     "schedule.auto_replan_after=True: not accepted; input should be a valid integer"),
    ({"activation_offload": {"min_tensor_bytes": 1.5}},
     "activation_offload.min_tensor_bytes=1.5: not accepted; input should be a valid integer"),
    ({"schedule": {"auto_memory_limit": "4"}},
     "schedule.auto_memory_limit='4': not accepted; input should be a valid number"),
    ({"telemetry": {"log_patches": "yes"}}, "telemetry.log_patches='yes': not accepted; accepted: true or false"),
    ({"telemetry": {"log_patches": 1}}, "telemetry.log_patches=1: not accepted; accepted: true or false"),
    ({"activation_offload": {"checkpoint_offload": "false"}},
     "activation_offload.checkpoint_offload='false': not accepted; accepted: true or false"),
])
def test_values_of_the_wrong_type_are_refused_not_coerced(data, message):
    assert message in _error(data)


def test_an_int_is_accepted_for_a_float_option():
    cfg = config_from_mapping({"schedule": {"auto_memory_limit": 4}}, source="run.json")
    assert cfg.schedule.auto_memory_limit == 4.0 and isinstance(cfg.schedule.auto_memory_limit, float)


def test_yaml_and_json_files_are_read_strictly(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"schedule": {"auto_replan_after": "2"}}')
    with pytest.raises(ValueError, match=r"schedule.auto_replan_after='2': not accepted"):
        load_config_file(path)
    path = tmp_path / "run.yaml"
    path.write_text("schedule:\n  auto_replan_after: '2'\n")
    with pytest.raises(ValueError, match=r"schedule.auto_replan_after='2': not accepted"):
        load_config_file(path)


def test_flags_still_give_typed_values_under_strict_models():
    cfg = _parse(["--auto-replan-after", "3", "--pipeline-memory-limit", "2", "--activation-offload", "selective",
                  "--offload-fraction", "0.25", "--offload-min-tensor-bytes", "0", "--no-offload-plugin-log-patches"])
    assert cfg.schedule.auto_replan_after == 3 and cfg.schedule.auto_memory_limit == 2.0
    assert cfg.activation_offload.fraction == 0.25 and cfg.activation_offload.min_tensor_bytes == 0
    assert cfg.telemetry.log_patches is False


def test_a_whole_section_check_does_not_leak_pydantics_value_error_prefix():
    message = _error({"activation_offload": {"mode": "selective", "fraction": 0.5, "chunks": "0"}})
    assert message == (
        "offload-plugin config (run.yaml): activation_offload: activation_offload.fraction=0.5 and "
        "activation_offload.chunks='0': set one of --offload-fraction or --offload-chunks, not both"
    )
