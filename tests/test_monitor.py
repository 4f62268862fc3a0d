"""Monitor: TensorBoard event files read back with TensorBoard's own EventAccumulator, console progress line and
ETA with an injected clock, and the preprocessing progress helper."""

from __future__ import annotations

import io
import json
import logging
import wave

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ltxf.monitor import Monitor, StepTimer, format_duration, format_progress, to_floats, track


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _accumulator(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "audio": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_scalars_round_trip_through_event_files(tmp_path):
    clock = FakeClock()
    monitor = Monitor(tmp_path, rank=0, total_steps=100, clock=clock)
    written = {}
    for step in (1, 2, 3):
        metrics = {
            "loss/train": torch.tensor(0.5 / step),
            "loss/sigma_0.00-0.25": torch.tensor([0.25 * step], dtype=torch.float64),
            "lr": 1e-4 * step,
            "grad/global_norm": torch.tensor(step, dtype=torch.int64),
        }
        written[step] = monitor.log_scalars(step, metrics, include_timing=False)
    monitor.close()

    acc = _accumulator(tmp_path)
    assert set(acc.Tags()["scalars"]) == {"loss/train", "loss/sigma_0.00-0.25", "lr", "grad/global_norm"}
    for tag, expected in {
        "loss/train": [0.5, 0.25, 0.5 / 3],
        "loss/sigma_0.00-0.25": [0.25, 0.5, 0.75],
        "lr": [1e-4, 2e-4, 3e-4],
        "grad/global_norm": [1.0, 2.0, 3.0],
    }.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3]
        # event files store scalars as float32
        np.testing.assert_allclose([e.value for e in events], expected, rtol=1e-6)
    assert written[2]["loss/train"] == pytest.approx(0.25)


def test_timing_metrics_are_added_and_exclude_the_first_step(tmp_path):
    clock = FakeClock()
    monitor = Monitor(tmp_path, rank=0, total_steps=10, clock=clock)
    monitor.end_step(1, num_samples=4, num_tokens=4000)  # ends the warm-up step: starts the clock only
    for step in (2, 3):
        clock.advance(2.0)
        monitor.end_step(step, num_samples=4, num_tokens=4000)
    values = monitor.log_scalars(3, {"loss/train": 1.0})
    monitor.close()
    assert values["time/step_s"] == pytest.approx(2.0)
    assert values["throughput/samples_per_s"] == pytest.approx(2.0)
    assert values["throughput/tokens_per_s"] == pytest.approx(2000.0)
    acc = _accumulator(tmp_path)
    assert [e.value for e in acc.Scalars("time/step_s")] == [pytest.approx(2.0)]


