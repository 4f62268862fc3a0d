"""The training run: wiring and the loop. ``train.py`` at the top of the repository calls :func:`main`.

Order of work: process group -> run directory and resolved config -> validation setup (prompt embedding with
Gemma, which is then freed, and the VAE decoders; see :mod:`ltxf.validation`) -> load the transformer and the text
connectors -> LoRA injection and freezing -> parallelize (AC, compile, FSDP2) -> optimizer and state -> data ->
resume -> loop (``train_step``, logging, checkpoints, validation samples) -> final checkpoint and export.

Validation samples at step 0 (unless ``validation.skip_initial_validation``, and not on a resumed run) and then
every ``validation.interval`` steps, after that step's checkpoint. Its randomness comes from its own seed, and
training's is derived from (seed, step, rank), so sampling leaves the training run exactly as it would be without.
"""

from __future__ import annotations

import json
import logging
import signal
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ltxf import checkpoint as run_checkpoint
from ltxf.config import TrainConfig, check_paths
from ltxf.data import BucketBatchSampler, PrecomputedDataset, ResumableLoader
from ltxf.lora import (
    LoraConfig,
    init_lora_parameters,
    inject_lora,
    load_lora_weights,
    lora_parameters,
    lora_state_dict,
)
from ltxf.models.checkpoint import TRANSFORMER_PREFIX, read_config, write_checkpoint
from ltxf.models.text import load_embeddings_processor
from ltxf.models.transformer import load_transformer
from ltxf.monitor import Monitor, memory_metrics
from ltxf.optim import adamw, adamw_8bit, chain, clip_by_global_norm, make_schedule
from ltxf.parallel import DistInfo, all_reduce_sum, barrier, init_distributed, parallelize, shutdown_distributed
from ltxf.rng import make_generator
from ltxf.state import TrainState, init_state, state_to_dict, trainable_parameters
from ltxf.step import SIGMA_BUCKET_NAMES, NonFiniteLossError, StepContext, train_step
from ltxf.validation import Validator, offload_to_host_

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True, kw_only=True)
class RunResult:
    """Where a finished (or interrupted) run left its outputs."""

    output_dir: Path
    final_step: int
    export_path: Path | None
    tensorboard_dir: Path
    losses: tuple[float, ...]
    interrupted: bool = False


def setup_logging(rank: int) -> None:
    prefix = "" if rank == 0 else f"[rank {rank}] "
    fmt = prefix + "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=fmt, force=True)


def build_optimizer(cfg: TrainConfig):
    """``clip -> AdamW (fp32 or 8-bit moments) with the learning-rate schedule``, optax style."""
    o = cfg.optim
    schedule = make_schedule(o.scheduler, o.learning_rate, o.steps, warmup_steps=o.warmup_steps,
                             **dict(o.scheduler_params))
    make = adamw_8bit if o.optimizer == "adamw8bit" else adamw
    core = make(schedule, b1=o.betas[0], b2=o.betas[1], eps=o.eps, weight_decay=o.weight_decay)
    return chain(clip_by_global_norm(o.max_grad_norm), core) if o.max_grad_norm > 0 else core


def apply_initial_lora(transformer: nn.Module, path: Path, lora: LoraConfig) -> None:
    """Start from a LoRA file (ltxf, ComfyUI or PEFT layout): its effective update ``scale_file * B @ A`` is
    kept exactly, whatever the alpha/rank convention of the file and of this run."""
    lora_file = run_checkpoint.load_lora_file(path)
    tensors = dict(lora_file.tensors)
    for module, scale in lora_file.scales.items():
        key = f"{module}.lora_B.weight"
        tensors[key] = tensors[key].float() * (scale / lora.scaling)
    load_lora_weights(transformer, tensors)
    logger.info("LoRA initialised from %s (%d modules)", path, len(lora_file.scales))


def _data_sources(cfg: TrainConfig) -> list[str] | dict[str, str]:
    if cfg.strategy.name == "flexible":
        from ltxf.strategies.flexible import data_sources

        return data_sources(cfg.strategy)
    sources = ["latents", "conditions"]
    if cfg.strategy.with_audio:
        sources.append("audio_latents")
    if cfg.strategy.name == "video_to_video":
        sources.append("reference_latents")
    return sources


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


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


