"""A small GPT-like model and a training loop on DeepSpeed, shared by the tests and ``bench deepspeed``.

Runs on DeepSpeed's CPU accelerator (gloo, world size 1) as well as on a GPU.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTShape:
    vocab: int = 64
    hidden: int = 32
    layers: int = 4
    heads: int = 4
    seq: int = 16


class Block(torch.nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = torch.nn.LayerNorm(hidden)
        self.qkv = torch.nn.Linear(hidden, 3 * hidden)
        self.proj = torch.nn.Linear(hidden, hidden)
        self.ln2 = torch.nn.LayerNorm(hidden)
        self.fc1 = torch.nn.Linear(hidden, 4 * hidden)
        self.fc2 = torch.nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, h)
        x = x + self.proj(att)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(torch.nn.Module):
    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.shape = shape
        self.embed = torch.nn.Embedding(shape.vocab, shape.hidden)
        self.pos = torch.nn.Parameter(torch.randn(shape.seq, shape.hidden) * 0.02)
        self.layers = torch.nn.ModuleList(Block(shape.hidden, shape.heads) for _ in range(shape.layers))
        self.final_norm = torch.nn.LayerNorm(shape.hidden)
        self.head = torch.nn.Linear(shape.hidden, shape.vocab, bias=False)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for layer in self.layers:
            x = layer(x)
        logits = self.head(self.final_norm(x)).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1))


def num_params(shape: GPTShape) -> int:
    h = shape.hidden
    per_layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (4 * h * h + 4 * h) + (4 * h * h + h)
    return shape.vocab * h * 2 + shape.seq * h + shape.layers * per_layer + 2 * h


def init_single_process_dist() -> None:
    """torch.distributed with one gloo rank (what ``deepspeed`` launches would set), once per process."""
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")


def ds_config(*, stage: int = 0, bf16: bool = False, micro_batch: int = 2, grad_accum: int = 2, clip: float = 1.0,
              lr: float = 1e-2, section: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": clip,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.1, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if section is not None:
        cfg["layerwise_offload"] = section
    cfg.update(extra)
    return cfg


def batches(shape: GPTShape, micro_batch: int, seed: int = 1) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic next-token batches from a fixed random walk over the vocabulary."""
    gen = torch.Generator().manual_seed(seed)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        start = torch.randint(0, shape.vocab, (micro_batch, 1), generator=gen)
        steps = torch.randint(1, 4, (micro_batch, shape.seq), generator=gen)
        walk = (start + steps.cumsum(1)) % shape.vocab
        return walk[:, :-1].contiguous(), walk[:, 1:].contiguous()

    return next_batch


def build(shape: GPTShape, config: dict[str, Any], *, seed: int = 0, initialize: Callable[..., Any] | None = None) -> Any:
    """A DeepSpeed engine on a fresh ``TinyGPT`` (same weights for the same seed)."""
    from . import initialize as layerwise_initialize

    init_single_process_dist()
    torch.manual_seed(seed)
    model = TinyGPT(shape)
    engine, *_ = (initialize or layerwise_initialize)(model=model, config=config)
    return engine


def train(engine: Any, steps: int, next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
          on_step: Callable[[int], None] | None = None) -> list[float]:
    """``steps`` optimizer steps; the returned loss of a step is the mean over its micro-batches."""
    device = engine.device
    losses: list[float] = []
    for step in range(steps):
        total = 0.0
        for _ in range(engine.gradient_accumulation_steps()):
            x, y = next_batch()
            loss = engine(x.to(device), y.to(device))
            engine.backward(loss)
            engine.step()
            total += float(loss.detach().float())
        losses.append(total / engine.gradient_accumulation_steps())
        if on_step is not None:
            on_step(step)
    return losses


def max_rel_diff(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b)), default=0.0) if len(a) == len(b) else math.inf


def replay(next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], n: int) -> Callable[..., Any]:
    """``n`` batches drawn once; ``replay(...)(start)`` serves them again from ``start`` (a retried step's data)."""
    drawn = [next_batch() for _ in range(n)]
    return lambda start=0: iter(drawn[start:]).__next__


def snapshot(engine: Any) -> tuple[dict[str, torch.Tensor], dict[Any, dict[str, Any]], tuple[Any, ...]]:
    """Everything a step changes: weights (and ZeRO's fp32 masters), optimizer states, step counters, learning rate."""
    weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    if hasattr(engine.optimizer, "single_partition_of_fp32_groups"):  # ZeRO-1/2 (resident around state_dict)
        from deepspeed.checkpoint.constants import SINGLE_PARTITION_OF_FP32_GROUPS

        masters = engine.optimizer.state_dict()[SINGLE_PARTITION_OF_FP32_GROUPS]
        weights.update({f"fp32 master {i}": m.detach().clone() for i, m in enumerate(masters)})
    holder = getattr(engine, "layerwise_offload_optimizer", None) or engine.optimizer
    states = {k: {n: t.clone() if torch.is_tensor(t) else t for n, t in v.items()}
              for k, v in holder.state_dict()["state"].items()}
    return weights, states, (engine.global_steps, engine.global_samples, tuple(engine.get_lr()))


def snapshot_differences(a: Any, b: Any) -> list[str]:
    """What differs between two :func:`snapshot` s, bit for bit (empty: identical)."""
    (wa, sa, ca), (wb, sb, cb) = a, b
    out = [] if ca == cb else [f"counters/lr {ca} != {cb}"]
    out += [f"weight {k}" for k in sorted(set(wa) | set(wb)) if k not in wa or k not in wb or not torch.equal(wa[k], wb[k])]
    for k in sorted(set(sa) | set(sb), key=str):
        ta, tb = sa.get(k, {}), sb.get(k, {})
        out += [f"state {k}.{n}" for n in sorted(set(ta) | set(tb)) if n not in ta or n not in tb
                or not torch.equal(torch.as_tensor(ta[n]), torch.as_tensor(tb[n]))]
    return out
