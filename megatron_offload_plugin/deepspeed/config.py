"""The ``"layerwise_offload"`` top-level section of a DeepSpeed JSON config.

This module is the one place the section's keys, defaults and meanings live
(the ``description`` of each field).  Example::

    "layerwise_offload": {
      "optimizer_states": {"device": "nvme", "nvme_path": "/local_nvme",
                           "prefetch_layers": 2, "overlap_with_backward": false},
      "activations":      {"device": "none"},
      "aio": {"block_size": 1048576, "queue_depth": 8}
    }

Validation is strict: an unknown key at any level fails naming the closest
valid key and all accepted keys (:func:`parse_section`), and settings that
contradict the rest of the DeepSpeed config fail with the fix
(:func:`check_conflicts`).  DeepSpeed itself keeps unknown top-level sections
without reading them, so nothing else looks at this section.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from ..config.loading import suggest_and_list
from ..config.model import _FrozenModel
from ..offload.nvme import AIO_DIRECTIONS, AIO_KEYS, ALIGNMENT, aio_handle_kwargs

SECTION = "layerwise_offload"

#: The kernel's bound on aio events (``io_setup``), read each time an ``aio`` section is validated.
AIO_MAX_NR_PATH = Path("/proc/sys/fs/aio-max-nr")
#: ``aio_handle`` s one NVMe tier opens: :class:`..offload.nvme.AioSwapper` has one per direction.
HANDLES_PER_TIER = len(AIO_DIRECTIONS)


class _Tier(_FrozenModel):
    """A sub-section with a ``device`` field and an ``nvme_path`` used only with device 'nvme'."""

    key: ClassVar[str]  # the sub-section's name, for messages

    @model_validator(mode="after")
    def _nvme_path_only_with_nvme(self) -> "_Tier":
        device, nvme_path = getattr(self, "device"), getattr(self, "nvme_path")
        if device == "nvme" and not nvme_path:
            raise ValueError(f"{self.key}.device='nvme' needs {self.key}.nvme_path (a directory on the NVMe drive)")
        if device != "nvme" and nvme_path:
            raise ValueError(f"{self.key}.nvme_path is only used with device='nvme' (device={device!r}); "
                             "remove it or set device='nvme'")
        return self


class OptimizerStatesConfig(_Tier):
    """Where optimizer states live between steps, and how the step walks the layers."""

    key: ClassVar[str] = "optimizer_states"

    device: Literal["none", "cpu", "nvme"] = Field(
        "none",
        description=(
            "Tier for the optimizer states (Adam's exp_avg/exp_avg_sq, ...) of every layer between steps. "
            "'none': DeepSpeed keeps them as usual. 'cpu': host memory. 'nvme': files under nvme_path "
            "through DeepSpeed's async I/O (works at ZeRO 0, 1 and 2, where DeepSpeed itself only swaps at ZeRO-3)."
        ),
    )
    nvme_path: str | None = Field(
        None,
        description=(
            "With device='nvme': an existing writable directory on the NVMe drive. A private folder "
            "(0700, files 0600) is made under it per run and removed at exit."
        ),
    )
    prefetch_layers: int = Field(
        2,
        ge=0,
        description=(
            "Layers whose states are fetched ahead of the one being stepped. Resident optimizer-state "
            "memory stays at most (prefetch_layers + 2) layers' worth."
        ),
    )
    overlap_with_backward: bool = Field(
        False,
        description=(
            "Step each layer as soon as its gradients are final in the backward of the "
            "gradient-accumulation boundary, instead of after the whole backward. "
            "ZeRO stage 0, fp32, data-parallel size 1; with gradient clipping the early "
            "step is speculative and is redone for every layer when the global norm turns out above the "
            "clip (see megatron_offload_plugin.deepspeed.overlap)."
        ),
    )



class ActivationsConfig(_Tier):
    """Layer-wise activation offload (hook point: wired by the shared offload engine)."""

    key: ClassVar[str] = "activations"

    device: Literal["none", "cpu", "nvme"] = Field(
        "none",
        description=("Tier for saved-for-backward tensors of the selected modules during forward; prefetched "
                     "in reverse layer order during backward, bitwise lossless. 'none' leaves activations alone."),
    )
    nvme_path: str | None = Field(None, description="With device='nvme': an existing writable directory.")
    min_tensor_bytes: int = Field(
        1048576, ge=0, description="Saved tensors smaller than this stay in memory (offload costs more than it saves)."
    )
    prefetch_layers: int | None = Field(
        None, ge=0,
        description=("Layers reloaded ahead of the one backward is in (unset: 1 on a GPU, where the copy overlaps "
                     "that layer's backward; 0 on a CPU, where copies are synchronous and a prefetch only holds "
                     "memory longer)."),
    )
    modules: Literal["all"] | list[str] = Field(
        "all",
        description=("'all': every transformer layer (each child of the model's layer list); or a list of "
                     "module names or glob patterns over model.named_modules() (e.g. 'layers.*.mlp')."),
    )

    @field_validator("modules")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and (not value or not all(isinstance(v, str) and v for v in value)):
            raise ValueError("activations.modules: expected 'all' or a non-empty list of module names")
        return value


class LayerwiseOffloadConfig(_FrozenModel):
    """The whole ``"layerwise_offload"`` section."""

    optimizer_states: OptimizerStatesConfig = Field(default_factory=OptimizerStatesConfig,
                                                    description="Layer-wise optimizer-state offload.")
    activations: ActivationsConfig = Field(default_factory=ActivationsConfig,
                                           description="Layer-wise activation offload.")
    aio: dict[str, Any] | None = Field(
        None,
        description=("aio_handle settings, same keys as DeepSpeed's own top-level 'aio' section "
                     f"({', '.join(AIO_KEYS)}); DeepSpeed's section is used when this is absent."),
    )

    @model_validator(mode="after")
    def _aio_values(self) -> "LayerwiseOffloadConfig":
        if self.aio is not None:
            check_aio(self.aio, key=f"{SECTION}.aio", tiers=self.nvme_tiers)
        return self

    @property
    def nvme_tiers(self) -> int:
        """How many sub-sections swap to NVMe: each opens its own aio swapper with these settings."""
        return sum(sub.device == "nvme" for sub in (self.optimizer_states, self.activations))

    @property
    def enabled(self) -> bool:
        return self.optimizer_states.device != "none" or self.activations.device != "none"


_SUBMODELS: dict[str, type[BaseModel]] = {"optimizer_states": OptimizerStatesConfig, "activations": ActivationsConfig}


def defaults() -> dict[str, Any]:
    """Every key with its default (the section as written out in full)."""
    return LayerwiseOffloadConfig().model_dump()


def _check_keys(data: Mapping[str, Any]) -> None:
    top = list(LayerwiseOffloadConfig.model_fields)
    for key, value in data.items():
        if key not in top:
            raise ValueError(_unknown(str(key), str(key), top))
        if key in _SUBMODELS:
            if not isinstance(value, Mapping):
                raise ValueError(f"{SECTION}.{key}: expected an object with keys {', '.join(_SUBMODELS[key].model_fields)}, "
                                 f"got {value!r}")
            fields = list(_SUBMODELS[key].model_fields)
            for sub in value:
                if sub not in fields:
                    raise ValueError(_unknown(f"{key}.{sub}", str(sub), fields))
        elif key == "aio" and isinstance(value, Mapping):
            for sub in value:
                if sub not in AIO_KEYS:
                    raise ValueError(_unknown(f"aio.{sub}", str(sub), list(AIO_KEYS)))


def _unknown(dotted: str, key: str, accepted: list[str], section: str = SECTION) -> str:
    return f"{section}.{dotted}: unknown key" + suggest_and_list(key, accepted, ", ".join(accepted))


def _aio_max_nr() -> int | None:
    """``fs.aio-max-nr``, or None where the file is absent or unreadable (not Linux, a sandbox)."""
    try:
        return int(AIO_MAX_NR_PATH.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def check_aio(aio: Mapping[str, Any], *, key: str, tiers: int, note: str = "") -> dict[str, Any]:
    """``aio_handle`` settings the disk and the kernel will take; else ``ValueError`` naming ``key.<field>``.

    * ``block_size``: aio splits each transfer into blocks of this size, each at an
      offset that is a multiple of it, and the files are opened with O_DIRECT, which
      refuses offsets and sizes off a 512-byte boundary; the failure would only come
      at the first transfer, as an I/O error that seems to blame the disk.
    * ``queue_depth``: DeepSpeed's ``aio_handle`` starts ``intra_op_parallelism``
      threads, each calling ``io_setup(queue_depth)`` on a context of its own, and an
      NVMe tier opens :data:`HANDLES_PER_TIER` handles (read, write), so this process
      asks the kernel for ``tiers * 2 * intra_op_parallelism * queue_depth`` events.
      Above ``fs.aio-max-nr`` (a system-wide sum) ``io_setup`` fails and DeepSpeed
      aborts the process on a C++ assertion.  The bound is per process and so only
      necessary: ranks on one node and other programs draw on the same limit
      (``/proc/sys/fs/aio-nr`` is what is in use now).
    """
    root = key.rpartition(".")[0]
    root = root + "." if root else ""
    try:
        kwargs = aio_handle_kwargs(aio)
    except ValueError as err:  # its messages start with "aio"
        raise ValueError(f"{root}{err}{note}") from None
    block = kwargs["block_size"]
    if block % ALIGNMENT:
        raise ValueError(
            f"{key}.block_size={block}: not a multiple of {ALIGNMENT} (aio transfers blocks of this size through "
            f"O_DIRECT, which needs {ALIGNMENT}-byte alignment); accepted: a positive multiple of {ALIGNMENT}, e.g. "
            f"{-(-block // ALIGNMENT) * ALIGNMENT} or the default 1048576{note}"
        )
    limit = _aio_max_nr()
    threads, depth = kwargs["intra_op_parallelism"], kwargs["queue_depth"]
    per_depth = max(1, tiers) * HANDLES_PER_TIER * threads
    if limit is not None and per_depth * depth > limit:
        most = limit // per_depth
        fix = (f"set queue_depth at most {most}" if most >= 1 else "lower intra_op_parallelism")
        raise ValueError(
            f"{key}.queue_depth={depth}: {max(1, tiers)} NVMe tier(s) x {HANDLES_PER_TIER} aio handles (read, write) "
            f"x {threads} thread(s) (intra_op_parallelism) x {depth} = {per_depth * depth} events, above the kernel's "
            f"fs.aio-max-nr={limit} ({AIO_MAX_NR_PATH}), and DeepSpeed's aio_handle would abort the process; "
            f"{fix}, or raise the limit (sysctl -w fs.aio-max-nr=N){note}"
        )
    return kwargs


def parse_section(data: Any) -> LayerwiseOffloadConfig:
    """Validate the section's value; ``ValueError`` with one line per problem, naming the dotted key."""
    if data is None:
        return LayerwiseOffloadConfig()
    if not isinstance(data, Mapping):
        raise ValueError(f"{SECTION}: expected an object with keys {', '.join(LayerwiseOffloadConfig.model_fields)}, "
                         f"got {type(data).__name__}")
    _check_keys(data)
    try:
        return LayerwiseOffloadConfig.model_validate(dict(data))
    except ValidationError as err:
        lines = []
        for item in err.errors():
            loc = ".".join(str(p) for p in item["loc"])
            msg = item["msg"].removeprefix("Value error, ")
            value = item.get("input")
            if not loc and msg.startswith(f"{SECTION}."):  # a whole-section check that names its own key
                lines.append(msg)
                continue
            where = f"{SECTION}.{loc}={value!r}: " if loc and not isinstance(value, Mapping) else f"{SECTION}: "
            lines.append(where + msg)
        raise ValueError("\n".join(lines)) from err


