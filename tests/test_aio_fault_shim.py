"""The aio fault shim (testing/aio_fault_shim.c): it drops and shortens DeepSpeed aio transfers on demand.

Only the shim is tested here, at the layer it acts on: raw ``aio_handle`` transfers
(DeepSpeed's op, loaded through ``offload.nvme``) into a ``SwapFolder``, with the file
read back by plain ``read()``.  Whatever checks the swapper above adds are not in the
way, so each test sees exactly what reached the disk or the buffer.

The transfers run in child processes under LD_PRELOAD: this file is also the child
(``python tests/test_aio_fault_shim.py RESULTS BASE SCENARIO...``), and one child runs
all fault scenarios (an interpreter with torch and DeepSpeed takes seconds to start),
each with its own swap folder, fault log and aio handle, writing its findings to a JSON
file the tests below assert on.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest

from megatron_offload_plugin.testing import aio_faults
from megatron_offload_plugin.testing.aio_faults import (
    LOG_ENV,
    SPEC_ENV,
    ShimBuildError,
    build_shim,
    check_spec,
    fault_env,
    read_fault_log,
)

CHILD_TIMEOUT_S = 180  # a child imports torch and DeepSpeed (seconds) and moves a few MiB
SENTINEL = 0xEE  # what a read buffer holds where the read did not fill it


# ------------------------------------------------------------------ the child side


def _rand(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _runs(actual: bytes, **versions: bytes) -> list[list[Any]]:
    """``actual`` as runs of 512-byte blocks: ``[[name of the version they match, bytes], ...]`` ('?': none)."""
    runs: list[list[Any]] = []
    for start in range(0, len(actual), 512):
        block = actual[start: start + 512]
        name = next((n for n, v in versions.items() if v[start: start + 512] == block), "?")
        if runs and runs[-1][0] == name:
            runs[-1][1] += len(block)
        else:
            runs.append([name, len(block)])
    return runs


class _Rig:
    """One aio handle writing and reading whole files of a fresh swap folder, each transfer waited for."""

    def __init__(self, op: Any, base: Path, name: str, block_size: int = 1 << 20) -> None:
        import torch

        from megatron_offload_plugin.offload.nvme import SwapFolder, aio_handle_kwargs

        self._torch = torch
        self.folder = SwapFolder(base)
        kw = aio_handle_kwargs({"block_size": block_size})
        self.handle = op.aio_handle(kw["block_size"], kw["queue_depth"], kw["single_submit"],
                                    kw["overlap_events"], kw["intra_op_parallelism"])
        self.log = base / f"{name}.log"
        os.environ[LOG_ENV] = str(self.log)

    def _buffer(self, n: int) -> Any:
        return self.handle.new_cpu_locked_tensor(n, self._torch.empty(0, dtype=self._torch.uint8))

    def write(self, key: str, data: bytes) -> int:
        """Write ``data`` (a multiple of 512 bytes) as the whole of ``key``'s file; aio's completion count."""
        buf = self._buffer(len(data))
        buf.copy_(self._torch.frombuffer(bytearray(data), dtype=self._torch.uint8))
        try:
            assert self.handle.async_pwrite(buf, str(self.folder.file(key)), 0) == 0
            return self.handle.wait()
        finally:
            self.handle.free_cpu_locked_tensor(buf)

    def read(self, key: str, n: int) -> bytes:
        """Read ``n`` bytes of ``key``'s file (it must hold them) into a SENTINEL-filled buffer."""
        buf = self._buffer(n)
        buf.fill_(SENTINEL)
        try:
            assert self.handle.async_pread(buf, str(self.folder.file(key)), 0) == 0
            assert self.handle.wait() == 1
            return bytes(buf.numpy())
        finally:
            self.handle.free_cpu_locked_tensor(buf)

    def disk(self, key: str) -> bytes:
        return self.folder.file(key).read_bytes()

    def records(self) -> list[list[Any]]:
        """The fault log: ``[op, file name, offset, nbytes]`` per faulted request."""
        return [[r.op, Path(r.path).name, r.offset, r.nbytes] for r in read_fault_log(self.log)]

    def close(self) -> None:
        self.handle = None
        self.folder.close()


