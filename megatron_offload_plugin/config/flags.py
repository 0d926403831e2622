"""Dashed command-line flags generated from the config model (Megatron-LM conventions).

Flags default to ``None`` so that only what the user typed overrides a config
file.  :func:`split_plugin_argv` separates the plugin's flags from a Megatron-LM
command line (whose parser rejects unknown flags and abbreviations), and
:class:`PluginArgumentParser` answers an unknown option with the closest known one
(Python 3.11's argparse has no suggestions).
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any, TypeVar

from .loading import FILE_SUFFIXES, closest, config_from_mapping, load_config_file, to_mapping
from .model import OptionSpec, PluginConfig, iter_options

logger = logging.getLogger(__name__)

CONFIG_FILE_FLAG = "--offload-plugin-config"
GROUP_TITLE = "megatron-offload-plugin"
NEAR_MISS_CUTOFF = 0.85  # split_plugin_argv: this close to a plugin flag is a typo, not a Megatron flag
_CONFIG_DEST = "offload_plugin_config"
_NEGATIVE_NUMBER = re.compile(r"-\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|-\.\d+(?:[eE][-+]?\d+)?")

_Parser = TypeVar("_Parser", bound=argparse.ArgumentParser)


def _dest(opt: OptionSpec) -> str:
    """Namespace attribute of an option; prefixed so it cannot clash with Megatron-LM's own ``args``."""
    return f"offload_plugin__{opt.section}__{opt.field}"


# ---------------------------------------------------------------- argparse


def add_plugin_arguments(parser: _Parser) -> _Parser:
    """Add the plugin's flag group; returns ``parser``, so it works as Megatron-LM's ``extra_args_provider``."""
    group = parser.add_argument_group(
        GROUP_TITLE,
        f"Options of megatron-offload-plugin (defaults in brackets). Flags override {CONFIG_FILE_FLAG}.",
    )
    group.add_argument(
        CONFIG_FILE_FLAG, dest=_CONFIG_DEST, default=None, metavar="PATH",
        help=f"YAML or JSON file ({', '.join(FILE_SUFFIXES)}) of plugin options, nested as section: {{option: value}}.",
    )
    for opt in iter_options():
        group.add_argument(opt.flag, **_argument_kwargs(opt))
    return parser


def _argument_kwargs(opt: OptionSpec) -> dict[str, Any]:
    """argparse settings for one option: default ``None`` so we can tell what the user gave."""
    kwargs: dict[str, Any] = {"dest": _dest(opt), "default": None, "help": _help(opt)}
    if opt.is_bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif opt.choices is not None:
        kwargs.update(type=opt.type, choices=list(opt.choices))
    else:
        kwargs["metavar"] = opt.field.upper()
        kwargs["type"] = opt.type
    return kwargs  # typed here: the models are strict and never convert a string themselves


def _help(opt: OptionSpec) -> str:
    """The field's description plus its default, spelled as in a config file; ``%`` escaped for argparse."""
    if opt.default is None:
        default = "unset"
    elif opt.is_bool:
        default = str(opt.default).lower()
    else:
        default = str(opt.default)
    return f"{opt.help} [{default}]".replace("%", "%%")


def config_from_args(ns: argparse.Namespace) -> PluginConfig:
    """The file (if given), then every plugin flag the user gave, validated as one config."""
    if not hasattr(ns, _CONFIG_DEST):
        raise TypeError("config_from_args: the namespace has no plugin options; call add_plugin_arguments(parser)")
    path = getattr(ns, _CONFIG_DEST)
    base = load_config_file(path) if path else PluginConfig()
    given = {opt: value for opt in iter_options() if (value := getattr(ns, _dest(opt), None)) is not None}
    if not given:
        return base
    data = to_mapping(base)
    for opt, value in given.items():
        data[opt.section][opt.field] = value
    logger.debug("offload-plugin options from the command line: %s", ", ".join(o.flag for o in given))
    return config_from_mapping(data, source="command line", key_names={opt.dotted: opt.flag for opt in given})


# ---------------------------------------------------------------- argv splitting


