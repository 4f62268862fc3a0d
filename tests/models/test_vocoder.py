"""Vocoders (HiFi-GAN for LTX-2, BigVGAN-v2 + BWE for LTX-2.3): parity with ltx-core 1.0.0 at tiny configs,
loaded through `load_vocoder` from checkpoints in the official layout; the published configs' structure; sample
rates, lengths, determinism and errors."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from ltxf.models.audio_vae import AudioDecoder, AudioVAEConfig
from ltxf.models.vocoder import (
    BWEVocoder,
    WaveGenerator,
    build_vocoder,
    decode_audio,
    load_vocoder,
    vocoder_config_from_checkpoint,
)
from tests.ltx_reference import import_ltx_core, write_official_checkpoint

# Published `vocoder` config sections (safetensors metadata of ltx-2-19b-dev and of the LTX-2.3 checkpoint).
LTX2_VOCODER = {
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "stereo": True, "upsample_rates": [6, 5, 2, 2, 2],
    "resblock_kernel_sizes": [3, 7, 11], "upsample_kernel_sizes": [16, 15, 8, 4, 4], "resblock": "1",
    "upsample_initial_channel": 1024,
}
LTX23_VOCODER = {
    "vocoder": {
        "upsample_initial_channel": 1536, "resblock": "AMP1", "upsample_rates": [5, 2, 2, 2, 2, 2],
        "resblock_kernel_sizes": [3, 7, 11], "upsample_kernel_sizes": [11, 4, 4, 4, 4, 4],
        "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "stereo": True, "use_tanh_at_final": False,
        "activation": "snakebeta", "use_bias_at_final": False,
    },
    "bwe": {
        "upsample_initial_channel": 512, "resblock": "AMP1", "upsample_rates": [6, 5, 2, 2, 2],
        "resblock_kernel_sizes": [3, 7, 11], "upsample_kernel_sizes": [12, 11, 4, 4, 4],
        "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "stereo": True, "use_tanh_at_final": False,
        "activation": "snakebeta", "use_bias_at_final": False, "apply_final_activation": False,
        "input_sampling_rate": 16000, "output_sampling_rate": 48000, "hop_length": 80, "n_fft": 512,
        "win_size": 512, "num_mels": 64,
    },
}

# Tiny versions: narrow, three stages, two residual kernels; the rates keep the shipped hop arithmetic of the
# BWE (16 kHz main output, 80-sample mel hop, 240x BWE generator = 3x skip).
TINY_HIFIGAN = {
    **LTX2_VOCODER, "upsample_rates": [3, 2, 2], "upsample_kernel_sizes": [7, 4, 4], "resblock_kernel_sizes": [3, 5],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 2, 3]], "upsample_initial_channel": 32,
}
TINY_BWE = {
    "vocoder": {**LTX23_VOCODER["vocoder"], "upsample_initial_channel": 32, "upsample_rates": [5, 4, 8],
                "upsample_kernel_sizes": [11, 8, 16], "resblock_kernel_sizes": [3, 5],
                "resblock_dilation_sizes": [[1, 3, 5], [1, 2, 3]]},
    "bwe": {**LTX23_VOCODER["bwe"], "upsample_initial_channel": 16, "upsample_rates": [6, 5, 8],
            "upsample_kernel_sizes": [12, 11, 16], "resblock_kernel_sizes": [3],
            "resblock_dilation_sizes": [[1, 3, 5]]},
}


def reference_configurator():
    return import_ltx_core("ltx_core.model.audio_vae.model_configurator").VocoderConfigurator


def causal_hann_dft_basis(n_fft: int) -> torch.Tensor:
    """Rows: real then imaginary parts of the Hann-windowed DFT, as the BWE STFT expects (2 G, 1, n_fft)."""
    window = np.hanning(n_fft + 1)[:-1]
    freqs, times = np.arange(n_fft // 2 + 1)[:, None], np.arange(n_fft)[None, :]
    angle = 2 * np.pi * freqs * times / n_fft
    return torch.tensor(np.concatenate([np.cos(angle) * window, -np.sin(angle) * window])[:, None, :]).float()


def init_generator_weights_(module: torch.nn.Module, gain: float, seed: int = 0) -> torch.nn.Module:
    """Random weights that keep a deep generator's activations O(1): conv weights ~ N(0, gain^2 / fan_in) (the
    shared `random_init_` uses one std for every layer, which either silences or saturates these stacks), small
    random biases, Snake log-scales ~ N(0, 0.3^2)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 3:
                p.copy_(torch.randn(p.shape, generator=generator) * gain / (p.shape[1] * p.shape[2]) ** 0.5)
            else:
                std = 0.3 if name.endswith((".alpha", ".beta")) else 0.02
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    return module


