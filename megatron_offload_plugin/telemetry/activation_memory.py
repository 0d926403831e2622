"""Peak activation memory, measured: the bytes held for backward at each moment.

On a GPU the CUDA allocator knows (``max_memory_allocated`` above a baseline).
On a CPU there is no allocator peak to read, so :class:`SavedTensorTracker`
counts what autograd keeps for backward: every tensor passed to a
saved-tensors pack hook is wrapped in a handle; its storage counts while any
handle to it is alive and stops counting when autograd drops the last one
(graph freed by backward, or outputs deleted).  Storages are de-duplicated (a
view keeps its whole storage alive, and a tensor saved by two ops is stored
once), and parameters are excluded (weights a linear saves are not
activations).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Literal, Protocol

import torch

logger = logging.getLogger("megatron_offload_plugin.telemetry")

TrackerMode = Literal["auto", "saved-tensors", "cuda", "off"]


class ActivationTracker(Protocol):
    """What the training loop needs from a tracker."""

    def track(self) -> contextlib.AbstractContextManager[None]: ...

    def reset_peak(self) -> None: ...

    @property
    def current_bytes(self) -> int: ...

    @property
    def peak_bytes(self) -> int: ...


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    storage = t.untyped_storage()
    return (str(t.device), storage.data_ptr())


class _Saved:
    """What the pack hook returns: the tensor plus a finalizer that releases its storage."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        # A detached alias: the same storage without the grad_fn, so a saved output does
        # not form a cycle (output -> grad_fn -> saved handle -> output) that would keep a
        # graph alive after its outputs are dropped without backward.
        self.tensor = tensor.detach()


class SavedTensorTracker:
    """Bytes of unique storages saved for backward and still alive; peak since ``reset_peak``."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._lock = threading.Lock()
        self._excluded = {_storage_key(t) for t in exclude}
        self._refs: dict[tuple[str, int], int] = {}
        self._sizes: dict[tuple[str, int], int] = {}
        self._current = 0
        self._peak = 0

    @property
    def current_bytes(self) -> int:
        return self._current

    @property
    def peak_bytes(self) -> int:
        return self._peak

    @property
    def live_storages(self) -> int:
        return len(self._refs)

    def reset_peak(self) -> None:
        with self._lock:
            self._peak = self._current

    def _acquire(self, key: tuple[str, int], nbytes: int) -> None:
        with self._lock:
            count = self._refs.get(key, 0)
            if count == 0:
                self._sizes[key] = nbytes
                self._current += nbytes
                self._peak = max(self._peak, self._current)
            self._refs[key] = count + 1

    def _release(self, key: tuple[str, int]) -> None:
        with self._lock:
            count = self._refs[key] - 1
            if count:
                self._refs[key] = count
                return
            del self._refs[key]
            self._current -= self._sizes.pop(key)

    def _pack(self, tensor: torch.Tensor) -> object:
        handle = _Saved(tensor)
        if tensor.is_meta:
            return handle
        key = _storage_key(tensor)
        if key in self._excluded:
            return handle
        self._acquire(key, tensor.untyped_storage().nbytes())
        weakref.finalize(handle, self._release, key)
        return handle

    @staticmethod
    def _unpack(handle: object) -> torch.Tensor:
        return handle.tensor  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count what autograd saves inside this block.

        Nesting with other ``saved_tensors_hooks`` owners: the innermost hooks see a
        tensor first, so enter this tracker *outside* hooks that move tensors
        elsewhere (offload) to count what stays on the device, and *inside* them to
        count everything that is saved.
        """
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield


class CudaAllocatorTracker:
    """GPU: the allocator's peak above the memory allocated at ``reset_peak``."""

    def __init__(self) -> None:
        if not torch.cuda.is_available():
            raise ValueError("telemetry.activation_memory='cuda': this process sees no GPU; accepted here: auto, saved-tensors, off")
        self._baseline = torch.cuda.memory_allocated()

    def track(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats()
        self._baseline = torch.cuda.memory_allocated()

    @property
    def current_bytes(self) -> int:
        return max(0, torch.cuda.memory_allocated() - self._baseline)

    @property
    def peak_bytes(self) -> int:
        return max(0, torch.cuda.max_memory_allocated() - self._baseline)


class NullTracker:
    """``off``: measures nothing, costs nothing."""

    def track(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def reset_peak(self) -> None:
        pass

    current_bytes = 0
    peak_bytes = 0


def make_activation_tracker(mode: TrackerMode, exclude: Iterable[torch.Tensor] = ()) -> ActivationTracker:
    """``auto``: the CUDA allocator on a GPU, saved-tensor accounting on a CPU."""
    if mode == "auto":
        mode = "cuda" if torch.cuda.is_available() else "saved-tensors"
    if mode == "saved-tensors":
        return SavedTensorTracker(exclude)
    if mode == "cuda":
        return CudaAllocatorTracker()
    if mode == "off":
        return NullTracker()
    raise ValueError(
        f"telemetry.activation_memory={mode!r}: not accepted; accepted: 'auto', 'saved-tensors', 'cuda', 'off'"
    )
