"""One validated plugin configuration, reachable from flags, YAML/JSON files and DeepSpeed JSON."""

from .flags import (
    CONFIG_FILE_FLAG,
    GROUP_TITLE,
    PluginArgumentParser,
    add_plugin_arguments,
    config_from_args,
    plugin_flags,
    split_plugin_argv,
)
from .loading import (
    DEEPSPEED_SECTION,
    FILE_SUFFIXES,
    config_from_deepspeed,
    config_from_mapping,
    load_config_file,
    to_flags,
    to_mapping,
)
from .model import (
    ActivationOffloadConfig,
    OptionSpec,
    PluginConfig,
    ScheduleConfig,
    TelemetryConfig,
    iter_options,
)

__all__ = [
    "CONFIG_FILE_FLAG",
    "DEEPSPEED_SECTION",
    "FILE_SUFFIXES",
    "GROUP_TITLE",
    "ActivationOffloadConfig",
    "OptionSpec",
    "PluginArgumentParser",
    "PluginConfig",
    "ScheduleConfig",
    "TelemetryConfig",
    "add_plugin_arguments",
    "config_from_args",
    "config_from_deepspeed",
    "config_from_mapping",
    "iter_options",
    "load_config_file",
    "plugin_flags",
    "split_plugin_argv",
    "to_flags",
    "to_mapping",
]
