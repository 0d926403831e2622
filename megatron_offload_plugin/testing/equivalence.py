"""Train the same GPT twice (plain Megatron-core, then with the plugin) and compare the numbers.

Used by the integration tests and the benchmarks: each rank builds the model
from the same seed, runs a few iterations, and captures per-iteration losses,
every parameter's gradient (where Megatron DDP put it, before the optimizer
step) and the parameters after the last step.  The comparison is exact
(``torch.equal``) and also reports the largest relative difference, so an
approximate method can state its tolerance with the same tool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from .. import plugin as plugin_api
from ..integrations.megatron.data import ByteTokenizer, TokenStreamBatches, embedded_corpus_tokens, padded_vocab_size
from ..integrations.megatron.model import build_model, initialize_model_parallel
from ..integrations.megatron.recipe import GPTRecipe
from ..integrations.megatron.training import Trainer


@dataclass
class RunCapture:
    losses: list[float | None] = field(default_factory=list)
    grads: list[dict[str, torch.Tensor | None]] = field(default_factory=list)
    params_after: dict[str, torch.Tensor] = field(default_factory=dict)
    peak_activation_bytes: int = 0
    params_before: dict[str, torch.Tensor] = field(default_factory=dict)
    coords: dict[str, int] = field(default_factory=dict)  # tp/pp/dp rank of the run (groups are gone after it)
    # What the optimizer steps (fp32 masters with bf16 or the distributed optimizer): a bf16
    # copy can stay put (1.0 + 3e-4 rounds to 1.0) while its master moves.
    masters_changed: int = 0
    num_masters: int = 0

    def params_changed(self) -> int:
        """How many parameters the run changed (a configuration that trains changes them)."""
        return sum(not torch.equal(self.params_before[n], p) for n, p in self.params_after.items())


def build_gpt_trainer(
    recipe: GPTRecipe, *, activation_memory: str = "saved-tensors", layout_independent: bool = False
) -> tuple[Any, Trainer]:
    """Megatron groups, the embedded corpus, the model chunks and a Trainer for ``recipe``.

    ``layout_independent``: weights set from each parameter's global name, so any pipeline
    layout of the same recipe computes the same function (see set_layout_independent_weights).
    """
    initialize_model_parallel(recipe)
    vocab = padded_vocab_size(ByteTokenizer.vocab_size, recipe.make_vocab_size_divisible_by, recipe.tensor_model_parallel_size)
    data = TokenStreamBatches(embedded_corpus_tokens(), recipe.seq_length, vocab)
    bundle = build_model(recipe, vocab)
    if layout_independent:
        set_layout_independent_weights(bundle.chunks, recipe.seed)
        bundle.optimizer.reload_model_params()  # fp32 masters (bf16, distributed optimizer) follow
    return bundle, Trainer(recipe, bundle, data, activation_memory=activation_memory)


def global_main_grads(bundle: Any) -> dict[str, torch.Tensor]:
    """Every local parameter's ``main_grad`` keyed by its layout-independent name."""
    return {
        global_parameter_name(chunk, name): p.main_grad.detach().clone()
        for chunk in bundle.chunks
        for name, p in chunk.named_parameters()
    }


def capture_training(
    recipe: GPTRecipe, iterations: int, plugin_config: Mapping[str, Any] | None,
    on_step: Callable[[Any], None] | None = None,
) -> RunCapture:
    """Run ``iterations`` train steps on this rank; apply the plugin config first if given.

    ``on_step`` receives each iteration's :class:`IterationResult`."""
    if plugin_config is not None:
        plugin_api.apply(plugin_config)
    try:
        bundle, trainer = build_gpt_trainer(recipe)
        capture = RunCapture(params_before={n: p.detach().clone() for n, p in bundle.named_parameters()},
                             coords=_parallel_coords())
        masters_before = [p.detach().clone() for p in optimizer_parameters(bundle.optimizer)]
        bundle.begin_training()
        for it in range(iterations):
            result = trainer.train_step(it, inspect=lambda b: capture.grads.append(b.main_grads()))
            bundle.after_step(not result.skipped)
            capture.losses.append(result.loss)
            capture.peak_activation_bytes = max(capture.peak_activation_bytes, result.peak_activation_bytes)
            if on_step is not None:
                on_step(result)
        bundle.end_training()  # with --overlap-param-gather: gather the last step's shards
        capture.params_after = {n: p.detach().clone() for n, p in bundle.named_parameters()}
        masters_after = optimizer_parameters(bundle.optimizer)
        capture.num_masters = len(masters_after)
        capture.masters_changed = sum(not torch.equal(a, b) for a, b in zip(masters_before, masters_after))
        return capture
    finally:
        if plugin_config is not None:
            plugin_api.revert()
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()


