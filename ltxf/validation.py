"""Validation samples during training: configuration and the :class:`Validator` the training loop calls.

How the loop uses it::

    validator = Validator.build(cfg.validation, checkpoint=cfg.model.checkpoint, device=device,
                                dtype=compute_dtype) if cfg.validation.enabled else None
    ...
    if validator is not None and validator.should_run(step):      # step 0 (unless skipped), then every interval
        restore = offload_to_host_(state.opt_state) if cfg.validation.offload_optimizer and not fsdp else None
        validator.run(step, transformer, text_processor=text_processor, output_dir=output_dir, monitor=monitor,
                      rank=dist_info.rank, world_size=dist_info.world_size)
        if restore is not None:
            restore()
        monitor.restart_timer()

:meth:`Validator.build` does everything that does not depend on the trained weights, once: it embeds the
prompts and the negative prompt with Gemma and the checkpoint's feature extractor and frees both (or reads
precomputed features from ``prompt_features_path``), encodes the first-frame images and IC-LoRA references with
the video VAE encoder and frees it, and loads the video VAE decoder (and, with audio, the audio VAE decoder and
the vocoder). :meth:`Validator.run` then only runs the connectors, the transformer and the decoders.

Under several processes the prompts are dealt round-robin (rank ``r`` samples prompts ``r, r + N, ...``).
Every rank runs the same number of denoising loops, padding with a throw-away run of its first prompt (or of
prompt 0) when it has fewer, because an FSDP-sharded transformer needs every rank in every forward. The clips
are gathered to rank 0 (``gather_object`` of CPU tensors), which writes ``samples/step_{step:06d}_{i+1}.mp4``
(``.png`` for one frame) and logs the frames and audio to TensorBoard.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ltxf import pytree
from ltxf.config import ValidationConfig
from ltxf.generate import (
    Conditioning,
    GeneratedClip,
    GenerationModels,
    GenerationRequest,
    clip_suffix,
    describe_clip,
    encode_prompts,
    free_memory,
    generate,
    prepare_conditioning,
    sample,
    save_clip,
)
from ltxf.models.gemma import PromptFeatures
from ltxf.models.pack import ModelPack
from ltxf.monitor import Monitor

logger = logging.getLogger(__name__)

PROMPT_FEATURES_FORMAT = "ltxf-prompt-features-1"
_FEATURE_KEYS = ("video_prompt_embeds", "audio_prompt_embeds", "prompt_attention_mask")


# -------------------------------------------------------------------------------------------------------------
# Configuration


# -------------------------------------------------------------------------------------------------------------
# Precomputed prompt features


def _feature_dict(features: PromptFeatures | dict, where: str) -> dict[str, torch.Tensor]:
    values = features._asdict() if isinstance(features, PromptFeatures) else dict(features)
    out = {}
    for key in _FEATURE_KEYS:
        tensor = values.get(key)
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{where}: missing tensor '{key}' (expected keys {_FEATURE_KEYS})")
        if tensor.ndim == (2 if key == "prompt_attention_mask" else 3):
            if tensor.shape[0] != 1:
                raise ValueError(f"{where}: '{key}' holds a batch of {tensor.shape[0]}; give one prompt per entry")
            tensor = tensor[0]
        out[key] = tensor.detach().cpu()
    mask, video, audio = out["prompt_attention_mask"], out["video_prompt_embeds"], out["audio_prompt_embeds"]
    if mask.ndim != 1 or video.ndim != 2 or audio.ndim != 2 or video.shape[0] != mask.shape[0] \
            or audio.shape[0] != mask.shape[0]:
        raise ValueError(f"{where}: expected video/audio embeds [S, C] and a mask [S], got "
                         f"{tuple(video.shape)}, {tuple(audio.shape)}, {tuple(mask.shape)}")
    return out


def save_prompt_features(
    path: str | Path,
    prompts: Sequence[PromptFeatures | dict],
    *,
    negative: PromptFeatures | dict | None = None,
    texts: Sequence[str] | None = None,
) -> Path:
    """Write precomputed prompt features for ``validation.prompt_features_path``.

    Each entry holds ``video_prompt_embeds`` ``[S, Cv]``, ``audio_prompt_embeds`` ``[S, Ca]`` and
    ``prompt_attention_mask`` ``[S]`` (the keys of a dataset's ``conditions/*.pt`` file, so those can be passed
    directly); ``negative`` is the negative prompt's (needed when CFG is on). ``texts`` are stored for reference.
    """
    path = Path(path)
    payload: dict[str, Any] = {
        "format": PROMPT_FEATURES_FORMAT,
        "prompts": [_feature_dict(p, f"prompt {i}") for i, p in enumerate(prompts)],
        "negative": None if negative is None else _feature_dict(negative, "negative"),
        "texts": list(texts) if texts is not None else None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def load_prompt_features(path: str | Path) -> tuple[list[PromptFeatures], PromptFeatures | None]:
    """Read a file written by :func:`save_prompt_features`: per-prompt features and the negative's (or None),
    each with batch 1."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a bad file
        raise ValueError(f"{path}: not a readable prompt-features file ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != PROMPT_FEATURES_FORMAT:
        raise ValueError(f"{path}: not a prompt-features file (expected a dict with format "
                         f"'{PROMPT_FEATURES_FORMAT}', written by ltxf.validation.save_prompt_features)")

    def as_features(entry: dict, where: str) -> PromptFeatures:
        d = _feature_dict(entry, f"{path} [{where}]")
        return PromptFeatures(*(d[k][None] for k in _FEATURE_KEYS))

    prompts = [as_features(e, f"prompt {i}") for i, e in enumerate(payload.get("prompts") or [])]
    negative = payload.get("negative")
    return prompts, None if negative is None else as_features(negative, "negative")


# -------------------------------------------------------------------------------------------------------------
# Distribution helpers


def assign_prompts(num_prompts: int, rank: int, world_size: int) -> list[int | None]:
    """The prompt indices rank ``rank`` samples, round-robin, padded with None (a throw-away run) to
    ``ceil(num_prompts / world_size)`` so every rank runs the same number of denoising loops."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    mine: list[int | None] = list(range(rank, num_prompts, world_size))
    return mine + [None] * (math.ceil(num_prompts / world_size) - len(mine))


def offload_to_host_(tree: Any) -> Callable[[], None]:
    """Move the accelerator tensors of ``tree`` (e.g. ``TrainState.opt_state``) to host memory IN PLACE and return
    a function that moves them back.

    For the ``offload_optimizer`` option. The tensor objects stay (their storage is swapped), so no other
    reference keeps the accelerator copy alive; host tensors (the optimizer's CPU step counters) are left where
    they are, so nothing lands on the accelerator that was not there. Sharded (DTensor) leaves are refused: under
    FSDP the state is already split across ranks.
    """
    from torch.distributed.tensor import DTensor

    leaves = [leaf for leaf in pytree.leaves(tree) if isinstance(leaf, torch.Tensor)]
    if any(isinstance(leaf, DTensor) for leaf in leaves):
        raise ValueError("the optimizer state is sharded (DTensor, FSDP); offloading it is not supported, turn "
                         "validation.offload_optimizer off")
    moved = [(leaf, leaf.device) for leaf in leaves if leaf.device.type != "cpu"]
    for leaf, _ in moved:
        leaf.data = leaf.data.to("cpu")

    def restore() -> None:
        for leaf, device in moved:
            leaf.data = leaf.data.to(device)

    return restore


def _clip_to_cpu(clip: GeneratedClip) -> GeneratedClip:
    return dataclasses.replace(
        clip, frames=None if clip.frames is None else clip.frames.cpu(),
        audio=None if clip.audio is None else clip.audio.cpu())


# -------------------------------------------------------------------------------------------------------------
# The validator


class Validator:
    """Samples the validation prompts with the model being trained. Build it with :meth:`build`."""

    def __init__(
        self,
        config: ValidationConfig,
        *,
        requests: Sequence[GenerationRequest],
        conditionings: Sequence[Conditioning],
        video_decoder: nn.Module,
        audio_decoder: nn.Module | None = None,
        vocoder: nn.Module | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        if len(requests) != len(conditionings):
            raise ValueError(f"{len(requests)} requests but {len(conditionings)} conditionings")
        self.config = config
        self.requests = list(requests)
        self.conditionings = list(conditionings)
        self.video_decoder = video_decoder
        self.audio_decoder = audio_decoder
        self.vocoder = vocoder
        self.autocast_dtype = autocast_dtype

    @classmethod
    def build(
        cls,
        config: ValidationConfig,
        *,
        checkpoint: str | Path | ModelPack,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
    ) -> Validator:
        """Prepare everything that does not change during training (see the module docstring).

        ``checkpoint`` is a single-file checkpoint or a :class:`ltxf.models.pack.ModelPack` (LTX-2.5: the VAEs,
        vocoder and text encoder come from their own files; a diffusion-decoder video VAE is not supported for
        decoding and is refused with a message that names the conv VAE to use instead).

        ``dtype`` is the weights' dtype for Gemma, the feature extractor and the video VAE, and the autocast dtype
        of sampling (none for float32); the audio decoder and the vocoder stay in float32.
        """
        from ltxf.models.audio_vae import load_audio_vae_decoder
        from ltxf.models.pack import resolve_pack
        from ltxf.models.transformer import read_transformer_config
        from ltxf.models.video_vae import load_video_vae_decoder, load_video_vae_encoder
        from ltxf.models.vocoder import load_vocoder

        if not config.prompts:
            raise ValueError("validation.prompts is empty: there is nothing to validate")
        config.check_paths()
        pack = checkpoint if isinstance(checkpoint, ModelPack) else resolve_pack(checkpoint)
        checkpoint = pack.transformer
        transformer_config = read_transformer_config(checkpoint)
        guidance = config.guidance
        if guidance.uses_stg and guidance.stg_blocks is not None:
            bad = [b for b in guidance.stg_blocks if b >= transformer_config.num_layers]
            if bad:
                raise ValueError(f"validation.stg_blocks {bad} are out of range for the {transformer_config.num_layers}"
                                 f"-block transformer of {checkpoint}")

        features, negative = cls._prompt_features(config, pack, device=device, dtype=dtype)
        width, height, num_frames = config.video_dims
        requests = [
            GenerationRequest(
                prompt_features=features[i], negative_prompt_features=negative, width=width, height=height,
                num_frames=num_frames, frame_rate=config.frame_rate, num_inference_steps=config.inference_steps,
                seed=config.seed, guidance=guidance,
                condition_image=config.images[i] if config.images else None,
                reference_video=config.reference_videos[i] if config.reference_videos else None,
                reference_downscale_factor=config.reference_downscale_factor,
                include_reference_in_output=config.include_reference_in_output,
                generate_audio=config.generate_audio, generate_video=config.generate_video,
                audio_guidance=config.audio_guidance,
                conditions=config.conditions[i] if config.conditions else (),
            )
            for i in range(len(config.prompts))
        ]
        conditionings = [Conditioning() for _ in requests]
        conditions = [c for r in requests for c in r.conditions]
        if config.images or config.reference_videos or conditions:
            # Every condition's media is read and encoded once, here, and kept on the CPU.
            from ltxf.generate import encode_conditions
            from ltxf.models.audio_vae import load_audio_vae_encoder

            encoder = load_video_vae_encoder(pack.video_vae_file(), dtype=dtype, device=device)
            audio_encoder = (load_audio_vae_encoder(pack.audio_vae_file(), dtype=torch.float32, device=device)
                             if any(c.modality == "audio" for c in conditions) else None)
            encoders = GenerationModels(transformer=None, text_processor=None, video_decoder=None,
                                        video_encoder=encoder, audio_encoder=audio_encoder)
            conditionings = [
                dataclasses.replace(_conditioning_to_cpu(prepare_conditioning(encoder, r)),
                                    conditions=tuple(e.to("cpu") for e in encode_conditions(encoders, r)))
                for r in requests
            ]
            del encoder, audio_encoder, encoders
            free_memory()
        video_decoder = load_video_vae_decoder(pack.video_decoder_file(), dtype=dtype, device=device)
        audio_decoder = vocoder = None
        if config.generate_audio or any(c.type == "audio_to_video" for c in conditions):
            try:
                audio_file = pack.audio_vae_file()
                audio_decoder = load_audio_vae_decoder(audio_file, dtype=torch.float32, device=device)
                vocoder = load_vocoder(audio_file, dtype=torch.float32, device=device)
            except ValueError as exc:
                raise ValueError(f"{exc}\n(validation.generate_audio is on and needs the audio VAE and the vocoder "
                                 "from the checkpoint; set validation.generate_audio=False to sample video only)"
                                 ) from exc
        logger.info("validation ready: %d prompts at %dx%dx%d, %d steps, every %s steps", len(requests), width,
                    height, num_frames, config.inference_steps, config.interval)
        return cls(config, requests=requests, conditionings=conditionings, video_decoder=video_decoder,
                   audio_decoder=audio_decoder, vocoder=vocoder,
                   autocast_dtype=None if dtype == torch.float32 else dtype)

    @staticmethod
    def _prompt_features(
        config: ValidationConfig, pack: ModelPack, *, device: torch.device | str, dtype: torch.dtype
    ) -> tuple[list[PromptFeatures], PromptFeatures | None]:
        uses_cfg = config.guidance.uses_cfg or (config.generate_audio and config.audio_guidance.uses_cfg)
        if config.prompt_features_path is not None:
            features, negative = load_prompt_features(config.prompt_features_path)
            if len(features) != len(config.prompts):
                raise ValueError(f"validation.prompt_features_path {config.prompt_features_path} holds "
                                 f"{len(features)} prompts but validation.prompts has {len(config.prompts)}")
            if uses_cfg and negative is None:
                raise ValueError(f"validation.prompt_features_path {config.prompt_features_path} has no negative "
                                 "prompt features, which CFG needs (validation.guidance_scale != 1)")
            return features, negative
        texts = list(config.prompts) + ([config.negative_prompt] if uses_cfg else [])
        text_encoder = config.text_encoder_path or pack.text_encoder
        if text_encoder is None:
            raise ValueError("validation needs a text encoder to embed validation.prompts: set "
                             "validation.text_encoder_path or model.text_encoder (or validation.prompt_features_path)")
        encoded = encode_prompts(text_encoder, pack.transformer, texts, device=device, dtype=dtype,
                                 load_in_8bit=config.text_encoder_8bit)
        return encoded[: len(config.prompts)], encoded[-1] if uses_cfg else None

    def should_run(self, step: int) -> bool:
        return self.config.should_run(step)

    def _models(self, transformer: nn.Module, text_processor: nn.Module) -> GenerationModels:
        return GenerationModels(transformer=transformer, text_processor=text_processor,
                                video_decoder=self.video_decoder, audio_decoder=self.audio_decoder,
                                vocoder=self.vocoder, autocast_dtype=self.autocast_dtype)

    def run(
        self,
        step: int,
        transformer: nn.Module,
        *,
        text_processor: nn.Module,
        output_dir: str | Path,
        monitor: Monitor | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> list[Path]:
        """Sample every prompt with the current weights; rank 0 writes and logs them. Collective when
        ``world_size > 1`` (every rank must call it). Returns the written paths (empty on other ranks).

        ``text_processor`` is the training run's connector module (trained or not). The transformer and the
        connectors are switched to eval mode and restored; everything runs without gradients, one prompt at a
        time per rank.
        """
        if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"Validator.run: world_size={world_size} but no torch.distributed process group")
        free_memory()
        models = self._models(transformer, text_processor)
        modes = (transformer.training, text_processor.training)
        transformer.eval()
        text_processor.eval()
        results: list[tuple[int, GeneratedClip]] = []
        try:
            with torch.no_grad():
                assigned = assign_prompts(len(self.requests), rank, world_size)
                for index in assigned:
                    if index is None:  # the throw-away run that keeps FSDP ranks in step; nothing is decoded
                        first = next((i for i in assigned if i is not None), 0)
                        sample(models, self.requests[first], conditioning=self.conditionings[first])
                        continue
                    clip = generate(models, self.requests[index], conditioning=self.conditionings[index])
                    results.append((index, _clip_to_cpu(clip)))
        finally:
            transformer.train(modes[0])
            text_processor.train(modes[1])
            free_memory()

        if world_size > 1:
            gathered: list[list[tuple[int, GeneratedClip]]] | None = [[] for _ in range(world_size)] \
                if rank == 0 else None
            dist.gather_object(results, gathered, dst=0)
            if rank == 0:
                results = [item for part in gathered for item in part]
        if rank != 0:
            return []
        return self._write(step, sorted(results, key=lambda item: item[0]), Path(output_dir), monitor)

    def _write(self, step: int, results: list[tuple[int, GeneratedClip]], output_dir: Path, monitor: Monitor | None
               ) -> list[Path]:
        paths = []
        for index, clip in results:
            path = output_dir / "samples" / f"step_{step:06d}_{index + 1}{clip_suffix(clip.num_frames)}"
            save_clip(path, clip)
            paths.append(path)
            logger.info("validation sample %d (%s): %s -> %s", index + 1, self.config.prompts[index][:60],
                        describe_clip(clip), path)
            if monitor is not None:
                tag = f"validation/sample_{index + 1}"
                if clip.frames is None:
                    pass  # audio only: logged below
                elif clip.num_frames == 1:
                    monitor.log_image(tag, clip.frames[0], step)
                else:
                    monitor.log_video(tag, clip.frames, clip.fps, step)
                if clip.audio is not None:
                    monitor.log_audio(f"{tag}_audio", clip.audio, clip.audio_sample_rate, step)
        if monitor is not None:
            monitor.flush()
        return paths


def _conditioning_to_cpu(conditioning: Conditioning) -> Conditioning:
    def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().cpu()

    return Conditioning(image_latents=cpu(conditioning.image_latents),
                        reference_latents=cpu(conditioning.reference_latents),
                        reference_frames=cpu(conditioning.reference_frames))


__all__ = [
    "PROMPT_FEATURES_FORMAT",
    "ValidationConfig",
    "Validator",
    "assign_prompts",
    "load_prompt_features",
    "offload_to_host_",
    "save_prompt_features",
]
