"""Canny edges in torch and the edge-reference tool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ltxf import media
from ltxf.prep.dataset_file import read_records, write_records
from ltxf.prep.edges import canny_edges, compute_references, reference_path_for
from tests.prep.conftest import write_clip


def square_image(inside: int = 220, outside: int = 30, size: int = 64, lo: int = 16, hi: int = 48) -> torch.Tensor:
    image = torch.full((1, size, size, 3), outside, dtype=torch.uint8)
    image[:, lo:hi, lo:hi] = inside
    return image


def test_square_edges_on_the_border_only():
    edges = canny_edges(square_image())[0]
    # The square covers rows/columns 16..47; its boundary lies between 15|16 and 47|48.
    border = torch.zeros_like(edges)
    for a in (15, 16, 47, 48):
        border[a, 15:49] = True
        border[15:49, a] = True
    assert edges.any()
    assert not (edges & ~border).any(), "edge pixels away from the square's border"
    # Every side of the square is traced along its whole length (one pixel wide after non-maximum suppression).
    for side in (edges[15:17, 17:47].any(0), edges[47:49, 17:47].any(0), edges[17:47, 15:17].any(1),
                 edges[17:47, 47:49].any(1)):
        assert side.all()
    assert edges[15:17, 20].sum() == 1
    assert not edges[20:44, 20:44].any() and not edges[:12].any() and not edges[52:].any()


def test_thresholds_and_hysteresis():
    # A contrast of 10 grey levels gives an L1 Sobel magnitude of about 40: below the low threshold (100).
    assert not canny_edges(square_image(inside=40))[0].any()
    image = torch.full((1, 48, 64, 3), 30, dtype=torch.uint8)
    image[:, :, 32:] = 200  # strong vertical edge
    image[:, 10:30, 8:12] = 60  # weak blob (magnitude ~120 at its sides), not connected to the strong edge
    strong_only = canny_edges(image)[0]
    assert strong_only[:, 30:34].any() and not strong_only[:, :20].any()
    # Connected weak edge: a ramp whose gradient sits between the thresholds, touching the strong edge.
    ramp = torch.full((1, 48, 64, 3), 30, dtype=torch.uint8)
    ramp[:, 24:, :] = 60  # weak horizontal edge across the whole width
    ramp[:, :, 48:] = 250  # strong vertical edge crossing it
    edges = canny_edges(ramp, blur_sigma=0)[0]
    weak_row = edges[22:26, :40].any(0)
    assert weak_row.all(), "weak edge connected to a strong one is kept"
    isolated = ramp.clone()
    isolated[:, :, 48:] = 30
    isolated[:, :24, :] = 30
    isolated[:, 24:, :] = 60
    assert not canny_edges(isolated, blur_sigma=0)[0].any(), "isolated weak edge is dropped"


def test_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        canny_edges(torch.zeros(4, 4, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="low_threshold <= high_threshold"):
        canny_edges(square_image(), low_threshold=200, high_threshold=100)


def test_reference_names():
    media_path = Path("a/clip.mov")
    assert reference_path_for(media_path).name == "clip_reference.mov"
    assert reference_path_for(media_path.with_suffix(".webm")).name == "clip_reference.mp4"
    assert reference_path_for(media_path.with_suffix(".JPG")).name == "clip_reference.png"


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_compute_references_updates_the_dataset(tmp_path, suffix):
    write_clip(tmp_path / "v.mp4", num_frames=9, height=64, width=64, fps=12.0, audio=False)
    media.write_image(tmp_path / "img.png", square_image()[0])
    (tmp_path / "empty.mp4").write_bytes(b"")
    dataset = tmp_path / f"data{suffix}"
    write_records(dataset, [{"caption": "v", "media_path": "v.mp4"}, {"caption": "i", "media_path": "img.png"},
                            {"caption": "e", "media_path": "empty.mp4"}])
    summary = compute_references(dataset)
    assert [p.name for p in summary.written] == ["v_reference.mp4", "img_reference.png"]
    assert [loc for loc, _ in summary.failed] == [read_records(dataset)[2].location]
    rows = [r.values for r in read_records(dataset)]
    # CSV has no null: a row without a reference gets an empty cell.
    assert [r.get("reference_path") or None for r in rows] == ["v_reference.mp4", "img_reference.png", None]

    video = media.read_video(tmp_path / "v_reference.mp4")
    assert (video.num_frames, video.height, video.width) == (9, 64, 64) and video.fps == pytest.approx(12.0)
    # Three equal channels, nearly binary (H.264 rounding aside).
    assert (video.frames[..., 0].int() - video.frames[..., 2].int()).abs().max() <= 8
    image = media.read_video(tmp_path / "img_reference.png").frames[0, :, :, 0]
    assert torch.equal(image > 127, canny_edges(square_image())[0])

    stamp = (tmp_path / "v_reference.mp4").stat().st_mtime_ns
    again = compute_references(dataset)
    assert len(again.existing) == 2 and not again.written
    assert (tmp_path / "v_reference.mp4").stat().st_mtime_ns == stamp
    assert len(compute_references(dataset, override=True).written) == 2


def test_compute_references_json_written_elsewhere(tmp_path):
    media.write_image(tmp_path / "img.png", square_image()[0])
    (tmp_path / "d.json").write_text(json.dumps([{"media_path": "img.png", "caption": "c"}]))
    compute_references(tmp_path / "d.json", output=tmp_path / "d_ic.json", reference_column="control")
    assert json.loads((tmp_path / "d_ic.json").read_text())[0]["control"] == "img_reference.png"
    assert "control" not in json.loads((tmp_path / "d.json").read_text())[0]
    with pytest.raises(ValueError, match="must be in the dataset file's folder"):
        compute_references(tmp_path / "d.json", output=tmp_path / "sub" / "x.json")
