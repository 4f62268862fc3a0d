"""The LTX-2 / LTX-2.3 audio VAE: a causal 2-D convolutional encoder and decoder over stereo log-mel spectrograms.

The encoder maps a (B, 2, T, 64) log-mel spectrogram to (B, 8, T', 16) latents, T' = (T - 1) // 4 + 1 (two
stride-2 levels, causal in time), normalised per channel with the dataset statistics stored in the checkpoint.
Those statistics are indexed like the transformer's 128-wide audio tokens: channel c, mel bin f is entry
``c * 16 + f``. The decoder inverts the normalisation and maps latents back to (B, 2, 4 T' - 3, 64).

Both are built from the checkpoint's ``audio_vae`` config section (``model.params.ddconfig`` and
``preprocessing``); their state-dict keys equal the official checkpoint's after stripping ``audio_vae.encoder.`` /
``audio_vae.decoder.``, with the statistics under ``per_channel_statistics.`` (from
``audio_vae.per_channel_statistics.``).

Shape legend:
    B  batch
    C  feature channels
    T  time (mel frames, or latent frames after the encoder)
    F  frequency (mel bins, or latent frequency bins)
    Z  latent channels
    N  T * F positions (attention)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ltxf.models.checkpoint import (
    AUDIO_VAE_DECODER_PREFIX,
    AUDIO_VAE_ENCODER_PREFIX,
    AUDIO_VAE_STATISTICS_PREFIX,
    check_nothing_on_meta,
    config_section,
    load_state_dict_strict,
    read_config,
    read_tensors,
)
from ltxf.models.mel import MelConfig, log_mel_spectrogram, mel_config_from_checkpoint

logger = logging.getLogger(__name__)

CausalityAxis = Literal["height", "width", "width-compatibility", "none"]
NormType = Literal["pixel", "group"]

LATENT_TIME_DOWNSAMPLE = 4
"""Mel frames per latent frame (two stride-2 levels in the shipped configs)."""

_STATISTICS_KEY = "per_channel_statistics."


@dataclass(frozen=True, kw_only=True)
class AudioVAEConfig:
    """Architecture of the audio VAE (``audio_vae.model.params.ddconfig``), with ltx-core's code defaults.

    The shipped checkpoints set ``attn_resolutions=[]`` and ``mid_block_add_attention=False``, unlike the code
    defaults; configs are always read from the checkpoint, so the defaults matter only for absent keys.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (8, 16, 32)
    """Attention after the ResNet blocks of a level whose nominal ``resolution`` is listed."""
    resolution: int = 256
    """Nominal input size; only used to decide where attention goes (halved at every level)."""
    in_channels: int = 2
    out_ch: int = 2
    z_channels: int = 8
    double_z: bool = True
    mid_block_add_attention: bool = True
    norm_type: NormType = "pixel"
    causality_axis: CausalityAxis = "height"
    """'height' is the time axis of the (B, C, T, F) spectrogram."""
    attn_type: Literal["vanilla", "none"] = "vanilla"
    dropout: float = 0.0
    mel: MelConfig = field(default_factory=MelConfig)

    def __post_init__(self) -> None:
        if self.ch <= 0 or not self.ch_mult or any(m <= 0 for m in self.ch_mult) or self.num_res_blocks < 1:
            raise ValueError(
                f"audio VAE needs ch > 0, a non-empty positive ch_mult and num_res_blocks >= 1, got ch={self.ch}, "
                f"ch_mult={self.ch_mult}, num_res_blocks={self.num_res_blocks}"
            )
        if self.norm_type not in ("pixel", "group"):
            raise ValueError(f"audio VAE norm_type must be 'pixel' or 'group', got {self.norm_type!r}")
        if self.causality_axis not in ("height", "width", "width-compatibility", "none"):
            raise ValueError(
                "audio VAE causality_axis must be one of 'height', 'width', 'width-compatibility' or None, got "
                f"{self.causality_axis!r}"
            )
        if self.causality_axis != "none" and self.norm_type == "group":
            raise ValueError("audio VAE: GroupNorm mixes time steps, so it cannot be used with a causal axis")
        if self.norm_type == "group" and any(c % 32 for c in self._all_widths()):
            raise ValueError(f"audio VAE: GroupNorm(32) needs every width divisible by 32, got {self._all_widths()}")
        if self.attn_type not in ("vanilla", "none"):
            raise ValueError(f"audio VAE attn_type must be 'vanilla' or 'none', got {self.attn_type!r}")
        if not self.double_z:
            # ltx-core 1.0.0 keeps only half of the channels in that case; no checkpoint uses it.
            raise ValueError("audio VAE: only double_z=True is supported (every LTX-2 checkpoint uses it)")
        if self.ch != self.z_channels * self.latent_mel_bins:
            raise ValueError(
                f"audio VAE: the per-channel statistics have ch={self.ch} entries but the latents flatten to "
                f"z_channels * latent mel bins = {self.z_channels} * {self.latent_mel_bins} = "
                f"{self.z_channels * self.latent_mel_bins}; the reference requires them to be equal"
            )

    def _all_widths(self) -> list[int]:
        return [self.ch, *(self.ch * m for m in self.ch_mult)]

    @property
    def num_levels(self) -> int:
        return len(self.ch_mult)

    @property
    def latent_mel_bins(self) -> int:
        """Frequency bins of the latents (16 for 64 mels and three levels)."""
        bins = self.mel.num_mels
        pad = _downsample_padding(self.causality_axis)
        for _ in range(self.num_levels - 1):
            bins = (bins + pad[0] + pad[1] - 3) // 2 + 1
        return bins

    def num_latent_frames(self, num_mel_frames: int) -> int:
        """Latent frames the encoder makes from ``num_mel_frames`` mel frames."""
        frames = num_mel_frames
        pad = _downsample_padding(self.causality_axis)
        for _ in range(self.num_levels - 1):
            frames = (frames + pad[2] + pad[3] - 3) // 2 + 1
        return frames

    def num_decoded_frames(self, num_latent_frames: int) -> int:
        """Mel frames the decoder returns for ``num_latent_frames`` latents (4 T' - 3 when causal)."""
        frames = num_latent_frames * LATENT_TIME_DOWNSAMPLE
        if self.causality_axis != "none":
            frames = max(frames - (LATENT_TIME_DOWNSAMPLE - 1), 1)
        return frames

    @classmethod
    def from_checkpoint(cls, audio_vae_config: Mapping, path: str | Path = "<config>") -> AudioVAEConfig:
        """Build from a checkpoint's ``audio_vae`` section (ltx-core's key names and defaults)."""
        model = audio_vae_config.get("model", {})
        params = model.get("params", {}) if isinstance(model, Mapping) else {}
        dd = params.get("ddconfig", {}) if isinstance(params, Mapping) else {}
        if not isinstance(dd, Mapping):
            raise ValueError(f"{path}: audio_vae.model.params.ddconfig must be an object, got {type(dd).__name__}")
        causality = dd.get("causality_axis", "height")
        if dd.get("resamp_with_conv", True) is not True:
            raise ValueError(
                f"{path}: audio_vae ddconfig resamp_with_conv = {dd['resamp_with_conv']!r} is not supported (every "
                "checkpoint resamples with convolutions; ltx-core's decoder always does)"
            )
        try:
            return cls(
                ch=int(dd.get("ch", 128)),
                ch_mult=tuple(int(m) for m in dd.get("ch_mult", (1, 2, 4))),
                num_res_blocks=int(dd.get("num_res_blocks", 2)),
                attn_resolutions=tuple(int(r) for r in dd.get("attn_resolutions", (8, 16, 32))),
                resolution=int(dd.get("resolution", 256)),
                in_channels=int(dd.get("in_channels", 2)),
                out_ch=int(dd.get("out_ch", 2)),
                z_channels=int(dd.get("z_channels", 8)),
                double_z=bool(dd.get("double_z", True)),
                mid_block_add_attention=bool(dd.get("mid_block_add_attention", True)),
                norm_type=dd.get("norm_type", "pixel"),
                causality_axis="none" if causality is None else causality,
                attn_type=dd.get("attn_type", "vanilla"),
                dropout=float(dd.get("dropout", 0.0)),
                mel=mel_config_from_checkpoint(audio_vae_config, path),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: invalid audio_vae config: {exc}") from exc


# -------------------------------------------------------------------------------------------------------------
# Building blocks


def _conv_padding(causality_axis: CausalityAxis, kernel_size: int) -> tuple[int, int, int, int]:
    """F.pad order (freq left, freq right, time top, time bottom): all of the causal axis' padding goes first."""
    total = kernel_size - 1
    half = (total // 2, total - total // 2)
    if causality_axis == "height":
        return (*half, total, 0)
    if causality_axis in ("width", "width-compatibility"):
        return (total, 0, *half)
    return (*half, *half)


def _downsample_padding(causality_axis: CausalityAxis) -> tuple[int, int, int, int]:
    """Padding before the 3x3 stride-2 conv, in F.pad order."""
    return {
        "none": (0, 1, 0, 1),
        "width": (2, 0, 0, 1),
        "height": (0, 1, 2, 0),
        "width-compatibility": (1, 0, 0, 1),
    }[causality_axis]


class PaddedConv2d(nn.Module):
    """Stride-1 conv with explicit (possibly one-sided) padding, so outputs never see later time steps."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, causality_axis: CausalityAxis):
        super().__init__()
        self.padding = _conv_padding(causality_axis, kernel_size)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size)

    def forward(self, x_BCTF: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x_BCTF, self.padding))


class PixelNorm(nn.Module):
    """RMS normalisation over channels at every position (no parameters)."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x_BCTF: torch.Tensor) -> torch.Tensor:
        return x_BCTF * torch.rsqrt(x_BCTF.square().mean(dim=1, keepdim=True) + self.eps)


def _make_norm(channels: int, norm_type: NormType) -> nn.Module:
    if norm_type == "group":
        return nn.GroupNorm(32, channels, eps=1e-6, affine=True)
    return PixelNorm(eps=1e-6)


class ResnetBlock(nn.Module):
    """norm -> SiLU -> conv, twice, plus a (1x1-projected where the width changes) skip."""

    def __init__(self, in_channels: int, out_channels: int, config: AudioVAEConfig):
        super().__init__()
        axis = config.causality_axis
        self.norm1 = _make_norm(in_channels, config.norm_type)
        self.conv1 = PaddedConv2d(in_channels, out_channels, 3, axis)
        self.norm2 = _make_norm(out_channels, config.norm_type)
        self.dropout = nn.Dropout(config.dropout)
        self.conv2 = PaddedConv2d(out_channels, out_channels, 3, axis)
        if in_channels != out_channels:
            self.nin_shortcut = PaddedConv2d(in_channels, out_channels, 1, axis)

    def forward(self, x_BCTF: torch.Tensor) -> torch.Tensor:
        h_BCTF = self.conv1(F.silu(self.norm1(x_BCTF)))
        h_BCTF = self.conv2(self.dropout(F.silu(self.norm2(h_BCTF))))
        skip_BCTF = self.nin_shortcut(x_BCTF) if hasattr(self, "nin_shortcut") else x_BCTF
        return skip_BCTF + h_BCTF


class AttnBlock(nn.Module):
    """Single-head self-attention over all time-frequency positions (not causal), with a residual."""

    def __init__(self, channels: int, norm_type: NormType):
        super().__init__()
        self.norm = _make_norm(channels, norm_type)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x_BCTF: torch.Tensor) -> torch.Tensor:
        B, C, T, Fq = x_BCTF.shape
        h_BCTF = self.norm(x_BCTF)
        q_BNC, k_BNC, v_BNC = (proj(h_BCTF).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out_BNC = F.scaled_dot_product_attention(q_BNC, k_BNC, v_BNC)
        out_BCTF = out_BNC.transpose(1, 2).reshape(B, C, T, Fq)
        return x_BCTF + self.proj_out(out_BCTF)


def _make_attn(channels: int, config: AudioVAEConfig) -> nn.Module:
    return AttnBlock(channels, config.norm_type) if config.attn_type == "vanilla" else nn.Identity()


class Downsample(nn.Module):
    """3x3 stride-2 conv after explicit padding (causal along the causal axis)."""

    def __init__(self, channels: int, causality_axis: CausalityAxis):
        super().__init__()
        self.padding = _downsample_padding(causality_axis)
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x_BCTF: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x_BCTF, self.padding))


