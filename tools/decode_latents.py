r"""Decode precomputed latents back to MP4 (PNG for one frame) and audio latents to WAV, to see what the model
will be trained on.

    python tools/decode_latents.py data/.precomputed/latents data/.precomputed/decoded_videos \
        --model_path ltx-2.safetensors [--with_audio True] [--seed 0]

Exit code: 0 when at least one file is decoded (now or before), 1 when none is, 2 on a usage error.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ltxf.prep.cli import run_tool  # noqa: E402
from ltxf.prep.process import DecodeLatentsConfig, decode_latents, exit_code  # noqa: E402


def main(args: Sequence[str] | None = None) -> int:
    """Parse the command line, run, and return the exit code."""
    return run_tool(DecodeLatentsConfig, decode_latents, exit_code, description=__doc__, args=args)


if __name__ == "__main__":
    sys.exit(main())
