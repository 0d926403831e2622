"""Mappings, YAML/JSON files and DeepSpeed sections into a validated :class:`PluginConfig`.

pydantic's own errors are turned into one-line messages that name the source,
the dotted key, the value and what is accepted (and the closest valid key for a
typo); the pydantic error stays attached as ``__cause__``.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .model import PluginConfig, iter_options, section_models

DEEPSPEED_SECTION = "offload_plugin"


def closest(name: str, accepted: list[str]) -> str | None:
    match = difflib.get_close_matches(name, accepted, n=1, cutoff=0.6)
    return match[0] if match else None


def _unknown_key(source: str, dotted: str, key: str, accepted: list[str]) -> ValueError:
    hint = closest(key, accepted)
    did_you_mean = f"; did you mean '{hint}'?" if hint else ""
    return ValueError(
        f"offload-plugin config ({source}): unknown key '{dotted}'{did_you_mean} "
        f"accepted: {', '.join(sorted(accepted))}"
    )


def _check_keys(data: Mapping[str, Any], source: str) -> None:
    """Unknown keys first, with suggestions (pydantic would only say 'extra inputs')."""
    sections = section_models()
    for key, value in data.items():
        if key not in sections:
            raise _unknown_key(source, str(key), str(key), list(sections))
        if not isinstance(value, Mapping):
            raise ValueError(
                f"offload-plugin config ({source}): '{key}' must be a mapping of options, got {value!r}"
            )
        fields = list(sections[key].model_fields)
        for sub in value:
            if sub not in fields:
                raise _unknown_key(source, f"{key}.{sub}", str(sub), fields)


def _accepted(dotted: str) -> str:
    for opt in iter_options():
        if opt.dotted == dotted:
            if opt.choices:
                return ", ".join(repr(c) for c in opt.choices)
            return "true or false" if opt.is_bool else getattr(opt.annotation, "__name__", str(opt.annotation))
    return "see --help"


def config_from_mapping(data: Mapping[str, Any] | None, *, source: str) -> PluginConfig:
    data = dict(data or {})
    _check_keys(data, source)
    try:
        return PluginConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        dotted = ".".join(str(p) for p in first["loc"])
        value = first.get("input")
        raise ValueError(
            f"offload-plugin config ({source}): {dotted}={value!r}: not accepted; accepted: {_accepted(dotted)}"
        ) from err


def load_config_file(path: str | Path) -> PluginConfig:
    p = Path(path)
    if p.suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"--offload-plugin-config={str(path)!r}: unknown file type; accepted: .yaml, .yml, .json")
    if not p.is_file():
        raise ValueError(f"--offload-plugin-config={str(path)!r}: file not found")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"--offload-plugin-config={str(path)!r}: cannot parse: {err}") from err
    if data is not None and not isinstance(data, Mapping):
        raise ValueError(f"--offload-plugin-config={str(path)!r}: expected a mapping of sections at the top")
    return config_from_mapping(data, source=p.name)


def config_from_deepspeed(ds_config: Mapping[str, Any] | str | Path, section: str = DEEPSPEED_SECTION) -> PluginConfig:
    """The ``offload_plugin`` section of a DeepSpeed JSON config (absent: the default config)."""
    if not isinstance(ds_config, Mapping):
        p = Path(ds_config)
        ds_config = json.loads(p.read_text(encoding="utf-8"))
        source = f"{p.name}:{section}"
    else:
        source = f"DeepSpeed config:{section}"
    return config_from_mapping(ds_config.get(section), source=source)  # type: ignore[union-attr]


def to_mapping(cfg: PluginConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def _non_default(cfg: PluginConfig) -> list[tuple[Any, Any]]:
    out = []
    for opt in iter_options():
        value = getattr(getattr(cfg, opt.section), opt.field)
        if value != opt.default:
            out.append((opt, value))
    return out


def to_flags(cfg: PluginConfig) -> list[str]:
    flags: list[str] = []
    for opt, value in _non_default(cfg):
        if opt.is_bool:
            flags.append(opt.flag if value else "--no-" + opt.flag[2:])
        else:
            flags += [opt.flag, str(value)]
    return flags


def section_of(model: type[BaseModel]) -> str:  # pragma: no cover - convenience for docs
    return next(k for k, v in section_models().items() if v is model)
