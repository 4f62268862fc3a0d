r"""Encode the media of a dataset file into video latents (plus audio latents with ``--with_audio True``, and IC-LoRA
reference latents with ``--reference_column``), in the official layout.

    python tools/process_videos.py data/dataset.csv --resolution_buckets "768x512x49" \
        --output_dir data/.precomputed/latents --model_path ltx-2.safetensors \
        [--with_audio True --audio_output_dir data/.precomputed/audio_latents]

Exit code: 0 when at least one sample has its latents, 1 when none does, 2 on a usage error.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ltxf.prep.cli import run_tool  # noqa: E402
from ltxf.prep.process import ProcessVideosConfig, exit_code, process_videos  # noqa: E402


def main(args: Sequence[str] | None = None) -> int:
    """Parse the command line, run, and return the exit code."""
    return run_tool(ProcessVideosConfig, process_videos, exit_code, description=__doc__, args=args)


if __name__ == "__main__":
    sys.exit(main())
