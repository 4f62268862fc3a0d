"""Run monitoring: TensorBoard event files and a console progress line, on rank 0 only.

Typical loop::

    monitor = Monitor(run_dir / "tensorboard", rank=rank, total_steps=cfg.optim.steps, purge_step=start_step)
    for step in range(start_step + 1, total + 1):
        state, metrics = train_step(state, batch)
        monitor.end_step(step, num_samples=global_batch)     # host clock only, no device sync
        window.add(metrics)
        if log_due(step, cfg.log.every, total):
            monitor.log_scalars(step, window.summarize())    # one collective, one host sync
        if saving:
            save_checkpoint(...)
            monitor.restart_timer()                          # keep the save out of the step-time average

Step time is the wall time between consecutive :meth:`Monitor.end_step` calls, so it includes data loading and
logging; the first step after start (or after :meth:`Monitor.restart_timer`) is not timed, because it includes
compilation and warm-up. The ETA uses the mean over the last ``timing_window`` timed steps.

Videos: ``SummaryWriter.add_video`` needs moviepy, which ltxf does not depend on. :meth:`Monitor.log_video`
encodes an animated GIF with Pillow (already required by tensorboard) and writes it as an image summary, which
is what ``add_video`` produces too; the TensorBoard *Images* tab plays it. GIF frame times are multiples of
10 ms, so 24 fps plays at 25 fps.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import math
import time
import wave
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
T = TypeVar("T")


# -------------------------------------------------------------------------------------------------------------
# Formatting


def format_duration(seconds: float) -> str:
    """``38m12s``, ``1h02m03s``, ``2d03h04m``; ``0m00s`` for negative or tiny values, ``--`` if unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "--"
    total = max(0, int(round(seconds)))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s"


def format_progress(
    step: int,
    total_steps: int,
    *,
    loss: float | None = None,
    lr: float | None = None,
    step_s: float | None = None,
    samples_per_s: float | None = None,
) -> str:
    """The console progress line:
    ``step 120/2000 (6%) | loss 0.412 | lr 1.0e-04 | 1.23 s/step | 3.2 samples/s | ETA 38m12s``.

    Parts whose value is ``None`` are left out; the ETA is ``(total_steps - step) * step_s``.
    """
    percent = int(100 * step / total_steps) if total_steps > 0 else 100
    parts = [f"step {step}/{total_steps} ({percent}%)"]
    if loss is not None:
        parts.append(f"loss {loss:.4g}")
    if lr is not None:
        parts.append(f"lr {lr:.1e}")
    if step_s is not None:
        parts.append(f"{step_s:.3g} s/step")
    if samples_per_s is not None:
        parts.append(f"{samples_per_s:.3g} samples/s")
    eta = (total_steps - step) * step_s if step_s is not None else None
    parts.append(f"ETA {format_duration(eta)}")
    return " | ".join(parts)


# -------------------------------------------------------------------------------------------------------------
# Step timing


class StepTimer:
    """Moving averages of wall time per step and of throughput, from the gaps between :meth:`end_step` calls.

    The first call after construction or :meth:`restart` only starts the clock (that step is not timed).
    """

    def __init__(self, *, window: int = 50, clock: Clock = time.perf_counter) -> None:
        if window < 1:
            raise ValueError(f"StepTimer: window must be >= 1, got {window}")
        self._clock = clock
        self._last: float | None = None
        self._durations: collections.deque[float] = collections.deque(maxlen=window)
        self._samples: collections.deque[float | None] = collections.deque(maxlen=window)
        self._tokens: collections.deque[float | None] = collections.deque(maxlen=window)
        self.last_step_s: float | None = None

    def end_step(self, *, num_samples: float | None = None, num_tokens: float | None = None) -> None:
        """Mark the end of a step that processed ``num_samples`` samples / ``num_tokens`` tokens (all ranks)."""
        now = self._clock()
        if self._last is not None:
            self.last_step_s = now - self._last
            self._durations.append(self.last_step_s)
            self._samples.append(num_samples)
            self._tokens.append(num_tokens)
        self._last = now

    def restart(self) -> None:
        """Forget the time since the last step (a checkpoint save, validation); the next step is timed afresh."""
        self._last = self._clock()

    @property
    def num_timed(self) -> int:
        return len(self._durations)

    @property
    def mean_step_s(self) -> float | None:
        return sum(self._durations) / len(self._durations) if self._durations else None

    def _rate(self, counts: Iterable[float | None]) -> float | None:
        counts = list(counts)
        if not counts or any(c is None for c in counts):
            return None
        elapsed = sum(self._durations)
        return sum(counts) / elapsed if elapsed > 0 else None

    @property
    def samples_per_s(self) -> float | None:
        return self._rate(self._samples)

    @property
    def tokens_per_s(self) -> float | None:
        return self._rate(self._tokens)

    def metrics(self) -> dict[str, float]:
        """``time/step_s`` and ``throughput/{samples,tokens}_per_s`` where known."""
        out: dict[str, float] = {}
        if self.mean_step_s is not None:
            out["time/step_s"] = self.mean_step_s
        if self.samples_per_s is not None:
            out["throughput/samples_per_s"] = self.samples_per_s
        if self.tokens_per_s is not None:
            out["throughput/tokens_per_s"] = self.tokens_per_s
        return out


