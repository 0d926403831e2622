"""Layer-wise optimizer-state offload: the states of each layer live on CPU or NVMe between steps.

:class:`LayerwiseOffloadOptimizer` wraps the optimizer DeepSpeed would use anyway
(the ``"optimizer"`` section's, or the client's), whose parameter groups were split
one per layer (:mod:`.layers`).  DeepSpeed wraps *it* as its basic optimizer, so ZeRO-1/2
(which already steps one group at a time), the bf16 optimizer and plain fp32 all
run their own unscale / overflow / clipping logic first and call ``step()`` on us
with the final gradients; the update itself is the inner optimizer's own ``step``
on one layer's group, so the math is the engine's, bit for bit.

Per layer, all state tensors with more than one element are packed into one flat
buffer (views are handed to the inner optimizer, which updates them in place);
scalars such as Adam's ``step`` stay in memory.  A step walks the layers:

1. fetch layer *i*'s buffer (waits for its read, usually queued one step earlier);
2. queue reads of the next ``prefetch_layers`` layers (cyclic: after the last layer
   the first ones are fetched for the next step, overlapping forward/backward);
3. run the inner optimizer on layer *i*'s group;
4. hand the buffer back: queued for writing (NVMe) or kept in host memory (CPU).

Resident optimizer-state memory is at most ``prefetch_layers + 2`` layers' buffers
(the one stepped, the prefetched ones, one in flight); :attr:`resident_bytes_peak`
measures it.

Master weights (:meth:`LayerwiseOffloadOptimizer.offload_master_weights`, used at
ZeRO-1/2, whose fp32 partitions are copies of the model's weights): the parameters
this optimizer steps travel in their layer's buffer too.  Between steps their
storage is released (``untyped_storage().resize_(0)``, so the tensor objects, their
shapes and every view DeepSpeed holds stay valid); a step materializes a layer's
masters from its buffer before the update, and releases them when the next layer
starts, after ZeRO copied them into the model's weights: during a step one layer's
masters are materialized at a time (:attr:`master_resident_bytes_peak`).

All or nothing (NVMe): a step is a transaction (:meth:`LayerwiseOffloadOptimizer.transaction`).
The store writes new states beside the committed ones (:class:`NvmeLayerStore`), the
parameters a step changes are copied to host memory before their layer's update
(offloaded master weights need no copy: the committed layer files hold them), and a
step that raises -- a failed or unverifiable transfer, a full disk -- puts parameters,
states and scalars back as they were before the step, then re-raises.  The wiring
(:mod:`.atomic_step`) extends it over the engine's step: counters, learning rate,
ZeRO's low-precision copies and gradient buffers.
"""

from __future__ import annotations

import errno
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

from ..offload.nvme import NvmeIOError, SwapTier

logger = logging.getLogger(__name__)

_ALIGN = 64  # byte alignment of each state tensor inside a layer's flat buffer
MASTER = "__master_weight__"  # layout entry of a parameter's own bytes (offloaded master weights)


class LayerwiseOffloadError(RuntimeError):
    """A broken invariant of the layer-wise optimizer (a bug, not a user error)."""


# ------------------------------------------------------------------ stores


