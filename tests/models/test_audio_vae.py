"""Audio VAE encoder / decoder: parity with ltx-core 1.0.0 at tiny configs, loaded through ltxf's loaders from
checkpoints in the official layout; shapes, determinism and errors."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import pytest
import torch

from ltxf.models.audio_vae import (
    AudioDecoder,
    AudioEncoder,
    AudioVAEConfig,
    PerChannelStatistics,
    encode_audio,
    load_audio_vae_decoder,
    load_audio_vae_encoder,
)
from ltxf.models.checkpoint import read_config
from ltxf.models.mel import log_mel_spectrogram
from tests.ltx_reference import import_ltx_core, random_init_, write_official_checkpoint
from tests.models.test_mel import REAL_AUDIO_VAE_CONFIG

# Shipped latent layout (8 channels x 16 bins = the 128 statistics; the reference sizes the statistics by `ch`, so
# ch must be 128 here) but one ResNet block per level and a narrow middle: (1, 1, 2).
SHIPPED_LAYOUT = dict(ch=128, ch_mult=[1, 1, 2], z_channels=8)
TINY_CONFIGS = {
    "shipped-layout": SHIPPED_LAYOUT,
    # GroupNorm, non-causal, attention at the second level and in the middle block.
    "group-noncausal-attn": dict(
        ch=32, ch_mult=[1, 2], z_channels=1, norm_type="group", causality_axis=None, attn_resolutions=[128],
        mid_block_add_attention=True,
    ),
    # Causal along frequency: decoded mel bins come out short and are zero-padded to 64.
    "width-causal": dict(ch=32, ch_mult=[1, 1, 2], z_channels=2, causality_axis="width", mid_block_add_attention=True),
    "width-compatibility": dict(ch=32, ch_mult=[1, 2], z_channels=1, causality_axis="width-compatibility"),
}


def audio_vae_section(**ddconfig) -> dict:
    """A checkpoint-style audio_vae section: the published values, overridden by `ddconfig`."""
    dd = dict(
        double_z=True, mel_bins=64, z_channels=8, resolution=256, downsample_time=False, in_channels=2, out_ch=2,
        ch=128, ch_mult=[1, 2, 4], num_res_blocks=1, attn_resolutions=[], dropout=0.0,
        mid_block_add_attention=False, norm_type="pixel", causality_axis="height",
    )
    dd.update(ddconfig)
    return {
        "model": {"params": {"ddconfig": dd, "sampling_rate": 16000}},
        "preprocessing": {
            "audio": {"sampling_rate": 16000, "max_wav_value": 32768.0, "stereo": True},
            "stft": {"filter_length": 1024, "hop_length": 160, "win_length": 1024, "causal": True},
            "mel": {"n_mel_channels": 64, "mel_fmin": 0, "mel_fmax": 8000},
        },
    }


def reference_audio_vae(config: dict) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, torch.Tensor]]:
    """Random-initialised ltx-core encoder and decoder sharing one set of statistics."""
    configurator = import_ltx_core("ltx_core.model.audio_vae.model_configurator")
    encoder = random_init_(configurator.AudioEncoderConfigurator.from_config(config), std=0.05, seed=0).eval()
    decoder = random_init_(configurator.AudioDecoderConfigurator.from_config(config), std=0.05, seed=1).eval()
    stats = {
        name: buffer.clone()
        for name, buffer in encoder.per_channel_statistics.named_buffers()
    }
    decoder.per_channel_statistics.load_state_dict(stats)
    return encoder, decoder, stats


def official_tensors(encoder, decoder, stats) -> dict[str, dict[str, torch.Tensor]]:
    """The reference modules' state dicts under the official prefixes (statistics stored once)."""

    def without_stats(module):
        return {k: v for k, v in module.state_dict().items() if not k.startswith("per_channel_statistics.")}

    return {
        "audio_vae.encoder.": without_stats(encoder),
        "audio_vae.decoder.": without_stats(decoder),
        "audio_vae.per_channel_statistics.": stats,
    }


