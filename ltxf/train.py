"""The training run as named steps; ``train.py`` at the top of the repository calls :func:`main`.

A script can call the steps one by one (``tests/test_train.py`` and ``experiments/`` do)::

    dist = init_distributed()
    plan = plan_run(cfg, dist)                    # run directory, resolved config, dtypes, FSDP or not
    validator = build_validator(plan)             # before the model: Gemma's peak does not stack on it
    model = build_model(plan)                     # transformer + connectors, LoRA, AC / compile / FSDP2
    params = build_trainables(plan, model)        # the trainable tensors, keyed by state-dict name
    strategy = build_strategy(cfg)                # or any object following ltxf.strategies.base.Strategy
    data = build_data(plan, strategy)             # dataset, resumable loader, export metadata
    state = init_or_resume(plan, params, tx, data)  # TrainState at step 0, or restored from the newest checkpoint
    run = Run(plan=plan, model=model, ...)         # (see build_run)
    outcome = train_loop(run, state)              # steps, logging, checkpoints, validation, Ctrl-C
    export_path = finish(run, outcome)            # final checkpoint, last validation, weights export

Validation samples at step 0 (unless ``validation.skip_initial_validation``, and not on a resumed run) and then
every ``validation.interval`` steps, after that step's checkpoint. Its randomness comes from its own seed, and
training's is derived from (seed, step, sample index), so sampling leaves the training run exactly as it would be
without.
"""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ltxf import checkpoint as run_checkpoint
from ltxf.config import LoraConfig, TrainConfig, check_paths
from ltxf.data import AUDIO_FREQUENCY_BINS, BucketBatchSampler, PrecomputedDataset, ResumableLoader
from ltxf.lora import init_lora_parameters, inject_lora, load_lora_weights, lora_parameters, lora_state_dict
from ltxf.lora_formats import linear_shapes, load_lora_file, match_lora
from ltxf.models.checkpoint import TRANSFORMER_PREFIX, read_config, write_checkpoint
from ltxf.models.pack import (
    ModelPack,
    check_conditions_text_encoder,
    check_gemma_pairing,
    expected_text_encoder,
    resolve_pack,
)
from ltxf.models.text import load_embeddings_processor
from ltxf.models.transformer import load_transformer, read_transformer_config
from ltxf.monitor import Monitor, memory_metrics
from ltxf.optim import GradientTransformation, adamw, adamw_8bit, chain, clip_by_global_norm, make_schedule
from ltxf.parallel import DistInfo, all_reduce_sum, barrier, init_distributed, parallelize, shutdown_distributed
from ltxf.rng import make_generator
from ltxf.state import TrainState, init_state, state_to_dict, trainable_parameters
from ltxf.step import SIGMA_BUCKET_NAMES, NonFiniteLossError, StepContext, train_step
from ltxf.strategies.base import Strategy
from ltxf.strategies.registry import build_strategy
from ltxf.validation import Validator, offload_to_host_

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
TEXT_PARAM_PREFIX = "text_processor."
"""Prefix of the text connectors' keys in ``state.params`` (``model.train_connectors``)."""


# -------------------------------------------------------------------------------------------------------------
# Results and the pieces a run is made of


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """Where a finished (or interrupted) run left its outputs."""

    output_dir: Path
    final_step: int
    export_path: Path | None
    tensorboard_dir: Path
    losses: tuple[float, ...]
    interrupted: bool = False


@dataclass(frozen=True, kw_only=True)
class RunPlan:
    """What the config and the process group decide before anything heavy is built."""

    cfg: TrainConfig
    dist: DistInfo
    output_dir: Path
    config_dict: dict
    compute_dtype: torch.dtype
    full: bool
    """Full fine-tuning (every transformer weight trains) rather than LoRA."""
    fsdp: bool
    """Parameters sharded with FSDP2 (otherwise every process holds the whole model)."""


