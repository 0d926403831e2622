"""The patch registry: check everything first, rebind every import site, revert exactly."""

from __future__ import annotations

import sys
import types

import pytest

from megatron_offload_plugin.patches import Patch, PatchError, PatchSet, UnsupportedVersionError
from megatron_offload_plugin.patches import versions

OK = ">=0.16,<0.20"


@pytest.fixture
def upstream(monkeypatch):
    """A fake upstream module, a module that imported its function by name, and a class."""
    mod = types.ModuleType("fake_upstream")

    def original(x):
        return x + 1

    class Layer:
        @staticmethod
        def backward(x):
            return x * 2

        def forward(self, x):
            return x

    mod.original = original
    mod.Layer = Layer
    user = types.ModuleType("fake_user")
    user.original = original  # `from fake_upstream import original`
    user.renamed = original  # `from fake_upstream import original as renamed`
    monkeypatch.setitem(sys.modules, "fake_upstream", mod)
    monkeypatch.setitem(sys.modules, "fake_user", user)
    return mod, user


def _wrap(orig):
    return lambda x: orig(x) * 10


def test_apply_replaces_target_and_every_import_site_then_revert_restores_identity(upstream):
    mod, user = upstream
    orig = mod.original
    ps = PatchSet(log=False)
    ps.apply([Patch("p", "fake_upstream:original", _wrap, OK, "test")])
    assert mod.original(1) == 20 and user.original(1) == 20 and user.renamed(1) == 20
    assert len(ps.describe()[0]["sites"]) == 3
    ps.revert()
    assert mod.original is orig and user.original is orig and user.renamed is orig


def test_apply_twice_is_a_no_op_and_revert_twice_too(upstream):
    mod, _ = upstream
    ps = PatchSet(log=False)
    patch = Patch("p", "fake_upstream:original", _wrap, OK, "test")
    ps.apply([patch])
    installed = mod.original
    ps.apply([patch])
    assert mod.original is installed and ps.names() == ["p"]
    ps.revert()
    ps.revert()
    assert mod.original(1) == 2


def test_staticmethod_target_keeps_its_descriptor_and_reverts_to_the_identical_one(upstream):
    mod, _ = upstream
    raw = mod.Layer.__dict__["backward"]
    ps = PatchSet(log=False)
    ps.apply([Patch("bw", "fake_upstream:Layer.backward", _wrap, OK, "test")])
    assert isinstance(mod.Layer.__dict__["backward"], staticmethod) and mod.Layer.backward(1) == 20
    ps.revert()
    assert mod.Layer.__dict__["backward"] is raw


def test_version_outside_the_range_is_refused_before_anything_changes(upstream, monkeypatch):
    mod, _ = upstream
    orig = mod.original
    ps = PatchSet(log=False)
    good = Patch("good", "fake_upstream:Layer.forward", _wrap, OK, "test")
    bad = Patch("bad", "fake_upstream:original", _wrap, ">=0.30", "test")
    with pytest.raises(UnsupportedVersionError, match=r"supports megatron-core >=0\.30; installed 0\.16\.1"):
        ps.apply([good, bad])
    assert mod.original is orig and "forward" in mod.Layer.__dict__ and ps.names() == []


def test_two_patches_on_one_target_are_refused(upstream):
    ps = PatchSet(log=False)
    with pytest.raises(PatchError, match="both replace fake_upstream:original"):
        ps.apply([Patch("a", "fake_upstream:original", _wrap, OK, "t"), Patch("b", "fake_upstream:original", _wrap, OK, "t")])


def test_a_target_already_patched_by_another_patch_set_is_refused(upstream):
    first = PatchSet(log=False)
    first.apply([Patch("a", "fake_upstream:original", _wrap, OK, "t")])
    with pytest.raises(PatchError, match="already replaced by megatron-offload-plugin"):
        PatchSet(log=False).apply([Patch("a2", "fake_upstream:original", _wrap, OK, "t")])
    first.revert()


def test_missing_target_and_bad_extra_site_are_refused(upstream):
    ps = PatchSet(log=False)
    with pytest.raises(PatchError, match="has no attribute 'nope'"):
        ps.apply([Patch("x", "fake_upstream:nope", _wrap, OK, "t")])
    with pytest.raises(PatchError, match="must look like"):
        ps.apply([Patch("x", "fake_upstream.original", _wrap, OK, "t")])
    with pytest.raises(PatchError, match="does not hold the original"):
        ps.apply([Patch("x", "fake_upstream:original", _wrap, OK, "t", extra_sites=("fake_upstream:Layer",))])


def test_revert_refuses_to_clobber_someone_patching_over_us(upstream):
    mod, _ = upstream
    ps = PatchSet(log=False)
    ps.apply([Patch("p", "fake_upstream:original", _wrap, OK, "t")])
    mod.original = lambda x: -1  # a third party patches after us
    with pytest.raises(PatchError, match="was replaced by someone else"):
        ps.revert()


def test_real_megatron_get_forward_backward_func_is_rebound_everywhere_and_restored(monkeypatch):
    import megatron.core.pipeline_parallel as pp
    import megatron.core.pipeline_parallel.schedules as schedules

    orig = schedules.get_forward_backward_func
    user = types.ModuleType("user_train")
    user.get_forward_backward_func = pp.get_forward_backward_func
    monkeypatch.setitem(sys.modules, "user_train", user)
    ps = PatchSet(log=False)
    ps.apply([Patch("d", "megatron.core.pipeline_parallel.schedules:get_forward_backward_func",
                    lambda o: (lambda *a, **k: o(*a, **k)), OK, "t",
                    extra_sites=("megatron.core.pipeline_parallel:get_forward_backward_func",))])
    assert pp.get_forward_backward_func is schedules.get_forward_backward_func is user.get_forward_backward_func
    assert pp.get_forward_backward_func is not orig
    ps.revert()
    assert pp.get_forward_backward_func is orig and user.get_forward_backward_func is orig


def test_version_helpers_match_the_installed_megatron_core():
    v = versions.megatron_core_version()
    assert v is not None and v.major == 0 and v.minor >= 16
    assert versions.backward_step_has_model_type() == (v.minor < 17)
    expected = "recompute" if v.minor >= 18 else "TransformerBlock._checkpointed_forward"
    assert expected in versions.checkpointed_forward_location()
    assert versions.get_forward_backward_func_takes_schedule_pg_collection() == (v.minor >= 19)
