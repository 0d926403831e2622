"""apply()/revert(): the default config patches only the schedule dispatcher, reversibly."""

from __future__ import annotations

import logging
import sys
import types

import pytest

import megatron_offload_plugin as mop
from megatron_offload_plugin.patches.megatron_core import PLUGIN_MARKER


@pytest.fixture(autouse=True)
def _always_revert():
    yield
    mop.revert()


def _sites():
    import megatron.core.pipeline_parallel as pp
    import megatron.core.pipeline_parallel.schedules as schedules

    return pp, schedules


def test_apply_rebinds_every_import_site_and_revert_restores_the_originals(monkeypatch):
    pp, schedules = _sites()
    original = schedules.get_forward_backward_func
    user_module = types.ModuleType("user_training_script")
    user_module.get_forward_backward_func = pp.get_forward_backward_func  # `from ... import` before apply
    monkeypatch.setitem(sys.modules, "user_training_script", user_module)

    mop.apply()
    for site in (schedules, pp, user_module):
        assert getattr(site.get_forward_backward_func, PLUGIN_MARKER, None) == "pp-schedule-dispatch"
    mop.revert()
    for site in (schedules, pp, user_module):
        assert site.get_forward_backward_func is original


def test_default_dispatcher_returns_megatrons_own_schedule_functions():
    pp, schedules = _sites()
    expected = {
        (1, None): schedules.forward_backward_no_pipelining,
        (4, None): schedules.forward_backward_pipelining_without_interleaving,
        (4, 2): schedules.forward_backward_pipelining_with_interleaving,
    }
    mop.apply()
    for (pp_size, vp_size), func in expected.items():
        assert pp.get_forward_backward_func(pp_size=pp_size, vp_size=vp_size) is func


def test_apply_is_idempotent_for_the_same_config_and_refuses_another():
    _, schedules = _sites()
    mop.apply({})
    installed = schedules.get_forward_backward_func
    mop.apply({"schedule": {"pipeline_schedule": "megatron"}})  # equal config: no-op
    assert schedules.get_forward_backward_func is installed
    other = {"telemetry": {"log_patches": False}}
    with pytest.raises(RuntimeError, match="already applied with another configuration"):
        mop.apply(other)


def test_revert_without_apply_is_a_no_op():
    _, schedules = _sites()
    original = schedules.get_forward_backward_func
    mop.revert()
    mop.revert()
    assert schedules.get_forward_backward_func is original and not mop.is_applied()


def test_unsupported_megatron_core_version_fails_at_apply_and_changes_nothing(monkeypatch):
    from packaging.version import Version

    from megatron_offload_plugin.patches import registry

    _, schedules = _sites()
    original = schedules.get_forward_backward_func
    monkeypatch.setattr(registry, "installed_version", lambda dist: Version("0.21.0"))
    with pytest.raises(RuntimeError, match=r"0\.21\.0"):
        mop.apply()
    assert schedules.get_forward_backward_func is original and not mop.is_applied()


def test_apply_logs_what_it_patched(caplog):
    with caplog.at_level(logging.INFO, logger="megatron_offload_plugin"):
        mop.apply()
    assert any("get_forward_backward_func" in r.getMessage() for r in caplog.records)


def test_apply_rejects_a_misspelled_section_with_the_closest_name():
    with pytest.raises(ValueError, match="did you mean 'activation_offload'"):
        mop.apply({"activaton_offload": {"mode": "none"}})
    assert not mop.is_applied()
