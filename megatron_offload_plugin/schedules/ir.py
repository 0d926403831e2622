"""The schedule IR: a schedule is plain data.

An :class:`Action` is one step of one pipeline rank: ``kind`` on the rank's
local model ``chunk`` for ``microbatch``.  Its compact form is
``{chunk}{kind}{microbatch}``: ``0F1`` is chunk 0's forward of microbatch 1,
``1SEND_B0`` sends chunk 1's input gradient of microbatch 0, ``0OFFLOAD1`` copies
chunk 0's saved activations of microbatch 1 to the host and ``0RELOAD1`` brings
them back.  A (chunk, microbatch) pair on a rank is a *unit*.  The kinds and
their letters are defined once, in :class:`Kind`; :meth:`Action.parse` accepts
exactly that form (``re.fullmatch``) and nothing else.

A :class:`Schedule` holds one ordered tuple of actions per rank, the number of
microbatches, and the :class:`Placement` that says which virtual pipeline stage
each (rank, chunk) holds.  Chunks are local to a rank: with the V placement,
rank 0's chunk 1 is the last stage.

Our letters differ from ``torch.distributed.pipelining`` (B here is torch's I,
BW here is torch's B); convert only at a boundary.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple


class Kind(str, Enum):
    """What an action does.  The value is the letter(s) used in the compact form."""

    F = "F"  # forward
    B = "B"  # backward for inputs (input gradient); its W comes later
    W = "W"  # backward for weights (weight gradient) of an earlier B
    BW = "BW"  # unsplit backward: B and W in one action
    SEND_F = "SEND_F"  # send this chunk's forward output to the next stage
    RECV_F = "RECV_F"  # receive this chunk's forward input from the previous stage
    SEND_B = "SEND_B"  # send this chunk's input gradient to the previous stage
    RECV_B = "RECV_B"  # receive this chunk's output gradient from the next stage
    OFFLOAD = "OFFLOAD"  # copy the unit's saved activations off the device (after its F)
    RELOAD = "RELOAD"  # bring them back (ends before the unit's B or BW)

    def __str__(self) -> str:
        return self.value

    __hash__ = str.__hash__  # Enum's own hashes by name in Python: kinds are hashed in hot loops

    @property
    def description(self) -> str:
        return KIND_DESCRIPTIONS[self]


KIND_DESCRIPTIONS: dict[Kind, str] = {
    Kind.F: "forward",
    Kind.B: "backward for inputs (input gradient)",
    Kind.W: "backward for weights (weight gradient)",
    Kind.BW: "unsplit backward (input and weight gradients)",
    Kind.SEND_F: "send forward output to the next stage",
    Kind.RECV_F: "receive forward input from the previous stage",
    Kind.SEND_B: "send input gradient to the previous stage",
    Kind.RECV_B: "receive output gradient from the next stage",
    Kind.OFFLOAD: "copy the saved activations of this chunk and microbatch to the host (after its F)",
    Kind.RELOAD: "copy them back to the device (ends before the B or BW that reads them)",
}

COMPUTE_KINDS: frozenset[Kind] = frozenset({Kind.F, Kind.B, Kind.W, Kind.BW})
COMM_KINDS: frozenset[Kind] = frozenset({Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B})
# Copies between device and host memory; neither compute nor communication between ranks.
OFFLOAD_KINDS: frozenset[Kind] = frozenset({Kind.OFFLOAD, Kind.RELOAD})

# Longest letters first, so the alternation never stops at a prefix (BW before B).
_KIND_PATTERN = "|".join(sorted((re.escape(k.value) for k in Kind), key=len, reverse=True))
_ACTION_RE = re.compile(rf"(\d+)({_KIND_PATTERN})(\d+)")


class Action(NamedTuple):
    """One step of one rank: ``kind`` on local ``chunk`` for ``microbatch`` (written ``0F1``)."""

    chunk: int
    kind: Kind
    microbatch: int

    def __repr__(self) -> str:
        return f"{self.chunk}{self.kind.value}{self.microbatch}"

    __str__ = __repr__

    @classmethod
    def parse(cls, text: str) -> Action:
        """``'0F1'`` -> ``Action(0, Kind.F, 1)``; anything else raises ``ValueError``."""
        m = _ACTION_RE.fullmatch(text.strip())
        if m is None:
            kinds = ", ".join(k.value for k in Kind)
            raise ValueError(
                f"{text!r} is not an action; expected CHUNK KIND MICROBATCH such as '0F1' or '1SEND_B0' "
                f"(kinds: {kinds})"
            )
        return cls(int(m.group(1)), Kind(m.group(2)), int(m.group(3)))

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE_KINDS

    @property
    def is_comm(self) -> bool:
        return self.kind in COMM_KINDS

    @property
    def is_offload(self) -> bool:
        """An OFFLOAD or RELOAD: a copy of the unit's saved activations between device and host."""
        return self.kind in OFFLOAD_KINDS

    @property
    def unit(self) -> tuple[int, int]:
        """``(chunk, microbatch)``: the unit whose activations this action makes, moves or frees."""
        return (self.chunk, self.microbatch)


