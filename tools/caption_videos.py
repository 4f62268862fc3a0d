"""Caption videos and images with a local multimodal ``transformers`` model (nothing is downloaded) and write a
dataset file (.json, .jsonl, .csv or .txt). Resumable: media that already have a caption are skipped.

    python tools/caption_videos.py clips/ --model-path Qwen2.5-Omni-7B -o clips/dataset.json [--fps 3] [--no-audio]

Exit code: 0 when the output lists at least one caption, 1 when it lists none, 2 on a usage error.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ltxf.prep.captions import CaptionVideosConfig, caption_videos  # noqa: E402

logger = logging.getLogger("tools.caption_videos")


def main(args: Sequence[str] | None = None) -> int:
    """Parse the command line, run, and return the exit code."""
    # tyro reports invalid flags and values (ValueError from a config's checks) and exits with code 2.
    config = tyro.cli(CaptionVideosConfig, args=args, description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = caption_videos(config)
        return 0 if summary.captioned or summary.kept else 1
    except ValueError as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