def optimizer_parameters(optimizer: Any) -> list[torch.Tensor]:
    """The tensors Megatron's optimizer steps: fp32 masters (or shards of them) with bf16 or the
    distributed optimizer, the model parameters themselves otherwise."""
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return [p for opt in inner for group in opt.optimizer.param_groups for p in group["params"]]


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / denom if denom > 0 else diff


def compare_captures(candidate: RunCapture, reference: RunCapture) -> dict[str, Any]:
    """Exact and relative comparison of two captures from the same rank."""
    mismatched: list[str] = []
    max_rel = 0.0
    if len(candidate.losses) != len(reference.losses):
        raise ValueError("captures have different iteration counts")
    for i, (a, b) in enumerate(zip(candidate.losses, reference.losses)):
        if a != b:
            mismatched.append(f"loss[{i}]")
            if a is not None and b is not None:
                max_rel = max(max_rel, abs(a - b) / max(abs(b), 1e-30))
    for i, (ga, gb) in enumerate(zip(candidate.grads, reference.grads)):
        if ga.keys() != gb.keys():
            raise ValueError(f"iteration {i}: parameter sets differ")
        for name in ga:
            a, b = ga[name], gb[name]
            if a is None or b is None:
                if a is not b:
                    mismatched.append(f"grad[{i}].{name}")
                continue
            if not torch.equal(a, b):
                mismatched.append(f"grad[{i}].{name}")
                max_rel = max(max_rel, _rel_diff(a, b))
    for name, a in candidate.params_after.items():
        b = reference.params_after[name]
        if not torch.equal(a, b):
            mismatched.append(f"param.{name}")
            max_rel = max(max_rel, _rel_diff(a, b))
    return {
        "bitwise_equal": not mismatched,
        "max_rel_diff": max_rel,
        "mismatched": mismatched[:20],
        "num_grads_compared": sum(len(g) for g in candidate.grads),
        "losses": candidate.losses,
    }


def default_config_equivalence_worker(
    rank: int, world_size: int, recipe_kwargs: dict[str, Any], iterations: int
) -> dict[str, Any]:
    """Plain Megatron-core vs ``apply()`` of the default config, on one rank (run_distributed target)."""
    recipe = GPTRecipe(**recipe_kwargs)
    recipe.validate(world_size)
    reference = capture_training(recipe, iterations, plugin_config=None)
    candidate = capture_training(recipe, iterations, plugin_config={})
    report = compare_captures(candidate, reference)
    report["rank"] = rank
    report["reference_losses"] = reference.losses
    report["params_changed"] = candidate.params_changed()
    report["num_params"] = len(candidate.params_after)
    report["masters_changed"] = candidate.masters_changed
    report["num_masters"] = candidate.num_masters
    report["param_digest"] = parameter_digest(candidate.params_after)
    report["coords"] = candidate.coords
    return report


def parameter_digest(params: Mapping[str, torch.Tensor]) -> str:
    """A hash of every parameter's bytes: equal digests on two ranks mean bitwise-equal replicas."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(params[name].detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _parallel_coords() -> dict[str, int]:
    """This rank's (tp, pp, dp) ranks: replicas of one model shard share tp and pp."""
    from megatron.core import parallel_state

    return {
        "tp": parallel_state.get_tensor_model_parallel_rank(),
        "pp": parallel_state.get_pipeline_model_parallel_rank(),
        "dp": parallel_state.get_data_parallel_rank(),
    }


def _hook_names(hook: Any) -> Any:
    """``config.*_func`` as names: None, 'DistributedDataParallel.start_grad_sync', or a list of them."""
    if hook is None:
        return None
    if isinstance(hook, list):
        return [_hook_names(h) for h in hook]
    owner = getattr(hook, "__self__", None)
    name = getattr(hook, "__name__", repr(hook))
    return f"{type(owner).__name__}.{name}" if owner is not None else name