@dataclass(frozen=True, kw_only=True, eq=False)
class Model:
    """The loaded, adapted and parallelized model; the frozen weights live here, outside the state."""

    transformer: nn.Module
    text_processor: nn.Module
    checkpoint_config: dict
    """The config metadata of the base checkpoint (written back into full-model exports)."""
    pack: ModelPack
    """Where each component of the model lives (LTX-2.5: one file each)."""


@dataclass(frozen=True, kw_only=True, eq=False)
class Data:
    dataset: PrecomputedDataset
    loader: ResumableLoader
    export_metadata: dict[str, str]
    """The strategy's metadata for the exported LoRA (checked at start, e.g. one reference downscale factor)."""


@dataclass(frozen=True, kw_only=True, eq=False)
class Run:
    """Everything the loop uses besides the state."""

    plan: RunPlan
    model: Model
    data: Data
    ctx: StepContext
    monitor: Monitor
    validator: Validator | None = None


@dataclass(kw_only=True)
class LoopOutcome:
    """How the loop ended: the state, the last step and the logged training losses."""

    state: TrainState
    step: int
    start_step: int
    losses: list[float] = field(default_factory=list)
    interrupted: bool = False


# -------------------------------------------------------------------------------------------------------------
# Build steps


def setup_logging(rank: int) -> None:
    prefix = "" if rank == 0 else f"[rank {rank}] "
    fmt = prefix + "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=fmt, force=True)


def plan_run(cfg: TrainConfig, dist: DistInfo) -> RunPlan:
    """Check the inputs, create the run directory and write the resolved ``config.json`` (rank 0)."""
    check_paths(cfg)
    full = cfg.model.training_mode == "full"
    mode = cfg.parallel.data_parallel
    fsdp = mode == "fsdp" or (mode == "auto" and full and dist.world_size > 1)
    if fsdp and cfg.model.train_connectors:
        raise ValueError("model.train_connectors is not supported with FSDP (parallel.data_parallel='fsdp', or "
                         "'auto' with full fine-tuning on several processes); use parallel.data_parallel="
                         "'replicate' or train the transformer only")
    if cfg.model.train_connectors and not full:
        logger.warning("model.train_connectors with a LoRA: the trained connectors are exported to their own file "
                       "(exports/text_connectors_step_N.safetensors) that only ltxf reads; ComfyUI, ltx-pipelines "
                       "and diffusers will apply the LoRA with the base model's connectors. Full fine-tunes merge "
                       "them into the exported checkpoint.")
    output_dir = Path(cfg.output_dir).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    config_dict = cfg.to_dict()
    if dist.is_main:
        (output_dir / "config.json").write_text(json.dumps(config_dict, indent=2))
    if cfg.validation.enabled and cfg.validation.offload_optimizer and fsdp:
        logger.warning("validation.offload_optimizer is ignored under FSDP (the optimizer state is sharded)")
    return RunPlan(cfg=cfg, dist=dist, output_dir=output_dir, config_dict=config_dict,
                   compute_dtype=DTYPES[cfg.model.dtype], full=full, fsdp=fsdp)


def build_validator(plan: RunPlan) -> Validator | None:
    """Validation sampling, or None when off. Build it before the model: Gemma (used once, then freed) then does
    not stack its memory peak on the training model's."""
    cfg = plan.cfg
    if not cfg.validation.enabled:
        return None
    return Validator.build(cfg.validation, checkpoint=model_pack(cfg), device=plan.dist.device,
                           dtype=plan.compute_dtype)


def model_pack(cfg: TrainConfig) -> ModelPack:
    """The model's component files (``--model.checkpoint`` plus the optional ``--model.text_encoder`` /
    ``video_vae`` / ``audio_vae``), with the transformer <-> text-encoder pairing checked when both are known."""
    m = cfg.model
    pack = resolve_pack(m.checkpoint, text_encoder=m.text_encoder, video_vae=m.video_vae, audio_vae=m.audio_vae)
    if pack.text_encoder is not None:
        check_gemma_pairing(pack.transformer, pack.text_encoder)
    return pack


