"""The CPU backend: scoped, reversible, and faithful enough that Megatron's schedules agree with each other."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from megatron_offload_plugin.backends import cpu as cpu_backend
from megatron_offload_plugin.testing.distributed import run_distributed
from megatron_offload_plugin.testing.equivalence import layout_gradients_worker

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU backend refuses to hide a GPU")


def test_backend_is_off_unless_enabled():
    assert not cpu_backend.is_enabled()
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


def test_enable_then_disable_restores_every_replaced_attribute():
    from megatron.core.tensor_parallel import random as mc_random

    before = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.get_rng_state,
              mc_random._get_cuda_rng_state, mc_random._set_cuda_rng_state)
    with cpu_backend.cpu_backend():
        assert torch.cuda.current_device is not before[0]
    after = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.get_rng_state,
             mc_random._get_cuda_rng_state, mc_random._set_cuda_rng_state)
    assert all(a is b for a, b in zip(before, after))
    assert not cpu_backend.is_enabled()


def test_cuda_device_arguments_land_on_cpu_while_enabled():
    with cpu_backend.cpu_backend():
        a = torch.zeros(3, device="cuda")
        b = torch.ones(2, device=torch.cuda.current_device())
        c = torch.arange(4).cuda()
        assert {a.device.type, b.device.type, c.device.type} == {"cpu"}
        assert a.float().type() == "torch.cuda.FloatTensor"


def test_enable_is_idempotent_and_nested_scope_keeps_outer_enabled():
    with cpu_backend.cpu_backend():
        cpu_backend.enable()
        with cpu_backend.cpu_backend():
            pass
        assert cpu_backend.is_enabled()
    assert not cpu_backend.is_enabled()


def test_refuses_on_a_process_that_sees_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="sees a GPU"):
        cpu_backend.enable()
    assert not cpu_backend.is_enabled()



class _RecordingMode(TorchFunctionMode):
    """A pass-through mode that records the torch functions it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[object] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


def _function_mode_stack() -> list[TorchFunctionMode]:
    return [torch._C._get_function_stack_at(i) for i in range(torch._C._len_torch_function_stack())]


def test_disable_turns_the_backend_fully_off_under_a_mode_pushed_after_it():
    """disable() removes exactly the backend's mode, not whatever mode is on top of the stack."""
    baseline = _function_mode_stack()
    cpu_backend.enable()
    ours = [m for m in _function_mode_stack() if m not in baseline]
    other = _RecordingMode()
    other.__enter__()
    try:
        cpu_backend.disable()
        assert not cpu_backend.is_enabled()
        assert _function_mode_stack() == baseline + [other], "the stack must keep the other mode only"
        assert not any(m in _function_mode_stack() for m in ours)
        with pytest.raises((AssertionError, RuntimeError)):
            torch.zeros(1, device=torch.device("cuda"))  # no longer rewritten to the CPU
        other.seen.clear()
        torch.ones(2).add(1)
        assert torch.Tensor.add in other.seen, "the other mode must still be active"
    finally:
        other.__exit__(None, None, None)
        cpu_backend.disable()  # a no-op unless an assertion above failed
    assert _function_mode_stack() == baseline, "the other mode's own exit must leave the stack as it was"


def test_disable_from_another_thread_is_refused_and_leaves_the_backend_whole():
    """torch keeps function modes per thread: only the enabling thread can take the mode off."""
    import threading

    errors: list[BaseException] = []

    def off() -> None:
        try:
            cpu_backend.disable()
        except RuntimeError as exc:
            errors.append(exc)

    with cpu_backend.cpu_backend():
        t = threading.Thread(target=off)
        t.start()
        t.join()
        assert len(errors) == 1 and "Call disable() from the thread that called enable()" in str(errors[0])
        assert cpu_backend.is_enabled()
        assert torch.zeros(1, device="cuda").device.type == "cpu"
    assert not cpu_backend.is_enabled()

def test_megatron_rng_tracker_forks_a_reproducible_stream():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    with cpu_backend.cpu_backend():
        def draw() -> tuple[torch.Tensor, torch.Tensor]:
            model_parallel_cuda_manual_seed(7, tp_rank=0, ep_rank=0, etp_rank=0)
            with get_cuda_rng_tracker().fork():
                forked = torch.rand(4)
            return forked, torch.rand(4)

        f1, d1 = draw()
        f2, d2 = draw()
    assert torch.equal(f1, f2) and torch.equal(d1, d2)
    assert not torch.equal(f1, d1)  # the tracker's stream is not the default stream


def test_recompute_in_backward_still_sees_cuda_as_cpu():
    from megatron.core.tensor_parallel.random import CheckpointFunction, model_parallel_cuda_manual_seed

    def region(x: torch.Tensor) -> torch.Tensor:
        return (x * torch.ones(x.shape, device="cuda")).tanh()

    with cpu_backend.cpu_backend():
        model_parallel_cuda_manual_seed(1, tp_rank=0, ep_rank=0, etp_rank=0)
        x = torch.randn(3, requires_grad=True)
        CheckpointFunction.apply(region, False, x).sum().backward()
    assert torch.allclose(x.grad, 1 - torch.tanh(x.detach()) ** 2)


def _by_name(results: list[dict]) -> dict[str, torch.Tensor]:
    grads: dict[str, torch.Tensor] = {}
    for r in results:
        if r["dp_rank"] == 0:
            grads.update(r["grads"])
    return grads


def test_megatron_schedules_on_cpu_agree_with_no_pipelining(tiny_gpt):
    """Megatron's own 1F1B (PP=2) and interleaved (PP=2 x VPP=2) schedules on the backend
    give the gradients of the unpipelined model: the backend moves no data wrongly."""
    recipe = dict(tiny_gpt, hidden_dropout=0.0, attention_dropout=0.0, global_batch_size=8,
                  untie_embeddings_and_output_weights=True)
    reference = _by_name(run_distributed(layout_gradients_worker, 1, recipe, timeout_s=240))
    for layout in (dict(pipeline_model_parallel_size=2),
                   dict(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1)):
        got = _by_name(run_distributed(layout_gradients_worker, 2, dict(recipe, **layout), timeout_s=240))
        assert got.keys() == reference.keys()
        for name, ref in reference.items():
            rel = (got[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)
            assert rel < 1e-5, f"{layout}: {name} differs from PP=1 by {rel:.2e} (relative)"
