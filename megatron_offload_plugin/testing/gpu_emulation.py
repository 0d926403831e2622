"""GPU behaviours that CPU/gloo runs hide, emulated so that tests can see them.

* :func:`strict_p2p` — point-to-point with NCCL's semantics instead of gloo's
  buffering: per pair of ranks one ordered stream per process, operations
  complete in posting order, a send completes only once the peer's matching
  receive is running (as for any message above NCCL's buffer), the operations of
  one ``batch_isend_irecv`` (an NCCL group) progress together.  Messages travel
  through the process group's store, matched by their position in each
  direction's order (NCCL ignores tags).  A wait that makes no progress for
  ``timeout_s`` raises :class:`P2PDeadlock` naming every rank's pending
  operations, instead of hanging.
* :func:`backward_on_worker_thread` — the autograd engine runs backward on a
  worker thread, as CUDA autograd does with one thread per device: Python
  ``threading.local`` state of the caller is not visible inside custom
  ``backward``s, while what torch itself propagates to its device threads
  (torch-function modes, the saved-tensor hooks in force) is.

Both patch ``torch`` module attributes for the duration of a ``with`` block in one
process; use :func:`emulating_gpu` around a ``run_distributed`` target.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d


class P2PDeadlock(RuntimeError):
    """No p2p progress for the bounded wait: the ranks' pending operations would hang NCCL."""


@dataclass
class _Op:
    kind: str  # "send" | "recv"
    peer: int  # global rank
    tensor: torch.Tensor
    number: int = -1  # position among this direction's operations on the pair
    done: bool = False

    def __str__(self) -> str:
        return f"{self.kind} #{self.number} {'->' if self.kind == 'send' else '<-'} rank {self.peer}"


@dataclass
class _Group:
    ops: list[_Op]
    started: bool = False
    done_event: threading.Event = field(default_factory=threading.Event)

    @property
    def peers(self) -> set[int]:
        return {op.peer for op in self.ops}


class _Work:
    """What ``isend``/``irecv``/``batch_isend_irecv`` return: ``wait()`` blocks until the group ends."""

    def __init__(self, emulator: "StrictP2P", group: _Group) -> None:
        self._emulator = emulator
        self._group = group

    def wait(self, timeout: Any = None) -> bool:
        self._emulator.wait_for(self._group)
        return True

    def is_completed(self) -> bool:
        self._emulator.pump()
        return self._group.done_event.is_set()


