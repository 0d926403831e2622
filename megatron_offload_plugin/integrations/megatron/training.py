"""One training iteration and the loop around it, as Megatron-LM's ``train_step`` runs it.

The schedule is looked up through ``megatron.core.pipeline_parallel`` at every
iteration, exactly as Megatron-LM does, so whatever ``megatron_offload_plugin.apply``
installed is what runs.  The activation-memory tracker wraps the schedule call
and measures each pipeline rank's peak.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .data import Sample, TokenStreamBatches, iterators_for_chunks
from .model import ModelBundle
from .recipe import GPTRecipe

logger = logging.getLogger(__name__)


def make_forward_step(per_token_loss: bool) -> Callable[[Any, Any], tuple[torch.Tensor, Callable]]:
    """Megatron-LM's GPT ``forward_step``: model output is the per-token loss when labels are given."""

    def forward_step(data_iterator: Any, model: Any) -> tuple[torch.Tensor, Callable]:
        sample: Sample = next(data_iterator)
        device = torch.cuda.current_device() if torch.cuda.is_available() else None
        tokens, labels, positions = sample.tokens, sample.labels, sample.position_ids
        if device is not None:
            tokens, labels, positions = (t.cuda(device, non_blocking=True) for t in (tokens, labels, positions))
        output = model(tokens, positions, None, labels=labels)

        def loss_func(output_tensor: torch.Tensor):
            losses = output_tensor.float().reshape(-1)
            if per_token_loss:
                loss = losses.sum()
                num_tokens = torch.tensor(losses.numel(), dtype=torch.int, device=losses.device)
                reporting = torch.stack([loss.detach().clone(), num_tokens.float()])
                return loss, num_tokens, {"lm loss": reporting}
            loss = losses.mean()
            # A copy: Megatron divides the returned loss in place by the number of microbatches.
            return loss, {"lm loss": loss.detach().clone()}

        return output, loss_func

    return forward_step


def reduce_lm_loss(loss_dicts: list[dict], per_token_loss: bool) -> float | None:
    """The iteration's lm loss on the last stage (None elsewhere)."""
    if not loss_dicts:
        return None
    values = torch.stack([d["lm loss"].float() for d in loss_dicts])
    if per_token_loss:
        total = values.sum(0)
        return float(total[0] / total[1])
    return float(values.mean())


@dataclass
class IterationResult:
    iteration: int
    loss: float | None
    grad_norm: float | None
    skipped: bool
    time_s: float
    peak_activation_bytes: int
    learning_rate: float
    measured_bubble_rate: float | None = None
    offload_per_stage: list[dict[str, Any]] | None = None  # activation offload figures, one dict per stage


@dataclass
class TrainingSummary:
    recipe: GPTRecipe
    world_size: int
    iterations: list[IterationResult] = field(default_factory=list)
    peak_activation_bytes_per_stage: list[int] = field(default_factory=list)

    def offload_figures(self) -> dict[str, Any] | None:
        """Per stage, over the run: bytes offloaded per iteration (last), host pool size, copy seconds."""
        with_offload = [it.offload_per_stage for it in self.iterations if it.offload_per_stage]
        if not with_offload:
            return None
        last = with_offload[-1]
        return {
            "offloaded_bytes_per_iteration": [s["offloaded_bytes"] for s in last],
            "reloaded_bytes_per_iteration": [s["reloaded_bytes"] for s in last],
            "host_pool_bytes": [max(it[i]["host_pool_bytes"] for it in with_offload) for i in range(len(last))],
            "copy_seconds_per_iteration": [s.get("d2h_seconds", 0.0) + s.get("h2d_seconds", 0.0) for s in last],
            "exposed_copy_seconds_per_iteration": [s.get("exposed_seconds", 0.0) for s in last],
        }

    def as_dict(self) -> dict[str, Any]:
        times = [it.time_s for it in self.iterations]
        steady = times[1:] or times
        mean_time = sum(steady) / len(steady) if steady else float("nan")
        tokens = self.recipe.global_batch_size * self.recipe.seq_length
        return {
            "losses": [it.loss for it in self.iterations],
            "grad_norms": [it.grad_norm for it in self.iterations],
            "iteration_time_s": mean_time,
            "tokens_per_s": tokens / mean_time if mean_time > 0 else None,
            "peak_activation_bytes": list(self.peak_activation_bytes_per_stage),
            "measured_bubble_rates": [it.measured_bubble_rate for it in self.iterations],
            "iterations": len(self.iterations),
            "activation_offload": self.offload_figures(),
        }


def learning_rate(recipe: GPTRecipe, iteration: int) -> float:
    """Megatron's OptimizerParamScheduler rules for the decay styles the driver offers."""
    if recipe.lr_warmup_iters and iteration < recipe.lr_warmup_iters:
        return recipe.lr * (iteration + 1) / recipe.lr_warmup_iters
    if recipe.lr_decay_style == "constant":
        return recipe.lr
    span = max(1, recipe.train_iters - recipe.lr_warmup_iters)
    frac = min(1.0, (iteration - recipe.lr_warmup_iters) / span)
    if recipe.lr_decay_style == "linear":
        coeff = 1.0 - frac
    else:
        coeff = 0.5 * (math.cos(math.pi * frac) + 1.0)
    return recipe.min_lr + coeff * (recipe.lr - recipe.min_lr)


