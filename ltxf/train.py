"""The training run as named steps; ``train.py`` at the top of the repository calls :func:`main`.

A script can call the steps one by one (``tests/test_train.py`` and ``experiments/`` do)::

    dist = init_distributed()
    plan = plan_run(cfg, dist)                    # run directory, resolved config, dtypes, FSDP or not
    strategy = build_strategy(cfg)                # or any object following ltxf.strategies.base.Strategy
    data = build_data(plan, strategy)             # dataset (checked against the checkpoint's header), loader
    validator = build_validator(plan)             # before the model: Gemma's peak does not stack on it
    model = build_model(plan)                     # transformer + connectors, LoRA, AC / compile / FSDP2
    params = build_trainables(plan, model)        # the trainable tensors, keyed by state-dict name
    state = init_or_resume(plan, params, tx, data, log_window)  # step 0, or restored from the newest checkpoint
    run = Run(plan=plan, model=model, ...)         # (see build_run)
    outcome = train_loop(run, state)              # steps, logging, checkpoints, validation, SIGINT/SIGTERM
    export_path = finish(run, outcome)            # final checkpoint, last validation, weights export

Validation samples at step 0 (unless ``validation.skip_initial_validation``, and not on a resumed run) and then
every ``validation.interval`` steps, after that step's checkpoint. Its randomness comes from its own seed, and
training's is derived from (seed, step, sample index), so sampling leaves the training run exactly as it would be
without.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ltxf import checkpoint as run_checkpoint
from ltxf.block_swap import apply_block_swap, offload_text_connectors
from ltxf.config import LoraConfig, TrainConfig, check_paths, torch_dtype
from ltxf.data import AUDIO_FREQUENCY_BINS, BucketBatchSampler, PrecomputedDataset, ResumableLoader
from ltxf.data_check import check_dataset_fits_model, read_model_inputs
from ltxf.faults import StopSignals, TrainingStopped, any_rank, describe_samples, gather_objects
from ltxf.lora import (
    check_lora_tensors,
    init_lora_parameters,
    inject_lora,
    is_lora_key,
    load_lora_weights,
    lora_parameters,
    lora_state_dict,
)
from ltxf.lora_formats import linear_shapes, load_lora_file, match_lora
from ltxf.models.checkpoint import TRANSFORMER_PREFIX, list_keys, read_config, write_checkpoint
from ltxf.models.materialize import TensorTransform, UnitCallback
from ltxf.models.pack import (
    ModelPack,
    check_conditions_text_encoder,
    check_gemma_pairing,
    expected_text_encoder,
    resolve_pack,
)
from ltxf.models.text import build_embeddings_processor_on_meta, load_embeddings_processor_weights_
from ltxf.models.transformer import build_transformer_on_meta, load_transformer_weights_
from ltxf.monitor import LogWindow, Monitor, log_due, memory_metrics
from ltxf.optim import GradientTransformation, adamw, adamw_8bit, chain, clip_by_global_norm, make_schedule
from ltxf.parallel import (
    DistInfo,
    barrier,
    build_mesh,
    checkpointed_blocks,
    init_distributed,
    parallelize,
    parallelize_text_connectors,
    shutdown_distributed,
)
from ltxf.quantization import is_fp8_checkpoint, load_quantized_weights_, quantize_on_meta_
from ltxf.rng import make_generator
from ltxf.state import TrainState, init_state, state_to_dict, trainable_parameters
from ltxf.step import TEXT_PARAM_PREFIX, NonFiniteLossError, StepContext, train_step
from ltxf.strategies.base import Strategy
from ltxf.strategies.registry import build_strategy
from ltxf.validation import Validator, offload_to_host_

logger = logging.getLogger(__name__)



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
    """Stopped by SIGINT/SIGTERM (``train.py`` then exits with ``ltxf.faults.EXIT_INTERRUPTED``)."""
    skipped_steps: int = 0
    """Steps whose update was skipped for a non-finite loss (``nonfinite_loss='skip'``), resumes included."""


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
    mesh: DeviceMesh | None
    """The (replicate x shard) data-parallel mesh of FSDP2 (:mod:`ltxf.parallel`); None: a plain one-process model."""

    @property
    def fsdp(self) -> bool:
        """The model is under FSDP2 (sharded, replicated or both): gradients are reduced by its hooks."""
        return self.mesh is not None



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
    log_window: LogWindow
    """The training metrics since the last log (checkpointed, so a resumed run logs the same windows)."""
    validator: Validator | None = None
    stop: StopSignals | None = None
    """The stop-signal handler :func:`main` installed; None: :func:`train_loop` installs its own."""


@dataclass(kw_only=True)
class LoopOutcome:
    """How the loop ended: the state, the last step and the logged training losses."""

    state: TrainState
    step: int
    start_step: int
    losses: list[float] = field(default_factory=list)
    """The training loss of each logging window, in order."""
    logged_steps: list[int] = field(default_factory=list)
    """The step each logging window ended at."""
    interrupted: bool = False
    saved_step: int = 0
    """The step of the newest checkpoint (the start step: a fresh or resumed state needs no new one)."""
    skipped_steps: int = 0


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
    mesh = build_data_parallel_mesh(cfg, dist)
    if cfg.parallel.blocks_to_swap:
        if full or mesh is not None or cfg.parallel.compile:
            raise ValueError("parallel.blocks_to_swap swaps the frozen base of a one-process LoRA run; it does not "
                             "combine with full fine-tuning, several processes or parallel.data_parallel='fsdp' "
                             "(FSDP2), or parallel.compile")
        if not cfg.parallel.activation_checkpointing:
            logger.warning("parallel.blocks_to_swap without activation checkpointing saves no memory: the forward "
                           "keeps every block's weights for its backward")
    if cfg.parallel.offload_text_connectors and cfg.model.train_connectors:
        raise ValueError("parallel.offload_text_connectors keeps frozen connectors on the host; it does not "
                         "combine with model.train_connectors")
    if cfg.model.train_connectors and not full:
        logger.warning("model.train_connectors with a LoRA: the trained connectors are exported to their own file "
                       "(exports/text_connectors_step_N.safetensors) that only ltxf reads; ComfyUI, ltx-pipelines "
                       "and diffusers will apply the LoRA with the base model's connectors. Full fine-tunes merge "
                       "them into the exported checkpoint.")
    output_dir = Path(cfg.output_dir).expanduser().resolve()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, no permission, a read-only or full disk
        raise ValueError(f"output_dir: cannot create {output_dir} ({exc.strerror or exc}"
                         f"{': ' + str(exc.filename) if exc.filename else ''})") from exc
    config_dict = cfg.to_dict()
    if dist.is_main:
        (output_dir / "config.json").write_text(json.dumps(config_dict, indent=2))
    if cfg.validation.enabled and cfg.validation.offload_optimizer and mesh is not None:
        logger.warning("validation.offload_optimizer is ignored under FSDP2 (several processes, or "
                       "parallel.data_parallel='fsdp')")
    return RunPlan(cfg=cfg, dist=dist, output_dir=output_dir, config_dict=config_dict,
                   compute_dtype=torch_dtype(cfg.model.dtype), full=full, mesh=mesh)


def build_data_parallel_mesh(cfg: TrainConfig, dist: DistInfo) -> DeviceMesh | None:
    """The (replicate x shard) mesh of this run (:mod:`ltxf.parallel`), or None for a plain one-process run:
    'fsdp' shards over ``parallel.shard_size`` processes (default all), 'replicate' over 1, 'auto' is 'fsdp' for
    full fine-tuning and 'replicate' for LoRA."""
    mode = cfg.parallel.data_parallel
    if dist.world_size == 1 and mode != "fsdp":
        return None
    sharded = mode == "fsdp" or (mode == "auto" and cfg.model.training_mode == "full")
    shard_size = cfg.parallel.shard_size or (dist.world_size if sharded else 1)
    return build_mesh(dist.world_size, shard_size, dist.device)


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


def build_model(plan: RunPlan, *, transform: TensorTransform | None = None, on_unit: UnitCallback | None = None
                ) -> Model:
    """The transformer and the text connectors, created on meta, shaped for training, then loaded: the one place
    weights are loaded.

    On the meta device (no weight exists yet): build from the checkpoint's config -> quantized layers in place of
    the frozen Linears (``model.quantization``, or an official fp8 file) -> freeze what does not train, inject
    LoRA -> activation checkpointing, compile and FSDP2 on the run's mesh (:func:`ltxf.parallel.parallelize`).
    Then each rank reads from the file only the tensors it holds, block by block, cast to their dtype on the way
    (:mod:`ltxf.models.materialize`), and the adapters are initialised from the derived seed (the same on every
    rank; each keeps its shard). Full fine-tuning keeps fp32 master weights (FSDP2 casts to the compute dtype; one
    process uses autocast); adapters stay fp32 on a base in the compute dtype.

    Two loaders assign plain tensors, so they run before FSDP2 wraps the parameters: a quantized base (each block
    quantized as it is read, :func:`ltxf.quantization.load_quantized_weights_`; the codes are replicated buffers
    anyway) and ``parallel.blocks_to_swap`` (the base is read to the host and
    :func:`ltxf.block_swap.apply_block_swap` moves all but the swapped blocks' frozen weights to the device; its
    hooks go on before checkpointing wraps the blocks).

    ``transform(name, tensor)`` and ``on_unit(unit_name, module)`` are the plain loader's hooks for the transformer
    (contract in :mod:`ltxf.models.materialize`).
    """
    cfg, device = plan.cfg, plan.dist.device
    pack = model_pack(cfg)
    path = pack.transformer
    swap = cfg.parallel.blocks_to_swap
    weights_dtype = torch.float32 if plan.full else plan.compute_dtype
    quantized = cfg.model.quantization != "none" or is_fp8_checkpoint(list_keys(path))
    logger.info("loading the transformer from %s", path)
    transformer = build_transformer_on_meta(path).to(weights_dtype)
    if quantized:
        # Full fine-tuning trains every weight: an official fp8 file is dequantized to the fp32 masters.
        quantize_on_meta_(transformer, path, cfg.model.quantization, dequantize_fp8=plan.full)
    transformer.requires_grad_(plan.full)
    if not plan.full:
        # fp32 adapters (and AdamW moments): bf16 moments cannot decay and small updates round away.
        targets = inject_lora(transformer, cfg.lora, dtype=torch.float32)
        logger.info("LoRA rank %d alpha %g on %d modules", cfg.lora.rank, cfg.lora.alpha, len(targets))
    load_first = bool(swap) or quantized
    if not load_first:
        _parallelize_transformer(transformer, plan)
    load_device = torch.device("cpu") if swap else device
    if quantized:
        load_quantized_weights_(transformer, path, dtype=weights_dtype, device=load_device)
    else:
        load_transformer_weights_(transformer, path, device=load_device, not_in_file=is_lora_key, transform=transform,
                                  on_unit=on_unit)
    if swap:
        apply_block_swap(transformer, swap, device)
    if load_first:
        _parallelize_transformer(transformer, plan)
    if not plan.full:
        # Same derived seed on every rank: identical adapters with no broadcast.
        init_lora_parameters(transformer, make_generator(cfg.seed, 0, 0, "lora_init", device=device))
        if cfg.model.init_lora is not None:
            apply_initial_lora(transformer, cfg.model.init_lora, cfg.lora)
    transformer.train()
    return Model(transformer=transformer, text_processor=build_text_connectors(plan, path),
                 checkpoint_config=read_config(path), pack=pack)


def build_text_connectors(plan: RunPlan, path: Path) -> nn.Module:
    """The text connectors (no feature extractor: training reads cached features), created on meta and loaded
    like the transformer; trained ones are an FSDP2 unit on the run's mesh, frozen ones may live on the host
    (``parallel.offload_text_connectors``)."""
    cfg, device = plan.cfg, plan.dist.device
    trained = cfg.model.train_connectors
    text_processor = build_embeddings_processor_on_meta(path, with_feature_extractor=False)
    text_processor.to(torch.float32 if trained else plan.compute_dtype).requires_grad_(trained)
    if trained:
        parallelize_text_connectors(text_processor, mesh=plan.mesh, reduce_dtype=torch_dtype(cfg.parallel.reduce_dtype))
    offload_text = cfg.parallel.offload_text_connectors
    load_embeddings_processor_weights_(text_processor, path, device=torch.device("cpu") if offload_text else device)
    if offload_text:
        offload_text_connectors(text_processor, device)
    return text_processor.eval()


def _parallelize_transformer(transformer: nn.Module, plan: RunPlan) -> None:
    """Activation checkpointing (the selected blocks), compile and FSDP2 on the run's mesh."""
    par = plan.cfg.parallel
    blocks = checkpointed_blocks(len(transformer.transformer_blocks), every=par.checkpoint_every,
                                 first=par.checkpoint_first)
    parallelize(transformer, mesh=plan.mesh, activation_checkpointing=par.activation_checkpointing,
                checkpoint_blocks=blocks, compile=par.compile, param_dtype=plan.compute_dtype,
                reduce_dtype=torch_dtype(par.reduce_dtype))


