"""``layerwise_offload.activations`` on a real DeepSpeed engine: bitwise losses, about one layer resident."""

from __future__ import annotations

import functools

import pytest
import torch

from megatron_offload_plugin.deepspeed.activations import activation_offload
from megatron_offload_plugin.deepspeed.tiny import Block, GPTShape, batches, build, ds_config, train
from megatron_offload_plugin.offload.nvme import aio_available
from megatron_offload_plugin.telemetry.activation_memory import SavedTensorTracker

SHAPE = GPTShape(vocab=64, hidden=32, layers=6, heads=4, seq=16)
STEPS = 3


@functools.lru_cache(maxsize=None)
def baseline() -> tuple[float, ...]:
    return tuple(train(build(SHAPE, ds_config(stage=1)), STEPS, batches(SHAPE, 2)))


def _layer_bytes() -> int:
    """What one Block saves for backward (the selected modules' unit)."""
    torch.manual_seed(0)
    block = Block(SHAPE.hidden, SHAPE.heads)
    tracker = SavedTensorTracker(exclude=list(block.parameters()))
    with tracker.track():
        out = block(torch.randn(2, SHAPE.seq - 1, SHAPE.hidden, requires_grad=True))
        saved = tracker.current_bytes
    del out
    return saved


@pytest.mark.parametrize("device", ["cpu", pytest.param("nvme", marks=pytest.mark.skipif(
    not aio_available()[0], reason=f"DeepSpeed aio unavailable: {aio_available()[1]}"))])
def test_activation_offload_is_bitwise_and_keeps_about_one_layer(tmp_path, device):
    act = {"device": device, "min_tensor_bytes": 0, **({"nvme_path": str(tmp_path)} if device == "nvme" else {})}
    engine = build(SHAPE, ds_config(stage=1, section={"activations": act}))
    attached = activation_offload(engine)
    assert attached is not None and len(attached.modules) == SHAPE.layers
    tracker = SavedTensorTracker(exclude=list(engine.module.parameters()))
    peaks = []

    def measured_train_step(step: int) -> None:
        peaks.append(tracker.peak_bytes)
        tracker.reset_peak()

    with tracker.track():
        losses = train(engine, STEPS, batches(SHAPE, 2), on_step=measured_train_step)
    assert losses == list(baseline())
    stats = attached.take_stats()
    assert stats["offloaded_bytes"] == stats["reloaded_bytes"] > 0 and stats["on_demand_reloads"] == 0
    if device == "nvme":
        assert stats["nvme_written_bytes"] == stats["offloaded_bytes"]
    layer = _layer_bytes()
    # Outside the six layers only the embedding, the head and the loss keep tensors;
    # of the layers at most one layer's worth (on CPU no prefetch: copies are synchronous).
    no_offload = SavedTensorTracker(exclude=list(engine.module.parameters()))
    reference = build(SHAPE, ds_config(stage=1))
    with no_offload.track():
        train(reference, 1, batches(SHAPE, 2))
    outside_layers = no_offload.peak_bytes - SHAPE.layers * layer
    assert max(peaks) <= outside_layers + layer
    attached.close()
    assert "forward" not in vars(attached.modules[0])
    if device == "nvme":
        assert list(tmp_path.iterdir()) == []


def test_every_shipped_layerwise_config_parses():
    import json
    from pathlib import Path

    from megatron_offload_plugin.deepspeed import section_from_config

    root = Path(__file__).resolve().parents[1] / "configs"
    paths = sorted(root.glob("deepspeed_layerwise_*.json"))
    assert len(paths) >= 7
    for path in paths:
        section = section_from_config(json.loads(path.read_text()))
        assert section is not None and section.enabled, path.name
