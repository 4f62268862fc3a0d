"""Shared fixtures of the preprocessing tests: the tiny checkpoint and Gemma (built once per session) and a
writer of synthetic clips."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ltxf import media
from tests.prep.tiny_models import write_tiny_checkpoint, write_tiny_gemma

AUDIO_RATE = 24_000


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-ltx2.safetensors")


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory) -> Path:
    return write_tiny_gemma(tmp_path_factory.mktemp("gemma"))


def moving_square_frames(num_frames: int, height: int, width: int, *, colour: tuple[int, int, int] = (220, 40, 40),
                         background: int = 90) -> torch.Tensor:
    """uint8 [F, H, W, 3]: a coloured square moving right over a grey background."""
    frames = torch.full((num_frames, height, width, 3), background, dtype=torch.uint8)
    side = max(4, min(height, width) // 3)
    for f in range(num_frames):
        left = (2 * f) % max(1, width - side)
        top = (height - side) // 2
        frames[f, top : top + side, left : left + side] = torch.tensor(colour, dtype=torch.uint8)
    return frames


def sine(duration: float, rate: int = AUDIO_RATE, freq: float = 440.0) -> torch.Tensor:
    t = torch.arange(int(round(duration * rate)), dtype=torch.float64) / rate
    return (0.5 * torch.sin(2 * math.pi * freq * t)).float()[None].repeat(2, 1)


def write_clip(path: Path, *, num_frames: int, height: int, width: int, fps: float = 24.0, audio: bool = True,
               colour: tuple[int, int, int] = (220, 40, 40)) -> Path:
    """An H.264 clip of a moving square, with a 440 Hz stereo tone as long as the video when ``audio``."""
    frames = moving_square_frames(num_frames, height, width, colour=colour)
    wave = sine(num_frames / fps) if audio else None
    media.write_video(path, frames, fps, audio=wave, audio_sample_rate=AUDIO_RATE if audio else None)
    return path
