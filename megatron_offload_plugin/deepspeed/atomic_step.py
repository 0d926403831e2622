"""All-or-nothing engine steps: a step that fails leaves the engine exactly as before it.

:meth:`LayerwiseOffloadOptimizer.transaction` puts parameters, optimizer states and
scalars back when a step raises.  The engine around it changes more during
``DeepSpeedEngine._take_model_step``: the learning rate (the scheduler's step),
``global_steps`` / ``global_samples`` / ``skipped_steps``, ZeRO's low-precision
copies of the weights (updated group by group inside ZeRO's step) and the gradient
buffers (freed group by group).  :func:`attach` wraps that one engine method, on this
engine instance, in the optimizer's transaction and on failure also

* restores the counters, the scheduler's state and every group's hyper-parameters;
* copies the restored fp32 weights into ZeRO's low-precision ones (``update_lp_params``);
* clears the gradients as ZeRO's overflow path does when it skips a step, and moves
  the micro-step counter back to the start of the failed step's accumulation window
  (so a retry of the iteration accumulates its micro-batches onto nothing, as after
  a successful step);
* stops timers the failed step left running;

then re-raises.  The failed iteration can be run again (forward, backward, step) or
the run checkpointed, bitwise as if the step never started.  With data parallelism
every rank must fail the same step for that to hold (one rank alone raising stops
the others at their next collective: torchrun tears the job down).
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any

from .optimizer import LayerwiseOffloadOptimizer

logger = logging.getLogger(__name__)

_WRAPPED = "_layerwise_atomic_step"
_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "_step_applied", "losses")


def _hyper(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: copy.copy(v) for k, v in g.items() if k != "params"} for g in groups]


def _put_hyper(groups: list[dict[str, Any]], saved: list[dict[str, Any]]) -> None:
    for g, h in zip(groups, saved):
        g.update(h)


class _EngineSnapshot:
    """What ``_take_model_step`` changes outside the optimizer, taken before it."""

    def __init__(self, engine: Any, opt: LayerwiseOffloadOptimizer) -> None:
        self.counters = {name: getattr(engine, name) for name in _COUNTERS if hasattr(engine, name)}
        sched = engine.lr_scheduler
        self.scheduler = copy.deepcopy(sched.state_dict()) if sched is not None and hasattr(sched, "state_dict") else None
        self.groups = [(gs, _hyper(gs)) for gs in _group_lists(engine, opt)]

    def restore(self, engine: Any) -> None:
        for name, value in self.counters.items():
            setattr(engine, name, value)
        if self.scheduler is not None:
            engine.lr_scheduler.load_state_dict(self.scheduler)
        for groups, saved in self.groups:
            _put_hyper(groups, saved)


def _group_lists(engine: Any, opt: LayerwiseOffloadOptimizer) -> list[list[dict[str, Any]]]:
    """Every distinct list of parameter groups a scheduler may have changed (engine optimizer, ours, inner)."""
    seen: list[list[dict[str, Any]]] = []
    for holder in (engine.optimizer, opt, opt.inner):
        groups = getattr(holder, "param_groups", None)
        if isinstance(groups, list) and not any(groups is s for s in seen):
            seen.append(groups)
    return seen


def _stop_running_timers(timers: Any, names: Any) -> None:
    for name in names or ():
        timer = timers(name)
        if getattr(timer, "started_", False):
            timer.stop()


def clear_gradients(engine: Any) -> None:
    """The gradients as a skipped step leaves them (what ZeRO does on overflow; zero_grad otherwise)."""
    zopt = engine.optimizer
    if hasattr(zopt, "averaged_gradients"):  # ZeRO-1/2
        zopt.zero_grad(set_to_none=True)
        zopt._release_preflattened_grad_buffers()
        for k in list(zopt.averaged_gradients.keys()):
            zopt.averaged_gradients[k] = None
            zopt.all_grad_tensors[k] = None
        for fp32 in zopt.single_partition_of_fp32_groups:
            fp32.grad = None
        return
    if hasattr(zopt, "clear_hp_grads"):  # the bf16 optimizer keeps its own fp32 gradient accumulators
        zopt.clear_hp_grads()
    if engine.bfloat16_enabled() and hasattr(zopt, "zero_grad"):
        zopt.zero_grad()
    else:
        engine.zero_grad()


def restart_accumulation(engine: Any) -> None:
    """Counters as at the start of the failed step's accumulation window: a retry runs all its micro-batches."""
    engine._running_engine_step = False  # engine.step() raised before clearing it
    if hasattr(engine, "_unmanaged_backward_count"):
        engine._unmanaged_backward_count = 0  # the gradients those backwards made are gone
    managed = getattr(engine, "managed_gradient_accumulation", lambda: True)()
    if managed:  # the boundary is (micro_steps + 1) % gas == 0, and micro_steps was not advanced by the failed step
        engine.micro_steps -= engine.micro_steps % engine.gradient_accumulation_steps()


def _after_rollback(engine: Any, snapshot: _EngineSnapshot) -> None:
    snapshot.restore(engine)
    restart_accumulation(engine)
    update_lp = getattr(engine.optimizer, "update_lp_params", None)
    if callable(update_lp):
        update_lp()  # the low-precision weights from the restored fp32 ones
    clear_gradients(engine)
    try:
        from deepspeed.runtime.zero.stage_1_and_2 import OPTIMIZER_TIMERS
    except ImportError:  # pragma: no cover - other layouts
        OPTIMIZER_TIMERS = ()
    zero_timers = getattr(engine.optimizer, "timers", None)
    if callable(zero_timers):
        _stop_running_timers(zero_timers, OPTIMIZER_TIMERS)
    step_timers = getattr(getattr(engine, "engine_timers", None), "step_timers", None)
    if callable(getattr(engine, "timers", None)):
        _stop_running_timers(engine.timers, step_timers)


def attach(engine: Any, opt: LayerwiseOffloadOptimizer) -> bool:
    """Make ``engine``'s model steps all or nothing (NVMe stores; False and nothing done otherwise)."""
    if not opt.store.transactional or getattr(engine, _WRAPPED, False):
        return False
    take_step = engine._take_model_step

    @functools.wraps(take_step)
    def all_or_nothing_step(*args: Any, **kwargs: Any) -> Any:
        snapshot = _EngineSnapshot(engine, opt)
        try:
            with opt.transaction():
                return take_step(*args, **kwargs)
        except BaseException:
            _after_rollback(engine, snapshot)
            raise

    engine._take_model_step = all_or_nothing_step
    setattr(engine, _WRAPPED, True)
    return True
