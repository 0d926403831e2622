"""Run real Megatron-core on a machine without a GPU.

Megatron-core assumes CUDA in a few dozen places: ``torch.cuda.current_device()``
for buffers, literal ``device="cuda"`` in the schedules and the grad-norm code,
``.cuda()`` on tensors, the CUDA RNG tracker, ``torch.cuda.synchronize``, and
``param.grad.type() == 'torch.cuda.FloatTensor'`` in gradient clipping.  The
backend makes the CPU stand in for "the CUDA device" so that Megatron's own
code paths run unchanged (its 1F1B and interleaved schedules, p2p over gloo,
``tensor_parallel.checkpoint`` with its RNG tracker, DDP, the optimizer and
gradient clipping):

* a ``TorchFunctionMode`` maps every ``device=`` argument that names CUDA to
  the CPU, makes ``Tensor.cuda()`` a move to the CPU, and reports CPU tensor
  types under their CUDA names (``torch.cuda.FloatTensor``);
* ``torch.cuda`` functions that need a driver become their CPU equivalents
  (the CUDA RNG state *is* the CPU generator state; synchronize is a no-op);
* Megatron's private CUDA RNG helpers read/write the CPU generator.

It is never active unless asked: :func:`enable` refuses on a process that
sees a GPU (unless ``force=True``), and :func:`disable` restores every
attribute it replaced and takes its mode off the stack even when other modes
were pushed after it.  Use :func:`cpu_backend` to scope it to a ``with`` block.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")
_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    # A bare int means "CUDA device N" to torch factory functions.
    return isinstance(device, int) and not isinstance(device, bool)


def _backward_under_mode(
    mode: "TorchFunctionMode",
    tensors: Any,
    grad_tensors: Any = None,
    retain_graph: bool | None = None,
    create_graph: bool = False,
    grad_variables: Any = None,
    inputs: Any = None,
) -> None:
    """``torch.autograd.backward`` with the mode kept on the stack.

    A mode is popped while its own handler runs, and the autograd engine captures
    the mode stack when backward starts; recompute and custom Functions in backward
    must still see CUDA as the CPU.  Calling ``torch.autograd.backward`` again from
    the handler would dispatch back here, so this runs the engine directly (the same
    three steps ``torch.autograd.backward`` takes after its dispatch check).
    """
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    if grad_variables is not None:
        grad_tensors = grad_variables
    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    if inputs is None:
        inputs_tuple: tuple = ()
    elif isinstance(inputs, torch.Tensor):
        inputs_tuple = (inputs,)
    else:
        inputs_tuple = tuple(inputs)
    grads = _make_grads(
        tensors, _tensor_or_tensors_to_tuple(grad_tensors, len(tensors)), is_grads_batched=False
    )
    if retain_graph is None:
        retain_graph = create_graph
    with mode:
        _engine_run_backward(
            tensors, grads, retain_graph, create_graph, inputs_tuple,
            allow_unreachable=True, accumulate_grad=True,
        )


def _tensor_backward_under_mode(
    mode: "TorchFunctionMode",
    tensor: torch.Tensor,
    gradient: Any = None,
    retain_graph: bool | None = None,
    create_graph: bool = False,
    inputs: Any = None,
) -> None:
    _backward_under_mode(mode, tensor, gradient, retain_graph, create_graph, inputs=inputs)


class _CudaAsCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU for every torch call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.autograd.backward:
            return _backward_under_mode(self, *args, **kwargs)
        if func is torch.Tensor.backward:
            return _tensor_backward_under_mode(self, *args, **kwargs)
        if func is torch.Tensor.cuda:
            # Tensor.cuda(device=None, non_blocking=False, memory_format=...)
            return args[0].to(_CPU)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _TYPE_NAMES.get(name, name)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        if func is torch.Tensor.to and args:
            args = tuple(_CPU if _is_cuda_device(a) and i > 0 else a for i, a in enumerate(args))
        if kwargs.get("pin_memory"):
            # Pinned memory needs a CUDA driver; plain host memory is the CPU's equivalent.
            kwargs = dict(kwargs, pin_memory=False)
        return func(*args, **kwargs)


def _noop(name: str) -> Callable[..., None]:
    # One function object per replaced name: torch._dynamo keys its rules by object.
    def noop(*_args: Any, **_kwargs: Any) -> None:
        return None

    noop.__name__ = noop.__qualname__ = f"cpu_backend_{name}"
    return noop


class _NullStream:
    """Stands in for a CUDA stream/event: work on the CPU is already ordered."""

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    def wait_stream(self, _other: Any) -> None:
        pass

    def wait_event(self, _event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event if event is not None else _NullStream()

    def record(self, _stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def wait(self, _stream: Any = None) -> None:
        pass

    def elapsed_time(self, _other: Any) -> float:
        return 0.0


@contextlib.contextmanager
def _null_stream_ctx(_stream: Any = None) -> Iterator[None]:
    yield


def _cpu_rng_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
    return torch.default_generator.get_state()


def _set_cpu_rng_state(state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
    torch.default_generator.set_state(state)


def _cpu_manual_seed(seed: int) -> None:
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, i.e. back into us.
    torch.default_generator.manual_seed(int(seed))


@dataclass
class _Replacement:
    owner: Any
    name: str
    value: Any
    original: Any = field(default=None)
    had_attr: bool = field(default=False)


def _replacements() -> list[_Replacement]:
    from megatron.core.tensor_parallel import random as mc_random

    cuda = torch.cuda
    reps = [
        _Replacement(cuda, "current_device", lambda: 0),
        _Replacement(cuda, "synchronize", _noop("synchronize")),
        _Replacement(cuda, "empty_cache", _noop("empty_cache")),
        _Replacement(cuda, "set_device", _noop("set_device")),
        _Replacement(cuda, "device_count", lambda: 1),
        _Replacement(cuda, "manual_seed", _cpu_manual_seed),
        _Replacement(cuda, "get_rng_state", _cpu_rng_state),
        _Replacement(cuda, "set_rng_state", _set_cpu_rng_state),
        _Replacement(cuda, "Stream", _NullStream),
        _Replacement(cuda, "Event", _NullStream),
        _Replacement(cuda, "current_stream", lambda *a, **k: _NullStream()),
        _Replacement(cuda, "default_stream", lambda *a, **k: _NullStream()),
        _Replacement(cuda, "stream", _null_stream_ctx),
        _Replacement(cuda, "memory_allocated", lambda *a, **k: 0),
        _Replacement(cuda, "max_memory_allocated", lambda *a, **k: 0),
        _Replacement(cuda, "reset_peak_memory_stats", _noop("reset_peak_memory_stats")),
        _Replacement(cuda.random, "get_rng_state", _cpu_rng_state),
        _Replacement(cuda.random, "set_rng_state", _set_cpu_rng_state),
        _Replacement(mc_random, "_get_cuda_rng_state", _cpu_rng_state),
        _Replacement(mc_random, "_set_cuda_rng_state", _set_cpu_rng_state),
    ]
    nvtx = getattr(cuda, "nvtx", None)
    if nvtx is not None:
        reps += [
            _Replacement(nvtx, "range_push", _noop("range_push")),
            _Replacement(nvtx, "range_pop", _noop("range_pop")),
        ]
    return reps


class _SameGeneratorFilter(logging.Filter):
    """Drops Megatron's "CPU RNG state changed within GPU RNG context" warning.

    The tracker's check compares the CPU generator before and after a fork; on
    this backend the CUDA RNG state *is* the CPU generator, so every dropout
    inside a fork trips it although nothing is wrong.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


