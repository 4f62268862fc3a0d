"""Caption text: the official clean-ups before text encoding, and automatic captioning with a local multimodal model.

Before encoding (``process_captions``): ``--remove_llm_prefixes`` strips the first matching phrase of
:data:`LLM_PREFIXES` (after stripping whitespace), and ``--lora_trigger`` prepends the trigger word and a space.

Captioning (``caption_videos``): a :class:`Captioner` turns a :class:`MediaSample` (frames sampled at a fixed
rate, plus the audio track when wanted) into text. :class:`TransformersCaptioner` runs any local ``transformers``
image/video-text-to-text model whose processor has a chat template: frames go in as a video when the processor
has a video processor, otherwise as a sequence of images; audio goes in when the processor has an audio feature
extractor. Decoding is greedy. The prompt asks for the official sectioned caption ([VISUAL]/[SPEECH]/[SOUNDS]/
[TEXT], or [VISUAL]/[TEXT] without audio); :func:`clean_generated_caption` cuts hallucinated dialogue turns and
drops "The video shows ..."-style openings. :func:`caption_media` runs a captioner over files, resumable.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol

import numpy as np
import torch
import tyro

from ltxf import media
from ltxf.monitor import Progress
from ltxf.prep.dataset_file import (
    DEFAULT_CAPTION_COLUMN,
    DEFAULT_MEDIA_COLUMN,
    WRITABLE_SUFFIXES,
    check_dataset_suffix,
    read_records,
    relative_media_path,
    write_records,
)
from ltxf.prep.scenes import iter_video_frames

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# Caption text before encoding

_LLM_SUBJECTS = ("This video", "The video", "This clip", "The clip", "The animation", "This image", "The image",
                 "This picture", "The picture")  # fmt: skip
_LLM_VERBS = ("shows", "depicts", "features", "captures", "highlights", "introduces", "presents")
LLM_PREFIXES: tuple[str, ...] = (
    "In the video,", "In this video,", "In this video clip,", "In the clip,", "Caption:",
    *(f"{subject} {verb}" for subject in _LLM_SUBJECTS for verb in _LLM_VERBS),
)  # fmt: skip
"""Openings that captioning models add; ``--remove_llm_prefixes`` removes the first that matches."""


def remove_llm_prefix(caption: str) -> str:
    """Strip whitespace, then the first matching :data:`LLM_PREFIXES` entry (case-sensitive) and whitespace."""
    text = caption.strip()
    for prefix in LLM_PREFIXES:
        if text.startswith(prefix):
            return text[len(prefix) :].strip()
    return text


def prepare_caption(caption: str, *, lora_trigger: str | None = None, remove_llm_prefixes: bool = False) -> str:
    """The prompt that is encoded: prefix removal (optional), then ``"<trigger> "`` prepended (optional)."""
    text = remove_llm_prefix(caption) if remove_llm_prefixes else caption
    if lora_trigger and lora_trigger.strip():
        text = f"{lora_trigger.strip()} {text}"
    return text


# ---------------------------------------------------------------------------------------------------------------
# Captioning

AUDIO_VISUAL_INSTRUCTION = """\
Describe this media as a caption for training a video generation model. Answer in exactly this format and fill \
in every section:

[VISUAL]: <people, objects, actions, setting, colors, camera and movement, in detail>
[SPEECH]: <a word-for-word transcription of everything said; "None" if nobody speaks>
[SOUNDS]: <music, ambient sound and sound effects; "None" if silent>
[TEXT]: <any text visible on screen; "None" if there is none>

Transcribe speech exactly; do not summarise it."""
"""Default instruction when audio is given to the model."""

VISUAL_INSTRUCTION = """\
Describe this media as a caption for training a video generation model. Answer in exactly this format and fill \
in both sections:

[VISUAL]: <people, objects, actions, setting, colors, camera and movement, in detail>
[TEXT]: <any text visible on screen; "None" if there is none>"""
"""Default instruction for images and for videos captioned without their audio."""

_OPENING_SUBJECTS = ("The", "This")
_OPENING_KINDS = ("video", "image", "scene", "animated sequence", "clip", "footage")
_OPENING_VERBS = ("displays", "shows", "features", "depicts", "presents", "showcases", "captures", "contains")
_FAKE_TURN = re.compile(r"\n(?:Human|User|USER)(?::|\s*\n|$)")


def clean_generated_caption(text: str) -> str:
    """Cut a generated caption at a hallucinated dialogue turn ("\\nHuman:"), strip it, and remove one
    "The video shows "-style phrase."""
    text = _FAKE_TURN.split(text, maxsplit=1)[0].strip()
    for subject, kind, verb in itertools.product(_OPENING_SUBJECTS, _OPENING_KINDS, _OPENING_VERBS):
        phrase = f"{subject} {kind} {verb} "
        if phrase in text:
            text = text.replace(phrase, "", 1)
    return text.strip()


@dataclass(frozen=True, kw_only=True)
class MediaSample:
    """What a captioner sees of one file."""

    path: Path
    frames: torch.Tensor
    """uint8 ``[N, H, W, 3]``: one frame for an image, frames sampled at ``fps`` for a video."""
    fps: float
    """Rate of the sampled frames (1.0 for an image)."""
    is_image: bool
    audio: media.Audio | None = None


class Captioner(Protocol):
    """Anything that turns a :class:`MediaSample` into a caption."""

    @property
    def supports_audio(self) -> bool: ...

    def caption(self, sample: MediaSample, *, instruction: str) -> str: ...


def sample_frames(path: str | Path, *, fps: float, max_frames: int) -> MediaSample:
    """Decode frames of ``path`` at about ``fps`` per second (at most ``max_frames``, spread evenly over the
    clip) without holding the whole video in memory. Images give their one frame."""
    path = Path(path)
    info = media.probe_video(path)
    if info.is_image:
        return MediaSample(path=path, frames=media.read_video(path).frames, fps=1.0, is_image=True)
    if fps <= 0 or max_frames < 1:
        raise ValueError(f"fps must be positive and max_frames >= 1, got {fps}, {max_frames}")
    num_wanted = max(1, min(max_frames, int(info.duration * fps) or 1))
    step = max(1.0, info.num_frames / num_wanted)
    keep = sorted({min(info.num_frames - 1, int(i * step)) for i in range(num_wanted)})
    frames = [frame for _, frame in iter_video_frames(path, keep=keep)]
    if not frames:
        raise ValueError(f"{path}: no frames could be decoded")
    return MediaSample(path=path, frames=torch.stack(frames), fps=info.fps / step, is_image=False)


def _model_class(config: Any, model_class: str | None):
    import transformers

    if model_class:
        cls = getattr(transformers, model_class, None)
        if cls is None:
            raise ValueError(f"transformers has no class named {model_class!r}")
        return cls
    if getattr(config, "model_type", None) == "qwen2_5_omni":
        # Only the "thinker" (the text-generating half) is needed; the full model also builds a speech generator.
        return transformers.Qwen2_5OmniThinkerForConditionalGeneration
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText


class TransformersCaptioner:
    """A local ``transformers`` multimodal model (chat template, greedy decoding); see the module docstring.

    Args:
        model_dir: a local model directory (weights, config, processor files). Nothing is downloaded.
        device: where the model runs (default: CUDA when available).
        dtype: weight dtype (default: bfloat16 on CUDA, float32 on CPU).
        load_in_8bit: bitsandbytes 8-bit weights (CUDA only).
        max_new_tokens: generation budget per caption.
        model_class: a ``transformers`` class name to load the model with, when the auto classes do not know it.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        load_in_8bit: bool = False,
        max_new_tokens: int = 1024,
        model_class: str | None = None,
    ) -> None:
        from transformers import AutoConfig, AutoProcessor

        model_dir = Path(model_dir).expanduser()
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"{model_dir}: not a local transformers model directory (no config.json)")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        kwargs: dict[str, Any] = {"local_files_only": True, "dtype": dtype}
        if load_in_8bit:
            if self.device.type != "cuda":
                raise ValueError("8-bit captioning models need a CUDA device")
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
            kwargs["device_map"] = {"": self.device.index or 0}
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        self.model = _model_class(config, model_class).from_pretrained(model_dir, **kwargs).eval()
        if not load_in_8bit:
            self.model = self.model.to(self.device)
        self.processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
        if getattr(self.processor, "chat_template", None) is None:
            raise ValueError(f"{model_dir}: the processor has no chat template; a chat/instruct model is needed")
        self.max_new_tokens = max_new_tokens
        self.takes_video = getattr(self.processor, "video_processor", None) is not None
        self.audio_rate = None
        extractor = getattr(self.processor, "feature_extractor", None)
        if extractor is not None and getattr(extractor, "sampling_rate", None):
            self.audio_rate = int(extractor.sampling_rate)
        logger.info("captioning model %s loaded (%s, frames as %s, audio %s)", model_dir, type(self.model).__name__,
                    "video" if self.takes_video else "images", "yes" if self.audio_rate else "no")

    @property
    def supports_audio(self) -> bool:
        return self.audio_rate is not None

    def _inputs(self, sample: MediaSample, instruction: str) -> dict[str, Any]:
        from PIL import Image

        frames = [Image.fromarray(f.numpy()) for f in sample.frames]
        content: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {}
        if sample.is_image or not self.takes_video:
            content.extend({"type": "image"} for _ in frames)
            kwargs["images"] = frames
        else:
            content.append({"type": "video"})
            kwargs["videos"] = [sample.frames.numpy()]
        if sample.audio is not None and self.audio_rate is not None:
            content.append({"type": "audio"})
            waveform = sample.audio.waveform.mean(dim=0)
            kwargs["audio"] = [waveform.numpy().astype(np.float32)]
        content.append({"type": "text", "text": instruction})
        messages = [{"role": "user", "content": content}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.processor(text=[prompt], return_tensors="pt", padding=True, **kwargs)

    @torch.inference_mode()
    def caption(self, sample: MediaSample, *, instruction: str) -> str:
        inputs = self._inputs(sample, instruction).to(self.device)
        dtype = next(self.model.parameters()).dtype
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                inputs[key] = value.to(dtype)
        prompt_length = inputs["input_ids"].shape[1]
        output = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens)
        return self.processor.batch_decode(output[:, prompt_length:], skip_special_tokens=True)[0]