def reference_vocoder(vocoder_config: dict, gain: float) -> torch.nn.Module:
    """ltx-core vocoder with random weights. Every persistent filter buffer is perturbed (by ~5%), so matching
    outputs prove that ltxf loads those buffers from the checkpoint instead of recomputing them; the BWE mel STFT
    gets a real DFT basis and a random non-negative mel basis (ltx-core leaves them zero)."""
    ref = reference_configurator().from_config({"vocoder": vocoder_config})
    ref = init_generator_weights_(ref, gain).eval()
    state = ref.state_dict()
    generator = torch.Generator().manual_seed(3)
    for key, value in state.items():
        if key.endswith(".filter"):
            state[key] = value * (1 + 0.05 * torch.randn(value.shape, generator=generator))
    if "mel_stft.mel_basis" in state:
        state["mel_stft.stft_fn.forward_basis"] = causal_hann_dft_basis(vocoder_config["bwe"]["n_fft"])
        state["mel_stft.stft_fn.inverse_basis"] = torch.randn(state["mel_stft.stft_fn.inverse_basis"].shape)
        state["mel_stft.mel_basis"] = torch.rand(state["mel_stft.mel_basis"].shape, generator=generator) * 0.02
    ref.load_state_dict(state)
    return ref


# Gains chosen (by measurement) so the outputs have std ~0.2 with little clipping: a comparison of outputs that sit
# at the tanh / clamp rails, or near zero, would prove little.
HIFIGAN_GAIN, BWE_GAIN = 0.8, 0.65


@pytest.fixture(scope="module")
def hifigan_checkpoint(tmp_path_factory):
    ref = reference_vocoder(TINY_HIFIGAN, HIFIGAN_GAIN)
    config = {"vocoder": TINY_HIFIGAN, "audio_vae": {}}
    path = write_official_checkpoint(tmp_path_factory.mktemp("hifigan") / "m.safetensors", config, {"vocoder.": ref})
    return path, ref


@pytest.fixture(scope="module")
def bwe_checkpoint(tmp_path_factory):
    ref = reference_vocoder(TINY_BWE, BWE_GAIN)
    components = {"vocoder.": ref, "audio_vae.decoder.": {"conv_in.conv.weight": torch.zeros(1)}}
    path = write_official_checkpoint(tmp_path_factory.mktemp("bwe") / "m.safetensors", {"vocoder": TINY_BWE},
                                     components)
    return path, ref