_RNG_LOGGER = "megatron.core.tensor_parallel.random"


def _remove_function_mode(mode: TorchFunctionMode) -> bool:
    """Take exactly ``mode`` off this thread's torch-function mode stack; the others keep their order.

    ``TorchFunctionMode.__exit__`` pops whatever is on top, so a mode pushed after
    ``mode`` (a profiler's, ``torch.device(...)`` as a context, a user's) would be
    popped in its place.  torch's own ``DeviceContext`` reorders the stack through
    these same calls.  Returns whether ``mode`` was on the stack.
    """
    above: list[Any] = []
    found = False
    while torch._C._len_torch_function_stack() > 0:
        top = torch._C._pop_torch_function_stack()
        if top is mode:
            found = True
            break
        above.append(top)
    for other in reversed(above):
        torch._C._push_on_torch_function_stack(other)
    return found


class CpuBackend:
    """Holds what :func:`enable` replaced so that :func:`disable` can restore it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: list[_Replacement] = []
        self._mode: _CudaAsCpuMode | None = None
        self._mode_thread: int | None = None  # torch keeps function modes per thread
        self._log_filter = _SameGeneratorFilter()

    @property
    def active(self) -> bool:
        return self._mode is not None

    def enable(self, *, force: bool = False) -> None:
        with self._lock:
            if self._mode is not None:
                return
            if torch.cuda.is_available() and not force:
                raise RuntimeError(
                    "megatron_offload_plugin.backends.cpu: this process sees a GPU "
                    f"({torch.cuda.device_count()} device(s)); the CPU backend would hide it. "
                    "Run on the GPU instead, or pass force=True to run Megatron on the CPU anyway."
                )
            reps = _replacements()
            for rep in reps:
                rep.had_attr = hasattr(rep.owner, rep.name)
                rep.original = getattr(rep.owner, rep.name, None)
                setattr(rep.owner, rep.name, rep.value)
            self._active = reps
            self._mode = _CudaAsCpuMode()
            self._mode.__enter__()
            self._mode_thread = threading.get_ident()
            logging.getLogger(_RNG_LOGGER).addFilter(self._log_filter)
            logger.debug("CPU backend enabled (%d replacements)", len(reps))

    def disable(self) -> None:
        """Take the backend's mode off the stack wherever it sits, then restore every attribute.

        Modes pushed after :meth:`enable` stay active (and exit normally later):
        refusing instead would leave the backend on, and ``disable`` runs in
        ``finally`` blocks where a second error would hide the first.
        """
        with self._lock:
            if self._mode is None:
                return
            if not _remove_function_mode(self._mode):
                if threading.get_ident() != self._mode_thread:
                    raise RuntimeError(
                        "megatron_offload_plugin.backends.cpu.disable(): called on thread "
                        f"{threading.get_ident()}, but enable() ran on thread {self._mode_thread}; "
                        "torch keeps function modes per thread, so only that thread can take the "
                        "backend's mode off. Call disable() from the thread that called enable()."
                    )
                logger.warning(
                    "CPU backend: its torch-function mode was already off the stack (a mode entered "
                    "before it and exited after it pops the top); restoring the replaced attributes"
                )
            self._mode = None
            self._mode_thread = None
            logging.getLogger(_RNG_LOGGER).removeFilter(self._log_filter)
            for rep in reversed(self._active):
                if rep.had_attr:
                    setattr(rep.owner, rep.name, rep.original)
                else:
                    delattr(rep.owner, rep.name)
            self._active = []
            logger.debug("CPU backend disabled")


_BACKEND = CpuBackend()


def enable(*, force: bool = False) -> None:
    """Make the CPU stand in for the CUDA device for Megatron-core (idempotent)."""
    _BACKEND.enable(force=force)


def disable() -> None:
    """Restore everything :func:`enable` replaced (idempotent)."""
    _BACKEND.disable()


def is_enabled() -> bool:
    return _BACKEND.active


@contextlib.contextmanager
def cpu_backend(*, force: bool = False) -> Iterator[None]:
    """Scope the CPU backend to a ``with`` block."""
    was_enabled = is_enabled()
    enable(force=force)
    try:
        yield
    finally:
        if not was_enabled:
            disable()


def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` with the CPU backend enabled (for torch.multiprocessing targets)."""

    def _wrapped(*args: Any, **kwargs: Any) -> Any:
        with cpu_backend():
            return fn(*args, **kwargs)

    return _wrapped
