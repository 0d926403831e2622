"""Point-to-point messages between pipeline ranks, matched by the senders' program order.

NCCL ignores tags and matches a pair's sends and receives in posting order, and
gloo does the same for one tag.  Every rank knows every rank's program, so each
receiver knows the order in which each peer will send to it and posts its
receives in exactly that order (lazily, only up to the message it needs).
Sends are asynchronous and awaited at the end of the step, so a rank only ever
blocks on a message it needs next.  A message between two stages on the same
rank (the turn of a V placement) never leaves the process.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


class PipelineCommError(RuntimeError):
    """A message that no program sends, or messages left over at the end of a step."""


@dataclass
class _PeerQueue:
    expected: list[Hashable]
    posted: int = 0
    works: dict[Hashable, tuple[Any, torch.Tensor]] = field(default_factory=dict)


class Mailbox:
    def __init__(
        self,
        *,
        rank: int,
        group: Any,
        expected: dict[int, list[Hashable]],
        shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.rank = rank
        self.group = group
        self.shape = tuple(shape)
        self.dtype = dtype
        self.device = device
        self._peers = {peer: _PeerQueue(list(keys)) for peer, keys in expected.items() if peer != rank}
        self._local: dict[Hashable, torch.Tensor] = {}
        self._sends: list[tuple[Any, torch.Tensor]] = []

    def _global(self, pp_rank: int) -> int:
        return dist.get_global_rank(self.group, pp_rank) if self.group is not None else pp_rank

    def send(self, peer: int, key: Hashable, tensor: torch.Tensor) -> None:
        payload = tensor.detach()
        if peer == self.rank:
            self._local[key] = payload
            return
        payload = payload.contiguous()
        work = dist.isend(payload, dst=self._global(peer), group=self.group)
        self._sends.append((work, payload))  # keep the buffer alive until the send completes

    def recv(self, peer: int, key: Hashable) -> torch.Tensor:
        if peer == self.rank:
            try:
                return self._local.pop(key).requires_grad_()
            except KeyError:
                raise PipelineCommError(f"rank {self.rank}: local message {key} was never produced") from None
        queue = self._peers.get(peer)
        if queue is None or key not in queue.expected:
            raise PipelineCommError(f"rank {self.rank}: no program sends {key} from rank {peer}")
        index = queue.expected.index(key)
        while queue.posted <= index:
            k = queue.expected[queue.posted]
            buf = torch.empty(self.shape, dtype=self.dtype, device=self.device, requires_grad=False)
            queue.works[k] = (dist.irecv(buf, src=self._global(peer), group=self.group), buf)
            queue.posted += 1
        work, buf = queue.works.pop(key)
        work.wait()
        return buf.requires_grad_()

    def finish(self) -> None:
        """Wait for every send; fail if a message was never consumed."""
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()
        left = [k for q in self._peers.values() for k in q.expected[q.posted:]]
        left += [k for q in self._peers.values() for k in q.works]
        left += list(self._local)
        if left:
            raise PipelineCommError(f"rank {self.rank}: messages never received: {left[:8]}")
