"""Video, image and audio file I/O on PyAV (FFmpeg), with no OpenCV, torchvision or torchaudio.

Layouts used throughout:

- Video frames are ``uint8`` tensors ``[F, H, W, 3]`` (RGB, frame-major, channels last): the decoder's own layout,
  4x smaller than float. Model code converts with ``frames.permute(3, 0, 1, 2).float() / 127.5 - 1`` to the VAE's
  ``[C, F, H, W]`` in ``[-1, 1]``.
- Audio waveforms are ``float32`` tensors ``[C, N]`` (channels, samples). Integer sources map to ``[-1, 1)``;
  float codecs (AAC, Vorbis, Opus) may overshoot ``[-1, 1]`` slightly and are returned unclipped.
- Images (``.png``, ``.jpg``, ``.jpeg``, any case) are one-frame videos with ``fps = 1.0``, as the official
  preprocessing treats them.

Rotation: phones store portrait clips as landscape frames plus a display matrix. :func:`read_video` applies it
(rotations by multiples of 90 degrees and mirror flips), so frames come back as a player shows them.

Every failure (missing, empty or unreadable file, no video or audio stream where one is needed, bad arguments) is a
``ValueError`` that names the file and what was expected. Writers are atomic: they write a temporary file next to
the target and rename it, so an interrupted run never leaves a truncated output under the final name.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
IMAGE_FPS = 1.0

# FFmpeg's display matrices are 16.16 fixed point in the 2x2 linear part.
_DISPLAY_MATRIX_ONE = 1 << 16


@dataclass(frozen=True, kw_only=True)
class Video:
    """Decoded frames in display orientation.

    ``frames``: ``uint8`` ``[F, H, W, 3]`` RGB. ``fps``: the stream's average frame rate (1.0 for images).
    ``rotation``: the counter-clockwise rotation in degrees that was applied from the file's display matrix
    (0 when none); a portrait phone clip reads ``-90`` (turned 90 degrees clockwise).
    """

    frames: torch.Tensor
    fps: float
    rotation: int = 0

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])

    @property
    def duration(self) -> float:
        """Seconds covered by the decoded frames: ``num_frames / fps``."""
        return self.num_frames / self.fps


@dataclass(frozen=True, kw_only=True)
class VideoInfo:
    """Container metadata read without decoding the whole stream (see :func:`probe_video`).

    ``width`` / ``height`` are the display size (after rotation). ``num_frames`` is the frame count from the
    container header, or from counting packets (no decoding) when the header has none.
    """

    path: Path
    fps: float
    num_frames: int
    width: int
    height: int
    duration: float
    has_audio: bool
    rotation: int
    is_image: bool


@dataclass(frozen=True, kw_only=True)
class Audio:
    """A waveform ``float32`` ``[C, N]`` and its sample rate in Hz."""

    waveform: torch.Tensor
    sample_rate: int

    @property
    def num_channels(self) -> int:
        return int(self.waveform.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.waveform.shape[1])

    @property
    def duration(self) -> float:
        return self.num_samples / self.sample_rate


def is_image_path(path: str | Path) -> bool:
    """True for the still-image extensions the official preprocessing treats as one-frame clips."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise ValueError(f"{path}: no such file (expected a media file)")
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file (expected a media file)")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: file is empty (zero bytes), expected a media file")


@contextmanager
def _open_input(path: Path) -> Iterator[av.container.InputContainer]:
    """Open a media file for reading; FFmpeg errors anywhere inside the block become ValueErrors naming it."""
    _check_readable(path)
    try:
        container = av.open(str(path), mode="r")
    except (av.error.FFmpegError, OSError) as exc:
        raise ValueError(f"{path}: cannot be opened as a media file ({exc})") from exc
    try:
        yield container
    except av.error.FFmpegError as exc:
        raise ValueError(f"{path}: cannot be decoded ({exc})") from exc
    finally:
        container.close()


def _video_stream(container: av.container.InputContainer, path: Path) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise ValueError(f"{path}: has no video stream (expected a video or an image)")
    return container.streams.video[0]


