"""Resolution buckets and the frame transform that fits a clip into one, as the official preprocessing does.

A bucket is ``W x H x F`` (width, height, frames) with W and H multiples of 32 and ``F % 8 == 1`` (the VAE's
32x spatial and causal 8x temporal compression); a bucket list is written ``"768x512x49;512x512x97"``.

Bucket choice (:func:`choose_bucket`): among the buckets with at most as many frames as the clip has, take the
minimum of the key ``(|log(w/h) - log(bw/bh)|, -bucket_frames, -bucket_area)``: closest aspect ratio first, then
the most frames, then the largest area.

Transform (:func:`fit_to_bucket`): keep the first F frames, resize with bicubic (antialiased) interpolation so the
frame covers the bucket with its aspect ratio kept, crop the bucket's size out of it (centre or random), clamp to
[0, 1] and map to [-1, 1]. The result is ``[3, F, H, W]`` float32, the layout the video VAE takes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SPATIAL_MULTIPLE = 32
TEMPORAL_MULTIPLE = 8
# Frames are resized a chunk at a time so a long 1080p clip never needs a full float copy at source size.
_RESIZE_CHUNK = 16

_BUCKET_RE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*$")


@dataclass(frozen=True, kw_only=True)
class Bucket:
    """A target clip size: ``width`` x ``height`` pixels, ``num_frames`` frames."""

    width: int
    height: int
    num_frames: int

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0 or self.width % SPATIAL_MULTIPLE or self.height % SPATIAL_MULTIPLE:
            raise ValueError(
                f"bucket {self}: width and height must be positive multiples of {SPATIAL_MULTIPLE}, got "
                f"{self.width}x{self.height}"
            )
        if self.num_frames < 1 or self.num_frames % TEMPORAL_MULTIPLE != 1:
            raise ValueError(
                f"bucket {self}: the frame count must be {TEMPORAL_MULTIPLE}k + 1 (1, 9, 17, 25, ...), got "
                f"{self.num_frames}"
            )

    def __str__(self) -> str:
        return f"{self.width}x{self.height}x{self.num_frames}"

    @property
    def area(self) -> int:
        return self.width * self.height

    def scaled_down(self, factor: int) -> Bucket:
        """The bucket with width and height divided by ``factor`` (IC-LoRA references at lower resolution).

        Raises ``ValueError`` unless ``factor`` divides both and the results stay multiples of 32.
        """
        if factor < 1:
            raise ValueError(f"the downscale factor must be >= 1, got {factor}")
        if self.width % factor or self.height % factor:
            raise ValueError(f"downscale factor {factor} does not divide bucket {self} (width and height)")
        width, height = self.width // factor, self.height // factor
        if width % SPATIAL_MULTIPLE or height % SPATIAL_MULTIPLE:
            raise ValueError(
                f"bucket {self} scaled down by {factor} is {width}x{height}, which is not a multiple of "
                f"{SPATIAL_MULTIPLE}; choose another factor or bucket"
            )
        return Bucket(width=width, height=height, num_frames=self.num_frames)


def parse_buckets(spec: str) -> tuple[Bucket, ...]:
    """Parse ``"WxHxF;WxHxF"`` into buckets. Malformed or invalid entries raise ``ValueError`` quoting them."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"resolution buckets {spec!r}: expected 'WxHxF' entries separated by ';', e.g. '768x512x49'")
    buckets = []
    for part in spec.split(";"):
        if not part.strip():
            continue
        match = _BUCKET_RE.match(part)
        if match is None:
            raise ValueError(
                f"resolution buckets {spec!r}: entry {part.strip()!r} is not 'WxHxF' (width x height x frames, "
                "e.g. '768x512x49')"
            )
        width, height, num_frames = (int(g) for g in match.groups())
        try:
            buckets.append(Bucket(width=width, height=height, num_frames=num_frames))
        except ValueError as exc:
            raise ValueError(f"resolution buckets {spec!r}: {exc}") from None
    if not buckets:
        raise ValueError(f"resolution buckets {spec!r}: no bucket given")
    if len(set(buckets)) != len(buckets):
        raise ValueError(f"resolution buckets {spec!r}: a bucket is listed twice")
    return tuple(buckets)