def _fault(spec: str | None) -> None:
    """Switch the shim at run time, as a test or the plugin's own process would: through os.environ."""
    if spec is None:
        os.environ.pop(SPEC_ENV, None)
    else:
        os.environ[SPEC_ENV] = spec


def sc_roundtrip(rig: Callable[..., _Rig]) -> dict[str, Any]:
    """No fault asked for: every size, single- and multi-block, round-trips exactly and nothing is logged."""
    out: dict[str, Any] = {"preloaded": any("libmop_aio_fault" in line for line in open("/proc/self/maps")),
                           "spec_set": SPEC_ENV in os.environ, "exact": []}
    for block_size in (1 << 20, 4096):
        r = rig(block_size=block_size)
        for i, n in enumerate((512, 4096, 3 * 4096 + 512, (1 << 20) + 4096)):
            data = _rand(100 + i, n)
            done = r.write(f"k{i}", data)
            out["exact"].append([block_size, n, done == 1 and r.disk(f"k{i}") == data and r.read(f"k{i}", n) == data])
        out.setdefault("log_exists", []).append(r.log.exists())
    return out


def sc_startup(rig: Callable[..., _Rig]) -> dict[str, Any]:
    """The spec the child was started with (fault_env) applies from the first transfer, until removed."""
    r = rig()
    data = _rand(1, 4096)
    first = r.write("startup-only", data)
    after_first = len(r.disk("startup-only"))
    _fault(None)
    r.write("startup-only", data)
    return {"completed": first, "after_first": after_first, "after_second": r.disk("startup-only") == data,
            "log": r.records()}


def sc_write_drop(rig: Callable[..., _Rig]) -> dict[str, Any]:
    r = rig()
    old, new = _rand(1, 8192), _rand(2, 8192)
    r.write("k", old)
    _fault("write:drop")
    done = r.write("k", new)
    on_disk = r.disk("k")
    _fault(None)
    back = r.read("k", 8192)
    return {"completed": done, "disk": _runs(on_disk, old=old, new=new), "read": _runs(back, old=old, new=new),
            "log": r.records()}


def sc_read_faults(rig: Callable[..., _Rig]) -> dict[str, Any]:
    r = rig()
    sentinel = bytes([SENTINEL]) * 8192
    data, odd = _rand(3, 8192), _rand(4, 1536)
    r.write("k", data)
    _fault("read:short")
    short = r.read("k", 8192)
    r.write("odd", odd)  # a read spec leaves writes alone
    odd_disk = r.disk("odd")
    odd_back = r.read("odd", 1536)  # 768 rounded down to 512
    _fault("read:drop")
    dropped = r.read("k", 8192)
    return {"short": _runs(short, data=data, sentinel=sentinel),
            "odd_disk": odd_disk == odd, "odd": _runs(odd_back, data=odd, sentinel=sentinel),
            "drop": _runs(dropped, data=data, sentinel=sentinel), "log": r.records()}


def sc_skip_count(rig: Callable[..., _Rig]) -> dict[str, Any]:
    r = rig()
    for i in range(5):
        r.write(f"k{i}", _rand(10 + i, 4096))
    _fault("write:drop:skip=1:count=2")
    for i in range(5):
        r.write(f"k{i}", _rand(20 + i, 4096))
    disk = [_runs(r.disk(f"k{i}"), old=_rand(10 + i, 4096), new=_rand(20 + i, 4096)) for i in range(5)]
    return {"disk": disk, "log": r.records()}


def sc_blocks(rig: Callable[..., _Rig]) -> dict[str, Any]:
    """block_size 4096: DeepSpeed submits a 16 KiB transfer as 4 iocbs, and the shim counts iocbs."""
    r = rig(block_size=4096)
    old, new, newer = _rand(5, 16384), _rand(6, 16384), _rand(7, 16384)
    r.write("k", old)
    _fault("write:drop:skip=1:count=2")
    done = r.write("k", new)
    dropped = r.disk("k")
    records = r.records()
    _fault("write:short")
    r.write("k", newer)
    return {"completed": done, "drop": _runs(dropped, old=old, new=new), "drop_log": records,
            "short": _runs(r.disk("k"), newer=newer, before=dropped), "short_log": r.records()[len(records):]}