def build_model(plan: RunPlan) -> Model:
    """Load the transformer and the text connectors, freeze what does not train, inject and initialise LoRA, and
    parallelize (activation checkpointing, compile, FSDP2). The one place weights are loaded."""
    cfg, device = plan.cfg, plan.dist.device
    pack = model_pack(cfg)
    checkpoint_path = pack.transformer
    # Full fine-tuning keeps fp32 master weights (FSDP2 casts to bf16 for compute; one process uses autocast).
    weights_dtype = torch.float32 if plan.full else plan.compute_dtype
    logger.info("loading the transformer from %s", checkpoint_path)
    transformer = load_transformer(checkpoint_path, dtype=weights_dtype, device=device)
    text_processor = load_embeddings_processor(checkpoint_path, dtype=plan.compute_dtype, device=device,
                                               with_feature_extractor=False)
    transformer.requires_grad_(plan.full)
    text_processor.requires_grad_(cfg.model.train_connectors)
    if cfg.model.train_connectors:
        text_processor.float()
    if not plan.full:
        # Adapters (and their AdamW moments) stay fp32 on a bf16 base: bf16 moments cannot decay and small
        # updates round away.
        targets = inject_lora(transformer, cfg.lora, dtype=torch.float32)
        # Same derived seed on every rank: identical adapters with no broadcast.
        init_lora_parameters(transformer, make_generator(cfg.seed, 0, 0, "lora_init", device=device))
        if cfg.model.init_lora is not None:
            apply_initial_lora(transformer, cfg.model.init_lora, cfg.lora)
        logger.info("LoRA rank %d alpha %g on %d modules", cfg.lora.rank, cfg.lora.alpha, len(targets))
    parallelize(transformer, fsdp=plan.fsdp, activation_checkpointing=cfg.parallel.activation_checkpointing,
                compile=cfg.parallel.compile, param_dtype=plan.compute_dtype,
                reduce_dtype=DTYPES[cfg.parallel.reduce_dtype])
    transformer.train()
    return Model(transformer=transformer, text_processor=text_processor,
                 checkpoint_config=read_config(checkpoint_path), pack=pack)


def apply_initial_lora(transformer: nn.Module, path: Path, lora: LoraConfig) -> None:
    """Start from a LoRA file (any layout :mod:`ltxf.lora_formats` reads): its effective update
    ``scale_file * B @ A`` is kept exactly, whatever the alpha/rank convention of the file and of this run."""
    lora_file = match_lora(load_lora_file(path), linear_shapes(transformer), source=path)
    tensors = dict(lora_file.tensors)
    for module, scale in lora_file.scales.items():
        key = f"{module}.lora_B.weight"
        tensors[key] = tensors[key].float() * (scale / lora.scaling)
    load_lora_weights(transformer, tensors)
    logger.info("LoRA initialised from %s (%d modules)", path, len(lora_file.scales))


def build_trainables(plan: RunPlan, model: Model) -> dict[str, torch.Tensor]:
    """The trainable tensors themselves (LoRA adapters, or every transformer weight), keyed by state-dict name;
    trained text connectors under ``text_processor.``."""
    transformer = model.transformer
    params = trainable_parameters(transformer) if plan.full else lora_parameters(transformer)
    if plan.cfg.model.train_connectors:
        params |= {TEXT_PARAM_PREFIX + k: v for k, v in trainable_parameters(model.text_processor).items()}
    logger.info("trainable parameters: %s (%d tensors)", f"{sum(p.numel() for p in params.values()):,}",
                len(params))
    return params


