"""Text-to-video, with optional joint audio and per-sample first-frame conditioning.

Shape legend: B batch, C latent channels, F/H/W latent frames/height/width, T tokens, A audio tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from ltxf.config import FlowConfig, StrategyConfig
from ltxf.latents import audio_positions, patchify_audio, video_positions
from ltxf.models.text import TextContext
from ltxf.models.transformer import Modality
from ltxf.strategies.base import (
    ModelInputs,
    StepLosses,
    compute_losses,
    generators_from_key,
    noise_video,
    per_sample_noise,
    sample_sigmas,
    training_keyframes_mask,
)
from ltxf.timesteps import noise_latents

if TYPE_CHECKING:
    from ltxf.data import SampleInfo


def video_positions_for_batch(
    batch_size: int, num_frames: int, height: int, width: int, fps_B: torch.Tensor, *, device: torch.device,
    spatial_scale: float = 1.0,
) -> torch.Tensor:
    """Positions [B,3,T,2] (seconds, pixels, pixels) with each sample's own frame rate, in fp32."""
    positions = video_positions(batch_size, num_frames, height, width, fps=1.0, device=device,
                                spatial_scale=spatial_scale)
    seconds = positions[:, :1] / fps_B.to(device=device, dtype=positions.dtype)[:, None, None, None]
    return torch.cat([seconds, positions[:, 1:]], dim=1)


def prepare_text_to_video(
    batch: dict[str, torch.Tensor],
    context: TextContext,
    *,
    strategy: StrategyConfig,
    flow: FlowConfig,
    generators: list[torch.Generator],
    dtype: torch.dtype,
) -> ModelInputs:
    """Noise a batch of video (and audio) latents and build the transformer inputs and targets.

    Each sample draws its noise, sigma and first-frame decision from its own generator (CPU), in that order,
    so a sample's inputs depend only on (seed, step, its index in the global batch).
    """
    latents_BCFHW = batch["video_latents"]
    device = latents_BCFHW.device
    batch_size, _, num_frames, height, width = latents_BCFHW.shape
    noised = noise_video(latents_BCFHW, first_frame_p=strategy.first_frame_conditioning_p, flow=flow,
                         generators=generators)
    video = Modality(
        latent=noised.xt_BTC.to(dtype),
        sigma=noised.sigma_B,
        timesteps=noised.sigma_BT,
        positions=video_positions_for_batch(batch_size, num_frames, height, width, batch["fps"], device=device),
        context=context.video_context.to(dtype),
        context_mask=context.context_mask,
        keyframes_mask=training_keyframes_mask(strategy.keyframes_mask, batch_size, num_frames * height * width,
                                               height * width, device=device),
    )

    audio = None
    audio_target = None
    if strategy.with_audio:
        if "audio_latents" not in batch:
            raise ValueError("strategy.with_audio is set but the batch has no audio latents (audio_latents/)")
        a0_BAC = patchify_audio(batch["audio_latents"].float())
        audio_noise = per_sample_noise(tuple(a0_BAC.shape[1:]), generators).to(device)
        if strategy.independent_audio_sigma:
            audio_sigma_B = sample_sigmas(flow, noised.x0_BTC.shape[1], generators).to(device)
        else:
            audio_sigma_B = noised.sigma_B
        num_audio = a0_BAC.shape[1]
        audio_sigma_BA = audio_sigma_B[:, None].expand(batch_size, num_audio)
        audio = Modality(
            latent=noise_latents(a0_BAC, audio_noise, audio_sigma_BA).to(dtype),
            sigma=audio_sigma_B,
            timesteps=audio_sigma_BA,
            positions=audio_positions(batch_size, num_audio, device=device),
            context=context.audio_context.to(dtype),
            context_mask=context.context_mask,
        )
        audio_target = audio_noise - a0_BAC

    return ModelInputs(
        video=video,
        audio=audio,
        video_target_BTC=noised.noise_BTC - noised.x0_BTC,
        video_loss_mask_BT=~noised.cond_BT,
        audio_target_BTC=audio_target,
        sigma_B=noised.sigma_B,
    )


class TextToVideo:
    """Text-to-video (+ joint audio, + first-frame conditioning): the official trainer's default strategy."""

    name: ClassVar[str] = "text_to_video"
    config_type: ClassVar[type[StrategyConfig]] = StrategyConfig

    def __init__(self, config: StrategyConfig, *, flow: FlowConfig) -> None:
        self.config = config
        self.flow = flow

    def data_sources(self) -> tuple[str, ...]:
        return ("latents", "conditions", "audio_latents") if self.config.with_audio else ("latents", "conditions")

    def prepare_inputs(
        self, batch: Mapping[str, torch.Tensor], context: TextContext, key: torch.Tensor, *, dtype: torch.dtype,
        shared_key: torch.Tensor | None = None,
    ) -> ModelInputs:
        return prepare_text_to_video(batch, context, strategy=self.config, flow=self.flow,
                                     generators=generators_from_key(key), dtype=dtype)

    def per_sample_losses(
        self, inputs: ModelInputs, video_pred_BTC: torch.Tensor, audio_pred_BTC: torch.Tensor | None
    ) -> StepLosses:
        return compute_losses(inputs, video_pred_BTC, audio_pred_BTC, self.config.audio_loss_weight)

    def export_metadata(self, samples: Sequence[SampleInfo]) -> dict[str, str]:
        return {"ltxf_strategy": self.name}
