"""Tests of ltxf.models.gemma with a tiny random Gemma 3 and a word-level tokenizer built here (nothing is
downloaded: HF_HUB_OFFLINE is set and every load is ``local_files_only``).

Tolerances: batch vs single and ltx-core parity run identical float32 kernels on identically padded inputs, so
they are compared exactly. Padded vs unpadded runs place the real tokens at different absolute RoPE positions;
RoPE is relative, so only the float32 rounding of cos/sin at other angles differs: ``atol = 1e-5`` on hidden
states of magnitude ~3.
"""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BitsAndBytesConfig,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    PreTrainedTokenizerFast,
)

from ltxf.models.gemma import GemmaTextEncoder, gemma_load_kwargs, load_gemma_text_encoder
from ltxf.models.text import EmbeddingsProcessor, EmbeddingsProcessorConfig
from tests.ltx_reference import import_ltx_core, random_init_, tiny_transformer_config

WORDS = "a cat dog runs on the grass under blue sky and jumps over fence".split()
PAD, EOS, BOS = 0, 1, 2
MAX_LENGTH = 12
NUM_LAYERS = 2
HIDDEN = 32
PROMPTS = ["a cat runs on the grass", "  dog  "]  # 7 and 2 tokens with BOS; whitespace is stripped


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": PAD, "<eos>": EOS, "<bos>": BOS, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def _text_config() -> dict:
    # Sliding window 4 < prompt length, so the sliding-window mask is exercised under left padding.
    return dict(
        vocab_size=32, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=4, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"],
    )


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def gemma_dirs(tmp_path_factory):
    """A Gemma3ForConditionalGeneration directory and a causal-LM directory with the same language weights."""
    root = tmp_path_factory.mktemp("gemma")
    torch.manual_seed(0)
    multimodal = Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=_text_config(),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, boi_token_index=29, eoi_token_index=30, image_token_index=31,
    ))
    causal = Gemma3ForCausalLM(Gemma3TextConfig(**_text_config()))
    causal.model.load_state_dict(multimodal.model.language_model.state_dict())
    tokenizer = _tokenizer()
    for name, model in (("multimodal", multimodal), ("causal", causal)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return {"multimodal": root / "multimodal", "causal": root / "causal", "model": multimodal.eval()}


@pytest.fixture(scope="module")
def encoder(gemma_dirs) -> GemmaTextEncoder:
    return load_gemma_text_encoder(gemma_dirs["multimodal"], dtype=torch.float32, max_length=MAX_LENGTH)


def _num_tokens(text: str) -> int:
    return 1 + len(text.split())


def test_hidden_states_and_left_padded_mask(encoder):
    hidden, mask = encoder.encode_prompts(PROMPTS)
    assert hidden.shape == (2, MAX_LENGTH, HIDDEN, NUM_LAYERS + 1) and hidden.dtype == torch.float32
    assert mask.dtype == torch.int64
    input_ids, _ = encoder.tokenize(PROMPTS)
    for b, prompt in enumerate(PROMPTS):
        n = _num_tokens(prompt)
        assert mask[b].tolist() == [0] * (MAX_LENGTH - n) + [1] * n
        assert input_ids[b, : MAX_LENGTH - n].eq(PAD).all() and input_ids[b, MAX_LENGTH - n] == BOS
    assert torch.isfinite(hidden[mask.bool()]).all()


def test_batch_equals_prompts_run_alone(encoder):
    hidden, mask = encoder.encode_prompts(PROMPTS)
    for b, prompt in enumerate(PROMPTS):
        alone, alone_mask = encoder.encode_prompts(prompt)
        assert torch.equal(alone_mask[0], mask[b])
        valid = mask[b].bool()
        torch.testing.assert_close(hidden[b, valid], alone[0, valid], atol=0, rtol=0)


def test_left_padding_does_not_change_real_tokens(encoder):
    hidden, mask = encoder.encode_prompts(PROMPTS)
    for b, prompt in enumerate(PROMPTS):
        n = _num_tokens(prompt)
        exact = GemmaTextEncoder(encoder.model, encoder.tokenizer, max_length=n)
        unpadded, unpadded_mask = exact.encode_prompts(prompt)
        assert bool(unpadded_mask.all())
        torch.testing.assert_close(hidden[b, MAX_LENGTH - n :], unpadded[0], atol=1e-5, rtol=1e-5)


def test_matches_ltx_core_encoder(gemma_dirs, encoder):
    base_encoder = import_ltx_core("ltx_core.text_encoders.gemma.encoders.base_encoder")
    ltx_tokenizer = import_ltx_core("ltx_core.text_encoders.gemma.tokenizer")
    reference = base_encoder.GemmaTextEncoder(
        model=gemma_dirs["model"], tokenizer=ltx_tokenizer.LTXVGemmaTokenizer(str(gemma_dirs["multimodal"]), MAX_LENGTH)
    )
    for prompt in PROMPTS:
        with torch.no_grad():
            ref_hidden, ref_mask = reference.encode(prompt)
        hidden, mask = encoder.encode_prompts(prompt)
        assert len(ref_hidden) == NUM_LAYERS + 1
        torch.testing.assert_close(hidden, torch.stack(ref_hidden, dim=-1), atol=0, rtol=0)
        assert torch.equal(mask, ref_mask)


def test_causal_lm_directory_gives_the_same_states(gemma_dirs, encoder):
    causal = load_gemma_text_encoder(gemma_dirs["causal"], dtype=torch.float32, max_length=MAX_LENGTH)
    torch.testing.assert_close(causal.encode_prompts(PROMPTS)[0], encoder.encode_prompts(PROMPTS)[0], atol=0, rtol=0)
    default = load_gemma_text_encoder(gemma_dirs["causal"])
    assert {p.dtype for p in default.model.parameters()} == {torch.bfloat16}
    assert default.max_length == 1024 and default.num_hidden_states == NUM_LAYERS + 1


@pytest.mark.parametrize("version", ["ltx-2", "ltx-2.3"])
def test_encode_text_gives_cached_features(encoder, version):
    # A tiny processor whose feature extractor reads this Gemma's 32-wide, 3-state output.
    transformer_config = tiny_transformer_config(version)
    if version == "ltx-2":
        transformer_config["connector_attention_head_dim"] = 16  # V1 projects to the connector width
    config = EmbeddingsProcessorConfig.from_transformer_config(
        transformer_config, gemma_hidden_size=HIDDEN, gemma_num_hidden_states=NUM_LAYERS + 1
    )
    processor = random_init_(EmbeddingsProcessor(config)).eval()
    features = encoder.encode_text(PROMPTS, processor)
    assert set(features._asdict()) == {"video_prompt_embeds", "audio_prompt_embeds", "prompt_attention_mask"}
    hidden, mask = encoder.encode_prompts(PROMPTS)
    with torch.no_grad():
        video, audio = processor.extract_features(hidden, mask)
    torch.testing.assert_close(features.video_prompt_embeds, video, atol=0, rtol=0)
    torch.testing.assert_close(features.audio_prompt_embeds, audio, atol=0, rtol=0)
    assert torch.equal(features.prompt_attention_mask, mask)
    assert features.audio_prompt_embeds.shape[-1] == config.audio_connector.inner_dim
    # Padded tokens enter the projection as zeros, so they come out as exactly the bias (V2) or zero (V1).
    extractor = processor.feature_extractor
    padded = ~mask.bool()
    if version == "ltx-2":
        assert features.video_prompt_embeds[padded].abs().max() == 0
    else:
        assert torch.equal(features.video_prompt_embeds[padded],
                           extractor.video_aggregate_embed.bias.expand(int(padded.sum()), -1))


def test_8bit_needs_cuda_and_builds_bitsandbytes_config(monkeypatch):
    plain = gemma_load_kwargs()
    assert plain == {"local_files_only": True, "dtype": torch.bfloat16}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        gemma_load_kwargs(load_in_8bit=True, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="needs a CUDA device, got device='cpu'"):
        gemma_load_kwargs(load_in_8bit=True, device="cpu")
    monkeypatch.setattr("transformers.utils.is_accelerate_available", lambda: False)
    with pytest.raises(ValueError, match="accelerate"):
        gemma_load_kwargs(load_in_8bit=True, device="cuda:1")
    monkeypatch.setattr("transformers.utils.is_accelerate_available", lambda: True)
    kwargs = gemma_load_kwargs(load_in_8bit=True, device="cuda:1")
    assert isinstance(kwargs["quantization_config"], BitsAndBytesConfig)
    assert kwargs["quantization_config"].load_in_8bit and not kwargs["quantization_config"].load_in_4bit
    assert kwargs["device_map"] == {"": 1} and kwargs["local_files_only"] and kwargs["dtype"] == torch.bfloat16


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_gemma_text_encoder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        load_gemma_text_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        load_gemma_text_encoder(tmp_path)