@dataclass(kw_only=True)
class CaptionSummary:
    captioned: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def find_media(input_path: str | Path, *, extensions: Sequence[str], recursive: bool) -> list[Path]:
    """``input_path`` itself if it is a file, else the files in it with one of ``extensions`` (sorted)."""
    input_path = Path(input_path)
    if input_path.is_file():
        return [input_path]
    if not input_path.is_dir():
        raise ValueError(f"{input_path}: no such file or directory")
    wanted = {e.lower().lstrip(".") for e in extensions}
    pattern = "**/*" if recursive else "*"
    files = sorted(p for p in input_path.glob(pattern) if p.is_file() and p.suffix.lower().lstrip(".") in wanted)
    # Edge references written by compute_reference are not media to caption.
    return [p for p in files if not p.stem.endswith("_reference")]


def default_output_path(input_path: str | Path) -> Path:
    """``<dir>/dataset.json`` for a directory, ``<file>.dataset.json`` for a single file."""
    input_path = Path(input_path)
    if input_path.is_dir():
        return input_path / "dataset.json"
    return input_path.with_name(f"{input_path.name}.dataset.json")


def caption_media(
    files: Sequence[Path],
    captioner: Captioner,
    output: str | Path,
    *,
    fps: float = 3.0,
    max_frames: int = 32,
    include_audio: bool = True,
    instruction: str | None = None,
    clean: bool = True,
    override: bool = False,
    save_every: int = 5,
) -> CaptionSummary:
    """Caption ``files`` and write ``output`` (json/jsonl/csv/txt by extension) with ``caption`` and ``media_path``
    (relative to the output's folder) for every file.

    Existing captions in ``output`` are kept unless ``override``; the file is rewritten every ``save_every`` new
    captions and at the end, so an interrupted run resumes where it stopped. A file that cannot be read or
    captioned is reported and left out.
    """
    output = Path(output)
    check_dataset_suffix(output, WRITABLE_SUFFIXES)
    base_dir = output.parent.absolute()
    rows: dict[str, dict[str, Any]] = {}
    if output.exists() or (output.suffix == ".txt" and output.with_name(f"{output.stem}_paths.txt").exists()):
        for record in read_records(output):
            raw = record.values.get(DEFAULT_MEDIA_COLUMN)
            if isinstance(raw, str):
                _, rel = relative_media_path(raw, base_dir, record.location, DEFAULT_MEDIA_COLUMN)
                rows[rel.as_posix()] = dict(record.values)
    summary = CaptionSummary()
    pending = 0
    progress = Progress(len(files), "captioning", log=logger)
    for path in files:
        try:
            _, rel = relative_media_path(str(Path(path).absolute()), base_dir, str(path), DEFAULT_MEDIA_COLUMN)
        except ValueError as exc:
            summary.failed.append((str(path), str(exc)))
            progress.advance()
            continue
        key = rel.as_posix()
        existing = rows.get(key, {}).get(DEFAULT_CAPTION_COLUMN)
        if existing and not override:
            summary.kept.append(key)
            progress.advance()
            continue
        try:
            sample = sample_frames(path, fps=fps, max_frames=max_frames)
            use_audio = include_audio and not sample.is_image and captioner.supports_audio and media.has_audio(path)
            if use_audio:
                sample = MediaSample(path=sample.path, frames=sample.frames, fps=sample.fps, is_image=False,
                                     audio=media.read_audio(path))
            text = captioner.caption(
                sample, instruction=instruction or (AUDIO_VISUAL_INSTRUCTION if use_audio else VISUAL_INSTRUCTION)
            )
            text = clean_generated_caption(text) if clean else text.strip()
        except ValueError as exc:
            logger.warning("skipping %s: %s", path, exc)
            summary.failed.append((key, str(exc)))
            progress.advance()
            continue
        rows[key] = {**rows.get(key, {}), DEFAULT_CAPTION_COLUMN: text, DEFAULT_MEDIA_COLUMN: key}
        summary.captioned.append(key)
        pending += 1
        if pending >= save_every:
            write_records(output, list(rows.values()))
            pending = 0
        progress.advance()
    progress.finish()
    write_records(output, list(rows.values()))
    logger.info("captions: %d new, %d kept, %d failed -> %s", len(summary.captioned), len(summary.kept),
                len(summary.failed), output)
    return summary


