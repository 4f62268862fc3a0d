"""Make Canny edge-map reference videos (``<stem>_reference<ext>``) for IC-LoRA training and add a
``reference_path`` column to the dataset file.

    python tools/compute_reference.py data/dataset.json [--override True] [--output data/dataset_ic.json]

Exit code: 0 when every media file has a reference, 1 when some could not be made, 2 on a usage error.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ltxf.prep.cli import run_tool  # noqa: E402
from ltxf.prep.edges import ComputeReferenceConfig, compute_reference  # noqa: E402


def main(args: Sequence[str] | None = None) -> int:
    """Parse the command line, run, and return the exit code."""
    return run_tool(
        ComputeReferenceConfig, compute_reference, lambda summary: 1 if summary.failed else 0,
        description=__doc__, args=args,
    )


if __name__ == "__main__":
    sys.exit(main())
