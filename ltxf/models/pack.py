"""Model packs: where each component of a model lives, and the checks that the files belong together.

LTX-2 and LTX-2.3 ship one ``.safetensors`` file holding everything (transformer, text connectors and
projection, video VAE, audio VAE, vocoder). LTX-2.5 ships a *split pack*, one file per component:

* the transformer file (``model.diffusion_model.*`` incl. both text connectors; its metadata ``config`` has only
  the ``transformer`` / ``scheduler`` sections, plus ``model_version`` and ``gemma_source_checkpoint``),
* the packed Gemma 4 text encoder, which also holds the feature extractor's ``text_embedding_projection.*``,
* a conv video VAE (bare ``encoder.`` / ``decoder.`` / ``per_channel_statistics.`` keys) and a diffusion-decoder
  video VAE (``CausalDiffusionVAE``),
* the audio VAE file with the vocoder.

:class:`ModelPack` names the file of each component; :func:`resolve_pack` builds it from the transformer file and
the optional component paths (``--model.checkpoint`` plus ``--model.text_encoder`` / ``--model.video_vae`` /
``--model.audio_vae``): a single file serves every component nobody overrides, a split transformer refuses to
guess. :func:`check_gemma_pairing` is the official transformer <-> text-encoder check, and
:func:`check_conditions_text_encoder` refuses cached text features made by another Gemma.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ltxf.models.checkpoint import (
    GEMMA_PAIRING_REQUIRED_FROM,
    parse_model_version,
    read_config,
    read_metadata,
)

logger = logging.getLogger(__name__)

# The key preprocessing adds to every conditions file: which text encoder made the features (the official reader
# only reads the keys it knows, so the extra key is harmless to it).
CONDITIONS_TEXT_ENCODER_KEY = "text_encoder"
# Video scale factors (time, height, width) the official code falls back to when a config has no flat block list.
DEFAULT_VIDEO_SCALE_FACTORS = (8, 32, 32)
_COMPONENT_SECTIONS = ("vae", "audio_vae", "vocoder")


def is_split_transformer(config: Mapping) -> bool:
    """A transformer file of a split pack: the config has a ``transformer`` section and no VAE / vocoder one."""
    return "transformer" in config and not any(section in config for section in _COMPONENT_SECTIONS)


def is_diffusion_video_vae(path: str | Path) -> bool:
    """The LTX-2.5 diffusion-decoder video VAE (``config.vae._class_name == "CausalDiffusionVAE"``)."""
    vae = read_config(path).get("vae")
    return isinstance(vae, Mapping) and vae.get("_class_name") == "CausalDiffusionVAE"


def _is_conv_video_vae(path: Path) -> bool:
    try:
        vae = read_config(path).get("vae")
    except ValueError:
        return False
    return isinstance(vae, Mapping) and bool(vae.get("decoder_blocks")) and \
        vae.get("_class_name") != "CausalDiffusionVAE"


def read_video_scale_factors(path: str | Path) -> tuple[int, int, int]:
    """(time, height, width) pixel units per latent cell, with the official rule: from the *flat*
    ``vae.encoder_blocks`` (else ``vae.decoder_blocks``) and ``vae.patch_size``, counting the compressing blocks
    whatever their multiplier; a config without a flat block list (a transformer file, an audio file, the nested
    diffusion-VAE config) gives the default 8 x 32 x 32."""
    vae = read_config(path).get("vae")
    if not isinstance(vae, Mapping):
        return DEFAULT_VIDEO_SCALE_FACTORS
    blocks = vae.get("encoder_blocks") or vae.get("decoder_blocks")
    if not blocks:
        return DEFAULT_VIDEO_SCALE_FACTORS
    names = [block[0] if isinstance(block, (list, tuple)) else block for block in blocks]
    space = sum(1 for n in names if str(n).startswith(("compress_space", "compress_all")))
    time = sum(1 for n in names if str(n).startswith(("compress_time", "compress_all")))
    patch = int(vae.get("patch_size", 1))
    return 2**time, patch * 2**space, patch * 2**space


@dataclass(frozen=True, kw_only=True)
class PipelineDefaults:
    """The official pipelines' version-dependent sampling defaults (ltx-pipelines 1.2 ``detect_params``)."""

    default_image_crf: int
    """CRF of the H.264 round trip applied to conditioning images."""
    num_inference_steps: int
    video_stg_blocks: tuple[int, ...]
    audio_stg_blocks: tuple[int, ...]