def apply_initial_lora(transformer: nn.Module, path: Path, lora: LoraConfig) -> None:
    """Start from a LoRA file (any layout :mod:`ltxf.lora_formats` reads): its effective update
    ``scale_file * B @ A`` is kept exactly, whatever the alpha/rank convention of the file and of this run."""
    try:
        lora_file = match_lora(load_lora_file(path), linear_shapes(transformer), source=path)
    except ValueError as exc:
        raise ValueError(f"--model.init_lora: {exc}") from exc
    expected = {key: tuple(p.shape) for key, p in lora_parameters(transformer).items()}
    check_lora_tensors(expected, lora_file.tensors, source=f"--model.init_lora {path}")
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
    """The dataset the strategy reads, a resumable bucketed loader over it, and the export metadata.

    Scanned and checked against the checkpoint's config (its header only, :mod:`ltxf.data_check`), so call it
    before :func:`build_model`: a dataset made for another model then fails in seconds, naming the file."""
    cfg, dist = plan.cfg, plan.dist
    sources = strategy.data_sources()  # folder names (role = folder), or a mapping role -> folder
    sources = dict(sources) if isinstance(sources, Mapping) else list(sources)
    # Latent and text widths from the checkpoint's config (LTX: 128 video, 8 x 16 audio; the tiny 2.5 pack: 4, 2 x 16)
    model_inputs = read_model_inputs(cfg.model.checkpoint)
    dataset = PrecomputedDataset(cfg.data.root, sources=sources, skip_bad_samples=cfg.data.skip_bad_samples,
                                 text_length=cfg.data.text_length, latent_channels=model_inputs.latent_channels,
                                 audio_latent_channels=model_inputs.audio_in_channels // AUDIO_FREQUENCY_BINS,
                                 check_finite=cfg.data.check_finite)
    check_dataset_fits_model(dataset.samples, model_inputs, with_audio="audio_latents" in sources,
                             reference="reference_latents" in sources)
    # Features of another Gemma have the same shapes (LTX-2.3 vs 2.5): refuse files tagged for another encoder.
    check_conditions_text_encoder([s.files["conditions"] for s in dataset.samples if "conditions" in s.files],
                                  expected_text_encoder(cfg.model.checkpoint))
    sampler = BucketBatchSampler(dataset.bucket_keys(), batch_size=cfg.optim.batch_size, seed=cfg.seed,
                                 rank=dist.rank, world_size=dist.world_size)
    loader = ResumableLoader(dataset, sampler, num_workers=cfg.data.num_workers,
                             pin_memory=dist.device.type == "cuda")
    return Data(dataset=dataset, loader=loader, export_metadata=strategy.export_metadata(dataset.samples))


