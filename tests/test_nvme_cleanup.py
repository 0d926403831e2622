"""Swap folders go on every exit but SIGKILL, and a dead run's folder is reaped by the next run.

The child processes block on stdin after printing "ready", so each signal arrives while the
folder is open and the child is idle in Python -- no sleeps decide the outcome; every wait is
bounded by a timeout.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from megatron_offload_plugin.offload.nvme import SwapFolder

TIMEOUT_S = 60

# Opens a swap folder the way the product does, writes a file, says where, then waits on stdin.
_CHILD = """
import signal, sys
from megatron_offload_plugin.offload.nvme import SwapFolder
mode = sys.argv[2]
if mode == "sigint-dfl":
    signal.signal(signal.SIGINT, signal.SIG_DFL)
if mode == "user-handler":
    def handler(sig, frame):
        print("handled", flush=True)
    signal.signal(signal.SIGTERM, handler)
folder = SwapFolder(sys.argv[1])
folder.file("k").write_bytes(b"x" * 100)
print(folder.path, flush=True)
print("ready", flush=True)
sys.stdin.readline()
if mode == "user-handler":  # still usable after the handled signal
    folder.file("k2").write_bytes(b"y")
    print("ok", flush=True)
"""


def _start(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], Path]:
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path), mode], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = Path(child.stdout.readline().strip())
    ready = child.stdout.readline().strip()
    if ready != "ready":
        child.kill()
        pytest.fail(f"child did not get ready: {ready!r}; stderr: {child.communicate(timeout=TIMEOUT_S)[1]}")
    assert path.parent == tmp_path and (path / "k").exists()
    return child, path


def _signal_and_reap(child: subprocess.Popen[str], sig: int) -> tuple[int, str]:
    child.send_signal(sig)
    try:
        _, err = child.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        pytest.fail(f"child ignored signal {sig}")
    return child.returncode, err


def test_sigterm_removes_the_swap_folder_and_exits_as_killed_by_sigterm(tmp_path):
    child, path = _start(tmp_path, "plain")
    rc, err = _signal_and_reap(child, signal.SIGTERM)
    assert not path.exists(), err
    assert rc == -signal.SIGTERM, err  # the default disposition, re-raised: torchrun and shells see SIGTERM


def test_sigint_raises_keyboard_interrupt_and_the_folder_goes_at_exit(tmp_path):
    # Python's own SIGINT handler stays in charge: KeyboardInterrupt, which a user may catch and
    # carry on (the folder must then survive); uncaught, Python exits as killed by SIGINT.
    child, path = _start(tmp_path, "plain")
    rc, err = _signal_and_reap(child, signal.SIGINT)
    assert "KeyboardInterrupt" in err
    assert not path.exists(), err
    assert rc == -signal.SIGINT, err


def test_sigint_with_the_default_disposition_removes_the_folder(tmp_path):
    child, path = _start(tmp_path, "sigint-dfl")
    rc, err = _signal_and_reap(child, signal.SIGINT)
    assert not path.exists(), err
    assert rc == -signal.SIGINT, err


def test_a_users_sigterm_handler_is_chained_and_the_run_keeps_its_folder(tmp_path):
    # e.g. Megatron's --exit-signal-handler: it sets a flag and the run saves and exits later.
    child, path = _start(tmp_path, "user-handler")
    child.send_signal(signal.SIGTERM)
    assert child.stdout.readline().strip() == "handled"
    assert (path / "k").exists()
    out, err = child.communicate("\n", timeout=TIMEOUT_S)
    assert child.returncode == 0 and out.strip() == "ok", err
    assert not path.exists()


def _in_a_fresh_interpreter(code: str, tmp_path) -> str:
    """Handler installation is process state: a folder another test left open in this pytest
    process would already have installed them, so these run where nothing else is open."""
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_handlers_are_installed_at_the_first_open_and_restored_at_the_last_close(tmp_path):
    out = _in_a_fresh_interpreter(
        "import signal, sys\n"
        "from megatron_offload_plugin.offload.nvme import SwapFolder\n"
        "before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}\n"
        "a, b = SwapFolder(sys.argv[1]), SwapFolder(sys.argv[1])\n"
        "assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]\n"
        "a.close()\n"
        "assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]  # b still open\n"
        "b.close()\n"
        "assert {sig: signal.getsignal(sig) for sig in before} == before\n"
        "print('ok')\n", tmp_path)
    assert out.strip() == "ok"


def test_a_folder_opened_off_the_main_thread_installs_nothing_and_says_so(tmp_path):
    out = _in_a_fresh_interpreter(
        "import logging, signal, sys, threading\n"
        "from megatron_offload_plugin.offload.nvme import SwapFolder\n"
        "seen = []\n"
        "class H(logging.Handler):\n"
        "    def emit(self, record): seen.append(record.getMessage())\n"
        "log = logging.getLogger('megatron_offload_plugin.offload.cleanup')\n"
        "log.addHandler(H()); log.setLevel(logging.DEBUG)\n"
        "before = signal.getsignal(signal.SIGTERM)\n"
        "opened = []\n"
        "t = threading.Thread(target=lambda: opened.append(SwapFolder(sys.argv[1]))); t.start(); t.join(60)\n"
        "assert opened and signal.getsignal(signal.SIGTERM) is before\n"
        "assert any('off the main thread' in m for m in seen), seen\n"
        "opened[0].close()\n"
        "print('ok')\n", tmp_path)
    assert out.strip() == "ok"


def test_without_flock_the_folder_still_opens_and_is_never_reaped(tmp_path, monkeypatch):
    from megatron_offload_plugin.offload import cleanup

    def no_locks(fd: int, op: int) -> None:
        raise OSError(37, "No locks available")  # ENOLCK, as on a mount without lock support

    monkeypatch.setattr(cleanup.fcntl, "flock", no_locks)
    with SwapFolder(tmp_path) as folder:
        folder.file("k")
        assert not cleanup._lock_is_free(folder.path)
    assert not folder.path.exists()


_FORK = """
import os, signal, sys
from megatron_offload_plugin.offload.nvme import SwapFolder
folder = SwapFolder(sys.argv[1])
pid = os.fork()
if pid == 0:
    os.kill(os.getpid(), signal.SIGTERM)
    os._exit(3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), folder.path.exists(), flush=True)
