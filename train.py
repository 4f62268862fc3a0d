"""Train an LTX-2 / LTX-2.3 model: ``torchrun --nproc_per_node N train.py PRESET [--section.field value ...]``.

Presets live in experiments/presets.py; every field of ltxf.config.TrainConfig can be overridden, e.g.
``--model.checkpoint ltx-2.3.safetensors --data.root data/.precomputed --optim.learning_rate 2e-4``.
``python train.py demo`` runs the CPU demo. ``python train.py PRESET --help`` lists every flag.

Exit codes (ltxf.faults): 0 finished, 1 unexpected error (with its traceback), 2 user error (one ``error:`` line),
3 stopped on non-finite values, 75 interrupted by SIGINT/SIGTERM after saving a checkpoint (run it again to
resume). ``--debug`` (or ``LTXF_DEBUG=1``) prints the traceback of every error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from experiments.presets import PRESETS
from ltxf.cli import parse_preset
from ltxf.config import TrainConfig
from ltxf.demo import prepare_demo
from ltxf.faults import EXIT_INTERRUPTED, EXIT_OK, parse_errors_as_one_line, run_command
from ltxf.train import main


def parse_config(args: Sequence[str] | None = None) -> TrainConfig:
    """Pick a preset and apply ``--section.field_name VALUE`` overrides (the :mod:`ltxf.cli` convention: booleans
    take a value, ``True``/``False``)."""
    with parse_errors_as_one_line():  # a bad flag is one "error:" line, like every other user error
        return parse_preset(TrainConfig, PRESETS, args=args, prog="train.py",
                            console_outputs=int(os.environ.get("RANK", "0")) == 0)


def run(args: Sequence[str]) -> int:
    """Parse, train, and return the exit code (75 when a stop signal interrupted the run)."""
    result = main(prepare_demo(parse_config(args)))
    return EXIT_INTERRUPTED if result.interrupted else EXIT_OK


if __name__ == "__main__":
    sys.exit(run_command(run))
