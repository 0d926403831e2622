"""The activation offload engine: saved-for-backward tensors, moved off the device and back.

The unit of offload is whatever the caller names: a (model chunk, microbatch)
of a pipeline schedule, a checkpointed region, one layer's call.  Inside
``with engine.capture(unit):`` every tensor autograd saves for backward is
handed to the engine's pack hook.  ``offload(unit)`` copies the unit's saved
storages to host buffers (:class:`.host_pool.HostPool`) and drops the device
copies; ``reload(unit)`` brings them back (a prefetch, launched ahead of the
backward by the schedule); unpacking a tensor whose unit is still off the
device reloads it on demand.  Round trips copy bytes, so they are bitwise
lossless.

What stays on the device: tensors under ``min_tensor_bytes`` (per storage),
the ``exclude`` storages (the model's parameters: a Linear saves its weight),
and tensors without a plain storage (meta, sparse, wrapper subclasses).
Views of one storage are offloaded once: the engine copies whole storages and
rebuilds each view from (dtype, size, stride, offset).

Accounting chains with the hooks that were active when ``capture`` was entered
(the activation-memory tracker): a storage is handed to the outer pack hook
while it is on the device and released when it leaves, so the tracker's
figure is what is *resident* for backward, not what was saved.

Tensors the caller keeps alive itself (the pipeline's received input, which
backward needs as the leaf its gradient lands on) are registered with
:meth:`hold`: their ``.data`` is swapped out on offload and back on reload,
as Megatron does with pipeline outputs (``deallocate_output_tensor``).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..telemetry.activation_memory import active_saved_tensor_hooks
from .copies import HostCopies, Ticket, make_copies
from .host_pool import HostPool

UnitKey = Hashable
_StorageKey = tuple[torch.device, int]


class OffloadStateError(RuntimeError):
    """The engine was asked for something its state cannot give (a bug in the caller's order)."""


def _storage_key(t: torch.Tensor) -> _StorageKey:
    return (t.device, t.untyped_storage().data_ptr())


def _flat_bytes(storage_of: torch.Tensor) -> torch.Tensor:
    """A ``uint8`` tensor over the whole storage of ``storage_of`` (no autograd history)."""
    return torch.empty(0, dtype=torch.uint8, device=storage_of.device).set_(storage_of.untyped_storage())


def _view(flat: torch.Tensor, dtype: torch.dtype, size: torch.Size, stride: tuple[int, ...], offset: int) -> torch.Tensor:
    return torch.empty(0, dtype=dtype, device=flat.device).set_(flat.untyped_storage(), offset, size, stride)


class _Storage:
    """One device storage of a unit: resident (``flat`` set) or on the host (``host`` set)."""

    __slots__ = ("unit", "nbytes", "flat", "accounting", "counted", "host", "d2h", "h2d", "released", "live", "nvme_key", "held")

    def __init__(self, unit: "_Unit", flat: torch.Tensor, accounting: Any, counted: bool) -> None:
        self.unit = unit
        self.counted = counted  # saved by autograd (so the outer hooks count it while resident)
        self.nbytes = flat.numel()
        self.flat: torch.Tensor | None = flat
        self.accounting = accounting  # the outer hooks' handle while resident (keeps the tracker's count)
        self.host: torch.Tensor | None = None
        self.d2h: Ticket | None = None
        self.h2d: Ticket | None = None
        self.released = False
        self.live = 0  # packed handles autograd still holds (0: nothing will read it again)
        self.nvme_key: str | None = None  # NVMe tier: the swap file holding it while offloaded
        self.held = False  # also the data of a tensor the caller keeps (see OffloadEngine.hold)


class _Saved:
    """What the pack hook returns for an offloadable tensor: its storage and how to view it."""

    __slots__ = ("storage", "dtype", "size", "stride", "offset")

    def __init__(self, storage: _Storage, t: torch.Tensor) -> None:
        storage.live += 1
        self.storage = storage
        self.dtype = t.dtype
        self.size = t.size()
        self.stride = t.stride()
        self.offset = t.storage_offset()

    def __del__(self) -> None:
        storage = getattr(self, "storage", None)
        if storage is not None:
            storage.live -= 1
            if storage.live == 0 and storage.host is None and not storage.held:
                # Autograd dropped the last handle (its backward ran): the engine's own
                # references go now, so the bytes leave the tracker's count at once.
                storage.flat = storage.accounting = None


class _Kept:
    """A tensor that stays on the device (small, a parameter, or no plain storage)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _Held:
    """A tensor the caller keeps (not saved by autograd) whose data moves with the unit."""

    __slots__ = ("tensor", "storage", "dtype", "size", "stride", "offset")

    def __init__(self, tensor: torch.Tensor, storage: _Storage) -> None:
        self.tensor = tensor
        self.storage = storage
        self.dtype, self.size, self.stride, self.offset = tensor.dtype, tensor.size(), tensor.stride(), tensor.storage_offset()


@dataclass
class _Unit:
    key: UnitKey
    storages: list[_Storage]
    held: list[_Held]
    outer: tuple[Callable, Callable] | None = None  # the accounting hooks active at capture
    state: str = "captured"  # captured -> offloaded -> resident (after reload)


@dataclass
class OffloadStats:
    """Counters since the last :meth:`OffloadEngine.take_stats`."""

    offloaded_bytes: int = 0
    reloaded_bytes: int = 0
    offloaded_units: int = 0
    d2h_seconds: float = 0.0
    h2d_seconds: float = 0.0
    exposed_seconds: float = 0.0  # time the host waited for a copy (CPU: every copy)
    on_demand_reloads: int = 0  # units reloaded at unpack because no prefetch was issued
    nvme_written_bytes: int = 0  # NVMe tier: bytes written to swap files (unpadded)
    nvme_read_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in vars(self).items()}


class OffloadEngine:
    """Captures saved tensors per unit and moves them between the device and a host pool."""

    def __init__(
        self,
        *,
        device: torch.device | str | None = None,
        pool: HostPool | None = None,
        min_tensor_bytes: int = 65536,
        exclude: Iterable[torch.Tensor] = (),
        nvme: Any = None,
    ) -> None:
        """``nvme``: an :class:`.nvme.AioSwapper`; offloaded storages then live in its swap files
        and host memory holds them only in transit (page-locked aio buffers)."""
        if min_tensor_bytes < 0:
            raise ValueError(f"min_tensor_bytes={min_tensor_bytes!r}: must be >= 0")
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.pool = pool if pool is not None else HostPool()
        self.min_tensor_bytes = min_tensor_bytes
        self._exclude = tuple(exclude)
        self._excluded_keys: set[_StorageKey] = set()
        self.copies = make_copies(self.device)
        self._units: dict[UnitKey, _Unit] = {}
        self._resident_by_key: dict[_StorageKey, _Storage] = {}
        self._lock = threading.RLock()
        self.stats = OffloadStats()
        self._pending_host_release: list[tuple[Ticket, torch.Tensor]] = []
        self._timed: list[tuple[str, Ticket]] = []
        self.nvme = nvme
        self._nvme_keys = itertools.count()
        self._free_nvme_keys: list[str] = []

    def set_exclude(self, tensors: Iterable[torch.Tensor]) -> None:
        """Storages that always stay (the model's parameters; read at each capture, so
        ``param.data = ...`` rebinding is seen)."""
        self._exclude = tuple(tensors)

    # ----------------------------------------------------------------- capture
    @contextlib.contextmanager
    def capture(self, unit: UnitKey) -> Iterator[None]:
        """Saved tensors packed inside this block belong to ``unit`` (nested captures: the innermost)."""
        with self._lock:
            if unit in self._units:
                raise OffloadStateError(f"offload unit {unit!r} is captured twice without release()")
            outer = active_saved_tensor_hooks()
            # A capture nested in another engine capture accounts through the same outer hooks,
            # not through the enclosing capture (which would copy the storage a second time).
            outer = getattr(outer[0], "accounting_hooks", outer) if outer is not None else None
            record = _Unit(unit, [], [], outer)
            self._units[unit] = record
            self._excluded_keys = {_storage_key(t) for t in self._exclude if t.untyped_storage().nbytes()}
        pack, unpack = self._hooks(record, outer)
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    def _hooks(self, record: _Unit, outer: tuple[Callable, Callable] | None) -> tuple[Callable, Callable]:
        outer_pack, outer_unpack = outer if outer is not None else (None, None)

        def keep(t: torch.Tensor) -> _Kept:
            if outer_pack is not None:
                return _Kept(outer_pack(t))
            # Holding a tensor with history from its own saved slot forms a cycle gc cannot free.
            return _Kept(t.detach() if t.requires_grad else t)

        def pack(t: torch.Tensor) -> _Kept | _Saved:
            if not self._offloadable(t):
                return keep(t)
            key = _storage_key(t)
            with self._lock:
                storage = self._resident_by_key.get(key)
                if storage is not None and storage.flat is None:
                    storage = None  # stale: that storage left the device (its address may be reused)
                if storage is not None and storage.unit is not record:
                    # Saved by two units (a cached mask, a shared buffer): it lives as long as
                    # either needs it, so this unit keeps it on the device as is.
                    return keep(t)
                if storage is None:
                    flat = _flat_bytes(t)
                    storage = _Storage(record, flat, outer_pack(flat) if outer_pack is not None else None, True)
                    record.storages.append(storage)
                    self._resident_by_key[key] = storage
            return _Saved(storage, t)

        def unpack(packed: _Kept | _Saved) -> torch.Tensor:
            if isinstance(packed, _Kept):
                return outer_unpack(packed.value) if outer_unpack is not None else packed.value
            storage = packed.storage
            flat = storage.flat
            if flat is None or storage.h2d is not None:
                flat = self._ensure_resident(storage)
            return _view(flat, packed.dtype, packed.size, packed.stride, packed.offset)

        pack.accounting_hooks = outer  # type: ignore[attr-defined]
        return pack, unpack

    def _offloadable(self, t: torch.Tensor) -> bool:
        if isinstance(t, torch.nn.Parameter) or is_traceable_wrapper_subclass(t) or t.is_meta or t.layout is not torch.strided or t.device != self.device:
            return False
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        return nbytes >= max(1, self.min_tensor_bytes) and _storage_key(t) not in self._excluded_keys

    def hold(self, unit: UnitKey, tensor: torch.Tensor | None) -> None:
        """Move ``tensor``'s data with ``unit`` (a tensor the caller keeps alive itself)."""
        if tensor is None or tensor.device != self.device or not tensor.untyped_storage().nbytes():
            return
        with self._lock:
            record = self._record(unit)
            key = _storage_key(tensor)
            storage = next((s for s in record.storages if s.flat is not None and _storage_key(s.flat) == key), None)
            if storage is None:  # not saved by autograd: moved, but not counted as saved
                storage = _Storage(record, _flat_bytes(tensor), None, False)
                record.storages.append(storage)
            storage.held = True
            record.held.append(_Held(tensor, storage))

    def _record(self, unit: UnitKey) -> _Unit:
        try:
            return self._units[unit]
        except KeyError:
            raise OffloadStateError(f"offload unit {unit!r} was never captured (or already released)") from None

    # ------------------------------------------------------------ transfers
    def offload(self, unit: UnitKey) -> int:
        """Copy the unit's storages to host buffers and free them on the device; returns bytes moved."""
        with self._lock:
            record = self._record(unit)
            if record.state == "offloaded":
                raise OffloadStateError(f"offload unit {unit!r} is already offloaded")
            moved = 0
            held_storages = {id(h.storage) for h in record.held}
            for storage in record.storages:
                if storage.flat is None:
                    continue
                self._resident_by_key.pop(_storage_key(storage.flat), None)
                if storage.live == 0 and id(storage) not in held_storages:
                    # Saved and already dropped (a recompute inside backward): nothing to keep.
                    storage.flat = storage.accounting = None  # no host copy: reload skips it
                    continue
                host = self.nvme.buffer(storage.nbytes) if self.nvme is not None else self.pool.acquire(storage.nbytes)
                ticket = self.copies.d2h(storage.flat, host)
                storage.host, storage.d2h = host, ticket
                storage.flat = None
                storage.accounting = None  # the tracker stops counting it: it left the device
                moved += storage.nbytes
                self._count_copy(ticket, "d2h")
            for held in record.held:
                held.tensor.data = torch.empty(0, dtype=held.dtype, device=self.device)
            if self.nvme is not None:
                self._write_to_nvme(record)
            record.state = "offloaded"
            self.stats.offloaded_bytes += moved
            self.stats.offloaded_units += 1
            return moved

    def reload(self, unit: UnitKey) -> None:
        """Start bringing the unit back (a prefetch); unpacking waits for it."""
        with self._lock:
            record = self._record(unit)
            if record.state != "offloaded":
                raise OffloadStateError(f"offload unit {unit!r} is {record.state}, not offloaded: nothing to reload")
            if self.nvme is not None:
                self._read_from_nvme(record.storages)
            for storage in record.storages:
                self._start_reload(storage)
            for held in record.held:
                held.tensor.data = _view(held.storage.flat, held.dtype, held.size, held.stride, held.offset)
            record.state = "resident"

    def _write_to_nvme(self, record: _Unit) -> None:
        """NVMe tier: the unit's host copies go to swap files; the host buffers are freed once written.

        The write completes inside this call (the host blocks, the device keeps computing what
        was queued), so an I/O error is raised here, naming the file and size, while every
        tensor is still intact in its host buffer."""
        written = [s for s in record.storages if s.host is not None and s.nvme_key is None]
        for storage in written:
            if storage.d2h is not None:
                storage.d2h.synchronize()
            storage.nvme_key = self._free_nvme_keys.pop() if self._free_nvme_keys else f"act-{next(self._nvme_keys)}"
            self.nvme.write_buffer(storage.nvme_key, storage.host, storage.nbytes)
        self.nvme.wait()
        for storage in written:
            self.nvme.release_buffer(storage.host)
            storage.host = None
        self.stats.nvme_written_bytes += sum(s.nbytes for s in written)

    def _read_from_nvme(self, storages: list[_Storage]) -> None:
        """NVMe tier: bring the storages' swap files back into (page-locked) host buffers."""
        reading = [s for s in storages if s.nvme_key is not None and s.host is None and s.flat is None]
        for storage in reading:
            storage.host = self.nvme.buffer(storage.nbytes)
            self.nvme.read_buffer(storage.nvme_key, storage.host)
        self.nvme.wait()
        for storage in reading:
            self._free_nvme_keys.append(storage.nvme_key)
            storage.nvme_key = None
        self.stats.nvme_read_bytes += sum(s.nbytes for s in reading)

    def _start_reload(self, storage: _Storage) -> None:
        if storage.released:
            raise OffloadStateError(f"offload unit {storage.unit.key!r} was released while its tensors were still needed")
        if storage.flat is None and storage.host is None and storage.nvme_key is not None:
            self._read_from_nvme([storage])
        if storage.flat is not None or storage.host is None:
            return
        flat, ticket = self.copies.h2d(storage.host, self.device, storage.nbytes, storage.d2h)
        storage.flat, storage.h2d = flat, ticket
        self._pending_host_release.append((ticket, storage.host))
        storage.host = None
        outer = storage.unit.outer
        if storage.counted and outer is not None:
            storage.accounting = outer[0](flat)  # resident again: the tracker counts it again
        self._count_copy(ticket, "h2d")
        self.stats.reloaded_bytes += storage.nbytes
        self._release_finished_host_buffers()

    def ensure_resident(self, unit: UnitKey) -> None:
        """Before the unit's backward: reload it now if no prefetch did (counted as on demand)."""
        with self._lock:
            if self._record(unit).state == "offloaded":
                self.stats.on_demand_reloads += 1
                self.reload(unit)

    def _ensure_resident(self, storage: _Storage) -> torch.Tensor:
        """For unpack: the storage on the device, the compute stream ordered after its reload."""
        with self._lock:
            if storage.released:
                raise OffloadStateError(
                    f"offload unit {storage.unit.key!r} was released while its tensors were still needed"
                )
            if storage.flat is None:
                record = storage.unit
                if record.state == "offloaded":
                    self.ensure_resident(record.key)
                else:
                    self._start_reload(storage)
            ticket = storage.h2d
            storage.h2d = None
            flat = storage.flat
        if ticket is not None:
            ticket.wait()  # GPU: the compute stream waits (timed at settle); CPU: already done
        assert flat is not None
        return flat

    def _count_copy(self, ticket: Ticket, direction: str) -> None:
        if isinstance(self.copies, HostCopies):
            seconds = ticket.seconds()
            self._add_seconds(direction, seconds, seconds)
        else:
            self._timed.append((direction, ticket))  # read once the events have ended
            self._fold_ended_timings()

    def _add_seconds(self, direction: str, copy_s: float, exposed_s: float) -> None:
        setattr(self.stats, f"{direction}_seconds", getattr(self.stats, f"{direction}_seconds") + copy_s)
        self.stats.exposed_seconds += exposed_s

    def _fold_ended_timings(self) -> None:
        """GPU: add the copies that have ended to the stats, oldest first, without blocking.

        Not every loop calls :meth:`take_stats` (Megatron-LM's own, through the launcher,
        never does), so the events must not wait for it: they would pile up every step.
        Folding stops at the first copy still in flight (or whose compute wait has not
        been reached), so the sums are added in issue order, as ``take_stats`` would.
        A copy that ended before anything waited for it was hidden: a wait recorded
        after this fold would measure a negative, i.e. zero, exposure.
        """
        ended = 0
        for direction, ticket in self._timed:
            if not ticket.done() or (ticket.compute_wait is not None and not ticket.compute_wait.query()):
                break
            self._add_seconds(direction, ticket.seconds(), ticket.exposed_seconds())
            ended += 1
        del self._timed[:ended]

    def _settle_timings(self) -> None:
        """GPU: turn ended copies' events into seconds (copy time, and the part compute waited for)."""
        for direction, ticket in self._timed:
            ticket.synchronize()
            if ticket.compute_wait is not None:
                ticket.compute_wait.synchronize()
            self._add_seconds(direction, ticket.seconds(), ticket.exposed_seconds())
        self._timed.clear()

    def _release_finished_host_buffers(self, wait: bool = False) -> None:
        keep = []
        for ticket, host in self._pending_host_release:
            if wait:
                ticket.synchronize()
            if ticket.done():
                self._give_back(host)
            else:
                keep.append((ticket, host))
        self._pending_host_release = keep

    def _give_back(self, host: torch.Tensor) -> None:
        """A host buffer back where it came from: the NVMe tier's aio buffers, else the pool."""
        if self.nvme is not None:
            self.nvme.release_buffer(host)
        else:
            self.pool.release(host)

    # ------------------------------------------------------------ lifecycle
    def is_offloaded(self, unit: UnitKey) -> bool:
        with self._lock:
            record = self._units.get(unit)
            return record is not None and record.state == "offloaded"

    def units(self) -> list[UnitKey]:
        with self._lock:
            return list(self._units)

    def release(self, unit: UnitKey) -> None:
        """Forget the unit (its backward ran): host buffers it still holds go back to the pool."""
        with self._lock:
            record = self._units.pop(unit, None)
            if record is None:
                return
            for storage in record.storages:
                if storage.host is not None:
                    if storage.d2h is not None:
                        storage.d2h.synchronize()
                    self._give_back(storage.host)
                if storage.nvme_key is not None:
                    self._free_nvme_keys.append(storage.nvme_key)
                    storage.nvme_key = None
                if storage.flat is not None:
                    self._resident_by_key.pop(_storage_key(storage.flat), None)
                # Break the storage <-> unit cycle now: the tracker's count must drop when the
                # backward is done, not whenever the garbage collector runs.
                storage.host = storage.flat = storage.accounting = None
                storage.released = True
            record.storages.clear()
            record.held.clear()

    def step_finished(self) -> None:
        """End of an iteration: every unit must have been released; host buffers settle."""
        with self._lock:
            left = list(self._units)
            self._release_finished_host_buffers(wait=True)
            self._fold_ended_timings()
            if left:
                for unit in left:
                    self.release(unit)
                raise OffloadStateError(f"offload units never released after their backward: {left}")
            self._resident_by_key.clear()

    def take_stats(self) -> dict[str, Any]:
        """This period's counters plus the host pool's size; the counters restart."""
        with self._lock:
            self._settle_timings()
        out = self.stats.to_dict()
        out["host_pool_bytes"] = self.pool.reserved_bytes
        out["host_pool_peak_in_use_bytes"] = self.pool.peak_in_use_bytes
        if self.nvme is not None:
            out["aio_buffer_bytes"] = self.nvme.locked_bytes  # page-locked transit buffers of the NVMe tier
        self.stats = OffloadStats()
        return out

    def close(self) -> None:
        with self._lock:
            for unit in list(self._units):
                self.release(unit)
            self._release_finished_host_buffers(wait=True)
            self.pool.clear()