"""


def test_a_forked_child_killed_by_sigterm_leaves_the_parents_folder(tmp_path):
    # DataLoader workers are forked and stopped with SIGTERM: they must not remove the parent's folder.
    out = subprocess.run([sys.executable, "-c", _FORK, str(tmp_path)], capture_output=True, text=True,
                         timeout=TIMEOUT_S, check=True).stdout.split()
    assert out == [str(-signal.SIGTERM), "True"]


# ------------------------------------------------------------------ reaping


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait(timeout=TIMEOUT_S)
    return child.pid  # reaped: no process has this pid now (reuse within the test is vanishingly rare)


def _plant(base: Path, name: str) -> Path:
    path = base / name
    path.mkdir(mode=0o700)
    (path / "k").write_bytes(b"old")
    return path


def test_a_dead_runs_folder_is_reaped_when_a_new_one_opens(tmp_path, caplog):
    dead = _plant(tmp_path, f"mop-swap-{_dead_pid()}-0a1b2c3d")
    live = _plant(tmp_path, f"mop-swap-{os.getppid()}-0a1b2c3d")
    with caplog.at_level("INFO"), SwapFolder(tmp_path) as folder:
        assert not dead.exists()
        assert live.exists() and folder.path.exists()
    assert [r.getMessage() for r in caplog.records if "reaped" in r.getMessage()] == [
        f"reaped the swap folder of a dead run: {dead}"]


def test_names_off_the_pattern_are_never_touched(tmp_path):
    pid = _dead_pid()
    names = [f"mop-swap-{pid}", f"mop-swap-{pid}-", f"mop-swap-{pid}-0a1b2c3d-x", f"mop-swap-{pid}-ZZZZZZZZ",
             f"mop-swap-0{pid}-0a1b2c3d", f"xmop-swap-{pid}-0a1b2c3d", f"mop-swap--{pid}-0a1b2c3d"]
    kept = [_plant(tmp_path, n) for n in names]
    file_named_so = tmp_path / f"mop-swap-{pid}-00000000"
    file_named_so.write_bytes(b"keep")
    with SwapFolder(tmp_path):
        pass
    assert all(p.exists() for p in kept) and file_named_so.read_bytes() == b"keep"


def test_a_symlink_named_like_a_swap_folder_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data").write_bytes(b"keep")
    link = tmp_path / f"mop-swap-{_dead_pid()}-0a1b2c3d"
    os.symlink(victim, link)
    with SwapFolder(tmp_path):
        pass
    assert link.is_symlink() and (victim / "data").read_bytes() == b"keep"


def test_a_folder_whose_lock_is_held_is_kept_even_if_its_pid_looks_dead(tmp_path):
    # Another PID namespace (a container sharing the drive) makes a live run's pid look dead here.
    from megatron_offload_plugin.offload.cleanup import LOCK_NAME

    held = _plant(tmp_path, f"mop-swap-{_dead_pid()}-0a1b2c3d")
    fd = os.open(held / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with SwapFolder(tmp_path):
            pass
        assert (held / "k").exists()
    finally:
        os.close(fd)


def test_the_reap_predicate_keeps_other_users_and_live_pids(tmp_path):
    from megatron_offload_plugin.offload.cleanup import is_dead_run_folder

    dead = _plant(tmp_path, f"mop-swap-{_dead_pid()}-0a1b2c3d")
    assert is_dead_run_folder(dead)
    assert not is_dead_run_folder(dead, uid=os.getuid() + 1)  # owned by someone else
    assert not is_dead_run_folder(_plant(tmp_path, f"mop-swap-{os.getppid()}-0a1b2c3d"))
    assert not is_dead_run_folder(_plant(tmp_path, f"mop-swap-{os.getpid()}-0a1b2c3d"))  # this very run
    assert not is_dead_run_folder(tmp_path / f"mop-swap-{_dead_pid()}-ffffffff")  # not there
