"""``bench pipeline``: real training side by side, one run per schedule, one JSON object out.

Every run trains the same small GPT (same seed, same data, weights set from each
parameter's global name so that every pipeline layout computes the same function,
dropout off so that reordered forwards draw no different masks) over gloo on this
machine or NCCL on GPUs.  Megatron's own schedule on the same layout is the
reference for ``max_rel_grad_diff_vs_megatron``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Sequence

import torch

from ..integrations.megatron.recipe import GPTRecipe
from ..runtime.plugin_runtime import V_SCHEDULES
from ..testing.equivalence import build_gpt_trainer, global_main_grads

# Schedule name -> (plugin pipeline_schedule, model chunks per rank).  'megatron' and
# 'interleaved-megatron' are Megatron-core's own functions.
SCHEDULES: dict[str, tuple[str, int]] = {
    "megatron": ("megatron", 1),
    "interleaved-megatron": ("megatron", 2),
    "1f1b": ("1f1b", 1),
    "interleaved": ("interleaved", 2),
    "zb-h1": ("zb-h1", 1),
    "zb-h2": ("zb-h2", 1),
    "zb-v": ("zb-v", 2),
    "v-half": ("v-half", 2),
    "v-min": ("v-min", 2),
}


def _recipe(args: dict[str, Any], chunks: int) -> GPTRecipe:
    layers = args["layers"]
    return GPTRecipe(
        num_layers=layers, hidden_size=args["hidden"], num_attention_heads=args["heads"],
        seq_length=args["seq"], micro_batch_size=1, global_batch_size=args["microbatches"],
        pipeline_model_parallel_size=args["pp"],
        num_layers_per_virtual_pipeline_stage=(layers // args["pp"] // chunks) if chunks > 1 else None,
        hidden_dropout=0.0, attention_dropout=0.0, untie_embeddings_and_output_weights=True,
        train_iters=args["iterations"], lr=1e-3, seed=1234,
    )


def _run_one(recipe: GPTRecipe, iterations: int) -> dict[str, Any]:
    _, trainer = build_gpt_trainer(recipe, activation_memory="auto", layout_independent=True)
    grads: dict[str, torch.Tensor] = {}

    def collect(b: Any) -> None:
        if not grads:  # the first iteration's gradients
            grads.update(global_main_grads(b))

    results = [trainer.train_step(i, inspect=collect) for i in range(iterations)]
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    return {
        "losses": [r.loss for r in results],
        "times": [r.time_s for r in results],
        "bubbles": [r.measured_bubble_rate for r in results],
        "grads": grads,
        "peaks": trainer.summary.peak_activation_bytes_per_stage,
    }


def bench_worker(rank: int, world_size: int, args: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs every schedule on this rank; returns per-schedule raw figures (run_distributed target)."""
    from .. import plugin as plugin_api

    raw = []
    for name in args["schedules"]:
        plugin_schedule, chunks = SCHEDULES[name]
        recipe = _recipe(args, chunks)
        recipe.validate(world_size)
        # V layouts compute the same function as Megatron's 1F1B (weights set by global name).
        reference_name = "interleaved-megatron" if chunks > 1 and name not in V_SCHEDULES else "megatron"
        plugin_api.apply({"schedule": {"pipeline_schedule": plugin_schedule}, "telemetry": {"log_patches": False}})
        try:
            run = _run_one(recipe, args["iterations"])
        finally:
            plugin_api.revert()
        run["name"], run["reference"] = name, reference_name
        raw.append(run)
    by_name = {r["name"]: r for r in raw}
    for run in raw:
        if run["reference"] not in by_name:
            plugin_api.apply({"telemetry": {"log_patches": False}})
            try:
                ref_run = _run_one(_recipe(args, SCHEDULES[run["reference"]][1]), 1)
            finally:
                plugin_api.revert()
            by_name[run["reference"]] = ref_run
    for run in by_name.values():
        # Layouts place parameters on different ranks: compare whole models by global name.
        gathered: list[Any] = [None] * world_size
        torch.distributed.all_gather_object(gathered, run["grads"])
        run["grads"] = {k: v for part in gathered for k, v in part.items()}
    for run in raw:
        ref = by_name[run["reference"]]
        diffs = [
            ((run["grads"][k] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item()
            for k, g in ref["grads"].items()
        ]
        run["max_rel_grad_diff_vs_megatron"] = max(diffs) if diffs else 0.0
    for run in raw:
        run.pop("grads", None)
    return raw


def summarize(per_rank: list[list[dict[str, Any]]], args: dict[str, Any]) -> dict[str, Any]:
    runs = []
    last = per_rank[-1]
    for i, run in enumerate(last):
        times = run["times"][1:] or run["times"]
        bubbles = [b for b in run["bubbles"] if b is not None]
        runs.append({
            "schedule": run["name"],
            "losses": run["losses"],
            "max_rel_grad_diff_vs_megatron": max(r[i]["max_rel_grad_diff_vs_megatron"] for r in per_rank),
            "peak_activation_bytes": run["peaks"],
            "measured_bubble_rate": sum(bubbles) / len(bubbles) if bubbles else None,
            "iteration_time_s": sum(times) / len(times),
        })
    return {"pp": args["pp"], "microbatches": args["microbatches"], "iterations": args["iterations"],
            "device": "cuda" if torch.cuda.is_available() else "cpu", "runs": runs}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_offload_plugin bench pipeline", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--pp", type=int, default=4, help="pipeline-parallel size (processes launched)")
    p.add_argument("--microbatches", type=int, default=8, help="microbatches per iteration")
    p.add_argument("--schedules", default="1f1b,interleaved,zb-h1,zb-v",
                   help="comma-separated; accepted: " + ", ".join(SCHEDULES)
                   + " ('megatron' and 'interleaved-megatron' are Megatron-core's own functions)")
    p.add_argument("--iterations", type=int, default=3, help="training iterations per schedule")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds before the run is stopped")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from ..testing.distributed import run_distributed

    ns = build_parser().parse_args(argv)
    schedules = [s.strip() for s in ns.schedules.split(",") if s.strip()]
    unknown = [s for s in schedules if s not in SCHEDULES]
    if unknown:
        print(f"bench pipeline: --schedules: unknown {', '.join(unknown)}; accepted: {', '.join(SCHEDULES)}",
              file=sys.stderr)
        return 2
    args = dict(vars(ns), schedules=schedules)
    start = time.perf_counter()
    per_rank = run_distributed(bench_worker, ns.pp, args, timeout_s=ns.timeout)
    result = summarize(per_rank, args)
    result["wall_time_s"] = time.perf_counter() - start
    print(json.dumps(result, indent=None if ns.json else 2))
    return 0
