"""Build Megatron-core GPT model chunks, DDP wrappers and optimizer the way Megatron-LM does.

Everything here is upstream Megatron-core (GPTModel with the local layer spec,
``Float16Module`` for bf16, ``DistributedDataParallel``, ``get_megatron_optimizer``,
``finalize_model_grads``); the driver only wires it as ``megatron/training`` would
(``get_model``, the hooks and pre-hook toggling of ``train()``), so a schedule or
offload compared on these objects is compared on what users run.  The one addition
is :class:`SequenceParallelTorchNorm`, for --sequence-parallel without Apex.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

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
        context_parallel_size=recipe.context_parallel_size,
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
    # Megatron-LM: params_dtype bf16 with --bf16, and pipeline_dtype = params_dtype (p2p in bf16).
    dtype = torch.bfloat16 if recipe.bf16 else torch.float32
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
        context_parallel_size=recipe.context_parallel_size,
        sequence_parallel=recipe.sequence_parallel_enabled,
        bf16=recipe.bf16,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        attention_softmax_in_fp32=recipe.attention_softmax_in_fp32,
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


class SequenceParallelTorchNorm:
    """torch's LayerNorm/RMSNorm for the local spec with --sequence-parallel, where Apex is absent.

    Megatron's ``WrappedTorchNorm`` (the local spec's norm without Apex) refuses sequence
    parallelism only because it does not mark its parameters: with SP each TP rank sees part
    of the sequence, so norm gradients are partial sums that ``finalize_model_grads``
    all-reduces over TP for parameters with ``sequence_parallel=True``, the attribute Apex's
    ``FusedLayerNorm`` and TE's ``TENorm`` set.  This builds the same torch norm and sets it.
    """

    def __new__(cls, config: Any, hidden_size: int, eps: float = 1e-5, **kwargs: Any) -> torch.nn.Module:
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        plain = copy.copy(config)  # shallow: no __post_init__ rerun, only the flag differs
        plain.sequence_parallel = False
        norm = WrappedTorchNorm(plain, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)
        return norm


def layer_spec(config: Any, vp_stage: int | None) -> Any:
    """Megatron's local GPT layer spec; with sequence parallelism and torch norms, the same
    spec with :class:`SequenceParallelTorchNorm` in every norm slot (layers and final norm)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    spec = get_gpt_layer_local_spec()
    if not config.sequence_parallel or spec.submodules.input_layernorm is not WrappedTorchNorm:
        return spec  # Apex's FusedLayerNorm supports sequence parallelism itself
    spec = copy.deepcopy(spec)
    for slot in ("input_layernorm", "pre_mlp_layernorm"):
        if getattr(spec.submodules, slot) is WrappedTorchNorm:
            setattr(spec.submodules, slot, SequenceParallelTorchNorm)
    # The final norm is the block's LayerNormImpl (TENorm when TE is installed).
    final = transformer_block.LayerNormImpl
    if final is WrappedTorchNorm:
        final = SequenceParallelTorchNorm
    num_layers = transformer_block.get_num_layers_to_build(config, vp_stage=vp_stage)
    return transformer_block.TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=final)


@dataclass
class ModelBundle:
    """The model chunks of this pipeline rank with what Megatron's schedules need."""

    chunks: list[Any]  # DDP-wrapped GPTModel (in Float16Module with bf16), one per virtual stage
    config: Any  # TransformerConfig shared by the chunks (carries the schedule hooks)
    optimizer: Any
    padded_vocab_size: int
    # With --overlap-param-gather and the distributed optimizer, Megatron-LM's train() keeps
    # the all-gather pre-hooks off (and config.param_sync_func unset) until a step succeeds.
    delays_param_gather: bool = False
    _held_param_sync_func: Callable[..., Any] | list[Callable[..., Any]] | None = field(default=None, repr=False)
    _pre_hooks_enabled: bool = field(default=True, repr=False)

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

    def begin_training(self) -> None:
        """Megatron-LM's start of ``train()``: pre-hooks off without a sync, param_sync_func held,
        so a bad initialisation fails on its own rank instead of in the first all-gather."""
        if not self.delays_param_gather or not self._pre_hooks_enabled:
            return
        for chunk in self.chunks:
            chunk.disable_forward_pre_hook(param_sync=False)
        self._held_param_sync_func, self.config.param_sync_func = self.config.param_sync_func, None
        self._pre_hooks_enabled = False

    def after_step(self, update_successful: bool) -> None:
        """After the first successful step, forwards gather the updated shards again (pre-hooks on,
        param_sync_func back), as Megatron-LM's loop does; a skipped step keeps waiting."""
        if not self.delays_param_gather or self._pre_hooks_enabled or not update_successful:
            return
        for chunk in self.chunks:
            chunk.enable_forward_pre_hook()
        self.config.param_sync_func, self._held_param_sync_func = self._held_param_sync_func, None
        self._pre_hooks_enabled = True

    def end_training(self) -> None:
        """Megatron-LM's end of ``train()``: pre-hooks off with a synchronous all-gather, so every
        parameter holds the last step's values (each rank updated only its shard)."""
        if not self.delays_param_gather or not self._pre_hooks_enabled:
            return
        for chunk in self.chunks:
            chunk.disable_forward_pre_hook(param_sync=True)
        self._pre_hooks_enabled = False


