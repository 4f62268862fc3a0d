"""LTX-2.5 text path against the official ltx-core 1.2 goldens (``goldens/text.safetensors``) plus the split-pack
plumbing around it (pairing check, pack resolution, conditions-file tagging).

Tolerances (golden README §3): token ids and masks exact; Gemma hidden states ``atol=1e-4`` (float32 envelope
9e-6 at values ~31; ltxf runs the same ``transformers`` Gemma 4 text model, so it lands at 0); features and
connector outputs ``atol=1e-5`` (envelope 1.6e-6 at ~3.6).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ltxf.models import checkpoint
from ltxf.models.gemma import load_text_encoder, text_encoder_identity
from ltxf.models.pack import (
    CONDITIONS_TEXT_ENCODER_KEY,
    check_conditions_text_encoder,
    check_gemma_pairing,
    expected_text_encoder,
    is_diffusion_video_vae,
    read_video_scale_factors,
    resolve_pack,
)
from ltxf.models.text import load_embeddings_processor
from tests.models.golden_ltx25 import (
    AUDIO_VAE,
    GEMMA3_TINY,
    LTX25,
    TEXT_ENCODER,
    TRANSFORMER,
    VIDEO_VAE_CONV,
    VIDEO_VAE_DIFFUSION,
    assert_close,
    golden,
)


def _prompts() -> list[str]:
    with safe_open(str(LTX25 / "goldens" / "text.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["prompts"])


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder(TEXT_ENCODER, dtype=torch.float32)


def test_tokens_bos_and_left_padding(encoder):
    g = golden("text")
    ids, mask = encoder.tokenize(_prompts())
    assert torch.equal(ids, g["token_ids"]) and torch.equal(mask, g["attention_mask"])
    # The Gemma 4 tokenizer adds no BOS itself: the stored raw ids start without it, ltxf's with it.
    with safe_open(str(LTX25 / "goldens" / "text.safetensors"), framework="pt") as f:
        raw = json.loads(f.metadata()["checks"])["raw_hf_token_ids"]
    assert encoder.tokenizer(_prompts()[1].strip())["input_ids"] == raw[1]
    assert ids[1, -len(raw[1]) - 1:].tolist() == [encoder.bos_token_id, *raw[1]]


def test_gemma4_hidden_states_features_and_connectors(encoder):
    g = golden("text")
    hidden_BSDL, mask = encoder.encode_prompts(_prompts())
    assert_close(hidden_BSDL.permute(0, 3, 1, 2), g["gemma_hidden_states"], 1e-4, "Gemma 4 hidden states")
    processor = load_embeddings_processor(TRANSFORMER, text_encoder_path=TEXT_ENCODER)
    assert processor.config.gemma_hidden_size == 32 and processor.config.gemma_num_hidden_states == 7
    with torch.no_grad():
        for i in range(2):  # one prompt at a time, as the official caption preprocessing caches them
            video, audio = processor.extract_features(hidden_BSDL[i:i + 1], mask[i:i + 1])
            assert_close(video[0], g["features.video_prompt_embeds"][i], 1e-5, f"video features {i}")
            assert_close(audio[0], g["features.audio_prompt_embeds"][i], 1e-5, f"audio features {i}")
        context = processor(g["features.video_prompt_embeds"], g["features.audio_prompt_embeds"], g["attention_mask"])
    assert_close(context.video_context, g["connector.video_context"], 1e-5, "video connector")
    assert_close(context.audio_context, g["connector.audio_context"], 1e-5, "audio connector")
    assert torch.equal(context.context_mask, g["connector.context_mask"])


def test_split_transformer_needs_the_text_encoder_file_for_features():
    with pytest.raises(ValueError, match="text_embedding_projection.*text-encoder file"):
        load_embeddings_processor(TRANSFORMER)
    connectors_only = load_embeddings_processor(TRANSFORMER, with_feature_extractor=False)
    assert connectors_only.feature_extractor is None


def test_gemma3_gets_the_same_bos_rule():
    """A Gemma 3 tokenizer adds BOS itself (kept once); the same tokenizer without its BOS post-processor gets it
    prepended, so both give identical ids (ltx-core 1.0 relied on the tokenizer and would differ completely)."""
    gemma3 = load_text_encoder(GEMMA3_TINY, dtype=torch.float32)
    assert gemma3.identity == "gemma3" and text_encoder_identity(GEMMA3_TINY) == "gemma3"
    prompts = ["a red cat runs over the grass", "the sky is dark"]
    with_bos, mask = gemma3.tokenize(prompts)
    assert (with_bos == gemma3.bos_token_id).sum(dim=1).tolist() == [1, 1]
    gemma3.tokenizer._tokenizer.post_processor = None
    assert gemma3.tokenizer(prompts[0])["input_ids"][0] != gemma3.bos_token_id
    without_bos, mask2 = gemma3.tokenize(prompts)
    assert torch.equal(with_bos, without_bos) and torch.equal(mask, mask2)


def _with_metadata(tmp_path, name, **changes):
    tensors = load_file(str(TRANSFORMER))
    metadata = {**checkpoint.read_metadata(TRANSFORMER), **changes}
    metadata = {k: v for k, v in metadata.items() if v is not None}
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_gemma_pairing_check_behaves_as_the_official_one(tmp_path):
    assert check_gemma_pairing(TRANSFORMER, TEXT_ENCODER) == "gemma4-tiny-golden-v1"
    assert expected_text_encoder(TRANSFORMER) == "gemma4-tiny-golden-v1" == text_encoder_identity(TEXT_ENCODER)
    other = _with_metadata(tmp_path, "other.safetensors", gemma_source_checkpoint=json.dumps(
        {"ltx_version": "2.5.0", "gemma_version": "gemma4-12b-ltx-v1"}))
    with pytest.raises(ValueError, match=r"(?s)Gemma version mismatch.*other\.safetensors.*gemma4-12b-ltx-v1.*"
                                         r"gemma4-tiny-with-proj"):
        check_gemma_pairing(other, TEXT_ENCODER)
    undeclared = _with_metadata(tmp_path, "undeclared.safetensors", gemma_source_checkpoint=None)
    with pytest.raises(ValueError, match="model_version='2.5.0' must declare gemma_source_checkpoint"):
        check_gemma_pairing(undeclared, TEXT_ENCODER)
    old = _with_metadata(tmp_path, "old.safetensors", gemma_source_checkpoint=None, model_version=None)
    with pytest.raises(ValueError, match="model_type='gemma4_unified'"):
        check_gemma_pairing(old, TEXT_ENCODER)
    assert check_gemma_pairing(old, GEMMA3_TINY) == "gemma3" == expected_text_encoder(old)


def test_resolve_pack(tmp_path):
    pack = resolve_pack(TRANSFORMER, text_encoder=TEXT_ENCODER, audio_vae=AUDIO_VAE)
    assert pack.split and pack.model_version == "2.5.0" and pack.audio_vae_file() == AUDIO_VAE
    with pytest.raises(ValueError, match=r"split-pack transformer file.*--model\.video_vae"):
        pack.video_vae_file()
    single = tmp_path / "single.safetensors"
    checkpoint.write_checkpoint(single, {"x": torch.zeros(1)}, {"transformer": {}, "vae": {}, "audio_vae": {}})
    pack = resolve_pack(single, video_vae=VIDEO_VAE_CONV)
    assert not pack.split and pack.audio_vae_file() == single and pack.video_vae_file() == VIDEO_VAE_CONV
    with pytest.raises(ValueError, match="model.audio_vae: not found"):
        resolve_pack(TRANSFORMER, audio_vae=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="no 'transformer' section"):
        resolve_pack(VIDEO_VAE_CONV)


def test_scale_factors_and_vae_kind_as_the_official_helpers():
    for path in (TRANSFORMER, VIDEO_VAE_CONV, VIDEO_VAE_DIFFUSION, AUDIO_VAE):  # facts.json: all 8 x 32 x 32
        assert read_video_scale_factors(path) == (8, 32, 32)
    assert is_diffusion_video_vae(VIDEO_VAE_DIFFUSION) and not is_diffusion_video_vae(VIDEO_VAE_CONV)


def test_conditions_made_by_another_text_encoder_are_refused(tmp_path):
    def write(name, tag):
        data = {"video_prompt_embeds": torch.zeros(4, 2), "prompt_attention_mask": torch.ones(4, dtype=torch.int64)}
        if tag is not None:
            data[CONDITIONS_TEXT_ENCODER_KEY] = tag
        torch.save(data, tmp_path / name)
        return tmp_path / name

    ok = [write("a.pt", "gemma4-tiny-golden-v1"), write("official.pt", None)]
    assert check_conditions_text_encoder(ok, "gemma4-tiny-golden-v1") == 1
    with pytest.raises(ValueError, match=r"b\.pt.*'gemma3'.*expects 'gemma4-tiny-golden-v1'"):
        check_conditions_text_encoder([*ok, write("b.pt", "gemma3")], "gemma4-tiny-golden-v1")


def test_connector_rope_default_follows_the_version():
    """ltx-core 1.2 made "split" the connector RoPE default; LTX-2 / 2.3 configs without the key keep the 1.0
    default "interleaved"."""
    from ltxf.models.text import EmbeddingsProcessorConfig

    section = {k: v for k, v in checkpoint.read_config(TRANSFORMER)["transformer"].items() if k != "rope_type"}
    assert EmbeddingsProcessorConfig.from_transformer_config(section).video_connector.rope_type == "split"
    old = {k: v for k, v in section.items() if k not in checkpoint.LTX_2_5_SWITCHES}
    assert EmbeddingsProcessorConfig.from_transformer_config(old).video_connector.rope_type == "interleaved"


def test_older_pack_with_tokenizer_config_in_metadata_and_bad_files(tmp_path, encoder):
    tensors = load_file(str(TEXT_ENCODER))
    config_bytes = tensors.pop("hf_asset__tokenizer_config.json")
    metadata = checkpoint.read_metadata(TEXT_ENCODER)
    older = tmp_path / "older.safetensors"
    text = bytes(config_bytes.tolist()).decode()
    save_file(tensors, str(older), metadata={**metadata, "tokenizer_config.json": text})
    ids, _ = load_text_encoder(older, dtype=torch.float32).tokenize(_prompts())
    assert torch.equal(ids, golden("text")["token_ids"])
    with pytest.raises(ValueError, match="not a packed text-encoder file"):
        load_text_encoder(TRANSFORMER)


def test_version_facts_of_the_official_helpers():
    """``goldens/facts.json``: split detection, version parsing (plain and with "-" read as ".") and the pipeline
    defaults the official helpers derived for every file of the pack."""
    from ltxf.models.pack import is_split_transformer, pipeline_defaults

    facts = json.loads((LTX25 / "goldens" / "facts.json").read_text())
    for text, parsed in facts["parse_model_version"].items():
        assert list(checkpoint.parse_model_version(text)) == parsed
    assert list(checkpoint.parse_model_version("2.4-rc2".replace("-", "."))) == \
        facts["parse_model_version_after_dash_normalisation('2.4-rc2')"]
    for entry in facts["files"].values():
        path = LTX25 / entry["file"]
        metadata = checkpoint.read_metadata(path)
        config = json.loads(metadata["config"]) if "config" in metadata else {}
        assert is_split_transformer(config) == entry["is_split_transformer"]
        assert metadata.get("model_version") == entry["model_version"]
        if "read_video_scale_factors" in entry:
            assert list(read_video_scale_factors(path)) == entry["read_video_scale_factors"]
        if "detect_params" in entry:
            defaults = pipeline_defaults(metadata["model_version"])
            assert {"default_image_crf": defaults.default_image_crf,
                    "num_inference_steps": defaults.num_inference_steps,
                    "video_stg_blocks": list(defaults.video_stg_blocks),
                    "audio_stg_blocks": list(defaults.audio_stg_blocks)} == entry["detect_params"]
    assert pipeline_defaults(None) is None and pipeline_defaults("2.3.0") is None


def test_a_video_vae_with_other_scale_factors_is_refused(tmp_path):
    config = checkpoint.read_config(VIDEO_VAE_CONV)
    config["vae"]["encoder_blocks"] = [b for b in config["vae"]["encoder_blocks"] if b[0] != "compress_time_res"]
    path = tmp_path / "vae-16x4.safetensors"
    checkpoint.write_checkpoint(path, {"encoder.x": torch.zeros(1)}, config)
    assert read_video_scale_factors(path) == (4, 32, 32)
    with pytest.raises(ValueError, match=r"vae-16x4\.safetensors.*\(4, 32, 32\).*\(8, 32, 32\)"):
        resolve_pack(TRANSFORMER, video_vae=path)
