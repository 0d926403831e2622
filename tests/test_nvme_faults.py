"""Nothing lost under NVMe faults: real DeepSpeed engines with the layer-wise NVMe tier, faults injected for real.

* Lost and shortened aio transfers come from the LD_PRELOAD shim around libaio's
  ``io_submit`` (``testing/aio_fault_shim.c``), switched on and off by the child
  itself through ``MOP_AIO_FAULT``.  This file is also that child
  (``python tests/test_nvme_faults.py RESULTS BASE SCENARIO...``): one interpreter
  runs every shim scenario (starting torch and DeepSpeed takes seconds) and writes
  its findings to a JSON file the tests assert on.
* A disk that fills up is a real 2 MiB tmpfs (needs root to mount), filled
  by a second file as another process would.
* SIGTERM mid-step is sent by the child to itself from inside the step.

Each scenario compares, bit for bit, with a run of the same model and data that
had no fault: after a failed step the engine must be exactly as before it, and the
same iteration run again must give exactly what the fault-free run gave.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest

from megatron_offload_plugin.offload.nvme import aio_available
from megatron_offload_plugin.testing.aio_faults import SPEC_ENV, ShimBuildError, build_shim, fault_env

CHILD_TIMEOUT_S = 300
AIO_OK, AIO_WHY = aio_available()
pytestmark = pytest.mark.skipif(not AIO_OK, reason=f"DeepSpeed aio unavailable: {AIO_WHY}")
STEPS = 3
PER_STEP = 2  # micro-batches per optimizer step (tiny.ds_config: gradient accumulation 2)


# ------------------------------------------------------------------ the child side


def _engine(base: Path, name: str, *, stage: int = 0, prefetch: int = 2) -> Any:
    from megatron_offload_plugin.deepspeed.tiny import GPTShape, build, ds_config

    folder = base / name
    folder.mkdir()
    section = {"optimizer_states": {"device": "nvme", "nvme_path": str(folder), "prefetch_layers": prefetch}}
    return build(GPTShape(), ds_config(stage=stage, section=section))


def _data() -> Callable[..., Any]:
    from megatron_offload_plugin.deepspeed.tiny import GPTShape, batches, replay

    return replay(batches(GPTShape(), 2), STEPS * PER_STEP)


def _reference(base: Path, stage: int) -> list[Any]:
    """Snapshots after each step of a fault-free run (index k: after k steps)."""
    from megatron_offload_plugin.deepspeed.tiny import snapshot, train

    engine, data = _engine(base, f"reference-{stage}", stage=stage), _data()
    out = [snapshot(engine)]
    train(engine, STEPS, data(), on_step=lambda _: out.append(snapshot(engine)))
    engine.layerwise_offload_optimizer.close()
    return out


def _failing_step(engine: Any, data: Callable[..., Any], step: int) -> dict[str, Any]:
    """Run optimizer step ``step`` (1-based) expecting an NvmeIOError; what it said."""
    from megatron_offload_plugin.deepspeed.tiny import train
    from megatron_offload_plugin.offload.nvme import NvmeIOError

    try:
        train(engine, 1, data((step - 1) * PER_STEP))
    except NvmeIOError as err:
        return {"raised": True, "message": str(err), "path": err.path, "size": err.size}
    return {"raised": False}


def _fault(engine: Any, spec: str | None) -> None:
    """Switch the shim's fault with no transfer in flight (DeepSpeed's aio threads read the variable)."""
    engine.layerwise_offload_optimizer.store.drain()
    if spec is None:
        os.environ.pop(SPEC_ENV, None)
    else:
        os.environ[SPEC_ENV] = spec


def _weights(engine: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _diff(a: Any, b: Any) -> list[str]:
    from megatron_offload_plugin.deepspeed.tiny import snapshot_differences

    return snapshot_differences(a, b)[:5]


def scenario_dropped_writes(base: Path, stage: int = 0, mode: str = "drop") -> dict[str, Any]:
    """Every state write of step 2 is lost: the step's own read-ahead of the next step's first layers sees it."""
    from megatron_offload_plugin.deepspeed.tiny import snapshot, train

    ref = _reference(base, stage)
    engine, data = _engine(base, f"faulty-{stage}-{mode}", stage=stage), _data()
    train(engine, 1, data())
    _fault(engine, f"write:{mode}:path=layer")
    failed = _failing_step(engine, data, 2)
    _fault(engine, None)
    after_failure = _diff(snapshot(engine), ref[1])
    train(engine, 2, data(PER_STEP))  # the failed iteration again, then the next
    return {**failed, "after_failure_vs_before": after_failure, "retry_vs_reference": _diff(snapshot(engine), ref[3])}


def scenario_writes_lost_unseen(base: Path) -> dict[str, Any]:
    """No read-ahead: step 2's lost writes are found by step 3, whose committed states are gone for good."""
    import torch

    from megatron_offload_plugin.deepspeed.tiny import train
    from megatron_offload_plugin.offload.nvme import NvmeIOError

    engine, data = _engine(base, "unseen", prefetch=0), _data()
    train(engine, 1, data())
    _fault(engine, "write:drop:path=layer")
    train(engine, 1, data(PER_STEP))
    _fault(engine, None)
    after_step2 = _weights(engine)  # (reading the states now would find the loss already)
    failed = _failing_step(engine, data, 3)
    unchanged = [k for k, v in _weights(engine).items() if not torch.equal(v, after_step2[k])]
    save_dir = base / "ckpt"
    try:
        engine.save_checkpoint(str(save_dir), tag="t")
        save = {"refused": False}
    except NvmeIOError as err:
        save = {"refused": True, "message": str(err), "tag_written": (save_dir / "t").exists()}
    return {**failed, "weights_after_failure_vs_before": unchanged, "save": save}