def pipeline_defaults(model_version: str | None) -> PipelineDefaults | None:
    """Sampling defaults for a ``model_version`` string ("-" read as ".", as the pipelines do): from 2.4 on
    (``LTX_2_4_PARAMS``) CRF 18, 30 steps and STG on block 28 for video and audio; None for older or unversioned
    files (their defaults are not versioned by this string)."""
    if parse_model_version((model_version or "").replace("-", ".")) >= (2, 4):
        return PipelineDefaults(default_image_crf=18, num_inference_steps=30, video_stg_blocks=(28,),
                                audio_stg_blocks=(28,))
    return None


@dataclass(frozen=True, kw_only=True)
class ModelPack:
    """The file of each model component. ``None`` means "not given" (only allowed for a split transformer)."""

    transformer: Path
    """Transformer + text connectors (single file or LTX-2.5 transformer file)."""
    text_encoder: Path | None = None
    """Gemma 3 directory or packed text-encoder file (LTX-2.5: also holds the feature extractor)."""
    video_vae: Path | None = None
    audio_vae: Path | None = None
    """Audio VAE and vocoder."""
    split: bool = False
    """The transformer file is a split-pack file (no VAE / vocoder inside)."""
    model_version: str | None = None
    """The transformer file's ``model_version`` metadata, as stored."""

    def _require(self, name: str, flag: str) -> Path:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"{self.transformer} is a split-pack transformer file (model_version "
                             f"{self.model_version!r}) with no {name.replace('_', ' ')} inside: pass the "
                             f"{name.replace('_', ' ')} file with {flag}")
        return value

    def video_vae_file(self) -> Path:
        return self._require("video_vae", "--model.video_vae")

    def video_decoder_file(self) -> Path:
        """The video VAE file to *decode* with: the video VAE, or, when that is the LTX-2.5 diffusion-decoder VAE
        (whose decoder ltxf does not implement), the conv VAE of the same pack found next to it (a warning says
        so); with none there a ``ValueError`` names the file to pass."""
        path = self.video_vae_file()
        if not is_diffusion_video_vae(path):
            return path
        candidates = sorted(p for p in path.parent.glob("*.safetensors") if p != path and _is_conv_video_vae(p))
        if len(candidates) != 1:
            found = f"found {len(candidates)} candidates: {[str(c) for c in candidates]}" if candidates else \
                "found none next to it"
            raise ValueError(f"{path} is the LTX-2.5 diffusion-decoder video VAE, whose decoder ltxf does not "
                             f"implement; decoding needs the conv VAE of the pack ({found}): pass the "
                             "ltx-2.5-video-vae-conv*.safetensors file as the video VAE (--model.video_vae / "
                             "--video-vae-path)")
        logger.warning("%s is the LTX-2.5 diffusion-decoder video VAE, whose decoder ltxf does not implement: "
                       "decoding with the pack's conv VAE %s instead (same latent space and encoder)", path,
                       candidates[0])
        return candidates[0]

    def audio_vae_file(self) -> Path:
        return self._require("audio_vae", "--model.audio_vae")

    def text_encoder_file(self) -> Path:
        return self._require("text_encoder", "--model.text_encoder")

    @property
    def expected_text_encoder(self) -> str:
        """Which Gemma the transformer was trained with (see :func:`expected_text_encoder`)."""
        return expected_text_encoder(self.transformer)


def _check_exists(path: str | Path | None, flag: str) -> Path | None:
    if path is None:
        return None
    path = Path(path).expanduser()
    if str(path).startswith(("http:/", "https:/")):
        raise ValueError(f"{flag} must be a local path, got the URL {path}")
    if not path.exists():
        raise ValueError(f"{flag}: not found: {path}")
    return path


def resolve_pack(
    checkpoint: str | Path,
    *,
    text_encoder: str | Path | None = None,
    video_vae: str | Path | None = None,
    audio_vae: str | Path | None = None,
) -> ModelPack:
    """Where every component lives. A single-file checkpoint serves each component not given explicitly; a
    split transformer file serves none (the accessors of :class:`ModelPack` then name the missing flag)."""
    transformer = _check_exists(checkpoint, "model.checkpoint")
    if not transformer.is_file():
        raise ValueError(f"model.checkpoint must be a .safetensors file, got the directory {transformer}")
    config = read_config(transformer)
    if "transformer" not in config:
        raise ValueError(f"{transformer}: the checkpoint config has no 'transformer' section (found {sorted(config)}); "
                         "model.checkpoint must be the transformer file (or a single-file checkpoint)")
    split = is_split_transformer(config)
    video = _check_exists(video_vae, "model.video_vae")
    audio = _check_exists(audio_vae, "model.audio_vae")
    if not split:
        video = video or (transformer if "vae" in config else None)
        audio = audio or (transformer if "audio_vae" in config else None)
    for name, path in (("model.video_vae", video), ("model.audio_vae", audio)):
        if path is not None and not path.is_file():
            raise ValueError(f"{name} must be a .safetensors file, got {path}")
    if video is not None and read_video_scale_factors(video) != DEFAULT_VIDEO_SCALE_FACTORS:
        # Positions, buckets and frame counts in ltxf assume the released models' compression.
        raise ValueError(f"{video}: the video VAE compresses (time, height, width) by "
                         f"{read_video_scale_factors(video)}; ltxf supports the released {DEFAULT_VIDEO_SCALE_FACTORS}")
    return ModelPack(transformer=transformer, text_encoder=_check_exists(text_encoder, "model.text_encoder"),
                     video_vae=video, audio_vae=audio, split=split,
                     model_version=read_metadata(transformer).get("model_version"))