def init_or_resume(plan: RunPlan, params: dict[str, torch.Tensor], tx: GradientTransformation, data: Data,
                   log_window: LogWindow | None = None) -> TrainState:
    """A fresh state over ``params``, or (``checkpoints.resume``) the newest checkpoint's state loaded into it in
    place, with the data position (and the open logging window) restored."""
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
        if log_window is not None:
            log_window.load_state_dict(restored.extra.get("log_window", []))
        logger.info("resuming at step %d", int(state.step))
    return state


def build_run(
    cfg: TrainConfig, dist: DistInfo, *, tx: GradientTransformation | None = None, strategy: Strategy | None = None
) -> tuple[Run, TrainState]:
    """Every build step in order; returns the run and its (fresh or resumed) state."""
    plan = plan_run(cfg, dist)
    strategy = strategy if strategy is not None else build_strategy(cfg)
    data = build_data(plan, strategy)  # before any weight is loaded: the data is checked against the checkpoint
    validator = build_validator(plan)
    model = build_model(plan)
    params = build_trainables(plan, model)
    tx = tx if tx is not None else build_optimizer(cfg)
    log_window = LogWindow(dist.world_size)
    state = init_or_resume(plan, params, tx, data, log_window)
    start_step = int(state.step)
    text_keys = tuple(k for k in state.params if k.startswith(TEXT_PARAM_PREFIX))
    ctx = StepContext(transformer=model.transformer, text_processor=model.text_processor, tx=tx, cfg=cfg,
                      strategy=strategy, dist=dist, fsdp=plan.fsdp, compute_dtype=plan.compute_dtype,
                      text_params=text_keys)
    monitor = Monitor(plan.output_dir / "tensorboard", rank=dist.rank, total_steps=cfg.optim.steps,
                      console_every_s=cfg.log.console_every_s, purge_step=start_step + 1 if start_step else None)
    if start_step == 0:
        monitor.log_config(plan.config_dict)
    run = Run(plan=plan, model=model, data=data, ctx=ctx, monitor=monitor, log_window=log_window,
              validator=validator)
    return run, state


