"""Vocoders: stereo log-mel spectrogram -> stereo waveform.

* LTX-2 (19B): a HiFi-GAN v1 generator (``resblock "1"``), 100 mel frames/s upsampled 240x to 24 kHz, tanh output.
* LTX-2.3 (22B): a BigVGAN-v2 generator (``resblock "AMP1"``: SnakeBeta activations wrapped in 2x anti-aliased
  resampling) making 16 kHz audio, followed by bandwidth extension (BWE): a causal log-mel of that audio (its STFT
  and mel bases are buffers from the checkpoint) drives a second BigVGAN-v2 generator whose output is a residual
  at 48 kHz, added to a 3x windowed-sinc upsampling of the 16 kHz audio and clamped to [-1, 1].

The checkpoint's ``vocoder`` config section decides which one is built: BWE exactly when it has a ``bwe`` entry.
State-dict keys equal the official checkpoint's after stripping ``vocoder.`` once (the BWE main generator's keys
are therefore ``vocoder.*``). Persistent buffers (the kaiser filters of every anti-aliased activation and the mel
STFT bases) load from the checkpoint; the skip resampler's filter is computed here and never stored.

Shape legend:
    B  batch
    C  channels (2 = stereo at the ends, feature channels inside a generator)
    N  batch * stereo channels, flattened
    T  mel frames
    M  mel bins
    S  waveform samples
    K  filter taps
    P  filter phases
    G  STFT frequency bins (n_fft // 2 + 1)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ltxf.models.checkpoint import (
    VOCODER_PREFIX,
    check_nothing_on_meta,
    config_section,
    load_state_dict_strict,
    read_config,
    read_tensors,
    strip_prefix,
)
from ltxf.models.mel import sinc_resampling_filter

logger = logging.getLogger(__name__)

_HIFIGAN_LEAKY_SLOPE = 0.1
_SNAKE_EPS = 1e-9
_NUM_STEREO_CHANNELS = 2


@dataclass(frozen=True, kw_only=True)
class GeneratorConfig:
    """One mel -> waveform generator, with ltx-core's key names and code defaults (the LTX-2 HiFi-GAN)."""

    resblock: Literal["1", "AMP1"] = "1"
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    upsample_rates: tuple[int, ...] = (6, 5, 2, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (16, 15, 8, 4, 4)
    upsample_initial_channel: int = 1024
    activation: Literal["snake", "snakebeta"] = "snake"
    """Activation of the AMP blocks (the post-activation of an AMP generator is always SnakeBeta)."""
    use_tanh_at_final: bool = True
    """tanh at the output; clamp to [-1, 1] otherwise."""
    use_bias_at_final: bool = True
    apply_final_activation: bool = True
    num_mels: int = 64
    """Mel bins per stereo channel; the first conv sees 2 * num_mels channels."""
    output_sample_rate: int = 24000

    def __post_init__(self) -> None:
        if self.resblock not in ("1", "AMP1"):
            raise ValueError(f"vocoder resblock must be '1' or 'AMP1', got {self.resblock!r}")
        if self.activation not in ("snake", "snakebeta"):
            raise ValueError(f"vocoder activation must be 'snake' or 'snakebeta', got {self.activation!r}")
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes) or not self.upsample_rates:
            raise ValueError(
                f"vocoder upsample_rates {self.upsample_rates} and upsample_kernel_sizes {self.upsample_kernel_sizes} "
                "must be non-empty and equally long"
            )
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes) or not self.resblock_kernel_sizes:
            raise ValueError(
                f"vocoder resblock_kernel_sizes {self.resblock_kernel_sizes} and resblock_dilation_sizes "
                f"{self.resblock_dilation_sizes} must be non-empty and equally long"
            )
        if any(len(d) != 3 for d in self.resblock_dilation_sizes):
            raise ValueError(
                f"vocoder resblock_dilation_sizes need 3 dilations each, got {self.resblock_dilation_sizes}"
            )
        if any(k % 2 == 0 for k in self.resblock_kernel_sizes):
            raise ValueError(f"vocoder resblock_kernel_sizes must be odd, got {self.resblock_kernel_sizes}")
        if self.upsample_initial_channel % 2 ** len(self.upsample_rates):
            raise ValueError(
                f"vocoder upsample_initial_channel {self.upsample_initial_channel} must be divisible by "
                f"2 ** {len(self.upsample_rates)} (it halves at every upsampling stage)"
            )

    @property
    def hop(self) -> int:
        """Output samples per mel frame."""
        return math.prod(self.upsample_rates)

    @classmethod
    def from_checkpoint(
        cls, section: Mapping, where: str, path: str | Path, **overrides: object
    ) -> GeneratorConfig:
        """Read the keys ltx-core reads (``where`` names the config section in error messages)."""
        try:
            values: dict = dict(
                resblock=str(section.get("resblock", "1")),
                resblock_kernel_sizes=tuple(int(k) for k in section.get("resblock_kernel_sizes", (3, 7, 11))),
                resblock_dilation_sizes=tuple(
                    tuple(int(d) for d in ds)
                    for ds in section.get("resblock_dilation_sizes", ((1, 3, 5), (1, 3, 5), (1, 3, 5)))
                ),
                upsample_rates=tuple(int(r) for r in section.get("upsample_rates", (6, 5, 2, 2, 2))),
                upsample_kernel_sizes=tuple(int(k) for k in section.get("upsample_kernel_sizes", (16, 15, 8, 4, 4))),
                upsample_initial_channel=int(section.get("upsample_initial_channel", 1024)),
                activation=section.get("activation", "snake"),
                use_tanh_at_final=bool(section.get("use_tanh_at_final", True)),
                use_bias_at_final=bool(section.get("use_bias_at_final", True)),
                output_sample_rate=int(section.get("output_sampling_rate", 24000)),
            )
            values.update(overrides)
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: invalid {where} config: {exc}") from exc