def sc_path(rig: Callable[..., _Rig]) -> dict[str, Any]:
    r = rig()
    one, two = "layer00001.w", "layer00002.w"
    old = {one: _rand(30, 4096), two: _rand(31, 4096)}
    new = {one: _rand(32, 4096), two: _rand(33, 4096)}
    for key in (one, two):
        r.write(key, old[key])
    _fault("write:drop:path=layer00001")
    for key in (one, two):
        r.write(key, new[key])
    after_write = {k: _runs(r.disk(k), old=old[k], new=new[k]) for k in (one, two)}
    _fault("any:drop:path=layer00002")
    r.write(two, _rand(34, 4096))
    sentinel = bytes([SENTINEL]) * 4096
    reads = {one: _runs(r.read(one, 4096), old=old[one], sentinel=sentinel),
             two: _runs(r.read(two, 4096), new=new[two], sentinel=sentinel)}
    return {"after_write": after_write, "disk_two": _runs(r.disk(two), new=new[two]), "reads": reads,
            "log": r.records()}


def sc_toggle(rig: Callable[..., _Rig]) -> dict[str, Any]:
    """count=1 faults once per spec value: unset and set again is a new value with fresh counters."""
    r = rig()
    versions = {f"v{i}": _rand(40 + i, 4096) for i in range(6)}
    seen = []

    def step(name: str) -> None:
        r.write("k", versions[name])
        seen.append(_runs(r.disk("k"), **versions)[0][0])

    step("v0")
    _fault("write:drop:count=1")
    step("v1")  # dropped
    step("v2")  # count used up
    _fault(None)
    step("v3")
    _fault("write:drop:count=1")
    step("v4")  # dropped again: the counters started over
    _fault("write:drop:count=1:path=k")  # another value: fresh counters too
    step("v5")
    return {"disk_after_each": seen, "faulted": len(r.records())}


def sc_bad_specs(rig: Callable[..., _Rig]) -> dict[str, Any]:
    """A malformed spec faults nothing (and warns once per value on stderr)."""
    r = rig()
    exact = []
    for i, spec in enumerate(("write:explode", "write:drop:count=-1", "read", "write:drop::skip=1")):
        _fault(spec)
        for j in range(2):
            data = _rand(50 + 2 * i + j, 4096)
            r.write("k", data)
            exact.append(r.disk("k") == data)
    return {"exact": exact, "log_exists": r.log.exists()}


SCENARIOS: dict[str, Callable[[Callable[..., _Rig]], dict[str, Any]]] = {
    name[3:]: fn for name, fn in dict(globals()).items() if name.startswith("sc_")}


def _child_main(results_path: str, base: str, names: list[str]) -> None:
    from megatron_offload_plugin.offload.nvme import load_aio_op

    op = load_aio_op()
    results: dict[str, Any] = {}
    for name in names:
        rigs: list[_Rig] = []

        def rig(block_size: int = 1 << 20, _name: str = name) -> _Rig:
            rigs.append(_Rig(op, Path(base), f"{_name}-{len(rigs)}", block_size))
            return rigs[-1]

        try:
            results[name] = {"ok": True, "value": SCENARIOS[name](rig)}
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc()}
        finally:
            _fault(None)
            os.environ.pop(LOG_ENV, None)
            for r in rigs:
                r.close()
        Path(results_path).write_text(json.dumps(results))  # after each: a crash still tells which one


# ------------------------------------------------------------------ the test side


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if aio_faults.find_compiler() is None:
        pytest.skip("no C compiler (cc/gcc/clang) to build the aio fault shim")
    return build_shim(tmp_path_factory.mktemp("shim"))


