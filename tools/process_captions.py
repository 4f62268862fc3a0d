r"""Encode the captions of a dataset file into conditions files (Gemma 3 + the checkpoint's feature extractor).

    python tools/process_captions.py data/dataset.json --output_dir data/.precomputed/conditions \
        --model_path ltx-2.safetensors --text_encoder_path gemma-3-12b-it [--lora_trigger TOK]

Exit code: 0 when at least one caption has its conditions file, 1 when none does, 2 on a usage error.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ltxf.prep.cli import run_tool  # noqa: E402
from ltxf.prep.process import ProcessCaptionsConfig, exit_code, process_captions  # noqa: E402


def main(args: Sequence[str] | None = None) -> int:
    """Parse the command line, run, and return the exit code."""
    return run_tool(ProcessCaptionsConfig, process_captions, exit_code, description=__doc__, args=args)


if __name__ == "__main__":
    sys.exit(main())
