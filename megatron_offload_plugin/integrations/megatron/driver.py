"""``scripts/pretrain_gpt.py``: Megatron-core GPT pretraining with the plugin's flags beside Megatron-LM's.

Launched with torchrun: NCCL on GPUs; on a machine without GPUs, gloo and the
CPU backend (:mod:`megatron_offload_plugin.backends.cpu`).  The log
lines keep Megatron-LM's shape (people grep and plot them) and add the
plugin's figures as extra ``| key: value |`` fields; the last rank prints them,
as in Megatron-LM.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from ... import plugin as plugin_api
from ...config import PluginArgumentParser, add_plugin_arguments, config_from_args
from .data import ByteTokenizer, TokenStreamBatches, embedded_corpus_tokens, load_token_file, padded_vocab_size, synthetic_tokens
from .model import build_model, initialize_model_parallel
from .recipe import GPTRecipe, add_megatron_arguments, recipe_from_args
from .training import IterationResult, Trainer

logger = logging.getLogger(__name__)

MIB = 1024 * 1024


def build_parser() -> argparse.ArgumentParser:
    parser = PluginArgumentParser(
        prog="pretrain_gpt.py",
        description=(
            "Megatron-core GPT pretraining. Megatron-LM flags and megatron-offload-plugin flags "
            "together; launch with torchrun."
        ),
        allow_abbrev=False,
    )
    add_megatron_arguments(parser)
    add_plugin_arguments(parser)
    g = parser.add_argument_group("driver")
    g.add_argument("--json-summary", default=None, help="Write the run's figures (losses, times, peak activation memory per stage) to this JSON file.")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10, help="torch.distributed timeout.")
    return parser


def print_rank_last(message: str) -> None:
    """Megatron-LM prints iteration logs on the last rank (it holds the loss)."""
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        print(message, flush=True)


def init_distributed(timeout_minutes: int) -> str:
    """NCCL with GPUs; gloo plus the CPU backend without (never on a process that sees a GPU)."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        from ...backends import cpu as cpu_backend

        cpu_backend.enable()
        backend = "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes)
        )
    return backend


def load_tokens(recipe: GPTRecipe) -> tuple[Any, int]:
    """The token stream and the unpadded vocabulary size it needs."""
    if recipe.data_path is not None:
        tokens = load_token_file(recipe.data_path)
        vocab = recipe.vocab_size or int(tokens.max()) + 1
        return tokens, vocab
    if recipe.mock_data:
        vocab = recipe.vocab_size or ByteTokenizer.vocab_size
        n = max(recipe.seq_length * 64, recipe.global_batch_size * (recipe.seq_length + 1) * 4)
        return synthetic_tokens(n, vocab, recipe.seed), vocab
    return embedded_corpus_tokens(), recipe.vocab_size or ByteTokenizer.vocab_size


def format_iteration(recipe: GPTRecipe, it: IterationResult, stage_peaks: list[int]) -> str:
    """Megatron-LM's iteration line plus the plugin's fields."""
    tokens_per_s = recipe.global_batch_size * recipe.seq_length / it.time_s if it.time_s > 0 else 0.0
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    fields = [
        f" [{now}] iteration {it.iteration + 1:8d}/{recipe.train_iters:8d}",
        f"consumed samples: {(it.iteration + 1) * recipe.global_batch_size:12d}",
        f"elapsed time per iteration (ms): {it.time_s * 1000:.1f}",
        f"learning rate: {it.learning_rate:.6E}",
        f"global batch size: {recipe.global_batch_size:5d}",
    ]
    if it.loss is not None:
        fields.append(f"lm loss: {it.loss:.6E}")
    if it.grad_norm is not None:
        fields.append(f"grad norm: {it.grad_norm:.3f}")
    fields.append(f"number of skipped iterations: {int(it.skipped):3d}")
    fields.append(f"tokens per second: {tokens_per_s:.1f}")
    if it.measured_bubble_rate is not None:
        fields.append(f"pipeline bubble rate (measured): {it.measured_bubble_rate:.3f}")
    peaks = "/".join(f"{p / MIB:.2f}" for p in stage_peaks)
    fields.append(f"peak activation memory per stage (MiB): {peaks}")
    if it.offload_per_stage:
        per_stage = it.offload_per_stage
        fields.append("offloaded/reloaded per stage (MiB): " + "/".join(
            f"{s['offloaded_bytes'] / MIB:.2f}:{s['reloaded_bytes'] / MIB:.2f}" for s in per_stage))
        fields.append("host pool per stage (MiB): " + "/".join(f"{s['host_pool_bytes'] / MIB:.2f}" for s in per_stage))
        fields.append("copy time hidden/exposed per stage (ms): " + "/".join(
            f"{max(0.0, s['d2h_seconds'] + s['h2d_seconds'] - s['exposed_seconds']) * 1000:.1f}:"
            f"{s['exposed_seconds'] * 1000:.1f}" for s in per_stage))
    return " | ".join(fields) + " |"


