"""The activation-memory tracker against hand-computed models; every byte count is derived from shapes.

What torch (2.13, CPU) saves for the ops used here, checked by
``test_torch_saves_what_the_hand_counts_assume``:

* ``Linear(bias=False)`` on a 2-D input is ``mm(x, W.t())``: it saves its input ``x`` (only
  if the weight needs a gradient) and the transposed *view* ``W.t()`` of the weight (only if
  the input needs a gradient).  The view is not a ``Parameter``; it shares the weight's storage.
* ``relu``, ``exp``: save their *output* (the backward is written in terms of the result).
* ``sin``: saves its input.  ``sum``: saves nothing (only the input's shape).
"""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from megatron_offload_plugin.telemetry import (
    ActivationTracker,
    CudaAllocatorTracker,
    NullTracker,
    SavedTensorTracker,
    make_activation_tracker,
)

B, D, H, O = 4, 8, 16, 3


def _mlp(device: str = "cpu") -> tuple[torch.nn.Linear, torch.nn.Linear]:
    torch.manual_seed(0)
    return (
        torch.nn.Linear(D, H, bias=False, device=device),
        torch.nn.Linear(H, O, bias=False, device=device),
    )


def _params(*mods: torch.nn.Module) -> list[torch.Tensor]:
    return [p for m in mods for p in m.parameters()]


