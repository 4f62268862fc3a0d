"""Assets for the CPU demo: a tiny random-initialised LTX-2.3-architecture checkpoint and a synthetic dataset.

Both are written in the official formats (a single safetensors file with the config as metadata; the
``.precomputed/`` folder layout), so the demo exercises the same loaders and dataset a real run uses.
The synthetic clips are smooth, text-correlated latent patterns, so a LoRA can visibly lower the loss.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from ltxf.data import audio_latent_length, write_precomputed_sample
from ltxf.models.checkpoint import (
    AUDIO_CONNECTOR_PREFIX,
    TEXT_PROJECTION_PREFIX,
    TRANSFORMER_PREFIX,
    VIDEO_CONNECTOR_PREFIX,
    write_checkpoint,
)
from ltxf.models.text import EmbeddingsProcessor, EmbeddingsProcessorConfig
from ltxf.models.transformer import AVTransformer, TransformerConfig

logger = logging.getLogger(__name__)

DEMO_GEMMA_HIDDEN = 16
DEMO_GEMMA_STATES = 3
DEMO_TEXT_TOKENS = 32
# (latent frames, latent height, latent width): 9 frames at 128x192 and at 192x128 pixels.
DEMO_BUCKETS = ((2, 4, 6), (2, 6, 4))
DEMO_FPS = 24.0


def demo_transformer_config() -> TransformerConfig:
    """Two blocks, video 4 heads x 16, audio 4 heads x 8, LTX-2.3 switches (gated attention, prompt AdaLN)."""
    return TransformerConfig(
        version="ltx-2.3", num_layers=2, num_heads=4, head_dim=16, cross_attention_dim=64,
        audio_num_heads=4, audio_head_dim=8, audio_cross_attention_dim=32, caption_channels=None,
        apply_gated_attention=True, cross_attention_adaln=True,
    )


def demo_checkpoint_config() -> dict:
    """The full checkpoint config: the transformer section plus the connector keys the text side reads."""
    section = demo_transformer_config().to_checkpoint_config()
    section.update(
        connector_num_layers=1, connector_num_attention_heads=4, connector_attention_head_dim=16,
        audio_connector_num_attention_heads=4, audio_connector_attention_head_dim=8,
        connector_num_learnable_registers=8, connector_apply_gated_attention=True,
        connector_positional_embedding_max_pos=[4096],
    )
    return {"transformer": section}


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


def build_demo_checkpoint(path: Path, *, seed: int) -> Path:
    """Write a random tiny LTX-2.3-architecture checkpoint (transformer + text side) in the official layout."""
    config = demo_checkpoint_config()
    generator = torch.Generator().manual_seed(seed)
    transformer = init_random_(AVTransformer(demo_transformer_config()), generator)
    text_config = EmbeddingsProcessorConfig.from_transformer_config(
        config["transformer"], gemma_hidden_size=DEMO_GEMMA_HIDDEN, gemma_num_hidden_states=DEMO_GEMMA_STATES
    )
    text = init_random_(EmbeddingsProcessor(text_config), generator)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in transformer.state_dict().items():
        tensors[TRANSFORMER_PREFIX + key] = value
    for key, value in text.state_dict().items():
        if key.startswith("feature_extractor."):
            tensors[TEXT_PROJECTION_PREFIX + key.removeprefix("feature_extractor.")] = value
        elif key.startswith("video_connector."):
            tensors[VIDEO_CONNECTOR_PREFIX + key.removeprefix("video_connector.")] = value
        elif key.startswith("audio_connector."):
            tensors[AUDIO_CONNECTOR_PREFIX + key.removeprefix("audio_connector.")] = value
        else:
            raise AssertionError(f"unplaced text-side tensor {key}")
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

        duration = (8 * (frames - 1) + 1) / DEMO_FPS
        audio_len = audio_latent_length(duration)
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
    return root


def build_demo_assets(directory: Path, *, seed: int) -> tuple[Path, Path]:
    """Write the demo checkpoint and dataset into ``directory`` (kept if they already exist: resumable)."""
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint = directory / "demo_model.safetensors"
    dataset = directory / "dataset"
    if not checkpoint.exists():
        build_demo_checkpoint(checkpoint, seed=seed)
        logger.info("demo: wrote a tiny random LTX-2.3-architecture checkpoint to %s", checkpoint)
    if not (dataset / "latents").is_dir():
        build_demo_dataset(dataset, seed=seed)
        logger.info("demo: wrote a synthetic precomputed dataset to %s", dataset)
    return checkpoint, dataset
