"""Measured pipeline timelines: Chrome trace JSON (opens in Perfetto) and bubble rates.

Every rank records (action, start, end) for each action it ran; rank 0 gathers
them and writes one trace with a row per pipeline rank, so a real run can be
read side by side with the simulator's prediction.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .executor import TraceEvent

_COLORS = {"F": "thread_state_running", "B": "rail_response", "W": "good", "BW": "rail_animation"}


def _kind(action: str) -> str:
    for k in ("BW", "F", "B", "W"):
        if k in action.lstrip("0123456789")[:2]:
            return k
    return "F"


def chrome_trace(events: Iterable[TraceEvent], *, origin: float | None = None) -> dict[str, Any]:
    """Chrome trace event format: one complete ("X") event per action, ``pid`` = pipeline rank."""
    events = list(events)
    t0 = min((e.start for e in events), default=0.0) if origin is None else origin
    out = []
    for rank in sorted({e.rank for e in events}):
        out.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"pipeline rank {rank}"}})
    for e in events:
        kind = _kind(e.action)
        out.append({
            "name": e.action, "cat": kind, "ph": "X", "pid": e.rank, "tid": 0,
            "ts": (e.start - t0) * 1e6, "dur": max(0.0, e.end - e.start) * 1e6,
            "cname": _COLORS.get(kind, "generic_work"),
        })
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def write_chrome_trace(events: Iterable[TraceEvent], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chrome_trace(events)))
    return path


def measured_bubble_rates(events: Sequence[TraceEvent]) -> dict[str, float]:
    """Idle fractions from measured events, with the simulator's two definitions.

    ``bubble_rate``: 1 - busy / (ranks x span of the whole step);
    ``steady_bubble_rate``: idle inside each rank's own first-start-to-last-end window.
    """
    if not events:
        return {"bubble_rate": 0.0, "steady_bubble_rate": 0.0}
    ranks = sorted({e.rank for e in events})
    start = min(e.start for e in events)
    end = max(e.end for e in events)
    busy = {r: sum(e.end - e.start for e in events if e.rank == r) for r in ranks}
    span = end - start
    windows = {r: max(e.end for e in events if e.rank == r) - min(e.start for e in events if e.rank == r) for r in ranks}
    total_busy = sum(busy.values())
    bubble = 1.0 - total_busy / (len(ranks) * span) if span > 0 else 0.0
    window_total = sum(windows.values())
    steady = 1.0 - total_busy / window_total if window_total > 0 else 0.0
    return {"bubble_rate": bubble, "steady_bubble_rate": steady}


class ActionTimer:
    """Start/end times of each action of one rank's step.

    On GPU, CUDA events recorded on the compute stream (``perf_counter`` around CUDA
    launches measures launches, not work), read once at the end of the step: times are
    ``perf_counter`` at the step's first event plus device time since it, so one rank's
    actions line up exactly and ranks on one host roughly (their step starts are taken on
    their own host clocks).  On CPU, ``perf_counter`` around each action.
    """

    def __init__(self, trace: "Any", rank: int) -> None:
        import torch

        self.trace = trace
        self.rank = rank
        self.cuda = torch.cuda.is_available() and not _cpu_backend_active()
        self._pending: list[tuple[str, Any, Any]] = []
        self._origin: tuple[float, Any] | None = None
        self._start: Any = None

    def start(self) -> None:
        if self.cuda:
            import torch

            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
            if self._origin is None:
                self._origin = (time.perf_counter(), self._start)
        else:
            self._start = time.perf_counter()

    def end(self, action: str) -> None:
        if self.cuda:
            import torch

            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((action, self._start, end))
        else:
            self.trace.events.append(TraceEvent(self.rank, action, self._start, time.perf_counter()))

    def finish(self) -> None:
        """Read the CUDA events (one synchronisation per step)."""
        if not self._pending:
            return
        self._pending[-1][2].synchronize()
        wall, first = self._origin
        for action, start, end in self._pending:
            self.trace.events.append(TraceEvent(
                self.rank, action, wall + first.elapsed_time(start) / 1e3, wall + first.elapsed_time(end) / 1e3))
        self._pending.clear()

    @property
    def clock(self) -> str:
        return "cuda-events" if self.cuda else "host-perf-counter"


def _cpu_backend_active() -> bool:
    try:
        from ..backends import cpu

        return cpu.is_enabled()
    except ImportError:  # pragma: no cover
        return False


class TraceRecorder:
    """Trace sink for the runtime: gathers every pipeline rank's events when someone reads them.

    The gather (a pickled ``all_gather_object``, a host sync) runs only in iterations whose
    events are used: with a folder (``--pipeline-trace``: writes ``pipeline_trace_iterNNNN.json``
    from pipeline rank 0 of the first data-parallel replica), when ``measure_bubbles`` is set
    (the project's driver logs the measured bubble rate), or when ``auto`` re-plans from them.
    ``last_rates['clock']`` says what the times measure (see :class:`ActionTimer`).
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory else None
        self.iteration = 0
        self.last_rates: dict[str, Any] | None = None
        self.last_events: list[TraceEvent] = []
        self.measure_bubbles = False
        self.extra_iterations: set[int] = set()  # iterations someone else needs (auto's re-plan)

    def wanted(self) -> bool:
        """Whether this iteration's events will be read (else the executor does not time them)."""
        return self.directory is not None or self.measure_bubbles or self.iteration in self.extra_iterations

    def skip(self) -> None:
        """An iteration nobody reads: count it, gather nothing."""
        self.iteration += 1

    def __call__(self, trace: Any) -> None:
        import torch.distributed as dist
        from megatron.core import parallel_state

        group = parallel_state.get_pipeline_model_parallel_group()
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, trace.events, group=group)
        events = [e for rank_events in gathered for e in rank_events]
        self.last_events = events
        self.last_rates = {**measured_bubble_rates(events), "clock": getattr(trace, "clock", "host-perf-counter")}
        first_replica = parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0
        if self.directory is not None and first_replica and parallel_state.get_pipeline_model_parallel_rank() == 0:
            write_chrome_trace(events, self.directory / f"pipeline_trace_iter{self.iteration:04d}.json")
        self.iteration += 1
