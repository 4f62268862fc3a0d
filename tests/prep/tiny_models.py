"""Tiny models for the preprocessing tests, built here with random weights (nothing is downloaded):

* an official-layout checkpoint (one .safetensors, config JSON in its metadata) holding ltxf's own video VAE
  (128 latent channels, as the official layout requires, but three strided convs per side), audio VAE (the
  shipped 8 x 16 latent layout, one ResNet block per level), a HiFi-GAN vocoder (240x upsampling to 24 kHz from
  100 mel frames/s, 16 channels wide) and the LTX-2 text side (feature extractor V1 + connectors) sized for a
  32-wide, 2-layer Gemma;
* a tiny Gemma 3 causal-LM directory with a word-level tokenizer, which ``load_gemma_text_encoder`` loads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

from ltxf.models.audio_vae import AudioDecoder, AudioEncoder, AudioVAEConfig
from ltxf.models.checkpoint import (
    AUDIO_CONNECTOR_PREFIX,
    AUDIO_VAE_DECODER_PREFIX,
    AUDIO_VAE_ENCODER_PREFIX,
    AUDIO_VAE_STATISTICS_PREFIX,
    TEXT_PROJECTION_PREFIX,
    VIDEO_CONNECTOR_PREFIX,
    VIDEO_VAE_DECODER_PREFIX,
    VIDEO_VAE_ENCODER_PREFIX,
    VIDEO_VAE_STATISTICS_PREFIX,
    VOCODER_PREFIX,
    write_checkpoint,
)
from ltxf.models.text import EmbeddingsProcessor, EmbeddingsProcessorConfig
from ltxf.models.video_vae import VideoDecoder, VideoEncoder, VideoVAEConfig
from ltxf.models.vocoder import build_vocoder, vocoder_config_from_checkpoint
from tests.ltx_reference import random_init_, tiny_transformer_config

GEMMA_HIDDEN = 32
GEMMA_LAYERS = 2
WORDS = ("a red green blue square circle moves left right on the screen over grey background fast slow tone "
         "cat dog runs jumps video shows clip sky").split()

VAE_SECTION = {
    "latent_channels": 128, "patch_size": 4, "decoder_base_channels": 8, "timestep_conditioning": True,
    "encoder_blocks": [["compress_all", {}], ["compress_all", {}], ["compress_all", {}]],
    "decoder_blocks": [["compress_all", {"multiplier": 2}]] * 3,
}
AUDIO_VAE_SECTION = {
    "model": {"params": {"sampling_rate": 16000, "ddconfig": {
        "double_z": True, "mel_bins": 64, "z_channels": 8, "resolution": 256, "in_channels": 2, "out_ch": 2,
        "ch": 128, "ch_mult": [1, 1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
        "mid_block_add_attention": False, "norm_type": "pixel", "causality_axis": "height"}}},
    "preprocessing": {
        "audio": {"sampling_rate": 16000, "max_wav_value": 32768.0, "stereo": True},
        "stft": {"filter_length": 1024, "hop_length": 160, "win_length": 1024, "causal": True},
        "mel": {"n_mel_channels": 64, "mel_fmin": 0, "mel_fmax": 8000},
    },
}  # fmt: skip
VOCODER_SECTION = {
    "resblock": "1", "stereo": True, "upsample_rates": [6, 5, 8], "upsample_kernel_sizes": [12, 11, 16],
    "resblock_kernel_sizes": [3], "resblock_dilation_sizes": [[1, 3, 5]], "upsample_initial_channel": 16,
    "output_sampling_rate": 24000,
}
VOCODER_RATE = 24000


def transformer_section() -> dict:
    config = tiny_transformer_config("ltx-2")
    config["connector_attention_head_dim"] = 16  # V1 projects Gemma features to the connector width (2 x 16)
    return config


def _without_statistics(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if not k.startswith("per_channel_statistics.")}


def _statistics(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    prefix = "per_channel_statistics."
    return {k[len(prefix) :]: v for k, v in module.state_dict().items() if k.startswith(prefix)}


def write_tiny_checkpoint(path: Path) -> Path:
    """Random tiny components of every kind the preprocessing reads, under the official key prefixes."""
    vae_config = VideoVAEConfig.from_checkpoint_config(VAE_SECTION)
    video_encoder = random_init_(VideoEncoder(vae_config), std=0.05, seed=1)
    video_decoder = random_init_(VideoDecoder(vae_config), std=0.05, seed=2)
    audio_config = AudioVAEConfig.from_checkpoint(AUDIO_VAE_SECTION)
    audio_encoder = random_init_(AudioEncoder(audio_config), std=0.05, seed=3)
    audio_decoder = random_init_(AudioDecoder(audio_config), std=0.05, seed=4)
    vocoder = random_init_(build_vocoder(vocoder_config_from_checkpoint(VOCODER_SECTION)), std=0.1, seed=5)
    text_config = EmbeddingsProcessorConfig.from_transformer_config(
        transformer_section(), gemma_hidden_size=GEMMA_HIDDEN, gemma_num_hidden_states=GEMMA_LAYERS + 1
    )
    text = random_init_(EmbeddingsProcessor(text_config), seed=6)

    tensors: dict[str, torch.Tensor] = {}
    parts = {
        VIDEO_VAE_ENCODER_PREFIX: _without_statistics(video_encoder),
        VIDEO_VAE_DECODER_PREFIX: _without_statistics(video_decoder),
        VIDEO_VAE_STATISTICS_PREFIX: _statistics(video_encoder),
        AUDIO_VAE_ENCODER_PREFIX: _without_statistics(audio_encoder),
        AUDIO_VAE_DECODER_PREFIX: _without_statistics(audio_decoder),
        AUDIO_VAE_STATISTICS_PREFIX: _statistics(audio_encoder),
        VOCODER_PREFIX: vocoder.state_dict(),
        TEXT_PROJECTION_PREFIX: text.feature_extractor.state_dict(),
        VIDEO_CONNECTOR_PREFIX: text.video_connector.state_dict(),
        AUDIO_CONNECTOR_PREFIX: text.audio_connector.state_dict(),
    }
    for prefix, state in parts.items():
        tensors.update({prefix + k: v for k, v in state.items()})
    config = {"transformer": transformer_section(), "vae": VAE_SECTION, "audio_vae": AUDIO_VAE_SECTION,
              "vocoder": VOCODER_SECTION}
    return write_checkpoint(path, tensors, config)


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def write_tiny_gemma(directory: Path) -> Path:
    """A random 2-layer, 32-wide Gemma 3 causal LM and its word-level tokenizer, saved as a model directory."""
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=64, hidden_size=GEMMA_HIDDEN, intermediate_size=64, num_hidden_layers=GEMMA_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=16, max_position_embeddings=2048,
        layer_types=["sliding_attention", "full_attention"],
    ))
    model.save_pretrained(directory)
    _tokenizer().save_pretrained(directory)
    return directory
