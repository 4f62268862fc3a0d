"""The official checkpoint formats: config metadata, key prefixes, version detection, strict loading.

An official LTX-2 / LTX-2.3 checkpoint is one ``.safetensors`` file. Its ``__metadata__["config"]`` entry is a
JSON document with the sections ``transformer``, ``vae``, ``audio_vae``, ``vocoder`` and ``scheduler``; the
tensors of every component live in the same file under the prefixes below. LTX-2.5 ships a split pack instead
(one file per component, a ``model_version`` metadata string on each; see :mod:`ltxf.models.pack`); the
transformer file keeps the monolith's ``model.diffusion_model.`` layout.

Loading is always the same three moves: build the module on the ``meta`` device from the config, read only the
requested component's tensors (one at a time, cast on the fly, so host memory peaks near one copy of the
component), and ``load_state_dict(strict=True, assign=True)`` with an error that lists what is missing or
unexpected.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

ModelVersion = Literal["ltx-2", "ltx-2.3", "ltx-2.5"]

# Where each component's tensors live inside an official checkpoint.
TRANSFORMER_PREFIX = "model.diffusion_model."
VIDEO_CONNECTOR_PREFIX = "model.diffusion_model.video_embeddings_connector."
AUDIO_CONNECTOR_PREFIX = "model.diffusion_model.audio_embeddings_connector."
TEXT_PROJECTION_PREFIX = "text_embedding_projection."
VIDEO_VAE_ENCODER_PREFIX = "vae.encoder."
VIDEO_VAE_DECODER_PREFIX = "vae.decoder."
VIDEO_VAE_STATISTICS_PREFIX = "vae.per_channel_statistics."
AUDIO_VAE_ENCODER_PREFIX = "audio_vae.encoder."
AUDIO_VAE_DECODER_PREFIX = "audio_vae.decoder."
AUDIO_VAE_STATISTICS_PREFIX = "audio_vae.per_channel_statistics."
VOCODER_PREFIX = "vocoder."

# Sub-trees of ``model.diffusion_model.`` that belong to the text side, not to the transformer.
TEXT_CONNECTOR_SUBPREFIXES = ("video_embeddings_connector.", "audio_embeddings_connector.", "embeddings_connector.")

# The four keys that switch the text side to feature extractor V2 (LTX-2.3), with the only accepted values.
V2_TEXT_KEYS: dict[str, bool] = {
    "caption_proj_before_connector": True,
    "caption_projection_first_linear": False,
    "caption_proj_input_norm": False,
    "caption_projection_second_linear": False,
}


def _check_is_file(path: Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"checkpoint file not found: {path}")
    if not path.is_file():
        raise ValueError(f"checkpoint path is not a file: {path}")
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """Return the raw ``__metadata__`` string map of a safetensors file (empty if it has none).

    Raises ``ValueError`` naming the file if it is missing or is not a safetensors file.
    """
    path = _check_is_file(Path(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc


_CONFIG_SOURCE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("ltxf_config_source", default=None)


@contextlib.contextmanager
def config_from(source: str | Path | None) -> Iterator[None]:
    """Within the block, files without a ``config`` metadata entry (a transformer-only or VAE-only file someone
    split off) take their config from the single file ``source``; ``None`` changes nothing. Files that carry a
    config always use their own."""
    if source is not None:
        _check_is_file(Path(source))
    token = _CONFIG_SOURCE.set(None if source is None else Path(source))
    try:
        yield
    finally:
        _CONFIG_SOURCE.reset(token)


def read_config(path: str | Path) -> dict:
    """Return the model config stored as JSON in the ``config`` metadata entry of an official checkpoint.

    A file without one (a split-off transformer or VAE) takes the config of the file given to
    :func:`config_from`, if any.
    """
    path = Path(path)
    metadata = read_metadata(path)
    if "config" not in metadata:
        source = _CONFIG_SOURCE.get()
        if source is not None and source != path:
            logger.info("%s has no config metadata; using the config of %s", path, source)
            return read_config(source)
        raise ValueError(
            f"{path} has no 'config' entry in its safetensors metadata; an official LTX-2 checkpoint stores "
            "its model config there (metadata keys found: "
            f"{sorted(metadata) or 'none'}). For a file split off a checkpoint, give the single file its config "
            "comes from (tools/inference.py --config_from, or ltxf.models.checkpoint.config_from)"
        )
    try:
        config = json.loads(metadata["config"])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: the 'config' metadata entry is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{path}: the 'config' metadata entry must be a JSON object, got {type(config).__name__}")
    return config


def config_section(config: Mapping, section: str, path: str | Path) -> dict:
    """Return ``config[section]`` or raise a ``ValueError`` naming the file and the missing section."""
    value = config.get(section)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: the checkpoint config has no '{section}' section (found: {sorted(config)})")
    return value


def _file_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc


def official_names(path: str | Path) -> dict[str, str]:
    """``{key in the file: official name}`` for every tensor of a safetensors file (header only; see
    :func:`official_key_names`)."""
    path = _check_is_file(Path(path))
    return official_key_names(path, _file_keys(path))


def list_keys(path: str | Path) -> list[str]:
    """All tensor names in a safetensors file under their official names (reads the header only; see
    :func:`official_key_names` for the layouts that are renamed)."""
    return list(official_names(path).values())


def read_tensor_shapes(path: str | Path, keys: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of the named tensors (official names) without reading their data."""
    path = _check_is_file(Path(path))
    file_key_of = {official: key for key, official in official_key_names(path, _file_keys(path)).items()}
    shapes: dict[str, tuple[int, ...]] = {}
    with safe_open(str(path), framework="pt") as f:
        available = set(file_key_of)
        for key in keys:
            if key in available:
                shapes[key] = tuple(f.get_slice(file_key_of[key]).get_shape())
    return shapes


