"""Every change the plugin makes to upstream code goes through this registry (see registry.py)."""

from .registry import Patch, PatchError, PatchSet, UnsupportedVersionError

__all__ = ["Patch", "PatchError", "PatchSet", "UnsupportedVersionError"]
