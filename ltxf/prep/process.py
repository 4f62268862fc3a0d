"""Preprocessing a dataset into the official ``.precomputed/`` layout, and decoding it back for inspection.

Stages (each a library function with its own CLI config, and all three chained by :func:`process_dataset`):

1. :func:`process_captions`: captions -> Gemma 3 hidden states -> the checkpoint's feature extractor ->
   ``conditions/<media>.pt`` (``video_prompt_embeds`` / ``audio_prompt_embeds`` bf16 ``[1024, D]``,
   ``prompt_attention_mask`` int64 ``[1024]``, left-padded).
2. :func:`process_videos`: each clip -> resolution bucket -> first F frames, resized to cover and cropped ->
   video VAE -> ``latents/<media>.pt`` (bf16 ``[128, F', H', W']`` + ``num_frames``/``height``/``width`` in latent
   units + ``fps``); with ``with_audio``, the audio track trimmed or zero-padded to exactly F/fps seconds -> audio
   VAE (fp32) -> ``audio_latents/<media>.pt`` (fp32 ``[8, T, 16]`` + ``num_time_steps``/``frequency_bins``/
   ``duration``); with a reference column (IC-LoRA), the reference clip in the target's bucket scaled down by
   ``reference_downscale_factor`` -> ``reference_latents/<media>.pt``, named after the TARGET media.
3. :func:`decode_latents` (``--decode``): latents back to ``decoded_videos/`` (MP4, or PNG for one frame),
   ``decoded_reference_videos/`` and ``decoded_audio/`` (WAV at the vocoder's rate): what the model trains on.

Every output is written atomically (temporary name, then rename) and skipped when it already exists, so an
interrupted run resumes (``overwrite=True`` recomputes). Under ``torchrun`` each process takes the samples
``i`` with ``i % WORLD_SIZE == RANK`` (read from the environment; no process group is created).

Bad input never stops a run: an unreadable or empty file, a clip with fewer frames than every bucket, a reference
that is too short, is reported per file and counted in the :class:`PrepSummary` logged at the end; a missing
audio track is reported and the clip is kept without audio latents. The CLIs exit non-zero when no sample has
its outputs.
"""

from __future__ import annotations

import gc
import logging
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import tyro

from ltxf import media
from ltxf.config import torch_dtype
from ltxf.data import save_pt
from ltxf.models.pack import CONDITIONS_TEXT_ENCODER_KEY
from ltxf.monitor import Progress
from ltxf.prep.buckets import Bucket, choose_bucket, fit_to_bucket, format_buckets, parse_buckets
from ltxf.prep.captions import prepare_caption
from ltxf.prep.dataset_file import (
    DEFAULT_CAPTION_COLUMN,
    DEFAULT_MEDIA_COLUMN,
    VIDEO_COLUMN,
    DatasetEntry,
    read_dataset,
)

logger = logging.getLogger(__name__)

PRECOMPUTED_DIR_NAME = ".precomputed"
DTypeName = Literal["auto", "bfloat16", "float32"]
SPATIAL_TILE_PX, SPATIAL_TILE_OVERLAP_PX = 512, 128
TEMPORAL_TILE_FRAMES, TEMPORAL_TILE_OVERLAP_FRAMES = 128, 24
AUDIO_FREQUENCY_BINS = 16


# -------------------------------------------------------------------------------------------------------------
# Bookkeeping


@dataclass(kw_only=True)
class PrepSummary:
    """What a stage did, per sample (samples are named by their relative media path)."""

    stage: str
    processed: list[str] = field(default_factory=list)
    """Samples whose outputs were written by this run."""
    existing: list[str] = field(default_factory=list)
    """Samples whose outputs were already there (resume)."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """``(sample, reason)`` for samples that produced nothing."""
    without_audio: list[str] = field(default_factory=list)
    """Clips kept without audio latents (no audio track, or it could not be read)."""

    @property
    def num_usable(self) -> int:
        return len(self.processed) + len(self.existing)

    def log(self) -> None:
        logger.info("%s: %d processed, %d already done, %d skipped%s", self.stage, len(self.processed),
                    len(self.existing), len(self.skipped),
                    f", {len(self.without_audio)} without audio" if self.without_audio else "")
        for name, reason in self.skipped:
            logger.info("  skipped %s: %s", name, reason)

    def merged(self, other: PrepSummary) -> PrepSummary:
        return PrepSummary(
            stage=f"{self.stage} + {other.stage}",
            processed=self.processed + other.processed,
            existing=self.existing + other.existing,
            skipped=self.skipped + other.skipped,
            without_audio=self.without_audio + other.without_audio,
        )


def rank_and_world_size() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` from the environment torchrun sets, ``(0, 1)`` without it."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise ValueError(f"RANK / WORLD_SIZE must be integers, got {os.environ.get('RANK')!r}, "
                         f"{os.environ.get('WORLD_SIZE')!r}") from exc
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid RANK={rank} for WORLD_SIZE={world}")
    return rank, world


def shard(entries: Sequence[DatasetEntry], rank: int, world_size: int) -> list[DatasetEntry]:
    """This process's share: entries ``i`` with ``i % world_size == rank``."""
    return [e for e in entries if e.index % world_size == rank]


