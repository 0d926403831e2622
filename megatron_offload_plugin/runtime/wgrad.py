"""The B/W split: input gradients in B, weight gradients queued for a later W action.

Megatron-core's Column- and RowParallelLinear both run their backward through
``LinearWithGradAccumulationAndAsyncCommunication.backward``, which computes
the input gradient and then the weight-gradient GEMM.  The split backward
(:func:`make_split_backward`) does the first part exactly as upstream does
while a :class:`WeightGradStore` is capturing (inside a B action), and queues
the second part under the action's (chunk, microbatch) key.  A W action
(:meth:`WeightGradStore.run`) then computes the weight gradient and hands it
to autograd's own ``AccumulateGrad`` node of the weight, so ``.grad``,
Megatron DDP's ``main_grad`` accumulation and its grad-ready hook (bucket
reduction with ``overlap_grad_reduce``) happen exactly as they would have.

Outside a capture (1F1B, forward-only, plain Megatron) the upstream backward
runs untouched.

The capture key is plain state of the store, not a thread-local: for CUDA
tensors autograd runs backward on a worker thread of the device, where the
caller's thread-locals are unset (one B runs at a time per process).

Megatron DDP with ``overlap_grad_reduce`` hooks each weight's accumulation node
and asserts a gradient arrived; in B the split backward returns none for the
weight, so the store remembers which weights owe their gradient
(:meth:`WeightGradStore.owes_gradient`) and the DDP hook patch skips exactly
that one call; the W delivers the gradient through the same node, and the hook
runs then.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch


class WeightGradStoreError(RuntimeError):
    """W without its B, B twice, or weight-gradient work left at the end of a step."""


class WeightGradStore:
    """Deferred weight-gradient work, keyed by (chunk, microbatch); popped by W."""

    def __init__(self) -> None:
        self._pending: dict[Hashable, list[Callable[[], None]]] = {}
        self._key: Hashable | None = None
        self._unsplit: set[tuple] = set()
        self._owed: set[tuple] = set()  # weights whose accumulation hook B ran without a gradient

    def keep_unsplit(self, weight: torch.Tensor) -> None:
        """Compute this weight's gradient in B: used twice in one chunk (a tied embedding and
        output layer with no pipeline split), autograd sums both uses before accumulating,
        and splitting would change that summation order."""
        self._unsplit.add(_identity(weight))

    def is_unsplit(self, weight: torch.Tensor) -> bool:
        return _identity(weight) in self._unsplit

    @property
    def capturing_key(self) -> Hashable | None:
        return self._key

    @contextlib.contextmanager
    def capture(self, key: Hashable) -> Iterator[None]:
        """Inside this block (one B action), linear backwards defer their weight gradients."""
        if key in self._pending:
            raise WeightGradStoreError(f"B ran twice for {key}: its weight-gradient work is still queued")
        if self.capturing_key is not None:
            raise WeightGradStoreError(f"B for {key} started inside B for {self.capturing_key}")
        self._pending[key] = []
        self._key = key
        try:
            yield
        finally:
            self._key = None

    def defer(self, work: Callable[[], None]) -> None:
        key = self.capturing_key
        if key is None:  # pragma: no cover - guarded by the caller
            raise WeightGradStoreError("defer() outside a B capture")
        self._pending[key].append(work)

    def owe_gradient(self, weight: torch.Tensor) -> None:
        """B returns no gradient for ``weight``: its accumulation node still runs, and its hooks
        must not take that for the weight's gradient."""
        self._owed.add(_identity(weight))

    def owes_gradient(self, param: torch.Tensor) -> bool:
        """True (once per B) if this hook call is B's empty one for ``param``: autograd runs a
        weight's accumulation node once per backward, however many uses gave it no gradient."""
        key = _identity(param)
        if key not in self._owed or param.grad is not None:
            return False
        self._owed.discard(key)
        return True

    def run(self, key: Hashable) -> int:
        """The W action: run ``key``'s queued work in the order B queued it; returns the count."""
        try:
            work = self._pending.pop(key)
        except KeyError:
            raise WeightGradStoreError(
                f"W for {key} has no queued weight-gradient work: its B never ran (or W ran twice)"
            ) from None
        for item in work:
            item()
        return len(work)

    def pending_keys(self) -> list[Hashable]:
        return list(self._pending)

    def assert_drained(self) -> None:
        self._owed.clear()  # hooks that never ran (no DDP, or no hook on that weight)
        if self._pending:
            raise WeightGradStoreError(
                f"weight-gradient work left at the end of the step for {sorted(map(str, self._pending))}"
            )


