"""Building blocks of the LTX-2 / LTX-2.3 video VAE: frame-padded 3-D convolutions, residual blocks, pixel
shuffles between space/time and channels, the latent statistics and the decoder's timestep embedding.

Attribute names (``conv``, ``conv1``, ``norm3``, ``conv_shortcut``, ``res_blocks``, ``time_embedder``,
``timestep_embedder.linear_1``, ``scale_shift_table``, ``per_channel_scale1``, ...) are forced by the official
checkpoint's state-dict keys; everything else is ours.

Shape legend:
    B  batch
    C  channels
    F  frames (video or latent)
    H  height
    W  width
    D  embedding width
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

NormLayer = Literal["pixel_norm", "group_norm"]
PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]
Stride3 = tuple[int, int, int]

_GROUP_NORM_GROUPS = 32
_NORM_EPS = 1e-6
_TIMESTEP_FEATURES = 256


class PixelNorm(nn.Module):
    """Divide each position by the root-mean-square of its channels (no parameters)."""

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x_BCFHW: torch.Tensor) -> torch.Tensor:
        return x_BCFHW * torch.rsqrt(x_BCFHW.square().mean(dim=1, keepdim=True) + self.eps)


def make_norm(kind: NormLayer, num_channels: int) -> nn.Module:
    """The feature norm used before every convolution: ``PixelNorm`` or 32-group ``GroupNorm``."""
    if kind == "pixel_norm":
        return PixelNorm()
    return nn.GroupNorm(_GROUP_NORM_GROUPS, num_channels, eps=_NORM_EPS, affine=True)


class CausalConv3d(nn.Module):
    """A 3x3x3 convolution whose time axis is padded by repeating edge frames.

    Causal: the first frame is repeated ``k - 1`` times in front, so frame ``t`` only sees frames ``<= t``.
    Non-causal: the first and the last frame are each repeated ``(k - 1) / 2`` times. Height and width are
    padded inside ``nn.Conv3d`` with ``padding_mode``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        causal: bool,
        padding_mode: PaddingMode,
        stride: Stride3 = (1, 1, 1),
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv3d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=(0, kernel_size // 2, kernel_size // 2),
            padding_mode=padding_mode,
        )
        pad = kernel_size - 1
        self.time_pad = (pad, 0) if causal else (pad // 2, pad // 2)

    def forward(self, x_BCFHW: torch.Tensor) -> torch.Tensor:
        front, back = self.time_pad
        if front or back:
            x_BCFHW = F.pad(x_BCFHW, (0, 0, 0, 0, front, back), mode="replicate")
        return self.conv(x_BCFHW)


# ---------------------------------------------------------------------------------------------------------
# Pixel shuffles


def space_to_depth(x_BCFHW: torch.Tensor, stride: Stride3) -> torch.Tensor:
    """Fold (pt, ph, pw) blocks into channels; channel index is ``((c * pt + i) * ph + j) * pw + k``."""
    pt, ph, pw = stride
    b, c, f, h, w = x_BCFHW.shape
    x = x_BCFHW.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * pt * ph * pw, f // pt, h // ph, w // pw)


def depth_to_space(x_BCFHW: torch.Tensor, stride: Stride3) -> torch.Tensor:
    """Inverse of :func:`space_to_depth`."""
    pt, ph, pw = stride
    b, c, f, h, w = x_BCFHW.shape
    x = x_BCFHW.reshape(b, c // (pt * ph * pw), pt, ph, pw, f, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c // (pt * ph * pw), f * pt, h * ph, w * pw)


def patchify(video_BCFHW: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, F, H, W) -> (B, C p p, F, H/p, W/p). The official channel order is (c, w-offset, h-offset)."""
    if patch_size == 1:
        return video_BCFHW
    b, c, f, h, w = video_BCFHW.shape
    p = patch_size
    x = video_BCFHW.reshape(b, c, f, h // p, p, w // p, p)
    x = x.permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, f, h // p, w // p)


def unpatchify(x_BCFHW: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    if patch_size == 1:
        return x_BCFHW
    b, c, f, h, w = x_BCFHW.shape
    p = patch_size
    x = x_BCFHW.reshape(b, c // (p * p), p, p, f, h, w)
    x = x.permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, c // (p * p), f, h * p, w * p)


# ---------------------------------------------------------------------------------------------------------
# Latent statistics and timestep embedding


class LatentStatistics(nn.Module):
    """Per-channel dataset statistics of the latent means (the checkpoint's hyphenated buffer names)."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.register_buffer("std-of-means", torch.empty(num_channels))
        self.register_buffer("mean-of-means", torch.empty(num_channels))

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        std_C = self.get_buffer("std-of-means").to(like)
        mean_C = self.get_buffer("mean-of-means").to(like)
        return std_C.view(1, -1, 1, 1, 1), mean_C.view(1, -1, 1, 1, 1)

    def normalize(self, x_BCFHW: torch.Tensor) -> torch.Tensor:
        std, mean = self._stats(x_BCFHW)
        return (x_BCFHW - mean) / std

    def denormalize(self, x_BCFHW: torch.Tensor) -> torch.Tensor:
        std, mean = self._stats(x_BCFHW)
        return x_BCFHW * std + mean


def sinusoidal_features(t_B: torch.Tensor, num_features: int = _TIMESTEP_FEATURES) -> torch.Tensor:
    """[cos, sin] features of ``t`` at geometric frequencies 10000^(-i/half), computed in float32."""
    half = num_features // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half)
    angles_BD = t_B.float()[:, None] * freqs[None, :]
    return torch.cat([angles_BD.cos(), angles_BD.sin()], dim=-1)


class _TimestepMLP(nn.Module):
    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x_BD)))


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (already scaled) timestep through a two-layer SiLU MLP: (B,) -> (B, dim)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.timestep_embedder = _TimestepMLP(_TIMESTEP_FEATURES, dim)

    def forward(self, t_B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(sinusoidal_features(t_B).to(dtype))


# ---------------------------------------------------------------------------------------------------------
# Residual blocks


def _spatial_noise(x_BCFHW: torch.Tensor, scale_C11: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # One (H, W) noise image shared by every batch item, channel and frame, scaled per channel (StyleGAN-style).
    if generator is None:
        raise ValueError(
            "this VAE block injects noise; pass generator=torch.Generator(device).manual_seed(seed) to the decoder"
        )
    noise_HW = torch.randn(x_BCFHW.shape[-2:], generator=generator, dtype=x_BCFHW.dtype, device=x_BCFHW.device)
    return x_BCFHW + (noise_HW[None] * scale_C11.to(x_BCFHW))[None, :, None]


class ResBlock(nn.Module):
    """norm -> SiLU -> conv -> norm -> SiLU -> conv, plus a skip (1x1x1 conv after a LayerNorm-like GroupNorm(1)
    when the width changes). Optionally timestep-modulated (AdaLN on both norms) and with per-channel noise."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        norm: NormLayer,
        causal: bool,
        padding_mode: PaddingMode,
        inject_noise: bool = False,
        timestep_conditioning: bool = False,
    ) -> None:
        super().__init__()
        self.inject_noise = inject_noise
        self.timestep_conditioning = timestep_conditioning
        conv_kwargs = dict(causal=causal, padding_mode=padding_mode)
        self.norm1 = make_norm(norm, in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, **conv_kwargs)
        self.norm2 = make_norm(norm, out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels, **conv_kwargs)
        if inject_noise:
            # The checkpoint sizes both scales by the input width.
            self.per_channel_scale1 = nn.Parameter(torch.zeros(in_channels, 1, 1))
            self.per_channel_scale2 = nn.Parameter(torch.zeros(in_channels, 1, 1))
        if in_channels != out_channels:
            self.norm3 = nn.GroupNorm(1, in_channels, eps=_NORM_EPS, affine=True)
            self.conv_shortcut = nn.Conv3d(in_channels, out_channels, kernel_size=1)
        else:
            self.norm3 = None
            self.conv_shortcut = None
        if timestep_conditioning:
            self.scale_shift_table = nn.Parameter(torch.zeros(4, in_channels))

    def forward(
        self,
        x_BCFHW: torch.Tensor,
        temb_BD: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        h = self.norm1(x_BCFHW)
        if self.timestep_conditioning:
            assert temb_BD is not None, "a timestep-conditioned block needs its stage's embedding"
            ada_B4C = self.scale_shift_table[None].to(h) + temb_BD.view(h.shape[0], 4, -1)
            shift1, scale1, shift2, scale2 = (v[:, :, None, None, None] for v in ada_B4C.unbind(dim=1))
            h = h * (1 + scale1) + shift1
        h = self.conv1(F.silu(h))
        if self.inject_noise:
            h = _spatial_noise(h, self.per_channel_scale1, generator)
        h = self.norm2(h)
        if self.timestep_conditioning:
            h = h * (1 + scale2) + shift2
        h = self.conv2(F.silu(h))
        if self.inject_noise:
            h = _spatial_noise(h, self.per_channel_scale2, generator)
        skip = x_BCFHW
        if self.conv_shortcut is not None:
            skip = self.conv_shortcut(self.norm3(skip))
        return skip + h


class ResStage(nn.Module):
    """``num_layers`` same-width residual blocks; a timestep-conditioned stage owns one time embedder that all
    of its blocks share (each block adds its own ``scale_shift_table``)."""

    def __init__(
        self,
        channels: int,
        num_layers: int,
        *,
        norm: NormLayer,
        causal: bool,
        padding_mode: PaddingMode,
        inject_noise: bool = False,
        timestep_conditioning: bool = False,
    ) -> None:
        super().__init__()
        self.timestep_conditioning = timestep_conditioning
        if timestep_conditioning:
            self.time_embedder = TimestepEmbedder(4 * channels)
        self.res_blocks = nn.ModuleList(
            ResBlock(
                channels,
                channels,
                norm=norm,
                causal=causal,
                padding_mode=padding_mode,
                inject_noise=inject_noise,
                timestep_conditioning=timestep_conditioning,
            )
            for _ in range(num_layers)
        )

    def forward(
        self,
        x_BCFHW: torch.Tensor,
        t_B: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        temb_BD = None
        if self.timestep_conditioning:
            assert t_B is not None, "a timestep-conditioned stage needs the scaled timestep"
            temb_BD = self.time_embedder(t_B, x_BCFHW.dtype)
        for block in self.res_blocks:
            x_BCFHW = block(x_BCFHW, temb_BD, generator)
        return x_BCFHW


# ---------------------------------------------------------------------------------------------------------
# Resampling


class SpaceToDepthDown(nn.Module):
    """Encoder ``compress_*_res``: a causal conv to ``out/prod(stride)`` channels folded into ``out`` channels by
    space-to-depth, plus a parameter-free skip (space-to-depth of the input, averaged over channel groups).

    With a time stride of 2 the first frame is duplicated first, so 1 + 2k frames become 1 + k.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: Stride3, *, padding_mode: PaddingMode) -> None:
        super().__init__()
        factor = math.prod(stride)
        self.stride = stride
        self.skip_group = in_channels * factor // out_channels
        self.conv = CausalConv3d(in_channels, out_channels // factor, causal=True, padding_mode=padding_mode)

    def forward(self, x_BCFHW: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 2:
            x_BCFHW = torch.cat([x_BCFHW[:, :, :1], x_BCFHW], dim=2)
        skip = space_to_depth(x_BCFHW, self.stride)
        b, c, f, h, w = skip.shape
        skip = skip.view(b, c // self.skip_group, self.skip_group, f, h, w).mean(dim=2)
        return space_to_depth(self.conv(x_BCFHW), self.stride) + skip


class DepthToSpaceUp(nn.Module):
    """Decoder ``compress_*``: a conv to ``prod(stride) * C / reduction`` channels unfolded by depth-to-space.

    With a time stride of 2 the first output frame is dropped, so k frames become 2k - 1 (the causal first
    latent frame stands for one video frame). ``residual`` adds the depth-to-space of the input, its channels
    tiled to the output width.
    """

    def __init__(
        self,
        in_channels: int,
        stride: Stride3,
        *,
        reduction: int,
        residual: bool,
        causal: bool,
        padding_mode: PaddingMode,
    ) -> None:
        super().__init__()
        factor = math.prod(stride)
        self.stride = stride
        self.residual = residual
        self.skip_repeats = factor // reduction
        self.conv = CausalConv3d(
            in_channels, factor * in_channels // reduction, causal=causal, padding_mode=padding_mode
        )

    def forward(self, x_BCFHW: torch.Tensor) -> torch.Tensor:
        y = depth_to_space(self.conv(x_BCFHW), self.stride)
        if self.residual:
            skip = depth_to_space(x_BCFHW, self.stride).repeat(1, self.skip_repeats, 1, 1, 1)
            y = y + skip
        if self.stride[0] == 2:
            y = y[:, :, 1:]
        return y
