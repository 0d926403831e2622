"""The driver's data sources and recipe checks."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

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
from megatron_offload_plugin.integrations.megatron.recipe import GPTRecipe, add_megatron_arguments, recipe_from_args
from megatron_offload_plugin.integrations.megatron.training import learning_rate

RUN_DEMO = Path(__file__).resolve().parents[1] / "scripts" / "run_demo.sh"


def _main_job_recipe() -> GPTRecipe:
    """The recipe ``scripts/run_demo.sh`` (the main job) runs with its default TRAIN_ITERS."""
    script = RUN_DEMO.read_text()
    command = script[script.index("scripts/pretrain_gpt.py") + len("scripts/pretrain_gpt.py"):]
    command = re.sub(r'"\$\{(\w+):-([^}]*)\}"', r"\2", command.replace("\\\n", " "))
    flags = shlex.split(command.split('"$@"')[0])
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_megatron_arguments(parser)
    known, _plugin_flags = parser.parse_known_args(flags)
    return recipe_from_args(known)


def test_embedded_corpus_is_byte_tokens_with_document_ends():
    tokens = embedded_corpus_tokens()
    assert tokens.min() >= 0 and tokens.max() == ByteTokenizer.eod
    text = ByteTokenizer().detokenize(tokens[:200].tolist())
    assert text.startswith("Pipeline parallelism")


def test_embedded_corpus_outlasts_ten_main_jobs_without_wrapping():
    """The main job must train on text it has not seen: ten of its runs back to back never
    reach the end of the corpus (a 4.5 K-token corpus was memorised in three iterations)."""
    recipe = _main_job_recipe()
    consumed = 10 * recipe.train_iters * recipe.global_batch_size * recipe.seq_length
    tokens = embedded_corpus_tokens()
    assert tokens.size - recipe.seq_length - 1 > consumed
    assert (tokens == ByteTokenizer.eod).sum() > 50  # many documents, not one long text


def test_embedded_corpus_is_the_same_in_another_process_and_callers_get_their_own_copy():
    tokens = embedded_corpus_tokens()
    code = (
        "import hashlib; from megatron_offload_plugin.integrations.megatron.data import embedded_corpus_tokens; "
        "print(hashlib.sha256(embedded_corpus_tokens().tobytes()).hexdigest())"
    )
    import hashlib

    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == hashlib.sha256(tokens.tobytes()).hexdigest()
    tokens[:10] = 0
    assert embedded_corpus_tokens()[0] != 0


def test_learning_rate_warms_up_linearly_then_follows_the_cosine_to_min_lr():
    r = GPTRecipe(lr=1e-3, min_lr=1e-4, lr_warmup_iters=4, lr_decay_style="cosine", train_iters=14)
    lrs = [learning_rate(r, i) for i in range(r.train_iters)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] == pytest.approx(1e-3)
    assert lrs[9] == pytest.approx(5.5e-4)  # half-way through the decay: (lr + min_lr) / 2
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] > r.min_lr
    assert learning_rate(r, 100) == pytest.approx(r.min_lr)


def test_main_job_warms_up_gradually_and_decays():
    """Reaching the peak after two iterations made the loss jump (4.27 -> 8.05 at iteration 5)."""
    recipe = _main_job_recipe()
    lrs = [learning_rate(recipe, i) for i in range(recipe.train_iters)]
    peak = max(lrs)
    assert recipe.lr_warmup_iters >= 4 and lrs.index(peak) == recipe.lr_warmup_iters - 1
    assert all(a < b for a, b in zip(lrs[: recipe.lr_warmup_iters], lrs[1: recipe.lr_warmup_iters]))
    assert recipe.lr_decay_style != "constant" and recipe.min_lr > 0
    after = lrs[recipe.lr_warmup_iters - 1:]
    assert all(a >= b for a, b in zip(after, after[1:])) and after[-1] < peak


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