def _average_fps(stream: av.video.stream.VideoStream, num_frames: int, duration: float | None) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return float(rate)
    if duration and num_frames:
        return num_frames / duration
    return None


def _stream_duration(stream: av.stream.Stream, container: av.container.InputContainer) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _display_matrix(frame: av.VideoFrame) -> np.ndarray | None:
    """The 3x3 display matrix attached to a decoded frame, as int32 (FFmpeg layout), or None."""
    for side_data in frame.side_data:
        if getattr(side_data.type, "name", str(side_data.type)).upper().endswith("DISPLAYMATRIX"):
            return np.frombuffer(bytes(side_data), dtype=np.int32).reshape(3, 3)
    return None


def _orientation(frame: av.VideoFrame, stream: av.video.stream.VideoStream, path: Path) -> tuple[int, int, int, int]:
    """The display transform as the integer 2x2 linear part ``(a, b, c, d)`` of FFmpeg's display matrix.

    FFmpeg maps a source pixel ``(x, y)`` to ``(x', y') = (a x + c y, b x + d y)`` (plus a translation), with the
    y axis pointing down. Only multiples of 90 degrees, optionally mirrored, are supported; anything else is
    ignored with a warning (no real camera writes such files).
    """
    matrix = _display_matrix(frame)
    if matrix is None:
        # Files muxed by old FFmpeg versions carry only a clockwise "rotate" tag.
        tag = stream.metadata.get("rotate")
        if tag is None:
            return (1, 0, 0, 1)
        try:
            degrees = -int(float(tag))
        except ValueError:
            logger.warning("%s: ignoring unparseable rotate tag %r", path, tag)
            return (1, 0, 0, 1)
        radians = math.radians(degrees)
        a, b = math.cos(radians), -math.sin(radians)
        c, d = math.sin(radians), math.cos(radians)
    else:
        a, b, c, d = (float(matrix[i, j]) / _DISPLAY_MATRIX_ONE for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
    rounded = tuple(round(v) for v in (a, b, c, d))
    exact = all(abs(v - r) < 1e-3 for v, r in zip((a, b, c, d), rounded, strict=True))
    is_axis_aligned = (rounded[1] == rounded[2] == 0 and abs(rounded[0]) == abs(rounded[3]) == 1) or (
        rounded[0] == rounded[3] == 0 and abs(rounded[1]) == abs(rounded[2]) == 1
    )
    if not (exact and is_axis_aligned):
        logger.warning("%s: ignoring a display matrix that is not a multiple of 90 degrees: %s", path, (a, b, c, d))
        return (1, 0, 0, 1)
    return rounded  # type: ignore[return-value]


def _rotation_degrees(orientation: tuple[int, int, int, int]) -> int:
    """Counter-clockwise degrees of the rotation part, FFmpeg's ``av_display_rotation_get`` convention."""
    a, b, _, _ = orientation
    return round(-math.degrees(math.atan2(b, a)))


def apply_orientation(frames: torch.Tensor, orientation: tuple[int, int, int, int]) -> torch.Tensor:
    """Apply a display transform ``(a, b, c, d)`` (see :func:`_orientation`) to frames ``[F, H, W, C]``.

    ``(0, 1, -1, 0)`` (an iPhone portrait clip, ``rotate=90``) turns the frames 90 degrees clockwise.
    """
    a, b, c, d = orientation
    if b == 0 and c == 0:
        # x' = a x, y' = d y: mirrors only.
        dims = [dim for dim, sign in ((2, a), (1, d)) if sign < 0]
        return frames.flip(dims) if dims else frames
    # x' = c y, y' = b x: the output's rows come from the input's columns.
    out = frames.transpose(1, 2)
    dims = [dim for dim, sign in ((1, b), (2, c)) if sign < 0]
    return out.flip(dims) if dims else out


def _count_packets(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> int:
    count = 0
    for packet in container.demux(stream):
        if packet.size > 0:
            count += 1
    return count


def probe_video(path: str | Path) -> VideoInfo:
    """Read a video's or image's metadata, decoding only the first frame (for the display matrix).

    Raises ``ValueError`` naming the file if it is missing, empty, unreadable or has no video stream.
    """
    path = Path(path)
    image = is_image_path(path)
    with _open_input(path) as container:
        stream = _video_stream(container, path)
        has_audio = bool(container.streams.audio)
        duration = _stream_duration(stream, container)
        try:
            first = next(container.decode(stream))
        except StopIteration:
            raise ValueError(f"{path}: video stream has no frames (expected at least one)") from None
        orientation = _orientation(first, stream, path)
        if image:
            num_frames, fps, duration = 1, IMAGE_FPS, 1.0 / IMAGE_FPS
        else:
            num_frames = int(stream.frames or 0)
            if num_frames <= 0:
                container.seek(0, stream=stream)
                num_frames = _count_packets(container, stream)
            fps = _average_fps(stream, num_frames, duration)
            if fps is None:
                raise ValueError(f"{path}: cannot determine the frame rate (no rate and no duration in the file)")
            if duration is None:
                duration = num_frames / fps
        width, height = first.width, first.height
        if orientation[0] == 0:
            width, height = height, width
        return VideoInfo(
            path=path,
            fps=fps,
            num_frames=num_frames,
            width=width,
            height=height,
            duration=duration,
            has_audio=has_audio,
            rotation=_rotation_degrees(orientation),
            is_image=image,
        )


def read_video(path: str | Path, *, max_frames: int | None = None) -> Video:
    """Decode a video (or an image, as one frame at 1 fps) to RGB ``uint8`` frames ``[F, H, W, 3]``.

    Frames come back in display orientation (the display matrix is applied). ``max_frames`` stops decoding after
    that many frames. Raises ``ValueError`` naming the file on any failure or when no frame decodes.
    """
    path = Path(path)
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames} (reading {path})")
    with _open_input(path) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        arrays: list[np.ndarray] = []
        orientation = (1, 0, 0, 1)
        for frame in container.decode(stream):
            if not arrays:
                orientation = _orientation(frame, stream, path)
            arrays.append(frame.to_ndarray(format="rgb24"))
            if max_frames is not None and len(arrays) >= max_frames:
                break
        if not arrays:
            raise ValueError(f"{path}: video stream has no decodable frames (expected at least one)")
        if is_image_path(path):
            fps = IMAGE_FPS
        else:
            fps = _average_fps(stream, len(arrays), _stream_duration(stream, container))
            if fps is None:
                raise ValueError(f"{path}: cannot determine the frame rate (no rate and no duration in the file)")
    frames = apply_orientation(torch.from_numpy(np.stack(arrays)), orientation).contiguous()
    return Video(frames=frames, fps=fps, rotation=_rotation_degrees(orientation))


def has_audio(path: str | Path) -> bool:
    """True when the file has at least one audio stream. Raises ``ValueError`` if it cannot be opened."""
    path = Path(path)
    with _open_input(path) as container:
        return bool(container.streams.audio)


_LAYOUTS = {1: "mono", 2: "stereo"}


def read_audio(
    path: str | Path,
    *,
    sample_rate: int | None = None,
    num_channels: int | None = None,
    max_duration: float | None = None,
) -> Audio:
    """Decode the first audio stream of a video or audio file to ``float32`` ``[C, N]``.

    ``sample_rate`` resamples (FFmpeg's swresample) and ``num_channels`` (1 or 2) down- or up-mixes; by default
    the source's rate and channels are kept. ``max_duration`` (seconds) stops decoding early. Encoder padding
    past the stream's declared duration (AAC's last frame) is trimmed. Raises ``ValueError`` naming the file if it
    has no audio stream or cannot be decoded.
    """
    path = Path(path)
    if sample_rate is not None and sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate} (reading {path})")
    if num_channels is not None and num_channels not in _LAYOUTS:
        raise ValueError(f"num_channels must be 1 or 2, got {num_channels} (reading {path})")
    if max_duration is not None and max_duration <= 0:
        raise ValueError(f"max_duration must be positive, got {max_duration} (reading {path})")
    with _open_input(path) as container:
        if not container.streams.audio:
            raise ValueError(f"{path}: has no audio stream (expected audio)")
        stream = container.streams.audio[0]
        source_rate = stream.codec_context.sample_rate or stream.rate
        if not source_rate:
            raise ValueError(f"{path}: audio stream has no sample rate")
        out_rate = sample_rate or source_rate
        layout = _LAYOUTS[num_channels] if num_channels else stream.codec_context.layout
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=out_rate)
        limit = None if max_duration is None else int(round(max_duration * out_rate))
        declared = _stream_duration(stream, container) if stream.duration is not None else None
        if declared is not None:
            declared_samples = int(round(declared * out_rate))
            limit = declared_samples if limit is None else min(limit, declared_samples)
        chunks: list[np.ndarray] = []
        total = 0
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
                total += chunks[-1].shape[1]
            if limit is not None and total >= limit:
                break
        else:
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
                total += chunks[-1].shape[1]
    if total == 0:
        raise ValueError(f"{path}: audio stream has no decodable samples (expected audio)")
    waveform = np.concatenate(chunks, axis=1).astype(np.float32, copy=False)
    if limit is not None:
        waveform = waveform[:, :limit]
    return Audio(waveform=torch.from_numpy(np.ascontiguousarray(waveform)), sample_rate=int(out_rate))