def _measured_bubble_rate() -> float | None:
    """The plugin runtime's measured bubble rate of the step that just ran (None without it)."""
    from ... import plugin as plugin_api

    runtime = plugin_api.active_runtime()
    rates = runtime.recorder.last_rates if runtime is not None else None
    return rates["bubble_rate"] if rates else None


def _offload_stats() -> dict[str, Any] | None:
    """This iteration's activation-offload figures on this rank (None without offload)."""
    from ... import plugin as plugin_api

    offload = plugin_api.active_offload()
    return offload.take_stats() if offload is not None else None


class Trainer:
    """Runs Megatron-LM's train_step on a :class:`ModelBundle` and records what it measured."""

    def __init__(
        self,
        recipe: GPTRecipe,
        bundle: ModelBundle,
        data: TokenStreamBatches,
        *,
        activation_memory: str = "auto",
    ) -> None:
        from megatron.core import parallel_state

        self.recipe = recipe
        from ... import plugin as plugin_api

        runtime = plugin_api.active_runtime()
        if runtime is not None:
            runtime.recorder.measure_bubbles = True  # the log line carries the measured bubble rate
        self.bundle = bundle
        self.data = data
        self.world_size = torch.distributed.get_world_size()
        self.num_microbatches = recipe.num_microbatches(self.world_size)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.forward_step = make_forward_step(recipe.calculate_per_token_loss)
        from ...telemetry import make_activation_tracker

        self.tracker = make_activation_tracker(activation_memory, exclude=bundle.parameters())
        self.summary = TrainingSummary(recipe=recipe, world_size=self.world_size)
        self._peak_per_stage: list[int] | None = None

    def run_schedule(self, iteration: int, *, forward_only: bool = False) -> list[dict]:
        """One pass of the pipeline schedule over this iteration's microbatches."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        samples = self.data.microbatches(
            iteration,
            global_batch_size=self.recipe.global_batch_size,
            micro_batch_size=self.recipe.micro_batch_size,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
        )
        forward_backward_func = get_forward_backward_func()
        with self.tracker.track():
            return forward_backward_func(
                forward_step_func=self.forward_step,
                data_iterator=iterators_for_chunks(samples, len(self.bundle.chunks)),
                model=self.bundle.model_arg,
                num_microbatches=self.num_microbatches,
                seq_length=self.recipe.seq_length,
                micro_batch_size=self.recipe.micro_batch_size,
                forward_only=forward_only,
            )

    def zero_grads(self) -> None:
        for chunk in self.bundle.chunks:
            chunk.zero_grad_buffer()
        self.bundle.optimizer.zero_grad()

    def train_step(self, iteration: int, *, inspect: Callable[[ModelBundle], None] | None = None) -> IterationResult:
        """Megatron-LM's train_step: zero grads, schedule, optimizer step (``inspect`` sees grads)."""
        lr = learning_rate(self.recipe, iteration)
        for group in self.bundle.optimizer.param_groups:
            group["lr"] = lr
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        self.zero_grads()
        self.tracker.reset_peak()
        loss_dicts = self.run_schedule(iteration)
        if inspect is not None:
            inspect(self.bundle)
        update_successful, grad_norm, _ = self.bundle.optimizer.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        result = IterationResult(
            iteration=iteration,
            loss=reduce_lm_loss(loss_dicts, self.recipe.calculate_per_token_loss),
            grad_norm=float(grad_norm) if grad_norm is not None else None,
            skipped=not update_successful,
            time_s=elapsed,
            peak_activation_bytes=int(self.tracker.peak_bytes),
            learning_rate=lr,
            measured_bubble_rate=_measured_bubble_rate(),
        )
        result.loss, result.offload_per_stage = self._record_stage_figures(
            result.peak_activation_bytes, result.loss, _offload_stats()
        )
        self.summary.iterations.append(result)
        return result

    def _record_stage_figures(
        self, peak: int, loss: float | None, offload: dict[str, Any] | None
    ) -> tuple[float | None, list[dict[str, Any]] | None]:
        """Gather every pipeline rank's peak and offload figures, and the loss from whichever rank
        computed it (the last rank, or rank 0 with a V-shaped schedule), so every rank can log them."""
        from megatron.core import parallel_state

        group = parallel_state.get_pipeline_model_parallel_group()
        size = torch.distributed.get_world_size(group)
        gathered: list[Any] = [None] * size
        torch.distributed.all_gather_object(gathered, (peak, loss, offload), group=group)
        peaks = [int(p) for p, _, _ in gathered]
        losses = [l for _, l, _ in gathered if l is not None]
        offloads = [o for _, _, o in gathered]
        self._peak_per_stage = peaks
        prev = self.summary.peak_activation_bytes_per_stage
        self.summary.peak_activation_bytes_per_stage = (
            [max(a, b) for a, b in zip(prev, peaks)] if prev else peaks
        )
        return (losses[0] if losses else None), (offloads if all(o is not None for o in offloads) else None)

    @property
    def last_stage_peaks(self) -> list[int]:
        return list(self._peak_per_stage or [])
