"""The patch layer: every replacement of upstream code, checked first, applied atomically, reversible.

A :class:`Patch` names one upstream attribute (``"pkg.module:attr"`` or
``"pkg.module:Class.attr"``), the upstream versions it was written against, why
it exists, and a factory that builds the replacement from the original.

:meth:`PatchSet.apply` works in two phases.  The *plan* phase changes nothing:
it checks the installed version of every patch, resolves every target and
explicit site, refuses a target that is not the original (held by another
patch, or replaced by a third party), builds every replacement and finds every
module that imported the original by name.  Only when all of that succeeded
does the *install* phase write, and it rolls back if a write fails.
:meth:`PatchSet.revert` puts back exactly the objects it found (identity, class
descriptors included) and refuses, changing nothing, when someone patched over
one of our sites.

State: each :class:`PatchSet` owns what it applied (the caller keeps the set,
like ``plugin.apply()`` does).  The only module-level state is ``_CLAIMS``, the
sites currently held by any PatchSet in this process, plus its lock.  It is
needed because two independent PatchSets must not stack on one site: the second
would record our replacement as its "original" and a revert in the wrong order
would leave a half-patched upstream.  Identity checks against the target alone
cannot tell "our replacement" from "the original", so the claim is recorded.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import threading
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from .versions import installed_version

logger = logging.getLogger("megatron_offload_plugin.patches")

# Tag put on every replacement (when it has none yet), so users and tests can tell ours apart.
PLUGIN_MARKER = "__megatron_offload_plugin__"

_LOCATION = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_MISSING = object()


class PatchError(RuntimeError):
    """A patch cannot be applied or reverted safely; nothing was changed."""


class UnsupportedVersionError(PatchError):
    """The installed upstream version is outside what a patch was written for."""


class PatchDefinitionError(PatchError, ValueError):
    """A :class:`Patch` is malformed (bad target, specifier or sites); a bug in the patch list."""


class UpstreamMismatchError(PatchError):
    """The installed upstream code does not look like its version number says it should."""


# ---------------------------------------------------------------------------------------------
# The patch description


@dataclass(frozen=True, slots=True)
class Patch:
    """One replacement of one upstream attribute.

    ``make_replacement(original)`` gets the original object (for a staticmethod or
    classmethod, the function inside it) and returns the replacement, so a patch can
    wrap what it replaces.  ``versions`` is a PEP 440 specifier set checked against
    the installed ``distribution``.  With ``rebind_imported``, every module whose
    module-level attribute *is* the original (``from x import f``) is rebound too;
    ``extra_sites`` lists sites that must hold the original and are always rebound.
    """

    name: str
    target: str
    make_replacement: Callable[[Any], Any]
    versions: str
    reason: str
    distribution: str = "megatron-core"
    rebind_imported: bool = True
    extra_sites: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise PatchDefinitionError(f"patch for {self.target!r}: name must be a non-empty string")
        _check_location(self.name, "target", self.target)
        if isinstance(self.extra_sites, str):
            raise PatchDefinitionError(
                f"patch '{self.name}': extra_sites must be a tuple of 'module:attr' strings, "
                f"got the string {self.extra_sites!r}; write ({self.extra_sites!r},)"
            )
        object.__setattr__(self, "extra_sites", tuple(self.extra_sites))
        for site in self.extra_sites:
            _check_location(self.name, "extra site", site)
        if not callable(self.make_replacement):
            raise PatchDefinitionError(f"patch '{self.name}': make_replacement must be callable")
        if not self.versions.strip():
            raise PatchDefinitionError(
                f"patch '{self.name}': versions is empty; state the {self.distribution} versions "
                "it was checked against, e.g. '>=0.16,<0.20'"
            )
        try:
            SpecifierSet(self.versions)
        except InvalidSpecifier as err:
            raise PatchDefinitionError(
                f"patch '{self.name}': versions={self.versions!r} is not a PEP 440 specifier set "
                "(e.g. '>=0.16,<0.20')"
            ) from err


def _check_location(patch: str, what: str, location: str) -> None:
    if not isinstance(location, str) or not _LOCATION.fullmatch(location):
        raise PatchDefinitionError(
            f"patch '{patch}': {what} {location!r} must look like 'package.module:attribute' "
            "or 'package.module:Class.attribute'"
        )


# ---------------------------------------------------------------------------------------------
# Sites: one place (module or class attribute) that holds the patched object


@dataclass(frozen=True, slots=True)
class _Site:
    """A module or class attribute we replace; ``original`` is the raw stored value."""

    owner: Any
    attr: str
    label: str
    original: Any
    installed: Any

    @property
    def key(self) -> tuple[int, str]:
        return _key(self.owner, self.attr)

    def current(self) -> Any:
        return _raw_get(self.owner, self.attr)

    def install(self) -> None:
        setattr(self.owner, self.attr, self.installed)

    def restore(self) -> None:
        setattr(self.owner, self.attr, self.original)


def _key(owner: Any, attr: str) -> tuple[int, str]:
    return (id(owner), attr)


def _raw_get(owner: Any, attr: str) -> Any:
    """The value as stored (class ``__dict__`` for classes: descriptors stay descriptors)."""
    try:
        namespace = object.__getattribute__(owner, "__dict__")
    except AttributeError:
        return _MISSING
    return namespace.get(attr, _MISSING)


def _unwrap(raw: Any) -> tuple[Any, Callable[[Any], Any]]:
    """The function inside a staticmethod/classmethod, and how to wrap a replacement alike."""
    if isinstance(raw, staticmethod):
        return raw.__func__, staticmethod
    if isinstance(raw, classmethod):
        return raw.__func__, classmethod
    return raw, lambda obj: obj


@dataclass(frozen=True, slots=True)
class _Located:
    """A resolved ``module:attr`` location: its owner, attribute and raw stored value."""

    owner: Any
    attr: str
    raw: Any
    label: str


def _locate(patch: Patch, location: str) -> _Located:
    """Import and walk a location; class attributes must be defined on that class itself."""
    module_name, _, path = location.partition(":")
    try:
        owner: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise PatchError(f"patch '{patch.name}': cannot import {module_name} for {location}: {err}") from err
    *parents, attr = path.split(".")
    for part in parents:
        value = getattr(owner, part, _MISSING)
        if value is _MISSING:
            raise PatchError(f"patch '{patch.name}': {location}: {_name(owner)} has no attribute {part!r}")
        owner = value
    if not isinstance(owner, (type, types.ModuleType)):
        raise PatchError(
            f"patch '{patch.name}': {location}: {_name(owner)} is a {type(owner).__name__}; "
            "only module and class attributes can be patched"
        )
    raw = _raw_get(owner, attr)
    if raw is _MISSING:
        raise PatchError(f"patch '{patch.name}': {location}: {_missing_reason(owner, attr)}")
    return _Located(owner, attr, raw, location)


def _name(owner: Any) -> str:
    return getattr(owner, "__qualname__", None) or getattr(owner, "__name__", None) or repr(owner)


def _missing_reason(owner: Any, attr: str) -> str:
    if isinstance(owner, type):
        base = next((b for b in owner.__mro__[1:] if attr in b.__dict__), None)
        if base is not None:
            return (
                f"class {owner.__qualname__} inherits {attr!r} from {base.__module__}.{base.__qualname__}; "
                "patch it where it is defined"
            )
        return f"class {owner.__qualname__} has no attribute {attr!r}"
    return f"{owner.__name__} has no attribute {attr!r}"


def _home_mismatch(function: Any) -> str | None:
    """Where ``function`` says it was defined, if that place now holds something else.

    An upstream function names its home (``__module__``/``__qualname__``).  If that home
    resolves to a different object, one of the two was replaced by someone else, and
    the object at our target is not the original we were written against.  Homes that
    cannot be resolved (``<locals>``, modules not loaded) tell nothing and are skipped.
    """
    module = sys.modules.get(getattr(function, "__module__", None) or "")
    qualname = getattr(function, "__qualname__", None)
    if module is None or not isinstance(qualname, str) or "<" in qualname:
        return None
    value: Any = module
    for part in qualname.split("."):
        value = _raw_get(value, part)
        if value is _MISSING:
            return None
    value, _ = _unwrap(value)
    if value is function:
        return None
    return f"{module.__name__}:{qualname}"


def _import_sites(obj: Any, skip: set[tuple[int, str]]) -> list[tuple[types.ModuleType, str, str]]:
    """Every module-level attribute in ``sys.modules`` that *is* ``obj`` (``from x import f``)."""
    found = []
    for module_name, module in list(sys.modules.items()):
        if not isinstance(module, types.ModuleType):
            continue
        try:  # raw read: do not trigger lazy modules
            namespace = object.__getattribute__(module, "__dict__")
        except AttributeError:
            continue
        for attr, value in list(namespace.items()):
            if value is obj and _key(module, attr) not in skip:
                found.append((module, attr, f"{module_name}:{attr}"))
    return found


# ---------------------------------------------------------------------------------------------
# Process-wide claims (see the module docstring for why this is the one global)


@dataclass(frozen=True, slots=True)
class _Claim:
    owner: Any  # kept alive so its id() cannot be reused while claimed
    patch: str
    patch_set: int


_CLAIMS: dict[tuple[int, str], _Claim] = {}
_LOCK = threading.RLock()


# ---------------------------------------------------------------------------------------------
# Applied patches


@dataclass(frozen=True, slots=True)
class _Applied:
    """A patch as installed: the original function, our replacement, every site we wrote."""

    patch: Patch
    version: Version
    function: Any
    replacement: Any
    sites: tuple[_Site, ...] = field(default=())

    @property
    def import_site_count(self) -> int:
        return len(self.sites) - 1


def _rank() -> int:
    """torch.distributed rank if initialized, else ``RANK``, else 0 (never imports torch)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class PatchSet:
    """Patches applied together and reverted together; the caller owns the set."""

    def __init__(self, *, log: bool = True) -> None:
        self._applied: dict[str, _Applied] = {}
        self._log = log

    # -- queries -------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Names of the applied patches, in the order they were applied."""
        return list(self._applied)

    def describe(self) -> list[dict[str, Any]]:
        """Applied patches and every site each one changed (target first), for logs and tests."""
        return [
            {
                "name": a.patch.name,
                "target": a.patch.target,
                "reason": a.patch.reason,
                "distribution": a.patch.distribution,
                "version": str(a.version),
                "sites": [site.label for site in a.sites],
            }
            for a in self._applied.values()
        ]

    def __repr__(self) -> str:
        return f"PatchSet({', '.join(self._applied) or 'nothing applied'})"

    # -- apply ---------------------------------------------------------------------------------

    def apply(self, patches: Sequence[Patch]) -> None:
        """Check every patch, then install all of them; patches already applied here are skipped.

        Raises :class:`UnsupportedVersionError` or :class:`PatchError` with nothing changed.
        """
        with _LOCK:
            todo = self._select_new(patches)
            if not todo:
                return
            plans = self._plan(todo)
            self._install(plans)
            self._log_applied(plans)

    def _select_new(self, patches: Sequence[Patch]) -> list[Patch]:
        """Drop patches applied already; one name must always mean one definition."""
        new: dict[str, Patch] = {}
        for patch in patches:
            known = self._applied[patch.name].patch if patch.name in self._applied else new.get(patch.name)
            if known is None:
                new[patch.name] = patch
            elif known != patch:
                raise PatchError(
                    f"patch name '{patch.name}' is used for two different patches "
                    f"({known.target} and {patch.target}, or different factories); "
                    "revert this PatchSet before applying a changed definition"
                )
        return list(new.values())

    def _plan(self, patches: list[Patch]) -> list[_Applied]:
        """Every check, every replacement and every site, without changing anything."""
        versions = [_check_version(p) for p in patches]
        located = [self._locate_checked(p) for p in patches]
        owners: dict[tuple[int, str], str] = {}
        for patch, (target, extras) in zip(patches, located):
            for site in (target, *extras):
                _claim_once(owners, site.owner, site.attr, site.label, patch.name)
        built = [_build(p, target) for p, (target, _) in zip(patches, located)]
        plans = []
        for patch, version, (target, extras), (function, replacement) in zip(patches, versions, located, built):
            sites = _sites_for(patch, target, extras, function, replacement)
            for site in sites:  # import sites found by the scan can collide too
                _claim_once(owners, site.owner, site.attr, site.label, patch.name)
            plans.append(_Applied(patch, version, function, replacement, sites))
        return plans

    def _locate_checked(self, patch: Patch) -> tuple[_Located, list[_Located]]:
        """Target and extra sites, each still holding the original upstream object."""
        target = _locate(patch, patch.target)
        self._refuse_claimed(patch, target)
        function, _ = _unwrap(target.raw)
        home = _home_mismatch(function)
        if home is not None:
            raise PatchError(
                f"patch '{patch.name}': {patch.target} is not the original {patch.distribution} object: "
                f"it says it is {home}, which now holds something else. Another library has patched "
                f"one of them; load megatron-offload-plugin first or drop that patch"
            )
        extras = []
        for location in patch.extra_sites:
            site = _locate(patch, location)
            self._refuse_claimed(patch, site)
            if site.raw is not target.raw and site.raw is not function:
                raise PatchError(
                    f"patch '{patch.name}': extra site {location} does not hold the original "
                    f"{patch.target} (it holds {site.raw!r}); fix extra_sites or find who replaced it"
                )
            extras.append(site)
        return target, extras

    def _refuse_claimed(self, patch: Patch, site: _Located) -> None:
        claim = _CLAIMS.get(_key(site.owner, site.attr))
        if claim is None:
            return
        whose = "this PatchSet" if claim.patch_set == id(self) else "another PatchSet; revert that one first"
        raise PatchError(
            f"patch '{patch.name}': {site.label} is already replaced by megatron-offload-plugin "
            f"patch '{claim.patch}' ({whose})"
        )

    def _install(self, plans: list[_Applied]) -> None:
        """Write every site; on any failure put back what was written and raise."""
        done: list[_Site] = []
        for plan in plans:
            for site in plan.sites:
                try:
                    site.install()
                except Exception as err:
                    for written in reversed(done):
                        written.restore()
                    raise PatchError(
                        f"patch '{plan.patch.name}': could not write {site.label} ({err!r}); "
                        "every site written so far was restored"
                    ) from err
                done.append(site)
        for plan in plans:
            for site in plan.sites:
                _CLAIMS[site.key] = _Claim(site.owner, plan.patch.name, id(self))
            self._applied[plan.patch.name] = plan

    def _log_applied(self, plans: list[_Applied]) -> None:
        if not self._log or _rank() != 0:
            return
        for plan in plans:
            logger.info(
                "patched %s (+%d import sites) [%s: %s]",
                plan.patch.target, plan.import_site_count, plan.patch.name, plan.patch.reason,
            )
        found = sorted({f"{p.patch.distribution} {p.version}" for p in plans})
        logger.info(
            "megatron-offload-plugin: applied %d patch(es) on %s: %s",
            len(plans), ", ".join(found), ", ".join(p.patch.name for p in plans),
        )

    # -- revert --------------------------------------------------------------------------------

    def revert(self) -> None:
        """Restore every site, newest patch first; idempotent.

        Raises :class:`PatchError`, reverting nothing, if a site no longer holds our
        replacement (someone patched over us): restoring it would drop their change.
        Modules that imported a replacement by name after apply are restored as well.
        """
        with _LOCK:
            applied = list(self._applied.values())
            if not applied:
                return
            _refuse_overwritten(applied)
            late_total = 0
            for plan in reversed(applied):
                late_total += _restore(plan)
                del self._applied[plan.patch.name]
                if self._log and _rank() == 0:
                    logger.info("reverted %s [%s]", plan.patch.target, plan.patch.name)
            if self._log and _rank() == 0:
                logger.info(
                    "megatron-offload-plugin: reverted %d patch(es) (%d late import site(s) restored)",
                    len(applied), late_total,
                )


