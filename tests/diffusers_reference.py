"""Helpers for tests against diffusers 0.42.1 (a test-only oracle, like ltx-core: never imported by ltxf).

diffusers reads the official single-file layout with ``LTX2VideoTransformer3DModel.from_single_file`` (its own key
converter) and LoRAs with the LTX-2 pipeline's ``LTX2LoraLoaderMixin`` (with peft). Nothing is downloaded: the
diffusers config is written locally from the checkpoint's own config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ltxf.models.checkpoint import TRANSFORMER_PREFIX, read_config, read_metadata


def diffusers_transformer_config(section: dict) -> dict:
    """diffusers' ``LTX2VideoTransformer3DModel`` config for an official checkpoint's ``transformer`` section."""
    max_pos = section["positional_embedding_max_pos"]
    ltx23 = bool(section.get("caption_proj_before_connector", False))
    return {
        "_class_name": "LTX2VideoTransformer3DModel",
        "in_channels": section["in_channels"], "out_channels": section["out_channels"],
        "num_attention_heads": section["num_attention_heads"], "attention_head_dim": section["attention_head_dim"],
        "cross_attention_dim": section["cross_attention_dim"],
        "pos_embed_max_pos": max_pos[0], "base_height": max_pos[1], "base_width": max_pos[2],
        "gated_attn": bool(section.get("apply_gated_attention", False)),
        "cross_attn_mod": bool(section.get("cross_attention_adaln", False)),
        "audio_in_channels": section["audio_in_channels"], "audio_out_channels": section["audio_out_channels"],
        "audio_num_attention_heads": section["audio_num_attention_heads"],
        "audio_attention_head_dim": section["audio_attention_head_dim"],
        "audio_cross_attention_dim": section["audio_cross_attention_dim"],
        "audio_pos_embed_max_pos": section["audio_positional_embedding_max_pos"][0],
        "audio_gated_attn": bool(section.get("apply_gated_attention", False)),
        "audio_cross_attn_mod": bool(section.get("cross_attention_adaln", False)),
        "num_layers": section["num_layers"], "norm_eps": section["norm_eps"],
        "caption_channels": section.get("caption_channels") or 3840,
        "rope_theta": section["positional_embedding_theta"],
        "rope_double_precision": section.get("frequencies_precision") == "float64",
        "timestep_scale_multiplier": section["timestep_scale_multiplier"],
        "cross_attn_timestep_scale_multiplier": section["av_ca_timestep_scale_multiplier"],
        "rope_type": section["rope_type"],
        "use_prompt_embeddings": not ltx23,
    }  # fmt: skip


def convert_for_diffusers_single_file(path: Path, out: Path) -> Path:
    """The one rename diffusers 0.42.1's single-file converter lacks for LTX-2.3: ``prompt_adaln_single`` ->
    ``prompt_adaln`` (its LoRA converter has it). Other keys are left for diffusers' own converter."""
    tensors = load_file(str(path))
    renamed = {}
    for key, value in tensors.items():
        if key.startswith(TRANSFORMER_PREFIX):
            name = key.removeprefix(TRANSFORMER_PREFIX)
            for old, new in (("audio_prompt_adaln_single.", "audio_prompt_adaln."),
                             ("prompt_adaln_single.", "prompt_adaln.")):
                if name.startswith(old):
                    name = new + name.removeprefix(old)
                    break
            key = TRANSFORMER_PREFIX + name
        renamed[key] = value
    save_file(renamed, str(out), metadata=read_metadata(path))
    return out


def diffusers_transformer_from_single_file(path: Path, workdir: Path, dtype: torch.dtype = torch.float32):
    """``LTX2VideoTransformer3DModel.from_single_file`` on an official-layout file (LTX-2.3: after
    :func:`convert_for_diffusers_single_file`), with a local config written from the file's own."""
    from diffusers import LTX2VideoTransformer3DModel

    section = read_config(path)["transformer"]
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "transformer").mkdir(exist_ok=True)
    (workdir / "transformer" / "config.json").write_text(json.dumps(diffusers_transformer_config(section)))
    if section.get("cross_attention_adaln"):
        path = convert_for_diffusers_single_file(path, workdir / "converted.safetensors")
    model = LTX2VideoTransformer3DModel.from_single_file(str(path), config=str(workdir), subfolder="transformer",
                                                         local_files_only=True, torch_dtype=dtype)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise AssertionError(f"diffusers left these uninitialised: {left[:8]}")
    return model


def lora_pipeline(transformer):
    """The smallest object that is an LTX-2 pipeline for LoRA purposes: ``LTX2LoraLoaderMixin`` with the
    transformer as its only component (the loader and ``fuse_lora`` are the pipeline's own code)."""
    from diffusers.loaders import LTX2LoraLoaderMixin

    class TransformerOnlyPipeline(LTX2LoraLoaderMixin):
        _lora_loadable_modules = ["transformer"]
        hf_device_map = None

        def __init__(self, transformer):
            self.transformer = transformer

        @property
        def components(self):
            return {"transformer": self.transformer}

    return TransformerOnlyPipeline(transformer)
