"""``python -m megatron_offload_plugin.bench.gpu_check``: on one GPU, what CPU runs cannot show.

Never part of CI and never a pytest test: it needs a visible CUDA device and
refuses (exit code 2) without one.  ``scripts/gpu_check.sh`` sets up the
environment and runs it.  It prints ONE JSON object on stdout; logs, Megatron's
prints and tracebacks go to stderr (file descriptor 1 points at stderr while
the sections run).  Sections, each run even when another fails (its value is
then ``null`` and ``errors[section]`` holds the exception):

* ``bw_split``: Megatron-core Column/RowParallelLinear (TP=1, fp32) through the
  plugin's B/W split (``WeightGradStore`` + the ``linear-wgrad-split`` patch
  applied by a ``PatchSet``).  A backward inside ``store.capture(key)`` must
  queue W work (``w_work_items`` > 0; CUDA autograd runs backward on a worker
  thread, ``backward_on_worker_thread`` says whether it did) and after
  ``store.run(key)`` every gradient must equal an unsplit backward's bitwise.
* ``bf16_gpt``: the same for a bf16 ``GPTModel`` (local spec, tied embedding and
  output weights, which the store keeps unsplit).  At PP=1 Megatron runs
  ``forward_backward_no_pipelining`` and the plugin's runtime steps aside, so
  one B (capture) and one W (run) are driven by hand with the runtime's store.
* ``offload_bandwidth``: the offload engine's copy path (``CudaCopies`` with a
  pinned ``HostPool``), D2H and H2D alone and both at once, against plain pinned
  ``copy_(non_blocking=True)`` on two streams; plus one unit offloaded and
  reloaded by the ``OffloadEngine`` (bitwise round trip, event-timed rates).
* ``offload_iteration_time``: one stage's forward+backward over 4 microbatches
  of a small MLP stack, with and without every microbatch offloaded after its
  forward and reloaded one backward ahead (CUDA-event timed; gradients bitwise).
* ``cuda_event_vs_wall``: the same GEMMs timed by ``perf_counter`` around the
  launches (no sync), by ``perf_counter`` with a sync, and by CUDA events.
* ``transformer_engine_importable``: whether Transformer Engine imports, and its
  version (Megatron-LM's default ``--transformer-impl``; the B/W split refuses it).

Timings are medians over a few repetitions after a warm-up.  The two bitwise
sections run with ``torch.use_deterministic_algorithms(True, warn_only=True)``
(``CUBLAS_WORKSPACE_CONFIG`` is set before CUDA starts) so that a mismatch means
the split changed the arithmetic, not that a kernel chose another order.
The exit code is 0 when every section ran, 1 when one raised (the JSON is
printed either way), 2 without a CUDA device.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

SECTIONS: tuple[str, ...] = (
    "bw_split",
    "bf16_gpt",
    "offload_bandwidth",
    "offload_iteration_time",
    "cuda_event_vs_wall",
    "transformer_engine_importable",
)
ENVIRONMENT_KEYS: tuple[str, ...] = ("torch", "cuda", "device_name", "megatron_core")
REPORT_KEYS: tuple[str, ...] = (*ENVIRONMENT_KEYS, *SECTIONS, "section_seconds", "errors")

_MiB = 1 << 20


class NoCudaDevice(RuntimeError):
    """This process sees no CUDA device: the check has nothing to measure."""


def require_cuda() -> torch.device:
    """The CUDA device to measure on, or :class:`NoCudaDevice` saying why there is none."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if torch.version.cuda is None:
        why = (f"torch {torch.__version__} is a CPU-only build; on a GPU machine run scripts/gpu_check.sh "
               "with a new VENV=<dir> (it keeps the machine's CUDA torch or installs pip's default one)")
    else:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = (f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no device"
               + (f" with CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "")
               + "; check the driver with nvidia-smi")
    raise NoCudaDevice(f"gpu_check: no CUDA device visible: {why}")


# ------------------------------------------------------------------------- helpers
def _median_ms(samples: Sequence[float]) -> float:
    return round(statistics.median(samples), 4)


def _gbps(nbytes: int, ms: float) -> float | None:
    return round(nbytes / (ms / 1000.0) / 1e9, 3) if ms > 0 else None


def _events() -> tuple[torch.cuda.Event, torch.cuda.Event]:
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic kernels for a bitwise comparison; the previous setting comes back after."""
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)


@contextlib.contextmanager
def _single_rank_megatron(seed: int = 1234) -> Iterator[None]:
    """One NCCL rank (an in-process store, no port) with Megatron's model-parallel state at TP=PP=1."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(seed)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if owns_group:
            dist.destroy_process_group()


class _BackwardThreads:
    """Records which threads autograd ran tensor hooks on (CUDA: a device worker, not the caller)."""

    def __init__(self) -> None:
        self.caller = threading.get_ident()
        self.seen: set[int] = set()

    def watch(self, t: torch.Tensor) -> torch.Tensor:
        def hook(grad: torch.Tensor) -> None:
            self.seen.add(threading.get_ident())

        t.register_hook(hook)
        return t

    @property
    def on_worker(self) -> bool:
        return bool(self.seen) and self.caller not in self.seen


def _grads(named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    return {n: (t.grad.detach().clone() if t.grad is not None else None) for n, t in named.items()}


def _compare(got: Mapping[str, torch.Tensor | None], ref: Mapping[str, torch.Tensor | None]) -> dict[str, Any]:
    """Bitwise equality of two gradient sets, the largest absolute difference, and what differs."""
    mismatched, max_abs = [], 0.0
    for name, r in ref.items():
        g = got.get(name)
        if g is None or r is None:
            if (g is None) != (r is None):
                mismatched.append(f"{name} ({'missing' if g is None else 'unexpected'})")
            continue
        if not torch.equal(g, r):
            mismatched.append(name)
            max_abs = max(max_abs, (g.float() - r.float()).abs().max().item())
    return {"grads_bitwise_equal": not mismatched, "max_abs_diff": max_abs, "mismatched": mismatched[:8]}


def _split_backward(
    store: Any, named: Mapping[str, torch.Tensor], loss_fn: Callable[[], torch.Tensor], threads: _BackwardThreads
) -> tuple[int, int, torch.Tensor]:
    """One B inside ``store.capture`` and its W, through the patch; returns
    (W work items, weights whose gradient B left to W, the loss)."""
    from ..patches import PatchSet
    from ..patches.megatron_core import wgrad_split_patch

    patches = PatchSet(log=False)
    patches.apply([wgrad_split_patch(store)])
    try:
        loss = loss_fn()
        threads.watch(loss)
        with store.capture("mb0"):
            loss.backward()
        deferred = sum(1 for n, t in named.items() if n.endswith("weight") and t.grad is None)
        items = store.run("mb0")
    finally:
        patches.revert()
    store.assert_drained()
    return items, deferred, loss


# ------------------------------------------------------------------------- sections
def check_bw_split() -> dict[str, Any]:
    """Megatron Column/RowParallelLinear at TP=1: W queued in B, gradients bitwise after W."""
    device = require_cuda()
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from ..runtime.wgrad import WeightGradStore

    with _single_rank_megatron(), _deterministic():
        torch.manual_seed(0)
        config = ModelParallelConfig(use_cpu_initialization=True, gradient_accumulation_fusion=False)
        init = functools.partial(torch.nn.init.normal_, std=0.02)
        col = ColumnParallelLinear(512, 2048, config=config, init_method=init, bias=True, gather_output=False)
        row = RowParallelLinear(2048, 512, config=config, init_method=init, bias=True, input_is_parallel=True,
                                skip_bias_add=False)
        col, row = col.to(device), row.to(device)
        x = torch.randn(128, 4, 512, device=device, requires_grad=True)
        named = {"x": x, **{f"col.{n}": p for n, p in col.named_parameters()},
                 **{f"row.{n}": p for n, p in row.named_parameters()}}

        def loss_fn() -> torch.Tensor:
            h, _ = col(x)
            y, _ = row(torch.nn.functional.gelu(h))
            return y.square().mean()

        loss_fn().backward()
        reference = _grads(named)
        for t in named.values():
            t.grad = None
        threads = _BackwardThreads()
        items, deferred, _ = _split_backward(WeightGradStore(), named, loss_fn, threads)
        torch.cuda.synchronize()
        return {
            "w_work_items": items,
            "expected_w_work_items": 2,
            "weight_grads_left_to_w": deferred,
            "backward_on_worker_thread": threads.on_worker,
            **_compare(_grads(named), reference),
            "dtype": "float32",
        }


def check_bf16_gpt() -> dict[str, Any]:
    """A bf16 GPTModel (local spec, 2 layers) at PP=1: one B then its W by hand, against unsplit."""
    device = require_cuda()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ..runtime.wgrad import WeightGradStore

    vocab, seq, batch = 1024, 256, 2
    with _single_rank_megatron(), _deterministic():
        torch.manual_seed(0)
        config = TransformerConfig(
            num_layers=2, hidden_size=256, num_attention_heads=4, ffn_hidden_size=1024,
            hidden_dropout=0.0, attention_dropout=0.0,  # the two backwards must see the same masks
            bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
            use_cpu_initialization=True, init_method_std=0.02, gradient_accumulation_fusion=False,
        )
        gpt = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=vocab,
                       max_sequence_length=seq, share_embeddings_and_output_weights=True)
        # As Megatron-LM runs bf16: every parameter in bf16 (the norms too), fp32 output.
        model = Float16Module(config, gpt).to(device)
        tokens = torch.randint(0, vocab, (batch, seq), device=device)
        labels = torch.roll(tokens, -1, dims=1)
        positions = torch.arange(seq, device=device).expand(batch, seq).contiguous()
        named = dict(model.named_parameters())

        def loss_fn() -> torch.Tensor:
            return model(tokens, positions, None, labels=labels).float().mean()

        ref_loss = loss_fn()
        ref_loss.backward()
        reference = _grads(named)
        model.zero_grad(set_to_none=True)
        store = WeightGradStore()
        # Tied weights: autograd sums the embedding's and the output layer's gradient before
        # accumulating; splitting the output layer would change that order (see keep_unsplit).
        store.keep_unsplit(gpt.shared_embedding_or_output_weight())
        threads = _BackwardThreads()
        items, deferred, loss = _split_backward(store, named, loss_fn, threads)
        torch.cuda.synchronize()
        value = loss.item()
        return {
            "loss": value,
            "loss_finite": bool(torch.isfinite(loss).item()),
            "loss_equal_to_unsplit": bool(torch.equal(loss.detach(), ref_loss.detach())),
            "w_work_items": items,
            "expected_w_work_items": 4 * config.num_layers,  # qkv, proj, fc1, fc2 per layer
            "weight_grads_left_to_w": deferred,
            "backward_on_worker_thread": threads.on_worker,
            **_compare(_grads(named), reference),
            "dtype": "bfloat16",
            "tied_embeddings_kept_unsplit": True,
        }


def check_offload_bandwidth(mib: int = 256, reps: int = 5) -> dict[str, Any]:
    """The engine's copy path vs plain pinned copies, D2H and H2D alone and at once (GB/s, CUDA events)."""
    device = require_cuda()
    from ..offload.copies import CudaCopies
    from ..offload.engine import OffloadEngine
    from ..offload.host_pool import HostPool

    nbytes = mib * _MiB
    pool = HostPool(pin=True)
    dev_src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    host_src = pool.acquire(nbytes)
    host_src[:nbytes].copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
    host_dst = pool.acquire(nbytes)
    dev_dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    copies = CudaCopies(device)
    s_d2h, s_h2d = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def span(issue: Callable[[], list[Any]]) -> tuple[float, list[float]]:
        """Time from before the copies to after all of them, and each copy's own time (ms)."""
        compute = torch.cuda.current_stream(device)
        start, stop = _events()
        start.record(compute)
        pairs = issue()
        for _, end in pairs:
            compute.wait_event(end)
        stop.record(compute)
        stop.synchronize()
        return start.elapsed_time(stop), [b.elapsed_time(e) for b, e in pairs]

    def engine(d2h: bool, h2d: bool) -> list[Any]:
        out = []
        if d2h:
            t = copies.d2h(dev_src, host_dst)
            out.append((t.start, t.end))
        if h2d:
            _, t = copies.h2d(host_src, device, nbytes, None)
            out.append((t.start, t.end))
        return out

    def plain(d2h: bool, h2d: bool) -> list[Any]:
        out = []
        for wanted, stream, dst, src in ((d2h, s_d2h, host_dst[:nbytes], dev_src), (h2d, s_h2d, dev_dst, host_src[:nbytes])):
            if not wanted:
                continue
            b, e = _events()
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                b.record()
                dst.copy_(src, non_blocking=True)
                e.record()
            out.append((b, e))
        return out

    figures: dict[str, Any] = {"bytes_per_direction": nbytes}
    for path_name, path in (("engine", engine), ("plain_pinned", plain)):
        for mode, (d2h, h2d) in (("d2h_alone", (True, False)), ("h2d_alone", (False, True)), ("both", (True, True))):
            span(lambda: path(d2h, h2d))  # warm-up
            runs = [span(lambda: path(d2h, h2d)) for _ in range(reps)]
            total = _median_ms([r[0] for r in runs])
            entry: dict[str, Any] = {"span_ms": total, "gbps": _gbps(nbytes * (d2h + h2d), total)}
            if d2h and h2d:
                entry["d2h_gbps"] = _gbps(nbytes, _median_ms([r[1][0] for r in runs]))
                entry["h2d_gbps"] = _gbps(nbytes, _median_ms([r[1][1] for r in runs]))
            figures[f"{path_name}_{mode}"] = entry
    torch.cuda.synchronize()
    figures["engine_copies_bitwise"] = bool(torch.equal(host_dst[:nbytes], dev_src.cpu()))
    for key in ("d2h_alone", "h2d_alone", "both"):
        e, p = figures[f"engine_{key}"]["gbps"], figures[f"plain_pinned_{key}"]["gbps"]
        figures[f"engine_vs_plain_{key}"] = round(e / p, 3) if e and p else None

    # One unit through the engine itself: saved tensor out to the pool and back, as in training.
    engine_obj = OffloadEngine(device=device, pool=pool, min_tensor_bytes=0)
    x = torch.randn(nbytes // 4, device=device, requires_grad=True)
    ref = torch.autograd.grad((x * 2).square().sum(), x)[0]
    with engine_obj.capture("unit"):
        y = (x * 2).square().sum()  # saves x * 2: one storage of nbytes
    engine_obj.offload("unit")
    engine_obj.reload("unit")
    (got,) = torch.autograd.grad(y, x)
    engine_obj.release("unit")
    engine_obj.step_finished()
    stats = engine_obj.take_stats()
    figures["engine_unit"] = {
        "offloaded_bytes": stats["offloaded_bytes"],
        "d2h_gbps": _gbps(stats["offloaded_bytes"], stats["d2h_seconds"] * 1000.0),
        "h2d_gbps": _gbps(stats["reloaded_bytes"], stats["h2d_seconds"] * 1000.0),
        "exposed_ms": round(stats["exposed_seconds"] * 1000.0, 3),
        "grad_bitwise_equal": bool(torch.equal(got, ref)),
    }
    engine_obj.close()
    return figures


class _Block(torch.nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden)
        self.fc1 = torch.nn.Linear(hidden, 4 * hidden)
        self.fc2 = torch.nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


def check_offload_iteration_time(hidden: int = 2048, tokens: int = 4096, layers: int = 4,
                                 microbatches: int = 4, reps: int = 3) -> dict[str, Any]:
    """One stage's forward+backward (all forwards, then backwards in reverse) with and without
    offloading each microbatch after its forward and reloading it one backward ahead."""
    device = require_cuda()
    from ..offload.engine import OffloadEngine
    from ..offload.host_pool import HostPool

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[_Block(hidden) for _ in range(layers)]).to(device, torch.bfloat16)
    inputs = [torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16) for _ in range(microbatches)]
    engine = OffloadEngine(device=device, pool=HostPool(pin=True), min_tensor_bytes=1 << 16,
                           exclude=list(model.parameters()))

    def iteration(offload: bool) -> float:
        model.zero_grad(set_to_none=True)
        start, stop = _events()
        start.record()
        losses = []
        for m, x in enumerate(inputs):
            with engine.capture(m) if offload else contextlib.nullcontext():
                losses.append(model(x).float().square().mean())
            if offload:
                engine.offload(m)
        for m in reversed(range(microbatches)):
            if offload:
                if m == microbatches - 1:
                    engine.reload(m)
                if m > 0:
                    engine.reload(m - 1)  # prefetch: its copy runs under this backward
            losses[m].backward()
            if offload:
                engine.release(m)
        if offload:
            engine.step_finished()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop)

    out: dict[str, Any] = {"hidden": hidden, "tokens_per_microbatch": tokens, "layers": layers,
                           "microbatches": microbatches, "dtype": "bfloat16"}
    grads: dict[bool, dict[str, torch.Tensor | None]] = {}
    named = dict(model.named_parameters())
    for offload in (False, True):
        iteration(offload)  # warm-up (the host pool allocates here)
        engine.take_stats()
        times = [iteration(offload) for _ in range(reps)]
        grads[offload] = _grads(named)
        out["with_offload_ms" if offload else "without_offload_ms"] = _median_ms(times)
        if offload:
            stats = engine.take_stats()
            out["offloaded_bytes_per_iteration"] = stats["offloaded_bytes"] // reps
            out["exposed_copy_ms_per_iteration"] = round(stats["exposed_seconds"] * 1000.0 / reps, 3)
            out["host_pool_bytes"] = stats["host_pool_bytes"]
    out["overhead_ratio"] = round(out["with_offload_ms"] / out["without_offload_ms"], 3)
    out.update(_compare(grads[True], grads[False]))
    engine.close()
    return out


