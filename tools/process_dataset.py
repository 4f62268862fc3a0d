r"""Preprocess a dataset (captions + videos, audio unless --skip_audio True, IC-LoRA references) into the official
``.precomputed/`` layout that ``train.py`` reads.

    python tools/process_dataset.py data/dataset.json --resolution_buckets "768x512x49" \
        --model_path ltx-2.safetensors --text_encoder_path gemma-3-12b-it [--skip_audio True] [--decode True]
    torchrun --nproc_per_node 8 tools/process_dataset.py ...   # samples split across processes

Exit code: 0 when at least one sample has its outputs, 1 when none does, 2 on a usage error (bad bucket string,
malformed dataset file, missing model).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ltxf.prep.cli import run_tool  # noqa: E402
from ltxf.prep.process import ProcessDatasetConfig, exit_code, process_dataset  # noqa: E402


def main(args: Sequence[str] | None = None) -> int:
    """Parse the command line, run, and return the exit code."""
    return run_tool(ProcessDatasetConfig, process_dataset, exit_code, description=__doc__, args=args)


if __name__ == "__main__":
    sys.exit(main())