def describe_build_worker(rank: int, world_size: int, recipes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What build_model built for each recipe on this rank: wrappers, dtypes, DDP and optimizer
    settings and the config hooks, as plain data (run_distributed target; no training)."""
    from megatron.core import parallel_state

    out = []
    for recipe_kwargs in recipes:
        recipe = GPTRecipe(**recipe_kwargs)
        recipe.validate(world_size)
        bundle, _ = build_gpt_trainer(recipe, activation_memory="off")
        config, chunks = bundle.config, bundle.chunks
        optimizers = getattr(bundle.optimizer, "chained_optimizers", [bundle.optimizer])
        masters = [p.dtype for p in optimizer_parameters(bundle.optimizer)]
        out.append({
            "wrappers": [[type(chunk).__name__, type(chunk.module).__name__] for chunk in chunks],
            "param_dtypes": sorted({str(p.dtype) for p in bundle.parameters()}),
            "grad_buffer_dtypes": sorted({str(b.grad_dtype) for c in chunks for b in c.buffers}),
            "master_dtypes": sorted({str(d) for d in masters}),
            "optimizers": [type(opt).__name__ for opt in optimizers],
            "inner_optimizers": [type(opt.optimizer).__name__ for opt in optimizers],
            "ddp": {k: getattr(chunks[0].ddp_config, k) for k in (
                "grad_reduce_in_fp32", "overlap_grad_reduce", "overlap_param_gather", "align_param_gather",
                "use_distributed_optimizer", "bucket_size")},
            "buckets_per_chunk": [len(c.bucket_groups) for c in chunks],
            "forward_pre_hooks": [len(c.remove_forward_pre_hook_handles) for c in chunks],
            "config": {k: getattr(config, k) for k in ("bf16", "sequence_parallel", "attention_softmax_in_fp32")}
                      | {k: str(getattr(config, k)) for k in ("params_dtype", "pipeline_dtype")},
            "hooks": {k: _hook_names(getattr(config, k)) for k in (
                "no_sync_func", "grad_sync_func", "param_sync_func", "finalize_model_grads_func", "grad_scale_func")},
            "sequence_parallel_params": sorted(
                n for n, p in bundle.named_parameters() if getattr(p, "sequence_parallel", False)),
            "coords": _parallel_coords(),
        })
        parallel_state.destroy_model_parallel()
    return out


def recipe_variants_worker(
    rank: int, world_size: int, reference_kwargs: dict[str, Any], variant_kwargs: dict[str, Any], iterations: int
) -> dict[str, Any]:
    """Plain Megatron-core with two recipes meant to compute the same training (e.g. with and
    without --overlap-grad-reduce); losses and final parameters compared, exactly and relatively.

    Gradients are not compared: with the distributed optimizer each rank's ``main_grad`` is
    reduced only in its own shard (run_distributed target)."""
    captures = []
    for kwargs in (reference_kwargs, variant_kwargs):
        recipe = GPTRecipe(**kwargs)
        recipe.validate(world_size)
        captures.append(capture_training(recipe, iterations, plugin_config=None))
    reference, variant = captures
    if variant.params_after.keys() != reference.params_after.keys():
        raise ValueError("the two recipes build different parameter sets; compare like with like")
    max_rel = max((_rel_diff(variant.params_after[n], p.to(variant.params_after[n].dtype))
                   for n, p in reference.params_after.items()), default=0.0)
    return {
        "rank": rank, "losses": variant.losses, "reference_losses": reference.losses,
        "params_bitwise_equal": all(torch.equal(variant.params_after[n], p) for n, p in reference.params_after.items()),
        "max_param_rel_diff": max_rel, "params_changed": variant.params_changed(),
    }


def global_parameter_name(chunk: Any, local_name: str) -> str:
    """A parameter's name independent of the pipeline layout (layer index made global)."""
    parts = local_name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        module = chunk
        for attr in parts[:i]:
            module = getattr(module, attr)
        layer = module.layers[int(parts[i + 1])]
        parts[i + 1] = str(layer.layer_number)
    return ".".join(p for p in parts if p != "module")


@torch.no_grad()
def set_layout_independent_weights(chunks: list[Any], seed: int, std: float = 0.05) -> None:
    """Give every parameter values that depend only on its global name and ``seed``.

    Megatron's initialisation order depends on the pipeline layout, so the same
    recipe at PP=1 and PP=4 starts from different weights; with these weights
    any layout computes the same function (tensor parallelism not supported here).
    """
    import zlib

    for chunk in chunks:
        for name, param in chunk.named_parameters():
            gen = torch.Generator().manual_seed(seed ^ zlib.crc32(global_parameter_name(chunk, name).encode()))
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param) * std)