def check_cuda_event_vs_wall(size: int = 8192, launches: int = 40) -> dict[str, Any]:
    """GEMMs timed three ways: perf_counter around the launches only, with a sync, and CUDA events."""
    device = require_cuda()
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a  # warm-up (cuBLAS handle, allocator)
    torch.cuda.synchronize()
    start, stop = _events()
    t0 = time.perf_counter()
    start.record()
    for _ in range(launches):
        a @ a
    stop.record()
    t_launch = time.perf_counter()
    torch.cuda.synchronize()
    t_sync = time.perf_counter()
    event_ms = start.elapsed_time(stop)
    launch_ms = (t_launch - t0) * 1000.0
    return {
        "work": f"{launches} x bf16 GEMM {size}x{size}",
        "perf_counter_launch_only_ms": round(launch_ms, 4),
        "perf_counter_with_sync_ms": round((t_sync - t0) * 1000.0, 4),
        "cuda_event_ms": round(event_ms, 4),
        "event_over_launch_only": round(event_ms / launch_ms, 2) if launch_ms > 0 else None,
    }


def check_transformer_engine() -> dict[str, Any]:
    """Whether Transformer Engine imports here, and which version (no CUDA needed to ask)."""
    from importlib import metadata

    try:
        import transformer_engine  # noqa: F401
    except Exception as err:  # ImportError, or a broken build raising anything at import
        return {"importable": False, "version": None, "reason": f"{type(err).__name__}: {err}"[:300]}
    version = getattr(transformer_engine, "__version__", None)
    for dist in ("transformer_engine", "transformer-engine"):
        if version is None:
            with contextlib.suppress(metadata.PackageNotFoundError):
                version = metadata.version(dist)
    return {"importable": True, "version": version}


