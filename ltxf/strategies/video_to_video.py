"""Video-to-video (IC-LoRA): clean reference tokens first (timestep 0, no loss), then the noised target.

A reference preprocessed at 1/n of the target resolution has its H and W positions multiplied by n so it lines
up with the target's pixel grid; n is inferred from the latent shapes and exported into the LoRA metadata.

Shape legend: B batch, C channels, F/H/W latent frames/height/width, T target tokens, R reference tokens.
"""

from __future__ import annotations

import torch

from ltxf.config import FlowConfig, StrategyConfig
from ltxf.latents import patchify_video
from ltxf.models.text import TextContext
from ltxf.models.transformer import Modality
from ltxf.strategies.base import (
    ModelInputs,
    first_frame_mask,
    noisy_tokens,
    per_sample_noise,
    sample_sigmas,
)
from ltxf.strategies.text_to_video import video_positions_for_batch


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

    x0_BTC = patchify_video(target_BCFHW.float())
    ref_BRC = patchify_video(reference_BCFHW.float())
    num_tokens, num_ref = x0_BTC.shape[1], ref_BRC.shape[1]

    noise_BTC = per_sample_noise(tuple(x0_BTC.shape[1:]), generators).to(device)
    sigma_B = sample_sigmas(flow, num_tokens, generators).to(device)
    cond_BT = first_frame_mask(height * width, num_tokens, strategy.first_frame_conditioning_p,
                               generators).to(device)

    sigma_BT = torch.where(cond_BT, 0.0, sigma_B[:, None].expand(batch_size, num_tokens))
    xt_BTC = noisy_tokens(x0_BTC, noise_BTC, sigma_BT)
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
        latent=torch.cat([ref_BRC, xt_BTC], dim=1).to(dtype),
        sigma=sigma_B,
        timesteps=torch.cat([torch.zeros(batch_size, num_ref, device=device), sigma_BT], dim=1),
        positions=positions,
        context=context.video_context.to(dtype),
        context_mask=context.context_mask,
    )
    return ModelInputs(
        video=video,
        audio=None,
        video_target_BTC=noise_BTC - x0_BTC,
        video_loss_mask_BT=~cond_BT,
        audio_target_BTC=None,
        sigma_B=sigma_B,
        num_reference_tokens=num_ref,
    )
