"""Tests of ltxf.models.text: feature extractors, connectors, embeddings processor and its loader.

Parity is against ltx-core 1.0.0 in float32. Tolerances:

* connectors / processor: ``atol = rtol = 1e-5`` on outputs of magnitude ~4. Both sides run the same float32
  operations, reassociated in places (RoPE rotation formula, ``(x - mean) * (8 / range)`` vs
  ``8 * (x - mean) / range``, SDPA kernel choice at different batch sizes); observed differences are ~1e-6.
* feature extractors at the real Gemma widths: the aggregate projection sums 188,160 products, so the float32
  accumulation order (GEMM blocking differs between batch sizes and between ``W(s x)`` and ``s (W x)``) moves
  the result by ~1e-5 on outputs of magnitude ~40; ``atol = 1e-4``, ``rtol = 1e-5``.
* own formulas (float64 numpy) vs float32 code: ``atol = 1e-5`` on values bounded by 8.

ltx-core's configurators always build 128 learnable registers (they ignore ``connector_num_learnable_registers``)
and its register replacement needs ``S % 128 == 0``, so the tiny configs drop that key and use S = 128.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ltxf.models.checkpoint import AUDIO_CONNECTOR_PREFIX, TEXT_PROJECTION_PREFIX, VIDEO_CONNECTOR_PREFIX
from ltxf.models.text import (
    ConnectorConfig,
    EmbeddingsConnector,
    EmbeddingsProcessor,
    EmbeddingsProcessorConfig,
    FeatureExtractorV1,
    FeatureExtractorV2,
    load_embeddings_processor,
    normalize_hidden_states_v1,
    normalize_hidden_states_v2,
    replace_padding_with_registers,
)
from tests.ltx_reference import import_ltx_core, random_init_, tiny_transformer_config, write_official_checkpoint

S = 128
TOL = dict(atol=1e-5, rtol=1e-5)
GEMMA_LAYERS = 3  # tiny hidden-state count (Gemma-3-12B: 49)


def _ref(module: str):
    return import_ltx_core(f"ltx_core.text_encoders.gemma.{module}")


def _text_config(version: str, **overrides) -> dict:
    config = tiny_transformer_config(version)
    config.pop("connector_num_learnable_registers")  # ltx-core ignores it and builds 128
    config.update(overrides)
    return config


def _gemma_width(version: str) -> int:
    # V1 projects to the connector width (2 heads x 12); V2 can use any Gemma width.
    return 24 if version == "ltx-2" else 20


def _left_mask(num_pads: list[int], num_tokens: int = S) -> torch.Tensor:
    mask = torch.ones(len(num_pads), num_tokens, dtype=torch.int64)
    for b, pads in enumerate(num_pads):
        mask[b, :pads] = 0
    return mask


def _reference_processor(version: str, transformer_config: dict):
    """A reference EmbeddingsProcessor with random weights at tiny widths (its feature extractor classes accept
    any width; only its configurator hard-codes 3840 x 49)."""
    ec, fe, ep = _ref("embeddings_connector"), _ref("feature_extractor"), _ref("embeddings_processor")
    wrapped = {"transformer": transformer_config}
    video = random_init_(ec.Embeddings1DConnectorConfigurator.from_config(wrapped), seed=1)
    audio = random_init_(ec.AudioEmbeddings1DConnectorConfigurator.from_config(wrapped), seed=2)
    width = _gemma_width(version)
    num_features = width * GEMMA_LAYERS
    if version == "ltx-2":
        extractor = fe.FeatureExtractorV1(torch.nn.Linear(num_features, video.inner_dim, bias=False), is_av=True)
    else:
        extractor = fe.FeatureExtractorV2(
            torch.nn.Linear(num_features, video.inner_dim), width, torch.nn.Linear(num_features, audio.inner_dim)
        )
    random_init_(extractor, std=0.05, seed=3)
    processor = ep.EmbeddingsProcessor(feature_extractor=extractor, video_connector=video, audio_connector=audio)
    return processor.float().eval()


def _our_processor(version: str, transformer_config: dict, reference) -> EmbeddingsProcessor:
    config = EmbeddingsProcessorConfig.from_transformer_config(
        transformer_config, gemma_hidden_size=_gemma_width(version), gemma_num_hidden_states=GEMMA_LAYERS
    )
    processor = EmbeddingsProcessor(config)
    processor.load_state_dict(reference.state_dict(), strict=True)
    return processor.eval()


# -------------------------------------------------------------------------------------------------------------
# Feature normalisation against independent float64 formulas


def _numpy_v1(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    batch, num_tokens, width, layers = hidden.shape
    out = np.zeros_like(hidden)
    for b in range(batch):
        valid = mask[b].astype(bool)
        for layer in range(layers):
            x = hidden[b, valid, :, layer]
            out[b, valid, :, layer] = 8 * (x - x.mean()) / (x.max() - x.min())
    return out.reshape(batch, num_tokens, width * layers)


def _numpy_v2(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    batch, num_tokens, width, layers = hidden.shape
    out = hidden / np.sqrt((hidden**2).mean(axis=2, keepdims=True) + 1e-6)
    out = out * mask[:, :, None, None]
    return out.reshape(batch, num_tokens, width * layers)


def test_normalisations_match_numpy_formulas():
    hidden = torch.randn(3, 10, 6, 4) * torch.tensor([1.0, 3.0, 0.5, 10.0])  # a different scale per layer
    hidden[0, :4] = float("nan")  # left padding of Gemma outputs may hold NaN; it must not leak
    mask = _left_mask([4, 0, 0], 10)
    mask[2, 7:] = 0  # right padding works too: statistics come from the mask, not a padding side
    h64, m64 = hidden.double().numpy(), mask.numpy()
    np.testing.assert_allclose(normalize_hidden_states_v1(hidden, mask).numpy(), _numpy_v1(h64, m64), atol=1e-5)
    np.testing.assert_allclose(
        normalize_hidden_states_v2(hidden, mask).numpy(), np.nan_to_num(_numpy_v2(h64, m64)), atol=1e-5
    )


def test_feature_extractors_match_reference_at_tiny_widths():
    for version in ("ltx-2", "ltx-2.3"):
        reference_processor = _reference_processor(version, _text_config(version))
        processor = _our_processor(version, _text_config(version), reference_processor)
        reference = reference_processor.feature_extractor
        hidden = torch.randn(2, 16, _gemma_width(version), GEMMA_LAYERS) * 3
        mask = _left_mask([5, 0], 16)
        with torch.no_grad():
            ours = processor.extract_features(hidden, mask)
            ref = reference(hidden, mask, "left")  # the reference extractors handle batches
        for o, r in zip(ours, ref, strict=True):
            torch.testing.assert_close(o, r, **TOL)
        # A tuple of per-layer [B, S, D] tensors (what transformers returns) is accepted too.
        with torch.no_grad():
            from_tuple = processor.extract_features(tuple(hidden.unbind(-1)), mask)
        torch.testing.assert_close(from_tuple[0], ours[0], atol=0, rtol=0)


def test_feature_extractors_match_reference_at_real_gemma_widths():
    """3840 x 49 inputs through the reference's own configurator (its hard-coded Gemma-3-12B widths): V1 is a
    188160 -> 3840 projection (2.9 GB in float32), V2 uses the tiny config's output widths."""
    configurator = _ref("encoders.encoder_configurator")
    hidden = torch.randn(2, 16, 3840, 49)
    mask = _left_mask([5, 0], 16)
    generator = torch.Generator().manual_seed(0)
    for version in ("ltx-2", "ltx-2.3"):
        with torch.device("meta"):
            reference = configurator._create_feature_extractor(tiny_transformer_config(version))
        reference.to_empty(device="cpu")
        for p in reference.parameters():  # uniform_ in place: fast, no second 2.9 GB buffer
            p.data.uniform_(-0.004, 0.004, generator=generator)
        with torch.device("meta"):
            if version == "ltx-2":
                ours = FeatureExtractorV1(out_features=3840)
            else:
                ours = FeatureExtractorV2(video_out_features=32, audio_out_features=16)
        ours.load_state_dict(reference.state_dict(), strict=True, assign=True)  # shares the weights
        with torch.no_grad():
            got = ours(hidden, mask)
            expected = reference(hidden, mask, "left")
        for o, r in zip(got, expected, strict=True):
            torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-5)
        del reference, ours


