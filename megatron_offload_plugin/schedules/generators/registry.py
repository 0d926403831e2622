"""Schedules by name: ``register_schedule(name, fn)``, ``get_generator(name)``, ``generate(...)``.

A generator is a pure function of a :class:`ScheduleRequest` that returns a
compute-only :class:`~..ir.Schedule` (F, B, W, BW).  It checks what it needs
from the request first and raises ``ValueError`` naming the option, the value
and what is accepted.  :func:`generate` names the result and validates it.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from ..costs import CostModel
from ..ir import Schedule
from ..validate import validate


@dataclass(frozen=True)
class ScheduleRequest:
    """What a generator is asked for.

    ``costs`` are used by the cost-aware generators (``zb-v``, ``auto``);
    ``memory_limit`` (activation units per device) by those that search under a
    limit; ``options`` holds generator-specific settings (documented by each).
    """

    pp: int
    microbatches: int
    vpp: int | None = None
    costs: CostModel = field(default_factory=CostModel)
    memory_limit: float | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("pp", "microbatches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        if self.vpp is not None and (not isinstance(self.vpp, int) or self.vpp < 1):
            raise ValueError(f"vpp={self.vpp!r}: must be a positive integer")
        if self.memory_limit is not None and not self.memory_limit > 0:
            raise ValueError(f"memory_limit={self.memory_limit!r}: must be a positive number of activation units")

    def with_(self, **changes: Any) -> ScheduleRequest:
        return replace(self, **changes)


class ScheduleGenerator(Protocol):
    def __call__(self, request: ScheduleRequest) -> Schedule: ...


@dataclass(frozen=True)
class _Entry:
    fn: ScheduleGenerator
    description: str


_REGISTRY: dict[str, _Entry] = {}


def register_schedule(name: str, fn: ScheduleGenerator, *, description: str = "", overwrite: bool = False) -> None:
    """Register ``fn`` under ``name``; replacing an existing name needs ``overwrite=True`` (and warns)."""
    if not callable(fn):
        raise TypeError(f"register_schedule({name!r}, ...): generator must be callable, got {type(fn).__name__}")
    if name in _REGISTRY:
        if not overwrite:
            raise ValueError(f"schedule {name!r} is already registered; pass overwrite=True to replace it")
        warnings.warn(f"replacing the generator registered as schedule {name!r}", stacklevel=2)
    _REGISTRY[name] = _Entry(fn, description)


def available_schedules() -> list[str]:
    """Registered names, in registration order."""
    return list(_REGISTRY)


def describe_schedules() -> dict[str, str]:
    return {name: e.description for name, e in _REGISTRY.items()}


def unknown_schedule_message(name: str, option: str = "schedule") -> str:
    names = available_schedules()
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.4)
    hint = f" did you mean {close[0]!r}?" if close else ""
    return f"{option}={name!r}: unknown schedule;{hint} accepted: {', '.join(names)}"


def get_generator(name: str) -> ScheduleGenerator:
    try:
        return _REGISTRY[name].fn
    except KeyError:
        raise ValueError(unknown_schedule_message(name)) from None


def generate(name: str, pp: int | ScheduleRequest, microbatches: int | None = None, **kwargs: Any) -> Schedule:
    """``generate('zb-h1', 4, 16)`` or ``generate('auto', request)``: build, name and validate."""
    if isinstance(pp, ScheduleRequest):
        if microbatches is not None or kwargs:
            raise TypeError("generate(name, request) takes no further arguments")
        request = pp
    else:
        if microbatches is None:
            raise TypeError("generate(name, pp, microbatches, ...) needs microbatches")
        request = ScheduleRequest(pp, microbatches, **kwargs)
    schedule = get_generator(name)(request)
    if schedule.name != name:
        schedule = replace(schedule, name=name)
    validate(schedule)
    return schedule


def check_request(request: ScheduleRequest, schedule: str, *, vpp: tuple[int | None, ...] = (None, 1),
                  min_microbatches: int = 1, min_pp: int = 1) -> None:
    """Common checks with messages that name the option, the value and what is accepted."""
    if request.vpp not in vpp:
        accepted = " or ".join("unset" if v is None else str(v) for v in vpp)
        raise ValueError(f"vpp={request.vpp}: schedule {schedule!r} accepts vpp {accepted}")
    if request.pp < min_pp:
        raise ValueError(f"pp={request.pp}: schedule {schedule!r} needs pp >= {min_pp}")
    if request.microbatches < min_microbatches:
        raise ValueError(
            f"microbatches={request.microbatches}: schedule {schedule!r} at pp={request.pp} needs at least "
            f"{min_microbatches} microbatches; raise the microbatch count or pick another schedule"
        )
