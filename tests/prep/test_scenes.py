"""Scene detection and splitting on synthetic videos whose cut frames are known."""

from __future__ import annotations

import csv

import pytest
import torch

from ltxf import media
from ltxf.prep.scenes import (
    DetectorConfig,
    detect_scenes,
    find_cuts,
    parse_duration,
    rgb_to_hsv,
    scene_ranges,
)
from tests.prep.conftest import moving_square_frames, sine
from tests.prep.test_end_to_end import load_tool

FPS = 24.0
SEGMENTS = [(20, (220, 40, 40), 90), (30, (40, 200, 60), 180), (25, (30, 30, 230), 30)]  # frames, square, background


@pytest.fixture(scope="module")
def three_scenes(tmp_path_factory):
    """Three visually distinct segments of 20, 30 and 25 frames (cuts at 20 and 50), with a tone."""
    parts = [moving_square_frames(n, 64, 96, colour=colour, background=bg) for n, colour, bg in SEGMENTS]
    frames = torch.cat(parts)
    path = tmp_path_factory.mktemp("scenes") / "three.mp4"
    media.write_video(path, frames, FPS, audio=sine(frames.shape[0] / FPS), audio_sample_rate=24000)
    return path


@pytest.mark.parametrize("detector", ["content", "adaptive", "histogram"])
def test_cuts_at_the_segment_boundaries(three_scenes, detector):
    detection = detect_scenes(three_scenes, DetectorConfig(detector=detector))
    assert detection.cuts == [20, 50]
    assert detection.scenes == [(0, 20), (20, 50), (50, 75)]
    assert detection.num_frames == 75 and detection.fps == pytest.approx(FPS)


def test_luma_only_and_frame_skip(three_scenes):
    assert detect_scenes(three_scenes, DetectorConfig(luma_only=True)).cuts == [20, 50]
    # Every other frame analysed: a cut is reported at the first analysed frame of the new scene.
    assert detect_scenes(three_scenes, DetectorConfig(frame_skip=1)).cuts == [20, 50]
    # Stop after 40 frames: one cut.
    assert detect_scenes(three_scenes, DetectorConfig(), max_frames=40).scenes == [(0, 20), (20, 40)]


def test_fade_through_black(tmp_path):
    frames = torch.cat([moving_square_frames(15, 32, 32), torch.zeros(6, 32, 32, 3, dtype=torch.uint8),
                        moving_square_frames(15, 32, 32, background=150)])
    path = tmp_path / "fade.mp4"
    media.write_video(path, frames, FPS)
    # Dark frames 15..20, first bright frame 21: the cut goes in the middle, moved by fade_bias.
    assert detect_scenes(path, DetectorConfig(detector="threshold", min_scene_length=5)).cuts == [18]
    assert detect_scenes(path, DetectorConfig(detector="threshold", fade_bias=-1.0, min_scene_length=5)).cuts == [15]
    assert detect_scenes(path, DetectorConfig(detector="threshold", fade_bias=1.0, min_scene_length=5)).cuts == [21]


def test_min_scene_length_and_adaptive_ignores_steady_motion():
    scores = torch.tensor([0.0, 5, 40, 5, 5, 50, 5, 5, 5, 5, 5, 60, 5, 5])
    indices = list(range(len(scores)))
    assert find_cuts(indices, scores, DetectorConfig(min_scene_length=1)) == [2, 5, 11]
    assert find_cuts(indices, scores, DetectorConfig(min_scene_length=4)) == [5, 11]
    # Sustained high change (fast motion) is not a cut for the adaptive detector, a spike above it is.
    motion = torch.tensor([0.0, 30, 32, 31, 30, 33, 120, 31, 30, 32, 30])
    assert find_cuts(list(range(11)), motion, DetectorConfig(detector="content", min_scene_length=1)) == list(
        range(1, 11))
    assert find_cuts(list(range(11)), motion, DetectorConfig(detector="adaptive", min_scene_length=1)) == [6]
    assert scene_ranges([5, 11], 14) == [(0, 5), (5, 11), (11, 14)]


def test_hsv_matches_opencv_scales():
    rgb = torch.tensor([[255.0, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128], [255, 255, 0]]).T[None, :, :, None]
    hsv = rgb_to_hsv(rgb)[0, :, :, 0].T
    torch.testing.assert_close(hsv, torch.tensor([[0.0, 255, 255], [60, 255, 255], [120, 255, 255], [0, 0, 128],
                                                  [30, 255, 255]]))


def test_parse_duration():
    assert parse_duration("48", 24.0) == 48
    assert parse_duration("2.5s", 24.0) == 60
    assert parse_duration("00:01:02.500", 24.0) == 1500
    for bad in ("abc", "1:2", "-3s", "s"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad, 24.0)


def test_split_scenes_tool(three_scenes, tmp_path):
    out = tmp_path / "out"
    stats = tmp_path / "stats.csv"
    code = load_tool("split_scenes").main([str(three_scenes), str(out), "--filter_shorter_than", "1s",
                                          "--save_images", "2", "--stats_file", str(stats)])
    assert code == 0
    # The 20-frame scene (0.83 s) is filtered out; the rest are numbered in order.
    written = sorted(p.name for p in out.glob("*.mp4"))
    assert written == ["three-Scene-001.mp4", "three-Scene-002.mp4"]
    for name, num_frames in zip(written, (30, 25), strict=True):
        video = media.read_video(out / name)
        assert video.num_frames == num_frames and (video.height, video.width) == (64, 96)
        audio = media.read_audio(out / name)
        assert audio.duration == pytest.approx(num_frames / FPS, abs=0.03)
    # The second scene starts green-on-light: its first frame is the first frame of segment 2.
    first = media.read_video(out / "three-Scene-001.mp4").frames[0].float()
    assert first[2, 2].tolist() == pytest.approx([180, 180, 180], abs=6)
    assert len(list(out.glob("*.png"))) == 4 and (out / "scene_report.html").is_file()
    with stats.open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["frame", "seconds", "content_score"] and len(rows) == 76


def test_split_scenes_errors(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    assert load_tool("split_scenes").main([str(tmp_path / "empty.mp4"), str(tmp_path / "o")]) == 2
    with pytest.raises(ValueError, match="detector must be one of"):
        DetectorConfig(detector="magic")  # type: ignore[arg-type]
