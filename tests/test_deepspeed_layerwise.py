"""Layer-wise optimizer-state offload on DeepSpeed (CPU accelerator): same losses, bounded resident states."""

from __future__ import annotations

import functools

import pytest
import torch

from megatron_offload_plugin.deepspeed import layerwise_optimizer
from megatron_offload_plugin.deepspeed.tiny import (GPTShape, batches, build, ds_config, max_rel_diff, replay, snapshot,
                                                    snapshot_differences, train)
from megatron_offload_plugin.offload.nvme import aio_available

AIO_OK, AIO_WHY = aio_available()
needs_aio = pytest.mark.skipif(not AIO_OK, reason=f"DeepSpeed aio unavailable: {AIO_WHY}")

SHAPE = GPTShape(vocab=64, hidden=32, layers=4, heads=4, seq=16)
STEPS = 4


@functools.lru_cache(maxsize=None)
def baseline(stage: int, bf16: bool, clip: float = 1.0) -> tuple[float, ...]:
    engine = build(SHAPE, ds_config(stage=stage, bf16=bf16, clip=clip))
    return tuple(train(engine, STEPS, batches(SHAPE, 2)))


def run_section(tmp_path, stage: int, bf16: bool, device: str, clip: float = 1.0, **opt) -> tuple[list[float], object]:
    section = {"optimizer_states": {"device": device, **({"nvme_path": str(tmp_path)} if device == "nvme" else {}), **opt}}
    engine = build(SHAPE, ds_config(stage=stage, bf16=bf16, clip=clip, section=section))
    return train(engine, STEPS, batches(SHAPE, 2)), engine


CASES = [(s, bf, "cpu") for s in (0, 1, 2) for bf in (False, True)] + [
    pytest.param(0, False, "nvme", marks=needs_aio),
    pytest.param(1, True, "nvme", marks=needs_aio),
    pytest.param(2, False, "nvme", marks=needs_aio),
]


@pytest.mark.parametrize("stage,bf16,device", CASES)
def test_losses_match_the_engine_without_the_section(tmp_path, stage, bf16, device):
    losses, engine = run_section(tmp_path, stage, bf16, device)
    expected = list(baseline(stage, bf16))
    assert max_rel_diff(losses, expected) <= 1e-6, (losses, expected)
    assert losses == expected  # in practice bit for bit: the same inner optimizer runs on the same numbers
    opt = layerwise_optimizer(engine)
    assert opt is not None and opt.num_units == SHAPE.layers + 4  # embed, pos, final_norm, head
    # between steps no state is resident in the optimizer: every unit's states are in the store
    assert not any(opt.inner.state.get(p) for g in opt.param_groups for p in g["params"])
    assert len(opt.layer_bytes) == opt.num_units


def test_without_clipping_losses_match_too(tmp_path):
    losses, _ = run_section(tmp_path, 0, True, "cpu", clip=0.0)
    assert losses == list(baseline(0, True, 0.0))


@needs_aio
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_resident_state_bytes_stay_within_prefetch_plus_two_layers(tmp_path, prefetch):
    _, engine = run_section(tmp_path, 2, False, "nvme", prefetch_layers=prefetch)
    opt = layerwise_optimizer(engine)
    store = opt.store
    largest = max(store.swapper._padded(n) for n in opt.layer_bytes.values())
    total = sum(opt.layer_bytes.values())
    assert 0 < opt.resident_bytes_peak <= (prefetch + 2) * largest, (opt.resident_bytes_peak, largest)
    assert opt.resident_bytes_peak < total  # less than all states at once
    assert store.stored_bytes >= total  # everything is on disk


@needs_aio
def test_nvme_swap_folder_is_removed_when_the_store_closes(tmp_path):
    _, engine = run_section(tmp_path, 0, False, "nvme")
    opt = layerwise_optimizer(engine)
    folder = opt.store.folder.path
    assert folder.exists() and any(folder.iterdir())
    opt.close()
    assert not folder.exists()