class CpuLayerStore:
    """Layer buffers in host memory; on a CPU device the working buffer *is* the host buffer.

    Not transactional: the states are updated in place (no I/O can fail here), so a
    step that raises inside the optimizer itself is not rolled back.
    """

    transactional = False

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._host: dict[int, torch.Tensor] = {}
        self._stash: dict[str, torch.Tensor] = {}
        self.resident_bytes = 0
        self.resident_bytes_peak = 0
        self.stored_bytes = 0

    def _account(self, delta: int) -> None:
        self.resident_bytes += delta
        self.resident_bytes_peak = max(self.resident_bytes_peak, self.resident_bytes)

    def new(self, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self._account(buf.numel())
        return buf

    def prefetch(self, layer: int) -> None:
        pass  # host memory needs no read ahead here; a GPU build would start the H2D copy on a side stream

    def fetch(self, layer: int) -> torch.Tensor:
        host = self._host[layer]
        buf = host if self.device.type == "cpu" else host.to(self.device, non_blocking=True)
        self._account(buf.numel())
        return buf

    def store(self, layer: int, buf: torch.Tensor, nbytes: int, *, dirty: bool = True) -> None:
        self._account(-buf.numel())
        if self.device.type == "cpu":
            old = self._host.get(layer)
            self._host[layer] = buf
        else:
            old = None
            host = self._host.get(layer)
            if host is None or host.numel() != buf.numel():
                host = torch.empty(buf.numel(), dtype=torch.uint8, pin_memory=torch.cuda.is_available())
                self._host[layer] = host
            if dirty:
                host.copy_(buf)
        if old is not None and old is not buf:
            self.stored_bytes -= old.numel()
        if old is not buf:
            self.stored_bytes += buf.numel()

    def discard(self, buf: torch.Tensor) -> None:
        self._account(-buf.numel())

    # rollback copies (overlap_with_backward with clipping): host memory
    def stash(self, key: str, data: torch.Tensor) -> None:
        self._stash[key] = data.to("cpu", copy=True)

    def unstash(self, key: str) -> torch.Tensor:
        return self._stash.pop(key)

    def drop_stash(self) -> None:
        self._stash.clear()

    def invalidate(self, layer: int) -> None:
        pass  # nothing is read ahead

    def forget(self) -> None:
        self._host.clear()
        self._stash.clear()
        self.stored_bytes = 0

    def drain(self) -> None:
        pass

    def close(self) -> None:
        self.forget()


class NvmeLayerStore:
    """Layer buffers in files of a private swap folder, moved by DeepSpeed's aio through locked buffers.

    Reads and writes are never in flight together: on one disk they halve each other
    (measured on this machine: writes at 0.49x the raw disk figure while a read ran,
    1.1x alone, for the same step time).

    Transactional: each layer has two files (slots).  A write goes to the slot that
    does not hold the layer's states as of the last :meth:`commit`, so until the next
    commit those stay on disk untouched and :meth:`rollback` returns to them; both
    slots' space is reserved at the layer's first write.  A read that fails
    verification of committed states marks the layer lost (:attr:`lost`): nothing
    can bring those bytes back, and the optimizer refuses to save or step past it.
    """

    transactional = True

    def __init__(self, device: torch.device, nvme_path: str, aio_config: dict[str, Any] | None,
                 *, cap_layers: int) -> None:
        self.device = device
        self.tier = SwapTier(nvme_path, aio_config, option="layerwise_offload.optimizer_states.nvme_path")
        self.folder, self.swapper = self.tier.folder, self.tier.swapper
        self.cap_layers = cap_layers
        self._reading: dict[int, torch.Tensor] = {}
        self._ready: dict[int, torch.Tensor] = {}
        self._writing: dict[Any, torch.Tensor] = {}
        self._stashed: dict[str, int] = {}
        self._slot: dict[int, int] = {}  # layer -> slot (0/1) holding its newest states
        self._committed: dict[int, int | None] = {}  # layers written since the last commit -> slot before that
        self.lost: dict[int, str] = {}  # layer -> why its committed states cannot be read back
        self._out: dict[int, torch.Tensor] = {}  # id -> locked buffers handed out (CPU device), back by store/discard
        self._max_layer = 0
        self._device_bytes = 0  # working copies on an accelerator (0 on a CPU device: the locked buffers are used)
        self.resident_bytes_peak = 0
        self.wait_seconds = 0.0  # wall time spent blocked on aio (I/O not hidden behind compute)

    @property
    def resident_bytes(self) -> int:
        return self.swapper.locked_bytes + self._device_bytes

    def _note(self, nbytes: int) -> None:
        self._max_layer = max(self._max_layer, self.swapper._padded(nbytes))
        self.swapper.max_locked_bytes = self.cap_layers * self._max_layer
        self.resident_bytes_peak = max(self.resident_bytes_peak, self.resident_bytes)

    def _on_device(self, host: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return host
        dev = host.to(self.device)
        self.swapper.release_buffer(host)
        self._device_bytes += dev.numel()
        self._note(0)
        return dev

    def _wait(self) -> None:
        """Complete every pending transfer; a read that fails verification is tried once more.

        A second read that verifies means the first was lost on the way (the file is
        fine): the step goes on, with a warning.  Otherwise the error is raised, and
        a layer whose *committed* states could not be read is marked :attr:`lost`.
        """
        if not self.swapper.pending:
            return
        import time

        t0 = time.perf_counter()
        error: NvmeIOError | None = None
        try:
            self.swapper.wait()
        except NvmeIOError as err:
            error = err
        finally:
            self.wait_seconds += time.perf_counter() - t0
            reading, self._reading = self._reading, {}
            writing, self._writing = self._writing, {}
            failed = set(error.keys) if error is not None else set()
            bad_reads = []
            for layer, buf in reading.items():
                if self._key(layer) in failed:
                    bad_reads.append((layer, buf))
                else:
                    self._ready[layer] = buf
            for key, buf in writing.items():
                if isinstance(key, int) and self._key(key) not in self.swapper:
                    self._ready[key] = buf  # the write failed: its newest states stay in memory, nothing is lost
                else:
                    self.swapper.release_buffer(buf)
        if error is None:
            return
        still = [layer for layer, buf in bad_reads if not self._read_again(layer, buf)]
        if still or failed - {self._key(layer) for layer, _ in bad_reads}:
            for layer in still:
                if layer not in self._committed:
                    self.lost[layer] = str(error)
            raise error
        logger.warning("layerwise_offload: %s; read again and verified, going on", error)

    def _read_again(self, layer: int, buf: torch.Tensor) -> bool:
        """Read ``layer`` into ``buf`` once more, synchronously; True (and ready) if it verifies now."""
        try:
            self.swapper.read_buffer(self._key(layer), buf)
            self.swapper.wait()
        except NvmeIOError:
            self.swapper.release_buffer(buf)
            return False
        self._ready[layer] = buf
        return True

    def recheck_lost(self) -> None:
        """Read every layer marked lost again; those that verify now were lost on the way, not on disk."""
        for layer in list(self.lost):
            if self._writing or self._reading:
                self._wait()
            buf = self.swapper.buffer(self.swapper.nbytes(self._key(layer)))
            if self._read_again(layer, buf):
                del self.lost[layer]
                logger.warning("layerwise_offload: layer unit %d reads back verified again", layer)

    def _key(self, layer: int, slot: int | None = None) -> str:
        """The file of ``layer``'s states in ``slot`` (default: the slot holding its newest states)."""
        return f"layer{layer:05d}.optim.{self._slot.get(layer, 0) if slot is None else slot}"

    def _write_slot(self, layer: int) -> int:
        """Where a write of ``layer`` goes: never over the states of the last commit."""
        if layer in self._committed:
            return self._slot[layer]
        return 1 - self._slot[layer] if layer in self._slot else 0

    def new(self, nbytes: int) -> torch.Tensor:
        if self.device.type != "cpu":
            buf = torch.empty(self.swapper._padded(nbytes), dtype=torch.uint8, device=self.device)
            self._device_bytes += buf.numel()
            self._note(nbytes)
            return buf
        buf = self.swapper.buffer(nbytes)
        self._note(nbytes)
        self._out[id(buf)] = buf
        return buf

    def prefetch(self, layer: int) -> None:
        if layer in self._reading or layer in self._ready:
            return
        if self._writing:  # one direction on the disk at a time (this also never reads bytes still in flight)
            self._wait()
        key = self._key(layer)
        buf = self.swapper.buffer(self.swapper.nbytes(key))
        self._note(self.swapper.nbytes(key))
        try:
            self.swapper.read_buffer(key, buf)
        except BaseException:
            self.swapper.release_buffer(buf)
            raise
        self._reading[layer] = buf

    def fetch(self, layer: int) -> torch.Tensor:
        if layer not in self._ready:
            self.prefetch(layer)
            self._wait()
        buf = self._on_device(self._ready.pop(layer))
        if self.device.type == "cpu":
            self._out[id(buf)] = buf
        return buf

    def store(self, layer: int, buf: torch.Tensor, nbytes: int, *, dirty: bool = True) -> None:
        self._out.pop(id(buf), None)
        on_disk = self._key(layer) in self.swapper
        if self.device.type != "cpu":
            self._device_bytes -= buf.numel()
            if not dirty and on_disk:
                return
            host = self.swapper.buffer(nbytes)
            host[: buf.numel()].copy_(buf)
            buf = host
        if not dirty:
            if on_disk:
                self.swapper.release_buffer(buf)
            else:  # its last write failed: this buffer is the only copy, keep it until a write succeeds
                self._ready[layer] = buf
            return
        sealed = self.swapper.seal_buffer(buf, nbytes)  # the checksum runs while earlier transfers finish
        if self._writing or self._reading:
            self._wait()  # at most one layer in flight to disk (resident within prefetch + 2 layers), alone on it
        slot = self._write_slot(layer)
        self._committed.setdefault(layer, self._slot.get(layer))
        self._slot[layer] = slot
        try:
            self.swapper.reserve(self._key(layer, 1 - slot), nbytes)  # both slots' space, at the first write
            self.swapper.write_buffer(self._key(layer), buf, nbytes, sealed=sealed)
        except BaseException:
            self._ready[layer] = buf  # disk full / refused: the newest states stay in memory, nothing is lost
            self.swapper.forget(self._key(layer))  # the file holds older states now
            raise
        self._writing[layer] = buf
        self._note(nbytes)

    # -- transactions (see the class docstring)
    def commit(self) -> None:
        """Make the states written since the last commit the ones a rollback returns to (waits for the writes)."""
        if self._committed:
            self._wait()
            self._committed.clear()

    def rollback(self) -> None:
        """Return every layer written since the last commit to its committed states (drops the newer copies)."""
        try:
            self._wait()
        except NvmeIOError:
            pass  # the transfers being thrown away may well be the ones that failed
        for layer, slot in self._committed.items():
            for held in (self._ready, self._reading):
                buf = held.pop(layer, None)
                if buf is not None:
                    self.swapper.release_buffer(buf)
            if slot is None:
                self.swapper.forget(self._key(layer))
                del self._slot[layer]
            else:
                self._slot[layer] = slot
        self._committed.clear()
        for buf in self._out.values():  # the buffers of the unit the failure interrupted
            self.swapper.release_buffer(buf)
        self._out.clear()

    def discard(self, buf: torch.Tensor) -> None:
        if self.device.type == "cpu":
            self._out.pop(id(buf), None)
            self.swapper.release_buffer(buf)
        else:
            self._device_bytes -= buf.numel()

    # rollback copies (overlap_with_backward with clipping): files next to the states
    def stash(self, key: str, data: torch.Tensor) -> None:
        n = data.numel() * data.element_size()
        if self._writing:
            self._wait()
        host = self.swapper.buffer(n)
        host[:n].copy_(data.reshape(-1).view(torch.uint8))
        self.swapper.write_buffer(f"stash.{key}", host, n)
        self._writing[f"stash.{key}"] = host
        self._stashed[key] = n
        self._note(n)

    def unstash(self, key: str) -> torch.Tensor:
        self._wait()
        n = self._stashed.pop(key)
        buf = self.swapper.buffer(n)
        self.swapper.read_buffer(f"stash.{key}", buf)
        self.swapper.wait()
        out = buf[:n].clone()
        self.swapper.release_buffer(buf)
        return out

    def drop_stash(self) -> None:
        self._stashed.clear()

    def invalidate(self, layer: int) -> None:
        """Drop a prefetched copy of ``layer`` (its stored bytes are about to be replaced)."""
        self._wait()
        buf = self._ready.pop(layer, None)
        if buf is not None:
            self.swapper.release_buffer(buf)

    def layer_files(self) -> list[Any]:
        """Paths of the files holding every layer's newest states (one slot each)."""
        return [self.folder.path / self._key(layer) for layer in sorted(self._slot) if self._key(layer) in self.swapper]

    @property
    def stored_bytes(self) -> int:
        """Bytes of every layer's newest states on disk (the other slots take as much again)."""
        return sum(self.swapper._padded(self.swapper.nbytes(self._key(layer))) for layer in self._slot
                   if self._key(layer) in self.swapper)

    def forget(self) -> None:
        self._wait()
        for buf in self._ready.values():
            self.swapper.release_buffer(buf)
        self._ready.clear()

    def drain(self) -> None:
        self._wait()

    def close(self) -> None:
        try:
            self.forget()
        finally:
            self.tier.close()


# ------------------------------------------------------------------ layout


@dataclass(frozen=True)
class _Entry:
    param: int  # index in the layer's group
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class _Layout:
    entries: tuple[_Entry, ...]
    nbytes: int

    @staticmethod
    def build(tensors: Iterable[tuple[int, str, torch.Tensor]]) -> "_Layout":
        entries, off = [], 0
        for pi, name, t in tensors:
            n = t.numel() * t.element_size()
            entries.append(_Entry(pi, name, t.dtype, tuple(t.shape), off, n))
            off += -(-n // _ALIGN) * _ALIGN
        return _Layout(tuple(entries), max(off, _ALIGN))

    def spec(self) -> tuple[tuple[int, str, torch.dtype, tuple[int, ...]], ...]:
        return tuple((e.param, e.name, e.dtype, e.shape) for e in self.entries)

    def view(self, buf: torch.Tensor, e: _Entry) -> torch.Tensor:
        return buf[e.offset: e.offset + e.nbytes].view(e.dtype).view(e.shape)


def _is_big(v: Any) -> bool:
    return torch.is_tensor(v) and v.numel() > 1


def _copy_small(small: dict[int, dict[tuple[int, str], Any]]) -> dict[int, dict[tuple[int, str], Any]]:
    """The scalar states, copied (Adam's ``step`` tensor is updated in place)."""
    return {u: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in d.items()} for u, d in small.items()}


@dataclass
class _Transaction:
    """What a rollback restores: the units' layouts and scalars, and each stepped unit's parameters."""

    layouts: dict[int, _Layout]
    small: dict[int, dict[tuple[int, str], Any]]
    params: dict[int, list[torch.Tensor] | None] = field(default_factory=dict)  # None: in the committed files
    lazy: bool = False  # begun by a unit stepped outside step() (overlap_with_backward): step() completes it


# ------------------------------------------------------------------ optimizer


class LayerwiseOffloadOptimizer(torch.optim.Optimizer):
    """``inner`` with its states kept per layer in ``store`` between steps.

    A *unit* is what one inner step covers: the parameters of one layer inside one
    parameter group.  With ``layer_of`` (``id(param) -> layer index``, used at ZeRO
    stage 0) the groups stay as the user made them, so DeepSpeed's norms and
    clipping see the same groups as without the section, and each group is split
    into per-layer units at step time.  Without it (ZeRO-1/2, whose groups were
    already split one per layer and flattened) each group is one unit.
    """

    def __init__(self, inner: torch.optim.Optimizer, store: CpuLayerStore | NvmeLayerStore,
                 *, prefetch_layers: int = 2, layer_of: dict[int, int] | None = None) -> None:
        if isinstance(inner, LayerwiseOffloadOptimizer):
            raise TypeError("LayerwiseOffloadOptimizer cannot wrap itself")
        state = inner.state
        super().__init__(inner.param_groups, inner.defaults)  # the hooks and bookkeeping of torch's base class
        self.inner = inner
        inner.state = state
        self._all_groups: list[dict[str, Any]] = inner.param_groups
        self.param_groups = self._all_groups
        self.store = store
        self.prefetch_layers = prefetch_layers
        self._layer_of = layer_of
        self._layouts: dict[int, _Layout] = {}
        self._small: dict[int, dict[tuple[int, str], Any]] = {}
        self._index_by_id: dict[int, int] = {}
        self._build_units()
        self._stashed_layout: dict[int, tuple[_Layout | None, dict[tuple[int, str], Any]]] = {}
        #: Called at the start of step(); returns units already stepped this iteration (see overlap.py).
        self.before_step: Any = None
        self.steps_taken = 0
        self._txn: _Transaction | None = None
        # master weights (offload_master_weights): off until the wiring turns them on
        self._masters = False
        self._masters_pinned = 0  # > 0: inside master_weights_resident(), every master stays materialized
        self._master_nbytes: dict[int, int] = {}  # id(param) -> storage bytes, for a released master
        self._to_release: list[int] = []  # units stepped whose masters wait for the engine's copy-back
        self._master_resident = 0  # bytes of master storages materialized now
        self.master_resident_bytes_peak = 0
        if any(inner.state.get(p) for g in self._all_groups for p in g["params"]):
            for u in range(len(self._units)):  # a client optimizer that already holds states
                self._pack(u, None, None)

    def _build_units(self) -> None:
        """Units as (group index, positions in the group): wrappers (ZeRO, bf16) swap the group's
        parameters for fp32 copies or flat partitions after we are built, position for position."""
        keyed: list[tuple[tuple[int, int], int, list[int] | None]] = []
        for gi, g in enumerate(self._all_groups):
            if self._layer_of is None:
                keyed.append(((gi, 0), gi, None))  # the whole group, whatever it holds at step time
                continue
            split: dict[int, list[int]] = {}
            for k, p in enumerate(g["params"]):
                split.setdefault(self._layer_of.get(id(p), 1 << 30), []).append(k)
            keyed.extend(((layer, gi), gi, pos) for layer, pos in split.items())
        keyed.sort(key=lambda k: k[0])
        self._units: list[tuple[int, list[int] | None]] = [(gi, pos) for _, gi, pos in keyed]
        self._units_of_group: dict[int, list[int]] = {}
        for u, (gi, _) in enumerate(self._units):
            self._units_of_group.setdefault(gi, []).append(u)
        self._index_by_id = {id(g): k for k, g in enumerate(self._all_groups)}

    # -- torch.optim.Optimizer surface
    @property
    def state(self) -> Any:  # only the layer being stepped is present: the others live in the store
        return self.inner.state if hasattr(self, "inner") else self.__dict__.get("_state_before_inner")

    @state.setter
    def state(self, value: Any) -> None:
        if hasattr(self, "inner"):
            self.inner.state = value
        else:
            self.__dict__["_state_before_inner"] = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "inner"):
            raise NotImplementedError("LayerwiseOffloadOptimizer: add_param_group after initialize is not supported; "
                                      "pass every parameter to deepspeed.initialize")
        super().add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    @property
    def num_units(self) -> int:
        return len(self._units)

    @property
    def resident_bytes_peak(self) -> int:
        return self.store.resident_bytes_peak

    @property
    def layer_bytes(self) -> dict[int, int]:
        """Bytes of each unit's packed buffer: states and, when offloaded, master weights (known after the first step)."""
        return {u: lay.nbytes for u, lay in self._layouts.items()}

    @property
    def master_bytes(self) -> int:
        """Bytes of the master weights kept in the layer buffers (0 unless :meth:`offload_master_weights`)."""
        return sum(e.nbytes for lay in self._layouts.values() for e in lay.entries if e.name == MASTER)

    def _index(self, group: dict[str, Any]) -> int:
        i = self._index_by_id.get(id(group))
        if i is None or self._all_groups[i] is not group:
            self._index_by_id = {id(g): k for k, g in enumerate(self._all_groups)}
            i = self._index_by_id.get(id(group))
            if i is None:
                raise LayerwiseOffloadError("step() got a parameter group this optimizer does not hold")
        return i

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        units = sorted(u for g in list(self.param_groups) for u in self._units_of_group.get(self._index(g), ()))
        try:
            with self.transaction():
                self.check_whole()
                done = self.before_step() if self.before_step is not None else set()
                for u in units:
                    if u not in done:
                        self.step_unit(u)
        except BaseException:
            # ZeRO narrows param_groups to one group around this call and restores them only on success:
            # after an I/O error the engine must still see every group (the error is raised, nothing is lost).
            self.param_groups = self._all_groups
            raise
        if units and units[-1] == len(self._units) - 1:
            self.steps_taken += 1
        return loss

    def step_unit(self, u: int, *, prefetch_order: list[int] | None = None, stash: bool = False) -> None:
        """Fetch unit ``u``'s states, prefetch the next units, run the inner step on it, store the states back.

        With ``stash``, the unit's parameters and states are first copied into the store's
        rollback area, so that :meth:`restore_unit` can undo the step.
        """
        self.release_master_weights()  # the previous layer's: ZeRO copied them into the model's weights by now
        self._note_stepped(u)
        layout = self._layouts.get(u)
        buf = self.store.fetch(u) if layout is not None else None
        if stash:
            self._stash_unit(u, layout, buf)
        if buf is not None:
            self._attach(u, layout, buf)
        self._prefetch_after(u, prefetch_order)
        gi, _ = self._units[u]
        group = self._all_groups[gi]
        plist = self._params(u)
        whole = len(plist) == len(group["params"])
        run = group if whole else {**group, "params": plist}
        inner = self.inner
        saved = inner.param_groups
        inner.param_groups = [run]
        try:
            inner.step()
        finally:
            inner.param_groups = saved
        if not whole:
            for k, v in run.items():
                if k != "params":
                    group[k] = v
        self._pack(u, layout, buf)

    # -- transactions (NVMe: a step that raises leaves parameters and states as before it)
    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All or nothing for the block: on an exception every unit it stepped is put back, then it re-raises.

        Nested blocks join the outer one (ZeRO calls :meth:`step` once per group inside
        the engine's transaction); a store that is not transactional makes this a no-op.
        """
        owner = self._txn is None or self._txn.lazy
        if owner and self._txn is None:
            self._begin(lazy=False)
        if self._txn is not None:
            self._txn.lazy = False
        try:
            yield
        except BaseException:
            if owner:
                self.rollback()
            raise
        if owner:
            self.commit()

    def _begin(self, *, lazy: bool) -> None:
        if self.store.transactional:
            self.store.commit()  # what was written outside a step (a load, a repack) is the truth now
            self._txn = _Transaction(dict(self._layouts), _copy_small(self._small), lazy=lazy)

    def _note_stepped(self, u: int) -> None:
        """Before unit ``u`` changes: keep what a rollback needs to restore its parameters."""
        if self._txn is None:
            self._begin(lazy=True)  # a unit stepped inside backward; the step() after it commits
            if self._txn is None:
                return
        if u not in self._txn.params:
            self._txn.params[u] = None if self._masters else [p.detach().to("cpu", copy=True) for p in self._params(u)]

    def commit(self) -> None:
        """The transaction's steps stand (waits until the store confirmed every write)."""
        txn, self._txn = self._txn, None
        if txn is not None:
            try:
                self.store.commit()
            except BaseException:
                self._txn = txn
                self.rollback()
                raise

    def rollback(self) -> None:
        """Parameters, states and scalars of every unit stepped in the transaction as before it."""
        txn, self._txn = self._txn, None
        if txn is None:
            return
        self.store.rollback()
        self._layouts, self._small = txn.layouts, txn.small
        self._stashed_layout.clear()  # overlap_with_backward's speculation copies: the rollback supersedes them
        self.store.drop_stash()
        for u, saved in txn.params.items():
            params = self._params(u)
            for p in params:
                self.inner.state.pop(p, None)
            if saved is not None:
                for p, old in zip(params, saved):
                    p.detach().copy_(old)
            elif self._masters_pinned:  # inside master_weights_resident(): materialized, with the committed bytes
                layout = self._layouts.get(u)
                if layout is not None:
                    buf = self.store.fetch(u)
                    self._attach_masters(u, layout, buf)
                    self.store.store(u, buf, layout.nbytes, dirty=False)
            else:  # released: the next use materializes them from the committed files
                for p in params:
                    self._release(p)
        self._to_release = [u for u in self._to_release if u not in txn.params]
        logger.warning("layerwise_offload: the optimizer step failed; %d layer units rolled back to their states "
                       "before it", len(txn.params))

    def check_whole(self) -> None:
        """Raise :class:`NvmeIOError` when some layer's states were lost (a save or a step would be torn)."""
        lost = getattr(self.store, "lost", None)
        if lost:
            self.store.recheck_lost()
        if lost:
            layers = ", ".join(f"unit {u} ({why})" for u, why in sorted(lost.items()))
            raise NvmeIOError(errno.EIO, f"layerwise_offload: the optimizer states are not whole, {len(lost)} layer "
                                 f"unit(s) could not be read back: {layers}; resume from the last checkpoint")

    def _stash_unit(self, u: int, layout: _Layout | None, buf: torch.Tensor | None) -> None:
        params = self._params(u)
        flat = torch.cat([p.detach().reshape(-1).view(torch.uint8) for p in params]) if params else torch.empty(0, dtype=torch.uint8)
        self.store.stash(f"u{u}.params", flat)
        if layout is not None and buf is not None:
            self.store.stash(f"u{u}.states", buf[: layout.nbytes])
        small = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in self._small.get(u, {}).items()}
        self._stashed_layout[u] = (layout, small)

    def restore_unit(self, u: int) -> None:
        """Undo the step of unit ``u`` taken with ``stash=True``: parameters and states as before it."""
        layout, small = self._stashed_layout.pop(u)
        self.store.invalidate(u)
        flat = self.store.unstash(f"u{u}.params")
        off = 0
        for p in self._params(u):
            n = p.numel() * p.element_size()
            p.data.reshape(-1).view(torch.uint8).copy_(flat[off: off + n])
            off += n
        if layout is None:  # the step created the states: drop them, the next step creates them afresh
            self._layouts.pop(u, None)
            self._small[u] = small
            return
        data = self.store.unstash(f"u{u}.states")
        buf = self.store.new(layout.nbytes)
        buf[: layout.nbytes].copy_(data.to(buf.device))
        self._layouts[u] = layout
        self._small[u] = small
        self.store.store(u, buf, layout.nbytes)

    def commit_stash(self) -> None:
        """Forget the rollback copies (the speculative steps stand)."""
        self._stashed_layout.clear()
        self.store.drop_stash()

    def _prefetch_after(self, i: int, order: list[int] | None) -> None:
        if self.prefetch_layers <= 0:
            return
        order = order if order is not None else list(range(len(self._units)))
        at = order.index(i)
        for k in range(1, min(self.prefetch_layers, len(order) - 1) + 1):
            j = order[(at + k) % len(order)]
            if j in self._layouts:
                self.store.prefetch(j)

    def _params(self, u: int) -> list[torch.Tensor]:
        gi, pos = self._units[u]
        params = self._all_groups[gi]["params"]
        return list(params) if pos is None else [params[k] for k in pos]

    def _attach(self, i: int, layout: _Layout, buf: torch.Tensor) -> None:
        self._attach_states(i, layout, buf)
        self._attach_masters(i, layout, buf)

    def _attach_states(self, i: int, layout: _Layout | None, buf: torch.Tensor | None) -> None:
        """The unit's states into ``inner.state``: views of ``buf`` for the big ones, the scalars as kept."""
        params = self._params(i)
        if layout is not None and buf is not None:
            for e in layout.entries:
                if e.name != MASTER:
                    self.inner.state[params[e.param]][e.name] = layout.view(buf, e)
        for (pi, name), v in self._small.get(i, {}).items():
            self.inner.state[params[pi]][name] = v

    def _repack(self, u: int) -> None:
        """Pack unit ``u`` again from its stored states and its parameters as they are now."""
        layout = self._layouts.get(u)
        buf = self.store.fetch(u) if layout is not None else None
        self._attach_states(u, layout, buf)
        self._pack(u, layout, buf)

    def _pack(self, i: int, layout: _Layout | None, buf: torch.Tensor | None) -> None:
        """Move unit ``i``'s states out of ``inner.state`` into its buffer and hand that to the store."""
        params = self._params(i)
        big: list[tuple[int, str, torch.Tensor]] = []
        small: dict[tuple[int, str], Any] = {}
        for pi, p in enumerate(params):
            for name, v in (self.inner.state.get(p) or {}).items():
                if _is_big(v):
                    big.append((pi, name, v))
                else:
                    small[(pi, name)] = v
        masters = self._masters and not self._masters_pinned
        if masters:
            big.extend((pi, MASTER, p.detach()) for pi, p in enumerate(params))
        in_place = (
            layout is not None and buf is not None
            and layout.spec() == tuple((pi, n, t.dtype, tuple(t.shape)) for pi, n, t in big)
            and all(n == MASTER or t.data_ptr() == layout.view(buf, e).data_ptr()
                    for (_, n, t), e in zip(big, layout.entries))
        )
        if in_place:
            for (_, n, t), e in zip(big, layout.entries):
                if n == MASTER:
                    layout.view(buf, e).copy_(t)
        else:
            if not big:
                if buf is not None:
                    self.store.discard(buf)
                self._layouts.pop(i, None)
                self._small[i] = small
                for p in params:
                    self.inner.state.pop(p, None)
                return
            layout = _Layout.build(big)
            new = self.store.new(layout.nbytes)
            for (_, _, t), e in zip(big, layout.entries):
                layout.view(new, e).copy_(t)
            if buf is not None:
                self.store.discard(buf)
            buf = new
        assert layout is not None and buf is not None
        self._layouts[i] = layout
        self._small[i] = small
        for p in params:
            self.inner.state.pop(p, None)
        self.store.store(i, buf, layout.nbytes)
        if masters:
            self._to_release.append(i)

    # -- checkpoints: every layer's states, materialized for the duration of the call
    def state_dict(self) -> dict[str, Any]:
        self.check_whole()
        self.store.drain()
        attached: list[Any] = []
        try:
            for i, layout in sorted(self._layouts.items()):
                buf = self.store.fetch(i)
                params = self._params(i)
                for e in layout.entries:
                    if e.name != MASTER:  # the engine saves its master weights itself
                        self.inner.state[params[e.param]][e.name] = layout.view(buf, e).clone()
                self.store.store(i, buf, layout.nbytes, dirty=False)
                attached.extend(params)
            for i, small in self._small.items():
                params = self._params(i)
                for (pi, name), v in small.items():
                    self.inner.state[params[pi]][name] = v.clone() if torch.is_tensor(v) else v
                attached.extend(params)
            return self.inner.state_dict()
        finally:
            for p in attached:
                self.inner.state.pop(p, None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        with self.master_weights_resident(writes=True), self.transaction():
            self.store.forget()
            self._layouts.clear()
            self._small.clear()
            self.inner.state.clear()
            self.inner.load_state_dict(state_dict)
            self._all_groups = self.inner.param_groups
            self.param_groups = self._all_groups
            self._build_units()
            for i in range(len(self._units)):
                self._pack(i, None, None)
                self.store.drain()  # one layer in flight at a time

    # -- master weights
    def offload_master_weights(self) -> None:
        """Keep the parameters this optimizer steps in the store between steps too.

        Only for parameters that are master *copies* (ZeRO-1/2's fp32 partitions):
        the engine must not read them between steps except through
        :meth:`master_weights_resident` (the wiring wraps those engine methods).
        """
        if self._masters:
            return
        if self.before_step is not None:
            raise LayerwiseOffloadError("master-weight offload cannot be combined with overlap_with_backward")
        self._masters = True
        self._master_resident = sum(p.untyped_storage().nbytes() for u in range(len(self._units)) for p in self._params(u))
        for u in range(len(self._units)):
            self._repack(u)
            self.release_master_weights()
        self.master_resident_bytes_peak = self._master_resident  # counted from here: what training adds

    @property
    def offloads_master_weights(self) -> bool:
        return self._masters

    def _account_master(self, delta: int) -> None:
        self._master_resident += delta
        self.master_resident_bytes_peak = max(self.master_resident_bytes_peak, self._master_resident)

    def _materialize(self, p: torch.Tensor) -> torch.Tensor:
        nbytes = self._master_nbytes.pop(id(p), None)
        if nbytes is not None:
            p.untyped_storage().resize_(nbytes)
            self._account_master(nbytes)
        return p.detach()

    def _release(self, p: torch.Tensor) -> None:
        storage = p.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes and id(p) not in self._master_nbytes:
            self._master_nbytes[id(p)] = nbytes
            storage.resize_(0)
            self._account_master(-nbytes)

    def release_master_weights(self) -> None:
        """Release the master weights of the units stepped since the last call (their buffers hold them)."""
        if self._masters_pinned:
            return
        units, self._to_release = self._to_release, []
        for u in units:
            for p in self._params(u):
                self._release(p)

    @contextmanager
    def master_weights_resident(self, *, writes: bool) -> Any:
        """Every master weight materialized for the block (checkpoint save/load, refresh from the model).

        With ``writes`` the block may change masters or states, so every layer is packed
        (and written) again afterwards; without, the buffers still hold the same bytes
        and the masters are just released.
        """
        if not self._masters:
            yield
            return
        outer = self._masters_pinned == 0
        self._masters_pinned += 1
        try:
            if outer:
                self.store.drain()
                for u, layout in sorted(self._layouts.items()):
                    if any(e.name == MASTER for e in layout.entries):
                        buf = self.store.fetch(u)
                        self._attach_masters(u, layout, buf)
                        self.store.store(u, buf, layout.nbytes, dirty=False)
            yield
        finally:
            self._masters_pinned -= 1
            if outer:
                self.store.drain()
                units = range(len(self._units))
                if writes:
                    for u in units:
                        self._repack(u)
                        self.release_master_weights()
                else:
                    self._to_release.extend(units)
                    self.release_master_weights()

    def _attach_masters(self, u: int, layout: _Layout, buf: torch.Tensor) -> None:
        params = self._params(u)
        for e in layout.entries:
            if e.name == MASTER:
                self._materialize(params[e.param]).copy_(layout.view(buf, e))

    def close(self) -> None:
        self.store.close()

    def __repr__(self) -> str:
        return (f"LayerwiseOffloadOptimizer({type(self.inner).__name__}, {len(self._units)} layer units, "
                f"{type(self.store).__name__}, prefetch_layers={self.prefetch_layers})")