def write_reference_checkpoint(name: str, directory: Path):
    config = {"audio_vae": audio_vae_section(**TINY_CONFIGS[name])}
    encoder, decoder, stats = reference_audio_vae(config)
    components = official_tensors(encoder, decoder, stats)
    # Other components in the same file must be ignored by the audio VAE loaders.
    components["vocoder."] = {"conv_pre.weight": torch.zeros(4, 128, 7)}
    components["vae.encoder."] = {"conv_in.conv.weight": torch.zeros(2, 3)}
    path = write_official_checkpoint(directory / "model.safetensors", config, components)
    return name, path, encoder, decoder


@pytest.fixture(scope="module", params=list(TINY_CONFIGS))
def checkpoint(request, tmp_path_factory):
    return write_reference_checkpoint(request.param, tmp_path_factory.mktemp("audio_vae"))


@pytest.fixture(scope="module")
def shipped_checkpoint(tmp_path_factory):
    return write_reference_checkpoint("shipped-layout", tmp_path_factory.mktemp("audio_vae_shipped"))


# Measured max |ours - reference| over these configs: encoder <= 4.7e-6, decoder <= 3.0e-6, on outputs with std
# 0.3-1.5 and max 1.5-6.3 (float32; the differences are summation order in convolutions, rsqrt vs sqrt-divide in
# PixelNorm, SDPA vs bmm-softmax attention). 2e-5 leaves a 4x margin and is far below any wiring error (those
# show up as O(0.1-1)).
PARITY_ATOL = 2e-5


