"""Timing and planning that hold on clusters: no per-iteration timeline gather nobody reads,
and ``auto`` plans the same schedule on every rank of the world (tensor-parallel peers too)."""

from __future__ import annotations

import pytest

from megatron_offload_plugin.runtime.trace import ActionTimer, TraceRecorder
from megatron_offload_plugin.testing.distributed import run_distributed

pytestmark = pytest.mark.multiprocess


def _count_gathers(rank: int, world_size: int, recipe_kwargs: dict, measure: bool) -> dict:
    from megatron_offload_plugin import plugin as plugin_api
    from megatron_offload_plugin.integrations.megatron.recipe import GPTRecipe
    from megatron_offload_plugin.runtime import trace as trace_module
    from megatron_offload_plugin.testing.equivalence import build_gpt_trainer

    calls = []
    original = trace_module.TraceRecorder.__call__

    def counting(self, trace):
        calls.append(len(trace.events))
        return original(self, trace)

    trace_module.TraceRecorder.__call__ = counting
    plugin_api.apply({"schedule": {"pipeline_schedule": "zb-h1"}, "telemetry": {"log_patches": False}})
    try:
        recipe = GPTRecipe(**recipe_kwargs)
        _, trainer = build_gpt_trainer(recipe, activation_memory="off")
        recorder = plugin_api.active_runtime().recorder
        recorder.measure_bubbles = measure  # as Megatron-LM's own loop leaves it (nobody reads the rates)
        results = [trainer.train_step(i) for i in range(3)]
        return {"gathers": len(calls), "iterations": recorder.iteration, "rates": recorder.last_rates,
                "losses": [r.loss for r in results]}
    finally:
        trace_module.TraceRecorder.__call__ = original
        plugin_api.revert()
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()


def test_timeline_is_gathered_only_when_read(tiny_gpt):
    recipe = dict(tiny_gpt, micro_batch_size=1, global_batch_size=4, pipeline_model_parallel_size=2)
    unread = run_distributed(_count_gathers, 2, recipe, False, timeout_s=300)
    read = run_distributed(_count_gathers, 2, recipe, True, timeout_s=300)
    for rank in range(2):
        assert unread[rank]["gathers"] == 0 and unread[rank]["iterations"] == 3
        assert read[rank]["gathers"] == 3
        assert read[rank]["rates"]["clock"] == "host-perf-counter"
    assert unread[1]["losses"] == read[1]["losses"]


def test_auto_plans_the_same_schedule_on_tensor_parallel_peers(tiny_gpt):
    """TP=2 x PP=2: the two pipeline groups measure different costs; rank 0's are used by all."""
    from megatron_offload_plugin.testing.equivalence import auto_replan_worker

    recipe = dict(tiny_gpt, micro_batch_size=1, global_batch_size=4, tensor_model_parallel_size=2,
                  pipeline_model_parallel_size=2)
    reports = run_distributed(auto_replan_worker, 4, recipe, timeout_s=300)
    assert all(r["version"] == 1 for r in reports)
    assert len({r["costs"] for r in reports}) == 1, [r["costs"] for r in reports]
    assert len({r["chosen"] for r in reports}) == 1


def test_recorder_wants_events_only_for_a_reader():
    recorder = TraceRecorder()
    assert not recorder.wanted()
    recorder.extra_iterations.add(1)
    assert not recorder.wanted()
    recorder.skip()
    assert recorder.wanted() and recorder.iteration == 1
    recorder.skip()
    assert not recorder.wanted()
    recorder.measure_bubbles = True
    assert recorder.wanted()


def test_cpu_timer_uses_the_host_clock():
    from megatron_offload_plugin.runtime.executor import StepTrace

    trace = StepTrace()
    timer = ActionTimer(trace, rank=3)
    assert timer.clock == "host-perf-counter"
    timer.start()
    timer.end("0F0")
    timer.finish()
    (event,) = trace.events
    assert event.rank == 3 and event.action == "0F0" and event.end >= event.start


def test_full_offload_keeps_w_inputs_in_place_when_w_runs_right_after_its_b():
    """Moving W's inputs to the host and straight back buys nothing and costs two copies."""
    from megatron_offload_plugin.runtime.executor import _next_compute, _w_right_after_b
    from megatron_offload_plugin.schedules.ir import Action

    program = [Action.parse(a) for a in "0F0 0B0 0W0 0F1 0B1 0F2 0W1 0B2 0OFFLOAD2 0W2".split()]
    right_after = _w_right_after_b(program, _next_compute(program))
    assert (0, 0) in right_after  # 0B0 then 0W0
    assert (0, 1) not in right_after  # 0B1, then 0F2 before 0W1
    assert (0, 2) in right_after  # 0B2, an offload action, then 0W2: nothing computes between


def _megatron_hooks_worker(rank: int, world_size: int, recipe_kwargs: dict) -> list:
    from megatron_offload_plugin import plugin as plugin_api
    from megatron_offload_plugin.integrations.megatron.recipe import GPTRecipe
    from megatron_offload_plugin.testing.equivalence import build_gpt_trainer

    calls: list = []

    class _Timer:
        def __init__(self, name: str) -> None:
            self.name = name

        def start(self, barrier: bool = False) -> None:
            calls.append(("start", self.name))

        def stop(self, barrier: bool = False) -> None:
            calls.append(("stop", self.name))

    plugin_api.apply({"schedule": {"pipeline_schedule": "interleaved"}, "telemetry": {"log_patches": False}})
    try:
        bundle, trainer = build_gpt_trainer(GPTRecipe(**recipe_kwargs), activation_memory="off")
        bundle.config.timers = lambda name, log_level=0: _Timer(name)
        bundle.config.param_sync_func = [lambda params, c=c: calls.append(("param_sync", c)) for c in range(2)]
        trainer.train_step(0)
        return calls
    finally:
        plugin_api.revert()
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()


def test_timers_and_param_sync_func_are_honoured_like_megatrons_interleaved(tiny_gpt):
    """config.timers gets its 'forward-backward' span (forward/backward-compute come from
    Megatron's own forward_step/backward_step); param_sync_func runs once for every chunk,
    chunk 0 included, before that chunk's first forward."""
    recipe = dict(tiny_gpt, micro_batch_size=1, global_batch_size=4, pipeline_model_parallel_size=2,
                  num_layers_per_virtual_pipeline_stage=1)
    for calls in run_distributed(_megatron_hooks_worker, 2, recipe, timeout_s=300):
        spans = [c for c in calls if c[1] == "forward-backward"]
        assert spans == [("start", "forward-backward"), ("stop", "forward-backward")]
        assert calls.index(spans[0]) < calls.index(("start", "forward-compute")) < calls.index(spans[1])
        syncs = [c[1] for c in calls if c[0] == "param_sync"]
        assert sorted(syncs) == [0, 1]
        assert calls.index(("param_sync", 0)) < calls.index(("start", "forward-compute"))
