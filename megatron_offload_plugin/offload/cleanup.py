"""Swap folders go on every exit but SIGKILL, and the next run reaps what SIGKILL left.

``weakref.finalize``/atexit (see :class:`~.nvme.SwapFolder`) only runs at a normal exit.
Two gaps remain, closed here:

* **Signals whose default disposition kills without atexit** -- SIGTERM (torchrun sends it
  to the surviving ranks when one dies) and SIGINT where it is ``SIG_DFL``.  The first
  folder opened installs a handler for both (main thread only: Python refuses elsewhere,
  and the folder then relies on atexit alone); the last one closed restores what was there.
  The handler only removes folders when the process is about to die of the signal, i.e.
  when the handler it replaced is ``SIG_DFL``: it removes every open folder of this
  process, restores ``SIG_DFL`` and re-sends the signal, so the exit status is the usual
  one (``-15`` / ``-2``).  A Python handler it replaced is called instead and decides: it
  may let the run go on (Megatron's ``--exit-signal-handler`` sets a flag and saves a
  checkpoint later; Python's own SIGINT handler raises ``KeyboardInterrupt``, which a user
  may catch), so the folder stays until atexit.  ``SIG_IGN`` stays ignored.
* **SIGKILL and crashes** -- nothing runs.  Opening a folder first reaps the base path's
  folders of dead runs (:func:`is_dead_run_folder`), one log line each.

A folder's owner holds ``flock`` on :data:`LOCK_NAME` inside it while open: the kernel drops
it when the process dies, however it dies, and a pid that merely looks dead (another PID
namespace sharing the drive) keeps its folder because its lock is still held.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import signal
import stat
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Callable

logger = logging.getLogger(__name__)

PREFIX = "mop-swap-"
#: ``mop-swap-<pid>-<8 hex digits>``: the only names ever reaped.
NAME_RE = re.compile(r"mop-swap-([1-9][0-9]{0,9})-[0-9a-f]{8}")
#: Held with ``flock(LOCK_EX)`` by the owning process while the folder is open (not a valid swap key).
LOCK_NAME = ".owner.lock"
_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_open: dict[str, int] = {}  # open folder path -> owning pid (a forked child inherits, must not act on it)
_previous: dict[int, Any] = {}  # signal -> handler we replaced, while ours is installed
_lock = threading.Lock()  # register/unregister only; never taken in the signal handler


# ------------------------------------------------------------------ lock


def hold_lock(folder: Path) -> int | None:
    """Create ``folder``'s lock file and take its lock; the fd to close when the folder closes.

    None where the file system has no ``flock`` (some network mounts): the folder still
    works, and since its lock can then not be taken by a reaper either, it is never reaped.
    """
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        logger.debug("no lock on swap folder %s (%s): it will not be reaped if this run is killed", folder, err)
        return None
    return fd


def _lock_is_free(folder: Path) -> bool:
    """True when nobody holds ``folder``'s lock (or the folder has none); False when held or unreadable."""
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return True  # died between creating the folder and its lock
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False  # EWOULDBLOCK: a live owner; anything else: do not guess
    finally:
        os.close(fd)


# ------------------------------------------------------------------ reaping


def _pid_is_dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # exists, someone else's
    return False


def is_dead_run_folder(path: Path, *, uid: int | None = None) -> bool:
    """Whether ``path`` is a swap folder left by a dead run of user ``uid`` (default: this user).

    All must hold: the name is exactly ``mop-swap-<pid>-<8 hex>``, ``path`` itself (not
    followed) is a directory owned by ``uid``, ``<pid>`` is not this process and no process
    has it, and the folder's lock is not held.
    """
    match = NAME_RE.fullmatch(path.name)
    if match is None:
        return False
    pid = int(match.group(1))
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != (os.getuid() if uid is None else uid):
        return False
    return pid != os.getpid() and _pid_is_dead(pid) and _lock_is_free(path)


def reap_dead_runs(root: Path) -> list[Path]:
    """Remove ``root``'s swap folders of dead runs (:func:`is_dead_run_folder`); the ones removed.

    Never fails: a folder that cannot be checked or removed is left, with a debug line.
    """
    reaped = []
    try:
        names = [entry.name for entry in os.scandir(root) if entry.name.startswith(PREFIX)]
    except OSError as err:
        logger.debug("not reaping dead runs' swap folders in %s: %s", root, err)
        return reaped
    for name in names:
        path = root / name
        if not is_dead_run_folder(path):
            continue
        try:
            shutil.rmtree(path)  # fd-based on Linux: refuses a symlink swapped in meanwhile, never follows one
        except OSError as err:
            logger.debug("could not reap swap folder %s: %s", path, err)
            continue
        logger.info("reaped the swap folder of a dead run: %s", path)
        reaped.append(path)
    return reaped


# ------------------------------------------------------------------ signals


def _remove_open_folders() -> None:
    me = os.getpid()
    for path, owner in list(_open.items()):
        if owner == me:
            shutil.rmtree(path, ignore_errors=True)


def _on_signal(sig: int, frame: FrameType | None) -> None:
    """Remove this process's folders if ``sig`` is about to kill it; else hand it to the handler we replaced."""
    previous = _previous.get(sig, signal.SIG_DFL)
    if callable(previous):
        previous(sig, frame)
        return
    if previous == signal.SIG_IGN:
        return
    _remove_open_folders()  # SIG_DFL (or a handler set outside Python, None): the process dies now
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)


def _install() -> None:
    if threading.current_thread() is not threading.main_thread():
        logger.debug("swap folder opened off the main thread: no SIGTERM/SIGINT cleanup handler "
                     "(Python allows them on the main thread only); the folder relies on atexit")
        return
    for sig in _SIGNALS:
        current: Callable[..., Any] | int | None = signal.getsignal(sig)
        if current is not _on_signal:
            _previous[sig] = current
            signal.signal(sig, _on_signal)


def _restore() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # ours stays; with nothing open it only passes signals on
    for sig in _SIGNALS:
        if sig in _previous and signal.getsignal(sig) is _on_signal:  # someone set theirs on top: leave it
            previous = _previous.pop(sig)
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)


def register(path: Path) -> None:
    """``path`` is open: remove it if a signal kills this process (installs the handler when needed)."""
    with _lock:
        _open[str(path)] = os.getpid()
        if len(_previous) < len(_SIGNALS):
            _install()


def unregister(path: Path) -> None:
    """``path`` is closed; the last close puts the replaced handlers back."""
    with _lock:
        _open.pop(str(path), None)
        if not any(owner == os.getpid() for owner in _open.values()):
            _restore()


__all__ = ["LOCK_NAME", "NAME_RE", "hold_lock", "is_dead_run_folder", "reap_dead_runs", "register", "unregister"]
