"""V placement holds for every Megatron-core caller, not only the plugin's own driver.

Chunks are built as Megatron-LM's ``get_model`` builds them (``pre_process``/``post_process``
from ``megatron.core.pipeline_parallel.utils``), after ``apply()`` of a V schedule: rank r of
p holds V stages r and 2p-1-r, so the embedding is on rank 0 chunk 0 and the output layer,
the loss and Float16Module's fp32 upcast on rank 0 chunk 1.
"""

from __future__ import annotations

import pytest

from megatron_offload_plugin.testing.distributed import run_distributed
from megatron_offload_plugin.testing.equivalence import layout_gradients_worker
from megatron_offload_plugin.testing.v_placement import get_model_gradients_worker, placement_worker

pytestmark = pytest.mark.multiprocess

PP = 2


@pytest.fixture
def v_gpt(tiny_gpt: dict) -> dict:
    """Four V stages of one layer, dropout off (V orders forwards differently from 1F1B)."""
    return dict(tiny_gpt, num_layers=4, hidden_dropout=0.0, attention_dropout=0.0, micro_batch_size=1,
                global_batch_size=4, untie_embeddings_and_output_weights=True, pipeline_model_parallel_size=PP)


def _expected_layers(num_layers: int, embedding: bool, loss: bool) -> dict[tuple[int, int], list[int]]:
    """(rank, chunk) -> 1-based layer numbers: stage s of 2p holds an equal share of the layers
    plus the embedding (stage 0) and the loss (stage 2p-1) counted as one layer each."""
    stages = 2 * PP
    per = (num_layers + embedding + loss) // stages
    counts = [per - (embedding and s == 0) - (loss and s == stages - 1) for s in range(stages)]
    starts = [sum(counts[:s]) for s in range(stages)]
    where = {}
    for r in range(PP):
        for c, s in ((0, r), (1, stages - 1 - r)):
            where[(r, c)] = list(range(starts[s] + 1, starts[s] + counts[s] + 1))
    return where


@pytest.mark.parametrize(
    "num_layers, overrides",
    [(4, {}), (6, {"account_for_embedding_in_pipeline_split": True, "account_for_loss_in_pipeline_split": True})],
    ids=["even", "account-for-embedding-and-loss"],
)
def test_get_model_puts_embedding_and_loss_on_rank0_under_zb_v(v_gpt, num_layers, overrides):
    got = run_distributed(placement_worker, PP, dict(v_gpt, num_layers=num_layers), "zb-v", overrides, timeout_s=300)
    layers = _expected_layers(num_layers, bool(overrides), bool(overrides))
    for r, chunks in enumerate(got):
        for c, chunk in enumerate(chunks):
            where = f"rank {r} chunk {c}"
            assert chunk["float16_module"] == "Float16Module", where
            assert chunk["pre_process"] == (r == 0 and c == 0), where
            assert chunk["post_process"] == chunk["has_output_layer"] == (r == 0 and c == 1), where
            # Float16Module upcasts only the V last stage's output (the loss); hidden states stay bf16.
            assert chunk["output_dtype"] == ("torch.float32" if (r, c) == (0, 1) else "torch.bfloat16"), where
            assert chunk["layer_numbers"] == layers[(r, c)], where