class Upsample(nn.Module):
    """Nearest 2x, then a conv; when causal, the first step along the causal axis is dropped (it sees only the
    padding and a copy of step 0), so L steps become 2 L - 1: the inverse of the encoder's causal stride 2."""

    def __init__(self, channels: int, causality_axis: CausalityAxis):
        super().__init__()
        self.causality_axis = causality_axis
        self.conv = PaddedConv2d(channels, channels, 3, causality_axis)

    def forward(self, x_BCTF: torch.Tensor) -> torch.Tensor:
        x_BCTF = self.conv(F.interpolate(x_BCTF, scale_factor=2.0, mode="nearest"))
        if self.causality_axis == "height":
            return x_BCTF[:, :, 1:, :]
        if self.causality_axis == "width":
            return x_BCTF[:, :, :, 1:]
        return x_BCTF


class MidBlock(nn.Module):
    def __init__(self, channels: int, config: AudioVAEConfig):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, config)
        self.attn_1 = _make_attn(channels, config) if config.mid_block_add_attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, config)

    def forward(self, x_BCTF: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x_BCTF)))


class Level(nn.Module):
    """One resolution level: ResNet blocks, each optionally followed by attention, then a resampler."""

    def __init__(self, widths: list[tuple[int, int]], with_attention: bool, config: AudioVAEConfig):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin, cout, config) for cin, cout in widths)
        self.attn = nn.ModuleList(_make_attn(cout, config) for _, cout in widths) if with_attention else nn.ModuleList()

    def run_blocks(self, x_BCTF: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x_BCTF = block(x_BCTF)
            if len(self.attn):
                x_BCTF = self.attn[i](x_BCTF)
        return x_BCTF


class PerChannelStatistics(nn.Module):
    """Dataset mean and std of the 128-wide flattened latents (entry c * F + f), from the checkpoint."""

    def __init__(self, num_features: int):
        super().__init__()
        self.register_buffer("std-of-means", torch.ones(num_features))
        self.register_buffer("mean-of-means", torch.zeros(num_features))

    def _as_grid(self, name: str, like_BZTF: torch.Tensor) -> torch.Tensor:
        # Flattening (B, Z, T, F) to (B, T, Z * F) and back is the same as broadcasting the stats as (Z, 1, F).
        Z, Fq = like_BZTF.shape[1], like_BZTF.shape[3]
        return self.get_buffer(name).to(like_BZTF.dtype).reshape(Z, 1, Fq)

    def normalize(self, x_BZTF: torch.Tensor) -> torch.Tensor:
        return (x_BZTF - self._as_grid("mean-of-means", x_BZTF)) / self._as_grid("std-of-means", x_BZTF)

    def denormalize(self, x_BZTF: torch.Tensor) -> torch.Tensor:
        return x_BZTF * self._as_grid("std-of-means", x_BZTF) + self._as_grid("mean-of-means", x_BZTF)


# -------------------------------------------------------------------------------------------------------------
# Encoder and decoder


class AudioEncoder(nn.Module):
    """Log-mel (B, 2, T, M) -> normalised latents (B, Z, T', F'); (B, 8, (T - 1) // 4 + 1, 16) when shipped."""

    def __init__(self, config: AudioVAEConfig):
        super().__init__()
        self.config = config
        axis = config.causality_axis
        self.per_channel_statistics = PerChannelStatistics(config.ch)
        self.conv_in = PaddedConv2d(config.in_channels, config.ch, 3, axis)
        widths = [config.ch, *(config.ch * m for m in config.ch_mult)]
        resolution = config.resolution
        self.down = nn.ModuleList()
        for level in range(config.num_levels):
            block_widths = [(widths[level] if i == 0 else widths[level + 1], widths[level + 1])
                            for i in range(config.num_res_blocks)]
            stage = Level(block_widths, resolution in config.attn_resolutions, config)
            if level != config.num_levels - 1:
                stage.downsample = Downsample(widths[level + 1], axis)
                resolution //= 2
            self.down.append(stage)
        self.mid = MidBlock(widths[-1], config)
        self.norm_out = _make_norm(widths[-1], config.norm_type)
        self.conv_out = PaddedConv2d(widths[-1], 2 * config.z_channels, 3, axis)

    def forward(self, mel_BCTF: torch.Tensor) -> torch.Tensor:
        """Encode a log-mel spectrogram (B, in_channels, T, mel bins); returns the normalised means."""
        if mel_BCTF.ndim != 4 or mel_BCTF.shape[1] != self.config.in_channels:
            raise ValueError(
                f"AudioEncoder expects a (batch, {self.config.in_channels}, frames, mel bins) log-mel spectrogram, "
                f"got {tuple(mel_BCTF.shape)}"
            )
        if mel_BCTF.shape[3] != self.config.mel.num_mels:
            raise ValueError(
                f"AudioEncoder expects {self.config.mel.num_mels} mel bins, got {mel_BCTF.shape[3]} "
                f"(input shape {tuple(mel_BCTF.shape)})"
            )
        h_BCTF = self.conv_in(mel_BCTF)
        for stage in self.down:
            h_BCTF = stage.run_blocks(h_BCTF)
            if hasattr(stage, "downsample"):
                h_BCTF = stage.downsample(h_BCTF)
        h_BCTF = self.mid(h_BCTF)
        h_BCTF = self.conv_out(F.silu(self.norm_out(h_BCTF)))
        # conv_out predicts means and log-variances; the deterministic encoding keeps the means.
        means_BZTF = h_BCTF[:, : self.config.z_channels]
        return self.per_channel_statistics.normalize(means_BZTF)


class AudioDecoder(nn.Module):
    """Normalised latents (B, Z, T', F') -> log-mel (B, out_ch, 4 T' - 3, M) (4 T' frames when not causal)."""

    def __init__(self, config: AudioVAEConfig):
        super().__init__()
        self.config = config
        axis = config.causality_axis
        self.per_channel_statistics = PerChannelStatistics(config.ch)
        top_width = config.ch * config.ch_mult[-1]
        self.conv_in = PaddedConv2d(config.z_channels, top_width, 3, axis)
        self.mid = MidBlock(top_width, config)
        resolution = config.resolution // 2 ** (config.num_levels - 1)
        stages: list[Level] = []
        width = top_width
        for level in reversed(range(config.num_levels)):
            out_width = config.ch * config.ch_mult[level]
            block_widths = [(width if i == 0 else out_width, out_width) for i in range(config.num_res_blocks + 1)]
            stage = Level(block_widths, resolution in config.attn_resolutions, config)
            width = out_width
            if level != 0:
                stage.upsample = Upsample(width, axis)
                resolution *= 2
            stages.append(stage)
        # Index i holds level i, so the checkpoint's up.0 is the full-resolution level.
        self.up = nn.ModuleList(reversed(stages))
        self.norm_out = _make_norm(width, config.norm_type)
        self.conv_out = PaddedConv2d(width, config.out_ch, 3, axis)

    def forward(self, latents_BZTF: torch.Tensor) -> torch.Tensor:
        """Decode normalised latents (B, z_channels, T', F') to a log-mel spectrogram."""
        if latents_BZTF.ndim != 4 or latents_BZTF.shape[1] != self.config.z_channels:
            raise ValueError(
                f"AudioDecoder expects latents of shape (batch, {self.config.z_channels}, frames, "
                f"{self.config.latent_mel_bins}), got {tuple(latents_BZTF.shape)}"
            )
        num_frames = self.config.num_decoded_frames(latents_BZTF.shape[2])
        num_mels = self.config.mel.num_mels
        h_BCTF = self.conv_in(self.per_channel_statistics.denormalize(latents_BZTF))
        h_BCTF = self.mid(h_BCTF)
        for level in reversed(range(self.config.num_levels)):
            stage = self.up[level]
            h_BCTF = stage.run_blocks(h_BCTF)
            if level != 0:
                h_BCTF = stage.upsample(h_BCTF)
        mel_BCTF = self.conv_out(F.silu(self.norm_out(h_BCTF)))
        mel_BCTF = mel_BCTF[:, :, :num_frames, :num_mels]
        # The upsampled grid can come out shorter than the target; the reference zero-pads then.
        pad_frames, pad_mels = num_frames - mel_BCTF.shape[2], num_mels - mel_BCTF.shape[3]
        if pad_frames > 0 or pad_mels > 0:
            mel_BCTF = F.pad(mel_BCTF, (0, max(pad_mels, 0), 0, max(pad_frames, 0)))
        return mel_BCTF


# -------------------------------------------------------------------------------------------------------------
# Loading and convenience entry points


def _select_component(prefix: str) -> Callable[[str], str | None]:
    def select(key: str) -> str | None:
        if key.startswith(prefix):
            return key[len(prefix) :]
        if key.startswith(AUDIO_VAE_STATISTICS_PREFIX):
            return _STATISTICS_KEY + key[len(AUDIO_VAE_STATISTICS_PREFIX) :]
        return None

    return select


def _load(
    cls: type[nn.Module], prefix: str, path: str | Path, dtype: torch.dtype, device: torch.device | str
) -> nn.Module:
    path = Path(path)
    config = AudioVAEConfig.from_checkpoint(config_section(read_config(path), "audio_vae", path), path)
    with torch.device("meta"):
        module = cls(config)
    tensors = read_tensors(path, _select_component(prefix), dtype=dtype, device=device)
    load_state_dict_strict(module, tensors, source=path)
    check_nothing_on_meta(module, path)
    logger.info("loaded %s from %s (%s, %s)", cls.__name__, path, dtype, device)
    return module.eval().requires_grad_(False)


def load_audio_vae_encoder(
    path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> AudioEncoder:
    """Build the audio VAE encoder from an official checkpoint's config and load its weights strictly.

    Reads only ``audio_vae.encoder.*`` and ``audio_vae.per_channel_statistics.*``. Returned frozen, in eval mode.
    """
    return _load(AudioEncoder, AUDIO_VAE_ENCODER_PREFIX, path, dtype, device)


def load_audio_vae_decoder(
    path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> AudioDecoder:
    """Build the audio VAE decoder from an official checkpoint's config and load its weights strictly.

    Reads only ``audio_vae.decoder.*`` and ``audio_vae.per_channel_statistics.*``. Returned frozen, in eval mode.
    """
    return _load(AudioDecoder, AUDIO_VAE_DECODER_PREFIX, path, dtype, device)


@torch.inference_mode()
def encode_audio(encoder: AudioEncoder, waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Waveform (S,), (C, S) or (B, C, S) at ``sample_rate`` Hz -> normalised latents (B, Z, T', F').

    Runs the log-mel front end (resampling to the encoder's rate, mono duplicated to stereo) in float32 on the
    encoder's device, then the encoder in its own dtype.
    """
    weight = encoder.conv_in.conv.weight
    mel_BCTF = log_mel_spectrogram(waveform.to(weight.device), sample_rate, encoder.config.mel)
    return encoder(mel_BCTF.to(weight.dtype))