def format_buckets(buckets: Sequence[Bucket]) -> str:
    return ";".join(str(b) for b in buckets)


def _bucket_key(width: int, height: int):
    aspect = math.log(width / height)

    def key(bucket: Bucket) -> tuple[float, int, int]:
        return (abs(aspect - math.log(bucket.width / bucket.height)), -bucket.num_frames, -bucket.area)

    return key


def choose_bucket(buckets: Sequence[Bucket], *, width: int, height: int, num_frames: int) -> Bucket | None:
    """The bucket for a clip of ``width`` x ``height`` with ``num_frames`` frames, or None if every bucket needs
    more frames than it has (see the module docstring for the rule)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"clip size must be positive, got {width}x{height}")
    candidates = [b for b in buckets if b.num_frames <= num_frames]
    if not candidates:
        return None
    return min(candidates, key=_bucket_key(width, height))


def cover_size(width: int, height: int, bucket: Bucket) -> tuple[int, int]:
    """``(width, height)`` after scaling a ``width`` x ``height`` frame, aspect kept, to just cover ``bucket``."""
    if width / height > bucket.width / bucket.height:
        return max(bucket.width, int(width * bucket.height / height)), bucket.height
    return bucket.width, max(bucket.height, int(height * bucket.width / width))


def crop_offsets(size: tuple[int, int], bucket: Bucket, anchor: tuple[float, float] | None = None) -> tuple[int, int]:
    """``(top, left)`` of the bucket-sized crop inside a ``(width, height)`` frame.

    ``anchor`` None centres the crop (``extra // 2``, as the official tools); ``(u, v)`` in ``[0, 1)`` places it at
    ``floor(u * (extra_h + 1))``, ``floor(v * (extra_w + 1))``, which is uniform over every offset when ``u, v`` are
    uniform. One anchor places a target and its (differently sized) reference at the same relative position.
    """
    width, height = size
    extra_h, extra_w = height - bucket.height, width - bucket.width
    if anchor is None:
        return extra_h // 2, extra_w // 2
    u, v = anchor
    if not (0.0 <= u < 1.0 and 0.0 <= v < 1.0):
        raise ValueError(f"crop anchor must be in [0, 1), got {anchor}")
    return int(u * (extra_h + 1)), int(v * (extra_w + 1))


def fit_to_bucket(
    frames: torch.Tensor,
    bucket: Bucket,
    *,
    anchor: tuple[float, float] | None = None,
) -> torch.Tensor:
    """uint8 frames ``[F, H, W, 3]`` -> float32 ``[3, bucket F, bucket H, bucket W]`` in ``[-1, 1]``.

    Keeps the first ``bucket.num_frames`` frames (raises ``ValueError`` if there are fewer), resizes them bicubically
    with antialiasing to cover the bucket, crops (centred, or at ``anchor``: see :func:`crop_offsets`; one offset
    for the whole clip) and normalises. Runs on the frames' device.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3], got shape {tuple(frames.shape)}")
    num_frames, height, width, _ = frames.shape
    if num_frames < bucket.num_frames:
        raise ValueError(f"the clip has {num_frames} frames, bucket {bucket} needs {bucket.num_frames}")
    new_width, new_height = cover_size(width, height, bucket)
    top, left = crop_offsets((new_width, new_height), bucket, anchor)
    chunks = []
    for start in range(0, bucket.num_frames, _RESIZE_CHUNK):
        chunk = frames[start : min(start + _RESIZE_CHUNK, bucket.num_frames)]
        chunk_FCHW = chunk.permute(0, 3, 1, 2).float().div_(255.0)
        if (new_height, new_width) != (height, width):
            chunk_FCHW = F.interpolate(
                chunk_FCHW, size=(new_height, new_width), mode="bicubic", antialias=True, align_corners=False
            )
        chunk_FCHW = chunk_FCHW[:, :, top : top + bucket.height, left : left + bucket.width]
        chunks.append(chunk_FCHW.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0))
    return torch.cat(chunks).permute(1, 0, 2, 3).contiguous()
