"""Building DeepSpeed's JIT ops without wedging a user: one build per environment, said out loud.

DeepSpeed builds its async I/O op with torch's JIT extension loader the first
time NVMe offload is used (minutes on a small machine).  torch guards the build
with a ``lock`` file in the op's build folder and waits on it forever, silently,
if a build was killed (Ctrl-C, a job time limit, torchrun tearing ranks down):
every later run hangs at 0% CPU.

Here every plugin build of an op holds an ``flock`` on ``<op>.mop-lock`` beside
the build folder (the kernel drops it when its process dies, SIGKILL included)
and records its pid in ``<op>.mop-owner`` while it builds.  A process that gets
the flock and still finds an owner file knows that build died, and removes
torch's lock it left, saying so.  A wait on a live build names the pid it waits
for.  ``python -m megatron_offload_plugin build-ops`` builds ahead of time.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: A torch build lock with no plugin owner (someone built the op outside the plugin) older
#: than this is taken as left by a dead build: the aio op builds in minutes, not an hour.
FOREIGN_LOCK_STALE_S = 3600.0


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or "0") or None
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def build_lock(extensions_dir: str | os.PathLike[str], name: str) -> Iterator[None]:
    """Hold the plugin's build lock of op ``name``; clear what a dead build left behind."""
    root = Path(extensions_dir)
    root.mkdir(parents=True, exist_ok=True)
    lock_path, owner = root / f"{name}.mop-lock", root / f"{name}.mop-owner"
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning(
                "waiting for DeepSpeed's %s op being built by pid %s in %s (another process of this "
                "environment started the build; it takes minutes the first time)",
                name, _read_pid(owner) or "?", root / name,
            )
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            clear_stale_torch_lock(root, name)
            owner.write_text(str(os.getpid()))
            try:
                yield
            finally:
                owner.unlink(missing_ok=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def clear_stale_torch_lock(extensions_dir: str | os.PathLike[str], name: str, *, now: float | None = None) -> bool:
    """Remove torch's build lock of op ``name`` if the build that made it is dead; True if removed.

    Call with the plugin's build lock held: then an owner file means the plugin build
    that wrote it died (it removes the file when it ends); a lock with no owner file came
    from a build outside the plugin and is removed only once older than
    :data:`FOREIGN_LOCK_STALE_S`.
    """
    root = Path(extensions_dir)
    torch_lock, owner = root / name / "lock", root / f"{name}.mop-owner"
    if not torch_lock.exists():
        owner.unlink(missing_ok=True)
        return False
    pid = _read_pid(owner)
    if owner.exists():  # with the plugin's lock held, its writer is gone (SIGKILL, a crash)
        why = f"a build by pid {pid} that did not finish" if pid else "a build that did not finish"
    else:
        age = (time.time() if now is None else now) - torch_lock.stat().st_mtime
        if age < FOREIGN_LOCK_STALE_S:
            logger.warning(
                "DeepSpeed's %s op: torch's build lock %s is %.0f s old and not the plugin's; waiting for "
                "that build (delete the file if no build of this environment is running)", name, torch_lock, age)
            return False
        why = f"a build outside the plugin, {age / 60:.0f} minutes ago"
    torch_lock.unlink(missing_ok=True)
    owner.unlink(missing_ok=True)
    logger.warning("DeepSpeed's %s op: removed the build lock %s left by %s; building again", name, torch_lock, why)
    return True


def is_built(extensions_dir: str | os.PathLike[str], name: str) -> bool:
    """Whether torch's JIT cache holds a built library of op ``name``."""
    folder = Path(extensions_dir) / name
    return folder.is_dir() and any(p.suffix == ".so" for p in folder.iterdir())


def _installed_with_deepspeed(name: str) -> bool:
    """Whether DeepSpeed was installed with op ``name`` built (``DS_BUILD_AIO=1``): nothing to JIT."""
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:  # pragma: no cover
        return False
    return bool(installed_ops.get(name))


def guarded_build(extensions_dir: str | os.PathLike[str], name: str, build: Callable[[], T]) -> T:
    """``build()`` (DeepSpeed's ``OpBuilder.load``) under :func:`build_lock`, with a message
    before a build and its duration after; an op installed with DeepSpeed just loads."""
    if _installed_with_deepspeed(name):
        return build()
    with build_lock(extensions_dir, name):
        if is_built(extensions_dir, name):
            return build()
        logger.warning("building DeepSpeed's %s op in %s: the first NVMe use in this environment "
                       "(a few minutes; later runs load it)", name, Path(extensions_dir) / name)
        start = time.monotonic()
        result = build()
        logger.warning("built DeepSpeed's %s op in %.0f s", name, time.monotonic() - start)
        return result
