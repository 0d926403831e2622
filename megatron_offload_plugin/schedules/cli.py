"""``python -m megatron_offload_plugin simulate``: generate, validate and time a schedule.

    python -m megatron_offload_plugin simulate --schedule zb-v --pp 4 --microbatches 16 --json
    python -m megatron_offload_plugin simulate --schedule auto --pp 4 --microbatches 16 \\
        --cost-f 1 --cost-b 1.5 --cost-w 0.7 --cost-comm 0.05 --memory-limit 4 --plot zb.png

With ``--json`` one JSON object goes to stdout (see :func:`summary`), else a
short table.  ``--dump-schedule FILE`` writes the schedule for other tools::

    {"format": "megatron-offload-plugin/schedule", "version": 1,
     "schedule": "zb-v", "pp": 4, "microbatches": 16, "chunks_per_rank": 2,
     "placement_shape": "v",
     "placement": [[0, 7], [1, 6], [2, 5], [3, 4]],     # placement[rank][chunk] = virtual stage
     "kinds": {"F": "forward", ...},                       # what each action type means
     "actions": [[["F", 0, 0], ["F", 1, 0], ...], ...],   # per rank, in order: [type, microbatch, chunk]
     "timeline": [[[0.0, 0.5], [0.5, 1.0], ...], ...],    # per rank, [start, end] of each action
     "costs": {"f": 1.0, "b": 1.0, "w": 1.0, "comm": 0.0},
     "result": {... the --json summary ...}}

``Schedule.from_dict`` (:func:`..ir.schedule_from_dict`) reads it back.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .costs import CostModel
from .generators import ScheduleRequest, available_schedules, describe_schedules, generate
from .generators.registry import unknown_schedule_message
from .offload import OFFLOAD_MODES, OffloadPolicy, apply_offload
from .passes import add_send_recv
from .simulator import SimulationResult, simulate

DEFINITIONS = {
    "bubble_rate": "1 - busy / (devices x makespan): one iteration with a synchronous optimizer step",
    "steady_bubble_rate": "idle inside each device's own first-start-to-last-end window / sum of those "
                          "windows (the zero-bubble papers' accounting)",
    "peak_activation": "per device, in units of one microbatch's activations through one device's full "
                       "share of layers; held from F until its W (or BW) ends",
    "added_makespan": "makespan with activation offload minus the same schedule's without it (time units); "
                      "_rel divides by the latter",
    "not_hidden": "per device, the offloaded (chunk, microbatch) units whose B waited for their RELOAD",
    "costs": "times of one microbatch through one device's full share of layers; a chunk costs its "
             "fraction; comm is a delay between devices, not device time",
}

_EPILOG = """\
schedules:
{schedules}

bubble figures:
  bubble_rate         {bubble_rate}
  steady_bubble_rate  {steady_bubble_rate}
  peak_activation     {peak_activation}
  costs               {costs}

