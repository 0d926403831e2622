"""The patch registry: check everything first, rebind every import site, revert to the identical objects."""

from __future__ import annotations

import logging
import sys
import textwrap
import types

import pytest
from packaging.version import Version

from megatron_offload_plugin.patches import (
    PLUGIN_MARKER,
    Patch,
    PatchDefinitionError,
    PatchError,
    PatchSet,
    UnsupportedVersionError,
    UpstreamMismatchError,
    registry,
    versions,
)

OK = ">=0.16,<0.20"
UPSTREAM = '''
def compute(x):
    return x + 1

def other(x):
    return x - 1

class Base:
    def inherited(self, x):
        return x

class Layer(Base):
    @staticmethod
    def backward(x):
        return x * 2

    @classmethod
    def build(cls, x):
        return (cls.__name__, x)

    def forward(self, x):
        return x
'''


def _module(name: str, source: str = "", **attrs: object) -> types.ModuleType:
    """A real module: functions defined by ``source`` name it as their home (``__module__``)."""
    module = types.ModuleType(name)
    exec(textwrap.dedent(source), module.__dict__)
    module.__dict__.update(attrs)
    return module


@pytest.fixture
def upstream(monkeypatch):
    """``fake_upstream`` (defines things), ``fake_pkg`` (re-exports), ``fake_user`` (from-imports)."""
    up = _module("fake_upstream", UPSTREAM)
    pkg = _module("fake_pkg", compute=up.compute)  # `from .fake_upstream import compute`
    user = _module("fake_user", compute=up.compute, renamed=up.compute)  # incl. `import ... as renamed`
    for module in (up, pkg, user):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return types.SimpleNamespace(up=up, pkg=pkg, user=user, compute=up.compute)


@pytest.fixture
def patch_set():
    """A quiet PatchSet that is reverted even when a test fails half-way."""
    ps = PatchSet(log=False)
    yield ps
    try:
        ps.revert()
    except PatchError:
        pass


def times_ten(original):
    def replacement(*args):
        return original(*args) * 10

    return replacement


def _patch(name="p", target="fake_upstream:compute", versions=OK, **kw) -> Patch:
    return Patch(name=name, target=target, make_replacement=kw.pop("factory", times_ten),
                 versions=versions, reason="test", **kw)


# -- apply and revert --------------------------------------------------------------------------


def test_apply_replaces_the_target_and_every_site_that_imported_it_by_name(upstream, patch_set):
    patch_set.apply([_patch()])
    for module, attr in [(upstream.up, "compute"), (upstream.pkg, "compute"),
                         (upstream.user, "compute"), (upstream.user, "renamed")]:
        assert getattr(module, attr)(1) == 20, f"{module.__name__}.{attr} was not rebound"
    assert sorted(patch_set.describe()[0]["sites"]) == sorted(
        ["fake_upstream:compute", "fake_pkg:compute", "fake_user:compute", "fake_user:renamed"])


def test_revert_restores_the_identical_original_object_at_every_site(upstream, patch_set):
    patch_set.apply([_patch()])
    patch_set.revert()
    for module, attr in [(upstream.up, "compute"), (upstream.pkg, "compute"),
                         (upstream.user, "compute"), (upstream.user, "renamed")]:
        assert getattr(module, attr) is upstream.compute
    assert patch_set.names() == [] and patch_set.describe() == []


def test_factory_receives_the_original_so_the_replacement_can_wrap_it(upstream, patch_set):
    seen = []
    patch_set.apply([_patch(factory=lambda orig: seen.append(orig) or times_ten(orig))])
    assert seen == [upstream.compute]


def test_applying_the_same_patches_twice_changes_nothing_the_second_time(upstream, patch_set):
    patch = _patch()
    patch_set.apply([patch])
    installed, described = upstream.up.compute, patch_set.describe()
    patch_set.apply([patch])
    patch_set.apply([patch, patch])
    assert upstream.up.compute is installed and patch_set.describe() == described


