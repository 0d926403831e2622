"""The cost model: how long each action takes and how much activation memory it holds.

Units.  ``f``, ``b`` and ``w`` are the times of one microbatch through one
device's *full share* of layers (its forward, input-gradient backward and
weight-gradient backward).  A chunk holds a fraction of that share (``1 /
chunks`` by default, or ``stage_weights[stage]``) and costs that fraction.
An unsplit BW costs ``b + w``.  ``comm`` is a delay between devices (from the
end of a producer to the earliest start of its consumer on another rank), not
device time; stages on the same rank exchange nothing.

Activation memory is counted in units of one microbatch's activations through
one device's full share of layers, so a chunk's forward stores its fraction.
Accounting: the forward allocates its share when it starts; the share is
held until the weight gradient (W) ends, because W still reads the saved
layer inputs; an unsplit BW frees it all when it ends.  ``b_releases`` moves
part of the release to the end of B (the zero-bubble papers note that most
activation memory is dead once the input gradient is computed); the default
0 is the conservative "held until W" accounting all the targets are stated in.
"""

from __future__ import annotations

from dataclasses import dataclass

from .ir import Action, Kind, Placement


@dataclass(frozen=True)
class CostModel:
    f: float = 1.0
    b: float = 1.0
    w: float = 1.0
    comm: float = 0.0
    stage_weights: tuple[float, ...] | None = None
    b_releases: float = 0.0

    def __post_init__(self) -> None:
        for name in ("f", "b", "w"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"cost {name}={value!r}: must be a positive time")
        if not self.comm >= 0:
            raise ValueError(f"cost comm={self.comm!r}: must be a non-negative delay")
        if not 0 <= self.b_releases <= 1:
            raise ValueError(f"b_releases={self.b_releases!r}: must be a share between 0 and 1")
        if self.stage_weights is not None:
            weights = tuple(float(x) for x in self.stage_weights)
            if any(not x > 0 for x in weights):
                raise ValueError(f"stage_weights={weights}: every stage needs a positive share")
            object.__setattr__(self, "stage_weights", weights)

    @classmethod
    def uniform(cls) -> CostModel:
        return cls()

    def fraction(self, placement: Placement, rank: int, chunk: int) -> float:
        """Share of the device's full layer share that ``chunk`` on ``rank`` holds."""
        if self.stage_weights is None:
            return 1.0 / placement.chunks
        if len(self.stage_weights) != placement.num_stages:
            raise ValueError(
                f"stage_weights has {len(self.stage_weights)} entries but the placement has "
                f"{placement.num_stages} stages"
            )
        return self.stage_weights[placement.stage(rank, chunk)]

    def duration(self, placement: Placement, rank: int, action: Action) -> float:
        """Device time of ``action`` (communication actions take none)."""
        base = {Kind.F: self.f, Kind.B: self.b, Kind.W: self.w, Kind.BW: self.b + self.w}.get(action.kind)
        if base is None:
            return 0.0
        return base * self.fraction(placement, rank, action.chunk)

    def allocates(self, placement: Placement, rank: int, action: Action) -> float:
        """Activation units allocated when ``action`` starts."""
        return self.fraction(placement, rank, action.chunk) if action.kind is Kind.F else 0.0

    def releases(self, placement: Placement, rank: int, action: Action) -> float:
        """Activation units freed when ``action`` ends."""
        share = {Kind.B: self.b_releases, Kind.W: 1.0 - self.b_releases, Kind.BW: 1.0}.get(action.kind, 0.0)
        return share * self.fraction(placement, rank, action.chunk)

    def to_dict(self) -> dict:
        out = {"f": self.f, "b": self.b, "w": self.w, "comm": self.comm}
        if self.stage_weights is not None:
            out["stage_weights"] = list(self.stage_weights)
        if self.b_releases:
            out["b_releases"] = self.b_releases
        return out
