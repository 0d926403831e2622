"""Build Megatron-core GPT model chunks, DDP wrappers and optimizer the way Megatron-LM does.

Everything here is upstream Megatron-core (GPTModel with the local layer spec,
``DistributedDataParallel``, ``get_megatron_optimizer``, ``finalize_model_grads``);
the driver only wires it as ``megatron/training`` would, so a schedule or offload
compared on these objects is compared on what users run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from .recipe import GPTRecipe

logger = logging.getLogger(__name__)


def initialize_model_parallel(recipe: GPTRecipe) -> None:
    """Megatron's process groups and RNG tracker (torch.distributed must be initialized)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=recipe.tensor_model_parallel_size,
        pipeline_model_parallel_size=recipe.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=recipe.virtual_pipeline_size,
    )
    seed_everything(recipe.seed)


def seed_everything(seed: int) -> None:
    """Megatron-LM's ``_set_random_seed``: offset by pipeline rank, then the TP tracker."""
    import random

    import numpy as np
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def transformer_config(recipe: GPTRecipe) -> Any:
    from megatron.core.transformer.transformer_config import TransformerConfig

    vpp = recipe.virtual_pipeline_size
    on_gpu = torch.cuda.is_available()
    # Megatron-LM: overlap p2p only with interleaving, and batch_p2p_comm = not overlap.
    # On gloo neither is safe, so both are off there: with overlap, Megatron frees a sent
    # output (deallocate_pipeline_outputs swaps its storage) while gloo may still be
    # reading it; with batched p2p at pp=2, the two directions between the same two
    # ranks pair up in posting order and activations get mixed with gradients.
    overlap_p2p = bool(vpp) and recipe.overlap_p2p_communication and on_gpu
    batch_p2p = not overlap_p2p and on_gpu
    return TransformerConfig(
        num_layers=recipe.num_layers,
        hidden_size=recipe.hidden_size,
        num_attention_heads=recipe.num_attention_heads,
        ffn_hidden_size=recipe.ffn_size,
        hidden_dropout=recipe.hidden_dropout,
        attention_dropout=recipe.attention_dropout,
        tensor_model_parallel_size=recipe.tensor_model_parallel_size,
        pipeline_model_parallel_size=recipe.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        pipeline_dtype=torch.float32,
        params_dtype=torch.float32,
        use_cpu_initialization=not torch.cuda.is_available(),
        init_method_std=0.02,
        recompute_granularity=recipe.recompute_granularity,
        recompute_method=recipe.recompute_method,
        recompute_num_layers=recipe.recompute_num_layers,
        overlap_p2p_comm=overlap_p2p,
        batch_p2p_comm=batch_p2p,
        deallocate_pipeline_outputs=True,
        calculate_per_token_loss=recipe.calculate_per_token_loss,
    )


@dataclass
class ModelBundle:
    """The model chunks of this pipeline rank with what Megatron's schedules need."""

    chunks: list[Any]  # DDP-wrapped GPTModel, one per virtual stage
    config: Any  # TransformerConfig shared by the chunks (carries the schedule hooks)
    optimizer: Any
    padded_vocab_size: int

    @property
    def model_arg(self) -> Any:
        """What ``forward_backward_func(model=...)`` expects: a list only with interleaving."""
        return self.chunks if len(self.chunks) > 1 else self.chunks[0]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for c in self.chunks for p in c.parameters()]

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [
            (f"chunk{i}.{n}", p) for i, c in enumerate(self.chunks) for n, p in c.named_parameters()
        ]

    def main_grads(self) -> dict[str, torch.Tensor]:
        """Gradients where Megatron DDP put them (``main_grad``), keyed by chunk and name."""
        out = {}
        for name, p in self.named_parameters():
            grad = getattr(p, "main_grad", None)
            if grad is None:
                grad = p.grad
            out[name] = grad.detach().clone() if grad is not None else None
        return out


def build_model(recipe: GPTRecipe, padded_vocab_size: int) -> ModelBundle:
    """GPTModel chunks (local spec) wrapped in Megatron DDP, with Megatron's optimizer."""
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = transformer_config(recipe)
    spec = get_gpt_layer_local_spec()
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=False, overlap_grad_reduce=False, use_distributed_optimizer=False
    )
    chunks = []
    for vp_stage in range(recipe.num_chunks):
        vp = vp_stage if recipe.virtual_pipeline_size else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab_size,
            max_sequence_length=recipe.max_positions,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=not recipe.untie_embeddings_and_output_weights,
            position_embedding_type="learned_absolute",
            vp_stage=vp,
        )
        if device is not None:
            model.cuda(device)
        chunks.append(
            DistributedDataParallel(
                config=config,
                ddp_config=ddp_config,
                module=model,
                disable_bucketing=vp_stage > 0,
            )
        )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=recipe.lr,
            min_lr=recipe.min_lr,
            weight_decay=recipe.weight_decay,
            adam_beta1=recipe.adam_beta1,
            adam_beta2=recipe.adam_beta2,
            clip_grad=recipe.clip_grad,
            bf16=False,
            fp16=False,
            params_dtype=torch.float32,
            use_distributed_optimizer=False,
        ),
        chunks,
    )
    # The hooks Megatron-LM's training loop installs on the shared config.
    config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    config.grad_sync_func = None
    config.param_sync_func = None
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return ModelBundle(chunks=chunks, config=config, optimizer=optimizer, padded_vocab_size=padded_vocab_size)
