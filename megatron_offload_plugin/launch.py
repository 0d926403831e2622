"""Run a Megatron-LM training script with the plugin applied, leaving the script unchanged.

    torchrun ... -m megatron_offload_plugin.launch pretrain_gpt.py <Megatron-LM flags> <plugin flags>

Megatron-LM's parser rejects unknown flags and abbreviations, so the plugin's
flags are taken out of ``sys.argv`` here, the patches are applied, and the
script runs as ``__main__`` with the rest of its arguments.
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Sequence

from . import plugin as plugin_api
from .config import PluginArgumentParser, add_plugin_arguments, config_from_args, split_plugin_argv

USAGE = "python -m megatron_offload_plugin.launch SCRIPT.py [script and plugin flags ...]"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        parser = PluginArgumentParser(prog="megatron_offload_plugin.launch", usage=USAGE, allow_abbrev=False,
                                      description=__doc__.split("\n\n")[0])
        add_plugin_arguments(parser)
        parser.print_help()
        return 0 if argv else 2
    script, rest = argv[0], argv[1:]
    try:
        plugin_argv, script_argv = split_plugin_argv(rest)
    except ValueError as err:
        print(f"megatron_offload_plugin.launch: error: {err}", file=sys.stderr)
        return 2
    parser = PluginArgumentParser(prog="megatron_offload_plugin.launch", allow_abbrev=False)
    add_plugin_arguments(parser)
    try:
        config = config_from_args(parser.parse_args(plugin_argv))
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


if __name__ == "__main__":
    sys.exit(main())
