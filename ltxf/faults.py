"""How a run stops: exit codes, the stop signals (SIGINT, SIGTERM) agreed across ranks, error messages that name
the culprit, and the one error style of every command-line tool.

Exit codes (``train.py`` and the tools in ``tools/``):

====  ===========================================================================================================
0     finished
1     unexpected error (a bug or an unforeseen failure): the Python traceback is printed
2     user error: a bad flag, file, dataset or config, or a checkpoint that cannot be written (disk full, no
      permission); one ``error: ...`` line
3     training stopped on non-finite values (``nonfinite_loss='stop'``, or more than ``max_skipped_steps`` skipped
      steps); the last checkpoint is intact and the message names the samples
75    interrupted by SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption): every rank stopped after the same step
      and a checkpoint of it was saved (or nothing had changed since the last one); run the same command again to
      resume. 75 is ``EX_TEMPFAIL`` of sysexits.h: "temporary failure, try again".
====  ===========================================================================================================

A traceback is printed for user errors too with ``--debug`` on the command line or ``LTXF_DEBUG=1`` in the
environment (:data:`DEBUG_ENV`).

Signals: :class:`StopSignals` turns SIGINT and SIGTERM into a request that the training loop sees after the
current step. Every rank then agrees (one all-reduce, :func:`any_rank`), saves, and exits with 75. A second signal
before the save starts aborts at once (nothing is written; the last checkpoint stays the newest); a signal during
the save is only logged, so the save finishes and the checkpoint is complete (a save is atomic anyway: a killed
save leaves the previous checkpoint as the newest). DataLoader worker processes ignore both signals; the main
process stops them.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import re
import shutil
import signal
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import torch

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 75

DEBUG_ENV = "LTXF_DEBUG"
DEBUG_FLAG = "--debug"

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# OSError numbers that describe the user's environment (a path, a disk, a permission), not a bug.
_USER_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS,
                          errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG})


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite values); the last checkpoint is intact. Exit code 3."""

    exit_code = EXIT_NONFINITE


class CheckpointSaveError(OSError):
    """A checkpoint could not be written; the message names the folder, the free space and what to do."""

    exit_code = EXIT_USER_ERROR


# -------------------------------------------------------------------------------------------------------------
# Signals


class StopSignals:
    """SIGINT and SIGTERM as a stop request, for one process (a context manager; the main thread only).

    Outside :meth:`deferring` a signal raises ``KeyboardInterrupt`` at once (model loading, data scan: nothing
    to save yet). Inside it, the first signal sets :attr:`requested` (the loop checks it after each step); a
    second one raises ``KeyboardInterrupt`` (abort without saving), except inside :meth:`saving`, where every
    signal is only logged so the checkpoint is finished. DataLoader workers ignore both signals (their
    ``worker_init_fn``, :class:`ltxf.data.ResumableLoader`); a forked process that inherits this handler ignores
    them too.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._deferring = False
        self._saving = False
        self._pid = os.getpid()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they were
                break
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: the main process decides and stops it
        name = signal.Signals(signum).name
        if self._saving:
            logger.warning("%s received while a checkpoint is being written: the save finishes first (SIGKILL "
                           "abandons it; the previous checkpoint stays intact)", name)
            self.requested = self.requested or name
            return
        if not self._deferring:
            raise KeyboardInterrupt(name)
        if self.requested is not None:
            logger.warning("second stop signal (%s): aborting without saving; the last checkpoint stays the newest",
                           name)
            raise KeyboardInterrupt(name)
        self.requested = name
        logger.warning("%s received: stopping after this step and saving a checkpoint (exit code %d); %s again "
                       "aborts without saving", name, EXIT_INTERRUPTED, name)

    def deferring(self) -> _Flag:
        """Within this block the first signal only sets :attr:`requested`."""
        return _Flag(self, "_deferring")

    def saving(self) -> _Flag:
        """Within this block signals are logged and otherwise ignored (a checkpoint is being written)."""
        return _Flag(self, "_saving")


class _Flag:
    def __init__(self, owner: StopSignals, name: str) -> None:
        self._owner, self._name = owner, name

    def __enter__(self) -> None:
        self._previous = getattr(self._owner, self._name)
        setattr(self._owner, self._name, True)

    def __exit__(self, *exc: object) -> None:
        setattr(self._owner, self._name, self._previous)


def _dist_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True if ``flag`` is set on any process: one tiny all-reduce when a process group is initialised, so every
    rank takes the same branch (a rank leaving for a save while another enters the next step would hang)."""
    if not _dist_active() or torch.distributed.get_world_size() == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(value)
    return bool(value.item() > 0)


def gather_objects(value: Any) -> list[Any]:
    """``[value of rank 0, value of rank 1, ...]`` (collective when a process group is initialised)."""
    if not _dist_active() or torch.distributed.get_world_size() == 1:
        return [value]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


# -------------------------------------------------------------------------------------------------------------
# Messages that name the culprit