@pytest.fixture(scope="module")
def aio_op() -> Any:
    from megatron_offload_plugin.offload import nvme

    ok, why = nvme.aio_available()
    if not ok:
        pytest.skip(f"DeepSpeed aio unavailable: {why}")
    return nvme.load_aio_op()  # built here, so the children only load it


def _run_child(tmp: Path, env: dict[str, str], names: list[str]) -> tuple[dict[str, Any], str]:
    results = tmp / "results.json"
    base = tmp / "swap"
    base.mkdir()
    proc = subprocess.run([sys.executable, __file__, str(results), str(base), *names], env=env,
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    found = json.loads(results.read_text()) if results.exists() else {}
    missing = [n for n in names if n not in found]
    assert proc.returncode == 0 and not missing, (
        f"child exited {proc.returncode}, no result for {missing}:\n{proc.stderr[-4000:]}")
    return found, proc.stderr


def _shim_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("aio_fault_shim:")]


FAULT_SCENARIOS = ["startup", "write_drop", "read_faults", "skip_count", "blocks", "path", "toggle", "bad_specs"]


@pytest.fixture(scope="module")
def faulted(shim: Path, aio_op: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """All fault scenarios, in one child started with a spec that only the first one's file matches."""
    return _run_child(tmp_path_factory.mktemp("faulted"), fault_env(shim, spec="write:drop:path=startup-only"),
                      FAULT_SCENARIOS)


def result(faulted: tuple[dict[str, Any], str], name: str) -> dict[str, Any]:
    found = faulted[0][name]
    assert found["ok"], found["error"]
    return found["value"]


def test_unset_spec_changes_nothing(shim, aio_op, tmp_path):
    found, stderr = _run_child(tmp_path, fault_env(shim, log=tmp_path / "unused.log"), ["roundtrip"])
    r = found["roundtrip"]["value"]
    assert r["preloaded"] and not r["spec_set"]
    assert [ok for *_, ok in r["exact"]] == [True] * 8, r["exact"]
    assert r["log_exists"] == [False, False]
    assert _shim_lines(stderr) == []


def test_spec_from_the_start_applies_until_removed(faulted):
    r = result(faulted, "startup")
    assert r["completed"] == 1 and r["after_first"] == 0  # the fresh file stayed empty, and aio said done
    assert r["after_second"]
    assert [rec[:2] for rec in r["log"]] == [["write", "startup-only"]]


def test_write_drop_leaves_the_old_bytes_silently(faulted):
    r = result(faulted, "write_drop")
    assert r["completed"] == 1  # what DeepSpeed reports: the op completed
    assert r["disk"] == [["old", 8192]]
    assert r["read"] == [["old", 8192]]
    assert r["log"] == [["write", "k", 0, 8192]]


def test_read_short_leaves_the_tail_unfilled(faulted):
    r = result(faulted, "read_faults")
    assert r["short"] == [["data", 4096], ["sentinel", 4096]]
    assert r["odd_disk"]  # a read spec does not touch writes
    assert r["odd"] == [["data", 512], ["sentinel", 1024]]  # 1536 / 2 = 768, down to 512
    assert r["drop"] == [["sentinel", 8192]]
    assert r["log"] == [["read", "k", 0, 8192], ["read", "odd", 0, 1536], ["read", "k", 0, 8192]]


def test_skip_and_count_select_requests(faulted):
    r = result(faulted, "skip_count")
    assert [runs[0][0] for runs in r["disk"]] == ["new", "old", "old", "new", "new"]
    assert [rec[1] for rec in r["log"]] == ["k1", "k2"]


def test_requests_are_deepspeed_blocks(faulted):
    r = result(faulted, "blocks")
    assert r["completed"] == 1
    assert r["drop"] == [["new", 4096], ["old", 8192], ["new", 4096]]
    assert r["drop_log"] == [["write", "k", 4096, 4096], ["write", "k", 8192, 4096]]
    assert r["short"] == [["newer", 2048], ["before", 2048]] * 4  # every block loses its second half
    assert [rec[2] for rec in r["short_log"]] == [0, 4096, 8192, 12288]


def test_path_filter_selects_files(faulted):
    r = result(faulted, "path")
    assert r["after_write"] == {"layer00001.w": [["old", 4096]], "layer00002.w": [["new", 4096]]}
    assert r["disk_two"] == [["new", 4096]]  # any: the write was dropped too
    assert r["reads"] == {"layer00001.w": [["old", 4096]], "layer00002.w": [["sentinel", 4096]]}
    assert [rec[:2] for rec in r["log"]] == [["write", "layer00001.w"], ["write", "layer00002.w"],
                                             ["read", "layer00002.w"]]


def test_toggling_through_os_environ_resets_counters(faulted):
    r = result(faulted, "toggle")
    assert r["disk_after_each"] == ["v0", "v0", "v2", "v3", "v3", "v3"]
    assert r["faulted"] == 3


def test_bad_spec_faults_nothing_and_says_so_once(faulted):
    r = result(faulted, "bad_specs")
    assert r["exact"] == [True] * 8 and not r["log_exists"]
    lines = _shim_lines(faulted[1])
    assert len(lines) == 4, faulted[1][-4000:]  # once per bad value; the other scenarios print nothing
    for line, spec in zip(lines, ("write:explode", "write:drop:count=-1", "read", "write:drop::skip=1")):
        assert f"{SPEC_ENV}='{spec}'" in line and "faulting nothing" in line


def test_io_submit_is_interposed_at_libaio_symbol_version(shim, aio_op):
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) not installed")

    def dynsyms(path: str) -> list[list[str]]:
        out = subprocess.run([objdump, "-T", path], capture_output=True, text=True, check=True, timeout=60).stdout
        return [line.split() for line in out.splitlines() if line.endswith(" io_submit")]

    assert any("(LIBAIO_0.1)" in f and "*UND*" in f for f in dynsyms(aio_op.__file__))  # what DeepSpeed binds to
    assert any("LIBAIO_0.1" in f and ".text" in f for f in dynsyms(str(shim)))  # what the shim defines


