"""Caption videos and images with a local multimodal ``transformers`` model (nothing is downloaded) and write a
dataset file (.json, .jsonl, .csv or .txt). Resumable: media that already have a caption are skipped.

    python tools/caption_videos.py clips/ --model_path Qwen2.5-Omni-7B -o clips/dataset.json [--fps 3] [--audio False]

Exit code: 0 when the output lists at least one caption, 1 when it lists none, 2 on a usage error.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ltxf.prep.captions import CaptionVideosConfig, caption_videos  # noqa: E402
from ltxf.prep.cli import run_tool  # noqa: E402


def main(args: Sequence[str] | None = None) -> int:
    """Parse the command line, run, and return the exit code."""
    return run_tool(
        CaptionVideosConfig, caption_videos, lambda summary: 0 if summary.captioned or summary.kept else 1,
        description=__doc__, args=args,
    )


if __name__ == "__main__":
    sys.exit(main())