# -------------------------------------------------------------------------------------------------------------
# The loop


def train_loop(run: Run, state: TrainState) -> LoopOutcome:
    """Train from ``state.step`` to ``optim.steps``: step, log, checkpoint, validate. A stop signal (SIGINT,
    SIGTERM; :mod:`ltxf.faults`) on any rank stops every rank before the next step (see :func:`finish` for the
    final checkpoint and export); skipped non-finite steps are warned about, counted and limited."""
    cfg = run.plan.cfg
    start = int(state.step)
    outcome = LoopOutcome(state=state, step=start, start_step=start, saved_step=start,
                          skipped_steps=_resumed_skipped_steps(run, start))
    batches = iter(run.data.loader)
    try:
        with contextlib.ExitStack() as stack:
            stop = run.stop if run.stop is not None else stack.enter_context(StopSignals())
            run = replace(run, stop=stop)
            stack.enter_context(stop.deferring())
            if outcome.start_step == 0 and _validation_due(run, 0):
                validate(run, outcome.state, 0)
            while outcome.step < cfg.optim.steps:
                if _stop_requested(run):
                    outcome.interrupted = True
                    break
                outcome.state, metrics = run_step(run, outcome.state, batches)
                outcome.step = step = int(outcome.state.step)
                if metrics.get("nonfinite_samples"):
                    outcome.skipped_steps += 1
                    _skipped_step(run, step, metrics["nonfinite_samples"], outcome.skipped_steps)
                run.log_window.add(metrics)
                if log_due(step, cfg.log.every, cfg.optim.steps):
                    outcome.losses.append(log_metrics(run, step))
                    outcome.logged_steps.append(step)
                if _checkpoint_due(cfg, step):
                    save_checkpoint(run, outcome, step)
                if step < cfg.optim.steps and _validation_due(run, step):
                    validate(run, outcome.state, step)
    finally:
        batches.close()
    return outcome