# ---------------------------------------------------------------------------------------------
# Plan and revert steps (free functions: none of them needs the PatchSet)


def _check_version(patch: Patch) -> Version:
    """The installed version of the patch's distribution, if the patch supports it."""
    version = installed_version(patch.distribution)
    fix = f"Install a supported {patch.distribution} (pip install '{patch.distribution}{patch.versions}')"
    if version is None:
        raise UnsupportedVersionError(
            f"patch '{patch.name}' supports {patch.distribution} {patch.versions}; "
            f"{patch.distribution} is not installed. {fix}."
        )
    # Pre-releases count: a 0.17.0rc1 build is inside '>=0.16,<0.20' (PEP 440 still keeps
    # 0.20.0rc1 outside '<0.20').
    if not SpecifierSet(patch.versions).contains(version, prereleases=True):
        raise UnsupportedVersionError(
            f"patch '{patch.name}' supports {patch.distribution} {patch.versions}; installed {version}. "
            f"{fix} or a megatron-offload-plugin release that supports {patch.distribution} {version}."
        )
    return version


def _claim_once(owners: dict[tuple[int, str], str], owner: Any, attr: str, label: str, patch: str) -> None:
    """Record that ``patch`` writes this site; two patches writing one site is an error."""
    other = owners.setdefault(_key(owner, attr), patch)
    if other != patch:
        raise PatchError(
            f"patches '{other}' and '{patch}' both replace {label}; merge them into one patch "
            "(a replacement can wrap the original) or drop one"
        )


