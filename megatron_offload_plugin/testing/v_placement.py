"""V placement seen from outside the plugin's driver: chunks built by Megatron-LM's ``get_model``.

Rank r of p holds V stages r (chunk 0) and 2p-1-r (chunk 1), so the embedding and
the output layer with the loss are both on rank 0.  These workers (run_distributed
targets) build the chunks with :func:`.megatron_lm.get_model` after
``megatron_offload_plugin.apply()``, report where Megatron-core put everything, and
run one step of a V schedule through ``get_forward_backward_func()`` so the
gradients can be compared with Megatron's own 1F1B (:func:`.equivalence.layout_gradients_worker`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .. import plugin as plugin_api
from ..integrations.megatron.recipe import GPTRecipe


def _initialize_v_parallel(recipe: GPTRecipe) -> None:
    """Megatron's groups with two virtual stages per rank (V always has two), and the seeds."""
    from megatron.core import parallel_state

    from ..integrations.megatron.model import seed_everything

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=recipe.tensor_model_parallel_size,
        pipeline_model_parallel_size=recipe.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=2,
    )
    seed_everything(recipe.seed)


def _v_config(recipe: GPTRecipe, overrides: dict[str, Any]) -> Any:
    """The driver's TransformerConfig for ``recipe`` with two virtual stages and ``overrides``."""
    from ..integrations.megatron.model import transformer_config

    return dataclasses.replace(transformer_config(recipe), virtual_pipeline_model_parallel_size=2, **overrides)


def _vocab(recipe: GPTRecipe) -> int:
    from ..integrations.megatron.data import ByteTokenizer, padded_vocab_size

    return padded_vocab_size(
        ByteTokenizer.vocab_size, recipe.make_vocab_size_divisible_by, recipe.tensor_model_parallel_size
    )


def _gpt(chunk: Any) -> Any:
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def placement_worker(
    rank: int, world_size: int, recipe_kwargs: dict[str, Any], schedule: str, overrides: dict[str, Any]
) -> list[dict[str, Any]]:
    """Per chunk of this rank: pre/post_process, output layer, layer numbers, and the dtype
    a bf16 ``Float16Module`` returns from a forward with labels (fp32 only where it upcasts)."""
    from . import megatron_lm  # by-name imports bound before apply(), as in Megatron-LM

    recipe = GPTRecipe(**recipe_kwargs)
    plugin_api.apply({"schedule": {"pipeline_schedule": schedule}, "telemetry": {"log_patches": False}})
    try:
        _initialize_v_parallel(recipe)
        config = _v_config(recipe, {**overrides, "bf16": True, "pipeline_dtype": torch.bfloat16})
        vocab = _vocab(recipe)
        untie = recipe.untie_embeddings_and_output_weights
        provider = megatron_lm.gpt_provider(vocab, recipe.max_positions, untie=untie)
        chunks = megatron_lm.get_model(provider, config)
        gen = torch.Generator().manual_seed(0)
        b, s = recipe.micro_batch_size, recipe.seq_length
        tokens = torch.randint(0, vocab, (b, s), generator=gen)
        positions = torch.arange(s).unsqueeze(0).expand(b, s)
        report = []
        for chunk in chunks:
            gpt = _gpt(chunk)
            if not gpt.pre_process:
                chunk.set_input_tensor(torch.randn(s, b, config.hidden_size, generator=gen).to(torch.bfloat16))
            with torch.no_grad():
                out = chunk(tokens, positions, None, labels=tokens)
            report.append({
                "float16_module": type(chunk).__name__,
                "pre_process": gpt.pre_process,
                "post_process": gpt.post_process,
                "has_output_layer": hasattr(gpt, "output_layer"),
                "layer_numbers": [layer.layer_number for layer in gpt.decoder.layers],
                "output_dtype": str(out.dtype),
            })
        return report
    finally:
        plugin_api.revert()


def get_model_gradients_worker(
    rank: int, world_size: int, recipe_kwargs: dict[str, Any], schedule: str, overrides: dict[str, Any]
) -> dict[str, Any]:
    """One iteration of ``schedule`` on DDP chunks from Megatron-LM's ``get_model``, weights set by
    global parameter name; global-name -> main_grad and the loss (None off the loss rank)."""
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads

    from . import megatron_lm  # by-name imports bound before apply(), as in Megatron-LM
    from ..integrations.megatron.data import TokenStreamBatches, embedded_corpus_tokens
    from ..integrations.megatron.model import ModelBundle
    from ..integrations.megatron.training import Trainer, reduce_lm_loss
    from .equivalence import global_main_grads, set_layout_independent_weights

    recipe = GPTRecipe(**recipe_kwargs)
    plugin_api.apply({"schedule": {"pipeline_schedule": schedule}, "telemetry": {"log_patches": False}})
    try:
        _initialize_v_parallel(recipe)
        config = _v_config(recipe, overrides)
        vocab = _vocab(recipe)
        untie = recipe.untie_embeddings_and_output_weights
        provider = megatron_lm.gpt_provider(vocab, recipe.max_positions, untie=untie)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=False, overlap_grad_reduce=False, use_distributed_optimizer=False
        )
        chunks = megatron_lm.get_model(provider, config, ddp_config=ddp_config)
        set_layout_independent_weights(chunks, recipe.seed)
        # The hooks Megatron-LM's training loop puts on the shared config.
        config.no_sync_func = [c.no_sync for c in chunks]
        config.finalize_model_grads_func = finalize_model_grads
        bundle = ModelBundle(chunks=chunks, config=config, optimizer=None, padded_vocab_size=vocab)
        trainer = Trainer(recipe, bundle, TokenStreamBatches(embedded_corpus_tokens(), recipe.seq_length, vocab),
                          activation_memory="off")
        for chunk in chunks:
            chunk.zero_grad_buffer()
        loss_dicts = trainer.run_schedule(0)
        loss = reduce_lm_loss(loss_dicts, recipe.calculate_per_token_loss)
        return {"loss": loss, "grads": global_main_grads(bundle)}
    finally:
        plugin_api.revert()