# -------------------------------------------------------------------------------------------------------------
# Connectors


def test_register_replacement_moves_tokens_front_and_tiles_registers():
    x = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 6, 1).expand(2, 6, 3).contiguous()
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 0, 1, 0, 0]])
    registers = -torch.arange(1, 5, dtype=torch.float32)[:, None].expand(4, 3)
    out = replace_padding_with_registers(x, mask, registers)
    for b in range(2):
        real = x[b, mask[b].bool()]
        expected = torch.cat([real, torch.stack([registers[i % 4] for i in range(len(real), 6)])])
        torch.testing.assert_close(out[b], expected, atol=0, rtol=0)


@pytest.mark.parametrize("version", ["ltx-2", "ltx-2.3"])
def test_connectors_match_reference_for_batch_1_and_2(version):
    """LTX-2: no gate, equal widths; LTX-2.3: gated, a narrower audio connector. The reference only runs B = 1,
    so each sample of our batch is compared with the reference run alone."""
    config = _text_config(version)
    reference = _reference_processor(version, config)
    ours = _our_processor(version, config, reference)
    ep = _ref("embeddings_processor")
    for name in ("video_connector", "audio_connector"):
        ref_connector, our_connector = getattr(reference, name), getattr(ours, name)
        x = torch.randn(3, S, our_connector.config.inner_dim)
        mask = _left_mask([100, 0, 127])  # short, full and one-token prompts
        with torch.no_grad():
            out, out_mask = our_connector(x, mask)
            single, _ = our_connector(x[:1], mask[:1])
            for b in range(3):
                expected, _ = ref_connector(x[b : b + 1], ep.convert_to_additive_mask(mask[b : b + 1], torch.float32))
                torch.testing.assert_close(out[b : b + 1], expected, **TOL)
        torch.testing.assert_close(single, out[:1], **TOL)
        assert out_mask.dtype == torch.int64 and bool((out_mask == 1).all())


