"""Dataset files: the three formats, path resolution, and errors that name the file, line and column."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import pytest

from ltxf.prep.dataset_file import read_dataset, read_records, write_records

ROWS = [
    {"caption": "a cat, running", "media_path": "clips/a.mp4", "reference_path": "refs/a.mp4"},
    {"caption": 'say "hi"\nthen leave', "media_path": "b.png", "reference_path": "refs/b.png"},
]


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl"])
def test_formats_round_trip(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    write_records(path, ROWS)
    entries = read_dataset(path, reference_column="reference_path")
    assert [e.caption for e in entries] == [r["caption"] for r in ROWS]
    assert [e.rel_path for e in entries] == [PurePosixPath("clips/a.mp4"), PurePosixPath("b.png")]
    assert entries[0].media_path == tmp_path / "clips" / "a.mp4"
    assert entries[1].reference_path == tmp_path / "refs" / "b.png"
    assert [e.index for e in entries] == [0, 1]


def test_txt_pair_round_trip(tmp_path):
    written = write_records(tmp_path / "out.txt", ROWS)
    assert [p.name for p in written] == ["out_captions.txt", "out_paths.txt"]
    values = [r.values for r in read_records(tmp_path / "out.txt")]
    # Newlines inside a caption cannot survive one-caption-per-line; they become spaces.
    assert values == [{"caption": "a cat, running", "media_path": "clips/a.mp4"},
                      {"caption": 'say "hi" then leave', "media_path": "b.png"}]


def test_custom_columns_and_absolute_paths_inside(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "x", "video": str(tmp_path / "sub" / "v.mp4")}) + "\n\n")
    (entry,) = read_dataset(path, caption_column="text", media_column="video")
    assert entry.rel_path == PurePosixPath("sub/v.mp4") and entry.caption == "x"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("d.json", '[{"caption": "a", "media_path": "x.mp4"},\n {"caption": "b" "media_path": 1}]',
         r"d\.json line 2 column 18: malformed JSON"),
        ("d.json", '{"caption": "a"}', "must be a list of objects"),
        ("d.json", '[["a", "b"]]', r"d\.json entry 0: expected an object"),
        ("d.jsonl", '{"caption": "a", "media_path": "x.mp4"}\n{"caption": }\n', r"d\.jsonl line 2 column 13"),
        ("d.csv", 'caption,media_path\n"a",x.mp4\nb,y.mp4,extra\n', r"d\.csv line 3: expected 2 fields"),
        ("d.csv", 'caption,media_path\n"unterminated,x.mp4\n', r"d\.csv line \d+: malformed CSV"),
        ("d.csv", "", "the CSV file is empty"),
        ("d.json", '[{"caption": "a", "clip": "x.mp4"}]', r"entry 0: missing column 'media_path'"),
        ("d.json", '[{"caption": 3, "media_path": "x.mp4"}]', r"entry 0: column 'caption' must be a string"),
        ("d.json", '[{"caption": "a", "media_path": "  "}]', r"entry 0: column 'media_path' is empty"),
        ("d.json", "[]", "lists no samples"),
        ("d.yaml", "a: b", "unsupported dataset file type '.yaml'"),
    ],
)
def test_malformed_files_name_file_line_and_column(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_dataset(path)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="dataset file not found"):
        read_dataset(tmp_path / "nope.csv")


def test_captions_optional_and_duplicates_dropped(tmp_path, caplog):
    path = tmp_path / "d.csv"
    path.write_text("media_path\na.mp4\n./a.mp4\nb.mp4\n")
    entries = read_dataset(path, require_captions=False)
    assert [e.rel_path.as_posix() for e in entries] == ["a.mp4", "b.mp4"]
    assert entries[0].caption is None
    assert "already listed" in caplog.text


def test_csv_columns_are_the_union(tmp_path):
    path = tmp_path / "d.csv"
    write_records(path, [{"media_path": "a.mp4"}, {"media_path": "b.mp4", "caption": "b", "n": 3}])
    assert Path(path).read_text().splitlines() == ["media_path,caption,n", "a.mp4,,", "b.mp4,b,3"]


def test_official_1_2_columns_legacy_names_and_outside_paths(tmp_path):
    """A 1.2 dataset file reads as it is: ``video`` (or legacy ``media_path``), ``reference_video`` (or legacy
    ``ref_media_path``), ``audio``, ``reference_audio``, ``video_mask``, ``audio_mask``; media outside the folder
    are accepted and named under _external/."""
    outside = tmp_path / "elsewhere" / "o.mp4"
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [
        {"caption": "a", "video": "a.mp4", "reference_video": "ra.mp4", "video_mask": "ma.png",
         "audio_mask": "ma.pt", "reference_audio": "ra.wav"},
        {"caption": "b", "video": str(outside), "audio": "../b.wav"},
    ]
    (folder / "d.json").write_text(json.dumps(rows))
    a, b = read_dataset(folder / "d.json")
    assert a.rel_path == PurePosixPath("a.mp4") and a.reference_path == folder / "ra.mp4"
    assert a.video_mask_path == folder / "ma.png" and a.audio_mask_path == folder / "ma.pt"
    assert a.reference_audio_path == folder / "ra.wav" and a.audio_path is None
    assert b.media_path == outside and b.rel_path == PurePosixPath("_external", *outside.parts[1:])
    assert b.audio_path == tmp_path / "b.wav" and b.has_video
    legacy = [{"caption": "a", "media_path": "a.mp4", "ref_media_path": "r.mp4"}]
    (folder / "l.json").write_text(json.dumps(legacy))
    (entry,) = read_dataset(folder / "l.json", media_column="video")
    assert entry.media_path == folder / "a.mp4" and entry.reference_path == folder / "r.mp4"


def test_audio_only_rows_are_named_after_the_audio(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"caption": "rain", "audio": "s/rain.wav"}\n')
    (entry,) = read_dataset(tmp_path / "d.jsonl", media_column="video")
    assert not entry.has_video and entry.media_path == tmp_path / "s" / "rain.wav"
    assert entry.rel_path == PurePosixPath("s/rain.wav") and entry.audio_path == entry.media_path