def main(cfg: TrainConfig) -> RunResult:
    """Run (or resume) training as configured; returns where the outputs are."""
    dist_info = init_distributed()
    setup_logging(dist_info.rank)
    try:
        return _run(cfg, dist_info)
    finally:
        shutdown_distributed()


def _run(cfg: TrainConfig, dist_info: DistInfo) -> RunResult:
    output_dir = Path(cfg.output_dir).expanduser().resolve()
    if cfg.demo_model:
        from ltxf.demo import DemoAssets, build_demo_assets

        if dist_info.is_main:
            build_demo_assets(output_dir / "demo_assets", seed=cfg.seed)
        barrier()
        assets = DemoAssets.in_directory(output_dir / "demo_assets")
        # The demo model has its own tiny text widths, so only the demo's prompt features fit it.
        cfg = replace(cfg, model=replace(cfg.model, checkpoint=assets.checkpoint),
                      data=replace(cfg.data, root=assets.dataset),
                      validation=replace(cfg.validation, prompt_features_path=assets.prompt_features))
    check_paths(cfg)
    if cfg.strategy.name != "flexible":
        logger.warning("strategy.name=%r is the pre-1.2 strategy, kept so older configs run; the presets now use "
                       "'flexible' (README: Training modes)", cfg.strategy.name)
    output_dir.mkdir(parents=True, exist_ok=True)
    config_dict = cfg.to_dict()
    if dist_info.is_main:
        (output_dir / "config.json").write_text(json.dumps(config_dict, indent=2))

    device = dist_info.device
    compute_dtype = DTYPES[cfg.model.dtype]
    full = cfg.model.training_mode == "full"
    fsdp = cfg.parallel.data_parallel == "fsdp" or (cfg.parallel.data_parallel == "auto" and full
                                                    and dist_info.world_size > 1)
    # Full fine-tuning keeps fp32 master weights (FSDP2 casts to bf16 for compute; one process uses autocast).
    weights_dtype = torch.float32 if full else compute_dtype
    checkpoint_path = Path(cfg.model.checkpoint)
    model_config = read_config(checkpoint_path)

    if fsdp and cfg.model.train_connectors:
        raise ValueError("model.train_connectors is not supported with FSDP (parallel.data_parallel='fsdp', or "
                         "'auto' with full fine-tuning on several processes); use parallel.data_parallel="
                         "'replicate' or train the transformer only")

    validator = None
    if cfg.validation.enabled:
        # Before the transformer is loaded, so Gemma's memory peak (it is freed after embedding) does not stack
        # on the training model's.
        validator = Validator.build(cfg.validation, checkpoint=checkpoint_path, device=device, dtype=compute_dtype)
        if cfg.validation.offload_optimizer and fsdp:
            logger.warning("validation.offload_optimizer is ignored under FSDP (the optimizer state is sharded)")

    logger.info("loading the transformer from %s", checkpoint_path)
    transformer = load_transformer(checkpoint_path, dtype=weights_dtype, device=device)
    text_processor = load_embeddings_processor(checkpoint_path, dtype=compute_dtype, device=device,
                                               with_feature_extractor=False)
    transformer.requires_grad_(full)
    text_processor.requires_grad_(cfg.model.train_connectors)
    if cfg.model.train_connectors:
        text_processor.float()

    if not full:
        # Adapters (and their AdamW moments) stay fp32 on a bf16 base: bf16 moments cannot decay and small
        # updates round away.
        targets = inject_lora(transformer, cfg.lora, dtype=torch.float32)
        # Same derived seed on every rank: identical adapters with no broadcast.
        init_lora_parameters(transformer, make_generator(cfg.seed, 0, 0, "lora_init", device=device))
        if cfg.model.init_lora is not None:
            apply_initial_lora(transformer, cfg.model.init_lora, cfg.lora)
        logger.info("LoRA rank %d alpha %g on %d modules", cfg.lora.rank, cfg.lora.alpha, len(targets))
    parallelize(transformer, fsdp=fsdp, activation_checkpointing=cfg.parallel.activation_checkpointing,
                compile=cfg.parallel.compile, param_dtype=compute_dtype,
                reduce_dtype=DTYPES[cfg.parallel.reduce_dtype])
    transformer.train()

    params = lora_parameters(transformer) if not full else trainable_parameters(transformer)
    text_keys: tuple[str, ...] = ()
    if cfg.model.train_connectors:
        text_params = {f"text_processor.{k}": v for k, v in trainable_parameters(text_processor).items()}
        text_keys = tuple(sorted(text_params))
        params = {**params, **text_params}
    tx = build_optimizer(cfg)
    state = init_state(params, tx)
    num_trainable = sum(p.numel() for p in params.values())
    logger.info("trainable parameters: %s (%d tensors)", f"{num_trainable:,}", len(params))

    dataset = PrecomputedDataset(cfg.data.root, sources=_data_sources(cfg), skip_bad_samples=cfg.data.skip_bad_samples,
                                 text_length=cfg.data.text_length)
    reference_factor = _reference_downscale_factor(cfg, dataset)
    sampler = BucketBatchSampler(dataset.bucket_keys(), batch_size=cfg.optim.batch_size, seed=cfg.seed,
                                 rank=dist_info.rank, world_size=dist_info.world_size)
    loader = ResumableLoader(dataset, sampler, num_workers=cfg.data.num_workers,
                             pin_memory=device.type == "cuda")

    start_step = 0
    if not cfg.checkpoints.resume and run_checkpoint.latest_checkpoint(output_dir) is not None:
        raise ValueError(f"{output_dir} already holds checkpoints and checkpoints.resume is False: choose another "
                         "output_dir or remove its checkpoints/ folder")
    if cfg.checkpoints.resume:
        restored = run_checkpoint.resume_checkpoint(output_dir, state_to_dict(state), config=config_dict)
        if restored is not None:
            start_step = int(state.step)
            loader.load_state_dict(restored.extra["data"])
            logger.info("resuming at step %d", start_step)

    ctx = StepContext(transformer=transformer, text_processor=text_processor, tx=tx, cfg=cfg, dist=dist_info,
                      fsdp=fsdp, compute_dtype=compute_dtype, text_params=text_keys)
    monitor = Monitor(output_dir / "tensorboard", rank=dist_info.rank, total_steps=cfg.optim.steps,
                      console_every_s=cfg.log.console_every_s, purge_step=start_step + 1 if start_step else None)
    if start_step == 0:
        monitor.log_config(config_dict)

    def save(step: int) -> None:
        extra = {"data": loader.state_dict()}
        run_checkpoint.save_checkpoint(output_dir, step, state_to_dict(state), extra=extra, config=config_dict,
                                       keep_last_n=cfg.checkpoints.keep_last_n)

    def validate(step: int, state: TrainState) -> TrainState:
        """Sample the validation prompts (collective: every rank calls it); with ``validation.offload_optimizer``
        the optimizer moments wait in host memory meanwhile."""
        restore = offload_to_host_(state.opt_state) if cfg.validation.offload_optimizer and not fsdp else None
        validator.run(step, transformer, text_processor=text_processor, output_dir=output_dir, monitor=monitor,
                      rank=dist_info.rank, world_size=dist_info.world_size)
        if restore is not None:
            restore()
        monitor.restart_timer()
        return state

    losses: list[float] = []
    pending: list[dict[str, torch.Tensor]] = []
    interrupted = False
    batches = iter(loader)
    step = start_step
    try:
        with _Interrupt() as interrupt:
            if validator is not None and start_step == 0 and validator.should_run(0):
                state = validate(0, state)
            while step < cfg.optim.steps:
                micro_batches = [_to_device(next(batches), device)
                                 for _ in range(cfg.optim.gradient_accumulation_steps)]
                try:
                    state, metrics = train_step(state, micro_batches, ctx)
                except NonFiniteLossError as error:
                    logger.error("%s. Stopping; the last checkpoint in %s is intact and resumable.", error,
                                 output_dir / "checkpoints")
                    raise
                step = int(state.step)
                monitor.end_step(step, num_samples=metrics["num_samples"] * dist_info.world_size,
                                 num_tokens=metrics["num_tokens"] * dist_info.world_size)
                pending.append(metrics)
                if step % cfg.log.every == 0 or step == cfg.optim.steps or step == start_step + 1:
                    values = _reduce_metrics(pending, dist_info)
                    pending.clear()
                    losses.append(values["loss/train"])
                    values.update(memory_metrics(device))
                    monitor.log_scalars(step, values)
                interval = cfg.checkpoints.interval
                if interval and step % interval == 0 and step < cfg.optim.steps:
                    save(step)
                    monitor.restart_timer()
                # Every rank must take the same branch (a rank leaving for save() while another enters the next
                # step's collectives would hang): agree on the Ctrl-C flag.
                if _any_rank(interrupt.requested, dist_info):
                    interrupted = True
                    break
                if validator is not None and step < cfg.optim.steps and validator.should_run(step):
                    state = validate(step, state)

        save(step)
        if not interrupted and validator is not None and validator.should_run(step):
            state = validate(step, state)
        export_path = None
        if not interrupted:
            export_path = export_weights(cfg, transformer, text_processor, model_config, output_dir, step,
                                         dist_info, full=full, reference_factor=reference_factor)
    finally:
        batches.close()
        monitor.close()
    if dist_info.is_main:
        if len(losses) > 1:
            logger.info("logged training loss went from %.4f (step %d) to %.4f (step %d)", losses[0],
                        start_step + 1, losses[-1], step)
        logger.info("run finished at step %d: checkpoints in %s, TensorBoard logs in %s%s", step,
                    output_dir / "checkpoints", output_dir / "tensorboard",
                    f", weights exported to {export_path}" if export_path else "")
    return RunResult(output_dir=output_dir, final_step=step, export_path=export_path,
                     tensorboard_dir=output_dir / "tensorboard", losses=tuple(losses), interrupted=interrupted)