# ------------------------------------------------------------------ the Python side


def test_build_shim_is_cached_by_source_hash(shim):
    mtime = shim.stat().st_mtime_ns
    assert build_shim(shim.parent) == shim and shim.stat().st_mtime_ns == mtime


def test_build_shim_without_compiler_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(aio_faults, "find_compiler", lambda: None)
    with pytest.raises(ShimBuildError, match="no C compiler found"):
        build_shim(tmp_path)


def test_fault_env_preloads_and_never_leaks_a_fault(tmp_path):
    base = {"LD_PRELOAD": "/other.so", SPEC_ENV: "write:drop", LOG_ENV: "/old.log", "KEEP": "1"}
    env = fault_env(tmp_path / "shim.so", base=base)
    assert env["LD_PRELOAD"] == f"{tmp_path / 'shim.so'} /other.so" and env["KEEP"] == "1"
    assert SPEC_ENV not in env and LOG_ENV not in env
    env = fault_env(tmp_path / "shim.so", spec="read:short:count=2", log=tmp_path / "f.log", base={})
    assert env[SPEC_ENV] == "read:short:count=2" and env[LOG_ENV] == str(tmp_path / "f.log")


@pytest.mark.parametrize("spec", ["write:drop", "read:short", "any:drop:skip=3:count=2:path=layer00001"])
def test_check_spec_accepts(spec):
    assert check_spec(spec) == spec


@pytest.mark.parametrize("spec", ["", "write", "drop:write", "write:drop:skip=-1", "write:drop:count=1:count=2",
                                  "write:drop:path=", "write:drop:size=3", "write:drop:"])
def test_check_spec_refuses(spec):
    with pytest.raises(ValueError, match="expected OP:MODE"):
        check_spec(spec)


def test_read_fault_log_keeps_paths_with_spaces(tmp_path):
    log = tmp_path / "log"
    log.write_text("write /a b/k 4096 512\nread /c 0 8192\n")
    assert read_fault_log(log) == [("write", "/a b/k", 4096, 512), ("read", "/c", 0, 8192)]
    assert read_fault_log(tmp_path / "missing") == []


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2], sys.argv[3:])
