"""LoRA file layouts: read every common one into one form, and match it against a model.

:func:`load_lora_file` reads a LoRA safetensors file in any of these layouts (detected per key), each with the
scale rule of the loaders that write and read it:

- ltxf / ComfyUI / ltx-core: ``diffusion_model.<module>.lora_A.weight`` / ``.lora_B.weight``, optionally
  ``<module>.alpha``. Scale ``alpha / rank`` where the alpha key exists, else 1.
- PEFT: ``base_model.model.<module>.lora_A.weight`` or no prefix. Scale ``lora_alpha / r`` from an
  ``adapter_config.json`` beside the file (``/ sqrt(r)`` with rsLoRA), else 1.
- kohya / ComfyUI: ``<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, with ``<module>`` dotted or
  flat (``lora_unet_transformer_blocks_0_attn1_to_q``). Scale ``alpha / rank`` where the alpha key exists, else 1.
- diffusers: ``transformer.<diffusers name>.lora_A.weight`` (``time_embed``, ``proj_in``, ...; renamed to the
  official names). Scale ``lora_alpha / r`` from the ``lora_adapter_metadata`` entry, else 1 (diffusers then
  takes ``alpha = rank``).

Every module comes out with official transformer names (``transformer_blocks.0.
attn1.to_q``), ``lora_A`` [rank, in], ``lora_B`` [out, rank] and its scale, so the applied update is always
``W + strength * scale * B @ A``.

Entries the transformer cannot use (LoRAs on the text connectors or the text projection, ComfyUI ``diff``
weights, DoRA scales, text-encoder keys) are not an error: like ltx-core, the reader leaves them out and lists
them in :attr:`LoraFile.skipped`. :func:`match_lora` then resolves the modules against the model's Linear layers
(flat kohya names need the model to be undone) and reports, rather than fails on, the modules the model does not
have; a shape mismatch (a LoRA for another model) is still an error.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

logger = logging.getLogger(__name__)

COMFY_PREFIX = "diffusion_model."
PEFT_PREFIX = "base_model.model."
DIFFUSERS_PREFIX = "transformer."
KOHYA_FLAT_PREFIX = "lora_unet_"
LORA_A = "lora_A.weight"
LORA_B = "lora_B.weight"

# Suffix in the file -> which factor it is.
_FACTOR_SUFFIXES = {
    ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_down.weight": "A", ".lora_up.weight": "B", ".alpha": "alpha",
}  # fmt: skip
# Prefixes of parts of the model that are not the transformer: LoRAs there are left out (ltx-core ignores them too).
_OTHER_PART_PREFIXES = (
    "text_embedding_projection.", "connectors.", "text_encoder.", "text_encoders.", "lora_te_", "lora_te1_",
    "lora_te2_", "vae.", "audio_vae.", "vocoder.",
)  # fmt: skip
_CONNECTOR_MODULES = ("video_embeddings_connector", "audio_embeddings_connector", "embeddings_connector")

# Official module names -> diffusers' (LTX2VideoTransformer3DModel), per dotted component. The first group renames
# top-level modules only; the norms are renamed wherever they appear.
OFFICIAL_TO_DIFFUSERS_TOP = {
    "patchify_proj": "proj_in",
    "audio_patchify_proj": "audio_proj_in",
    "adaln_single": "time_embed",
    "audio_adaln_single": "audio_time_embed",
    "av_ca_video_scale_shift_adaln_single": "av_cross_attn_video_scale_shift",
    "av_ca_a2v_gate_adaln_single": "av_cross_attn_video_a2v_gate",
    "av_ca_audio_scale_shift_adaln_single": "av_cross_attn_audio_scale_shift",
    "av_ca_v2a_gate_adaln_single": "av_cross_attn_audio_v2a_gate",
    "prompt_adaln_single": "prompt_adaln",
    "audio_prompt_adaln_single": "audio_prompt_adaln",
}
OFFICIAL_TO_DIFFUSERS_ANY = {"q_norm": "norm_q", "k_norm": "norm_k"}
_DIFFUSERS_TO_OFFICIAL_TOP = {v: k for k, v in OFFICIAL_TO_DIFFUSERS_TOP.items()}
_DIFFUSERS_TO_OFFICIAL_ANY = {v: k for k, v in OFFICIAL_TO_DIFFUSERS_ANY.items()}


def official_to_diffusers_name(name: str) -> str:
    """An official transformer module name in diffusers' naming (``adaln_single.linear`` -> ``time_embed.linear``)."""
    parts = name.split(".")
    parts[0] = OFFICIAL_TO_DIFFUSERS_TOP.get(parts[0], parts[0])
    return ".".join(OFFICIAL_TO_DIFFUSERS_ANY.get(p, p) for p in parts)