@needs_aio
@pytest.mark.parametrize("stage,bf16,overlap", [(0, False, False), (2, False, False), (1, True, False), (0, False, True)])
def test_failed_step_leaves_everything_as_before_and_a_retry_is_bitwise(tmp_path, monkeypatch, stage, bf16, overlap):
    """A write refused mid-step (unit 3 of 10): weights, states, counters and LR as before; the retry is exact.

    With overlap_with_backward the failing unit is stepped inside backward, which raises.
    """
    import errno

    from megatron_offload_plugin.offload.nvme import NvmeIOError

    section = {"optimizer_states": {"device": "nvme", "nvme_path": str(tmp_path), "overlap_with_backward": overlap}}
    cfg = ds_config(stage=stage, bf16=bf16, section=section, scheduler={"type": "WarmupLR", "params": {
        "warmup_min_lr": 0, "warmup_max_lr": 1e-2, "warmup_num_steps": 10}})
    per_step = 2  # micro-batches per optimizer step (gradient accumulation 2)
    data = replay(batches(SHAPE, 2), 3 * per_step)
    reference = build(SHAPE, cfg)
    train(reference, 3, data())
    want = snapshot(reference)
    reference.layerwise_offload_optimizer.close()

    engine = build(SHAPE, cfg)
    train(engine, 1, data())
    before = snapshot(engine)
    assert before[1] and any(k.startswith("fp32 master") for k in before[0]) == bool(stage)  # states, masters seen
    opt = layerwise_optimizer(engine)
    sw = opt.store.swapper
    real_write = sw.write_buffer

    def failing_write(key, buf, nbytes, **kw):
        if key.startswith("layer00003."):
            raise NvmeIOError(errno.EIO, f"aio write of swap file {sw.folder.path / key} (offset 0, size {buf.numel()}) "
                                         "failed", path=sw.folder.path / key, offset=0, size=buf.numel(), keys=(key,))
        return real_write(key, buf, nbytes, **kw)

    monkeypatch.setattr(sw, "write_buffer", failing_write)
    with pytest.raises(NvmeIOError, match=r"aio write of swap file .*layer00003\.optim\.\d \(offset 0, size \d+\)"):
        train(engine, 1, data(per_step))
    monkeypatch.setattr(sw, "write_buffer", real_write)
    assert snapshot_differences(snapshot(engine), before) == []  # units 0-2 were stepped and written, then put back
    if stage:  # ZeRO's masters are back in their files, none left materialized
        assert all(m.untyped_storage().nbytes() == 0 for m in engine.optimizer.single_partition_of_fp32_groups)
    train(engine, 2, data(per_step))  # the same iteration again, then the next one
    assert snapshot_differences(snapshot(engine), want) == []


@pytest.mark.parametrize("stage,kind", [(2, "instance"), (0, "callable")])
def test_client_optimizer_is_wrapped_with_the_same_math(stage, kind):
    from megatron_offload_plugin.deepspeed import initialize
    from megatron_offload_plugin.deepspeed.tiny import TinyGPT, init_single_process_dist

    def run(section):
        init_single_process_dist()
        torch.manual_seed(0)
        model = TinyGPT(SHAPE)
        cfg = ds_config(stage=stage, section=section)
        del cfg["optimizer"]
        make = lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)  # noqa: E731
        opt = make(model.parameters()) if kind == "instance" else make
        engine, *_ = initialize(model=model, optimizer=opt, config=cfg)
        return train(engine, STEPS, batches(SHAPE, 2)), engine

    expected, _ = run(None)
    losses, engine = run({"optimizer_states": {"device": "cpu"}})
    assert losses == expected
    assert layerwise_optimizer(engine).num_units == SHAPE.layers + 4


@pytest.mark.parametrize("stage,bf16,device", [
    (1, True, "cpu"),
    (2, False, "cpu"),
    pytest.param(2, True, "nvme", marks=needs_aio),
])
def test_zero_master_weights_live_in_the_layer_buffers_between_steps(tmp_path, stage, bf16, device):
    losses, engine = run_section(tmp_path, stage, bf16, device)
    assert losses == list(baseline(stage, bf16))
    opt = layerwise_optimizer(engine)
    zero = engine.optimizer
    masters = zero.single_partition_of_fp32_groups
    master_bytes = [m.numel() * m.element_size() for m in masters]
    assert opt.offloads_master_weights and opt.master_bytes == sum(master_bytes)
    assert all(m.untyped_storage().nbytes() == 0 for m in masters)  # released: only the layer buffers hold them
    assert 0 < opt.master_resident_bytes_peak <= max(master_bytes)  # one layer's masters at a time
    with opt.master_weights_resident(writes=False):
        for m, lp in zip(masters, zero.bit16_groups_flat):
            assert torch.equal(m.to(lp.dtype), lp)  # the masters the model's weights were copied from
        from deepspeed.utils import safe_get_full_fp32_param

        w = engine.module.head.weight  # DeepSpeed's own reader of the fp32 fragments works inside the block
        assert torch.equal(safe_get_full_fp32_param(w).to(w.dtype), w.detach())
    assert all(m.untyped_storage().nbytes() == 0 for m in masters)
    zero.refresh_fp32_params()  # a ZeRO method writing every master: materialized around it, stored again
    assert all(m.untyped_storage().nbytes() == 0 for m in masters)
    with opt.master_weights_resident(writes=False):
        assert all(torch.equal(m, lp.float()) for m, lp in zip(masters, zero.bit16_groups_flat))