def format_summary(summary: dict[str, Any], recipe: GPTRecipe, world_size: int, plugin_desc: str) -> str:
    rows = [
        ("world size / TP / PP / VPP", f"{world_size} / {recipe.tensor_model_parallel_size} / {recipe.pipeline_model_parallel_size} / {recipe.virtual_pipeline_size or 1}"),
        ("model", f"{recipe.num_layers} layers, hidden {recipe.hidden_size}, heads {recipe.num_attention_heads}, seq {recipe.seq_length}"),
        ("iterations", str(summary["iterations"])),
        ("first / last lm loss", f"{summary['losses'][0]:.4f} / {summary['losses'][-1]:.4f}" if summary["losses"] and summary["losses"][0] is not None else "n/a"),
        ("iteration time (s, excl. first)", f"{summary['iteration_time_s']:.3f}"),
        ("tokens per second", f"{summary['tokens_per_s']:.1f}" if summary["tokens_per_s"] else "n/a"),
        ("plugin", plugin_desc),
    ]
    for stage, peak in enumerate(summary["peak_activation_bytes"]):
        rows.append((f"peak activation memory, stage {stage}", f"{peak / MIB:.2f} MiB ({peak} B)"))
    offload = summary.get("activation_offload")
    if offload:
        for stage, (moved, pool) in enumerate(zip(offload["offloaded_bytes_per_iteration"], offload["host_pool_bytes"])):
            rows.append((f"offloaded per iteration / host pool, stage {stage}", f"{moved / MIB:.2f} / {pool / MIB:.2f} MiB"))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    body = "\n".join(f"{k.ljust(width)} | {v}" for k, v in rows)
    return f"{line}\nrun summary\n{line}\n{body}\n{line}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    recipe = recipe_from_args(args)
    try:
        requested = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    backend = init_distributed(args.distributed_timeout_minutes)
    world_size = torch.distributed.get_world_size()
    try:
        recipe.validate(world_size)
        active = plugin_api.active_config()
        if active is None:
            plugin_api.apply(requested)
        elif not requested.is_default() and requested != active:
            raise ValueError(
                "megatron-offload-plugin was already applied (by megatron_offload_plugin.launch) "
                "with another configuration; give the plugin flags to the launcher only"
            )
        initialize_model_parallel(recipe)
        tokens, vocab = load_tokens(recipe)
        padded = padded_vocab_size(vocab, recipe.make_vocab_size_divisible_by, recipe.tensor_model_parallel_size)
        data = TokenStreamBatches(tokens, recipe.seq_length, padded)
        bundle = build_model(recipe, padded)
        config = plugin_api.active_config()
        trainer = Trainer(recipe, bundle, data, activation_memory=config.telemetry.activation_memory)
        print_rank_last(
            f"> megatron-offload-plugin: backend {backend}, {world_size} ranks, "
            f"{trainer.num_microbatches} microbatches per iteration, {plugin_api.describe()}"
        )
        bundle.begin_training()
        for iteration in range(recipe.train_iters):
            result = trainer.train_step(iteration)
            bundle.after_step(not result.skipped)
            if (iteration + 1) % recipe.log_interval == 0 or iteration + 1 == recipe.train_iters:
                # The last rank holds the loss; its line also carries every stage's peak.
                print_rank_last(format_iteration(recipe, result, trainer.last_stage_peaks))
        bundle.end_training()
        summary = trainer.summary.as_dict()
        summary["plugin"] = plugin_api.describe()
        summary["backend"] = backend
        summary["world_size"] = world_size
        print_rank_last(format_summary(summary, recipe, world_size, plugin_api.describe()))
        if args.json_summary and torch.distributed.get_rank() == world_size - 1:
            Path(args.json_summary).write_text(json.dumps(summary, indent=2))
    finally:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
