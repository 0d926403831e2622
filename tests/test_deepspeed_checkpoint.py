"""engine.save_checkpoint / load_checkpoint carry the offloaded optimizer states; resuming is bitwise."""

from __future__ import annotations

import pytest
import torch

from megatron_offload_plugin.deepspeed import layerwise_optimizer
from megatron_offload_plugin.deepspeed.tiny import GPTShape, batches, build, ds_config, train
from megatron_offload_plugin.offload.nvme import aio_available

AIO_OK, AIO_WHY = aio_available()
SHAPE = GPTShape(vocab=64, hidden=32, layers=3, heads=4, seq=16)


def _section(device, tmp_path):
    return {"optimizer_states": {"device": device, **({"nvme_path": str(tmp_path)} if device == "nvme" else {})}}


@pytest.mark.parametrize("stage,bf16,device", [
    (0, False, "cpu"),
    (2, True, "cpu"),
    (1, True, "cpu"),
    pytest.param(1, False, "nvme", marks=pytest.mark.skipif(not AIO_OK, reason=AIO_WHY)),
    pytest.param(2, True, "nvme", marks=pytest.mark.skipif(not AIO_OK, reason=AIO_WHY)),
    pytest.param(0, True, "nvme", marks=pytest.mark.skipif(not AIO_OK, reason=AIO_WHY)),
])
def test_resume_continues_bitwise(tmp_path, stage, bf16, device):
    cfg = ds_config(stage=stage, bf16=bf16, section=_section(device, tmp_path))
    # uninterrupted: 2 steps, checkpoint, 2 more steps
    engine = build(SHAPE, cfg)
    data = batches(SHAPE, 2)
    train(engine, 2, data)
    engine.save_checkpoint(str(tmp_path / "ckpt"), tag="step2")
    expected = train(engine, 2, data)
    weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}

    # resumed: a fresh engine (different init seed), load, the same next batches
    resumed = build(SHAPE, cfg, seed=123)
    path, _ = resumed.load_checkpoint(str(tmp_path / "ckpt"), tag="step2")
    assert path is not None
    data = batches(SHAPE, 2)
    for _ in range(2 * engine.gradient_accumulation_steps()):
        data()
    got = train(resumed, 2, data)
    assert got == expected
    for k, v in resumed.module.state_dict().items():
        assert torch.equal(v, weights[k]), k
    opt = layerwise_optimizer(resumed)
    assert not any(opt.inner.state.get(p) for g in opt.param_groups for p in g["params"])  # re-offloaded
    if stage:  # ZeRO's fp32 masters went back to the layer buffers too
        assert opt.offloads_master_weights
        assert all(m.untyped_storage().nbytes() == 0 for m in resumed.optimizer.single_partition_of_fp32_groups)


def test_checkpoint_holds_the_offloaded_states(tmp_path):
    engine = build(SHAPE, ds_config(section=_section("cpu", tmp_path)))
    train(engine, 1, batches(SHAPE, 2))
    sd = engine.optimizer.state_dict()
    params = [p for g in engine.optimizer.param_groups for p in g["params"]]
    assert len(sd["state"]) == len(params)
    assert all({"exp_avg", "exp_avg_sq", "step"} <= set(s) for s in sd["state"].values())
    assert any(s["exp_avg"].abs().sum() > 0 for s in sd["state"].values())
