"""``bench deepspeed``: one DeepSpeed config trained three ways, one JSON object out.

Runs (each in its own process, so that peak RSS is the run's own):

* ``plain``: the config without the ``layerwise_offload`` section;
* ``zero2_cpu_offload``: DeepSpeed's own ZeRO-2 with ``offload_optimizer: {device: cpu}``, no section;
* ``layerwise``: the config as given (with the section).

All three train the same GPT-like model (same seed, same data) with the same
optimizer (``torch_adam`` is forced on, so the math is the same everywhere and no
extra op has to be JIT-built).  Per run: ``losses`` (one per optimizer step),
``step_time_s`` (median, first step excluded), ``peak_rss_bytes`` (``ru_maxrss``),
``optimizer_state_bytes_resident_peak`` (layerwise: measured peak of buffers the
store held; others: all states, they are always resident) and
``optimizer_state_bytes`` (all states).

With NVMe states the layerwise run also reports, for the training steps only (the
swapper's statistics are snapshotted right before the first step and read right
after the last one, once the store has completed that step's transfers):

* ``aio_read_gbps`` / ``aio_write_gbps``: throughput of the transfers the layer
  store itself made while training, from :meth:`.nvme.AioSwapper.io_stats` (one aio
  handle per direction): per direction, the bytes of the batches whose wait found
  the I/O still running, over the time from each batch's first submit to its wait
  returning.  A lower bound on what the disk delivered (the interval includes submit
  gaps; reads and writes share the disk).  ``null`` when no wait ever blocked;
* ``aio_timed_read_bytes`` / ``aio_timed_write_bytes``: the bytes those figures rest
  on, out of ``aio_read_bytes`` / ``aio_write_bytes`` (all bytes moved, padded);
* ``aio_wait_s``: time the steps spent blocked on aio (I/O not hidden behind compute);
* ``disk_read_gbps`` / ``disk_write_gbps``: after training, in the same swap folder,
  one thread, 1 MiB O_DIRECT requests: a sequential pwrite (and fsync) of as many
  bytes as the store holds into a new file, and a pread of the store's own layer
  files; the median of three passes (see ``_disk_gbps``);
* ``aio_read_vs_disk`` / ``aio_write_vs_disk``: the aio figure over the disk figure;
* ``aio_read_gbps_alone`` / ``aio_write_gbps_alone`` (``aio_timed_*_bytes_alone``):
  the same over the timed batches during which the other direction had nothing
  pending, i.e. aio's own speed with the disk to itself (null when there was none);
* ``aio_rw_gbps`` / ``aio_timed_rw_bytes``: reads and writes counted together: bytes
  of both over the time from the first submit while nothing was pending to the last
  wait returning, for the batches where every wait blocked.  (The layer store keeps
  one direction on the disk at a time, so these mostly equal the per-direction ones.)

Activations, every run: ``peak_saved_activation_bytes`` is the peak of the
saved-for-backward bytes resident on the device over training (a
``SavedTensorTracker``; with ``layerwise_offload.activations`` it sees only what is
not offloaded), and ``activation_layer_bytes`` what the first transformer layer
saves in one forward (measured around that layer's forward).  With both ``plain``
and an activation-offloading ``layerwise`` run, the latter gets
``activation_selected_peak_layers``: its peak minus what ``plain`` keeps outside the
layers (``plain`` peak - layers x layer bytes), in layers' worth.
"""

from __future__ import annotations

import argparse
import copy
import json
import mmap
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

RUNS = ("plain", "zero2_cpu_offload", "layerwise")
SECTION = "layerwise_offload"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_offload_plugin bench deepspeed", allow_abbrev=False,
                                description="Train one GPT-like model on DeepSpeed without the section, with ZeRO-2 "
                                            "CPU offload and with the layerwise_offload section; print JSON.")
    p.add_argument("--config", required=True, help="DeepSpeed JSON config with a 'layerwise_offload' section")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per run")
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--timeout", type=float, default=3000.0, help="seconds before a run is stopped")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def run_config(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config of one run, derived from the user's."""
    cfg = copy.deepcopy(cfg)
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {"lr": 1e-4}})
    opt.setdefault("params", {})["torch_adam"] = True
    if name == "layerwise":
        return cfg
    cfg.pop(SECTION, None)
    if name == "zero2_cpu_offload":
        zero = cfg.setdefault("zero_optimization", {})
        zero["stage"] = 2
        zero["offload_optimizer"] = {"device": "cpu"}
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


