"""``layerwise_offload.activations``: the shared offload engine on a DeepSpeed engine's layers.

The same :class:`~..offload.engine.OffloadEngine` the Megatron pipeline runtime uses;
each selected module's forward is one offload region (:class:`~..offload.regions.LayerwiseOffload`):
its saved tensors go to host memory or NVMe swap files when it returns and come back,
one layer ahead, in reverse layer order as backward reaches them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

import torch

from ..offload.copies import default_copy_lead
from ..offload.engine import OffloadEngine
from ..offload.regions import LayerwiseOffload, RegionOffloader

ATTRIBUTE = "_layerwise_activation_offload"  # where the attachment lives on the DeepSpeed engine


def select_modules(model: torch.nn.Module, modules: str | list[str], option: str) -> list[torch.nn.Module]:
    """'all': the children of the model's first non-empty ModuleList (its layers); else names or globs."""
    named = dict(model.named_modules())
    if modules == "all":
        for name, module in named.items():
            if isinstance(module, torch.nn.ModuleList) and len(module):
                return list(module)
        raise ValueError(f"{option}='all': the model has no layer list (torch.nn.ModuleList); "
                         "name the modules to offload, e.g. [\"blocks.*\"]")
    chosen: list[torch.nn.Module] = []
    for pattern in modules:
        hits = [m for n, m in named.items() if n and fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            sample = ", ".join(n for n in list(named)[1:8])
            raise ValueError(f"{option}: {pattern!r} matches no module of the model; names look like: {sample}")
        chosen += [m for m in hits if all(m is not c for c in chosen)]
    return chosen


class ActivationOffloadAttachment:
    """What ``wire_activations`` leaves on the engine: the hooks, the engine, the swap tier."""

    def __init__(self, ds_engine: Any, section: Any, ds_config: Mapping[str, Any], option: str) -> None:
        act = section.activations
        model = ds_engine.module
        self.swap: Any = None  # nvme.SwapTier with device 'nvme'
        if act.device == "nvme":
            from ..offload.nvme import SwapTier

            aio = section.aio if section.aio is not None else ds_config.get("aio")
            self.swap = SwapTier(act.nvme_path, aio, option=f"{option}.nvme_path")
        nvme = self.swap.swapper if self.swap is not None else None
        self.engine = OffloadEngine(device=ds_engine.device, min_tensor_bytes=act.min_tensor_bytes,
                                    exclude=list(model.parameters()), nvme=nvme)
        self.modules = select_modules(model, act.modules, f"{option}.modules")
        prefetch = act.prefetch_layers if act.prefetch_layers is not None else default_copy_lead(self.engine.device)
        self.hooks = LayerwiseOffload(self.modules, RegionOffloader(self.engine, prefetch=prefetch, name="layer"))

    def take_stats(self) -> dict[str, Any]:
        return self.engine.take_stats()

    def close(self) -> None:
        self.hooks.detach()
        self.engine.close()
        if self.swap is not None:
            self.swap.close()
            self.swap = None


def attach_activation_offload(ds_engine: Any, section: Any, ds_config: Mapping[str, Any], option: str) -> None:
    setattr(ds_engine, ATTRIBUTE, ActivationOffloadAttachment(ds_engine, section, ds_config, option))


def activation_offload(ds_engine: Any) -> ActivationOffloadAttachment | None:
    """The engine's activation offload (statistics, ``close()``), or None."""
    return getattr(ds_engine, ATTRIBUTE, None)