def layout_gradients_worker(rank: int, world_size: int, recipe_kwargs: dict[str, Any]) -> dict[str, Any]:
    """One iteration of Megatron's own schedule; returns global-name -> gradient (run_distributed target)."""
    recipe = GPTRecipe(**recipe_kwargs)
    recipe.validate(world_size)
    _, trainer = build_gpt_trainer(recipe, activation_memory="off", layout_independent=True)
    grads: dict[str, torch.Tensor] = {}
    result = trainer.train_step(0, inspect=lambda b: grads.update(global_main_grads(b)))
    from megatron.core import parallel_state

    return {"loss": result.loss, "grads": grads, "dp_rank": parallel_state.get_data_parallel_rank()}


def runtime_equivalence_worker(
    rank: int, world_size: int, recipe_kwargs: dict[str, Any], split: bool, w_delay: int, iterations: int,
    program: str = "1f1b-order",
) -> dict[str, Any]:
    """Megatron's own schedule vs the plugin runtime (B/W split or not) on the same model.

    ``program``: '1f1b-order' (Megatron's 1F1B order, with ``split``/``w_delay``), 'gpipe'
    (all forwards, then all backwards, by stage: exercises multi-chunk routing), or a
    registered schedule name ('1f1b', 'interleaved', 'zb-h1', 'zb-h2'); ``split`` must then
    match whether the schedule has W actions."""
    import functools

    from ..config import PluginConfig
    from ..patches import Patch, PatchSet
    from ..patches.megatron_core import (
        GET_FORWARD_BACKWARD_FUNC,
        SCHEDULE_DISPATCH,
        SUPPORTED_MEGATRON_CORE,
        make_schedule_dispatcher,
        ddp_split_hook_patch,
        wgrad_split_patch,
    )
    from ..runtime.forward_backward import make_forward_backward_func
    from ..runtime.programs import all_forward_all_backward_programs, one_f_one_b_programs
    from ..runtime.wgrad import WeightGradStore

    recipe = GPTRecipe(**recipe_kwargs)
    recipe.validate(world_size)
    reference = capture_training(recipe, iterations, plugin_config=None)

    store = WeightGradStore()
    if program == "1f1b-order":
        source = functools.partial(one_f_one_b_programs, split=split, w_delay=w_delay)
    elif program == "gpipe":
        source = functools.partial(all_forward_all_backward_programs, split=split)
    else:  # a registered schedule, e.g. 'zb-h1'
        from ..runtime.plugin_runtime import schedule_programs

        source = functools.partial(schedule_programs, program)
    runtime_func = make_forward_backward_func(f"test-{program}", source, store)
    # The same two patches apply() installs for a split schedule, through the same registry.
    dispatch = Patch(
        name=SCHEDULE_DISPATCH, target=GET_FORWARD_BACKWARD_FUNC,
        make_replacement=make_schedule_dispatcher(PluginConfig(), runtime_func),
        versions=SUPPORTED_MEGATRON_CORE, reason=f"test program {program}",
        extra_sites=("megatron.core.pipeline_parallel:get_forward_backward_func",),
    )
    patches = PatchSet(log=False)
    patches.apply([wgrad_split_patch(store), ddp_split_hook_patch(store), dispatch])
    try:
        candidate = capture_training(recipe, iterations, plugin_config=None)
    finally:
        patches.revert()
    report = compare_captures(candidate, reference)
    report["rank"] = rank
    report["reference_losses"] = reference.losses
    return report


def schedule_gradients_worker(
    rank: int, world_size: int, recipe_kwargs: dict[str, Any], schedule: str
) -> dict[str, Any]:
    """One iteration under ``--pipeline-schedule schedule`` with layout-independent weights;
    global-name -> gradient, so any two layouts can be compared (run_distributed target)."""
    recipe = GPTRecipe(**recipe_kwargs)
    recipe.validate(world_size)
    plugin_api.apply({"schedule": {"pipeline_schedule": schedule}, "telemetry": {"log_patches": False}})
    try:
        return layout_gradients_worker(rank, world_size, recipe_kwargs)
    finally:
        plugin_api.revert()