def nonfinite_samples(
    micro_batches: Sequence[Mapping[str, Any]], nonfinite_B: Sequence[torch.Tensor]
) -> tuple[list[str], bool]:
    """The sample ids of a step whose own loss was not finite, and whether there were any.

    ``nonfinite_B[i]`` flags the samples of ``micro_batches[i]``. When every per-sample loss was finite (the
    non-finite value appeared in the gradients), all samples of the step are returned with ``False``.
    """
    all_ids: list[str] = []
    bad: list[str] = []
    for batch, flags in zip(micro_batches, nonfinite_B, strict=True):
        ids = [str(i) for i in batch.get("sample_id", [f"<unnamed sample {j}>" for j in range(len(flags))])]
        all_ids += ids
        bad += [sample for sample, flag in zip(ids, flags.tolist(), strict=True) if flag]
    return (bad, True) if bad else (all_ids, False)


def describe_samples(sample_ids: Iterable[str], samples: Iterable[Any] = (), *, limit: int = 8) -> str:
    """``clip_003 (latents/clip_003.pt, conditions/clip_003.pt)``... for sample ids, with their files where
    ``samples`` (objects with ``sample_id`` and ``files``, e.g. the dataset's ``SampleInfo``) knows them."""
    files = {getattr(s, "sample_id", None): getattr(s, "files", None) for s in samples}
    ids = list(dict.fromkeys(sample_ids))
    parts = []
    for sample_id in ids[:limit]:
        paths = files.get(sample_id)
        parts.append(f"{sample_id} ({', '.join(str(p) for p in paths.values())})" if paths else sample_id)
    more = f", ... ({len(ids) - limit} more)" if len(ids) > limit else ""
    return "; ".join(parts) + more


def _nearest_existing(path: Path) -> Path:
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return path


def free_space(path: Path) -> str:
    """``'1.2 GiB free of 100.0 GiB'`` for the file system holding ``path`` (or its nearest existing parent)."""
    try:
        usage = shutil.disk_usage(_nearest_existing(path))
    except OSError as exc:
        return f"free space unknown ({exc.strerror or exc})"
    return f"{_bytes(usage.free)} free of {_bytes(usage.total)}"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def root_oserror(exc: BaseException) -> OSError | None:
    """The first ``OSError`` in an exception, its causes, or (DCP's ``CheckpointException``) its per-rank
    failures."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        failures = getattr(current, "failures", None)
        if isinstance(failures, Mapping):
            for failure in failures.values():
                inner = failure[0] if isinstance(failure, tuple) else failure
                if isinstance(inner, BaseException):
                    stack.append(inner)
        for inner in (current.__cause__, current.__context__):
            if inner is not None:
                stack.append(inner)
    return None


def describe_exception(exc: BaseException) -> str:
    """``Type: first line of the message``; for DCP's ``CheckpointException``, of its first per-rank failure."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, Mapping) and failures:
        rank, failure = next(iter(failures.items()))
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, BaseException):
            return f"rank {rank}: {describe_exception(inner)}" if _dist_active() else describe_exception(inner)
    text = str(exc).strip()
    if not text and isinstance(exc, EOFError):
        text = "a file ends early (truncated)"
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def save_error_message(folder: Path, exc: BaseException, *, previous: Path | None) -> str:
    """One message for a failed checkpoint save: the folder, the cause, the free space and what to do."""
    folder = Path(folder)
    os_error = root_oserror(exc)
    number = os_error.errno if os_error is not None else None
    if number in (errno.ENOSPC, errno.EDQUOT):
        cause, advice = "the disk is full", ("free some space, lower --checkpoints.keep_last_n, or choose "
                                             "another --output_dir")
    elif number in (errno.EACCES, errno.EPERM, errno.EROFS):
        cause, advice = "permission denied", "make the folder writable or choose another --output_dir"
    elif number in (errno.ENOTDIR, errno.EEXIST):
        cause, advice = ("a path component is a file, not a folder",
                         "remove or rename that file, or choose another --output_dir")
    else:
        cause, advice = "the write failed", "check the file system, or choose another --output_dir"
    detail = ""
    if os_error is not None:
        detail = f" ({os_error.strerror or os_error}"
        detail += f": {os_error.filename})" if os_error.filename else ")"
    else:
        detail = f" ({describe_exception(exc)})"
    kept = f"; the previous checkpoint {previous} is intact" if previous is not None else ""
    return (f"cannot save the checkpoint to {folder}: {cause}{detail}; {free_space(folder)} there. "
            f"{advice[0].upper()}{advice[1:]}{kept}.")


# -------------------------------------------------------------------------------------------------------------
# The one error style of every command


def debug_requested(argv: Sequence[str] = ()) -> bool:
    """``--debug`` among the arguments or ``LTXF_DEBUG`` set to something other than '', '0', 'false'."""
    value = os.environ.get(DEBUG_ENV, "").strip().lower()
    return DEBUG_FLAG in argv or value not in ("", "0", "false", "no")


def strip_debug_flag(argv: Sequence[str]) -> list[str]:
    return [arg for arg in argv if arg != DEBUG_FLAG]


def is_user_error(exc: BaseException) -> bool:
    """Bad input the user can fix: ``ValueError``, a failed save, or an ``OSError`` about a path (missing, not
    writable, disk full)."""
    if isinstance(exc, (ValueError, CheckpointSaveError)):
        return True
    return isinstance(exc, OSError) and exc.errno in _USER_ERRNOS