def build_optimizer(cfg: TrainConfig) -> GradientTransformation:
    """``clip -> AdamW (fp32 or 8-bit moments) with the learning-rate schedule``, optax style."""
    o = cfg.optim
    schedule = make_schedule(o.scheduler, o.learning_rate, o.steps, warmup_steps=o.warmup_steps,
                             **dict(o.scheduler_params))
    make = adamw_8bit if o.optimizer == "adamw8bit" else adamw
    core = make(schedule, b1=o.betas[0], b2=o.betas[1], eps=o.eps, weight_decay=o.weight_decay)
    return chain(clip_by_global_norm(o.max_grad_norm), core) if o.max_grad_norm > 0 else core


def build_data(plan: RunPlan, strategy: Strategy) -> Data:
    """The dataset the strategy reads, a resumable bucketed loader over it, and the export metadata."""
    cfg, dist = plan.cfg, plan.dist
    sources = strategy.data_sources()  # folder names (role = folder), or a mapping role -> folder
    sources = dict(sources) if isinstance(sources, Mapping) else list(sources)
    # Latent widths from the transformer (LTX: 128 video, 8 x 16 audio; the tiny LTX-2.5 pack: 4 and 2 x 16).
    transformer_config = read_transformer_config(cfg.model.checkpoint)
    dataset = PrecomputedDataset(cfg.data.root, sources=sources,
                                 skip_bad_samples=cfg.data.skip_bad_samples, text_length=cfg.data.text_length,
                                 latent_channels=transformer_config.in_channels,
                                 audio_latent_channels=transformer_config.audio_in_channels // AUDIO_FREQUENCY_BINS)
    # Features of another Gemma have the same shapes (LTX-2.3 vs 2.5): refuse files tagged for another encoder.
    check_conditions_text_encoder([s.files["conditions"] for s in dataset.samples if "conditions" in s.files],
                                  expected_text_encoder(cfg.model.checkpoint))
    sampler = BucketBatchSampler(dataset.bucket_keys(), batch_size=cfg.optim.batch_size, seed=cfg.seed,
                                 rank=dist.rank, world_size=dist.world_size)
    loader = ResumableLoader(dataset, sampler, num_workers=cfg.data.num_workers,
                             pin_memory=dist.device.type == "cuda")
    return Data(dataset=dataset, loader=loader, export_metadata=strategy.export_metadata(dataset.samples))


def init_or_resume(plan: RunPlan, params: dict[str, torch.Tensor], tx: GradientTransformation,
                   data: Data) -> TrainState:
    """A fresh state over ``params``, or (``checkpoints.resume``) the newest checkpoint's state loaded into it in
    place, with the data position restored."""
    cfg, output_dir = plan.cfg, plan.output_dir
    state = init_state(params, tx)
    if not cfg.checkpoints.resume:
        if run_checkpoint.latest_checkpoint(output_dir) is not None:
            raise ValueError(f"{output_dir} already holds checkpoints and checkpoints.resume is False: choose "
                             "another output_dir or remove its checkpoints/ folder")
        return state
    restored = run_checkpoint.resume_checkpoint(output_dir, state_to_dict(state), config=plan.config_dict)
    if restored is not None:
        data.loader.load_state_dict(restored.extra["data"])
        logger.info("resuming at step %d", int(state.step))
    return state


def build_run(
    cfg: TrainConfig, dist: DistInfo, *, tx: GradientTransformation | None = None, strategy: Strategy | None = None
) -> tuple[Run, TrainState]:
    """Every build step in order; returns the run and its (fresh or resumed) state."""
    plan = plan_run(cfg, dist)
    validator = build_validator(plan)
    model = build_model(plan)
    params = build_trainables(plan, model)
    tx = tx if tx is not None else build_optimizer(cfg)
    strategy = strategy if strategy is not None else build_strategy(cfg)
    data = build_data(plan, strategy)
    state = init_or_resume(plan, params, tx, data)
    start_step = int(state.step)
    text_keys = tuple(k for k in state.params if k.startswith(TEXT_PARAM_PREFIX))
    ctx = StepContext(transformer=model.transformer, text_processor=model.text_processor, tx=tx, cfg=cfg,
                      strategy=strategy, dist=dist, fsdp=plan.fsdp, compute_dtype=plan.compute_dtype,
                      text_params=text_keys)
    monitor = Monitor(plan.output_dir / "tensorboard", rank=dist.rank, total_steps=cfg.optim.steps,
                      console_every_s=cfg.log.console_every_s, purge_step=start_step + 1 if start_step else None)
    if start_step == 0:
        monitor.log_config(plan.config_dict)
    return Run(plan=plan, model=model, data=data, ctx=ctx, monitor=monitor, validator=validator), state


# -------------------------------------------------------------------------------------------------------------
# The loop


def train_loop(run: Run, state: TrainState) -> LoopOutcome:
    """Train from ``state.step`` to ``optim.steps``: step, log, checkpoint, validate; the first Ctrl-C stops it
    after the current step (see :func:`finish` for the final checkpoint and export)."""
    cfg = run.plan.cfg
    outcome = LoopOutcome(state=state, step=int(state.step), start_step=int(state.step))
    pending: list[dict] = []
    batches = iter(run.data.loader)
    try:
        with _Interrupt() as interrupt:
            if outcome.start_step == 0 and _validation_due(run, 0):
                validate(run, outcome.state, 0)
            while outcome.step < cfg.optim.steps:
                outcome.state, metrics = run_step(run, outcome.state, batches)
                outcome.step = step = int(outcome.state.step)
                pending.append(metrics)
                if _log_due(cfg, step, outcome.start_step):
                    outcome.losses.append(log_metrics(run, step, pending))
                    pending = []
                if _checkpoint_due(cfg, step):
                    save_checkpoint(run, outcome.state, step)
                if _stop_requested(interrupt, run.plan.dist):
                    outcome.interrupted = True
                    break
                if step < cfg.optim.steps and _validation_due(run, step):
                    validate(run, outcome.state, step)
    finally:
        batches.close()
    return outcome


def run_step(run: Run, state: TrainState, batches: Iterator[dict]) -> tuple[TrainState, dict]:
    """Fetch this step's micro-batches and take one optimizer step (a non-finite loss stops the run here)."""
    device = run.plan.dist.device
    micro_batches = [_to_device(next(batches), device) for _ in range(run.plan.cfg.optim.gradient_accumulation_steps)]
    try:
        state, metrics = train_step(state, micro_batches, run.ctx)
    except NonFiniteLossError as error:
        logger.error("%s. Stopping; the last checkpoint in %s is intact and resumable.", error,
                     run.plan.output_dir / "checkpoints")
        raise
    world = run.plan.dist.world_size
    run.monitor.end_step(int(state.step), num_samples=metrics["num_samples"] * world,
                         num_tokens=metrics["num_tokens"] * world)
    return state, metrics


def _log_due(cfg: TrainConfig, step: int, start_step: int) -> bool:
    return step % cfg.log.every == 0 or step == cfg.optim.steps or step == start_step + 1


def _checkpoint_due(cfg: TrainConfig, step: int) -> bool:
    interval = cfg.checkpoints.interval
    return bool(interval) and step % interval == 0 and step < cfg.optim.steps


def _validation_due(run: Run, step: int) -> bool:
    return run.validator is not None and run.validator.should_run(step)


def _stop_requested(interrupt: _Interrupt, dist: DistInfo) -> bool:
    """Whether any rank got Ctrl-C. Every rank must take the same branch (a rank leaving for the final save while
    another enters the next step's collectives would hang), so the flag is agreed across ranks."""
    return _any_rank(interrupt.requested, dist)


def log_metrics(run: Run, step: int, pending: list[dict]) -> float:
    """Reduce the steps since the last log and write them to TensorBoard and the console; returns the loss."""
    values = _reduce_metrics(pending, run.plan.dist)
    values.update(memory_metrics(run.plan.dist.device))
    run.monitor.log_scalars(step, values)
    return values["loss/train"]


def save_checkpoint(run: Run, state: TrainState, step: int) -> None:
    """A resumable checkpoint of the state and the data position (collective)."""
    cfg = run.plan.cfg
    run_checkpoint.save_checkpoint(run.plan.output_dir, step, state_to_dict(state),
                                   extra={"data": run.data.loader.state_dict()}, config=run.plan.config_dict,
                                   keep_last_n=cfg.checkpoints.keep_last_n)
    run.monitor.restart_timer()


def validate(run: Run, state: TrainState, step: int) -> None:
    """Sample the validation prompts (collective: every rank calls it); with ``validation.offload_optimizer`` the
    optimizer moments wait in host memory meanwhile."""
    plan = run.plan
    offload = plan.cfg.validation.offload_optimizer and not plan.fsdp
    restore = offload_to_host_(state.opt_state) if offload else None
    run.validator.run(step, run.model.transformer, text_processor=run.model.text_processor,
                      output_dir=plan.output_dir, monitor=run.monitor, rank=plan.dist.rank,
                      world_size=plan.dist.world_size)
    if restore is not None:
        restore()
    run.monitor.restart_timer()


def finish(run: Run, outcome: LoopOutcome) -> Path | None:
    """The final checkpoint; then, unless interrupted, the last validation and the weights export."""
    save_checkpoint(run, outcome.state, outcome.step)
    if outcome.interrupted:
        return None
    if _validation_due(run, outcome.step):
        validate(run, outcome.state, outcome.step)
    return export(run, outcome.step)


def main(cfg: TrainConfig, *, tx: GradientTransformation | None = None,
         strategy: Strategy | None = None) -> RunResult:
    """Run (or resume) training as configured; ``tx`` replaces the configured optimizer and ``strategy`` the
    configured strategy. Returns where the outputs are."""
    dist = init_distributed()
    setup_logging(dist.rank)
    try:
        run, state = build_run(cfg, dist, tx=tx, strategy=strategy)
        try:
            outcome = train_loop(run, state)
            export_path = finish(run, outcome)
        finally:
            run.monitor.close()
    finally:
        shutdown_distributed()
    return _report(run.plan, outcome, export_path)


def _report(plan: RunPlan, outcome: LoopOutcome, export_path: Path | None) -> RunResult:
    output_dir, losses = plan.output_dir, outcome.losses
    if plan.dist.is_main:
        if len(losses) > 1:
            logger.info("logged training loss went from %.4f (step %d) to %.4f (step %d)", losses[0],
                        outcome.start_step + 1, losses[-1], outcome.step)
        logger.info("run finished at step %d: checkpoints in %s, TensorBoard logs in %s%s", outcome.step,
                    output_dir / "checkpoints", output_dir / "tensorboard",
                    f", weights exported to {export_path}" if export_path else "")
    return RunResult(output_dir=output_dir, final_step=outcome.step, export_path=export_path,
                     tensorboard_dir=output_dir / "tensorboard", losses=tuple(losses),
                     interrupted=outcome.interrupted)


# -------------------------------------------------------------------------------------------------------------
# Signals, metrics and export helpers


class _Interrupt:
    """Turns the first Ctrl-C into a flag the loop checks after each step (it then saves and exits)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _Interrupt:
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            logger.warning("interrupt received: saving a checkpoint after this step (Ctrl-C again to abort)")

        try:
            self._previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _any_rank(flag: bool, dist_info: DistInfo) -> bool:
    """True if ``flag`` is set on any process (one tiny all-reduce when there are several)."""
    if dist_info.world_size == 1:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=dist_info.device)).item() > 0)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _reduce_metrics(pending: list[dict[str, torch.Tensor]], dist_info: DistInfo) -> dict[str, float]:
    """Average the steps since the last log over steps and processes (one collective, one host sync)."""
    keys = ["loss_sum", "video_loss_sum", "audio_loss_sum", "skipped"]
    scalars = torch.stack([torch.stack([m[k].float() for k in keys]) for m in pending]).mean(0)
    buckets = torch.stack([m["sigma_bucket_loss_sum"] for m in pending]).sum(0)
    counts = torch.stack([m["sigma_bucket_count"] for m in pending]).sum(0)
    packed = all_reduce_sum(torch.cat([scalars, buckets, counts]))
    world = dist_info.world_size
    values_list = packed.tolist()
    n = len(keys)
    out = {
        "loss/train": values_list[0] / world,
        "loss/video": values_list[1] / world,
        "loss/audio": values_list[2] / world,
        "train/skipped_steps": values_list[3] / world,
    }
    for i, name in enumerate(SIGMA_BUCKET_NAMES):
        count = values_list[n + len(SIGMA_BUCKET_NAMES) + i]
        if count > 0:
            out[f"loss/sigma_{name}"] = values_list[n + i] / count
    last = pending[-1] if pending else None
    if last is not None:
        if "grad_norm" in last:
            out["grad/global_norm"] = float(last["grad_norm"])
        if "lr" in last:
            out["lr"] = float(last["lr"])
    return out


def _gather_full(
    tensors: dict[str, torch.Tensor], *, keep: bool = True, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Full CPU copies of possibly sharded (DTensor) tensors, floating point ones cast to ``dtype``. A collective
    under FSDP (every rank calls it); ranks with ``keep=False`` drop each gathered tensor at once, so only the
    writer holds the whole model in host memory."""
    from torch.distributed.tensor import DTensor

    out = {}
    for key, t in tensors.items():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if keep:
            full = full.detach()
            if dtype is not None and full.is_floating_point():
                full = full.to(dtype)
            out[key] = full.cpu()
    return out


def export(run: Run, step: int) -> Path:
    """Write the trained weights for use outside ltxf: a LoRA in the ComfyUI / ltx-core layout (with the
    strategy's metadata), or a whole official checkpoint (the base file with the trained transformer, and trained
    connectors, in place). A LoRA run's trained text connectors go to their own official-layout file
    (``text_connectors_step_N.safetensors``). Collective under FSDP (parameters are gathered); rank 0 writes."""
    plan, model = run.plan, run.model
    cfg, is_main = plan.cfg, plan.dist.is_main
    dtype = DTYPES[cfg.checkpoints.export_dtype]
    exports = plan.output_dir / "exports"
    connectors: dict[str, torch.Tensor] = {}
    if cfg.model.train_connectors:
        text = model.text_processor
        connectors = {f"{name}_embeddings_connector.{k}": v for name in ("video", "audio")
                      for k, v in _gather_full(getattr(text, f"{name}_connector").state_dict()).items()}
    if plan.full:
        weights = _gather_full(model.transformer.state_dict(), keep=is_main, dtype=dtype)
        path = exports / f"model_weights_step_{step:06d}.safetensors"
        if is_main:
            # The base file (an LTX-2.5 pack's transformer file holds both connectors) gives every untrained
            # tensor and the metadata (model_version, gemma_source_checkpoint, license): a drop-in replacement.
            run_checkpoint.export_full_model(path, weights, model.checkpoint_config, dtype=dtype,
                                             base_checkpoint=cfg.model.checkpoint, connectors=connectors)
    else:
        weights = _gather_full(lora_state_dict(model.transformer))
        metadata = {"ltxf_step": str(step), **run.data.export_metadata}
        path = exports / f"lora_weights_step_{step:06d}.safetensors"
        if is_main:
            run_checkpoint.export_lora(path, weights, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dtype=dtype,
                                       metadata=metadata)
            if connectors:
                write_checkpoint(exports / f"text_connectors_step_{step:06d}.safetensors",
                                 {TRANSFORMER_PREFIX + k: v.to(dtype) for k, v in connectors.items()},
                                 model.checkpoint_config)
    barrier()
    return path
