"""Regions as offload units: checkpointed calls and layers, reloaded as backward reaches them.

A region is one call (a checkpointed block, a layer's forward).  What it saves
for backward is captured by the engine, offloaded as soon as the call returns,
and brought back when backward arrives at the region's outputs; at that moment
the ``prefetch`` regions that ran just before it (in the same ``group``:
one microbatch, one model chunk) are reloaded too, so their copies overlap this
region's backward.  This is the order backward visits them, reversed forward
order, on any schedule, because the trigger is the gradient itself.

Units are forgotten (host buffers back to the pool) at the end of the backward
call that used them (``queue_callback`` of autograd's engine).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch

from .engine import OffloadEngine


def _grad_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.requires_grad else []
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _grad_tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _grad_tensors(o)]
    return []


class RegionOffloader:
    """Run calls as offload regions of ``engine``; ``prefetch`` earlier regions reload with each one."""

    def __init__(self, engine: OffloadEngine, *, prefetch: int = 1, name: str = "region") -> None:
        if prefetch < 0:
            raise ValueError(f"prefetch={prefetch!r}: must be >= 0 regions")
        self.engine = engine
        self.prefetch = prefetch
        self.name = name
        self._counter = itertools.count()
        self._group: Hashable = None
        self._chains: dict[Hashable, list[Hashable]] = {}  # group -> its regions in forward order
        self._done: set[Hashable] = set()
        self._callback_queued = False

    @contextlib.contextmanager
    def group(self, key: Hashable) -> Iterator[None]:
        """Regions entered inside belong to ``key`` (their prefetch chain)."""
        previous, self._group = self._group, key
        try:
            yield
        finally:
            self._group = previous

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` with its saved tensors offloaded until backward needs them."""
        key = (self.name, self._group, next(self._counter))
        with self.engine.capture(key):
            out = fn(*args, **kwargs)
        outputs = _grad_tensors(out)
        if not outputs:  # nothing will run backward through it: keep nothing
            self.engine.release(key)
            return out
        self.engine.offload(key)
        chain = self._chains.setdefault(self._group, [])
        chain.append(key)
        position = len(chain) - 1
        group = self._group
        torch.autograd.graph.register_multi_grad_hook(
            outputs, lambda grads: self._arrived(group, position), mode="any"
        )
        return out

    def _arrived(self, group: Hashable, position: int) -> None:
        """Backward reached region ``position`` of ``group``: reload it and prefetch earlier ones."""
        chain = self._chains.get(group, [])
        for i in range(position, max(-1, position - self.prefetch - 1), -1):
            if i < len(chain) and self.engine.is_offloaded(chain[i]):
                self.engine.reload(chain[i])
        if position < len(chain) and chain[position] is not None:
            self._done.add(chain[position])
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_finished)

    def _backward_finished(self) -> None:
        """End of a backward call: its regions' tensors were all used; forget them."""
        self._callback_queued = False
        for group, chain in list(self._chains.items()):
            kept = []
            for key in chain:
                if key in self._done:
                    self.engine.release(key)
                    self._done.discard(key)
                else:
                    kept.append(key)
            if kept:
                # Positions index the chain: keep placeholders for released regions.
                self._chains[group] = [k if k in kept else None for k in chain]  # type: ignore[misc]
            else:
                del self._chains[group]

    def forget(self) -> None:
        """Drop every region still known (end of an iteration, or after an exception)."""
        for chain in self._chains.values():
            for key in chain:
                if key is not None:
                    self.engine.release(key)
        self._chains.clear()
        self._done.clear()



class LayerwiseOffload:
    """Offload what each of ``modules`` saves for backward, layer by layer (reversible).

    Each module's forward runs as a region of ``offloader``: its saved tensors leave the
    device when it returns and come back when backward reaches its outputs, the
    ``prefetch`` layers before it reloaded at the same moment (reverse layer order).
    Installed as an instance attribute ``forward`` on each module; :meth:`detach` removes it.
    """

    def __init__(self, modules: list[torch.nn.Module], offloader: RegionOffloader) -> None:
        self.modules = list(modules)
        self.offloader = offloader
        for module in self.modules:
            if "forward" in vars(module):
                raise ValueError(f"{type(module).__name__}: its forward is already replaced on the instance; "
                                 "layer-wise activation offload would hide that replacement")
            original = module.forward

            def forward(*args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
                if not torch.is_grad_enabled():
                    return _original(*args, **kwargs)  # evaluation: nothing is saved
                return self.offloader.run(_original, *args, **kwargs)

            module.forward = forward  # type: ignore[method-assign]

    def detach(self) -> None:
        for module in self.modules:
            vars(module).pop("forward", None)
        self.offloader.forget()
