"""ltxf.media against files written directly with PyAV in the tests (not with ltxf's writers), then ltxf's writers
round-tripped.

Content tolerances: H.264 at crf 0 is lossless in YUV, but the RGB -> yuv420p -> RGB conversion rounds, and
chroma subsampling blurs colour edges. The patterns are grey (R = G = B, so chroma is flat) and smooth, which
leaves only the rounding: a max error of 2 levels. AAC is lossy: a 440 Hz tone at 0.5 amplitude comes back within
0.1 (measured 0.037) and highly correlated.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from ltxf import media

SAMPLE_RATE = 16_000


def _grey_pattern(num_frames: int, height: int, width: int) -> np.ndarray:
    """Smooth, asymmetric (x and y weighted differently), moving grey frames, uint8 [F, H, W, 3]."""
    y = np.arange(height)[:, None]
    x = np.arange(width)[None, :]
    frames = [(2 * x + y + 5 * f) % 200 + 20 for f in range(num_frames)]
    grey = np.stack(frames).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def _tone(num_samples: int, sample_rate: int = SAMPLE_RATE, freq: float = 440.0) -> np.ndarray:
    t = np.arange(num_samples) / sample_rate
    return (0.5 * np.sin(2 * math.pi * freq * t)).astype(np.float32)


def _pyav_write_video(
    path: Path,
    frames: np.ndarray,
    rate: Fraction,
    *,
    audio: np.ndarray | None = None,
    display_matrix: list[int] | None = None,
) -> None:
    """Independent writer: libx264 crf 0, optional AAC stereo [2, N] at 16 kHz, optional display matrix."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "0"}
        if display_matrix is not None:
            stream.set_display_matrix(display_matrix)
        # Every stream must exist before the first packet is muxed (the header is written then).
        audio_stream = None if audio is None else container.add_stream("aac", rate=SAMPLE_RATE, layout="stereo")
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
        if audio_stream is not None:
            audio_frame = av.AudioFrame.from_ndarray(audio, format="fltp", layout="stereo")
            audio_frame.sample_rate, audio_frame.pts = SAMPLE_RATE, 0
            container.mux(audio_stream.encode(audio_frame))
            container.mux(audio_stream.encode(None))