# -------------------------------------------------------------------------------------------------------------
# Transformer <-> text encoder


def _gemma_source(transformer: Path) -> tuple[dict | None, str | None]:
    metadata = read_metadata(transformer)
    raw = metadata.get("gemma_source_checkpoint")
    source = None
    if raw is not None:
        try:
            source = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{transformer}: metadata 'gemma_source_checkpoint' is not valid JSON: {exc}") from exc
        if not isinstance(source, dict):
            raise ValueError(f"{transformer}: metadata 'gemma_source_checkpoint' must be a JSON object, got {raw!r}")
    return source, metadata.get("model_version")


def expected_text_encoder(transformer: str | Path) -> str:
    """The text-encoder identity a transformer file pairs with: its ``gemma_source_checkpoint.gemma_version``, or
    ``"gemma3"`` for files without one (LTX-2 / 2.3; an LTX-2.4+ file without one is an error)."""
    transformer = Path(transformer)
    source, model_version = _gemma_source(transformer)
    if source is not None and source.get("gemma_version"):
        return str(source["gemma_version"])
    if parse_model_version(model_version) >= GEMMA_PAIRING_REQUIRED_FROM:
        raise ValueError(f"{transformer}: checkpoint model_version={model_version!r} must declare "
                         "gemma_source_checkpoint.gemma_version, but none was found")
    return "gemma3"


def _text_encoder_config(text_encoder: Path) -> dict:
    from ltxf.models.gemma import read_packed_text_encoder_config

    if text_encoder.is_dir():
        config_file = text_encoder / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{text_encoder} has no config.json; expected a Hugging Face Gemma model directory")
        return json.loads(config_file.read_text())
    return read_packed_text_encoder_config(text_encoder)


def check_gemma_pairing(transformer: str | Path, text_encoder: str | Path) -> str:
    """The official pairing check between a transformer file and a text encoder (directory or packed file).

    * The transformer declares ``gemma_source_checkpoint.gemma_version``: the text encoder's config must carry the
      same top-level ``gemma_version``.
    * It declares none but its ``model_version`` is 2.4.0 or later: an error (only a warning when the Gemma config
      has no ``gemma_version`` either).
    * Neither: the text encoder must be a Gemma 3 (``model_type`` ``gemma3`` / ``gemma3_text``).

    Returns the text encoder's identity. A mismatch is a ``ValueError`` naming both files.
    """
    transformer, text_encoder = Path(transformer), Path(text_encoder).expanduser()
    source, model_version = _gemma_source(transformer)
    config = _text_encoder_config(text_encoder)
    te_version = config.get("gemma_version")
    model_type = str(config.get("model_type"))
    if source is not None and source.get("gemma_version"):
        expected = str(source["gemma_version"])
        if te_version != expected:
            raise ValueError(f"Gemma version mismatch: {transformer} declares gemma_source_checkpoint.gemma_version="
                             f"{expected!r}, but the text encoder {text_encoder} has gemma_version={te_version!r}; "
                             "pass the text encoder of the same pack")
        return expected
    if parse_model_version(model_version) >= GEMMA_PAIRING_REQUIRED_FROM:
        message = (f"{transformer}: checkpoint model_version={model_version!r} must declare "
                   f"gemma_source_checkpoint.gemma_version, but none was found (text encoder {text_encoder})")
        if te_version is None:
            logger.warning("%s", message)
            return model_type
        raise ValueError(message)
    if not model_type.startswith("gemma3"):
        raise ValueError(f"{transformer} has no gemma_source_checkpoint (model_version={model_version!r}), so it "
                         f"pairs with a Gemma 3 text encoder (model_type 'gemma3'), but {text_encoder} has "
                         f"model_type={model_type!r}")
    return str(te_version or "gemma3")