def test_connector_without_registers_matches_reference():
    ec, ep = _ref("embeddings_connector"), _ref("embeddings_processor")
    rope = _ref("embeddings_connector").LTXRopeType
    reference = ec.Embeddings1DConnector(
        attention_head_dim=8, num_attention_heads=2, num_layers=2, positional_embedding_max_pos=[64],
        num_learnable_registers=None, rope_type=rope.INTERLEAVED, double_precision_rope=False,
    )
    random_init_(reference, seed=4).eval()
    ours = EmbeddingsConnector(
        ConnectorConfig(num_layers=2, num_heads=2, head_dim=8, num_registers=0, rope_type="interleaved",
                        max_pos=(64,))
    )
    ours.load_state_dict(reference.state_dict(), strict=True)
    x, mask = torch.randn(2, 20, 16), _left_mask([7, 0], 20)
    with torch.no_grad():
        out, out_mask = ours(x, mask)
        for b in range(2):
            expected, _ = reference(x[b : b + 1], ep.convert_to_additive_mask(mask[b : b + 1], torch.float32))
            torch.testing.assert_close(out[b : b + 1], expected, **TOL)
    torch.testing.assert_close(out_mask, mask, atol=0, rtol=0)


def test_connector_backward_reaches_registers_and_blocks():
    config = _text_config("ltx-2.3")
    processor = EmbeddingsProcessor(EmbeddingsProcessorConfig.from_transformer_config(config),
                                    with_feature_extractor=False)
    random_init_(processor)
    context = processor(torch.randn(2, 16, 32), torch.randn(2, 16, 16), _left_mask([3, 9], 16))
    (context.video_context.square().mean() + context.audio_context.square().mean()).backward()
    for name, p in processor.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# -------------------------------------------------------------------------------------------------------------
# Embeddings processor


