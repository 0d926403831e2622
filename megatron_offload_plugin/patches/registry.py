"""The patch layer: every replacement of upstream code, checked first, applied atomically, reversible.

A :class:`Patch` names one upstream attribute (``"pkg.module:attr"`` or
``"pkg.module:Class.method"``), the upstream versions it was written against,
why it exists, and a factory that builds the replacement from the original.
:class:`PatchSet` checks every patch (installed version, target present and
still the original, no two patches on one target, explicit rebinding sites)
before changing anything; then it replaces the target and rebinds every module
that had imported the original by name (``from x import f``).  ``revert()``
puts back exactly the objects it found, and refuses to clobber a site that
someone else patched after us.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from packaging.specifiers import SpecifierSet

from .versions import installed_version

logger = logging.getLogger("megatron_offload_plugin.patches")


class PatchError(RuntimeError):
    """A patch cannot be applied or reverted safely; nothing was changed."""


class UnsupportedVersionError(PatchError):
    """The installed upstream version is outside what a patch was written for."""


@dataclass(frozen=True, slots=True)
class Patch:
    name: str
    target: str
    make_replacement: Callable[[Any], Any]
    versions: str
    reason: str
    distribution: str = "megatron-core"
    rebind_imported: bool = True
    extra_sites: tuple[str, ...] = ()


@dataclass
class _Site:
    owner: Any  # module or class
    attr: str
    original: Any  # raw value as stored (descriptor for class attributes)
    replacement: Any

    def describe(self) -> str:
        owner = getattr(self.owner, "__name__", repr(self.owner))
        return f"{owner}.{self.attr}"


@dataclass
class _Applied:
    patch: Patch
    sites: list[_Site] = field(default_factory=list)


def _split_target(target: str) -> tuple[str, list[str]]:
    module, sep, attrs = target.partition(":")
    if not sep or not module or not attrs:
        raise PatchError(f"patch target {target!r} must look like 'package.module:attribute'")
    return module, attrs.split(".")


def _resolve(target: str) -> tuple[Any, str, Any]:
    """(owner, attribute name, raw stored value) for a target string."""
    module_name, attrs = _split_target(target)
    try:
        owner: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise PatchError(f"patch target {target!r}: cannot import {module_name}: {err}") from err
    for attr in attrs[:-1]:
        if not hasattr(owner, attr):
            raise PatchError(f"patch target {target!r}: {owner.__name__} has no attribute {attr!r}")
        owner = getattr(owner, attr)
    last = attrs[-1]
    if isinstance(owner, type):
        if last not in owner.__dict__:
            raise PatchError(f"patch target {target!r}: class {owner.__name__} defines no {last!r}")
        return owner, last, owner.__dict__[last]
    if not hasattr(owner, last):
        raise PatchError(f"patch target {target!r}: {owner.__name__} has no attribute {last!r}")
    return owner, last, getattr(owner, last)


def _unwrap_descriptor(raw: Any) -> tuple[Any, Callable[[Any], Any]]:
    """The function inside a staticmethod/classmethod, and how to wrap a replacement the same way."""
    if isinstance(raw, staticmethod):
        return raw.__func__, staticmethod
    if isinstance(raw, classmethod):
        return raw.__func__, classmethod
    return raw, lambda f: f


def _rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", "0"))


class PatchSet:
    """Patches applied together and reverted together."""

    def __init__(self, *, log: bool = True) -> None:
        self._applied: list[_Applied] = []
        self._log = log

    def names(self) -> list[str]:
        return [a.patch.name for a in self._applied]

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"name": a.patch.name, "target": a.patch.target, "reason": a.patch.reason,
             "sites": [s.describe() for s in a.sites]}
            for a in self._applied
        ]

    def _check(self, patch: Patch) -> tuple[Any, str, Any]:
        version = installed_version(patch.distribution)
        if version is None:
            raise UnsupportedVersionError(f"patch '{patch.name}' needs {patch.distribution}, which is not installed")
        if version not in SpecifierSet(patch.versions):
            raise UnsupportedVersionError(
                f"patch '{patch.name}' supports {patch.distribution} {patch.versions}; installed "
                f"{version}. Install a supported {patch.distribution} or an updated megatron-offload-plugin."
            )
        owner, attr, raw = _resolve(patch.target)
        if getattr(raw, "__megatron_offload_plugin__", None) is not None or getattr(
            getattr(raw, "__func__", None), "__megatron_offload_plugin__", None
        ) is not None:
            raise PatchError(
                f"patch '{patch.name}': {patch.target} is already replaced by megatron-offload-plugin "
                "(another PatchSet); revert that one first"
            )
        for site in patch.extra_sites:
            s_owner, s_attr, s_raw = _resolve(site)
            if s_raw is not raw:
                raise PatchError(
                    f"patch '{patch.name}': site {site} does not hold the original {patch.target} "
                    "(patched by someone else?)"
                )
        return owner, attr, raw

    def apply(self, patches: Sequence[Patch]) -> None:
        """Check all, then apply all; patches this set already applied are skipped."""
        todo = [p for p in patches if p.name not in self.names()]
        targets: dict[str, str] = {a.patch.target: a.patch.name for a in self._applied}
        resolved = []
        for patch in todo:
            if patch.target in targets:
                raise PatchError(f"patches '{targets[patch.target]}' and '{patch.name}' both replace {patch.target}")
            targets[patch.target] = patch.name
            resolved.append((patch, *self._check(patch)))
        for patch, owner, attr, raw in resolved:
            self._applied.append(self._apply_one(patch, owner, attr, raw))
        if self._log and resolved and _rank() == 0:
            logger.info("megatron-offload-plugin: %d patch(es) applied: %s", len(resolved),
                        ", ".join(p.name for p, *_ in resolved))

    def _apply_one(self, patch: Patch, owner: Any, attr: str, raw: Any) -> _Applied:
        function, rewrap = _unwrap_descriptor(raw)
        replacement = patch.make_replacement(function)
        try:
            setattr(replacement, "__megatron_offload_plugin__", patch.name)
        except (AttributeError, TypeError):  # pragma: no cover - builtins
            pass
        applied = _Applied(patch)
        stored = rewrap(replacement)
        setattr(owner, attr, stored)
        applied.sites.append(_Site(owner, attr, raw, stored))
        seen = {(id(owner), attr)}
        for site in patch.extra_sites:
            s_owner, s_attr, _ = _resolve(site)
            if (id(s_owner), s_attr) not in seen:
                setattr(s_owner, s_attr, replacement)
                applied.sites.append(_Site(s_owner, s_attr, function, replacement))
                seen.add((id(s_owner), s_attr))
        if patch.rebind_imported and not isinstance(owner, type):
            for module in list(sys.modules.values()):
                if module is None:
                    continue
                try:
                    names = [n for n, v in vars(module).items() if v is function]
                except TypeError:  # pragma: no cover - exotic module objects
                    continue
                for name in names:
                    if (id(module), name) not in seen:
                        setattr(module, name, replacement)
                        applied.sites.append(_Site(module, name, function, replacement))
                        seen.add((id(module), name))
        if self._log and _rank() == 0:
            logger.info("patched %s (+%d import site(s)) [%s: %s]", patch.target, len(applied.sites) - 1,
                        patch.name, patch.reason)
        return applied

    def revert(self) -> None:
        """Restore every site, newest patch first; refuse sites someone else patched after us."""
        for applied in reversed(self._applied):
            for site in applied.sites:
                current = site.owner.__dict__.get(site.attr) if isinstance(site.owner, type) else getattr(site.owner, site.attr, None)
                if current is not site.replacement:
                    raise PatchError(
                        f"cannot revert patch '{applied.patch.name}': {site.describe()} was replaced "
                        "by someone else after megatron-offload-plugin patched it"
                    )
        while self._applied:
            applied = self._applied.pop()
            for site in reversed(applied.sites):
                setattr(site.owner, site.attr, site.original)
            if self._log and _rank() == 0:
                logger.info("reverted %s [%s]", applied.patch.target, applied.patch.name)
