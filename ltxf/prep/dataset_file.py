"""Dataset files: the CSV / JSON / JSONL tables that list media and captions, as the official tools read them.

A dataset file is a table with the official ltx-trainer 1.2 columns: ``caption``, ``video`` (legacy ``media_path``)
and optionally ``audio`` (an audio file instead of the clip's own track, or the only media of an audio-only
dataset), ``reference_video`` (legacy ``ref_media_path``; ltxf's own tools write ``reference_path``),
``reference_audio``, ``video_mask`` and ``audio_mask``:

* ``.csv``: a header row, then one row per sample (UTF-8, an optional BOM is ignored);
* ``.json``: a list of objects;
* ``.jsonl``: one object per line (blank lines are ignored).

Media paths are relative to the dataset file's folder; outputs are named after that relative path
(``clips/a.mp4`` -> ``latents/clips/a.pt``). Absolute paths and paths outside the folder are accepted as the
official tool does; their outputs are named ``_external/<absolute path without its root>``.

``caption_videos`` also writes ``.txt`` pairs (``<stem>_captions.txt`` and ``<stem>_paths.txt``, one entry per
line), which :func:`read_records` reads back.

Every problem with the file itself (unreadable, malformed JSON/CSV, a missing column, a value of the wrong type)
is a ``ValueError`` naming the file, the line (or entry) and the column.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

logger = logging.getLogger(__name__)

DATASET_SUFFIXES = (".csv", ".json", ".jsonl")
WRITABLE_SUFFIXES = (".csv", ".json", ".jsonl", ".txt")
DEFAULT_CAPTION_COLUMN = "caption"
DEFAULT_MEDIA_COLUMN = "media_path"
DEFAULT_REFERENCE_COLUMN = "reference_path"
VIDEO_COLUMN = "video"
AUDIO_COLUMN = "audio"
REFERENCE_VIDEO_COLUMN = "reference_video"
REFERENCE_AUDIO_COLUMN = "reference_audio"
VIDEO_MASK_COLUMN = "video_mask"
AUDIO_MASK_COLUMN = "audio_mask"
# Column names that stand for one another (official 1.2 name first, then its legacy names).
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    VIDEO_COLUMN: (VIDEO_COLUMN, DEFAULT_MEDIA_COLUMN),
    DEFAULT_MEDIA_COLUMN: (DEFAULT_MEDIA_COLUMN, VIDEO_COLUMN),
    REFERENCE_VIDEO_COLUMN: (REFERENCE_VIDEO_COLUMN, "ref_media_path", DEFAULT_REFERENCE_COLUMN),
}
EXTERNAL_DIR = "_external"


@dataclass(frozen=True, kw_only=True)
class Record:
    """One raw row of a dataset file and where it came from (for error messages)."""

    location: str
    """``"data.csv line 3"``, ``"data.json entry 2"``, ``"data.jsonl line 5"``."""
    values: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class DatasetEntry:
    """One sample of a dataset file, with its paths resolved against the file's folder."""

    index: int
    """Position in the file (0-based), the order every tool processes samples in."""
    location: str
    caption: str | None
    """None when the caption column was not required and is absent or empty for this row."""
    media_path: Path
    """Absolute path of the media file."""
    rel_path: PurePosixPath
    """The media path relative to the dataset folder; outputs are named after it."""
    reference_path: Path | None = None
    """Absolute path of the IC-LoRA reference media, when a reference column was asked for."""
    has_video: bool = True
    """False for an audio-only row (no video column): ``media_path`` is then the audio file."""
    audio_path: Path | None = None
    """The ``audio`` column: the audio to encode instead of the clip's own track."""
    reference_audio_path: Path | None = None
    """The ``reference_audio`` column (audio IC-LoRA)."""
    video_mask_path: Path | None = None
    """The ``video_mask`` column: an image or video, bright = kept (conditioning), dark = generated."""
    audio_mask_path: Path | None = None
    """The ``audio_mask`` column: a ``.pt`` tensor or a ``.wav`` whose loud parts are kept."""
    values: dict[str, Any] = field(default_factory=dict)
    """The whole row as read."""


def check_dataset_suffix(path: Path, allowed: Sequence[str] = DATASET_SUFFIXES) -> str:
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise ValueError(f"{path}: unsupported dataset file type {path.suffix!r}; expected one of {tuple(allowed)}")
    return suffix


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise ValueError(f"{path}: dataset file not found")
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot be read as UTF-8 text ({exc})") from exc