def run_step(run: Run, state: TrainState, batches: Iterator[dict]) -> tuple[TrainState, dict]:
    """Fetch this step's micro-batches and take one optimizer step (a non-finite loss stops the run here, naming
    the sample files of every rank)."""
    device = run.plan.dist.device
    micro_batches = [_to_device(next(batches), device) for _ in range(run.plan.cfg.optim.gradient_accumulation_steps)]
    try:
        state, metrics = train_step(state, micro_batches, run.ctx)
    except NonFiniteLossError as error:
        # Every rank stops at the same step (the gradient norm that decides it is reduced across ranks).
        culprits = [sample for samples in gather_objects(error.sample_ids) for sample in samples]
        raise NonFiniteLossError(
            f"{error}. Samples: {describe_samples(culprits, run.data.dataset.samples)}. Stopped; the last checkpoint "
            f"in {run.plan.output_dir / 'checkpoints'} is intact and resumable: fix or remove these samples first "
            "(a resumed run replays the same batch), or set --nonfinite_loss skip",
            step=error.step, sample_ids=culprits) from error
    world = run.plan.dist.world_size
    run.monitor.end_step(int(state.step), num_samples=metrics["num_samples"] * world,
                         num_tokens=metrics["num_tokens"] * world)
    return state, metrics


