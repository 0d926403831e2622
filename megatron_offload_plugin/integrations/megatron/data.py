"""Token sources for the GPT driver: the embedded corpus, synthetic tokens, a user's file.

The driver must run on a machine with no network, so the default data is on
every machine already: the package's short text on pipeline parallelism, then
the standard library's ``pydoc_data.topics`` (about 465 KB of English prose
from the Python reference manual), byte-level tokenized.  ``--data-path``
takes what Megatron users already have: a Megatron ``IndexedDataset`` prefix
(``<prefix>.bin`` + ``<prefix>.idx``), or a 1-D integer ``.npy`` array.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

logger = logging.getLogger(__name__)

BYTE_VOCAB = 256
EOD_TOKEN = BYTE_VOCAB  # end-of-document token after the 256 byte values


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus one end-of-document token (vocab 257)."""

    vocab_size = BYTE_VOCAB + 1
    eod = EOD_TOKEN

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, tokens: list[int]) -> str:
        return bytes(t for t in tokens if t < BYTE_VOCAB).decode("utf-8", errors="replace")


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron-LM's rule: pad the vocabulary so every TP rank gets an equal, aligned slice."""
    multiple = divisible_by * tensor_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def embedded_corpus_documents() -> list[str]:
    """The embedded corpus as documents, in a fixed order.

    First the package's own text (one document per paragraph), then the standard
    library's pydoc topics (one document per topic, sorted by name).  The pydoc
    text is the one of the running Python, so the corpus is the same on every rank
    and every rerun with that interpreter.
    """
    text = resources.files("megatron_offload_plugin.data").joinpath("corpus.txt").read_text("utf-8")
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a stripped-down Python without the pydoc data
        logger.warning(
            "pydoc_data.topics is not available in this Python; the embedded corpus is only the "
            "package's %d-paragraph text, which a few iterations memorise; pass --data-path for "
            "real data", len(docs)
        )
        return docs
    docs.extend(topics[name].strip() for name in sorted(topics) if topics[name].strip())
    return docs


@functools.lru_cache(maxsize=1)
def _embedded_corpus_tokens() -> np.ndarray:
    parts: list[np.ndarray] = []
    eod = np.asarray([ByteTokenizer.eod], dtype=np.int64)
    for doc in embedded_corpus_documents():
        parts.append(np.frombuffer(doc.encode("utf-8"), dtype=np.uint8).astype(np.int64))
        parts.append(eod)
    tokens = np.concatenate(parts)
    tokens.flags.writeable = False
    return tokens


def embedded_corpus_tokens() -> np.ndarray:
    """The embedded corpus as byte tokens, each document followed by the end-of-document token."""
    return _embedded_corpus_tokens().copy()


def synthetic_tokens(num_tokens: int, vocab_size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, size=num_tokens, dtype=np.int64)


def load_token_file(path: str | Path) -> np.ndarray:
    """Read a Megatron IndexedDataset prefix or a .npy array into one token stream."""
    p = Path(path)
    prefix = p.with_suffix("") if p.suffix in (".bin", ".idx") else p
    if prefix.with_suffix(".idx").exists() and prefix.with_suffix(".bin").exists():
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        ds = IndexedDataset(str(prefix), mmap=True)
        parts = [np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))]
        if not parts:
            raise ValueError(f"--data-path={str(path)!r}: the IndexedDataset holds no documents")
        return np.concatenate(parts)
    if p.suffix == ".npy" and p.exists():
        arr = np.load(p, allow_pickle=False)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"--data-path={str(path)!r}: expected a 1-D integer array, got shape "
                f"{arr.shape} dtype {arr.dtype}"
            )
        return arr.astype(np.int64)
    raise ValueError(
        f"--data-path={str(path)!r}: not found; accepted: a Megatron IndexedDataset prefix "
        "(PREFIX.bin and PREFIX.idx, as written by Megatron-LM's preprocess_data.py) or a "
        "1-D integer .npy file"
    )


@dataclass(frozen=True)
class Sample:
    tokens: torch.Tensor  # [b, s] inputs
    labels: torch.Tensor  # [b, s] next tokens
    position_ids: torch.Tensor  # [b, s]


class TokenStreamBatches:
    """Cuts one token stream into fixed-length samples, identically on every pipeline rank.

    Sample ``i`` starts at ``(i * seq_length) mod (N - seq_length - 1)``: deterministic,
    so every stage of a pipeline (and a rerun with the same seed) sees the same data.
    Each data-parallel rank takes its own contiguous slice of each global batch.
    """

    def __init__(self, tokens: np.ndarray, seq_length: int, vocab_size: int) -> None:
        if tokens.size < seq_length + 2:
            raise ValueError(
                f"token stream has {tokens.size} tokens; --seq-length={seq_length} needs at "
                f"least {seq_length + 2}"
            )
        if int(tokens.max()) >= vocab_size or int(tokens.min()) < 0:
            raise ValueError(
                f"token ids span [{int(tokens.min())}, {int(tokens.max())}] but the model "
                f"vocabulary has {vocab_size} entries"
            )
        self.tokens = torch.from_numpy(np.ascontiguousarray(tokens))
        self.seq_length = seq_length
        self._span = tokens.size - seq_length - 1

    def sample(self, index: int) -> torch.Tensor:
        start = (index * self.seq_length) % self._span
        return self.tokens[start : start + self.seq_length + 1]

    def microbatches(
        self,
        iteration: int,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
    ) -> list[Sample]:
        """The microbatches of one iteration for one data-parallel rank, in order."""
        per_rank = global_batch_size // dp_size
        first = iteration * global_batch_size + dp_rank * per_rank
        out = []
        for mb in range(per_rank // micro_batch_size):
            idx = range(first + mb * micro_batch_size, first + (mb + 1) * micro_batch_size)
            seqs = torch.stack([self.sample(i) for i in idx])
            positions = torch.arange(self.seq_length, dtype=torch.long).unsqueeze(0)
            out.append(
                Sample(
                    tokens=seqs[:, :-1].contiguous(),
                    labels=seqs[:, 1:].contiguous(),
                    position_ids=positions.expand(micro_batch_size, -1).contiguous(),
                )
            )
        return out


def iterators_for_chunks(samples: list[Sample], num_chunks: int) -> Iterator[Sample] | list[Iterator[Sample]]:
    """Megatron's schedules take one iterator per model chunk with interleaving, else one."""
    if num_chunks == 1:
        return iter(samples)
    return [iter(samples) for _ in range(num_chunks)]
