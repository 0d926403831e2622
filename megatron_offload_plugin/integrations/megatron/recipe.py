"""The GPT pretraining recipe: Megatron-LM's flag names, validated once.

``scripts/pretrain_gpt.py`` is a Megatron-core driver for the subset of
Megatron-LM's options listed here; the names, defaults and derived values
follow Megatron-LM (``megatron/training/arguments.py``) so a user's flags carry
over unchanged.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, fields
from typing import Literal, Optional

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class GPTRecipe:
    num_layers: int = 8
    hidden_size: int = 256
    num_attention_heads: int = 8
    ffn_hidden_size: Optional[int] = None
    seq_length: int = 256
    max_position_embeddings: Optional[int] = None
    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_iters: int = 10
    lr: float = 3e-4
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    bf16: bool = False
    accumulate_allreduce_grads_in_fp32: bool = False
    grad_reduce_in_bf16: bool = False
    attention_softmax_in_fp32: bool = False
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    overlap_grad_reduce: bool = False
    use_distributed_optimizer: bool = False
    overlap_param_gather: bool = False
    ddp_bucket_size: Optional[int] = None
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    overlap_p2p_communication: bool = True
    recompute_granularity: Optional[Literal["full", "selective"]] = None
    recompute_method: Optional[Literal["uniform", "block"]] = None
    recompute_num_layers: Optional[int] = None
    untie_embeddings_and_output_weights: bool = False
    calculate_per_token_loss: bool = False
    make_vocab_size_divisible_by: int = 128
    vocab_size: Optional[int] = None
    seed: int = 1234
    log_interval: int = 1
    data_path: Optional[str] = None
    mock_data: bool = False

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings or self.seq_length

    @property
    def virtual_pipeline_size(self) -> Optional[int]:
        """Model chunks per pipeline rank, derived as Megatron-LM does; None without interleaving."""
        if self.num_layers_per_virtual_pipeline_stage is None:
            return None
        per_rank = self.num_layers // self.pipeline_model_parallel_size
        return per_rank // self.num_layers_per_virtual_pipeline_stage

    @property
    def num_chunks(self) -> int:
        return self.virtual_pipeline_size or 1

    @property
    def sequence_parallel_enabled(self) -> bool:
        """Megatron-LM turns --sequence-parallel off at TP=1 (same numerics as without it)."""
        return self.sequence_parallel and self.tensor_model_parallel_size > 1

    @property
    def grad_reduce_in_fp32(self) -> bool:
        """Megatron-LM's ``accumulate_allreduce_grads_in_fp32``: forced on with --bf16 unless
        --grad-reduce-in-bf16, because bf16 main grads lose the small updates of accumulation."""
        if self.bf16:
            return not self.grad_reduce_in_bf16
        return self.accumulate_allreduce_grads_in_fp32

    @property
    def align_param_gather(self) -> bool:
        """Megatron-LM's default: aligned param all-gathers only with interleaving (it forces
        ``align_param_gather`` off for the non-interleaved schedule)."""
        return self.virtual_pipeline_size is not None

    def data_parallel_size(self, world_size: int) -> int:
        model_size = self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size
        return world_size // model_size

    def num_microbatches(self, world_size: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size(world_size))

    def validate(self, world_size: int) -> None:
        """Reject what Megatron-LM rejects, with the option, the value and the fix."""
        tp, pp, cp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size, self.context_parallel_size
        if cp < 1:
            raise ValueError(f"--context-parallel-size={cp}: must be >= 1")
        if cp > 1:
            # megatron.core.transformer.dot_product_attention.DotProductAttention asserts
            # context_parallel_size == 1: only TEDotProductAttention splits attention over CP.
            raise ValueError(
                f"--context-parallel-size={cp}: this driver builds Megatron's local layer spec "
                "(--transformer-impl local), whose DotProductAttention supports only "
                "--context-parallel-size=1; context parallelism needs Transformer Engine's "
                "TEDotProductAttention. Use --context-parallel-size 1"
            )
        if world_size % (tp * pp * cp) != 0:
            raise ValueError(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size={tp} x "
                f"--pipeline-model-parallel-size={pp} x --context-parallel-size={cp}; launch a "
                f"multiple of {tp * pp * cp} processes"
            )
        if self.num_layers % pp != 0:
            raise ValueError(
                f"--num-layers={self.num_layers} is not divisible by "
                f"--pipeline-model-parallel-size={pp}"
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"--hidden-size={self.hidden_size} is not divisible by "
                f"--num-attention-heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % tp != 0:
            raise ValueError(
                f"--num-attention-heads={self.num_attention_heads} is not divisible by "
                f"--tensor-model-parallel-size={tp}"
            )
        dp = self.data_parallel_size(world_size)
        if self.global_batch_size % (self.micro_batch_size * dp) != 0:
            raise ValueError(
                f"--global-batch-size={self.global_batch_size} is not divisible by "
                f"--micro-batch-size={self.micro_batch_size} x data-parallel size {dp}"
            )
        if self.num_layers_per_virtual_pipeline_stage is not None:
            per_rank = self.num_layers // pp
            n = self.num_layers_per_virtual_pipeline_stage
            if pp < 2:
                raise ValueError(
                    "--num-layers-per-virtual-pipeline-stage needs "
                    "--pipeline-model-parallel-size >= 2"
                )
            if n < 1 or per_rank % n != 0:
                raise ValueError(
                    f"--num-layers-per-virtual-pipeline-stage={n}: the {per_rank} layers per "
                    f"pipeline rank must split into equal chunks; choose a divisor of {per_rank}"
                )
        if self.recompute_granularity == "full" and self.recompute_method is None:
            raise ValueError(
                "--recompute-granularity=full needs --recompute-method (uniform or block)"
            )
        if self.recompute_method is not None and self.recompute_granularity != "full":
            raise ValueError(
                f"--recompute-method={self.recompute_method} is only used with "
                "--recompute-granularity=full"
            )
        if self.seq_length > self.max_positions:
            raise ValueError(
                f"--seq-length={self.seq_length} exceeds --max-position-embeddings="
                f"{self.max_positions}"
            )
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ValueError(
                "--overlap-param-gather needs --use-distributed-optimizer (only the distributed "
                "optimizer all-gathers parameters); add it or drop --overlap-param-gather"
            )
        if self.overlap_param_gather and not self.overlap_grad_reduce:
            raise ValueError(
                "--overlap-param-gather needs --overlap-grad-reduce (as in Megatron-LM); add it "
                "or drop --overlap-param-gather"
            )
        if self.ddp_bucket_size is not None and self.ddp_bucket_size < 1:
            raise ValueError(f"--ddp-bucket-size={self.ddp_bucket_size}: must be a positive number of parameters")
        if self.sequence_parallel_enabled and self.seq_length % tp != 0:
            raise ValueError(
                f"--seq-length={self.seq_length} is not divisible by --tensor-model-parallel-size={tp}, "
                "which --sequence-parallel splits the sequence over"
            )
        if self.sequence_parallel and tp == 1:
            logger.warning(
                "--sequence-parallel is ignored at --tensor-model-parallel-size=1 (Megatron-LM "
                "disables it there too; the numerics are those without it)"
            )


def add_megatron_arguments(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's flags for what the driver supports (same names, same meaning)."""
    d = GPTRecipe()
    g = parser.add_argument_group("model (Megatron-LM flags)")
    g.add_argument("--num-layers", type=int, default=d.num_layers, help="Number of transformer layers.")
    g.add_argument("--hidden-size", type=int, default=d.hidden_size, help="Transformer hidden size.")
    g.add_argument("--num-attention-heads", type=int, default=d.num_attention_heads, help="Number of attention heads.")
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="MLP hidden size (default 4 x hidden size).")
    g.add_argument("--seq-length", type=int, default=d.seq_length, help="Sequence length.")
    g.add_argument("--max-position-embeddings", type=int, default=None, help="Maximum positions (default: --seq-length).")
    g.add_argument("--hidden-dropout", type=float, default=d.hidden_dropout, help="Dropout after attention and MLP.")
    g.add_argument("--attention-dropout", type=float, default=d.attention_dropout, help="Dropout on attention probabilities.")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", help="Separate input embedding and output layer weights.")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=d.make_vocab_size_divisible_by, help="Pad the vocabulary to a multiple of this (times TP size).")
    g.add_argument("--vocab-size", type=int, default=None, help="Vocabulary size for --mock-data (default 257: bytes + end of document).")

    g = parser.add_argument_group("training (Megatron-LM flags)")
    g.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size, help="Samples per microbatch.")
    g.add_argument("--global-batch-size", type=int, default=d.global_batch_size, help="Samples per iteration across data-parallel ranks.")
    g.add_argument("--train-iters", type=int, default=d.train_iters, help="Iterations to train.")
    g.add_argument("--lr", type=float, default=d.lr, help="Peak learning rate.")
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="Learning rate at the end of decay.")
    g.add_argument("--lr-warmup-iters", type=int, default=d.lr_warmup_iters, help="Linear warm-up iterations.")
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default=d.lr_decay_style, help="Learning-rate decay.")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay.")
    g.add_argument("--adam-beta1", type=float, default=d.adam_beta1, help="Adam beta1.")
    g.add_argument("--adam-beta2", type=float, default=d.adam_beta2, help="Adam beta2.")
    g.add_argument("--clip-grad", type=float, default=d.clip_grad, help="Global gradient-norm clipping (0 disables).")
    g.add_argument("--calculate-per-token-loss", action="store_true", help="Average the loss over all tokens of the global batch instead of per microbatch.")
    g.add_argument("--seed", type=int, default=d.seed, help="Random seed.")
    g.add_argument("--log-interval", type=int, default=d.log_interval, help="Iterations between log lines.")

    g = parser.add_argument_group("mixed precision (Megatron-LM flags)")
    g.add_argument("--bf16", action="store_true", help="bf16 parameters and activations (Megatron's Float16Module) with fp32 master weights in the optimizer.")
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true", help="Gradient accumulation and all-reduce in fp32 (always on with --bf16 unless --grad-reduce-in-bf16).")
    g.add_argument("--grad-reduce-in-bf16", action="store_true", help="With --bf16: accumulate and reduce gradients in bf16 instead of fp32.")
    g.add_argument("--attention-softmax-in-fp32", action="store_true", help="Run attention masking and softmax in fp32 (with --bf16).")

    g = parser.add_argument_group("parallelism and recompute (Megatron-LM flags)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="Tensor-parallel size.")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="Pipeline-parallel size.")
    g.add_argument("--context-parallel-size", type=int, default=d.context_parallel_size, help="Context-parallel size (only 1 with the local layer spec this driver builds).")
    g.add_argument("--sequence-parallel", action="store_true", help="Split layer norms, dropout and the residual stream over the sequence across tensor-parallel ranks (ignored at TP=1, as in Megatron-LM).")
    g.add_argument("--overlap-grad-reduce", action="store_true", help="Overlap DDP gradient reduction with the backward pass.")
    g.add_argument("--use-distributed-optimizer", action="store_true", help="Shard optimizer state and fp32 master weights over data-parallel ranks.")
    g.add_argument("--overlap-param-gather", action="store_true", help="Overlap the distributed optimizer's parameter all-gather with the next forward pass (needs --use-distributed-optimizer and --overlap-grad-reduce).")
    g.add_argument("--ddp-bucket-size", type=int, default=None, help="Parameters per DDP gradient bucket with --overlap-grad-reduce (default as Megatron-LM: max(40M, 1M x data-parallel size)).")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None, help="Layers per model chunk (interleaved schedule).")
    g.add_argument("--no-overlap-p2p-communication", dest="overlap_p2p_communication", action="store_false", help="Do not overlap pipeline p2p with compute (interleaved schedule).")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None, help="Activation recomputation granularity.")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None, help="Which layers full recomputation covers.")
    g.add_argument("--recompute-num-layers", type=int, default=None, help="Layers per recompute group (uniform) or recomputed layers per stage (block).")

    g = parser.add_argument_group("data (Megatron-LM flags)")
    g.add_argument("--data-path", default=None, help="A Megatron IndexedDataset prefix (PREFIX.bin/.idx) or a 1-D integer .npy file; default: the embedded corpus.")
    g.add_argument("--mock-data", action="store_true", help="Synthetic random tokens instead of text.")


def recipe_from_args(ns: argparse.Namespace) -> GPTRecipe:
    values = {f.name: getattr(ns, f.name) for f in fields(GPTRecipe) if hasattr(ns, f.name)}
    return GPTRecipe(**values)