def diffusers_to_official_name(name: str) -> str:
    """The inverse of :func:`official_to_diffusers_name`."""
    parts = name.split(".")
    parts[0] = _DIFFUSERS_TO_OFFICIAL_TOP.get(parts[0], parts[0])
    return ".".join(_DIFFUSERS_TO_OFFICIAL_ANY.get(p, p) for p in parts)


class LoraFile(NamedTuple):
    """A LoRA file in one form: official module names, PEFT factor names, and the scale each module needs."""

    tensors: dict[str, torch.Tensor]
    """``<module>.lora_A.weight`` [rank, in] and ``<module>.lora_B.weight`` [out, rank], no prefix."""
    scales: dict[str, float]
    """Per module, the factor to apply: ``W + strength * scales[module] * B @ A``."""
    metadata: dict[str, str]
    """The file's safetensors metadata."""
    layout: str = "ltxf"
    """``"comfy"`` (also ltxf's and ltx-core's), ``"peft"``, ``"kohya"`` or ``"diffusers"`` (mixed: joined by +)."""
    skipped: tuple[str, ...] = ()
    """Keys or modules that are left out, each with the reason (not transformer Linear layers)."""
    flat_names: bool = False
    """Module names are kohya's flat ``transformer_blocks_0_attn1_to_q`` form: :func:`match_lora` resolves them."""


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise ValueError(f"LoRA file not found: {path}")
    raw: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():
                raw[key] = f.get_tensor(key)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
    return raw, metadata


def _split_factor(key: str) -> tuple[str, str] | None:
    for suffix, factor in _FACTOR_SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], factor
    return None


def _peft_config_alpha(path: Path) -> tuple[float, int, bool] | None:
    """``(lora_alpha, r, use_rslora)`` from a PEFT ``adapter_config.json`` next to the file, if there is one."""
    config_path = path.with_name("adapter_config.json")
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text())
        return float(config["lora_alpha"]), int(config["r"]), bool(config.get("use_rslora", False))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{config_path}: expected a PEFT adapter config with 'lora_alpha' and 'r': {exc}") from exc