class StrictP2P:
    """NCCL-like point-to-point for one process (see the module docstring)."""

    def __init__(self, store: Any, rank: int, world_size: int, timeout_s: float) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._lock = threading.RLock()
        self._queues: dict[int, deque[_Group]] = {}
        self._groups: list[_Group] = []
        self._numbers: dict[tuple[int, str], int] = {}

    # --- posting -------------------------------------------------------------------------
    def post(self, ops: list[_Op]) -> _Group:
        with self._lock:
            for op in ops:
                key = (op.peer, op.kind)
                op.number = self._numbers.get(key, 0)
                self._numbers[key] = op.number + 1
            group = _Group(ops)
            self._groups.append(group)
            for peer in group.peers:
                self._queues.setdefault(peer, deque()).append(group)
            self.pump()
            return group

    def _key(self, src: int, dst: int, number: int, what: str) -> str:
        return f"strict_p2p/{src}>{dst}/{number}/{what}"

    # --- progress ------------------------------------------------------------------------
    def pump(self) -> bool:
        """Start every group that heads all its pair streams; complete matched operations."""
        moved = False
        with self._lock:
            for group in list(self._groups):
                if not group.started and all(self._queues[p][0] is group for p in group.peers):
                    group.started = True
                    moved = True
                    for op in group.ops:
                        if op.kind == "send":  # running: the payload is there for the receiver
                            payload = op.tensor.detach().contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
                            self.store.set(self._key(self.rank, op.peer, op.number, "data"), payload)
                        else:  # running: the sender may complete
                            self.store.set(self._key(op.peer, self.rank, op.number, "recv_running"), b"1")
                if not group.started:
                    continue
                for op in group.ops:
                    if op.done:
                        continue
                    if op.kind == "send":
                        key = self._key(self.rank, op.peer, op.number, "recv_running")
                        if self.store.check([key]):
                            self.store.delete_key(key)
                            op.done = moved = True
                    else:
                        key = self._key(op.peer, self.rank, op.number, "data")
                        if self.store.check([key]):
                            self._deliver(op, self.store.get(key))
                            self.store.delete_key(key)
                            op.done = moved = True
                if all(op.done for op in group.ops):
                    for p in group.peers:
                        self._queues[p].popleft()
                    self._groups.remove(group)
                    group.done_event.set()
                    moved = True
        return moved

    def _deliver(self, op: _Op, payload: bytes) -> None:
        expected = op.tensor.numel() * op.tensor.element_size()
        if len(payload) != expected:
            raise P2PDeadlock(
                f"rank {self.rank}: receive #{op.number} from rank {op.peer} got {len(payload)} bytes into a "
                f"buffer of {expected} bytes ({tuple(op.tensor.shape)}, {op.tensor.dtype}); NCCL would corrupt "
                "or hang on such a size mismatch"
            )
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(op.tensor.dtype).view(op.tensor.shape)
        with torch.no_grad():
            op.tensor.copy_(data)

    def describe(self) -> str:
        with self._lock:
            pending = [f"[{', '.join(map(str, g.ops))}]" + ("" if g.started else " (not started)") for g in self._groups]
        return f"rank {self.rank}: pending {', '.join(pending) or 'nothing'}"

    def wait_for(self, group: _Group) -> None:
        last_progress = time.monotonic()
        published = False
        pause = 0.0005
        while not group.done_event.is_set():
            if self.pump():
                last_progress, pause = time.monotonic(), 0.0005
                continue
            idle = time.monotonic() - last_progress
            if idle > 1.0 and not published:
                self.store.set(f"strict_p2p/state/{self.rank}", self.describe().encode())
                published = True
            if idle > self.timeout_s:
                raise P2PDeadlock(self._deadlock_report(group))
            time.sleep(pause)  # pacing only: completion is decided by the store's keys
            pause = min(pause * 2, 0.01)

    def _deadlock_report(self, group: _Group) -> str:
        lines = [f"no p2p progress for {self.timeout_s:.0f}s under NCCL semantics; rank {self.rank} waits for "
                 f"[{', '.join(map(str, group.ops))}]"]
        self.store.set(f"strict_p2p/state/{self.rank}", self.describe().encode())
        for r in range(self.world_size):
            key = f"strict_p2p/state/{r}"
            lines.append(self.store.get(key).decode() if self.store.check([key]) else f"rank {r}: (no report)")
        return "\n  ".join(lines)


def _peer(group: Any, rank: int | None, group_rank: int | None) -> int:
    if rank is not None:
        return int(rank)
    return dist.get_global_rank(group, group_rank)


@contextlib.contextmanager
def strict_p2p(timeout_s: float = 30.0) -> Iterator[StrictP2P]:
    """Replace torch.distributed's p2p functions by :class:`StrictP2P` in this process."""
    emulator = StrictP2P(c10d._get_default_store(), dist.get_rank(), dist.get_world_size(), timeout_s)

    def isend(tensor: torch.Tensor, dst: int | None = None, group: Any = None, tag: int = 0, group_dst: int | None = None) -> _Work:
        return _Work(emulator, emulator.post([_Op("send", _peer(group, dst, group_dst), tensor)]))

    def irecv(tensor: torch.Tensor, src: int | None = None, group: Any = None, tag: int = 0, group_src: int | None = None) -> _Work:
        return _Work(emulator, emulator.post([_Op("recv", _peer(group, src, group_src), tensor)]))

    def send(tensor: torch.Tensor, dst: int | None = None, group: Any = None, tag: int = 0, group_dst: int | None = None) -> None:
        isend(tensor, dst, group, tag, group_dst).wait()

    def recv(tensor: torch.Tensor, src: int | None = None, group: Any = None, tag: int = 0, group_src: int | None = None) -> int:
        irecv(tensor, src, group, tag, group_src).wait()
        return int(src) if src is not None else -1

    def batch_isend_irecv(p2p_op_list: list[Any]) -> list[_Work]:
        ops = []
        for p in p2p_op_list:
            kind = "send" if p.op is isend else "recv" if p.op is irecv else None
            if kind is None:
                raise TypeError(f"strict_p2p: P2POp with op {p.op!r}; expected torch.distributed.isend or irecv")
            ops.append(_Op(kind, _peer(p.group, p.peer, getattr(p, "group_peer", None)), p.tensor))
        work = _Work(emulator, emulator.post(ops))
        return [work for _ in ops]

    replaced = {"isend": isend, "irecv": irecv, "send": send, "recv": recv, "batch_isend_irecv": batch_isend_irecv}
    saved = [(owner, name, getattr(owner, name)) for owner in (dist, c10d) for name in replaced]
    for owner, name, _ in saved:
        setattr(owner, name, replaced[name])
    try:
        yield emulator
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