@dataclass(frozen=True, kw_only=True)
class CaptionVideosConfig:
    """Caption videos and images with a local multimodal transformers model and write a dataset file."""

    input_path: Annotated[Path, tyro.conf.Positional]
    """A media file or a folder of media."""
    model_path: Path
    """Local transformers model directory of a chat multimodal model (e.g. Qwen2.5-Omni, Qwen2.5-VL, LLaVA)."""
    output: Annotated[Path | None, tyro.conf.arg(aliases=("-o",))] = None
    """Dataset file to write (.json, .jsonl, .csv or .txt); default: <dir>/dataset.json or <file>.dataset.json."""
    device: str | None = None
    """Torch device; default: cuda when available, else cpu."""
    use_8bit: bool = False
    """Load the model with bitsandbytes 8-bit weights (CUDA only)."""
    model_class: str | None = None
    """transformers class to load the model with, when AutoModelForImageTextToText does not know it."""
    instruction: str | None = None
    """Custom instruction; default: the sectioned caption template ([VISUAL]/[SPEECH]/[SOUNDS]/[TEXT])."""
    extensions: tuple[str, ...] = ("mp4", "avi", "mov", "mkv", "webm", "jpg", "jpeg", "png")
    """File extensions to caption in a folder."""
    recursive: bool = False
    """Search sub-folders too."""
    fps: float = 3.0
    """Frames per second sampled from videos."""
    max_frames: int = 32
    """At most this many frames per video (spread over the clip)."""
    max_new_tokens: int = 1024
    """Generation budget per caption."""
    audio: bool = True
    """Give the model the audio track too (when the model's processor takes audio and the file has audio)."""
    clean_caption: bool = True
    """Cut hallucinated dialogue turns and 'The video shows'-style openings."""
    override: bool = False
    """Re-caption media that already have a caption in the output file."""
    save_every: int = 5
    """Rewrite the output file after this many new captions (resume point)."""


def caption_videos(config: CaptionVideosConfig) -> CaptionSummary:
    """Find the media, load the model, and :func:`caption_media` them."""
    files = find_media(config.input_path, extensions=config.extensions, recursive=config.recursive)
    if not files:
        raise ValueError(f"{config.input_path}: no media with extensions {config.extensions}")
    output = config.output or default_output_path(config.input_path)
    captioner = TransformersCaptioner(config.model_path, device=config.device, load_in_8bit=config.use_8bit,
                                      max_new_tokens=config.max_new_tokens, model_class=config.model_class)
    return caption_media(files, captioner, output, fps=config.fps, max_frames=config.max_frames,
                         include_audio=config.audio, instruction=config.instruction, clean=config.clean_caption,
                         override=config.override, save_every=config.save_every)