def log_mel_input(num_frames: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(2, 2, num_frames, 64, generator=torch.Generator().manual_seed(seed)) - 4.0


def test_hifigan_parity(hifigan_checkpoint):
    path, ref = hifigan_checkpoint
    vocoder = load_vocoder(path)
    assert isinstance(vocoder, WaveGenerator) and vocoder.output_sample_rate == 24000
    mel = log_mel_input(9)
    with torch.no_grad():
        expected = ref(mel)
        ours = vocoder(mel)
    assert ours.shape == expected.shape == (2, 2, 9 * 12)
    assert expected.std() > 0.05, "a near-silent reference output would make the comparison vacuous"
    # Measured max |diff| 0 on outputs with std 0.24 (the same float32 ops in the same order); 1e-6 allows for
    # kernel-selection noise on other CPUs.
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_bwe_parity(bwe_checkpoint):
    path, ref = bwe_checkpoint
    vocoder = load_vocoder(path)
    assert isinstance(vocoder, BWEVocoder) and vocoder.output_sample_rate == 48000
    for num_frames in (7, 4):  # 7 frames -> 1120 samples at 16 kHz: a whole number of hops; 4 -> 640: also
        mel = log_mel_input(num_frames)
        with torch.no_grad():
            expected = ref(mel)
            ours = vocoder(mel)
        assert ours.shape == expected.shape == (2, 2, num_frames * 160 * 3)
        assert expected.std() > 0.05 and (expected.abs() == 1).float().mean() < 0.05
        # Measured max |diff| 3.6e-7 on outputs with std 0.13-0.16: float32 rounding, mostly from the skip
        # resampler (polyphase conv here vs transposed conv there, taps equal to 2e-7) and the anti-aliasing
        # filters' summation order, amplified through the BWE generator. 1e-5 leaves a 25x margin.
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_bwe_parity_when_the_low_rate_output_is_not_whole_hops(tmp_path: Path):
    """A main generator whose hop (5 * 4 * 2 = 40 samples) is half the BWE mel hop: odd frame counts pad."""
    config = copy.deepcopy(TINY_BWE)
    config["vocoder"].update(upsample_rates=[5, 4, 2], upsample_kernel_sizes=[11, 8, 4])
    ref = reference_vocoder(config, BWE_GAIN)
    path = write_official_checkpoint(tmp_path / "m.safetensors", {"vocoder": config}, {"vocoder.": ref})
    vocoder = load_vocoder(path)
    mel = log_mel_input(5)
    with torch.no_grad():
        expected = ref(mel)
        ours = vocoder(mel)
    assert ours.shape == expected.shape == (2, 2, 5 * 40 * 3)
    assert expected.std() > 0.05 and (expected.abs() == 1).float().mean() < 0.05
    # Measured max |diff| 8.8e-7 (output std 0.4).
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_derived_filters_equal_the_reference():
    """Kaiser filters built from the config equal ltx-core's; the non-persistent 3x skip filter (polyphase here,
    one 43-tap transposed-conv filter there) holds the same taps: ours[p, k] = 3 * ref[42 - 3 k + p]."""
    ref = reference_configurator().from_config({"vocoder": TINY_BWE})
    ours = build_vocoder(vocoder_config_from_checkpoint(TINY_BWE))
    ref_filters = {k: v for k, v in ref.state_dict().items() if k.endswith(".filter")}
    assert ref_filters and set(ref_filters) == {k for k in ours.state_dict() if k.endswith(".filter")}
    for key, value in ref_filters.items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=1e-7)
    assert "resampler.filter" not in ours.state_dict()
    ref_taps, our_taps = ref.resampler.filter[0, 0], ours.resampler.filter[:, 0]
    assert our_taps.shape == (3, 15) and ref_taps.shape == (43,)
    for phase in range(3):
        for k in range(15):
            j = 42 - 3 * k + phase
            expected = 3 * ref_taps[j] if j < 43 else torch.tensor(0.0)
            assert abs(our_taps[phase, k] - expected) < 1e-6


@pytest.mark.parametrize("config", [LTX2_VOCODER, LTX23_VOCODER], ids=["ltx-2", "ltx-2.3"])
def test_published_configs_build_with_the_reference_layout(config):
    with torch.device("meta"):
        ref = reference_configurator().from_config({"vocoder": config})
        ours = build_vocoder(vocoder_config_from_checkpoint(config))
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours.output_sample_rate == ref.output_sampling_rate == (24000 if config is LTX2_VOCODER else 48000)
    num_params = sum(p.numel() for p in ours.parameters())
    assert num_params == sum(p.numel() for p in ref.parameters())
    # Figures from the architecture notes: 55.6 M (HiFi-GAN) and 128.5 M (BigVGAN-v2 + BWE) parameters.
    assert round(num_params / 1e6, 1) == (55.6 if config is LTX2_VOCODER else 128.5)


def test_state_dict_keys_match_checkpoint(bwe_checkpoint, hifigan_checkpoint):
    for path, ref in (bwe_checkpoint, hifigan_checkpoint):
        assert set(load_vocoder(path).state_dict()) == set(ref.state_dict())


def test_determinism_dtype_and_freezing(bwe_checkpoint):
    path, _ = bwe_checkpoint
    vocoder = load_vocoder(path)
    assert not vocoder.training and all(not p.requires_grad for p in vocoder.parameters())
    mel = log_mel_input(4)
    with torch.no_grad():
        first, second = vocoder(mel), vocoder(mel)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    # Every tensor is cast on load, and the derived float32 skip filter follows the input dtype. float64 rather
    # than bfloat16 keeps this fast on CPU (oneDNN compiles bf16 kernels per shape) and checks the values too.
    wide = load_vocoder(path, dtype=torch.float64)
    assert {t.dtype for t in wide.state_dict().values()} == {torch.float64}
    with torch.no_grad():
        out64 = wide(mel.double())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), first, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(batch, 2, frames, 64\)"):
        vocoder(mel[:, :1])