class _BackwardThread:
    """One persistent worker thread that runs the autograd engine, like a CUDA device thread."""

    def __init__(self) -> None:
        self._jobs: "queue.Queue[tuple[Callable[[], Any], queue.Queue]]" = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="emulated-cuda-autograd", daemon=True)
        self._thread.start()
        self.calls = 0

    def _loop(self) -> None:
        while True:
            job, done = self._jobs.get()
            try:
                done.put((True, job()))
            except BaseException as exc:  # handed back to the caller
                done.put((False, exc))

    def on_worker(self) -> bool:
        return threading.current_thread() is self._thread

    def run(self, job: Callable[[], Any]) -> Any:
        done: queue.Queue = queue.Queue()
        self._jobs.put((job, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value


@contextlib.contextmanager
def backward_on_worker_thread() -> Iterator[_BackwardThread]:
    """Run every autograd engine call on a worker thread (nested calls from it stay there).

    What torch propagates to its device threads goes along: the torch-function modes on
    the caller's stack and the saved-tensor hooks in force; Python thread-locals do not.
    """
    import torch.autograd as autograd
    import torch.autograd.graph as graph

    worker = _BackwardThread()
    original = graph._engine_run_backward

    def engine_run_backward(*args: Any, **kwargs: Any) -> Any:
        if worker.on_worker():
            return original(*args, **kwargs)
        modes = torch.overrides._get_current_function_mode_stack()
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        grad_enabled = torch.is_grad_enabled()

        def job() -> Any:
            worker.calls += 1
            with contextlib.ExitStack() as stack:
                for mode in modes:
                    stack.enter_context(mode)
                if hooks is not None:
                    stack.enter_context(torch.autograd.graph.saved_tensors_hooks(*hooks))
                stack.enter_context(torch.set_grad_enabled(grad_enabled))
                return original(*args, **kwargs)

        return worker.run(job)

    saved = [(graph, "_engine_run_backward", original), (autograd, "_engine_run_backward", autograd._engine_run_backward)]
    graph._engine_run_backward = engine_run_backward
    autograd._engine_run_backward = engine_run_backward
    try:
        yield worker
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


@contextlib.contextmanager
def emulating_gpu(*, p2p_timeout_s: float = 30.0) -> Iterator[None]:
    """Both emulations at once (needs an initialized default process group)."""
    with strict_p2p(p2p_timeout_s), backward_on_worker_thread():
        yield


def emulated(fn: Callable[..., Any], *, p2p_timeout_s: float = 30.0) -> Callable[..., Any]:
    """``fn`` run under :func:`emulating_gpu` (a picklable ``run_distributed`` target wrapper)."""
    return _Emulated(fn, p2p_timeout_s)


@dataclass
class _Emulated:
    fn: Callable[..., Any]
    p2p_timeout_s: float

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with emulating_gpu(p2p_timeout_s=self.p2p_timeout_s):
            return self.fn(*args, **kwargs)

    @property
    def __name__(self) -> str:
        return f"emulated({getattr(self.fn, '__name__', self.fn)})"
