"""End-to-end generation on the demo's tiny official-layout checkpoint (``ltxf.demo.build_demo_checkpoint``:
transformer + text side, a tiny video VAE with the real 8x / 32x compression and 128 latent channels, the shipped
audio-VAE latent layout, a tiny BigVGAN + BWE vocoder at 48 kHz) and a tiny random Gemma 3 with a word-level
tokenizer built here.

The Gemma builder and the helpers here are imported by tests/test_validation.py and tests/test_inference_tool.py.
Comparisons are exact (``torch.equal``): generation on CPU in float32 is deterministic, and the properties tested
(same seed, LoRA at strength 0, clean first-frame tokens) hold bit for bit by construction.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

from ltxf.checkpoint import export_lora, load_lora_file
from ltxf.demo import (
    DEMO_AUDIO_SAMPLE_RATE,
    DEMO_GEMMA_HIDDEN,
    DEMO_GEMMA_STATES,
    DEMO_VIDEO_VAE,
    build_demo_checkpoint,
    init_scaled_,
)
from ltxf.generate import (
    GenerationModels,
    GenerationRequest,
    apply_lora,
    decode_video_latents,
    encode_frames,
    encode_prompts,
    generate,
    prepare_conditioning,
    resize_cover_crop,
    sample,
    save_clip,
    side_by_side,
)
from ltxf.latents import audio_latent_length
from ltxf.media import probe_video, read_audio, read_video, write_image, write_video
from ltxf.models.audio_vae import load_audio_vae_decoder
from ltxf.models.gemma import load_gemma_text_encoder
from ltxf.models.text import load_embeddings_processor
from ltxf.models.transformer import load_transformer
from ltxf.models.video_vae import VideoDecoder, VideoVAEConfig, load_video_vae_decoder, load_video_vae_encoder
from ltxf.models.vocoder import load_vocoder
from ltxf.sampling import GuidanceConfig, ltx2_sigma_schedule

# ------------------------------------------------------------------------------------------------------------
# Tiny components (the checkpoint is the demo's: ltxf.demo.build_demo_checkpoint)

MEL_FRAMES_PER_SECOND = 100

GEMMA_WORDS = "a red cat dog runs on the green grass under blue sky and jumps over fence worst quality blurry".split()
PROMPT = "a red cat runs on the green grass"

WIDTH = HEIGHT = 64
NUM_FRAMES = 9
FPS = 24.0
STEPS = 2
# Both guidance passes on (CFG and STG); the demo transformer has 2 blocks.
GUIDANCE = GuidanceConfig(cfg_scale=3.0, stg_scale=1.0, stg_blocks=(1,))


def build_tiny_gemma(directory: Path, *, seed: int = 0) -> Path:
    """A random Gemma 3 causal LM whose width and hidden-state count match the demo's feature extractor, with a
    word-level tokenizer, saved as a Hugging Face directory."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(GEMMA_WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=len(vocab), hidden_size=DEMO_GEMMA_HIDDEN, intermediate_size=32,
        num_hidden_layers=DEMO_GEMMA_STATES - 1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        sliding_window=8, max_position_embeddings=1024, layer_types=["sliding_attention", "full_attention"],
    ))
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def load_tiny_models(checkpoint: Path, gemma_dir: Path | None = None) -> GenerationModels:
    """Every component in float32 on the CPU (the Gemma encoder only when ``gemma_dir`` is given)."""
    text_encoder = None
    processor_kwargs = {}
    if gemma_dir is not None:
        text_encoder = load_gemma_text_encoder(gemma_dir, dtype=torch.float32)
        processor_kwargs = dict(gemma_hidden_size=DEMO_GEMMA_HIDDEN, gemma_num_hidden_states=DEMO_GEMMA_STATES)
    return GenerationModels(
        transformer=load_transformer(checkpoint),
        text_processor=load_embeddings_processor(checkpoint, with_feature_extractor=gemma_dir is not None,
                                                 **processor_kwargs),
        text_encoder=text_encoder,
        video_encoder=load_video_vae_encoder(checkpoint),
        video_decoder=load_video_vae_decoder(checkpoint),
        audio_decoder=load_audio_vae_decoder(checkpoint),
        vocoder=load_vocoder(checkpoint),
    )


