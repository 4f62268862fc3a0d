"""The LoRA reader: every common layout gives the same applied update ``scale * B @ A`` on the same modules.

The diffusers-named file is made by diffusers' own converter (the one its LTX-2 pipeline applies to official
files), so the reader's renaming is checked against diffusers, not against itself.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from ltxf.checkpoint import export_lora
from ltxf.demo import demo_transformer_config
from ltxf.lora_formats import (
    diffusers_to_official_name,
    linear_shapes,
    load_lora_file,
    match_lora,
    official_to_diffusers_name,
)
from ltxf.models.transformer import AVTransformer

RANK, ALPHA = 4, 8.0
MODULES = (
    "patchify_proj", "adaln_single.linear", "prompt_adaln_single.emb.timestep_embedder.linear_1",
    "av_ca_video_scale_shift_adaln_single.linear", "transformer_blocks.0.attn1.to_q",
    "transformer_blocks.0.audio_to_video_attn.to_out.0", "transformer_blocks.1.audio_ff.net.0.proj",
    "transformer_blocks.1.attn2.to_gate_logits",
)  # fmt: skip


@pytest.fixture(scope="module")
def shapes() -> dict[str, tuple[int, int]]:
    with torch.device("meta"):
        return linear_shapes(AVTransformer(demo_transformer_config()))


@pytest.fixture(scope="module")
def factors(shapes):
    """Trained factors of a rank-4, alpha-8 LoRA (so the update is 2 * B @ A), fp32."""
    generator = torch.Generator().manual_seed(0)
    out = {}
    for module in MODULES:
        out_dim, in_dim = shapes[module]
        out[module] = (torch.randn(RANK, in_dim, generator=generator), torch.randn(out_dim, RANK, generator=generator))
    return out


def _expected(factors) -> dict[str, torch.Tensor]:
    return {m: (ALPHA / RANK) * (b @ a) for m, (a, b) in factors.items()}


def _applied(lora) -> dict[str, torch.Tensor]:
    return {m: s * (lora.tensors[f"{m}.lora_B.weight"].float() @ lora.tensors[f"{m}.lora_A.weight"].float())
            for m, s in lora.scales.items()}


def _assert_same_update(lora, factors) -> None:
    applied, expected = _applied(lora), _expected(factors)
    assert set(applied) == set(expected)
    for module, value in expected.items():
        # fp32 throughout; folding the factor 2 into B is exact, so only the matmul order differs.
        torch.testing.assert_close(applied[module], value, rtol=1e-6, atol=1e-6, msg=module)


def _flat(name: str) -> str:
    return name.replace(".", "_")


def test_every_layout_gives_the_trained_update(factors, shapes, tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_ltx2_lora_to_diffusers

    files = {}
    files["ltxf"] = export_lora(
        tmp_path / "ltxf.safetensors",
        {f"{m}.lora_{x}.weight": t for m, (a, b) in factors.items() for x, t in (("A", a), ("B", b))},
        rank=RANK, alpha=ALPHA, dtype=torch.float32)
    comfy = {}
    for m, (a, b) in factors.items():
        comfy.update({f"diffusion_model.{m}.lora_A.weight": a, f"diffusion_model.{m}.lora_B.weight": b,
                      f"diffusion_model.{m}.alpha": torch.tensor(ALPHA)})
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    files["comfy"] = tmp_path / "comfy.safetensors"

    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    save_file({f"base_model.model.{m}.lora_{x}.weight": t for m, (a, b) in factors.items()
               for x, t in (("A", a), ("B", b))}, str(peft_dir / "adapter_model.safetensors"))
    (peft_dir / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA, "peft_type": "LORA"}))
    files["peft"] = peft_dir / "adapter_model.safetensors"

    kohya = {}
    for m, (a, b) in factors.items():
        kohya.update({f"diffusion_model.{m}.lora_down.weight": a, f"diffusion_model.{m}.lora_up.weight": b,
                      f"diffusion_model.{m}.alpha": torch.tensor(ALPHA)})
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    files["kohya"] = tmp_path / "kohya.safetensors"

    flat = {}
    for m, (a, b) in factors.items():
        flat.update({f"lora_unet_{_flat(m)}.lora_down.weight": a, f"lora_unet_{_flat(m)}.lora_up.weight": b,
                     f"lora_unet_{_flat(m)}.alpha": torch.tensor(ALPHA)})
    save_file(flat, str(tmp_path / "flat.safetensors"))
    files["flat"] = tmp_path / "flat.safetensors"

    # diffusers: its own converter renames the official file's keys; the alpha goes into its adapter metadata.
    official = {f"diffusion_model.{m}.lora_{x}.weight": t for m, (a, b) in factors.items()
                for x, t in (("A", a), ("B", b))}
    diffusers_sd = _convert_non_diffusers_ltx2_lora_to_diffusers(official)
    assert any(k.startswith("transformer.time_embed.") for k in diffusers_sd)
    save_file(diffusers_sd, str(tmp_path / "diffusers.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps({"r": RANK, "lora_alpha": ALPHA})})
    files["diffusers"] = tmp_path / "diffusers.safetensors"

    layouts = {}
    for name, path in files.items():
        lora = match_lora(load_lora_file(path), shapes, source=path)
        _assert_same_update(lora, factors)
        layouts[name] = lora.layout
    assert layouts == {"ltxf": "comfy", "comfy": "comfy", "peft": "peft", "kohya": "comfy", "flat": "kohya",
                       "diffusers": "diffusers"}

    # Without their scale information, PEFT and diffusers files mean scale 1 (as their loaders apply them).
    (peft_dir / "adapter_config.json").unlink()
    assert set(load_lora_file(files["peft"]).scales.values()) == {1.0}
    save_file(diffusers_sd, str(tmp_path / "diffusers_plain.safetensors"))
    assert set(load_lora_file(tmp_path / "diffusers_plain.safetensors").scales.values()) == {1.0}


def test_name_mapping_matches_the_diffusers_model(shapes):
    """Every Linear of ltxf's transformer, renamed, is a Linear of the same shape in diffusers' model."""
    from diffusers import LTX2VideoTransformer3DModel

    from tests.diffusers_reference import diffusers_transformer_config

    with torch.device("meta"):
        reference = LTX2VideoTransformer3DModel.from_config(
            diffusers_transformer_config(demo_transformer_config().to_checkpoint_config()))
    theirs = linear_shapes(reference)
    for name, shape in shapes.items():
        renamed = official_to_diffusers_name(name)
        assert theirs.get(renamed) == shape, name
        assert diffusers_to_official_name(renamed) == name


def test_unknown_modules_and_other_parts_are_reported_not_fatal(factors, shapes, tmp_path, caplog):
    module = MODULES[4]
    a, b = factors[module]
    path = tmp_path / "mixed.safetensors"
    save_file({k: v.clone() for k, v in {
        f"diffusion_model.{module}.lora_A.weight": a, f"diffusion_model.{module}.lora_B.weight": b,
        "diffusion_model.transformer_blocks.7.attn1.to_q.lora_A.weight": a,  # a block this model lacks
        "diffusion_model.transformer_blocks.7.attn1.to_q.lora_B.weight": b,
        "diffusion_model.video_embeddings_connector.transformer_1d_blocks.0.attn1.to_q.lora_A.weight": a,
        "diffusion_model.video_embeddings_connector.transformer_1d_blocks.0.attn1.to_q.lora_B.weight": b,
        "text_embedding_projection.video_aggregate_embed.lora_A.weight": a,
        "text_embedding_projection.video_aggregate_embed.lora_B.weight": b,
        "diffusion_model.norm_out.diff": torch.zeros(3),
        f"diffusion_model.{module}.dora_scale": torch.ones(1, 3),
    }.items()}, str(path))
    with caplog.at_level(logging.WARNING, logger="ltxf.lora_formats"):
        lora = match_lora(load_lora_file(path), shapes, source=path)
    assert set(lora.scales) == {module}
    skipped = " ".join(lora.skipped)
    for part in ("video_embeddings_connector", "text_embedding_projection", "norm_out.diff", "dora_scale",
                 "transformer_blocks.7.attn1.to_q (not a Linear layer"):
        assert part in skipped, part
    assert "transformer_blocks.7.attn1.to_q" in caplog.text and "text_embedding_projection" in caplog.text


def test_bad_lora_files_are_clear_errors(factors, shapes, tmp_path):
    module = MODULES[4]
    a, b = factors[module]
    cases = {
        "half.safetensors": ({f"diffusion_model.{module}.lora_A.weight": a}, "needs both LoRA factors"),
        "pair.safetensors": ({f"diffusion_model.{module}.lora_A.weight": a,
                              f"diffusion_model.{module}.lora_B.weight": b.T.contiguous()}, "low-rank pair"),
        "alpha.safetensors": ({f"diffusion_model.{module}.lora_A.weight": a,
                               f"diffusion_model.{module}.lora_B.weight": b,
                               f"diffusion_model.{module}.alpha": torch.ones(2)}, "must be one number"),
        "none.safetensors": ({"text_embedding_projection.x.lora_A.weight": a}, "no LoRA factors for the transformer"),
    }
    for name, (tensors, message) in cases.items():
        save_file({k: v.clone() for k, v in tensors.items()}, str(tmp_path / name))
        with pytest.raises(ValueError, match=message):
            load_lora_file(tmp_path / name)

    wide = {f"diffusion_model.{module}.lora_A.weight": torch.zeros(RANK, a.shape[1] * 2),
            f"diffusion_model.{module}.lora_B.weight": b}
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match=r"wide\.safetensors: the LoRA does not fit this model .*attn1\.to_q"):
        match_lora(load_lora_file(tmp_path / "wide.safetensors"), shapes, source=tmp_path / "wide.safetensors")
    foreign = {"diffusion_model.blocks.0.q.lora_A.weight": a, "diffusion_model.blocks.0.q.lora_B.weight": b}
    save_file(foreign, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="none of the LoRA's 1 modules"):
        match_lora(load_lora_file(tmp_path / "foreign.safetensors"), shapes)
    with pytest.raises(ValueError, match="LoRA file not found"):
        load_lora_file(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_lora_file(tmp_path / "junk.safetensors")
