"""Which layer each parameter belongs to, and per-layer parameter groups for the optimizer.

A layer is the prefix of a parameter's name up to its first numeric part
(``transformer.h.3.attn.weight`` -> ``transformer.h.3``); parameters outside any
numbered list form one layer per top-level child (``embed``, ``final_norm``).
Layers are numbered in the order ``named_parameters()`` first meets them, which is
the forward order for ordinary models.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

LAYER_KEY = "layerwise_offload_layer"  # added to every param group: the layer's name


def layer_name(param_name: str) -> str:
    parts = param_name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0] if len(parts) > 1 else param_name


def layer_of_params(module: torch.nn.Module) -> dict[int, str]:
    """``id(param) -> layer name`` for every parameter of ``module`` (first name wins for tied ones)."""
    return {id(p): layer_name(name) for name, p in module.named_parameters()}


def layer_param_groups(module: torch.nn.Module, params: Iterable[Any] | None) -> list[dict[str, Any]]:
    """``params`` (tensors or param-group dicts, as given to an optimizer) split into one group per layer.

    Each user group is split by layer, keeping its options; the result is ordered by
    layer (forward order), then by the user's group order. Parameters the module does
    not own go to a layer named ``other``.
    """
    names = layer_of_params(module)
    order = {name: i for i, name in enumerate(dict.fromkeys(names.values()))}
    items = list(params) if params is not None else list(module.parameters())
    if items and isinstance(items[0], dict):
        user_groups = [dict(g) for g in items]
    else:
        user_groups = [{"params": items}]
    split: dict[tuple[int, int], dict[str, Any]] = {}
    for gi, group in enumerate(user_groups):
        plist = group["params"]
        plist = [plist] if isinstance(plist, torch.Tensor) else list(plist)
        for p in plist:
            lname = names.get(id(p), "other")
            key = (order.get(lname, len(order)), gi)
            if key not in split:
                split[key] = {**{k: v for k, v in group.items() if k != "params"}, "params": [], LAYER_KEY: lname}
            split[key]["params"].append(p)
    return [split[k] for k in sorted(split)]