# Transformer config keys new in LTX-2.5 (their presence alone marks a 2.5-family config).
LTX_2_5_SWITCHES = ("ff_bias", "audio_ff_bias", "use_prompt_adaln_single", "use_keyframes_abs_pos_embedding")
# From this ``model_version`` on, a transformer must name the Gemma it was trained with (the pairing check).
GEMMA_PAIRING_REQUIRED_FROM = (2, 4, 0)

# -------------------------------------------------------------------------------------------------------------
# Key layouts

# Keys that only the transformer has, to recognise a bare (unprefixed) transformer state dict.
_TRANSFORMER_MARKERS = ("transformer_blocks.", "patchify_proj.", "adaln_single.")
_OTHER_COMPONENT_PREFIXES = ("vae.", "audio_vae.", "vocoder.", TEXT_PROJECTION_PREFIX)
_VAE_PARTS = ("encoder.", "decoder.", "per_channel_statistics.")
COMFY_TRANSFORMER_PREFIX = "diffusion_model."
"""ComfyUI's diffusion-model files keep the transformer (and connectors) without the leading ``model.``."""


def official_key_names(path: str | Path, keys: Iterable[str]) -> dict[str, str]:
    """``{key in the file: official name}`` for the key layouts users have, decided from the keys themselves:

    - official single files (``model.diffusion_model.``, ``vae.``, ...): unchanged;
    - ComfyUI layout, the transformer under ``diffusion_model.``: renamed to ``model.diffusion_model.``;
    - a bare transformer state dict (``transformer_blocks.*`` at the top): put under ``model.diffusion_model.``;
    - a bare VAE (``encoder.*`` / ``decoder.*`` / ``per_channel_statistics.*`` at the top) whose config names
      exactly one of ``vae`` / ``audio_vae``: put under that prefix.
    """
    keys = list(keys)
    if any(k.startswith(TRANSFORMER_PREFIX) for k in keys) or not keys:
        return {k: k for k in keys}
    if any(k.startswith(COMFY_TRANSFORMER_PREFIX) for k in keys):
        return {k: "model." + k if k.startswith(COMFY_TRANSFORMER_PREFIX) else k for k in keys}
    if any(k.startswith(_TRANSFORMER_MARKERS) for k in keys):
        return {k: k if k.startswith(_OTHER_COMPONENT_PREFIXES) else TRANSFORMER_PREFIX + k for k in keys}
    if all(k.startswith(_VAE_PARTS) for k in keys):
        try:
            sections = {s for s in ("vae", "audio_vae") if s in read_config(path)}
        except ValueError:
            sections = set()
        if len(sections) == 1:
            prefix = sections.pop() + "."
            return {k: prefix + k for k in keys}
    return {k: k for k in keys}


# -------------------------------------------------------------------------------------------------------------
# Version detection


def parse_model_version(text: str | None) -> tuple[int, ...]:
    """The numeric dot-separated prefix of a ``model_version`` string, as the official parser reads it:
    ``"2.5.0"`` -> (2, 5, 0), ``"2.3.rc1"`` -> (2, 3), ``"2.4-rc2"`` -> (2,), ``""`` / None -> ()."""
    parts: list[int] = []
    for part in (text or "").strip().split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def detect_model_version(transformer_config: Mapping, model_version: str | None = None,
                         path: str | Path = "<config>") -> ModelVersion:
    """Model version of a transformer config section plus the file's ``model_version`` metadata string.

    The text path comes from :func:`detect_text_version`. A V2 config is LTX-2.5 when it carries any of the
    2.5 switches (:data:`LTX_2_5_SWITCHES`) or its ``model_version`` is at least 2.4 (``-`` read as ``.``, as the
    official pipelines do); the architecture itself is always built from the keys.
    """
    text_version = detect_text_version(transformer_config, path)
    switches = sorted(k for k in LTX_2_5_SWITCHES if k in transformer_config)
    numeric = parse_model_version((model_version or "").replace("-", "."))
    if not switches and numeric < (2, 4):
        return text_version
    if text_version == "ltx-2":
        why = f"keys {switches}" if switches else f"model_version {model_version!r}"
        raise ValueError(f"{path}: the transformer config says LTX-2.5 ({why}) but has none of the V2 text keys "
                         f"{sorted(V2_TEXT_KEYS)} that every LTX-2.3/2.5 config sets")
    return "ltx-2.5"