def _identity(weight: torch.Tensor) -> tuple:
    """Which parameter a tensor is, by its memory: a backward's saved weight can come back as
    another tensor object over the parameter's storage (saved-tensor hooks unpack an alias)."""
    return (weight.untyped_storage().data_ptr(), weight.storage_offset(), tuple(weight.shape), weight.dtype)


def _accumulate_like_autograd(weight: torch.Tensor, grad_weight: torch.Tensor) -> None:
    """Deliver ``grad_weight`` through the weight's own AccumulateGrad node.

    ``weight.expand_as(weight)`` has that node as its only input, so a backward
    through it runs ``.grad`` accumulation and every hook registered on the node
    (Megatron DDP adds ``grad`` into ``main_grad`` and marks the bucket ready).
    """
    torch.autograd.backward(weight.expand_as(weight), grad_tensors=grad_weight)


def make_split_backward(original: Callable[..., Any], store: WeightGradStore) -> Callable[..., Any]:
    """A drop-in for ``LinearWithGradAccumulationAndAsyncCommunication.backward``."""
    from megatron.core.utils import prepare_input_tensors_for_wgrad_compute

    try:
        from megatron.core.tensor_parallel.layers import dist_all_gather_func, dist_reduce_scatter_func
    except ImportError:  # pragma: no cover - older layouts
        from megatron.core.utils import dist_all_gather_func, dist_reduce_scatter_func
    from megatron.core.parallel_state import get_global_memory_buffer

    from ..telemetry.activation_memory import active_saved_tensor_hooks

    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        if store.capturing_key is None or ctx.grad_output_buffer is not None:
            # Not inside a B action, or the embedding-wgrad deferral path: upstream as is.
            return original(ctx, grad_output)
        input_, weight = ctx.saved_tensors
        if store.is_unsplit(weight):
            return original(ctx, grad_output)
        main_grad = ctx.main_grad
        tp_group = ctx.tp_group
        if ctx.gradient_accumulation_fusion:
            weight.main_grad = main_grad

        grad_input = grad_output.matmul(weight)
        handle = None
        if ctx.allreduce_dgrad:
            handle = torch.distributed.all_reduce(grad_input, group=tp_group, async_op=True)
        if ctx.sequence_parallel:
            sub_grad_input = torch.empty(
                list(input_.size()), dtype=input_.dtype, device=input_.device, requires_grad=False
            )
            handle = dist_reduce_scatter_func(sub_grad_input, grad_input, group=tp_group, async_op=True)
        # Upstream sums the bias gradient over the flattened (contiguous, 2-D) grad_output;
        # the same shape gives the same summation order, hence the same bits.
        flat = grad_output.contiguous()
        if flat.dim() == 3:
            flat = flat.view(flat.shape[0] * flat.shape[1], flat.shape[2])
        grad_bias = flat.sum(dim=0) if ctx.use_bias else None

        sequence_parallel = ctx.sequence_parallel
        fusion = ctx.gradient_accumulation_fusion
        # What W still needs (the layer input and the output gradient) goes through the
        # saved-tensor hooks active at B, like any tensor kept for backward: trackers count
        # it until W, and an offloader may move it off the device in between.
        hooks = active_saved_tensor_hooks()
        held = (input_, grad_output) if hooks is None else (hooks[0](input_), hooks[0](grad_output))

        def weight_grad() -> None:
            input_, grad_output = held if hooks is None else (hooks[1](held[0]), hooks[1](held[1]))
            total_input = input_
            if sequence_parallel:
                dim_size = list(input_.size())
                dim_size[0] = dim_size[0] * tp_group.size()
                total_input = get_global_memory_buffer().get_tensor(dim_size, input_.dtype, "mpu")
                dist_all_gather_func(total_input, input_, group=tp_group)
            go, ti = prepare_input_tensors_for_wgrad_compute(grad_output, total_input)
            if fusion:
                import fused_weight_gradient_mlp_cuda  # only reachable where upstream uses it

                if weight.main_grad.dtype == torch.float32:
                    fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(ti, go, weight.main_grad)
                else:
                    fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp16(ti, go, weight.main_grad)
                if hasattr(weight, "grad_added_to_main_grad"):
                    weight.grad_added_to_main_grad = True
                    _accumulate_like_autograd(weight, torch.zeros_like(weight))
                return
            _accumulate_like_autograd(weight, go.t().matmul(ti))

        store.defer(weight_grad)
        store.owe_gradient(weight)

        if handle is not None:
            handle.wait()
        none_tail = (None,) * 6
        if sequence_parallel:
            return (sub_grad_input, None, grad_bias, *none_tail)
        return (grad_input, None, grad_bias, *none_tail)

    backward.__wrapped__ = original  # type: ignore[attr-defined]
    return backward