def test_encoder_parity(checkpoint):
    name, path, ref_encoder, _ = checkpoint
    encoder = load_audio_vae_encoder(path)
    mel = torch.randn(2, 2, 29, 64, generator=torch.Generator().manual_seed(5)) * 2 - 5
    with torch.no_grad():
        expected = ref_encoder(mel)
        ours = encoder(mel)
    assert ours.shape == expected.shape
    assert expected.abs().max() > 0.5, "degenerate reference output would make this test vacuous"
    torch.testing.assert_close(ours, expected, rtol=0, atol=PARITY_ATOL)
    if name == "shipped-layout":
        assert ours.shape == (2, 8, (29 - 1) // 4 + 1, 16)


def test_decoder_parity(checkpoint):
    name, path, _, ref_decoder = checkpoint
    decoder = load_audio_vae_decoder(path)
    cfg = decoder.config
    latents = torch.randn(2, cfg.z_channels, 6, cfg.latent_mel_bins, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = ref_decoder(latents)
        ours = decoder(latents)
    assert ours.shape == expected.shape == (2, 2, cfg.num_decoded_frames(6), 64)
    assert expected.abs().max() > 0.5
    torch.testing.assert_close(ours, expected, rtol=0, atol=PARITY_ATOL)
    if name == "shipped-layout":
        assert ours.shape == (2, 2, 4 * 6 - 3, 64)


def test_state_dict_keys_match_reference(checkpoint):
    _, path, ref_encoder, ref_decoder = checkpoint
    for ours, ref in ((load_audio_vae_encoder(path), ref_encoder), (load_audio_vae_decoder(path), ref_decoder)):
        ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        assert ours_shapes == ref_shapes


def test_loaded_modules_are_frozen_and_cast(checkpoint):
    _, path, _, _ = checkpoint
    encoder = load_audio_vae_encoder(path, dtype=torch.bfloat16)
    assert not encoder.training
    assert all(not p.requires_grad for p in encoder.parameters())
    assert {t.dtype for t in encoder.state_dict().values()} == {torch.bfloat16}
    decoder = load_audio_vae_decoder(path, dtype=torch.float64)
    assert {t.dtype for t in decoder.state_dict().values()} == {torch.float64}


def test_bfloat16_encode(shipped_checkpoint):
    _, path, ref_encoder, _ = shipped_checkpoint
    encoder = load_audio_vae_encoder(path, dtype=torch.bfloat16)
    mel = torch.randn(1, 2, 9, 64) - 4
    with torch.no_grad():
        ours = encoder(mel.bfloat16())
        expected = ref_encoder(mel)
    assert ours.dtype == torch.bfloat16
    # bf16 weights and activations (8-bit mantissa) through ~15 layers: measured max |diff| 0.065-0.077 over three
    # seeds, on outputs of max 4.3-5.2; 0.25 is a 3x margin and still catches a mis-cast (errors of O(1)).
    torch.testing.assert_close(ours.float(), expected, rtol=0, atol=0.25)


@pytest.fixture(scope="module")
def narrow_modules() -> tuple[AudioEncoder, AudioDecoder]:
    """The shipped frame/bin geometry (three levels, causal in time, 64 -> 16 bins) at 2 latent channels."""
    config = AudioVAEConfig.from_checkpoint(audio_vae_section(ch=32, ch_mult=[1, 1, 1], z_channels=2))
    torch.manual_seed(0)
    return AudioEncoder(config).eval(), AudioDecoder(config).eval()


@pytest.mark.parametrize("num_mel_frames", [1, 2, 4, 5, 8, 9, 30, 101])
def test_latent_frame_counts(narrow_modules, num_mel_frames):
    encoder, decoder = narrow_modules
    with torch.no_grad():
        latents = encoder(torch.randn(1, 2, num_mel_frames, 64))
        mel = decoder(latents)
    num_latents = (num_mel_frames - 1) // 4 + 1
    assert latents.shape == (1, 2, num_latents, 16)
    assert encoder.config.num_latent_frames(num_mel_frames) == num_latents
    assert mel.shape == (1, 2, max(4 * num_latents - 3, 1), 64)


def test_statistics_follow_the_patchified_128_layout():
    """Entry c * 16 + f of the statistics normalises latent channel c, bin f (the transformer's token layout)."""
    stats = PerChannelStatistics(128)
    with torch.no_grad():
        stats.get_buffer("mean-of-means").copy_(torch.randn(128))
        stats.get_buffer("std-of-means").copy_(torch.rand(128) + 0.5)
    x = torch.randn(2, 8, 5, 16)
    tokens = x.permute(0, 2, 1, 3).reshape(2, 5, 128)  # (B, T, C * F), channel-major
    normalised = (tokens - stats.get_buffer("mean-of-means")) / stats.get_buffer("std-of-means")
    expected = normalised.reshape(2, 5, 8, 16).permute(0, 2, 1, 3)
    torch.testing.assert_close(stats.normalize(x), expected)
    torch.testing.assert_close(stats.denormalize(stats.normalize(x)), x, rtol=1e-5, atol=1e-5)


def test_encode_audio_runs_the_front_end(shipped_checkpoint):
    _, path, _, _ = shipped_checkpoint
    encoder = load_audio_vae_encoder(path)
    wave = torch.randn(2, 2, 3200) * 0.1
    latents = encode_audio(encoder, wave, 16000)
    assert latents.is_inference()
    with torch.no_grad():
        expected = encoder(log_mel_spectrogram(wave, 16000))
    torch.testing.assert_close(latents, expected, rtol=0, atol=0)
    assert latents.shape == (2, 8, (3200 // 160) // 4 + 1, 16)
    torch.testing.assert_close(encode_audio(encoder, wave, 16000), latents, rtol=0, atol=0)  # deterministic
    # Mono is duplicated; other rates are resampled to 16 kHz first (0.2 s at 44.1 kHz -> 3200 samples).
    mono = encode_audio(encoder, wave[:1, :1], 16000)
    torch.testing.assert_close(mono, encode_audio(encoder, wave[:1, :1].expand(1, 2, -1), 16000), rtol=0, atol=0)
    resampled = encode_audio(encoder, torch.randn(1, 2, 8820) * 0.1, 44100)
    assert resampled.shape == (1, 8, (math.ceil(8820 * 16000 / 44100) // 160) // 4 + 1, 16)


def test_missing_keys_are_errors_and_unexpected_ones_warnings(tmp_path: Path, caplog):
    config = {"audio_vae": audio_vae_section(**TINY_CONFIGS["width-compatibility"])}
    encoder, decoder, stats = reference_audio_vae(config)
    components = official_tensors(encoder, decoder, stats)
    missing = copy.copy(components)
    missing["audio_vae.encoder."] = {k: v for k, v in components["audio_vae.encoder."].items()
                                     if k != "conv_out.conv.weight"}
    path = write_official_checkpoint(tmp_path / "missing.safetensors", config, missing)
    with pytest.raises(ValueError, match=r"missing keys \(1\): conv_out\.conv\.weight"):
        load_audio_vae_encoder(path)
    load_audio_vae_decoder(path)  # the decoder's tensors are all there

    no_stats = {k: v for k, v in components.items() if k != "audio_vae.per_channel_statistics."}
    path = write_official_checkpoint(tmp_path / "no_stats.safetensors", config, no_stats)
    with pytest.raises(ValueError, match="per_channel_statistics.mean-of-means"):
        load_audio_vae_decoder(path)

    extra = copy.copy(components)
    extra["audio_vae.decoder."] = {**components["audio_vae.decoder."], "up.9.block.0.conv1.conv.weight": torch.ones(1)}
    path = write_official_checkpoint(tmp_path / "extra.safetensors", config, extra)
    with caplog.at_level(logging.WARNING, logger="ltxf.models.checkpoint"):
        decoder = load_audio_vae_decoder(path)  # ltx-core ignores extra tensors too
    assert r"(unexpected keys): up.9.block.0.conv1.conv.weight" in caplog.text
    assert not any(t.is_meta for t in decoder.state_dict().values())

    wider = {"audio_vae": audio_vae_section(**{**TINY_CONFIGS["width-compatibility"], "ch": 64, "z_channels": 2})}
    path = write_official_checkpoint(tmp_path / "shape.safetensors", wider, components)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_audio_vae_encoder(path)

    path = write_official_checkpoint(tmp_path / "no_section.safetensors", {"vocoder": {}}, components)
    with pytest.raises(ValueError, match="no 'audio_vae' section"):
        load_audio_vae_encoder(path)
    assert "audio_vae" in read_config(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    "ddconfig,match",
    [
        (dict(ch=64), r"ch=64 entries .* 8 \* 16 = 128"),
        (dict(ch=32, ch_mult=[1, 2], z_channels=1, norm_type="group"), "GroupNorm mixes time steps"),
        (dict(norm_type="batch"), "norm_type"),
        (dict(causality_axis="depth"), "causality_axis"),
        (dict(double_z=False), "double_z"),
        (dict(ch_mult="abc"), "invalid audio_vae config"),
        (dict(resamp_with_conv=False), "resamp_with_conv = False"),
        (dict(attn_type="linear"), "attn_type"),
    ],
)
def test_bad_configs_raise(ddconfig, match):
    with pytest.raises(ValueError, match=match):
        AudioVAEConfig.from_checkpoint(audio_vae_section(**{**SHIPPED_LAYOUT, **ddconfig}), "model.safetensors")


def test_input_shape_errors(narrow_modules):
    encoder, decoder = narrow_modules
    with pytest.raises(ValueError, match="64 mel bins"):
        encoder(torch.randn(1, 2, 9, 80))
    with pytest.raises(ValueError, match=r"\(batch, 2, frames, mel bins\)"):
        encoder(torch.randn(1, 1, 9, 64))
    with pytest.raises(ValueError, match=r"\(batch, 2, frames, 16\)"):
        decoder(torch.randn(1, 4, 3, 16))


def test_published_config_builds_with_the_reference_layout():
    configurator = import_ltx_core("ltx_core.model.audio_vae.model_configurator")
    config = AudioVAEConfig.from_checkpoint(REAL_AUDIO_VAE_CONFIG)
    assert config.latent_mel_bins == 16 and config.num_latent_frames(485) == 122
    for ours_cls, ref_cls, millions in ((AudioEncoder, configurator.AudioEncoderConfigurator, 21.3),
                                        (AudioDecoder, configurator.AudioDecoderConfigurator, 31.9)):
        with torch.device("meta"):
            ours = ours_cls(config)
            ref = ref_cls.from_config({"audio_vae": REAL_AUDIO_VAE_CONFIG})
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
        # Figures from the architecture notes (21.3 M / 31.9 M parameters).
        assert round(sum(p.numel() for p in ours.parameters()) / 1e6, 1) == millions