def test_stage0_bf16_keeps_master_weights_resident(tmp_path):
    # DeepSpeed's stage-0 bf16 optimizer copies every master into the model only after the whole step
    _, engine = run_section(tmp_path, 0, True, "cpu")
    assert not layerwise_optimizer(engine).offloads_master_weights


@pytest.mark.parametrize("device,clip", [("cpu", 0.0), ("cpu", 1.0), pytest.param("nvme", 0.0, marks=needs_aio)])
def test_zero_overflow_step_is_skipped_like_the_engine_without_the_section(tmp_path, device, clip):
    """A non-finite gradient norm at ZeRO-2 fp32: DeepSpeed skips the step before calling the optimizer;
    states, masters and weights stay as they were, and training goes on as without the section.

    With clipping, ZeRO sums the global norm group by group and the section gives it one group per
    layer, so after the skipped step the clip factor can differ in its last bits from a one-group run
    (plain DeepSpeed given per-layer groups does the same): losses then agree within 1e-6 relative.
    """
    scales = [1.0, float("inf"), 1.0, 1.0, 1.0]

    def run(section):
        engine = build(SHAPE, ds_config(stage=2, clip=clip, section=section))
        data = batches(SHAPE, 2)
        losses = []
        for scale in scales:
            total = 0.0
            for _ in range(engine.gradient_accumulation_steps()):
                x, y = data()
                loss = engine(x, y) * scale
                engine.backward(loss)
                engine.step()
                total += float(loss.detach())
            losses.append(total)
        return engine, losses

    section = {"optimizer_states": {"device": device, **({"nvme_path": str(tmp_path)} if device == "nvme" else {})}}
    engine, losses = run(section)
    ref, ref_losses = run(None)
    assert ref.skipped_steps == engine.skipped_steps == 1
    assert layerwise_optimizer(engine).steps_taken == len(scales) - 1  # the overflowing step never reached the walk
    finite = [k for k, s in enumerate(scales) if s != float("inf")]
    if clip == 0.0:
        assert [losses[k] for k in finite] == [ref_losses[k] for k in finite]
        for (name, a), (_, b) in zip(engine.module.named_parameters(), ref.module.named_parameters()):
            assert torch.equal(a, b), name
    else:
        assert max_rel_diff([losses[k] for k in finite], [ref_losses[k] for k in finite]) <= 1e-6


@needs_aio
def test_a_failed_first_step_after_a_checkpoint_load_returns_to_the_loaded_states(tmp_path, monkeypatch):
    """load_checkpoint writes every layer outside a step: a rollback must return there, not to what came before."""
    import errno

    from megatron_offload_plugin.offload.nvme import NvmeIOError

    section = {"optimizer_states": {"device": "nvme", "nvme_path": str(tmp_path)}}
    cfg = ds_config(stage=2, section=section)
    data = replay(batches(SHAPE, 2), 4)
    saved = build(SHAPE, cfg)
    train(saved, 2, data())
    saved.save_checkpoint(str(tmp_path / "ckpt"), tag="t")
    engine = build(SHAPE, cfg)
    train(engine, 1, data())  # states that the load replaces
    engine.load_checkpoint(str(tmp_path / "ckpt"), tag="t")
    loaded = snapshot(engine)
    sw = layerwise_optimizer(engine).store.swapper
    real_write = sw.write_buffer

    def failing_write(key, buf, nbytes, **kw):
        if key.startswith("layer00002."):
            raise NvmeIOError(errno.EIO, f"aio write of swap file {key} failed", keys=(key,))
        return real_write(key, buf, nbytes, **kw)

    monkeypatch.setattr(sw, "write_buffer", failing_write)
    with pytest.raises(NvmeIOError, match="layer00002"):
        train(engine, 1, data())
    assert snapshot_differences(snapshot(engine), loaded) == []
