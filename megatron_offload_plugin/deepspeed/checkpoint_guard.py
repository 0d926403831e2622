"""Checkpoints record whether they were saved with the ``"layerwise_offload"`` section; loads across it are refused.

What the section changes in a checkpoint: at ZeRO stage 1 and 2 the optimizer
gets one parameter group per layer (:mod:`.wiring`), and ZeRO saves its fp32
master weights and optimizer states as one flat partition per group.  Such
partitions only load into the same grouping: DeepSpeed notices the difference
only through the per-group padding and fails with "The ZeRO checkpoint
parameter-alignment layout does not match the current
zero_optimization.parameter_alignment setting", which names a setting nobody
changed.  What does *not* change the layout, so is no mismatch:

* ZeRO stage 0: the optimizer keeps DeepSpeed's groups (the section splits them by
  layer only at step time) and its state dict is the inner optimizer's, with or
  without the section;
* ``optimizer_states.device`` 'cpu' vs 'nvme': the store only decides where the
  states live between steps; ``state_dict`` materializes them into the same
  inner optimizer state either way;
* the ``activations`` sub-section, ``prefetch_layers``, ``overlap_with_backward``.

How: :func:`attach_checkpoint_guard` wraps ``save_checkpoint`` and
``load_checkpoint`` on one engine instance (nothing global).  A save first asks
the layer-wise optimizer's ``check_whole()`` (when it has one), then writes
:data:`RECORD_NAME` into the tag folder (rank 0, before DeepSpeed writes
``latest``, so ``latest`` never names a checkpoint without its record).  A load
resolves the tag as DeepSpeed does (``latest``), reads the record and refuses,
before anything is loaded, when the checkpoint's ZeRO partitions and this engine
use different groupings.  A checkpoint without a record (plain DeepSpeed, or a
plugin before this guard) was saved without the section.  Loads that do not read
ZeRO optimizer partitions are not checked: ``load_optimizer_states=False`` and
``load_module_only=True`` restore the fp32 masters from the module weights and
work across the change, and so does anything at stage 0.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from pathlib import Path
from typing import Any

from .config import SECTION, LayerwiseOffloadConfig
from .wiring import layerwise_optimizer

#: File in each checkpoint's tag folder: how the optimizer states of that checkpoint are grouped.
RECORD_NAME = "layerwise_offload.json"
RECORD_FORMAT = 1

PER_LAYER = "per_layer"  # one parameter group per layer (the section at ZeRO-1/2)
DEEPSPEED = "deepspeed"  # the groups DeepSpeed was given (no section, or stage 0)

_GUARDED = "_layerwise_checkpoint_guard"  # attribute on the engine: the section it was built with (or None)
_ZERO_FILES = "*zero_pp_rank_*optim_states.pt"  # DeepSpeed's ZeRO partition files (bf16_ prefix, old pattern too)


class CheckpointLayoutError(ValueError):
    """A checkpoint's optimizer-state layout differs from the engine's (saved with / without the section)."""


def _zero_groups(engine: Any) -> str | None:
    """How this engine's ZeRO-1/2 optimizer groups its partitions; None where no such partitions are read."""
    if engine.zero_optimization_stage() not in (1, 2):
        return None
    return PER_LAYER if layerwise_optimizer(engine) is not None else DEEPSPEED


def _section_summary(section: LayerwiseOffloadConfig | None) -> dict[str, Any] | None:
    if section is None or not section.enabled:
        return None
    return {"optimizer_states": {"device": section.optimizer_states.device},
            "activations": {"device": section.activations.device}}


def _record(engine: Any) -> dict[str, Any]:
    return {"format": RECORD_FORMAT, SECTION: _section_summary(getattr(engine, _GUARDED)),
            "zero_stage": int(engine.zero_optimization_stage()), "zero_param_groups": _zero_groups(engine)}


