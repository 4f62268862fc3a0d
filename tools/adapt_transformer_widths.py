r"""Copy an LTX transformer file with its latent widths changed to those of given VAE files (test packs only).

The tiny LTX-2.5 golden pack ships a transformer with 128 latent channels next to VAEs with 4 (video) and
2 x 16 (audio), so it cannot train on its own latents. This writes a copy that can: every tensor and all metadata
kept, only the four latent projections re-drawn (see ``ltxf.models.pack.adapt_transformer_latent_widths``).

    python tools/adapt_transformer_widths.py ltx-2.5-tiny-transformer.safetensors \
        --video-vae ltx-2.5-tiny-video-vae-conv.safetensors --audio-vae ltx-2.5-tiny-audio-vae.safetensors \
        --output tiny-transformer-4ch.safetensors

Exit code: 0 on success, 2 on a usage error.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ltxf.prep.cli import run_tool  # noqa: E402


@dataclass(frozen=True, kw_only=True)
class AdaptArgs:
    transformer: Annotated[Path, tyro.conf.Positional]
    """The transformer file to copy."""
    video_vae: Path
    """Video VAE file whose latent channels the copy takes."""
    audio_vae: Path
    """Audio VAE file whose latent width (z channels x latent mel bins) the copy takes."""
    output: Path
    """Where the copy goes."""
    seed: int = 0
    """Seed of the re-drawn projections."""


def adapt(args: AdaptArgs) -> Path:
    from ltxf.models.pack import adapt_transformer_latent_widths

    return adapt_transformer_latent_widths(args.transformer, args.video_vae, args.audio_vae, args.output,
                                           seed=args.seed)


def main(args: Sequence[str] | None = None) -> int:
    """Parse the command line, run, and return the exit code."""
    return run_tool(AdaptArgs, adapt, lambda _: 0, description=__doc__, args=args)


if __name__ == "__main__":
    sys.exit(main())
