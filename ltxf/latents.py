"""Latent layout helpers shared by training and sampling: token (de)flattening and RoPE positions.

The transformer sees both modalities as token sequences of 128 channels:

* video latents ``[B, 128, F, H, W]`` (8x temporal, 32x spatial VAE compression, causal in time: latent frame
  0 holds one pixel frame, every later latent frame holds 8) become ``F*H*W`` tokens, frame-major, each token a
  1x1x1 patch;
* audio latents ``[B, 8, T, 16]`` (8 channels x 16 mel bins, 25 latent frames per second) become ``T`` tokens of
  ``8*16`` channels, channel-major (``c f -> (c f)``).

Positions are ``[start, end)`` bounds per token and axis, ``[B, A, T, 2]``: video axes are (time in seconds,
height in pixels, width in pixels), audio has one axis (seconds). They are computed in float32: a bf16 cast
(as the seed trainer does) moves a 4.84 s time bound by 4e-3 s.

Shape legend: B batch, C channels, F latent frames, H latent height, W latent width, T tokens, M mel bins,
D token width, A position axes.
"""

from __future__ import annotations

import torch

VIDEO_LATENT_CHANNELS = 128
VIDEO_TEMPORAL_SCALE = 8
VIDEO_SPATIAL_SCALE = 32
AUDIO_LATENT_CHANNELS = 8
AUDIO_MEL_BINS = 16
AUDIO_SAMPLE_RATE = 16000
AUDIO_HOP_LENGTH = 160
AUDIO_LATENT_DOWNSAMPLE = 4
AUDIO_LATENTS_PER_SECOND = AUDIO_SAMPLE_RATE / AUDIO_HOP_LENGTH / AUDIO_LATENT_DOWNSAMPLE  # 25.0


def patchify_video(latents_BCFHW: torch.Tensor) -> torch.Tensor:
    """Flatten video latents ``[B, C, F, H, W]`` into tokens ``[B, F*H*W, C]`` (frame-major, then rows, columns)."""
    if latents_BCFHW.ndim != 5:
        raise ValueError(f"video latents must be [B, C, F, H, W], got shape {tuple(latents_BCFHW.shape)}")
    return latents_BCFHW.flatten(2).transpose(1, 2)