def parse_actions(text: str) -> tuple[Action, ...]:
    """``'0F0 0F1 0BW0'`` (spaces and/or commas) -> a tuple of actions."""
    return tuple(Action.parse(tok) for tok in re.split(r"[\s,]+", text.strip()) if tok)


@dataclass(frozen=True)
class Placement:
    """Which virtual stage each (rank, local chunk) holds: ``stages[rank][chunk]``.

    Stages are numbered in forward order, 0 (takes the input) to
    ``num_stages - 1`` (computes the loss); every rank holds the same number of
    chunks and every stage is held exactly once.
    """

    stages: tuple[tuple[int, ...], ...]
    shape: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        stages = tuple(tuple(int(s) for s in row) for row in self.stages)
        object.__setattr__(self, "stages", stages)
        if not stages or not stages[0]:
            raise ValueError("a placement needs at least one rank holding at least one chunk")
        if len({len(row) for row in stages}) != 1:
            raise ValueError(f"every rank must hold the same number of chunks; got {[len(r) for r in stages]}")
        flat = sorted(s for row in stages for s in row)
        if flat != list(range(len(flat))):
            raise ValueError(
                f"placement {[list(r) for r in stages]} must hold each stage 0..{len(flat) - 1} exactly once")
        object.__setattr__(self, "_where", {s: (r, c) for r, row in enumerate(stages) for c, s in enumerate(row)})
        object.__setattr__(self, "_hash", hash(stages))
        object.__setattr__(self, "_last", len(flat) - 1)

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined]

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        return isinstance(other, Placement) and self.stages == other.stages

    @classmethod
    def single(cls, pp: int) -> Placement:
        """One chunk per rank: stage ``r`` on rank ``r`` (1F1B, ZB-H1/H2)."""
        return cls.interleaved(pp, 1)

    @classmethod
    def interleaved(cls, pp: int, chunks: int) -> Placement:
        """Megatron's interleaving: stage ``c * pp + r`` on rank ``r`` as chunk ``c``."""
        _check_positive(pp=pp, chunks=chunks)
        return cls(tuple(tuple(c * pp + r for c in range(chunks)) for r in range(pp)),
                   shape="single" if chunks == 1 else "interleaved")

    @classmethod
    def v_shape(cls, pp: int) -> Placement:
        """The V placement: rank ``r`` holds stages ``r`` (chunk 0) and ``2 * pp - 1 - r`` (chunk 1)."""
        _check_positive(pp=pp)
        return cls(tuple((r, 2 * pp - 1 - r) for r in range(pp)), shape="v")

    @property
    def pp(self) -> int:
        return len(self.stages)

    @property
    def chunks(self) -> int:
        """Chunks per rank."""
        return len(self.stages[0])

    @property
    def num_stages(self) -> int:
        return self.pp * self.chunks

    def stage(self, rank: int, chunk: int) -> int:
        return self.stages[rank][chunk]

    def locate(self, stage: int) -> tuple[int, int]:
        """``(rank, chunk)`` holding ``stage``."""
        where: dict[int, tuple[int, int]] = self._where  # type: ignore[attr-defined]
        try:
            return where[stage]
        except KeyError:
            raise ValueError(f"stage {stage} outside 0..{self.num_stages - 1}") from None

    def is_first(self, stage: int) -> bool:
        return stage == 0

    def is_last(self, stage: int) -> bool:
        return stage == self._last  # type: ignore[attr-defined]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a positive integer")


