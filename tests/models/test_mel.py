"""The log-mel front end against an independent numpy/scipy computation (the reference's own front end needs
torchaudio, which is not installed).

The expected values are built here from the textbook formulas, not from ltxf code: the Slaney mel scale and
area-normalised triangular filters, an STFT as numpy rfft over reflect-padded Hann-windowed frames, and resampling
either by direct summation of the windowed-sinc interpolation formula or by ``scipy.signal.resample_poly``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.signal import resample_poly

from ltxf.models.mel import (
    MelConfig,
    log_mel_spectrogram,
    mel_config_from_checkpoint,
    mel_filterbank,
    resample,
)

# The audio_vae section of the published LTX-2 / LTX-2.3 checkpoints (identical in both).
REAL_AUDIO_VAE_CONFIG = {
    "model": {
        "params": {
            "ddconfig": {
                "double_z": True, "mel_bins": 64, "z_channels": 8, "resolution": 256, "downsample_time": False,
                "in_channels": 2, "out_ch": 2, "ch": 128, "ch_mult": [1, 2, 4], "num_res_blocks": 2,
                "attn_resolutions": [], "dropout": 0.0, "mid_block_add_attention": False, "norm_type": "pixel",
                "causality_axis": "height",
            },
            "sampling_rate": 16000,
        }
    },
    "preprocessing": {
        "audio": {"sampling_rate": 16000, "max_wav_value": 32768.0, "duration": 5.12, "stereo": True,
                  "causal_padding": 3},
        "stft": {"filter_length": 1024, "hop_length": 160, "win_length": 1024, "causal": True},
        "mel": {"n_mel_channels": 64, "mel_fmin": 0, "mel_fmax": 8000},
    },
}


# ------------------------------------------------------------------------------------------------ numpy oracle


def np_hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    return np.where(hz < 1000.0, hz * 3.0 / 200.0, 15.0 + np.log(np.maximum(hz, 1e-12) / 1000.0) * 27.0 / np.log(6.4))


def np_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel < 15.0, mel * 200.0 / 3.0, 1000.0 * np.exp((mel - 15.0) * np.log(6.4) / 27.0))


def np_slaney_filterbank(sample_rate=16000, n_fft=1024, num_mels=64, f_min=0.0, f_max=8000.0) -> np.ndarray:
    bins_hz = np.linspace(0.0, sample_rate // 2, n_fft // 2 + 1)
    edges = np_mel_to_hz(np.linspace(np_hz_to_mel(f_min), np_hz_to_mel(f_max), num_mels + 2))
    bank = np.zeros((num_mels, bins_hz.size))
    for m in range(num_mels):
        lo, centre, hi = edges[m : m + 3]
        rising = (bins_hz - lo) / (centre - lo)
        falling = (hi - bins_hz) / (hi - centre)
        bank[m] = np.maximum(0.0, np.minimum(rising, falling)) * 2.0 / (hi - lo)
    return bank


def np_log_mel(x: np.ndarray, n_fft=1024, hop=160) -> np.ndarray:
    """(..., S) at 16 kHz -> (..., T, 64)."""
    pad = n_fft // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    num_frames = 1 + (padded.shape[-1] - n_fft) // hop
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    index = np.arange(num_frames)[:, None] * hop + np.arange(n_fft)[None, :]
    magnitude = np.abs(np.fft.rfft(padded[..., index] * window, axis=-1))
    return np.log(np.maximum(magnitude @ np_slaney_filterbank().T, 1e-5))


def np_windowed_sinc_resample(x: np.ndarray, orig: int, new: int, zero_crossings=6, rolloff=0.99) -> np.ndarray:
    """Direct evaluation of y[j] = sum_i x[i] h(i / orig - j / new) with a Hann-windowed sinc low-pass whose
    cut-off is `rolloff` times the lower Nyquist rate (the torchaudio-default filter the reference uses)."""
    cutoff_hz = min(orig, new) * rolloff  # sinc zero crossings every 1 / cutoff_hz seconds
    num_out = math.ceil(len(x) * new / orig)
    times_in = np.arange(len(x)) / orig
    out = np.empty(num_out)
    for j in range(num_out):
        u = np.clip((times_in - j / new) * cutoff_hz, -zero_crossings, zero_crossings)
        h = np.sinc(u) * np.cos(np.pi * u / (2 * zero_crossings)) ** 2 * cutoff_hz / orig
        out[j] = np.dot(x, h)
    return out


def tones(freqs_hz: list[float], rate: int, seconds: float) -> tuple[np.ndarray, callable]:
    def signal(t: np.ndarray) -> np.ndarray:
        return sum(np.sin(2 * np.pi * f * t + i) for i, f in enumerate(freqs_hz)) / len(freqs_hz)

    return signal(np.arange(int(rate * seconds)) / rate), signal


# ------------------------------------------------------------------------------------------------ tests


def test_filterbank_matches_slaney_formulas():
    ours = mel_filterbank(MelConfig(), dtype=torch.float64).numpy()
    expected = np_slaney_filterbank()
    assert ours.shape == (64, 513)
    # Both float64, same formulas evaluated differently: only rounding differs.
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)
    # Slaney area normalisation: every filter integrates to ~1 over Hz (up to the bin sampling of the triangles).
    areas = ours.sum(axis=1) * (8000.0 / 512)
    assert np.all(np.abs(areas[8:] - 1.0) < 0.05)


def test_log_mel_matches_numpy_stft_at_16k():
    rng = np.random.default_rng(0)
    t = np.arange(8000) / 16000
    x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal((2, 2, t.size))).astype(np.float32)
    ours = log_mel_spectrogram(torch.from_numpy(x), 16000)
    expected = np_log_mel(x.astype(np.float64))
    assert ours.shape == (2, 2, 1 + 8000 // 160, 64) and ours.dtype == torch.float32
    # Measured max |diff| 2.6e-6 (float32 torch.stft vs float64 numpy, in log units = relative error).
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=2e-5)


def test_log_mel_float64_is_exact_and_floor_applies():
    x = np.zeros((1, 1, 4000))
    x[0, 0, 2000:] = np.random.default_rng(1).standard_normal(2000)
    ours = log_mel_spectrogram(torch.from_numpy(x), 16000)
    assert ours.dtype == torch.float64
    expected = np_log_mel(np.repeat(x, 2, axis=1))
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-9)
    # The silent first half sits at the floor log(1e-5).
    assert torch.all(ours[0, :, :5] == math.log(1e-5))


def test_mono_is_duplicated_and_shapes_accepted():
    x = torch.randn(1, 1, 3200)
    stereo = log_mel_spectrogram(x, 16000)
    assert stereo.shape == (1, 2, 21, 64)
    torch.testing.assert_close(stereo[:, 0], stereo[:, 1], rtol=0, atol=0)
    torch.testing.assert_close(log_mel_spectrogram(x[0, 0], 16000), stereo, rtol=0, atol=0)
    torch.testing.assert_close(log_mel_spectrogram(x[0], 16000), stereo, rtol=0, atol=0)
    with pytest.raises(ValueError, match="1 or 2 channels"):
        log_mel_spectrogram(torch.randn(1, 3, 3200), 16000)
    with pytest.raises(ValueError, match="too short"):
        log_mel_spectrogram(torch.randn(1, 2, 400), 16000)
    with pytest.raises(ValueError, match="floating-point"):
        log_mel_spectrogram(torch.zeros(1, 2, 3200, dtype=torch.int16), 16000)


@pytest.mark.parametrize("orig,new", [(44100, 16000), (48000, 16000), (22050, 16000), (8000, 16000), (16000, 48000)])
def test_resample_matches_direct_windowed_sinc_sum(orig, new):
    x = np.random.default_rng(orig).standard_normal(orig // 50)
    ours = resample(torch.from_numpy(x).float(), orig, new)
    expected = np_windowed_sinc_resample(x, orig, new)
    assert ours.shape == (math.ceil(x.size * new / orig),)
    # Polyphase float32 conv vs float64 direct sum over unit-variance noise; measured max |diff| <= 2.5e-7.
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("orig,new", [(44100, 16000), (48000, 16000), (22050, 16000), (8000, 16000), (16000, 48000)])
def test_resample_vs_scipy_resample_poly_and_ground_truth(orig, new):
    nyquist = min(orig, new) / 2
    x, signal = tones([0.05 * nyquist, 0.2 * nyquist, 0.5 * nyquist], orig, 0.2)
    ours = resample(torch.from_numpy(x).float(), orig, new).numpy()
    g = math.gcd(orig, new)
    scipy_y = resample_poly(x, new // g, orig // g)
    truth = signal(np.arange(ours.size) / new)
    interior = slice(ours.size // 10, -(ours.size // 10))  # the two filters treat the clip edges differently
    # Different windows (Hann, 6 zero crossings vs Kaiser, 10): each has ~1e-3 pass-band ripple at these
    # frequencies. Measured: vs scipy <= 1.8e-3, vs the analytic tones <= 1.6e-3.
    assert np.abs(ours[: scipy_y.size] - scipy_y)[interior].max() < 5e-3
    assert np.abs(ours - truth)[interior].max() < 5e-3


def test_resample_identity_batch_and_lengths():
    x = torch.randn(2, 3, 1001)
    assert resample(x, 16000, 16000) is x
    y = resample(x, 44100, 16000)
    assert y.shape == (2, 3, math.ceil(1001 * 16000 / 44100))
    torch.testing.assert_close(y[1, 2], resample(x[1, 2], 44100, 16000), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="positive integers"):
        resample(x, 0, 16000)


@pytest.mark.parametrize("orig", [48000, 44100, 22050])
def test_log_mel_of_resampled_input_matches_scipy_pipeline(orig):
    rng = np.random.default_rng(2)
    t = np.arange(int(orig * 0.4)) / orig
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 2500 * t + 1) + 0.05 * rng.standard_normal(
        (1, 2, t.size)
    )
    ours = log_mel_spectrogram(torch.from_numpy(x).float(), orig).numpy()
    g = math.gcd(orig, 16000)
    expected = np_log_mel(resample_poly(x, 16000 // g, orig // g, axis=-1))
    assert ours.shape == expected.shape == (1, 2, 41, 64)
    # The resamplers' filters differ near Nyquist (Hann 0.99 roll-off vs Kaiser), so compare the mel bins up to
    # 4 kHz and away from the clip edges. Measured max |diff| 4.5e-3 in log units.
    edges = np_mel_to_hz(np.linspace(0.0, np_hz_to_mel(8000.0), 66))
    below_4k = edges[2:] <= 4000.0
    diff = np.abs(ours - expected)[:, :, 2:-2][..., below_4k]
    assert below_4k.sum() == 49 and diff.max() < 1e-2


def test_config_from_real_checkpoint_section():
    assert mel_config_from_checkpoint(REAL_AUDIO_VAE_CONFIG) == MelConfig()
    assert mel_config_from_checkpoint({}) == MelConfig()
    custom = {"model": {"params": {"sampling_rate": 24000, "ddconfig": {}}},
              "preprocessing": {"stft": {"filter_length": 512, "hop_length": 120}, "mel": {"n_mel_channels": 80}}}
    assert mel_config_from_checkpoint(custom) == MelConfig(sample_rate=24000, n_fft=512, hop_length=120, num_mels=80)


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("mel", "mel_fmax", 7600),
        ("mel", "mel_fmin", 20),
        ("stft", "win_length", 800),
        ("audio", "sampling_rate", 22050),
    ],
)
def test_config_rejects_values_the_reference_would_ignore(section, key, value):
    config = {**REAL_AUDIO_VAE_CONFIG, "preprocessing": {k: dict(v) for k, v in
                                                          REAL_AUDIO_VAE_CONFIG["preprocessing"].items()}}
    config["preprocessing"][section][key] = value
    with pytest.raises(ValueError, match=f"{key}.*{value}"):
        mel_config_from_checkpoint(config, "model.safetensors")