def _as_deepspeed_reads(ds_config: Mapping[str, Any], key: str, read: Callable[[Mapping[str, Any]], Any],
                        accepted: str, needed_by: str) -> Any:
    """The value of ``key`` (``section.field``) that DeepSpeed itself will use; an unresolved ``"auto"`` is refused.

    ``"auto"`` is for HF Trainer / Accelerate, which replace it before they call
    ``deepspeed.initialize``.  One that reaches DeepSpeed 0.19 unresolved is dropped
    without a word (``DeepSpeedConfigModel``) and the default used instead, so the
    check that depends on it would judge a value the user never chose.
    """
    name, _, field = key.partition(".")
    sub = ds_config.get(name)
    raw = sub.get(field) if isinstance(sub, Mapping) else None
    if raw == "auto":
        raise ValueError(
            f"{key}='auto': unresolved at deepspeed.initialize, and {needed_by} depends on it (DeepSpeed drops an "
            f"'auto' it is given and uses its default; HF Trainer / Accelerate replace 'auto' before calling "
            f"deepspeed.initialize); set {key} to {accepted}"
        )
    try:
        return read(ds_config)
    except (ValueError, TypeError):  # DeepSpeed refuses this section itself, with its own message
        return raw


def _fp16_enabled(ds_config: Mapping[str, Any]) -> bool:
    from deepspeed.runtime.precision_config import get_float16_config

    return bool(get_float16_config(ds_config).enabled)