SIGMA_BUCKET_NAMES = ("0.00-0.25", "0.25-0.50", "0.50-0.75", "0.75-1.00")
"""Loss is also reported per sigma bucket: [0, .25), [.25, .5), [.5, .75), [.75, 1]."""

_ROW_MEANS = (("loss/train", "loss"), ("loss/video", "video_loss"), ("loss/audio", "audio_loss"),
              ("train/skipped_steps", "skipped"))


def log_due(step: int, every: int, last_step: int) -> bool:
    """Whether a logging window ends at ``step``: every multiple of ``every``, and the last step. Windows depend on
    nothing else (not on where a run started), so a resumed run logs the same windows as an uninterrupted one."""
    return step % every == 0 or step == last_step


class LogWindow:
    """The training metrics of the steps since the last log.

    :meth:`add` keeps each step's device tensors (no host sync). They become host rows, summed across processes
    in one collective, when the window is summarised (:meth:`summarize`) or checkpointed (:meth:`state_dict`):
    a run resumed from a checkpoint taken mid-window restores those rows (:meth:`load_state_dict`) and writes
    exactly the values the uninterrupted run writes. Means are taken over steps in float64 on the host, in
    step order, so the split of a window between runs changes nothing.
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.rows: list[list[float]] = []
        self._pending: list[Mapping[str, torch.Tensor | float]] = []
        self._last: Mapping[str, torch.Tensor | float] | None = None

    def add(self, metrics: Mapping[str, torch.Tensor | float]) -> None:
        self._pending.append(metrics)

    def _flush(self) -> None:
        """Move the pending steps into rows: [means..., bucket loss sums..., bucket counts...] summed over ranks."""
        from ltxf.parallel import all_reduce_sum

        if not self._pending:
            return
        rows = torch.stack([torch.cat([torch.stack([torch.as_tensor(m[key]).float() for _, key in _ROW_MEANS]),
                                       m["sigma_bucket_loss_sum"].float(), m["sigma_bucket_count"].float()])
                            for m in self._pending])
        self.rows.extend(all_reduce_sum(rows).tolist())
        self._last = self._pending[-1]
        self._pending = []

    def state_dict(self) -> list[list[float]]:
        """The window's rows so far (JSON-able; a collective with several processes)."""
        self._flush()
        return [list(row) for row in self.rows]

    def load_state_dict(self, rows: list[list[float]]) -> None:
        self._pending = []
        self.rows = [[float(v) for v in row] for row in rows]

    def summarize(self) -> dict[str, float]:
        """The window's scalars (means over its steps and processes; the gradient norm and learning rate of its
        last step), and an empty window after it (a collective with several processes)."""
        self._flush()
        num_means, num_buckets = len(_ROW_MEANS), len(SIGMA_BUCKET_NAMES)
        columns = list(zip(*self.rows, strict=True))
        out = {tag: math.fsum(columns[i]) / len(self.rows) / self.world_size for i, (tag, _) in enumerate(_ROW_MEANS)}
        for i, name in enumerate(SIGMA_BUCKET_NAMES):
            count = math.fsum(columns[num_means + num_buckets + i])
            if count > 0:
                out[f"loss/sigma_{name}"] = math.fsum(columns[num_means + i]) / count
        if self._last is not None:
            out["grad/global_norm"] = float(self._last["grad_norm"])
            if "lr" in self._last:
                out["lr"] = float(self._last["lr"])
        self.rows = []
        return out


