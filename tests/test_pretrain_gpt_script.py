"""scripts/pretrain_gpt.py as users run it: torchrun, directly or through the launcher."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_offload_plugin.testing.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "pretrain_gpt.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
SMALL = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
         "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "2", "--log-interval", "1"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [*TORCHRUN, "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), *args]


@pytest.mark.multiprocess
def test_launcher_runs_the_unchanged_script_with_plugin_flags(tmp_path):
    summary = tmp_path / "summary.json"
    proc = _run(_torchrun(2, "-m", "megatron_offload_plugin.launch", str(SCRIPT), *SMALL,
                          "--pipeline-model-parallel-size", "2", "--pipeline-schedule", "megatron",
                          "--activation-offload", "none", "--json-summary", str(summary)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [l for l in proc.stdout.splitlines() if " iteration " in l]
    assert len(lines) == 2
    for line in lines:
        assert re.search(r"lm loss: \d\.\d+E[+-]\d\d \|", line)
        assert "elapsed time per iteration (ms):" in line and "tokens per second:" in line
        peaks = re.search(r"peak activation memory per stage \(MiB\): ([\d./]+) \|", line).group(1)
        assert len(peaks.split("/")) == 2 and all(float(p) > 0 for p in peaks.split("/"))
    assert "run summary" in proc.stdout and "patches=pp-schedule-dispatch" in proc.stdout
    data = json.loads(summary.read_text())
    assert len(data["losses"]) == 2 and all(l > 0 for l in data["losses"])
    assert len(data["peak_activation_bytes"]) == 2 and min(data["peak_activation_bytes"]) > 0


@pytest.mark.multiprocess
def test_script_takes_plugin_flags_directly_with_interleaving(tmp_path):
    summary = tmp_path / "summary.json"
    proc = _run(_torchrun(2, str(SCRIPT), *SMALL, "--pipeline-model-parallel-size", "2",
                          "--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "4",
                          "--recompute-granularity", "full", "--recompute-method", "uniform",
                          "--recompute-num-layers", "1", "--pipeline-schedule", "megatron",
                          "--json-summary", str(summary)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(json.loads(summary.read_text())["losses"]) == 2


def test_help_lists_megatron_and_plugin_flags_together():
    proc = _run([sys.executable, str(SCRIPT), "--help"], timeout=120)
    assert proc.returncode == 0
    for flag in ("--num-layers", "--pipeline-model-parallel-size", "--num-layers-per-virtual-pipeline-stage",
                 "--recompute-granularity", "--pipeline-schedule", "--activation-offload", "--offload-plugin-config"):
        assert flag in proc.stdout


@pytest.mark.parametrize("entry", ["script", "launcher"])
def test_misspelled_plugin_flag_names_the_closest_option(entry):
    prefix = [sys.executable, str(SCRIPT)] if entry == "script" else \
        [sys.executable, "-m", "megatron_offload_plugin.launch", str(SCRIPT)]
    proc = _run([*prefix, "--pipeline-schedul", "zb-v"], timeout=120)
    assert proc.returncode == 2
    assert "did you mean '--pipeline-schedule'" in proc.stderr


def test_module_help_lists_subcommands():
    proc = _run([sys.executable, "-m", "megatron_offload_plugin", "--help"], timeout=120)
    assert proc.returncode == 0
    for sub in ("simulate", "launch", "config", "version"):
        assert sub in proc.stdout


@pytest.mark.multiprocess
def test_plugin_1f1b_runtime_trains_like_megatron_and_writes_a_chrome_trace(tmp_path):
    """Same flags, same seed: the plugin runtime's 1F1B gives Megatron's losses exactly."""
    runs = {}
    for schedule in ("megatron", "1f1b"):
        summary = tmp_path / f"{schedule}.json"
        extra = ["--pipeline-trace", str(tmp_path / "trace")] if schedule == "1f1b" else []
        proc = _run(_torchrun(2, str(SCRIPT), *SMALL, "--pipeline-model-parallel-size", "2",
                              "--pipeline-schedule", schedule, "--json-summary", str(summary), *extra))
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[schedule] = json.loads(summary.read_text())
    assert runs["1f1b"]["losses"] == runs["megatron"]["losses"]
    assert all(0.0 <= r < 1.0 for r in runs["1f1b"]["measured_bubble_rates"])
    traces = sorted((tmp_path / "trace").glob("pipeline_trace_iter*.json"))
    assert len(traces) == 2
    events = [e for e in json.loads(traces[0].read_text())["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in events} == {0, 1}
    assert sum(e["name"].endswith("F0") for e in events) == 2  # microbatch 0's forward on both ranks


def test_misspelled_key_in_a_config_file_is_a_clean_usage_error(tmp_path):
    bad = tmp_path / "plugin.yaml"
    bad.write_text("activaton_offload:\n  mode: none\n")
    proc = _run([sys.executable, str(SCRIPT), "--offload-plugin-config", str(bad)], timeout=120)
    assert proc.returncode == 2
    assert "unknown key 'activaton_offload'; did you mean 'activation_offload'?" in proc.stderr
    assert "Traceback" not in proc.stderr