def scenario_read_dropped_once(base: Path) -> dict[str, Any]:
    """One read lost on the way: verification catches it, the second read verifies, training is exact."""
    import logging

    from megatron_offload_plugin.deepspeed.tiny import snapshot, train

    ref = _reference(base, 0)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("megatron_offload_plugin").addHandler(handler)
    engine, data = _engine(base, "read-once"), _data()
    train(engine, 1, data())
    _fault(engine, "read:drop:count=1:path=layer00002")
    train(engine, 2, data(PER_STEP))
    _fault(engine, None)
    return {"vs_reference": _diff(snapshot(engine), ref[3]),
            "warnings": [m for m in records if "read again and verified" in m]}


def scenario_read_fault_persistent(base: Path) -> dict[str, Any]:
    """Every read of one layer's file fails: the step is undone and saves refused until reads verify again."""
    import torch

    from megatron_offload_plugin.deepspeed.tiny import snapshot, train
    from megatron_offload_plugin.offload.nvme import NvmeIOError

    ref = _reference(base, 0)
    engine, data = _engine(base, "read-persistent"), _data()
    train(engine, 1, data())
    _fault(engine, "read:drop:path=layer00003")
    failed = _failing_step(engine, data, 2)
    after_failure = [k for k, v in _weights(engine).items() if not torch.equal(v, ref[1][0][k])]
    try:
        engine.save_checkpoint(str(base / "ckpt-persistent"), tag="t")
        save_refused = False
    except NvmeIOError:
        save_refused = True
    _fault(engine, None)
    train(engine, 2, data(PER_STEP))  # the reads verify again: the lost mark goes, the retry is exact
    return {**failed, "weights_after_failure_vs_before": after_failure, "save_refused_while_failing": save_refused,
            "retry_vs_reference": _diff(snapshot(engine), ref[3])}


SCENARIOS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "dropped_writes": scenario_dropped_writes,
    "short_writes": lambda base: scenario_dropped_writes(base, mode="short"),
    "dropped_writes_zero2": lambda base: scenario_dropped_writes(base, stage=2),
    "writes_lost_unseen": scenario_writes_lost_unseen,
    "read_dropped_once": scenario_read_dropped_once,
    "read_fault_persistent": scenario_read_fault_persistent,
}


