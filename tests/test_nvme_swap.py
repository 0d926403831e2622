"""The NVMe tier (offload/nvme.py): private swap folder, padded aio transfers, errors that name path and size."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_offload_plugin.offload import nvme
from megatron_offload_plugin.offload.nvme import (
    ALIGNMENT,
    AioSwapper,
    AioUnavailableError,
    NvmeIOError,
    SwapFolder,
    aio_available,
    aio_handle_kwargs,
)

AIO_OK, AIO_WHY = aio_available()
needs_aio = pytest.mark.skipif(not AIO_OK, reason=f"DeepSpeed aio unavailable: {AIO_WHY}")


@pytest.fixture(scope="module")
def aio_op():
    if not AIO_OK:
        pytest.skip(AIO_WHY)
    return nvme.load_aio_op()


@pytest.fixture
def swapper(tmp_path, aio_op):
    with SwapFolder(tmp_path) as folder, AioSwapper(folder, aio_op=aio_op) as sw:
        yield sw


# ------------------------------------------------------------------ folder


def test_swap_folder_is_private_and_removed_at_close(tmp_path):
    folder = SwapFolder(tmp_path)
    assert folder.path.parent == tmp_path
    assert stat.S_IMODE(os.stat(folder.path).st_mode) == 0o700
    f = folder.file("layer0.exp_avg")
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    folder.close()
    assert not folder.path.exists()
    folder.close()  # idempotent


def test_swap_folder_removed_at_interpreter_exit(tmp_path):
    code = ("import sys; from megatron_offload_plugin.offload.nvme import SwapFolder; "
            "f = SwapFolder(sys.argv[1]); f.file('k'); print(f.path)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    path = Path(out.stdout.strip())
    assert path.parent == tmp_path and not path.exists()


def test_swap_file_never_follows_a_planted_symlink(tmp_path):
    target = tmp_path / "victim"
    target.write_text("keep")
    with SwapFolder(tmp_path) as folder:
        os.symlink(target, folder.path / "k")
        with pytest.raises(NvmeIOError, match="cannot create swap file .*k"):
            folder.file("k")
    assert target.read_text() == "keep"


def test_swap_key_with_path_separator_is_refused(tmp_path):
    with SwapFolder(tmp_path) as folder, pytest.raises(ValueError, match="swap key '../x'"):
        folder.file("../x")


def test_missing_base_path_error_names_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=f"nvme_path='{missing}': directory does not exist; create it or set device='cpu'"):
        SwapFolder(missing)


def test_base_path_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(ValueError, match=f"nvme_path='{f}': not a directory"):
        SwapFolder(f)


def test_unwritable_base_path_error_names_it(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root ignores mode bits, so fake the answer
    with pytest.raises(ValueError, match=f"nvme_path='{tmp_path}': directory is not writable"):
        SwapFolder(tmp_path)


def test_read_only_mount_is_named_as_such(small_fs_factory):
    mnt = small_fs_factory.mount("64k", read_only=True)
    with pytest.raises(ValueError, match=f"nvme_path='{mnt}': the file system there is mounted read-only; "
                                         "remount it read-write"):
        SwapFolder(mnt)


# ------------------------------------------------------------------ aio config and availability


def test_aio_section_unknown_key_names_closest():
    with pytest.raises(ValueError, match="aio.queue_dept: unknown key; did you mean 'queue_depth'"):
        aio_handle_kwargs({"queue_dept": 4})
    with pytest.raises(ValueError, match=r"aio\.zzz: unknown key; accepted: block_size, "):
        aio_handle_kwargs({"zzz": 4})  # no close match: the list follows after a semicolon


def test_aio_section_thread_count_is_intra_op_parallelism():
    assert aio_handle_kwargs({"thread_count": 2})["intra_op_parallelism"] == 2


def test_aio_unbuildable_error_says_install_libaio_or_use_cpu(monkeypatch):
    from deepspeed.ops.op_builder import AsyncIOBuilder

    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: False)
    ok, why = aio_available()
    assert not ok and "libaio-dev" in why and "device='cpu'" in why
    with pytest.raises(AioUnavailableError, match="libaio-dev.*device='cpu'"):
        nvme.load_aio_op()


def test_nvme_tier_start_up_check_names_the_option(tmp_path, monkeypatch):
    """One check at start-up for every NVMe tier: the directory, then aio, each error naming the option."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    with pytest.raises(ValueError, match=f"--offload-nvme-path='{tmp_path / 'x'}': directory does not exist"):
        nvme.check_nvme_tier(tmp_path / "x", option="--offload-nvme-path")
    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: False)
    with pytest.raises(AioUnavailableError,
                       match=f"--offload-nvme-path='{tmp_path}' needs DeepSpeed's async I/O: .*libaio-dev.*device='cpu'"):
        nvme.check_nvme_tier(tmp_path, option="--offload-nvme-path")


