"""Shared fixtures: a small GPT recipe and the rule that tests never touch a real GPU by accident."""

from __future__ import annotations

import os

import pytest

# Tests run many processes on a 2-core machine: one thread each keeps them from fighting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_GPT = dict(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    seq_length=32,
    micro_batch_size=2,
    hidden_dropout=0.1,
    attention_dropout=0.1,
    seed=1234,
)


@pytest.fixture
def tiny_gpt() -> dict:
    return dict(TINY_GPT)


class SmallFileSystems:
    """Real tmpfs file systems of a chosen size, mounted under a test's folder and unmounted after it (root only)."""

    def __init__(self, base) -> None:
        self.base = base
        self.mounted: list = []

    def mount(self, size: str, *, read_only: bool = False):
        import subprocess

        if os.geteuid() != 0:
            pytest.skip("needs root to mount a small tmpfs")
        mnt = self.base / f"tmpfs{len(self.mounted)}"
        mnt.mkdir()
        options = f"{'ro,' if read_only else ''}size={size}"
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here")
        self.mounted.append(mnt)
        return mnt

    @staticmethod
    def fill(mnt, leave: int = 0):
        """Take all but ``leave`` bytes of ``mnt``, as another process would; the filling file's path."""
        import errno

        hog = mnt / "hog"
        with open(hog, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"x" * 512)
            except OSError as err:
                assert err.errno == errno.ENOSPC
        if leave:
            os.truncate(hog, max(0, hog.stat().st_size - leave))
        return hog

    def unmount_all(self) -> None:
        import subprocess

        for mnt in reversed(self.mounted):
            subprocess.run(["umount", str(mnt)], check=False)


@pytest.fixture
def small_fs_factory(tmp_path):
    fs = SmallFileSystems(tmp_path)
    try:
        yield fs
    finally:
        fs.unmount_all()
