"""Helpers for parity tests against the reference implementation, ltx-core 1.0.0 (an oracle, never imported by
ltxf itself).

ltx-core never initialises weights, so :func:`random_init_` fills them; :func:`write_official_checkpoint` writes
reference modules into a single safetensors file in the official layout, with the config as JSON metadata, for
ltxf's loaders to read back.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file


def import_ltx_core(module: str):
    """Import an ltx-core module. transformers must be imported before torchaudio is stubbed (ltx-core's audio
    modules import torchaudio at import time; the parity tests never call into it)."""
    import transformers  # noqa: F401

    sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
    return importlib.import_module(module)


def random_init_(module: torch.nn.Module, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter and buffer with reproducible values (ltx-core leaves them empty).

    Biases get small random values too (not zeros) so that a bias that is wired wrongly changes the output.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("timestep_scale_multiplier"):
                p.fill_(1000.0)
            elif name.endswith("weight") and p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
        for name, b in module.named_buffers():
            if name.endswith("std-of-means"):
                b.copy_(0.5 + torch.rand(b.shape, generator=generator))
            elif name.endswith("mean-of-means"):
                b.copy_(0.1 * torch.randn(b.shape, generator=generator))
    return module


def tiny_transformer_config(version: str) -> dict:
    """A tiny transformer config section with every key the reference asserts, in checkpoint values."""
    t = dict(
        num_layers=2, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
        audio_num_attention_heads=2, audio_attention_head_dim=8, audio_cross_attention_dim=16,
        in_channels=128, out_channels=128, audio_in_channels=128, audio_out_channels=128,
        caption_channels=24,
        positional_embedding_max_pos=[20, 2048, 2048], audio_positional_embedding_max_pos=[20],
        positional_embedding_theta=10000.0,
        timestep_scale_multiplier=1000, av_ca_timestep_scale_multiplier=1000.0,
        rope_type="split", frequencies_precision="float64", norm_eps=1e-6,
        dropout=0.0, attention_bias=True, num_vector_embeds=None, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, use_linear_projection=False, only_cross_attention=False,
        cross_attention_norm=True, double_self_attention=False, upcast_attention=False,
        standardization_norm="rms_norm", norm_elementwise_affine=False, qk_norm="rms_norm",
        positional_embedding_type="rope", use_audio_video_cross_attention=True, share_ff=False,
        av_cross_ada_norm=True, use_middle_indices_grid=True,
        connector_num_layers=2, connector_num_attention_heads=2, connector_attention_head_dim=12,
        connector_positional_embedding_max_pos=[4096], connector_num_learnable_registers=8,
    )
    if version == "ltx-2.3":
        t.update(
            apply_gated_attention=True, cross_attention_adaln=True, caption_proj_before_connector=True,
            caption_projection_first_linear=False, caption_proj_input_norm=False,
            caption_projection_second_linear=False, connector_apply_gated_attention=True,
            connector_num_attention_heads=2, connector_attention_head_dim=16,
            audio_connector_num_attention_heads=2, audio_connector_attention_head_dim=8,
        )
    elif version != "ltx-2":
        raise ValueError(version)
    return t


def write_official_checkpoint(
    path: Path, config: dict, components: dict[str, torch.nn.Module | dict[str, torch.Tensor]]
) -> Path:
    """Write modules (or raw state dicts) under their official key prefixes, with ``config`` as metadata.

    ``components`` maps a prefix such as ``"model.diffusion_model."`` to a module or a state dict.
    """
    tensors: dict[str, torch.Tensor] = {}
    for prefix, component in components.items():
        state = component.state_dict() if isinstance(component, torch.nn.Module) else component
        for key, value in state.items():
            tensors[prefix + key] = value.detach().contiguous().clone()
    save_file(tensors, str(path), metadata={"config": json.dumps(config)})
    return path


def build_reference_transformer(config: dict, state: dict[str, torch.Tensor], *, batch_size: int):
    """ltx-core's ``LTXModel`` for ``config`` with ``state`` assigned strictly, and ``run(inputs)`` calling it
    with ltxf-style ``{"video": {...}, "audio": {...}}`` Modality fields and no perturbation (benchmark baseline)."""
    perturbations = import_ltx_core("ltx_core.guidance.perturbations")
    transformer = import_ltx_core("ltx_core.model.transformer")
    with torch.device("meta"):
        model = transformer.LTXModelConfigurator.from_config(config)
    model.load_state_dict(state, strict=True, assign=True)
    empty = perturbations.BatchedPerturbationConfig.empty(batch_size)

    def run(inputs):
        return model(transformer.Modality(**inputs["video"]), transformer.Modality(**inputs["audio"]), empty)

    return model, run
