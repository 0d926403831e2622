"""``initialize`` (deepspeed.initialize's exact signature) and ``enable``/``disable`` for plain ``deepspeed.initialize``.

How the section reaches the engine: DeepSpeed builds the engine inside
``deepspeed.initialize``; for the duration of that call one engine method,
``DeepSpeedEngine._configure_optimizer``, is patched (through the project's patch
registry, reverted in ``finally``).  The patched method

1. splits the parameters into one group per layer (:mod:`.layers`), keeping the
   user's group options;
2. hands DeepSpeed a factory as the "client optimizer": it builds the optimizer
   DeepSpeed would have built (``_configure_basic_optimizer`` from the ``"optimizer"``
   section, or the client's optimizer / callable) and wraps it in
   :class:`~.optimizer.LayerwiseOffloadOptimizer`;
3. lets DeepSpeed continue unchanged: ZeRO-1/2, bf16 and fp32 wrap our optimizer
   as their basic optimizer.

``enable()`` replaces ``deepspeed.initialize`` (and every ``from deepspeed import
initialize`` binding) with a wrapper of the original, so HF Trainer, Accelerate or
Megatron-DeepSpeed pick the section up without code changes; ``disable()`` puts
the original back.  Both are idempotent; the state is the one module-level
``PatchSet`` below.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..offload.nvme import check_nvme_tier
from ..patches.registry import Patch, PatchSet, UnsupportedVersionError
from ..patches.versions import installed_version
from .config import SECTION, LayerwiseOffloadConfig, check_conflicts, parse_section
from .layers import LAYER_KEY, layer_of_params, layer_param_groups
from .optimizer import CpuLayerStore, LayerwiseOffloadOptimizer, NvmeLayerStore

logger = logging.getLogger(__name__)

#: DeepSpeed versions this wiring was written and tested against.
DEEPSPEED_VERSIONS = ">=0.19,<0.20"

_lock = threading.RLock()
_enabled: PatchSet | None = None  # the PatchSet holding deepspeed.initialize while enable() is in effect


def _check_version() -> None:
    from packaging.specifiers import SpecifierSet

    version = installed_version("deepspeed")
    if version is None:
        raise UnsupportedVersionError(f"{SECTION}: deepspeed is not installed; pip install 'deepspeed{DEEPSPEED_VERSIONS}'")
    if not SpecifierSet(DEEPSPEED_VERSIONS).contains(version, prereleases=True):
        raise UnsupportedVersionError(
            f"{SECTION}: supports deepspeed {DEEPSPEED_VERSIONS}, installed {version}; "
            f"pip install 'deepspeed{DEEPSPEED_VERSIONS}' or remove the '{SECTION}' section"
        )


# ------------------------------------------------------------------ config lookup


def _load_json(path: str | Path) -> dict[str, Any]:
    try:
        from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config  # what deepspeed.initialize uses

        return load_ds_config(str(path))
    except ImportError:  # pragma: no cover - older layouts
        return json.loads(Path(path).read_text())


def resolve_config(args: Any, config: Any, config_params: Any) -> dict[str, Any] | None:
    """The DeepSpeed config as ``deepspeed.initialize`` would read it (dict, path, or ``args.deepspeed_config``)."""
    if config is None and config_params is not None:
        config = config_params
    ds_path = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if config is None and ds_path is not None:
        config = ds_path
    if config is None:
        return None
    if isinstance(config, Mapping):
        return dict(config)
    return _load_json(config)


def section_from_config(ds_config: Mapping[str, Any] | None) -> LayerwiseOffloadConfig | None:
    """The validated section (after the conflict checks), or None when the config has none."""
    if not ds_config or SECTION not in ds_config:
        return None
    section = parse_section(ds_config[SECTION])
    check_conflicts(section, ds_config)
    return section


# ------------------------------------------------------------------ engine hook


def _aio_config(section: LayerwiseOffloadConfig, ds_config: Mapping[str, Any]) -> dict[str, Any] | None:
    if section.aio is not None:
        return dict(section.aio)
    aio = ds_config.get("aio")
    return dict(aio) if isinstance(aio, Mapping) else None


def _regroup_client_optimizer(optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> None:
    if any(optimizer.state.get(p) for g in optimizer.param_groups for p in g["params"]):
        raise ValueError(f"{SECTION}: the client optimizer already holds states; pass a fresh optimizer to "
                         "deepspeed.initialize (load states afterwards with engine.load_checkpoint)")
    optimizer.param_groups[:] = layer_param_groups(module, optimizer.param_groups)


def _layer_indices(module: torch.nn.Module) -> dict[int, int]:
    names = layer_of_params(module)
    order = {name: i for i, name in enumerate(dict.fromkeys(names.values()))}
    return {pid: order[name] for pid, name in names.items()}


def _make_store(section: LayerwiseOffloadConfig, ds_config: Mapping[str, Any], device: torch.device) -> Any:
    opt = section.optimizer_states
    if opt.device == "nvme":
        return NvmeLayerStore(device, str(opt.nvme_path), _aio_config(section, ds_config),
                              cap_layers=opt.prefetch_layers + 2)
    return CpuLayerStore(device)


def _configure_optimizer_patch(section: LayerwiseOffloadConfig, ds_config: Mapping[str, Any]) -> Patch:
    def make(original: Any) -> Any:
        @functools.wraps(original)
        def _configure_optimizer(engine: Any, client_optimizer: Any, model_parameters: Any) -> Any:
            # ZeRO-1/2 flatten each group into one partition: give them one group per layer.  Stage 0 keeps
            # the user's groups (DeepSpeed's norms see the same groups); the optimizer splits them by layer.
            zero = bool(engine.zero_optimization())
            groups = layer_param_groups(engine.module, model_parameters) if zero else model_parameters
            layer_of = None if zero else _layer_indices(engine.module)
            store = _make_store(section, ds_config, torch.device(engine.device))

            def wrap(inner: torch.optim.Optimizer) -> LayerwiseOffloadOptimizer:
                if zero and not all(LAYER_KEY in g for g in inner.param_groups):
                    inner.param_groups[:] = layer_param_groups(engine.module, inner.param_groups)
                return LayerwiseOffloadOptimizer(inner, store, prefetch_layers=section.optimizer_states.prefetch_layers,
                                                 layer_of=layer_of)

            if client_optimizer is None:
                def factory(params: Any) -> Any:
                    return wrap(engine._configure_basic_optimizer(params))
            elif isinstance(client_optimizer, torch.optim.Optimizer):
                if zero:
                    _regroup_client_optimizer(client_optimizer, engine.module)

                def factory(params: Any) -> Any:
                    return wrap(client_optimizer)
            else:
                def factory(params: Any) -> Any:
                    return wrap(client_optimizer(params))
            try:
                original(engine, factory, groups)
            except BaseException:
                store.close()
                raise
            engine.layerwise_offload_optimizer = engine.basic_optimizer
            engine.layerwise_offload_config = section
            if section.optimizer_states.overlap_with_backward:
                from .overlap import attach

                engine.layerwise_offload_overlap = attach(engine, engine.basic_optimizer)
            logger.info("%s: %r", SECTION, engine.basic_optimizer)

        return _configure_optimizer

    return Patch(
        name="deepspeed-layerwise-optimizer",
        target="deepspeed.runtime.engine:DeepSpeedEngine._configure_optimizer",
        make_replacement=make,
        versions=DEEPSPEED_VERSIONS,
        reason="wrap the basic optimizer in the layer-wise offload optimizer, one param group per layer",
        distribution="deepspeed",
        rebind_imported=False,
    )


def _zero_supported_list() -> list[Any]:
    from deepspeed.runtime.zero import utils as zero_utils

    return zero_utils.ZERO_SUPPORTED_OPTIMIZERS


def wire_activations(engine: Any, section: LayerwiseOffloadConfig, ds_config: Mapping[str, Any]) -> None:
    """``layerwise_offload.activations``: the shared offload engine on the selected layers
    (:mod:`.activations`); called once per engine after DeepSpeed built it."""
    if section.activations.device == "none":
        return
    from .activations import attach_activation_offload

    attach_activation_offload(engine, section, ds_config, option=f"{SECTION}.activations")


# ------------------------------------------------------------------ initialize / enable


def _initialize_with(upstream: Any, bound: inspect.BoundArguments) -> Any:
    from .checkpoint_guard import attach_checkpoint_guard

    kw = bound.arguments
    ds_config = resolve_config(kw.get("args"), kw.get("config"), kw.get("config_params"))
    section = section_from_config(ds_config)
    if section is None or not section.enabled:
        result = upstream(**kw)
        attach_checkpoint_guard(result[0], section)  # refuses a with-section checkpoint's ZeRO states
        return result
    assert ds_config is not None
    _check_version()
    for sub in (section.optimizer_states, section.activations):
        if sub.device == "nvme":
            check_nvme_tier(sub.nvme_path, option=f"{SECTION}.{sub.key}.nvme_path")
    if section.optimizer_states.device == "none":
        result = upstream(**kw)
    else:
        patches = PatchSet(log=False)
        supported = _zero_supported_list()
        added = LayerwiseOffloadOptimizer not in supported
        with _lock:
            patches.apply([_configure_optimizer_patch(section, ds_config)])
            if added:
                supported.append(LayerwiseOffloadOptimizer)
            try:
                result = upstream(**kw)
            finally:
                if added:
                    supported.remove(LayerwiseOffloadOptimizer)
                patches.revert()
    if section.optimizer_states.device != "none":
        from .masters import attach_master_offload

        opt = layerwise_optimizer(result[0])
        if opt is not None:
            from .atomic_step import attach as attach_atomic_step

            attach_master_offload(result[0], opt)
            attach_atomic_step(result[0], opt)  # after the masters' wrappers: the rollback uses them
    wire_activations(result[0], section, ds_config)
    attach_checkpoint_guard(result[0], section)
    return result


def _upstream_initialize() -> Any:
    import deepspeed

    current = deepspeed.initialize
    return getattr(current, "__layerwise_upstream__", current)


def initialize(
    args: Any = None,
    model: Any = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    distributed_port: int = 29500,
    mpu: Any = None,
    dist_init_required: Any = None,
    collate_fn: Any = None,
    config: Any = None,
    mesh_param: Any = None,
    config_params: Any = None,
) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` honouring the ``"layerwise_offload"`` section; same arguments, same 4-tuple.

    Without the section (or with every device 'none') this is exactly ``deepspeed.initialize``.
    """
    upstream = _upstream_initialize()
    bound = inspect.signature(upstream).bind(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters, training_data=training_data,
        lr_scheduler=lr_scheduler, distributed_port=distributed_port, mpu=mpu, dist_init_required=dist_init_required,
        collate_fn=collate_fn, config=config, mesh_param=mesh_param, config_params=config_params,
    )
    return _initialize_with(upstream, bound)