CHECKS: dict[str, Callable[[], Any]] = {
    "bw_split": check_bw_split,
    "bf16_gpt": check_bf16_gpt,
    "offload_bandwidth": check_offload_bandwidth,
    "offload_iteration_time": check_offload_iteration_time,
    "cuda_event_vs_wall": check_cuda_event_vs_wall,
    "transformer_engine_importable": check_transformer_engine,
}


# ------------------------------------------------------------------------- report
def environment() -> dict[str, Any]:
    from ..patches.versions import megatron_core_version

    version = megatron_core_version()
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "megatron_core": str(version) if version is not None else None,
    }


def build_report(sections: Sequence[str] = SECTIONS, checks: Mapping[str, Callable[[], Any]] = CHECKS) -> dict[str, Any]:
    """Every key of :data:`REPORT_KEYS`; each selected section runs even when an earlier one raised.

    A section not selected, or one that raised, is ``null``; ``errors`` maps each that
    raised to ``"ExceptionType: message"`` (the traceback goes to the log).
    """
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"gpu_check sections {unknown}: unknown; accepted: {', '.join(SECTIONS)}")
    report: dict[str, Any] = dict.fromkeys(REPORT_KEYS)
    report.update(environment())
    report["section_seconds"], report["errors"] = {}, {}
    for name in sections:
        t0 = time.perf_counter()
        logger.info("gpu_check: %s ...", name)
        try:
            report[name] = checks[name]()
        except Exception as err:
            report["errors"][name] = f"{type(err).__name__}: {err}"
            logger.error("gpu_check: %s failed:\n%s", name, traceback.format_exc())
        finally:
            if torch.cuda.is_available():
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
        report["section_seconds"][name] = round(time.perf_counter() - t0, 2)
        logger.info("gpu_check: %s done in %.1f s", name, report["section_seconds"][name])
    return report


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Point file descriptor 1 at stderr while the sections run (Megatron's and NCCL's prints
    too), so that stdout carries nothing but the one JSON object."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_offload_plugin.bench.gpu_check", allow_abbrev=False,
                                     description="One-GPU check of what CPU runs cannot show; one JSON object out.")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of: {', '.join(SECTIONS)} (default: all)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {', '.join(unknown)}; accepted: {', '.join(SECTIONS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[gpu_check] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    # Before CUDA creates a cuBLAS handle: the bitwise sections ask for deterministic kernels.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        require_cuda()
    except NoCudaDevice as err:
        print(str(err), file=sys.stderr)
        return 2
    with _stdout_to_stderr():
        report = build_report(sections)
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