def _skipped_step(run: Run, step: int, sample_ids: list[str], skipped: int) -> None:
    """Warn about a skipped update (each rank names its own samples); stop past ``max_skipped_steps``."""
    limit = run.plan.cfg.max_skipped_steps
    samples = describe_samples(sample_ids, run.data.dataset.samples)
    logger.warning("step %d: update SKIPPED, non-finite loss or gradient (nonfinite_loss='skip'; %d skipped so far, "
                   "limit %s); samples: %s", step, skipped, limit, samples)
    if limit is not None and skipped > limit:
        raise TrainingStopped(
            f"{skipped} steps were skipped for non-finite values, more than max_skipped_steps={limit}: stopping. "
            f"The last checkpoint in {run.plan.output_dir / 'checkpoints'} is intact; the warnings above name the "
            "samples of each skipped step. Fix or remove them, or raise --max_skipped_steps")


def _resumed_skipped_steps(run: Run, start_step: int) -> int:
    """The skipped-step count saved with the checkpoint this run resumed from (0 for a fresh run)."""
    if start_step == 0:
        return 0
    path = run_checkpoint.checkpoint_path(run.plan.output_dir, start_step)
    return int(run_checkpoint.read_checkpoint_metadata(path).get("extra", {}).get("skipped_steps", 0))
def _checkpoint_due(cfg: TrainConfig, step: int) -> bool:
    interval = cfg.checkpoints.interval
    return bool(interval) and step % interval == 0 and step < cfg.optim.steps


def _validation_due(run: Run, step: int) -> bool:
    return run.validator is not None and run.validator.should_run(step)


def _stop_requested(run: Run) -> bool:
    """Whether any rank got a stop signal. Every rank must take the same branch (a rank leaving for the final save
    while another enters the next step's collectives would hang), so the flag is agreed across ranks."""
    return any_rank(run.stop is not None and run.stop.requested is not None, run.plan.dist.device)


def log_metrics(run: Run, step: int) -> float:
    """Summarise the logging window ending at ``step`` (means over its steps and processes) and write it to
    TensorBoard and the console; returns the training loss."""
    values = run.log_window.summarize()
    values.update(memory_metrics(run.plan.dist.device))
    run.monitor.log_scalars(step, values)
    return values["loss/train"]