@pytest.mark.parametrize("version", ["ltx-2", "ltx-2.3"])
def test_processor_matches_reference_both_entry_points(version):
    config = _text_config(version)
    reference = _reference_processor(version, config)
    ours = _our_processor(version, config, reference)
    ep = _ref("embeddings_processor")
    hidden = torch.randn(2, S, _gemma_width(version), GEMMA_LAYERS) * 2
    mask = _left_mask([90, 40])
    with torch.no_grad():
        from_hidden = ours.process_hidden_states(hidden, mask)
        video_features, audio_features = ours.extract_features(hidden, mask)
        from_features = ours(video_features, audio_features, mask)
        for b in range(2):
            expected = reference.process_hidden_states(hidden[b : b + 1], mask[b : b + 1], "left")
            torch.testing.assert_close(from_hidden.video_context[b : b + 1], expected.video_encoding, **TOL)
            torch.testing.assert_close(from_hidden.audio_context[b : b + 1], expected.audio_encoding, **TOL)
            torch.testing.assert_close(from_hidden.context_mask[b : b + 1], expected.attention_mask, atol=0, rtol=0)
            additive = ep.convert_to_additive_mask(mask[b : b + 1], torch.float32)
            ref_video, ref_audio, ref_mask = reference.create_embeddings(
                video_features[b : b + 1], audio_features[b : b + 1], additive
            )
            torch.testing.assert_close(from_features.video_context[b : b + 1], ref_video, **TOL)
            torch.testing.assert_close(from_features.audio_context[b : b + 1], ref_audio, **TOL)
            torch.testing.assert_close(from_features.context_mask[b : b + 1], ref_mask, atol=0, rtol=0)
    assert ours(video_features, None, mask).audio_context is None


def test_config_reads_defaults_and_audio_fallbacks():
    config = EmbeddingsProcessorConfig.from_transformer_config({})
    assert config.version == "ltx-2"
    assert (config.video_connector.num_layers, config.video_connector.num_heads, config.video_connector.head_dim) == (
        2, 30, 128)
    assert config.audio_connector == config.video_connector
    assert config.video_connector.rope_type == "interleaved" and config.video_connector.max_pos == (1.0,)
    assert config.video_connector.num_registers == 128 and not config.video_connector.double_precision_rope
    config = EmbeddingsProcessorConfig.from_transformer_config(_text_config("ltx-2.3", audio_connector_num_layers=3))
    assert config.version == "ltx-2.3" and config.video_connector.gated_attention
    assert (config.audio_connector.num_layers, config.audio_connector.inner_dim) == (3, 16)
    assert config.video_connector.double_precision_rope and config.video_connector.max_pos == (4096.0,)
    with pytest.raises(ValueError, match="rope_type"):
        EmbeddingsProcessorConfig.from_transformer_config({"rope_type": "diagonal"})
    with pytest.raises(ValueError, match="widths must match"):
        EmbeddingsProcessorConfig.from_transformer_config({"audio_connector_attention_head_dim": 64})


# -------------------------------------------------------------------------------------------------------------
# Loader


def _write_checkpoint(path: Path, config: dict, reference, *, drop: str | None = None,
                      feature_extractor=None) -> Path:
    video = reference.video_connector.state_dict()
    if drop is not None:
        video = {k: v for k, v in video.items() if k != drop}
    components = {
        TEXT_PROJECTION_PREFIX: reference.feature_extractor if feature_extractor is None else feature_extractor,
        VIDEO_CONNECTOR_PREFIX: video,
        AUDIO_CONNECTOR_PREFIX: reference.audio_connector,
        # Tensors of other components that the loader must leave alone.
        "model.diffusion_model.": {"patchify_proj.weight": torch.randn(4, 4)},
        "vae.encoder.": {"conv_in.weight": torch.randn(2, 2)},
    }
    return write_official_checkpoint(path, {"transformer": config}, components)


