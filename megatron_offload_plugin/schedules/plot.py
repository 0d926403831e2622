"""Timeline figure of a simulated schedule, in the style of the zero-bubble papers' figures.

One row per device (device 0 on top), time to the right; each compute action
is a box coloured by kind (F, B, W, BW; a model chunk's second half of a V
or interleaved placement in a darker shade) with its microbatch number inside.
White is idle.  When the schedule offloads activations, two thin bars under
each device row show its copy channels: OFFLOAD (device to host) above RELOAD
(host to device).  An optional lower panel draws each device's activation
memory (with offload, if any).
Uses matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path

from .ir import Kind
from .simulator import SimulationResult

# (chunk 0 colour, last chunk colour) per kind; intermediate chunks are blended.
COLORS: dict[Kind, tuple[str, str]] = {
    Kind.F: ("#cfe2f3", "#6fa8dc"),
    Kind.B: ("#d9ead3", "#93c47d"),
    Kind.W: ("#fff2cc", "#f1c232"),
    Kind.BW: ("#f4cccc", "#e06666"),
}
COPY_COLORS: dict[Kind, str] = {Kind.OFFLOAD: "#8e7cc3", Kind.RELOAD: "#c27ba0"}


def _blend(a: str, b: str, x: float) -> str:
    ca = [int(a[i:i + 2], 16) for i in (1, 3, 5)]
    cb = [int(b[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(u + (v - u) * x):02x}" for u, v in zip(ca, cb))


def color_of(kind: Kind, chunk: int, chunks: int) -> str:
    light, dark = COLORS[kind]
    return light if chunks == 1 else _blend(light, dark, chunk / (chunks - 1))


def plot_timeline(result: SimulationResult, path: str | Path, *, title: str | None = None,
                  memory: bool = True, dpi: int = 120) -> Path:
    """Write the timeline of ``result`` as a PNG at ``path`` and return the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    schedule = result.schedule
    p, chunks = schedule.pp, schedule.placement.chunks
    makespan = result.makespan or 1.0
    width = min(max(8.0, makespan * 0.4 * max(1, schedule.placement.chunks) ** 0.5), 60.0)
    rows = 2 if memory else 1
    fig, axes = plt.subplots(rows, 1, figsize=(width, 0.55 * p + 1.6 + (1.8 if memory else 0)), squeeze=False,
                             gridspec_kw={"height_ratios": [max(p, 2), 2] if memory else [1]})
    ax = axes[0][0]
    boxes = [e for e in result.timeline if e.action.is_compute]
    pixels_per_unit = width * dpi / makespan
    groups: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for e in boxes:  # one bar collection per (device, colour): thousands of boxes stay fast
        colour = color_of(e.action.kind, e.action.chunk, chunks)
        groups.setdefault((e.rank, colour), []).append((e.start, e.end - e.start))
    copies = [e for e in result.timeline if e.action.is_offload]
    box_y, box_h = (0.3, 0.65) if copies else (0.05, 0.9)  # with copies, leave room for the channel bars
    for (rank, colour), spans in groups.items():
        ax.broken_barh(spans, (p - 1 - rank + box_y, box_h), facecolors=colour, edgecolors="#444444", linewidth=0.4)
    lanes: dict[tuple[int, Kind], list[tuple[float, float]]] = {}
    for e in copies:
        lanes.setdefault((e.rank, e.action.kind), []).append((e.start, e.end - e.start))
    for (rank, kind), spans in lanes.items():
        y = p - 1 - rank + (0.165 if kind is Kind.OFFLOAD else 0.04)
        ax.broken_barh(spans, (y, 0.1), facecolors=COPY_COLORS[kind], edgecolors="#444444", linewidth=0.2)
    for e in boxes:
        y = p - 1 - e.rank + (box_y + box_h / 2 - 0.5)
        box_px = (e.end - e.start) * pixels_per_unit
        label = str(e.action.microbatch)
        if box_px >= 5.5 * len(label):
            ax.text((e.start + e.end) / 2, y + 0.5, label, ha="center", va="center",
                    fontsize=max(4.5, min(9.0, box_px / (1.1 * len(label) + 1))))
    ax.set_xlim(0, makespan)
    ax.set_ylim(0, p)
    ax.set_yticks([p - 1 - r + 0.5 for r in range(p)])
    ax.set_yticklabels([f"device {r}" for r in range(p)])
    ax.set_xlabel("time")
    kinds = sorted({e.action.kind for e in boxes}, key=lambda k: list(COLORS).index(k))
    handles = [Patch(facecolor=color_of(k, chunks - 1, chunks), edgecolor="#444444", label=k.value) for k in kinds]
    handles += [Patch(facecolor=COPY_COLORS[k], edgecolor="#444444", label=f"{k.value} ({'D2H' if k is Kind.OFFLOAD else 'H2D'})")
                for k in COPY_COLORS if any(e.action.kind is k for e in copies)]
    ax.legend(handles=handles, loc="upper right", bbox_to_anchor=(1.0, 1.0 + 0.9 / max(p, 2)), ncol=len(handles),
              fontsize=8, frameon=False)
    heading = title or (
        f"{schedule.name or 'schedule'}: pp={p}, microbatches={schedule.microbatches}, chunks/rank={chunks}; "
        f"makespan {result.makespan:.4g}, bubble {result.bubble_rate:.2%} "
        f"(steady {result.steady_bubble_rate:.2%}), peak activation {max(result.peak_activation):.3g}"
        + (f" (no offload {max(result.offload.peak_activation_no_offload):.3g}; {result.offload.offloaded_units} units "
           f"offloaded, makespan +{result.offload.added_makespan_rel:.2%})" if result.offload is not None else "")
    )
    ax.set_title(heading, fontsize=9, loc="left")
    if memory:
        mx = axes[1][0]
        for r, curve in enumerate(result.memory):
            xs, ys = [], []
            for t, level in curve:
                if xs and t == xs[-1]:  # several changes at one instant: draw where it settles
                    ys[-1] = level
                    continue
                if xs:
                    xs.append(t)
                    ys.append(ys[-1])
                xs.append(t)
                ys.append(level)
            xs.append(makespan)
            ys.append(ys[-1])
            mx.plot(xs, ys, linewidth=1.0, label=f"device {r}")
        mx.set_xlim(0, makespan)
        mx.set_ylabel("activations")
        mx.set_xlabel("time")
        mx.legend(fontsize=7, ncol=min(p, 8), loc="upper right", frameon=False)
    fig.subplots_adjust(left=0.9 / fig.get_figwidth(), right=1 - 0.2 / fig.get_figwidth(),
                        top=1 - 0.55 / fig.get_figheight(), bottom=0.45 / fig.get_figheight(), hspace=0.45)
    out = Path(path)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
