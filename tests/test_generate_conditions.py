"""Per-sample conditions of validation / inference (official 1.2 validation ``conditions``) on the demo's tiny
model: each writes its output, and the tokens it holds equal the condition's encoded media exactly (float32 on
CPU is deterministic); frozen modalities are seen at sigma 0 and muxed into the output; audio-only samples are
written as .wav."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ltxf import media
from ltxf.conditions import SampleCondition, audio_steps_to_seconds
from ltxf.generate import (
    GenerationRequest,
    audio_tokens,
    clip_latents,
    decode,
    sample,
    save_clip,
)
from ltxf.latents import audio_latent_length, patchify_audio
from ltxf.models.audio_vae import load_audio_vae_encoder
from ltxf.sampling import GuidanceConfig, frozen_state, official_guidance
from tests.test_generate import FPS, HEIGHT, PROMPT, WIDTH, build_tiny_gemma, load_tiny_models, test_pattern_frames

# CFG only (two passes) keeps these fast; the frozen-stream test runs all four passes.
GUIDANCE = GuidanceConfig(cfg_scale=3.0, stg_scale=0.0)
ALL_PASSES = GuidanceConfig(cfg_scale=3.0, stg_scale=1.0, stg_blocks=(1,), modality_scale=2.0)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ltxf.demo import build_demo_checkpoint

    root = tmp_path_factory.mktemp("conditions")
    checkpoint = build_demo_checkpoint(root / "tiny.safetensors", seed=0)
    models = load_tiny_models(checkpoint, build_tiny_gemma(root / "gemma"))
    return dataclasses.replace(models, audio_encoder=load_audio_vae_encoder(checkpoint))


@pytest.fixture(scope="module")
def media_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    rate = 16_000
    t = torch.arange(int(2.0 * rate)) / rate
    tone = (0.4 * torch.sin(2 * torch.pi * 330 * t))[None].repeat(2, 1)
    media.write_video(root / "clip.mp4", test_pattern_frames(25, HEIGHT, WIDTH, seed=1), FPS, audio=tone[:, :rate],
                      audio_sample_rate=rate)
    media.write_audio(root / "tone.wav", tone, rate)
    mask = torch.zeros(25, HEIGHT, WIDTH, 3, dtype=torch.uint8)
    mask[:, :, : WIDTH // 2] = 255
    media.write_video(root / "mask.mp4", mask, FPS)
    torch.save({"mask": torch.tensor([1.0, 0.0])}, root / "audio_mask.pt")
    return root


def _request(**overrides) -> GenerationRequest:
    kwargs = dict(prompt=PROMPT, width=WIDTH, height=HEIGHT, num_frames=17, frame_rate=FPS, num_inference_steps=2,
                  seed=3, guidance=GUIDANCE)
    kwargs.update(overrides)
    return GenerationRequest(**kwargs)


def _write(tiny, request, sampled, path):
    clip = decode(tiny, sampled, request)
    save_clip(path, clip)
    assert path.is_file() and path.stat().st_size > 0
    return clip


def test_video_prefix_suffix_crop_and_mask_hold_their_tokens(tiny, media_files, tmp_path):
    clip = media_files / "clip.mp4"
    encoded = clip_latents(tiny.video_encoder, clip, max_frames=17, height=HEIGHT, width=WIDTH)  # [1, C, 3, 2, 2]
    whole = clip_latents(tiny.video_encoder, clip, max_frames=10**6, height=HEIGHT, width=WIDTH)  # 25 frames: 4
    first = clip_latents(tiny.video_encoder, clip, max_frames=1, height=HEIGHT, width=WIDTH)
    cases = {
        "first_frame": (SampleCondition(type="first_frame", path=clip),
                        lambda v: torch.equal(v[:, :, :1], first)
                        and not torch.equal(v[:, :, 1:2], encoded[:, :, 1:2])),
        "prefix": (SampleCondition(type="prefix", path=clip, num_frames=9), lambda v: torch.equal(
            v[:, :, :2], clip_latents(tiny.video_encoder, clip, max_frames=9, height=HEIGHT, width=WIDTH))),
        "suffix": (SampleCondition(type="suffix", path=clip, num_frames=8),
                   lambda v: torch.equal(v[:, :, -1:], whole[:, :, -1:])),
        "spatial_crop": (SampleCondition(type="spatial_crop", path=clip, spatial_region=(0, 0, 32, 64)),
                         lambda v: torch.equal(v[:, :, :, :1], encoded[:, :, :, :1])
                         and not torch.equal(v[:, :, :, 1:], encoded[:, :, :, 1:])),
        "mask": (SampleCondition(type="mask", path=clip, mask_path=media_files / "mask.mp4"),
                 lambda v: torch.equal(v[..., :1], encoded[..., :1]) and not torch.equal(v[..., 1:], encoded[..., 1:])),
    }
    for name, (condition, holds) in cases.items():
        request = _request(conditions=(condition,))
        sampled = sample(tiny, request)
        assert holds(sampled.video_latents), name
        _write(tiny, request, sampled, tmp_path / f"{name}.mp4")


def test_encoded_conditions_are_reused(tiny, media_files):
    from ltxf.generate import Conditioning, encode_conditions

    request = _request(conditions=(SampleCondition(type="prefix", path=media_files / "clip.mp4", num_frames=9),))
    cached = Conditioning(conditions=tuple(e.to("cpu") for e in encode_conditions(tiny, request)))
    no_encoder = dataclasses.replace(tiny, video_encoder=None)
    assert torch.equal(sample(no_encoder, request, conditioning=cached).video_latents,
                       sample(tiny, request).video_latents)
    with pytest.raises(ValueError, match="needs GenerationModels.video_encoder"):
        sample(no_encoder, request)


def test_video_reference_with_downscale_and_temporal_scale(tiny, media_files, tmp_path):
    condition = SampleCondition(type="reference", path=media_files / "clip.mp4", downscale_factor=2,
                                temporal_scale_factor=2)
    request = _request(conditions=(condition,), include_reference_in_output=False)
    sampled = sample(tiny, request)
    plain = sample(tiny, _request())
    assert sampled.video_latents.shape == plain.video_latents.shape
    assert not torch.equal(sampled.video_latents, plain.video_latents)
    assert sampled.conditioning.reference_frames.shape == (9, HEIGHT // 2, WIDTH // 2, 3)  # frames 0, 2, ..., 16
    _write(tiny, request, sampled, tmp_path / "reference.mp4")


@pytest.mark.parametrize("kind", ["prefix", "suffix", "mask", "reference"])
def test_audio_conditions(tiny, media_files, tmp_path, kind):
    tone = media_files / "tone.wav"
    num_audio = audio_latent_length(17, FPS)
    condition = {
        "prefix": SampleCondition(type="prefix", modality="audio", path=tone, duration=audio_steps_to_seconds(8)),
        "suffix": SampleCondition(type="suffix", modality="audio", path=tone, duration=0.32),
        "mask": SampleCondition(type="mask", modality="audio", path=tone, mask_path=media_files / "audio_mask.pt"),
        "reference": SampleCondition(type="reference", modality="audio", path=tone),
    }[kind]
    request = _request(conditions=(condition,))
    sampled = sample(tiny, request)
    tokens = patchify_audio(sampled.audio_latents)
    assert tokens.shape[1] == num_audio
    if kind == "prefix":
        held = audio_tokens(tiny.audio_encoder, tone, duration=0.32)
        assert torch.equal(tokens[:, : held.shape[1]], held)
    elif kind == "suffix":
        held = audio_tokens(tiny.audio_encoder, tone, duration=0.32, from_end=True)
        assert torch.equal(tokens[:, -held.shape[1]:], held)
    elif kind == "mask":  # [1, 0] resized (nearest) to T: the first half held
        held = audio_tokens(tiny.audio_encoder, tone, duration=17 / FPS)[:, :num_audio]
        half = num_audio // 2
        assert torch.equal(tokens[:, :half], held[:, :half]) and not torch.equal(tokens[:, half:], held[:, half:])
    else:
        assert not torch.equal(tokens, patchify_audio(sample(tiny, _request()).audio_latents))
    _write(tiny, request, sampled, tmp_path / f"audio_{kind}.mp4")


def test_video_to_audio_and_audio_to_video_freeze_the_given_modality(tiny, media_files, tmp_path):
    v2a = _request(conditions=(SampleCondition(type="video_to_audio", path=media_files / "clip.mp4"),))
    sampled = sample(tiny, v2a)
    given = clip_latents(tiny.video_encoder, media_files / "clip.mp4", max_frames=17, height=HEIGHT, width=WIDTH)
    assert torch.equal(sampled.video_latents, given)
    clip = _write(tiny, v2a, sampled, tmp_path / "v2a.mp4")
    assert clip.frames.shape[0] == 17 and clip.audio is not None
    assert media.has_audio(tmp_path / "v2a.mp4")

    a2v = _request(conditions=(SampleCondition(type="audio_to_video", path=media_files / "tone.wav"),))
    sampled = sample(tiny, a2v)
    held = audio_tokens(tiny.audio_encoder, media_files / "tone.wav", duration=17 / FPS)
    num_audio = audio_latent_length(17, FPS)
    assert torch.equal(patchify_audio(sampled.audio_latents), held[:, :num_audio])
    _write(tiny, a2v, sampled, tmp_path / "a2v.mp4")


def test_frozen_stream_is_seen_at_sigma_zero(tiny, media_files, monkeypatch):
    seen, keyframes = [], []
    transformer = tiny.transformer
    original = transformer.forward

    def recording(*args, **kwargs):
        seen.append((kwargs["video"].sigma.clone(), kwargs["audio"].sigma.clone()))
        keyframes.append(kwargs["video"].keyframes_mask)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformer, "forward", recording)
    sample(tiny, _request(conditions=(SampleCondition(type="video_to_audio", path=media_files / "clip.mp4"),),
                          guidance=ALL_PASSES))
    assert len(seen) == 2 and seen[0][0].shape[0] == 4  # 2 steps, the 4 passes batched
    assert seen and all(torch.all(v == 0) and torch.all(a > 0) for v, a in seen)
    # The frozen video keeps the first latent frame's keyframe marks (LTX-2.5 embedding), as a generated one does.
    tokens_per_frame = (HEIGHT // 32) * (WIDTH // 32)
    marks = keyframes[0].reshape(4, -1)
    assert torch.all(marks[:, :tokens_per_frame] == 1) and torch.all(marks[:, tokens_per_frame:] == 0)
    state = frozen_state(torch.ones(1, 4, 8), torch.zeros(1, 1, 4, 2))
    assert state.frozen and torch.all(state.denoise_mask == 0)


def test_text_to_audio_writes_a_wav(tiny, tmp_path):
    video_guidance, audio_guidance = official_guidance(video=False, stg_blocks=(1,))
    request = _request(generate_video=False, guidance=video_guidance, audio_guidance=audio_guidance)
    sampled = sample(tiny, request)
    assert sampled.video_latents is None and sampled.audio_latents is not None
    clip = _write(tiny, request, sampled, tmp_path / "t2a.wav")
    assert clip.frames is None
    assert media.read_audio(tmp_path / "t2a.wav").num_samples == clip.audio.shape[1]


def test_official_guidance_defaults():
    video, audio = official_guidance()
    assert (video.cfg_scale, audio.cfg_scale, video.stg_scale, audio.stg_scale) == (3.0, 7.0, 1.0, 1.0)
    assert video.stg_blocks == audio.stg_blocks == (28,) and video.guidance_rescale == audio.guidance_rescale == 0.7
    assert video.modality_scale == audio.modality_scale == 3.0
    assert official_guidance(audio=False)[0].modality_scale == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(type="prefix", path="a.mp4", num_frames=8), "8k \\+ 1"),
        (dict(type="suffix", path="a.mp4", num_frames=9), "multiple of 8"),
        (dict(type="prefix", modality="audio", path="a.wav"), "needs duration"),
        (dict(type="spatial_crop", path="a.mp4"), "needs spatial_region"),
        (dict(type="mask", path="a.mp4"), "needs mask_path"),
        (dict(type="reference", modality="audio", path="a.wav", downscale_factor=2), "video references only"),
        (dict(type="zoom", path="a.mp4"), "must be one of"),
    ],
)
def test_condition_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SampleCondition(**kwargs)


def test_request_refuses_a_condition_on_a_modality_not_generated():
    with pytest.raises(ValueError, match="on audio, but the audio is not generated"):
        _request(generate_audio=False, conditions=(SampleCondition(type="prefix", modality="audio", path="a.wav",
                                                                   duration=1.0),))
    with pytest.raises(ValueError, match="nothing to generate"):
        _request(generate_video=False, generate_audio=False)
