"""Make Canny edge-map reference videos (``<stem>_reference<ext>``) for IC-LoRA training and add a
``reference_path`` column to the dataset file.

    python tools/compute_reference.py data/dataset.json [--override] [--output data/dataset_ic.json]

Exit code: 0 when every media file has a reference, 1 when some could not be made, 2 on a usage error.
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

from ltxf.prep.edges import ComputeReferenceConfig, compute_reference  # noqa: E402

logger = logging.getLogger("tools.compute_reference")


def main(args: Sequence[str] | None = None) -> int:
    """Parse the command line, run, and return the exit code."""
    # tyro reports invalid flags and values (ValueError from a config's checks) and exits with code 2.
    config = tyro.cli(ComputeReferenceConfig, args=args, description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return 1 if compute_reference(config).failed else 0
    except ValueError as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
