"""The audio VAE's log-mel front end in pure torch: band-limited resampling, STFT, Slaney mel filterbank, log.

The LTX-2 audio VAE was trained on stereo log-mel spectrograms at 16 kHz: STFT with ``n_fft`` 1024, a 1024-sample
periodic Hann window, hop 160, ``center=True`` with reflect padding, magnitude (power 1), 64 triangular mel
filters spanning 0 Hz to Nyquist on the Slaney mel scale with Slaney area normalisation, then
``log(clamp(x, 1e-5))``. Input at any other rate is first resampled to 16 kHz.

The resampler is a Hann-windowed sinc interpolator evaluated polyphase-wise (one filter phase per output sample
of a period), with the defaults of the resampler the reference pipeline uses (6 zero crossings per side,
rolloff 0.99 of the lower Nyquist frequency), so the features match what the model saw in training.

Shape legend:
    B  batch
    C  audio channels (1 = mono, 2 = stereo)
    N  batch * channels, flattened
    S  waveform samples
    F  STFT frequency bins (n_fft // 2 + 1)
    T  mel frames
    M  mel bins
    P  filter phases (output samples per resampling period)
    K  filter taps
    J  resampling periods
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# The Slaney mel scale: linear (200/3 Hz per mel) below 1 kHz, logarithmic (a factor 6.4 per 27 mels) above.
_SLANEY_HZ_PER_MEL = 200.0 / 3.0
_SLANEY_BREAK_HZ = 1000.0
_SLANEY_BREAK_MEL = _SLANEY_BREAK_HZ / _SLANEY_HZ_PER_MEL
_SLANEY_LOG_STEP = math.log(6.4) / 27.0


@dataclass(frozen=True, kw_only=True)
class MelConfig:
    """Parameters of the log-mel front end (defaults: the LTX-2 / LTX-2.3 checkpoints)."""

    sample_rate: int = 16000
    """Rate the spectrogram is computed at; input at another rate is resampled to it."""
    n_fft: int = 1024
    """FFT size; the Hann window is as long (the reference always uses win_length == n_fft)."""
    hop_length: int = 160
    """STFT hop in samples: 100 mel frames per second at 16 kHz."""
    num_mels: int = 64
    """Number of mel filters."""
    f_min: float = 0.0
    """Lowest filter edge in Hz."""
    f_max: float | None = None
    """Highest filter edge in Hz; ``None`` means Nyquist (``sample_rate / 2``), as in the reference."""
    log_floor: float = 1e-5
    """Magnitudes are clamped to at least this before the log."""

    def __post_init__(self) -> None:
        for name in ("sample_rate", "n_fft", "hop_length", "num_mels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"MelConfig.{name} must be a positive integer, got {value!r}")
        top = self.sample_rate / 2 if self.f_max is None else self.f_max
        if not 0.0 <= self.f_min < top <= self.sample_rate / 2:
            raise ValueError(
                f"MelConfig needs 0 <= f_min < f_max <= sample_rate / 2, got f_min={self.f_min}, f_max={top}, "
                f"sample_rate={self.sample_rate}"
            )
        if self.log_floor <= 0:
            raise ValueError(f"MelConfig.log_floor must be positive, got {self.log_floor}")

    @property
    def top_frequency(self) -> float:
        return self.sample_rate / 2 if self.f_max is None else float(self.f_max)


def mel_config_from_checkpoint(audio_vae_config: Mapping, path: str | Path = "<config>") -> MelConfig:
    """Read the front-end parameters from a checkpoint's ``audio_vae`` config section.

    Keys and fallbacks follow the reference: the rate is ``model.params.sampling_rate``, ``n_fft`` is
    ``preprocessing.stft.filter_length``, the hop is ``preprocessing.stft.hop_length`` and the mel count is
    ``model.params.ddconfig.mel_bins``, else ``preprocessing.mel.n_mel_channels``, else ``variables.mel_bins``.
    The reference ignores ``preprocessing.audio.sampling_rate``, ``stft.win_length`` and ``mel.mel_fmin`` /
    ``mel_fmax`` (it always uses the full window and 0 Hz to Nyquist); where a checkpoint sets them to something
    else the intent is ambiguous, so that is an error rather than a silent choice.
    """
    model_params = _sub(_sub(audio_vae_config, "model", path), "params", path)
    ddconfig = _sub(model_params, "ddconfig", path)
    preprocessing = _sub(audio_vae_config, "preprocessing", path)
    audio_cfg = _sub(preprocessing, "audio", path)
    stft_cfg = _sub(preprocessing, "stft", path)
    mel_cfg = _sub(preprocessing, "mel", path)
    variables = _sub(audio_vae_config, "variables", path)

    sample_rate = int(model_params.get("sampling_rate", 16000))
    n_fft = int(stft_cfg.get("filter_length", 1024))
    hop_length = int(stft_cfg.get("hop_length", 160))
    num_mels = ddconfig.get("mel_bins") or mel_cfg.get("n_mel_channels") or variables.get("mel_bins") or 64

    def check_agrees(section: str, key: str, value: object, expected: object) -> None:
        if value is not None and float(value) != float(expected):
            raise ValueError(
                f"{path}: audio_vae.{section}.{key} = {value!r} disagrees with the value the audio VAE's front end "
                f"uses ({expected!r}); the reference pipeline would silently ignore it"
            )

    check_agrees("preprocessing.audio", "sampling_rate", audio_cfg.get("sampling_rate"), sample_rate)
    check_agrees("preprocessing.stft", "win_length", stft_cfg.get("win_length"), n_fft)
    check_agrees("preprocessing.mel", "mel_fmin", mel_cfg.get("mel_fmin"), 0.0)
    check_agrees("preprocessing.mel", "mel_fmax", mel_cfg.get("mel_fmax"), sample_rate / 2)
    try:
        return MelConfig(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, num_mels=int(num_mels))
    except ValueError as exc:
        raise ValueError(f"{path}: invalid audio_vae preprocessing config: {exc}") from exc


def _sub(section: Mapping, key: str, path: str | Path) -> Mapping:
    value = section.get(key, {})
    if not isinstance(value, Mapping):
        raise ValueError(f"{path}: audio_vae config entry '{key}' must be an object, got {type(value).__name__}")
    return value


# -------------------------------------------------------------------------------------------------------------
# Resampling


def sinc_resampling_filter(
    orig_rate: int,
    new_rate: int,
    *,
    zero_crossings: int = 6,
    rolloff: float = 0.99,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, int]:
    """Polyphase Hann-windowed sinc filter bank for resampling ``orig_rate`` -> ``new_rate``.

    The rates are reduced by their gcd to ``o`` (input samples per period) and ``n`` (output samples per
    period). Output sample ``p`` of a period sits at input position ``p * o / n``; its filter phase weighs input
    offsets ``k - width`` (``k`` in ``[0, 2 width + o)``) with

        h(t) = (c / o) * sinc(t) * cos(pi t / (2 Z))^2,   t = c * ((k - width) / o - p / n),  |t| clamped to Z,

    where ``c = min(o, n) * rolloff`` is the low-pass cut-off in cycles per period (just under the lower
    Nyquist rate, so resampling down also anti-aliases), ``Z = zero_crossings`` is the half-width of the Hann
    window in sinc zero crossings and ``width = ceil(Z * o / c)`` input samples covers it.

    Returns the filter, shape (P=n, 1, K=2 width + o), and ``width``.
    """
    if orig_rate <= 0 or new_rate <= 0 or int(orig_rate) != orig_rate or int(new_rate) != new_rate:
        raise ValueError(f"sample rates must be positive integers, got {orig_rate} -> {new_rate}")
    if zero_crossings <= 0 or not 0.0 < rolloff <= 1.0:
        raise ValueError(f"need zero_crossings > 0 and 0 < rolloff <= 1, got {zero_crossings}, {rolloff}")
    common = math.gcd(int(orig_rate), int(new_rate))
    o, n = int(orig_rate) // common, int(new_rate) // common
    cutoff = min(o, n) * rolloff
    width = math.ceil(zero_crossings * o / cutoff)
    # Built in float64 so the taps do not depend on the compute dtype.
    offsets_K = torch.arange(-width, width + o, dtype=torch.float64, device=device) / o
    phases_P = torch.arange(n, dtype=torch.float64, device=device) / n
    t_PK = (offsets_K[None, :] - phases_P[:, None]) * cutoff
    t_PK = t_PK.clamp(-zero_crossings, zero_crossings)
    window_PK = torch.cos(t_PK * (math.pi / (2 * zero_crossings))) ** 2
    filter_PK = torch.sinc(t_PK) * window_PK * (cutoff / o)
    return filter_PK[:, None, :].to(dtype), width


def resample(
    waveform: torch.Tensor, orig_rate: int, new_rate: int, *, zero_crossings: int = 6, rolloff: float = 0.99
) -> torch.Tensor:
    """Resample the last axis of ``waveform`` from ``orig_rate`` to ``new_rate`` Hz (any integer rates).

    Uses :func:`sinc_resampling_filter`; the signal is taken as zero outside the clip. The output has
    ``ceil(S * new_rate / orig_rate)`` samples. Works on any float dtype and device; differentiable.
    """
    if not waveform.is_floating_point():
        raise ValueError(f"resample needs a floating-point waveform, got {waveform.dtype}")
    if orig_rate == new_rate:
        return waveform
    filter_P1K, width = sinc_resampling_filter(
        orig_rate, new_rate, zero_crossings=zero_crossings, rolloff=rolloff, dtype=waveform.dtype,
        device=waveform.device,
    )
    common = math.gcd(int(orig_rate), int(new_rate))
    o, n = int(orig_rate) // common, int(new_rate) // common
    lead_shape, num_samples = waveform.shape[:-1], waveform.shape[-1]
    x_N1S = waveform.reshape(-1, 1, num_samples)
    # The extra `o` on the right lets the last period see its full filter support.
    x_N1S = F.pad(x_N1S, (width, width + o))
    # Period j of the output reads input samples [j*o, j*o + K): a stride-o convolution, one channel per phase.
    y_NPJ = F.conv1d(x_N1S, filter_P1K, stride=o)
    y_NS = y_NPJ.transpose(1, 2).reshape(x_N1S.shape[0], -1)
    num_out = math.ceil(n * num_samples / o)
    return y_NS[:, :num_out].reshape(*lead_shape, num_out)


# -------------------------------------------------------------------------------------------------------------
# Mel spectrogram


def hz_to_mel_slaney(hz: torch.Tensor) -> torch.Tensor:
    """Slaney mel scale (as in the Auditory Toolbox / librosa ``htk=False``)."""
    linear = hz / _SLANEY_HZ_PER_MEL
    logarithmic = _SLANEY_BREAK_MEL + torch.log(torch.clamp(hz, min=_SLANEY_BREAK_HZ) / _SLANEY_BREAK_HZ) / (
        _SLANEY_LOG_STEP
    )
    return torch.where(hz >= _SLANEY_BREAK_HZ, logarithmic, linear)


def mel_to_hz_slaney(mel: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`hz_to_mel_slaney`."""
    linear = mel * _SLANEY_HZ_PER_MEL
    logarithmic = _SLANEY_BREAK_HZ * torch.exp(_SLANEY_LOG_STEP * (mel - _SLANEY_BREAK_MEL))
    return torch.where(mel >= _SLANEY_BREAK_MEL, logarithmic, linear)