def _read_csv(path: Path, text: str) -> list[Record]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records: list[Record] = []
    try:
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: the CSV file is empty (expected a header row)")
        header = [name.strip() for name in header]
        if len(set(header)) != len(header) or "" in header:
            raise ValueError(f"{path} line 1: the CSV header {header} has empty or repeated column names")
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise ValueError(
                    f"{path} line {line}: expected {len(header)} fields (columns {header}), got {len(row)}"
                )
            records.append(Record(location=f"{path} line {line}", values=dict(zip(header, row, strict=True))))
    except csv.Error as exc:
        raise ValueError(f"{path} line {reader.line_num}: malformed CSV ({exc})") from exc
    return records


def _read_json(path: Path, text: str) -> list[Record]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} line {exc.lineno} column {exc.colno}: malformed JSON ({exc.msg})") from exc
    if not isinstance(data, list):
        raise ValueError(f"{path}: a JSON dataset must be a list of objects, got a {type(data).__name__}")
    records = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ValueError(f"{path} entry {i}: expected an object, got {type(item).__name__} {item!r:.80}")
        records.append(Record(location=f"{path} entry {i}", values=item))
    return records


def _read_jsonl(path: Path, text: str) -> list[Record]:
    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {line_number} column {exc.colno}: malformed JSON ({exc.msg})") from exc
        if not isinstance(item, dict):
            raise ValueError(f"{path} line {line_number}: expected a JSON object, got {type(item).__name__}")
        records.append(Record(location=f"{path} line {line_number}", values=item))
    return records


def txt_pair_paths(path: Path) -> tuple[Path, Path]:
    """The two files a ``.txt`` dataset stands for: ``<stem>_captions.txt`` and ``<stem>_paths.txt``."""
    return path.with_name(f"{path.stem}_captions.txt"), path.with_name(f"{path.stem}_paths.txt")


def _read_txt_pair(path: Path) -> list[Record]:
    captions_path, paths_path = txt_pair_paths(path)
    captions = _read_text(captions_path).splitlines()
    paths = _read_text(paths_path).splitlines()
    if len(captions) != len(paths):
        raise ValueError(
            f"{captions_path} has {len(captions)} lines but {paths_path} has {len(paths)}; they must pair up"
        )
    return [
        Record(location=f"{paths_path} line {i + 1}", values={DEFAULT_CAPTION_COLUMN: c, DEFAULT_MEDIA_COLUMN: p})
        for i, (c, p) in enumerate(zip(captions, paths, strict=True))
    ]


def read_records(path: str | Path) -> list[Record]:
    """Read every row of a ``.csv`` / ``.json`` / ``.jsonl`` (or ``.txt`` pair) dataset file as-is."""
    path = Path(path)
    suffix = check_dataset_suffix(path, WRITABLE_SUFFIXES)
    if suffix == ".txt":
        return _read_txt_pair(path)
    text = _read_text(path)
    if suffix == ".csv":
        return _read_csv(path, text)
    if suffix == ".json":
        return _read_json(path, text)
    return _read_jsonl(path, text)


def relative_media_path(raw: str, base_dir: Path, location: str, column: str) -> tuple[Path, PurePosixPath]:
    """``(absolute path, output name)`` of a media path as written in a dataset file.

    The output name is the path relative to ``base_dir``; a path outside it (absolute, or climbing out with
    ``..``) is named ``_external/<its absolute path without the root>`` so outputs never leave the output folder.
    Raises ``ValueError`` naming ``location`` and ``column`` for an empty path.
    """
    text = raw.strip()
    if not text:
        raise ValueError(f"{location}: column {column!r} is empty (expected a media path)")
    base = Path(os.path.normpath(base_dir.absolute()))
    given = Path(text).expanduser()
    normalized = Path(os.path.normpath(given if given.is_absolute() else base / given))
    try:
        rel = normalized.relative_to(base)
    except ValueError:
        rel = Path(EXTERNAL_DIR, *normalized.parts[1:])
    if not rel.parts:
        raise ValueError(f"{location}: column {column!r} = {text!r} is the dataset folder itself, not a file")
    return normalized, PurePosixPath(rel.as_posix())


def resolve_column(records: Sequence[Record], column: str) -> str:
    """``column``, or the first of its aliases (:data:`COLUMN_ALIASES`) that the file has, so a 1.2 file
    (``video``) and a legacy one (``media_path``) both read with either name."""
    names = set().union(*(r.values for r in records)) if records else set()
    for name in COLUMN_ALIASES.get(column, (column,)):
        if name in names:
            return name
    return column


def _string_value(record: Record, column: str, *, required: bool) -> str | None:
    if column not in record.values:
        if required:
            raise ValueError(
                f"{record.location}: missing column {column!r} (found {sorted(record.values)}); pass the right "
                "column name if it is called differently"
            )
        return None
    value = record.values[column]
    if value is None:
        if required:
            raise ValueError(f"{record.location}: column {column!r} is null (expected a string)")
        return None
    if not isinstance(value, str):
        raise ValueError(f"{record.location}: column {column!r} must be a string, got {type(value).__name__} {value!r}")
    return value