def _state_bytes(optimizer: Any) -> int:
    total = 0
    for st in getattr(optimizer, "state", {}).values():
        for v in st.values():
            if hasattr(v, "element_size") and v.numel() > 1:
                total += v.numel() * v.element_size()
    return total


def _disk_gbps(folder: Path, nbytes: int, read_files: Sequence[Path], passes: int = 3,
               block: int = 1 << 20) -> tuple[float, float]:
    """Plain O_DIRECT I/O in ``folder``, one thread, ``block``-sized requests: (write, read) GB/s.

    Write: ``nbytes`` sequentially into a new probe file, then fsync.  Read: the
    ``read_files`` (the store's own layer files, as aio read them in training) whole,
    sequentially -- not the probe just written, which a virtual disk may serve from its
    host's cache (measured here: up to 2.2 GB/s against about 1 GB/s for older files).
    Each figure is the median of ``passes`` passes: this machine's disk varies by 2x
    from one pass to the next.
    """
    buf = mmap.mmap(-1, block)
    buf.write(os.urandom(block))
    nblocks = max(1, nbytes // block)
    writes, reads = [], []
    for k in range(passes):
        path = folder / f"disk-probe-{k}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_DIRECT, 0o600)
        try:
            t0 = time.perf_counter()
            for i in range(nblocks):
                os.pwrite(fd, buf, i * block)
            os.fsync(fd)
            writes.append(nblocks * block / (time.perf_counter() - t0) / 1e9)
        finally:
            os.close(fd)
            path.unlink()
        moved, t0 = 0, time.perf_counter()
        for f in read_files:
            fd = os.open(f, os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECT)
            try:
                offset = 0
                while n := os.preadv(fd, [buf], offset):
                    offset += n
                moved += offset
            finally:
                os.close(fd)
        reads.append(moved / (time.perf_counter() - t0) / 1e9)
    return statistics.median(writes), statistics.median(reads)


def _io_figures(io: Any, disk_write: float, disk_read: float) -> dict[str, Any]:
    """The aio keys of a run from the swapper's in-training :class:`.nvme.IOStats`, next to the disk probe."""
    out: dict[str, Any] = {}
    for name, st, disk in (("read", io.read, disk_read), ("write", io.write, disk_write)):
        out[f"aio_{name}_gbps"] = st.gbps
        out[f"aio_{name}_bytes"] = st.bytes
        out[f"aio_timed_{name}_bytes"] = st.timed_bytes
        out[f"disk_{name}_gbps"] = disk
        out[f"aio_{name}_vs_disk"] = st.gbps / disk if st.gbps is not None else None
        out[f"aio_{name}_gbps_alone"] = st.gbps_alone
        out[f"aio_timed_{name}_bytes_alone"] = st.alone_timed_bytes
    out["aio_rw_gbps"], out["aio_timed_rw_bytes"] = io.both.gbps, io.both.timed_bytes
    return out


def child(name: str, cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    import torch

    from ..deepspeed import layerwise_optimizer
    from ..deepspeed.tiny import GPTShape, batches, build, train
    from ..telemetry.activation_memory import SavedTensorTracker

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    shape = GPTShape(vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads, seq=args.seq + 1)
    engine = build(shape, cfg)
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(_: int) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    opt = layerwise_optimizer(engine)
    store = opt.store if opt is not None else None
    on_nvme = hasattr(store, "swapper")
    tracker = SavedTensorTracker(exclude=list(engine.module.parameters()))
    layer_saved: list[int] = []
    first_layer = engine.module.layers[0]
    hooks = [first_layer.register_forward_pre_hook(lambda *_: layer_saved.append(-tracker.current_bytes)),
             first_layer.register_forward_hook(lambda *_: layer_saved.append(layer_saved.pop() + tracker.current_bytes))]
    if on_nvme:
        store.drain()  # nothing of the set-up is still in flight when the snapshot is taken
        io_before, wait_before = store.swapper.io_stats(), store.wait_seconds
    with tracker.track():
        losses = train(engine, args.steps, batches(shape, cfg["train_micro_batch_size_per_gpu"]), on_step=tick)
    for h in hooks:
        h.remove()
    if on_nvme:
        store.drain()  # completes the last step's transfers (training's own), nothing else
        io, wait_s = store.swapper.io_stats().since(io_before), store.wait_seconds - wait_before
    out: dict[str, Any] = {
        "name": name,
        "losses": losses,
        "step_time_s": statistics.median(times[1:] or times),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "params": sum(p.numel() for p in engine.module.parameters()),
        "layers": args.layers,
        "peak_saved_activation_bytes": tracker.peak_bytes,
        "activation_layer_bytes": max(layer_saved, default=0),
        "activation_offload": (cfg.get(SECTION) or {}).get("activations", {}).get("device", "none"),
    }
    if opt is None:
        basic = getattr(engine, "basic_optimizer", engine.optimizer)
        out["optimizer_state_bytes"] = _state_bytes(basic)
        out["optimizer_state_bytes_resident_peak"] = out["optimizer_state_bytes"]
    else:
        out["optimizer_state_bytes"] = sum(opt.layer_bytes.values())
        out["optimizer_state_bytes_resident_peak"] = opt.resident_bytes_peak
        out["optimizer_state_bytes_largest_layer"] = max(opt.layer_bytes.values())
        out["prefetch_layers"] = opt.prefetch_layers
        if on_nvme:
            out["aio_wait_s"] = wait_s
            out.update(_io_figures(io, *_disk_gbps(store.folder.path, store.stored_bytes, store.layer_files())))
        opt.close()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = json.loads(Path(args.config).read_text())
    except (OSError, json.JSONDecodeError) as err:
        print(f"bench deepspeed: --config={args.config!r}: {err}", file=sys.stderr)
        return 2
    if args.child:
        print("BENCH_RESULT " + json.dumps(child(args.child, run_config(args.child, cfg), args)))
        return 0
    if SECTION not in cfg:
        print(f"bench deepspeed: --config={args.config!r} has no '{SECTION}' section", file=sys.stderr)
        return 2
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in runs if r not in RUNS]
    if bad:
        print(f"bench deepspeed: --runs: unknown {', '.join(bad)}; accepted: {', '.join(RUNS)}", file=sys.stderr)
        return 2
    results = []
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    start = time.perf_counter()
    for name in runs:
        cmd = [sys.executable, "-m", "megatron_offload_plugin.bench.deepspeed", *base, "--child", name]
        # each run is its own single-rank job: never inherit a caller's rendezvous (its port may be taken)
        env = {k: v for k, v in os.environ.items()
               if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"bench deepspeed: run '{name}' failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(line.removeprefix("BENCH_RESULT ")))
        if not args.json:
            print(f"# {name}: step {results[-1]['step_time_s']:.3f}s, peak RSS {results[-1]['peak_rss_bytes'] / 2**30:.2f} GiB",
                  file=sys.stderr)
    result = {"config": args.config, "runs": results, "wall_time_s": time.perf_counter() - start}
    plain = next((r for r in results if r["name"] == "plain"), None)
    if plain is not None:
        for r in results:
            r["max_rel_loss_diff_vs_plain"] = max(
                (abs(a - b) / max(abs(b), 1e-30) for a, b in zip(r["losses"], plain["losses"])), default=0.0)
            r["losses_bitwise_equal_to_plain"] = r["losses"] == plain["losses"]
            layer = plain["activation_layer_bytes"]
            if r["activation_offload"] != "none" and layer > 0:
                outside = plain["peak_saved_activation_bytes"] - plain["layers"] * layer
                r["activation_selected_peak_layers"] = (r["peak_saved_activation_bytes"] - outside) / layer
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