def unpatchify_video(tokens_BTC: torch.Tensor, num_frames: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`patchify_video`: tokens ``[B, F*H*W, C]`` back to ``[B, C, F, H, W]``."""
    if tokens_BTC.ndim != 3 or tokens_BTC.shape[1] != num_frames * height * width:
        raise ValueError(
            f"video tokens must be [B, {num_frames}*{height}*{width}={num_frames * height * width}, C] for "
            f"(F, H, W) = ({num_frames}, {height}, {width}), got shape {tuple(tokens_BTC.shape)}"
        )
    batch_size, _, num_channels = tokens_BTC.shape
    return tokens_BTC.transpose(1, 2).reshape(batch_size, num_channels, num_frames, height, width)


def patchify_audio(latents_BCTM: torch.Tensor) -> torch.Tensor:
    """Flatten audio latents ``[B, C, T, M]`` into tokens ``[B, T, C*M]`` (channel-major inside a token)."""
    if latents_BCTM.ndim != 4:
        raise ValueError(f"audio latents must be [B, C, T, M], got shape {tuple(latents_BCTM.shape)}")
    batch_size, _, num_frames, _ = latents_BCTM.shape
    return latents_BCTM.transpose(1, 2).reshape(batch_size, num_frames, -1)


def unpatchify_audio(
    tokens_BTD: torch.Tensor, num_channels: int = AUDIO_LATENT_CHANNELS, num_mel_bins: int = AUDIO_MEL_BINS
) -> torch.Tensor:
    """Inverse of :func:`patchify_audio`: tokens ``[B, T, C*M]`` back to ``[B, C, T, M]``."""
    if tokens_BTD.ndim != 3 or tokens_BTD.shape[2] != num_channels * num_mel_bins:
        raise ValueError(
            f"audio tokens must be [B, T, {num_channels}*{num_mel_bins}={num_channels * num_mel_bins}], "
            f"got shape {tuple(tokens_BTD.shape)}"
        )
    batch_size, num_frames, _ = tokens_BTD.shape
    return tokens_BTD.reshape(batch_size, num_frames, num_channels, num_mel_bins).transpose(1, 2)


def video_latent_size(num_pixel_frames: int, pixel_height: int, pixel_width: int) -> tuple[int, int, int]:
    """Latent grid ``(F, H, W)`` of a clip of ``num_pixel_frames`` frames at ``pixel_height x pixel_width``.

    The VAE needs ``F % 8 == 1`` and sides that are multiples of 32; anything else is a ``ValueError``.
    """
    if num_pixel_frames < 1 or (num_pixel_frames - 1) % VIDEO_TEMPORAL_SCALE != 0:
        raise ValueError(f"num_pixel_frames must be 8*k + 1 (1, 9, 17, ..., 121), got {num_pixel_frames}")
    for name, side in (("pixel_height", pixel_height), ("pixel_width", pixel_width)):
        if side < VIDEO_SPATIAL_SCALE or side % VIDEO_SPATIAL_SCALE != 0:
            raise ValueError(f"{name} must be a positive multiple of {VIDEO_SPATIAL_SCALE}, got {side}")
    return (
        (num_pixel_frames - 1) // VIDEO_TEMPORAL_SCALE + 1,
        pixel_height // VIDEO_SPATIAL_SCALE,
        pixel_width // VIDEO_SPATIAL_SCALE,
    )


def audio_latent_length(num_pixel_frames: int, fps: float) -> int:
    """Audio latent frames that cover a clip of ``num_pixel_frames`` video frames at ``fps``: round(F/fps * 25)."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return round(float(num_pixel_frames) / float(fps) * AUDIO_LATENTS_PER_SECOND)


def video_positions(
    batch_size: int,
    num_frames: int,
    height: int,
    width: int,
    fps: float,
    *,
    frame_offset: int = 0,
    causal_fix: bool = True,
    spatial_scale: float = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[start, end)`` positions ``[B, 3, F*H*W, 2]`` of the tokens of a ``[F, H, W]`` latent grid.

    Axis 0 is time in seconds, axes 1 and 2 are pixel rows and columns. Latent frame ``k`` covers pixel frames
    ``[8k, 8k+8)``; with ``causal_fix`` (the default, matching the causal VAE) that becomes
    ``[max(0, 8k-7), 8k+1)`` so frame 0 is the single first pixel frame. ``frame_offset`` (in pixel frames) shifts
    time, for keyframes placed later in the clip (the reference applies the causal fix only to keyframes at frame
    0, so pass ``causal_fix=False`` with a non-zero offset to match it). ``spatial_scale`` multiplies rows and
    columns: an IC-LoRA reference encoded at ``1/n`` of the target resolution is placed on the target's pixel
    grid with ``spatial_scale=n``.

    Time is computed in float32 (integer pixel frames, then divided by ``fps``) and only then cast to ``dtype``.
    """
    for name, value in (("batch_size", batch_size), ("num_frames", num_frames), ("height", height),
                        ("width", width)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    for name, value in (("fps", fps), ("spatial_scale", spatial_scale)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")

    def bounds(n: int, scale: float) -> torch.Tensor:  # [n, 2] [start, end), integer when scale is
        starts = torch.arange(n, device=device, dtype=torch.int64) * scale
        return torch.stack((starts, starts + scale), dim=-1)

    time_F2 = bounds(num_frames, VIDEO_TEMPORAL_SCALE)
    if causal_fix:
        time_F2 = (time_F2 + 1 - VIDEO_TEMPORAL_SCALE).clamp(min=0)
    time_F2 = (time_F2 + frame_offset).to(torch.float32) / fps
    rows_H2 = bounds(height, VIDEO_SPATIAL_SCALE * spatial_scale).to(torch.float32)
    cols_W2 = bounds(width, VIDEO_SPATIAL_SCALE * spatial_scale).to(torch.float32)

    grid = (num_frames, height, width, 2)
    positions_3T2 = torch.stack(
        (
            time_F2[:, None, None, :].expand(grid),
            rows_H2[None, :, None, :].expand(grid),
            cols_W2[None, None, :, :].expand(grid),
        ),
        dim=0,
    ).reshape(3, num_frames * height * width, 2)
    return positions_3T2.unsqueeze(0).expand(batch_size, -1, -1, -1).to(dtype).contiguous()


def audio_positions(
    batch_size: int,
    num_frames: int,
    *,
    frame_offset: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[start, end)`` positions ``[B, 1, T, 2]`` in seconds of ``T`` audio latent frames.

    Latent frame ``t`` covers mel frames ``[4t, 4t+4)``; the causal encoder shifts that to
    ``[max(0, 4t-3), 4t+1)``; a mel frame is 160 samples at 16 kHz (10 ms). ``frame_offset`` shifts the latent
    index (for a window cut out of a longer sequence). Computed in float32, then cast to ``dtype``.
    """
    if batch_size < 1 or num_frames < 1:
        raise ValueError(f"batch_size and num_frames must be >= 1, got {batch_size} and {num_frames}")
    index_T = torch.arange(frame_offset, frame_offset + num_frames, device=device, dtype=torch.int64)
    mel_T2 = torch.stack((index_T, index_T + 1), dim=-1) * AUDIO_LATENT_DOWNSAMPLE
    mel_T2 = (mel_T2 + 1 - AUDIO_LATENT_DOWNSAMPLE).clamp(min=0)
    seconds_T2 = mel_T2.to(torch.float32) * AUDIO_HOP_LENGTH / AUDIO_SAMPLE_RATE
    return seconds_T2.expand(batch_size, 1, num_frames, 2).to(dtype).contiguous()
