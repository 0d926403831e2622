"""The grad-sync policy: each parameter reports its last gradient once, with sync on, whatever
the schedule; grad_sync_func launches once per chunk and never on top of the hooks."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

from megatron_offload_plugin.runtime.grad_sync import GradSync, final_gradient_actions
from megatron_offload_plugin.runtime.plugin_runtime import schedule_programs
from megatron_offload_plugin.schedules.ir import Kind


class _Bucket:
    """Megatron's bucket-group rule: a report counts only while sync is on (is_last_microbatch)."""

    def __init__(self) -> None:
        self.is_last_microbatch = True
        self.counted: list[tuple[str, int]] = []
        self.launches = 0

    @contextlib.contextmanager
    def no_sync(self):
        self.is_last_microbatch = False
        try:
            yield
        finally:
            self.is_last_microbatch = True

    def report(self, what: str, index: int) -> None:
        if self.is_last_microbatch:
            self.counted.append((what, index))

    def start_grad_sync(self, _params=None) -> None:
        self.launches += 1


def _run(program, buckets, grad_sync_func, pp_rank=1):
    config = SimpleNamespace(no_sync_func=[b.no_sync for b in buckets] if len(buckets) > 1 else buckets[0].no_sync,
                             grad_sync_func=grad_sync_func)
    chunks = [SimpleNamespace(parameters=lambda: []) for _ in buckets]
    sync = GradSync(config, chunks, program, pp_rank=pp_rank)
    for i, step in enumerate(program):
        sync.before(i, step)
        bucket = buckets[step.chunk] if len(buckets) > 1 else buckets[0]
        if step.kind in (Kind.B, Kind.BW):
            bucket.report("bias", i)  # what B computes
        if step.kind in (Kind.W, Kind.BW):
            bucket.report("weight", i)  # what W computes
        sync.after(i, step)
    sync.close()


def test_split_schedule_counts_each_parameter_once_at_its_last_gradient():
    _, programs = schedule_programs("zb-h1", 4, 1, 8)
    for rank, program in programs.items():
        bucket = _Bucket()
        _run(program, [bucket], None, pp_rank=rank)
        final = final_gradient_actions(program)[0]
        assert sorted(i for _, i in bucket.counted) == sorted(final)
        assert sorted(w for w, _ in bucket.counted) == ["bias", "weight"]
        assert bucket.is_last_microbatch  # sync left on, as Megatron leaves it


def test_grad_sync_func_launches_once_per_chunk_after_its_last_gradient_and_hooks_count_nothing():
    _, programs = schedule_programs("interleaved", 2, 2, 4)
    for rank, program in programs.items():
        buckets = [_Bucket(), _Bucket()]
        _run(program, buckets, [b.start_grad_sync for b in buckets], pp_rank=rank)
        assert [b.launches for b in buckets] == [1, 1]
        assert all(not b.counted for b in buckets)  # no hook-driven launch on top of the explicit one


def test_rank_zero_with_one_chunk_lets_the_hooks_launch_as_megatron_1f1b_does():
    _, programs = schedule_programs("1f1b", 2, 1, 4)
    bucket = _Bucket()
    _run(programs[0], [bucket], bucket.start_grad_sync, pp_rank=0)
    assert bucket.launches == 0 and len(bucket.counted) == 2  # the last BW reports bias and weight
    other = _Bucket()
    _run(programs[1], [other], other.start_grad_sync, pp_rank=1)
    assert other.launches == 1 and not other.counted
