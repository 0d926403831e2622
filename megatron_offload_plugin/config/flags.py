"""Dashed command-line flags generated from the config model (Megatron-LM conventions).

Flags default to ``None`` so that only what the user typed overrides a config
file.  :func:`split_plugin_argv` separates the plugin's flags from a Megatron-LM
command line (whose parser rejects unknown flags and abbreviations), and
:class:`PluginArgumentParser` answers an unknown option with the closest known one.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from typing import Any

from .loading import config_from_mapping, load_config_file, to_mapping
from .model import OptionSpec, PluginConfig, iter_options

CONFIG_FILE_FLAG = "--offload-plugin-config"
GROUP_TITLE = "megatron-offload-plugin"


def _dest(opt: OptionSpec) -> str:
    return f"offload_plugin__{opt.section}__{opt.field}"


def add_plugin_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(GROUP_TITLE, "Options of megatron-offload-plugin (default in brackets).")
    group.add_argument(
        CONFIG_FILE_FLAG, dest="offload_plugin_config", default=None, metavar="PATH",
        help="YAML or JSON file with plugin options; flags given on the command line override it.",
    )
    for opt in iter_options():
        help_text = f"{opt.help} [{opt.default}]"
        if opt.is_bool:
            group.add_argument(opt.flag, dest=_dest(opt), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            choices = [str(c) for c in opt.choices] if opt.choices else None
            group.add_argument(opt.flag, dest=_dest(opt), default=None, choices=choices, help=help_text)


def config_from_args(ns: argparse.Namespace) -> PluginConfig:
    """The file (if any), then every flag the user gave, validated as one config."""
    base = load_config_file(ns.offload_plugin_config) if getattr(ns, "offload_plugin_config", None) else PluginConfig()
    data = to_mapping(base)
    for opt in iter_options():
        value = getattr(ns, _dest(opt), None)
        if value is not None:
            data[opt.section][opt.field] = value
    return config_from_mapping(data, source="command line")


def plugin_flags() -> dict[str, OptionSpec | None]:
    """Every flag the plugin owns (``None`` for the config-file flag)."""
    flags: dict[str, OptionSpec | None] = {CONFIG_FILE_FLAG: None}
    for opt in iter_options():
        flags[opt.flag] = opt
        if opt.is_bool:
            flags["--no-" + opt.flag[2:]] = opt
    return flags


def split_plugin_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(plugin flags with their values, everything else in order)."""
    flags = plugin_flags()
    ours: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, _ = arg.partition("=")
        if name in flags:
            opt = flags[name]
            takes_value = opt is None or not opt.is_bool
            if not takes_value and eq:
                raise ValueError(f"option '{name}' takes no value (use {name} or --no-{name[2:]})")
            if takes_value and not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ValueError(f"option '{name}' expects a value")
                ours += [arg, argv[i + 1]]
                i += 2
                continue
            ours.append(arg)
        elif name.startswith("--") and (hint := _near_miss(name, flags)):
            raise ValueError(f"unknown option '{name}'; did you mean '{hint}'?")
        else:
            rest.append(arg)
        i += 1
    return ours, rest


def _near_miss(name: str, flags: dict[str, Any]) -> str | None:
    match = difflib.get_close_matches(name, list(flags), n=1, cutoff=0.85)
    return match[0] if match else None


class PluginArgumentParser(argparse.ArgumentParser):
    """argparse with ``allow_abbrev=False`` that suggests the closest option for a typo."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            known = [s for a in self._actions for s in a.option_strings]
            messages = []
            for extra in extras:
                name = extra.partition("=")[0]
                if not name.startswith("-"):
                    continue
                match = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                hint = f"; did you mean '{match[0]}'?" if match else ""
                messages.append(f"unrecognized argument '{name}'{hint}")
            if not messages:
                messages.append("unrecognized arguments: " + " ".join(extras))
            self.error("; ".join(messages))
        return ns
