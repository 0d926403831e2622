"""The one-GPU check, on a machine without one: it refuses cleanly, and its report has every key
issue 10 names with one failing section hiding none of the others (no GPU figure is faked)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megatron_offload_plugin.bench import gpu_check

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")

# The keys issue 10 (item 5) asks for, spelled out here so that a rename fails this test.
ISSUE_KEYS = {
    "bw_split", "bf16_gpt", "offload_bandwidth", "offload_iteration_time", "cuda_event_vs_wall",
    "transformer_engine_importable", "torch", "cuda", "device_name", "megatron_core", "errors",
}
CUDA_SECTIONS = {"bw_split", "bf16_gpt", "offload_bandwidth", "offload_iteration_time", "cuda_event_vs_wall"}


def test_refuses_without_a_cuda_device_with_exit_code_2_and_nothing_on_stdout():
    proc = subprocess.run([sys.executable, "-m", "megatron_offload_plugin.bench.gpu_check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.startswith("gpu_check: no CUDA device visible: torch ")
    assert "CPU-only build" in proc.stderr if torch.version.cuda is None else "nvidia-smi" in proc.stderr


def test_unknown_section_is_refused_naming_the_accepted_ones():
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--sections", "bw_split,bandwidth"])
    assert exit_info.value.code == 2
    with pytest.raises(ValueError, match=r"\['bandwidth'\]: unknown; accepted: bw_split, bf16_gpt"):
        gpu_check.build_report(["bandwidth"])


def test_report_has_every_issue_key_and_each_failing_section_is_reported_on_its_own():
    report = gpu_check.build_report()
    assert ISSUE_KEYS <= set(report) == set(gpu_check.REPORT_KEYS)
    assert report["torch"] == torch.__version__ and report["device_name"] is None
    assert report["megatron_core"] == "0.16.1"
    # Without CUDA every device section fails at its start, each recorded separately ...
    assert set(report["errors"]) == CUDA_SECTIONS
    for name in CUDA_SECTIONS:
        assert report[name] is None
        assert report["errors"][name].startswith("NoCudaDevice: gpu_check: no CUDA device visible")
    # ... and the section that needs no device still ran after them.
    te = report["transformer_engine_importable"]
    assert isinstance(te["importable"], bool) and set(te) >= {"importable", "version"}
    assert set(report["section_seconds"]) == set(gpu_check.SECTIONS)
