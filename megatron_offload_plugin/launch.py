"""Run a Megatron-LM training script with the plugin applied, leaving the script unchanged.

    torchrun ... -m megatron_offload_plugin.launch pretrain_gpt.py <Megatron-LM flags> <plugin flags>

Megatron-LM's parser rejects unknown flags and abbreviations, so the plugin's
flags are taken out of ``sys.argv`` here, the patches are applied, and the
script runs as ``__main__`` with the rest of its arguments.

The patches are applied before the script has configured logging, so on rank 0
the launcher gives the plugin's logger a handler of its own first, in
Megatron-LM's format (``logging.basicConfig``'s ``LEVEL:logger:message`` on
stdout); it never touches the root logger or a logger that already has handlers,
and steps aside once the script configures the root logger, so no line is
printed twice.
"""

from __future__ import annotations

import argparse
import logging
import os
import runpy
import sys
from typing import Sequence

from . import plugin as plugin_api
from .config import OptionSpec, PluginArgumentParser, add_plugin_arguments, config_from_args, split_plugin_argv

USAGE = "python -m megatron_offload_plugin.launch SCRIPT.py [script and plugin flags ...]"
PLUGIN_LOGGER = "megatron_offload_plugin"
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
DEFAULT_LOG_LEVEL = "info"

# Launcher flags, not config options: they set up this process's logging, which apply() never does.
LOG_LEVEL_OPTION = OptionSpec(
    section="launcher", field="log_level", flag="--offload-plugin-log-level", type=str,
    choices=tuple(LOG_LEVELS), default=DEFAULT_LOG_LEVEL,
    help="Level of the plugin's log lines, printed on rank 0 (each patch applied is one info line).",
)
QUIET_OPTION = OptionSpec(
    section="launcher", field="quiet", flag="--offload-plugin-quiet", type=bool, choices=None, default=False,
    help="Only the plugin's warnings and errors: the same as --offload-plugin-log-level warning.",
)
LAUNCHER_OPTIONS = {opt.flag: opt for opt in (LOG_LEVEL_OPTION, QUIET_OPTION)}


def add_launcher_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The launcher's own flags (``--offload-plugin-log-level``, ``--offload-plugin-quiet``)."""
    group = parser.add_argument_group("launcher", "Options of the launcher only (not plugin config options).")
    level = group.add_mutually_exclusive_group()
    level.add_argument(LOG_LEVEL_OPTION.flag, dest="offload_plugin_log_level", default=None,
                       choices=list(LOG_LEVELS), help=f"{LOG_LEVEL_OPTION.help} [{DEFAULT_LOG_LEVEL}]")
    level.add_argument(QUIET_OPTION.flag, dest="offload_plugin_quiet", action="store_true", help=QUIET_OPTION.help)
    return parser


def _launch_rank() -> int:
    """The global rank torchrun gives this process (``RANK``), before torch.distributed exists; 0 alone."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class _UntilRootConfigured(logging.Filter):
    """Passes records only while the root logger has no handler: once the script configures
    logging (Megatron-LM's ``training`` module calls ``basicConfig`` on import), the plugin's
    records reach the root's handlers by propagation, and this handler steps aside."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not logging.getLogger().handlers


def setup_logging(level: str | None, *, rank: int) -> logging.Handler | None:
    """Make the plugin's log lines visible before the script configures logging; the handler added, if any.

    ``level`` (one of :data:`LOG_LEVELS`; ``None`` when the user gave none) goes on the
    plugin's logger on every rank; a level already set there is kept unless one is given.
    A handler is added on rank 0 only, and only when neither the plugin's logger nor the
    root logger has one, so a configuration made before (``sitecustomize``, a wrapper) is
    left as it is.
    """
    logger = logging.getLogger(PLUGIN_LOGGER)
    if level is not None or logger.level == logging.NOTSET:
        logger.setLevel(LOG_LEVELS[level or DEFAULT_LOG_LEVEL])
    if rank != 0 or logger.handlers or logging.getLogger().handlers:
        return None
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(logging.BASIC_FORMAT))  # Megatron-LM's: basicConfig, no format
    handler.addFilter(_UntilRootConfigured())
    logger.addHandler(handler)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        parser = PluginArgumentParser(prog="megatron_offload_plugin.launch", usage=USAGE, allow_abbrev=False,
                                      description=__doc__.split("\n\n")[0])
        add_plugin_arguments(parser)
        add_launcher_arguments(parser)
        parser.print_help()
        return 0 if argv else 2
    script, rest = argv[0], argv[1:]
    try:
        plugin_argv, script_argv = split_plugin_argv(rest, extra_flags=LAUNCHER_OPTIONS)
    except ValueError as err:
        print(f"megatron_offload_plugin.launch: error: {err}", file=sys.stderr)
        return 2
    parser = PluginArgumentParser(prog="megatron_offload_plugin.launch", allow_abbrev=False)
    add_plugin_arguments(parser)
    add_launcher_arguments(parser)
    ns = parser.parse_args(plugin_argv)
    level = "warning" if ns.offload_plugin_quiet else ns.offload_plugin_log_level
    handler = setup_logging(level, rank=_launch_rank())
    try:
        try:
            config = config_from_args(ns)
        except ValueError as err:
            parser.error(str(err))
        plugin_api.apply(config)
        sys.argv = [script, *script_argv]
        # As `python SCRIPT.py` would: the script's folder first on the import path.
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exc:
            return int(exc.code or 0) if not isinstance(exc.code, str) else 1
        finally:
            plugin_api.revert()
        return 0
    finally:
        if handler is not None:
            logging.getLogger(PLUGIN_LOGGER).removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
