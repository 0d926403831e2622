"""Model chunks built the way Megatron-LM's ``get_model`` builds them (``megatron/training/training.py``).

Megatron-LM is not on PyPI, so this module stands in for the part of it that
decides placement: for each virtual stage it asks Megatron-core's
``is_pp_first_stage``/``is_vp_first_stage`` (and the ``last`` pair) for
``pre_process``/``post_process``, calls the model provider, wraps the chunk in
``Float16Module`` under bf16/fp16 and then in Megatron DDP.

The four predicates are imported by name at module level, as Megatron-LM's
``training.py`` does; importing this module before ``megatron_offload_plugin.apply()``
therefore checks that the plugin rebinds names that were imported before it ran.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from megatron.core.pipeline_parallel.utils import (
    is_pp_first_stage,
    is_pp_last_stage,
    is_vp_first_stage,
    is_vp_last_stage,
)
from megatron.core.utils import get_pg_size

# provider(pre_process=..., post_process=..., vp_stage=..., config=..., pg_collection=...) -> module
ModelProvider = Callable[..., torch.nn.Module]


def get_model(
    model_provider: ModelProvider,
    config: Any,
    *,
    pg_collection: Any = None,
    ddp_config: Any = None,
) -> list[torch.nn.Module]:
    """One module per virtual stage, placed by Megatron-core's first/last-stage predicates.

    ``ddp_config``: wrap each chunk in Megatron DDP with it (bucketing only on chunk 0,
    as Megatron-LM does); ``None`` returns the unwrapped (or Float16Module) chunks.
    """
    from megatron.core.process_groups_config import ProcessGroupCollection

    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    pp_group = pg_collection.pp
    vp_size = config.virtual_pipeline_model_parallel_size
    chunks: list[torch.nn.Module] = []
    if get_pg_size(pp_group) > 1 and vp_size is not None:
        for vp_stage in range(vp_size):
            pre_process = is_pp_first_stage(pp_group) and is_vp_first_stage(vp_stage=vp_stage, vp_size=vp_size)
            post_process = is_pp_last_stage(pp_group) and is_vp_last_stage(vp_stage=vp_stage, vp_size=vp_size)
            chunk = model_provider(
                pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
                config=config, pg_collection=pg_collection,
            )
            chunk.vp_stage = vp_stage
            chunks.append(chunk)
    else:
        chunks.append(model_provider(
            pre_process=is_pp_first_stage(pp_group), post_process=is_pp_last_stage(pp_group),
            config=config, pg_collection=pg_collection,
        ))
    if torch.cuda.is_available():
        for chunk in chunks:
            chunk.cuda(torch.cuda.current_device())
    if config.fp16 or config.bf16:
        from megatron.core.transformer.module import Float16Module

        chunks = [Float16Module(config, chunk) for chunk in chunks]
    if ddp_config is None:
        return chunks
    from megatron.core.distributed import DistributedDataParallel

    return [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def gpt_provider(vocab_size: int, max_sequence_length: int, *, untie: bool = True) -> ModelProvider:
    """A ``model_provider`` for GPTModel with the local layer spec (what runs on CPU)."""

    def provide(*, pre_process: bool, post_process: bool, config: Any, vp_stage: int | None = None,
                pg_collection: Any = None) -> torch.nn.Module:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.models.gpt.gpt_model import GPTModel

        return GPTModel(
            config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=vocab_size,
            max_sequence_length=max_sequence_length, pre_process=pre_process, post_process=post_process,
            share_embeddings_and_output_weights=not untie, position_embedding_type="learned_absolute",
            pg_collection=pg_collection, vp_stage=vp_stage,
        )

    return provide
