"""The loss and the training step.

``loss_fn(params, batch, key, ctx) -> (loss, aux)`` is the loss of one micro-batch at ``params``:

- PURE on the non-sharded path: the transformer (and, when trained, the text connectors) runs through
  ``torch.func.functional_call`` on ``params``; frozen weights come from the modules, which are only read. So
  calling it with other params gives the loss at those params, and ``torch.func.grad`` / ``jacrev`` apply. Its
  randomness is ``key`` (int64 [B], one derived seed per sample, :func:`micro_batch_key`), never a global
  generator. ``torch.func.vmap`` over samples composes with :func:`loss_from_inputs` (the model and the loss):
  ``loss_fn = loss_from_inputs o model_inputs``, and :func:`model_inputs` draws noise from per-sample
  ``torch.Generator`` s, which vmap cannot batch, so draw the inputs first (``experiments/per_sample_grads.py``).
  Under vmap build the transformer with ``max_distinct_timesteps=None`` (its timestep deduplication checks a
  value on the host).
- NOT a function of ``params`` where PyTorch cannot swap parameters: under FSDP2 the parameters are the module's
  sharded DTensors, which FSDP2's hooks gather and reduce themselves, and activation checkpointing re-runs the
  forward in backward with the module's own attributes (after ``functional_call`` has restored them). There
  ``params`` must be the module's own parameters (checked by identity; anything else is a ``ValueError``) and
  the module is called directly.

``train_step(state, micro_batches, ctx) -> (state, metrics)`` takes one optimizer step with ``loss_fn``: gradients
from ``torch.autograd.grad`` on the non-sharded path (no ``.grad`` is written), from ``backward()`` under FSDP2
(its reduce-scatter writes ``.grad``; the step reads and clears them, so no ``.grad`` survives a step either way).
Everything random is derived from (seed, step, sample index), so a resumed run repeats the uninterrupted one.

Shape legend: B batch, T tokens, C channels, S text tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import torch
from torch import nn

from ltxf.config import TrainConfig
from ltxf.faults import TrainingStopped, nonfinite_samples
from ltxf.models.text import TextContext
from ltxf.monitor import SIGMA_BUCKET_NAMES
from ltxf.optim import (
    GradientTransformation,
    ScaleByScheduleState,
    apply_updates,
    call_update,
    find_states,
    global_norm,
    last_learning_rate,
)
from ltxf.parallel import DistInfo
from ltxf.rng import fold_in, sample_keys
from ltxf.state import TrainState, trainable_parameters
from ltxf.strategies.base import ModelInputs, Strategy

TEXT_PARAM_PREFIX = "text_processor."
"""Prefix of the text connectors' keys in ``params`` (``model.train_connectors``); the rest are transformer keys."""


