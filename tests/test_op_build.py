"""Op builds that cannot wedge a user: a build killed mid-way leaves torch's lock file, and
torch's loader would wait on it forever; the plugin's build lock clears it, and a wait on a
live build says which process it waits for."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading

import pytest

from megatron_offload_plugin.offload.op_build import (
    FOREIGN_LOCK_STALE_S, build_lock, clear_stale_torch_lock, guarded_build, is_built,
)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leftover_of_a_killed_build(root, pid: int | None):
    (root / "async_io").mkdir(parents=True)
    (root / "async_io" / "lock").write_text("")
    if pid is not None:
        (root / "async_io.mop-owner").write_text(str(pid))
    return root / "async_io" / "lock"


def test_lock_left_by_a_killed_plugin_build_is_cleared_with_a_message(tmp_path, caplog):
    lock = _leftover_of_a_killed_build(tmp_path, _dead_pid())
    with caplog.at_level(logging.WARNING, logger="megatron_offload_plugin.offload.op_build"):
        with build_lock(tmp_path, "async_io"):
            assert not lock.exists()
            assert (tmp_path / "async_io.mop-owner").read_text() == str(os.getpid())
    assert not (tmp_path / "async_io.mop-owner").exists()
    assert "removed the build lock" in caplog.text and "did not finish" in caplog.text


def test_a_foreign_lock_is_waited_on_while_young_and_cleared_when_old(tmp_path, caplog):
    lock = _leftover_of_a_killed_build(tmp_path, None)
    mtime = lock.stat().st_mtime
    with caplog.at_level(logging.WARNING, logger="megatron_offload_plugin.offload.op_build"):
        assert not clear_stale_torch_lock(tmp_path, "async_io", now=mtime + 60)
        assert lock.exists() and "waiting for that build" in caplog.text
        assert clear_stale_torch_lock(tmp_path, "async_io", now=mtime + FOREIGN_LOCK_STALE_S + 1)
    assert not lock.exists()


_HOLDER = """
import sys
from pathlib import Path
from megatron_offload_plugin.offload.op_build import build_lock
root = Path(sys.argv[1])
with build_lock(root, "async_io"):
    (root / "async_io").mkdir(exist_ok=True)
    (root / "async_io" / "lock").write_text("")  # torch's lock, as a JIT build in progress makes it
    print("building", flush=True)
    sys.stdin.read()  # blocks until the test kills this 'build'
"""


def test_a_wait_on_a_live_build_names_its_pid_and_ends_when_that_build_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "building"
        waiting, got_it, messages = threading.Event(), threading.Event(), []

        class _Seen(logging.Handler):
            def emit(self, record):
                messages.append(record.getMessage())
                if "waiting for DeepSpeed's async_io op being built by pid" in record.getMessage():
                    waiting.set()

        handler = _Seen()
        log = logging.getLogger("megatron_offload_plugin.offload.op_build")
        log.addHandler(handler)
        log.setLevel(logging.WARNING)

        def second_run():
            with build_lock(tmp_path, "async_io"):
                got_it.set()

        thread = threading.Thread(target=second_run, daemon=True)
        thread.start()
        assert waiting.wait(timeout=60), messages
        assert not got_it.is_set()
        assert f"pid {holder.pid}" in " ".join(messages)
        holder.send_signal(signal.SIGKILL)  # the build is killed: its flock goes with it
        holder.wait(timeout=30)
        thread.join(timeout=60)
        assert got_it.is_set()
        assert not (tmp_path / "async_io" / "lock").exists()  # torch's lock of the killed build cleared
        assert any("removed the build lock" in m for m in messages)
    finally:
        logging.getLogger("megatron_offload_plugin.offload.op_build").removeHandler(handler)
        if holder.poll() is None:
            holder.kill()


def test_a_build_is_announced_and_a_built_op_is_just_loaded(tmp_path, caplog):
    calls = []

    def build():
        (tmp_path / "async_io").mkdir(exist_ok=True)
        (tmp_path / "async_io" / "async_io.so").write_bytes(b"")
        calls.append(1)
        return "op"

    with caplog.at_level(logging.WARNING, logger="megatron_offload_plugin.offload.op_build"):
        assert guarded_build(tmp_path, "async_io", build) == "op"
        assert "building DeepSpeed's async_io op" in caplog.text and "built DeepSpeed's async_io op" in caplog.text
        caplog.clear()
        assert is_built(tmp_path, "async_io")
        assert guarded_build(tmp_path, "async_io", build) == "op"
        assert "building" not in caplog.text
    assert len(calls) == 2


def test_build_ops_command_is_listed_and_takes_no_options():
    from megatron_offload_plugin.__main__ import COMMANDS

    assert "build-ops" in COMMANDS
    proc = subprocess.run([sys.executable, "-m", "megatron_offload_plugin", "build-ops", "--bogus"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr
