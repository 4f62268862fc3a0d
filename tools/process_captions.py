r"""Encode the captions of a dataset file into conditions files (Gemma 3 + the checkpoint's feature extractor).

    python tools/process_captions.py data/dataset.json --output-dir data/.precomputed/conditions \
        --model-path ltx-2.safetensors --text-encoder-path gemma-3-12b-it [--lora-trigger TOK]

Exit code: 0 when at least one caption has its conditions file, 1 when none does, 2 on a usage error.
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

from ltxf.prep.process import ProcessCaptionsConfig, exit_code, process_captions  # noqa: E402

logger = logging.getLogger("tools.process_captions")


def main(args: Sequence[str] | None = None) -> int:
    """Parse the command line, run, and return the exit code."""
    # tyro reports invalid flags and values (ValueError from a config's checks) and exits with code 2.
    config = tyro.cli(ProcessCaptionsConfig, args=args, description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return exit_code(process_captions(config))
    except ValueError as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
