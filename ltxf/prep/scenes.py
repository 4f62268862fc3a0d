"""Scene-cut detection and splitting, in torch over frames decoded with PyAV (no OpenCV, no PySceneDetect).

Detection streams the video once: every frame (or every ``frame_skip + 1``-th) is downscaled by area averaging and
turned into a per-frame score against the previous analysed frame. Four detectors turn the scores into cuts:

* ``content``: the mean absolute HSV difference (hue circular, on OpenCV's 0-180 / 0-255 / 0-255 scales; V only
  with ``luma_only``); a cut where it reaches ``threshold`` (27).
* ``adaptive``: the same score divided by the mean score of the ``adaptive_window`` analysed frames on each side;
  a cut where that ratio reaches ``threshold`` (3.0) and the score itself reaches ``min_content_val`` (15). It
  ignores sustained motion that a fixed threshold would cut on.
* ``histogram``: one minus the correlation of consecutive 64-bin luma histograms; a cut at ``threshold`` (0.05).
* ``threshold``: fades through black: frames whose mean intensity is below ``threshold`` (12) are dark; a cut goes
  inside each dark run, at its middle (``fade_bias`` -1 moves it to the fade-out, +1 to the fade-in).

A cut closer than ``min_scene_length`` frames to the previous cut (or to the start) is dropped. Scenes are then the
frame ranges between cuts; those shorter than a duration can be filtered out, and the rest are written one MP4
per scene (``<stem>-Scene-001.mp4``, re-encoded with :func:`ltxf.media.write_video`, with the matching audio
segment), optionally with preview images and an HTML report. Writing holds one scene's frames in memory.
"""

from __future__ import annotations

import csv
import html
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import av
import torch
import torch.nn.functional as F
import tyro

from ltxf import media

logger = logging.getLogger(__name__)

Detector = Literal["content", "adaptive", "histogram", "threshold"]
DEFAULT_THRESHOLDS: dict[str, float] = {"content": 27.0, "adaptive": 3.0, "histogram": 0.05, "threshold": 12.0}
_ANALYSIS_WIDTH = 256
_HISTOGRAM_BINS = 64
_CHUNK = 32


# -------------------------------------------------------------------------------------------------------------
# Streaming decode


def _orientation_from_rotation(rotation: int) -> tuple[int, int, int, int]:
    """The display transform (see :func:`ltxf.media.apply_orientation`) of a pure rotation in CCW degrees."""
    return {0: (1, 0, 0, 1), -90: (0, 1, -1, 0), 270: (0, 1, -1, 0), 90: (0, -1, 1, 0), -270: (0, -1, 1, 0),
            180: (-1, 0, 0, -1), -180: (-1, 0, 0, -1)}.get(rotation, (1, 0, 0, 1))  # fmt: skip


