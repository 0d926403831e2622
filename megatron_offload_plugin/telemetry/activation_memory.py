"""Peak activation memory, measured: the bytes held for backward at each moment.

On a GPU the CUDA allocator knows (``max_memory_allocated`` above a baseline).
On a CPU there is no allocator peak to read, so :class:`SavedTensorTracker`
counts what autograd keeps for backward. Definition, which every number it
reports follows:

* A *saved tensor* is one that autograd hands to the tracker's pack hook
  while ``tracker.track()`` is active (ops' own saves and
  ``ctx.save_for_backward``).  It is held from pack until autograd drops the
  packed handle: its graph is freed after backward, or the outputs are
  deleted without backward.
* Bytes are counted per *storage*, not per tensor: a saved view counts its
  whole storage (it keeps all of it alive), and a storage saved several
  times (ReLU's output that the next Linear also saves) counts once.  The
  size is ``untyped_storage().nbytes()`` at the moment the storage is first
  saved.  Zero-size and meta storages count 0.
* Storages of the ``exclude`` tensors (the model's parameters: the weight a
  Linear saves is not an activation) count 0.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

logger = logging.getLogger("megatron_offload_plugin.telemetry")

TrackerMode = Literal["auto", "saved-tensors", "cuda", "off"]
_MODES: tuple[str, ...] = ("auto", "saved-tensors", "cuda", "off")

_StorageKey = tuple[torch.device, int]
_Pack = Callable[[torch.Tensor], Any]
_Unpack = Callable[[Any], torch.Tensor]


@runtime_checkable
class ActivationTracker(Protocol):
    """What a training loop needs from a tracker: a block to measure, and its numbers."""

    def track(self) -> contextlib.AbstractContextManager[None]: ...

    def reset_peak(self) -> None: ...

    @property
    def current_bytes(self) -> int: ...

    @property
    def peak_bytes(self) -> int: ...


def active_saved_tensor_hooks() -> tuple[_Pack, _Unpack] | None:
    """The (pack, unpack) pair active on this thread, or None; private torch API, so guarded."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:  # pragma: no cover - depends on the torch build
        logger.warning("torch has no _top_saved_tensors_default_hooks: outer saved-tensor hooks are shadowed")
        return None
    return top(False)


