"""Video-to-video (IC-LoRA): clean reference tokens first (timestep 0, no loss), then the noised target.

A reference preprocessed at 1/n of the target resolution has its H and W positions multiplied by n so it lines
up with the target's pixel grid; n is inferred from the latent shapes and exported into the LoRA metadata.

Shape legend: B batch, C channels, F/H/W latent frames/height/width, T target tokens, R reference tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from ltxf.config import FlowConfig, StrategyConfig
from ltxf.latents import patchify_video
from ltxf.models.text import TextContext
from ltxf.models.transformer import Modality
from ltxf.strategies.base import (
    ModelInputs,
    StepLosses,
    compute_losses,
    generators_from_key,
    noise_video,
    training_keyframes_mask,
)
from ltxf.strategies.text_to_video import video_positions_for_batch

if TYPE_CHECKING:
    from ltxf.config import TrainConfig
    from ltxf.data import SampleInfo


@dataclass(frozen=True, kw_only=True)
class VideoToVideoConfig(StrategyConfig):
    """IC-LoRA options: the shared ones (no joint audio: IC-LoRA is video only)."""

    name: str = "video_to_video"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.with_audio:
            raise ValueError("strategy.with_audio is not supported with strategy.name='video_to_video' (IC-LoRA is "
                             "video only)")

    def check_train_config(self, cfg: TrainConfig) -> None:
        if cfg.model.training_mode != "lora":
            raise ValueError("strategy.name='video_to_video' (IC-LoRA) needs model.training_mode='lora'")


def reference_downscale_factor(target_shape: tuple[int, ...], reference_shape: tuple[int, ...]) -> int:
    """The integer factor n with target H, W = n x reference H, W (latent shapes [..., F, H, W])."""
    th, tw = target_shape[-2:]
    rh, rw = reference_shape[-2:]
    if th % rh or tw % rw or th // rh != tw // rw:
        raise ValueError(
            f"reference latents {tuple(reference_shape)} are not the target latents {tuple(target_shape)} "
            "scaled down by one integer factor in both height and width"
        )
    return th // rh


def prepare_video_to_video(
    batch: dict[str, torch.Tensor],
    context: TextContext,
    *,
    strategy: StrategyConfig,
    flow: FlowConfig,
    generators: list[torch.Generator],
    dtype: torch.dtype,
) -> ModelInputs:
    """Build IC-LoRA inputs: [reference | target] tokens; sigma is sampled from the target token count only."""
    if "reference_latents" not in batch:
        raise ValueError("strategy 'video_to_video' needs reference latents (reference_latents/) in the batch")
    target_BCFHW = batch["video_latents"]
    reference_BCFHW = batch["reference_latents"]
    device = target_BCFHW.device
    batch_size, _, num_frames, height, width = target_BCFHW.shape
    _, _, ref_frames, ref_height, ref_width = reference_BCFHW.shape
    factor = reference_downscale_factor(target_BCFHW.shape, reference_BCFHW.shape)

    noised = noise_video(target_BCFHW, first_frame_p=strategy.first_frame_conditioning_p, flow=flow,
                         generators=generators)
    ref_BRC = patchify_video(reference_BCFHW.float())
    num_ref = ref_BRC.shape[1]
    fps_B = batch["fps"]
    positions = torch.cat(
        [
            video_positions_for_batch(batch_size, ref_frames, ref_height, ref_width, fps_B, device=device,
                                      spatial_scale=float(factor)),
            video_positions_for_batch(batch_size, num_frames, height, width, fps_B, device=device),
        ],
        dim=2,
    )
    video = Modality(
        latent=torch.cat([ref_BRC, noised.xt_BTC], dim=1).to(dtype),
        sigma=noised.sigma_B,
        timesteps=torch.cat([torch.zeros(batch_size, num_ref, device=device), noised.sigma_BT], dim=1),
        positions=positions,
        context=context.video_context.to(dtype),
        context_mask=context.context_mask,
        keyframes_mask=training_keyframes_mask(strategy.keyframes_mask, batch_size, num_frames * height * width,
                                               height * width, num_leading=num_ref, device=device),
    )
    return ModelInputs(
        video=video,
        audio=None,
        video_target_BTC=noised.noise_BTC - noised.x0_BTC,
        video_loss_mask_BT=~noised.cond_BT,
        audio_target_BTC=None,
        sigma_B=noised.sigma_B,
        num_reference_tokens=num_ref,
    )


class VideoToVideo:
    """IC-LoRA: learns to generate the target given a clean reference video in the same sequence."""

    name: ClassVar[str] = "video_to_video"
    config_type: ClassVar[type[StrategyConfig]] = VideoToVideoConfig

    def __init__(self, config: StrategyConfig, *, flow: FlowConfig) -> None:
        self.config = config
        self.flow = flow

    def data_sources(self) -> tuple[str, ...]:
        return ("latents", "conditions", "reference_latents")

    def prepare_inputs(
        self, batch: Mapping[str, torch.Tensor], context: TextContext, key: torch.Tensor, *, dtype: torch.dtype,
        shared_key: torch.Tensor | None = None,
    ) -> ModelInputs:
        return prepare_video_to_video(batch, context, strategy=self.config, flow=self.flow,
                                      generators=generators_from_key(key), dtype=dtype)

    def per_sample_losses(
        self, inputs: ModelInputs, video_pred_BTC: torch.Tensor, audio_pred_BTC: torch.Tensor | None
    ) -> StepLosses:
        return compute_losses(inputs, video_pred_BTC, None, 0.0)

    def export_metadata(self, samples: Sequence[SampleInfo]) -> dict[str, str]:
        """The strategy name and the dataset's reference downscale factor (one per run), which inference needs
        to scale the reference positions."""
        factors = {reference_downscale_factor(info.video_shape, info.reference_shape) for info in samples}
        if len(factors) != 1:
            raise ValueError(f"the dataset mixes reference downscale factors {sorted(factors)}; use one per run")
        return {"ltxf_strategy": self.name, "reference_downscale_factor": str(factors.pop())}
