"""The dataset against the model, before the model is loaded: every field the model will read from a precomputed
sample is checked against what this checkpoint expects, read from the checkpoint's header (config metadata)
only, so a dataset preprocessed for another model fails in seconds, naming the file and the expected value,
instead of inside the first step after minutes of loading.

Checked per sample (the values come from the dataset's scan, :class:`ltxf.data.SampleInfo`; no file is read
again): text-feature widths against the video and audio text connectors, audio text features present when audio
is trained, IC-LoRA reference latents an integer downscale of the target (one factor per run). Latent channels
and the audio latent layout are checked by the scan itself (:class:`ltxf.data.PrecomputedDataset` is built with
the model's ``latent_channels``) and against the transformer's patchify widths here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ltxf.data import AUDIO_FREQUENCY_BINS, SampleInfo
from ltxf.models.checkpoint import config_section, read_config
from ltxf.models.text import EmbeddingsProcessorConfig

_HINT = "preprocessed for another model? Preprocess it again with this checkpoint (tools/process_dataset.py " \
        "--model-path {checkpoint})"


@dataclass(frozen=True, kw_only=True)
class ModelInputs:
    """What the model reads from a sample, as the checkpoint's config says."""

    checkpoint: Path
    latent_channels: int
    """Video (and reference) latent channels: the transformer's ``in_channels``."""
    audio_in_channels: int
    """The transformer's ``audio_in_channels``: audio latent channels x frequency bins, patchified."""
    video_text_width: int
    """Width of ``video_prompt_embeds``: the video text connector's width."""
    audio_text_width: int
    """Width of ``audio_prompt_embeds``: the audio text connector's width."""


def read_model_inputs(checkpoint: str | Path) -> ModelInputs:
    """The inputs a checkpoint's transformer and text connectors expect, from its config metadata (no tensor is
    read)."""
    checkpoint = Path(checkpoint)
    section = config_section(read_config(checkpoint), "transformer", checkpoint)
    text = EmbeddingsProcessorConfig.from_transformer_config(section, source=checkpoint)
    return ModelInputs(
        checkpoint=checkpoint,
        latent_channels=int(section.get("in_channels", 128)),
        audio_in_channels=int(section.get("audio_in_channels", 128)),
        video_text_width=text.video_connector.inner_dim,
        audio_text_width=text.audio_connector.inner_dim,
    )


def _first_and_count(problems: list[str]) -> str:
    more = f" (and {len(problems) - 1} more sample(s) like it)" if len(problems) > 1 else ""
    return problems[0] + more


def check_dataset_fits_model(
    samples: Sequence[SampleInfo], model: ModelInputs, *, with_audio: bool, reference: bool
) -> int | None:
    """Raise a ``ValueError`` naming the first offending file, the field, the found and the expected value (and
    how many other samples share the problem). Returns the IC-LoRA reference downscale factor (``reference``),
    else None."""
    hint = _HINT.format(checkpoint=model.checkpoint)
    if with_audio and model.audio_in_channels % AUDIO_FREQUENCY_BINS:
        raise ValueError(
            f"{model.checkpoint}: the transformer reads audio latents of {model.audio_in_channels} channels x "
            f"frequency bins, not a multiple of the {AUDIO_FREQUENCY_BINS} mel bins of precomputed audio latents "
            f"[C, T, {AUDIO_FREQUENCY_BINS}]; this checkpoint cannot train audio (train video only)"
        )
    expected = {"video_prompt_embeds": ("video", model.video_text_width),
                "audio_prompt_embeds": ("audio", model.audio_text_width)}
    problems: dict[str, list[str]] = {}
    factors: dict[int, Path] = {}
    for info in samples:
        conditions = info.files.get("conditions")
        widths = info.text_widths or {}
        for key, (stream, width) in expected.items():
            found = widths.get(key)
            if found is not None and found != width:
                problems.setdefault(key, []).append(
                    f"{conditions}: {key!r} has width {found}, but the {stream} text connector of "
                    f"{model.checkpoint} expects {width}"
                )
        if with_audio and info.text_widths is not None and "audio_prompt_embeds" not in widths:
            problems.setdefault("missing audio", []).append(
                f"{conditions}: no 'audio_prompt_embeds' (nor legacy 'prompt_embeds'), needed to train audio "
                "(strategy.with_audio)"
            )
        if reference and info.video_shape is not None and info.reference_shape is not None:
            factor = _reference_factor(info)
            factors.setdefault(factor, info.files["reference_latents"])
    for found in problems.values():
        raise ValueError(f"{_first_and_count(found)}; {hint}")
    if len(factors) > 1:
        examples = ", ".join(f"{factor} ({path})" for factor, path in sorted(factors.items()))
        raise ValueError(f"the dataset mixes reference downscale factors: {examples}; use one factor per run")
    return next(iter(factors)) if factors else None


def _reference_factor(info: SampleInfo) -> int:
    from ltxf.strategies.video_to_video import reference_downscale_factor

    try:
        return reference_downscale_factor(info.video_shape, info.reference_shape)
    except ValueError as exc:
        raise ValueError(f"{info.files['reference_latents']}: {exc}") from exc
