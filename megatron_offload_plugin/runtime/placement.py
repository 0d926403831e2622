"""Which pipeline rank and model chunk hold each virtual stage.

Megatron's interleaved placement puts virtual stage ``c * p + r`` on rank
``r`` as chunk ``c``; the V placement of ZB-V puts stages ``r`` and
``2p - 1 - r`` on rank ``r`` (so the first and the last stage share rank 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Placement:
    pp: int
    chunks_per_rank: int = 1
    shape: Literal["interleaved", "v"] = "interleaved"

    def __post_init__(self) -> None:
        if self.pp < 1 or self.chunks_per_rank < 1:
            raise ValueError(f"placement needs pp >= 1 and chunks_per_rank >= 1, got {self}")
        if self.shape == "v" and self.chunks_per_rank != 2:
            raise ValueError(f"the V placement has exactly 2 chunks per rank, got {self.chunks_per_rank}")

    @property
    def num_stages(self) -> int:
        return self.pp * self.chunks_per_rank

    def stage(self, rank: int, chunk: int) -> int:
        if self.shape == "v":
            return rank if chunk == 0 else 2 * self.pp - 1 - rank
        return chunk * self.pp + rank

    def locate(self, stage: int) -> tuple[int, int]:
        """(rank, chunk) holding ``stage``."""
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage {stage} outside 0..{self.num_stages - 1}")
        if self.shape == "v":
            return (stage, 0) if stage < self.pp else (2 * self.pp - 1 - stage, 1)
        return stage % self.pp, stage // self.pp

    def is_first(self, stage: int) -> bool:
        return stage == 0

    def is_last(self, stage: int) -> bool:
        return stage == self.num_stages - 1