def _sigterm_mid_step(base: Path) -> None:
    """Train; SIGTERM arrives from inside step 2 (at its third state write). Never returns."""
    from megatron_offload_plugin.deepspeed.tiny import train

    engine, data = _engine(base, "sigterm"), _data()
    train(engine, 1, data())
    sw = engine.layerwise_offload_optimizer.store.swapper
    real, calls = sw.write_buffer, []

    def write_then_die(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    sw.write_buffer = write_then_die
    train(engine, 1, data(PER_STEP))
    raise SystemExit("SIGTERM did not end the process")


def _child(results: str, base: str, names: list[str]) -> None:
    if names == ["sigterm"]:
        _sigterm_mid_step(Path(base))
    out: dict[str, Any] = {}
    for name in names:
        sub = Path(base) / name
        sub.mkdir()
        try:
            out[name] = SCENARIOS[name](sub)
        except BaseException:
            out[name] = {"error": traceback.format_exc()}
        os.environ.pop(SPEC_ENV, None)
    Path(results).write_text(json.dumps(out))


# ------------------------------------------------------------------ the test side


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    try:
        return build_shim(tmp_path_factory.mktemp("shim"))
    except ShimBuildError as err:
        pytest.skip(f"cannot build the aio fault shim: {err}")


#: Set by this process's own single-rank DeepSpeed (tiny.init_single_process_dist) when other tests ran first:
#: the child must pick its own port, this one is taken.
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def _run_child(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in env.items() if k not in _DIST_ENV}
    return subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S, cwd=Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def results(shim, tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    out = base / "results.json"
    proc = _run_child([str(out), str(base), *SCENARIOS], fault_env(shim))
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    found = json.loads(out.read_text())
    for name, r in found.items():
        assert "error" not in r, f"{name}: {r['error']}"
    return found


@pytest.mark.parametrize("name", ["dropped_writes", "short_writes", "dropped_writes_zero2"])
def test_lost_writes_fail_the_step_which_leaves_everything_as_before(results, name):
    r = results[name]
    assert r["raised"], "a lost write went unnoticed"
    assert "layer0" in r["path"] and r["size"] > 0
    assert f"aio read of swap file {r['path']} (offset 0, size {r['size']})" in r["message"]
    assert r["after_failure_vs_before"] == []  # weights, masters, states, counters, LR: as after step 1
    assert r["retry_vs_reference"] == []  # the same iteration again: bitwise the fault-free run


def test_writes_lost_out_of_sight_are_found_by_the_next_read_and_block_saves(results):
    r = results["writes_lost_unseen"]
    assert r["raised"] and "the bytes read back are not the bytes written" in r["message"]
    assert r["weights_after_failure_vs_before"] == []
    assert r["save"]["refused"] and "not whole" in r["save"]["message"] and not r["save"]["tag_written"]


def test_a_read_lost_once_is_read_again_and_training_is_exact(results):
    r = results["read_dropped_once"]
    assert r["vs_reference"] == []
    assert len(r["warnings"]) == 1 and "layer00002" in r["warnings"][0]


def test_a_failing_read_undoes_the_step_and_blocks_saves_until_it_reads_again(results):
    r = results["read_fault_persistent"]
    assert r["raised"] and "layer00003" in r["path"] and "no swap trailer" in r["message"]
    assert r["weights_after_failure_vs_before"] == []
    assert r["save_refused_while_failing"]
    assert r["retry_vs_reference"] == []


def test_sigterm_mid_step_removes_the_swap_folder_and_keeps_the_exit_status(shim, tmp_path):
    proc = _run_child(["-", str(tmp_path), "sigterm"], fault_env(shim))
    assert proc.returncode == -signal.SIGTERM, proc.stderr[-3000:]
    assert not list((tmp_path / "sigterm").glob("mop-swap-*")), "the swap folder outlived SIGTERM"


# ------------------------------------------------------------------ a disk that fills up (in process)


def test_disk_full_in_the_first_step_leaves_everything_as_before(small_fs_factory, tmp_path):
    from megatron_offload_plugin.deepspeed.tiny import GPTShape, build, ds_config, replay, batches, snapshot, \
        snapshot_differences, train
    from megatron_offload_plugin.offload.nvme import NvmeIOError

    def engine(path: Path) -> Any:
        return build(GPTShape(), ds_config(section={"optimizer_states": {"device": "nvme", "nvme_path": str(path)}}))

    data = replay(batches(GPTShape(), 2), 2 * PER_STEP)
    (tmp_path / "ref").mkdir()
    reference = engine(tmp_path / "ref")
    train(reference, 2, data())
    want = snapshot(reference)
    reference.layerwise_offload_optimizer.close()

    small_fs = small_fs_factory.mount("2m")
    e = engine(small_fs)
    before = snapshot(e)
    hog = small_fs_factory.fill(small_fs, leave=96 * 1024)  # room for the first layers' two slots, not for all
    with pytest.raises(NvmeIOError, match=r"disk full: reserving \d+ bytes for swap file .*layer\d+\.optim\.\d "
                                          r"\(offset 0, size \d+\) failed") as err:
        train(e, 1, data())
    assert err.value.path.startswith(str(small_fs)) and err.value.size > 0
    assert snapshot_differences(snapshot(e), before) == []
    hog.unlink()  # the space is back
    train(e, 2, data())
    assert snapshot_differences(snapshot(e), want) == []
    small_fs_factory.fill(small_fs)  # every byte taken after the layout was reserved: the steps still write
    train(e, 1, replay(batches(GPTShape(), 2, seed=7), PER_STEP)())
    e.layerwise_offload_optimizer.close()


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], sys.argv[3:])