def memory_metrics(device: torch.device | str | None = None) -> dict[str, float]:
    """Peak memory: the process's peak resident set (``memory/host_peak_rss_gib``, every platform with
    ``resource``) and, on CUDA, peak accelerator memory since the last reset (``memory/peak_gib``,
    ``memory/peak_reserved_gib``)."""
    gib = float(2**30)
    out: dict[str, float] = {}
    try:
        import resource

        # ru_maxrss is in KiB on Linux.
        out["memory/host_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib
    except ImportError:  # pragma: no cover - non-POSIX
        pass
    if not torch.cuda.is_available():
        return out
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        return out
    out["memory/peak_gib"] = torch.cuda.max_memory_allocated(device) / gib
    out["memory/peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / gib
    return out


def to_floats(metrics: Mapping[str, float | int | torch.Tensor]) -> dict[str, float]:
    """Convert metric values to Python floats with one device-to-host copy per device (not one per tensor).

    Tensors must hold one element.
    """
    out: dict[str, float] = {}
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"metric '{key}' must be a scalar, got a tensor of shape {tuple(value.shape)}")
            by_device.setdefault(value.device, []).append((key, value))
        elif isinstance(value, (int, float, np.floating, np.integer)):
            out[key] = float(value)
        else:
            raise ValueError(f"metric '{key}' must be a number or a one-element tensor, got {type(value).__name__}")
    for items in by_device.values():
        stacked = torch.stack([v.detach().reshape(()).to(torch.float64) for _, v in items])
        for (key, _), value in zip(items, stacked.cpu().tolist(), strict=True):
            out[key] = value
    return {key: out[key] for key in metrics}


# -------------------------------------------------------------------------------------------------------------
# Media encoding


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def encode_gif(frames_FHWC: np.ndarray, fps: float) -> bytes:
    """Animated GIF bytes of ``[F, H, W, 3]`` uint8 frames (looping)."""
    from PIL import Image  # tensorboard depends on Pillow

    images = [Image.fromarray(frame, mode="RGB") for frame in frames_FHWC]
    buf = io.BytesIO()
    duration_ms = max(10, int(round(1000.0 / fps)))
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return buf.getvalue()


def encode_wav(waveform_CL: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM WAV bytes of a ``[channels, samples]`` float waveform in [-1, 1] (values outside are clipped)."""
    pcm_LC = np.round(np.clip(waveform_CL, -1.0, 1.0).T * 32767.0).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(waveform_CL.shape[0])
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(np.ascontiguousarray(pcm_LC).tobytes())
    return buf.getvalue()


# -------------------------------------------------------------------------------------------------------------
# Monitor


class Monitor:
    """TensorBoard writer and console progress for a training run. Every method is a no-op where disabled
    (by default on every rank but 0), so the loop calls it unconditionally.

    Args:
        log_dir: TensorBoard event directory.
        rank: this process's rank.
        total_steps: the last step of the run (for percentage and ETA).
        enabled: override the default ``rank == 0``.
        console_every_steps / console_every_s: print the progress line when at least this many steps or seconds
            passed since the last one (either suffices; both ``None`` prints on every :meth:`log_scalars`). The
            first logged step and ``total_steps`` always print.
        timing_window: number of recent steps in the step-time moving average.
        purge_step: when resuming at this step, TensorBoard hides events at or after it that an interrupted run
            wrote.
        clock: seconds as a float (tests inject a fake one).
    """

    def __init__(
        self,
        log_dir: str | Path,
        *,
        rank: int,
        total_steps: int,
        enabled: bool | None = None,
        console_every_steps: int | None = None,
        console_every_s: float | None = 10.0,
        timing_window: int = 50,
        purge_step: int | None = None,
        clock: Clock = time.perf_counter,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"Monitor: total_steps must be >= 1, got {total_steps}")
        self.enabled = (rank == 0) if enabled is None else enabled
        self.total_steps = total_steps
        self.console_every_steps = console_every_steps
        self.console_every_s = console_every_s
        self.timer = StepTimer(window=timing_window, clock=clock)
        self._clock = clock
        self._last_console: tuple[int, float] | None = None
        self._writer = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    # -- timing ------------------------------------------------------------------------------------------------

    def end_step(self, step: int, *, num_samples: float | None = None, num_tokens: float | None = None) -> None:
        """Mark the end of optimizer step ``step`` (host clock only; never syncs the device)."""
        if self.enabled:
            self.timer.end_step(num_samples=num_samples, num_tokens=num_tokens)

    def restart_timer(self) -> None:
        """Exclude the time since the last step (checkpointing, validation) from the step-time average."""
        if self.enabled:
            self.timer.restart()

    # -- scalars and console -----------------------------------------------------------------------------------

    def log_scalars(
        self, step: int, metrics: Mapping[str, float | torch.Tensor], *, include_timing: bool = True
    ) -> dict[str, float]:
        """Write scalars under their (slash-namespaced) keys and print the progress line when it is due.

        Tensors are converted with one host sync. With ``include_timing`` the timer's ``time/step_s`` and
        ``throughput/*`` are added unless ``metrics`` has them. The console line reads ``loss/train`` (or
        ``loss``) and ``lr``. Returns the values written (empty where disabled).
        """
        if not self.enabled:
            return {}
        values = to_floats(metrics)
        if include_timing:
            for key, value in self.timer.metrics().items():
                values.setdefault(key, value)
        for key, value in values.items():
            self._writer.add_scalar(key, value, global_step=step)
        if self._console_due(step):
            self._last_console = (step, self._clock())
            logger.info(self.progress_line(step, values))
        return values

    def progress_line(self, step: int, values: Mapping[str, float]) -> str:
        """The console line for ``step`` from already-converted values and the timer."""
        loss = values.get("loss/train", values.get("loss"))
        return format_progress(
            step,
            self.total_steps,
            loss=loss,
            lr=values.get("lr"),
            step_s=self.timer.mean_step_s,
            samples_per_s=self.timer.samples_per_s,
        )

    def _console_due(self, step: int) -> bool:
        if self._last_console is None or step >= self.total_steps:
            return True
        if self.console_every_steps is None and self.console_every_s is None:
            return True
        last_step, last_time = self._last_console
        if self.console_every_steps is not None and step - last_step >= self.console_every_steps:
            return True
        return self.console_every_s is not None and self._clock() - last_time >= self.console_every_s

    # -- media and text ----------------------------------------------------------------------------------------

    def log_image(self, tag: str, image: torch.Tensor | np.ndarray, step: int) -> None:
        """An ``[H, W, 3]`` (or ``[H, W]``) image: uint8, or float in [0, 1]."""
        if not self.enabled:
            return
        array = _as_numpy(image)
        if array.ndim == 2:
            array = array[..., None].repeat(3, axis=-1)
        if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
            raise ValueError(f"log_image('{tag}'): expected [H, W, 3] or [H, W], got shape {array.shape}")
        self._writer.add_image(tag, array, global_step=step, dataformats="HWC")

    def log_video(self, tag: str, frames: torch.Tensor | np.ndarray, fps: float, step: int) -> None:
        """An ``[F, H, W, 3]`` uint8 clip, written as an animated GIF image summary (see the module docstring)."""
        if not self.enabled:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        array = _as_numpy(frames)
        if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
            raise ValueError(
                f"log_video('{tag}'): expected uint8 frames [F, H, W, 3], got {array.dtype} {array.shape}"
            )
        if not fps > 0:
            raise ValueError(f"log_video('{tag}'): fps must be > 0, got {fps}")
        image = Summary.Image(
            height=array.shape[1], width=array.shape[2], colorspace=3, encoded_image_string=encode_gif(array, fps)
        )
        self._add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def log_audio(self, tag: str, waveform: torch.Tensor | np.ndarray, sample_rate: int, step: int) -> None:
        """A float waveform ``[samples]`` or ``[channels, samples]`` in [-1, 1], as 16-bit WAV (clipped)."""
        if not self.enabled:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        array = _as_numpy(waveform).astype(np.float32)
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2 or array.shape[0] > 16:
            raise ValueError(f"log_audio('{tag}'): expected [samples] or [channels, samples], got {array.shape}")
        if sample_rate <= 0:
            raise ValueError(f"log_audio('{tag}'): sample_rate must be > 0, got {sample_rate}")
        audio = Summary.Audio(
            sample_rate=float(sample_rate),
            num_channels=array.shape[0],
            length_frames=array.shape[1],
            encoded_audio_string=encode_wav(array, sample_rate),
            content_type="audio/wav",
        )
        self._add_summary(Summary(value=[Summary.Value(tag=tag, audio=audio)]), step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        """Markdown text (TensorBoard *Text* tab)."""
        if self.enabled:
            self._writer.add_text(tag, text, global_step=step)

    def log_config(self, config: Mapping, step: int = 0, tag: str = "config_resolved") -> None:
        """The resolved config as an indented JSON code block."""
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        self.log_text(tag, "\n".join("    " + line for line in text.splitlines()), step)

    def _add_summary(self, summary, step: int) -> None:
        # SummaryWriter has no public method for a prebuilt Summary proto; its own add_* methods use this one.
        self._writer._get_file_writer().add_summary(summary, step)

    # -- lifetime ----------------------------------------------------------------------------------------------

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.enabled = False

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -------------------------------------------------------------------------------------------------------------
# Progress for long non-training work (preprocessing, export)


class Progress:
    """Logs ``desc 12/40 (30%) 1.2 it/s ETA 0m23s`` at most every ``every_s`` seconds, and a final line.

    The rate is the overall mean since construction. Without ``total`` the percentage and ETA are left out.
    """

    def __init__(
        self,
        total: int | None = None,
        desc: str = "",
        *,
        every_s: float = 10.0,
        clock: Clock = time.monotonic,
        log: logging.Logger | None = None,
        enabled: bool = True,
    ) -> None:
        self.total = total
        self.desc = desc
        self.every_s = every_s
        self.count = 0
        self.enabled = enabled
        self._clock = clock
        self._log = log or logger
        self._start = clock()
        self._last_log = self._start

    @property
    def rate(self) -> float | None:
        elapsed = self._clock() - self._start
        return self.count / elapsed if elapsed > 0 and self.count else None

    def line(self) -> str:
        parts = [f"{self.desc} {self.count}" if self.desc else str(self.count)]
        if self.total:
            parts[0] += f"/{self.total} ({int(100 * self.count / self.total)}%)"
        rate = self.rate
        parts.append(f"{rate:.3g} it/s" if rate is not None else "-- it/s")
        if self.total:
            remaining = (self.total - self.count) / rate if rate else None
            parts.append(f"ETA {format_duration(remaining)}")
        return " ".join(parts)

    def advance(self, n: int = 1) -> None:
        self.count += n
        now = self._clock()
        if self.enabled and now - self._last_log >= self.every_s:
            self._last_log = now
            self._log.info(self.line())

    def finish(self) -> None:
        if not self.enabled:
            return
        rate = self.rate
        total = f"/{self.total}" if self.total else ""
        rate_text = f"{rate:.3g} it/s" if rate is not None else "-- it/s"
        head = f"{self.desc} " if self.desc else ""
        self._log.info(f"{head}{self.count}{total} done, {rate_text} in {format_duration(self._clock() - self._start)}")


def track(
    iterable: Iterable[T],
    total: int | None = None,
    desc: str = "",
    *,
    every_s: float = 10.0,
    clock: Clock = time.monotonic,
    log: logging.Logger | None = None,
    enabled: bool = True,
) -> Iterator[T]:
    """Iterate ``iterable`` and log progress lines (see :class:`Progress`); ``total`` defaults to ``len()``."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    progress = Progress(total, desc, every_s=every_s, clock=clock, log=log, enabled=enabled)
    for item in iterable:
        yield item
        progress.advance()
    progress.finish()