def _pyav_write_wav(path: Path, waveform: np.ndarray) -> None:
    with av.open(str(path), mode="w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=SAMPLE_RATE, layout="mono")
        pcm = (waveform * 32767).round().astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate, frame.pts = SAMPLE_RATE, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _max_error(a: torch.Tensor, b: np.ndarray | torch.Tensor) -> int:
    return int((a.int() - torch.as_tensor(b).int()).abs().max())


@pytest.fixture(scope="module")
def av_clip(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A 17-frame 64x96 grey clip at 25 fps with a 1 s stereo 440 Hz tone."""
    path = tmp_path_factory.mktemp("media") / "clip.mp4"
    frames = _grey_pattern(17, 64, 96)
    tone = _tone(SAMPLE_RATE)
    _pyav_write_video(path, frames, Fraction(25), audio=np.stack([tone, tone]))
    return path, frames, tone


def test_read_video_frames_fps_and_content(av_clip):
    path, frames, _ = av_clip
    video = media.read_video(path)
    assert video.frames.dtype == torch.uint8
    assert tuple(video.frames.shape) == (17, 64, 96, 3)
    assert video.num_frames == 17 and (video.height, video.width) == (64, 96)
    assert video.fps == 25.0
    assert video.duration == pytest.approx(17 / 25)
    assert video.rotation == 0
    assert _max_error(video.frames, frames) <= 2


def test_read_video_max_frames(av_clip):
    path, frames, _ = av_clip
    video = media.read_video(path, max_frames=5)
    assert video.num_frames == 5
    assert _max_error(video.frames, frames[:5]) <= 2


def test_probe_video(av_clip):
    path, _, _ = av_clip
    info = media.probe_video(path)
    assert (info.num_frames, info.width, info.height) == (17, 96, 64)
    assert info.fps == 25.0
    assert info.duration == pytest.approx(17 / 25, abs=1e-3)
    assert info.has_audio and not info.is_image and info.rotation == 0
    assert media.has_audio(path)


def test_fractional_fps_is_the_real_average(tmp_path):
    path = tmp_path / "ntsc.mp4"
    _pyav_write_video(path, _grey_pattern(9, 32, 32), Fraction(30000, 1001))
    assert media.read_video(path).fps == pytest.approx(30000 / 1001, abs=1e-9)
    info = media.probe_video(path)
    assert info.fps == pytest.approx(30000 / 1001, abs=1e-9)
    assert info.num_frames == 9
    assert not info.has_audio and not media.has_audio(path)


def test_read_audio_from_video(av_clip):
    path, _, tone = av_clip
    audio = media.read_audio(path)
    assert audio.sample_rate == SAMPLE_RATE
    assert audio.waveform.dtype == torch.float32
    # The AAC priming samples are dropped (edit list) and the last frame's padding is trimmed: exact length.
    assert tuple(audio.waveform.shape) == (2, SAMPLE_RATE)
    assert audio.duration == pytest.approx(1.0)
    for channel in audio.waveform:
        assert float((channel - torch.from_numpy(tone)).abs().max()) < 0.1
        assert float(np.corrcoef(channel.numpy(), tone)[0, 1]) > 0.99


def test_read_audio_resamples_and_downmixes(av_clip):
    path, _, _ = av_clip
    audio = media.read_audio(path, sample_rate=8000, num_channels=1)
    assert audio.sample_rate == 8000 and audio.num_channels == 1
    assert audio.num_samples == 8000
    spectrum = np.abs(np.fft.rfft(audio.waveform[0].numpy()))
    peak_hz = np.argmax(spectrum) * 8000 / audio.num_samples
    assert peak_hz == pytest.approx(440.0, abs=1.0)
    short = media.read_audio(path, max_duration=0.25)
    assert short.num_samples == SAMPLE_RATE // 4


def test_read_audio_from_wav_is_exact(tmp_path):
    path = tmp_path / "tone.wav"
    tone = _tone(4000)
    _pyav_write_wav(path, tone)
    audio = media.read_audio(path)
    assert audio.sample_rate == SAMPLE_RATE and tuple(audio.waveform.shape) == (1, 4000)
    # 16-bit PCM: one quantisation step is 1/32768.
    assert float((audio.waveform[0] - torch.from_numpy(tone)).abs().max()) < 2 / 32768
    with pytest.raises(ValueError, match=r"tone\.wav.*no video stream"):
        media.read_video(path)


def test_images_are_one_frame_clips_at_1_fps(tmp_path):
    frame = torch.from_numpy(_grey_pattern(1, 30, 44)[0].copy())
    frame[..., 0] = 255 - frame[..., 0]  # some colour, lossless in PNG
    png = tmp_path / "still.PNG"
    png_lower = tmp_path / "still.png"
    media.write_image(png_lower, frame)
    png.write_bytes(png_lower.read_bytes())
    for path in (png, png_lower):
        video = media.read_video(path)
        assert video.fps == 1.0 and video.num_frames == 1
        assert torch.equal(video.frames[0], frame)
        info = media.probe_video(path)
        assert info.is_image and info.num_frames == 1 and info.fps == 1.0 and (info.width, info.height) == (44, 30)

    # A JPEG written by FFmpeg's own encoder, with an upper-case extension.
    jpeg = tmp_path / "still.JPEG"
    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height, codec.pix_fmt, codec.time_base = 44, 30, "yuvj444p", Fraction(1, 25)
    grey = _grey_pattern(1, 30, 44)[0]
    packets = codec.encode(av.VideoFrame.from_ndarray(grey, format="rgb24").reformat(format="yuvj444p"))
    jpeg.write_bytes(b"".join(bytes(p) for p in packets + codec.encode(None)))
    video = media.read_video(jpeg)
    assert media.is_image_path(jpeg) and video.fps == 1.0 and tuple(video.frames.shape) == (1, 30, 44, 3)
    assert float((video.frames[0].float() - torch.from_numpy(grey).float()).abs().mean()) < 3


# FFmpeg display matrices (16.16 fixed point), as phones and editors write them.
IPHONE_PORTRAIT = [0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30]  # "rotate=90": turn 90 degrees clockwise to display
MIRROR_X = [-65536, 0, 0, 0, 65536, 0, 0, 0, 1 << 30]


def test_display_matrix_rotation_is_applied(tmp_path):
    path = tmp_path / "portrait.mp4"
    frames = _grey_pattern(3, 32, 64)
    _pyav_write_video(path, frames, Fraction(24), display_matrix=IPHONE_PORTRAIT)
    video = media.read_video(path)
    assert video.rotation == -90
    assert tuple(video.frames.shape) == (3, 64, 32, 3)
    # np.rot90 with k=-1 turns clockwise: the stored frame's left column becomes the displayed top row.
    clockwise = np.rot90(frames, k=-1, axes=(1, 2))
    assert _max_error(video.frames, clockwise.copy()) <= 2
    info = media.probe_video(path)
    assert (info.width, info.height, info.rotation) == (32, 64, -90)


def test_display_matrix_mirror_is_applied(tmp_path):
    path = tmp_path / "mirrored.mp4"
    frames = _grey_pattern(2, 32, 64)
    _pyav_write_video(path, frames, Fraction(24), display_matrix=MIRROR_X)
    video = media.read_video(path)
    assert tuple(video.frames.shape) == (2, 32, 64, 3)
    assert _max_error(video.frames, frames[:, :, ::-1].copy()) <= 2


def test_apply_orientation_all_rotations():
    frames = torch.arange(2 * 3 * 4 * 1).reshape(2, 3, 4, 1)
    # FFmpeg's av_display_rotation_set(theta): (a, b, c, d) = (cos, -sin, sin, cos), theta counter-clockwise.
    for theta, k in ((0, 0), (90, 1), (180, 2), (-90, -1)):
        cos, sin = math.cos(math.radians(theta)), math.sin(math.radians(theta))
        orientation = tuple(round(v) for v in (cos, -sin, sin, cos))
        expected = torch.rot90(frames, k=k, dims=(1, 2))
        assert torch.equal(media.apply_orientation(frames, orientation), expected), theta


def test_write_video_round_trip_with_audio(tmp_path):
    path = tmp_path / "out" / "written.mp4"
    frames = torch.from_numpy(_grey_pattern(9, 48, 80))
    tone = torch.from_numpy(_tone(8000))
    media.write_video(path, frames, 24.0, audio=tone, audio_sample_rate=SAMPLE_RATE, crf=0)
    assert sorted(p.name for p in path.parent.iterdir()) == ["written.mp4"]  # no temp file left behind
    video = media.read_video(path)
    assert video.fps == 24.0 and tuple(video.frames.shape) == (9, 48, 80, 3)
    assert _max_error(video.frames, frames) <= 2
    audio = media.read_audio(path)
    # Mono input is duplicated to stereo.
    assert audio.sample_rate == SAMPLE_RATE and tuple(audio.waveform.shape) == (2, 8000)
    assert float((audio.waveform - tone).abs().max()) < 0.1

    # Default crf 18 is lossy: still close on a smooth pattern (mean error, in 8-bit levels).
    lossy = tmp_path / "lossy.mp4"
    media.write_video(lossy, frames.float() / 255, 12.5)
    video = media.read_video(lossy)
    assert video.fps == 12.5
    assert float((video.frames.float() - frames.float()).abs().mean()) < 2.0


def test_write_audio_round_trip(tmp_path):
    path = tmp_path / "stereo.wav"
    tone = torch.from_numpy(_tone(3000))
    waveform = torch.stack([tone, -tone])
    media.write_audio(path, waveform, SAMPLE_RATE)
    audio = media.read_audio(path)
    assert audio.sample_rate == SAMPLE_RATE and tuple(audio.waveform.shape) == (2, 3000)
    assert float((audio.waveform - waveform).abs().max()) < 2 / 32768


def test_read_errors_name_the_file(tmp_path, av_clip):
    missing = tmp_path / "nope.mp4"
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 100)
    for path, reason in ((missing, "no such file"), (empty, "empty"), (garbage, "cannot be opened")):
        for read in (media.read_video, media.probe_video, media.read_audio, media.has_audio):
            with pytest.raises(ValueError, match=reason) as excinfo:
                read(path)
            assert str(path) in str(excinfo.value)
    silent = tmp_path / "silent.mp4"
    _pyav_write_video(silent, _grey_pattern(1, 16, 16), Fraction(24))
    with pytest.raises(ValueError, match=r"silent\.mp4.*no audio stream"):
        media.read_audio(silent)
    with pytest.raises(ValueError, match="max_frames"):
        media.read_video(av_clip[0], max_frames=0)


def test_write_errors(tmp_path):
    frames = torch.zeros(2, 31, 32, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"odd\.mp4.*even height and width.*31x32"):
        media.write_video(tmp_path / "odd.mp4", frames, 24)
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        media.write_video(tmp_path / "bad.mp4", torch.zeros(2, 32, 32), 24)
    with pytest.raises(ValueError, match="audio_sample_rate"):
        media.write_video(tmp_path / "a.mp4", torch.zeros(1, 32, 32, 3), 24, audio=torch.zeros(100))
    with pytest.raises(ValueError, match=r"C in \(1, 2\)"):
        media.write_audio(tmp_path / "a.wav", torch.zeros(3, 100), SAMPLE_RATE)
    with pytest.raises(ValueError, match="expected a .png path"):
        media.write_image(tmp_path / "a.jpg", torch.zeros(4, 4, 3, dtype=torch.uint8))
    assert not any(tmp_path.iterdir())
