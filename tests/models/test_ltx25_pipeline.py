"""The whole LTX-2.5 path on the official 1.2 dataset (``official-datasets/ltx-2.5``): ltxf's preprocessing of the
same clips reproduces the official files up to compute precision, ltxf trains (LoRA with validation, and full
fine-tuning) on the official files with a split pack, and the exports are in the 2.5 layout.

What is possible with this data (its README): the tiny 2.5 VAE has 4 latent channels and the tiny audio VAE 2,
while the tiny 2.5 transformer has 128 input channels, so no trainer can train that transformer on these latents;
ltxf refuses it with an error naming the file. The training runs use a 2.5-layout transformer file built here
with the same config except the latent widths (4 video, 2 x 16 audio) and the same text connectors, so every
other part is the real pack (packed Gemma 4, conv VAE, audio VAE + vocoder) and the real official files.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from experiments.presets import ltx25_av_lora
from ltxf.config import CheckpointConfig, DataConfig, LogConfig, OptimConfig, ParallelConfig
from ltxf.lora import LoraConfig
from ltxf.models import checkpoint
from ltxf.models.pack import CONDITIONS_TEXT_ENCODER_KEY
from ltxf.models.transformer import load_transformer
from ltxf.prep.process import ProcessDatasetConfig, process_dataset
from ltxf.train import main
from ltxf.validation import ValidationConfig
from tests.models.golden_ltx25 import (
    AUDIO_VAE,
    OFFICIAL_DATASET,
    TEXT_ENCODER,
    TRANSFORMER,
    VIDEO_VAE_CONV,
    VIDEO_VAE_DIFFUSION,
)

OFFICIAL = OFFICIAL_DATASET / ".precomputed"
BUCKETS = "96x64x9;64x96x9;96x64x1;64x96x1"


@pytest.fixture(scope="module")
def ltxf_made(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ltxf_made") / ".precomputed"
    summary = process_dataset(ProcessDatasetConfig(
        dataset_path=OFFICIAL_DATASET / "dataset.json", resolution_buckets=BUCKETS, model_path=TRANSFORMER,
        text_encoder_path=TEXT_ENCODER, video_vae_path=VIDEO_VAE_DIFFUSION, audio_vae_path=AUDIO_VAE,
        device="cpu", output_dir=out,  # audio is encoded by default (skip_audio=False)
    ))
    assert len(summary.processed) == 4
    return out


def test_preprocessing_matches_the_official_files(ltxf_made):
    """Same files, keys, shapes, dtypes, scalars and masks; values equal up to the official bfloat16 compute.

    The official preprocessor runs Gemma, the feature extractor and the video encoder in bfloat16, ltxf on CPU in
    float32 (both store bfloat16): measured text-feature max |d| 0.031 (rel. RMS <= 0.65 %), video-latent max |d|
    0.024 (rel. RMS <= 1.35 %, values ~2, i.e. 1-3 bf16 ulps); audio (float32 in both) max |d| 4.1e-4 at 44.1 kHz
    (a different resampler). Bounds: 2x the measured values."""
    official = sorted(p.relative_to(OFFICIAL) for p in OFFICIAL.rglob("*.pt"))
    assert official == sorted(p.relative_to(ltxf_made) for p in ltxf_made.rglob("*.pt"))
    for rel in official:
        a = torch.load(OFFICIAL / rel, weights_only=True)
        b = torch.load(ltxf_made / rel, weights_only=True)
        extra = set(b) - set(a)
        assert extra == ({CONDITIONS_TEXT_ENCODER_KEY} if rel.parts[0] == "conditions" else set()), rel
        if rel.parts[0] == "conditions":
            assert b[CONDITIONS_TEXT_ENCODER_KEY] == "gemma4-tiny-golden-v1"
        for key, expected in a.items():
            actual = b[key]
            if not isinstance(expected, torch.Tensor):
                assert type(actual) is type(expected) and actual == expected, (rel, key)
                continue
            assert actual.shape == expected.shape and actual.dtype == expected.dtype, (rel, key)
            if not expected.is_floating_point():
                assert torch.equal(actual, expected), (rel, key)
                continue
            diff = (actual.double() - expected.double())
            rel_rms = (diff.square().mean().sqrt() / expected.double().square().mean().sqrt()).item()
            max_abs = diff.abs().max().item()
            bound = {"conditions": (0.07, 0.013), "latents": (0.05, 0.027), "audio_latents": (1e-3, 2e-4)}
            assert max_abs <= bound[rel.parts[0]][0] and rel_rms <= bound[rel.parts[0]][1], (rel, key, max_abs,
                                                                                            rel_rms)


def test_the_tiny_pack_transformer_cannot_train_on_4_channel_latents(tmp_path):
    cfg = _config(tmp_path / "run", TRANSFORMER, steps=1)
    with pytest.raises(ValueError, match=r"latents.*has 4 channels, expected 128"):
        main(replace(cfg, validation=replace(cfg.validation, interval=None)))


@pytest.fixture(scope="module")
def transformer_for_the_data(tmp_path_factory) -> Path:
    """The tiny 2.5 transformer file with latent widths that fit the tiny VAEs (4 video, 2 x 16 audio channels),
    made by the README's tool: every other tensor and all metadata are the pack's."""
    from tools.adapt_transformer_widths import main as adapt

    path = tmp_path_factory.mktemp("pack") / "ltx-2.5-tiny-transformer-4ch.safetensors"
    assert adapt([str(TRANSFORMER), "--video-vae", str(VIDEO_VAE_CONV), "--audio-vae", str(AUDIO_VAE),
                  "--output", str(path)]) == 0
    original, adapted = load_file(str(TRANSFORMER)), load_file(str(path))
    assert set(original) == set(adapted)
    changed = {k for k in original if original[k].shape != adapted[k].shape or not torch.equal(original[k], adapted[k])}
    assert {k.removeprefix(checkpoint.TRANSFORMER_PREFIX).rsplit(".", 1)[0] for k in changed} == {
        "patchify_proj", "proj_out", "audio_patchify_proj", "audio_proj_out"}
    assert checkpoint.read_metadata(path)["gemma_source_checkpoint"] == \
        checkpoint.read_metadata(TRANSFORMER)["gemma_source_checkpoint"]
    return path


def _config(output_dir: Path, transformer: Path, *, steps: int, mode: str = "lora"):
    cfg = ltx25_av_lora()
    return replace(
        cfg,
        model=replace(cfg.model, checkpoint=transformer, text_encoder=TEXT_ENCODER, video_vae=VIDEO_VAE_CONV,
                      audio_vae=AUDIO_VAE, dtype="float32", training_mode=mode),
        lora=LoraConfig(rank=4, alpha=4, target_modules=("to_k", "to_q", "to_v", "to_out.0")),
        data=DataConfig(root=OFFICIAL, num_workers=0),
        optim=OptimConfig(learning_rate=1e-3, steps=steps, batch_size=1),
        parallel=ParallelConfig(data_parallel="replicate", activation_checkpointing=False),
        checkpoints=CheckpointConfig(interval=None, export_dtype="float32"),
        log=LogConfig(every=1),
        validation=ValidationConfig(prompts=("a red cat runs over the grass",), video_dims=(96, 64, 9),
                                    frame_rate=24.0, inference_steps=2, interval=steps, stg_blocks=(1,),
                                    skip_initial_validation=True),
        output_dir=output_dir,
    )


def test_lora_trains_validates_and_exports_on_the_official_dataset(transformer_for_the_data, tmp_path):
    result = main(_config(tmp_path / "lora", transformer_for_the_data, steps=2))
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    samples = sorted((result.output_dir / "samples").iterdir())
    assert [p.name for p in samples] == ["step_000002_1.mp4"]
    lora = load_file(str(result.export_path))
    assert lora and all(k.startswith("diffusion_model.") for k in lora)


def test_full_fine_tune_exports_a_25_transformer_file(transformer_for_the_data, tmp_path):
    cfg = _config(tmp_path / "full", transformer_for_the_data, steps=1, mode="full")
    result = main(replace(cfg, validation=replace(cfg.validation, interval=None)))
    exported = result.export_path
    base_keys = set(checkpoint.list_keys(transformer_for_the_data))
    assert set(checkpoint.list_keys(exported)) == base_keys  # transformer + both connectors, as the pack's file
    metadata = checkpoint.read_metadata(exported)
    base = checkpoint.read_metadata(transformer_for_the_data)
    for key in ("model_version", "gemma_source_checkpoint", "license"):
        assert metadata[key] == base[key]
    assert json.loads(metadata["config"]) == checkpoint.read_config(transformer_for_the_data)
    reloaded = load_transformer(exported)
    assert reloaded.config.version == "ltx-2.5" and reloaded.config.keyframes_embedding


def test_inference_tool_samples_with_the_split_pack(transformer_for_the_data, tmp_path, caplog):
    """Given the diffusion-decoder VAE (as the official docs pass it), decoding falls back to the pack's conv VAE
    next to it, with a warning."""
    from tools.inference import main as inference

    result = inference([
        "--checkpoint", str(transformer_for_the_data), "--text_encoder_path", str(TEXT_ENCODER),
        "--video_vae_path", str(VIDEO_VAE_DIFFUSION), "--audio_vae_path", str(AUDIO_VAE), "--prompt", "a red cat",
        "--output", str(tmp_path / "clip.mp4"), "--width", "96", "--height", "64", "--num_frames", "9",
        "--num_inference_steps", "2", "--stg_blocks", "1", "--device", "cpu", "--dtype", "float32",
        "--frame_rate", "24",
    ])
    assert result.output.is_file() and result.clip.num_frames == 9 and result.clip.audio_sample_rate == 48000
    assert "decoding with the pack's conv VAE" in caplog.text and VIDEO_VAE_CONV.name in caplog.text


def test_inference_tool_refuses_a_split_pack_without_its_vaes(transformer_for_the_data, tmp_path):
    from tools.inference import main as inference

    with pytest.raises(ValueError, match=r"split-pack transformer file.*--model\.video_vae"):
        inference(["--checkpoint", str(transformer_for_the_data), "--text_encoder_path", str(TEXT_ENCODER),
                   "--prompt", "x", "--output", str(tmp_path / "clip.mp4"), "--device", "cpu"])