def _storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages a saved tensor keeps alive (a wrapper subclass such as DTensor: its inner tensors')."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
        return [s for name in names for s in _storages(getattr(t, name))]
    if t.is_meta:
        return []
    try:
        return [t.untyped_storage()]
    except (RuntimeError, NotImplementedError):
        # Sparse and other storage-less layouts: no storage to see, so nothing is counted.
        logger.warning("activation tracker: cannot see the storage of a %s tensor; not counted", t.layout)
        return []


def _key(storage: torch.UntypedStorage) -> _StorageKey:
    return (storage.device, storage.data_ptr())


class _Entry:
    """One counted storage: its bytes and how many live handles hold it."""

    __slots__ = ("key", "nbytes", "refs", "storage_ref")

    def __init__(self, key: _StorageKey, storage: torch.UntypedStorage) -> None:
        self.key = key
        self.nbytes = storage.nbytes()
        self.refs = 0
        # Detects a reused address: if this storage died (an outer hook kept a copy elsewhere)
        # and a new one got its address, the new one must not be merged into this entry.
        self.storage_ref = StorageWeakRef(storage)


class _Handle:
    """What the pack hook returns: the saved value, and the entries released when autograd drops it.

    Release is a lock-free ``deque.append`` in ``__del__``: a finalizer can run inside a
    garbage collection triggered while this thread holds the tracker's lock, so it must
    never take that lock itself.  The tracker settles released entries under its lock
    before it counts anything new or reports a number.
    """

    __slots__ = ("value", "_entries", "_released")

    def __init__(self, value: Any, entries: list[_Entry], released: collections.deque[_Entry]) -> None:
        self.value = value
        self._entries = entries
        self._released = released

    def __del__(self) -> None:
        released = getattr(self, "_released", None)
        if released is not None:
            released.extend(getattr(self, "_entries", ()))


class SavedTensorTracker:
    """Bytes of unique storages saved for backward and still held; peak since ``reset_peak``.

    Thread-safe: forward may pack on one thread while backward releases on another.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        # Kept as tensors, read when track() is entered, so ``param.data = ...`` (Megatron's
        # contiguous parameter buffer, ``model.cuda()``) is seen with its current storage.
        self._exclude: tuple[torch.Tensor, ...] = tuple(exclude)
        self._lock = threading.Lock()
        self._released: collections.deque[_Entry] = collections.deque()
        self._by_key: dict[_StorageKey, _Entry] = {}
        self._live = 0
        self._current = 0
        self._peak = 0

    @property
    def current_bytes(self) -> int:
        with self._lock:
            self._settle()
            return self._current

    @property
    def peak_bytes(self) -> int:
        with self._lock:
            self._settle()
            return self._peak

    @property
    def live_storages(self) -> int:
        """How many distinct storages are counted now."""
        with self._lock:
            self._settle()
            return self._live

    def reset_peak(self) -> None:
        """Start a new peak window at the current bytes."""
        with self._lock:
            self._settle()
            self._peak = self._current

    def _settle(self) -> None:
        """Apply the releases queued by dropped handles; caller holds the lock."""
        while self._released:
            entry = self._released.popleft()
            entry.refs -= 1
            if entry.refs == 0:
                self._current -= entry.nbytes
                self._live -= 1
                if self._by_key.get(entry.key) is entry:
                    del self._by_key[entry.key]

    def _acquire(self, storages: list[torch.UntypedStorage]) -> list[_Entry]:
        with self._lock:
            self._settle()  # a dropped handle's storage may be freed and its address reused now
            entries = []
            for storage in storages:
                key = _key(storage)
                entry = self._by_key.get(key)
                if entry is None or entry.storage_ref.expired():
                    entry = _Entry(key, storage)
                    self._by_key[key] = entry
                    self._current += entry.nbytes
                    self._live += 1
                    self._peak = max(self._peak, self._current)
                entry.refs += 1
                entries.append(entry)
            return entries

    def _hooks(self, outer: tuple[_Pack, _Unpack] | None) -> tuple[_Pack, _Unpack]:
        """A pack/unpack pair for one ``track()`` block, chained to the hooks it was entered inside."""
        excluded = {_key(s) for t in self._exclude for s in _storages(t) if s.nbytes()}
        outer_pack, outer_unpack = outer if outer is not None else (None, None)

        def pack(tensor: torch.Tensor) -> _Handle:
            storages = [s for s in _storages(tensor) if s.nbytes() and _key(s) not in excluded]
            entries = self._acquire(storages) if storages else []
            handle = _Handle(None, entries, self._released)  # releases its entries even if packing fails
            if outer_pack is not None:
                handle.value = outer_pack(tensor)
            else:
                # A tensor with autograd history cannot be held itself: an op that saves its
                # own output would form output -> grad_fn -> handle -> output, a cycle through
                # C++ that gc cannot free (torch's saved_tensors_hooks docs).  Autograd re-wraps
                # such tensors on unpack anyway, so the detached alias (same storage, same
                # version counter) is indistinguishable; other tensors come back identical.
                handle.value = tensor.detach() if tensor.requires_grad else tensor
            return handle

        def unpack(handle: _Handle) -> torch.Tensor:
            return outer_unpack(handle.value) if outer_unpack is not None else handle.value

        pack.owner = self  # type: ignore[attr-defined]
        return pack, unpack

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count what autograd saves inside this block.

        Ordering rule: the innermost hooks see a tensor first.  Entered inside another
        owner's ``saved_tensors_hooks``, the tracker counts each tensor, then passes the
        same tensor to that outer pack hook and keeps what it returns (unpack calls the
        outer unpack), so the outer owner keeps working.  Hooks entered *inside* this
        block replace the tracker's (torch applies only the innermost pair) unless they
        chain the same way; Megatron-core's fine-grained offload does not.  Re-entering
        the same tracker is a no-op.  Hooks are per thread, like torch's.
        """
        outer = active_saved_tensor_hooks()
        if outer is not None and getattr(outer[0], "owner", None) is self:
            yield
            return
        with torch.autograd.graph.saved_tensors_hooks(*self._hooks(outer)):
            yield


class CudaAllocatorTracker:
    """GPU: the allocator's peak above the bytes allocated at ``reset_peak``.

    Counts everything the allocator hands out in the window (activations, and also
    transient workspaces and gradients), on one device.  ``reset_peak`` resets the
    process-wide peak statistics of that device, so other code doing the same shares
    the window.
    """

    def __init__(self, device: torch.device | int | None = None) -> None:
        if not torch.cuda.is_available():
            raise ValueError(_no_gpu_message())
        self._device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        self._baseline = 0
        self.reset_peak()

    def track(self) -> contextlib.AbstractContextManager[None]:
        """Nothing to install: the allocator sees every allocation."""
        return contextlib.nullcontext()

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self._device)
        self._baseline = torch.cuda.memory_allocated(self._device)

    @property
    def current_bytes(self) -> int:
        return max(0, torch.cuda.memory_allocated(self._device) - self._baseline)

    @property
    def peak_bytes(self) -> int:
        return max(0, torch.cuda.max_memory_allocated(self._device) - self._baseline)


class NullTracker:
    """``off``: measures nothing, costs nothing."""

    def track(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def reset_peak(self) -> None:
        pass

    @property
    def current_bytes(self) -> int:
        return 0

    @property
    def peak_bytes(self) -> int:
        return 0


def _no_gpu_message() -> str:
    accepted = ", ".join(repr(m) for m in _MODES if m != "cuda")
    return (
        "telemetry.activation_memory='cuda': no CUDA device is visible to this process "
        f"(torch.cuda.is_available() is False); accepted on this machine: {accepted}"
    )


def make_activation_tracker(mode: TrackerMode, exclude: Iterable[torch.Tensor] = ()) -> ActivationTracker:
    """Build the tracker for ``telemetry.activation_memory``; ``exclude`` is the model's parameters.

    ``auto`` picks the CUDA allocator on a GPU and saved-tensor accounting on a CPU.
    """
    if mode == "auto":
        mode = "cuda" if torch.cuda.is_available() else "saved-tensors"
    if mode == "saved-tensors":
        return SavedTensorTracker(exclude)
    if mode == "cuda":
        return CudaAllocatorTracker()
    if mode == "off":
        return NullTracker()
    raise ValueError(
        f"telemetry.activation_memory={mode!r}: not accepted; accepted: {', '.join(repr(m) for m in _MODES)}"
    )