def plugin_flags() -> dict[str, OptionSpec | None]:
    """Every flag the plugin owns, negations included (``None`` for the config-file flag)."""
    flags: dict[str, OptionSpec | None] = {CONFIG_FILE_FLAG: None}
    for opt in iter_options():
        for flag in opt.option_strings:
            flags[flag] = opt
    return flags


def split_plugin_argv(
    argv: Sequence[str], *, foreign_flags: Collection[str] = (), extra_flags: Mapping[str, OptionSpec] | None = None
) -> tuple[list[str], list[str]]:
    """(plugin flags with their values, everything else in its order).

    The rest goes to Megatron-LM's parser, which would reject our flags, so a
    near-miss of a plugin flag is refused here with a suggestion rather than
    passed on.  ``foreign_flags`` are known to belong to the other parser and
    are never taken for typos.  ``extra_flags`` are front-end flags that are not
    config options (the launcher's log level), taken out and checked the same way.
    Everything after ``--`` is passed on untouched.
    """
    flags = {**plugin_flags(), **(extra_flags or {})}
    ours: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        name = arg.partition("=")[0]
        if name in flags:
            taken = _plugin_tokens(argv, i, name, flags[name], flags)
            ours += argv[i : i + taken]
            i += taken
            continue
        if name.startswith("--") and name not in foreign_flags:
            _reject_near_miss(name, list(flags))
        rest.append(arg)
        i += 1
    return ours, rest


def _plugin_tokens(argv: Sequence[str], i: int, name: str, opt: OptionSpec | None, flags: Collection[str]) -> int:
    """How many tokens from ``argv[i]`` belong to plugin flag ``name`` (1 or 2)."""
    inline = "=" in argv[i]
    if opt is not None and opt.is_bool:
        if inline:
            spellings = " or ".join(s for s in opt.option_strings if s in flags)  # a launcher switch has no --no-
            raise ValueError(f"option '{name}' takes no value; write {spellings}")
        return 1
    if inline:
        return 1
    if i + 1 >= len(argv) or _looks_like_option(argv[i + 1]):
        raise ValueError(f"option '{name}' expects a value; accepted: {_accepted_values(opt)}")
    return 2


def _looks_like_option(token: str) -> bool:
    """As argparse sees it: a leading dash, unless the token is a negative number."""
    return token.startswith("-") and token != "-" and not _NEGATIVE_NUMBER.fullmatch(token)


def _accepted_values(opt: OptionSpec | None) -> str:
    if opt is None:
        return f"a {', '.join(FILE_SUFFIXES)} file path"
    if opt.choices is not None:
        return ", ".join(str(c) for c in opt.choices)
    return f"a {opt.type.__name__}"


def _reject_near_miss(name: str, plugin_flags_: list[str]) -> None:
    """A flag this close to ours is a typo: Megatron-LM would only say 'unrecognized arguments'."""
    hint = closest(name, plugin_flags_, cutoff=NEAR_MISS_CUTOFF)
    if hint is not None:
        raise ValueError(f"unknown option '{name}'; did you mean '{hint}'?")


# ---------------------------------------------------------------- parser


class PluginArgumentParser(argparse.ArgumentParser):
    """argparse with ``allow_abbrev=False`` (as Megatron-LM) that suggests the closest option for a typo."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        """As argparse, but unknown options fail with a suggestion."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self._unrecognized(extras))
        return ns

    def parse_intermixed_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        """As argparse, but unknown options fail with a suggestion."""
        ns, extras = self.parse_known_intermixed_args(args, namespace)
        if extras:
            self.error(self._unrecognized(extras))
        return ns

    def _unrecognized(self, extras: list[str]) -> str:
        """One message per leftover token; a bare value right after an unknown option is taken as its value."""
        known = list(self._option_string_actions)
        messages: list[str] = []
        after_option = False
        for token in extras:
            if token.startswith(tuple(self.prefix_chars)) and len(token) > 1:
                name = token.partition("=")[0]
                messages.append(f"unrecognized argument '{name}'{_suggestion(name, known)}")
                after_option = True
            elif not after_option:
                messages.append(f"unrecognized argument '{token}'")
            else:
                after_option = False
        return "; ".join(messages)


def _suggestion(name: str, known: list[str]) -> str:
    hint = closest(name, known)
    return f"; did you mean '{hint}'?" if hint else ""
