"""Conditions of one validation / inference sample (official ltx-trainer 1.2 validation ``conditions``).

A sample is generated from its prompt plus any of these (torch-free, so configs can hold them):

* ``first_frame`` (video): an image, or a video's first frame, as latent frame 0;
* ``prefix`` / ``suffix``: video: the first ``num_frames`` pixel frames of a clip (``(n - 1) % 8 == 0``) held at
  the start, or its last ``num_frames // 8`` latent frames at the end (``n % 8 == 0``); audio: the first / last
  ``duration`` seconds of an audio file;
* ``spatial_crop`` (video): the pixel region ``(y1, x1, y2, x2)`` of a clip held on every frame (the training
  rule: corners floor-divided by 32 and clamped);
* ``mask``: a clip (or audio) plus a mask file; where the mask is > 0.5 the clip is held (video masks grouped over
  frames like the causal VAE, see :func:`ltxf.prep.process.video_mask_latent`);
* ``reference`` (IC-LoRA): a video at ``1 / downscale_factor`` of the size keeping frame 0 then every
  ``temporal_scale_factor``-th frame, or an audio file, appended after the target with its own positions;
* ``video_to_audio`` / ``audio_to_video``: the other modality is given (frozen, sigma 0) from a file, and muxed
  into the output.

Which modality a condition acts on is ``modality`` (prefix, suffix, mask and reference take either; the others
are fixed). Durations, frame counts and regions are checked here; the media are read when the sample is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SampleConditionType = Literal["first_frame", "prefix", "suffix", "spatial_crop", "mask", "reference",
                              "video_to_audio", "audio_to_video"]
SAMPLE_CONDITION_TYPES: tuple[str, ...] = ("first_frame", "prefix", "suffix", "spatial_crop", "mask", "reference",
                                           "video_to_audio", "audio_to_video")
_FIXED_MODALITY = {"first_frame": "video", "spatial_crop": "video", "video_to_audio": "video",
                   "audio_to_video": "audio"}


@dataclass(frozen=True, kw_only=True)
class SampleCondition:
    """One condition of a validation / inference sample (see the module docstring)."""

    type: SampleConditionType
    """first_frame | prefix | suffix | spatial_crop | mask | reference | video_to_audio | audio_to_video."""
    path: Path
    """The media: image or video (video conditions, video_to_audio), audio file or video with a track (audio
    conditions, audio_to_video)."""
    modality: Literal["video", "audio"] = "video"
    """The modality it acts on (prefix, suffix, mask, reference); fixed for the other types."""
    num_frames: int | None = None
    """Video prefix / suffix: pixel frames of ``path`` used."""
    duration: float | None = None
    """Audio prefix / suffix: seconds of ``path`` used (audio_extend: 8 latent steps = 0.32 s, the training
    boundary)."""
    spatial_region: tuple[int, int, int, int] | None = None
    """spatial_crop: pixel region (y1, x1, y2, x2) held on every frame."""
    mask_path: Path | None = None
    """mask: image / video (video) or .pt / sound file (audio); > 0.5 = held."""
    downscale_factor: int = 1
    """Video reference: used at (H / n, W / n), positions scaled by n."""
    temporal_scale_factor: int = 1
    """Video reference: frame 0 then every S-th frame (fps / S), positions shifted back by (S - 1) / fps."""
    strength: float = 1.0
    """How firmly the condition is held (denoise mask 1 - strength on its tokens)."""

    def __post_init__(self) -> None:
        where = f"condition {self.type!r}"
        if self.type not in SAMPLE_CONDITION_TYPES:
            raise ValueError(f"condition type must be one of {list(SAMPLE_CONDITION_TYPES)}, got {self.type!r}")
        object.__setattr__(self, "path", Path(self.path))
        if self.mask_path is not None:
            object.__setattr__(self, "mask_path", Path(self.mask_path))
        fixed = _FIXED_MODALITY.get(self.type)
        if fixed is not None:
            object.__setattr__(self, "modality", fixed)
        if self.modality not in ("video", "audio"):
            raise ValueError(f"{where}: modality must be 'video' or 'audio', got {self.modality!r}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"{where}: strength must be in [0, 1], got {self.strength}")
        video = self.modality == "video"
        if self.type in ("prefix", "suffix"):
            if video:
                n = self.num_frames
                if n is None or n < 1:
                    raise ValueError(f"{where} (video) needs num_frames >= 1, got {n}")
                if self.type == "prefix" and (n - 1) % 8:
                    raise ValueError(f"{where} (video): num_frames must be 8k + 1 (1, 9, 17, ...), got {n}")
                if self.type == "suffix" and n % 8:
                    raise ValueError(f"{where} (video): num_frames must be a multiple of 8 (8, 16, ...), got {n}")
            elif self.duration is None or not self.duration > 0:
                raise ValueError(f"{where} (audio) needs duration > 0 (seconds), got {self.duration}")
        if self.type == "spatial_crop":
            region = self.spatial_region
            if region is None or len(region) != 4 or not (0 <= region[0] < region[2] and 0 <= region[1] < region[3]):
                raise ValueError(f"{where} needs spatial_region (y1, x1, y2, x2) with 0 <= y1 < y2 and 0 <= x1 < x2, "
                                 f"got {region}")
        if self.type == "mask" and self.mask_path is None:
            raise ValueError(f"{where} needs mask_path")
        for name in ("downscale_factor", "temporal_scale_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}: {name} must be an integer >= 1, got {value!r}")
            if value != 1 and not (self.type == "reference" and video):
                raise ValueError(f"{where}: {name} applies to video references only")


def audio_steps_to_seconds(num_steps: int) -> float:
    """Seconds covered by ``num_steps`` audio latent steps (25 per second): a validation audio prefix matching a
    training ``temporal_boundary`` (the official audio_extend config trains 8 steps but validates 1 s = 25)."""
    return num_steps / 25.0
