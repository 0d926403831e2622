"""``overlap_with_backward``: step each layer while earlier layers are still in backward.

Where it applies: ZeRO stage 0, fp32, data-parallel size 1 (checked at initialize).
There the gradients a layer gets in the backward of the gradient-accumulation
boundary are final the moment autograd has accumulated them (no bucketed
reduction, no loss-scale unscaling, no fp32 master copy to fill first).

How: a post-accumulate-grad hook on every parameter counts, per layer unit, the
parameters whose gradient has landed during the boundary backward; when a unit is
complete its step runs at once (``LayerwiseOffloadOptimizer.step_unit``), fetching
and prefetching states in backward (reverse layer) order.  ``engine.step()`` then
runs DeepSpeed's usual clipping and calls ``optimizer.step()``, which steps only the
units not done yet (parameters that got no gradient, for instance).

Why clipping and overflow stay correct -- speculate, then verify and undo:

* The early step assumes DeepSpeed will leave the gradients as they are.  DeepSpeed's
  fp32 clipping (``runtime.utils.clip_grad_norm_``) always multiplies every gradient
  by ``min(1, max_norm / (norm + 1e-6))``: exactly 1 leaves them bit for bit, anything
  else (clipping, or a non-finite norm, i.e. an overflow) changes them.
* With ``gradient_clipping > 0`` each early step first copies the unit's parameters
  and states to the store's rollback area (host memory for 'cpu', files for 'nvme')
  and keeps a copy of the first early unit's gradients.  At ``optimizer.step()`` those
  gradients are compared with what DeepSpeed left: unchanged -> the early steps stand
  (bitwise what the normal step computes); changed -> every early unit is restored
  and all units are stepped normally with the clipped gradients.
* Without clipping nothing can change the gradients after backward, so nothing is copied.
* Speculation is adaptive: after a step whose gradients were clipped, the next step
  does not speculate (its units are stepped by ``optimizer.step()`` as without the
  option, still checked against the probe); after an unclipped step it speculates
  again.  Early in training, when nearly every step clips, this avoids paying for
  the rollback copies and the redo every step.

What it buys: the optimizer work and the state I/O of the last layers run while the
first layers are still in backward; on one device with no spare cores it mostly moves
time around (see the bench figures).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .optimizer import LayerwiseOffloadOptimizer

logger = logging.getLogger(__name__)


class BackwardOverlap:
    """Hooks that step a :class:`LayerwiseOffloadOptimizer` unit by unit inside the boundary backward."""

    def __init__(self, engine: Any, optimizer: LayerwiseOffloadOptimizer, *, clip: float) -> None:
        self.engine = engine
        self.opt = optimizer
        self.clip = clip
        n = optimizer.num_units
        self._unit_params = [optimizer._params(u) for u in range(n)]
        self._need = [sum(1 for p in ps if p.requires_grad) for ps in self._unit_params]
        self._unit_of = {id(p): u for u, ps in enumerate(self._unit_params) for p in ps}
        self._seen = [0] * n
        self._early: list[int] = []
        self._probe: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._order = list(reversed(range(n)))  # backward order, for prefetching
        self.early_units_total = 0
        self.rollbacks = 0
        self.speculate = True  # adaptive: off after a clipped step, on again after an unclipped one
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad)
                         for ps in self._unit_params for p in ps if p.requires_grad]
        optimizer.before_step = self.before_step

    def _on_grad(self, param: torch.Tensor) -> None:
        if not self.engine.is_gradient_accumulation_boundary():
            return
        u = self._unit_of[id(param)]
        self._seen[u] += 1
        if self._seen[u] == self._need[u]:
            if self.clip > 0 and not self._probe:
                with torch.no_grad():
                    self._probe = [(p, p.grad.detach().clone()) for p in self._unit_params[u] if p.grad is not None]
            if self.clip <= 0 or self.speculate:
                self._step_early(u)

    @torch.no_grad()
    def _step_early(self, u: int) -> None:
        speculative = self.clip > 0
        try:
            self.opt.step_unit(u, prefetch_order=self._order, stash=speculative)
        except BaseException:
            self._abandon_iteration()
            raise
        self._early.append(u)
        self.early_units_total += 1

    def _abandon_iteration(self) -> None:
        """An early step failed inside backward: undo the iteration's early steps and its gradients.

        The backward raises; running the same iteration again then starts from the
        weights and states before it (bitwise), as after a failed ``engine.step()``.
        """
        from .atomic_step import clear_gradients, restart_accumulation

        self.opt.rollback()
        self._early, self._probe, self._seen = [], [], [0] * len(self._seen)
        clear_gradients(self.engine)
        restart_accumulation(self.engine)

    def before_step(self) -> set[int]:
        """Called by ``optimizer.step()``: the units whose early step stands."""
        early, self._early = self._early, []
        probe, self._probe = self._probe, []
        self._seen = [0] * len(self._seen)
        if self.clip <= 0:
            return set(early)
        clipped = not all(p.grad is not None and torch.equal(p.grad, g) for p, g in probe)
        self.speculate = not clipped
        if not early:
            return set()
        if clipped:  # DeepSpeed clipped (or the norm was not finite): undo, then step normally
            for u in reversed(early):
                self.opt.restore_unit(u)
            self.opt.commit_stash()
            self.rollbacks += 1
            return set()
        self.opt.commit_stash()
        return set(early)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.opt.before_step = None


def attach(engine: Any, optimizer: LayerwiseOffloadOptimizer) -> BackwardOverlap:
    """Check the engine fits (stage 0, fp32, one data-parallel rank) and install the hooks."""
    problems = []
    if engine.zero_optimization():
        problems.append(f"zero_optimization.stage={engine.zero_optimization_stage()} (needs 0)")
    if engine.fp16_enabled() or engine.bfloat16_enabled():
        problems.append("fp16/bf16 training (needs fp32: the mixed-precision wrapper fills fp32 gradients after backward)")
    if engine.dp_world_size != 1:
        problems.append(f"data-parallel size {engine.dp_world_size} (needs 1: gradients are reduced after backward)")
    if engine.basic_optimizer is not engine.optimizer:
        problems.append(f"DeepSpeed wraps the optimizer in {type(engine.optimizer).__name__}")
    if problems:
        raise ValueError("layerwise_offload.optimizer_states.overlap_with_backward=true does not fit this engine: "
                         + "; ".join(problems) + "; set overlap_with_backward=false")
    return BackwardOverlap(engine, optimizer, clip=float(engine.gradient_clipping() or 0.0))
