"""Host buffers for offloaded activations: allocated once, reused every iteration.

Pinned allocation (``cudaHostAlloc``) is slow and pins physical pages, so the
pool keeps every buffer it hands out and gives it back on the next request of
the same size: a training loop asks for the same sizes each iteration, so after
the first iteration the pool allocates nothing.  Sizes are rounded up to
:data:`ALIGNMENT` bytes, which is also the NVMe tier's write granularity.

The pool is bounded (``max_bytes``): a request that would grow it past the bound
raises :class:`HostPoolExhausted` naming the option, instead of letting the host
run out of memory in the middle of a step.
"""

from __future__ import annotations

import collections
import threading

import torch

ALIGNMENT = 512


class HostPoolExhausted(MemoryError):
    """The pool would grow past its configured bound."""


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to a multiple of :data:`ALIGNMENT` (at least one block)."""
    return max(ALIGNMENT, -(-nbytes // ALIGNMENT) * ALIGNMENT)


class HostPool:
    """A bounded, size-keyed free list of flat ``uint8`` host tensors.

    ``pin``: page-locked buffers (needed for asynchronous device copies).  Only
    possible with a CUDA build of torch; on a CPU-only build the buffers are
    ordinary host memory and the copies are synchronous.
    """

    def __init__(self, max_bytes: int | None = None, *, pin: bool | None = None, option: str = "max_bytes") -> None:
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"{option}={max_bytes!r}: must be a positive number of bytes, or unset for no bound")
        self.max_bytes = max_bytes
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._option = option
        self._free: dict[int, list[torch.Tensor]] = collections.defaultdict(list)
        self._lock = threading.Lock()
        self.reserved_bytes = 0  # everything the pool has allocated and keeps
        self.in_use_bytes = 0
        self.peak_in_use_bytes = 0
        self.allocations = 0  # how many buffers were ever allocated (reuse keeps this flat)

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A host buffer of at least ``nbytes`` bytes (exactly ``aligned(nbytes)``)."""
        size = aligned(nbytes)
        with self._lock:
            free = self._free.get(size)
            if free:
                buf = free.pop()
            else:
                if self.max_bytes is not None and self.reserved_bytes + size > self.max_bytes:
                    raise HostPoolExhausted(
                        f"{self._option}={self.max_bytes}: the host pool holds {self.reserved_bytes} bytes and "
                        f"needs {size} more for an offloaded activation; raise {self._option}, offload fewer "
                        "activations, or add an NVMe tier"
                    )
                buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
                self.reserved_bytes += size
                self.allocations += 1
            self.in_use_bytes += size
            self.peak_in_use_bytes = max(self.peak_in_use_bytes, self.in_use_bytes)
            return buf

    def release(self, buf: torch.Tensor) -> None:
        """Give a buffer back for reuse (its contents are no longer needed)."""
        with self._lock:
            self.in_use_bytes -= buf.numel()
            self._free[buf.numel()].append(buf)

    def clear(self) -> None:
        """Drop the free buffers (those in use stay with their holders)."""
        with self._lock:
            freed = sum(b.numel() for bufs in self._free.values() for b in bufs)
            self._free.clear()
            self.reserved_bytes -= freed
