"""Preprocessing of official ltx-trainer 1.2 dataset files: the golden official output (shared/golden/
official-datasets) is reproduced from its dataset.json as it is, and the flexible strategy's extra inputs (video and
audio masks, reference audio, temporally scaled references, audio-only rows) land in the official layout."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from ltxf import demo, media
from ltxf.demo import demo_checkpoint_config, demo_media_tensors, random_model_tensors
from ltxf.models.checkpoint import write_checkpoint
from ltxf.models.pack import CONDITIONS_TEXT_ENCODER_KEY
from ltxf.prep import process
from tests.prep.conftest import AUDIO_RATE, sine, write_clip

GOLDEN = Path(__file__).resolve().parents[3] / "shared" / "golden" / "official-datasets" / "ltx-2.3"
if not GOLDEN.is_dir():
    GOLDEN = Path("/work/shared/golden/official-datasets/ltx-2.3")


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def test_reproduces_the_official_1_2_output_from_its_dataset_file(tmp_path, monkeypatch):
    """ltxf on the golden dataset.json (legacy media_path column, audio extracted by default, the same tiny
    LTX-2.3 checkpoint and Gemma 3): the same files, keys, Python types, shapes, dtypes and scalars as the official
    .precomputed; values agree to the official bf16 compute's error (it runs Gemma and the VAE in bf16, ltxf in fp32
    on CPU: measured 0.6-1.0 % relative RMS; audio is fp32 in both, resamplers differ by ~1e-3)."""
    data = tmp_path / "data"
    shutil.copytree(GOLDEN, data, ignore=shutil.ignore_patterns(".precomputed", "ltxf-made", "gemma3-tiny"))
    # The README's recipe, ltxf 3390d39's build_demo_checkpoint(seed=5), spelled out so later changes to the demo's
    # seeding cannot move it (its sha256 is checked against the README's); its 8 connector registers compute what
    # the official file's 128 tiled ones do at sequence length 1024. The demo has since moved to 128 registers and
    # decoder multipliers 2/2/2, so the 3390d39 values are pinned here.
    video_vae_3390d39 = {**demo.DEMO_VIDEO_VAE, "decoder_blocks": [
        ["res_x", {"num_layers": 1}], ["compress_all", {"multiplier": 1}], ["compress_all", {"multiplier": 2}],
        ["compress_all", {"multiplier": 2}]]}
    monkeypatch.setattr(demo, "DEMO_VIDEO_VAE", video_vae_3390d39)
    config = demo_checkpoint_config()
    config["transformer"]["connector_num_learnable_registers"] = 8
    tensors = random_model_tensors(config, seed=5)
    tensors.update(demo_media_tensors(seed=6))
    checkpoint = write_checkpoint(tmp_path / "ltx23-tiny.safetensors", tensors, config)
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert digest.startswith("42f4e5aa") and digest.endswith("0704"), digest
    config = process.ProcessDatasetConfig(
        dataset_path=data / "dataset.json", resolution_buckets="96x64x9;64x96x9;96x64x1;64x96x1",
        model_path=checkpoint, text_encoder_path=GOLDEN / "gemma3-tiny", device="cpu",
    )
    summary = process.process_dataset(config)
    assert sorted(summary.processed) == ["odd.mp4", "still.png", "tall.mp4", "wide.mp4"]
    ours, official = data / ".precomputed", GOLDEN / ".precomputed"

    def listing(root: Path) -> list[str]:
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.pt"))

    assert listing(ours) == listing(official)
    for rel in listing(official):
        a = torch.load(ours / rel, weights_only=True)
        b = torch.load(official / rel, weights_only=True)
        # ltxf tags each conditions file with the Gemma that made it (training refuses another encoder's features).
        assert set(a) - set(b) == ({CONDITIONS_TEXT_ENCODER_KEY} if rel.startswith("conditions/") else set()), rel
        assert set(b) <= set(a), rel
        for key, expected in b.items():
            got = a[key]
            assert type(got) is type(expected), (rel, key)
            if not isinstance(expected, torch.Tensor):
                assert got == pytest.approx(expected, abs=1e-6), (rel, key)
                continue
            assert got.shape == expected.shape and got.dtype == expected.dtype, (rel, key)
            if key == "prompt_attention_mask":
                assert torch.equal(got, expected), rel
            elif rel.startswith("audio_latents"):
                assert float((got - expected).abs().max()) < 2e-3, rel
            else:
                assert _rel_rms(got, expected) < 0.02, (rel, key, _rel_rms(got, expected))


def test_flexible_inputs_masks_reference_audio_and_temporal_reference(tmp_path, tiny_checkpoint, tiny_gemma):
    write_clip(tmp_path / "clip.mp4", num_frames=17, height=64, width=64)
    write_clip(tmp_path / "ref.mp4", num_frames=17, height=64, width=64, colour=(0, 0, 255))
    media.write_audio(tmp_path / "other.wav", sine(2.0, freq=220.0), AUDIO_RATE)
    # Mask video: the left half white (kept) on frames 0-4, black after; 17 frames -> latent frames [0], [1..8],
    # [9..16]: kept, kept (frames 1-4 are in the group), generated.
    mask = torch.zeros(17, 64, 64, 3, dtype=torch.uint8)
    mask[:5, :, :32] = 255
    media.write_video(tmp_path / "mask.mp4", mask, 24.0)
    torch.save({"mask": torch.tensor([1.0, 1.0, 0.0, 0.0])}, tmp_path / "amask.pt")
    rows = [{"caption": "a", "video": "clip.mp4", "reference_video": "ref.mp4", "reference_audio": "other.wav",
             "video_mask": "mask.mp4", "audio_mask": "amask.pt"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    config = process.ProcessDatasetConfig(dataset_path=tmp_path / "d.json", resolution_buckets="64x64x17",
                                          model_path=tiny_checkpoint, text_encoder_path=tiny_gemma, device="cpu",
                                          reference_temporal_scale_factor=2)
    assert process.process_dataset(config).processed == ["clip.mp4"]
    out = tmp_path / ".precomputed"
    video = torch.load(out / "latents" / "clip.pt", weights_only=True)
    reference = torch.load(out / "reference_latents" / "clip.pt", weights_only=True)
    assert video["latents"].shape[1:] == (3, 2, 2) and reference["latents"].shape[1:] == (2, 2, 2)
    assert reference["fps"] == pytest.approx(12.0) and video["fps"] == pytest.approx(24.0)
    video_mask = torch.load(out / "video_masks" / "clip.pt", weights_only=True)["mask"]
    assert video_mask.dtype == torch.float32
    expected = torch.zeros(3, 2, 2)
    expected[:2, :, 0] = 1.0
    assert torch.equal(video_mask, expected)
    audio = torch.load(out / "audio_latents" / "clip.pt", weights_only=True)
    reference_audio = torch.load(out / "reference_audio_latents" / "clip.pt", weights_only=True)
    steps = audio["num_time_steps"]
    assert reference_audio["latents"].shape == audio["latents"].shape == (8, steps, 16)
    assert not torch.equal(reference_audio["latents"], audio["latents"])
    audio_mask = torch.load(out / "audio_masks" / "clip.pt", weights_only=True)["mask"]
    assert audio_mask.shape == (steps,) and audio_mask.dtype == torch.float32
    nearest = torch.tensor([1.0, 1.0, 0.0, 0.0])[(torch.arange(steps) * 4) // steps]  # nearest resize to T
    assert torch.equal(audio_mask, nearest)


def test_audio_only_rows_use_the_duration_buckets(tmp_path, tiny_checkpoint, tiny_gemma):
    media.write_audio(tmp_path / "rain.wav", sine(1.3), AUDIO_RATE)
    media.write_audio(tmp_path / "short.wav", sine(0.3), AUDIO_RATE)
    rows = [{"caption": "rain", "audio": "rain.wav"}, {"caption": "blip", "audio": "short.wav"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = process.ProcessDatasetConfig(dataset_path=tmp_path / "d.jsonl", resolution_buckets="64x64x9",
                                          model_path=tiny_checkpoint, text_encoder_path=tiny_gemma, device="cpu",
                                          audio_durations="0.5;1.0;2.0")
    summary = process.process_dataset(config)
    assert summary.processed == ["rain.wav"]
    assert "shorter than every --audio_durations bucket" in dict(summary.skipped)["short.wav"]
    out = tmp_path / ".precomputed"
    audio = torch.load(out / "audio_latents" / "rain.pt", weights_only=True)
    assert audio["duration"] == pytest.approx(1.0) and audio["num_time_steps"] == audio["latents"].shape[1] == 26
    assert (out / "conditions" / "rain.pt").is_file() and not (out / "latents").exists()


@pytest.mark.parametrize(("spec", "message"), [("2;x", "--audio_durations"), ("0", "must be > 0")])
def test_bad_audio_durations_are_named(tmp_path, spec, message):
    with pytest.raises(ValueError, match=message):
        process.parse_audio_durations(spec)


def test_reference_temporal_factor_needs_frames_it_divides():
    buckets = process.parse_buckets("64x64x9")
    with pytest.raises(ValueError, match="frames - 1 must be a multiple of 16"):
        process.check_reference_temporal_factor(2, buckets)
    assert process.check_reference_temporal_factor(2, process.parse_buckets("64x64x17")) == 2


def test_causal_mask_grouping():
    assert [list(g) for g in process.causal_frame_groups(17)] == [[0], list(range(1, 9)), list(range(9, 17))]