# ------------------------------------------------------------------ transfers


@needs_aio
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int64])
def test_round_trip_is_bitwise_and_files_are_padded(swapper, dtype):
    sizes = [0, 1, 3, 127, 129, 513, 1000, (1 << 20) // 4 + 1]
    gen = torch.Generator().manual_seed(0)
    src = {f"t{n}": (torch.randn(n, generator=gen) * 100).to(dtype) for n in sizes}
    orig = {k: t.clone() for k, t in src.items()}
    for key, t in src.items():
        swapper.write(key, t)
    for t in src.values():  # writes copy into bounce buffers: the caller may reuse its tensor at once
        t.fill_(7)
    swapper.wait()
    for key, t in src.items():
        size = os.stat(swapper.folder.file(key)).st_size
        assert size % ALIGNMENT == 0 and size >= t.numel() * t.element_size()
    outs = {k: torch.empty_like(t) for k, t in src.items()}
    for key, out in outs.items():
        swapper.read(key, out)
    swapper.wait()
    for key, t in orig.items():
        assert torch.equal(outs[key].view(torch.uint8), t.view(torch.uint8)), key


@needs_aio
def test_rewrite_same_key_and_2d_tensor(swapper):
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    swapper.write("k", a)
    swapper.wait()
    swapper.write("k", a * 2)
    swapper.wait()
    out = torch.empty(3, 4)
    swapper.read("k", out)
    swapper.wait()
    assert torch.equal(out, a * 2)
    assert swapper.nbytes_on_disk == 2 * ALIGNMENT  # one block of payload, one of trailer


@needs_aio
def test_wait_with_nothing_pending_does_not_abort(swapper):
    swapper.wait()
    swapper.wait()


@needs_aio
def test_read_of_unknown_key_raises(swapper):
    with pytest.raises(KeyError, match="nothing was written under this key"):
        swapper.read("ghost", torch.empty(4))


@needs_aio
def test_read_with_wrong_size_raises(swapper):
    swapper.write("k", torch.zeros(10))
    swapper.wait()
    with pytest.raises(ValueError, match="out has 44 bytes, 40 were written"):
        swapper.read("k", torch.empty(11))


@needs_aio
def test_short_file_raises_instead_of_aborting(swapper):
    swapper.write("k", torch.zeros(1000))
    swapper.wait()
    path = swapper.folder.file("k")
    os.truncate(path, 512)
    with pytest.raises(NvmeIOError, match=f"short swap file {path}: 512 bytes on disk, a frame of 4608 expected"):
        swapper.read("k", torch.empty(1000))


@needs_aio
def test_pending_key_cannot_be_rewritten_before_wait(swapper):
    swapper.write("k", torch.zeros(4))
    with pytest.raises(NvmeIOError, match="still pending"):
        swapper.write("k", torch.zeros(4))
    swapper.wait()


@pytest.fixture
def small_fs(small_fs_factory):
    """A real 64 KiB file system (tmpfs; needs root to mount)."""
    return small_fs_factory.mount("64k")


@needs_aio
def test_disk_full_is_refused_before_queueing(small_fs, aio_op):
    with SwapFolder(small_fs) as folder, AioSwapper(folder, aio_op=aio_op) as sw:
        path = folder.path / "big"
        size = sw._padded(40000 * 4)
        with pytest.raises(NvmeIOError, match=f"disk full: reserving {size} bytes for swap file {path} "
                                              f"\\(offset 0, size {size}\\) failed") as err:
            sw.write("big", torch.zeros(40000))
        assert (err.value.path, err.value.size, err.value.keys) == (str(path), size, ("big",))
        assert sw.pending == 0 and "big" not in sw


@needs_aio
def test_reserved_file_is_written_after_the_disk_fills(small_fs, small_fs_factory, aio_op):
    """Another process takes the space between the reservation and the write: the write still lands."""
    with SwapFolder(small_fs) as folder, AioSwapper(folder, aio_op=aio_op) as sw:
        sw.reserve("a", 4000 * 4)
        small_fs_factory.fill(small_fs)
        data = torch.randn(4000)
        sw.write("a", data)
        sw.wait()
        out = torch.empty(4000)
        sw.read("a", out)
        sw.wait()
        assert torch.equal(out, data)
        with pytest.raises(NvmeIOError, match="disk full: reserving"):  # a new file finds no room, before any I/O
            sw.write("b", data)


class _RefusingHandle:
    """An aio_handle whose submits return -1, as DeepSpeed's does for a missing folder."""

    def __init__(self, *args):
        self.waited = 0

    def new_cpu_locked_tensor(self, n, example):
        return torch.empty(n, dtype=example.dtype)

    def free_cpu_locked_tensor(self, t):
        pass

    def async_pwrite(self, buf, path, offset):
        return -1

    def wait(self):  # pragma: no cover - must never be reached with nothing pending
        raise AssertionError("wait() called with nothing pending")


class _RefusingOp:
    aio_handle = _RefusingHandle


def test_refused_submit_raises_with_path_and_size(tmp_path):
    with SwapFolder(tmp_path) as folder, AioSwapper(folder, aio_op=_RefusingOp()) as sw:
        with pytest.raises(NvmeIOError, match=r"aio write of 1024 bytes \(12 unpadded\) to .*/k at offset 0 was refused "
                                              r"\(returned -1\)"):
            sw.write("k", torch.zeros(3))
        assert sw.pending == 0
        sw.wait()  # nothing pending: a no-op, never the handle's wait


@needs_aio
def test_closed_swapper_refuses_io(tmp_path, aio_op):
    with SwapFolder(tmp_path) as folder:
        sw = AioSwapper(folder, aio_op=aio_op)
        sw.write("k", torch.ones(3))
        sw.close()  # waits for the pending write
        assert "k" in sw
        with pytest.raises(NvmeIOError, match="closed"):
            sw.write("k", torch.ones(3))


# ------------------------------------------------------------------ two handles, per-direction statistics


class _RecordingOp:
    """The real aio op, whose handles remember which transfers they were given."""

    def __init__(self, real):
        self.real = real
        self.handles = []

    def aio_handle(self, *args):
        real, calls = self.real.aio_handle(*args), []
        self.handles.append(calls)

        class Handle:
            def __getattr__(self, name):
                return getattr(real, name)

            def async_pwrite(self, buf, path, offset):
                calls.append("write")
                return real.async_pwrite(buf, path, offset)

            def async_pread(self, buf, path, offset):
                calls.append("read")
                return real.async_pread(buf, path, offset)

        return Handle()


@needs_aio
def test_reads_and_writes_in_flight_together_go_through_their_own_handles(tmp_path, aio_op):
    rec = _RecordingOp(aio_op)
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(300_001, generator=gen), torch.randn(70_000, generator=gen)
    with SwapFolder(tmp_path) as folder, AioSwapper(folder, aio_op=rec) as sw:
        sw.write("a", a)
        sw.wait()
        out = torch.empty_like(a)
        sw.read("a", out)
        sw.write("b", b)  # a read and a write pending at once
        assert sw.pending == 2
        sw.wait()
        assert torch.equal(out.view(torch.uint8), a.view(torch.uint8))
        out_b = torch.empty_like(b)
        sw.read("b", out_b)
        sw.wait()
        assert torch.equal(out_b.view(torch.uint8), b.view(torch.uint8))
        buf = sw.buffer(1000)  # locked buffers still come and go
        assert sw.locked_bytes >= buf.numel()
        sw.release_buffer(buf)
    assert sorted(map(tuple, rec.handles)) == [("read", "read"), ("write", "write")]


@needs_aio
def test_io_stats_count_bytes_per_direction_and_time_a_blocking_wait(swapper):
    big = torch.ones(16 << 20)  # 64 MiB: no disk moves that in under a millisecond, so the wait blocks
    small = torch.ones(100)
    swapper.write("big", big)
    swapper.write("small", small)
    swapper.wait()
    st = swapper.io_stats()
    written = swapper._padded(big.numel() * 4) + swapper._padded(400)
    assert (st.write.bytes, st.write.batches) == (written, 1)
    assert (st.write.timed_bytes, st.write.timed_batches) == (written, 1)
    assert st.write.timed_seconds > 0 and st.write.gbps == written / st.write.timed_seconds / 1e9
    assert (st.read.bytes, st.read.batches, st.read.gbps) == (0, 0, None)
    assert st.both == st.write
    assert (st.write.alone_timed_bytes, st.write.gbps_alone) == (written, st.write.gbps)  # no read was in flight
    out = torch.empty_like(big)
    swapper.read("big", out)
    swapper.wait()
    delta = swapper.io_stats().since(st)
    assert (delta.read.bytes, delta.read.batches, delta.read.timed_batches) == (swapper._padded(big.numel() * 4), 1, 1)
    assert delta.write.bytes == 0 and delta.write.gbps is None
    assert swapper.io_stats().write == st.write


class _Clock:
    """The swapper's ``perf_counter`` in these tests: time moves only when a test says so,
    so "the wait blocked" never depends on how loaded the machine is."""

    def __init__(self) -> None:
        self.now = 0.0  # and delays in powers of two below: sums stay exact

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class _FileHandle:
    """An aio_handle doing plain file I/O at submit; ``wait`` takes ``delay`` seconds of
    :attr:`clock` (a busy or idle disk)."""

    delay = 0.0
    clock: "_Clock | None" = None

    def __init__(self, *args):
        self.queued = 0

    def new_cpu_locked_tensor(self, n, example):
        return torch.empty(n, dtype=example.dtype)

    def free_cpu_locked_tensor(self, t):
        pass

    def async_pwrite(self, buf, path, offset):
        with open(path, "r+b") as f:
            f.write(buf.numpy().tobytes())
        self.queued += 1
        return 0

    def async_pread(self, buf, path, offset):
        with open(path, "rb") as f:
            buf.copy_(torch.frombuffer(bytearray(f.read(buf.numel())), dtype=torch.uint8))
        self.queued += 1
        return 0

    def wait(self):
        assert self.queued, "wait() with nothing pending"
        if self.clock is not None:
            self.clock.advance(self.delay)
        done, self.queued = self.queued, 0
        return done


class _FileOp:
    aio_handle = _FileHandle


def test_wait_that_returns_at_once_counts_bytes_but_is_not_timed(tmp_path, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(nvme.time, "perf_counter", clock)  # the swapper's clock; no real waiting
    monkeypatch.setattr(_FileHandle, "clock", clock)
    with SwapFolder(tmp_path) as folder, AioSwapper(folder, aio_op=_FileOp()) as sw:
        monkeypatch.setattr(_FileHandle, "delay", 0.0)
        sw.write("k", torch.ones(1000))
        clock.advance(2.0 ** -5)  # the caller computes; the transfer is long done when it waits
        sw.wait()
        st = sw.io_stats().write
        big, small = sw._padded(4000), sw._padded(40)  # frames: payload padded to 512, one trailer block
        assert (st.bytes, st.batches, st.timed_batches, st.timed_bytes, st.gbps) == (big, 1, 0, 0, None)
        monkeypatch.setattr(_FileHandle, "delay", 2.0 ** -6)  # now the disk is still busy when we wait
        out = torch.empty(1000)
        sw.read("k", out)
        sw.write("k2", torch.ones(10))
        sw.wait()
        st = sw.io_stats()
        assert torch.equal(out, torch.ones(1000))
        assert (st.read.bytes, st.read.timed_bytes, st.read.timed_batches) == (big, big, 1)
        assert (st.read.alone_timed_bytes, st.read.gbps_alone) == (0, None)  # a write was in flight with it
        assert st.write.alone_timed_bytes == 0  # the first write batch was alone but not timed
        assert st.read.timed_seconds == 2.0 ** -6
        assert (st.write.bytes, st.write.batches, st.write.timed_batches) == (big + small, 2, 1)
        assert (st.both.bytes, st.both.batches, st.both.timed_bytes) == (big * 2 + small, 2, big + small)
        # the read was submitted first, so waited first; the write's wait then blocked too (its handle slept)
        assert st.both.timed_seconds == st.read.timed_seconds + 2.0 ** -6
        sw._handles["read"].delay = 0.0  # a read long done, a write still running: the span held idle time
        sw.read("k", out)
        clock.advance(2.0 ** -5)
        sw.write("k3", torch.ones(10))
        sw.wait()
        d = sw.io_stats().since(st)
        assert (d.read.batches, d.read.timed_batches, d.write.timed_batches) == (1, 0, 1)
        assert (d.both.bytes, d.both.batches, d.both.timed_batches) == (big + small, 1, 0)


@needs_aio
@pytest.mark.parametrize("close", [True, False])
def test_exit_with_reads_and_writes_pending_does_not_abort(tmp_path, close):
    code = ("import sys, torch; from megatron_offload_plugin.offload.nvme import SwapFolder, AioSwapper\n"
            "folder = SwapFolder(sys.argv[1]); sw = AioSwapper(folder)\n"
            "sw.write('a', torch.ones(1 << 22)); sw.wait()\n"
            "out = torch.empty(1 << 22); sw.read('a', out); sw.write('b', torch.ones(1 << 22))\n"
            "assert sw.pending == 2\n"
            f"if {close}: sw.close(); assert out.sum().item() == 1 << 22\n"
            "print('done')\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "done" and "Assertion" not in proc.stderr


# ------------------------------------------------------------------ verified reads


@needs_aio
def test_stale_file_is_refused_naming_path_offset_and_size(swapper):
    """A write that never reached the disk leaves the previous frame: its generation gives it away."""
    swapper.write("k", torch.ones(1000))
    swapper.wait()
    path = swapper.folder.file("k")
    old = path.read_bytes()
    swapper.write("k", torch.full((1000,), 2.0))
    swapper.wait()
    path.write_bytes(old)  # what the disk holds when the second write was dropped
    size = swapper._padded(4000)
    with pytest.raises(NvmeIOError, match=f"aio read of swap file {path} \\(offset 0, size {size}\\): .*"
                                          "a write never reached the disk") as err:
        swapper.read("k", torch.empty(1000))
        swapper.wait()
    assert (err.value.path, err.value.offset, err.value.size, err.value.keys) == (str(path), 0, size, ("k",))


@needs_aio
def test_flipped_payload_byte_is_a_checksum_mismatch(swapper):
    swapper.write("k", torch.arange(1000, dtype=torch.float32))
    swapper.wait()
    path = swapper.folder.file("k")
    raw = bytearray(path.read_bytes())
    raw[1234] ^= 0x01
    path.write_bytes(bytes(raw))
    out = torch.zeros(1000)
    with pytest.raises(NvmeIOError, match="checksum mismatch"):
        swapper.read("k", out)
        swapper.wait()
    assert torch.equal(out, torch.zeros(1000))  # nothing unverified reaches the caller


class _DroppingReadHandle(_FileHandle):
    """Reads that "complete" without filling the buffer, as a dropped aio read does."""

    def async_pread(self, buf, path, offset):
        self.queued += 1
        return 0


class _DroppingReadOp:
    aio_handle = _DroppingReadHandle


def test_dropped_read_is_refused(tmp_path):
    with SwapFolder(tmp_path) as folder, AioSwapper(folder, aio_op=_DroppingReadOp()) as sw:
        sw.write("k", torch.ones(100))
        sw.wait()
        with pytest.raises(NvmeIOError, match="no swap trailer where it belongs"):
            sw.read("k", torch.empty(100))
            sw.wait()


@needs_aio
def test_a_flipped_byte_in_any_chunk_of_a_large_payload_is_caught(swapper):
    data = torch.randn((nvme.CRC_CHUNK * 2 + 1000) // 4)  # three checksum chunks
    swapper.write("k", data)
    swapper.wait()
    path = swapper.folder.file("k")
    raw = bytearray(path.read_bytes())
    raw[nvme.CRC_CHUNK + 7] ^= 0x80  # in the second chunk
    path.write_bytes(bytes(raw))
    with pytest.raises(NvmeIOError, match="checksum mismatch"):
        swapper.read("k", torch.empty_like(data))
        swapper.wait()