class NonFiniteLossError(TrainingStopped):
    """Raised when a step produced a non-finite loss or gradient norm; the state was not updated.
    ``sample_ids`` are this process's samples whose own loss was not finite (all of its samples of the step when
    only the gradients were)."""

    def __init__(self, message: str, *, step: int = -1, sample_ids: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.step = step
        self.sample_ids = list(sample_ids)


@dataclass(frozen=True, kw_only=True, eq=False)
class StepContext:
    """What the step needs besides the state and the batch. ``transformer`` and ``text_processor`` hold the
    frozen weights (only read); the trainable ones are ``params`` / ``state.params``."""

    transformer: nn.Module
    text_processor: nn.Module
    tx: GradientTransformation
    cfg: TrainConfig
    strategy: Strategy
    dist: DistInfo
    fsdp: bool
    """The model is under FSDP2 (any mesh: sharded, replicated or both); its hooks reduce the gradients."""
    compute_dtype: torch.dtype
    text_params: tuple[str, ...] = ()
    """Keys of ``state.params`` that belong to the text connectors (an FSDP2 unit of their own under FSDP2)."""

    @property
    def needs_module_params(self) -> bool:
        """Whether ``params`` must be the modules' own parameters (FSDP2 or activation checkpointing)."""
        return self.fsdp or self.cfg.parallel.activation_checkpointing

    @cached_property
    def module_params(self) -> dict[str, torch.Tensor]:
        """The modules' trainable parameters, keyed as in ``state.params`` (recorded once, compared by identity)."""
        text = {TEXT_PARAM_PREFIX + k: v for k, v in trainable_parameters(self.text_processor).items()}
        return {**trainable_parameters(self.transformer), **text}


def check_module_params(params: dict[str, torch.Tensor], ctx: StepContext) -> None:
    """``ValueError`` unless ``params`` are exactly the modules' trainable parameters (same keys, same objects).

    Under FSDP2 (or activation checkpointing) the model reads its own parameters, so a state holding copies
    would train nothing while looking fine; this identity check (one ``is`` per tensor) refuses it."""
    owned = ctx.module_params
    if params.keys() != owned.keys():
        missing, extra = sorted(owned.keys() - params.keys()), sorted(params.keys() - owned.keys())
        raise ValueError(f"state.params do not match the model's trainable parameters: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    foreign = [k for k, v in params.items() if v is not owned[k]]
    if foreign:
        raise ValueError(
            f"state.params are not the model's own parameters ({len(foreign)} differ, e.g. {foreign[0]!r}): under "
            "FSDP2 or activation checkpointing the step trains the module's parameters in place, so the state "
            "must hold them, not copies; build it with init_state(trainable_parameters(model), tx) and do not "
            "copy it")


def micro_batch_key(ctx: StepContext, step: int, micro_batch: int, batch_size: int) -> torch.Tensor:
    """The key [B] of a micro-batch: one derived seed per sample, keyed by the sample's index in the global batch
    of this step (micro-batch major, then rank, then position), so 1 process with batch 2B draws what 2 processes
    with batch B draw."""
    world, rank = ctx.dist.world_size, ctx.dist.rank
    first = micro_batch * world * batch_size + rank * batch_size
    return sample_keys(ctx.cfg.seed, step, first, batch_size)


def _call(module: nn.Module, params: dict[str, torch.Tensor], ctx: StepContext, **inputs: Any) -> Any:
    """``module(**inputs)`` with ``params`` in place of its trainable parameters."""
    if ctx.needs_module_params:
        return module(**inputs)  # the caller checked that params are the module's own
    return torch.func.functional_call(module, params, (), inputs, strict=False, tie_weights=False)


def text_context(params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], ctx: StepContext) -> TextContext:
    """Run the text connectors on the cached Gemma features (under no_grad unless they are trained).

    With learnable registers every text position is attended, so the mask is dropped (None lets SDPA pick a
    fused kernel)."""
    text_params = {k.removeprefix(TEXT_PARAM_PREFIX): v for k, v in params.items() if k.startswith(TEXT_PARAM_PREFIX)}
    with torch.set_grad_enabled(bool(text_params) and torch.is_grad_enabled()):
        # The connectors' own dtype: fp32 when they are trained, the compute dtype otherwise.
        dtype = next(ctx.text_processor.video_connector.parameters()).dtype
        audio_features = batch.get("audio_prompt_embeds")
        inputs = {"video_features_BSC": batch["video_prompt_embeds"].to(dtype),
                  "audio_features_BSC": None if audio_features is None else audio_features.to(dtype),
                  "mask_BS": batch["prompt_attention_mask"]}
        if text_params:
            context = _call(ctx.text_processor, text_params, ctx, **inputs)
        else:
            context = ctx.text_processor(**inputs)
    if ctx.text_processor.video_connector.learnable_registers is not None:
        context = context._replace(context_mask=None)
    return context


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


def model_inputs(
    params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], key: torch.Tensor, ctx: StepContext,
    shared_key: torch.Tensor | None = None,
) -> ModelInputs:
    """The strategy's transformer inputs and targets for ``batch``; depends on ``params`` only through trained
    text connectors. Pure: all randomness comes from ``key`` (per sample) and ``shared_key`` (per micro-batch,
    the same on every process: draws that change the sequence length, :func:`micro_batch_shared_key`)."""
    context = text_context(params, batch, ctx)
    return ctx.strategy.prepare_inputs(batch, context, key, dtype=ctx.compute_dtype, shared_key=shared_key)


