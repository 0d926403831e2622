"""The activation-offload section of a plugin configuration, made runnable.

Built once per ``apply()``: one :class:`.engine.OffloadEngine` (created at the
first step, when the device and the model's parameters are known), the region
offloader behind ``--checkpoint-offload``, and the schedule policy the
pipeline runtime plans offload actions with.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..config.model import ActivationOffloadConfig
from .copies import default_copy_lead
from .engine import OffloadEngine
from .host_pool import HostPool
from .regions import RegionOffloader


class ActivationOffload:
    """Engine, regions and policy for one configuration; per-iteration statistics."""

    def __init__(self, config: ActivationOffloadConfig) -> None:
        self.config = config
        self.pool = HostPool(config.host_pool_bytes, option="--offload-host-pool-bytes")
        self._engine: OffloadEngine | None = None
        self._swap: Any = None  # the NVMe tier's nvme.SwapTier
        self.regions: RegionOffloader | None = None
        if config.nvme_path is not None:
            from .nvme import check_nvme_tier

            check_nvme_tier(config.nvme_path, option="--offload-nvme-path")
        if config.checkpoint_offload:
            self.regions = _LazyRegions(self)  # type: ignore[assignment]

    @property
    def schedules_offload(self) -> bool:
        """True when pipeline units are offloaded (not only checkpointed regions)."""
        return self.config.mode != "none"

    def engine(self, params: Iterable[torch.Tensor] = ()) -> OffloadEngine:
        """The engine (built on first use); ``params`` stay on the device whatever their size."""
        if self._engine is None:
            self._engine = OffloadEngine(
                pool=self.pool, min_tensor_bytes=self.config.min_tensor_bytes, nvme=self._nvme_tier()
            )
        params = tuple(params)
        if params:
            self._engine.set_exclude(params)
        return self._engine

    @property
    def reload_lead(self) -> int:
        """Compute actions between a RELOAD and its backward (see ``--offload-reload-lead``)."""
        if self.config.reload_lead is not None:
            return self.config.reload_lead
        return default_copy_lead(torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    def _nvme_tier(self) -> Any:
        if self.config.nvme_path is None:
            return None
        from .nvme import SwapTier

        self._swap = SwapTier(self.config.nvme_path, option="--offload-nvme-path")
        return self._swap.swapper

    def policy(self) -> Any:
        """The schedule pass's :class:`~megatron_offload_plugin.schedules.offload.OffloadPolicy`."""
        from ..schedules.offload import OffloadPolicy

        return OffloadPolicy(
            mode=self.config.mode,
            fraction=self.config.fraction,
            chunks=self.config.chunk_indices(),
        )

    def take_stats(self) -> dict[str, Any]:
        if self._engine is None:
            from .engine import OffloadStats

            return {**OffloadStats().to_dict(), "host_pool_bytes": self.pool.reserved_bytes,
                    "host_pool_peak_in_use_bytes": self.pool.peak_in_use_bytes}
        return self._engine.take_stats()

    def step_finished(self) -> None:
        if self.regions is not None:
            self.regions.forget()
        if self._engine is not None:
            self._engine.step_finished()

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        if self._swap is not None:
            self._swap.close()
            self._swap = None


class _LazyRegions:
    """A :class:`RegionOffloader` whose engine is created at the first region (device known then)."""

    def __init__(self, owner: ActivationOffload) -> None:
        self._owner = owner
        self._regions: RegionOffloader | None = None

    def _get(self) -> RegionOffloader:
        if self._regions is None:
            self._regions = RegionOffloader(self._owner.engine(), prefetch=1, name="checkpoint")
        return self._regions

    def run(self, *args: Any, **kwargs: Any) -> Any:
        return self._get().run(*args, **kwargs)

    def group(self, key: Any) -> Any:
        return self._get().group(key)

    def forget(self) -> None:
        if self._regions is not None:
            self._regions.forget()


def make_activation_offload(config: ActivationOffloadConfig) -> ActivationOffload | None:
    """None when the section asks for nothing (no engine, no patch)."""
    if config.mode == "none" and not config.checkpoint_offload:
        return None
    return ActivationOffload(config)
