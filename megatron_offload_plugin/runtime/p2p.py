"""Point-to-point messages between pipeline ranks, posted as the p2p plan says.

Every rank knows every rank's program, so the plan (:mod:`.p2p_plan`) fixes, for
each rank, which sends and receives are posted together after which action:
each group goes out as one ``batch_isend_irecv`` (an NCCL group, so its sends
and receives progress together), receives from a peer in the order the peer
sends (NCCL ignores tags).  The plan is checked deadlock-free under NCCL's
semantics before the first step.  A rank blocks only on a message it needs next;
sends are awaited at the end of the step.  A message between two stages on the
same rank (the turn of a V) never leaves the process.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from .p2p_plan import RankPlan


class PipelineCommError(RuntimeError):
    """A message the plan does not post, or messages left over at the end of a step."""


class Mailbox:
    """One step's messages of one rank: stage sends, post the plan's groups, hand out receives."""

    def __init__(
        self,
        *,
        rank: int,
        group: Any,
        plan: RankPlan,
        shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.rank = rank
        self.group = group
        self.plan = plan
        self.shape = tuple(shape)
        self.dtype = dtype
        self.device = device
        self._staged: dict[Hashable, torch.Tensor] = {}
        self._local: dict[Hashable, torch.Tensor] = {}
        self._recvs: dict[Hashable, tuple[Any, torch.Tensor]] = {}
        self._sends: list[tuple[Any, torch.Tensor]] = []

    def _global(self, pp_rank: int) -> int:
        return dist.get_global_rank(self.group, pp_rank) if self.group is not None else pp_rank

    def send(self, peer: int, key: Hashable, tensor: torch.Tensor) -> None:
        """Hand over an action's output; it leaves with the plan's next group (or stays local)."""
        payload = tensor.detach()
        if peer == self.rank:
            self._local[key] = payload
            return
        self._staged[key] = payload.contiguous()

    def post(self, index: int) -> None:
        """Post the group the plan puts after program index ``index`` (``-1``: before the first)."""
        ops = self.plan.posts.get(index)
        if not ops:
            return
        p2p_ops = []
        kept: list[tuple[str, Hashable, torch.Tensor]] = []
        for op in ops:
            if op.kind == "send":
                try:
                    buf = self._staged.pop(op.key)
                except KeyError:
                    raise PipelineCommError(
                        f"rank {self.rank}: the plan sends {op.key} after action {index}, which did not produce it"
                    ) from None
                p2p_ops.append(dist.P2POp(dist.isend, buf, self._global(op.peer), self.group))
            else:
                buf = torch.empty(self.shape, dtype=self.dtype, device=self.device, requires_grad=False)
                p2p_ops.append(dist.P2POp(dist.irecv, buf, self._global(op.peer), self.group))
            kept.append((op.kind, op.key, buf))
        works = dist.batch_isend_irecv(p2p_ops)
        for work, (kind, key, buf) in zip(works, kept):
            if kind == "send":
                self._sends.append((work, buf))  # keep the buffer alive until the send completes
            else:
                self._recvs[key] = (work, buf)

    def recv(self, peer: int, key: Hashable) -> torch.Tensor:
        if peer == self.rank:
            try:
                return self._local.pop(key).requires_grad_()
            except KeyError:
                raise PipelineCommError(f"rank {self.rank}: local message {key} was never produced") from None
        try:
            work, buf = self._recvs.pop(key)
        except KeyError:
            raise PipelineCommError(
                f"rank {self.rank}: {key} from rank {peer} is needed but the plan has not posted its receive"
            ) from None
        work.wait()
        return buf.requires_grad_()

    def finish(self) -> None:
        """Wait for every send; fail if a message was never consumed or never sent."""
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()
        left = list(self._recvs) + list(self._local) + list(self._staged)
        if left:
            raise PipelineCommError(f"rank {self.rank}: messages never consumed or sent: {left[:8]}")
