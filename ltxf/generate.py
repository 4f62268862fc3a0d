"""Generation end to end: prompt (or cached prompt features) + optional first-frame image + optional IC-LoRA
reference video -> latents -> decoded video frames and audio waveform.

The pipeline of one clip:

1. **Text.** Gemma hidden states -> feature extractor (done once, up front, by :func:`encode_prompts`, which then
   frees Gemma) -> the checkpoint's connectors (every call, so connectors trained with the LoRA are used) ->
   video / audio cross-attention contexts, for the prompt and, with CFG, for the negative prompt.
2. **Conditioning** (:func:`prepare_conditioning`, needs the video VAE encoder). A first-frame image is resized
   to cover the target and center-cropped, VAE-encoded and written into the first latent frame with
   ``denoise_mask = 0``. An IC-LoRA reference video (up to ``num_frames`` frames) is resized and cropped to
   ``(H/n, W/n)``, trimmed to ``8k + 1`` frames, encoded, and appended as clean tokens whose positions are scaled
   by ``n``.
3. **Sampling** (:func:`sample`). Noise from a ``torch.Generator`` seeded with ``seed`` (video tokens first,
   then audio), the LTX-2 sigma schedule computed from the real token count ``F' * H' * W'`` of the latent being
   generated, and the CFG/STG Euler loop of :func:`ltxf.sampling.denoise`. Joint audio has
   ``audio_latent_length(F, fps)`` latent frames.
4. **Decoding** (:func:`decode`). The video VAE decoder (tiled when the clip is large and the decoder offers
   it), ``[-1, 1] -> uint8``; the audio VAE decoder -> mel -> vocoder at its own output rate. With
   ``include_reference_in_output`` the preprocessed reference is shown on the left, resized to the output height.

Everything runs under ``torch.no_grad()`` (not ``inference_mode``, whose inference tensors would later trip an
FSDP-wrapped transformer that goes back to training). :func:`save_clip` writes the result: an H.264 MP4 with a
stereo AAC track at the vocoder's rate, or a PNG for a single frame.

Shape legend: B batch (always 1 here), C latent channels, F frames, H height, W width, T tokens, S text tokens,
D context width, Z audio latent channels, M audio latent mel bins, N audio samples.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ltxf.checkpoint import LoraFile
from ltxf.conditions import SampleCondition
from ltxf.config import DEFAULT_NEGATIVE_PROMPT, check_reference_downscale_factor
from ltxf.latents import (
    audio_latent_length,
    audio_positions,
    patchify_audio,
    patchify_video,
    unpatchify_audio,
    unpatchify_video,
    video_latent_size,
    video_positions,
)
from ltxf.media import read_audio, read_video, write_audio, write_image, write_video
from ltxf.models.gemma import PromptFeatures
from ltxf.models.text import EmbeddingsProcessor
from ltxf.sampling import (
    GuidanceConfig,
    LatentState,
    append_reference_tokens,
    append_reference_video,
    condition_tokens,
    condition_video_frame,
    denoise,
    first_frame_keyframes_mask,
    frozen_state,
    init_latent_state,
    ltx2_sigma_schedule,
    noise_state,
)

if TYPE_CHECKING:
    from ltxf.models.gemma import GemmaTextEncoder

logger = logging.getLogger(__name__)


# Tiled VAE decode (and encode) above these sizes; the tile geometry is the official pipelines' default.
TILE_SIZE_PX = 512
TILE_OVERLAP_PX = 64
TILE_FRAMES = 64
TILE_OVERLAP_FRAMES = 24
_RESIZE_CHUNK_FRAMES = 16


# -------------------------------------------------------------------------------------------------------------
# Requests, models, results


@dataclass(frozen=True, kw_only=True, eq=False)
class GenerationRequest:
    """What to generate. Give the prompt as text (needs a Gemma encoder in the models) or as cached features.

    Image and reference inputs are a file path (images read as one frame; for a video the first frame) or a
    ``uint8`` ``[F, H, W, 3]`` / ``[H, W, 3]`` RGB tensor.
    """

    prompt: str | None = None
    """Prompt text, encoded with the models' Gemma encoder."""
    prompt_features: PromptFeatures | None = None
    """Cached prompt features (``[S, C]`` or ``[1, S, C]`` embeds and a ``[S]`` / ``[1, S]`` mask) instead of text."""
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    """Negative prompt for classifier-free guidance (only used when ``guidance.cfg_scale != 1``)."""
    negative_prompt_features: PromptFeatures | None = None
    """Cached features of the negative prompt; when given, ``negative_prompt`` is not encoded."""
    width: int = 960
    height: int = 544
    num_frames: int = 97
    """Pixel frames, ``8k + 1``."""
    frame_rate: float = 25.0
    num_inference_steps: int = 30
    seed: int = 42
    """Seeds the initial noise (and the LTX-2 decoder's noise): the same seed gives the same clip."""
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    condition_image: Path | torch.Tensor | None = None
    """First-frame conditioning (image-to-video)."""
    reference_video: Path | torch.Tensor | None = None
    """IC-LoRA reference video (video-to-video)."""
    reference_downscale_factor: int = 1
    """The reference is used at ``(H/n, W/n)``, with positions scaled by ``n`` (the IC-LoRA's training ratio)."""
    include_reference_in_output: bool = False
    """Put the reference (resized to the output height) to the left of the generated clip."""
    generate_audio: bool = True
    """Generate an audio track jointly (needs the audio VAE decoder and the vocoder)."""
    generate_video: bool = True
    """Generate the video (False with generate_audio: text-to-audio, written as .wav)."""
    audio_guidance: GuidanceConfig | None = None
    """The audio stream's guidance (ltx-core MultiModalGuider per modality); None uses ``guidance``."""
    conditions: tuple[SampleCondition, ...] = ()
    """Per-sample conditions (:mod:`ltxf.conditions`): prefix, suffix, spatial_crop, mask, reference (video or
    audio), first_frame, video_to_audio, audio_to_video."""
    tiled_decode: bool | None = None
    """Decode the video in tiles; None decides from the size (tiles when a side exceeds 512 px or F > 65)."""

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.prompt_features is None):
            raise ValueError("GenerationRequest needs exactly one of prompt (text) and prompt_features (cached)")
        for name in ("width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 32 or value % 32:
                raise ValueError(f"GenerationRequest.{name} must be a positive multiple of 32, got {value!r}")
        if isinstance(self.num_frames, bool) or not isinstance(self.num_frames, int) or self.num_frames < 1 \
                or (self.num_frames - 1) % 8:
            raise ValueError(f"GenerationRequest.num_frames must be 8k + 1 (1, 9, 17, ..., 97, 121), got "
                             f"{self.num_frames!r}")
        if not self.frame_rate > 0:
            raise ValueError(f"GenerationRequest.frame_rate must be > 0, got {self.frame_rate!r}")
        if isinstance(self.num_inference_steps, bool) or not isinstance(self.num_inference_steps, int) \
                or self.num_inference_steps < 1:
            raise ValueError(f"GenerationRequest.num_inference_steps must be an integer >= 1, got "
                             f"{self.num_inference_steps!r}")
        if not isinstance(self.guidance, GuidanceConfig):
            raise ValueError(f"GenerationRequest.guidance must be a GuidanceConfig, got {type(self.guidance).__name__}")
        check_reference_downscale_factor(self.reference_downscale_factor, self.width, self.height,
                                         "GenerationRequest.reference_downscale_factor")
        if self.include_reference_in_output and self.reference_video is None:
            raise ValueError("GenerationRequest.include_reference_in_output needs a reference_video")
        object.__setattr__(self, "conditions", tuple(self.conditions))
        if any(not isinstance(c, SampleCondition) for c in self.conditions):
            raise ValueError("GenerationRequest.conditions must be SampleCondition objects")
        kinds = [c.type for c in self.conditions]
        if "video_to_audio" in kinds and "audio_to_video" in kinds:
            raise ValueError("GenerationRequest.conditions: video_to_audio and audio_to_video together leave nothing "
                             "to generate")
        video_out = self.generate_video and "video_to_audio" not in kinds
        audio_out = self.generate_audio and "audio_to_video" not in kinds
        if not (video_out or audio_out):
            raise ValueError("GenerationRequest: nothing to generate (generate_video and generate_audio are off, or "
                             "the only generated modality is given by a condition)")
        for condition in self.conditions:
            if condition.modality == "video" and not video_out and condition.type != "video_to_audio":
                raise ValueError(f"GenerationRequest.conditions: {condition.type!r} on video, but the video is not "
                                 "generated")
            if condition.modality == "audio" and not audio_out and condition.type != "audio_to_video":
                raise ValueError(f"GenerationRequest.conditions: {condition.type!r} on audio, but the audio is not "
                                 "generated")
        for name in ("condition_image", "reference_video"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, Path(value))
            elif value is not None and not isinstance(value, Path | torch.Tensor):
                raise ValueError(f"GenerationRequest.{name} must be a path or a uint8 tensor, got "
                                 f"{type(value).__name__}")

    @property
    def latent_size(self) -> tuple[int, int, int]:
        """``(F', H', W')`` of the generated latent."""
        return video_latent_size(self.num_frames, self.height, self.width)


@dataclass(frozen=True, kw_only=True, eq=False)
class GenerationModels:
    """The loaded components. Only ``transformer``, ``text_processor`` and ``video_decoder`` are always needed."""

    transformer: nn.Module
    """The audio-video transformer (plain, LoRA-injected or FSDP-wrapped); must expose ``.config.num_layers``."""
    text_processor: EmbeddingsProcessor
    """The text connectors (its feature extractor is only needed with a ``text_encoder`` and prompt text)."""
    video_decoder: nn.Module
    text_encoder: GemmaTextEncoder | None = None
    """A :class:`ltxf.models.gemma.GemmaTextEncoder`, for prompts given as text."""
    video_encoder: nn.Module | None = None
    """For image or reference conditioning (unless a precomputed :class:`Conditioning` is passed)."""
    audio_encoder: nn.Module | None = None
    """For audio conditions (prefix, suffix, mask, reference, audio_to_video)."""
    audio_decoder: nn.Module | None = None
    vocoder: nn.Module | None = None
    autocast_dtype: torch.dtype | None = None
    """The transformer runs under ``torch.autocast(autocast_dtype)`` when set (needed for bf16 weights)."""


@dataclass(frozen=True, kw_only=True, eq=False)
class Conditioning:
    """Encoded conditioning inputs of one request (see :func:`prepare_conditioning`), kept on any device."""

    image_latents: torch.Tensor | None = None
    """``[1, C, 1, H', W']`` the encoded first frame."""
    reference_latents: torch.Tensor | None = None
    """``[1, C, F_r', H'/n, W'/n]`` the encoded reference."""
    reference_frames: torch.Tensor | None = None
    """``uint8 [F_r, H/n, W/n, 3]`` the reference as encoded (for ``include_reference_in_output``)."""
    conditions: tuple[EncodedCondition, ...] | None = None
    """The request's ``conditions`` encoded (:func:`encode_conditions`); None: encoded when sampling."""


@dataclass(frozen=True, kw_only=True, eq=False)
class EncodedCondition:
    """One :class:`~ltxf.conditions.SampleCondition` as tensors: intrinsic conditions hold ``clean_BTC`` where
    ``mask_BT`` is 1 on the generated grid; references and frozen modalities carry ``tokens_BRC`` (+ reference
    ``positions`` and, for a video reference, its ``frames``)."""

    condition: SampleCondition
    clean_BTC: torch.Tensor | None = None
    mask_BT: torch.Tensor | None = None
    tokens_BRC: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    frames: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> EncodedCondition:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return EncodedCondition(condition=self.condition, clean_BTC=move(self.clean_BTC), mask_BT=move(self.mask_BT),
                                tokens_BRC=move(self.tokens_BRC), positions=move(self.positions),
                                frames=None if self.frames is None else self.frames.cpu())


@dataclass(frozen=True, kw_only=True, eq=False)
class SampledLatents:
    """The denoised latents of one request, before decoding."""

    video_latents: torch.Tensor | None
    """``[1, C, F', H', W']`` float32, the generated (or given) clip only (reference tokens dropped); None for
    audio only."""
    audio_latents: torch.Tensor | None
    """``[1, Z, T, M]`` float32, or None without audio."""
    conditioning: Conditioning


@dataclass(frozen=True, kw_only=True, eq=False)
class GeneratedClip:
    """A decoded clip on the CPU."""

    frames: torch.Tensor | None
    """``uint8 [F, H, W, 3]`` RGB, or None for audio only."""
    fps: float
    audio: torch.Tensor | None = None
    """``float32 [C, N]`` in [-1, 1], or None."""
    audio_sample_rate: int | None = None

    @property
    def num_frames(self) -> int:
        return 0 if self.frames is None else int(self.frames.shape[0])

    @property
    def audio_duration(self) -> float | None:
        if self.audio is None or not self.audio_sample_rate:
            return None
        return self.audio.shape[-1] / self.audio_sample_rate


# -------------------------------------------------------------------------------------------------------------
# Text


def encode_prompts(
    text_encoder_path: str | Path,
    checkpoint: str | Path,
    prompts: Sequence[str],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    load_in_8bit: bool = False,
    max_length: int | None = None,
) -> list[PromptFeatures]:
    """Encode prompts once with Gemma and the checkpoint's feature extractor, then free both.

    Returns one :class:`PromptFeatures` per prompt (batch 1, on the CPU): exactly what the trainer caches, to be
    fed to the connectors at every generation. Prompts are encoded one at a time (the stacked hidden states of a
    1024-token prompt are ~0.4 GB in bf16 at full size).
    """
    from ltxf.models.gemma import DEFAULT_MAX_LENGTH, load_text_encoder
    from ltxf.models.pack import check_gemma_pairing
    from ltxf.models.text import load_embeddings_processor

    text_encoder_path = Path(text_encoder_path)
    if not text_encoder_path.exists():
        raise ValueError(f"text_encoder_path: Gemma directory or packed text-encoder file not found: "
                         f"{text_encoder_path}")
    check_gemma_pairing(checkpoint, text_encoder_path)
    encoder = load_text_encoder(text_encoder_path, dtype=dtype, device=device, load_in_8bit=load_in_8bit,
                                max_length=max_length or DEFAULT_MAX_LENGTH)
    processor = load_embeddings_processor(
        checkpoint, dtype=dtype, device=device, with_feature_extractor=True,
        gemma_hidden_size=encoder.model.config.hidden_size, gemma_num_hidden_states=encoder.num_hidden_states,
        text_encoder_path=text_encoder_path,
    )
    try:
        features = []
        for prompt in prompts:
            out = encoder.encode_text([prompt], processor)
            features.append(PromptFeatures(*(t.detach().cpu() for t in out)))
    finally:
        del encoder, processor
        free_memory()
    logger.info("encoded %d prompts with Gemma from %s and freed it", len(prompts), text_encoder_path)
    return features


def free_memory() -> None:
    """Collect garbage and return cached accelerator memory to the driver."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _as_batch1(features: PromptFeatures, name: str) -> PromptFeatures:
    video, audio, mask = features
    if video.ndim == 2:
        video, audio, mask = video[None], None if audio is None else audio[None], mask[None]
    if video.ndim != 3 or video.shape[0] != 1 or mask.shape != video.shape[:2]:
        raise ValueError(f"{name}: expected video_prompt_embeds [S, C] or [1, S, C] and a mask [S] / [1, S], got "
                         f"{tuple(video.shape)} and {tuple(mask.shape)}")
    if audio is not None and audio.shape[:2] != video.shape[:2]:
        raise ValueError(f"{name}: audio_prompt_embeds {tuple(audio.shape)} and video_prompt_embeds "
                         f"{tuple(video.shape)} differ in batch or length")
    return PromptFeatures(video, audio, mask)


def _text_contexts(
    models: GenerationModels, features: PromptFeatures, *, with_audio: bool, dtype: torch.dtype, name: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Connectors on cached features -> (video context [1, S, D], audio context [1, S, Da] or None).

    The contexts go to the transformer unmasked: with learnable registers (every official checkpoint) the
    connectors leave no padding; without them the padded positions are zeros.
    """
    video, audio, mask = _as_batch1(features, name)
    processor = models.text_processor
    weight = next(processor.parameters())
    if with_audio and audio is None:
        raise ValueError(f"{name}: audio_prompt_embeds are needed to generate audio")
    context = processor(
        video.to(device=weight.device, dtype=weight.dtype),
        audio.to(device=weight.device, dtype=weight.dtype) if with_audio else None,
        mask.to(weight.device),
    )
    video_context = context.video_context.to(dtype)
    audio_context = context.audio_context.to(dtype) if with_audio else None
    return video_context, audio_context


def _prompt_features(models: GenerationModels, request: GenerationRequest, *, negative: bool) -> PromptFeatures:
    cached = request.negative_prompt_features if negative else request.prompt_features
    if cached is not None:
        return cached
    text = request.negative_prompt if negative else request.prompt
    if models.text_encoder is None:
        what = "negative_prompt_features (CFG is on: guidance.cfg_scale != 1)" if negative else "prompt_features"
        raise ValueError(f"GenerationModels.text_encoder is None, so the {'negative ' if negative else ''}prompt "
                         f"cannot be encoded from text; pass {what} (see encode_prompts)")
    return models.text_encoder.encode_text([text], models.text_processor)


# -------------------------------------------------------------------------------------------------------------
# Conditioning inputs


def resize_cover_crop(frames_FHWC: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize ``uint8 [F, h, w, 3]`` frames to cover ``height x width`` (aspect kept; bilinear with antialiasing)
    and center-crop to exactly that size. Returns ``uint8 [F, height, width, 3]``."""
    if frames_FHWC.ndim != 4 or frames_FHWC.shape[-1] != 3 or frames_FHWC.dtype != torch.uint8:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames_FHWC.dtype} {tuple(frames_FHWC.shape)}")
    h, w = frames_FHWC.shape[1:3]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    top, left = (new_h - height) // 2, (new_w - width) // 2
    chunks = []
    for chunk in frames_FHWC.split(_RESIZE_CHUNK_FRAMES):
        x = chunk.permute(0, 3, 1, 2).float()
        if (new_h, new_w) != (h, w):
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        x = x[:, :, top : top + height, left : left + width]
        chunks.append(x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1))
    return torch.cat(chunks).contiguous()


def _load_frames(value: Path | torch.Tensor, name: str, max_frames: int) -> torch.Tensor:
    if isinstance(value, Path):
        if not value.is_file():
            raise ValueError(f"{name}: file not found: {value}")
        return read_video(value, max_frames=max_frames).frames
    frames = value
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"{name}: expected uint8 RGB frames [F, H, W, 3] or [H, W, 3], got {frames.dtype} "
                         f"{tuple(value.shape)}")
    return frames[:max_frames].cpu()


def _vae_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    weight = next(module.parameters())
    return weight.device, weight.dtype


def _is_large(num_frames: int, height: int, width: int) -> bool:
    return max(height, width) > TILE_SIZE_PX or num_frames > TILE_FRAMES + 1


@torch.no_grad()
def encode_frames(encoder: nn.Module, frames_FHWC: torch.Tensor) -> torch.Tensor:
    """``uint8 [F, H, W, 3]`` (F = 8k + 1) -> normalised latents ``[1, C, F', H', W']`` float32, on the encoder's
    device; tiled when large and the encoder offers ``tiled_encode``."""
    device, dtype = _vae_device_dtype(encoder)
    video = frames_FHWC.to(device).permute(3, 0, 1, 2)[None].to(dtype) / 127.5 - 1.0
    num_frames, height, width = frames_FHWC.shape[:3]
    if _is_large(num_frames, height, width) and hasattr(encoder, "tiled_encode"):
        latents = encoder.tiled_encode(video, tile_size_px=TILE_SIZE_PX, tile_overlap_px=TILE_OVERLAP_PX,
                                       tile_frames=TILE_FRAMES, tile_overlap_frames=TILE_OVERLAP_FRAMES)
        return latents.float().clone()  # a normal tensor (tiled_encode runs in inference mode)
    return encoder(video).float()


def prepare_conditioning(video_encoder: nn.Module | None, request: GenerationRequest) -> Conditioning:
    """Read, resize/crop and encode the request's first-frame image and IC-LoRA reference (see the module doc)."""
    if request.condition_image is None and request.reference_video is None:
        return Conditioning()
    if video_encoder is None:
        raise ValueError("image or reference conditioning needs the video VAE encoder (GenerationModels."
                         "video_encoder is None)")
    image_latents = reference_latents = reference_frames = None
    if request.condition_image is not None:
        image = _load_frames(request.condition_image, "condition_image", 1)
        image = resize_cover_crop(image[:1], request.height, request.width)
        image_latents = encode_frames(video_encoder, image)
    if request.reference_video is not None:
        frames = _load_frames(request.reference_video, "reference_video", request.num_frames)
        usable = (frames.shape[0] - 1) // 8 * 8 + 1
        if usable < frames.shape[0]:
            logger.info("reference video: using the first %d of %d frames (8k + 1)", usable, frames.shape[0])
        n = request.reference_downscale_factor
        reference_frames = resize_cover_crop(frames[:usable], request.height // n, request.width // n)
        reference_latents = encode_frames(video_encoder, reference_frames)
    return Conditioning(image_latents=image_latents, reference_latents=reference_latents,
                        reference_frames=reference_frames)


# -------------------------------------------------------------------------------------------------------------
# LoRA for inference


@torch.no_grad()
def apply_lora(transformer: nn.Module, lora: LoraFile, *, strength: float = 1.0) -> list[str]:
    """Fuse a LoRA into the transformer's weights: ``W += strength * scale * B @ A`` (fp32 math), per module.

    ``scale`` is the file's (``alpha / rank`` where the file has an alpha key, else 1; see
    :func:`ltxf.checkpoint.load_lora_file`). Every module named by the file must be an ``nn.Linear`` of the
    transformer with matching shapes. Returns the fused module names.
    """
    names = sorted(lora.scales)
    missing = [n for n in names if not isinstance(_get_submodule(transformer, n), nn.Linear)]
    if missing:
        raise ValueError(f"the LoRA targets {len(missing)} modules that are not Linear layers of this transformer, "
                         f"e.g. {missing[:3]} (a LoRA for another model?)")
    for name in names:
        linear = transformer.get_submodule(name)
        a, b = lora.tensors[f"{name}.lora_A.weight"], lora.tensors[f"{name}.lora_B.weight"]
        if (b.shape[0], a.shape[1]) != tuple(linear.weight.shape):
            raise ValueError(f"LoRA module {name}: B @ A is {(b.shape[0], a.shape[1])} but the weight is "
                             f"{tuple(linear.weight.shape)}")
        weight = linear.weight
        delta = (strength * lora.scales[name]) * (b.to(weight.device, torch.float32) @ a.to(weight.device,
                                                                                              torch.float32))
        weight.copy_((weight.float() + delta).to(weight.dtype))
    logger.info("fused a LoRA into %d modules (strength %g)", len(names), strength)
    return names


def _get_submodule(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


# -------------------------------------------------------------------------------------------------------------
# Sampling and decoding


def _model_dtype(models: GenerationModels) -> torch.dtype:
    if models.autocast_dtype is not None:
        return models.autocast_dtype
    return next(models.transformer.parameters()).dtype


def _require_encoder(encoder: nn.Module | None, what: str, condition: SampleCondition) -> nn.Module:
    if encoder is None:
        raise ValueError(f"condition {condition.type!r} ({condition.modality}) needs GenerationModels.{what}")
    return encoder


def clip_latents(encoder: nn.Module, path: Path, *, max_frames: int, height: int, width: int) -> torch.Tensor:
    """A clip's first ``8k + 1 <= max_frames`` frames, resized to cover ``height x width`` and centre-cropped,
    encoded: ``[1, C, F', H', W']`` float32."""
    frames = _load_frames(Path(path), str(path), max_frames)
    usable = (frames.shape[0] - 1) // 8 * 8 + 1
    return encode_frames(encoder, resize_cover_crop(frames[:usable], height, width))


@torch.no_grad()
def audio_tokens(encoder: nn.Module, path: Path, *, duration: float, from_end: bool = False) -> torch.Tensor:
    """``duration`` seconds of an audio file (its start, or its end with ``from_end``) encoded and patchified:
    ``[1, T, Z * M]`` float32."""
    from ltxf.models.audio_vae import encode_audio

    audio = read_audio(Path(path))
    count = min(audio.num_samples, max(1, int(duration * audio.sample_rate)))
    waveform = audio.waveform[:, -count:] if from_end else audio.waveform[:, :count]
    weight = next(encoder.parameters())
    return patchify_audio(encode_audio(encoder, waveform.to(weight.device), audio.sample_rate).float())


def _placed(tokens_BKC: torch.Tensor, total: int, *, at_end: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens`` at the start (or end) of a ``total``-token sequence: (clean tokens ``[1, total, C]``, mask)."""
    count = min(tokens_BKC.shape[1], total)
    part = tokens_BKC[:, -count:] if at_end else tokens_BKC[:, :count]
    clean = torch.zeros(1, total, tokens_BKC.shape[2], device=tokens_BKC.device)
    mask = torch.zeros(1, total, device=tokens_BKC.device)
    span = slice(total - count, total) if at_end else slice(0, count)
    clean[:, span] = part
    mask[:, span] = 1.0
    return clean, mask


def _fit_length(tokens_BTC: torch.Tensor, length: int) -> torch.Tensor:
    """Crop or zero-pad tokens to ``length`` (an audio file a little shorter than the clip)."""
    if tokens_BTC.shape[1] >= length:
        return tokens_BTC[:, :length]
    return F.pad(tokens_BTC, (0, 0, 0, length - tokens_BTC.shape[1]))


def _encode_video_condition(models: GenerationModels, request: GenerationRequest, condition: SampleCondition
                            ) -> EncodedCondition:
    """Intrinsic video conditions (first_frame, prefix, suffix, spatial_crop, mask) as (clean tokens, mask) on the
    generated grid."""
    from ltxf.prep.buckets import Bucket
    from ltxf.prep.process import load_video_mask
    from ltxf.strategies.flexible import Grid, spatial_crop_mask

    encoder = _require_encoder(models.video_encoder, "video_encoder", condition)
    frames, height, width = request.latent_size
    per_frame = height * width
    total = frames * per_frame
    if condition.type == "first_frame":
        image = resize_cover_crop(_load_frames(condition.path, "first_frame", 1)[:1], request.height, request.width)
        clean, mask = _placed(patchify_video(encode_frames(encoder, image)), total, at_end=False)
        return EncodedCondition(condition=condition, clean_BTC=clean, mask_BT=mask)
    max_frames = {"prefix": condition.num_frames, "suffix": 10**6}.get(condition.type, request.num_frames)
    latents = clip_latents(encoder, condition.path, max_frames=max_frames, height=request.height,
                           width=request.width)
    tokens = patchify_video(latents)
    if condition.type in ("prefix", "suffix"):
        if condition.type == "suffix":
            tokens = tokens[:, -(condition.num_frames // 8) * per_frame:]
        clean, mask = _placed(tokens, total, at_end=condition.type == "suffix")
        return EncodedCondition(condition=condition, clean_BTC=clean, mask_BT=mask)
    if tokens.shape[1] != total:
        raise ValueError(f"condition {condition.type!r}: {condition.path} gives {latents.shape[2]} latent frames, "
                         f"the sample has {frames} (it needs at least {request.num_frames} frames)")
    if condition.type == "spatial_crop":
        mask_T = spatial_crop_mask(Grid(num_frames=frames, height=height, width=width), condition.spatial_region)
    else:
        bucket = Bucket(width=request.width, height=request.height, num_frames=request.num_frames)
        mask_T = load_video_mask(condition.mask_path, bucket).flatten()
    return EncodedCondition(condition=condition, clean_BTC=tokens, mask_BT=mask_T[None].to(tokens.device))


def _encode_audio_condition(models: GenerationModels, request: GenerationRequest, condition: SampleCondition
                            ) -> EncodedCondition:
    """Intrinsic audio conditions (prefix, suffix, mask) as (clean tokens, mask) on the generated audio grid."""
    from ltxf.prep.process import load_audio_mask

    encoder = _require_encoder(models.audio_encoder, "audio_encoder", condition)
    total = audio_latent_length(request.num_frames, request.frame_rate)
    if condition.type in ("prefix", "suffix"):
        tokens = audio_tokens(encoder, condition.path, duration=condition.duration,
                              from_end=condition.type == "suffix")
        clean, mask = _placed(tokens, total, at_end=condition.type == "suffix")
    else:
        clean = _fit_length(audio_tokens(encoder, condition.path, duration=request.num_frames / request.frame_rate),
                            total)
        mask = load_audio_mask(condition.mask_path, total)[None].to(clean.device)
    return EncodedCondition(condition=condition, clean_BTC=clean, mask_BT=mask)


def _encode_reference_or_given(models: GenerationModels, request: GenerationRequest, condition: SampleCondition
                               ) -> EncodedCondition:
    """References (video: ``1 / downscale`` size, frames 0, S, 2S, ..., positions on the target's axes as in
    training, :func:`ltxf.strategies.flexible.video_reference_positions`; audio: own positions) and the frozen
    modality of video_to_audio / audio_to_video."""
    from ltxf.strategies.flexible import Grid, video_reference_positions

    duration = request.num_frames / request.frame_rate
    num_audio = audio_latent_length(request.num_frames, request.frame_rate)
    if condition.modality == "audio":
        encoder = _require_encoder(models.audio_encoder, "audio_encoder", condition)
        tokens = audio_tokens(encoder, condition.path, duration=duration)
        if condition.type == "audio_to_video":
            return EncodedCondition(condition=condition, tokens_BRC=_fit_length(tokens, num_audio))
        return EncodedCondition(condition=condition, tokens_BRC=tokens,
                                positions=audio_positions(1, tokens.shape[1], device=tokens.device))
    encoder = _require_encoder(models.video_encoder, "video_encoder", condition)
    if condition.type == "video_to_audio":
        latents = clip_latents(encoder, condition.path, max_frames=request.num_frames, height=request.height,
                               width=request.width)
        if latents.shape[2] != request.latent_size[0]:
            raise ValueError(f"video_to_audio: {condition.path} gives {latents.shape[2]} latent frames, the sample "
                             f"has {request.latent_size[0]} (it needs {request.num_frames} frames)")
        return EncodedCondition(condition=condition, tokens_BRC=patchify_video(latents))
    n, s_factor = condition.downscale_factor, condition.temporal_scale_factor
    check_reference_downscale_factor(n, request.width, request.height, "reference downscale_factor")
    frames = _load_frames(Path(condition.path), str(condition.path), request.num_frames)[::s_factor]
    usable = (frames.shape[0] - 1) // 8 * 8 + 1
    frames = resize_cover_crop(frames[:usable], request.height // n, request.width // n)
    latents = encode_frames(encoder, frames)
    _, _, ref_f, ref_h, ref_w = latents.shape
    fps = torch.tensor([float(request.frame_rate)])
    positions = video_reference_positions(Grid(num_frames=ref_f, height=ref_h, width=ref_w), fps / s_factor, fps,
                                          spatial=n, temporal=s_factor)
    return EncodedCondition(condition=condition, tokens_BRC=patchify_video(latents),
                            positions=positions.to(latents.device), frames=frames)


@torch.no_grad()
def encode_conditions(models: GenerationModels, request: GenerationRequest) -> tuple[EncodedCondition, ...]:
    """Read and encode every ``request.conditions`` entry once (the validator caches the result on the CPU)."""
    encoded = []
    for condition in request.conditions:
        if condition.type in ("reference", "video_to_audio", "audio_to_video"):
            encoded.append(_encode_reference_or_given(models, request, condition))
        elif condition.modality == "video":
            encoded.append(_encode_video_condition(models, request, condition))
        else:
            encoded.append(_encode_audio_condition(models, request, condition))
    return tuple(encoded)


def _apply_conditions(state: LatentState, encoded: Sequence[EncodedCondition], modality: str, *, intrinsic: bool
                      ) -> LatentState:
    for item in encoded:
        condition = item.condition
        if condition.modality != modality or condition.type in ("video_to_audio", "audio_to_video"):
            continue
        if intrinsic and item.clean_BTC is not None:
            state = condition_tokens(state, item.clean_BTC.to(state.clean_latent.device),
                                     item.mask_BT.to(state.denoise_mask.device), strength=condition.strength)
        elif not intrinsic and condition.type == "reference":
            state = append_reference_tokens(state, item.tokens_BRC.to(state.latent.device),
                                            item.positions.to(state.positions.device))
    return state


@torch.no_grad()
def sample(
    models: GenerationModels,
    request: GenerationRequest,
    *,
    conditioning: Conditioning | None = None,
    batch_passes: bool = True,
) -> SampledLatents:
    """Run the denoising loop for ``request`` and return the generated latents (nothing decoded).

    ``conditioning`` reuses already encoded inputs (the validator encodes them once); otherwise they are prepared
    from the request with ``models.video_encoder``. ``request.conditions`` are encoded here (video ones with
    ``models.video_encoder``, audio ones with ``models.audio_encoder``). ``batch_passes`` batches the guidance
    passes into one forward (faster; False uses less activation memory).
    """
    transformer = models.transformer
    config = getattr(transformer, "config", None)
    if config is None or not hasattr(config, "num_layers"):
        raise ValueError("GenerationModels.transformer must expose .config (an AVTransformer)")
    device = next(transformer.parameters()).device
    model_dtype = _model_dtype(models)
    by_type = {c.type: c for c in request.conditions}
    video_given, audio_given = by_type.get("video_to_audio"), by_type.get("audio_to_video")
    make_video = request.generate_video and video_given is None
    make_audio = request.generate_audio and audio_given is None
    with_audio = make_audio or audio_given is not None
    with_video = make_video or video_given is not None
    if make_audio and (models.audio_decoder is None or models.vocoder is None):
        raise ValueError("generate_audio=True needs the audio VAE decoder and the vocoder in GenerationModels "
                         "(or set generate_audio=False)")
    if conditioning is None:
        conditioning = prepare_conditioning(models.video_encoder, request)
    encoded = conditioning.conditions if conditioning.conditions is not None else encode_conditions(models, request)

    guidance = request.guidance
    audio_guidance = request.audio_guidance or guidance
    video_context, audio_context = _text_contexts(
        models, _prompt_features(models, request, negative=False), with_audio=with_audio, dtype=model_dtype,
        name="prompt_features")
    negative_video = negative_audio = None
    if guidance.uses_cfg or audio_guidance.uses_cfg:
        negative_video, negative_audio = _text_contexts(
            models, _prompt_features(models, request, negative=True), with_audio=with_audio, dtype=model_dtype,
            name="negative_prompt_features")

    num_latent_frames, latent_height, latent_width = request.latent_size
    num_tokens = num_latent_frames * latent_height * latent_width
    num_audio_frames = audio_latent_length(request.num_frames, request.frame_rate)
    generator = torch.Generator(device=device).manual_seed(request.seed)
    video_grid = video_positions(1, num_latent_frames, latent_height, latent_width, request.frame_rate,
                                 device=device)
    video_state = None
    reference_frames = conditioning.reference_frames
    if make_video:
        video_noise = torch.randn(1, num_tokens, config.in_channels, generator=generator, device=device)
        # As the official pipelines: the target's first latent frame is a keyframe (LTX-2.5 embedding; ignored
        # by models without it), also when an image condition replaces it.
        video_state = init_latent_state(
            torch.zeros(1, num_tokens, config.in_channels, device=device), video_grid,
            keyframes_mask_BT=first_frame_keyframes_mask(1, num_tokens, latent_height * latent_width, device=device))
        if conditioning.image_latents is not None:
            video_state = condition_video_frame(video_state, conditioning.image_latents.to(device, torch.float32))
        video_state = noise_state(_apply_conditions(video_state, encoded, "video", intrinsic=True), video_noise)
        if conditioning.reference_latents is not None:
            video_state = append_reference_video(video_state, conditioning.reference_latents.to(device, torch.float32),
                                                 request.frame_rate, spatial_scale=request.reference_downscale_factor)
        video_state = _apply_conditions(video_state, encoded, "video", intrinsic=False)
        reference_frames = next((e.frames for e in encoded if e.frames is not None), reference_frames)
    elif video_given is not None:
        tokens = next(e.tokens_BRC for e in encoded if e.condition.type == "video_to_audio")
        video_state = frozen_state(tokens.to(device), video_grid, keyframes_mask_BT=first_frame_keyframes_mask(
            1, num_tokens, latent_height * latent_width, device=device))

    audio_state = None
    audio_grid = audio_positions(1, num_audio_frames, device=device)
    if make_audio:
        audio_noise = torch.randn(1, num_audio_frames, config.audio_in_channels, generator=generator, device=device)
        audio_state = init_latent_state(torch.zeros_like(audio_noise), audio_grid)
        audio_state = noise_state(_apply_conditions(audio_state, encoded, "audio", intrinsic=True), audio_noise)
        audio_state = _apply_conditions(audio_state, encoded, "audio", intrinsic=False)
    elif audio_given is not None:
        tokens = next(e.tokens_BRC for e in encoded if e.condition.type == "audio_to_video")
        audio_state = frozen_state(tokens.to(device), audio_grid)

    # The shift of the schedule follows the size of what is generated (reference tokens excluded).
    sigmas = ltx2_sigma_schedule(request.num_inference_steps, num_tokens if make_video else num_audio_frames)
    logger.info("sampling %dx%dx%d (%s%s), %d steps, cfg %g/%g, stg %g/%g", request.width, request.height,
                request.num_frames, f"{num_tokens} video tokens" if make_video else "no video generated",
                f", {num_audio_frames} audio tokens" if make_audio else "", request.num_inference_steps,
                guidance.cfg_scale, audio_guidance.cfg_scale, guidance.stg_scale, audio_guidance.stg_scale)
    video_x, audio_x = denoise(
        transformer, video_state, audio_state, sigmas=sigmas, video_context=video_context if with_video else None,
        audio_context=audio_context, negative_video_context=negative_video if with_video else None,
        negative_audio_context=negative_audio, guidance=guidance, audio_guidance=audio_guidance,
        num_layers=config.num_layers, batch_passes=batch_passes, autocast_dtype=models.autocast_dtype,
    )
    video_latents = None
    if video_x is not None:
        video_latents = unpatchify_video(video_x[:, :num_tokens], num_latent_frames, latent_height, latent_width)
    audio_latents = None
    if audio_x is not None:
        if models.audio_decoder is None:
            raise ValueError("audio (generated or given) needs the audio VAE decoder and the vocoder to be written")
        audio_config = models.audio_decoder.config
        if audio_config.z_channels * audio_config.latent_mel_bins != audio_x.shape[-1]:
            raise ValueError(f"the transformer's audio tokens have {audio_x.shape[-1]} channels but the audio VAE "
                             f"expects {audio_config.z_channels} x {audio_config.latent_mel_bins}")
        audio_latents = unpatchify_audio(audio_x[:, :num_audio_frames], audio_config.z_channels,
                                         audio_config.latent_mel_bins)
    if reference_frames is not conditioning.reference_frames or conditioning.conditions is None:
        conditioning = Conditioning(image_latents=conditioning.image_latents,
                                    reference_latents=conditioning.reference_latents,
                                    reference_frames=reference_frames, conditions=encoded)
    return SampledLatents(video_latents=video_latents, audio_latents=audio_latents, conditioning=conditioning)


@torch.no_grad()
def decode_video_latents(
    decoder: nn.Module, latents_BCFHW: torch.Tensor, *, seed: int, tiled: bool | None = None
) -> torch.Tensor:
    """Normalised latents ``[1, C, F', H', W']`` -> ``uint8 [F, H, W, 3]`` on the CPU.

    Tiled when ``tiled`` (or, with None, when the output is large) and the decoder has ``tiled_decode``. A
    timestep-conditioned (LTX-2) decoder mixes in noise drawn from a generator seeded with ``seed``.
    """
    device, dtype = _vae_device_dtype(decoder)
    latents = latents_BCFHW.to(device=device, dtype=dtype)
    config = getattr(decoder, "config", None)
    generator = None
    if getattr(config, "timestep_conditioning", False):
        generator = torch.Generator(device=device).manual_seed(seed)
    num_frames = (latents.shape[2] - 1) * 8 + 1
    if tiled is None:
        tiled = _is_large(num_frames, latents.shape[3] * 32, latents.shape[4] * 32)
    if tiled and hasattr(decoder, "tiled_decode"):
        video = decoder.tiled_decode(latents, tile_size_px=TILE_SIZE_PX, tile_overlap_px=TILE_OVERLAP_PX,
                                     tile_frames=TILE_FRAMES, tile_overlap_frames=TILE_OVERLAP_FRAMES,
                                     generator=generator)
    else:
        video = decoder(latents, None, generator)
    # [-1, 1] -> [0, 255], then [1, 3, F, H, W] -> [F, H, W, 3]
    frames = ((video[0].float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().contiguous()


@torch.no_grad()
def decode_audio_latents(audio_decoder: nn.Module, vocoder: nn.Module, latents_BZTM: torch.Tensor
                         ) -> tuple[torch.Tensor, int]:
    """Normalised audio latents ``[1, Z, T, M]`` -> (``float32 [2, N]`` CPU waveform, the vocoder's rate)."""
    decoder_weight = next(audio_decoder.parameters())
    mel = audio_decoder(latents_BZTM.to(device=decoder_weight.device, dtype=decoder_weight.dtype))
    vocoder_weight = next(vocoder.parameters())
    waveform = vocoder(mel.to(device=vocoder_weight.device, dtype=vocoder_weight.dtype))
    return waveform[0].float().cpu().contiguous(), int(vocoder.output_sample_rate)


def side_by_side(left_FHWC: torch.Tensor, right_FHWC: torch.Tensor) -> torch.Tensor:
    """``left`` resized to ``right``'s height (aspect kept) and placed to its left; the shorter clip is padded by
    repeating its last frame. Both ``uint8 [F, H, W, 3]``."""
    height = right_FHWC.shape[1]
    width = max(1, round(left_FHWC.shape[2] * height / left_FHWC.shape[1]))
    width += width % 2  # keep the total width even for yuv420p
    left = resize_cover_crop(left_FHWC, height, width)
    num_frames = max(left.shape[0], right_FHWC.shape[0])

    def pad(frames: torch.Tensor) -> torch.Tensor:
        extra = num_frames - frames.shape[0]
        return frames if extra == 0 else torch.cat([frames, frames[-1:].expand(extra, -1, -1, -1)])

    return torch.cat([pad(left), pad(right_FHWC)], dim=2).contiguous()


@torch.no_grad()
def decode(models: GenerationModels, sampled: SampledLatents, request: GenerationRequest) -> GeneratedClip:
    """Decode sampled latents to a :class:`GeneratedClip`: frames (generated, or the given video muxed in) and
    audio (generated or given); no frames for audio only."""
    if sampled.video_latents is None:
        audio, sample_rate = decode_audio_latents(models.audio_decoder, models.vocoder, sampled.audio_latents)
        return GeneratedClip(frames=None, fps=float(request.frame_rate), audio=audio, audio_sample_rate=sample_rate)
    frames = decode_video_latents(models.video_decoder, sampled.video_latents, seed=request.seed,
                                  tiled=request.tiled_decode)
    if request.include_reference_in_output:
        reference = sampled.conditioning.reference_frames
        if reference is None:
            raise ValueError("include_reference_in_output: the conditioning has no reference frames")
        frames = side_by_side(reference.cpu(), frames)
    audio = sample_rate = None
    if sampled.audio_latents is not None:
        audio, sample_rate = decode_audio_latents(models.audio_decoder, models.vocoder, sampled.audio_latents)
    return GeneratedClip(frames=frames, fps=float(request.frame_rate), audio=audio, audio_sample_rate=sample_rate)


@torch.no_grad()
def generate(
    models: GenerationModels,
    request: GenerationRequest,
    *,
    conditioning: Conditioning | None = None,
    batch_passes: bool = True,
) -> GeneratedClip:
    """Generate one clip: :func:`sample` then :func:`decode` (see the module docstring for the pipeline)."""
    return decode(models, sample(models, request, conditioning=conditioning, batch_passes=batch_passes), request)


# -------------------------------------------------------------------------------------------------------------
# Output files


def save_clip(path: str | Path, clip: GeneratedClip, *, crf: int = 18) -> Path:
    """Write ``clip``: ``.mp4`` (H.264 yuv420p at ``crf``, plus a stereo AAC track at the clip's audio rate when it
    has audio), ``.png`` (one frame, no audio) or ``.wav`` (audio only). Returns the path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".wav":
        if clip.audio is None:
            raise ValueError(f"{path}: a .wav needs audio but the clip has none")
        write_audio(path, clip.audio, clip.audio_sample_rate)
        return path
    if clip.frames is None:
        raise ValueError(f"{path}: the clip is audio only; write it as .wav")
    if suffix == ".png":
        if clip.num_frames != 1:
            raise ValueError(f"{path}: a .png holds one frame but the clip has {clip.num_frames}; use .mp4")
        write_image(path, clip.frames[0])
    elif suffix == ".mp4":
        write_video(path, clip.frames, clip.fps, audio=clip.audio, audio_sample_rate=clip.audio_sample_rate, crf=crf)
    else:
        raise ValueError(f"{path}: unsupported output extension {path.suffix!r}; expected .mp4 or .png")
    return path


def clip_suffix(num_frames: int) -> str:
    """The file extension the official trainer uses: ``.wav`` for audio only (0 frames), ``.png`` for one frame,
    else ``.mp4``."""
    return ".wav" if num_frames == 0 else ".png" if num_frames == 1 else ".mp4"


def describe_clip(clip: GeneratedClip) -> str:
    """A one-line summary for logs: frames, size, fps, audio rate and duration."""
    if clip.frames is None:
        return f"audio only, {clip.audio.shape[0]} ch at {clip.audio_sample_rate} Hz ({clip.audio_duration:.3f} s)"
    frames, height, width = clip.frames.shape[:3]
    text = f"{frames} frames {width}x{height} at {clip.fps:g} fps ({frames / clip.fps:.3f} s)"
    if clip.audio is not None:
        text += f", audio {clip.audio.shape[0]} ch at {clip.audio_sample_rate} Hz ({clip.audio_duration:.3f} s)"
    return text


__all__ = [
    "DEFAULT_NEGATIVE_PROMPT",
    "Conditioning",
    "GeneratedClip",
    "GenerationModels",
    "GenerationRequest",
    "SampleCondition",
    "SampledLatents",
    "apply_lora",
    "check_reference_downscale_factor",
    "clip_suffix",
    "decode",
    "decode_audio_latents",
    "decode_video_latents",
    "describe_clip",
    "encode_conditions",
    "encode_frames",
    "encode_prompts",
    "free_memory",
    "generate",
    "prepare_conditioning",
    "resize_cover_crop",
    "sample",
    "save_clip",
    "side_by_side",
]
