"""``bench pipeline``: real training side by side, one run per schedule, one JSON object out.

Every run trains the same small GPT (same seed, same data, weights set from each
parameter's global name so that every pipeline layout computes the same function,
dropout off so that reordered forwards draw no different masks) over gloo on this
machine or NCCL on GPUs.  Megatron's own schedule on the same layout is the
reference for ``max_rel_grad_diff_vs_megatron``; with ``--activation-offload``,
each schedule also runs with every offload policy listed, and the same schedule
without offload is the reference for ``max_rel_grad_diff_vs_no_offload`` (and
``bitwise_equal_vs_no_offload``: losses and every gradient).
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
        "offload": trainer.summary.offload_figures(),
    }


def _offload_section(mode: str, args: dict[str, Any]) -> dict[str, Any]:
    section: dict[str, Any] = {"mode": mode, "min_tensor_bytes": args["offload_min_tensor_bytes"]}
    if mode == "selective" and args.get("offload_fraction") is not None:
        section["fraction"] = args["offload_fraction"]
    if mode == "selective" and args.get("offload_chunks") is not None:
        section["chunks"] = args["offload_chunks"]
    return section


def bench_worker(rank: int, world_size: int, args: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs every (schedule, offload policy) on this rank; returns raw figures (run_distributed target)."""
    from .. import plugin as plugin_api

    raw = []
    for name in args["schedules"]:
        plugin_schedule, chunks = SCHEDULES[name]
        recipe = _recipe(args, chunks)
        recipe.validate(world_size)
        # V layouts compute the same function as Megatron's 1F1B (weights set by global name).
        reference_name = "interleaved-megatron" if chunks > 1 and name not in V_SCHEDULES else "megatron"
        for mode in args["activation_offload"]:
            config: dict[str, Any] = {"schedule": {"pipeline_schedule": plugin_schedule},
                                      "telemetry": {"log_patches": False}}
            if mode != "none":
                config["activation_offload"] = _offload_section(mode, args)
            plugin_api.apply(config)
            try:
                run = _run_one(recipe, args["iterations"])
            finally:
                plugin_api.revert()
            run["name"], run["mode"], run["reference"] = name, mode, reference_name
            raw.append(run)
    by_name = {r["name"]: r for r in raw if r["mode"] == "none"}
    for run in raw:
        if run["reference"] not in by_name:
            plugin_api.apply({"telemetry": {"log_patches": False}})
            try:
                ref_run = _run_one(_recipe(args, SCHEDULES[run["reference"]][1]), 1)
            finally:
                plugin_api.revert()
            by_name[run["reference"]] = ref_run
    for run in [*raw, *[r for k, r in by_name.items() if k not in args["schedules"]]]:
        # Layouts place parameters on different ranks: compare whole models by global name.
        gathered: list[Any] = [None] * world_size
        torch.distributed.all_gather_object(gathered, run["grads"])
        run["grads"] = {k: v for part in gathered for k, v in part.items()}
    for run in raw:
        run["max_rel_grad_diff_vs_megatron"] = _max_rel_diff(run["grads"], by_name[run["reference"]]["grads"])
        no_offload = by_name.get(run["name"])
        if no_offload is not None:
            run["max_rel_grad_diff_vs_no_offload"] = _max_rel_diff(run["grads"], no_offload["grads"])
            run["bitwise_equal_vs_no_offload"] = run["losses"] == no_offload["losses"] and all(
                torch.equal(run["grads"][k], g) for k, g in no_offload["grads"].items()
            )
    for run in raw:
        run.pop("grads", None)
    return raw


def _max_rel_diff(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    diffs = [((grads[k] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item() for k, g in reference.items()]
    return max(diffs) if diffs else 0.0


def summarize(per_rank: list[list[dict[str, Any]]], args: dict[str, Any]) -> dict[str, Any]:
    runs = []
    last = per_rank[-1]
    for i, run in enumerate(last):
        times = run["times"][1:] or run["times"]
        bubbles = [b for b in run["bubbles"] if b is not None]
        offload = run["offload"] or {}
        entry = {
            "schedule": run["name"],
            "activation_offload": run["mode"],
            "losses": run["losses"],
            "max_rel_grad_diff_vs_megatron": max(r[i]["max_rel_grad_diff_vs_megatron"] for r in per_rank),
            "peak_activation_bytes": run["peaks"],
            "max_peak_activation_bytes": max(run["peaks"]) if run["peaks"] else None,
            "offloaded_bytes": offload.get("offloaded_bytes_per_iteration", [0] * len(run["peaks"])),
            "host_pool_bytes": offload.get("host_pool_bytes", [0] * len(run["peaks"])),
            "measured_bubble_rate": sum(bubbles) / len(bubbles) if bubbles else None,
            "iteration_time_s": sum(times) / len(times),
        }
        if "max_rel_grad_diff_vs_no_offload" in run:
            entry["max_rel_grad_diff_vs_no_offload"] = max(r[i]["max_rel_grad_diff_vs_no_offload"] for r in per_rank)
            entry["bitwise_equal_vs_no_offload"] = all(r[i]["bitwise_equal_vs_no_offload"] for r in per_rank)
        runs.append(entry)
    return {"pp": args["pp"], "vpp": args["vpp"], "microbatches": args["microbatches"], "iterations": args["iterations"],
            "layers": args["layers"], "hidden": args["hidden"], "seq": args["seq"],
            "device": "cuda" if torch.cuda.is_available() else "cpu", "runs": runs}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_offload_plugin bench pipeline", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--pp", type=int, default=4, help="pipeline-parallel size (processes launched)")
    p.add_argument("--microbatches", type=int, default=8, help="microbatches per iteration")
    p.add_argument("--schedules", default="1f1b,interleaved,zb-h1,zb-v",
                   help="comma-separated; accepted: " + ", ".join(SCHEDULES)
                   + " ('megatron' and 'interleaved-megatron' are Megatron-core's own functions)")
    p.add_argument("--vpp", type=int, default=2, choices=[2],
                   help="model chunks per rank for interleaved and V schedules (V needs 2)")
    p.add_argument("--activation-offload", default="none",
                   help="comma-separated offload policies run for every schedule; accepted: none, selective, full "
                   "('none' is added as the reference when missing)")
    p.add_argument("--offload-fraction", type=float, default=None, help="'selective': share of units (default 0.5)")
    p.add_argument("--offload-chunks", default=None, help="'selective': offload the units of these local chunks (e.g. 0)")
    p.add_argument("--offload-min-tensor-bytes", type=int, default=65536,
                   help="saved storages smaller than this stay on the device")
    p.add_argument("--iterations", type=int, default=3, help="training iterations per schedule")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
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
    modes = [m.strip() for m in ns.activation_offload.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("none", "selective", "full")]
    if bad:
        print(f"bench pipeline: --activation-offload: unknown {', '.join(bad)}; accepted: none, selective, full",
              file=sys.stderr)
        return 2
    if "none" not in modes:
        modes.insert(0, "none")
    args = dict(vars(ns), schedules=schedules, activation_offload=modes)
    start = time.perf_counter()
    per_rank = run_distributed(bench_worker, ns.pp, args, timeout_s=ns.timeout)
    result = summarize(per_rank, args)
    result["wall_time_s"] = time.perf_counter() - start
    print(json.dumps(result, indent=None if ns.json else 2))
    return 0