def error_message(exc: BaseException) -> str:
    """The message of ``exc`` for an ``error:`` line; errors re-raised from a DataLoader worker lose the worker's
    traceback (kept for ``--debug``)."""
    text = str(exc).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        prefix = f"{type(exc).__name__}: "
        text = last[len(prefix):] if last.startswith(prefix) else last
    if isinstance(exc, OSError) and not isinstance(exc, CheckpointSaveError) and exc.filename:
        text = f"{exc.strerror or text}: {exc.filename}"
    return text or type(exc).__name__


def _rank_prefix() -> str:
    rank = os.environ.get("RANK")
    return f"[rank {rank}] " if rank not in (None, "0") else ""


def report_error(exc: BaseException, code: int = EXIT_USER_ERROR) -> int:
    """Print ``exc`` as one ``error: ...`` line on stderr (its traceback first with ``--debug`` / ``LTXF_DEBUG``)
    and return ``code``: for tools that catch their own user errors."""
    if debug_requested(sys.argv[1:]):
        traceback.print_exception(exc)
    print(f"{_rank_prefix()}error: {error_message(exc)}", file=sys.stderr)
    sys.stderr.flush()
    return code


class FlagError(ValueError):
    """A command-line flag the parser rejected (tyro's message, as one line)."""


_BOX_CHARS = "│╭╮╰╯─┃━┏┓┗┛"


def one_line_parse_error(text: str) -> str:
    """tyro's boxed error message as one line: its first section, plus the flags it suggests and the choices it
    lists; tyro's internal names are dropped. Handles rich's unicode box and its plain variant (no terminal)."""
    lines = [raw for raw in text.splitlines() if raw.strip()]
    if lines and not lines[0].strip().startswith("╭"):
        lines = lines[1:]  # the plain variant's first line is the box title
    sections: list[list[str]] = [[]]
    for raw in lines:
        if raw.strip().startswith(("╭", "╰")):
            continue
        if set(raw.strip()) <= set(_BOX_CHARS + "-+= "):
            sections.append([])  # a separator line
            continue
        sections[-1].append(raw.strip(_BOX_CHARS + " \t"))
    sections = [section for section in sections if section]
    if not sections:
        return text.strip() or "invalid command line (the parser's message is printed by rank 0)"
    message = " ".join(sections[0])
    message = re.sub(r"Error parsing (__tyro_dummy_inner__)?[\w.]*: (?=\S+ must)", "", message)
    message = message.replace("__tyro_dummy_inner__.", "")
    for section in sections[1:]:
        if section[0].startswith("Perhaps you meant"):
            flags = [line.split()[0] for line in section[1:] if line.startswith("--") and line.split()[0] != "--help"]
            message += f" (did you mean {', '.join(list(dict.fromkeys(flags))[:4])}?)"
        elif section[0].startswith("Available"):
            message += f" ({' '.join(section)})"
    return message + "; --help lists every flag"


@contextlib.contextmanager
def parse_errors_as_one_line() -> Iterator[None]:
    """Turn a parser's error exit (tyro prints a box to stderr and exits 2) into a :class:`FlagError` holding the
    message as one line (run_command prints it as ``error: ...``); ``--debug`` / ``LTXF_DEBUG`` keeps the box."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    except SystemExit as exc:
        if exc.code in (0, None):
            sys.stderr.write(buffer.getvalue())
            raise
        if debug_requested(sys.argv[1:]):
            sys.stderr.write(buffer.getvalue())
        raise FlagError(one_line_parse_error(buffer.getvalue())) from None
    sys.stderr.write(buffer.getvalue())


def run_command(command: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``command(argv)`` (``--debug`` removed) and turn its outcome into an exit code, printing one
    ``error: ...`` line to stderr for user errors (2), non-finite stops (3) and interruptions (75); unexpected
    errors keep their traceback (1). With ``--debug`` or ``LTXF_DEBUG=1`` every error prints its traceback.
    ``SystemExit`` (e.g. tyro's flag errors, which exit 2 themselves) passes through.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    prefix = _rank_prefix()
    try:
        code = command(strip_debug_flag(argv))
        return EXIT_OK if code is None else int(code)
    except KeyboardInterrupt as exc:
        if debug:
            traceback.print_exc()
        what = str(exc) or "SIGINT"
        print(f"{prefix}error: interrupted ({what}) before a checkpoint could be saved; the last checkpoint (if "
              f"any) is intact: run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 -- the top-level handler: every error becomes an exit code
        code = getattr(exc, "exit_code", None)
        if code is None and is_user_error(exc):
            code = EXIT_USER_ERROR
        if code is None:
            traceback.print_exc()
            print(f"{prefix}error: unexpected {type(exc).__name__} (the traceback above shows where; please report "
                  "it if the inputs look right)", file=sys.stderr)
            return EXIT_UNEXPECTED
        if debug:
            traceback.print_exc()
        print(f"{prefix}error: {error_message(exc)}", file=sys.stderr)
        sys.stderr.flush()
        return int(code)