--dump-schedule writes {{placement: [[stage of chunk c on rank r]], actions: [[[type, microbatch, chunk]]],
timeline: [[[start, end]]], costs, result}}, one list per rank, actions in execution order.
"""


def build_parser() -> argparse.ArgumentParser:
    schedules = "\n".join(f"  {name:<12} {text}" for name, text in describe_schedules().items())
    parser = argparse.ArgumentParser(
        prog="python -m megatron_offload_plugin simulate",
        description="Generate a pipeline schedule, prove it complete and deadlock-free, and simulate it: "
                    "makespan, bubble rates, activation memory, timeline plot.",
        epilog=_EPILOG.format(schedules=schedules, **DEFINITIONS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--schedule", required=True, metavar="S", help="one of: " + ", ".join(available_schedules()))
    parser.add_argument("--pp", type=int, required=True, metavar="P", help="pipeline-parallel size (devices)")
    parser.add_argument("--microbatches", type=int, required=True, metavar="M", help="microbatches per iteration")
    parser.add_argument("--vpp", type=int, default=None, metavar="V",
                        help="model chunks per device (interleaved: required, >= 2; V schedules: 2; auto: 1 or 2 "
                             "restricts the search)")
    parser.add_argument("--microbatch-group-size", type=int, default=None, metavar="N",
                        help="interleaved only: Megatron's microbatch_group_size_per_vp_stage (default: pp)")
    parser.add_argument("--cost-f", type=float, default=1.0, metavar="T", help="forward time (default 1)")
    parser.add_argument("--cost-b", type=float, default=1.0, metavar="T",
                        help="input-gradient backward time (default 1)")
    parser.add_argument("--cost-w", type=float, default=1.0, metavar="T",
                        help="weight-gradient backward time (default 1)")
    parser.add_argument("--cost-comm", type=float, default=0.0, metavar="T",
                        help="delay of a message between devices (default 0)")
    parser.add_argument("--memory-limit", type=float, default=None, metavar="U",
                        help="activation units per device: auto searches within it (default pp); other schedules "
                             "report whether they fit")
    parser.add_argument("--activation-offload", choices=OFFLOAD_MODES, default=None,
                        help="offload activations to the host between F and B: none, full (every unit whose "
                             "lifespan is positive) or selective (longest-lived units whose copies hide; default "
                             "share 0.5)")
    parser.add_argument("--offload-fraction", type=float, default=None, metavar="X",
                        help="selective: share of each device's units to offload, in (0, 1] (default 0.5)")
    parser.add_argument("--offload-chunks", default=None, metavar="C[,C...]",
                        help="selective: offload the units of these local chunks instead of a share, e.g. 0,1")
    parser.add_argument("--offload-bandwidth", type=float, default=None, metavar="GBPS",
                        help="host link GB/s each direction (full duplex); unset: copies take no time")
    parser.add_argument("--activation-bytes", type=float, default=None, metavar="BYTES",
                        help="bytes of one microbatch's activations through one device's full layer share "
                             "(needed with --offload-bandwidth)")
    parser.add_argument("--time-unit-s", type=float, default=1.0, metavar="S",
                        help="seconds per cost time unit, to turn bytes / bandwidth into schedule time (default 1)")
    parser.add_argument("--with-comms", action="store_true",
                        help="lower the schedule with SEND/RECV actions before simulating and dumping")
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG", help="write the timeline figure here")
    parser.add_argument("--dump-schedule", type=Path, default=None, metavar="JSON",
                        help="write the per-device action lists and timeline here (format above)")
    parser.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    return parser


def summary(result: SimulationResult, memory_limit: float | None) -> dict[str, Any]:
    """The ``--json`` object."""
    s = result.schedule
    out: dict[str, Any] = result.to_dict()
    out["placement_shape"] = s.placement.shape
    out["placement"] = [list(row) for row in s.placement.stages]
    out["max_peak_activation"] = round(max(result.peak_activation), 9)
    if "chosen" in s.meta:
        out["chosen"] = s.meta["chosen"]
    if result.offload is not None:
        out["peak_activation_no_offload"] = [round(x, 9) for x in result.offload.peak_activation_no_offload]
    if memory_limit is not None:
        out["memory_limit"] = memory_limit
        out["fits_memory_limit"] = max(result.peak_activation) <= memory_limit + 1e-9
    out["definitions"] = DEFINITIONS
    return out


def dump(result: SimulationResult, summary_: dict[str, Any]) -> dict[str, Any]:
    data = result.schedule.to_dict()
    by_rank: list[list[list[float]]] = [[] for _ in range(result.schedule.pp)]
    for e in result.timeline:
        by_rank[e.rank].append([round(e.start, 9), round(e.end, 9)])
    data["timeline"] = by_rank
    data["costs"] = result.costs.to_dict()
    data["result"] = {k: v for k, v in summary_.items() if k != "definitions"}
    return data


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.schedule not in available_schedules():
        return _error(unknown_schedule_message(args.schedule, option="--schedule"))
    options = {}
    if args.microbatch_group_size is not None:
        if args.schedule != "interleaved":
            return _error(f"--microbatch-group-size={args.microbatch_group_size}: only the interleaved schedule "
                          f"takes it, not {args.schedule!r}")
        options["microbatch_group_size"] = args.microbatch_group_size
    try:
        costs = CostModel(f=args.cost_f, b=args.cost_b, w=args.cost_w, comm=args.cost_comm)
        request = ScheduleRequest(args.pp, args.microbatches, vpp=args.vpp, costs=costs,
                                  memory_limit=args.memory_limit, options=options)
        schedule = generate(args.schedule, request)
    except ValueError as exc:  # bad input or a configuration the schedule cannot run
        return _error(f"--schedule {args.schedule}: {exc}")
    policy = None
    if args.activation_offload is not None:
        try:
            policy = _offload_policy(args)
        except ValueError as exc:
            return _error(_as_flags(str(exc)))
    elif any(x is not None for x in (args.offload_fraction, args.offload_chunks, args.offload_bandwidth,
                                      args.activation_bytes)):
        return _error("--offload-fraction, --offload-chunks, --offload-bandwidth and --activation-bytes need "
                      "--activation-offload (none, full or selective)")
    if args.with_comms:
        schedule = add_send_recv(schedule)
    if policy is not None:
        try:
            schedule, _, result = apply_offload(schedule, policy, costs)
        except ValueError as exc:
            return _error(_as_flags(str(exc)))
    else:
        result = simulate(schedule, costs)
    info = summary(result, args.memory_limit)
    if args.plot is not None:
        from .plot import plot_timeline

        plot_timeline(result, args.plot)
        info["plot"] = str(args.plot)
    if args.dump_schedule is not None:
        args.dump_schedule.write_text(json.dumps(dump(result, info)) + "\n")
        info["dump_schedule"] = str(args.dump_schedule)
    if args.json:
        print(json.dumps(info))
    else:
        _print_table(info)
    return 0


def _offload_policy(args: argparse.Namespace) -> OffloadPolicy:
    chunks = None
    if args.offload_chunks is not None:
        try:
            chunks = tuple(int(c) for c in args.offload_chunks.split(",") if c.strip())
        except ValueError:
            raise ValueError(f"--offload-chunks={args.offload_chunks!r}: expected local chunk indices such as "
                             "0 or 0,1") from None
        if not chunks:
            raise ValueError(f"--offload-chunks={args.offload_chunks!r}: expected local chunk indices such as 0,1")
    return OffloadPolicy(args.activation_offload, fraction=args.offload_fraction, chunks=chunks,
                         bandwidth_gbps=args.offload_bandwidth, unit_bytes=args.activation_bytes,
                         time_unit_s=args.time_unit_s)


_OFFLOAD_OPTIONS = ("activation_offload", "offload_fraction", "offload_chunks", "offload_bandwidth",
                    "activation_bytes", "time_unit_s")


def _as_flags(message: str) -> str:
    """Offload errors name config options (``offload_fraction=1.5``); here they name the flags."""
    return re.sub(r"\b(" + "|".join(_OFFLOAD_OPTIONS) + r")\b", lambda m: "--" + m.group(1).replace("_", "-"), message)


def _print_table(info: dict[str, Any]) -> None:
    print(f"schedule            {info['schedule']}" + (f" ({info['chosen']})" if "chosen" in info else ""))
    print(f"pp x microbatches   {info['pp']} x {info['microbatches']}, {info['chunks_per_rank']} chunk(s) per device")
    print(f"makespan            {info['makespan']:.6g}")
    print(f"bubble_rate         {info['bubble_rate']:.4%}")
    print(f"steady_bubble_rate  {info['steady_bubble_rate']:.4%}")
    print(f"peak_activation     {', '.join(f'{x:g}' for x in info['peak_activation'])}")
    if "activation_offload" in info:
        print(f"activation_offload  {info['activation_offload']['mode']}: {info['offloaded_units']} units, "
              f"added makespan {info['added_makespan']:.6g} ({info['added_makespan_rel']:.4%}), "
              f"not hidden {sum(len(u) for u in info['not_hidden'])}")
        print(f"peak (no offload)   {', '.join(f'{x:g}' for x in info['peak_activation_no_offload'])}")
    if "fits_memory_limit" in info:
        print(f"memory_limit        {info['memory_limit']:g} ({'fits' if info['fits_memory_limit'] else 'EXCEEDED'})")
    for key in ("plot", "dump_schedule"):
        if key in info:
            print(f"{key:<20}{info[key]}")


if __name__ == "__main__":
    sys.exit(main())