def _initialize_patch() -> Patch:
    def make(original: Any) -> Any:
        sig = inspect.signature(original)

        @functools.wraps(original)
        def layerwise_initialize(*a: Any, **k: Any) -> Any:
            return _initialize_with(original, sig.bind(*a, **k))

        layerwise_initialize.__layerwise_upstream__ = original  # type: ignore[attr-defined]
        return layerwise_initialize

    return Patch(
        name="deepspeed-initialize-layerwise",
        target="deepspeed:initialize",
        make_replacement=make,
        versions=DEEPSPEED_VERSIONS,
        reason=f"plain deepspeed.initialize honours the '{SECTION}' config section",
        distribution="deepspeed",
        rebind_imported=True,
    )


def enable() -> None:
    """Make plain ``deepspeed.initialize`` honour the section (idempotent; checks the DeepSpeed version)."""
    global _enabled
    with _lock:
        if _enabled is not None:
            return
        _check_version()
        patches = PatchSet(log=False)
        patches.apply([_initialize_patch()])
        _enabled = patches
        logger.info("%s: deepspeed.initialize now honours the section", SECTION)


def disable() -> None:
    """Put the original ``deepspeed.initialize`` back (idempotent)."""
    global _enabled
    with _lock:
        if _enabled is None:
            return
        _enabled.revert()
        _enabled = None


def is_enabled() -> bool:
    return _enabled is not None


def layerwise_optimizer(engine: Any) -> LayerwiseOffloadOptimizer | None:
    """The engine's :class:`LayerwiseOffloadOptimizer` (None without the section)."""
    return getattr(engine, "layerwise_offload_optimizer", None)


__all__ = ["initialize", "enable", "disable", "is_enabled", "layerwise_optimizer", "resolve_config",
           "section_from_config", "wire_activations", "DEEPSPEED_VERSIONS", "layer_of_params"]