def test_image_audio_text_video_round_trip(tmp_path):
    monitor = Monitor(tmp_path, rank=0, total_steps=10)
    gen = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (6, 8, 3), dtype=torch.uint8, generator=gen)
    monitor.log_image("samples/first_frame", image, step=5)

    sample_rate = 16000
    t = torch.arange(800) / sample_rate
    stereo = torch.stack([0.5 * torch.sin(2 * torch.pi * 440 * t), 1.5 * torch.cos(2 * torch.pi * 220 * t)])
    monitor.log_audio("samples/audio", stereo, sample_rate, step=5)

    monitor.log_text("config", "lr: **1e-4**", step=0)
    monitor.log_config({"optim": {"learning_rate": 1e-4, "betas": (0.9, 0.99)}, "output_dir": "runs/a"})

    # Each frame a different solid colour, so the GIF palette is exact.
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], dtype=np.uint8)
    frames = np.broadcast_to(colours[:, None, None, :], (4, 6, 10, 3)).copy()
    monitor.log_video("samples/video", frames, fps=25, step=5)
    monitor.close()

    acc = _accumulator(tmp_path)
    (img_event,) = acc.Images("samples/first_frame")
    assert img_event.step == 5
    decoded = np.asarray(Image.open(io.BytesIO(img_event.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(decoded, image.numpy())

    (audio_event,) = acc.Audio("samples/audio")
    assert (audio_event.step, audio_event.sample_rate, audio_event.content_type) == (5, sample_rate, "audio/wav")
    with wave.open(io.BytesIO(audio_event.encoded_audio_string)) as w:
        assert (w.getnchannels(), w.getframerate(), w.getnframes()) == (2, sample_rate, 800)
        pcm = np.frombuffer(w.readframes(800), dtype="<i2").reshape(800, 2).T
    expected = np.round(np.clip(stereo.numpy(), -1, 1) * 32767).astype(np.int16)
    np.testing.assert_array_equal(pcm, expected)  # second channel exceeds 1 and is clipped

    text_events = acc.Tensors("config/text_summary")
    assert text_events[0].tensor_proto.string_val[0].decode() == "lr: **1e-4**"
    (config_event,) = acc.Tensors("config_resolved/text_summary")
    config_text = config_event.tensor_proto.string_val[0].decode()
    assert all(line.startswith("    ") for line in config_text.splitlines())  # a markdown code block
    assert json.loads(config_text) == {"optim": {"betas": [0.9, 0.99], "learning_rate": 1e-4}, "output_dir": "runs/a"}

    (video_event,) = acc.Images("samples/video")
    gif = Image.open(io.BytesIO(video_event.encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames == 4 and gif.size == (10, 6)
    for index in range(4):
        gif.seek(index)
        assert gif.info["duration"] == 40
        np.testing.assert_array_equal(np.asarray(gif.convert("RGB")), frames[index])


def test_log_video_rejects_bad_frames(tmp_path):
    monitor = Monitor(tmp_path, rank=0, total_steps=10)
    with pytest.raises(ValueError, match=r"uint8 frames \[F, H, W, 3\]"):
        monitor.log_video("v", np.zeros((4, 6, 10, 3), dtype=np.float32), fps=24, step=0)
    with pytest.raises(ValueError, match="must be a scalar"):
        monitor.log_scalars(0, {"loss/train": torch.zeros(2)})
    monitor.close()


def test_nonzero_rank_does_nothing(tmp_path):
    monitor = Monitor(tmp_path / "tb", rank=1, total_steps=10)
    monitor.end_step(1, num_samples=1)
    assert monitor.log_scalars(1, {"loss/train": torch.tensor(1.0)}) == {}
    monitor.log_image("i", np.zeros((2, 2, 3), dtype=np.uint8), 1)
    monitor.log_audio("a", np.zeros(10), 8000, 1)
    monitor.log_video("v", np.zeros((2, 2, 2, 3), dtype=np.uint8), 24, 1)
    monitor.log_text("t", "x", 1)
    monitor.close()
    assert not (tmp_path / "tb").exists()


def test_purge_step_hides_events_of_an_interrupted_run(tmp_path):
    first = Monitor(tmp_path, rank=0, total_steps=10)
    for step in range(1, 6):
        first.log_scalars(step, {"loss/train": 1.0}, include_timing=False)
    first.close()
    resumed = Monitor(tmp_path, rank=0, total_steps=10, purge_step=4)
    for step in range(4, 7):
        resumed.log_scalars(step, {"loss/train": 2.0}, include_timing=False)
    resumed.close()
    events = _accumulator(tmp_path).Scalars("loss/train")
    assert [(e.step, e.value) for e in events] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0), (5, 2.0), (6, 2.0)]


def test_progress_line_format_and_eta():
    line = format_progress(120, 2000, loss=0.412, lr=1e-4, step_s=1.23, samples_per_s=3.2)
    # ETA = (2000 - 120) * 1.23 s = 2312.4 s
    assert line == "step 120/2000 (6%) | loss 0.412 | lr 1.0e-04 | 1.23 s/step | 3.2 samples/s | ETA 38m32s"
    assert format_progress(1, 10) == "step 1/10 (10%) | ETA --"
    assert format_duration(23) == "0m23s"
    assert format_duration(3723) == "1h02m03s"
    assert format_duration(2 * 86400 + 3 * 3600 + 4 * 60 + 5) == "2d03h04m"


def test_step_timer_moving_average_excludes_warmup_and_pauses():
    clock = FakeClock()
    timer = StepTimer(window=3, clock=clock)
    clock.advance(60.0)  # model build and compile before the first step ends
    timer.end_step(num_samples=2)
    assert timer.mean_step_s is None and timer.metrics() == {}
    for seconds in (1.0, 2.0, 3.0, 4.0):
        clock.advance(seconds)
        timer.end_step(num_samples=2)
    assert timer.mean_step_s == pytest.approx(3.0)  # window of 3: (2 + 3 + 4) / 3
    assert timer.samples_per_s == pytest.approx(6 / 9)
    assert timer.tokens_per_s is None
    clock.advance(100.0)  # a checkpoint save
    timer.restart()
    clock.advance(5.0)
    timer.end_step(num_samples=2)
    assert timer.mean_step_s == pytest.approx((3 + 4 + 5) / 3)


def test_console_line_rate_limit_and_eta(tmp_path, caplog):
    clock = FakeClock()
    monitor = Monitor(tmp_path, rank=0, total_steps=20, console_every_s=5.0, timing_window=10, clock=clock)
    caplog.set_level(logging.INFO, logger="ltxf.monitor")
    monitor.end_step(1, num_samples=2)
    monitor.log_scalars(1, {"loss/train": torch.tensor(0.5), "lr": 1e-4})
    for step in range(2, 21):
        clock.advance(2.0)
        monitor.end_step(step, num_samples=2)
        monitor.log_scalars(step, {"loss/train": torch.tensor(0.25), "lr": 2e-4})
    monitor.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "ltxf.monitor"]
    # first logged step, then once per >= 5 s (every 3rd step at 2 s/step), and always the last step
    steps = [int(line.split()[1].split("/")[0]) for line in lines]
    assert steps == [1, 4, 7, 10, 13, 16, 19, 20]
    assert lines[0] == "step 1/20 (5%) | loss 0.5 | lr 1.0e-04 | ETA --"
    # at step 10, nine steps of 2 s were timed: ETA = 10 steps * 2 s
    assert lines[3] == "step 10/20 (50%) | loss 0.25 | lr 2.0e-04 | 2 s/step | 1 samples/s | ETA 0m20s"
    assert lines[-1].endswith("| ETA 0m00s")


def test_console_every_steps(tmp_path, caplog):
    monitor = Monitor(tmp_path, rank=0, total_steps=10, console_every_steps=4, console_every_s=None)
    caplog.set_level(logging.INFO, logger="ltxf.monitor")
    for step in range(1, 11):
        monitor.log_scalars(step, {"loss": 1.0}, include_timing=False)
    monitor.close()
    steps = [int(r.getMessage().split()[1].split("/")[0]) for r in caplog.records if r.name == "ltxf.monitor"]
    assert steps == [1, 5, 9, 10]


def test_to_floats_keeps_order_and_types():
    metrics = {"b": torch.tensor(2.5, dtype=torch.bfloat16), "a": 3, "c": torch.tensor([7], dtype=torch.int32)}
    values = to_floats(metrics)
    assert list(values) == ["b", "a", "c"] and values == {"b": 2.5, "a": 3.0, "c": 7.0}
    with pytest.raises(ValueError, match="metric 'x'"):
        to_floats({"x": "fast"})


def test_track_logs_at_intervals_with_eta(caplog):
    clock = FakeClock()
    log = logging.getLogger("ltxf.test_track")
    caplog.set_level(logging.INFO, logger="ltxf.test_track")
    seen = []
    for item in track(range(40), desc="encode", every_s=5.0, clock=clock, log=log):
        clock.advance(0.5)  # 2 items per second
        seen.append(item)
    assert seen == list(range(40))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "encode 10/40 (25%) 2 it/s ETA 0m15s"
    assert lines[1] == "encode 20/40 (50%) 2 it/s ETA 0m10s"
    assert lines[-1] == "encode 40/40 done, 2 it/s in 0m20s"
    assert len(lines) == 5  # at 10, 20, 30, 40 items and the final line


def test_track_without_total(caplog):
    clock = FakeClock()
    log = logging.getLogger("ltxf.test_track2")
    caplog.set_level(logging.INFO, logger="ltxf.test_track2")

    def items():
        for i in range(3):
            clock.advance(4.0)
            yield i

    assert list(track(items(), desc="scan", every_s=1.0, clock=clock, log=log)) == [0, 1, 2]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["scan 1 0.25 it/s", "scan 2 0.25 it/s", "scan 3 0.25 it/s", "scan 3 done, 0.25 it/s in 0m12s"]