def test_pattern_frames(num_frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth moving colour gradients (uint8 [F, H, W, 3]), so resizing and coding artefacts stay small."""
    gen = torch.Generator().manual_seed(seed)
    phase = torch.rand(3, generator=gen) * 6.28
    t = torch.arange(num_frames).float()[:, None, None, None]
    y = torch.linspace(0, 1, height)[None, :, None, None]
    x = torch.linspace(0, 1, width)[None, None, :, None]
    values = 0.5 + 0.45 * torch.sin(3 * x + 2 * y + 0.3 * t + phase)
    return (values * 255).round().to(torch.uint8)


test_pattern_frames.__test__ = False  # a helper, not a test


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("generate")
    return {"checkpoint": build_demo_checkpoint(root / "tiny.safetensors", seed=0),
            "gemma": build_tiny_gemma(root / "gemma")}


@pytest.fixture(scope="module")
def tiny(assets) -> GenerationModels:
    return load_tiny_models(assets["checkpoint"], assets["gemma"])


def _request(**overrides) -> GenerationRequest:
    kwargs = dict(prompt=PROMPT, width=WIDTH, height=HEIGHT, num_frames=NUM_FRAMES, frame_rate=FPS,
                  num_inference_steps=STEPS, seed=7, guidance=GUIDANCE)
    kwargs.update(overrides)
    return GenerationRequest(**kwargs)


# ------------------------------------------------------------------------------------------------------------
# Tests


def test_text_to_video_with_audio_writes_an_mp4_with_both_streams(tiny, tmp_path):
    clip = generate(tiny, _request())
    assert clip.frames.shape == (NUM_FRAMES, HEIGHT, WIDTH, 3) and clip.frames.dtype == torch.uint8
    assert clip.frames.float().std() > 1, "the decoded clip is flat"
    # audio_latent_length(9, 24) = round(9 / 24 * 25) = 9 latent frames -> 4 * 9 - 3 = 33 mel frames at 100 / s
    num_latents = audio_latent_length(NUM_FRAMES, FPS)
    expected_samples = (4 * num_latents - 3) * DEMO_AUDIO_SAMPLE_RATE // MEL_FRAMES_PER_SECOND
    assert clip.audio_sample_rate == DEMO_AUDIO_SAMPLE_RATE
    assert clip.audio.shape == (2, expected_samples) and clip.audio.dtype == torch.float32
    assert 0.01 < clip.audio.std() and clip.audio.abs().max() <= 1.0

    path = save_clip(tmp_path / "t2v.mp4", clip)
    info = probe_video(path)
    assert (info.num_frames, info.width, info.height, info.fps) == (NUM_FRAMES, WIDTH, HEIGHT, FPS)
    assert info.has_audio
    audio = read_audio(path)
    assert audio.sample_rate == DEMO_AUDIO_SAMPLE_RATE and audio.num_channels == 2
    # AAC round trip: the declared duration is kept to within one 1024-sample frame.
    assert abs(audio.num_samples - expected_samples) <= 1024, (audio.num_samples, expected_samples)
    decoded = read_video(path).frames
    # The random decoder's frames are pixel noise, which yuv420p chroma subsampling cannot keep pixel by pixel;
    # each frame's mean colour survives the H.264 round trip.
    frame_means = (decoded.float().mean(dim=(1, 2)) - clip.frames.float().mean(dim=(1, 2))).abs()
    assert frame_means.max() < 4, frame_means


def test_same_seed_same_clip_and_another_seed_differs(tiny):
    first = generate(tiny, _request(generate_audio=False))
    torch.manual_seed(1234)  # the global RNG plays no part: noise comes from a generator seeded by request.seed
    again = generate(tiny, _request(generate_audio=False))
    other = generate(tiny, _request(generate_audio=False, seed=8))
    assert torch.equal(first.frames, again.frames)
    assert not torch.equal(first.frames, other.frames)
    assert first.audio is None and first.audio_sample_rate is None


def test_sigma_schedule_follows_the_generated_token_count(tiny, monkeypatch):
    """The schedule's shift comes from F' * H' * W' of the clip being generated, not a fixed 4096 and not the
    appended reference tokens (recorded by wrapping the real denoise loop)."""
    import ltxf.generate as generate_module

    seen = []

    def recording_denoise(*args, **kwargs):
        seen.append((kwargs["sigmas"], args[1].num_tokens))
        return real_denoise(*args, **kwargs)

    real_denoise = generate_module.denoise
    monkeypatch.setattr(generate_module, "denoise", recording_denoise)
    sample(tiny, _request(width=96, height=64, num_inference_steps=3))  # 2 x 2 x 3 = 12 tokens
    reference = test_pattern_frames(9, 64, 96)
    sample(tiny, _request(width=96, height=64, num_inference_steps=3, reference_video=reference))
    (plain_sigmas, plain_tokens), (ref_sigmas, ref_tokens) = seen
    assert plain_tokens == 12 and ref_tokens == 24
    assert torch.equal(plain_sigmas, ltx2_sigma_schedule(3, 12)) and torch.equal(ref_sigmas, plain_sigmas)
    assert not torch.equal(plain_sigmas, ltx2_sigma_schedule(3, 4096))


def test_tiled_decode_and_the_seeded_timestep_conditioned_decoder():
    latents = torch.randn(1, 128, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    decoder = init_scaled_(VideoDecoder(VideoVAEConfig.from_checkpoint_config(DEMO_VIDEO_VAE)),
                           torch.Generator().manual_seed(1))
    # one 512 px tile covers this 64 x 64 clip: the tiled path must give the plain decode
    assert torch.equal(decode_video_latents(decoder, latents, seed=0, tiled=True),
                       decode_video_latents(decoder, latents, seed=0, tiled=False))
    # LTX-2's decoder mixes noise into the latent: drawn from the request's seed, never the global RNG
    conditioned = init_scaled_(VideoDecoder(VideoVAEConfig.from_checkpoint_config(
        {**DEMO_VIDEO_VAE, "timestep_conditioning": True})), torch.Generator().manual_seed(1))
    first = decode_video_latents(conditioned, latents, seed=3)
    torch.manual_seed(99)
    assert torch.equal(first, decode_video_latents(conditioned, latents, seed=3))
    assert not torch.equal(first, decode_video_latents(conditioned, latents, seed=4))


def test_prompt_text_equals_precomputed_features(tiny, assets):
    """Gemma inside generate() and encode_prompts() (which loads and frees Gemma) give the same sample."""
    features = encode_prompts(assets["gemma"], assets["checkpoint"], [PROMPT, "worst quality"],
                              dtype=torch.float32)
    from_text = sample(tiny, _request(negative_prompt="worst quality"))
    from_features = sample(tiny, _request(prompt=None, prompt_features=features[0],
                                          negative_prompt_features=features[1]))
    assert torch.equal(from_text.video_latents, from_features.video_latents)
    assert torch.equal(from_text.audio_latents, from_features.audio_latents)
    text_only = dataclasses.replace(tiny, text_encoder=None)
    with pytest.raises(ValueError, match="negative_prompt_features"):
        sample(text_only, _request(prompt=None, prompt_features=features[0]))


def test_lora_changes_the_sample_and_strength_zero_is_identity(assets, tmp_path):
    checkpoint = assets["checkpoint"]
    models = load_tiny_models(checkpoint)
    features = encode_prompts(assets["gemma"], checkpoint, [PROMPT, ""], dtype=torch.float32)
    request = _request(prompt=None, prompt_features=features[0], negative_prompt_features=features[1],
                       generate_audio=False)
    baseline = sample(models, request).video_latents

    gen = torch.Generator().manual_seed(3)
    lora = {}
    for block in range(2):
        for name in ("attn1.to_q", "attn1.to_v", "attn2.to_k"):
            module = models.transformer.get_submodule(f"transformer_blocks.{block}.{name}")
            lora[f"transformer_blocks.{block}.{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=gen)
            lora[f"transformer_blocks.{block}.{name}.lora_B.weight"] = torch.randn(module.out_features, 4,
                                                                                   generator=gen) * 0.5
    path = export_lora(tmp_path / "lora.safetensors", lora, rank=4, alpha=8.0, dtype=torch.float32)
    lora_file = load_lora_file(path)

    results = {}
    for strength in (0.0, 1.0):
        adapted = load_tiny_models(checkpoint)
        names = apply_lora(adapted.transformer, lora_file, strength=strength)
        assert len(names) == 6
        results[strength] = sample(adapted, request).video_latents
    assert torch.equal(results[0.0], baseline)
    assert (results[1.0] - baseline).abs().max() > 1e-3

    # alpha / rank is baked into B by export_lora; the fused weight is W + (alpha / rank) * B @ A
    adapted = load_tiny_models(checkpoint)
    apply_lora(adapted.transformer, lora_file, strength=1.0)
    key = "transformer_blocks.0.attn1.to_q"
    expected = models.transformer.get_submodule(key).weight + 2.0 * (lora[f"{key}.lora_B.weight"]
                                                                     @ lora[f"{key}.lora_A.weight"])
    # The fused weight is computed with another association order of the same fp32 products (B@A scaled, then
    # added): rounding only, so a few fp32 ulps of the weights (~1e-7 here) would do; 1e-5 keeps a safe margin.
    torch.testing.assert_close(adapted.transformer.get_submodule(key).weight, expected, rtol=1e-5, atol=1e-5)

    bad = export_lora(tmp_path / "bad.safetensors", {"not_a_module.lora_A.weight": torch.ones(4, 3),
                                                    "not_a_module.lora_B.weight": torch.ones(5, 4)},
                      rank=4, alpha=4.0)
    with pytest.raises(ValueError, match="not Linear layers"):
        apply_lora(adapted.transformer, load_lora_file(bad))


def test_image_conditioning_keeps_the_first_frame_tokens_clean(tiny, tmp_path):
    image = test_pattern_frames(1, 80, 100)[0]  # another size and aspect than the output: resized and cropped
    image_path = tmp_path / "first.png"
    write_image(image_path, image)
    request = _request(condition_image=image_path)
    sampled = sample(tiny, request)
    expected = encode_frames(tiny.video_encoder, resize_cover_crop(read_video(image_path).frames, HEIGHT, WIDTH))
    assert sampled.video_latents.shape[2] == 2
    assert torch.equal(sampled.video_latents[:, :, :1], expected)
    assert not torch.equal(sampled.video_latents[:, :, 1:], sample(tiny, _request()).video_latents[:, :, 1:])
    # a tensor input gives the same conditioning as the file
    from_tensor = prepare_conditioning(tiny.video_encoder, _request(condition_image=image))
    assert torch.equal(from_tensor.image_latents, expected)
    with pytest.raises(ValueError, match="condition_image: file not found"):
        sample(tiny, _request(condition_image=tmp_path / "missing.png"))


def test_resize_cover_crop_geometry():
    frames = torch.zeros(2, 40, 100, 3, dtype=torch.uint8)
    frames[:, :, 40:60] = 255  # a bright band in the middle columns
    # scale 1.6 -> 64 x 160; the crop keeps columns 48..112, so the band (64..96 scaled) lands on 16..48
    out = resize_cover_crop(frames, 64, 64)
    assert out.shape == (2, 64, 64, 3)
    assert out[:, :, 18:46].min() == 255 and out[:, :, :14].max() == 0 and out[:, :, 50:].max() == 0
    same = test_pattern_frames(3, 32, 64)
    assert torch.equal(resize_cover_crop(same, 32, 64), same)


def test_ic_lora_reference_and_side_by_side_output(tiny, tmp_path):
    reference = test_pattern_frames(12, 48, 40, seed=1)  # 12 frames -> trimmed to 9; cropped to 32 x 32 (n = 2)
    reference_path = tmp_path / "reference.mp4"
    write_video(reference_path, reference, FPS, crf=0)
    request = _request(reference_video=reference_path, reference_downscale_factor=2, include_reference_in_output=True)
    conditioning = prepare_conditioning(tiny.video_encoder, request)
    assert conditioning.reference_frames.shape == (9, 32, 32, 3)
    assert conditioning.reference_latents.shape == (1, 128, 2, 1, 1)
    clip = generate(tiny, request, conditioning=conditioning)
    assert clip.frames.shape == (NUM_FRAMES, HEIGHT, 2 * WIDTH, 3)
    assert torch.equal(clip.frames[:, :, :WIDTH], resize_cover_crop(conditioning.reference_frames, HEIGHT, WIDTH))
    plain = generate(tiny, dataclasses.replace(request, include_reference_in_output=False), conditioning=conditioning)
    assert torch.equal(clip.frames[:, :, WIDTH:], plain.frames)
    without = generate(tiny, _request())
    assert not torch.equal(plain.frames, without.frames), "the reference tokens had no effect"
    assert clip.audio is not None and clip.audio.shape == without.audio.shape


def test_side_by_side_pads_the_shorter_clip_with_its_last_frame():
    left = test_pattern_frames(3, 32, 32)
    right = test_pattern_frames(5, 64, 96, seed=2)
    out = side_by_side(left, right)
    assert out.shape == (5, 64, 64 + 96, 3)
    assert torch.equal(out[3:, :, :64], resize_cover_crop(left[-1:], 64, 64).expand(2, -1, -1, -1))
    assert torch.equal(out[:, :, 64:], right)


def test_single_frame_writes_a_png(tiny, tmp_path):
    clip = generate(tiny, _request(num_frames=1, generate_audio=False))
    assert clip.frames.shape == (1, HEIGHT, WIDTH, 3)
    path = save_clip(tmp_path / "image.png", clip)
    assert torch.equal(read_video(path).frames, clip.frames)
    with pytest.raises(ValueError, match="one frame"):
        save_clip(tmp_path / "clip.png", generate(tiny, _request(generate_audio=False)))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(num_frames=10), "num_frames must be 8k"),
        (dict(width=100), "width must be a positive multiple of 32"),
        (dict(height=0), "height must be a positive multiple of 32"),
        (dict(frame_rate=0.0), "frame_rate"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(reference_downscale_factor=3), "reference_downscale_factor=3"),
        (dict(include_reference_in_output=True), "needs a reference_video"),
        (dict(prompt=None), "exactly one of prompt"),
    ],
)
def test_request_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        _request(**overrides)


def test_audio_requested_without_an_audio_decoder_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="audio VAE decoder"):
        sample(dataclasses.replace(tiny, audio_decoder=None), _request())
