"""Paths of the LTX-2.5 golden data (the official ltx-core / ltx-trainer 1.2 outputs on a tiny seeded split pack,
see ``/work/shared/golden/ltx-2.5/README.md``) and a loader for its golden tensors."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

GOLDEN_ROOT = Path(os.environ.get("LTXF_GOLDEN_ROOT", Path(__file__).resolve().parents[3] / "shared" / "golden"))
LTX25 = GOLDEN_ROOT / "ltx-2.5"
MODELS = LTX25 / "models"
TRANSFORMER = MODELS / "ltx-2.5-tiny-transformer.safetensors"
TRANSFORMER_VARIANT = MODELS / "ltx-2.5-tiny-transformer-variant-nopromptadaln-noaudioffbias.safetensors"
TEXT_ENCODER = MODELS / "gemma4-tiny-with-proj-ltx-2.5.safetensors"
VIDEO_VAE_CONV = MODELS / "ltx-2.5-tiny-video-vae-conv.safetensors"
VIDEO_VAE_DIFFUSION = MODELS / "ltx-2.5-tiny-video-vae-diffusion.safetensors"
AUDIO_VAE = MODELS / "ltx-2.5-tiny-audio-vae.safetensors"
OFFICIAL_DATASET = GOLDEN_ROOT / "official-datasets" / "ltx-2.5"

if not LTX25.is_dir():  # a checkout without the shared data: fail loudly rather than skip (CI always has it)
    raise RuntimeError(f"LTX-2.5 golden data not found at {LTX25}; set LTXF_GOLDEN_ROOT to the golden directory")


@functools.cache
def golden(name: str) -> dict[str, torch.Tensor]:
    """The tensors of ``goldens/<name>.safetensors`` (read-only: callers must not edit them in place)."""
    return load_file(str(LTX25 / "goldens" / f"{name}.safetensors"))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> float:
    """Max absolute error, asserted ``<= atol``; returns it so tests can report it."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs golden {tuple(expected.shape)}"
    error = (actual.detach().double() - expected.double()).abs().max().item()
    assert error <= atol, f"{what}: max |error| {error:.3g} > {atol:.3g}"
    return error




GEMMA3_TINY = GOLDEN_ROOT / "official-datasets" / "ltx-2.3" / "gemma3-tiny"