def test_reverting_twice_is_a_no_op(upstream, patch_set):
    patch_set.apply([_patch()])
    patch_set.revert()
    upstream.up.compute = marker = lambda x: x  # anything set after a revert is not ours to touch
    patch_set.revert()
    assert upstream.up.compute is marker


def test_one_name_with_two_definitions_is_refused(upstream, patch_set):
    patch_set.apply([_patch()])
    with pytest.raises(PatchError, match="patch name 'p' is used for two different patches"):
        patch_set.apply([_patch(target="fake_upstream:other")])
    with pytest.raises(PatchError, match="patch name 'q' is used for two different patches"):
        PatchSet(log=False).apply([_patch("q"), _patch("q", target="fake_upstream:other")])


def test_patches_are_reverted_newest_first(upstream, caplog, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    ps = PatchSet(log=True)
    ps.apply([_patch("a")])
    ps.apply([_patch("b", target="fake_upstream:other")])
    assert ps.names() == ["a", "b"]
    with caplog.at_level(logging.INFO, logger="megatron_offload_plugin.patches"):
        ps.revert()
    reverted = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reverted ")]
    assert reverted == ["reverted fake_upstream:other [b]", "reverted fake_upstream:compute [a]"]
    assert upstream.up.compute is upstream.compute and upstream.up.other(1) == 0


def test_rebind_imported_false_leaves_import_sites_alone(upstream, patch_set):
    patch_set.apply([_patch(rebind_imported=False)])
    assert upstream.up.compute(1) == 20 and upstream.user.compute is upstream.compute
    assert patch_set.describe()[0]["sites"] == ["fake_upstream:compute"]


def test_revert_also_restores_modules_that_imported_the_replacement_after_apply(upstream, patch_set, monkeypatch):
    patch_set.apply([_patch()])
    late = _module("fake_late", compute=upstream.pkg.compute)  # imported while patched
    monkeypatch.setitem(sys.modules, "fake_late", late)
    patch_set.revert()
    assert late.compute is upstream.compute


def test_replacements_are_tagged_with_the_patch_name(upstream, patch_set):
    patch_set.apply([_patch("tagged")])
    assert getattr(upstream.user.compute, PLUGIN_MARKER) == "tagged"


# -- class attributes --------------------------------------------------------------------------


def test_staticmethod_target_keeps_its_descriptor_and_reverts_to_the_identical_one(upstream, patch_set):
    raw = upstream.up.Layer.__dict__["backward"]
    seen = []
    patch_set.apply([_patch(target="fake_upstream:Layer.backward",
                            factory=lambda f: seen.append(f) or times_ten(f))])
    assert seen == [raw.__func__]  # the factory gets the function, not the descriptor
    assert isinstance(upstream.up.Layer.__dict__["backward"], staticmethod)
    assert upstream.up.Layer.backward(1) == 20 and upstream.up.Layer().backward(1) == 20
    patch_set.revert()
    assert upstream.up.Layer.__dict__["backward"] is raw


def test_classmethod_target_keeps_its_descriptor_and_reverts_to_the_identical_one(upstream, patch_set):
    raw = upstream.up.Layer.__dict__["build"]

    def factory(original):
        return lambda cls, x: original(cls, x * 10)

    patch_set.apply([_patch(target="fake_upstream:Layer.build", factory=factory)])
    assert isinstance(upstream.up.Layer.__dict__["build"], classmethod)
    assert upstream.up.Layer.build(1) == ("Layer", 10)
    patch_set.revert()
    assert upstream.up.Layer.__dict__["build"] is raw


def test_plain_method_target_is_replaced_in_the_class_dict(upstream, patch_set):
    raw = upstream.up.Layer.__dict__["forward"]
    patch_set.apply([_patch(target="fake_upstream:Layer.forward")])
    assert upstream.up.Layer().forward(2) == 20
    patch_set.revert()
    assert upstream.up.Layer.__dict__["forward"] is raw


def test_an_inherited_class_attribute_is_refused_naming_the_defining_class(upstream, patch_set):
    with pytest.raises(PatchError, match=r"inherits 'inherited' from fake_upstream\.Base; patch it where"):
        patch_set.apply([_patch(target="fake_upstream:Layer.inherited")])
    assert "inherited" not in upstream.up.Layer.__dict__


# -- refusals: everything is checked before anything changes -----------------------------------


def test_a_version_outside_the_range_is_refused_before_anything_changes(upstream, patch_set):
    good = _patch("good", target="fake_upstream:other")
    bad = _patch("bad", versions=">=0.30")  # excludes the installed 0.16.1
    with pytest.raises(UnsupportedVersionError, match=r"patch 'bad' supports megatron-core >=0\.30; installed 0\.16"):
        patch_set.apply([good, bad])
    assert upstream.up.other(1) == 0 and upstream.up.compute is upstream.compute and patch_set.names() == []


def test_unsupported_version_message_names_the_patch_the_range_the_installed_version_and_the_fix(
        upstream, patch_set, monkeypatch):
    monkeypatch.setattr(registry, "installed_version", lambda dist: Version("0.21.0"))
    with pytest.raises(UnsupportedVersionError) as err:
        patch_set.apply([_patch("pp-schedule-dispatch")])
    assert str(err.value) == (
        "patch 'pp-schedule-dispatch' supports megatron-core >=0.16,<0.20; installed 0.21.0. "
        "Install a supported megatron-core (pip install 'megatron-core>=0.16,<0.20') "
        "or a megatron-offload-plugin release that supports megatron-core 0.21.0.")


def test_a_missing_distribution_is_refused(upstream, patch_set):
    with pytest.raises(UnsupportedVersionError, match="no-such-dist-xyz is not installed"):
        patch_set.apply([_patch(distribution="no-such-dist-xyz")])
    assert upstream.up.compute is upstream.compute


def test_a_pre_release_inside_the_range_is_accepted_and_one_of_the_excluded_release_is_not(
        upstream, patch_set, monkeypatch):
    # packaging < 26 refuses every pre-release unless asked; PEP 440 keeps 0.20.0rc1 out of '<0.20'.
    monkeypatch.setattr(registry, "installed_version", lambda dist: Version("0.20.0rc1"))
    with pytest.raises(UnsupportedVersionError, match="installed 0.20.0rc1"):
        patch_set.apply([_patch()])
    monkeypatch.setattr(registry, "installed_version", lambda dist: Version("0.17.0rc1"))
    patch_set.apply([_patch()])
    assert upstream.up.compute(1) == 20


def test_two_patches_on_one_target_are_refused(upstream, patch_set):
    with pytest.raises(PatchError, match="patches 'a' and 'b' both replace fake_upstream:compute"):
        patch_set.apply([_patch("a"), _patch("b")])
    assert upstream.up.compute is upstream.compute


def test_two_patches_reaching_one_site_through_different_names_are_refused(upstream, patch_set):
    # 'b' targets the re-export, which 'a' rebinds as an import site of the same object.
    with pytest.raises(PatchError, match="patches '[ab]' and '[ab]' both replace fake_pkg:compute"):
        patch_set.apply([_patch("a"), _patch("b", target="fake_pkg:compute")])
    assert upstream.pkg.compute is upstream.compute


def test_a_target_held_by_another_patch_set_is_refused_until_that_one_reverts(upstream, patch_set):
    patch_set.apply([_patch("first")])
    second = PatchSet(log=False)
    with pytest.raises(PatchError, match="already replaced by megatron-offload-plugin patch 'first' .another PatchSet"):
        second.apply([_patch("second")])
    with pytest.raises(PatchError, match="fake_pkg:compute is already replaced"):
        second.apply([_patch("second", target="fake_pkg:compute")])
    patch_set.revert()
    second.apply([_patch("second")])
    second.revert()
    assert upstream.up.compute is upstream.compute


def test_a_target_replaced_by_a_third_party_is_refused(upstream, patch_set):
    upstream.up.compute = lambda x: -1  # another library patched the home, not the re-export
    with pytest.raises(PatchError, match=r"fake_pkg:compute is not the original .* it says it is fake_upstream:compute"):
        patch_set.apply([_patch(target="fake_pkg:compute")])
    assert upstream.pkg.compute is upstream.compute


def test_a_missing_module_or_attribute_is_refused(upstream, patch_set):
    with pytest.raises(PatchError, match="cannot import no_such_module_xyz"):
        patch_set.apply([_patch(target="no_such_module_xyz:f")])
    with pytest.raises(PatchError, match="fake_upstream has no attribute 'nope'"):
        patch_set.apply([_patch(target="fake_upstream:nope")])
    with pytest.raises(PatchError, match="Layer has no attribute 'nope'"):
        patch_set.apply([_patch(target="fake_upstream:Layer.nope")])


def test_an_extra_site_that_is_missing_or_does_not_hold_the_original_is_refused(upstream, patch_set):
    with pytest.raises(PatchError, match="fake_pkg has no attribute 'missing'"):
        patch_set.apply([_patch(extra_sites=("fake_pkg:missing",))])
    upstream.pkg.other = upstream.up.other
    with pytest.raises(PatchError, match="extra site fake_pkg:other does not hold the original fake_upstream:compute"):
        patch_set.apply([_patch(extra_sites=("fake_pkg:other",))])
    assert upstream.up.compute is upstream.compute and upstream.user.compute is upstream.compute


def test_an_extra_site_is_rebound_even_without_import_scanning(upstream, patch_set):
    patch_set.apply([_patch(rebind_imported=False, extra_sites=("fake_pkg:compute",))])
    assert upstream.pkg.compute(1) == 20 and upstream.user.compute is upstream.compute
    patch_set.revert()
    assert upstream.pkg.compute is upstream.compute


def test_a_failing_factory_changes_nothing(upstream, patch_set):
    def broken(original):
        raise KeyError("boom")

    with pytest.raises(PatchError, match="building the replacement for fake_upstream:other failed: KeyError"):
        patch_set.apply([_patch("a"), _patch("b", target="fake_upstream:other", factory=broken)])
    assert upstream.up.compute is upstream.compute and upstream.user.compute is upstream.compute


def test_a_factory_returning_the_original_is_refused(upstream, patch_set):
    with pytest.raises(PatchError, match="returned the original"):
        patch_set.apply([_patch(factory=lambda original: original)])


def test_a_write_that_fails_half_way_restores_every_site_already_written(upstream, patch_set, monkeypatch):
    class ReadOnly(types.ModuleType):
        def __setattr__(self, name, value):
            raise AttributeError(f"{name} is read-only")

    stubborn = ReadOnly("fake_stubborn")
    stubborn.__dict__["compute"] = upstream.compute
    monkeypatch.setitem(sys.modules, "fake_stubborn", stubborn)
    with pytest.raises(PatchError, match="could not write fake_stubborn:compute .* every site written so far was restored"):
        patch_set.apply([_patch()])
    for module in (upstream.up, upstream.pkg, upstream.user):
        assert module.compute is upstream.compute
    assert patch_set.names() == []
    del sys.modules["fake_stubborn"]
    patch_set.apply([_patch()])  # the failed attempt left no claims behind


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target": "fake_upstream.compute"}, "must look like 'package.module:attribute'"),
        ({"target": "fake_upstream:compute junk"}, "must look like"),
        ({"versions": "0.16+"}, "is not a PEP 440 specifier set"),
        ({"versions": ""}, "versions is empty"),
        ({"extra_sites": "fake_pkg:compute"}, r"write \('fake_pkg:compute',\)"),
        ({"extra_sites": ("fake_pkg",)}, "extra site 'fake_pkg' must look like"),
    ],
)
def test_a_malformed_patch_is_rejected_when_it_is_defined(kwargs, message):
    with pytest.raises(PatchDefinitionError, match=message) as err:
        _patch(**kwargs)
    assert isinstance(err.value, ValueError) and isinstance(err.value, PatchError)