def _forward(l1: torch.nn.Linear, l2: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return l2(torch.relu(l1(x))).sum()


def _nbytes(*shape: int, dtype: torch.dtype = torch.float32) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


# linear1 saves x[B, D]; relu saves its output h[B, H], which linear2 saves again as its input
# (one storage, counted once); the weights' transposed views are parameters, excluded.
MLP_ACTIVATIONS = _nbytes(B, D) + _nbytes(B, H)
MLP_WEIGHTS = _nbytes(H, D) + _nbytes(O, H)


def test_torch_saves_what_the_hand_counts_assume():
    l1, l2 = _mlp()
    x = torch.randn(B, D, requires_grad=True)
    saved: list[tuple[tuple[int, ...], int]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((tuple(t.shape), t.untyped_storage().data_ptr()))
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = torch.relu(l1(x))
        l2(h).sum()
    ptr = {n: t.untyped_storage().data_ptr() for n, t in [("x", x), ("w1", l1.weight), ("w2", l2.weight), ("h", h)]}
    assert sorted(saved) == sorted(
        [((D, H), ptr["w1"]), ((B, D), ptr["x"]), ((B, H), ptr["h"]), ((H, O), ptr["w2"]), ((B, H), ptr["h"])]
    )


def test_mlp_counts_linear1_input_and_relu_output_once_excluding_weights():
    l1, l2 = _mlp()
    tracker = SavedTensorTracker(exclude=_params(l1, l2))
    x = torch.randn(B, D, requires_grad=True)
    with tracker.track():
        y = _forward(l1, l2, x)
    assert tracker.current_bytes == MLP_ACTIVATIONS
    assert tracker.peak_bytes == MLP_ACTIVATIONS
    assert tracker.live_storages == 2
    y.backward()
    assert tracker.current_bytes == 0 and tracker.live_storages == 0
    assert tracker.peak_bytes == MLP_ACTIVATIONS


def test_a_saved_view_counts_its_whole_storage_once():
    tracker = SavedTensorTracker()
    x = torch.randn(B, D, requires_grad=True)
    k = 3
    with tracker.track():
        a = torch.sin(x[:, :k])  # saves the view x[:, :k]: all of x's storage stays alive
        b = torch.sin(x[:, k:])  # another view of the same storage
    assert tracker.current_bytes == _nbytes(B, D) and tracker.live_storages == 1
    del a, b
    assert tracker.current_bytes == 0


def test_parameters_count_when_not_excluded():
    l1, l2 = _mlp()
    tracker = SavedTensorTracker()
    x = torch.randn(B, D, requires_grad=True)
    with tracker.track():
        y = _forward(l1, l2, x)
    # each linear also saves W.t(), a view that keeps the whole weight storage
    assert tracker.current_bytes == MLP_ACTIVATIONS + MLP_WEIGHTS
    assert tracker.live_storages == 4
    y.backward()
    assert tracker.current_bytes == 0


def test_exclusion_reads_parameter_storage_when_track_is_entered():
    l1, l2 = _mlp()
    tracker = SavedTensorTracker(exclude=_params(l1, l2))
    with torch.no_grad():
        l1.weight.data = l1.weight.data.clone()  # a new storage, as Megatron's parameter buffer does
    with tracker.track():
        y = _forward(l1, l2, torch.randn(B, D, requires_grad=True))
    assert tracker.current_bytes == MLP_ACTIVATIONS
    y.backward()


def test_two_microbatches_alive_hold_twice_one_and_backward_frees_one():
    l1, l2 = _mlp()
    tracker = SavedTensorTracker(exclude=_params(l1, l2))
    with tracker.track():
        y1 = _forward(l1, l2, torch.randn(B, D, requires_grad=True))
        y2 = _forward(l1, l2, torch.randn(B, D, requires_grad=True))
    assert tracker.current_bytes == 2 * MLP_ACTIVATIONS
    y1.backward()
    assert tracker.current_bytes == MLP_ACTIVATIONS
    assert tracker.peak_bytes == 2 * MLP_ACTIVATIONS
    tracker.reset_peak()
    assert tracker.peak_bytes == MLP_ACTIVATIONS
    y2.backward()
    assert tracker.current_bytes == 0 and tracker.peak_bytes == MLP_ACTIVATIONS


def test_dropping_outputs_without_backward_frees_the_bytes():
    l1, l2 = _mlp()
    tracker = SavedTensorTracker(exclude=_params(l1, l2))
    with tracker.track():
        y = _forward(l1, l2, torch.randn(B, D, requires_grad=True))
    assert tracker.current_bytes == MLP_ACTIVATIONS
    del y
    gc.collect()
    assert tracker.current_bytes == 0 and tracker.live_storages == 0
    assert tracker.peak_bytes == MLP_ACTIVATIONS


def test_an_op_saving_its_own_output_forms_no_reference_cycle():
    # exp saves its result: holding that tensor itself would make output -> grad_fn -> handle
    # -> output, which only a gc (and not even that, through C++) could break.
    tracker = SavedTensorTracker()
    x = torch.randn(B, D, requires_grad=True)
    with tracker.track():
        out = torch.exp(x)
    assert tracker.current_bytes == _nbytes(B, D)
    gc.disable()
    try:
        del out
        assert tracker.current_bytes == 0  # freed by reference counting alone
    finally:
        gc.enable()


def test_zero_size_tensors_count_nothing():
    tracker = SavedTensorTracker()
    with tracker.track():
        out = torch.relu(torch.empty(0, D, requires_grad=True) * 1.0)
    assert tracker.current_bytes == 0 and tracker.live_storages == 0
    del out


def test_tracking_leaves_gradients_bitwise_unchanged():
    def grads(track: bool) -> list[torch.Tensor]:
        l1, l2 = _mlp()
        x = torch.randn(B, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
        tracker = SavedTensorTracker(exclude=_params(l1, l2))
        with tracker.track() if track else torch.enable_grad():
            y = torch.exp(_forward(l1, l2, x) / 100.0)
        y.backward()
        return [x.grad, l1.weight.grad, l2.weight.grad]

    for tracked, plain in zip(grads(True), grads(False), strict=True):
        assert torch.equal(tracked, plain)


def test_a_saved_tensor_without_grad_is_unpacked_as_the_same_object():
    seen: list[bool] = []

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            ctx.save_for_backward(c)
            ctx.c = c
            return a * c

        @staticmethod
        def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
            (c,) = ctx.saved_tensors
            seen.append(c is ctx.c)
            return g * c, None

    tracker = SavedTensorTracker()
    with tracker.track():
        y = Scale.apply(torch.randn(3, requires_grad=True), torch.randn(3))
    assert tracker.current_bytes == _nbytes(3)
    y.sum().backward()
    assert seen == [True]


def test_tracker_inside_other_hooks_counts_first_then_chains_to_them():
    l1, l2 = _mlp()
    tracker = SavedTensorTracker(exclude=_params(l1, l2))
    counted_before_outer: list[int] = []  # the tracker's count each time the outer pack hook runs
    unpacked: list[torch.Tensor] = []

    def outer_pack(t: torch.Tensor) -> tuple[str, torch.Tensor]:
        counted_before_outer.append(tracker.current_bytes)
        return ("outer", t.detach())

    def outer_unpack(p: tuple[str, torch.Tensor]) -> torch.Tensor:
        assert p[0] == "outer"  # the outer owner gets back exactly what it packed
        unpacked.append(p[1])
        return p[1]

    x = torch.randn(B, D, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(outer_pack, outer_unpack):
        with tracker.track():
            s = torch.sin(x)  # one saved tensor, x
            assert counted_before_outer == [_nbytes(B, D)]  # innermost first: counted before outer saw it
            del s
            y = _forward(l1, l2, x)
    assert len(counted_before_outer) == 1 + 5  # the outer hook saw every saved tensor too
    assert tracker.current_bytes == MLP_ACTIVATIONS
    y.backward()
    assert len(unpacked) == 5 and tracker.current_bytes == 0

    l1_ref, l2_ref = _mlp()
    x_ref = x.detach().requires_grad_()
    _forward(l1_ref, l2_ref, x_ref).backward()
    assert torch.equal(x.grad, x_ref.grad) and torch.equal(l1.weight.grad, l1_ref.weight.grad)


def test_hooks_entered_inside_track_shadow_the_tracker():
    # torch applies only the innermost pair; a non-chaining owner inside track() hides its tensors.
    l1, l2 = _mlp()
    tracker = SavedTensorTracker(exclude=_params(l1, l2))
    with tracker.track():
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach(), lambda t: t):
            y = _forward(l1, l2, torch.randn(B, D, requires_grad=True))
    assert tracker.current_bytes == 0
    y.backward()


def test_reentering_the_same_tracker_counts_once():
    l1, l2 = _mlp()
    tracker = SavedTensorTracker(exclude=_params(l1, l2))
    with tracker.track():
        with tracker.track():
            y = _forward(l1, l2, torch.randn(B, D, requires_grad=True))
        assert tracker.current_bytes == MLP_ACTIVATIONS and tracker.live_storages == 2
    y.backward()
    assert tracker.current_bytes == 0


def test_a_reused_address_is_a_new_storage_not_a_duplicate():
    # The outer hook keeps only the shape, so a saved storage can die while its handle lives
    # and a new storage can get its address. frombuffer over one buffer makes that certain:
    # each call is a new storage at the same data pointer.
    tracker = SavedTensorTracker()
    n, steps = 16, 3
    buffer = bytearray(_nbytes(n))
    w = torch.randn(n, requires_grad=True)
    ptrs: list[int] = []

    def outer_pack(t: torch.Tensor) -> torch.Size:
        ptrs.append(t.untyped_storage().data_ptr())
        return t.shape

    outs = []
    with torch.autograd.graph.saved_tensors_hooks(outer_pack, torch.zeros):
        with tracker.track():
            for _ in range(steps):
                t = torch.frombuffer(buffer, dtype=torch.float32)
                outs.append(t * w)  # saves t only (w needs the gradient, t does not)
                del t  # its storage dies now: only the shape was kept
    assert len(set(ptrs)) == 1  # three storages, one address
    assert tracker.current_bytes == steps * _nbytes(n) and tracker.live_storages == steps
    outs.clear()
    assert tracker.current_bytes == 0 and tracker.live_storages == 0


def test_backward_on_another_thread_releases_the_bytes():
    l1, l2 = _mlp()
    tracker = SavedTensorTracker(exclude=_params(l1, l2))
    with tracker.track():
        y = _forward(l1, l2, torch.randn(B, D, requires_grad=True))
    worker = threading.Thread(target=y.backward)
    worker.start()
    worker.join()
    del y
    assert tracker.current_bytes == 0 and tracker.peak_bytes == MLP_ACTIVATIONS


def test_concurrent_threads_share_one_consistent_count():
    l1, l2 = _mlp()
    tracker = SavedTensorTracker(exclude=_params(l1, l2))
    threads_n, steps = 4, 25
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(steps):
                with tracker.track():  # hooks are per thread, like torch's
                    y = _forward(l1, l2, torch.randn(B, D, requires_grad=True))
                y.backward()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    workers = [threading.Thread(target=work) for _ in range(threads_n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    assert tracker.current_bytes == 0 and tracker.live_storages == 0
    assert MLP_ACTIVATIONS <= tracker.peak_bytes <= threads_n * MLP_ACTIVATIONS


def test_factory_auto_picks_saved_tensors_without_gpu_and_off_measures_nothing():
    if torch.cuda.is_available():
        pytest.skip("machine has a GPU")
    assert isinstance(make_activation_tracker("auto"), SavedTensorTracker)
    off = make_activation_tracker("off")
    assert isinstance(off, NullTracker)
    with off.track():
        torch.exp(torch.randn(3, requires_grad=True))
    off.reset_peak()
    assert off.peak_bytes == 0 and off.current_bytes == 0
    for mode in ("auto", "saved-tensors", "off"):
        assert isinstance(make_activation_tracker(mode), ActivationTracker)


def test_factory_cuda_without_gpu_names_the_option_and_what_is_accepted():
    if torch.cuda.is_available():
        pytest.skip("machine has a GPU")
    with pytest.raises(ValueError) as err:
        make_activation_tracker("cuda")
    assert str(err.value).startswith("telemetry.activation_memory='cuda': no CUDA device")
    assert "accepted on this machine: 'auto', 'saved-tensors', 'off'" in str(err.value)


def test_factory_rejects_unknown_modes_listing_the_accepted_ones():
    with pytest.raises(ValueError) as err:
        make_activation_tracker("cpu")  # type: ignore[arg-type]
    assert str(err.value) == (
        "telemetry.activation_memory='cpu': not accepted; accepted: 'auto', 'saved-tensors', 'cuda', 'off'"
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_tracker_peak_is_allocator_peak_above_the_reset_baseline():
    tracker = make_activation_tracker("auto")
    assert isinstance(tracker, CudaAllocatorTracker)
    keep = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")  # before the window: baseline
    tracker.reset_peak()
    assert tracker.current_bytes == 0 and tracker.peak_bytes == 0
    n = 1 << 21  # a multiple of the allocator's 512-byte rounding: allocated bytes are exact
    with tracker.track():
        a = torch.empty(n, dtype=torch.uint8, device="cuda")
    assert tracker.current_bytes == n and tracker.peak_bytes == n
    del a
    assert tracker.current_bytes == 0 and tracker.peak_bytes == n
    tracker.reset_peak()
    assert tracker.peak_bytes == 0
    del keep


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_saved_tensor_tracker_counts_cuda_tensors_released_by_the_device_backward_thread():
    l1, l2 = _mlp("cuda")
    tracker = SavedTensorTracker(exclude=_params(l1, l2))
    with tracker.track():
        y1 = _forward(l1, l2, torch.randn(B, D, device="cuda", requires_grad=True))
        y2 = _forward(l1, l2, torch.randn(B, D, device="cuda", requires_grad=True))
    assert tracker.current_bytes == 2 * MLP_ACTIVATIONS
    y1.backward()  # CUDA backward runs on the autograd engine's device thread
    torch.cuda.synchronize()
    assert tracker.current_bytes == MLP_ACTIVATIONS
    y2.backward()
    assert tracker.current_bytes == 0 and tracker.peak_bytes == 2 * MLP_ACTIVATIONS