def _any_rank(flag: bool, dist_info: DistInfo) -> bool:
    """True if ``flag`` is set on any process (one tiny all-reduce when there are several)."""
    if dist_info.world_size == 1:
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=dist_info.device)).item() > 0)


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


def export_weights(
    cfg: TrainConfig,
    transformer: nn.Module,
    text_processor: nn.Module,
    model_config: dict,
    output_dir: Path,
    step: int,
    dist_info: DistInfo,
    *,
    full: bool,
    reference_factor: int | dict[str, str] | None = None,
) -> Path | None:
    """Write the trained weights for use outside ltxf: a ComfyUI-layout LoRA, or an official-layout checkpoint;
    trained text connectors go to their own official-layout file (``text_connectors_step_N.safetensors``).

    Collective under FSDP (parameters are gathered); only rank 0 writes.
    """
    dtype = DTYPES[cfg.checkpoints.export_dtype]
    exports = output_dir / "exports"
    if full:
        weights = _gather_full(transformer.state_dict(), keep=dist_info.is_main, dtype=dtype)
        path = exports / f"model_weights_step_{step:06d}.safetensors"
        if dist_info.is_main:
            run_checkpoint.export_full_model(path, weights, model_config, dtype=dtype)
    else:
        weights = _gather_full(lora_state_dict(transformer))
        metadata = {"ltxf_step": str(step), "ltxf_strategy": cfg.strategy.name}
        if isinstance(reference_factor, dict):
            metadata.update(reference_factor)
        elif reference_factor is not None:
            metadata["reference_downscale_factor"] = str(reference_factor)
        path = exports / f"lora_weights_step_{step:06d}.safetensors"
        if dist_info.is_main:
            run_checkpoint.export_lora(path, weights, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dtype=dtype,
                                       metadata=metadata)
    if cfg.model.train_connectors:
        connectors = {f"{name}_embeddings_connector.{k}": v for name in ("video", "audio")
                      for k, v in _gather_full(getattr(text_processor, f"{name}_connector").state_dict()).items()}
        if dist_info.is_main:
            write_checkpoint(exports / f"text_connectors_step_{step:06d}.safetensors",
                             {TRANSFORMER_PREFIX + k: v.to(dtype) for k, v in connectors.items()}, model_config)
    barrier()
    return path


def _reference_downscale_factor(cfg: TrainConfig, dataset: PrecomputedDataset) -> int | dict[str, str] | None:
    """IC-LoRA: the reference downscale factor of the dataset (one value per run), for the LoRA metadata; the
    flexible strategy gives its metadata entries (see :func:`ltxf.strategies.flexible.reference_metadata`)."""
    if cfg.strategy.name == "flexible":
        from ltxf.strategies.flexible import reference_metadata

        return reference_metadata(cfg.strategy, dataset.samples)
    if cfg.strategy.name != "video_to_video":
        return None
    from ltxf.strategies.video_to_video import reference_downscale_factor

    factors = {reference_downscale_factor(info.video_shape, info.reference_shape) for info in dataset.samples}
    if len(factors) != 1:
        raise ValueError(f"the dataset mixes reference downscale factors {sorted(factors)}; use one per run")
    return factors.pop()
