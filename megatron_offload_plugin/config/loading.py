"""Mappings, YAML/JSON files and DeepSpeed sections into a validated :class:`PluginConfig`.

All three share one nested shape, ``{section: {field: value}}``, and one
strictness: a misspelled key or an unaccepted value fails at once with a
one-line message naming the source, the dotted key, the value and what is
accepted (and the closest valid key or value for a typo).  pydantic's own error
stays attached as ``__cause__``; its trace never reaches the user.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .model import OptionSpec, PluginConfig, iter_options, section_models

logger = logging.getLogger(__name__)

DEEPSPEED_SECTION = "offload_plugin"
FILE_SUFFIXES = (".yaml", ".yml", ".json")
_PREFIX = "offload-plugin config"


def closest(name: str, accepted: list[str], cutoff: float = 0.6) -> str | None:
    """The accepted spelling most similar to ``name`` (difflib), if any is close enough."""
    match = difflib.get_close_matches(name, accepted, n=1, cutoff=cutoff)
    return match[0] if match else None


def suggest_and_list(name: str, accepted: list[str], listed: str) -> str:
    """``; did you mean 'x'? accepted: ...`` (or ``; accepted: ...`` when nothing is close)."""
    hint = closest(name, accepted)
    return (f"; did you mean '{hint}'?" if hint else ";") + f" accepted: {listed}"


# ---------------------------------------------------------------- mappings


def config_from_mapping(
    data: Mapping[str, Any] | None, *, source: str, key_names: Mapping[str, str] | None = None
) -> PluginConfig:
    """Validate ``{section: {field: value}}``; ``source`` (a file name, 'command line'...) starts each error.

    Keys are checked here first (pydantic would only say 'extra inputs'), then
    pydantic checks the values.  ``key_names`` renames dotted keys in value errors
    (the command line names its flags instead).
    """
    if data is not None and not isinstance(data, Mapping):
        raise ValueError(
            f"{_PREFIX} ({source}): expected a mapping of sections "
            f"({', '.join(section_models())}), got {type(data).__name__}"
        )
    sections = _check_keys(data or {}, source)
    try:
        return PluginConfig.model_validate(sections)
    except ValidationError as err:
        raise ValueError(f"{_PREFIX} ({source}): " + _describe(err, key_names or {})) from err


def _check_keys(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Reject unknown keys at any level naming the closest and all accepted keys (pydantic says only 'extra')."""
    models = section_models()
    checked: dict[str, Any] = {}
    for key, value in data.items():
        if key not in models:
            raise _unknown_key(source, str(key), str(key), list(models))
        if value is None:  # an empty YAML section header (`telemetry:`) means "all defaults"
            value = {}
        if not isinstance(value, Mapping):
            raise ValueError(
                f"{_PREFIX} ({source}): '{key}' must be a mapping of options "
                f"({', '.join(models[key].model_fields)}), got {value!r}"
            )
        fields = list(models[key].model_fields)
        for sub in value:
            if sub not in fields:
                raise _unknown_key(source, f"{key}.{sub}", str(sub), fields)
        checked[key] = value
    return checked


def _unknown_key(source: str, dotted: str, key: str, accepted: list[str]) -> ValueError:
    return ValueError(
        f"{_PREFIX} ({source}): unknown key '{dotted}'"
        + suggest_and_list(key, accepted, ", ".join(sorted(accepted)))
    )


def _describe(err: ValidationError, key_names: Mapping[str, str]) -> str:
    """pydantic's errors as ``key=value: not accepted; accepted: ...`` lines, one per option."""
    options = {opt.dotted: opt for opt in iter_options()}
    lines: list[str] = []
    seen: set[str] = set()
    for item in err.errors():
        dotted = ".".join(str(part) for part in item["loc"][:2])  # a union adds its branch name after the field
        if dotted in seen:
            continue
        seen.add(dotted)
        name = key_names.get(dotted, dotted)
        opt = options.get(dotted)
        value = item.get("input")
        if opt is None:  # a whole-model check: no single option to blame
            lines.append(f"{name or 'config'}: {item['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{name}={value!r}: {_not_accepted(opt, value, item['msg'])}")
    return "\n".join(lines)