def resolve_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_dtype(name: DTypeName, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA (as the official scripts), float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch_dtype(name)


def output_file(root: Path, entry: DatasetEntry, suffix: str = ".pt") -> Path:
    return root / Path(entry.rel_path.as_posix()).with_suffix(suffix)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------------------------
# Captions


def encode_captions(
    entries: Sequence[DatasetEntry],
    output_dir: str | Path,
    *,
    text_encoder: Any,
    embeddings_processor: torch.nn.Module,
    batch_size: int = 8,
    lora_trigger: str | None = None,
    remove_llm_prefixes: bool = False,
    overwrite: bool = False,
) -> PrepSummary:
    """Encode the entries' captions with loaded models and write ``<output_dir>/<media>.pt`` conditions files.

    ``text_encoder`` is a :class:`ltxf.models.gemma.GemmaTextEncoder`; ``embeddings_processor`` an
    :class:`ltxf.models.text.EmbeddingsProcessor` with its feature extractor. Prompts are encoded
    ``batch_size`` at a time (left padding makes batching exact).
    """
    output_dir = Path(output_dir)
    summary = PrepSummary(stage="captions")
    todo: list[tuple[DatasetEntry, str]] = []
    for entry in entries:
        name = entry.rel_path.as_posix()
        if entry.caption is None:
            summary.skipped.append((name, f"{entry.location}: no caption"))
        elif output_file(output_dir, entry).exists() and not overwrite:
            summary.existing.append(name)
        else:
            todo.append((entry, prepare_caption(entry.caption, lora_trigger=lora_trigger,
                                                remove_llm_prefixes=remove_llm_prefixes)))
    progress = Progress(len(todo), "captions", log=logger)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        with torch.inference_mode():
            features = text_encoder.encode_text([prompt for _, prompt in batch], embeddings_processor)
        for i, (entry, _) in enumerate(batch):
            # clone(): a row of the batch may still be a view of the whole batch (CPU, bf16), and torch.save
            # writes a view's entire storage.
            video = features.video_prompt_embeds[i].to("cpu", torch.bfloat16).clone()
            same = features.audio_prompt_embeds is features.video_prompt_embeds
            audio = video if same else features.audio_prompt_embeds[i].to("cpu", torch.bfloat16).clone()
            data = {
                "video_prompt_embeds": video,
                "audio_prompt_embeds": audio,
                "prompt_attention_mask": features.prompt_attention_mask[i].to("cpu", torch.int64).clone(),
            }
            identity = getattr(text_encoder, "identity", None)
            if identity is not None:  # which Gemma made these features (the official reader ignores the key)
                data[CONDITIONS_TEXT_ENCODER_KEY] = identity
            save_pt(data, output_file(output_dir, entry))
            summary.processed.append(entry.rel_path.as_posix())
        progress.advance(len(batch))
    progress.finish()
    return summary


def load_text_models(
    model_path: Path, text_encoder_path: Path, *, device: torch.device, dtype: torch.dtype, load_in_8bit: bool
) -> tuple[Any, torch.nn.Module]:
    """The Gemma text encoder (a Gemma 3 directory or an LTX-2.5 packed file, checked to pair with the
    transformer) and the checkpoint's text embeddings processor, on ``device``."""
    from ltxf.models.gemma import load_text_encoder
    from ltxf.models.pack import check_gemma_pairing
    from ltxf.models.text import load_embeddings_processor

    check_gemma_pairing(model_path, text_encoder_path)
    text_encoder = load_text_encoder(text_encoder_path, dtype=dtype, device=device, load_in_8bit=load_in_8bit)
    processor = load_embeddings_processor(
        model_path, dtype, device, with_feature_extractor=True,
        gemma_hidden_size=text_encoder.model.config.hidden_size,
        gemma_num_hidden_states=text_encoder.num_hidden_states, text_encoder_path=text_encoder_path,
    )
    return text_encoder, processor


@dataclass(frozen=True, kw_only=True)
class ProcessCaptionsConfig:
    """Encode the captions of a dataset file into ``conditions`` files (Gemma 3 + the checkpoint's feature
    extractor), one ``<media path>.pt`` per sample under ``--output_dir``."""

    dataset_file: Annotated[Path, tyro.conf.Positional]
    """Dataset file (.csv, .json or .jsonl) with caption and media-path columns; paths relative to it."""
    output_dir: Path
    """Where the conditions files go (mirrors the media paths)."""
    model_path: Path
    """Official LTX-2 / LTX-2.3 checkpoint (.safetensors) holding the text feature extractor."""
    text_encoder_path: Path
    """Local Gemma 3 model directory (weights + tokenizer), or the LTX-2.5 packed text-encoder file."""
    caption_column: str = DEFAULT_CAPTION_COLUMN
    """Column holding the captions."""
    media_column: str = DEFAULT_MEDIA_COLUMN
    """Column holding the media paths (names the output files)."""
    batch_size: int = 8
    """Prompts encoded per Gemma forward pass."""
    device: str | None = None
    """Torch device; default: cuda when available, else cpu."""
    dtype: DTypeName = "auto"
    """Weight dtype of Gemma and the feature extractor; auto = bfloat16 on CUDA, float32 on CPU."""
    lora_trigger: str | None = None
    """Text prepended (with a space) to every caption."""
    remove_llm_prefixes: bool = False
    """Remove openings such as 'The video shows' / 'In this video,' that captioning models add."""
    load_text_encoder_in_8bit: bool = False
    """Load Gemma with bitsandbytes 8-bit weights (CUDA only)."""
    overwrite: bool = False
    """Recompute files that already exist (default: skip them, which resumes an interrupted run)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def process_captions(config: ProcessCaptionsConfig) -> PrepSummary:
    """Load Gemma and the feature extractor, then :func:`encode_captions` this process's share of the dataset."""
    entries = read_dataset(config.dataset_file, caption_column=config.caption_column,
                           media_column=config.media_column)
    rank, world = rank_and_world_size()
    mine = shard(entries, rank, world)
    output_dir = Path(config.output_dir)
    todo = [e for e in mine if config.overwrite or not output_file(output_dir, e).exists()]
    if not todo:
        return encode_captions(mine, output_dir, text_encoder=None, embeddings_processor=None,  # type: ignore[arg-type]
                               batch_size=config.batch_size)
    device = resolve_device(config.device)
    text_encoder, processor = load_text_models(
        config.model_path, config.text_encoder_path, device=device, dtype=resolve_dtype(config.dtype, device),
        load_in_8bit=config.load_text_encoder_in_8bit,
    )
    if config.lora_trigger:
        logger.info("prepending the LoRA trigger %r to every caption", config.lora_trigger.strip())
    try:
        return encode_captions(
            mine, output_dir, text_encoder=text_encoder, embeddings_processor=processor,
            batch_size=config.batch_size, lora_trigger=config.lora_trigger,
            remove_llm_prefixes=config.remove_llm_prefixes, overwrite=config.overwrite,
        )
    finally:
        del text_encoder, processor
        _free_memory()


# -------------------------------------------------------------------------------------------------------------
# Media


@dataclass(frozen=True, kw_only=True)
class LoadedClip:
    """A clip fitted to its bucket."""

    video: torch.Tensor
    """float32 ``[3, F, H, W]`` in ``[-1, 1]``."""
    fps: float
    bucket: Bucket
    is_image: bool


def load_clip(
    path: Path,
    buckets: Sequence[Bucket],
    *,
    anchor: tuple[float, float] | None = None,
) -> LoadedClip:
    """Read ``path``, pick its bucket, and fit the frames into it. Raises ``ValueError`` naming the file when it
    cannot be read or has fewer frames than every bucket."""
    info = media.probe_video(path)
    bucket = choose_bucket(buckets, width=info.width, height=info.height, num_frames=info.num_frames)
    if bucket is None:
        raise ValueError(
            f"{path}: has {info.num_frames} frame(s), fewer than every bucket ({format_buckets(buckets)}) needs"
        )
    video = media.read_video(path, max_frames=bucket.num_frames)
    if video.num_frames < bucket.num_frames:
        # The container's frame count was optimistic; choose again with what actually decoded.
        bucket = choose_bucket(buckets, width=video.width, height=video.height, num_frames=video.num_frames)
        if bucket is None:
            raise ValueError(f"{path}: only {video.num_frames} frame(s) decode, fewer than every bucket needs")
        video = media.Video(frames=video.frames[: bucket.num_frames], fps=video.fps)
    return LoadedClip(video=fit_to_bucket(video.frames, bucket, anchor=anchor), fps=video.fps, bucket=bucket,
                      is_image=info.is_image)


def load_clip_in_bucket(path: Path, bucket: Bucket, *, anchor: tuple[float, float] | None = None) -> torch.Tensor:
    """Fit ``path`` into a given bucket (IC-LoRA references follow their target's bucket)."""
    video = media.read_video(path, max_frames=bucket.num_frames)
    if video.num_frames < bucket.num_frames:
        raise ValueError(f"{path}: has {video.num_frames} frame(s), the reference needs {bucket.num_frames} "
                         f"(bucket {bucket})")
    return fit_to_bucket(video.frames, bucket, anchor=anchor)


def fitted_waveform(path: Path, duration: float) -> tuple[torch.Tensor, int]:
    """The audio of ``path`` at its own rate and channels, trimmed or zero-padded to exactly ``duration`` seconds
    (``int(duration * rate)`` samples, as the official preprocessing)."""
    audio = media.read_audio(path, max_duration=duration + 1.0)
    target = int(duration * audio.sample_rate)
    waveform = audio.waveform[:, :target]
    if waveform.shape[1] < target:
        logger.warning("%s: audio is %.3fs long, zero-padded to the clip's %.3fs", path, audio.duration, duration)
        waveform = torch.nn.functional.pad(waveform, (0, target - waveform.shape[1]))
    return waveform, audio.sample_rate


def _video_latent_file(latents_BCFHW: torch.Tensor, fps: float) -> dict[str, Any]:
    latents = latents_BCFHW[0].to("cpu", torch.bfloat16).clone()
    _, num_frames, height, width = latents.shape
    return {"latents": latents, "num_frames": int(num_frames), "height": int(height), "width": int(width),
            "fps": float(fps)}


def _audio_latent_file(audio_encoder: torch.nn.Module, waveform: torch.Tensor, rate: int) -> dict[str, Any]:
    from ltxf.models.audio_vae import encode_audio

    latents = encode_audio(audio_encoder, waveform, rate)[0].to("cpu", torch.float32).clone()
    return {"latents": latents, "num_time_steps": int(latents.shape[1]), "frequency_bins": int(latents.shape[2]),
            "duration": waveform.shape[1] / rate}


def causal_frame_groups(num_frames: int, temporal_factor: int = 8) -> list[range]:
    """Pixel frames behind each latent frame of the causal video VAE: ``[0], [1..8], [9..16], ...``."""
    groups = [range(0, 1)]
    for start in range(1, num_frames, temporal_factor):
        groups.append(range(start, min(start + temporal_factor, num_frames)))
    return groups


def video_mask_latent(mask_FHW: torch.Tensor, *, spatial_factor: int = 32, temporal_factor: int = 8) -> torch.Tensor:
    """A pixel mask ``[F, H, W]`` in ``[0, 1]`` (bright = kept) -> float32 ``{0, 1}`` ``[F', H', W']``.

    Each latent cell is the mean over its ``spatial_factor`` x ``spatial_factor`` pixels, then the maximum over the
    pixel frames the causal VAE puts in that latent frame (``[0], [1..8], ...``; the official tool groups
    ``[0..7], [8..15], ...``, one frame off the latents), then ``> 0.5`` (conditioning)."""
    pooled_FHW = torch.nn.functional.avg_pool2d(mask_FHW.float()[:, None], spatial_factor)[:, 0]
    groups = causal_frame_groups(mask_FHW.shape[0], temporal_factor)
    grouped = torch.stack([pooled_FHW[g.start:g.stop].amax(dim=0) for g in groups])
    return (grouped > 0.5).float()


def load_video_mask(path: Path, bucket: Bucket, *, anchor: tuple[float, float] | None = None) -> torch.Tensor:
    """A mask image or video -> float32 ``[F', H', W']`` for a clip in ``bucket``: fitted (cover + crop) exactly like
    the clip so it stays aligned, grayscale (channel mean), an image repeated over every frame, a short video's
    last frame repeated; then :func:`video_mask_latent`."""
    frames = media.read_video(path, max_frames=bucket.num_frames).frames
    if frames.shape[0] < bucket.num_frames:
        frames = torch.cat([frames, frames[-1:].expand(bucket.num_frames - frames.shape[0], -1, -1, -1)])
    fitted_CFHW = fit_to_bucket(frames, bucket, anchor=anchor)
    return video_mask_latent((fitted_CFHW.mean(dim=0) + 1.0) / 2.0)


def load_audio_mask(path: Path, num_time_steps: int) -> torch.Tensor:
    """An audio mask -> float32 ``{0, 1}`` ``[T]`` (1 = kept): a ``.pt`` tensor (key ``mask`` or its first value),
    flattened and resized (nearest) to ``T`` as officially; or a sound file whose mean ``|waveform|`` over each
    latent step's window (over channels) exceeds 0.5 (the official tool samples single waveform points)."""
    if path.suffix.lower() == ".pt":
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is a per-sample problem
            raise ValueError(f"{path}: cannot be read as a mask ({exc})") from exc
        if isinstance(data, dict):
            data = data["mask"] if "mask" in data else next(iter(data.values()), None)
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            raise ValueError(f"{path}: expected a tensor (or a dict with 'mask'), got {type(data).__name__}")
        values = torch.nn.functional.interpolate(data.float().flatten()[None, None], size=num_time_steps,
                                                 mode="nearest")[0, 0]
    else:
        waveform = media.read_audio(path).waveform.abs().mean(dim=0)
        values = torch.nn.functional.adaptive_avg_pool1d(waveform[None, None], num_time_steps)[0, 0]
    return (values > 0.5).float()


def subsample_reference(video_CFHW: torch.Tensor, temporal_factor: int) -> torch.Tensor:
    """Keep frame 0 then every ``temporal_factor``-th frame (official ``--reference-temporal-scale-factor``)."""
    return video_CFHW[:, ::temporal_factor]


def encode_video_latents(encoder: torch.nn.Module, video_CFHW: torch.Tensor, *, tiling: bool) -> torch.Tensor:
    """One clip ``[3, F, H, W]`` -> latents ``[1, C, F', H', W']`` (optionally spatially tiled, 512/128 px)."""
    from ltxf.models.video_vae import encode_video

    if tiling:
        return encoder.tiled_encode(video_CFHW[None], tile_size_px=SPATIAL_TILE_PX,
                                    tile_overlap_px=SPATIAL_TILE_OVERLAP_PX)
    return encode_video(encoder, video_CFHW[None])


def _crop_anchor(mode: str, seed: int, entry: DatasetEntry) -> tuple[float, float] | None:
    if mode == "center":
        return None
    # A per-sample generator: the crop does not depend on the rank count or on which samples were done before.
    generator = torch.Generator().manual_seed(seed ^ zlib.crc32(entry.rel_path.as_posix().encode()))
    u = torch.rand(2, generator=generator)
    return float(u[0]), float(u[1])


@dataclass(frozen=True, kw_only=True)
class OutputDirs:
    """Where :func:`encode_media` writes (None: that output is not made)."""

    latents: Path
    audio: Path | None = None
    reference: Path | None = None
    reference_audio: Path | None = None
    video_masks: Path | None = None
    audio_masks: Path | None = None

    @classmethod
    def official(cls, root: Path, *, audio: bool = True) -> OutputDirs:
        """The official 1.2 layout under ``root`` (``.precomputed``)."""
        return cls(latents=root / "latents", audio=root / "audio_latents" if audio else None,
                   reference=root / "reference_latents", reference_audio=root / "reference_audio_latents",
                   video_masks=root / "video_masks", audio_masks=root / "audio_masks")


def choose_audio_duration(durations: Sequence[float], available: float) -> float | None:
    """The longest of ``durations`` (seconds) that ``available`` seconds of audio fill, or None."""
    fitting = [d for d in durations if d <= available + 1e-6]
    return max(fitting) if fitting else None


def encode_media(
    entries: Sequence[DatasetEntry],
    *,
    buckets: Sequence[Bucket],
    latents_dir: str | Path,
    video_encoder: torch.nn.Module | None,
    audio_encoder: torch.nn.Module | None = None,
    audio_dir: str | Path | None = None,
    reference_dir: str | Path | None = None,
    reference_downscale_factor: int = 1,
    reference_temporal_scale_factor: int = 1,
    reshape_mode: Literal["center", "random"] = "center",
    seed: int = 0,
    tiling: bool = False,
    overwrite: bool = False,
    extra_dirs: OutputDirs | None = None,
    audio_durations: Sequence[float] = (),
) -> PrepSummary:
    """Encode clips (and their audio / IC-LoRA references / masks) with loaded encoders into the official files.

    Audio is encoded when ``audio_encoder`` and ``audio_dir`` are given: the row's ``audio`` file if it has one,
    else the clip's own track, cut to the clip's F/fps seconds. References when ``reference_dir`` is given
    (entries must carry ``reference_path``), scaled down in space by ``reference_downscale_factor`` and in time by
    ``reference_temporal_scale_factor`` (frame 0, then every S-th; its ``fps`` is the clip's / S). ``extra_dirs``
    adds the flexible strategy's inputs for rows that have the columns: ``reference_audio_latents/``,
    ``video_masks/`` and ``audio_masks/``. Audio-only rows (no video column) are cut to the longest of
    ``audio_durations`` that they fill. Random crops use one offset per sample, shared by target, reference and
    mask, derived from ``seed`` and the media path.
    """
    latents_dir = Path(latents_dir)
    audio_dir = None if audio_dir is None or audio_encoder is None else Path(audio_dir)
    reference_dir = None if reference_dir is None else Path(reference_dir)
    extra = extra_dirs or OutputDirs(latents=latents_dir)
    summary = PrepSummary(stage="videos")
    progress = Progress(len(entries), "videos", log=logger)
    for entry in entries:
        name = entry.rel_path.as_posix()
        outputs = {
            "video": output_file(latents_dir, entry) if entry.has_video else None,
            "audio": None if audio_dir is None else output_file(audio_dir, entry),
            "reference": None if reference_dir is None or entry.reference_path is None
            else output_file(reference_dir, entry),
            "reference_audio": None if extra.reference_audio is None or entry.reference_audio_path is None
            or audio_encoder is None else output_file(extra.reference_audio, entry),
            "video_mask": None if extra.video_masks is None or entry.video_mask_path is None or not entry.has_video
            else output_file(extra.video_masks, entry),
            "audio_mask": None if extra.audio_masks is None or entry.audio_mask_path is None or audio_dir is None
            else output_file(extra.audio_masks, entry),
        }
        todo = {key for key, path in outputs.items() if path is not None and (overwrite or not path.exists())}
        if "audio" in todo and entry.has_video and entry.audio_path is None and not (todo - {"audio"}) \
                and not _has_audio_track(entry.media_path):
            # Resuming: the clip is done and simply has no audio; do not decode it again to find that out.
            todo.discard("audio")
            summary.without_audio.append(name)
        if not todo:
            summary.existing.append(name)
            progress.advance()
            continue
        try:
            if entry.has_video:
                _encode_video_entry(entry, todo, outputs, summary, buckets=buckets, video_encoder=video_encoder,
                                    audio_encoder=audio_encoder, reference_downscale_factor=reference_downscale_factor,
                                    reference_temporal_scale_factor=reference_temporal_scale_factor,
                                    anchor=_crop_anchor(reshape_mode, seed, entry), tiling=tiling)
            else:
                _encode_audio_entry(entry, todo, outputs, audio_encoder=audio_encoder, durations=audio_durations)
        except ValueError as exc:
            logger.warning("skipping %s: %s", name, exc)
            summary.skipped.append((name, str(exc)))
            progress.advance()
            continue
        summary.processed.append(name)
        progress.advance()
    progress.finish()
    return summary


def _write_audio_mask(entry: DatasetEntry, audio_out: Path, mask_out: Path) -> None:
    num_time_steps = int(torch.load(audio_out, map_location="cpu", weights_only=True)["num_time_steps"])
    save_pt({"mask": load_audio_mask(entry.audio_mask_path, num_time_steps)}, mask_out)


def _encode_video_entry(
    entry: DatasetEntry, todo: set[str], outputs: dict[str, Path | None], summary: PrepSummary, *,
    buckets: Sequence[Bucket], video_encoder: torch.nn.Module, audio_encoder: torch.nn.Module | None,
    reference_downscale_factor: int, reference_temporal_scale_factor: int, anchor: tuple[float, float] | None,
    tiling: bool,
) -> None:
    name = entry.rel_path.as_posix()
    clip = load_clip(entry.media_path, buckets, anchor=anchor)
    duration = clip.bucket.num_frames / clip.fps
    reference_video = None
    if "reference" in todo:
        reference_bucket = clip.bucket.scaled_down(reference_downscale_factor)
        reference_video = subsample_reference(load_clip_in_bucket(entry.reference_path, reference_bucket,
                                                                  anchor=anchor), reference_temporal_scale_factor)
    if "video" in todo:
        save_pt(_video_latent_file(encode_video_latents(video_encoder, clip.video, tiling=tiling), clip.fps),
                outputs["video"])
    if reference_video is not None:
        latents = encode_video_latents(video_encoder, reference_video, tiling=tiling)
        save_pt(_video_latent_file(latents, clip.fps / reference_temporal_scale_factor), outputs["reference"])
    if "video_mask" in todo:
        save_pt({"mask": load_video_mask(entry.video_mask_path, clip.bucket, anchor=anchor)}, outputs["video_mask"])
    if "reference_audio" in todo:
        waveform, rate = fitted_waveform(entry.reference_audio_path, duration)
        save_pt(_audio_latent_file(audio_encoder, waveform, rate), outputs["reference_audio"])
    if "audio" in todo:
        source = entry.audio_path or entry.media_path
        if entry.audio_path is None and (clip.is_image or not _has_audio_track(entry.media_path)):
            logger.warning("%s: no audio track; video latents written, no audio latents", entry.media_path)
            summary.without_audio.append(name)
            return
        try:
            waveform, rate = fitted_waveform(source, duration)
        except ValueError as exc:
            if entry.audio_path is not None:
                raise
            # As in the official tool, a clip whose audio cannot be read is kept without audio latents.
            logger.warning("%s: audio unreadable (%s); video latents written, no audio latents", source, exc)
            summary.without_audio.append(name)
            return
        save_pt(_audio_latent_file(audio_encoder, waveform, rate), outputs["audio"])
    if outputs["audio_mask"] is not None and ("audio_mask" in todo or "audio" in todo) and outputs["audio"].exists():
        _write_audio_mask(entry, outputs["audio"], outputs["audio_mask"])


def _encode_audio_entry(
    entry: DatasetEntry, todo: set[str], outputs: dict[str, Path | None], *, audio_encoder: torch.nn.Module | None,
    durations: Sequence[float],
) -> None:
    """An audio-only row: the audio cut to the longest ``--audio_durations`` bucket it fills."""
    if audio_encoder is None or outputs["audio"] is None:
        raise ValueError(f"{entry.location}: an audio-only row (no video column) needs audio encoding (drop "
                         "--skip_audio True)")
    if not durations:
        raise ValueError(f"{entry.location}: an audio-only row needs --audio_durations (seconds, e.g. '2.0;4.0')")
    audio = media.read_audio(entry.media_path, max_duration=max(durations) + 1.0)
    duration = choose_audio_duration(durations, audio.duration)
    if duration is None:
        raise ValueError(f"{entry.media_path}: {audio.duration:.3f}s of audio, shorter than every --audio_durations "
                         f"bucket {sorted(durations)}")
    if "audio" in todo:
        waveform = audio.waveform[:, : int(duration * audio.sample_rate)]
        save_pt(_audio_latent_file(audio_encoder, waveform, audio.sample_rate), outputs["audio"])
    if "reference_audio" in todo:
        waveform, rate = fitted_waveform(entry.reference_audio_path, duration)
        save_pt(_audio_latent_file(audio_encoder, waveform, rate), outputs["reference_audio"])
    if outputs["audio_mask"] is not None and ("audio_mask" in todo or "audio" in todo):
        _write_audio_mask(entry, outputs["audio"], outputs["audio_mask"])


def _has_audio_track(path: Path) -> bool:
    if media.is_image_path(path):
        return False
    try:
        return media.has_audio(path)
    except ValueError:
        return False


def media_problem(entry: DatasetEntry, buckets: Sequence[Bucket]) -> str | None:
    """Why a sample cannot be processed, judged from the file headers (None when it looks fine): the media or the
    reference cannot be opened, or the clip has fewer frames than every bucket."""
    if not entry.has_video:
        return None  # audio-only rows are checked when their audio is read
    try:
        info = media.probe_video(entry.media_path)
        if choose_bucket(buckets, width=info.width, height=info.height, num_frames=info.num_frames) is None:
            return (f"{entry.media_path}: has {info.num_frames} frame(s), fewer than every bucket "
                    f"({format_buckets(buckets)}) needs")
        if entry.reference_path is not None:
            media.probe_video(entry.reference_path)
    except ValueError as exc:
        return str(exc)
    return None


def check_reference_factor(factor: int, buckets: Sequence[Bucket], has_reference: bool) -> int:
    """Validate ``reference_downscale_factor`` as the official scripts do; returns the factor to use."""
    if factor < 1:
        raise ValueError(f"reference_downscale_factor must be >= 1, got {factor}")
    if not has_reference:
        if factor != 1:
            logger.warning("reference_downscale_factor=%d is ignored: there is no reference column", factor)
        return 1
    if factor > 1 and len(buckets) > 1:
        raise ValueError(f"reference_downscale_factor={factor} needs a single resolution bucket, got "
                         f"{format_buckets(buckets)}")
    for bucket in buckets:
        bucket.scaled_down(factor)
    return factor


def check_reference_temporal_factor(factor: int, buckets: Sequence[Bucket]) -> int:
    """``--reference_temporal_scale_factor``: >= 1; above 1 a single bucket whose ``frames - 1`` is a multiple of
    ``8 * factor`` (the subsampled reference must be 8k + 1 frames for the VAE)."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"reference_temporal_scale_factor must be an integer >= 1, got {factor!r}")
    if factor > 1:
        if len(buckets) > 1:
            raise ValueError(f"reference_temporal_scale_factor={factor} needs a single resolution bucket, got "
                             f"{format_buckets(buckets)}")
        if (buckets[0].num_frames - 1) % (8 * factor):
            raise ValueError(f"reference_temporal_scale_factor={factor}: bucket {buckets[0]} has "
                             f"{buckets[0].num_frames} frames; frames - 1 must be a multiple of {8 * factor} so the "
                             "reference keeps 8k + 1 frames")
    return factor


def parse_audio_durations(spec: str | None) -> tuple[float, ...]:
    """``'2.0;4.0'`` -> (2.0, 4.0); None -> ()."""
    if spec is None or not spec.strip():
        return ()
    try:
        durations = tuple(float(part) for part in spec.split(";") if part.strip())
    except ValueError:
        raise ValueError(f"--audio_durations: expected seconds separated by ';' (e.g. '2.0;4.0'), got {spec!r}") \
            from None
    if not durations or any(not d > 0 for d in durations):
        raise ValueError(f"--audio_durations: every duration must be > 0, got {spec!r}")
    return durations


@dataclass(frozen=True, kw_only=True)
class ProcessVideosConfig:
    """Encode the media of a dataset file into video latents (and audio / IC-LoRA reference latents)."""

    dataset_file: Annotated[Path, tyro.conf.Positional]
    """Dataset file (.csv, .json or .jsonl) with a media-path column; paths relative to it."""
    resolution_buckets: str
    """Buckets as 'WxHxF;WxHxF' (W, H multiples of 32; F = 8k + 1), e.g. '768x512x49;512x512x97'."""
    output_dir: Path
    """Where the video latents go (mirrors the media paths)."""
    model_path: Path
    """Official LTX-2 / LTX-2.3 checkpoint (.safetensors) holding the video (and audio) VAE, or an LTX-2.5
    transformer file (then --video_vae_path / --audio_vae_path name the VAEs)."""
    video_vae_path: Path | None = None
    """Video VAE file (LTX-2.5 split pack); default: inside --model_path."""
    audio_vae_path: Path | None = None
    """Audio VAE file (LTX-2.5 split pack); default: inside --model_path."""
    video_column: str = DEFAULT_MEDIA_COLUMN
    """Column holding the media paths."""
    device: str | None = None
    """Torch device; default: cuda when available, else cpu."""
    vae_dtype: DTypeName = "auto"
    """Video VAE dtype; auto = bfloat16 on CUDA (as the official scripts), float32 on CPU. The audio VAE is
    always float32."""
    vae_tiling: bool = False
    """Encode in overlapping 512 px tiles (128 px overlap) to save memory on large frames."""
    reshape_mode: Literal["center", "random"] = "center"
    """Crop position after resizing: centre, or a random offset per sample (from --seed)."""
    seed: int = 0
    """Seed of the random crops."""
    with_audio: bool = False
    """Also encode each clip's audio track (trimmed/padded to the clip's F/fps seconds) with the audio VAE."""
    audio_output_dir: Path | None = None
    """Where audio latents go; required with --with_audio."""
    reference_column: str | None = None
    """IC-LoRA: column with the reference media; its latents go to --reference_output_dir under the TARGET's name."""
    reference_output_dir: Path | None = None
    """Where reference latents go; required with --reference_column."""
    reference_downscale_factor: int = 1
    """Encode references at the bucket's size divided by this (>1 needs a single bucket)."""
    overwrite: bool = False
    """Recompute files that already exist (default: skip them, which resumes an interrupted run)."""

    def __post_init__(self) -> None:
        parse_buckets(self.resolution_buckets)
        if self.with_audio and self.audio_output_dir is None:
            raise ValueError("--audio_output_dir is required with --with_audio")
        if self.reference_column is not None and self.reference_output_dir is None:
            raise ValueError("--reference_output_dir is required with --reference_column")