@dataclass(frozen=True)
class Schedule:
    """Per-rank ordered actions over ``microbatches`` microbatches on ``placement``."""

    placement: Placement
    ranks: tuple[tuple[Action, ...], ...]
    microbatches: int
    name: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        ranks = tuple(tuple(row) for row in self.ranks)
        object.__setattr__(self, "ranks", ranks)
        if len(ranks) != self.placement.pp:
            raise ValueError(f"schedule has {len(ranks)} ranks but its placement has {self.placement.pp}")
        for rank, row in enumerate(ranks):
            for a in row:
                if not isinstance(a, Action):
                    raise TypeError(f"rank {rank}: {a!r} is not an Action")
        if self.microbatches < 1:
            raise ValueError(f"microbatches={self.microbatches}: must be at least 1")

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def parse(
        cls,
        rows: Mapping[int, str] | Sequence[str],
        *,
        placement: Placement | None = None,
        microbatches: int | None = None,
        name: str = "",
    ) -> Schedule:
        """Build from compact rows, ``{0: "0F0 0F1", 1: "0F0 0F1"}`` or a list of strings.

        Without a placement, each rank holds ``max chunk + 1`` chunks interleaved
        Megatron-style; without ``microbatches``, the largest microbatch + 1.
        """
        if isinstance(rows, Mapping):
            if sorted(rows) != list(range(len(rows))):
                raise ValueError(f"ranks must be 0..{len(rows) - 1}; got {sorted(rows)}")
            texts = [rows[r] for r in range(len(rows))]
        else:
            texts = list(rows)
        actions = [parse_actions(t) for t in texts]
        flat = [a for row in actions for a in row]
        if placement is None:
            chunks = max((a.chunk for a in flat), default=0) + 1
            placement = Placement.interleaved(len(texts), chunks)
        if microbatches is None:
            microbatches = max((a.microbatch for a in flat), default=0) + 1
        return cls(placement, tuple(actions), microbatches, name=name)

    def replace_ranks(self, ranks: Iterable[Iterable[Action]], **changes: Any) -> Schedule:
        """A new schedule with other action lists (and optionally other fields)."""
        fields = dict(placement=self.placement, microbatches=self.microbatches, name=self.name, meta=self.meta)
        fields.update(changes)
        return Schedule(ranks=tuple(tuple(r) for r in ranks), **fields)

    # -- views --------------------------------------------------------------------------------
    @property
    def pp(self) -> int:
        return self.placement.pp

    @property
    def is_lowered(self) -> bool:
        """True once a pass has added communication actions."""
        return any(a.is_comm for row in self.ranks for a in row)

    @property
    def has_offload(self) -> bool:
        """True if any rank moves activations to the host (OFFLOAD/RELOAD actions)."""
        return any(a.is_offload for row in self.ranks for a in row)

    def compute_only(self) -> Schedule:
        """The same schedule without its communication actions (OFFLOAD/RELOAD are kept)."""
        return self.replace_ranks([a for a in row if not a.is_comm] for row in self.ranks)

    def without_offload(self) -> Schedule:
        """The same schedule without its OFFLOAD/RELOAD actions."""
        return self.replace_ranks([a for a in row if not a.is_offload] for row in self.ranks)

    def __iter__(self) -> Iterator[tuple[Action, ...]]:
        return iter(self.ranks)

    def format(self, rank: int) -> str:
        """Rank ``rank``'s actions in compact form, space-separated."""
        return " ".join(repr(a) for a in self.ranks[rank])

    def format_grid(self, error_step: int | None = None, error_rank: int | None = None) -> str:
        """One row per step, one column per rank; ``<-- ERROR HERE`` marks ``error_step``."""
        width = max([len(repr(a)) for row in self.ranks for a in row] + [len(f"Rank {self.pp - 1}")]) + 4
        steps = max((len(r) for r in self.ranks), default=0)
        digits = len(str(max(steps - 1, 0)))
        head = " " * (digits + 7) + "".join(f"Rank {r}".ljust(width) for r in range(self.pp))
        lines = [head.rstrip()]
        for step in range(steps):
            cells = []
            for r, row in enumerate(self.ranks):
                text = repr(row[step]) if step < len(row) else ""
                if step == error_step and r == error_rank:
                    text = f"[{text}]"
                cells.append(text.ljust(width))
            line = f"Step {step:0{digits}d}: " + "".join(cells)
            if step == error_step:
                line = line.rstrip() + "  <-- ERROR HERE"
            lines.append(line.rstrip())
        return "\n".join(lines)

    def __str__(self) -> str:
        return "\n".join(f"rank {r}: {self.format(r)}" for r in range(self.pp))

    # -- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The ``--dump-schedule`` form (see :func:`schedule_from_dict`).

        ``placement[rank][chunk]`` is the virtual stage of that chunk;
        ``actions[rank]`` lists ``[kind, microbatch, chunk]`` in execution order.
        """
        return {
            "format": SCHEDULE_FORMAT,
            "version": SCHEDULE_FORMAT_VERSION,
            "schedule": self.name,
            "pp": self.pp,
            "microbatches": self.microbatches,
            "chunks_per_rank": self.placement.chunks,
            "placement_shape": self.placement.shape,
            "placement": [list(row) for row in self.placement.stages],
            "kinds": {k.value: KIND_DESCRIPTIONS[k] for k in Kind},
            "actions": [[[a.kind.value, a.microbatch, a.chunk] for a in row] for row in self.ranks],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Schedule:
        return schedule_from_dict(data)


SCHEDULE_FORMAT = "megatron-offload-plugin/schedule"
SCHEDULE_FORMAT_VERSION = 1


def schedule_from_dict(data: Mapping[str, Any]) -> Schedule:
    """Read back :meth:`Schedule.to_dict` output (extra keys such as ``timeline`` are ignored)."""
    if data.get("format") != SCHEDULE_FORMAT:
        raise ValueError(f"not a schedule dump: format={data.get('format')!r}, expected {SCHEDULE_FORMAT!r}")
    placement = Placement(tuple(tuple(row) for row in data["placement"]), shape=data.get("placement_shape", "custom"))
    ranks = []
    for rank, row in enumerate(data["actions"]):
        actions = []
        for item in row:
            if not (isinstance(item, (list, tuple)) and len(item) == 3):
                raise ValueError(f"rank {rank}: action {item!r} is not [kind, microbatch, chunk]")
            kind, mb, chunk = item
            actions.append(Action(int(chunk), Kind(kind), int(mb)))
        ranks.append(tuple(actions))
    return Schedule(placement, tuple(ranks), int(data["microbatches"]), name=str(data.get("schedule", "")))