def ddp_config(recipe: GPTRecipe) -> Any:
    """Megatron-LM's ``get_model`` DDP config for the recipe's flags."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallelConfig

    bucket_size = None  # Megatron-LM: one bucket ("infinite" size) without overlap
    if recipe.overlap_grad_reduce:
        bucket_size = recipe.ddp_bucket_size or max(
            40_000_000, 1_000_000 * parallel_state.get_data_parallel_world_size(with_context_parallel=True)
        )
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=recipe.grad_reduce_in_fp32,
        overlap_grad_reduce=recipe.overlap_grad_reduce,
        overlap_param_gather=recipe.overlap_param_gather,
        align_param_gather=recipe.align_param_gather,
        use_distributed_optimizer=recipe.use_distributed_optimizer,
        bucket_size=bucket_size,
    )


def _per_chunk(funcs: list[Callable[..., Any]]) -> Callable[..., Any] | list[Callable[..., Any]]:
    """Megatron-LM's rule for config hooks: a list per chunk, a single function for one chunk."""
    return funcs if len(funcs) > 1 else funcs[0]


def install_schedule_hooks(config: Any, chunks: list[Any], optimizer: Any, recipe: GPTRecipe) -> None:
    """The hooks Megatron-LM's ``train()`` sets on the shared config before the first step."""
    from megatron.core.distributed import finalize_model_grads

    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = None
    config.grad_sync_func = None
    config.param_sync_func = None
    if recipe.overlap_grad_reduce:
        config.no_sync_func = _per_chunk([c.no_sync for c in chunks])
        # align_grad_reduce is Megatron-LM's default (--no-align-grad-reduce not offered).
        config.grad_sync_func = _per_chunk([c.start_grad_sync for c in chunks])
    if recipe.overlap_param_gather and recipe.align_param_gather:
        config.param_sync_func = _per_chunk([c.start_param_sync for c in chunks])
    config.finalize_model_grads_func = finalize_model_grads


def build_model(recipe: GPTRecipe, padded_vocab_size: int) -> ModelBundle:
    """GPTModel chunks (local spec) wrapped as Megatron-LM's get_model does (Float16Module with
    bf16, then Megatron DDP), with Megatron's optimizer and the training loop's config hooks."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    config = transformer_config(recipe)
    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    models = []
    for vp_stage in range(recipe.num_chunks):
        vp = vp_stage if recipe.virtual_pipeline_size else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(config, vp),
            vocab_size=padded_vocab_size,
            max_sequence_length=recipe.max_positions,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=not recipe.untie_embeddings_and_output_weights,
            position_embedding_type="learned_absolute",
            vp_stage=vp,
        )
        for param in model.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        if device is not None:
            model.cuda(device)
        models.append(Float16Module(config, model) if recipe.bf16 else model)
    ddp = ddp_config(recipe)  # one config for all chunks, as Megatron-LM passes it
    chunks = [
        # Megatron-LM: no bucketing after the first chunk (its communication overlaps anyway).
        DistributedDataParallel(config=config, ddp_config=ddp, module=model, disable_bucketing=i > 0)
        for i, model in enumerate(models)
    ]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=recipe.lr,
            min_lr=recipe.min_lr,
            weight_decay=recipe.weight_decay,
            adam_beta1=recipe.adam_beta1,
            adam_beta2=recipe.adam_beta2,
            clip_grad=recipe.clip_grad,
            bf16=recipe.bf16,
            fp16=False,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=recipe.use_distributed_optimizer,
            overlap_param_gather=recipe.overlap_param_gather,
        ),
        chunks,
    )
    install_schedule_hooks(config, chunks, optimizer, recipe)
    return ModelBundle(
        chunks=chunks, config=config, optimizer=optimizer, padded_vocab_size=padded_vocab_size,
        delays_param_gather=recipe.use_distributed_optimizer and recipe.overlap_param_gather,
    )