def load_media_encoders(
    model_path: Path, *, device: torch.device, dtype: torch.dtype, with_audio: bool,
    video_vae_path: Path | None = None, audio_vae_path: Path | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    from ltxf.models.audio_vae import load_audio_vae_encoder
    from ltxf.models.pack import resolve_pack
    from ltxf.models.video_vae import load_video_vae_encoder

    pack = resolve_pack(model_path, video_vae=video_vae_path, audio_vae=audio_vae_path)
    video_encoder = load_video_vae_encoder(pack.video_vae_file(), dtype, device)
    audio_encoder = load_audio_vae_encoder(pack.audio_vae_file(), torch.float32, device) if with_audio else None
    return video_encoder, audio_encoder


def process_videos(config: ProcessVideosConfig) -> PrepSummary:
    """Load the encoders, then :func:`encode_media` this process's share of the dataset."""
    buckets = parse_buckets(config.resolution_buckets)
    if len(buckets) > 1:
        logger.warning("several resolution buckets: train with batch_size 1 (or a bucketed sampler), since samples "
                       "of different buckets cannot be stacked")
    factor = check_reference_factor(config.reference_downscale_factor, buckets, config.reference_column is not None)
    entries = read_dataset(config.dataset_file, media_column=config.video_column,
                           reference_column=config.reference_column, require_captions=False)
    rank, world = rank_and_world_size()
    mine = shard(entries, rank, world)
    device = resolve_device(config.device)
    video_encoder, audio_encoder = load_media_encoders(
        config.model_path, device=device, dtype=resolve_dtype(config.vae_dtype, device), with_audio=config.with_audio,
        video_vae_path=config.video_vae_path, audio_vae_path=config.audio_vae_path,
    )
    try:
        return encode_media(
            mine, buckets=buckets, latents_dir=config.output_dir, video_encoder=video_encoder,
            audio_encoder=audio_encoder, audio_dir=config.audio_output_dir,
            reference_dir=config.reference_output_dir if config.reference_column else None,
            reference_downscale_factor=factor, reshape_mode=config.reshape_mode, seed=config.seed,
            tiling=config.vae_tiling, overwrite=config.overwrite,
        )
    finally:
        del video_encoder, audio_encoder
        _free_memory()


# -------------------------------------------------------------------------------------------------------------
# Decoding


def _read_latents(path: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many unrelated types for a bad file
        raise ValueError(f"{path}: cannot be read as a .pt file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("latents"), torch.Tensor):
        raise ValueError(f"{path}: expected a dict with a 'latents' tensor")
    return data["latents"], data


def video_latents_from_file(path: Path) -> tuple[torch.Tensor, float]:
    """``([C, F', H', W'], fps)`` from a latents file; legacy patchified ``[F'*H'*W', C]`` files are unpatchified
    with their ``num_frames``/``height``/``width`` keys. A missing ``fps`` reads as 24."""
    latents, data = _read_latents(path)
    if latents.ndim == 2:
        try:
            dims = [int(data[k]) for k in ("num_frames", "height", "width")]
        except KeyError as exc:
            raise ValueError(f"{path}: legacy 2-D latents need num_frames/height/width keys") from exc
        latents = latents.reshape(*dims, latents.shape[1]).permute(3, 0, 1, 2)
    if latents.ndim != 4:
        raise ValueError(f"{path}: 'latents' must be [C, F, H, W] (or legacy [F*H*W, C]), got {tuple(latents.shape)}")
    return latents, float(data.get("fps", 24.0))


@torch.inference_mode()
def decode_video_file(
    decoder: torch.nn.Module, path: Path, *, seed: int, tiling: bool
) -> tuple[torch.Tensor, float]:
    """A latents file -> uint8 frames ``[F, H, W, 3]`` and the stored fps."""
    from ltxf.models.video_vae import decode_video

    latents, fps = video_latents_from_file(path)
    param = next(decoder.parameters())
    generator = torch.Generator(param.device).manual_seed(seed)
    if tiling:
        video = decoder.tiled_decode(latents[None], tile_size_px=SPATIAL_TILE_PX,
                                     tile_overlap_px=SPATIAL_TILE_OVERLAP_PX, tile_frames=TEMPORAL_TILE_FRAMES,
                                     tile_overlap_frames=TEMPORAL_TILE_OVERLAP_FRAMES, generator=generator)
    else:
        video = decode_video(decoder, latents[None], generator=generator)
    frames = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().contiguous(), fps


def decode_video_dir(
    latents_dir: Path,
    output_dir: Path,
    *,
    decoder: torch.nn.Module,
    seed: int = 0,
    tiling: bool = False,
    overwrite: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> PrepSummary:
    """Decode every ``latents_dir/**/*.pt`` to ``output_dir`` (same relative paths; ``.mp4``, ``.png`` for one
    frame). The decoder noise (LTX-2) is drawn from ``seed`` for every file."""
    files = sorted(latents_dir.rglob("*.pt"))[rank::world_size]
    summary = PrepSummary(stage=f"decode {latents_dir.name}")
    progress = Progress(len(files), f"decoding {latents_dir.name}", log=logger)
    for path in files:
        rel = path.relative_to(latents_dir)
        name = rel.as_posix()
        try:
            mp4, png = output_dir / rel.with_suffix(".mp4"), output_dir / rel.with_suffix(".png")
            if (mp4.exists() or png.exists()) and not overwrite:
                summary.existing.append(name)
                continue
            frames, fps = decode_video_file(decoder, path, seed=seed, tiling=tiling)
            if frames.shape[0] == 1:
                media.write_image(png, frames[0])
            else:
                media.write_video(mp4, frames, fps)
            summary.processed.append(name)
        except ValueError as exc:
            logger.warning("skipping %s: %s", path, exc)
            summary.skipped.append((name, str(exc)))
        finally:
            progress.advance()
    progress.finish()
    return summary


def decode_audio_dir(
    audio_latents_dir: Path,
    output_dir: Path,
    *,
    decoder: torch.nn.Module,
    vocoder: torch.nn.Module,
    overwrite: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> PrepSummary:
    """Decode every ``audio_latents_dir/**/*.pt`` to a ``.wav`` under ``output_dir`` at the vocoder's rate."""
    from ltxf.models.vocoder import decode_audio

    files = sorted(audio_latents_dir.rglob("*.pt"))[rank::world_size]
    summary = PrepSummary(stage="decode audio")
    progress = Progress(len(files), "decoding audio", log=logger)
    for path in files:
        rel = path.relative_to(audio_latents_dir)
        name = rel.as_posix()
        try:
            out = output_dir / rel.with_suffix(".wav")
            if out.exists() and not overwrite:
                summary.existing.append(name)
                continue
            latents, _ = _read_latents(path)
            if latents.ndim != 3:
                raise ValueError(f"{path}: audio 'latents' must be [8, T, 16], got {tuple(latents.shape)}")
            waveform = decode_audio(decoder, vocoder, latents[None].float())[0].cpu()
            media.write_audio(out, waveform, int(vocoder.output_sample_rate))
            summary.processed.append(name)
        except ValueError as exc:
            logger.warning("skipping %s: %s", path, exc)
            summary.skipped.append((name, str(exc)))
        finally:
            progress.advance()
    progress.finish()
    return summary


@dataclass(frozen=True, kw_only=True)
class DecodeLatentsConfig:
    """Decode precomputed latents back to videos (and audio), mirroring the folder structure: a check of what the
    model will be trained on."""

    latents_dir: Annotated[Path, tyro.conf.Positional]
    """Folder of video latent .pt files (searched recursively), e.g. .precomputed/latents."""
    output_dir: Annotated[Path, tyro.conf.Positional]
    """Where the .mp4 files (.png for one-frame latents) go."""
    model_path: Path
    """Official LTX-2 / LTX-2.3 checkpoint (.safetensors) holding the VAE decoders and the vocoder, or an LTX-2.5
    transformer file with --video_vae_path / --audio_vae_path."""
    video_vae_path: Path | None = None
    """Video VAE file (LTX-2.5 split pack); default: inside --model_path."""
    audio_vae_path: Path | None = None
    """Audio VAE + vocoder file (LTX-2.5 split pack); default: inside --model_path."""
    device: str | None = None
    """Torch device; default: cuda when available, else cpu."""
    vae_dtype: DTypeName = "auto"
    """Video decoder dtype; auto = bfloat16 on CUDA, float32 on CPU."""
    vae_tiling: bool = False
    """Decode in tiles (512 px with 128 px overlap, 128 frames with 24 overlap) to save memory."""
    seed: int = 0
    """Seed of the noise the LTX-2 (timestep-conditioned) video decoder mixes into the latents."""
    with_audio: bool = False
    """Also decode audio latents to .wav with the audio VAE decoder and the vocoder."""
    audio_latents_dir: Path | None = None
    """Audio latents folder; default: the audio_latents folder next to LATENTS_DIR."""
    audio_output_dir: Path | None = None
    """Where .wav files go; default: decoded_audio next to OUTPUT_DIR."""
    overwrite: bool = False
    """Re-decode files whose outputs exist."""

    def pack(self) -> Any:
        """The :class:`ltxf.models.pack.ModelPack` the decoders come from."""
        from ltxf.models.pack import resolve_pack

        return resolve_pack(self.model_path, video_vae=self.video_vae_path, audio_vae=self.audio_vae_path)


def decode_latents(config: DecodeLatentsConfig) -> PrepSummary:
    """Decode ``config.latents_dir`` (and audio latents with ``with_audio``) with this process's share of files."""
    from ltxf.models.audio_vae import load_audio_vae_decoder
    from ltxf.models.video_vae import load_video_vae_decoder
    from ltxf.models.vocoder import load_vocoder

    latents_dir, output_dir = Path(config.latents_dir), Path(config.output_dir)
    if not latents_dir.is_dir():
        raise ValueError(f"latents folder {latents_dir} does not exist")
    rank, world = rank_and_world_size()
    device = resolve_device(config.device)
    pack = config.pack()
    decoder = load_video_vae_decoder(pack.video_decoder_file(), resolve_dtype(config.vae_dtype, device), device)
    summary = decode_video_dir(latents_dir, output_dir, decoder=decoder, seed=config.seed, tiling=config.vae_tiling,
                               overwrite=config.overwrite, rank=rank, world_size=world)
    del decoder
    _free_memory()
    if config.with_audio:
        audio_dir = Path(config.audio_latents_dir or latents_dir.parent / "audio_latents")
        if not audio_dir.is_dir():
            raise ValueError(f"audio latents folder {audio_dir} does not exist")
        audio_out = Path(config.audio_output_dir or output_dir.parent / "decoded_audio")
        audio_decoder = load_audio_vae_decoder(pack.audio_vae_file(), torch.float32, device)
        vocoder = load_vocoder(pack.audio_vae_file(), torch.float32, device)
        summary = summary.merged(decode_audio_dir(audio_dir, audio_out, decoder=audio_decoder, vocoder=vocoder,
                                                  overwrite=config.overwrite, rank=rank, world_size=world))
    return summary


# -------------------------------------------------------------------------------------------------------------
# The whole dataset


@dataclass(frozen=True, kw_only=True)
class ProcessDatasetConfig:
    """Turn an official 1.2 dataset file (columns caption, video, audio, reference_video, reference_audio,
    video_mask, audio_mask; legacy media_path / ref_media_path) into a training-ready .precomputed folder in the
    official layout: conditions/, latents/, audio_latents/ (unless --skip_audio True), and for the rows that have the
    columns reference_latents/, reference_audio_latents/, video_masks/, audio_masks/; decoded_* previews with
    --decode."""

    dataset_path: Annotated[Path, tyro.conf.Positional]
    """Dataset file (.csv, .json or .jsonl) with caption and media-path columns; paths relative to it."""
    resolution_buckets: str
    """Buckets as 'WxHxF;WxHxF' (W, H multiples of 32; F = 8k + 1), e.g. '768x512x49;512x512x97'."""
    model_path: Path
    """Official LTX-2 / LTX-2.3 checkpoint (.safetensors): VAEs, audio VAE, vocoder, text feature extractor; or
    the LTX-2.5 transformer file (with --video_vae_path, --audio_vae_path and the packed text encoder)."""
    text_encoder_path: Path
    """Local Gemma 3 model directory (weights + tokenizer), or the LTX-2.5 packed text-encoder file (it also holds
    the text feature extractor)."""
    video_vae_path: Path | None = None
    """Video VAE file (LTX-2.5 split pack; the conv or the diffusion-decoder VAE, whose encoder is the same conv
    encoder); default: inside --model_path."""
    audio_vae_path: Path | None = None
    """Audio VAE file (LTX-2.5 split pack); default: inside --model_path."""
    caption_column: str = DEFAULT_CAPTION_COLUMN
    """Column holding the captions."""
    video_column: str = VIDEO_COLUMN
    """Column holding the video paths (official 1.2 'video'; the legacy 'media_path' is read too)."""
    batch_size: int = 8
    """Prompts encoded per Gemma forward pass (media are encoded one clip at a time)."""
    device: str | None = None
    """Torch device; default: cuda when available, else cpu."""
    vae_dtype: DTypeName = "auto"
    """Video VAE dtype; auto = bfloat16 on CUDA, float32 on CPU. The audio VAE always runs in float32."""
    text_dtype: DTypeName = "auto"
    """Gemma and feature-extractor dtype; auto = bfloat16 on CUDA, float32 on CPU."""
    vae_tiling: bool = False
    """Encode (and decode) in overlapping tiles to save memory on large frames."""
    output_dir: Path | None = None
    """Output folder; default: .precomputed next to the dataset file."""
    reshape_mode: Literal["center", "random"] = "center"
    """Crop position after resizing: centre, or a random offset per sample (from --seed)."""
    seed: int = 0
    """Seed of the random crops and of the LTX-2 decoder noise (with --decode)."""
    lora_trigger: str | None = None
    """Text prepended (with a space) to every caption."""
    remove_llm_prefixes: bool = False
    """Remove openings such as 'The video shows' / 'In this video,' that captioning models add."""
    decode: bool = False
    """Also decode the latents to decoded_videos/ (+ decoded_reference_videos/, decoded_audio/) for inspection."""
    reference_column: str | None = None
    """IC-LoRA: column with the reference media (default: 'reference_video' or legacy 'ref_media_path' when the file
    has it); latents go to reference_latents/ under the TARGET's name."""
    reference_downscale_factor: int = 1
    """Encode references at the bucket size divided by this (>= 1; > 1 needs a single bucket)."""
    reference_temporal_scale_factor: int = 1
    """Encode references with frame 0 then every S-th frame (fps / S); > 1 needs a single bucket whose
    frames - 1 is a multiple of 8 * S."""
    skip_audio: bool = False
    """Do not encode audio. By default each row's audio (its 'audio' column, else the clip's own track, cut to the
    clip's F/fps seconds) goes to audio_latents/; clips without audio are reported and kept."""
    audio_durations: str | None = None
    """Audio-only datasets (rows with an 'audio' column and no video): duration buckets in seconds, e.g. '2.0;4.0';
    each file is cut to the longest bucket it fills."""
    load_text_encoder_in_8bit: bool = False
    """Load Gemma with bitsandbytes 8-bit weights (CUDA only)."""
    overwrite: bool = False
    """Recompute files that already exist (default: skip them, which resumes an interrupted run)."""

    def __post_init__(self) -> None:
        buckets = parse_buckets(self.resolution_buckets)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.reference_downscale_factor < 1:
            raise ValueError(f"reference_downscale_factor must be >= 1, got {self.reference_downscale_factor}")
        if self.reference_column is not None:
            check_reference_factor(self.reference_downscale_factor, buckets, True)
        check_reference_temporal_factor(self.reference_temporal_scale_factor, buckets)
        parse_audio_durations(self.audio_durations)

    @property
    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path(self.dataset_path).parent / PRECOMPUTED_DIR_NAME


def process_dataset(config: ProcessDatasetConfig) -> PrepSummary:
    """Captions, then media (video, audio, references), then optional decoding, for this process's share.

    Returns the combined summary; a sample is usable when both its conditions and its latents exist.
    """
    out = config.resolved_output_dir
    buckets = parse_buckets(config.resolution_buckets)
    if len(buckets) > 1:
        logger.warning("several resolution buckets: train with batch_size 1 (or a bucketed sampler), since samples "
                       "of different buckets cannot be stacked")
    entries = read_dataset(config.dataset_path, caption_column=config.caption_column, media_column=config.video_column,
                           reference_column=config.reference_column)
    factor = check_reference_factor(config.reference_downscale_factor, buckets,
                                    any(e.reference_path is not None for e in entries))
    rank, world = rank_and_world_size()
    mine = shard(entries, rank, world)
    logger.info("rank %d/%d: %d of %d samples -> %s", rank, world, len(mine), len(entries), out)
    device = resolve_device(config.device)

    # Unreadable media and clips shorter than every bucket are dropped before any model runs, so they cost no text
    # encoding and leave no orphan conditions file.
    precheck = PrepSummary(stage="media check")
    readable = []
    for entry in mine:
        problem = media_problem(entry, buckets)
        if problem is None:
            readable.append(entry)
        else:
            logger.warning("skipping %s: %s", entry.rel_path.as_posix(), problem)
            precheck.skipped.append((entry.rel_path.as_posix(), problem))

    captions = process_captions_for(readable, config, out / "conditions", device)
    with_audio = not config.skip_audio
    video_encoder, audio_encoder = load_media_encoders(
        config.model_path, device=device, dtype=resolve_dtype(config.vae_dtype, device), with_audio=with_audio,
        video_vae_path=config.video_vae_path, audio_vae_path=config.audio_vae_path,
    )
    has_reference = any(e.reference_path is not None for e in readable)
    try:
        videos = encode_media(
            readable, buckets=buckets, latents_dir=out / "latents", video_encoder=video_encoder,
            audio_encoder=audio_encoder, audio_dir=out / "audio_latents" if with_audio else None,
            reference_dir=out / "reference_latents" if has_reference else None,
            reference_downscale_factor=factor,
            reference_temporal_scale_factor=config.reference_temporal_scale_factor,
            reshape_mode=config.reshape_mode, seed=config.seed, tiling=config.vae_tiling, overwrite=config.overwrite,
            extra_dirs=OutputDirs.official(out, audio=with_audio),
            audio_durations=parse_audio_durations(config.audio_durations),
        )
    finally:
        del video_encoder, audio_encoder
        _free_memory()
    captions.log()
    videos.log()
    usable = set(captions.processed + captions.existing) & set(videos.processed + videos.existing)
    written = set(captions.processed + videos.processed)
    reasons = dict(precheck.skipped) | dict(captions.skipped) | dict(videos.skipped)
    names = [e.rel_path.as_posix() for e in mine]
    summary = PrepSummary(
        stage="process_dataset",
        processed=[n for n in names if n in usable and n in written],
        existing=[n for n in names if n in usable and n not in written],
        skipped=[(n, reasons.get(n, "incomplete outputs")) for n in names if n not in usable],
        without_audio=videos.without_audio,
    )
    if config.decode:
        decode = DecodeLatentsConfig(
            latents_dir=out / "latents", output_dir=out / "decoded_videos", model_path=config.model_path,
            video_vae_path=config.video_vae_path, audio_vae_path=config.audio_vae_path,
            device=config.device, vae_dtype=config.vae_dtype, vae_tiling=config.vae_tiling, seed=config.seed,
            with_audio=with_audio and (out / "audio_latents").is_dir(),
            audio_latents_dir=out / "audio_latents", audio_output_dir=out / "decoded_audio",
            overwrite=config.overwrite,
        )
        if (out / "latents").is_dir():
            decode_latents(decode).log()
        if has_reference and (out / "reference_latents").is_dir():
            from ltxf.models.video_vae import load_video_vae_decoder

            decoder = load_video_vae_decoder(decode.pack().video_decoder_file(),
                                             resolve_dtype(config.vae_dtype, device), device)
            decode_video_dir(out / "reference_latents", out / "decoded_reference_videos", decoder=decoder,
                             seed=config.seed, tiling=config.vae_tiling, overwrite=config.overwrite, rank=rank,
                             world_size=world).log()
            del decoder
            _free_memory()
    return summary


def process_captions_for(
    entries: Sequence[DatasetEntry], config: ProcessDatasetConfig, output_dir: Path, device: torch.device
) -> PrepSummary:
    """The caption stage of :func:`process_dataset`: loads the text models only when something is left to do."""
    todo = [
        e for e in entries if e.caption is not None and (config.overwrite or not output_file(output_dir, e).exists())
    ]
    if not todo:
        return encode_captions(entries, output_dir, text_encoder=None, embeddings_processor=None)  # type: ignore[arg-type]
    text_encoder, processor = load_text_models(
        config.model_path, config.text_encoder_path, device=device, dtype=resolve_dtype(config.text_dtype, device),
        load_in_8bit=config.load_text_encoder_in_8bit,
    )
    try:
        return encode_captions(
            entries, output_dir, text_encoder=text_encoder, embeddings_processor=processor,
            batch_size=config.batch_size, lora_trigger=config.lora_trigger,
            remove_llm_prefixes=config.remove_llm_prefixes, overwrite=config.overwrite,
        )
    finally:
        del text_encoder, processor
        _free_memory()


def exit_code(summary: PrepSummary) -> int:
    """Log the summary; 0 when at least one sample has its outputs (written now or before), 1 otherwise."""
    summary.log()
    if summary.num_usable == 0:
        logger.error("%s: nothing was produced (%d sample(s) skipped)", summary.stage, len(summary.skipped))
        return 1
    return 0
