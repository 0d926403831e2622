"""Run a function on N local processes over gloo, bounded in time (for tests and benchmarks).

Each process joins a fresh gloo group on loopback, enables the CPU backend when
the machine has no GPU, runs ``fn(rank, world_size, *args)`` and sends back
its (picklable) return value or its traceback.  A run that outlives
``timeout_s`` is killed and reported, never left hanging.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable, Sequence


class DistributedRunError(RuntimeError):
    """A rank raised, died or timed out; the message carries every rank's story."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _to_bytes(value: Any) -> bytes:
    """Results cross the process boundary as bytes: tensors shared through file
    descriptors would vanish with the exiting child before the parent reads them."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _from_bytes(payload: bytes) -> Any:
    import io

    import torch

    return torch.load(io.BytesIO(payload), weights_only=False)


def _worker(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: Sequence[Any],
            results: "mp.Queue[tuple[int, str, Any]]", threads: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    try:
        import torch

        torch.set_num_threads(threads)
        if not torch.cuda.is_available():
            from ..backends import cpu as cpu_backend

            cpu_backend.enable()
        torch.distributed.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120)
        )
        try:
            value = fn(rank, world_size, *args)
        finally:
            try:
                from megatron.core import parallel_state

                if parallel_state.model_parallel_is_initialized():
                    parallel_state.destroy_model_parallel()
            except ImportError:
                pass
            torch.distributed.destroy_process_group()
        results.put((rank, "ok", _to_bytes(value)))
    except BaseException:  # report everything, including KeyboardInterrupt in a child
        results.put((rank, "error", traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 300.0,
    threads_per_rank: int = 1,
) -> list[Any]:
    """``[fn(0, N, *args), ..., fn(N-1, N, *args)]`` computed on N processes."""
    ctx = mp.get_context("spawn")
    results: "mp.Queue[tuple[int, str, Any]]" = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world_size, port, args, results, threads_per_rank), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    values: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        while len(values) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DistributedRunError(
                    f"run_distributed({getattr(fn, '__name__', fn)}, world_size={world_size}) "
                    f"timed out after {timeout_s:.0f}s; finished ranks: {sorted(values)}; "
                    f"errors: {errors or 'none'}"
                )
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and p.exitcode not in (0, None)
                        and r not in values and r not in errors]
                if dead:
                    # Give the queue a moment: a rank that raised has already reported.
                    time.sleep(0.5)
                    while not results.empty():
                        rank, status, payload = results.get_nowait()
                        (values if status == "ok" else errors)[rank] = payload
                    for r in dead:
                        errors.setdefault(r, f"process exited with code {procs[r].exitcode}")
                continue
            if status == "ok":
                values[rank] = payload
            else:
                errors[rank] = payload
                # One failing rank usually blocks the others in a collective: stop early.
                break
        if errors:
            details = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise DistributedRunError(f"{len(errors)} rank(s) failed:\n{details}")
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.1)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [_from_bytes(values[r]) for r in range(world_size)]
