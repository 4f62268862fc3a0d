"""End to end: synthetic clips with audio -> tools/process_dataset.py (tiny checkpoint + tiny Gemma) ->
ltxf.data.PrecomputedDataset -> decoded MP4 / PNG / WAV, checked for frame counts, sizes and durations.

The tiny models are random, so the decoded pictures and sounds are noise; what is checked is the plumbing:
layout, keys, shapes, dtypes, lengths, the per-file error report, resume and the exit code.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path

import pytest
import torch

from ltxf import media
from ltxf.data import PrecomputedDataset
from tests.prep.conftest import write_clip

ROOT = Path(__file__).resolve().parents[2]
logger = logging.getLogger(__name__)


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    (root / "clips").mkdir()
    write_clip(root / "clips" / "a.mp4", num_frames=25, height=64, width=64)
    write_clip(root / "clips" / "b.mp4", num_frames=17, height=64, width=96, colour=(40, 200, 60))
    media.write_image(root / "still.png", torch.full((48, 80, 3), 128, dtype=torch.uint8))
    (root / "broken.mp4").write_bytes(b"")
    rows = [
        {"caption": "a red square moves right", "media_path": "clips/a.mp4"},
        {"caption": "The video shows a green square", "media_path": "clips/b.mp4"},
        {"caption": "grey background", "media_path": "still.png"},
        {"caption": "nothing", "media_path": "broken.mp4"},
    ]
    (root / "dataset.json").write_text(json.dumps(rows))
    return root


@pytest.fixture(scope="module")
def processed(dataset, tiny_checkpoint, tiny_gemma, tmp_path_factory):
    tool = load_tool("process_dataset")
    args = [
        str(dataset / "dataset.json"), "--resolution_buckets", "64x64x17;96x64x9;64x64x1",
        "--model_path", str(tiny_checkpoint), "--text_encoder_path", str(tiny_gemma),
        "--decode", "True", "--remove_llm_prefixes", "True", "--lora_trigger", "tok", "--device", "cpu",
    ]
    start = time.perf_counter()
    code = tool.main(args)
    elapsed = time.perf_counter() - start
    # 3 usable clips (the broken file is skipped); the time includes loading every model and --decode.
    logger.info("process_dataset on CPU: 3 clips in %.2f s = %.2f clips/s (with model loading and decoding)",
                elapsed, 3 / elapsed)
    return {"code": code, "args": args, "tool": tool, "out": dataset / ".precomputed"}


def test_exit_code_and_layout(processed):
    assert processed["code"] == 0
    out = processed["out"]
    for folder in ("conditions", "latents"):
        assert sorted(p.relative_to(out / folder).as_posix() for p in (out / folder).rglob("*.pt")) == [
            "clips/a.pt", "clips/b.pt", "still.pt"
        ]
    # The image has no audio track and the broken file produced nothing.
    assert sorted(p.relative_to(out / "audio_latents").as_posix() for p in (out / "audio_latents").rglob("*.pt")) == [
        "clips/a.pt", "clips/b.pt"
    ]
    assert not list(out.rglob("broken*"))


def test_files_have_the_official_keys_shapes_and_dtypes(processed):
    out = processed["out"]
    latents = torch.load(out / "latents" / "clips" / "b.pt", weights_only=True)
    assert set(latents) == {"latents", "num_frames", "height", "width", "fps"}
    # 96x64x9 bucket -> [128, (9 - 1) / 8 + 1, 64 / 32, 96 / 32]
    assert latents["latents"].shape == (128, 2, 2, 3) and latents["latents"].dtype == torch.bfloat16
    assert (latents["num_frames"], latents["height"], latents["width"]) == (2, 2, 3)
    assert latents["fps"] == pytest.approx(24.0)
    image = torch.load(out / "latents" / "still.pt", weights_only=True)
    assert image["latents"].shape == (128, 1, 2, 2) and image["fps"] == 1.0

    conditions = torch.load(out / "conditions" / "clips" / "a.pt", weights_only=True)
    # + which text encoder made them (an extra key the official reader ignores)
    assert set(conditions) == {"video_prompt_embeds", "audio_prompt_embeds", "prompt_attention_mask", "text_encoder"}
    assert conditions["text_encoder"] == "gemma3"
    assert conditions["video_prompt_embeds"].shape == (1024, 32)
    assert conditions["video_prompt_embeds"].dtype == conditions["audio_prompt_embeds"].dtype == torch.bfloat16
    mask = conditions["prompt_attention_mask"]
    assert mask.dtype == torch.int64 and mask.shape == (1024,)
    # "tok a red square moves right" = BOS + 6 words, left-padded.
    assert mask.tolist() == [0] * (1024 - 7) + [1] * 7

    audio = torch.load(out / "audio_latents" / "clips" / "a.pt", weights_only=True)
    assert set(audio) == {"latents", "num_time_steps", "frequency_bins", "duration"}
    assert audio["latents"].dtype == torch.float32 and audio["latents"].shape[0::2] == (8, 16)
    # The bucket keeps 17 of 25 frames, so the audio is trimmed to 17 / 24 s; about 25 latent steps per second.
    assert audio["duration"] == pytest.approx(17 / 24, abs=1 / 24000)
    assert audio["num_time_steps"] == audio["latents"].shape[1]
    assert abs(audio["num_time_steps"] - 17 / 24 * 25) <= 1.5


def test_precomputed_dataset_reads_it(processed):
    dataset = PrecomputedDataset(processed["out"].parent, sources=["latents", "conditions", "audio_latents"],
                                 optional_sources=["audio_latents"])
    assert len(dataset) == 3
    samples = {dataset[i]["sample_id"]: dataset[i] for i in range(len(dataset))}
    assert set(samples) == {"clips/a", "clips/b", "still"}
    a = samples["clips/a"]
    assert a["video_latents"].shape == (128, 3, 2, 2) and a["video_latents"].dtype == torch.bfloat16
    assert a["video_prompt_embeds"].shape == (1024, 32) and a["prompt_attention_mask"].dtype == torch.bool
    assert a["audio_latents"].shape[0] == 8 and a["audio_latents"].dtype == torch.float32
    assert float(a["fps"]) == pytest.approx(24.0)
    assert "audio_latents" not in samples["still"]


def test_decoded_videos_and_audio(processed):
    out = processed["out"]
    for rel, (num_frames, height, width) in {"clips/a.mp4": (17, 64, 64), "clips/b.mp4": (9, 64, 96)}.items():
        info = media.probe_video(out / "decoded_videos" / rel)
        video = media.read_video(out / "decoded_videos" / rel)
        assert (video.num_frames, video.height, video.width) == (num_frames, height, width)
        assert (info.width, info.height, info.num_frames) == (width, height, num_frames)
        assert video.fps == pytest.approx(24.0) and info.duration == pytest.approx(num_frames / 24, abs=0.05)
    still = media.read_video(out / "decoded_videos" / "still.png")
    assert (still.num_frames, still.height, still.width) == (1, 64, 64)

    for rel in ("clips/a", "clips/b"):
        latents = torch.load(out / "audio_latents" / f"{rel}.pt", weights_only=True)
        audio = media.read_audio(out / "decoded_audio" / f"{rel}.wav")
        assert audio.sample_rate == 24000 and audio.num_channels == 2
        # The audio decoder gives 4 T - 3 mel frames at 100 frames/s; the vocoder makes 240 samples of each.
        assert audio.num_samples == (4 * latents["num_time_steps"] - 3) * 240
        assert audio.duration == pytest.approx(latents["duration"], abs=0.05)


def test_resume_skips_finished_files(processed, caplog):
    out = processed["out"]
    files = sorted(out.rglob("*.*"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    caplog.set_level(logging.INFO)
    assert processed["tool"].main(processed["args"]) == 0
    assert "process_dataset: 0 processed, 3 already done, 1 skipped, 1 without audio" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    assert sorted(out.rglob("*.*")) == files
