"""Split a long video into scenes, one MP4 per scene (with its audio).

    python tools/split_scenes.py movie.mp4 scenes/ --filter_shorter_than 2s [--detector adaptive] [--save_images 3]

Exit code: 0 when at least one scene is written, 1 when none is, 2 on a usage error.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ltxf.prep.cli import run_tool  # noqa: E402
from ltxf.prep.scenes import SplitScenesConfig, split_scenes  # noqa: E402


def main(args: Sequence[str] | None = None) -> int:
    """Parse the command line, run, and return the exit code."""
    return run_tool(
        SplitScenesConfig, split_scenes, lambda written: 0 if written else 1,
        description=__doc__, args=args,
    )


if __name__ == "__main__":
    sys.exit(main())