def _build(patch: Patch, target: _Located) -> tuple[Any, Any]:
    """Call the factory with the original function; a factory failure changes nothing."""
    function, _ = _unwrap(target.raw)
    try:
        replacement = patch.make_replacement(function)
    except PatchError:
        raise
    except Exception as err:
        raise PatchError(f"patch '{patch.name}': building the replacement for {patch.target} failed: {err!r}") from err
    if replacement is function or replacement is target.raw:
        raise PatchError(
            f"patch '{patch.name}': make_replacement returned the original {patch.target}; "
            "a patch that changes nothing should not be registered"
        )
    if getattr(replacement, PLUGIN_MARKER, None) is None:
        try:
            setattr(replacement, PLUGIN_MARKER, patch.name)
        except (AttributeError, TypeError):
            pass  # objects without a __dict__ just stay untagged
    return function, replacement


def _sites_for(patch: Patch, target: _Located, extras: list[_Located], function: Any, replacement: Any) -> tuple[_Site, ...]:
    """Target first, then explicit sites, then (if asked) every module that imported the original."""
    _, rewrap = _unwrap(target.raw)

    def site(located: _Located) -> _Site:
        installed = rewrap(replacement) if located.raw is target.raw else replacement
        return _Site(located.owner, located.attr, located.label, located.raw, installed)

    sites = [site(target)]
    seen = {sites[0].key}
    for extra in extras:
        if _key(extra.owner, extra.attr) not in seen:
            sites.append(site(extra))
            seen.add(sites[-1].key)
    if patch.rebind_imported:
        for module, attr, label in _import_sites(function, seen):
            sites.append(_Site(module, attr, label, function, replacement))
    return tuple(sites)


def _refuse_overwritten(applied: list[_Applied]) -> None:
    """Raise naming every site that someone replaced after us; checked before any restore."""
    lost = [
        (plan.patch.name, site.label)
        for plan in applied
        for site in plan.sites
        if site.current() is not site.installed
    ]
    if lost:
        names = ", ".join(f"{label} (patch '{name}')" for name, label in lost)
        raise PatchError(
            f"cannot revert: {names} was replaced by someone else after megatron-offload-plugin "
            "patched it; undo that change first, then revert again. Nothing was reverted."
        )


def _restore(plan: _Applied) -> int:
    """Put back the originals of one patch; returns how many late import sites were restored."""
    skip = {site.key for site in plan.sites}
    late = _import_sites(plan.replacement, skip) if plan.patch.rebind_imported else []
    for site in reversed(plan.sites):
        site.restore()
        _CLAIMS.pop(site.key, None)
    for module, attr, _ in late:
        setattr(module, attr, plan.function)
    return len(late)
