"""Shared fixtures: a small GPT recipe and the rule that tests never touch a real GPU by accident."""

from __future__ import annotations

import os

import pytest

# Tests run many processes on a 2-core machine: one thread each keeps them from fighting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_GPT = dict(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    seq_length=32,
    micro_batch_size=2,
    hidden_dropout=0.1,
    attention_dropout=0.1,
    seed=1234,
)


@pytest.fixture
def tiny_gpt() -> dict:
    return dict(TINY_GPT)
