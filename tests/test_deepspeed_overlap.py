"""overlap_with_backward: layers step inside the boundary backward; clipping and overflow stay exact."""

from __future__ import annotations

import functools

import pytest

from megatron_offload_plugin.deepspeed import layerwise_optimizer
from megatron_offload_plugin.deepspeed.tiny import GPTShape, batches, build, ds_config, train
from megatron_offload_plugin.offload.nvme import aio_available

AIO_OK, AIO_WHY = aio_available()
SHAPE = GPTShape(vocab=64, hidden=32, layers=3, heads=4, seq=16)
STEPS = 4


@functools.lru_cache(maxsize=None)
def baseline(clip: float) -> tuple[float, ...]:
    return tuple(train(build(SHAPE, ds_config(clip=clip)), STEPS, batches(SHAPE, 2)))


def _run(tmp_path, clip, device="cpu"):
    section = {"optimizer_states": {"device": device, "overlap_with_backward": True,
                                    **({"nvme_path": str(tmp_path)} if device == "nvme" else {})}}
    engine = build(SHAPE, ds_config(clip=clip, section=section))
    losses = train(engine, STEPS, batches(SHAPE, 2))
    return losses, engine


@pytest.mark.parametrize("device", ["cpu", pytest.param("nvme", marks=pytest.mark.skipif(not AIO_OK, reason=AIO_WHY))])
@pytest.mark.parametrize("clip,clipped", [(0.0, False), (1e6, False), (1e-3, True)])
def test_early_steps_give_the_same_losses(tmp_path, device, clip, clipped):
    losses, engine = _run(tmp_path, clip, device)
    assert losses == list(baseline(clip))
    overlap = engine.layerwise_offload_overlap
    n = layerwise_optimizer(engine).num_units
    if clipped:
        # clip 1e-3 always clips: the first step's speculation is undone and redone with the clipped
        # gradients, after which speculation stays off (adaptive) and units step after backward
        assert overlap.rollbacks == 1 and overlap.early_units_total == n and not overlap.speculate
    else:
        assert overlap.rollbacks == 0 and overlap.early_units_total == STEPS * n  # every unit inside backward


def test_non_finite_gradient_norm_rolls_back_like_the_engine(tmp_path):
    """An inf loss scale makes the norm non-finite: DeepSpeed's clip multiplies by NaN; the early step is undone."""
    import torch

    engine = build(SHAPE, ds_config(clip=1.0, section={"optimizer_states": {"device": "cpu",
                                                                            "overlap_with_backward": True}}))
    ref = build(SHAPE, ds_config(clip=1.0))
    data_a, data_b = batches(SHAPE, 2), batches(SHAPE, 2)
    for eng, data in ((engine, data_a), (ref, data_b)):
        for _ in range(eng.gradient_accumulation_steps()):
            x, y = data()
            loss = eng(x, y) * float("inf")
            eng.backward(loss)
            eng.step()
    assert engine.layerwise_offload_overlap.rollbacks == 1
    for (na, a), (nb, b) in zip(engine.module.named_parameters(), ref.module.named_parameters()):
        assert torch.equal(a, b) or (torch.isnan(a).all() and torch.isnan(b).all()) or torch.equal(a.isnan(), b.isnan()), na


def test_overlap_refuses_bf16():
    cfg = ds_config(bf16=True, section={"optimizer_states": {"device": "cpu", "overlap_with_backward": True}})
    with pytest.raises(ValueError, match="overlap_with_backward=true does not fit this engine: fp16/bf16"):
        build(SHAPE, cfg)


def test_speculation_turns_off_after_a_clipped_step_and_on_after_an_unclipped_one(tmp_path):
    """Loss scaled x1000 on step 1 (clipped at 50), x1 afterwards (not clipped): exact throughout."""
    scales = [1000.0, 1.0, 1.0, 1.0]

    def run(section):
        engine = build(SHAPE, ds_config(clip=50.0, section=section))
        data, losses, spec = batches(SHAPE, 2), [], []
        for scale in scales:
            for _ in range(engine.gradient_accumulation_steps()):
                x, y = data()
                loss = engine(x, y)
                engine.backward(loss * scale)
                engine.step()
            losses.append(float(loss.detach()))
            overlap = getattr(engine, "layerwise_offload_overlap", None)
            spec.append(overlap.speculate if overlap else None)
        return losses, spec, engine

    expected, _, _ = run(None)
    losses, spec, engine = run({"optimizer_states": {"device": "cpu", "overlap_with_backward": True}})
    assert losses == expected
    assert spec == [False, True, True, True]
    overlap = engine.layerwise_offload_overlap
    n = layerwise_optimizer(engine).num_units
    # step 1 speculated and rolled back; step 2 did not speculate; steps 3 and 4 stepped inside backward
    assert overlap.rollbacks == 1 and overlap.early_units_total == 3 * n
