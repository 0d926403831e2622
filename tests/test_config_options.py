"""One PluginConfig from flags, files and DeepSpeed JSON; every user error names the fix."""

from __future__ import annotations

import argparse
import json

import pytest

from megatron_offload_plugin.config import (
    PluginArgumentParser,
    PluginConfig,
    add_plugin_arguments,
    config_from_args,
    config_from_deepspeed,
    config_from_mapping,
    iter_options,
    load_config_file,
    split_plugin_argv,
    to_flags,
    to_mapping,
)

NON_DEFAULT = {"telemetry": {"activation_memory": "off", "log_patches": False}}


def _parse(argv: list[str]) -> PluginConfig:
    parser = PluginArgumentParser(prog="t")
    add_plugin_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_flag_list_is_pinned():
    """A new flag must be a deliberate change: update this list with it."""
    flags = [opt.flag for opt in iter_options()]
    assert flags == [
        "--pipeline-schedule",
        "--pipeline-trace",
        "--activation-offload",
        "--activation-memory-tracker",
        "--offload-plugin-log-patches",
    ]


def test_every_option_has_help_text_and_a_dashed_flag():
    for opt in iter_options():
        assert opt.help and opt.flag.startswith("--") and "_" not in opt.flag


def test_flags_yaml_json_and_deepspeed_give_the_same_config(tmp_path):
    from_flags = _parse(["--activation-memory-tracker", "off", "--no-offload-plugin-log-patches"])
    yaml_file = tmp_path / "plugin.yaml"
    yaml_file.write_text("telemetry:\n  activation_memory: 'off'\n  log_patches: false\n")
    json_file = tmp_path / "plugin.json"
    json_file.write_text(json.dumps(NON_DEFAULT))
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"train_batch_size": 8, "offload_plugin": NON_DEFAULT}))
    configs = [from_flags, load_config_file(yaml_file), load_config_file(json_file),
               config_from_deepspeed(ds_file), config_from_deepspeed({"offload_plugin": NON_DEFAULT})]
    assert all(c == configs[0] for c in configs) and not configs[0].is_default()


def test_command_line_flags_override_the_file(tmp_path):
    f = tmp_path / "plugin.yaml"
    f.write_text("telemetry:\n  activation_memory: 'off'\n  log_patches: false\n")
    cfg = _parse(["--offload-plugin-config", str(f), "--activation-memory-tracker", "saved-tensors"])
    assert cfg.telemetry.activation_memory == "saved-tensors" and cfg.telemetry.log_patches is False


def test_deepspeed_config_without_the_section_is_the_default():
    assert config_from_deepspeed({"train_batch_size": 8}).is_default()


@pytest.mark.parametrize(
    "data, message",
    [
        ({"activaton_offload": {}}, "unknown key 'activaton_offload'; did you mean 'activation_offload'?"),
        ({"telemetry": {"activation_memmory": "off"}},
         "unknown key 'telemetry.activation_memmory'; did you mean 'activation_memory'?"),
        ({"schedule": {"pipeline_schedule": "zbv"}},
         "schedule.pipeline_schedule='zbv': not accepted; accepted: 'megatron', '1f1b'"),
        ({"telemetry": {"log_patches": "maybe"}}, "telemetry.log_patches='maybe': not accepted; accepted: true or false"),
        ({"schedule": "megatron"}, "'schedule' must be a mapping of options"),
    ],
)
def test_bad_mappings_name_the_key_the_value_and_what_is_accepted(data, message):
    with pytest.raises(ValueError) as err:
        config_from_mapping(data, source="run.yaml")
    assert message in str(err.value) and "(run.yaml)" in str(err.value)


def test_bad_files_name_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"unknown file type; accepted: \.yaml, \.yml, \.json"):
        load_config_file(tmp_path / "plugin.toml")
    with pytest.raises(ValueError, match="file not found"):
        load_config_file(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse"):
        load_config_file(broken)


def test_split_keeps_megatron_flags_in_order_and_takes_plugin_flags_with_values():
    ours, rest = split_plugin_argv(["--num-layers", "8", "--pipeline-schedule=megatron", "--lr", "1e-3",
                                    "--activation-offload", "none", "--no-offload-plugin-log-patches", "--bf16"])
    assert ours == ["--pipeline-schedule=megatron", "--activation-offload", "none", "--no-offload-plugin-log-patches"]
    assert rest == ["--num-layers", "8", "--lr", "1e-3", "--bf16"]


def test_split_rejects_a_near_miss_of_a_plugin_flag():
    with pytest.raises(ValueError, match="unknown option '--activation-ofload'; did you mean '--activation-offload'?"):
        split_plugin_argv(["--activation-ofload", "none"])


def test_split_rejects_a_plugin_flag_without_its_value():
    with pytest.raises(ValueError, match="option '--pipeline-schedule' expects a value"):
        split_plugin_argv(["--pipeline-schedule", "--num-layers", "4"])


def test_parser_suggests_the_closest_option_for_a_typo(capsys):
    parser = PluginArgumentParser(prog="t")
    parser.add_argument("--num-layers")
    add_plugin_arguments(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--pipeline-schedul", "megatron"])
    assert exit_info.value.code == 2
    assert "did you mean '--pipeline-schedule'?" in capsys.readouterr().err


def test_parser_refuses_abbreviations():
    parser = PluginArgumentParser(prog="t")
    add_plugin_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--pipeline-sched", "megatron"])


def test_round_trips_through_mapping_and_flags():
    cfg = config_from_mapping(NON_DEFAULT, source="t")
    assert config_from_mapping(to_mapping(cfg), source="t") == cfg
    assert _parse(to_flags(cfg)) == cfg
    assert to_flags(PluginConfig()) == []


def test_config_is_immutable():
    cfg = PluginConfig()
    with pytest.raises(Exception):
        cfg.telemetry.log_patches = False  # type: ignore[misc]


def test_shipped_configs_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    assert load_config_file(root / "plugin_default.yaml").is_default()
    assert config_from_deepspeed(root / "deepspeed_with_plugin_section.json").is_default()