def _diffusers_metadata_alpha(metadata: Mapping[str, str], path: Path) -> dict | None:
    """diffusers' ``lora_adapter_metadata`` (a PEFT LoraConfig as JSON), or None."""
    text = metadata.get("lora_adapter_metadata")
    if text is None:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: the 'lora_adapter_metadata' entry is not valid JSON: {exc}") from exc
    if isinstance(config, dict) and "transformer.r" in config:  # stored flat per component by some versions
        config = {k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")}
    return config if isinstance(config, dict) else None


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    for pattern, value in patterns.items():
        if module == pattern or module.endswith("." + pattern) or re.fullmatch(pattern, module):
            return float(value)
    return default


def load_lora_file(path: str | Path, *, dtype: torch.dtype | None = None) -> LoraFile:
    """Read a LoRA safetensors file in any layout of the module docstring into one :class:`LoraFile`.

    Keys of other model parts (text connectors, text projection, text encoders, VAEs), ComfyUI ``diff`` weights
    and DoRA scales are left out and listed in ``skipped`` (a warning names them). A ``ValueError`` names the file
    for what cannot be a LoRA: a module without both factors, factors that do not form a low-rank pair, an alpha
    that is not one number, or no transformer module at all. ``dtype`` casts the factors.
    """
    path = Path(path)
    raw, metadata = _read_safetensors(path)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    layouts: set[str] = set()
    skipped: list[str] = []
    for key, tensor in raw.items():
        name, layout = key, "peft"
        if name.startswith(_OTHER_PART_PREFIXES):
            skipped.append(f"{key} (not the transformer)")
            continue
        for prefix, prefix_layout in ((COMFY_PREFIX, "comfy"), (PEFT_PREFIX, "peft"), (DIFFUSERS_PREFIX, "diffusers"),
                                      (KOHYA_FLAT_PREFIX, "kohya")):
            if name.startswith(prefix):
                name, layout = name[len(prefix) :], prefix_layout
                break
        split = _split_factor(name)
        if split is None:
            reason = "a full-weight difference" if key.endswith((".diff", ".diff_b")) else "not a LoRA factor"
            skipped.append(f"{key} ({reason})")
            continue
        module, factor = split
        if layout == "peft" and key.endswith((".lora_down.weight", ".lora_up.weight")):
            layout = "kohya"
        if module.split(".")[0] in _CONNECTOR_MODULES:
            skipped.append(f"{key} (text connector, not the transformer)")
            continue
        if layout == "diffusers":
            module = diffusers_to_official_name(module)
        if factor != "alpha":
            layouts.add(layout)
        factors.setdefault(module, {})[factor] = tensor

    flat = any(k.startswith(KOHYA_FLAT_PREFIX) for k in raw)
    peft_alpha = _peft_config_alpha(path)
    diffusers_config = _diffusers_metadata_alpha(metadata, path) if "diffusers" in layouts else None
    tensors: dict[str, torch.Tensor] = {}
    scales: dict[str, float] = {}
    for module in sorted(factors):
        parts = factors[module]
        if "A" not in parts or "B" not in parts:
            raise ValueError(f"{path}: module '{module}' needs both LoRA factors (lora_A/lora_down and "
                             f"lora_B/lora_up), got only {sorted(parts)}")
        a, b = parts["A"], parts["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{path}: module '{module}': the factors {tuple(a.shape)} and {tuple(b.shape)} do not form a "
                "low-rank pair ([rank, in] and [out, rank]; convolution LoRAs are not supported)"
            )
        rank = a.shape[0]
        if "alpha" in parts:
            alpha = parts["alpha"]
            if alpha.numel() != 1:
                raise ValueError(f"{path}: the alpha of '{module}' must be one number, got shape {tuple(alpha.shape)}")
            scale = float(alpha.float().item()) / rank
        elif diffusers_config is not None:
            lora_alpha = _pattern_value(diffusers_config.get("alpha_pattern") or {}, module,
                                        float(diffusers_config.get("lora_alpha", rank)))
            r = _pattern_value(diffusers_config.get("rank_pattern") or {}, module,
                               float(diffusers_config.get("r", rank)))
            scale = lora_alpha / (math.sqrt(r) if diffusers_config.get("use_rslora") else r)
        elif peft_alpha is not None:
            lora_alpha, r, rslora = peft_alpha
            scale = lora_alpha / (math.sqrt(r) if rslora else r)
        else:
            scale = 1.0
        tensors[f"{module}.{LORA_A}"] = a.to(dtype) if dtype is not None else a
        tensors[f"{module}.{LORA_B}"] = b.to(dtype) if dtype is not None else b
        scales[module] = scale
    if not scales:
        raise ValueError(
            f"{path}: no LoRA factors for the transformer found (expected keys such as "
            f"'diffusion_model.<module>.lora_A.weight', '<module>.lora_down.weight' or "
            f"'transformer.<module>.lora_A.weight'); left out: {_abbreviate(skipped) or 'nothing'}"
        )
    if skipped:
        logger.warning("%s: %d entries left out (the transformer has no use for them): %s", path, len(skipped),
                       _abbreviate(skipped))
    return LoraFile(tensors=tensors, scales=scales, metadata=metadata, layout="+".join(sorted(layouts)),
                    skipped=tuple(skipped), flat_names=flat)


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{module name: (out, in)}`` for every ``nn.Linear`` of ``model`` (works on ``meta`` too)."""
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def match_lora(lora: LoraFile, shapes: Mapping[str, tuple[int, int]], *, source: str | Path = "<lora>") -> LoraFile:
    """Keep the modules of ``lora`` that are Linear layers of the model (``shapes`` from :func:`linear_shapes`).

    Flat kohya names (``transformer_blocks_0_attn1_to_q``) are resolved against the model's names, official or
    diffusers-style. Modules the model does not have are dropped and reported (a warning and ``skipped``), as
    ltx-core ignores them; a module whose ``B @ A`` shape differs from the layer's is a ``ValueError`` (the LoRA
    is for another model), and so is a LoRA none of whose modules the model has.
    """
    lookup: dict[str, str] = {name: name for name in shapes}
    if lora.flat_names:
        for name in shapes:
            lookup.setdefault(name.replace(".", "_"), name)
            lookup.setdefault(official_to_diffusers_name(name).replace(".", "_"), name)
    tensors: dict[str, torch.Tensor] = {}
    scales: dict[str, float] = {}
    unknown: list[str] = []
    mismatched: list[str] = []
    for module, scale in lora.scales.items():
        target = lookup.get(module)
        if target is None:
            unknown.append(module)
            continue
        a, b = lora.tensors[f"{module}.{LORA_A}"], lora.tensors[f"{module}.{LORA_B}"]
        if (b.shape[0], a.shape[1]) != tuple(shapes[target]):
            mismatched.append(f"{target}: B @ A is {(b.shape[0], a.shape[1])}, the layer {tuple(shapes[target])}")
            continue
        tensors[f"{target}.{LORA_A}"], tensors[f"{target}.{LORA_B}"] = a, b
        scales[target] = scale
    if mismatched:
        raise ValueError(f"{source}: the LoRA does not fit this model ({len(mismatched)} shape mismatches, a LoRA "
                         f"for another model size?): {_abbreviate(mismatched)}")
    if not scales:
        raise ValueError(f"{source}: none of the LoRA's {len(unknown)} modules is a Linear layer of this model "
                         f"(a LoRA for another model?): {_abbreviate(unknown)}")
    if unknown:
        logger.warning("%s: %d LoRA modules are not Linear layers of this model and are ignored: %s", source,
                       len(unknown), _abbreviate(unknown))
    skipped = lora.skipped + tuple(f"{m} (not a Linear layer of the model)" for m in unknown)
    return lora._replace(tensors=tensors, scales=scales, skipped=skipped, flat_names=False)


def _abbreviate(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
