"""Split a long video into scenes, one MP4 per scene (with its audio).

    python tools/split_scenes.py movie.mp4 scenes/ --filter-shorter-than 2s [--detector adaptive] [--save-images 3]

Exit code: 0 when at least one scene is written, 1 when none is, 2 on a usage error.
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

from ltxf.prep.scenes import SplitScenesConfig, split_scenes  # noqa: E402

logger = logging.getLogger("tools.split_scenes")


def main(args: Sequence[str] | None = None) -> int:
    """Parse the command line, run, and return the exit code."""
    # tyro reports invalid flags and values (ValueError from a config's checks) and exits with code 2.
    config = tyro.cli(SplitScenesConfig, args=args, description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return 0 if split_scenes(config) else 1
    except ValueError as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
