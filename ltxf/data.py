"""Precomputed training data in the official ``ltx-trainer`` layout, a bucketed resumable batch sampler, and a
dummy dataset for benchmarks.

On disk (``<dataset dir>/.precomputed/``, one ``.pt`` file per clip and source, named after the media path with
its suffix replaced by ``.pt``)::

    latents/<rel>.pt            {"latents": bf16 [128, F', H', W'], "num_frames": F', "height": H', "width": W',
                                 "fps": float}        legacy: "latents" patchified as [F'*H'*W', 128]
    conditions/<rel>.pt         {"video_prompt_embeds": bf16 [1024, Dv], "audio_prompt_embeds": bf16 [1024, Da],
                                 "prompt_attention_mask": int64 [1024], 1 = real token, left-padded}
                                legacy: "prompt_embeds" instead of the two embeds; latents/latent_X.pt pairs
                                with conditions/condition_X.pt
    audio_latents/<rel>.pt      {"latents": fp32 [8, T, 16], "num_time_steps": T, "frequency_bins": 16,
                                 "duration": float seconds}
    reference_latents/<rel>.pt  like latents/, named after the TARGET media path (IC-LoRA)
    reference_audio_latents/<rel>.pt  like audio_latents/ (audio IC-LoRA)
    video_masks/<rel>.pt        {"mask": float32 [F', H', W']}, > 0.5 = kept clean (flexible strategy 'mask')
    audio_masks/<rel>.pt        {"mask": float32 [T]}

A sample, as :class:`PrecomputedDataset` and :class:`DummyDataset` return it (dtypes as stored)::

    sample_id               str, the relative path without ".pt"
    video_latents           [128, F', H', W']
    fps                     float32 scalar tensor
    video_prompt_embeds     [S, Dv]          (Gemma features before the connectors)
    audio_prompt_embeds     [S, Da]          (absent when the conditions file has none)
    prompt_attention_mask   bool [S]         (True = real token, left-padded)
    audio_latents           [8, T, 16]       (only with the audio source)
    reference_latents       [128, Fr, Hr, Wr] (only with the reference source)
    reference_fps           float32 scalar tensor (with reference_latents; NaN when its file has no "fps")
    reference_audio_latents [8, Tr, 16]      (only with that source)
    video_mask              float32 [F', H', W'] / audio_mask float32 [T] (only with the mask sources)

Audio-only datasets (no ``latents`` source) have no ``video_latents`` and no ``fps``.

:func:`collate` stacks samples of one bucket into ``[B, ...]`` tensors (``fps`` becomes ``[B]``, ``sample_id`` a
list). :class:`BucketBatchSampler` forms the batches; :class:`ResumableLoader` runs a ``DataLoader`` over it and
keeps the exact position of the last batch handed to the training loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading
from collections.abc import Hashable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from ltxf.latents import audio_latent_length, video_latent_size
from ltxf.rng import fold_in

logger = logging.getLogger(__name__)

PRECOMPUTED_DIR_NAME = ".precomputed"
LATENT_CHANNELS = 128
AUDIO_LATENT_CHANNELS = 8
AUDIO_FREQUENCY_BINS = 16
TEXT_MAX_TOKENS = 1024
# The official trainer's fallback when a latent file has no "fps" key.
DEFAULT_FPS = 24.0

Role = Literal["latents", "conditions", "audio_latents", "reference_latents", "reference_audio_latents",
               "video_masks", "audio_masks"]
ROLES: tuple[str, ...] = ("latents", "conditions", "audio_latents", "reference_latents")
# Roles only the flexible strategy's conditions read (audio IC-LoRA, inpainting masks).
CONDITION_ROLES: tuple[str, ...] = ("reference_audio_latents", "video_masks", "audio_masks")
DEFAULT_SOURCES: tuple[str, ...] = ("latents", "conditions")

# Sample keys that hold tensors stacked along a new batch dim by `collate`.
VIDEO_LATENTS = "video_latents"
AUDIO_LATENTS = "audio_latents"
REFERENCE_LATENTS = "reference_latents"
REFERENCE_AUDIO_LATENTS = "reference_audio_latents"
VIDEO_MASK = "video_mask"
AUDIO_MASK = "audio_mask"

BucketKey = tuple[tuple[int, ...] | None, int | None, tuple[int, ...] | None]


# ----------------------------------------------------------------------------------------------------------------
# Reading and validating single files


def _load_pt(path: Path, *, mmap: bool = False) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with every failure turned into a ValueError naming the file.

    ``mmap=True`` maps tensor storages instead of reading them, so shapes cost one header read; files written with
    the pre-1.6 serializer cannot be mapped and are read in full instead.
    """
    if not path.is_file():
        raise ValueError(f"{path}: no such file (expected a precomputed .pt sample)")
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if not mmap or "mmap can only be used" not in str(exc):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many unrelated types (pickle, zip, EOF, RuntimeError)
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ValueError(f"{path}: cannot be read as a torch .pt file ({type(exc).__name__}: {reason})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    return data


def _require(data: Mapping[str, Any], key: str, path: Path) -> Any:
    if key not in data:
        raise ValueError(f"{path}: missing key {key!r} (found keys {sorted(data)})")
    return data[key]


def _as_int(value: Any, key: str, path: Path) -> int:
    try:
        return int(value.item() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: {key!r} must be an integer, got {value!r}") from exc


def _video_latents(data: Mapping[str, Any], path: Path, latent_channels: int) -> torch.Tensor:
    """The ``latents`` entry as ``[C, F, H, W]``, unpatchifying the legacy ``[F*H*W, C]`` layout."""
    latents = _require(data, "latents", path)
    if not isinstance(latents, torch.Tensor):
        raise ValueError(f"{path}: 'latents' must be a tensor, got {type(latents).__name__}")
    dims = [_as_int(data[k], k, path) if k in data else None for k in ("num_frames", "height", "width")]
    if latents.ndim == 2:
        if None in dims:
            raise ValueError(
                f"{path}: legacy 2-D latents {tuple(latents.shape)} need 'num_frames', 'height' and 'width' keys"
            )
        num_frames, height, width = dims
        if latents.shape[0] != num_frames * height * width:
            raise ValueError(
                f"{path}: legacy latents have {latents.shape[0]} tokens, expected num_frames*height*width = "
                f"{num_frames}*{height}*{width}"
            )
        # Tokens are frame-major: token index = (f*H + h)*W + w.
        latents = latents.reshape(num_frames, height, width, latents.shape[1]).permute(3, 0, 1, 2)
    if latents.ndim != 4:
        raise ValueError(f"{path}: 'latents' must be [C, F, H, W] (or legacy [F*H*W, C]), got {tuple(latents.shape)}")
    if latents.shape[0] != latent_channels:
        raise ValueError(f"{path}: 'latents' has {latents.shape[0]} channels, expected {latent_channels} (the model's "
                         "latent channels; preprocessed for another model?)")
    for name, stored, actual in zip(("num_frames", "height", "width"), dims, latents.shape[1:], strict=True):
        if stored is not None and stored != actual:
            raise ValueError(f"{path}: {name!r} = {stored} disagrees with the latents shape {tuple(latents.shape)}")
    return latents


def _fps(data: Mapping[str, Any], path: Path) -> float | None:
    """The stored fps, or None when the file has no ``fps`` key (the caller falls back to DEFAULT_FPS)."""
    if "fps" not in data:
        return None
    value = data["fps"]
    try:
        fps = float(value.item() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: 'fps' must be a number, got {value!r}") from exc
    if not fps > 0:
        raise ValueError(f"{path}: 'fps' must be positive, got {fps}")
    return fps


def _audio_latents(data: Mapping[str, Any], path: Path, channels: int = AUDIO_LATENT_CHANNELS) -> torch.Tensor:
    latents = _require(data, "latents", path)
    if (
        not isinstance(latents, torch.Tensor)
        or latents.ndim != 3
        or latents.shape[0] != channels
        or latents.shape[2] != AUDIO_FREQUENCY_BINS
        or latents.shape[1] == 0
    ):
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(
            f"{path}: audio 'latents' must be [{channels}, T, {AUDIO_FREQUENCY_BINS}] with T > 0 (the audio VAE's "
            f"latent layout), got {shape}; preprocessed for another model?"
        )
    return latents


def _mask(data: Mapping[str, Any], path: Path, ndim: int) -> torch.Tensor:
    """A mask file's ``mask`` entry as float32 with ``ndim`` dims (video [F', H', W'], audio [T])."""
    mask = _require(data, "mask", path)
    if not isinstance(mask, torch.Tensor) or mask.ndim != ndim:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{path}: 'mask' must be a {ndim}-D tensor ({'[F, H, W]' if ndim == 3 else '[T]'}), "
                         f"got {shape}")
    return mask.float()


def _text_conditions(data: Mapping[str, Any], path: Path, text_length: int | None) -> dict[str, torch.Tensor]:
    """Validate a conditions file and return the sample's text entries (legacy and trimmed files normalised)."""
    mask = _require(data, "prompt_attention_mask", path)
    if "video_prompt_embeds" in data:
        embeds = {"video_prompt_embeds": data["video_prompt_embeds"]}
        if "audio_prompt_embeds" in data:
            embeds["audio_prompt_embeds"] = data["audio_prompt_embeds"]
    elif "prompt_embeds" in data:
        # Legacy single-embedding files feed both modalities, as the official trainer does.
        embeds = {"video_prompt_embeds": data["prompt_embeds"], "audio_prompt_embeds": data["prompt_embeds"]}
    else:
        raise ValueError(
            f"{path}: expected 'video_prompt_embeds' (or legacy 'prompt_embeds') in a conditions file, "
            f"found keys {sorted(data)}"
        )
    if not isinstance(mask, torch.Tensor) or mask.ndim != 1:
        raise ValueError(f"{path}: 'prompt_attention_mask' must be a 1-D tensor [S], got {mask!r:.80}")
    for key, value in embeds.items():
        if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.shape[0] != mask.shape[0]:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{path}: {key!r} must be [S, D] with S = {mask.shape[0]} (the mask length), got {shape}")
    out = dict(embeds)
    out["prompt_attention_mask"] = mask
    num_tokens = mask.shape[0]
    if text_length is not None and num_tokens != text_length:
        if num_tokens > text_length:
            raise ValueError(f"{path}: {num_tokens} text tokens, more than text_length = {text_length}")
        # Newer official files may store only the real tokens; the connectors need the full padded length,
        # and padding is on the left.
        pad = text_length - num_tokens
        out = {key: torch.nn.functional.pad(value, (0, 0, pad, 0)) for key, value in embeds.items()}
        out["prompt_attention_mask"] = torch.nn.functional.pad(mask, (pad, 0))
    out["prompt_attention_mask"] = out["prompt_attention_mask"] != 0
    return out


# ----------------------------------------------------------------------------------------------------------------
# The dataset


@dataclass(frozen=True, kw_only=True)
class SampleInfo:
    """What the dataset knows about one sample without loading it: its files and the shapes that bucket it."""

    sample_id: str
    files: dict[str, Path]
    video_shape: tuple[int, ...] | None
    fps: float | None  # None when the latent file has no "fps" key (DEFAULT_FPS is used)
    audio_length: int | None
    reference_shape: tuple[int, ...] | None
    text_widths: dict[str, int] | None = None
    """Feature width per text key (``video_prompt_embeds``, ``audio_prompt_embeds``), checked against the model
    by :func:`ltxf.data_check.check_dataset_fits_model`."""
    reference_audio_length: int | None = None


def _normalize_sources(sources: Mapping[str, str] | Sequence[str]) -> dict[str, str]:
    if isinstance(sources, str):
        raise ValueError(f"sources must be a sequence of roles or a role -> directory mapping, got {sources!r}")
    mapping = dict(sources) if isinstance(sources, Mapping) else {role: role for role in sources}
    if not mapping:
        raise ValueError("sources is empty: expected some of " + ", ".join(ROLES + CONDITION_ROLES))
    unknown = [role for role in mapping if role not in ROLES + CONDITION_ROLES]
    if unknown:
        raise ValueError(f"unknown source roles {unknown}: expected some of {ROLES + CONDITION_ROLES}")
    return mapping


def resolve_data_root(root: str | Path) -> Path:
    """The precomputed directory: ``root/.precomputed`` when it exists, else ``root`` (as the official trainer)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"data root {root} does not exist or is not a directory")
    nested = root / PRECOMPUTED_DIR_NAME
    return nested if nested.is_dir() else root


class PrecomputedDataset(Dataset):
    """Map-style dataset over an official ``.precomputed/`` directory, read as it is.

    ``sources`` names the roles to load, as a sequence (directory name = role) or a mapping role -> directory
    name; roles are ``latents``, ``conditions``, ``audio_latents`` and ``reference_latents``. Samples are the
    ``**/*.pt`` files under the ``latents`` directory (or the first source's), sorted by relative path. A sample
    missing from a required source is skipped with a warning (``on_missing="skip"``, counted in
    :attr:`missing`) or is an error (``on_missing="error"``); roles in ``optional_sources`` are loaded when present
    and never cause a skip (e.g. clips whose audio extraction failed).

    Every file of every kept sample is opened once at construction with memory-mapped storages (headers only) to
    validate keys and shapes and to record the bucket shapes, so a bad dataset fails before training starts and
    no epoch re-reads metadata. A bad file raises ``ValueError`` naming it, or with ``skip_bad_samples=True`` is
    skipped, logged and listed in :attr:`bad_samples`.

    ``text_length`` left-pads trimmed conditions files to that many tokens (1024, the tokenizer's length; None
    keeps them as stored). ``latent_channels`` / ``audio_latent_channels`` are the expected latent widths (the
    model's; 128 and 8 for the released models). ``check_finite`` makes every loaded sample a ``ValueError`` naming
    the file if one of its tensors holds NaN or Inf. Each sample's text-feature widths are recorded
    (``SampleInfo.text_widths``) for the check against the model (:mod:`ltxf.data_check`).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        sources: Mapping[str, str] | Sequence[str] = DEFAULT_SOURCES,
        optional_sources: Sequence[str] = (),
        on_missing: Literal["skip", "error"] = "skip",
        skip_bad_samples: bool = False,
        text_length: int | None = TEXT_MAX_TOKENS,
        latent_channels: int = LATENT_CHANNELS,
        num_scan_threads: int = 8,
        audio_latent_channels: int = AUDIO_LATENT_CHANNELS,
        check_finite: bool = False,
    ) -> None:
        super().__init__()
        if on_missing not in ("skip", "error"):
            raise ValueError(f"on_missing must be 'skip' or 'error', got {on_missing!r}")
        self.root = resolve_data_root(root)
        self.sources = _normalize_sources(sources)
        self.optional_sources = tuple(optional_sources)
        stray = [role for role in self.optional_sources if role not in self.sources]
        if stray:
            raise ValueError(f"optional_sources {stray} are not in sources {list(self.sources)}")
        self.text_length = text_length
        self.latent_channels = latent_channels
        self.audio_latent_channels = audio_latent_channels
        self.skip_bad_samples = skip_bad_samples
        self.check_finite = check_finite
        self.missing: list[str] = []
        self.bad_samples: list[tuple[str, str]] = []

        source_dirs = {role: self.root / name for role, name in self.sources.items()}
        for role, directory in source_dirs.items():
            if not directory.is_dir():
                if role in self.optional_sources:
                    logger.info("optional source %s: %s does not exist, no sample has it", role, directory)
                    continue
                raise ValueError(f"source {role!r}: directory {directory} does not exist (data root {self.root})")
        self._source_dirs = source_dirs
        pairs = self._discover(on_missing)
        self._infos = self._scan(pairs, num_scan_threads)
        num_default_fps = sum(1 for info in self._infos if info.video_shape is not None and info.fps is None)
        if num_default_fps:
            logger.warning(
                "%d latent file(s) have no 'fps' key; using the official default %s", num_default_fps, DEFAULT_FPS
            )
        if not self._infos:
            raise ValueError(
                f"no usable samples in {self.root} (sources {self.sources}; {len(self.missing)} skipped for a "
                f"missing file, {len(self.bad_samples)} bad)"
            )
        logger.info(
            "precomputed dataset %s: %d samples (%d skipped for a missing file, %d bad)",
            self.root,
            len(self._infos),
            len(self.missing),
            len(self.bad_samples),
        )

    def _discover(self, on_missing: str) -> list[tuple[str, dict[str, Path]]]:
        primary = "latents" if "latents" in self.sources else next(iter(self.sources))
        primary_dir = self._source_dirs[primary]

        def list_files(role: str) -> set[str]:
            directory = self._source_dirs[role]
            return (
                {p.relative_to(directory).as_posix() for p in directory.rglob("*.pt")} if directory.is_dir() else set()
            )

        # One directory walk per source, then set lookups: no per-sample stat calls (slow on network storage).
        roles = list(self.sources)
        with ThreadPoolExecutor(max_workers=len(roles)) as pool:
            listings = dict(zip(roles, pool.map(list_files, roles), strict=True))
        primary_files = sorted(listings[primary])
        if not primary_files:
            raise ValueError(f"no .pt files under {primary_dir} (source {primary!r})")

        pairs: list[tuple[str, dict[str, Path]]] = []
        for rel in primary_files:
            files = {primary: primary_dir / rel}
            missing_roles = []
            for role in roles:
                if role == primary:
                    continue
                match = self._match(role, rel, listings[role])
                if match is not None:
                    files[role] = self._source_dirs[role] / match
                elif role not in self.optional_sources:
                    missing_roles.append(role)
            if missing_roles:
                self.missing.append(rel)
                expected = ", ".join(str(self._source_dirs[r] / rel) for r in missing_roles)
                if on_missing == "error":
                    raise ValueError(f"sample {primary_dir / rel} has no matching file: expected {expected}")
                logger.warning("skipping sample %s: missing %s", primary_dir / rel, expected)
                continue
            pairs.append((rel.removesuffix(".pt"), files))
        return pairs

    @staticmethod
    def _match(role: str, rel: str, listing: set[str]) -> str | None:
        if rel in listing:
            return rel
        # Legacy naming from older trainers: latents/latent_X.pt pairs with conditions/condition_X.pt.
        parent, _, name = rel.rpartition("/")
        if role == "conditions" and name.startswith("latent_"):
            legacy = f"condition_{name.removeprefix('latent_')}"
            legacy = f"{parent}/{legacy}" if parent else legacy
            if legacy in listing:
                return legacy
        return None

    def _scan(self, pairs: list[tuple[str, dict[str, Path]]], num_threads: int) -> list[SampleInfo]:
        def scan(pair: tuple[str, dict[str, Path]]) -> SampleInfo | tuple[str, str]:
            sample_id, files = pair
            try:
                return self._read_info(sample_id, files)
            except ValueError as exc:
                if not self.skip_bad_samples:
                    raise
                return (sample_id, str(exc))

        with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
            results = list(pool.map(scan, pairs))
        infos = []
        for result in results:
            if isinstance(result, SampleInfo):
                infos.append(result)
            else:
                logger.warning("skipping bad sample %s: %s", *result)
                self.bad_samples.append(result)
        return infos

    def _read_info(self, sample_id: str, files: dict[str, Path]) -> SampleInfo:
        video_shape = fps = audio_length = reference_shape = reference_audio_length = text_widths = None
        mask_shapes = {}
        for role, path in files.items():
            data = _load_pt(path, mmap=True)
            if role == "latents":
                video_shape = tuple(_video_latents(data, path, self.latent_channels).shape)
                fps = _fps(data, path)
            elif role == "reference_latents":
                reference_shape = tuple(_video_latents(data, path, self.latent_channels).shape)
            elif role == "audio_latents":
                audio_length = int(_audio_latents(data, path, self.audio_latent_channels).shape[1])
            elif role == "reference_audio_latents":
                reference_audio_length = int(_audio_latents(data, path, self.audio_latent_channels).shape[1])
            elif role in ("video_masks", "audio_masks"):
                mask_shapes[role] = (path, tuple(_mask(data, path, 3 if role == "video_masks" else 1).shape))
            else:
                text = _text_conditions(data, path, self.text_length)
                text_widths = {key: int(text[key].shape[-1]) for key in ("video_prompt_embeds", "audio_prompt_embeds")
                               if key in text}
        # A mask covers exactly its latents' grid (audio: the same T, so collate crops both alike).
        expected_masks = {"video_masks": video_shape and video_shape[1:],
                          "audio_masks": audio_length and (audio_length,)}
        for role, (path, shape) in mask_shapes.items():
            if shape != expected_masks[role]:
                latents = list(expected_masks[role]) if expected_masks[role] else "missing"
                raise ValueError(f"{path}: mask shape {list(shape)} does not match its latents' grid {latents}")
        return SampleInfo(
            sample_id=sample_id,
            files=files,
            video_shape=video_shape,
            fps=fps,
            audio_length=audio_length,
            reference_shape=reference_shape,
            text_widths=text_widths,
            reference_audio_length=reference_audio_length,
        )

    def __len__(self) -> int:
        return len(self._infos)

    @property
    def samples(self) -> Sequence[SampleInfo]:
        """Per-sample metadata (files and shapes), in dataset order."""
        return tuple(self._infos)

    def bucket_keys(self, *, audio_length_tolerance: int = 1) -> list[BucketKey]:
        """One bucket key per sample: ``(video shape, audio length group, reference shape)``.

        Audio lengths of otherwise equal samples that lie within ``audio_length_tolerance`` latent steps of the
        shortest one share a bucket (its key holds that shortest length), and :func:`collate` crops them to it.
        """
        # An audio reference's length joins the reference part of the key (None for no audio reference).
        return bucket_keys_from_shapes(
            [(i.video_shape, i.audio_length,
              i.reference_shape if i.reference_audio_length is None else (i.reference_shape,
                                                                          i.reference_audio_length))
             for i in self._infos],
            audio_length_tolerance=audio_length_tolerance,
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        info = self._infos[index]
        sample: dict[str, Any] = {"sample_id": info.sample_id}
        for role, path in info.files.items():
            data = _load_pt(path)
            if role == "latents":
                sample[VIDEO_LATENTS] = latents = _video_latents(data, path, self.latent_channels)
                expected = info.video_shape
                fps = DEFAULT_FPS if info.fps is None else info.fps
                sample["fps"] = torch.tensor(fps, dtype=torch.float32)
            elif role == "reference_latents":
                sample[REFERENCE_LATENTS] = latents = _video_latents(data, path, self.latent_channels)
                reference_fps = _fps(data, path)
                sample["reference_fps"] = torch.tensor(float("nan") if reference_fps is None else reference_fps,
                                                       dtype=torch.float32)
                expected = info.reference_shape
            elif role == "reference_audio_latents":
                sample[REFERENCE_AUDIO_LATENTS] = latents = _audio_latents(data, path, self.audio_latent_channels)
                expected = (self.audio_latent_channels, info.reference_audio_length, AUDIO_FREQUENCY_BINS)
            elif role in ("video_masks", "audio_masks"):
                sample[VIDEO_MASK if role == "video_masks" else AUDIO_MASK] = _mask(
                    data, path, 3 if role == "video_masks" else 1)
                continue
            elif role == "audio_latents":
                sample[AUDIO_LATENTS] = latents = _audio_latents(data, path, self.audio_latent_channels)
                expected = (self.audio_latent_channels, info.audio_length, AUDIO_FREQUENCY_BINS)
            else:
                sample.update(_text_conditions(data, path, self.text_length))
                continue
            if tuple(latents.shape) != expected:
                raise ValueError(f"{path}: shape {tuple(latents.shape)} changed since the dataset was scanned")
        if self.check_finite:
            _check_finite(sample, info.files)
        return sample


_ROLE_OF_KEY = {VIDEO_LATENTS: "latents", AUDIO_LATENTS: "audio_latents", REFERENCE_LATENTS: "reference_latents",
                "video_prompt_embeds": "conditions", "audio_prompt_embeds": "conditions"}


def _check_finite(sample: Mapping[str, Any], files: Mapping[str, Path]) -> None:
    """A ``ValueError`` naming the file and key of the first tensor of ``sample`` holding NaN or Inf."""
    for key, role in _ROLE_OF_KEY.items():
        value = sample.get(key)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            # min and max propagate NaN and show +-Inf: 20x faster than isfinite().all() on bf16 CPU tensors.
            low, high = torch.aminmax(value)
            if not bool(torch.isfinite(low) & torch.isfinite(high)):
                bad = int((~torch.isfinite(value)).sum())
                raise ValueError(f"{files.get(role, role)}: {key!r} holds {bad} NaN/Inf value(s) of {value.numel()} "
                                 "(data.check_finite); fix or remove this sample (data.skip_bad_samples does not "
                                 "cover values read during training)")


def bucket_keys_from_shapes(
    shapes: Sequence[tuple[tuple[int, ...] | None, int | None, tuple[int, ...] | None]],
    *,
    audio_length_tolerance: int = 1,
) -> list[BucketKey]:
    """Bucket keys from per-sample ``(video shape, audio length or None, reference shape or None)``.

    Within one (video shape, reference shape) group, distinct audio lengths are merged greedily from the shortest:
    a length joins the current group while it is at most ``audio_length_tolerance`` above the group's shortest.
    """
    if audio_length_tolerance < 0:
        raise ValueError(f"audio_length_tolerance must be >= 0, got {audio_length_tolerance}")
    lengths_by_group: dict[tuple, set[int]] = {}
    for video_shape, audio_length, reference_shape in shapes:
        if audio_length is not None:
            lengths_by_group.setdefault((video_shape, reference_shape), set()).add(audio_length)
    group_floor: dict[tuple, dict[int, int]] = {}
    for group, lengths in lengths_by_group.items():
        floors: dict[int, int] = {}
        floor = None
        for length in sorted(lengths):
            if floor is None or length - floor > audio_length_tolerance:
                floor = length
            floors[length] = floor
        group_floor[group] = floors
    return [
        (
            video_shape,
            None if audio_length is None else group_floor[(video_shape, reference_shape)][audio_length],
            reference_shape,
        )
        for video_shape, audio_length, reference_shape in shapes
    ]


# ----------------------------------------------------------------------------------------------------------------
# Collation


def collate(samples: Sequence[Mapping[str, Any]], *, max_audio_crop: int = 1) -> dict[str, Any]:
    """Stack samples of one bucket into a batch: tensors gain a leading ``B`` dim, strings become lists.

    Audio latents of different lengths are cropped to the shortest when they differ by at most
    ``max_audio_crop`` steps: clips of the same video shape can disagree by one audio latent (29.97 vs 30 fps
    sources, or the reference's ``round(duration * 25)`` length against the encoder's floor-based one), and one
    step is 40 ms at the clip's end. Larger differences, other shape mismatches and samples with different keys
    raise ``ValueError`` naming the samples.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    ids = [str(s.get("sample_id", i)) for i, s in enumerate(samples)]
    keys = list(samples[0])
    for sample_id, sample in zip(ids, samples, strict=True):
        if set(sample) != set(keys):
            raise ValueError(
                f"samples {ids[0]!r} and {sample_id!r} have different keys: {sorted(keys)} vs {sorted(sample)}"
            )
    batch: dict[str, Any] = {}
    for key in keys:
        values = [sample[key] for sample in samples]
        if not isinstance(values[0], torch.Tensor):
            batch[key] = list(values)
            continue
        if key in (AUDIO_LATENTS, REFERENCE_AUDIO_LATENTS, AUDIO_MASK):
            # Audio masks have their latents' length, so they are cropped alike.
            time_dim = 0 if key == AUDIO_MASK else 1
            lengths = [v.shape[time_dim] for v in values]
            shortest = min(lengths)
            if max(lengths) - shortest > max_audio_crop:
                raise ValueError(
                    f"{key} lengths {dict(zip(ids, lengths, strict=True))} differ by more than "
                    f"max_audio_crop = {max_audio_crop}; the batch mixes buckets"
                )
            values = [v.narrow(time_dim, 0, shortest) for v in values]
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise ValueError(
                f"cannot stack {key!r}: shapes differ across the batch "
                f"{ {i: tuple(v.shape) for i, v in zip(ids, values, strict=True)} }; a batch must be one bucket"
            )
        batch[key] = torch.stack(values)
    return batch


# ----------------------------------------------------------------------------------------------------------------
# Batch sampling


class BucketBatchSampler:
    """Deterministic, resumable, data-parallel batch sampler where every batch is one bucket, and whose order does
    not depend on the number of processes.

    The unit is the global batch of ``global_batch_size = batch_size * world_size`` samples. Epoch ``e`` is planned
    from ``(seed, e, global_batch_size)`` alone (:meth:`global_batches`): the indices of each bucket are shuffled,
    cut into global batches, and the global batches of all buckets are shuffled together. Rank ``r`` takes the
    ``r``-th slice of ``batch_size`` samples of each global batch. So 1 process with batch 2 and 2 processes with
    batch 1 see the same global batches in the same order, every rank gets distinct samples, and at each step all
    ranks hold samples of the same bucket (equal shapes keep the ranks in lockstep). A bucket's remainder that does
    not fill a global batch is dropped for that epoch (a different remainder each epoch, since buckets are
    reshuffled); a bucket smaller than a global batch is never used, with a warning.

    Iterating (``iter(sampler)`` or :meth:`iter_batches`) runs forever across epochs and advances the position,
    counted in global batches, which :meth:`state_dict` / :meth:`load_state_dict` save and restore: a restored
    sampler yields exactly the batches that would have followed, at any world size with the same global batch size.
    With a prefetching ``DataLoader`` the sampler runs ahead of the training loop; use :class:`ResumableLoader`,
    which counts consumed batches, to checkpoint the position.
    """

    def __init__(
        self,
        bucket_keys: Sequence[Hashable],
        *,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.global_batch_size = batch_size * world_size
        # Buckets in order of first appearance: deterministic without requiring sortable keys.
        buckets: dict[Hashable, list[int]] = {}
        for index, key in enumerate(bucket_keys):
            buckets.setdefault(key, []).append(index)
        self._buckets = list(buckets.values())
        self._bucket_names = [repr(key) for key in buckets]
        group_size = batch_size * world_size
        self._num_groups = sum(len(indices) // group_size for indices in self._buckets)
        if self._num_groups == 0:
            sizes = {name: len(idx) for name, idx in zip(self._bucket_names, self._buckets, strict=True)}
            raise ValueError(
                f"cannot form a single batch: batch_size * world_size = {batch_size} * {world_size} = {group_size} "
                f"but the buckets hold {sizes} samples ({len(bucket_keys)} in all)"
            )
        unused = [name for name, idx in zip(self._bucket_names, self._buckets, strict=True) if len(idx) < group_size]
        if unused:
            logger.warning(
                "%d bucket(s) hold fewer than batch_size * world_size = %d samples and are never used: %s",
                len(unused),
                group_size,
                ", ".join(unused[:5]) + (" ..." if len(unused) > 5 else ""),
            )
        num_dropped = sum(len(idx) % group_size for idx in self._buckets)
        if num_dropped:
            logger.info(
                "bucket sampler: %d of %d samples are dropped each epoch (incomplete batches)",
                num_dropped,
                len(bucket_keys),
            )
        self._epoch = 0
        self._batch_index = 0
        self._generation = 0
        self._plan_cache: tuple[int, list[list[int]]] | None = None

    def __len__(self) -> int:
        """Global batches per epoch (each rank takes one slice of each)."""
        return self._num_groups

    def global_batches(self, epoch: int) -> list[list[int]]:
        """The global batches (dataset indices) of ``epoch``: a pure function of ``(seed, epoch, global batch
        size)`` and the buckets, whatever the number of processes."""
        rng = random.Random(fold_in(self.seed, epoch, "bucket-batch-sampler"))
        group_size = self.global_batch_size
        groups: list[list[int]] = []
        for indices in self._buckets:
            order = list(indices)
            if self.shuffle:
                rng.shuffle(order)
            groups.extend(order[g : g + group_size] for g in range(0, len(order) - group_size + 1, group_size))
        if self.shuffle:
            rng.shuffle(groups)
        return groups

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's slice of each global batch of ``epoch``."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        start = self.rank * self.batch_size
        batches = [group[start : start + self.batch_size] for group in self.global_batches(epoch)]
        self._plan_cache = (epoch, batches)
        return batches

    def advance(self, position: Mapping[str, int], num_batches: int) -> dict[str, int]:
        """The position ``num_batches`` batches after ``position`` (``{"epoch", "batch_index"}``)."""
        flat = position["epoch"] * len(self) + position["batch_index"] + num_batches
        return {"epoch": flat // len(self), "batch_index": flat % len(self),
                "global_batch_size": self.global_batch_size}

    def iter_batches(self) -> Iterator[list[int]]:
        """Yield this rank's batches forever from the current position, advancing it before each yield."""
        generation = self._generation
        while True:
            epoch, start = self._epoch, self._batch_index
            batches = self.epoch_batches(epoch)
            for index in range(start, len(batches)):
                if generation != self._generation:
                    raise RuntimeError("BucketBatchSampler state was loaded while iterating; start a new iterator")
                position = self.advance({"epoch": epoch, "batch_index": index}, 1)
                self._epoch, self._batch_index = position["epoch"], position["batch_index"]
                yield batches[index]

    def __iter__(self) -> Iterator[list[int]]:
        return self.iter_batches()

    def state_dict(self) -> dict[str, int]:
        """The position of the next global batch: ``{"epoch", "batch_index", "global_batch_size"}`` (plain ints)."""
        return {"epoch": self._epoch, "batch_index": self._batch_index, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore a position from :meth:`state_dict`, saved at any number of processes.

        With the same global batch size the run continues exactly (the epoch's plan is the same). Saved with
        another global batch size, the position is rescaled to the same number of samples into the epoch (whose
        plan differs, so some of its samples may repeat or be skipped), with a warning. A state from before global
        positions (``world_size`` instead of ``global_batch_size``) is read as ``batch_size * world_size``.
        """
        missing = [key for key in ("epoch", "batch_index") if key not in state]
        if missing:
            raise ValueError(f"sampler state {dict(state)} lacks {missing}")
        epoch, batch_index = int(state["epoch"]), int(state["batch_index"])
        if epoch < 0 or batch_index < 0:
            raise ValueError(f"sampler state must be non-negative, got {dict(state)}")
        if "global_batch_size" in state:
            saved_global = int(state["global_batch_size"])
        else:
            saved_global = self.batch_size * int(state.get("world_size", self.world_size))
        if saved_global < 1:
            raise ValueError(f"sampler state has a global batch size of {saved_global}: {dict(state)}")
        if saved_global != self.global_batch_size:
            batch_index = -(-batch_index * saved_global // self.global_batch_size)
            logger.warning(
                "resuming the sampler with a global batch of %d samples from a state saved with %d: epoch %d "
                "continues at global batch %d (its order differs from the saved run's)",
                self.global_batch_size,
                saved_global,
                epoch,
                batch_index,
            )
        if batch_index >= len(self):
            logger.warning(
                "sampler state batch_index %d is past this epoch's %d batches (dataset changed?); starting epoch %d",
                batch_index,
                len(self),
                epoch + 1,
            )
            epoch, batch_index = epoch + 1, 0
        self._epoch, self._batch_index = epoch, batch_index
        self._generation += 1


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Block SIGINT/SIGTERM in this thread (and so in processes it forks) meanwhile; pending ones arrive after."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _worker_ignores_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: after torch installed its worker handlers, ignore SIGINT and SIGTERM."""
    del worker_id
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def _stop_workers(batches: Iterator[Any]) -> None:
    """Shut the DataLoader's workers down now rather than at garbage collection: they ignore SIGTERM, so the
    interpreter's exit-time ``terminate()`` of leftover workers would wait forever. A worker that does not exit
    gets SIGKILL. (``_shutdown_workers`` and ``_workers`` are torch's private names; without them, nothing.)"""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in getattr(batches, "_workers", ()):
        if worker.is_alive():
            worker.kill()
            worker.join()


class ResumableLoader:
    """An endless iterator of collated batches with an exact, checkpointable position.

    Wraps a ``torch.utils.data.DataLoader`` (``num_workers`` worker processes, in-order delivery) over
    ``sampler``. The position is counted on the consumer side, so prefetched but unconsumed batches do not count:
    ``state_dict()`` taken after the training loop received ``n`` batches resumes at batch ``n + 1``. Call
    :meth:`load_state_dict` before starting to iterate. Workers ignore SIGINT and SIGTERM (the main process
    decides how to stop, :mod:`ltxf.faults`) and are shut down when the iterator is closed.
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: BucketBatchSampler,
        *,
        collate_fn=collate,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.sampler = sampler
        self.collate_fn = collate_fn
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self._position = sampler.state_dict()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.sampler.load_state_dict(self._position)
        extra = {} if self.num_workers == 0 else {"prefetch_factor": self.prefetch_factor or 2,
                                                   "worker_init_fn": _worker_ignores_stop_signals}
        loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            **extra,
        )
        # Workers start with SIGINT/SIGTERM blocked and ignore them before unblocking: a stop signal sent to every
        # process (Ctrl-C in a terminal, a scheduler's SIGTERM) must not kill a worker, which would fail the
        # main process in the middle of its final save; the main process stops them (ltxf.faults).
        with _stop_signals_blocked():
            batches = iter(loader)
        try:
            for batch in batches:
                self._position = self.sampler.advance(self._position, 1)
                yield batch
        finally:
            _stop_workers(batches)

    def state_dict(self) -> dict[str, int]:
        """The position after the last batch handed out (plain ints)."""
        return dict(self._position)

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.sampler.load_state_dict(state)
        self._position = self.sampler.state_dict()


# ----------------------------------------------------------------------------------------------------------------
# Writing the official layout


def save_pt(data: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary name that does not end in ``.pt``, then rename: readers never see a partial
    file, and a crash leaves nothing a dataset would pick up."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        torch.save(data, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _latent_file(latents: torch.Tensor, fps: float, what: str, latent_channels: int) -> dict[str, Any]:
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[0] != latent_channels:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"{what} must be [{latent_channels}, F', H', W'], got {shape}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    _, num_frames, height, width = latents.shape
    return {
        "latents": latents.detach().to("cpu", torch.bfloat16).contiguous(),
        "num_frames": int(num_frames),
        "height": int(height),
        "width": int(width),
        "fps": float(fps),
    }


def write_precomputed_sample(
    root: str | Path,
    rel_path: str | Path,
    *,
    latents: torch.Tensor,
    fps: float,
    video_prompt_embeds: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    audio_prompt_embeds: torch.Tensor | None = None,
    audio_latents: torch.Tensor | None = None,
    audio_duration: float | None = None,
    reference_latents: torch.Tensor | None = None,
    dirs: Mapping[str, str] | None = None,
    latent_channels: int = LATENT_CHANNELS,
) -> dict[str, Path]:
    """Write one sample's files in the official layout, keys and dtypes, atomically (temp file + rename).

    ``root`` is the precomputed directory itself (e.g. ``<dataset>/.precomputed``); ``rel_path`` is the media
    path relative to the dataset file (``clips/a.mp4``), whose suffix becomes ``.pt``. Writes
    ``latents/`` (bf16 ``[128, F', H', W']`` + ``num_frames``, ``height``, ``width``, ``fps``), ``conditions/``
    (bf16 ``[S, Dv]`` / ``[S, Da]`` embeds, int64 ``[S]`` left-padded mask), and optionally ``audio_latents/``
    (fp32 ``[8, T, 16]`` + ``num_time_steps``, ``frequency_bins``, ``duration``; ``audio_duration`` defaults to
    ``T / 25`` seconds) and ``reference_latents/`` (like ``latents/``, with the target's fps). ``dirs`` renames
    folders per role. Returns the written path per role.
    """
    root = Path(root)
    rel = Path(rel_path)
    if rel.is_absolute() or ".." in rel.parts or not rel.name:
        raise ValueError(f"rel_path must be a relative path inside the dataset, got {rel_path!r}")
    rel = rel.with_suffix(".pt")
    names = {role: role for role in ROLES} | dict(dirs or {})

    mask = prompt_attention_mask
    if not isinstance(mask, torch.Tensor) or mask.ndim != 1:
        raise ValueError(f"prompt_attention_mask must be a 1-D tensor [S], got {mask!r:.80}")
    mask = mask.detach().to("cpu", torch.int64)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("prompt_attention_mask must hold only 0 and 1")
    num_real = int(mask.sum())
    if num_real and not bool(mask[-num_real:].all()):
        raise ValueError("prompt_attention_mask must be left-padded (zeros first, then the real tokens)")
    conditions: dict[str, Any] = {}
    for key, embeds in (("video_prompt_embeds", video_prompt_embeds), ("audio_prompt_embeds", audio_prompt_embeds)):
        if embeds is None:
            continue
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 2 or embeds.shape[0] != mask.shape[0]:
            shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"{key} must be [S, D] with S = {mask.shape[0]} (the mask length), got {shape}")
        conditions[key] = embeds.detach().to("cpu", torch.bfloat16).contiguous()
    conditions["prompt_attention_mask"] = mask.contiguous()

    files: dict[str, dict[str, Any]] = {
        "latents": _latent_file(latents, fps, "latents", latent_channels),
        "conditions": conditions,
    }
    if audio_latents is not None:
        if (
            not isinstance(audio_latents, torch.Tensor)
            or audio_latents.ndim != 3
            or audio_latents.shape[0] != AUDIO_LATENT_CHANNELS
            or audio_latents.shape[2] != AUDIO_FREQUENCY_BINS
        ):
            shape = tuple(audio_latents.shape) if isinstance(audio_latents, torch.Tensor) else type(audio_latents)
            raise ValueError(f"audio_latents must be [{AUDIO_LATENT_CHANNELS}, T, {AUDIO_FREQUENCY_BINS}], got {shape}")
        num_steps = int(audio_latents.shape[1])
        files["audio_latents"] = {
            "latents": audio_latents.detach().to("cpu", torch.float32).contiguous(),
            "num_time_steps": num_steps,
            "frequency_bins": AUDIO_FREQUENCY_BINS,
            "duration": float(audio_duration if audio_duration is not None else num_steps / 25.0),
        }
    elif audio_duration is not None:
        raise ValueError("audio_duration given without audio_latents")
    if reference_latents is not None:
        files["reference_latents"] = _latent_file(reference_latents, fps, "reference_latents", latent_channels)

    written = {}
    for role, data in files.items():
        path = root / names[role] / rel
        save_pt(data, path)
        written[role] = path
    return written


# ----------------------------------------------------------------------------------------------------------------
# Benchmarks


class DummyDataset(Dataset):
    """Random samples with the keys, shapes and dtypes of a real precomputed sample, for benchmarks.

    Shapes follow a pixel clip of ``num_frames`` x ``height`` x ``width`` (``F % 8 == 1``, multiples of 32); the
    audio length is what the audio VAE would produce for ``num_frames / fps`` seconds. ``num_text_tokens`` real
    tokens sit at the end of a ``text_length`` left-padded mask. Sample ``i`` is a pure function of ``(seed, i)``.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        num_frames: int = 25,
        height: int = 512,
        width: int = 768,
        fps: float = 24.0,
        with_audio: bool = True,
        with_reference: bool = False,
        reference_downscale_factor: int = 1,
        text_length: int = TEXT_MAX_TOKENS,
        num_text_tokens: int = 128,
        video_embed_dim: int = 3840,
        audio_embed_dim: int | None = 3840,
        latent_channels: int = LATENT_CHANNELS,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 0 < num_text_tokens <= text_length:
            raise ValueError(f"need 0 < num_text_tokens <= text_length, got {num_text_tokens}, {text_length}")
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.num_samples = num_samples
        self.video_shape = (latent_channels, *video_latent_size(num_frames, height, width))
        self.reference_shape = None
        if with_reference:
            if (
                reference_downscale_factor < 1
                or height % reference_downscale_factor
                or width % reference_downscale_factor
            ):
                raise ValueError(
                    f"reference_downscale_factor {reference_downscale_factor} must be >= 1 and divide {height}x{width}"
                )
            self.reference_shape = (
                latent_channels,
                *video_latent_size(
                    num_frames, height // reference_downscale_factor, width // reference_downscale_factor
                ),
            )
        self.audio_length = audio_latent_length(num_frames, fps) if with_audio else None
        self.fps = float(fps)
        self.text_length = text_length
        self.num_text_tokens = num_text_tokens
        self.video_embed_dim = video_embed_dim
        self.audio_embed_dim = audio_embed_dim
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def bucket_keys(self, *, audio_length_tolerance: int = 1) -> list[BucketKey]:
        del audio_length_tolerance  # every sample has the same shapes
        return [(self.video_shape, self.audio_length, self.reference_shape)] * self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        gen = torch.Generator().manual_seed(fold_in(self.seed, index, "dummy-dataset"))
        mask = torch.zeros(self.text_length, dtype=torch.bool)
        mask[self.text_length - self.num_text_tokens :] = True
        sample: dict[str, Any] = {
            "sample_id": f"dummy_{index:06d}",
            VIDEO_LATENTS: torch.randn(self.video_shape, generator=gen).to(torch.bfloat16),
            "fps": torch.tensor(self.fps, dtype=torch.float32),
            "video_prompt_embeds": torch.randn(self.text_length, self.video_embed_dim, generator=gen).to(
                torch.bfloat16
            ),
        }
        if self.audio_embed_dim is not None:
            sample["audio_prompt_embeds"] = torch.randn(self.text_length, self.audio_embed_dim, generator=gen).to(
                torch.bfloat16
            )
        sample["prompt_attention_mask"] = mask
        if self.audio_length is not None:
            sample[AUDIO_LATENTS] = torch.randn(
                AUDIO_LATENT_CHANNELS, self.audio_length, AUDIO_FREQUENCY_BINS, generator=gen
            )
        if self.reference_shape is not None:
            sample[REFERENCE_LATENTS] = torch.randn(self.reference_shape, generator=gen).to(torch.bfloat16)
            sample["reference_fps"] = torch.tensor(self.fps, dtype=torch.float32)
        return sample