# -------------------------------------------------------------------------------------------------------------
# Anti-aliased activations (BigVGAN v2)


def _derived_buffer(make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Build a small derived tensor on CPU (cheap there; under a ``meta`` device context torch would route the
    window functions through slow reference decompositions) and place it on the current default device."""
    with torch.device("cpu"):
        value = make()
    return value.to(torch.get_default_device())


def kaiser_sinc_lowpass(cutoff: float, half_width: float, kernel_size: int) -> torch.Tensor:
    """Kaiser-windowed sinc low-pass filter, shape (1, 1, K), normalised to unit DC gain.

    ``cutoff`` and ``half_width`` (of the transition band) are in cycles per sample. The Kaiser beta comes from
    Kaiser's empirical formula for the stop-band attenuation ``A = 2.285 (K/2 - 1) pi (4 half_width) + 7.95`` dB.
    Taps sit at half-integer offsets for even K.
    """
    half = kernel_size // 2
    attenuation = 2.285 * (half - 1) * math.pi * (4 * half_width) + 7.95
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21.0) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    window_K = torch.kaiser_window(kernel_size, periodic=False, beta=beta)
    if kernel_size % 2 == 0:
        offsets_K = torch.arange(-half, half) + 0.5
    else:
        offsets_K = torch.arange(kernel_size) - half
    if cutoff == 0:
        return torch.zeros(1, 1, kernel_size)
    taps_K = 2 * cutoff * window_K * torch.sinc(2 * cutoff * offsets_K)
    return (taps_K / taps_K.sum()).reshape(1, 1, kernel_size)


class KaiserUpsample(nn.Module):
    """Upsample by ``ratio`` with a kaiser-sinc interpolation filter (edges replicated). Buffer ``filter`` is in
    the checkpoint."""

    def __init__(self, ratio: int = 2, kernel_size: int = 12):
        super().__init__()
        self.ratio = ratio
        self.kernel_size = kernel_size
        taps = _derived_buffer(lambda: kaiser_sinc_lowpass(0.5 / ratio, 0.6 / ratio, kernel_size))
        self.register_buffer("filter", taps)

    def forward(self, x_BCS: torch.Tensor) -> torch.Tensor:
        r, k = self.ratio, self.kernel_size
        pad = k // r - 1
        num_channels = x_BCS.shape[1]
        x_BCS = F.pad(x_BCS, (pad, pad), mode="replicate")
        filter_C1K = self.filter.to(x_BCS.dtype).expand(num_channels, -1, -1)
        # Zero-stuffing + filtering is a transposed conv; the gain r restores the amplitude lost to the zeros.
        y_BCS = r * F.conv_transpose1d(x_BCS, filter_C1K, stride=r, groups=num_channels)
        crop_left = pad * r + (k - r) // 2
        crop_right = pad * r + (k - r + 1) // 2
        return y_BCS[..., crop_left : y_BCS.shape[-1] - crop_right]


class KaiserLowpass(nn.Module):
    """Low-pass filter then keep every ``stride``-th sample (edges replicated). Buffer ``filter`` is in the
    checkpoint."""

    def __init__(self, cutoff: float, half_width: float, stride: int, kernel_size: int):
        super().__init__()
        self.stride = stride
        self.kernel_size = kernel_size
        self.register_buffer("filter", _derived_buffer(lambda: kaiser_sinc_lowpass(cutoff, half_width, kernel_size)))

    def forward(self, x_BCS: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size
        num_channels = x_BCS.shape[1]
        x_BCS = F.pad(x_BCS, (k // 2 - (1 - k % 2), k // 2), mode="replicate")
        filter_C1K = self.filter.to(x_BCS.dtype).expand(num_channels, -1, -1)
        return F.conv1d(x_BCS, filter_C1K, stride=self.stride, groups=num_channels)


class KaiserDownsample(nn.Module):
    def __init__(self, ratio: int = 2, kernel_size: int = 12):
        super().__init__()
        self.lowpass = KaiserLowpass(0.5 / ratio, 0.6 / ratio, ratio, kernel_size)

    def forward(self, x_BCS: torch.Tensor) -> torch.Tensor:
        return self.lowpass(x_BCS)


class Snake(nn.Module):
    """x + sin^2(a x) / a, per channel, a = exp(alpha) (log-scale parameter)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))

    def forward(self, x_BCS: torch.Tensor) -> torch.Tensor:
        a_C1 = self.alpha.exp()[:, None]
        return x_BCS + torch.sin(x_BCS * a_C1).square() / (a_C1 + _SNAKE_EPS)