def iter_video_frames(
    path: str | Path, *, stop_frame: int | None = None, keep: Sequence[int] | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(frame index, uint8 [H, W, 3] RGB frame)`` in display orientation, decoding one frame at a time.

    ``stop_frame`` ends decoding before that index; ``keep`` (sorted indices) yields only those frames (the others
    are decoded but not converted). Raises ``ValueError`` naming the file if it cannot be decoded.
    """
    path = Path(path)
    info = media.probe_video(path)
    orientation = _orientation_from_rotation(info.rotation)
    wanted = None if keep is None else set(keep)
    last_wanted = None if keep is None else (max(keep) if keep else -1)
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for index, frame in enumerate(container.decode(stream)):
                if stop_frame is not None and index >= stop_frame:
                    break
                if last_wanted is not None and index > last_wanted:
                    break
                if wanted is not None and index not in wanted:
                    continue
                array = torch.from_numpy(frame.to_ndarray(format="rgb24"))
                yield index, media.apply_orientation(array[None], orientation)[0].contiguous()
    except (av.error.FFmpegError, OSError) as exc:
        raise ValueError(f"{path}: cannot be decoded ({exc})") from exc


# -------------------------------------------------------------------------------------------------------------
# Per-frame scores


def rgb_to_hsv(rgb_BCHW: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 255] -> HSV on OpenCV's 8-bit scales: H in [0, 180), S and V in [0, 255]. Shape kept."""
    r, g, b = rgb_BCHW.unbind(dim=1)
    value = rgb_BCHW.amax(dim=1)
    delta = value - rgb_BCHW.amin(dim=1)
    saturation = torch.where(value > 0, delta / value.clamp(min=1e-6) * 255.0, 0.0)
    safe = delta.clamp(min=1e-6)
    hue = torch.where(value == r, 60.0 * (g - b) / safe, torch.where(value == g, 120.0 + 60.0 * (b - r) / safe,
                                                                      240.0 + 60.0 * (r - g) / safe))
    hue = torch.where(delta > 0, torch.remainder(hue, 360.0) / 2.0, 0.0)
    return torch.stack([hue, saturation, value], dim=1)


def _luma(rgb_BCHW: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=rgb_BCHW.dtype, device=rgb_BCHW.device)
    return torch.einsum("bchw,c->bhw", rgb_BCHW, weights)


def analysis_size(width: int, height: int, downscale: int) -> tuple[int, int]:
    """``(height, width)`` frames are analysed at: divided by ``downscale``, or by the factor that brings the width
    near 256 when ``downscale`` is 0."""
    factor = downscale if downscale > 0 else max(1, round(width / _ANALYSIS_WIDTH))
    return max(1, height // factor), max(1, width // factor)


@dataclass(frozen=True, kw_only=True)
class FrameFeatures:
    """What each detector compares between frames, for a batch of analysed frames."""

    hsv: torch.Tensor
    """``[B, 3, h, w]``."""
    histogram: torch.Tensor
    """``[B, bins]`` normalised luma histograms."""
    mean_intensity: torch.Tensor
    """``[B]`` mean over RGB, 0-255."""


def frame_features(frames_BHWC: torch.Tensor, size: tuple[int, int]) -> FrameFeatures:
    """uint8 frames ``[B, H, W, 3]`` -> :class:`FrameFeatures` at analysis ``size`` (area-averaged)."""
    rgb = frames_BHWC.permute(0, 3, 1, 2).float()
    mean_intensity = rgb.mean(dim=(1, 2, 3))
    if tuple(rgb.shape[2:]) != size:
        rgb = F.interpolate(rgb, size=size, mode="area")
    luma = _luma(rgb).flatten(1)
    bins = (luma.clamp(0, 255) * (_HISTOGRAM_BINS / 256.0)).long().clamp_(max=_HISTOGRAM_BINS - 1)
    histogram = torch.zeros(luma.shape[0], _HISTOGRAM_BINS).scatter_add_(1, bins, torch.ones_like(luma))
    return FrameFeatures(hsv=rgb_to_hsv(rgb), histogram=histogram / luma.shape[1], mean_intensity=mean_intensity)


def content_scores(hsv: torch.Tensor, previous: torch.Tensor, *, luma_only: bool = False) -> torch.Tensor:
    """Mean absolute HSV difference of each frame ``hsv[i]`` to the one before it (``previous`` for ``i = 0``),
    averaged over the channels (V only with ``luma_only``). Hue differences wrap around (179 vs 1 is 2)."""
    sequence = torch.cat([previous[None], hsv])
    diff = (sequence[1:] - sequence[:-1]).abs()
    hue = torch.minimum(diff[:, 0], 180.0 - diff[:, 0])
    per_channel = torch.stack([hue.mean(dim=(1, 2)), diff[:, 1].mean(dim=(1, 2)), diff[:, 2].mean(dim=(1, 2))], 1)
    return per_channel[:, 2] if luma_only else per_channel.mean(dim=1)


def histogram_scores(histogram: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """``1 - correlation`` of each luma histogram with the one before it (0 = identical)."""
    sequence = torch.cat([previous[None], histogram])
    a, b = sequence[1:], sequence[:-1]
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    denominator = (a.square().sum(1) * b.square().sum(1)).sqrt()
    correlation = torch.where(denominator > 0, (a * b).sum(1) / denominator.clamp(min=1e-12), 1.0)
    return 1.0 - correlation


# -------------------------------------------------------------------------------------------------------------
# Cuts and scenes


@dataclass(frozen=True, kw_only=True)
class DetectorConfig:
    """How cuts are found; see the module docstring."""

    detector: Detector = "content"
    threshold: float | None = None
    """None: the detector's default (content 27, adaptive 3.0, histogram 0.05, threshold 12)."""
    min_scene_length: int = 15
    """Frames; a cut closer than this to the previous cut (or the start) is dropped."""
    luma_only: bool = False
    adaptive_window: int = 2
    min_content_val: float = 15.0
    fade_bias: float = 0.0
    downscale: int = 0
    """Analyse frames at 1/downscale of their size; 0 picks a factor giving a width near 256."""
    frame_skip: int = 0
    """Analyse only every (frame_skip + 1)-th frame (faster, cuts less precise)."""

    def __post_init__(self) -> None:
        if self.detector not in DEFAULT_THRESHOLDS:
            raise ValueError(f"detector must be one of {tuple(DEFAULT_THRESHOLDS)}, got {self.detector!r}")
        if self.min_scene_length < 1:
            raise ValueError(f"min_scene_length must be >= 1 frame, got {self.min_scene_length}")
        if self.adaptive_window < 1:
            raise ValueError(f"adaptive_window must be >= 1, got {self.adaptive_window}")
        if not -1.0 <= self.fade_bias <= 1.0:
            raise ValueError(f"fade_bias must be in [-1, 1], got {self.fade_bias}")
        if self.downscale < 0 or self.frame_skip < 0:
            raise ValueError(f"downscale and frame_skip must be >= 0, got {self.downscale}, {self.frame_skip}")

    @property
    def resolved_threshold(self) -> float:
        return DEFAULT_THRESHOLDS[self.detector] if self.threshold is None else self.threshold


def _drop_close_cuts(candidates: Sequence[int], min_scene_length: int) -> list[int]:
    cuts: list[int] = []
    for frame in candidates:
        if frame - (cuts[-1] if cuts else 0) >= min_scene_length:
            cuts.append(frame)
    return cuts


def find_cuts(frame_indices: Sequence[int], scores: torch.Tensor, config: DetectorConfig) -> list[int]:
    """Cut frames (the first frame of each new scene) from per-frame scores of the analysed frames.

    ``scores[i]`` belongs to frame ``frame_indices[i]``: for content/adaptive/histogram the change from the
    previous analysed frame (the first frame's score is ignored), for ``threshold`` the mean intensity.
    """
    threshold = config.resolved_threshold
    indices = list(frame_indices)
    values = scores.double().tolist()
    candidates: list[int] = []
    if config.detector in ("content", "histogram"):
        candidates = [f for i, (f, s) in enumerate(zip(indices, values, strict=True)) if i > 0 and s >= threshold]
    elif config.detector == "adaptive":
        window = config.adaptive_window
        for i in range(1, len(values)):
            # Only frames with a full window on both sides can be judged, as in PySceneDetect's AdaptiveDetector.
            if i - window < 1 or i + window >= len(values):
                continue
            neighbours = values[i - window : i] + values[i + 1 : i + window + 1]
            mean = sum(neighbours) / len(neighbours)
            ratio = values[i] / mean if mean > 1e-9 else (math.inf if values[i] > 0 else 0.0)
            if ratio >= threshold and values[i] >= config.min_content_val:
                candidates.append(indices[i])
    else:
        dark = [s < threshold for s in values]
        i = 0
        while i < len(dark):
            if not dark[i]:
                i += 1
                continue
            start = i
            while i < len(dark) and dark[i]:
                i += 1
            if start == 0 or i == len(dark):
                continue  # a fade at the very start or end is not a cut between scenes
            fade_out, fade_in = indices[start], indices[i]
            position = 0.5 * (1.0 + config.fade_bias)
            candidates.append(int(round(fade_out + position * (fade_in - fade_out))))
    return _drop_close_cuts(candidates, config.min_scene_length)


def scene_ranges(cuts: Sequence[int], num_frames: int) -> list[tuple[int, int]]:
    """``[start, end)`` frame ranges between cuts covering ``[0, num_frames)``."""
    bounds = [0, *[c for c in cuts if 0 < c < num_frames], num_frames]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


_TIMECODE = re.compile(r"^(\d+):([0-5]?\d):([0-5]?\d(?:\.\d+)?)$")


def parse_duration(text: str, fps: float) -> int:
    """A duration in frames: ``"48"`` (frames), ``"2.5s"`` (seconds) or ``"00:01:02.500"`` (HH:MM:SS[.nnn])."""
    value = text.strip()
    try:
        if value.isdigit():
            return int(value)
        if value.lower().endswith("s") and value[:-1].strip():
            seconds = float(value[:-1])
        elif (match := _TIMECODE.match(value)) is not None:
            hours, minutes, secs = match.groups()
            seconds = int(hours) * 3600 + int(minutes) * 60 + float(secs)
        else:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"duration {text!r}: expected frames ('48'), seconds ('2.5s') or a timecode ('HH:MM:SS[.nnn]')"
        ) from None
    if seconds < 0:
        raise ValueError(f"duration {text!r} is negative")
    return int(round(seconds * fps))


@dataclass(frozen=True, kw_only=True)
class SceneDetection:
    """Result of :func:`detect_scenes`."""

    scenes: list[tuple[int, int]]
    """``[start, end)`` frame ranges."""
    cuts: list[int]
    fps: float
    num_frames: int
    """Frames analysed (the whole video, or up to the duration limit)."""
    frame_indices: list[int]
    scores: torch.Tensor


def detect_scenes(path: str | Path, config: DetectorConfig, *, max_frames: int | None = None) -> SceneDetection:
    """Stream ``path`` once and find its scenes (see the module docstring). ``max_frames`` stops early."""
    path = Path(path)
    info = media.probe_video(path)
    size = analysis_size(info.width, info.height, config.downscale)
    step = config.frame_skip + 1
    indices: list[int] = []
    scores: list[torch.Tensor] = []
    previous: FrameFeatures | None = None
    batch: list[torch.Tensor] = []
    batch_indices: list[int] = []
    num_frames = 0

    def flush() -> None:
        nonlocal previous
        features = frame_features(torch.stack(batch), size)
        if config.detector == "threshold":
            scores.append(features.mean_intensity)
        else:
            first_hsv = features.hsv[0] if previous is None else previous.hsv[-1]
            first_hist = features.histogram[0] if previous is None else previous.histogram[-1]
            if config.detector == "histogram":
                scores.append(histogram_scores(features.histogram, first_hist))
            else:
                scores.append(content_scores(features.hsv, first_hsv, luma_only=config.luma_only))
        previous = features
        indices.extend(batch_indices)
        batch.clear()
        batch_indices.clear()

    for index, frame in iter_video_frames(path, stop_frame=max_frames):
        num_frames = index + 1
        if index % step:
            continue
        batch.append(frame)
        batch_indices.append(index)
        if len(batch) == _CHUNK:
            flush()
    if batch:
        flush()
    if num_frames == 0:
        raise ValueError(f"{path}: no frames decoded")
    all_scores = torch.cat(scores)
    cuts = find_cuts(indices, all_scores, config)
    return SceneDetection(
        scenes=scene_ranges(cuts, num_frames), cuts=cuts, fps=info.fps, num_frames=num_frames,
        frame_indices=indices, scores=all_scores,
    )


def write_stats(path: str | Path, detection: SceneDetection, detector: str) -> None:
    """Per-analysed-frame scores as CSV: frame number, timecode (seconds), score."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["frame", "seconds", f"{detector}_score"])
        for index, score in zip(detection.frame_indices, detection.scores.tolist(), strict=True):
            writer.writerow([index, f"{index / detection.fps:.3f}", f"{score:.4f}"])


# -------------------------------------------------------------------------------------------------------------
# Splitting


@dataclass(frozen=True, kw_only=True)
class WrittenScene:
    number: int
    start_frame: int
    end_frame: int
    path: Path
    images: tuple[Path, ...] = ()


def _even_crop(frames: torch.Tensor) -> torch.Tensor:
    height, width = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
    return frames[:, :height, :width]


def _preview_indices(start: int, end: int, count: int) -> list[int]:
    if count <= 1:
        return [start + (end - start) // 2]
    return sorted({int(round(start + i * (end - 1 - start) / (count - 1))) for i in range(count)})


def split_video(
    path: str | Path,
    output_dir: str | Path,
    scenes: Sequence[tuple[int, int]],
    *,
    fps: float,
    num_images: int = 0,
    crf: int = 18,
) -> list[WrittenScene]:
    """Write each ``[start, end)`` frame range of ``path`` as ``<output_dir>/<stem>-Scene-NNN.mp4`` with its audio.

    ``num_images`` > 0 also writes that many evenly spaced PNG previews per scene (``...-Scene-NNN-MM.png``).
    Frames are decoded once, in order; odd frame sizes lose their last row/column (H.264 yuv420p needs even sizes).
    """
    path, output_dir = Path(path), Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    audio = media.read_audio(path) if media.has_audio(path) else None
    written: list[WrittenScene] = []
    order = sorted(range(len(scenes)), key=lambda i: scenes[i][0])
    pending = iter(order)
    current = next(pending, None)
    frames: list[torch.Tensor] = []
    stop = max((end for _, end in scenes), default=0)
    for index, frame in iter_video_frames(path, stop_frame=stop):
        while current is not None and index >= scenes[current][1]:
            written.append(_write_scene(path, output_dir, current, scenes[current], frames, fps, audio, num_images,
                                        crf))
            frames = []
            current = next(pending, None)
        if current is None:
            break
        if index >= scenes[current][0]:
            frames.append(frame)
    while current is not None:
        written.append(_write_scene(path, output_dir, current, scenes[current], frames, fps, audio, num_images, crf))
        frames = []
        current = next(pending, None)
    return sorted(written, key=lambda s: s.number)


def _write_scene(
    path: Path,
    output_dir: Path,
    position: int,
    scene: tuple[int, int],
    frames: list[torch.Tensor],
    fps: float,
    audio: media.Audio | None,
    num_images: int,
    crf: int,
) -> WrittenScene:
    number = position + 1
    start, end = scene
    if not frames:
        raise ValueError(f"{path}: scene {number} (frames {start}-{end}) has no decodable frames")
    clip = _even_crop(torch.stack(frames))
    out = output_dir / f"{path.stem}-Scene-{number:03d}.mp4"
    segment = None
    if audio is not None:
        first = int(round(start / fps * audio.sample_rate))
        last = int(round((start + len(frames)) / fps * audio.sample_rate))
        segment = audio.waveform[:, first:last]
        if segment.shape[1] == 0:
            segment = None
    media.write_video(out, clip, fps, audio=segment, audio_sample_rate=audio.sample_rate if audio else None, crf=crf)
    images = []
    for i, frame_index in enumerate(_preview_indices(start, start + len(frames), num_images) if num_images else []):
        image_path = output_dir / f"{path.stem}-Scene-{number:03d}-{i + 1:02d}.png"
        media.write_image(image_path, clip[frame_index - start])
        images.append(image_path)
    logger.info("scene %d: frames %d-%d (%.2fs) -> %s", number, start, end - 1, (end - start) / fps, out)
    return WrittenScene(number=number, start_frame=start, end_frame=end, path=out, images=tuple(images))


def write_report(path: str | Path, scenes: Sequence[WrittenScene], fps: float) -> None:
    """A small HTML table of the written scenes with their preview images."""
    path = Path(path)
    rows = []
    for scene in scenes:
        images = "".join(
            f'<img src="{html.escape(p.relative_to(path.parent).as_posix())}" height="120">' for p in scene.images
        )
        rows.append(
            f"<tr><td>{scene.number}</td><td>{scene.start_frame}</td><td>{scene.end_frame - 1}</td>"
            f"<td>{scene.start_frame / fps:.3f}</td><td>{(scene.end_frame - scene.start_frame) / fps:.3f}</td>"
            f"<td>{html.escape(scene.path.name)}</td><td>{images}</td></tr>"
        )
    path.write_text(
        "<html><body><table border=1><tr><th>scene</th><th>first frame</th><th>last frame</th><th>start (s)</th>"
        "<th>length (s)</th><th>file</th><th>previews</th></tr>" + "".join(rows) + "</table></body></html>\n",
        encoding="utf-8",
    )


def filter_short_scenes(scenes: Sequence[tuple[int, int]], min_frames: int) -> list[tuple[int, int]]:
    """Scenes at least ``min_frames`` long."""
    return [s for s in scenes if s[1] - s[0] >= min_frames]


# -------------------------------------------------------------------------------------------------------------
# CLI


@dataclass(frozen=True, kw_only=True)
class SplitScenesConfig:
    """Split a long video into one clip per scene (scene cuts found in torch; see ltxf.prep.scenes)."""

    video_path: Annotated[Path, tyro.conf.Positional]
    """The video to split."""
    output_dir: Annotated[Path, tyro.conf.Positional]
    """Where the scene clips (<stem>-Scene-NNN.mp4) go."""
    detector: Detector = "content"
    """content: HSV change; adaptive: HSV change relative to its neighbours; histogram: luma histogram change;
    threshold: fades through black."""
    threshold: float | None = None
    """Detector threshold; default: content 27, adaptive 3.0 (ratio), histogram 0.05, threshold 12 (intensity)."""
    max_scenes: int | None = None
    """Write at most this many scenes (the first ones, after filtering)."""
    min_scene_length: int = 15
    """Minimum scene length in frames: a cut closer than this to the previous one is ignored."""
    filter_shorter_than: str | None = None
    """Drop scenes shorter than this: frames ('48'), seconds ('2.5s') or a timecode ('HH:MM:SS[.nnn]')."""
    duration: str | None = None
    """Only analyse and split the start of the video, up to this duration (same formats)."""
    save_images: int = 0
    """Write this many preview PNGs per scene, and scene_report.html."""
    stats_file: Path | None = None
    """Write the per-frame detector scores to this CSV file."""
    luma_only: bool = False
    """content/adaptive: compare brightness only."""
    adaptive_window: int = 2
    """adaptive: frames on each side whose mean score a frame is compared to."""
    min_content_val: float = 15.0
    """adaptive: the content score a cut also needs."""
    fade_bias: float = 0.0
    """threshold: where in a fade the cut goes, -1 (fade-out) .. 1 (fade-in)."""
    downscale: int = 0
    """Analyse frames at 1/downscale size; 0 = automatic (width near 256)."""
    frame_skip: int = 0
    """Analyse every (frame_skip + 1)-th frame only."""
    crf: int = 18
    """H.264 quality of the written scenes (lower is better)."""


def split_scenes(config: SplitScenesConfig) -> list[WrittenScene]:
    """Detect the scenes of ``config.video_path`` and write them (see the module docstring)."""
    detector = DetectorConfig(
        detector=config.detector, threshold=config.threshold, min_scene_length=config.min_scene_length,
        luma_only=config.luma_only, adaptive_window=config.adaptive_window, min_content_val=config.min_content_val,
        fade_bias=config.fade_bias, downscale=config.downscale, frame_skip=config.frame_skip,
    )
    info = media.probe_video(config.video_path)
    max_frames = parse_duration(config.duration, info.fps) if config.duration else None
    detection = detect_scenes(config.video_path, detector, max_frames=max_frames)
    logger.info("%s: %d cut(s), %d scene(s) in %d frames", config.video_path, len(detection.cuts),
                len(detection.scenes), detection.num_frames)
    if config.stats_file is not None:
        write_stats(config.stats_file, detection, config.detector)
    scenes = detection.scenes
    if config.filter_shorter_than:
        minimum = parse_duration(config.filter_shorter_than, detection.fps)
        kept = filter_short_scenes(scenes, minimum)
        logger.info("dropped %d scene(s) shorter than %s (%d frames)", len(scenes) - len(kept),
                    config.filter_shorter_than, minimum)
        scenes = kept
    if config.max_scenes is not None:
        scenes = scenes[: config.max_scenes]
    written = split_video(config.video_path, config.output_dir, scenes, fps=detection.fps,
                          num_images=config.save_images, crf=config.crf)
    if config.save_images:
        write_report(Path(config.output_dir) / "scene_report.html", written, detection.fps)
    return written
