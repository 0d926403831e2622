"""Device <-> host copies: side streams and events on a GPU, plain copies on a CPU.

On a GPU each direction has its own stream, so an offload (D2H) and a reload
(H2D) run at the same time as compute and as each other (PCIe and NVLink-C2C
are full duplex).  Ordering rules, which keep the copies from racing compute:

* a copy stream first waits for the compute stream (the data it reads, or the
  memory it writes, was last touched there);
* a device tensor read by a D2H copy is marked used by the copy stream
  (``record_stream``), so the caching allocator does not hand its memory out
  again before the copy has read it;
* a reload waits for the offload of the same data (``wait_event``);
* compute waits for a reload's event before it reads the data (:meth:`Ticket.wait`).

On a CPU build the "device" is host memory too: the copies are real ``copy_``
calls between distinct buffers, done synchronously, so the same engine code is
exercised and tested.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Ticket:
    """One issued copy. ``end`` is a CUDA event, or None for a copy already done."""

    nbytes: int
    end: Any = None
    start: Any = None
    host_seconds: float = 0.0  # CPU copies: their wall time (all of it exposed)
    waited: bool = field(default=False)
    compute_wait: Any = None  # GPU: event on the compute stream where it started waiting for this copy

    def done(self) -> bool:
        return self.end is None or self.end.query()

    def wait(self) -> float:
        """Make the current stream wait for the copy; returns the seconds the host blocked (0 on GPU)."""
        if self.end is None or self.waited:
            self.waited = True
            return 0.0
        stream = torch.cuda.current_stream()
        self.compute_wait = torch.cuda.Event(enable_timing=True)
        self.compute_wait.record(stream)
        stream.wait_event(self.end)
        self.waited = True
        return 0.0

    def exposed_seconds(self) -> float:
        """GPU, after both ended: how long compute stood waiting for this copy (0 when it was hidden)."""
        if self.compute_wait is None or self.end is None:
            return 0.0
        return max(0.0, self.compute_wait.elapsed_time(self.end) / 1000.0)

    def synchronize(self) -> float:
        """Block the host until the copy ended; returns how long it blocked."""
        if self.end is None:
            return 0.0
        t0 = time.perf_counter()
        self.end.synchronize()
        return time.perf_counter() - t0

    def seconds(self) -> float:
        """Duration of the copy itself (GPU: event timing, after it ended)."""
        if self.end is None:
            return self.host_seconds
        return self.start.elapsed_time(self.end) / 1000.0


class HostCopies:
    """CPU build: synchronous copies between distinct host buffers."""

    asynchronous = False

    def d2h(self, src: torch.Tensor, dst: torch.Tensor) -> Ticket:
        t0 = time.perf_counter()
        dst[: src.numel()].copy_(src)
        return Ticket(src.numel(), host_seconds=time.perf_counter() - t0)

    def h2d(self, src: torch.Tensor, device: torch.device, nbytes: int, after: Ticket | None) -> tuple[torch.Tensor, Ticket]:
        t0 = time.perf_counter()
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst.copy_(src[:nbytes])
        return dst, Ticket(nbytes, host_seconds=time.perf_counter() - t0)


class CudaCopies:
    """GPU: one stream per direction, events for ordering and timing."""

    asynchronous = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.d2h_stream = torch.cuda.Stream(device)
        self.h2d_stream = torch.cuda.Stream(device)

    def _events(self) -> tuple[Any, Any]:
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def d2h(self, src: torch.Tensor, dst: torch.Tensor) -> Ticket:
        start, end = self._events()
        self.d2h_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.d2h_stream):
            start.record()
            dst[: src.numel()].copy_(src, non_blocking=True)
            end.record()
        src.record_stream(self.d2h_stream)
        return Ticket(src.numel(), end=end, start=start)

    def h2d(self, src: torch.Tensor, device: torch.device, nbytes: int, after: Ticket | None) -> tuple[torch.Tensor, Ticket]:
        start, end = self._events()
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)  # owned by the compute stream
        self.h2d_stream.wait_stream(torch.cuda.current_stream(self.device))
        if after is not None and after.end is not None:
            self.h2d_stream.wait_event(after.end)
        with torch.cuda.stream(self.h2d_stream):
            start.record()
            dst.copy_(src[:nbytes], non_blocking=True)
            end.record()
        dst.record_stream(self.h2d_stream)
        return dst, Ticket(nbytes, end=end, start=start)


def make_copies(device: torch.device) -> HostCopies | CudaCopies:
    return CudaCopies(device) if device.type == "cuda" else HostCopies()


def default_copy_lead(device: torch.device) -> int:
    """How many compute steps ahead a reload starts by default: 1 where copies overlap compute
    (a GPU's copy streams), 0 where they are synchronous (a CPU: a lead only holds memory longer)."""
    return 1 if device.type == "cuda" else 0
