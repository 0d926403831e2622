"""When Megatron DDP may reduce gradients during a plugin schedule: Megatron's rules, made explicit.

Megatron DDP reduces a bucket when every parameter in it has reported its last
gradient of the iteration, counted only while grad sync is on (outside
``config.no_sync_func``); with ``overlap_grad_reduce`` it launches from the
parameters' grad hooks, and it learns in the first iteration how many reports
each parameter makes.  Megatron's own schedules therefore keep sync off until
the last backward of each chunk, and when ``config.grad_sync_func`` is set
(Megatron-LM sets it to DDP's ``start_grad_sync``) they launch the reduction
themselves and only if sync is still off; with one chunk, pipeline rank 0 lets
the hooks launch instead.

With a B/W split a chunk's gradients are final only after two actions: its last
B (biases, norms, embeddings, whatever B computes) and its last W (the
linears' weights), with other microbatches' Ws possibly in between.  So:

* hook mode (no ``grad_sync_func``, or one chunk on pipeline rank 0): sync is on
  exactly during the actions that give a chunk's parameters their last
  gradient (its last B or BW, its last W) and off during every other action, so
  each parameter reports once per iteration, as under Megatron's 1F1B, whatever
  the schedule (``auto`` may re-plan between iterations);
* explicit mode (``grad_sync_func`` set otherwise): sync stays off through the
  program; after a chunk's last such action it is turned on and
  ``grad_sync_func`` launches that chunk's reduction (a single function: once,
  after every chunk), the same launch Megatron's schedules make.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from ..schedules.ir import Action, Kind


def final_gradient_actions(program: Sequence[Action]) -> dict[int, set[int]]:
    """Per chunk, the program indices that give its parameters their last gradient:
    its last B-or-BW and its last W-or-BW."""
    last_b: dict[int, int] = {}
    last_w: dict[int, int] = {}
    for i, step in enumerate(program):
        if step.kind in (Kind.B, Kind.BW):
            last_b[step.chunk] = i
        if step.kind in (Kind.W, Kind.BW):
            last_w[step.chunk] = i
    return {c: {last_b[c], last_w.get(c, last_b[c])} for c in last_b}


class _Switch:
    """One ``no_sync`` context: sync off while entered."""

    def __init__(self, no_sync: Callable[[], Any] | None) -> None:
        self._no_sync = no_sync
        self._entered: contextlib.ExitStack | None = None

    def off(self) -> None:
        if self._entered is None and self._no_sync is not None:
            self._entered = contextlib.ExitStack()
            self._entered.enter_context(self._no_sync())

    def on(self) -> None:
        if self._entered is not None:
            entered, self._entered = self._entered, None
            entered.close()


class GradSync:
    """Turns Megatron DDP's grad sync on and off around a rank's program (see module docstring)."""

    def __init__(self, config: Any, chunks: Sequence[Any], program: Sequence[Action], *, pp_rank: int) -> None:
        self.chunks = list(chunks)
        no_sync = config.no_sync_func
        self.per_chunk = isinstance(no_sync, list)
        self.switches = [_Switch(f) for f in no_sync] if self.per_chunk else [_Switch(no_sync)]
        self.grad_sync_func = config.grad_sync_func
        self.final = final_gradient_actions(program)
        self.last_index = {c: max(ix) for c, ix in self.final.items()}
        self.hook_mode = self.grad_sync_func is None or (len(self.chunks) == 1 and pp_rank == 0)
        self._launched: set[int] = set()
        for switch in self.switches:
            switch.off()

    def _switch(self, chunk: int) -> _Switch:
        return self.switches[chunk] if self.per_chunk else self.switches[0]

    def before(self, index: int, step: Action) -> None:
        """Sync on for this action only if it gives its chunk's parameters their last gradient."""
        if not self.hook_mode or not step.is_compute:
            return
        switch = self._switch(step.chunk)
        if index in self.final.get(step.chunk, ()):
            switch.on()
        elif step.kind in (Kind.B, Kind.W, Kind.BW):
            switch.off()

    def after(self, index: int, step: Action) -> None:
        """After a chunk's last gradient: in explicit mode, launch its reduction."""
        if self.hook_mode or self.last_index.get(step.chunk) != index:
            return
        self._launched.add(step.chunk)
        if isinstance(self.grad_sync_func, list):
            if self.per_chunk:  # a single no_sync covers every chunk: it opens after the last one
                self._switch(step.chunk).on()
            self.grad_sync_func[step.chunk](self.chunks[step.chunk].parameters())
        elif self._launched >= set(self.last_index):
            for switch in self.switches:
                switch.on()
            self.grad_sync_func([p for c in self.chunks for p in c.parameters()])

    def close(self) -> None:
        """End of the step (or an error): sync on everywhere, as Megatron leaves it."""
        for switch in self.switches:
            switch.on()