def _not_accepted(opt: OptionSpec, value: Any, pydantic_msg: str) -> str:
    """What to tell the user about a value ``opt`` refused."""
    if opt.choices is not None:
        listed = ", ".join(repr(c) for c in opt.choices)
        if not isinstance(value, str):
            return f"not accepted; accepted: {listed}"
        return "not accepted" + suggest_and_list(value, [str(c) for c in opt.choices], listed)
    if opt.is_bool:
        return "not accepted; accepted: true or false"
    return f"not accepted; {pydantic_msg[:1].lower()}{pydantic_msg[1:]}"


# ---------------------------------------------------------------- files


class _StrictYamlLoader(yaml.SafeLoader):
    """YAML 1.2 booleans and no duplicate keys.

    PyYAML follows YAML 1.1, where ``off``/``no``/``on``/``yes`` are booleans, so
    ``activation_memory: off`` would arrive as ``False``; and a repeated key
    silently keeps the last value.  Neither is what the user meant.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable: SafeLoader reports it below
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _json_object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` refusing repeated keys, as DeepSpeed's own loader does."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _parse_json(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_json_object_without_duplicates)


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictYamlLoader)  # noqa: S506 - a SafeLoader subclass


_PARSERS: dict[str, Callable[[str], Any]] = {".yaml": _parse_yaml, ".yml": _parse_yaml, ".json": _parse_json}


def _read(path: Path, what: str, parse: Callable[[str], Any]) -> Any:
    """Read and parse a file; every failure is a ValueError naming the path."""
    if not path.exists():
        raise ValueError(f"{what} '{path}': file not found; expected an existing {_suffix_list()} file")
    if not path.is_file():
        raise ValueError(f"{what} '{path}': not a file; expected an existing {_suffix_list()} file")
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{what} '{path}': cannot parse: {err}") from err


def _suffix_list() -> str:
    return ", ".join(FILE_SUFFIXES[:-1]) + " or " + FILE_SUFFIXES[-1]


def load_config_file(path: str | os.PathLike[str]) -> PluginConfig:
    """A YAML (.yaml/.yml) or JSON (.json) file with the nested ``{section: {field: value}}`` keys."""
    p = Path(path)
    parse = _PARSERS.get(p.suffix.lower())
    if parse is None:
        raise ValueError(
            f"{_PREFIX} file '{p}': unknown file type; accepted: {', '.join(FILE_SUFFIXES)}"
        )
    data = _read(p, f"{_PREFIX} file", parse)
    logger.debug("offload-plugin config read from %s", p)
    return config_from_mapping(data, source=str(p))


def config_from_deepspeed(
    ds_config: Mapping[str, Any] | str | os.PathLike[str], section: str = DEEPSPEED_SECTION
) -> PluginConfig:
    """The plugin's top-level section of a DeepSpeed JSON config (a dict or a path); absent means default.

    DeepSpeed keeps unknown top-level sections without looking at them, so this
    is the only place a typo in ours can be caught.
    """
    if isinstance(ds_config, Mapping):
        data: Any = ds_config
        origin = "DeepSpeed config"
    elif isinstance(ds_config, (str, os.PathLike)):
        data = _read(Path(ds_config), "DeepSpeed config", _parse_json)
        origin = f"DeepSpeed config {Path(ds_config)}"
        if not isinstance(data, Mapping):
            raise ValueError(f"{origin}: expected a JSON object at the top, got {type(data).__name__}")
    else:
        raise TypeError(f"config_from_deepspeed: expected a mapping or a path, got {type(ds_config).__name__}")
    source = f"{origin}, section '{section}'"
    if data.get(section) is None:
        logger.debug("%s: no '%s' section; using the default plugin config", origin, section)
        return PluginConfig()
    return config_from_mapping(data[section], source=source)


# ---------------------------------------------------------------- back out


def to_mapping(cfg: PluginConfig) -> dict[str, Any]:
    """Every option as plain JSON/YAML data, in the shape :func:`config_from_mapping` reads."""
    return cfg.model_dump(mode="json")


def to_flags(cfg: PluginConfig) -> list[str]:
    """The command-line flags that rebuild ``cfg`` (only options that differ from their default)."""
    flags: list[str] = []
    for opt in iter_options():
        value = getattr(getattr(cfg, opt.section), opt.field)
        if value == opt.default:
            continue
        if opt.is_bool:
            flags.append(opt.flag if value else str(opt.negative_flag))
        elif str(value).startswith("-"):  # keep argparse from reading the value as an option
            flags.append(f"{opt.flag}={value}")
        else:
            flags += [opt.flag, str(value)]
    return flags