def v_schedules_against_1f1b(recipe_kwargs: dict[str, Any], schedules: Sequence[str], world_size: int
                             ) -> tuple[dict[str, torch.Tensor], Any, dict[str, tuple[dict[str, torch.Tensor], Any]]]:
    """Megatron's 1F1B on ``recipe_kwargs`` and each V ``schedule`` on the same recipe with two
    chunks per rank, weights set by global name, all under the GPU emulation.

    Returns (1F1B's gradients by global name, its loss (last rank), {schedule: (gradients,
    loss on rank 0, where V computes it)})."""
    from .distributed import run_distributed
    from .gpu_emulation import emulated

    def merged(reports: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {k: v for r in reports for k, v in r["grads"].items()}

    reference = run_distributed(emulated(layout_gradients_worker), world_size, recipe_kwargs, timeout_s=300)
    per_chunk = recipe_kwargs["num_layers"] // (2 * recipe_kwargs["pipeline_model_parallel_size"])
    runs = {}
    for schedule in schedules:
        got = run_distributed(emulated(schedule_gradients_worker), world_size,
                              dict(recipe_kwargs, num_layers_per_virtual_pipeline_stage=per_chunk), schedule, timeout_s=300)
        runs[schedule] = (merged(got), got[0]["loss"])
    return merged(reference), reference[-1]["loss"], runs


def auto_replan_worker(rank: int, world_size: int, recipe_kwargs: dict[str, Any]) -> dict[str, Any]:
    """'auto' planned from equal costs, re-planned after one measured iteration; returns the
    first iteration's gradients by global name and what the planner did (run_distributed target)."""
    plugin_api.apply({"schedule": {"pipeline_schedule": "auto", "auto_replan_after": 1},
                      "telemetry": {"log_patches": False}})
    try:
        recipe = GPTRecipe(**recipe_kwargs)
        recipe.validate(world_size)
        _, trainer = build_gpt_trainer(recipe, activation_memory="off", layout_independent=True)
        grads: dict[str, torch.Tensor] = {}
        first = trainer.train_step(0, inspect=lambda b: grads.update(global_main_grads(b)))
        second = trainer.train_step(1)  # runs the re-planned schedule
        planner = plugin_api.active_runtime().planner
        return {"loss": first.loss, "second_loss": second.loss, "grads": grads, "version": planner.version,
                "chosen": planner.chosen, "costs": (planner.costs.f, planner.costs.b, planner.costs.w)}
    finally:
        plugin_api.revert()


def offload_equivalence_worker(
    rank: int, world_size: int, recipe_kwargs: dict[str, Any], schedule: str,
    offload_sections: list[dict[str, Any]], iterations: int,
) -> dict[str, Any]:
    """The same schedule without offload, then with each ``activation_offload`` section.

    Returns, per section, this rank's comparison with the no-offload run (bitwise),
    its peak activation bytes (resident for backward) and the offload figures of the
    last iteration (run_distributed target)."""
    recipe = GPTRecipe(**recipe_kwargs)
    recipe.validate(world_size)
    base = {"schedule": {"pipeline_schedule": schedule}, "telemetry": {"log_patches": False}}
    reference = capture_training(recipe, iterations, plugin_config=base)
    runs = []
    for section in offload_sections:
        stats: list[Any] = []
        candidate = capture_training(
            recipe, iterations, plugin_config={**base, "activation_offload": section},
            on_step=lambda result: stats.append((result, _pipeline_rank())),
        )
        report = compare_captures(candidate, reference)
        last, pp_rank = stats[-1]
        report.update(section=section, peak_activation_bytes=candidate.peak_activation_bytes, pipeline_rank=pp_rank,
                      offload=last.offload_per_stage[pp_rank] if last.offload_per_stage else None)
        runs.append(report)
    return {"rank": rank, "reference_peak_activation_bytes": reference.peak_activation_bytes,
            "reference_losses": reference.losses, "runs": runs}



def _pipeline_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_rank()
