"""ZeRO-1/2's fp32 master weights in the layer buffers, next to the optimizer states.

ZeRO stage 1 and 2 keep one fp32 partition per parameter group (one group per
layer here): the tensors the basic optimizer steps, copies of the model's weights
(bf16, or fp32 kept apart).  :meth:`LayerwiseOffloadOptimizer.offload_master_weights`
stores them with the layer's states and releases their storage between steps.

ZeRO reads them at a few known places besides the step; on this engine's ZeRO
optimizer (instance attributes, nothing global) those are wrapped so the masters
are materialized around them:

* ``step``: ZeRO copies each group's master into the model's weights right after
  that group's update; the optimizer releases a layer's masters when the next layer
  starts, and the wrapper releases the last one when ZeRO's step returns;
* ``state_dict`` (reads; the saved fp32 partitions are cloned, so the checkpoint
  holds real bytes after they are released again);
* ``load_state_dict``, ``_restore_from_bit16_weights`` (``refresh_fp32_params``)
  and ``update_lp_params`` (writes / reads every master).

Anything else reading ``single_partition_of_fp32_groups`` between steps (for
example ``deepspeed.utils.safe_get_full_fp32_param``) must run inside
``layerwise_optimizer(engine).master_weights_resident(writes=False)``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

from .optimizer import LayerwiseOffloadOptimizer

logger = logging.getLogger(__name__)

_WRAPPED = "_layerwise_master_wrapped"  # attribute on the ZeRO optimizer: names of the wrapped methods


def _cloned_fp32_groups(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The saved fp32 partitions as copies: the checkpoint must hold real bytes after they are released."""
    from deepspeed.checkpoint.constants import SINGLE_PARTITION_OF_FP32_GROUPS

    groups = state_dict.get(SINGLE_PARTITION_OF_FP32_GROUPS)
    if groups is not None:
        state_dict[SINGLE_PARTITION_OF_FP32_GROUPS] = [g.detach().clone() for g in groups]
    return state_dict


def _unchanged(out: Any) -> Any:
    return out


#: ZeRO methods that touch the fp32 partitions: whether they write them, and what is done to their result.
_RESIDENT_METHODS: dict[str, tuple[bool, Callable[[Any], Any]]] = {
    "state_dict": (False, _cloned_fp32_groups),
    "update_lp_params": (False, _unchanged),
    "load_state_dict": (True, _unchanged),
    "_restore_from_bit16_weights": (True, _unchanged),
}


def _zero_optimizer_class() -> type:
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return DeepSpeedZeroOptimizer


def holds_master_copies(engine_optimizer: Any) -> bool:
    """True when the engine's optimizer is ZeRO-1/2 keeping fp32 partitions apart from the model's weights."""
    return (isinstance(engine_optimizer, _zero_optimizer_class())
            and not getattr(engine_optimizer, "cpu_offload", False)
            and hasattr(engine_optimizer, "single_partition_of_fp32_groups"))


def _with_masters_resident(opt: LayerwiseOffloadOptimizer, method: Callable[..., Any], writes: bool,
                           result: Callable[[Any], Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with opt.master_weights_resident(writes=writes):
            return result(method(*args, **kwargs))

    return wrapper


def attach_master_offload(engine: Any, opt: LayerwiseOffloadOptimizer) -> bool:
    """Offload ``engine``'s ZeRO-1/2 master weights through ``opt``; False (nothing done) for other engines."""
    zero = engine.optimizer
    if not holds_master_copies(zero) or getattr(zero, _WRAPPED, None):
        return False
    step = zero.step

    @functools.wraps(step)
    def step_then_release(*args: Any, **kwargs: Any) -> Any:
        try:
            return step(*args, **kwargs)
        finally:
            opt.release_master_weights()

    zero.step = step_then_release
    for name, (writes, result) in _RESIDENT_METHODS.items():
        setattr(zero, name, _with_masters_resident(opt, getattr(zero, name), writes, result))
    setattr(zero, _WRAPPED, ("step", *_RESIDENT_METHODS))
    opt.offload_master_weights()
    logger.info("layerwise_offload: ZeRO fp32 master weights (%d bytes) kept with the optimizer states",
                opt.master_bytes)
    return True
