"""The launcher prints what it patched (rank 0, Megatron-LM's log format) before the script runs."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_offload_plugin import launch

ROOT = Path(__file__).resolve().parents[1]
PATCHED_WGRAD = "INFO:megatron_offload_plugin.patches:patched megatron.core.tensor_parallel.layers:"
# What Megatron-LM's training module does on import: a root handler on stdout at INFO.
MEGATRON_LM_LOGGING = "import logging, sys\nlogging.basicConfig(handlers=[logging.StreamHandler(sys.stdout)], level=logging.INFO)\n"


def _launch(tmp_path: Path, *flags: str, rank: str | None = None, script: str = "") -> subprocess.CompletedProcess:
    path = tmp_path / "train.py"
    path.write_text(script + "print('script ran')\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("RANK", None)
    if rank is not None:
        env["RANK"] = rank
    return subprocess.run([sys.executable, "-m", "megatron_offload_plugin.launch", str(path), *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _plugin_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "megatron_offload_plugin" in line]


def test_launcher_prints_each_patch_before_the_script_runs(tmp_path):
    proc = _launch(tmp_path, "--pipeline-schedule", "zb-h1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    ran = lines.index("script ran")
    before = lines[:ran]
    assert any(line.startswith(PATCHED_WGRAD) and line.endswith("[linear-wgrad-split: B/W split: input gradients "
                                                                 "in B, weight gradients in W]") for line in before)
    assert any("[pp-schedule-dispatch: pipeline schedule 'zb-h1']" in line for line in before)
    assert any("megatron-offload-plugin: applied 3 patch(es) on megatron-core" in line for line in before)
    assert any("reverted 3 patch(es)" in line for line in lines[ran:])


def test_launcher_quiet_prints_no_patch_lines(tmp_path):
    proc = _launch(tmp_path, "--pipeline-schedule", "zb-h1", "--offload-plugin-quiet")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "script ran" in proc.stdout
    assert _plugin_lines(proc) == []


def test_launcher_prints_nothing_on_other_ranks(tmp_path):
    proc = _launch(tmp_path, "--pipeline-schedule", "zb-h1", rank="1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "script ran" in proc.stdout
    assert _plugin_lines(proc) == []


def test_launcher_steps_aside_once_the_script_configures_logging(tmp_path):
    """Megatron-LM's basicConfig at import: the 'reverted' lines come once, through its handler."""
    proc = _launch(tmp_path, "--offload-plugin-log-level", "info", script=MEGATRON_LM_LOGGING)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reverted = [line for line in proc.stdout.splitlines() if "reverted 1 patch(es)" in line]
    assert len(reverted) == 1
    assert sum("applied 1 patch(es)" in line for line in proc.stdout.splitlines()) == 1


def test_launcher_suggests_its_log_flags_for_a_typo(tmp_path):
    proc = _launch(tmp_path, "--offload-plugin-quite")
    assert proc.returncode == 2
    assert "unknown option '--offload-plugin-quite'; did you mean '--offload-plugin-quiet'?" in proc.stderr


# ---------------------------------------------------------------- setup_logging in this process


@pytest.fixture
def clean_logging():
    """No handlers on the plugin's or the root logger (pytest's own are put back), levels restored."""
    plugin, root = logging.getLogger(launch.PLUGIN_LOGGER), logging.getLogger()

    @contextlib.contextmanager
    def isolated():
        saved = (plugin.handlers[:], plugin.level, root.handlers[:], root.level)
        plugin.handlers[:], root.handlers[:] = [], []
        plugin.setLevel(logging.NOTSET)
        try:
            yield plugin, root
        finally:
            plugin.handlers[:], root.handlers[:] = saved[0], saved[2]
            plugin.setLevel(saved[1])
            root.setLevel(saved[3])

    return isolated  # entered inside the test: pytest adds its capture handlers to root per phase


def test_setup_logging_adds_a_handler_on_rank_zero_only(clean_logging):
    with clean_logging() as (plugin, _):
        assert launch.setup_logging(None, rank=1) is None and plugin.handlers == []
        handler = launch.setup_logging(None, rank=0)
        assert plugin.handlers == [handler] and plugin.level == logging.INFO
        assert handler.formatter._fmt == logging.BASIC_FORMAT


def test_setup_logging_leaves_an_existing_configuration_alone(clean_logging):
    with clean_logging() as (plugin, root):
        root.addHandler(logging.NullHandler())
        assert launch.setup_logging("debug", rank=0) is None and plugin.handlers == []
        assert plugin.level == logging.DEBUG  # the level the user asked for still applies
    with clean_logging() as (plugin, root):
        plugin.setLevel(logging.ERROR)
        mine = logging.NullHandler()
        plugin.addHandler(mine)
        assert launch.setup_logging(None, rank=0) is None
        assert plugin.handlers == [mine] and plugin.level == logging.ERROR  # a level set before is kept