@pytest.mark.parametrize("version", ["ltx-2", "ltx-2.3"])
def test_loader_matches_reference(tmp_path, version):
    config = _text_config(version)
    reference = _reference_processor(version, config)
    path = _write_checkpoint(tmp_path / "model.safetensors", config, reference)
    processor = load_embeddings_processor(path, gemma_hidden_size=_gemma_width(version))
    assert processor.config.version == version and processor.config.gemma_num_hidden_states == GEMMA_LAYERS
    ep = _ref("embeddings_processor")
    hidden = torch.randn(1, S, _gemma_width(version), GEMMA_LAYERS)
    mask = _left_mask([70])
    features = torch.randn(1, S, processor.config.video_connector.inner_dim)
    audio_features = torch.randn(1, S, processor.config.audio_connector.inner_dim)
    with torch.no_grad():
        got = processor(features, audio_features, mask)
        additive = ep.convert_to_additive_mask(mask, torch.float32)
        expected = reference.create_embeddings(features, audio_features, additive)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, **TOL)
        got = processor.process_hidden_states(hidden, mask)
        expected = reference.process_hidden_states(hidden, mask, "left")
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, **TOL)

    bf16 = load_embeddings_processor(path, torch.bfloat16, gemma_hidden_size=_gemma_width(version),
                                     gemma_num_hidden_states=GEMMA_LAYERS)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    connectors_only = load_embeddings_processor(path, with_feature_extractor=False)
    assert connectors_only.feature_extractor is None
    with pytest.raises(ValueError, match="without its feature extractor"):
        connectors_only.extract_features(hidden, mask)


def test_loader_rejects_version_contradiction(tmp_path):
    v1_config = _text_config("ltx-2")
    v2_reference = _reference_processor("ltx-2.3", _text_config("ltx-2.3"))
    reference = _reference_processor("ltx-2", v1_config)
    path = _write_checkpoint(tmp_path / "m.safetensors", v1_config, reference,
                             feature_extractor=v2_reference.feature_extractor)
    with pytest.raises(ValueError, match=r"config says ltx-2 .*video_aggregate_embed.*ltx-2\.3"):
        load_embeddings_processor(path, gemma_hidden_size=_gemma_width("ltx-2.3"))


def test_loader_rejects_bad_shapes_and_missing_keys(tmp_path):
    config = _text_config("ltx-2")
    reference = _reference_processor("ltx-2", config)

    wrong_out = torch.nn.Linear(_gemma_width("ltx-2") * GEMMA_LAYERS, 20, bias=False)
    path = _write_checkpoint(tmp_path / "a.safetensors", config, reference,
                             feature_extractor={"aggregate_embed.weight": wrong_out.weight.detach()})
    with pytest.raises(ValueError, match=r"text_embedding_projection\.aggregate_embed\.weight has shape \(20, 72\)"):
        load_embeddings_processor(path, gemma_hidden_size=24)

    path = _write_checkpoint(tmp_path / "b.safetensors", config, reference)
    with pytest.raises(ValueError, match="72 input features, which is not a multiple of the Gemma hidden size 50"):
        load_embeddings_processor(path, gemma_hidden_size=50)
    with pytest.raises(ValueError, match="gemma_num_hidden_states=49"):
        load_embeddings_processor(path, gemma_hidden_size=24, gemma_num_hidden_states=49)

    dropped = "transformer_1d_blocks.1.ff.net.2.bias"
    path = _write_checkpoint(tmp_path / "c.safetensors", config, reference, drop=dropped)
    with pytest.raises(ValueError, match=rf"(?s)video_embeddings_connector\.\*.*missing keys \(1\): {dropped}"):
        load_embeddings_processor(path, gemma_hidden_size=24)

    path = _write_checkpoint(tmp_path / "d.safetensors", dict(config, connector_num_layers=3), reference)
    with pytest.raises(ValueError, match=r"video connector 3 layers .* have 2"):
        load_embeddings_processor(path, gemma_hidden_size=24)

    # The config's register count must agree with the weights (ltx-core would silently build 128).
    path = _write_checkpoint(tmp_path / "e.safetensors", dict(config, connector_num_learnable_registers=8),
                             reference)
    with pytest.raises(ValueError, match=r"learnable_registers: checkpoint \(128, 24\) vs model \(8, 24\)"):
        load_embeddings_processor(path, gemma_hidden_size=24)

    path = _write_checkpoint(tmp_path / "f.safetensors", dict(config, caption_proj_before_connector=True),
                             reference)
    with pytest.raises(ValueError, match="partial LTX-2.3"):
        load_embeddings_processor(path, gemma_hidden_size=24)
