"""The training step: ``train_step(state, micro_batches, ctx) -> (state, metrics)``.

Gradients come from autograd (``loss.backward()``), not ``torch.func.grad``: only autograd composes with FSDP2
hooks and activation checkpointing (style-anchors.md section B). Everything random is derived from
(seed, step, rank, purpose), so a step is a pure function of the state and the batch: a resumed run repeats the
uninterrupted one exactly.

Shape legend: B batch, T tokens, C channels, S text tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ltxf.config import TrainConfig
from ltxf.models.text import TextContext
from ltxf.optim import GradientTransformation, apply_updates, last_learning_rate
from ltxf.parallel import DistInfo, all_reduce_mean_
from ltxf.rng import fold_in, sample_keys
from ltxf.state import TrainState
from ltxf.strategies.base import StepLosses, Strategy

# Loss is also reported per sigma bucket: [0, .25), [.25, .5), [.5, .75), [.75, 1].
SIGMA_BUCKET_NAMES = ("0.00-0.25", "0.25-0.50", "0.50-0.75", "0.75-1.00")


class NonFiniteLossError(RuntimeError):
    """Raised when a step produced a non-finite loss or gradient norm; the state was not updated."""


@dataclass(frozen=True, kw_only=True)
class StepContext:
    """What the step needs besides the state and the batch. ``transformer`` and ``text_processor`` hold the
    frozen weights; the trainable ones are ``state.params`` (the same tensors)."""

    transformer: nn.Module
    text_processor: nn.Module
    tx: GradientTransformation
    cfg: TrainConfig
    strategy: Strategy
    dist: DistInfo
    fsdp: bool
    compute_dtype: torch.dtype
    text_params: tuple[str, ...] = ()
    """Keys of ``state.params`` that belong to the text connectors (replicated even under FSDP)."""


def text_context(ctx: StepContext, batch: dict[str, torch.Tensor]) -> TextContext:
    """Run the text connectors on the cached Gemma features (under no_grad unless they are trained).

    With learnable registers every text position is attended, so the mask is dropped (None lets SDPA pick a
    fused kernel)."""
    with torch.set_grad_enabled(bool(ctx.text_params)):
        # The connectors' own dtype: fp32 when they are trained, the compute dtype otherwise.
        dtype = next(ctx.text_processor.video_connector.parameters()).dtype
        audio_features = batch.get("audio_prompt_embeds")
        context = ctx.text_processor(
            batch["video_prompt_embeds"].to(dtype),
            None if audio_features is None else audio_features.to(dtype),
            batch["prompt_attention_mask"],
        )
    if ctx.text_processor.video_connector.learnable_registers is not None:
        context = context._replace(context_mask=None)
    return context


def micro_batch_key(ctx: StepContext, step: int, micro_batch: int, batch_size: int) -> torch.Tensor:
    """The key [B] of a micro-batch: one derived seed per sample, keyed by the sample's index in the global batch
    of this step (micro-batch major, then rank, then position), so 1 process with batch 2B draws what 2 processes
    with batch B draw."""
    world, rank = ctx.dist.world_size, ctx.dist.rank
    first = micro_batch * world * batch_size + rank * batch_size
    return sample_keys(ctx.cfg.seed, step, first, batch_size)


def micro_batch_shared_key(ctx: StepContext, step: int, micro_batch: int) -> torch.Tensor:
    """int64 [1]: the seed of draws that apply to a whole micro-batch (the flexible strategy's reference, which
    changes the sequence length), keyed by (seed, step, micro-batch) only, so every process draws the same."""
    return torch.tensor([fold_in(ctx.cfg.seed, step, micro_batch, "batch")], dtype=torch.int64)


def batch_size_of(batch: dict[str, torch.Tensor]) -> int:
    """Samples in a micro-batch (video latents, or audio latents for audio-only data)."""
    return batch["video_latents" if "video_latents" in batch else "audio_latents"].shape[0]


def num_latent_elements(batch: dict[str, torch.Tensor]) -> int:
    """Latent positions in a micro-batch, for throughput: video F*H*W per sample, else audio steps."""
    if "video_latents" in batch:
        return math.prod(batch["video_latents"].shape[2:]) * batch["video_latents"].shape[0]
    batch_size, _, num_steps, _ = batch["audio_latents"].shape
    return batch_size * num_steps


def loss_fn(
    ctx: StepContext, batch: dict[str, torch.Tensor], key: torch.Tensor, shared_key: torch.Tensor | None = None
) -> tuple[torch.Tensor, StepLosses, torch.Tensor]:
    """Mean loss of one micro-batch, its per-sample terms, and the sigmas [B] it was drawn at."""
    context = text_context(ctx, batch)
    inputs = ctx.strategy.prepare_inputs(batch, context, key, dtype=ctx.compute_dtype, shared_key=shared_key)
    device_type = (inputs.video or inputs.audio).latent.device.type
    autocast = ctx.compute_dtype != torch.float32 and not ctx.fsdp
    with torch.autocast(device_type, dtype=ctx.compute_dtype, enabled=autocast):
        video_pred, audio_pred = ctx.transformer(video=inputs.video, audio=inputs.audio)
    losses = ctx.strategy.per_sample_losses(inputs, video_pred, audio_pred)
    return losses.total_B.mean(), losses, inputs.sigma_B


def _bucket_index(sigma_B: torch.Tensor) -> torch.Tensor:
    """Index of each sigma's bucket (edges 0.25, 0.5, 0.75; 1.0 belongs to the last), computed on the device
    without building an edges tensor (which would wait for the device)."""
    return (sigma_B.float() * len(SIGMA_BUCKET_NAMES)).long().clamp_(0, len(SIGMA_BUCKET_NAMES) - 1)


def train_step(
    state: TrainState, micro_batches: list[dict[str, torch.Tensor]], ctx: StepContext
) -> tuple[TrainState, dict[str, torch.Tensor | float]]:
    """One optimizer step over ``micro_batches`` (gradient accumulation inside the step).

    The input ``state`` is DONATED: its parameter and optimizer tensors are updated in place (they are the
    model's own parameters) and it must not be used after the call; use the returned state. Metrics are
    device tensors summed over this process's micro-batches (``*_sum`` / ``*_count``) so the caller can reduce
    them across processes only when it logs; ``num_samples`` / ``num_tokens`` are host-side counts (floats).

    Raises :class:`NonFiniteLossError` before touching the parameters if the loss or the gradient norm is not
    finite (with ``nonfinite_loss='skip'`` the update is skipped instead and the step still advances).
    """
    step = int(state.step)
    cfg = ctx.cfg
    num_micro = len(micro_batches)
    device = ctx.dist.device
    loss_sum = torch.zeros((), device=device)
    video_sum = torch.zeros((), device=device)
    audio_sum = torch.zeros((), device=device)
    bucket_sum = torch.zeros(len(SIGMA_BUCKET_NAMES), device=device)
    bucket_count = torch.zeros(len(SIGMA_BUCKET_NAMES), device=device)
    num_samples = 0
    num_tokens = 0

    for i, batch in enumerate(micro_batches):
        key = micro_batch_key(ctx, step, i, batch_size_of(batch))
        if ctx.fsdp:
            # Reduce-scatter gradients only once, after the last micro-batch.
            ctx.transformer.set_requires_gradient_sync(i == num_micro - 1)
        loss, losses, sigma_B = loss_fn(ctx, batch, key, micro_batch_shared_key(ctx, step, i))
        (loss / num_micro).backward()
        with torch.no_grad():
            loss_sum += loss.detach()
            video_sum += losses.video_B.detach().mean()
            if losses.audio_B is not None:
                audio_sum += losses.audio_B.detach().mean()
            index_B = _bucket_index(sigma_B)
            bucket_sum.index_add_(0, index_B, losses.total_B.detach().float())
            bucket_count.index_add_(0, index_B, torch.ones_like(sigma_B, dtype=torch.float32))
        num_samples += batch_size_of(batch)
        num_tokens += num_latent_elements(batch)

    grads = {}
    for key, param in state.params.items():
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grads[key] = param.grad
    replicated = [grads[k] for k in grads if not ctx.fsdp or k in ctx.text_params]
    all_reduce_mean_(replicated)

    # One host sync per step: the loss and the gradient norm must be finite before anything is updated in
    # place (the optimizer moments included).
    norm = torch.nn.utils.get_total_norm(list(grads.values()), foreach=True) if grads else torch.zeros(())
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    finite = bool(torch.isfinite(loss_sum) & torch.isfinite(norm))
    opt_state = state.opt_state
    if finite:
        updates, opt_state = ctx.tx.update(grads, state.opt_state, state.params)
        apply_updates(state.params, updates)
    _clear_grads(state)
    if not finite and cfg.nonfinite_loss == "stop":
        raise NonFiniteLossError(
            f"step {step}: non-finite loss ({float(loss_sum) / num_micro}) or gradient norm ({float(norm)}); "
            "the parameters were not updated"
        )

    metrics = {
        "loss_sum": loss_sum / num_micro,
        "video_loss_sum": video_sum / num_micro,
        "audio_loss_sum": audio_sum / num_micro,
        "sigma_bucket_loss_sum": bucket_sum,
        "sigma_bucket_count": bucket_count,
        "num_samples": float(num_samples),
        "num_tokens": float(num_tokens),
        "skipped": torch.zeros((), device=device) if finite else torch.ones((), device=device),
    }
    metrics["grad_norm"] = norm.detach().float().to(device)
    lr = last_learning_rate(opt_state)
    if lr is not None:
        metrics["lr"] = lr.detach().clone().float()  # a host tensor: read only when logging
    new_state = replace(state, opt_state=opt_state, step=state.step + 1)
    return new_state, metrics


def _clear_grads(state: TrainState) -> None:
    for param in state.params.values():
        param.grad = None
