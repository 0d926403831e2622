"""``python -m megatron_offload_plugin`` (also the ``megatron-offload-plugin`` console script)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence


def _cmd_simulate(argv: list[str]) -> int:
    from .schedules.cli import main as simulate_main

    return simulate_main(argv)


def _cmd_bench(argv: list[str]) -> int:
    kinds = {"pipeline": "megatron_offload_plugin.bench.pipeline", "deepspeed": "megatron_offload_plugin.bench.deepspeed"}
    if not argv or argv[0] not in kinds:
        print(f"usage: python -m megatron_offload_plugin bench {{{','.join(kinds)}}} [options]; "
              f"accepted: {', '.join(kinds)}", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(kinds[argv[0]]).main(argv[1:])


def _cmd_launch(argv: list[str]) -> int:
    from .launch import main as launch_main

    return launch_main(argv)


def _cmd_config(argv: list[str]) -> int:
    """Validate a plugin config (file and/or flags) and print it as YAML-able JSON."""
    from .config import PluginArgumentParser, add_plugin_arguments, config_from_args, to_mapping

    parser = PluginArgumentParser(prog="megatron_offload_plugin config", allow_abbrev=False,
                                  description="Validate plugin options and print the resulting configuration.")
    add_plugin_arguments(parser)
    try:
        cfg = config_from_args(parser.parse_args(argv))
    except ValueError as err:
        parser.error(str(err))
    print(json.dumps(to_mapping(cfg), indent=2))
    return 0


def _cmd_version(argv: list[str]) -> int:
    from . import __version__
    from .patches.versions import megatron_core_version

    print(json.dumps({"megatron_offload_plugin": __version__, "megatron_core": str(megatron_core_version())}))
    return 0


def _cmd_build_ops(argv: list[str]) -> int:
    """Build DeepSpeed's async I/O op for this environment now, so the first NVMe run does not."""
    import logging

    parser = argparse.ArgumentParser(prog="megatron_offload_plugin build-ops", allow_abbrev=False,
                                     description=_cmd_build_ops.__doc__)
    parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from .offload.nvme import AioUnavailableError, load_aio_op

    try:
        load_aio_op()
    except AioUnavailableError as err:
        print(f"build-ops: {err}", file=sys.stderr)
        return 1
    print("build-ops: DeepSpeed's async_io op is built for this environment", file=sys.stderr)
    return 0


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "simulate": (_cmd_simulate, "simulate a pipeline schedule: makespan, bubbles, memory, timeline plot"),
    "bench": (_cmd_bench, "run real training side by side and print JSON figures (bench pipeline)"),
    "launch": (_cmd_launch, "run a Megatron-LM training script with the plugin applied"),
    "config": (_cmd_config, "validate plugin options and print the resulting configuration"),
    "version": (_cmd_version, "print the plugin and megatron-core versions"),
    "build-ops": (_cmd_build_ops, "build DeepSpeed's async I/O op now (the first NVMe run would otherwise)"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m megatron_offload_plugin",
        description="megatron-offload-plugin: offload and zero-bubble pipeline schedules for Megatron-core and DeepSpeed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="subcommands:\n" + "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items())
        + "\n\nRun 'python -m megatron_offload_plugin SUBCOMMAND --help' for a subcommand's options.",
        allow_abbrev=False,
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="SUBCOMMAND", help="one of: " + ", ".join(COMMANDS))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    ns = parser.parse_args(argv[:1])
    handler, _ = COMMANDS[ns.command]
    return handler(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