def test_decode_audio_end_to_end(hifigan_checkpoint):
    path, _ = hifigan_checkpoint
    vocoder = load_vocoder(path)
    decoder = AudioDecoder(AudioVAEConfig(ch=32, ch_mult=(1, 1, 1), z_channels=2, num_res_blocks=1,
                                          attn_resolutions=(), mid_block_add_attention=False))
    latents = torch.randn(1, 2, 5, 16)
    wave = decode_audio(decoder, vocoder, latents)
    assert wave.is_inference() and wave.dtype == torch.float32
    assert wave.shape == (1, 2, (4 * 5 - 3) * 12)
    with torch.no_grad():
        torch.testing.assert_close(wave, vocoder(decoder(latents)), rtol=0, atol=0)


def _write(tmp_path: Path, config: dict, tensors: dict | None = None) -> Path:
    return write_official_checkpoint(tmp_path / "bad.safetensors", config, {"vocoder.": tensors or {}})


def test_missing_vocoder_section(tmp_path: Path):
    path = _write(tmp_path, {"audio_vae": {}})
    with pytest.raises(ValueError, match=r"bad\.safetensors: the checkpoint config has no 'vocoder' section"):
        load_vocoder(path)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c: c["bwe"].update(resblock="1"), r"vocoder\.bwe\.resblock = '1' is not supported.*'AMP1'"),
        (lambda c: c["vocoder"].update(activation="snake"), r"vocoder\.vocoder\.activation = 'snake'.*'snakebeta'"),
        (lambda c: c["bwe"].pop("activation"), r"vocoder\.bwe\.activation is missing"),
        (lambda c: c["vocoder"].update(stereo=False), r"vocoder\.vocoder\.stereo = False"),
        (lambda c: c["bwe"].pop("n_fft"), r"vocoder\.bwe is missing \['n_fft'\]"),
        (lambda c: c["bwe"].update(win_size=400), "win_size = 400 differs from n_fft"),
        (lambda c: c["bwe"].update(upsample_rates=[6, 5, 4]), r"prod\(upsample_rates\) = 120"),
        (lambda c: c["bwe"].update(output_sampling_rate=44100), "integer multiple"),
        (lambda c: c["bwe"].update(upsample_kernel_sizes=[12, 10, 16]), "would not upsample exactly"),
    ],
)
def test_bad_bwe_configs(tmp_path: Path, edit, match):
    config = copy.deepcopy(TINY_BWE)
    edit(config)
    with pytest.raises(ValueError, match=match):
        load_vocoder(_write(tmp_path, {"vocoder": config}))


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c: c.update(resblock="AMP1"), r"vocoder\.resblock = 'AMP1' is not supported.*'1'"),
        (lambda c: c.pop("stereo"), r"vocoder\.stereo is missing"),
        (lambda c: c.update(upsample_kernel_sizes=[7, 4]), "equally long"),
        (lambda c: c.update(resblock_kernel_sizes=[3, 4]), "must be odd"),
        (lambda c: c.update(upsample_initial_channel=36), "divisible"),
    ],
)
def test_bad_hifigan_configs(tmp_path: Path, edit, match):
    config = copy.deepcopy(TINY_HIFIGAN)
    edit(config)
    with pytest.raises(ValueError, match=match):
        load_vocoder(_write(tmp_path, {"vocoder": config}))


def test_missing_persistent_filter_or_mel_basis_is_an_error(tmp_path: Path, bwe_checkpoint, caplog):
    _, ref = bwe_checkpoint
    for dropped in ("vocoder.resblocks.0.acts1.0.upsample.filter", "mel_stft.stft_fn.forward_basis"):
        tensors = {k: v for k, v in ref.state_dict().items() if k != dropped}
        path = _write(tmp_path, {"vocoder": TINY_BWE}, tensors)
        with pytest.raises(ValueError, match=rf"missing keys \(1\): {dropped.replace('.', '[.]')}"):
            load_vocoder(path)
    tensors = {**ref.state_dict(), "resampler.filter": torch.zeros(1, 1, 43)}
    with caplog.at_level(logging.WARNING, logger="ltxf.models.checkpoint"):
        load_vocoder(_write(tmp_path, {"vocoder": TINY_BWE}, tensors))  # an extra tensor is ignored, with a warning
    assert "(unexpected keys): resampler.filter" in caplog.text
