"""The offload engine on plain torch: bitwise round trips, resident accounting, pool reuse, errors."""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from megatron_offload_plugin.offload import HostPool, HostPoolExhausted, OffloadEngine, OffloadStateError, aligned
from megatron_offload_plugin.telemetry.activation_memory import SavedTensorTracker


class ViewingBlock(torch.nn.Module):
    """Saves views of one storage (chunks of one projection) and a dropout mask."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(32, 96)
        self.out = torch.nn.Linear(32, 32)
        self.drop = torch.nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = self.proj(x).chunk(3, dim=-1)
        return self.out(self.drop(torch.tanh(a) * torch.sigmoid(b) + c.relu()))


def _train_step(model: torch.nn.Module, x: torch.Tensor, engine: OffloadEngine | None, tracker: SavedTensorTracker):
    torch.manual_seed(7)
    model.zero_grad()
    x = x.detach().requires_grad_()
    figures = {}
    with tracker.track():
        if engine is None:
            y = model(x)
        else:
            with engine.capture("u"):
                y = model(x)
        figures["saved"] = tracker.current_bytes
        if engine is not None:
            engine.offload("u")
            figures["offloaded"] = tracker.current_bytes
            engine.reload("u")
            figures["reloaded"] = tracker.current_bytes
        y.square().sum().backward()
    if engine is not None:
        engine.release("u")
        engine.step_finished()
    return x.grad, [p.grad.clone() for p in model.parameters()], figures


def test_round_trip_is_bitwise_and_the_tracker_sees_only_resident_bytes():
    torch.manual_seed(0)
    model = ViewingBlock()
    x = torch.randn(64, 32)
    params = list(model.parameters())
    ref_x, ref_p, ref_fig = _train_step(model, x, None, SavedTensorTracker(params))
    engine = OffloadEngine(min_tensor_bytes=1024, exclude=params)
    got_x, got_p, fig = _train_step(model, x, engine, SavedTensorTracker(params))
    assert torch.equal(got_x, ref_x)
    assert all(torch.equal(a, b) for a, b in zip(got_p, ref_p))
    assert fig["saved"] == ref_fig["saved"] > 0
    assert fig["offloaded"] < fig["saved"] / 4  # only the small tensors stay
    assert fig["reloaded"] == fig["saved"]
    stats = engine.take_stats()
    assert stats["offloaded_bytes"] == stats["reloaded_bytes"] > 0
    assert stats["on_demand_reloads"] == 0


def test_views_of_one_storage_are_copied_once_and_parameters_stay():
    proj = torch.nn.Linear(16, 48)
    engine = OffloadEngine(min_tensor_bytes=0, exclude=list(proj.parameters()))
    x = torch.randn(8, 16, requires_grad=True)
    with engine.capture("u"):
        h = proj(x)
        a, b, c = h.chunk(3, dim=-1)
        y = (a * b).sum() + (c * c).sum()  # saves three views of h's storage (c twice)
    moved = engine.offload("u")
    # x (saved by the Linear) and h's storage, once; never the weight.
    assert moved == x.untyped_storage().nbytes() + h.untyped_storage().nbytes()
    y.backward()
    engine.release("u")
    assert proj.weight.grad is not None


def test_offload_frees_the_device_storage_and_held_tensors_move_with_their_unit():
    engine = OffloadEngine(min_tensor_bytes=0)
    leaf = torch.randn(256, 64, requires_grad=True)
    with engine.capture("u"):
        y = (leaf.tanh() * 3).sum()
    engine.hold("u", leaf)
    inner = StorageWeakRef(leaf.untyped_storage())
    engine.offload("u")
    assert leaf.numel() == 0 and inner.expired()
    engine.reload("u")
    assert leaf.shape == (256, 64)
    y.backward()
    assert leaf.grad.shape == (256, 64)
    engine.release("u")


def test_unpack_before_reload_reloads_on_demand():
    engine = OffloadEngine(min_tensor_bytes=0)
    x = torch.randn(128, 64, requires_grad=True)
    with engine.capture("u"):
        y = x.exp().sum()
    engine.offload("u")
    y.backward()
    assert torch.equal(x.grad, x.detach().exp())
    assert engine.take_stats()["on_demand_reloads"] == 1
    engine.release("u")


def test_host_pool_is_reused_across_iterations_and_bounded():
    pool = HostPool(max_bytes=1 << 20, option="--offload-host-pool-bytes")
    engine = OffloadEngine(pool=pool, min_tensor_bytes=0)
    x = torch.randn(64, 64, requires_grad=True)
    for _ in range(3):
        with engine.capture("u"):
            y = x.sin().sum()
        engine.offload("u")
        y.backward()
        engine.release("u")
        engine.step_finished()
    assert pool.allocations == 1 and pool.reserved_bytes == aligned(x.untyped_storage().nbytes())
    with pytest.raises(HostPoolExhausted, match=r"--offload-host-pool-bytes=1048576: the host pool holds"):
        pool.acquire(2 << 20)


def test_state_errors_name_the_unit():
    engine = OffloadEngine(min_tensor_bytes=0)
    with pytest.raises(OffloadStateError, match="'v' was never captured"):
        engine.offload("v")
    x = torch.randn(64, 64, requires_grad=True)
    with engine.capture("u"):
        y = x.exp().sum()
    with pytest.raises(OffloadStateError, match="not offloaded: nothing to reload"):
        engine.reload("u")
    engine.offload("u")
    engine.release("u")  # too early: the graph still needs the tensors
    with pytest.raises(OffloadStateError, match="released while its tensors were still needed"):
        y.backward()
    with pytest.raises(OffloadStateError, match="never released"):
        with engine.capture("w"):
            (x * 2).sum()
        engine.step_finished()


def test_region_offloader_reloads_as_backward_arrives_and_forgets_after_backward():
    from megatron_offload_plugin.offload.regions import RegionOffloader

    engine = OffloadEngine(min_tensor_bytes=0)
    regions = RegionOffloader(engine, prefetch=1)
    layers = [torch.nn.Linear(32, 32) for _ in range(4)]
    engine.set_exclude([p for l in layers for p in l.parameters()])
    x = torch.randn(16, 32, requires_grad=True)
    h = x
    for layer in layers:
        h = regions.run(lambda t, layer=layer: layer(t).tanh(), h)
    assert all(engine.is_offloaded(k) for k in engine.units())
    h.sum().backward()
    assert engine.units() == []  # forgotten at the end of the backward call
    stats = engine.take_stats()
    assert stats["offloaded_units"] == 4 and stats["reloaded_bytes"] == stats["offloaded_bytes"]
    assert stats["on_demand_reloads"] == 0  # each region was prefetched by the one after it


def test_nvme_tier_round_trip_is_bitwise_in_a_private_folder(tmp_path):
    from megatron_offload_plugin.offload import nvme

    ok, why = nvme.aio_available()
    if not ok:
        pytest.skip(why)
    torch.manual_seed(0)
    model = ViewingBlock()
    x = torch.randn(64, 32)
    params = list(model.parameters())
    ref_x, ref_p, _ = _train_step(model, x, None, SavedTensorTracker(params))
    with nvme.SwapFolder(tmp_path, option="--offload-nvme-path") as folder, nvme.AioSwapper(folder) as swapper:
        engine = OffloadEngine(min_tensor_bytes=1000, exclude=params, nvme=swapper)  # odd sizes get padded
        got_x, got_p, fig = _train_step(model, x, engine, SavedTensorTracker(params))
        assert (folder.path.stat().st_mode & 0o777) == 0o700
        files = list(folder.path.iterdir())
        assert files and all((f.stat().st_mode & 0o777) == 0o600 for f in files)
        stats = engine.take_stats()
        assert stats["nvme_written_bytes"] == stats["nvme_read_bytes"] == stats["offloaded_bytes"] > 0
        assert engine.pool.reserved_bytes == 0  # host memory only in transit (aio buffers)
        engine.close()
    assert not folder.path.exists()
    assert torch.equal(got_x, ref_x) and all(torch.equal(a, b) for a, b in zip(got_p, ref_p))


def test_layerwise_offload_keeps_at_most_one_layer_resident_and_is_bitwise():
    from megatron_offload_plugin.offload.regions import LayerwiseOffload, RegionOffloader

    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[ViewingBlock() for _ in range(6)])
    params = list(layers.parameters())
    x = torch.randn(128, 32)
    ref_x, ref_p, ref_fig = _train_step(layers, x, None, SavedTensorTracker(params))
    engine = OffloadEngine(min_tensor_bytes=0, exclude=params)
    hooks = LayerwiseOffload(list(layers), RegionOffloader(engine, prefetch=1))
    tracker = SavedTensorTracker(params)
    got_x, got_p, fig = _train_step(layers, x, None, tracker)
    hooks.detach()
    assert torch.equal(got_x, ref_x) and all(torch.equal(a, b) for a, b in zip(got_p, ref_p))
    # After the forward nothing of the six layers is resident (only the input the first saves
    # is shared with the caller), and the peak is about one layer's activations.
    assert fig["saved"] < ref_fig["saved"] / 6
    assert tracker.peak_bytes <= 2 * ref_fig["saved"] / 6
    assert engine.units() == [] and "forward" not in vars(layers[0])


class _TimingEvent:
    """A CUDA timing event that has ended, at a known time in ms (a CPU build has no events)."""

    def __init__(self, ms: float) -> None:
        self.ms = ms

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "_TimingEvent") -> float:
        return end.ms - self.ms


class _EventTimedCopies:
    """Real copies between distinct buffers, reported as ``CudaCopies`` reports them: a start
    and an end event per copy, read by the engine after the fact.  Keeps a weak set of the
    events it made (to count what the engine still holds) and, per direction, the copy times
    summed in issue order (what ``take_stats`` must report)."""

    asynchronous = True

    def __init__(self) -> None:
        import weakref

        self.clock_ms = 0.0
        self.events: "weakref.WeakSet[_TimingEvent]" = weakref.WeakSet()
        self.seconds = {"d2h": 0.0, "h2d": 0.0}

    def _ticket(self, direction: str, nbytes: int):
        from megatron_offload_plugin.offload.copies import Ticket

        start = _TimingEvent(self.clock_ms)
        self.clock_ms += 0.25 + nbytes / 8192
        end = _TimingEvent(self.clock_ms)
        self.events.update((start, end))
        self.seconds[direction] += start.elapsed_time(end) / 1000.0  # as Ticket.seconds() computes it
        return Ticket(nbytes, end=end, start=start)

    def d2h(self, src: torch.Tensor, dst: torch.Tensor):
        dst[: src.numel()].copy_(src)
        return self._ticket("d2h", src.numel())

    def h2d(self, src: torch.Tensor, device: torch.device, nbytes: int, after):
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst.copy_(src[:nbytes])
        return dst, self._ticket("h2d", nbytes)


@pytest.mark.parametrize("end_of_step", ["step_finished", "nothing"])
def test_copy_timings_stay_bounded_without_take_stats_and_keep_their_totals(end_of_step):
    """Megatron-LM's own loop (through the launcher) never calls take_stats(), and DeepSpeed's calls
    neither it nor step_finished(): the events timing each copy must not pile up over the steps,
    and take_stats() at the end still reports every copy's time, summed in issue order."""
    import gc

    from megatron_offload_plugin.backends import cpu as cpu_backend

    torch.manual_seed(0)
    model = ViewingBlock()
    x = torch.randn(64, 32)
    engine = OffloadEngine(min_tensor_bytes=0, exclude=list(model.parameters()))
    copies = engine.copies = _EventTimedCopies()
    held: list[int] = []
    with cpu_backend.cpu_backend():  # Ticket.wait() orders "the compute stream" after each reload
        for _ in range(12):
            with engine.capture("u"):
                y = model(x.requires_grad_())
            engine.offload("u")
            engine.reload("u")
            y.square().sum().backward()
            engine.release("u")
            if end_of_step == "step_finished":
                engine.step_finished()
            del y
            gc.collect()
            held.append(len(copies.events))
    assert copies.clock_ms > 0
    assert max(held) <= held[0], f"timing events still held after each step: {held}"
    stats = engine.take_stats()
    assert stats["offloaded_units"] == 12 and stats["reloaded_bytes"] == stats["offloaded_bytes"] > 0
    assert (stats["d2h_seconds"], stats["h2d_seconds"]) == (round(copies.seconds["d2h"], 6),
                                                            round(copies.seconds["h2d"], 6))