def loss_from_inputs(
    params: dict[str, torch.Tensor], inputs: ModelInputs, ctx: StepContext
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The transformer at ``params`` on prepared ``inputs``: ``(mean loss, aux)``, aux holding the per-sample
    ``loss_B``, ``video_loss_B`` (and ``audio_loss_B`` with audio) and the ``sigma_B`` drawn."""
    transformer_params = {k: v for k, v in params.items() if not k.startswith(TEXT_PARAM_PREFIX)}
    device_type = (inputs.video or inputs.audio).latent.device.type
    # One process computes in the compute dtype by autocast; FSDP2 casts parameters itself (MixedPrecisionPolicy).
    autocast = ctx.compute_dtype != torch.float32 and not ctx.fsdp
    with torch.autocast(device_type, dtype=ctx.compute_dtype, enabled=autocast):
        video_pred, audio_pred = _call(ctx.transformer, transformer_params, ctx, video=inputs.video,
                                       audio=inputs.audio)
    losses = ctx.strategy.per_sample_losses(inputs, video_pred, audio_pred)
    aux = {"loss_B": losses.total_B, "video_loss_B": losses.video_B, "sigma_B": inputs.sigma_B}
    if losses.audio_B is not None:
        aux["audio_loss_B"] = losses.audio_B
    return losses.total_B.mean(), aux


def loss_fn(
    params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], key: torch.Tensor, ctx: StepContext,
    shared_key: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss of one micro-batch at ``params`` (the trainable tensors, keyed like ``state.params``) and its aux
    (per-sample terms and sigmas, see :func:`loss_from_inputs`); ``key`` and ``shared_key`` as in
    :func:`model_inputs`. Pure on the non-sharded path; see the module docstring for FSDP2 and activation
    checkpointing, where ``params`` must be the modules' own."""
    if ctx.needs_module_params:
        check_module_params(params, ctx)
    return loss_from_inputs(params, model_inputs(params, batch, key, ctx, shared_key), ctx)


def _bucket_index(sigma_B: torch.Tensor) -> torch.Tensor:
    """Index of each sigma's bucket (edges 0.25, 0.5, 0.75; 1.0 belongs to the last), computed on the device
    without building an edges tensor (which would wait for the device)."""
    return (sigma_B.float() * len(SIGMA_BUCKET_NAMES)).long().clamp_(0, len(SIGMA_BUCKET_NAMES) - 1)


class _Sums:
    """Device-side sums of one step's per-sample losses (no host sync until the caller reads them)."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.video = torch.zeros((), device=device)
        self.audio = torch.zeros((), device=device)
        self.bucket_loss = torch.zeros(len(SIGMA_BUCKET_NAMES), device=device)
        self.bucket_count = torch.zeros(len(SIGMA_BUCKET_NAMES), device=device)
        self.num_samples = 0
        self.num_tokens = 0
        self.nonfinite_B: list[torch.Tensor] = []  # per micro-batch; read only on the failure path (names samples)

    @torch.no_grad()
    def add(self, loss: torch.Tensor, aux: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        self.loss += loss.detach()
        self.video += aux["video_loss_B"].detach().mean()
        if "audio_loss_B" in aux:
            self.audio += aux["audio_loss_B"].detach().mean()
        index_B = _bucket_index(aux["sigma_B"])
        self.bucket_loss.index_add_(0, index_B, aux["loss_B"].detach().float())
        self.bucket_count.index_add_(0, index_B, torch.ones_like(aux["sigma_B"], dtype=torch.float32))
        self.nonfinite_B.append(~torch.isfinite(aux["loss_B"].detach()))
        self.num_samples += batch_size_of(batch)
        self.num_tokens += num_latent_elements(batch)


def compute_gradients(
    params: dict[str, torch.Tensor], micro_batches: list[dict[str, torch.Tensor]], step: int, ctx: StepContext
) -> tuple[dict[str, torch.Tensor], _Sums]:
    """Gradients of the mean micro-batch loss with respect to ``params`` (accumulated over ``micro_batches``),
    and the loss sums. Non-sharded: ``torch.autograd.grad`` of :func:`loss_fn` (no ``.grad`` written). FSDP2:
    ``backward()`` (its hooks reduce-scatter into ``.grad``, synchronised after the last micro-batch only); the
    ``.grad`` are taken and cleared here."""
    num_micro = len(micro_batches)
    sums = _Sums(ctx.dist.device)
    keys, tensors = list(params), list(params.values())
    grads: list[torch.Tensor] | None = None
    for i, batch in enumerate(micro_batches):
        key = micro_batch_key(ctx, step, i, batch_size_of(batch))
        if ctx.fsdp:
            _set_gradient_sync(ctx, i == num_micro - 1)
        loss, aux = loss_fn(params, batch, key, ctx, micro_batch_shared_key(ctx, step, i))
        if ctx.fsdp:
            (loss / num_micro).backward()
        else:
            micro = torch.autograd.grad(loss / num_micro, tensors, allow_unused=True, materialize_grads=True)
            grads = list(micro) if grads is None else [g.add_(m) for g, m in zip(grads, micro, strict=True)]
        sums.add(loss, aux, batch)
    if ctx.fsdp:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in tensors]
        for p in tensors:
            p.grad = None
    return dict(zip(keys, grads, strict=True)), sums


def _set_gradient_sync(ctx: StepContext, enabled: bool) -> None:
    """FSDP2 reduces gradients in backward: only in the last micro-batch's (every FSDP2 module of the model)."""
    for module in (ctx.transformer, ctx.text_processor):
        if hasattr(module, "set_requires_gradient_sync"):
            module.set_requires_gradient_sync(enabled)


def train_step(
    state: TrainState, micro_batches: list[dict[str, torch.Tensor]], ctx: StepContext
) -> tuple[TrainState, dict[str, torch.Tensor | float]]:
    """One optimizer step over ``micro_batches`` (gradient accumulation inside the step).

    DONATED: the input ``state`` is updated in place (parameters and optimizer moments; under FSDP2 or activation
    checkpointing they must be, and are checked to be, the model's own parameters); use the returned state, not
    the input one. On the non-sharded path the state is the truth: the loss is evaluated at ``state.params``
    through ``functional_call``.

    Metrics are named means over this process's samples, device tensors read only when logging: ``loss``,
    ``video_loss``, ``audio_loss``, ``grad_norm`` (the global norm, computed once and handed to the optimizer's
    clipping), ``skipped`` (1.0 for a skipped update); ``sigma_bucket_loss_sum`` / ``sigma_bucket_count`` [4]
    (sums, so windows can be combined); ``lr`` (a host tensor); ``num_samples`` / ``num_tokens`` (floats).

    Raises :class:`NonFiniteLossError` before touching the parameters if the loss or the gradient norm is not
    finite. With ``nonfinite_loss='skip'`` the update is skipped instead: parameters and Adam moments stay, and
    ``state.step`` and the learning-rate schedule both advance (the schedule's count always equals
    ``state.step``, so step k uses ``schedule(k)`` whether or not an earlier step was skipped).
    """
    if ctx.needs_module_params:
        check_module_params(state.params, ctx)
    step = int(state.step)
    grads, sums = compute_gradients(state.params, micro_batches, step, ctx)

    # One host sync per step: the loss and the gradient norm must be finite before anything is updated in
    # place (the optimizer moments included).
    norm = global_norm(grads).to(ctx.dist.device)
    finite = bool(torch.isfinite(sums.loss) & torch.isfinite(norm))
    opt_state = state.opt_state
    if finite:
        updates, opt_state = call_update(ctx.tx, grads, state.opt_state, state.params, grad_norm=norm)
        apply_updates(state.params, updates)
    elif ctx.cfg.nonfinite_loss == "skip":
        _advance_schedules(opt_state)
    del grads
    culprits: list[str] = []
    if not finite:
        culprits, in_loss = nonfinite_samples(micro_batches, sums.nonfinite_B)
        where = "in the loss of" if in_loss else "in the gradients (every loss finite) of the step's"
    if not finite and ctx.cfg.nonfinite_loss == "stop":
        raise NonFiniteLossError(
            f"step {step}: non-finite loss ({float(sums.loss) / len(micro_batches)}) or gradient norm "
            f"({float(norm)}) {where} samples {', '.join(culprits)}; the parameters were not updated",
            step=step, sample_ids=culprits,
        )
    metrics = _step_metrics(sums, norm, finite, opt_state, len(micro_batches), culprits)
    return replace(state, opt_state=opt_state, step=state.step + 1), metrics


def _advance_schedules(opt_state: Any) -> None:
    """A skipped update still uses up its step of the learning-rate schedule (moments are left alone)."""
    for schedule_state in find_states(opt_state, ScaleByScheduleState):
        schedule_state.count.add_(1)


def _step_metrics(sums: _Sums, norm: torch.Tensor, finite: bool, opt_state: Any, num_micro: int,
                  culprits: list[str]) -> dict[str, Any]:
    metrics = {
        "loss": sums.loss / num_micro,
        "video_loss": sums.video / num_micro,
        "audio_loss": sums.audio / num_micro,
        "grad_norm": norm.detach().float(),
        "skipped": torch.zeros_like(sums.loss) if finite else torch.ones_like(sums.loss),
        "sigma_bucket_loss_sum": sums.bucket_loss,
        "sigma_bucket_count": sums.bucket_count,
        "num_samples": float(sums.num_samples),
        "num_tokens": float(sums.num_tokens),
        "nonfinite_samples": culprits,  # host list of sample ids; empty when the step was finite
    }
    lr = last_learning_rate(opt_state)
    if lr is not None:
        metrics["lr"] = lr.detach().clone().float()  # a host tensor: read only when logging
    return metrics