def detect_text_version(transformer_config: Mapping, path: str | Path = "<config>") -> ModelVersion:
    """Decide LTX-2 vs LTX-2.3 from the four V2 text keys, with the reference's exact rules.

    None of the keys present means LTX-2 (feature extractor V1, caption projection inside the transformer). All
    four present with exactly the values in :data:`V2_TEXT_KEYS` means LTX-2.3. Anything else is an error.
    """
    present = {k: transformer_config[k] for k in V2_TEXT_KEYS if k in transformer_config}
    if not present:
        return "ltx-2"
    wrong = {k: v for k, v in present.items() if v != V2_TEXT_KEYS[k]}
    if wrong:
        raise ValueError(
            f"{path}: unknown text-encoder config values {wrong}; LTX-2.3 checkpoints set {V2_TEXT_KEYS}"
        )
    if len(present) != len(V2_TEXT_KEYS):
        missing = sorted(set(V2_TEXT_KEYS) - set(present))
        raise ValueError(
            f"{path}: partial LTX-2.3 (V2 text) config: has {sorted(present)} but is missing {missing}; "
            f"an LTX-2.3 checkpoint sets all of {V2_TEXT_KEYS}"
        )
    return "ltx-2.3"


def detect_version(config: Mapping, path: str | Path = "<config>", model_version: str | None = None
                   ) -> ModelVersion:
    """Model version of a checkpoint config (the ``transformer`` section decides, with the file's
    ``model_version`` metadata when given; see :func:`detect_model_version`)."""
    return detect_model_version(config_section(config, "transformer", path), model_version, path)


# -------------------------------------------------------------------------------------------------------------
# Reading tensors and strict loading


def read_tensors(
    path: str | Path,
    select: Callable[[str], str | None],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Read only the tensors that ``select`` keeps, renamed by it, one at a time.

    ``select(official_key)`` (the file's key under its official name, :func:`official_key_names`) returns the
    module key for a tensor to keep, or ``None`` to skip it (the tensor data is never read). Floating-point
    tensors are cast to ``dtype`` as they are read, so peak host memory stays near one copy of what is kept.
    """
    path = _check_is_file(Path(path))
    tensors: dict[str, torch.Tensor] = {}
    official = official_key_names(path, _file_keys(path))
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for file_key in f.keys():
                name = select(official[file_key])
                if name is None:
                    continue
                tensor = f.get_tensor(file_key)
                if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor = tensor.to(dtype)
                tensors[name] = tensor.to(device)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
    return tensors


def strip_prefix(prefix: str, exclude: Iterable[str] = ()) -> Callable[[str], str | None]:
    """A ``select`` function for :func:`read_tensors`: keep keys under ``prefix`` (minus ``exclude``d
    sub-prefixes) and strip the prefix."""
    exclude = tuple(exclude)

    def select(key: str) -> str | None:
        if not key.startswith(prefix):
            return None
        rest = key[len(prefix) :]
        if exclude and rest.startswith(exclude):
            return None
        return rest

    return select


def load_state_dict_strict(
    module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str | Path
) -> torch.nn.Module:
    """``load_state_dict(assign=True)`` that requires every tensor of the module: an error names the file and
    lists every missing key and every shape mismatch. Keys the module has no place for (extra tensors some files
    carry) are left out with a warning listing them, as ltx-core tolerates them."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or mismatched:
        parts = [f"{source}: the weights do not match the model built from its config."]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_abbreviate(missing)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {_abbreviate(mismatched)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_abbreviate(unexpected)}")
        raise ValueError("\n  ".join(parts))
    if unexpected:
        logger.warning("%s: %d tensors have no place in the model and are ignored (unexpected keys): %s", source,
                       len(unexpected), _abbreviate(unexpected))
    module.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=True, assign=True)
    return module


def _abbreviate(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def check_nothing_on_meta(module: torch.nn.Module, source: str | Path) -> None:
    """Raise if any parameter or buffer was left unmaterialised after loading."""
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{source}: these tensors were not loaded and are still on the meta device: {left}")


def write_checkpoint(
    path: str | Path, tensors: Mapping[str, torch.Tensor], config: Mapping, extra_metadata: Mapping[str, str] = ()
) -> Path:
    """Write tensors with the model config as JSON in the ``config`` metadata entry (the official layout).

    The file is written to a temporary name and renamed, so a crash never leaves a half-written checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"config": json.dumps(config), **dict(extra_metadata)}
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path
