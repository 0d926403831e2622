"""The NVMe tier: a private per-run swap folder and async tensor I/O on DeepSpeed's aio kernels.

Two small classes, each owning one resource:

* :class:`SwapFolder` -- a fresh folder under a user-given base path, mode 0700,
  whose files are created 0600 with ``O_EXCL | O_NOFOLLOW`` (an existing file or a
  symlink is never opened) and which is removed at :meth:`SwapFolder.close` and,
  failing that, at interpreter exit or when SIGTERM/SIGINT kill the process; the
  next run reaps what SIGKILL left (:mod:`.cleanup`).
* :class:`AioSwapper` -- two ``aio_handle`` s (``deepspeed.ops.aio``), one for reads and
  one for writes (as DeepSpeed's own optimizer swapper does), moving CPU tensors by
  key: :meth:`~AioSwapper.write` / :meth:`~AioSwapper.read` queue the transfer,
  :meth:`~AioSwapper.wait` completes everything pending and raises
  :class:`NvmeIOError` (path and byte size in the message) for any failure.  One
  handle per direction lets each direction's transfers be timed on their own
  (:meth:`~AioSwapper.io_stats`).

Guards against the handle's sharp edges (DeepSpeed 0.19.8):

* a write whose byte size is not a multiple of 512 silently loses its tail: every
  transfer goes through a page-aligned bounce buffer padded to :data:`ALIGNMENT`;
* ``wait()`` with nothing pending, or a read past the end of the file, abort the
  whole process (a C ``assert``): ``wait`` is only called with transfers queued,
  and a read is only queued after checking the file holds the padded size;
* a submit that fails (missing folder, bad size) returns -1 without an exception:
  it is raised here at once, naming the path and the size;
* a full disk: each file's space is reserved (``posix_fallocate``) before its first
  write, so a write into it cannot run out of space later (on file systems that
  allocate in place; copy-on-write ones such as btrfs do not keep that promise);
* a lost transfer: the op never reads a request's completion result, so a dropped,
  shortened or failed transfer is silent.  Every file is a *frame*: the payload
  padded, then one block of trailer (magic, length, a generation unique to each
  write, CRC32 of the payload); a read checks the trailer and the checksum against
  what this process wrote last under the key, so stale bytes (a write that never
  reached the disk) and missing ones (a read that never filled the buffer) both
  raise :class:`NvmeIOError` naming path, offset and size.  What DeepSpeed does
  expose, the number of completed requests per ``wait()``, is checked too.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import re
import secrets
import shutil
import stat
import struct
import sys
import time
import weakref
import zlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import torch

from . import cleanup

logger = logging.getLogger(__name__)

#: Every transfer is padded to a multiple of this many bytes (O_DIRECT and aio's silent tail loss).
ALIGNMENT = 512

#: ``aio_handle`` defaults, in DeepSpeed's own ``"aio"`` section spelling (DeepSpeed's defaults).
AIO_DEFAULTS: dict[str, Any] = {
    "block_size": 1048576,
    "queue_depth": 8,
    "intra_op_parallelism": 1,
    "single_submit": False,
    "overlap_events": True,
}
#: Keys of DeepSpeed's ``"aio"`` section this tier accepts (``thread_count`` is the older name of
#: ``intra_op_parallelism``; ``use_gds`` is accepted and must be false: GPUDirect is not used here).
AIO_KEYS = (*AIO_DEFAULTS, "thread_count", "use_gds")

_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")
_NO_AIO_HINT = ("install the Debian/Ubuntu package 'libaio-dev' (apt-get install libaio-dev) so DeepSpeed can "
                "build its async I/O op, or set device='cpu'")


class NvmeIOError(OSError):
    """An NVMe transfer failed; the message names the file, the offset and the byte size.

    ``path``/``offset``/``size`` describe the first failed transfer; ``keys`` are the
    swap keys of every transfer that failed (their bytes are not valid).
    """

    def __init__(self, code: int, message: str, *, path: str | os.PathLike[str] | None = None,
                 offset: int | None = None, size: int | None = None, keys: tuple[str, ...] = ()) -> None:
        super().__init__(code, message)
        self.path = None if path is None else str(path)
        self.offset, self.size, self.keys = offset, size, tuple(keys)


class AioUnavailableError(RuntimeError):
    """DeepSpeed's async I/O op cannot be built or loaded on this machine."""