def test_patch_is_frozen_and_slotted():
    patch = _patch(extra_sites=["fake_pkg:compute"])
    assert patch.extra_sites == ("fake_pkg:compute",) and not hasattr(patch, "__dict__")
    with pytest.raises(AttributeError):
        patch.name = "other"


# -- revert when someone patched over us -------------------------------------------------------


def test_revert_refuses_to_clobber_a_site_someone_patched_over_and_changes_nothing(upstream, patch_set):
    patch_set.apply([_patch()])
    ours = upstream.pkg.compute
    theirs = upstream.user.compute = lambda x: -1  # a third party patches one site after us
    with pytest.raises(PatchError, match=r"fake_user:compute \(patch 'p'\) was replaced by someone else"):
        patch_set.revert()
    assert upstream.user.compute is theirs and upstream.pkg.compute is ours and upstream.up.compute is ours
    upstream.user.compute = ours  # they undo their change: now we can revert
    patch_set.revert()
    assert upstream.user.compute is upstream.compute


# -- logging and describe ----------------------------------------------------------------------


def test_apply_logs_one_line_per_patch_and_a_summary(upstream, caplog, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    ps = PatchSet(log=True)
    with caplog.at_level(logging.INFO, logger="megatron_offload_plugin.patches"):
        ps.apply([_patch("a"), _patch("b", target="fake_upstream:other")])
    ps.revert()
    lines = [r.getMessage() for r in caplog.records if r.name == "megatron_offload_plugin.patches"]
    assert lines[0] == "patched fake_upstream:compute (+3 import sites) [a: test]"
    assert lines[1] == "patched fake_upstream:other (+0 import sites) [b: test]"
    assert lines[2].startswith("megatron-offload-plugin: applied 2 patch(es) on megatron-core 0.16") and lines[2].endswith(": a, b")


def test_only_rank_0_logs(upstream, caplog, monkeypatch):
    import torch.distributed

    # The launcher's RANK decides before a process group exists; in-process DeepSpeed
    # tests leave a one-rank group behind in this pytest process, so hide it here.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setenv("RANK", "1")
    ps = PatchSet(log=True)
    with caplog.at_level(logging.INFO, logger="megatron_offload_plugin.patches"):
        ps.apply([_patch()])
        ps.revert()
    assert not [r for r in caplog.records if r.name == "megatron_offload_plugin.patches"]


def test_describe_lists_each_patch_with_its_version_and_sites(upstream, patch_set):
    patch_set.apply([_patch(rebind_imported=False, extra_sites=("fake_pkg:compute",))])
    (entry,) = patch_set.describe()
    assert entry == {
        "name": "p", "target": "fake_upstream:compute", "reason": "test", "distribution": "megatron-core",
        "version": str(versions.megatron_core_version()), "sites": ["fake_upstream:compute", "fake_pkg:compute"],
    }


# -- real megatron-core ------------------------------------------------------------------------


def test_real_get_forward_backward_func_is_rebound_in_the_package_and_importers_then_restored(monkeypatch, patch_set):
    import megatron.core.pipeline_parallel as pp
    import megatron.core.pipeline_parallel.schedules as schedules

    original = schedules.get_forward_backward_func
    assert pp.get_forward_backward_func is original
    trainer = _module("fake_megatron_training")
    exec("from megatron.core.pipeline_parallel import get_forward_backward_func", trainer.__dict__)
    monkeypatch.setitem(sys.modules, trainer.__name__, trainer)

    patch_set.apply([Patch(
        name="pp-schedule-dispatch",
        target="megatron.core.pipeline_parallel.schedules:get_forward_backward_func",
        make_replacement=lambda orig: (lambda *a, **k: orig(*a, **k)),
        versions=OK, reason="test",
        extra_sites=("megatron.core.pipeline_parallel:get_forward_backward_func",),
    )])
    replacement = schedules.get_forward_backward_func
    assert replacement is not original
    assert pp.get_forward_backward_func is replacement and trainer.get_forward_backward_func is replacement
    assert replacement(pp_size=1, vp_size=None) is schedules.forward_backward_no_pipelining
    patch_set.revert()
    for site in (schedules, pp, trainer):
        assert site.get_forward_backward_func is original


def test_real_linear_backward_staticmethod_is_patched_in_the_class_and_restored(patch_set):
    from megatron.core.tensor_parallel import layers

    cls = layers.LinearWithGradAccumulationAndAsyncCommunication
    raw = cls.__dict__["backward"]
    patch_set.apply([Patch(
        name="linear-wgrad-split",
        target="megatron.core.tensor_parallel.layers:LinearWithGradAccumulationAndAsyncCommunication.backward",
        make_replacement=lambda orig: (lambda ctx, grad: orig(ctx, grad)),
        versions=OK, reason="test", rebind_imported=False,
    )])
    assert isinstance(cls.__dict__["backward"], staticmethod) and cls.__dict__["backward"] is not raw
    patch_set.revert()
    assert cls.__dict__["backward"] is raw


# -- versions helpers --------------------------------------------------------------------------


def test_installed_megatron_core_version_is_read_from_package_metadata():
    import megatron.core.package_info as info

    assert versions.megatron_core_version() == Version(info.__version__)
    assert versions.installed_version("no-such-dist-xyz") is None


@pytest.mark.parametrize(
    "version, model_type, location, schedule_pg",
    [
        ("0.16.1", True, "megatron.core.transformer.transformer_block:TransformerBlock._checkpointed_forward", False),
        ("0.17.0", False, "megatron.core.transformer.transformer_block:TransformerBlock._checkpointed_forward", False),
        ("0.18.0rc0", False, "megatron.core.transformer.recompute:checkpointed_forward", False),
        ("0.19.2", False, "megatron.core.transformer.recompute:checkpointed_forward", True),
    ],
)
def test_version_table_for_known_upstream_differences(version, model_type, location, schedule_pg):
    assert versions.backward_step_has_model_type(version) is model_type
    assert versions.checkpointed_forward_location(version) == location
    assert versions.get_forward_backward_func_takes_schedule_pg_collection(version) is schedule_pg


def test_helpers_agree_with_the_installed_megatron_core():
    installed = versions.megatron_core_version()
    assert installed is not None and installed.release[:2] == (0, 16), "these expectations are for 0.16.x"
    assert versions.backward_step_has_model_type() is True
    assert versions.checkpointed_forward_location() == (
        "megatron.core.transformer.transformer_block:TransformerBlock._checkpointed_forward")
    assert versions.get_forward_backward_func_takes_schedule_pg_collection() is False


def test_helpers_catch_installed_code_that_contradicts_its_version(monkeypatch):
    from megatron.core.pipeline_parallel import schedules

    def backward_step(input_tensor, output_tensor, output_tensor_grad, config):  # the 0.17 shape
        pass

    monkeypatch.setattr(schedules, "backward_step", backward_step)
    with pytest.raises(UpstreamMismatchError, match="backward_step has 'model_type' is True, but the installed code says False"):
        versions.backward_step_has_model_type()
    monkeypatch.setattr(versions, "megatron_core_version", lambda: Version("0.18.0"))
    with pytest.raises(UpstreamMismatchError, match=r"recompute:checkpointed_forward exists"):
        versions.checkpointed_forward_location()