@pytest.mark.parametrize(
    "num_layers, overrides",
    [
        (4, {}),
        (4, {"calculate_per_token_loss": True}),
        (6, {"account_for_embedding_in_pipeline_split": True, "account_for_loss_in_pipeline_split": True}),
    ],
    ids=["even", "per-token-loss", "account-for-embedding-and-loss"],
)
def test_get_model_chunks_under_zb_v_compute_megatron_1f1b_gradients(v_gpt, num_layers, overrides):
    """One zb-v step on Megatron-LM-style chunks against Megatron's own 1F1B (one chunk per rank)
    on the same weights, set by global parameter name so both layouts compute the same function."""
    per_token = overrides.get("calculate_per_token_loss", False)
    base = dict(v_gpt, num_layers=num_layers, calculate_per_token_loss=per_token)
    reference = run_distributed(layout_gradients_worker, PP, base, timeout_s=300)
    ref_grads = {k: v for r in reference for k, v in r["grads"].items()}
    layout = {k: v for k, v in overrides.items() if k != "calculate_per_token_loss"}
    got = run_distributed(get_model_gradients_worker, PP, base, "zb-v", layout, timeout_s=300)
    got_grads = {k: v for r in got for k, v in r["grads"].items()}
    assert got_grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        rel = ((got_grads[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        assert rel <= 1e-6, f"{name} differs by {rel:.2e} (relative)"
    assert got[0]["loss"] == reference[-1]["loss"] and got[1]["loss"] is None  # V: the loss is on rank 0


def test_get_model_refuses_tied_embeddings_under_v_naming_the_flag(v_gpt):
    """Tied weights are synchronised over the first and last pipeline ranks; under V both are
    rank 0, whose all-reduce would wait for a peer that never joins: refused at build."""
    from megatron_offload_plugin.testing.distributed import DistributedRunError

    with pytest.raises(DistributedRunError, match="--untie-embeddings-and-output-weights"):
        run_distributed(placement_worker, PP, dict(v_gpt, untie_embeddings_and_output_weights=False), "zb-v", {},
                        timeout_s=300)


def _config(pp: int, vp: int | None, num_layers: int, **overrides):
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=num_layers, hidden_size=64, num_attention_heads=4,
                             pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vp,
                             pipeline_dtype=torch.float32, **overrides)


@pytest.fixture
def v_patches():
    from megatron_offload_plugin.patches import PatchSet
    from megatron_offload_plugin.patches.megatron_core import v_placement_patches

    patches = PatchSet(log=False)
    patches.apply(v_placement_patches())
    try:
        yield patches
    finally:
        patches.revert()


@pytest.mark.parametrize("embedding, loss", [(False, False), (True, False), (False, True), (True, True)])
def test_v_layers_cover_the_model_once_in_stage_order_at_pp4(v_patches, embedding, loss):
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    pp, num_layers = 4, 16 - embedding - loss
    config = _config(pp, 2, num_layers, account_for_embedding_in_pipeline_split=embedding,
                     account_for_loss_in_pipeline_split=loss)
    by_stage = {}
    for rank in range(pp):
        for chunk, stage in ((0, rank), (1, 2 * pp - 1 - rank)):
            start = get_transformer_layer_offset(config, vp_stage=chunk, pp_rank=rank)
            by_stage[stage] = list(range(start, start + get_num_layers_to_build(config, vp_stage=chunk, pp_rank=rank)))
    assert [i for s in range(2 * pp) for i in by_stage[s]] == list(range(num_layers))
    assert len(by_stage[0]) == 2 - embedding and len(by_stage[2 * pp - 1]) == 2 - loss


@pytest.mark.parametrize("vp", [None, 4], ids=["one-chunk", "interleaved-4"])
def test_v_layer_patches_keep_megatrons_answers_without_two_virtual_stages(vp):
    from megatron.core.transformer import transformer_block, transformer_layer

    from megatron_offload_plugin.patches import PatchSet
    from megatron_offload_plugin.patches.megatron_core import v_placement_patches

    config = _config(4, vp, 30 if vp else 22, account_for_embedding_in_pipeline_split=True,
                     account_for_loss_in_pipeline_split=True)
    where = [(rank, chunk) for rank in range(4) for chunk in (range(vp) if vp else [None])]

    def answers() -> list[tuple[int, int]]:
        return [(transformer_layer.get_transformer_layer_offset(config, vp_stage=c, pp_rank=r),
                 transformer_block.get_num_layers_to_build(config, vp_stage=c, pp_rank=r)) for r, c in where]

    megatron = answers()
    patches = PatchSet(log=False)
    patches.apply(v_placement_patches())
    try:
        assert answers() == megatron
    finally:
        patches.revert()


def test_v_layer_split_that_does_not_divide_names_the_options(v_patches):
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    # Megatron checks the split when the config is built; a flag set afterwards reaches the patch.
    config = _config(2, 2, 7, account_for_loss_in_pipeline_split=True)
    config.account_for_embedding_in_pipeline_split = True
    with pytest.raises(ValueError, match=r"num_layers=7 \+ 1 \(account_for_embedding_in_pipeline_split\) "
                                         r"\+ 1 \(account_for_loss_in_pipeline_split\) = 9 .* 4 stages"):
        get_num_layers_to_build(config, vp_stage=0, pp_rank=0)


def test_v_patches_rebind_by_name_imports_and_revert_to_the_originals():
    """Megatron-LM's training.py, finalize_model_grads and LanguageModule import the predicates by
    name before apply(); all of them see the V answers, and revert() puts back upstream's objects."""
    import importlib

    from megatron.core.models.common.language_module import language_module as lm
    from megatron.core.pipeline_parallel import utils

    from megatron_offload_plugin.patches import PatchError, PatchSet
    from megatron_offload_plugin.patches.megatron_core import v_placement_patches
    from megatron_offload_plugin.testing import megatron_lm

    fmg = importlib.import_module("megatron.core.distributed.finalize_model_grads")
    before = (utils.is_pp_last_stage, utils.get_pp_last_rank, lm.LanguageModule.setup_embeddings_and_output_layer)
    patches = PatchSet(log=False)
    patches.apply(v_placement_patches())
    try:
        patches.apply(v_placement_patches())  # idempotent: already applied, nothing changes
        assert utils.is_pp_last_stage is not before[0]
        assert fmg.is_pp_last_stage is lm.is_pp_last_stage is megatron_lm.is_pp_last_stage is utils.is_pp_last_stage
        assert fmg.get_pp_last_rank is utils.get_pp_last_rank is not before[1]
        with pytest.raises(PatchError, match="already replaced"):
            PatchSet(log=False).apply(v_placement_patches())
    finally:
        patches.revert()
    after = (utils.is_pp_last_stage, utils.get_pp_last_rank, lm.LanguageModule.setup_embeddings_and_output_layer)
    assert after == before
    assert fmg.is_pp_last_stage is lm.is_pp_last_stage is megatron_lm.is_pp_last_stage is before[0]
    assert fmg.get_pp_last_rank is before[1]