def check_conditions_text_encoder(conditions_files: Iterable[str | Path], expected: str) -> int:
    """Refuse cached text features made by another text encoder than ``expected``.

    Reads the :data:`CONDITIONS_TEXT_ENCODER_KEY` of every file (memory-mapped: headers only). Files without it
    (made by the official preprocessor, or before ltxf recorded it) cannot be checked and pass; the number of
    such files is returned (and logged once). LTX-2.3 and LTX-2.5 features have the same widths, so nothing else
    would notice a mix-up.
    """
    untagged = 0
    for path in conditions_files:
        path = Path(path)
        try:
            try:
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
                data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch.load raises many unrelated types
            raise ValueError(f"{path}: cannot read the conditions file: {exc}") from exc
        made_by = data.get(CONDITIONS_TEXT_ENCODER_KEY) if isinstance(data, Mapping) else None
        if made_by is None:
            untagged += 1
            continue
        if made_by != expected:
            raise ValueError(f"{path}: these text features were made with the text encoder {made_by!r}, but the "
                             f"model expects {expected!r}; re-run the caption preprocessing with the text encoder "
                             "that belongs to this model (features of different Gemmas have the same shapes but "
                             "mean nothing to the other model)")
    if untagged:
        logger.info("%d conditions files do not record their text encoder (official preprocessing); not checked",
                    untagged)
    return untagged


# -------------------------------------------------------------------------------------------------------------
# Tiny test packs


_LATENT_LAYERS = {"patchify_proj": "video_in", "proj_out": "video_out", "audio_patchify_proj": "audio_in",
                  "audio_proj_out": "audio_out"}


def adapt_transformer_latent_widths(
    transformer: str | Path, video_vae: str | Path, audio_vae: str | Path, output: str | Path, *, seed: int = 0
) -> Path:
    """Copy a transformer file with its latent widths changed to those of the given VAE files.

    The tiny LTX-2.5 golden pack pairs a transformer with 128 latent channels with VAEs of 4 (video) and 2 x 16
    (audio), so it cannot be trained or sampled as shipped. This keeps every tensor and all metadata of the file
    (connectors, ``model_version``, ``gemma_source_checkpoint``) and re-draws only the four latent projections
    (``patchify_proj``, ``proj_out`` and their audio twins; weights N(0, 1/fan_in), biases 0, seeded), with the
    config's ``in/out_channels`` and ``audio_in/out_channels`` updated. For test packs only: real packs match.
    """
    from ltxf.models.audio_vae import AudioVAEConfig
    from ltxf.models.checkpoint import TRANSFORMER_PREFIX, read_tensors, write_checkpoint
    from ltxf.models.video_vae import read_video_vae_config

    transformer = Path(transformer)
    config = read_config(transformer)
    section = config.get("transformer")
    if not isinstance(section, dict):
        raise ValueError(f"{transformer}: no 'transformer' config section")
    video_channels = read_video_vae_config(video_vae).latent_channels
    audio_section = read_config(audio_vae).get("audio_vae")
    if not isinstance(audio_section, Mapping):
        raise ValueError(f"{audio_vae}: no 'audio_vae' config section")
    audio_config = AudioVAEConfig.from_checkpoint(audio_section, audio_vae)
    widths = {"video": video_channels, "audio": audio_config.z_channels * audio_config.latent_mel_bins}
    section.update(in_channels=widths["video"], out_channels=widths["video"], audio_in_channels=widths["audio"],
                   audio_out_channels=widths["audio"])
    tensors = read_tensors(transformer, lambda key: key)
    generator = torch.Generator().manual_seed(seed)
    for layer, role in _LATENT_LAYERS.items():
        stream, direction = role.split("_")
        weight = tensors[f"{TRANSFORMER_PREFIX}{layer}.weight"]
        out_dim, in_dim = weight.shape
        out_dim = widths[stream] if direction == "out" else out_dim
        in_dim = widths[stream] if direction == "in" else in_dim
        tensors[f"{TRANSFORMER_PREFIX}{layer}.weight"] = (torch.randn(out_dim, in_dim, generator=generator)
                                                          / in_dim**0.5).to(weight.dtype)
        bias_key = f"{TRANSFORMER_PREFIX}{layer}.bias"
        if bias_key in tensors:
            tensors[bias_key] = torch.zeros(out_dim, dtype=tensors[bias_key].dtype)
    metadata = {k: v for k, v in read_metadata(transformer).items() if k != "config"}
    path = write_checkpoint(output, tensors, config, metadata)
    logger.info("wrote %s: %s with latent widths video %d, audio %d", path, transformer, widths["video"],
                widths["audio"])
    return path


__all__ = [
    "CONDITIONS_TEXT_ENCODER_KEY",
    "DEFAULT_VIDEO_SCALE_FACTORS",
    "ModelPack",
    "PipelineDefaults",
    "adapt_transformer_latent_widths",
    "check_conditions_text_encoder",
    "check_gemma_pairing",
    "expected_text_encoder",
    "is_diffusion_video_vae",
    "is_split_transformer",
    "pipeline_defaults",
    "read_video_scale_factors",
    "resolve_pack",
]
