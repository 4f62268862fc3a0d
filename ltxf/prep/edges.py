"""Canny-style edge maps in torch, and IC-LoRA reference videos made from them.

:func:`canny_edges` follows the classic pipeline: grayscale (ITU-R 601 luma, as OpenCV's RGB2GRAY) -> Gaussian
blur -> 3x3 Sobel gradients -> non-maximum suppression along the gradient direction (quantised to 0/45/90/135
degrees) -> double threshold -> hysteresis. Gradient magnitude is the L1 norm ``|gx| + |gy|`` on the 0-255 scale,
OpenCV's default, so the official thresholds 100 / 200 mean what they mean there. Hysteresis keeps weak edge
pixels connected (8-neighbourhood) to a strong one, by dilating the strong set inside the weak set until it stops
growing.

:func:`compute_references` writes ``<stem>_reference<ext>`` next to each media file of a dataset (a 3-channel
edge video at the source fps; a PNG for images) and records it in the dataset file's reference column.

Shape legend: B frames in a batch, H height, W width.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
import tyro

from ltxf import media
from ltxf.monitor import Progress
from ltxf.prep.dataset_file import (
    DEFAULT_MEDIA_COLUMN,
    DEFAULT_REFERENCE_COLUMN,
    check_dataset_suffix,
    read_records,
    relative_media_path,
    write_records,
)

logger = logging.getLogger(__name__)

VIDEO_OUTPUT_SUFFIXES = (".mp4", ".mov", ".mkv")
"""Containers the H.264 writer can keep; other video extensions get an ``.mp4`` reference."""


def _gaussian_kernel(sigma: float, device: torch.device) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _blur(gray_B1HW: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return gray_B1HW
    kernel = _gaussian_kernel(sigma, gray_B1HW.device)
    radius = kernel.numel() // 2
    # Separable: rows then columns, replicate padding so borders do not fade to black.
    x = F.conv2d(F.pad(gray_B1HW, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))


def _sobel(gray_B1HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=gray_B1HW.device)
    padded = F.pad(gray_B1HW, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, kx.view(1, 1, 3, 3))
    gy = F.conv2d(padded, kx.t().contiguous().view(1, 1, 3, 3))
    return gx[:, 0], gy[:, 0]


def _non_maximum_suppression(magnitude_BHW: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """Keep a pixel only where its magnitude is >= both neighbours along the gradient direction (one side strict,
    so a two-pixel-wide ridge of equal values keeps exactly one pixel)."""
    padded = F.pad(magnitude_BHW[:, None], (1, 1, 1, 1))[:, 0]
    height, width = magnitude_BHW.shape[1:]

    def shifted(dy: int, dx: int) -> torch.Tensor:
        return padded[:, 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]

    # Direction of the gradient in image coordinates (y down), folded into [0, 180) and binned to 4 directions.
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180.0
    direction = (((angle + 22.5) // 45.0) % 4).long()
    neighbour_pairs = [((0, 1), (0, -1)), ((1, 1), (-1, -1)), ((1, 0), (-1, 0)), ((1, -1), (-1, 1))]
    keep = torch.zeros_like(magnitude_BHW, dtype=torch.bool)
    for d, (forward, backward) in enumerate(neighbour_pairs):
        is_max = (magnitude_BHW > shifted(*forward)) & (magnitude_BHW >= shifted(*backward))
        keep |= (direction == d) & is_max
    return torch.where(keep, magnitude_BHW, 0.0)


def _hysteresis(strong_BHW: torch.Tensor, weak_BHW: torch.Tensor, max_iterations: int | None = None) -> torch.Tensor:
    edges = strong_BHW.clone()
    candidates = weak_BHW | strong_BHW
    limit = max_iterations if max_iterations is not None else edges.shape[1] * edges.shape[2]
    for _ in range(limit):
        grown = F.max_pool2d(edges[:, None].float(), kernel_size=3, stride=1, padding=1)[:, 0].bool() & candidates
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges


def to_grayscale(frames_BHWC: torch.Tensor) -> torch.Tensor:
    """uint8 RGB ``[B, H, W, 3]`` -> float luma ``[B, 1, H, W]`` on the 0-255 scale."""
    weights = torch.tensor([0.299, 0.587, 0.114], device=frames_BHWC.device)
    return torch.einsum("bhwc,c->bhw", frames_BHWC.float(), weights)[:, None]


def canny_edges(
    frames_BHWC: torch.Tensor,
    *,
    low_threshold: float = 100.0,
    high_threshold: float = 200.0,
    blur_sigma: float = 1.0,
) -> torch.Tensor:
    """Edge masks (bool ``[B, H, W]``) of uint8 RGB frames ``[B, H, W, 3]``; see the module docstring.

    Thresholds are on the L1 Sobel magnitude of 0-255 grey levels; ``blur_sigma`` 0 skips the blur.
    """
    if frames_BHWC.ndim != 4 or frames_BHWC.shape[-1] != 3:
        raise ValueError(f"frames must be [B, H, W, 3] RGB, got shape {tuple(frames_BHWC.shape)}")
    if not 0 <= low_threshold <= high_threshold:
        raise ValueError(f"need 0 <= low_threshold <= high_threshold, got {low_threshold}, {high_threshold}")
    gray = _blur(to_grayscale(frames_BHWC), blur_sigma)
    gx, gy = _sobel(gray)
    magnitude = gx.abs() + gy.abs()
    thin = _non_maximum_suppression(magnitude, gx, gy)
    return _hysteresis(thin >= high_threshold, thin >= low_threshold)


def edge_frames(
    frames_FHWC: torch.Tensor, *, batch_size: int = 100, device: str | torch.device | None = None, **kwargs: float
) -> torch.Tensor:
    """uint8 RGB frames -> uint8 3-channel edge frames (255 on edges), ``batch_size`` frames at a time on
    ``device`` (default: where the frames are); the result is where the frames are."""
    out = torch.empty_like(frames_FHWC)
    for start in range(0, frames_FHWC.shape[0], batch_size):
        batch = frames_FHWC[start : start + batch_size]
        edges = canny_edges(batch.to(device) if device is not None else batch, **kwargs).to(out.device)
        out[start : start + batch_size] = (edges.to(torch.uint8) * 255)[..., None].expand(-1, -1, -1, 3)
    return out


def reference_path_for(media_path: Path) -> Path:
    """``clip.mp4`` -> ``clip_reference.mp4``; images get ``.png``, videos in other containers ``.mp4``."""
    if media.is_image_path(media_path):
        suffix = ".png"
    else:
        suffix = media_path.suffix if media_path.suffix.lower() in VIDEO_OUTPUT_SUFFIXES else ".mp4"
    return media_path.with_name(f"{media_path.stem}_reference{suffix}")


def write_edge_reference(
    media_path: Path, output: Path, *, batch_size: int = 100, device: str | torch.device | None = None,
    **kwargs: float,
) -> None:
    """Read a video or image, compute its edge frames, and write them (video at the source fps, or PNG)."""
    video = media.read_video(media_path)
    edges = edge_frames(video.frames, batch_size=batch_size, device=device, **kwargs)
    if output.suffix.lower() == ".png":
        media.write_image(output, edges[0])
        return
    height, width = edges.shape[1] // 2 * 2, edges.shape[2] // 2 * 2
    if (height, width) != tuple(edges.shape[1:3]):
        logger.warning("%s: odd size %dx%d, the reference drops the last row/column", media_path, edges.shape[2],
                       edges.shape[1])
    media.write_video(output, edges[:, :height, :width], video.fps)


@dataclass(kw_only=True)
class ReferenceSummary:
    written: list[Path] = field(default_factory=list)
    existing: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def compute_references(
    dataset_file: str | Path,
    *,
    media_column: str = DEFAULT_MEDIA_COLUMN,
    reference_column: str = DEFAULT_REFERENCE_COLUMN,
    output: str | Path | None = None,
    override: bool = False,
    batch_size: int = 100,
    low_threshold: float = 100.0,
    high_threshold: float = 200.0,
    blur_sigma: float = 1.0,
    device: str | torch.device | None = None,
) -> ReferenceSummary:
    """Write an edge reference next to every media file of ``dataset_file`` and record it in ``reference_column``.

    The dataset (JSON, JSONL or CSV) is rewritten in place, or to ``output`` (same folder required, since paths
    are relative to it). Existing references are kept unless ``override``. Media that cannot be read are reported
    and keep no reference entry. ``device`` runs the edge detector there (frames are read on the CPU).
    """
    dataset_file = Path(dataset_file)
    check_dataset_suffix(dataset_file)
    output = dataset_file if output is None else Path(output)
    check_dataset_suffix(output)
    if output.parent.absolute() != dataset_file.parent.absolute():
        raise ValueError(f"output {output} must be in the dataset file's folder {dataset_file.parent} (media paths "
                         "are relative to it)")
    base_dir = dataset_file.parent
    records = read_records(dataset_file)
    summary = ReferenceSummary()
    rows = []
    progress = Progress(len(records), "edge references", log=logger)
    for record in records:
        row = dict(record.values)
        rows.append(row)
        try:
            raw = row.get(media_column)
            if not isinstance(raw, str):
                raise ValueError(f"{record.location}: column {media_column!r} must be a media path string, got {raw!r}")
            media_path, rel = relative_media_path(raw, base_dir, record.location, media_column)
            reference = reference_path_for(media_path)
            if reference.exists() and not override:
                summary.existing.append(reference)
            else:
                write_edge_reference(media_path, reference, batch_size=batch_size, device=device,
                                     low_threshold=low_threshold, high_threshold=high_threshold,
                                     blur_sigma=blur_sigma)
                summary.written.append(reference)
            row[reference_column] = reference_path_for(Path(rel.as_posix())).as_posix()
        except ValueError as exc:
            logger.warning("skipping: %s", exc)
            summary.failed.append((record.location, str(exc)))
        progress.advance()
    progress.finish()
    write_records(output, rows)
    logger.info("edge references: %d written, %d already there, %d failed; dataset written to %s",
                len(summary.written), len(summary.existing), len(summary.failed), output)
    return summary


@dataclass(frozen=True, kw_only=True)
class ComputeReferenceConfig:
    """Make Canny edge-map reference videos for IC-LoRA training and add them to a dataset file."""

    dataset_file: Annotated[Path, tyro.conf.Positional]
    """Dataset file (.json, .jsonl or .csv) listing the media; it gets a reference column."""
    media_column: str = DEFAULT_MEDIA_COLUMN
    """Column holding the media paths (relative to the dataset file)."""
    reference_column: str = DEFAULT_REFERENCE_COLUMN
    """Column the reference paths are written to."""
    output: Path | None = None
    """Write the updated dataset here (same folder) instead of rewriting DATASET_FILE in place."""
    override: bool = False
    """Recompute references that already exist."""
    batch_size: int = 100
    """Frames processed at once."""
    low_threshold: float = 100.0
    """Hysteresis low threshold (L1 Sobel magnitude, 0-255 grey levels)."""
    high_threshold: float = 200.0
    """Hysteresis high threshold."""
    blur_sigma: float = 1.0
    """Gaussian blur before the gradients (0 = none)."""
    device: str | None = None
    """Torch device for the edge detector; default: cuda when available, else cpu."""


def compute_reference(config: ComputeReferenceConfig) -> ReferenceSummary:
    """:func:`compute_references` with a :class:`ComputeReferenceConfig`."""
    return compute_references(
        config.dataset_file, media_column=config.media_column, reference_column=config.reference_column,
        output=config.output, override=config.override, batch_size=config.batch_size,
        low_threshold=config.low_threshold, high_threshold=config.high_threshold, blur_sigma=config.blur_sigma,
        device=config.device or ("cuda" if torch.cuda.is_available() else "cpu"),
    )
