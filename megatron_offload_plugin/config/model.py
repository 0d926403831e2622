"""The plugin's one configuration: typed sections, each field with its flag and help text.

Every way in (dashed command-line flags, a YAML/JSON file, a DeepSpeed JSON
section) ends in a :class:`PluginConfig`.  :func:`iter_options` walks the model,
so flags, file keys and documentation all come from the field definitions
below: adding an option is adding one field (with ``description=`` and
``json_schema_extra={"flag": ...}``) to a section.
"""

from __future__ import annotations

import functools
import logging
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.fields import FieldInfo

logger = logging.getLogger(__name__)

_FLAG_RE = re.compile(r"--[a-z0-9]+(?:-[a-z0-9]+)*")


class _FrozenModel(BaseModel):
    """Base of every config model: unknown keys are errors, values are never coerced, nor changed later.

    ``strict``: a value of the wrong type is refused, not converted (pydantic's lax
    mode reads ``"2"`` and ``true`` as the integers 2 and 1, and ``"yes"`` as True).
    An integer is still a valid float (``1`` for ``1.0``, as JSON writes it).  The
    command line stays typed: argparse converts each flag's string with the option's
    type (``flags._argument_kwargs``) before a model sees it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ScheduleConfig(_FrozenModel):
    """Which pipeline schedule runs the microbatches."""

    pipeline_schedule: Literal[
        "megatron", "1f1b", "interleaved", "zb-h1", "zb-h2", "zb-v", "v-half", "v-min", "auto"
    ] = Field(
        "megatron",
        description=(
            "Pipeline schedule. 'megatron': Megatron-core's own 1F1B / interleaved functions, "
            "unchanged. In the plugin runtime: '1f1b' and 'interleaved' (Megatron's orders, the "
            "baselines), 'zb-h1' (zero bubble at 1F1B memory) and 'zb-h2' (zero bubble, 2p-1 "
            "activations), and the V-shaped 'zb-v' (peak p), 'v-half' (about p/2+1) and 'v-min' "
            "(about p/3+1), which split each linear's backward into input (B) and weight (W) "
            "gradients. V schedules need two model chunks per rank and untied embeddings. 'auto' "
            "searches the fastest of these shapes for the measured costs within "
            "--pipeline-memory-limit (one chunk per rank, or V with two)."
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
    auto_memory_limit: float | None = Field(
        None,
        gt=0,
        description=(
            "'auto': activation memory allowed per device, in units of one microbatch's activations "
            "through one device's layers (unset: the pipeline size, 1F1B's peak)."
        ),
        json_schema_extra={"flag": "--pipeline-memory-limit"},
    )
    auto_replan_after: int = Field(
        2,
        ge=0,
        description=(
            "'auto': profiled iterations after which the schedule is planned again from the measured "
            "F, B and W times (0: keep the plan made from equal costs)."
        ),
        json_schema_extra={"flag": "--auto-replan-after"},
    )


class ActivationOffloadConfig(_FrozenModel):
    """Where activations saved for backward live between F and B (PipeOffload)."""

    mode: Literal["none", "full", "selective"] = Field(
        "none",
        description=(
            "Activation offload to host memory inside the pipeline schedule; the unit is one model "
            "chunk's activations of one microbatch. 'none' keeps every activation on the device; "
            "'full' offloads every unit after its forward and reloads it ahead of its backward; "
            "'selective' offloads the units with the longest lifespan (forward to backward) first, "
            "up to --offload-fraction of them (or the units of --offload-chunks). Which units hide "
            "their transfer at a given host-link bandwidth: 'simulate --offload-bandwidth'."
        ),
        json_schema_extra={"flag": "--activation-offload"},
    )
    fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="'selective': share of each rank's units to offload, longest lifespan first (unset: 0.5).",
        json_schema_extra={"flag": "--offload-fraction"},
    )
    chunks: str | None = Field(
        None,
        pattern=r"^\d+(,\d+)*$",
        description="'selective': offload exactly the units of these local model chunks, e.g. '0' or '0,1'.",
        json_schema_extra={"flag": "--offload-chunks"},
    )
    min_tensor_bytes: int = Field(
        65536,
        ge=0,
        description="Saved storages smaller than this stay on the device (copies of small tensors cost more than they save).",
        json_schema_extra={"flag": "--offload-min-tensor-bytes"},
    )
    host_pool_bytes: int | None = Field(
        None,
        gt=0,
        description="Bound on the reusable (pinned on GPU) host buffer pool, in bytes (unset: no bound).",
        json_schema_extra={"flag": "--offload-host-pool-bytes"},
    )
    nvme_path: str | None = Field(
        None,
        description=(
            "NVMe tier for nodes short of host memory: offloaded activations go to swap files in a "
            "private per-run folder (0700, files 0600, removed at exit) under this directory, through "
            "DeepSpeed's async I/O (needs libaio-dev); host memory then holds them only in transit."
        ),
        json_schema_extra={"flag": "--offload-nvme-path"},
    )
    reload_lead: int | None = Field(
        None,
        ge=0,
        description=(
            "How many compute actions ahead of a unit's backward its reload is launched (unset: 1 on a "
            "GPU, where the copy overlaps that action; 0 on a CPU, where copies are synchronous and a "
            "lead would only hold the unit longer)."
        ),
        json_schema_extra={"flag": "--offload-reload-lead"},
    )
    checkpoint_offload: bool = Field(
        False,
        description=(
            "With Megatron's activation recompute: offload what each checkpointed region keeps (its "
            "inputs) after its forward and reload it ahead of its recompute, previous region prefetched."
        ),
        json_schema_extra={"flag": "--checkpoint-offload"},
    )

    @model_validator(mode="after")
    def _selective_options(self) -> "ActivationOffloadConfig":
        if self.fraction is not None and self.chunks is not None:
            raise ValueError(
                f"activation_offload.fraction={self.fraction} and activation_offload.chunks={self.chunks!r}: "
                "set one of --offload-fraction or --offload-chunks, not both"
            )
        if self.mode != "selective":
            for name, flag in (("fraction", "--offload-fraction"), ("chunks", "--offload-chunks")):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"activation_offload.{name}={getattr(self, name)!r} ({flag}) only applies to "
                        f"--activation-offload selective; got --activation-offload {self.mode}"
                    )
        return self

    def chunk_indices(self) -> tuple[int, ...] | None:
        return tuple(int(c) for c in self.chunks.split(",")) if self.chunks else None


class TelemetryConfig(_FrozenModel):
    """What the plugin measures and logs."""

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


class PluginConfig(_FrozenModel):
    """The whole plugin configuration; each component receives only its own section."""

    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="Pipeline schedule.")
    activation_offload: ActivationOffloadConfig = Field(
        default_factory=ActivationOffloadConfig, description="Activation offload."
    )
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig, description="Measurements and logging.")

    def is_default(self) -> bool:
        """True when nothing differs from plain Megatron-core behaviour (every option at its default)."""
        return self == PluginConfig()


@dataclass(frozen=True)
class OptionSpec:
    """One option as every front end sees it: file key ``section.field``, flag, type and help."""

    section: str
    field: str
    flag: str
    type: type
    choices: tuple[Any, ...] | None
    default: Any
    help: str

    @property
    def dotted(self) -> str:
        """The key as written in error messages and documentation (``telemetry.log_patches``)."""
        return f"{self.section}.{self.field}"

    @property
    def is_bool(self) -> bool:
        """Booleans are flag pairs (``--x`` / ``--no-x``) that take no value."""
        return self.type is bool

    @property
    def negative_flag(self) -> str | None:
        """``--no-x`` for a boolean option, else ``None``."""
        return "--no-" + self.flag[2:] if self.is_bool else None

    @property
    def option_strings(self) -> tuple[str, ...]:
        """Every command-line spelling of this option."""
        return (self.flag, self.negative_flag) if self.negative_flag else (self.flag,)


def section_models() -> dict[str, type[BaseModel]]:
    """``{section key: section model}`` in declaration order."""
    sections: dict[str, type[BaseModel]] = {}
    for name, info in PluginConfig.model_fields.items():
        model = info.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise TypeError(f"PluginConfig.{name} must be a section model, got {model!r}")
        sections[name] = model
    return sections


def iter_options() -> Iterator[OptionSpec]:
    """Every option, section by section in declaration order: the one source for flags, keys and docs."""
    yield from _options()


@functools.cache
def _options() -> tuple[OptionSpec, ...]:
    """Build and check the option table once (the models are fixed at import time)."""
    options = tuple(
        _option(section, model, name, info)
        for section, model in section_models().items()
        for name, info in model.model_fields.items()
    )
    _check_unique_flags(options)
    return options


def _option(section: str, model: type[BaseModel], name: str, info: FieldInfo) -> OptionSpec:
    """One field as an :class:`OptionSpec`; a field without flag or description is a programming error."""
    where = f"{model.__name__}.{name}"
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    flag = extra.get("flag")
    if not isinstance(flag, str) or not _FLAG_RE.fullmatch(flag):
        raise TypeError(f"{where}: json_schema_extra['flag'] must be a dashed flag like '--my-option', got {flag!r}")
    if not info.description:
        raise TypeError(f"{where}: add description=... (it is the --help text)")
    annotation, optional = _strip_none(info.annotation)
    choices = _literal_choices(annotation)
    if choices is not None:
        option_type: type = type(choices[0])
    elif isinstance(annotation, type):
        option_type = annotation
    else:
        raise TypeError(f"{where}: use a plain type, a Literal[...] of choices, or either | None; got {annotation!r}")
    if optional and option_type is bool:
        raise TypeError(f"{where}: a bool option is a --x/--no-x pair; it cannot also be None")
    default = info.get_default(call_default_factory=True)
    if optional and default is not None:
        raise TypeError(f"{where}: an optional (| None) option must default to None, the value no flag can give")
    return OptionSpec(section, name, flag, option_type, choices, default, info.description)


def _strip_none(annotation: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None`` (None means "not set": no flag gives it), else ``(annotation, False)``."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return annotation, False


def _literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    """The choices of a ``Literal[...]`` annotation, else ``None``."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    return None


def _check_unique_flags(options: tuple[OptionSpec, ...]) -> None:
    """Two fields must never share a command-line spelling (negations included)."""
    owner: dict[str, str] = {}
    for opt in options:
        for flag in opt.option_strings:
            if flag in owner:
                raise TypeError(f"flag {flag} is declared by both {owner[flag]} and {opt.dotted}")
            owner[flag] = opt.dotted