def _write_record(engine: Any, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{RECORD_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(_record(engine), indent=1, sort_keys=True) + "\n")
    os.replace(tmp, folder / RECORD_NAME)


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """The record in a checkpoint's tag folder, or None when it has none (saved without the plugin's guard)."""
    path = Path(folder) / RECORD_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
        if not isinstance(record, dict) or not isinstance(record.get("format"), int):
            raise ValueError("expected an object with an integer 'format'")
    except ValueError as err:
        raise CheckpointLayoutError(f"{path}: unreadable {SECTION} checkpoint record ({err}); engine.save_checkpoint "
                                    "writes it: save the checkpoint again, or remove the file if the checkpoint was "
                                    f"saved without the '{SECTION}' section") from None
    if record["format"] > RECORD_FORMAT:
        raise CheckpointLayoutError(f"{path}: {SECTION} checkpoint record format {record['format']}, this plugin "
                                    f"reads up to {RECORD_FORMAT}; upgrade megatron-offload-plugin")
    return record


def _saved_groups(record: dict[str, Any] | None, folder: Path) -> str | None:
    if record is not None:
        return record.get("zero_param_groups")
    return DEEPSPEED if any(folder.glob(_ZERO_FILES)) else None  # plain DeepSpeed: its own groups


def _describe(groups: str, section: dict[str, Any] | None, stage: Any, *, record: bool = True) -> str:
    if groups == PER_LAYER:
        device = (section or {}).get("optimizer_states", {}).get("device", "?")
        return (f"with the '{SECTION}' section (optimizer_states.device={device!r}) at ZeRO stage {stage}, "
                "one optimizer parameter group per layer")
    where = f"ZeRO stage {stage}" if stage is not None else "ZeRO"
    if not record:
        return f"without the '{SECTION}' section (it has no {RECORD_NAME}) at {where}, DeepSpeed's own parameter groups"
    return f"without '{SECTION}' optimizer_states at {where}, DeepSpeed's own parameter groups"


def mismatch_message(folder: Path, record: dict[str, Any] | None, saved: str, engine: Any) -> str:
    """The refusal: what the checkpoint was saved with, what this engine has, and the two ways out."""
    current = _zero_groups(engine)
    stage = engine.zero_optimization_stage()
    then = _describe(saved, (record or {}).get(SECTION), (record or {}).get("zero_stage"), record=record is not None)
    now = _describe(current, _section_summary(getattr(engine, _GUARDED)), stage)
    if saved == PER_LAYER:
        resume = (f"add the section back (\"{SECTION}\": {{\"optimizer_states\": {{\"device\": \"cpu\"}}}}, or "
                  "'nvme' with nvme_path: the device does not change the layout)")
    else:
        resume = f"remove the '{SECTION}' section or set {SECTION}.optimizer_states.device='none'"
    return (
        f"{SECTION}: checkpoint {str(folder)!r} was saved {then}; this engine runs {now}. ZeRO-1/2 store the "
        "optimizer states and fp32 master weights as one flat partition per parameter group, so they load only "
        f"into the same grouping. To resume it, {resume}; or, to keep the module weights (and the step count and "
        "LR scheduler) and start the optimizer states afresh from the weights, call "
        "engine.load_checkpoint(..., load_optimizer_states=False) (load_module_only=True for the weights alone)"
    )


def _check_whole(engine: Any) -> None:
    check = getattr(layerwise_optimizer(engine), "check_whole", None)
    if callable(check):
        check()


def _latest_tag(load_dir: str) -> str | None:
    try:
        return Path(load_dir, "latest").read_text().strip()
    except FileNotFoundError:
        return None


def attach_checkpoint_guard(engine: Any, section: LayerwiseOffloadConfig | None) -> None:
    """Record ``section`` in ``engine``'s checkpoints and refuse loads across a layout change (idempotent)."""
    if hasattr(engine, _GUARDED):
        return
    setattr(engine, _GUARDED, section)
    save, load = engine.save_checkpoint, engine.load_checkpoint
    save_sig, load_sig = inspect.signature(save), inspect.signature(load)

    @functools.wraps(save)
    def save_checkpoint(*args: Any, **kwargs: Any) -> Any:
        bound = save_sig.bind(*args, **kwargs)
        bound.apply_defaults()
        save_dir = bound.arguments["save_dir"]
        if not save_dir:  # DeepSpeed's own message
            return save(*bound.args, **bound.kwargs)
        _check_whole(engine)
        if bound.arguments["tag"] is None:  # DeepSpeed's default, fixed here so the record lands beside the files
            bound.arguments["tag"] = f"global_step{engine.global_steps}"
        tag = bound.arguments["tag"] = str(bound.arguments["tag"])
        rank = engine.local_rank if engine.use_node_local_storage() else engine.global_rank
        if rank == 0:
            _write_record(engine, Path(save_dir, tag))
        return save(*bound.args, **bound.kwargs)

    @functools.wraps(load)
    def load_checkpoint(*args: Any, **kwargs: Any) -> Any:
        bound = load_sig.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        current = _zero_groups(engine)
        if (current is None or not a["load_optimizer_states"] or a["load_module_only"]
                or engine.load_universal_checkpoint()):
            return load(*bound.args, **bound.kwargs)
        tag = a["tag"] if a["tag"] is not None else _latest_tag(a["load_dir"])
        if tag is None:  # no 'latest': DeepSpeed warns and returns (None, None)
            return load(*bound.args, **bound.kwargs)
        folder = Path(a["load_dir"], str(tag))
        record = read_record(folder)
        saved = _saved_groups(record, folder)
        if saved is not None and saved != current:
            raise CheckpointLayoutError(mismatch_message(folder, record, saved, engine))
        return load(*bound.args, **bound.kwargs)

    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint


__all__ = ["attach_checkpoint_guard", "CheckpointLayoutError", "RECORD_NAME", "read_record", "mismatch_message"]
