"""Assets for the CPU demo: a tiny random-initialised LTX-2.3-architecture checkpoint, a synthetic dataset and
precomputed validation-prompt features.

Everything is written in the official formats (a single safetensors file with the config as metadata; the
``.precomputed/`` folder layout), so the demo exercises the same loaders and dataset a real run uses.
The synthetic clips are smooth, text-correlated latent patterns, so a LoRA can visibly lower the loss.

The checkpoint holds every component a real one does except Gemma: the transformer and the text side
(feature extractor + connectors), a video VAE (encoder, decoder, latent statistics), an audio VAE (encoder,
decoder, latent statistics) and an LTX-2.3 vocoder (BigVGAN-v2 + bandwidth extension to 48 kHz). The media
components keep the real latent layouts (128 video channels at 8x temporal / 32x spatial compression; 8 audio
channels x 16 mel bins) and are otherwise as narrow and shallow as their configs allow. The tests reuse these
builders (``tests/test_generate.py`` and the validation / inference tests).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from ltxf.data import write_precomputed_sample
from ltxf.latents import audio_latent_length
from ltxf.models.audio_vae import AudioDecoder, AudioEncoder, AudioVAEConfig
from ltxf.models.checkpoint import (
    AUDIO_CONNECTOR_PREFIX,
    AUDIO_VAE_DECODER_PREFIX,
    AUDIO_VAE_ENCODER_PREFIX,
    AUDIO_VAE_STATISTICS_PREFIX,
    TEXT_PROJECTION_PREFIX,
    TRANSFORMER_PREFIX,
    VIDEO_CONNECTOR_PREFIX,
    VIDEO_VAE_DECODER_PREFIX,
    VIDEO_VAE_ENCODER_PREFIX,
    VIDEO_VAE_STATISTICS_PREFIX,
    VOCODER_PREFIX,
    write_checkpoint,
)
from ltxf.models.text import EmbeddingsProcessor, EmbeddingsProcessorConfig
from ltxf.models.transformer import AVTransformer, TransformerConfig
from ltxf.models.video_vae import VideoDecoder, VideoEncoder, VideoVAEConfig
from ltxf.models.vocoder import build_vocoder, vocoder_config_from_checkpoint
from ltxf.parallel import barrier, init_distributed
from ltxf.rng import fold_in
from ltxf.validation import save_prompt_features

if TYPE_CHECKING:
    from ltxf.config import TrainConfig

logger = logging.getLogger(__name__)

DEMO_GEMMA_HIDDEN = 16
DEMO_GEMMA_STATES = 3
DEMO_TEXT_TOKENS = 32
# (latent frames, latent height, latent width): 9 frames at 128x192 and at 192x128 pixels.
DEMO_BUCKETS = ((2, 4, 6), (2, 6, 4))
DEMO_FPS = 24.0

# Checkpoint config sections of the tiny media components (the official key names and value formats).
DEMO_VIDEO_VAE: dict = {
    "dims": 3, "in_channels": 3, "out_channels": 3, "latent_channels": 128, "patch_size": 4,
    "norm_layer": "pixel_norm", "latent_log_var": "uniform", "spatial_padding_mode": "zeros",
    "decoder_base_channels": 4, "causal_decoder": False, "timestep_conditioning": False,
    "encoder_blocks": [["compress_all_res", {"multiplier": 1}]] * 3,
    "decoder_blocks": [["res_x", {"num_layers": 1}], ["compress_all", {"multiplier": 2}],
                       ["compress_all", {"multiplier": 2}], ["compress_all", {"multiplier": 2}]],
}  # fmt: skip
"""Video VAE: 128 latent channels (the encoder's width is tied to it), three 2x2x2 space-to-depth stages after
the 4x patchify (8x / 32x in all), a decoder of at most 32 channels (LTX-2.3 switches: zero padding, no timestep
conditioning). The decoder's upsampling multipliers multiply to 8, as in the real models: ltx-core 1.0 (and ltxf)
size its first convolution ``decoder_base_channels x 8``, ltx-core 1.2 ``decoder_base_channels x`` their
product, so only then do both official versions build it."""
# ch must equal z_channels x latent mel bins (8 x 16 = the transformer's 128 audio channels), and three levels
# take 64 mel bins to 16, so this is the smallest audio VAE with the shipped latent layout.
DEMO_AUDIO_VAE: dict = {
    "model": {"params": {"sampling_rate": 16000, "ddconfig": dict(
        double_z=True, mel_bins=64, z_channels=8, resolution=256, downsample_time=False, in_channels=2, out_ch=2,
        ch=128, ch_mult=[1, 1, 1], num_res_blocks=1, attn_resolutions=[], dropout=0.0,
        mid_block_add_attention=False, norm_type="pixel", causality_axis="height")}},
    "preprocessing": {
        "audio": {"sampling_rate": 16000, "max_wav_value": 32768.0, "stereo": True},
        "stft": {"filter_length": 1024, "hop_length": 160, "win_length": 1024, "causal": True},
        "mel": {"n_mel_channels": 64, "mel_fmin": 0, "mel_fmax": 8000},
    },
}  # fmt: skip
"""Audio VAE: stereo 64-bin log-mel at 16 kHz (hop 160: 100 mel frames per second) <-> latents [8, T, 16], one
ResNet block per level."""
_AMP = {"resblock": "AMP1", "stereo": True, "use_tanh_at_final": False, "activation": "snakebeta",
        "use_bias_at_final": False}
DEMO_VOCODER: dict = {
    "vocoder": {**_AMP, "upsample_initial_channel": 32, "upsample_rates": [5, 4, 8],
                "upsample_kernel_sizes": [11, 8, 16], "resblock_kernel_sizes": [3, 5],
                "resblock_dilation_sizes": [[1, 3, 5], [1, 2, 3]]},
    "bwe": {**_AMP, "apply_final_activation": False, "upsample_initial_channel": 16, "upsample_rates": [6, 5, 8],
            "upsample_kernel_sizes": [12, 11, 16], "resblock_kernel_sizes": [3], "resblock_dilation_sizes": [[1, 3, 5]],
            "input_sampling_rate": 16000, "output_sampling_rate": 48000, "hop_length": 80, "n_fft": 256,
            "win_size": 256, "num_mels": 64},
}  # fmt: skip
"""LTX-2.3-style vocoder: BigVGAN-v2 (mel frames -> 16 kHz, x160) plus bandwidth extension to 48 kHz, narrow."""
DEMO_AUDIO_SAMPLE_RATE: int = DEMO_VOCODER["bwe"]["output_sampling_rate"]
"""Sample rate of the demo vocoder's output (48 kHz)."""
MEDIA_DTYPE = torch.bfloat16
"""Storage dtype of the media components (as in the official files; the loaders cast). The transformer and the
text side stay float32 so the demo trains on exactly the weights it was initialised with."""

DEMO_PROMPT_FEATURES_FILE = "validation_prompts.pt"
"""Name, inside the demo assets folder, of the validation prompt features (``validation.prompt_features_path``)."""
DEMO_VALIDATION_PROMPT = "synthetic scene 0 (the caption features of clip_000)"
"""The demo's validation prompt: a label only; its features come from the synthetic dataset (there is no Gemma)."""


def demo_transformer_config() -> TransformerConfig:
    """Two blocks, video 4 heads x 16, audio 4 heads x 8, LTX-2.3 switches (gated attention, prompt AdaLN)."""
    return TransformerConfig(
        version="ltx-2.3", num_layers=2, num_heads=4, head_dim=16, cross_attention_dim=64,
        audio_num_heads=4, audio_head_dim=8, audio_cross_attention_dim=32, caption_channels=None,
        apply_gated_attention=True, cross_attention_adaln=True,
    )


def demo_checkpoint_config() -> dict:
    """The full checkpoint config: the transformer section (with the connector keys the text side reads) and the
    ``vae``, ``audio_vae`` and ``vocoder`` sections. The connectors have 128 learnable registers, the number the
    official 1.2 code always builds (whatever the config says), so the official tools load the demo file."""
    section = demo_transformer_config().to_checkpoint_config()
    section.update(
        connector_num_layers=1, connector_num_attention_heads=4, connector_attention_head_dim=16,
        audio_connector_num_attention_heads=4, audio_connector_attention_head_dim=8,
        connector_num_learnable_registers=128, connector_apply_gated_attention=True,
        connector_positional_embedding_max_pos=[4096],
    )
    return {"transformer": section, "vae": DEMO_VIDEO_VAE, "audio_vae": DEMO_AUDIO_VAE, "vocoder": DEMO_VOCODER}


@torch.no_grad()
def init_random_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Initialise every parameter like a freshly built torch model: matrices uniform +-1/sqrt(fan_in), vectors
    (biases, tables) small normal, norm weights one. (Modules built for loading start uninitialised.)"""
    for name, p in module.named_parameters():
        if p.ndim >= 2 and "table" not in name and "registers" not in name:
            bound = 1.0 / math.sqrt(p.shape[1])
            p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)
        elif name.endswith("norm.weight") or name.endswith("_norm.weight"):
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return module


@torch.no_grad()
def init_scaled_(module: nn.Module, generator: torch.Generator, gain: float = 1.0) -> nn.Module:
    """Initialise for deep conv stacks: weights ~ N(0, gain^2 / fan_in) so activations stay O(1) through many
    layers (outputs then depend on their inputs, which the demo's samples and the tests need); small biases, unit
    norm weights, random Snake ``alpha``/``beta``, and non-trivial latent statistics (std in [0.5, 1.5))."""
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=generator) * gain / math.sqrt(math.prod(p.shape[1:])))
        elif name.endswith((".alpha", ".beta")):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        elif name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    for name, b in module.named_buffers():
        if name.endswith("std-of-means"):
            b.copy_(0.5 + torch.rand(b.shape, generator=generator))
        elif name.endswith("mean-of-means"):
            b.copy_(0.1 * torch.randn(b.shape, generator=generator))
    return module


_STATISTICS_MODULE = "per_channel_statistics."


def _add_tensors(tensors: dict[str, torch.Tensor], module: nn.Module, prefix: str,
                 statistics_prefix: str | None = None) -> None:
    """Put ``module``'s state dict into ``tensors`` under ``prefix``; with ``statistics_prefix``, its latent
    statistics go there instead (the official files keep one copy, shared by the encoder and the decoder)."""
    for key, value in module.state_dict().items():
        if statistics_prefix is not None and key.startswith(_STATISTICS_MODULE):
            tensors[statistics_prefix + key.removeprefix(_STATISTICS_MODULE)] = value
        else:
            tensors[prefix + key] = value


def demo_media_tensors(*, seed: int) -> dict[str, torch.Tensor]:
    """Random tiny video VAE, audio VAE and vocoder weights (:data:`DEMO_VIDEO_VAE`, :data:`DEMO_AUDIO_VAE`,
    :data:`DEMO_VOCODER`) under their official checkpoint names, in :data:`MEDIA_DTYPE`. Each VAE's encoder and
    decoder share one set of latent statistics."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    video_config = VideoVAEConfig.from_checkpoint_config(DEMO_VIDEO_VAE)
    audio_config = AudioVAEConfig.from_checkpoint(DEMO_AUDIO_VAE)
    parts = (
        (VideoEncoder(video_config), VideoDecoder(video_config), VIDEO_VAE_ENCODER_PREFIX, VIDEO_VAE_DECODER_PREFIX,
         VIDEO_VAE_STATISTICS_PREFIX),
        (AudioEncoder(audio_config), AudioDecoder(audio_config), AUDIO_VAE_ENCODER_PREFIX, AUDIO_VAE_DECODER_PREFIX,
         AUDIO_VAE_STATISTICS_PREFIX),
    )
    for encoder, decoder, encoder_prefix, decoder_prefix, statistics_prefix in parts:
        init_scaled_(encoder, generator)
        init_scaled_(decoder, generator).per_channel_statistics.load_state_dict(
            encoder.per_channel_statistics.state_dict())
        _add_tensors(tensors, encoder, encoder_prefix, statistics_prefix)
        _add_tensors(tensors, decoder, decoder_prefix, statistics_prefix)
    # A gain below 1 keeps the untrained vocoder's waveform mostly inside the final [-1, 1] clamp.
    vocoder = init_scaled_(build_vocoder(vocoder_config_from_checkpoint(DEMO_VOCODER)), generator, gain=0.7)
    _add_tensors(tensors, vocoder, VOCODER_PREFIX)
    return {key: value.to(MEDIA_DTYPE) for key, value in tensors.items()}


def random_model_tensors(config: dict, *, seed: int, gemma_hidden_size: int = DEMO_GEMMA_HIDDEN,
                         gemma_num_hidden_states: int = DEMO_GEMMA_STATES) -> dict[str, torch.Tensor]:
    """Random transformer and text-side (feature extractor + connectors) tensors for a checkpoint ``config``,
    under their official key prefixes."""
    generator = torch.Generator().manual_seed(seed)
    transformer = init_random_(AVTransformer(TransformerConfig.from_checkpoint_config(config["transformer"])),
                               generator)
    text_config = EmbeddingsProcessorConfig.from_transformer_config(
        config["transformer"], gemma_hidden_size=gemma_hidden_size, gemma_num_hidden_states=gemma_num_hidden_states
    )
    text = init_random_(EmbeddingsProcessor(text_config), generator)
    tensors = {TRANSFORMER_PREFIX + key: value for key, value in transformer.state_dict().items()}
    text_prefixes = {"feature_extractor.": TEXT_PROJECTION_PREFIX, "video_connector.": VIDEO_CONNECTOR_PREFIX,
                     "audio_connector.": AUDIO_CONNECTOR_PREFIX}
    for key, value in text.state_dict().items():
        module, _, rest = key.partition(".")
        tensors[text_prefixes[module + "."] + rest] = value
    return tensors


def write_random_checkpoint(path: Path, config: dict, *, seed: int) -> Path:
    """A random official-layout checkpoint with a transformer and text side built from ``config`` (benchmarks)."""
    return write_checkpoint(path, random_model_tensors(config, seed=seed), config)


def build_demo_checkpoint(path: Path, *, seed: int) -> Path:
    """Write a random tiny LTX-2.3-architecture checkpoint in the official single-file layout: transformer, text
    side (feature extractor + connectors), video VAE, audio VAE and vocoder (about 14 MB)."""
    config = demo_checkpoint_config()
    tensors = random_model_tensors(config, seed=seed)
    # The media parts draw from their own stream, so the transformer and the text side depend on the seed only.
    tensors.update(demo_media_tensors(seed=fold_in(seed, "demo_media")))
    return write_checkpoint(path, tensors, config)


def build_demo_dataset(root: Path, *, num_samples: int = 32, seed: int) -> Path:
    """Write ``num_samples`` synthetic clips (video + audio latents + text features) in the official layout.

    Each clip is one of a few smooth "scenes" (a per-channel spatial pattern drifting over time) plus a little
    noise; its caption features are a noisy code of the scene, so text and content are related.
    """
    generator = torch.Generator().manual_seed(seed)
    widths = demo_transformer_config()
    num_scenes = 4
    codes_video = torch.randn(num_scenes, widths.inner_dim, generator=generator)
    codes_audio = torch.randn(num_scenes, widths.audio_inner_dim, generator=generator)
    channel_mix = torch.randn(num_scenes, 128, 3, generator=generator)
    for index in range(num_samples):
        scene = index % num_scenes
        frames, height, width = DEMO_BUCKETS[index % len(DEMO_BUCKETS)]
        t = torch.linspace(0, 1, frames)[:, None, None]
        y = torch.linspace(-1, 1, height)[None, :, None]
        x = torch.linspace(-1, 1, width)[None, None, :]
        basis = torch.stack([torch.sin(3 * x + 2 * t).expand(frames, height, width),
                             torch.cos(2 * y - t).expand(frames, height, width),
                             (x * y).expand(frames, height, width)])
        latents = torch.einsum("ck,kfhw->cfhw", channel_mix[scene], basis)
        latents = latents + 0.1 * torch.randn(latents.shape, generator=generator)

        num_pixel_frames = 8 * (frames - 1) + 1
        duration = num_pixel_frames / DEMO_FPS
        audio_len = audio_latent_length(num_pixel_frames, DEMO_FPS)
        tone = torch.sin(torch.linspace(0, 6.28 * (scene + 1), audio_len))
        audio = tone[None, :, None] * channel_mix[scene, :8, :1, None] + 0.1 * torch.randn(
            8, audio_len, 16, generator=generator)

        num_tokens = 8 + index % 16
        mask = torch.zeros(DEMO_TEXT_TOKENS, dtype=torch.int64)
        mask[-num_tokens:] = 1
        video_text = torch.zeros(DEMO_TEXT_TOKENS, widths.inner_dim)
        audio_text = torch.zeros(DEMO_TEXT_TOKENS, widths.audio_inner_dim)
        video_text[-num_tokens:] = codes_video[scene] + 0.3 * torch.randn(num_tokens, widths.inner_dim,
                                                                           generator=generator)
        audio_text[-num_tokens:] = codes_audio[scene] + 0.3 * torch.randn(num_tokens, widths.audio_inner_dim,
                                                                          generator=generator)
        write_precomputed_sample(
            root, f"clip_{index:03d}.mp4",
            latents=latents, fps=DEMO_FPS,
            video_prompt_embeds=video_text, audio_prompt_embeds=audio_text, prompt_attention_mask=mask,
            audio_latents=audio, audio_duration=duration,
        )
        write_demo_condition_files(root, f"clip_{index:03d}.pt", latents, audio, duration)
    return root


def write_demo_condition_files(root: Path, name: str, latents: torch.Tensor, audio: torch.Tensor,
                               duration: float) -> None:
    """The flexible strategy's extra inputs for one demo clip, derived without randomness (the clips stay as they
    were): a half-size video reference, a time-reversed audio reference, a video mask keeping the top half of every
    frame and an audio mask keeping the first half, so every preset of experiments/presets.py runs on the demo."""
    from ltxf.data import save_pt
    _, num_frames, height, width = latents.shape
    reference = latents[:, :, ::2, ::2].to(torch.bfloat16)
    save_pt({"latents": reference, "num_frames": num_frames, "height": reference.shape[2],
             "width": reference.shape[3], "fps": DEMO_FPS}, root / "reference_latents" / name)
    save_pt({"latents": audio.flip(1).float(), "num_time_steps": audio.shape[1], "frequency_bins": audio.shape[2],
             "duration": duration}, root / "reference_audio_latents" / name)
    video_mask = torch.zeros(num_frames, height, width)
    video_mask[:, : height // 2] = 1.0
    save_pt({"mask": video_mask}, root / "video_masks" / name)
    audio_mask = torch.zeros(audio.shape[1])
    audio_mask[: audio.shape[1] // 2] = 1.0
    save_pt({"mask": audio_mask}, root / "audio_masks" / name)


def build_demo_prompt_features(path: Path, dataset: Path) -> Path:
    """Write the demo's validation prompt features (see :func:`ltxf.validation.save_prompt_features`) from the
    synthetic dataset's captions: the prompt is clip_000's (scene 0), the negative prompt clip_001's (scene 1),
    since without Gemma there is no "worst quality" text to embed."""

    def caption(name: str) -> dict[str, torch.Tensor]:
        return torch.load(dataset / "conditions" / f"{name}.pt", map_location="cpu", weights_only=True)

    return save_prompt_features(path, [caption("clip_000")], negative=caption("clip_001"),
                                texts=[DEMO_VALIDATION_PROMPT])


class DemoAssets(NamedTuple):
    """Where :func:`build_demo_assets` puts the demo's files."""

    checkpoint: Path
    dataset: Path

    @classmethod
    def in_directory(cls, directory: Path) -> DemoAssets:
        """The paths inside a demo assets folder (whether or not they exist yet)."""
        return cls(checkpoint=directory / "demo_model.safetensors", dataset=directory / "dataset")

    @property
    def prompt_features(self) -> Path:
        """The validation prompt features (``validation.prompt_features_path``)."""
        return self.checkpoint.parent / DEMO_PROMPT_FEATURES_FILE


def build_demo_assets(directory: Path, *, seed: int) -> DemoAssets:
    """Write the demo checkpoint, dataset and validation prompt features into ``directory`` (each kept if it
    already exists, so a demo run resumes on the same files)."""
    directory.mkdir(parents=True, exist_ok=True)
    assets = DemoAssets.in_directory(directory)
    if not assets.checkpoint.exists():
        build_demo_checkpoint(assets.checkpoint, seed=seed)
        logger.info("demo: wrote a tiny random LTX-2.3-architecture checkpoint to %s", assets.checkpoint)
    if not (assets.dataset / "latents").is_dir():
        build_demo_dataset(assets.dataset, seed=seed)
        logger.info("demo: wrote a synthetic precomputed dataset to %s", assets.dataset)
    if not assets.prompt_features.exists():
        build_demo_prompt_features(assets.prompt_features, assets.dataset)
        logger.info("demo: wrote validation prompt features to %s", assets.prompt_features)
    return assets


def prepare_demo(cfg: TrainConfig) -> TrainConfig:
    """For a config with ``demo_model``: build the demo assets in ``output_dir/demo_assets`` (rank 0; the other
    ranks wait) and return the config pointing ``model.checkpoint``, ``data.root`` and
    ``validation.prompt_features_path`` at them. Any other config comes back unchanged. ``train.py`` calls it
    before :func:`ltxf.train.main`; the training core knows nothing of the demo."""
    if not cfg.demo_model:
        return cfg
    directory = Path(cfg.output_dir).expanduser().resolve() / "demo_assets"
    dist_info = init_distributed()
    if dist_info.is_main:
        build_demo_assets(directory, seed=cfg.seed)
    barrier()
    assets = DemoAssets.in_directory(directory)
    # The demo model has its own tiny text widths, so only the demo's prompt features fit it.
    return replace(cfg, model=replace(cfg.model, checkpoint=assets.checkpoint),
                   data=replace(cfg.data, root=assets.dataset),
                   validation=replace(cfg.validation, prompt_features_path=assets.prompt_features))
