"""The plugin's one configuration: typed sections, each field with its flag and help text.

Every way in (dashed command-line flags, a YAML/JSON file, a DeepSpeed JSON
section) ends in a :class:`PluginConfig`; :func:`iter_options` walks the model
so flags, file keys and documentation all come from these field definitions.
Adding an option is adding one field.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScheduleConfig(_Section):
    pipeline_schedule: Literal["megatron", "1f1b"] = Field(
        "megatron",
        description=(
            "Pipeline schedule. 'megatron' runs Megatron-core's own 1F1B / interleaved schedule "
            "unchanged; '1f1b' runs Megatron's 1F1B order in the plugin runtime (the baseline "
            "the plugin's other schedules are measured against)."
        ),
        json_schema_extra={"flag": "--pipeline-schedule"},
    )
    pipeline_trace_dir: str | None = Field(
        None,
        description=(
            "With a plugin schedule: write each iteration's measured action timeline as a Chrome "
            "trace (open in Perfetto) into this folder, one file per iteration."
        ),
        json_schema_extra={"flag": "--pipeline-trace"},
    )


class ActivationOffloadConfig(_Section):
    mode: Literal["none"] = Field(
        "none",
        description="Activation offload to host memory. 'none' keeps every activation on the device.",
        json_schema_extra={"flag": "--activation-offload"},
    )


class TelemetryConfig(_Section):
    activation_memory: Literal["auto", "saved-tensors", "cuda", "off"] = Field(
        "auto",
        description=(
            "How peak activation memory is measured. auto: CUDA allocator peak on a GPU, "
            "saved-for-backward tensor accounting on CPU."
        ),
        json_schema_extra={"flag": "--activation-memory-tracker"},
    )
    log_patches: bool = Field(
        True,
        description="Log (on rank 0) each upstream function the plugin patches.",
        json_schema_extra={"flag": "--offload-plugin-log-patches"},
    )


class PluginConfig(_Section):
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="Pipeline schedule.")
    activation_offload: ActivationOffloadConfig = Field(
        default_factory=ActivationOffloadConfig, description="Activation offload."
    )
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig, description="Measurements.")

    def is_default(self) -> bool:
        return self == PluginConfig()


@dataclass(frozen=True)
class OptionSpec:
    """One option as every front end sees it."""

    section: str
    field: str
    flag: str
    annotation: Any
    default: Any
    help: str

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.field}"

    @property
    def choices(self) -> tuple[Any, ...] | None:
        if typing.get_origin(self.annotation) is Literal:
            return typing.get_args(self.annotation)
        return None

    @property
    def is_bool(self) -> bool:
        return self.annotation is bool


def section_models() -> dict[str, type[BaseModel]]:
    return {name: f.annotation for name, f in PluginConfig.model_fields.items()}  # type: ignore[misc]


def iter_options() -> Iterator[OptionSpec]:
    for section, model in section_models().items():
        for name, f in model.model_fields.items():
            extra = f.json_schema_extra or {}
            flag = extra.get("flag") if isinstance(extra, dict) else None
            if not flag:
                raise TypeError(f"{model.__name__}.{name} declares no command-line flag")
            yield OptionSpec(section, name, str(flag), f.annotation, f.default, f.description or "")