def read_dataset(
    path: str | Path,
    *,
    caption_column: str = DEFAULT_CAPTION_COLUMN,
    media_column: str = DEFAULT_MEDIA_COLUMN,
    reference_column: str | None = None,
    require_captions: bool = True,
) -> list[DatasetEntry]:
    """Read a dataset file into entries with resolved paths (see the module docstring for the formats).

    ``require_captions=False`` (video-only processing) tolerates a missing caption column. Media files are not
    opened here: a missing media file is reported per sample by the tools that read it. Two rows naming the same
    media path would write the same outputs; the later ones are dropped with a warning.
    """
    path = Path(path)
    check_dataset_suffix(path)
    base_dir = path.parent
    entries: list[DatasetEntry] = []
    seen: dict[PurePosixPath, str] = {}
    records = read_records(path)
    media_column = resolve_column(records, media_column)
    reference_required = reference_column is not None
    if reference_column is not None:
        reference_column = resolve_column(records, reference_column)
    elif records and any(name in r.values for r in records for name in ("reference_video", "ref_media_path")):
        # The official tool encodes a reference whenever the file has the column.
        reference_column = resolve_column(records, REFERENCE_VIDEO_COLUMN)
    for record in records:
        optional = {}
        for name in (AUDIO_COLUMN, REFERENCE_AUDIO_COLUMN, VIDEO_MASK_COLUMN, AUDIO_MASK_COLUMN):
            value = _string_value(record, name, required=False)
            optional[name] = (None if value is None or not value.strip()
                              else relative_media_path(value, base_dir, record.location, name)[0])
        has_video = media_column in record.values or optional[AUDIO_COLUMN] is None
        if has_video:
            media = _string_value(record, media_column, required=True)
            assert media is not None
            media_path, rel_path = relative_media_path(media, base_dir, record.location, media_column)
        else:  # audio-only: named after the audio file
            media_path, rel_path = relative_media_path(record.values[AUDIO_COLUMN], base_dir, record.location,
                                                       AUDIO_COLUMN)
        if rel_path in seen:
            logger.warning("%s: media %s is already listed at %s; skipping the repeat", record.location, rel_path,
                           seen[rel_path])
            continue
        seen[rel_path] = record.location
        caption = _string_value(record, caption_column, required=require_captions)
        reference_path = None
        if reference_column is not None:
            reference = _string_value(record, reference_column, required=reference_required)
            if reference is not None and reference.strip():
                reference_path, _ = relative_media_path(reference, base_dir, record.location, reference_column)
        entries.append(
            DatasetEntry(
                index=len(entries),
                location=record.location,
                caption=caption,
                media_path=media_path,
                rel_path=rel_path,
                reference_path=reference_path,
                has_video=has_video,
                audio_path=optional[AUDIO_COLUMN],
                reference_audio_path=optional[REFERENCE_AUDIO_COLUMN],
                video_mask_path=optional[VIDEO_MASK_COLUMN],
                audio_mask_path=optional[AUDIO_MASK_COLUMN],
                values=dict(record.values),
            )
        )
    if not entries:
        raise ValueError(f"{path}: the dataset file lists no samples")
    return entries


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def write_records(
    path: str | Path,
    records: Sequence[Mapping[str, Any]],
    *,
    caption_column: str = DEFAULT_CAPTION_COLUMN,
    media_column: str = DEFAULT_MEDIA_COLUMN,
) -> list[Path]:
    """Write rows as a dataset file chosen by extension (``.json``, ``.jsonl``, ``.csv`` or ``.txt``), atomically.

    CSV columns are the union of the rows' keys in first-seen order. ``.txt`` writes the caption and media columns
    to ``<stem>_captions.txt`` and ``<stem>_paths.txt`` (newlines inside captions become spaces). Returns the
    files written.
    """
    path = Path(path)
    suffix = check_dataset_suffix(path, WRITABLE_SUFFIXES)
    rows = [dict(r) for r in records]
    if suffix == ".json":
        _atomic_write_text(path, json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
        return [path]
    if suffix == ".jsonl":
        _atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return [path]
    if suffix == ".csv":
        columns: list[str] = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])
        _atomic_write_text(path, buffer.getvalue())
        return [path]
    captions_path, paths_path = txt_pair_paths(path)
    _atomic_write_text(
        captions_path, "".join(" ".join(str(r.get(caption_column) or "").split()) + "\n" for r in rows)
    )
    _atomic_write_text(paths_path, "".join(str(r.get(media_column) or "") + "\n" for r in rows))
    return [captions_path, paths_path]
