"""LTX-2.5 split-pack VAEs and vocoder against the official ltx-core 1.2 goldens.

Standalone files: the conv video VAE with bare ``encoder.`` / ``decoder.`` / ``per_channel_statistics.`` keys,
and the audio VAE file that also holds the BWE vocoder. Tolerances are the golden README's (§3): video encode
1e-5, video decode 2e-3 (the tiny decoder's 2-channel pixel norms amplify float32 rounding: the official
f32-vs-f64 envelope is 5e-4), audio encode/decode 1e-5, vocoder 1e-4. The log-mel front end is ltxf's own
STFT/mel/resampler, not torchaudio's: the README expects ~1e-4 for an own implementation (measured 1.5e-5 at
16 kHz, 1.9e-5 through the 48k->16k resampler, at values ~5), so it is checked at 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from ltxf.models.audio_vae import load_audio_vae_decoder, load_audio_vae_encoder
from ltxf.models.mel import log_mel_spectrogram
from ltxf.models.video_vae import load_video_vae_decoder, load_video_vae_encoder, video_vae_key_prefix
from ltxf.models.vocoder import BWEVocoder, decode_audio, load_vocoder
from tests.models.golden_ltx25 import (
    AUDIO_VAE,
    TRANSFORMER,
    VIDEO_VAE_CONV,
    VIDEO_VAE_DIFFUSION,
    assert_close,
    golden,
)


def test_conv_video_vae_from_standalone_file():
    g = golden("video_vae_conv")
    # The standalone file stores bare encoder./decoder. keys; the checkpoint reader names them officially (vae.*).
    assert video_vae_key_prefix(VIDEO_VAE_CONV) == "vae."
    encoder = load_video_vae_encoder(VIDEO_VAE_CONV)
    decoder = load_video_vae_decoder(VIDEO_VAE_CONV)
    with torch.no_grad():
        assert_close(encoder(g["video.input_pixels"]), g["video.encoded_latent"], 1e-5, "conv VAE encode")
        assert_close(decoder(g["video.decode_input_latent"]), g["video.decoded_pixels"], 2e-3, "conv VAE decode")


def test_video_vae_prefix_detection_refuses_a_file_without_vae():
    with pytest.raises(ValueError, match="no video VAE tensors"):
        video_vae_key_prefix(TRANSFORMER)


@pytest.fixture(scope="module")
def audio_models():
    return load_audio_vae_encoder(AUDIO_VAE), load_audio_vae_decoder(AUDIO_VAE), load_vocoder(AUDIO_VAE)


def test_audio_mel_front_end(audio_models):
    g = golden("audio_vae")
    encoder = audio_models[0]
    assert_close(log_mel_spectrogram(g["audio.waveform_16k"], 16000, encoder.config.mel), g["audio.mel_from_16k"],
                 1e-4, "mel 16 kHz")
    assert_close(log_mel_spectrogram(g["audio.waveform_48k"], 48000, encoder.config.mel), g["audio.mel_from_48k"],
                 1e-4, "mel 48 kHz -> 16 kHz")


def test_audio_vae_encode_decode(audio_models):
    g = golden("audio_vae")
    encoder, decoder, _ = audio_models
    with torch.no_grad():
        assert_close(encoder(g["audio.mel_from_16k"]), g["audio.encoded_latent_from_16k"], 1e-5, "audio encode 16k")
        assert_close(encoder(g["audio.mel_from_48k"]), g["audio.encoded_latent_from_48k"], 1e-5, "audio encode 48k")
        assert_close(decoder(g["audio.decode_input_latent"]), g["audio.decoded_mel"], 1e-5, "audio decode")


def test_vocoder_with_bandwidth_extension(audio_models):
    g = golden("audio_vae")
    _, decoder, vocoder = audio_models
    assert isinstance(vocoder, BWEVocoder) and vocoder.output_sample_rate == 48000
    with torch.no_grad():
        stage1 = vocoder.vocoder(g["audio.decoded_mel"]).clamp(-1, 1)
        assert_close(stage1, g["audio.vocoder_stage1_16k"], 1e-4, "vocoder 16 kHz stage")
        assert_close(vocoder(g["audio.decoded_mel"]), g["audio.vocoder_bwe_48k"], 1e-4, "vocoder + BWE 48 kHz")
    waveform = decode_audio(decoder, vocoder, g["audio.decode_input_latent"])
    assert_close(waveform[0], g["audio.decode_audio_waveform"], 1e-4, "decode_audio")


def test_diffusion_vae_file_encoder_and_decoder_fallback_message():
    """The diffusion-decoder VAE file's conv encoder (``latent_log_var`` constant) against
    ``goldens/video_vae_diffusion.safetensors`` (encode tolerance 1e-5 as for the conv VAE). Its diffusion decoder
    is not implemented in ltxf: loading it is refused with a message naming the conv VAE to decode with."""
    g = golden("video_vae_diffusion")
    encoder = load_video_vae_encoder(VIDEO_VAE_DIFFUSION)
    assert encoder.config.latent_log_var == "constant"
    with torch.no_grad():
        assert_close(encoder(golden("video_vae_conv")["video.input_pixels"]), g["encoded_latent"], 1e-5,
                     "diffusion VAE file encode")
    with pytest.raises(ValueError, match=r"diffusion-decoder video VAE.*conv VAE.*--model\.video_vae"):
        load_video_vae_decoder(VIDEO_VAE_DIFFUSION)


def test_decoding_with_a_diffusion_vae_falls_back_to_the_packs_conv_vae(tmp_path, caplog):
    from ltxf.models.pack import resolve_pack

    assert resolve_pack(TRANSFORMER, video_vae=VIDEO_VAE_DIFFUSION).video_decoder_file() == VIDEO_VAE_CONV
    assert "diffusion-decoder video VAE" in caplog.text
    assert resolve_pack(TRANSFORMER, video_vae=VIDEO_VAE_CONV).video_decoder_file() == VIDEO_VAE_CONV
    alone = tmp_path / VIDEO_VAE_DIFFUSION.name
    alone.write_bytes(VIDEO_VAE_DIFFUSION.read_bytes())
    with pytest.raises(ValueError, match=r"diffusion-decoder video VAE.*found none next to it.*--model\.video_vae"):
        resolve_pack(TRANSFORMER, video_vae=alone).video_decoder_file()
