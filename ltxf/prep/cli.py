"""The shared shape of the data-preparation tools: parse a config with tyro, run, map the outcome to an exit
code (0 something produced, 1 nothing produced, 2 usage error)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ltxf.cli import parse
from ltxf.faults import FlagError, parse_errors_as_one_line, report_error

ConfigT = TypeVar("ConfigT")


def run_tool(
    config_type: type[ConfigT],
    run: Callable[[ConfigT], Any],
    exit_code: Callable[[Any], int],
    *,
    description: str | None,
    args: Sequence[str] | None = None,
) -> int:
    """Parse ``args`` into ``config_type`` (the :mod:`ltxf.cli` convention), call ``run(config)`` and return
    ``exit_code(result)``.

    Invalid flags and values (tyro's errors, a ``ValueError`` from a config's checks) and a ``ValueError`` raised
    while running (a missing model, a malformed dataset file) are printed as one ``error:`` line (with the
    traceback under ``LTXF_DEBUG=1``, see :mod:`ltxf.faults`) and return 2.
    """
    try:
        with parse_errors_as_one_line():
            config = parse(config_type, args=args, description=description)
    except FlagError as exc:
        return report_error(exc)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return exit_code(run(config))
    except ValueError as exc:
        return report_error(exc)