def _zero_stage(ds_config: Mapping[str, Any]) -> int:
    from deepspeed.runtime.zero.config import get_zero_config

    return int(get_zero_config(ds_config).stage)


def check_conflicts(section: LayerwiseOffloadConfig, ds_config: Mapping[str, Any]) -> None:
    """Refuse combinations with the rest of the DeepSpeed config that cannot both hold.

    The settings checked are read as DeepSpeed reads them (``"true"`` is true there);
    an unresolved ``"auto"`` among them is refused, naming the key.
    """
    zero = ds_config.get("zero_optimization") or {}
    opt = section.optimizer_states
    if section.aio is None and section.nvme_tiers and isinstance(ds_config.get("aio"), Mapping):
        _check_deepspeed_aio(ds_config["aio"], section.nvme_tiers)
    if opt.device != "none":
        needed_by = f"{SECTION}.optimizer_states"
        stage = _as_deepspeed_reads(ds_config, "zero_optimization.stage", _zero_stage, "0, 1 or 2", needed_by)
        off = zero.get("offload_optimizer") if isinstance(zero, Mapping) else None
        if isinstance(off, Mapping) and off.get("device", "none") not in (None, "none"):
            raise ValueError(
                f"{SECTION}.optimizer_states.device={opt.device!r} and zero_optimization.offload_optimizer.device="
                f"{off.get('device')!r} both offload the optimizer states; remove zero_optimization.offload_optimizer "
                f"or set {SECTION}.optimizer_states.device='none'"
            )
        if stage == 3:
            raise ValueError(
                f"{SECTION}.optimizer_states with zero_optimization.stage=3: ZeRO-3 has its own optimizer swapping "
                "(zero_optimization.offload_optimizer with device 'nvme'); use stage 0, 1 or 2 with this section"
            )
        if isinstance(zero, Mapping) and zero.get("elastic_checkpoint"):
            raise ValueError(f"{SECTION}.optimizer_states with zero_optimization.elastic_checkpoint=true is not "
                             "supported; set elastic_checkpoint to false")
        if _as_deepspeed_reads(ds_config, "fp16.enabled", _fp16_enabled, "true or false", needed_by) is True:
            raise ValueError(f"{SECTION}.optimizer_states with fp16.enabled=true is not supported yet; "
                             "use bf16 or fp32 training")
        if opt.overlap_with_backward and stage != 0:
            raise ValueError(
                f"{SECTION}.optimizer_states.overlap_with_backward=true needs zero_optimization.stage=0 "
                f"(stage {stage}: ZeRO reduces and partitions gradients in buckets after backward, so a layer's "
                "gradients are not final inside it); set overlap_with_backward=false or use stage 0"
            )
    act = section.activations
    if act.device != "none":
        ckpt = ds_config.get("activation_checkpointing") or {}
        if isinstance(ckpt, Mapping) and ckpt.get("cpu_checkpointing"):
            raise ValueError(
                f"{SECTION}.activations.device={act.device!r} and activation_checkpointing.cpu_checkpointing=true "
                "both move activations; keep one"
            )


def _check_deepspeed_aio(aio: Mapping[str, Any], tiers: int) -> None:
    """DeepSpeed's top-level ``"aio"`` section, which the NVMe tiers use when the section has none."""
    note = f" [DeepSpeed's top-level 'aio' section, which {SECTION} uses as it has no 'aio' of its own]"
    check_aio(aio, key="aio", tiers=tiers, note=note)