def _temp_path(path: Path) -> Path:
    # Keep the extension last so FFmpeg picks the muxer from it.
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


@contextmanager
def _atomic_output(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _frames_to_uint8(frames: torch.Tensor, path: Path, expected_ndim: int) -> np.ndarray:
    if not isinstance(frames, torch.Tensor):
        raise ValueError(f"writing {path}: frames must be a torch.Tensor, got {type(frames).__name__}")
    if frames.ndim != expected_ndim or frames.shape[-1] != 3:
        layout = "[F, H, W, 3]" if expected_ndim == 4 else "[H, W, 3]"
        raise ValueError(f"writing {path}: frames must be {layout} RGB, got shape {tuple(frames.shape)}")
    if frames.dtype == torch.uint8:
        out = frames
    elif frames.is_floating_point():
        out = (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    else:
        raise ValueError(f"writing {path}: frames must be uint8 or float in [0, 1], got {frames.dtype}")
    return out.cpu().contiguous().numpy()


def _waveform_to_numpy(waveform: torch.Tensor, path: Path) -> np.ndarray:
    if not isinstance(waveform, torch.Tensor) or not waveform.is_floating_point():
        raise ValueError(f"writing {path}: audio must be a float tensor [C, N] or [N] in [-1, 1]")
    if waveform.ndim == 1:
        waveform = waveform[None]
    if waveform.ndim != 2 or waveform.shape[0] not in _LAYOUTS or waveform.shape[1] == 0:
        raise ValueError(
            f"writing {path}: audio must be [C, N] with C in (1, 2) and N > 0, got shape {tuple(waveform.shape)}"
        )
    return waveform.detach().float().cpu().numpy()


def write_video(
    path: str | Path,
    frames: torch.Tensor,
    fps: float,
    *,
    audio: torch.Tensor | None = None,
    audio_sample_rate: int | None = None,
    crf: int = 18,
) -> None:
    """Write an H.264 (libx264, yuv420p) MP4, optionally with an AAC stereo track.

    ``frames``: ``[F, H, W, 3]`` RGB, ``uint8`` or float in ``[0, 1]``. H and W must be even (yuv420p halves the
    chroma planes); odd sizes raise ``ValueError`` rather than being padded or cropped silently. ``audio``:
    ``[C, N]`` or ``[N]`` float in ``[-1, 1]``, mono is duplicated to stereo; ``audio_sample_rate`` is required
    with it. ``crf`` 0 is lossless in YUV (the RGB to YUV conversion still rounds).
    """
    path = Path(path)
    array = _frames_to_uint8(frames, path, expected_ndim=4)
    num_frames, height, width, _ = array.shape
    if num_frames == 0:
        raise ValueError(f"writing {path}: no frames to write")
    if height % 2 or width % 2:
        raise ValueError(f"writing {path}: yuv420p needs even height and width, got {height}x{width} (H x W)")
    if not fps > 0:
        raise ValueError(f"writing {path}: fps must be positive, got {fps}")
    if not 0 <= crf <= 51:
        raise ValueError(f"writing {path}: crf must be in [0, 51], got {crf}")
    stereo = None
    if audio is not None:
        if audio_sample_rate is None or audio_sample_rate <= 0:
            raise ValueError(f"writing {path}: audio_sample_rate must be a positive int when audio is given")
        stereo = _waveform_to_numpy(audio, path)
        if stereo.shape[0] == 1:
            stereo = np.repeat(stereo, 2, axis=0)
        stereo = np.ascontiguousarray(np.clip(stereo, -1.0, 1.0), dtype=np.float32)
    rate = Fraction(fps).limit_denominator(100_000)
    with _atomic_output(path) as tmp:
        try:
            with av.open(str(tmp), mode="w") as container:
                video_stream = container.add_stream("libx264", rate=rate)
                video_stream.width, video_stream.height, video_stream.pix_fmt = width, height, "yuv420p"
                video_stream.options = {"crf": str(crf)}
                audio_stream = None
                if stereo is not None:
                    audio_stream = container.add_stream("aac", rate=int(audio_sample_rate), layout="stereo")
                for index in range(num_frames):
                    frame = av.VideoFrame.from_ndarray(array[index], format="rgb24")
                    frame.pts = index
                    container.mux(video_stream.encode(frame))
                container.mux(video_stream.encode(None))
                if audio_stream is not None:
                    audio_frame = av.AudioFrame.from_ndarray(stereo, format="fltp", layout="stereo")
                    audio_frame.sample_rate = int(audio_sample_rate)
                    # An explicit pts of 0 makes the encoder's priming samples negative, so the muxer writes an
                    # edit list and decoders drop them; with no pts the audio plays 1024 samples late.
                    audio_frame.pts = 0
                    container.mux(audio_stream.encode(audio_frame))
                    container.mux(audio_stream.encode(None))
        except (av.error.FFmpegError, OSError) as exc:
            raise ValueError(f"writing {path}: FFmpeg failed ({exc})") from exc


def write_audio(path: str | Path, waveform: torch.Tensor, sample_rate: int) -> None:
    """Write a 16-bit PCM WAV. ``waveform``: ``[C, N]`` or ``[N]`` float in ``[-1, 1]`` (clipped), C in (1, 2)."""
    path = Path(path)
    array = _waveform_to_numpy(waveform, path)
    if sample_rate <= 0:
        raise ValueError(f"writing {path}: sample_rate must be positive, got {sample_rate}")
    num_channels = array.shape[0]
    # s16 is packed: one plane with the channels interleaved.
    interleaved = (np.clip(array, -1.0, 1.0) * 32767.0).round().astype(np.int16).T.reshape(1, -1)
    with _atomic_output(path) as tmp:
        try:
            with av.open(str(tmp), mode="w", format="wav") as container:
                stream = container.add_stream("pcm_s16le", rate=int(sample_rate), layout=_LAYOUTS[num_channels])
                frame = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(interleaved), format="s16", layout=_LAYOUTS[num_channels]
                )
                frame.sample_rate = int(sample_rate)
                frame.pts = 0
                container.mux(stream.encode(frame))
                container.mux(stream.encode(None))
        except (av.error.FFmpegError, OSError) as exc:
            raise ValueError(f"writing {path}: FFmpeg failed ({exc})") from exc


def write_image(path: str | Path, frame: torch.Tensor) -> None:
    """Write one RGB frame ``[H, W, 3]`` (``uint8``, or float in ``[0, 1]``) as a PNG (lossless)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"writing {path}: write_image writes PNG, expected a .png path")
    array = _frames_to_uint8(frame, path, expected_ndim=3)
    height, width, _ = array.shape
    if height == 0 or width == 0:
        raise ValueError(f"writing {path}: empty image {height}x{width}")
    try:
        codec = av.CodecContext.create("png", "w")
        codec.width, codec.height, codec.pix_fmt = width, height, "rgb24"
        packets = codec.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24"))
        packets += codec.encode(None)
    except av.error.FFmpegError as exc:
        raise ValueError(f"writing {path}: PNG encoding failed ({exc})") from exc
    with _atomic_output(path) as tmp:
        tmp.write_bytes(b"".join(bytes(packet) for packet in packets))
