"""Helpers for tests that drive real training processes."""

from __future__ import annotations

from collections.abc import Iterable


def wait_for_line(stream: Iterable[str], text: str) -> list[str]:
    """Read ``stream`` until a line contains ``text``; returns the lines read. An ``AssertionError`` with the
    output if the stream ends first (the process exited before reaching that point)."""
    seen = []
    for line in stream:
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError(f"the process ended before printing {text!r}:\n" + "".join(seen))
