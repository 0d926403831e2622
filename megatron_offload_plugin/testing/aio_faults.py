"""Lost and shortened NVMe transfers on demand: an LD_PRELOAD shim around libaio's ``io_submit``.

DeepSpeed's aio op (0.19.8) never checks a completion's byte count, so a transfer the
device cut short is silent.  ``aio_fault_shim.c`` (next to this file) makes that happen
for chosen requests, so that a test running a subprocess under it can prove the plugin
notices.  The shim reads ``MOP_AIO_FAULT`` at every submit, so the child can also switch
faults on and off itself through ``os.environ``.  Spec (see the C file for details)::

    OP:MODE[:skip=N][:count=N][:path=SUBSTRING]     e.g. write:drop:skip=3:count=2:path=layer00001

``OP`` is ``read``, ``write`` or ``any``; ``MODE`` ``drop`` (0 bytes move) or ``short``
(half, rounded down to 512).  One request is one iocb: DeepSpeed splits each transfer
into ``block_size`` pieces per ``intra_op_parallelism`` thread, so ``skip`` / ``count``
count blocks and ``short`` halves each faulted block.  With ``MOP_AIO_FAULT_LOG`` set,
each faulted request appends ``OP PATH OFFSET NBYTES`` to that file (:func:`read_fault_log`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Mapping, NamedTuple

SPEC_ENV = "MOP_AIO_FAULT"
LOG_ENV = "MOP_AIO_FAULT_LOG"
SOURCE = Path(__file__).with_name("aio_fault_shim.c")

#: io_submit is exported at libaio's version, the one DeepSpeed's op binds to (``objdump -T``).
VERSION_SCRIPT = "LIBAIO_0.1 { global: io_submit; local: *; };\n"
CFLAGS = ("-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-fvisibility=hidden")

_SPEC_RE = re.compile(r"(read|write|any):(drop|short)((?::(?:skip|count)=[0-9]+|:path=[^:]+)*)")


class ShimBuildError(RuntimeError):
    """The shim could not be compiled (no C compiler, or the compiler failed)."""


class FaultRecord(NamedTuple):
    """One faulted request as the shim logged it; ``nbytes`` is the size asked for."""

    op: str
    path: str
    offset: int
    nbytes: int


def find_compiler() -> str | None:
    """``$CC``'s program if set, else the first of cc, gcc, clang on PATH (None: none found)."""
    if os.environ.get("CC", "").strip():
        return shutil.which(shlex.split(os.environ["CC"])[0])
    return next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)


def build_shim(dest_dir: str | os.PathLike[str]) -> Path:
    """Compile the shim into ``dest_dir`` once per source (and flags) hash; return the ``.so``.

    The file name carries the hash, so an edited source builds anew and concurrent
    builders race harmlessly (each writes a temporary file and renames it).
    Raises :class:`ShimBuildError` when there is no C compiler or it fails.
    """
    dest = Path(dest_dir)
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + repr((CFLAGS, VERSION_SCRIPT)).encode()).hexdigest()[:16]
    out = dest / f"libmop_aio_fault-{tag}.so"
    if out.exists():
        return out
    cc = find_compiler()
    if cc is None:
        raise ShimBuildError("no C compiler found (set CC, or install cc/gcc/clang) to build the aio fault shim")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        script = Path(tmp) / "io_submit.map"
        script.write_text(VERSION_SCRIPT)
        built = Path(tmp) / out.name
        cmd = [cc, *CFLAGS, f"-Wl,--version-script={script}", "-o", str(built), str(SOURCE), "-ldl"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ShimBuildError(f"building the aio fault shim failed ({' '.join(cmd)}):\n{proc.stderr.strip()}")
        os.replace(built, out)
    return out


def check_spec(spec: str) -> str:
    """``spec`` if it is a well-formed fault spec, else ``ValueError`` (the shim itself would only warn)."""
    if not _SPEC_RE.fullmatch(spec) or any(spec.count(f":{k}=") > 1 for k in ("skip", "count", "path")):
        raise ValueError(f"{SPEC_ENV}={spec!r}: expected OP:MODE[:skip=N][:count=N][:path=SUBSTRING] "
                         "with OP read|write|any and MODE drop|short, each option at most once")
    return spec


def fault_env(shim_path: str | os.PathLike[str], spec: str | None = None,
              log: str | os.PathLike[str] | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a subprocess running under the shim: ``base`` (default ``os.environ``) plus LD_PRELOAD.

    ``spec`` / ``log`` set ``MOP_AIO_FAULT`` / ``MOP_AIO_FAULT_LOG``; None removes them,
    so a fault left in the parent's environment never leaks into the child unasked.
    """
    env = dict(os.environ if base is None else base)
    shim = str(Path(shim_path).resolve())
    env["LD_PRELOAD"] = " ".join(filter(None, (shim, env.get("LD_PRELOAD", ""))))
    for name, value in ((SPEC_ENV, None if spec is None else check_spec(spec)), (LOG_ENV, log)):
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


def read_fault_log(log: str | os.PathLike[str]) -> list[FaultRecord]:
    """The requests the shim faulted, in order (empty when the log does not exist)."""
    try:
        text = Path(log).read_text()
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        op, rest = line.split(" ", 1)
        path, offset, nbytes = rest.rsplit(" ", 2)  # the path may hold spaces
        records.append(FaultRecord(op, path, int(offset), int(nbytes)))
    return records
