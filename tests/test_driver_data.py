"""The driver's data sources and recipe checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_offload_plugin.integrations.megatron.data import (
    ByteTokenizer,
    TokenStreamBatches,
    embedded_corpus_tokens,
    load_token_file,
    padded_vocab_size,
)
from megatron_offload_plugin.integrations.megatron.recipe import GPTRecipe


def test_embedded_corpus_is_byte_tokens_with_document_ends():
    tokens = embedded_corpus_tokens()
    assert tokens.min() >= 0 and tokens.max() == ByteTokenizer.eod
    text = ByteTokenizer().detokenize(tokens[:200].tolist())
    assert text.startswith("Pipeline parallelism")


def test_padded_vocab_follows_megatron_rule():
    assert padded_vocab_size(257, 128, 1) == 384
    assert padded_vocab_size(257, 128, 2) == 512
    assert padded_vocab_size(256, 128, 1) == 256


def test_megatron_indexed_dataset_round_trips(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path / "corpus_text_document"
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    docs = [np.arange(5, 12, dtype=np.uint16), np.arange(100, 103, dtype=np.uint16)]
    for doc in docs:
        builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
    builder.finalize(str(prefix) + ".idx")
    stream = load_token_file(prefix)
    assert stream.tolist() == np.concatenate(docs).tolist()


def test_npy_token_file_must_be_one_dimensional_integers(tmp_path):
    good, bad = tmp_path / "t.npy", tmp_path / "f.npy"
    np.save(good, np.arange(10))
    np.save(bad, np.zeros((2, 2), dtype=np.float32))
    assert load_token_file(good).tolist() == list(range(10))
    with pytest.raises(ValueError, match="1-D integer array"):
        load_token_file(bad)


def test_missing_data_path_names_what_is_accepted(tmp_path):
    with pytest.raises(ValueError, match=r"--data-path=.*not found; accepted: a Megatron IndexedDataset prefix"):
        load_token_file(tmp_path / "nope")


def test_microbatches_are_identical_on_every_pipeline_rank_and_split_by_data_rank():
    stream = TokenStreamBatches(np.arange(1000) % 50, seq_length=8, vocab_size=64)
    a = stream.microbatches(3, global_batch_size=8, micro_batch_size=2, dp_rank=0, dp_size=2)
    b = stream.microbatches(3, global_batch_size=8, micro_batch_size=2, dp_rank=0, dp_size=2)
    other = stream.microbatches(3, global_batch_size=8, micro_batch_size=2, dp_rank=1, dp_size=2)
    assert len(a) == 2 and all(torch.equal(x.tokens, y.tokens) for x, y in zip(a, b))
    assert not torch.equal(a[0].tokens, other[0].tokens)
    assert torch.equal(a[0].labels[:, :-1], a[0].tokens[:, 1:])


def test_token_ids_beyond_the_vocabulary_are_rejected():
    with pytest.raises(ValueError, match="vocabulary has 10 entries"):
        TokenStreamBatches(np.arange(100), seq_length=8, vocab_size=10)


@pytest.mark.parametrize(
    "kwargs, world, message",
    [
        (dict(num_layers=6, pipeline_model_parallel_size=4), 4, "--num-layers=6 is not divisible"),
        (dict(global_batch_size=6, micro_batch_size=4), 1, "--global-batch-size=6 is not divisible"),
        (dict(pipeline_model_parallel_size=2, num_layers=8, num_layers_per_virtual_pipeline_stage=3), 2,
         "choose a divisor of 4"),
        (dict(recompute_granularity="full"), 1, "needs --recompute-method"),
        (dict(pipeline_model_parallel_size=3), 4, "world size 4 is not divisible"),
        (dict(seq_length=512, max_position_embeddings=256), 1, "exceeds --max-position-embeddings"),
    ],
)
def test_recipe_rejects_what_megatron_rejects(kwargs, world, message):
    with pytest.raises(ValueError, match=message):
        GPTRecipe(**kwargs).validate(world)


def test_recipe_derives_virtual_pipeline_size_like_megatron_lm():
    r = GPTRecipe(num_layers=8, pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=2)
    assert r.virtual_pipeline_size == 2 and r.num_chunks == 2
    assert GPTRecipe().virtual_pipeline_size is None
