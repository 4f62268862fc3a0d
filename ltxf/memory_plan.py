"""The device-memory plan of a training run, from its config and a model config alone (no weights read).

Components (bytes on one device, batch ``optim.batch_size``, one process or replicated data parallel):

- ``transformer weights``: counted exactly on a ``meta`` model built from the model config, with the run's base dtype
  and quantization (:func:`ltxf.quantization.quantize_model_` on meta gives the codes' and scales' shapes). With
  ``parallel.blocks_to_swap N``: N blocks' frozen weights live in host memory, two of them in flight on the device.
- ``text connectors``: the video and audio embeddings connectors (counted on meta), when kept on the device.
- ``trainable + grads`` and ``optimizer state``: the LoRA adapters (fp32 master weights and gradients; AdamW's two
  fp32 moments, or 8-bit moments with one fp32 scale per 256) or, for full fine-tuning, every transformer weight.
- ``activations``: saved-for-backward bytes from per-token-per-block constants measured at real width on CPU with
  saved-tensor hooks (:data:`SAVED_BYTES_PER_BLOCK`), times the tokens of the resolution; with activation
  checkpointing each checkpointed block keeps only its two stream inputs and one block is recomputed at a time.
  Plus what the output heads save, and the per-forward stream inputs (RoPE tables, text context).
- ``backward workspace``: gradients in flight through the block being back-propagated and the dequantized weight
  of the largest quantized layer (an estimate; ``tools/gpu_check.py`` compares the total with a CUDA peak).
- ``batch``: the latents and text features of one batch.
- ``CUDA context``: about 2 GiB (CUDA context, cuBLAS workspaces, allocator slack), stated, not measured.

The token counts: video ``(W/32)(H/32)((F-1)/8+1)``, audio ``round(F/fps * 25)`` latent frames, text
``data.text_length`` (1024).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ltxf.latents import audio_latent_length, video_latent_size

GIB = 2**30
CUDA_CONTEXT_BYTES = 2 * GIB
"""CUDA context, cuBLAS/cuDNN workspaces and allocator fragmentation: about 2 GiB on H100-class cards (stated)."""

OPTIMIZER_8BIT_BLOCK = 256

# Saved-for-backward bytes of ONE transformer block, bf16 compute, batch 1, measured at real width (LTX-2.3 22B:
# video width 4096, audio 2048) on the CPU with saved-tensor hooks (unique storages, parameters and the per-forward
# stream inputs excluded, the block's two inputs included). ``per_video_token`` / ``per_audio_token`` are slopes
# over two token counts; ``per_text_token`` is the slope of the constant over two text lengths (32 and 160);
# ``constant`` the rest. Modes: ``lora`` (rank 32 on to_q/to_k/to_v/to_out.0, fp32 adapters under bf16 autocast),
# ``full`` (every block weight trainable), ``floor`` (no trainable weight in the block, input needs a gradient).
# Measured (lean LoRA autograd) with:
#   OMP_NUM_THREADS=1 python tools/bench_memory.py --model-config ../shared/reference/configs/ltx-2.3-22b-config.json \
#       --json --modes lora full floor [--text-tokens 160]
# (per_text_token = difference of the two runs' constants / 128; constant = the 32-token run's minus 32 of them).
SAVED_BYTES_PER_BLOCK: dict[str, dict[str, float]] = {
    "lora": {"per_video_token": 198056.0, "per_audio_token": 112040.0, "per_text_token": 49416.0,
             "constant": 8753152.0},
    "full": {"per_video_token": 291624.0, "per_audio_token": 160552.0, "per_text_token": 49160.0,
             "constant": 626688.0},
    "floor": {"per_video_token": 164648.0, "per_audio_token": 95016.0, "per_text_token": 24576.0,
              "constant": 626688.0},
}
SAVED_BYTES_REFERENCE_WIDTH = 4096
"""Video width the constants were measured at; other widths scale them linearly (every saved tensor of a block is
``tokens x (a multiple of the width)``)."""

LORA_ADAPTER_INPUT_BYTES = 2.0
"""Extra saved bytes per input feature per token for an adapter on a Linear outside the measured targets (its
bf16 input copy under autocast)."""

BACKWARD_TENSORS_PER_TOKEN_WIDTH = 16
"""Gradient tensors of ``tokens x width`` (bf16) alive while one block is back-propagated: the stream gradient in and
out, q/k/v/attention-output gradients, and the feed-forward hidden gradient (4 widths, twice). An estimate."""


@dataclass(frozen=True, kw_only=True)
class Resolution:
    width: int
    height: int
    frames: int

    @classmethod
    def parse(cls, text: str) -> Resolution:
        try:
            width, height, frames = (int(v) for v in text.lower().split("x"))
        except ValueError as exc:
            raise ValueError(f"--resolution must be WxHxF (e.g. 768x512x49), got {text!r}") from exc
        if width % 32 or height % 32 or width <= 0 or height <= 0 or frames < 1 or (frames - 1) % 8:
            raise ValueError(f"--resolution {text}: width and height must be positive multiples of 32 and frames "
                             "of the form 8k + 1")
        return cls(width=width, height=height, frames=frames)


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    """Bytes per component (insertion order is the table's order) and the token counts they assume."""

    components: dict[str, float]
    video_tokens: int
    audio_tokens: int
    text_tokens: int
    settings: dict[str, Any]

    @property
    def total(self) -> float:
        return sum(self.components.values())

    def fits(self, gpu_memory_gib: float) -> bool:
        return self.total <= gpu_memory_gib * GIB

    def to_json(self, gpu_memory_gib: float | None = None) -> dict[str, Any]:
        out = {"total_gib": round(self.total / GIB, 3),
               "components": {k: round(v / GIB, 3) for k, v in self.components.items()},
               "fits": None if gpu_memory_gib is None else self.fits(gpu_memory_gib),
               "tokens": {"video": self.video_tokens, "audio": self.audio_tokens, "text": self.text_tokens},
               "settings": self.settings}
        return out

    def table(self) -> str:
        lines = [f"{'component':<36}{'GiB':>9}"]
        lines += [f"{name:<36}{value / GIB:>9.2f}" for name, value in self.components.items()]
        lines.append(f"{'total':<36}{self.total / GIB:>9.2f}")
        return "\n".join(lines)


def read_model_config(*, checkpoint: Path | None = None, model_config: Path | None = None) -> dict:
    """The full model config (``{"transformer": {...}, ...}``) from a checkpoint's header or a config JSON file
    (a bare transformer section is accepted too)."""
    if model_config is not None:
        path = Path(model_config)
        if not path.is_file():
            raise ValueError(f"--model-config {path}: file not found")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"--model-config {path}: not valid JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise ValueError(f"--model-config {path}: expected a JSON object")
        return config if "transformer" in config else {"transformer": config}
    if checkpoint is None:
        raise ValueError("give --model.checkpoint (its header holds the model config) or --model-config FILE")
    from ltxf.models.checkpoint import read_config

    return read_config(checkpoint)


def _meta_transformer(config: dict, *, dtype: torch.dtype, quantization: str) -> nn.Module:
    from ltxf.models.transformer import AVTransformer, TransformerConfig
    from ltxf.quantization import quantize_model_

    transformer_config = TransformerConfig.from_checkpoint_config(config["transformer"])
    with torch.device("meta"):
        model = AVTransformer(transformer_config).to(dtype)
    if quantization != "none":
        quantize_model_(model, quantization)
    return model


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer (a meta module counts as if materialised)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def transformer_weight_bytes(config: dict, *, dtype: torch.dtype, quantization: str) -> tuple[int, list[int]]:
    """Exact bytes of the transformer with this dtype and quantization: (all, per block)."""
    total, per_block = _transformer_weight_bytes(json.dumps(config["transformer"], sort_keys=True), dtype,
                                                 quantization)
    return total, list(per_block)


@functools.lru_cache(maxsize=32)
def _transformer_weight_bytes(section: str, dtype: torch.dtype, quantization: str) -> tuple[int, tuple[int, ...]]:
    model = _meta_transformer({"transformer": json.loads(section)}, dtype=dtype, quantization=quantization)
    return tensor_bytes(model), tuple(tensor_bytes(block) for block in model.transformer_blocks)


def connector_bytes(config: dict, *, dtype: torch.dtype, offloaded: bool = False) -> int:
    """The video + audio text connectors (no feature extractor: training reads cached features). ``offloaded``
    (``parallel.offload_text_connectors``): the connector blocks stream from the host, two on the device at a time
    (ltxf/block_swap.py); the rest (registers, output norms) stays."""
    total, blocks, largest = _connector_bytes(json.dumps(config["transformer"], sort_keys=True), dtype)
    return total - blocks + 2 * largest if offloaded else total


@functools.lru_cache(maxsize=8)
def _connector_bytes(section: str, dtype: torch.dtype) -> tuple[int, int, int]:
    config = {"transformer": json.loads(section)}
    from ltxf.models.text import EmbeddingsProcessor, EmbeddingsProcessorConfig

    processor_config = EmbeddingsProcessorConfig.from_transformer_config(config["transformer"])
    with torch.device("meta"):
        processor = EmbeddingsProcessor(processor_config, with_feature_extractor=False).to(dtype)
    blocks = [tensor_bytes(block) for connector in (processor.video_connector, processor.audio_connector)
              for block in connector.transformer_1d_blocks]
    return tensor_bytes(processor), sum(blocks), max(blocks)


def lora_parameter_count(config: dict, lora_cfg: Any) -> int:
    """Adapter parameters ``lora_cfg`` gives the model (counted on meta)."""
    return _lora_parameter_count(json.dumps(config["transformer"], sort_keys=True), lora_cfg)


@functools.lru_cache(maxsize=8)
def _lora_parameter_count(section: str, lora_cfg: Any) -> int:
    from ltxf.lora import inject_lora, lora_parameters

    config = {"transformer": json.loads(section)}
    model = _meta_transformer(config, dtype=torch.bfloat16, quantization="none")
    inject_lora(model, lora_cfg, dtype=torch.float32)
    return sum(p.numel() for p in lora_parameters(model).values())


def tokens_for(config: dict, resolution: Resolution, *, with_audio: bool, fps: float = 25.0) -> tuple[int, int]:
    frames, height, width = video_latent_size(resolution.frames, resolution.height, resolution.width)
    audio = audio_latent_length(resolution.frames, fps) if with_audio else 0
    return frames * height * width, audio


def block_saved_bytes(mode: str, *, video_tokens: int, audio_tokens: int, text_tokens: int, width: int) -> float:
    """Saved-for-backward bytes of one block (batch 1) from :data:`SAVED_BYTES_PER_BLOCK`."""
    c = SAVED_BYTES_PER_BLOCK[mode]
    scale = width / SAVED_BYTES_REFERENCE_WIDTH
    return scale * (c["per_video_token"] * video_tokens + c["per_audio_token"] * audio_tokens
                    + c["per_text_token"] * text_tokens + c["constant"])


def _setting(cfg: Any, section: str, name: str, default: Any) -> Any:
    return getattr(getattr(cfg, section), name, default)


def checkpointed_block_indices(cfg: Any, num_layers: int) -> list[int]:
    """The blocks activation checkpointing recomputes (``parallel.checkpoint_every`` / ``checkpoint_first``)."""
    if not cfg.parallel.activation_checkpointing:
        return []
    from ltxf.parallel import checkpointed_blocks

    return checkpointed_blocks(num_layers, every=_setting(cfg, "parallel", "checkpoint_every", 1),
                               first=_setting(cfg, "parallel", "checkpoint_first", None))


def connectors_offloaded(cfg: Any) -> bool:
    """Frozen connectors stream from the host with ``parallel.offload_text_connectors``."""
    return bool(_setting(cfg, "parallel", "offload_text_connectors", False)) and not cfg.model.train_connectors


def plan_memory(cfg: Any, config: dict, resolution: Resolution, *, fps: float = 25.0,
                tokens: tuple[int, int] | None = None, text_tokens: int | None = None,
                num_processes: int = 1) -> MemoryPlan:
    """The :class:`MemoryPlan` of training ``cfg`` (a :class:`~ltxf.config.TrainConfig`) on the model ``config``
    on one of ``num_processes`` devices; ``tokens`` (video, audio) and ``text_tokens`` override what the resolution
    and ``data.text_length`` give. IC-LoRA (``video_to_video``) counts the reference clip at full size. Under
    FSDP (``parallel.data_parallel='fsdp'``, or 'auto' for full fine-tuning on several processes) the weights,
    gradients and optimizer state are divided over the shard group, plus two gathered blocks."""
    from ltxf.models.transformer import TransformerConfig

    tc = TransformerConfig.from_checkpoint_config(config["transformer"])
    full = cfg.model.training_mode == "full"
    compute_dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    act_bytes = 2 if compute_dtype == torch.bfloat16 else 4
    weights_dtype = torch.float32 if full else compute_dtype
    quantization = cfg.model.quantization
    batch = cfg.optim.batch_size
    # What the run's strategy reads decides the streams (asked through the registry, like the trainer does).
    from ltxf.strategies.registry import build_strategy

    roles = set(build_strategy(cfg).data_sources())
    with_audio = "audio_latents" in roles
    video_tokens, audio_tokens = tokens or tokens_for(config, resolution, with_audio=with_audio, fps=fps)
    if tokens is None and "latents" not in roles:
        video_tokens = 0  # an audio-only run
    if tokens is None and "reference_latents" in roles:
        video_tokens *= 2  # the clean reference tokens come first (at full size unless downscaled)
    text_tokens = text_tokens or cfg.data.text_length or 1024
    components: dict[str, float] = {}

    total_weights, per_block = transformer_weight_bytes(config, dtype=weights_dtype, quantization=quantization)
    swap = min(int(_setting(cfg, "parallel", "blocks_to_swap", 0) or 0), tc.num_layers)
    if swap and full:
        raise ValueError("parallel.blocks_to_swap swaps frozen weights: it needs model.training_mode='lora'")
    label = "transformer weights" + (f" ({quantization})" if quantization != "none" else
                                      " (float32 master)" if full else f" ({cfg.model.dtype})")
    checkpointed = checkpointed_block_indices(cfg, tc.num_layers)
    # The last ``swap`` blocks live on the host; only checkpointed ones free their device copy after the forward
    # (ltxf/block_swap.py), and two are on the device at a time (the running block and the prefetched one).
    off_device = [i for i in range(tc.num_layers - swap, tc.num_layers) if i in set(checkpointed)]
    in_flight = 2 * max(per_block) if off_device else 0
    components[label] = total_weights - sum(per_block[i] for i in off_device) + min(
        in_flight, sum(per_block[i] for i in off_device))
    connector_dtype = torch.float32 if cfg.model.train_connectors else compute_dtype
    connectors = connector_bytes(config, dtype=connector_dtype)
    components["text connectors"] = connector_bytes(config, dtype=connector_dtype, offloaded=connectors_offloaded(cfg))

    if full:
        num_trainable = sum(per_block) // 4 + (total_weights - sum(per_block)) // 4
    else:
        num_trainable = lora_parameter_count(config, cfg.lora)
    if cfg.model.train_connectors:
        num_trainable += connectors // 4
    # LoRA: fp32 adapters and their gradients; full fine-tuning: the fp32 gradients (the weights are counted above).
    components["trainable + grads"] = num_trainable * (4 if full else 8)
    if cfg.optim.optimizer == "adamw8bit":
        components["optimizer state"] = num_trainable * (2 + 8 / OPTIMIZER_8BIT_BLOCK)
    else:
        components["optimizer state"] = num_trainable * 8

    mode = "full" if full else "lora"
    width, audio_width = tc.inner_dim, tc.audio_inner_dim
    one_block = batch * block_saved_bytes(mode, video_tokens=video_tokens, audio_tokens=audio_tokens,
                                          text_tokens=text_tokens, width=width)
    num_ckpt = len(checkpointed)
    stream_inputs = batch * act_bytes * (video_tokens * width + audio_tokens * audio_width)
    activations = num_ckpt * stream_inputs + (tc.num_layers - num_ckpt) * one_block
    if num_ckpt:
        activations += one_block  # the block being recomputed
    components["activations (blocks)"] = activations
    # The output heads save their normed input and its scale: two stream-sized tensors per stream.
    components["activations (heads)"] = 2 * stream_inputs
    # Per forward, alive for the whole step and shared by every block (not saved tensors): RoPE cos/sin tables
    # (float32, self and cross attention) and the text context of each stream.
    rope = 4 * 2 * (video_tokens * (width + audio_width) + audio_tokens * 2 * audio_width)
    context = act_bytes * text_tokens * (width + (audio_width if with_audio else 0))
    components["RoPE tables + context"] = batch * (rope + context)

    largest = _largest_quantized_layer(config, quantization)
    dequant = largest * (4 if quantization == "nf4" else 2) if quantization != "none" else 0
    components["backward workspace"] = (batch * BACKWARD_TENSORS_PER_TOKEN_WIDTH * act_bytes
                                        * (video_tokens * width + audio_tokens * audio_width) + dequant)
    latent_bytes = 4 * (video_tokens * tc.in_channels + audio_tokens * tc.audio_in_channels)
    components["batch"] = batch * (3 * latent_bytes + 2 * text_tokens * (width + audio_width))
    data_parallel = cfg.parallel.data_parallel
    fsdp = data_parallel == "fsdp" or (data_parallel == "auto" and full and num_processes > 1)
    shard = min(_setting(cfg, "parallel", "shard_size", None) or num_processes, num_processes) if fsdp else 1
    if shard > 1:
        for name in (label, "trainable + grads", "optimizer state"):
            components[name] /= shard
        # Each block is gathered for its forward / backward (bf16), the next one prefetched.
        components[label] += 2 * max(per_block) * (act_bytes / (4 if full else act_bytes))
    components["CUDA context"] = CUDA_CONTEXT_BYTES
    settings = {"quantization": quantization, "training_mode": cfg.model.training_mode,
                "lora_rank": None if full else cfg.lora.rank, "optimizer": cfg.optim.optimizer,
                "activation_checkpointing_blocks": num_ckpt, "blocks_to_swap": swap, "batch_size": batch,
                "with_audio": with_audio, "num_processes": num_processes, "shard": shard,
                "offload_text_connectors": connectors_offloaded(cfg),
                "trainable_parameters": num_trainable}
    return MemoryPlan(components=components, video_tokens=video_tokens, audio_tokens=audio_tokens,
                      text_tokens=text_tokens, settings=settings)


def _largest_quantized_layer(config: dict, quantization: str) -> int:
    if quantization == "none":
        return 0
    return _largest_quantizable(json.dumps(config["transformer"], sort_keys=True))


@functools.lru_cache(maxsize=8)
def _largest_quantizable(section: str) -> int:
    config = {"transformer": json.loads(section)}
    from ltxf.models.transformer import AVTransformer, TransformerConfig
    from ltxf.quantization import quantized_module_names

    with torch.device("meta"):
        model = AVTransformer(TransformerConfig.from_checkpoint_config(config["transformer"]))
    return max(model.get_submodule(n).weight.numel() for n in quantized_module_names(model))


def suggest_settings(cfg: Any, config: dict, resolution: Resolution, gpu_memory_gib: float, *, fps: float = 25.0
                     ) -> tuple[Any, MemoryPlan] | None:
    """The cheapest change of ``cfg`` that fits ``gpu_memory_gib``, trying in order of cost to quality, then speed:
    checkpointing on; the base none / fp8 / int8 / nf4, each with the text connectors streamed from the host, then
    also 8-bit AdamW; then nf4 with block swap in steps of 4 blocks. None if nothing fits."""
    num_layers = int(config["transformer"].get("num_layers", 48))
    parallel = dataclasses.replace(cfg.parallel, activation_checkpointing=True, checkpoint_every=1,
                                   checkpoint_first=None) if hasattr(cfg.parallel, "checkpoint_every") else \
        dataclasses.replace(cfg.parallel, activation_checkpointing=True)
    base = dataclasses.replace(cfg, parallel=parallel)
    lora = cfg.model.training_mode == "lora"
    offload = hasattr(parallel, "offload_text_connectors") and not cfg.model.train_connectors
    candidates = [base]
    for quantization in ("none", "fp8", "int8", "nf4") if lora else ("none",):
        model = dataclasses.replace(base.model, quantization=quantization)
        streamed = dataclasses.replace(parallel, offload_text_connectors=True) if offload else parallel
        for optimizer in ("adamw", "adamw8bit"):
            optim = dataclasses.replace(base.optim, optimizer=optimizer if optimizer == "adamw8bit"
                                        else base.optim.optimizer)
            candidates.append(dataclasses.replace(base, model=model, parallel=streamed, optim=optim))
    if lora and hasattr(parallel, "blocks_to_swap"):
        last = candidates[-1]
        for swap in range(4, num_layers + 1, 4):
            candidates.append(dataclasses.replace(last, parallel=dataclasses.replace(last.parallel,
                                                                                     blocks_to_swap=swap)))
    for candidate in candidates:
        plan = plan_memory(candidate, config, resolution, fps=fps)
        if plan.fits(gpu_memory_gib):
            return candidate, plan
    return None


def describe_changes(before: Any, after: Any) -> list[str]:
    """``--section.field value`` flags that turn ``before`` into ``after``."""
    flags = []
    for section in ("model", "optim", "parallel"):
        a, b = getattr(before, section), getattr(after, section)
        for f in dataclasses.fields(a):
            if getattr(a, f.name) != getattr(b, f.name):
                flags.append(f"--{section}.{f.name} {getattr(b, f.name)}")
    return flags




# -------------------------------------------------------------------------------------------------------------
# Measurement (tests and tools/gpu_check.py): what a real model saves for backward.


def random_inputs(config: Any, *, video_tokens: int, audio_tokens: int, text_tokens: int, batch: int = 1,
                  device: torch.device | str = "cpu", seed: int = 0) -> tuple[Any, Any]:
    """Video and audio :class:`~ltxf.models.transformer.Modality` inputs with first-frame conditioning (two
    distinct timesteps), for a :class:`~ltxf.models.transformer.TransformerConfig` ``config``."""
    from ltxf.models.transformer import Modality

    g = torch.Generator().manual_seed(seed)
    out = []
    for kind, num_tokens in (("video", video_tokens), ("audio", audio_tokens)):
        video = kind == "video"
        width = config.caption_channels if config.has_caption_projection else \
            (config.inner_dim if video else config.audio_inner_dim)
        sigma = torch.full((batch,), 0.6)
        timesteps = sigma[:, None].expand(batch, num_tokens).clone()
        if video:
            timesteps[:, : max(1, num_tokens // 8)] = 0.0
        start = torch.arange(num_tokens, dtype=torch.float32)
        positions = torch.stack([start, start + 1], -1)[None, None].expand(batch, 3 if video else 1, -1, -1)
        channels = config.in_channels if video else config.audio_in_channels
        out.append(Modality(latent=torch.randn(batch, num_tokens, channels, generator=g).to(device),
                            sigma=sigma.to(device), timesteps=timesteps.to(device),
                            positions=positions.contiguous().to(device),
                            context=torch.randn(batch, text_tokens, width, generator=g).to(device)))
    return out[0], out[1]


def measure_saved_bytes(model: nn.Module, video: Any, audio: Any, *, autocast_dtype: torch.dtype | None) -> int:
    """Bytes of the unique storages the model's forward saves for backward (parameters and buffers excluded):
    the activation memory of a step without checkpointing, measured with saved-tensor hooks."""
    excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    device_type = video.latent.device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = model(video=video, audio=audio)
    del outputs
    return sum(storages.values())
