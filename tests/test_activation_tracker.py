"""The activation-memory tracker against hand-computed models (bytes derived from shapes)."""

from __future__ import annotations

import gc

import pytest
import torch

from megatron_offload_plugin.telemetry import NullTracker, SavedTensorTracker, make_activation_tracker

B, D, H, O = 4, 8, 16, 3
F32 = 4


def _mlp() -> tuple[torch.nn.Linear, torch.nn.Linear]:
    torch.manual_seed(0)
    return torch.nn.Linear(D, H, bias=False), torch.nn.Linear(H, O, bias=False)


def _params(*mods: torch.nn.Module) -> list[torch.Tensor]:
    return [p for m in mods for p in m.parameters()]


def test_linear_relu_linear_counts_inputs_once_and_excludes_weights():
    l1, l2 = _mlp()
    tracker = SavedTensorTracker(exclude=_params(l1, l2))
    x = torch.randn(B, D, requires_grad=True)
    with tracker.track():
        y = l2(torch.relu(l1(x))).sum()
    # linear1 saves its input x; relu saves its output, which linear2 also saves as its
    # input (one storage, counted once); the weights are parameters, excluded.
    expected = B * D * F32 + B * H * F32
    assert tracker.current_bytes == expected and tracker.peak_bytes == expected
    y.backward()
    assert tracker.current_bytes == 0 and tracker.peak_bytes == expected


def test_a_saved_view_counts_its_whole_storage_once():
    tracker = SavedTensorTracker()
    base = torch.randn(B, D, requires_grad=True) * 1.0  # non-leaf, owns its storage
    w = torch.randn(3, 2, requires_grad=True)  # mm saves the input only if w needs a gradient
    with tracker.track():
        out = base[:, :3] @ w  # mm saves the view (and w)
        out2 = base[:, 3:6] @ w
    assert tracker.current_bytes == B * D * F32 + w.numel() * F32
    del out, out2


def test_parameters_count_when_not_excluded():
    l1, l2 = _mlp()
    tracker = SavedTensorTracker()
    x = torch.randn(B, D, requires_grad=True)
    with tracker.track():
        y = l2(torch.relu(l1(x))).sum()
    weights = (D * H + H * O) * F32  # each linear saves its weight (transposed view)
    assert tracker.current_bytes == B * D * F32 + B * H * F32 + weights


def test_two_microbatches_alive_hold_twice_one_and_backward_frees_one():
    l1, l2 = _mlp()
    tracker = SavedTensorTracker(exclude=_params(l1, l2))
    one = B * D * F32 + B * H * F32
    with tracker.track():
        y1 = l2(torch.relu(l1(torch.randn(B, D, requires_grad=True)))).sum()
        y2 = l2(torch.relu(l1(torch.randn(B, D, requires_grad=True)))).sum()
    assert tracker.current_bytes == 2 * one
    y1.backward()
    assert tracker.current_bytes == one
    assert tracker.peak_bytes == 2 * one
    tracker.reset_peak()
    assert tracker.peak_bytes == one
    y2.backward()


def test_dropping_outputs_without_backward_frees_the_bytes():
    l1, l2 = _mlp()
    tracker = SavedTensorTracker(exclude=_params(l1, l2))
    with tracker.track():
        y = l2(torch.relu(l1(torch.randn(B, D, requires_grad=True)))).sum()
    assert tracker.current_bytes > 0
    del y
    gc.collect()
    assert tracker.current_bytes == 0 and tracker.live_storages == 0


def test_tracking_leaves_gradients_bitwise_unchanged():
    def grads(track: bool) -> list[torch.Tensor]:
        l1, l2 = _mlp()
        x = torch.randn(B, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
        tracker = SavedTensorTracker(exclude=_params(l1, l2))
        ctx = tracker.track() if track else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
        with ctx:
            l2(torch.relu(l1(x))).sum().backward()
        return [x.grad, l1.weight.grad, l2.weight.grad]

    for a, b in zip(grads(True), grads(False)):
        assert torch.equal(a, b)


def test_nested_inside_other_saved_tensor_hooks_both_see_the_tensors():
    l1, l2 = _mlp()
    seen: list[int] = []

    def outer_pack(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.numel())
        return t

    tracker = SavedTensorTracker(exclude=_params(l1, l2))
    x = torch.randn(B, D, requires_grad=True)
    with tracker.track():
        with torch.autograd.graph.saved_tensors_hooks(outer_pack, lambda t: t):
            inner = l2(torch.relu(l1(x))).sum()
    # The innermost hooks (outer_pack here) run; the tracker's are shadowed inside.
    assert seen and tracker.current_bytes == 0
    with torch.autograd.graph.saved_tensors_hooks(outer_pack, lambda t: t):
        with tracker.track():
            outer = l2(torch.relu(l1(x))).sum()
    assert tracker.current_bytes == B * D * F32 + B * H * F32
    inner.backward()
    outer.backward()


def test_factory_picks_saved_tensors_on_cpu_and_rejects_cuda_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("machine has a GPU")
    assert isinstance(make_activation_tracker("auto"), SavedTensorTracker)
    assert isinstance(make_activation_tracker("off"), NullTracker)
    with pytest.raises(ValueError, match="telemetry.activation_memory='cuda'"):
        make_activation_tracker("cuda")
    with pytest.raises(ValueError, match="accepted: 'auto', 'saved-tensors', 'cuda', 'off'"):
        make_activation_tracker("bogus")  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_tracker_measures_allocator_peak_above_baseline():
    tracker = make_activation_tracker("cuda")
    tracker.reset_peak()
    x = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    assert tracker.peak_bytes >= x.numel()