def padded(nbytes: int) -> int:
    """``nbytes`` rounded up to a multiple of :data:`ALIGNMENT` (at least one block)."""
    return max(ALIGNMENT, -(-nbytes // ALIGNMENT) * ALIGNMENT)


# ------------------------------------------------------------------ frames

#: The trailer after a frame's padded payload: magic, format version, CRC32 of the payload, payload
#: length, generation.  It fills the first bytes of the frame's last block (the rest is zero).
_TRAILER = struct.Struct("<8sIIQQ")
_MAGIC = b"MOPSWAP1"
_generations = itertools.count(1)  # process-wide: a stale file of another key can never match either


@dataclass(frozen=True)
class Frame:
    """What one write put in a swap file, kept in memory to verify every read against."""

    nbytes: int  # payload bytes
    generation: int
    crc32: int


#: Payloads are checksummed in chunks of this many bytes, in parallel (zlib releases the GIL).
CRC_CHUNK = 4 << 20
_crc_pool: Any = None


def crc32(buf: torch.Tensor, nbytes: int) -> int:
    """Checksum of the first ``nbytes`` of a CPU uint8 tensor: CRC32 of the chunks' CRC32s.

    Each :data:`CRC_CHUNK` is checksummed on its own, on a small thread pool (one
    core runs CRC32 at about 6 GB/s here; the disk's share of a step is then not
    spent twice).  The value depends on the bytes and :data:`CRC_CHUNK` only.
    """
    global _crc_pool
    if nbytes <= CRC_CHUNK:
        return zlib.crc32(memoryview(buf[:nbytes].numpy())) if nbytes else 0
    if _crc_pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _crc_pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="mop-crc")
    view = memoryview(buf[:nbytes].numpy())
    crcs = _crc_pool.map(lambda start: zlib.crc32(view[start: start + CRC_CHUNK]), range(0, nbytes, CRC_CHUNK))
    return zlib.crc32(b"".join(c.to_bytes(4, "little") for c in crcs))


def seal(buf: torch.Tensor, nbytes: int, payload: int) -> Frame:
    """Write a fresh trailer for ``buf[:nbytes]`` at ``buf[payload:]``; the frame to expect on read."""
    frame = Frame(nbytes, next(_generations), crc32(buf, nbytes))
    trailer = _TRAILER.pack(_MAGIC, 1, frame.crc32, nbytes, frame.generation)
    buf[payload:].zero_()
    buf[payload: payload + _TRAILER.size].copy_(torch.frombuffer(bytearray(trailer), dtype=torch.uint8))
    return frame


def check_frame(buf: torch.Tensor, payload: int, want: Frame) -> str | None:
    """Why ``buf`` (a frame read back) is not the frame ``want``; None when it is."""
    magic, _version, crc, nbytes, generation = _TRAILER.unpack(bytes(buf[payload: payload + _TRAILER.size].numpy()))
    if magic != _MAGIC:
        return "no swap trailer where it belongs (the transfer was dropped or cut short)"
    if (nbytes, generation) != (want.nbytes, want.generation):
        return (f"it holds write #{generation} of {nbytes} bytes, the last write was #{want.generation} of "
                f"{want.nbytes} bytes (a write never reached the disk)")
    if crc != want.crc32:
        return "its trailer does not match the last write"
    got = crc32(buf, want.nbytes)
    if got != want.crc32:
        return f"checksum mismatch (crc32 {got:#010x} read, {want.crc32:#010x} written)"
    return None


# ------------------------------------------------------------------ aio op


def aio_available() -> tuple[bool, str]:
    """Whether DeepSpeed's aio op can be used here, and why not (empty reason when it can).

    Does not build the op (that takes minutes the first time): it checks libaio
    is present the way DeepSpeed's builder does, or that a built op is importable.
    """
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder
    except Exception as err:  # deepspeed missing or broken
        return False, f"deepspeed.ops.op_builder is not importable ({err}); install deepspeed"
    builder = AsyncIOBuilder()
    try:
        if builder.is_compatible(verbose=False):
            return True, ""
    except Exception as err:
        return False, f"DeepSpeed's AsyncIOBuilder check failed ({err}); {_NO_AIO_HINT}"
    return False, f"DeepSpeed's async I/O op needs libaio, which was not found; {_NO_AIO_HINT}"


def _extensions_dir() -> str | None:
    """A torch-extensions folder of this Python environment's own (None: the user chose one).

    torch keys its JIT cache by extension name only; two environments (say a CI
    virtualenv and a developer's) sharing ~/.cache/torch_extensions rebuild the aio
    op (minutes) every time the other one used it, because the include paths differ.
    """
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return None
    import hashlib

    tag = hashlib.sha1(os.path.realpath(sys.prefix).encode()).hexdigest()[:10]
    return os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions", f"megatron-offload-plugin-{tag}")


def load_aio_op() -> Any:
    """DeepSpeed's built aio op module (JIT-built with libaio the first time, then cached per environment)."""
    ok, why = aio_available()
    if not ok:
        raise AioUnavailableError(why)
    from deepspeed.ops.op_builder import AsyncIOBuilder

    from .op_build import guarded_build

    folder = _extensions_dir()
    if folder is not None:
        os.environ["TORCH_EXTENSIONS_DIR"] = folder
    try:
        builder = AsyncIOBuilder()
        from torch.utils.cpp_extension import _get_build_directory  # where torch's JIT puts the op

        root = os.path.dirname(_get_build_directory(builder.name, verbose=False))
        return guarded_build(root, builder.name, lambda: builder.load(verbose=False))
    except Exception as err:
        raise AioUnavailableError(f"building DeepSpeed's async I/O op failed ({err}); {_NO_AIO_HINT}") from err
    finally:
        if folder is not None:
            os.environ.pop("TORCH_EXTENSIONS_DIR", None)


def aio_handle_kwargs(aio_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """``aio_handle`` keyword arguments from a DeepSpeed-style ``"aio"`` section (strict keys)."""
    cfg = dict(aio_config or {})
    unknown = sorted(set(cfg) - set(AIO_KEYS))
    if unknown:
        from ..config.loading import suggest_and_list

        raise ValueError(f"aio.{unknown[0]}: unknown key" + suggest_and_list(unknown[0], list(AIO_KEYS), ", ".join(AIO_KEYS)))
    if cfg.pop("use_gds", False):
        raise ValueError("aio.use_gds=true: GPUDirect storage is not supported by the offload tier; set it to false")
    if "thread_count" in cfg:
        if "intra_op_parallelism" in cfg and cfg["intra_op_parallelism"] != cfg["thread_count"]:
            raise ValueError("aio: both 'thread_count' and 'intra_op_parallelism' given with different values; keep one")
        cfg["intra_op_parallelism"] = cfg.pop("thread_count")
    out = {**AIO_DEFAULTS, **cfg}
    for key in ("block_size", "queue_depth", "intra_op_parallelism"):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1:
            raise ValueError(f"aio.{key}={out[key]!r}: expected a positive integer")
    for key in ("single_submit", "overlap_events"):
        if not isinstance(out[key], bool):
            raise ValueError(f"aio.{key}={out[key]!r}: expected true or false")
    return out


# ------------------------------------------------------------------ folder


def check_base_path(base: str | os.PathLike[str], option: str = "nvme_path") -> Path:
    """``base`` as a Path if it is an existing, writable directory; else ``ValueError`` naming it."""
    path = Path(base)
    if not path.exists():
        raise ValueError(f"{option}='{base}': directory does not exist; create it or set device='cpu'")
    if not path.is_dir():
        raise ValueError(f"{option}='{base}': not a directory; point it at a directory on the NVMe drive")
    if os.statvfs(path).f_flag & os.ST_RDONLY:  # not a permissions problem: no chmod will help
        raise ValueError(f"{option}='{base}': the file system there is mounted read-only; "
                         "remount it read-write or choose a directory on a writable drive")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{option}='{base}': directory is not writable by this user; "
                         "fix its permissions or choose another path")
    return path


def check_nvme_tier(base: str | os.PathLike[str], option: str) -> Path:
    """At start-up, before anything is built: ``base`` is a usable directory and aio can run here.

    ``ValueError`` (see :func:`check_base_path`) or :class:`AioUnavailableError`, naming ``option``.
    """
    path = check_base_path(base, option=option)
    ok, why = aio_available()
    if not ok:
        raise AioUnavailableError(f"{option}='{base}' needs DeepSpeed's async I/O: {why}")
    return path


def _remove_folder(path: str, lock_fd: int | None) -> None:
    """Close-time and exit-time removal (also the ``weakref.finalize`` callback: must not hold the folder)."""
    cleanup.unregister(Path(path))
    try:
        shutil.rmtree(path, ignore_errors=True)  # rmtree never follows symlinks into other trees
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def _make_folder(root: Path) -> Path:
    """A new ``mop-swap-<pid>-<8 hex>`` folder (0700) under ``root``: the one name shape reaping accepts."""
    for _ in range(100):
        path = root / f"{cleanup.PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, "no free swap folder name after 100 tries", str(root))


class SwapFolder:
    """A private per-run folder under ``base``: 0700, files 0600, gone at close, at exit and on SIGTERM.

    Opening one first reaps the folders that dead runs left in ``base``; see :mod:`.cleanup`
    for which signals remove it and why the folder holds a lock while open.
    """

    def __init__(self, base: str | os.PathLike[str], *, option: str = "nvme_path") -> None:
        root = check_base_path(base, option)
        cleanup.reap_dead_runs(root)
        try:
            self.path = _make_folder(root)
            try:
                os.chmod(self.path, 0o700, follow_symlinks=False)  # mkdir's mode went through the umask
                lock_fd = cleanup.hold_lock(self.path)
            except BaseException:
                shutil.rmtree(self.path, ignore_errors=True)
                raise
        except OSError as err:
            raise ValueError(f"{option}='{base}': cannot create a swap folder there ({err.strerror})") from err
        self._files: dict[str, Path] = {}
        cleanup.register(self.path)
        # also runs at interpreter exit
        self._finalizer = weakref.finalize(self, _remove_folder, str(self.path), lock_fd)
        logger.debug("swap folder %s", self.path)

    def file(self, key: str) -> Path:
        """The file for ``key`` (created empty, 0600, O_EXCL|O_NOFOLLOW, on first use)."""
        if self.closed:
            raise NvmeIOError(errno.EBADF, f"swap folder {self.path} is closed")
        known = self._files.get(key)
        if known is not None:
            return known
        if not _KEY_RE.fullmatch(key):
            raise ValueError(f"swap key {key!r}: use letters, digits, '.', '_' and '-' only (no path separators)")
        path = self.path / key
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as err:
            raise NvmeIOError(err.errno, f"cannot create swap file {path} ({err.strerror})") from err
        os.close(fd)
        self._files[key] = path
        return path

    def keys(self) -> list[str]:
        """Keys with a file in this folder (in creation order)."""
        return list(self._files)

    def check_file(self, key: str) -> Path:
        """The existing file for ``key``, refusing anything that is not our regular file (no symlinks)."""
        path = self._files[key]
        try:
            st = os.lstat(path)
        except FileNotFoundError as err:
            raise NvmeIOError(errno.ENOENT, f"swap file {path} is gone (removed behind our back)") from err
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise NvmeIOError(errno.EPERM, f"swap file {path} was replaced by something else; refusing to use it")
        return path

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Remove the folder and everything in it (idempotent)."""
        self._finalizer()

    def __enter__(self) -> "SwapFolder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SwapFolder({str(self.path)!r}{', closed' if self.closed else ''})"


# ------------------------------------------------------------------ swapper

#: Seconds a handle's ``wait()`` must block for its batch to be timed (see :class:`DirectionStats`).
BLOCKED_WAIT_S = 1e-3
AIO_DIRECTIONS = ("read", "write")  # one aio_handle each


@dataclass(frozen=True)
class DirectionStats:
    """Transfers of one direction: all of them, and the "timed" batches a throughput can be read from.

    A batch starts at the first submit while the direction has nothing pending and
    ends when that direction's handle ``wait()`` returns.  It is timed only when the
    wait blocked for at least :data:`BLOCKED_WAIT_S`: the I/O was then still running
    when we asked, so the device was working on this batch until the wait returned,
    and ``bytes / (return - first submit)`` is its throughput.  A wait that returns at
    once only says the I/O ended at some unknown earlier time (it may have sat done
    while the caller computed), so such a batch would understate the speed and is
    left out.  :attr:`gbps` is still a lower bound on what the device delivered: the
    interval includes the gaps between the batch's submits and the time the queue
    took to start, and the other direction may be sharing the disk meanwhile.  The
    ``alone_*`` counters keep the timed batches during which the other direction had
    nothing pending (the disk was this direction's alone), for :attr:`gbps_alone`.
    """

    bytes: int = 0  # padded bytes moved, all batches
    batches: int = 0
    timed_bytes: int = 0  # padded bytes of timed batches
    timed_batches: int = 0
    timed_seconds: float = 0.0  # first submit to wait return, timed batches
    alone_timed_bytes: int = 0  # timed batches with nothing of the other direction pending
    alone_timed_seconds: float = 0.0

    @property
    def gbps(self) -> float | None:
        """``timed_bytes / timed_seconds`` in GB/s (1e9), None when no batch was timed."""
        return self.timed_bytes / self.timed_seconds / 1e9 if self.timed_seconds > 0 else None

    @property
    def gbps_alone(self) -> float | None:
        """Like :attr:`gbps`, over the timed batches that had the disk to themselves."""
        return self.alone_timed_bytes / self.alone_timed_seconds / 1e9 if self.alone_timed_seconds > 0 else None

    def since(self, earlier: "DirectionStats") -> "DirectionStats":
        """What was counted after the snapshot ``earlier``."""
        return DirectionStats(*(getattr(self, f.name) - getattr(earlier, f.name) for f in fields(self)))


@dataclass(frozen=True)
class IOStats:
    """Transfer statistics of an :class:`AioSwapper` (see :class:`DirectionStats`).

    ``both`` counts reads and writes together, to compare with one disk when the two
    directions share it: a batch spans from the first submit while nothing at all is
    pending to the return of the last handle's wait, and is timed only when every
    handle's wait blocked (then each direction ran until at least the first wait began,
    after all submits, so the device was busy over the whole span; one direction long
    done while the other was submitted later would count idle time).
    """

    read: DirectionStats = DirectionStats()
    write: DirectionStats = DirectionStats()
    both: DirectionStats = DirectionStats()

    def since(self, earlier: "IOStats") -> "IOStats":
        return IOStats(*(getattr(self, f.name).since(getattr(earlier, f.name)) for f in fields(self)))


def _finish_pending(handles: dict[str, Any], pending: list[Any]) -> None:
    """Exit finalizer: a handle destroyed with transfers queued aborts the process, so wait each busy one."""
    busy = {p.op for p in pending}
    pending.clear()
    for op in AIO_DIRECTIONS:
        if op in busy:
            handles[op].wait()


@dataclass
class _Pending:
    op: str  # "write" | "read"
    key: str
    path: Path
    nbytes: int
    bounce: torch.Tensor
    out: torch.Tensor | None = None
    caller_buffer: bool = False  # a buffer from AioSwapper.buffer(): the caller keeps it, no copy, no recycling
    frame: Frame | None = None  # write: what it seals into the file; read: what must come back


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


class AioSwapper:
    """Async write/read of CPU tensors by key into a :class:`SwapFolder`, one ``aio_handle`` per direction.

    ``write`` copies the tensor into a page-aligned, padded bounce buffer and queues
    it (the caller may reuse the tensor at once); ``read`` queues a transfer whose
    bytes land in ``out`` when :meth:`wait` returns.  Nothing is guaranteed on disk
    or in ``out`` before :meth:`wait`.  The aio settings (queue depth, threads) apply
    to each handle.  Page-locked buffers come from DeepSpeed's process-wide pinned
    tensor manager, which every handle shares: any handle may free any buffer.
    """

    def __init__(self, folder: SwapFolder, aio_config: Mapping[str, Any] | None = None, *, aio_op: Any = None) -> None:
        self.folder = folder
        kwargs = aio_handle_kwargs(aio_config)
        op = aio_op if aio_op is not None else load_aio_op()
        args = (kwargs["block_size"], kwargs["queue_depth"], kwargs["single_submit"], kwargs["overlap_events"],
                kwargs["intra_op_parallelism"])
        self._handles: dict[str, Any] = {op_: op.aio_handle(*args) for op_ in AIO_DIRECTIONS}
        self._open = True
        self._quantum = ALIGNMENT * kwargs["intra_op_parallelism"]  # aio refuses sizes not divisible by this
        self._frames: dict[str, Frame] = {}  # key -> what its last completed write put there
        self._reserved: dict[str, int] = {}  # key -> bytes of its file reserved with posix_fallocate
        self._pending: list[_Pending] = []  # mutated in place: the exit finalizer below reads it
        # A handle destroyed with transfers queued aborts the process (C assert): finish them at exit.
        self._exit_finalizer = weakref.finalize(self, _finish_pending, self._handles, self._pending)
        # op ("read", "write", "both") -> (first submit time, bytes) while it has transfers pending
        self._batch: dict[str, tuple[float, int]] = {}
        self._stats = {op_: DirectionStats() for op_ in (*AIO_DIRECTIONS, "both")}
        self._free: dict[int, list[torch.Tensor]] = {}  # padded size -> reusable locked bounce buffers
        self.locked_bytes = 0  # page-locked buffers allocated and not freed (in use + free pool)
        self.max_locked_bytes: int | None = None  # above this, released buffers are freed, not pooled (None: no cap)

    # -- buffers
    @property
    def _locker(self) -> Any:
        """The handle that allocates and frees page-locked buffers (any one can: the manager is shared)."""
        return self._handles["write"]

    def _payload(self, nbytes: int) -> int:
        """Where the trailer starts: ``nbytes`` rounded up to aio's size quantum."""
        return -(-nbytes // self._quantum) * self._quantum

    def _padded(self, nbytes: int) -> int:
        """Bytes of the frame holding ``nbytes``: on disk, moved per transfer, and the bounce buffer's size."""
        return self._payload(nbytes) + self._quantum

    def _bounce(self, size: int) -> torch.Tensor:
        free = self._free.get(size)
        if free:
            return free.pop()
        if self.max_locked_bytes is not None:  # make room: drop pooled buffers of other sizes first
            for other in list(self._free):
                while self._free[other] and self.locked_bytes + size > self.max_locked_bytes:
                    self._locker.free_cpu_locked_tensor(self._free[other].pop())
                    self.locked_bytes -= other
        buf = self._locker.new_cpu_locked_tensor(size, torch.empty(0, dtype=torch.uint8))
        self.locked_bytes += size
        return buf

    def _recycle(self, buf: torch.Tensor) -> None:
        if self.max_locked_bytes is not None and self.locked_bytes > self.max_locked_bytes:
            self._locker.free_cpu_locked_tensor(buf)
            self.locked_bytes -= buf.numel()
            return
        self._free.setdefault(buf.numel(), []).append(buf)

    @property
    def free_bytes(self) -> int:
        return sum(size * len(bufs) for size, bufs in self._free.items())

    def buffer(self, nbytes: int) -> torch.Tensor:
        """A page-locked uint8 buffer of one frame, for :meth:`write_buffer` / :meth:`read_buffer` without copies.

        The caller owns it until :meth:`release_buffer`; ``buffer[:nbytes]`` is the payload
        (the bytes after it belong to the trailer).
        """
        self._check_open()
        return self._bounce(self._padded(nbytes))

    def release_buffer(self, buf: torch.Tensor) -> None:
        """Give back a buffer from :meth:`buffer` (it must not be part of a pending transfer)."""
        if any(p.bounce is buf for p in self._pending):
            raise NvmeIOError(errno.EBUSY, "buffer is part of a pending transfer; call wait() first")
        if self._open:
            self._recycle(buf)

    def seal_buffer(self, buf: torch.Tensor, nbytes: int) -> Frame:
        """Checksum ``buf[:nbytes]`` and write its trailer now, for a :meth:`write_buffer` later.

        Lets a caller run the checksum while earlier transfers are still in flight;
        ``buf[:nbytes]`` must not change between the two calls.
        """
        self._check_buffer("(unsealed)", buf, nbytes)
        return seal(buf, nbytes, self._payload(nbytes))

    def write_buffer(self, key: str, buf: torch.Tensor, nbytes: int, *, sealed: Frame | None = None) -> None:
        """Queue writing ``buf[:nbytes]`` (``buf`` from :meth:`buffer`) without a copy; leave ``buf`` alone until wait().

        ``sealed``: the frame :meth:`seal_buffer` returned for these bytes (else they are sealed here).
        """
        self._check_open()
        self._check_buffer(key, buf, nbytes)
        if any(p.key == key for p in self._pending):
            raise NvmeIOError(errno.EBUSY, f"swap '{key}': a transfer of this key is still pending; call wait() first")
        if sealed is not None and sealed.nbytes != nbytes:
            raise ValueError(f"swap '{key}': sealed for {sealed.nbytes} bytes, writing {nbytes}")
        path = self.folder.file(key)
        self.folder.check_file(key)
        self.reserve(key, nbytes)
        frame = sealed if sealed is not None else seal(buf, nbytes, self._payload(nbytes))
        self._submit(_Pending("write", key, path, nbytes, buf, caller_buffer=True, frame=frame))

    def read_buffer(self, key: str, buf: torch.Tensor) -> None:
        """Queue reading ``key`` into ``buf`` (from :meth:`buffer`, at least its padded size) without a copy."""
        self._check_open()
        frame = self._frame(key)
        self._check_buffer(key, buf, frame.nbytes)
        path = self._check_length(key)
        self._submit(_Pending("read", key, path, frame.nbytes, buf, caller_buffer=True, frame=frame))

    def _check_buffer(self, key: str, buf: torch.Tensor, nbytes: int) -> None:
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != self._padded(nbytes):
            raise ValueError(f"swap '{key}': the buffer must come from AioSwapper.buffer({nbytes}) "
                             f"(uint8, one frame of {self._padded(nbytes)} bytes)")

    def _frame(self, key: str) -> Frame:
        frame = self._frames.get(key)
        if frame is None:
            raise KeyError(f"swap read '{key}': nothing was written under this key (or its write was not waited for)")
        return frame

    def _check_length(self, key: str) -> Path:
        """The key's file, if it holds a whole frame (aio aborts the process reading past the end)."""
        path = self.folder.check_file(key)
        size = self._padded(self._frames[key].nbytes)
        on_disk = self._disk_size(path)
        if on_disk < size:
            raise NvmeIOError(errno.EIO, f"short swap file {path}: {on_disk} bytes on disk, a frame of {size} "
                                         f"expected (offset 0, size {size})", path=path, offset=0, size=size,
                              keys=(key,))
        return path

    def reserve(self, key: str, nbytes: int) -> None:
        """Reserve the disk space of a frame of ``nbytes`` for ``key`` now (``posix_fallocate``).

        Called by every write; call it ahead to make sure a later write of this size
        cannot find the disk full.  ``NvmeIOError`` (ENOSPC) names path and sizes.
        """
        size = self._padded(nbytes)
        if self._reserved.get(key, 0) >= size:
            return
        path = self.folder.file(key)
        self.folder.check_file(key)
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as err:
            if err.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # no fallocate here: check what is free instead
                need = max(0, size - self._disk_size(path))
                free = shutil.disk_usage(self.folder.path).free
                if need <= free:
                    self._reserved[key] = size
                    return
                err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            free = shutil.disk_usage(self.folder.path).free
            raise NvmeIOError(err.errno or errno.EIO,
                              f"{'disk full' if err.errno == errno.ENOSPC else err.strerror}: reserving {size} bytes "
                              f"for swap file {path} (offset 0, size {size}) failed, {free} bytes free on that "
                              "file system", path=path, offset=0, size=size, keys=(key,)) from err
        finally:
            os.close(fd)
        self._reserved[key] = size

    # -- I/O
    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Queue writing ``tensor``'s bytes under ``key`` (padded on disk; the tensor may be reused at once)."""
        self._check_open()
        if tensor.device.type != "cpu":
            raise TypeError(f"swap write '{key}': expected a CPU tensor, got one on {tensor.device}")
        if any(p.key == key for p in self._pending):
            raise NvmeIOError(errno.EBUSY, f"swap '{key}': a transfer of this key is still pending; call wait() first")
        nbytes = tensor.numel() * tensor.element_size()
        path = self.folder.file(key)
        self.folder.check_file(key)
        self.reserve(key, nbytes)
        bounce = self._bounce(self._padded(nbytes))
        if nbytes:
            bounce[:nbytes].copy_(_byte_view(tensor.contiguous()))
        bounce[nbytes: self._payload(nbytes)].zero_()
        frame = seal(bounce, nbytes, self._payload(nbytes))
        self._submit(_Pending("write", key, path, nbytes, bounce, frame=frame))

    def read(self, key: str, out: torch.Tensor) -> None:
        """Queue reading ``key`` into ``out`` (same byte size as written); valid after :meth:`wait`."""
        self._check_open()
        frame = self._frame(key)
        if out.device.type != "cpu" or not out.is_contiguous():
            raise TypeError(f"swap read '{key}': expected a contiguous CPU tensor to read into")
        nbytes = out.numel() * out.element_size()
        if nbytes != frame.nbytes:
            raise ValueError(f"swap read '{key}': out has {nbytes} bytes, {frame.nbytes} were written")
        path = self._check_length(key)
        self._submit(_Pending("read", key, path, nbytes, self._bounce(self._padded(nbytes)), out, frame=frame))

    def _submit(self, p: _Pending) -> None:
        if p.op == "read":  # a read that never fills the buffer must not find an old trailer there
            payload = self._payload(p.nbytes)
            p.bounce[payload: payload + _TRAILER.size].zero_()
        handle = self._handles[p.op]
        fn = handle.async_pwrite if p.op == "write" else handle.async_pread
        start = time.perf_counter()
        rc = fn(p.bounce, str(p.path), 0)
        if rc != 0:
            if not p.caller_buffer:
                self._recycle(p.bounce)
            raise NvmeIOError(errno.EIO, f"aio {p.op} of {p.bounce.numel()} bytes ({p.nbytes} unpadded) "
                                         f"{'to' if p.op == 'write' else 'from'} {p.path} at offset 0 was refused "
                                         f"(returned {rc})", path=p.path, offset=0, size=p.bounce.numel(),
                              keys=(p.key,))
        self._pending.append(p)
        for op in (p.op, "both"):
            first, nbytes = self._batch.get(op, (start, 0))
            self._batch[op] = (first, nbytes + p.bounce.numel())

    @property
    def pending(self) -> int:
        return len(self._pending)

    def io_stats(self) -> IOStats:
        """Transfer statistics per direction so far (completed batches only); see :class:`DirectionStats`."""
        return IOStats(self._stats["read"], self._stats["write"], self._stats["both"])

    def _count_batch(self, op: str, timed: bool, end: float, alone: bool) -> None:
        first, nbytes = self._batch.pop(op)
        s, seconds = self._stats[op], (end - first) * timed
        self._stats[op] = DirectionStats(s.bytes + nbytes, s.batches + 1, s.timed_bytes + nbytes * timed,
                                         s.timed_batches + timed, s.timed_seconds + seconds,
                                         s.alone_timed_bytes + nbytes * timed * alone,
                                         s.alone_timed_seconds + seconds * alone)

    def wait(self) -> None:
        """Complete every queued transfer; raise :class:`NvmeIOError` for any that failed (no-op when idle).

        Each busy handle is waited on its own, the one whose batch started first
        first: it is the likelier to be done first, so the second wait still finds
        its I/O running and its batch gets timed too.
        """
        if not self._pending:
            return  # aio_handle.wait() with nothing pending aborts the process
        pending = list(self._pending)
        self._pending.clear()
        errors: list[tuple[_Pending | None, str]] = []
        all_timed, end = True, 0.0
        busy = sorted((o for o in AIO_DIRECTIONS if o in self._batch), key=lambda o: self._batch[o][0])
        for op in busy:  # every wait ends both directions' batches: one busy direction had the disk alone
            t0 = time.perf_counter()
            done = self._handles[op].wait()
            end = time.perf_counter()
            timed = end - t0 >= BLOCKED_WAIT_S  # the I/O was still running: the device worked until now
            self._count_batch(op, timed, end, alone=len(busy) == 1)
            all_timed &= timed
            count = sum(p.op == op for p in pending)
            if done != count:  # which ones is not said: every transfer of this direction is suspect
                errors.extend((p, f"aio completed {done} of {count} {op}s") for p in pending if p.op == op)
        self._count_batch("both", all_timed, end, alone=len(busy) == 1)
        failed = {p.key for p, _ in errors if p is not None}
        for p in pending:
            size = p.bounce.numel()
            if p.op == "write":
                on_disk = self._disk_size(p.path)
                if on_disk < size or p.key in failed:
                    self._frames.pop(p.key, None)
                    if p.key not in failed:
                        errors.append((p, f"write left {on_disk} bytes in the file (disk full or I/O error)"))
                else:
                    assert p.frame is not None
                    self._frames[p.key] = p.frame
            elif p.key not in failed:
                assert p.frame is not None
                why = check_frame(p.bounce, self._payload(p.nbytes), p.frame)
                if why is not None:
                    errors.append((p, f"the bytes read back are not the bytes written: {why}"))
                elif p.out is not None and p.nbytes:
                    _byte_view(p.out).copy_(p.bounce[:p.nbytes])
            if not p.caller_buffer:
                self._recycle(p.bounce)
        if errors:
            first = next(p for p, _ in errors if p is not None)
            raise NvmeIOError(errno.EIO, "; ".join(
                f"aio {p.op} of swap file {p.path} (offset 0, size {p.bounce.numel()}): {why}" for p, why in errors
                if p is not None), path=first.path, offset=0, size=first.bounce.numel(),
                keys=tuple(dict.fromkeys(p.key for p, _ in errors if p is not None)))

    @staticmethod
    def _disk_size(path: Path) -> int:
        try:
            return os.lstat(path).st_size
        except FileNotFoundError:
            return 0

    def nbytes(self, key: str) -> int:
        """Logical byte size last written under ``key``."""
        return self._frames[key].nbytes

    def __contains__(self, key: str) -> bool:
        return key in self._frames

    @property
    def nbytes_on_disk(self) -> int:
        """Bytes the valid swap frames take (payload padded, plus the trailer block)."""
        return sum(self._padded(f.nbytes) for f in self._frames.values())

    def forget(self, key: str) -> None:
        """Mark ``key``'s file as holding no valid data (its file and reserved space stay; the next write reuses it)."""
        self._frames.pop(key, None)

    def discard(self, key: str) -> None:
        """Forget ``key`` and delete its file."""
        self._frames.pop(key, None)
        self._reserved.pop(key, None)
        path = self.folder._files.pop(key, None)
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _check_open(self) -> None:
        if not self._open:
            raise NvmeIOError(errno.EBADF, "AioSwapper is closed")

    @property
    def closed(self) -> bool:
        return not self._open

    def close(self) -> None:
        """Wait for pending transfers (errors still raise), then free the bounce buffers (idempotent)."""
        if not self._open:
            return
        try:
            self.wait()
        finally:
            for bufs in self._free.values():
                for buf in bufs:
                    self._locker.free_cpu_locked_tensor(buf)
                    self.locked_bytes -= buf.numel()
            self._free.clear()
            self._exit_finalizer.detach()
            self._open = False
            self._handles.clear()  # the handles (and their threads) go now, not at garbage collection

    def __enter__(self) -> "AioSwapper":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SwapTier:
    """A private swap folder and the aio swapper writing into it, opened and closed as one.

    If the swapper cannot be built the folder is removed at once; closing waits for the
    swapper's pending transfers (their errors still raise) and always removes the folder.
    """

    def __init__(self, base: str | os.PathLike[str], aio_config: Mapping[str, Any] | None = None,
                 *, option: str = "nvme_path") -> None:
        self.folder = SwapFolder(base, option=option)
        try:
            self.swapper = AioSwapper(self.folder, aio_config)
        except BaseException:
            self.folder.close()
            raise

    def close(self) -> None:
        try:
            self.swapper.close()
        finally:
            self.folder.close()