class SnakeBeta(nn.Module):
    """x + sin^2(a x) / b, per channel, a = exp(alpha), b = exp(beta): frequency and magnitude decoupled."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x_BCS: torch.Tensor) -> torch.Tensor:
        a_C1, b_C1 = self.alpha.exp()[:, None], self.beta.exp()[:, None]
        return x_BCS + torch.sin(x_BCS * a_C1).square() / (b_C1 + _SNAKE_EPS)


class AntiAliasedActivation(nn.Module):
    """Periodic activations create harmonics above Nyquist; run them at twice the rate and low-pass back."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.act = act
        self.upsample = KaiserUpsample(2, 12)
        self.downsample = KaiserDownsample(2, 12)

    def forward(self, x_BCS: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.act(self.upsample(x_BCS)))


# -------------------------------------------------------------------------------------------------------------
# Generators


def _dilated_conv(channels: int, kernel_size: int, dilation: int) -> nn.Conv1d:
    return nn.Conv1d(channels, channels, kernel_size, dilation=dilation, padding=dilation * (kernel_size - 1) // 2)


class ResBlock1(nn.Module):
    """HiFi-GAN residual block: three (LeakyReLU -> dilated conv -> LeakyReLU -> conv) residual units."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(_dilated_conv(channels, kernel_size, d) for d in dilations)
        self.convs2 = nn.ModuleList(_dilated_conv(channels, kernel_size, 1) for _ in dilations)

    def forward(self, x_BCS: torch.Tensor) -> torch.Tensor:
        for conv1, conv2 in zip(self.convs1, self.convs2, strict=True):
            h_BCS = conv1(F.leaky_relu(x_BCS, _HIFIGAN_LEAKY_SLOPE))
            x_BCS = x_BCS + conv2(F.leaky_relu(h_BCS, _HIFIGAN_LEAKY_SLOPE))
        return x_BCS


class AMPBlock1(nn.Module):
    """BigVGAN-v2 residual block: like :class:`ResBlock1` with anti-aliased Snake(Beta) in place of LeakyReLU."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...], activation: str):
        super().__init__()
        act_cls = SnakeBeta if activation == "snakebeta" else Snake
        self.convs1 = nn.ModuleList(_dilated_conv(channels, kernel_size, d) for d in dilations)
        self.convs2 = nn.ModuleList(_dilated_conv(channels, kernel_size, 1) for _ in dilations)
        self.acts1 = nn.ModuleList(AntiAliasedActivation(act_cls(channels)) for _ in dilations)
        self.acts2 = nn.ModuleList(AntiAliasedActivation(act_cls(channels)) for _ in dilations)

    def forward(self, x_BCS: torch.Tensor) -> torch.Tensor:
        for conv1, conv2, act1, act2 in zip(self.convs1, self.convs2, self.acts1, self.acts2, strict=True):
            x_BCS = x_BCS + conv2(act2(conv1(act1(x_BCS))))
        return x_BCS


class WaveGenerator(nn.Module):
    """Stereo log-mel (B, 2, T, M) -> stereo waveform (B, 2, T * prod(upsample_rates)).

    The two channels' mel bins are stacked into 2 M input features; each stage upsamples with a transposed conv
    and averages a few residual blocks of different kernel sizes (multi-receptive-field fusion).
    """

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config = config
        self.output_sample_rate = config.output_sample_rate
        width = config.upsample_initial_channel
        self.is_amp = config.resblock == "AMP1"
        self.conv_pre = nn.Conv1d(_NUM_STEREO_CHANNELS * config.num_mels, width, 7, padding=3)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(width >> i, width >> (i + 1), kernel, rate, padding=(kernel - rate) // 2)
            for i, (rate, kernel) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes, strict=True))
        )
        self.resblocks = nn.ModuleList()
        for i in range(len(config.upsample_rates)):
            for kernel, dilations in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes, strict=True):
                if self.is_amp:
                    self.resblocks.append(AMPBlock1(width >> (i + 1), kernel, dilations, config.activation))
                else:
                    self.resblocks.append(ResBlock1(width >> (i + 1), kernel, dilations))
        final_width = width >> len(config.upsample_rates)
        self.act_post = AntiAliasedActivation(SnakeBeta(final_width)) if self.is_amp else nn.LeakyReLU()
        self.conv_post = nn.Conv1d(final_width, _NUM_STEREO_CHANNELS, 7, padding=3, bias=config.use_bias_at_final)

    def forward(self, mel_B2TM: torch.Tensor) -> torch.Tensor:
        if mel_B2TM.ndim != 4 or mel_B2TM.shape[1] != _NUM_STEREO_CHANNELS or mel_B2TM.shape[3] != self.config.num_mels:
            raise ValueError(
                f"the vocoder expects a stereo log-mel spectrogram (batch, 2, frames, {self.config.num_mels}), got "
                f"{tuple(mel_B2TM.shape)}"
            )
        B, _, T, M = mel_B2TM.shape
        # Channel-major stacking: feature index = stereo_channel * M + mel_bin.
        x_BCS = mel_B2TM.transpose(2, 3).reshape(B, _NUM_STEREO_CHANNELS * M, T)
        x_BCS = self.conv_pre(x_BCS)
        num_kernels = len(self.config.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            if not self.is_amp:
                x_BCS = F.leaky_relu(x_BCS, _HIFIGAN_LEAKY_SLOPE)
            x_BCS = up(x_BCS)
            branches = [self.resblocks[i * num_kernels + j](x_BCS) for j in range(num_kernels)]
            x_BCS = torch.stack(branches).mean(dim=0)
        x_BCS = self.conv_post(self.act_post(x_BCS))
        if not self.config.apply_final_activation:
            return x_BCS
        return torch.tanh(x_BCS) if self.config.use_tanh_at_final else x_BCS.clamp(-1.0, 1.0)


# -------------------------------------------------------------------------------------------------------------
# Bandwidth extension (LTX-2.3)


class _STFTBases(nn.Module):
    """Holds the checkpoint's windowed DFT bases: rows [0, G) real parts, [G, 2G) imaginary parts."""

    def __init__(self, n_fft: int):
        super().__init__()
        num_freqs = n_fft // 2 + 1
        # Zeros until loaded: the exact (bf16-rounded) bases the BWE generator was trained with come from the file.
        self.register_buffer("forward_basis", torch.zeros(2 * num_freqs, 1, n_fft))
        self.register_buffer("inverse_basis", torch.zeros(2 * num_freqs, 1, n_fft))


class CausalLogMel(nn.Module):
    """Causal log-mel spectrogram: frame t covers samples [t hop - (n_fft - hop), t hop + hop), so no frame sees
    the future. (B, S) with S a multiple of hop -> (B, M, S / hop)."""

    def __init__(self, n_fft: int, hop_length: int, num_mels: int):
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.stft_fn = _STFTBases(n_fft)
        self.register_buffer("mel_basis", torch.zeros(num_mels, n_fft // 2 + 1))

    def forward(self, wave_BS: torch.Tensor) -> torch.Tensor:
        x_B1S = F.pad(wave_BS[:, None, :], (max(0, self.n_fft - self.hop_length), 0))
        spec_B2GT = F.conv1d(x_B1S, self.stft_fn.forward_basis.to(x_B1S.dtype), stride=self.hop_length)
        real_BGT, imag_BGT = spec_B2GT.chunk(2, dim=1)
        magnitude_BGT = torch.sqrt(real_BGT.square() + imag_BGT.square())
        mel_BMT = torch.matmul(self.mel_basis.to(magnitude_BGT.dtype), magnitude_BGT)
        return torch.log(mel_BMT.clamp(min=1e-5))


class SincUpsample(nn.Module):
    """Integer-ratio Hann-windowed sinc upsampler (6 zero crossings, rolloff 0.99; see
    :func:`ltxf.models.mel.sinc_resampling_filter`) with the edges replicated. Its filter is derived, not loaded:
    a non-persistent buffer, always materialised on CPU so a module built on ``meta`` still has it."""

    def __init__(self, ratio: int):
        super().__init__()
        self.ratio = ratio
        with torch.device("cpu"):
            filter_P1K, width = sinc_resampling_filter(1, ratio, device="cpu")
        self.width = width
        self.register_buffer("filter", filter_P1K, persistent=False)

    def forward(self, x_BCS: torch.Tensor) -> torch.Tensor:
        B, C, S = x_BCS.shape
        x_N1S = F.pad(x_BCS.reshape(B * C, 1, S), (self.width, self.width), mode="replicate")
        # Output sample j * ratio + p (phase p) is filter phase p applied around input sample j.
        y_NPS = F.conv1d(x_N1S, self.filter.to(device=x_BCS.device, dtype=x_BCS.dtype))
        return y_NPS.transpose(1, 2).reshape(B, C, S * self.ratio)


@dataclass(frozen=True, kw_only=True)
class BWEConfig:
    """LTX-2.3 vocoder: the main generator, the BWE generator and the BWE mel/resampling parameters."""

    vocoder: GeneratorConfig
    bwe_generator: GeneratorConfig
    input_sample_rate: int
    output_sample_rate: int
    hop_length: int
    n_fft: int
    num_mels: int

    def __post_init__(self) -> None:
        if self.output_sample_rate % self.input_sample_rate:
            raise ValueError(
                f"vocoder.bwe: output_sampling_rate {self.output_sample_rate} must be an integer multiple of "
                f"input_sampling_rate {self.input_sample_rate}"
            )
        ratio = self.output_sample_rate // self.input_sample_rate
        if self.bwe_generator.hop != self.hop_length * ratio:
            raise ValueError(
                f"vocoder.bwe: the BWE generator upsamples by prod(upsample_rates) = {self.bwe_generator.hop} but one "
                f"mel frame of hop {self.hop_length} at {self.input_sample_rate} Hz is {self.hop_length * ratio} "
                f"samples at {self.output_sample_rate} Hz"
            )
        odd = [(r, k) for r, k in zip(self.bwe_generator.upsample_rates, self.bwe_generator.upsample_kernel_sizes,
                                      strict=True) if (k - r) % 2]
        if odd:
            raise ValueError(f"vocoder.bwe: upsample (rate, kernel) pairs {odd} would not upsample exactly (k - r odd)")
        if self.hop_length > self.n_fft:
            raise ValueError(f"vocoder.bwe: hop_length {self.hop_length} exceeds n_fft {self.n_fft}")


class BWEVocoder(nn.Module):
    """LTX-2.3 vocoder: BigVGAN-v2 at ``input_sample_rate`` plus bandwidth extension to ``output_sample_rate``.

    Stereo log-mel (B, 2, T, M) -> waveform (B, 2, T * prod(vocoder rates) * ratio) in [-1, 1].
    """

    def __init__(self, config: BWEConfig):
        super().__init__()
        self.config = config
        self.output_sample_rate = config.output_sample_rate
        self.vocoder = WaveGenerator(config.vocoder)
        self.bwe_generator = WaveGenerator(config.bwe_generator)
        self.mel_stft = CausalLogMel(config.n_fft, config.hop_length, config.num_mels)
        self.resampler = SincUpsample(config.output_sample_rate // config.input_sample_rate)

    def forward(self, mel_B2TM: torch.Tensor) -> torch.Tensor:
        low_B2S = self.vocoder(mel_B2TM)
        B, C, num_low = low_B2S.shape
        num_out = num_low * self.config.output_sample_rate // self.config.input_sample_rate
        # Whole hops only, so the BWE mel has exactly one frame per hop.
        low_B2S = F.pad(low_B2S, (0, -num_low % self.config.hop_length))
        mel_NMT = self.mel_stft(low_B2S.reshape(B * C, -1))
        mel_B2TM_low = mel_NMT.reshape(B, C, *mel_NMT.shape[1:]).transpose(2, 3)
        residual_B2S = self.bwe_generator(mel_B2TM_low)
        skip_B2S = self.resampler(low_B2S)
        return (residual_B2S + skip_B2S).clamp(-1.0, 1.0)[..., :num_out]


Vocoder = WaveGenerator | BWEVocoder


# -------------------------------------------------------------------------------------------------------------
# Config, loading, decoding


def _require(section: Mapping, key: str, expected: object, where: str, path: str | Path) -> None:
    if key not in section:
        raise ValueError(f"{path}: {where}.{key} is missing; ltx-core requires {key} = {expected!r} there")
    if section[key] != expected:
        raise ValueError(
            f"{path}: {where}.{key} = {section[key]!r} is not supported; ltx-core requires {expected!r} there"
        )


def vocoder_config_from_checkpoint(
    vocoder_section: Mapping, path: str | Path = "<config>"
) -> GeneratorConfig | BWEConfig:
    """Parse a checkpoint's ``vocoder`` section: a :class:`BWEConfig` when it has a ``bwe`` entry (LTX-2.3),
    else a HiFi-GAN :class:`GeneratorConfig` (LTX-2), asserting the values ltx-core asserts."""
    if not isinstance(vocoder_section, Mapping):
        raise ValueError(f"{path}: the vocoder config must be an object, got {type(vocoder_section).__name__}")
    if "bwe" not in vocoder_section:
        _require(vocoder_section, "resblock", "1", "vocoder", path)
        _require(vocoder_section, "stereo", True, "vocoder", path)
        return GeneratorConfig.from_checkpoint(vocoder_section, "vocoder", path)

    main = vocoder_section.get("vocoder", {})
    bwe = vocoder_section["bwe"]
    for where, section in (("vocoder.vocoder", main), ("vocoder.bwe", bwe)):
        if not isinstance(section, Mapping):
            raise ValueError(f"{path}: {where} must be an object, got {type(section).__name__}")
        _require(section, "resblock", "AMP1", where, path)
        _require(section, "stereo", True, where, path)
        _require(section, "activation", "snakebeta", where, path)
    missing = [k for k in ("input_sampling_rate", "output_sampling_rate", "hop_length", "n_fft", "num_mels")
               if k not in bwe]
    if missing:
        raise ValueError(f"{path}: vocoder.bwe is missing {missing}")
    n_fft = int(bwe["n_fft"])
    if "win_size" in bwe and int(bwe["win_size"]) != n_fft:
        raise ValueError(
            f"{path}: vocoder.bwe.win_size = {bwe['win_size']} differs from n_fft = {n_fft}; the BWE mel STFT (as in "
            "ltx-core) always uses a window as long as n_fft"
        )
    input_rate, output_rate = int(bwe["input_sampling_rate"]), int(bwe["output_sampling_rate"])
    num_mels = int(bwe["num_mels"])
    try:
        return BWEConfig(
            # The main generator runs at the BWE input rate and keeps its final clamp; the BWE generator's output is
            # a residual, so it has no final activation (whatever the config says, as in ltx-core).
            vocoder=GeneratorConfig.from_checkpoint(main, "vocoder.vocoder", path, output_sample_rate=input_rate),
            bwe_generator=GeneratorConfig.from_checkpoint(
                bwe, "vocoder.bwe", path, output_sample_rate=output_rate, apply_final_activation=False,
                num_mels=num_mels,
            ),
            input_sample_rate=input_rate,
            output_sample_rate=output_rate,
            hop_length=int(bwe["hop_length"]),
            n_fft=n_fft,
            num_mels=num_mels,
        )
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def build_vocoder(config: GeneratorConfig | BWEConfig) -> Vocoder:
    """Instantiate the vocoder a config describes (weights uninitialised beyond torch defaults)."""
    return BWEVocoder(config) if isinstance(config, BWEConfig) else WaveGenerator(config)


def load_vocoder(
    path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> Vocoder:
    """Build the vocoder from an official checkpoint's ``vocoder`` config and load ``vocoder.*`` strictly.

    Returns a :class:`WaveGenerator` (LTX-2, 24 kHz) or a :class:`BWEVocoder` (LTX-2.3, 48 kHz), frozen and in
    eval mode; ``result.output_sample_rate`` is its output rate in Hz.
    """
    path = Path(path)
    config = vocoder_config_from_checkpoint(config_section(read_config(path), "vocoder", path), path)
    with torch.device("meta"):
        vocoder = build_vocoder(config)
    tensors = read_tensors(path, strip_prefix(VOCODER_PREFIX), dtype=dtype, device=device)
    load_state_dict_strict(vocoder, tensors, source=path)
    # Moves the derived (non-persistent, built on CPU) resampler filter next to the loaded weights.
    vocoder = vocoder.to(device)
    check_nothing_on_meta(vocoder, path)
    logger.info("loaded %s (%d Hz) from %s", type(vocoder).__name__, vocoder.output_sample_rate, path)
    return vocoder.eval().requires_grad_(False)


@torch.inference_mode()
def decode_audio(decoder: nn.Module, vocoder: Vocoder, latents_BZTF: torch.Tensor) -> torch.Tensor:
    """Normalised audio latents -> float32 stereo waveform (B, 2, S) at ``vocoder.output_sample_rate`` Hz.

    ``decoder`` is an :class:`ltxf.models.audio_vae.AudioDecoder`; each model runs in its own dtype and device.
    """
    decoder_weight = decoder.conv_in.conv.weight
    mel_B2TM = decoder(latents_BZTF.to(device=decoder_weight.device, dtype=decoder_weight.dtype))
    vocoder_weight = next(vocoder.parameters())
    return vocoder(mel_B2TM.to(device=vocoder_weight.device, dtype=vocoder_weight.dtype)).float()