def mel_filterbank(
    config: MelConfig, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Triangular Slaney mel filters with Slaney area normalisation, shape (M, F).

    The M + 2 band edges are equally spaced in mel between ``f_min`` and ``f_max``; filter m rises linearly from
    edge m to edge m + 1 and falls to edge m + 2, and is scaled by ``2 / (edge[m+2] - edge[m])`` so that every
    filter has the same area. FFT bin f sits at ``f * (sample_rate // 2) / (F - 1)`` Hz.
    """
    num_freqs = config.n_fft // 2 + 1
    bin_hz_F = torch.linspace(0.0, float(config.sample_rate // 2), num_freqs, dtype=torch.float64, device=device)
    lo, hi = (hz_to_mel_slaney(torch.tensor(f, dtype=torch.float64)) for f in (config.f_min, config.top_frequency))
    edges_hz = mel_to_hz_slaney(torch.linspace(lo.item(), hi.item(), config.num_mels + 2, dtype=torch.float64,
                                               device=device))
    left, centre, right = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising_MF = (bin_hz_F[None, :] - left) / (centre - left)
    falling_MF = (right - bin_hz_F[None, :]) / (right - centre)
    triangles_MF = torch.clamp(torch.minimum(rising_MF, falling_MF), min=0.0)
    area_norm_M1 = 2.0 / (right - left)
    return (triangles_MF * area_norm_M1).to(dtype)


def stereo_waveform(waveform: torch.Tensor) -> torch.Tensor:
    """Bring a waveform to (B, 2, S): (S,), (C, S) and (B, C, S) with C in {1, 2} are accepted; mono is
    duplicated to both channels, because the audio VAE encoder takes exactly two."""
    if waveform.ndim == 1:
        waveform = waveform[None, None]
    elif waveform.ndim == 2:
        waveform = waveform[None]
    if waveform.ndim != 3 or waveform.shape[1] not in (1, 2):
        raise ValueError(
            f"expected a waveform of shape (samples,), (channels, samples) or (batch, channels, samples) with 1 or "
            f"2 channels, got {tuple(waveform.shape)}"
        )
    return waveform.expand(-1, 2, -1) if waveform.shape[1] == 1 else waveform


def log_mel_spectrogram(
    waveform: torch.Tensor, sample_rate: int, config: MelConfig | None = None
) -> torch.Tensor:
    """Stereo log-mel spectrogram of a waveform, shape (B, 2, T, M), T = 1 + S' // hop_length where S' is the
    length after resampling to ``config.sample_rate``.

    ``waveform`` is (S,), (C, S) or (B, C, S) with C in {1, 2} (mono is duplicated). Computed in float32 (float64
    input stays float64); pure torch, differentiable, on the input's device. ``config`` defaults to
    :class:`MelConfig` ``()``, the checkpoints' values.
    """
    config = MelConfig() if config is None else config
    if not waveform.is_floating_point():
        raise ValueError(f"log_mel_spectrogram needs a floating-point waveform, got {waveform.dtype}")
    compute_dtype = torch.float64 if waveform.dtype == torch.float64 else torch.float32
    x_BCS = stereo_waveform(waveform).to(compute_dtype)
    x_BCS = resample(x_BCS, int(sample_rate), config.sample_rate)
    num_batch, num_channels, num_samples = x_BCS.shape
    if num_samples <= config.n_fft // 2:
        raise ValueError(
            f"the clip is too short for the mel front end: {num_samples} samples at {config.sample_rate} Hz, reflect "
            f"padding needs more than n_fft // 2 = {config.n_fft // 2}"
        )
    window = torch.hann_window(config.n_fft, periodic=True, dtype=compute_dtype, device=x_BCS.device)
    spec = torch.stft(
        x_BCS.reshape(num_batch * num_channels, num_samples),
        n_fft=config.n_fft,
        hop_length=config.hop_length,
        win_length=config.n_fft,
        window=window,
        center=True,
        pad_mode="reflect",
        normalized=False,
        onesided=True,
        return_complex=True,
    )
    magnitude_NFT = spec.abs()
    filters_MF = mel_filterbank(config, dtype=compute_dtype, device=x_BCS.device)
    mel_NMT = torch.matmul(filters_MF, magnitude_NFT)
    log_mel_NMT = torch.log(torch.clamp(mel_NMT, min=config.log_floor))
    return log_mel_NMT.reshape(num_batch, num_channels, config.num_mels, -1).transpose(2, 3).contiguous()