def save_checkpoint(run: Run, outcome: LoopOutcome, step: int) -> None:
    """A resumable checkpoint of the state, the data position and the skipped-step count (collective). A stop
    signal meanwhile is only logged: the save finishes."""
    cfg = run.plan.cfg
    extra = {"data": run.data.loader.state_dict(), "log_window": run.log_window.state_dict(),
             "skipped_steps": outcome.skipped_steps}
    with run.stop.saving() if run.stop is not None else contextlib.nullcontext():
        run_checkpoint.save_checkpoint(run.plan.output_dir, step, state_to_dict(outcome.state), extra=extra,
                                       config=run.plan.config_dict, keep_last_n=cfg.checkpoints.keep_last_n)
    outcome.saved_step = step
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
    """The final checkpoint (unless no step ran since the last one); then, unless a stop signal came (before or
    during it), the last validation and the weights export."""
    if outcome.step != outcome.saved_step:
        save_checkpoint(run, outcome, outcome.step)
    outcome.interrupted = outcome.interrupted or _stop_requested(run)
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
    # SIGINT/SIGTERM: at once while building (nothing to save yet), after the current step inside the loop, with
    # a checkpoint (ltxf.faults).
    with StopSignals() as stop:
        try:
            run, state = build_run(cfg, dist, tx=tx, strategy=strategy)
            run = replace(run, stop=stop)
            try:
                outcome = train_loop(run, state)
                with stop.deferring():  # a signal during the final save, validation or export stops after it
                    export_path = finish(run, outcome)
            finally:
                run.monitor.close()
        finally:
            shutdown_distributed()
    return _report(run, outcome, export_path)


def _report(run: Run, outcome: LoopOutcome, export_path: Path | None) -> RunResult:
    plan = run.plan
    output_dir, losses, step = plan.output_dir, outcome.losses, outcome.step
    if plan.dist.is_main:
        if len(losses) > 1:
            logger.info("logged training loss went from %.4f (step %d) to %.4f (step %d)", losses[0],
                        outcome.logged_steps[0], losses[-1], outcome.logged_steps[-1])
        if outcome.skipped_steps:
            logger.warning("%d of %d steps were skipped for non-finite values (nonfinite_loss='skip'); the warnings "
                           "above name the samples of each", outcome.skipped_steps, step)
        if outcome.interrupted:
            saved = run_checkpoint.checkpoint_path(output_dir, step)
            where = f"checkpoint saved to {saved}" if step > 0 and saved.is_dir() else "no step ran, nothing to save"
            logger.warning("run INTERRUPTED (%s) at step %d of %d: %s. Run the same command again to resume.",
                           (run.stop and run.stop.requested) or "stop signal on another rank", step,
                           plan.cfg.optim.steps, where)
        else:
            logger.info("run finished at step %d: checkpoints in %s, TensorBoard logs in %s%s", step,
                        output_dir / "checkpoints", output_dir / "tensorboard",
                        f", weights exported to {export_path}" if export_path else "")
    return RunResult(output_dir=output_dir, final_step=step, export_path=export_path,
                     tensorboard_dir=output_dir / "tensorboard", losses=tuple(losses),
                     interrupted=outcome.interrupted, skipped_steps=outcome.skipped_steps)


# -------------------------------------------------------------------------------------------------------------
# Signals, metrics and export helpers


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


def export(run: Run, step: int) -> Path:
    """Write the trained weights for use outside ltxf: a LoRA in the ComfyUI / ltx-core layout (with the
    strategy's metadata), or a whole official checkpoint (the base file with the trained transformer, and trained
    connectors, in place). A LoRA run's trained text connectors go to their own official-layout file
    (``text_connectors_step_N.safetensors``). Collective under FSDP (parameters are gathered); rank 0 writes."""
    plan, model = run.plan, run.model
    cfg, is_main = plan.cfg, plan.dist.is_main
    dtype = torch_dtype(cfg.checkpoints.export_dtype)
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
