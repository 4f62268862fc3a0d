"""process_videos / process_captions / decode_latents with the tiny checkpoint: bad input, IC-LoRA references,
random crops, rank sharding, caption clean-ups, and the tools' command lines."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import logging
from pathlib import Path

import pytest
import torch

from ltxf import media
from ltxf.models.gemma import load_gemma_text_encoder
from ltxf.models.text import load_embeddings_processor
from ltxf.models.video_vae import load_video_vae_decoder, load_video_vae_encoder
from ltxf.prep import captions, edges, process, scenes
from ltxf.prep.buckets import parse_buckets
from ltxf.prep.dataset_file import read_dataset
from ltxf.prep.process import (
    DecodeLatentsConfig,
    ProcessCaptionsConfig,
    ProcessVideosConfig,
    decode_latents,
    encode_media,
    process_captions,
    process_videos,
)
from tests.prep.conftest import write_clip
from tests.prep.test_end_to_end import load_tool

TOOLS = {
    "process_dataset": process.ProcessDatasetConfig, "process_videos": ProcessVideosConfig,
    "process_captions": ProcessCaptionsConfig, "decode_latents": DecodeLatentsConfig,
    "split_scenes": scenes.SplitScenesConfig, "compute_reference": edges.ComputeReferenceConfig,
    "caption_videos": captions.CaptionVideosConfig,
}


def write_dataset(root: Path, rows: list[dict], name: str = "dataset.json") -> Path:
    (root / name).write_text(json.dumps(rows))
    return root / name


def videos_args(dataset: Path, checkpoint: Path, out: Path, buckets: str = "64x64x9", *extra: str) -> list[str]:
    return [str(dataset), "--resolution_buckets", buckets, "--output_dir", str(out / "latents"), "--model_path",
            str(checkpoint), "--device", "cpu", *extra]


def test_nothing_produced_exits_1_with_reasons(tmp_path, tiny_checkpoint, caplog):
    write_clip(tmp_path / "short.mp4", num_frames=5, height=64, width=64)
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 10)
    dataset = write_dataset(tmp_path, [{"media_path": n} for n in ("short.mp4", "empty.mp4", "junk.mp4", "gone.mp4")])
    caplog.set_level(logging.INFO)
    assert load_tool("process_videos").main(videos_args(dataset, tiny_checkpoint, tmp_path)) == 1
    text = caplog.text
    assert "short.mp4: has 5 frame(s), fewer than every bucket (64x64x9) needs" in text
    assert "empty.mp4: file is empty (zero bytes)" in text
    assert "junk.mp4: cannot be opened as a media file" in text
    assert "gone.mp4: no such file" in text
    assert "videos: 0 processed, 0 already done, 4 skipped" in text
    assert "nothing was produced" in text


def test_usage_errors_exit_2(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    tool = load_tool("process_videos")
    monkeypatch.delenv("LTXF_DEBUG", raising=False)
    # A bad flag value (tyro rejects it): one "error:" line (ltxf.faults' style, as train.py's), not tyro's box.
    assert tool.main(videos_args(tmp_path / "d.json", tiny_checkpoint, tmp_path, "64x64x10")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "64x64x10" in err, err
    (tmp_path / "d.csv").write_text('caption,media_path\n"a,b.mp4\n')
    assert tool.main(videos_args(tmp_path / "d.csv", tiny_checkpoint, tmp_path)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    # A usage error found while running: one line naming the file and line.
    assert len(errors) == 1 and "d.csv line" in errors[0] and "malformed CSV" in errors[0]


def test_missing_audio_track_keeps_the_clip(tmp_path, tiny_checkpoint, caplog):
    write_clip(tmp_path / "silent.mp4", num_frames=9, height=64, width=64, audio=False)
    write_clip(tmp_path / "loud.mp4", num_frames=9, height=64, width=64)
    dataset = write_dataset(tmp_path, [{"media_path": "silent.mp4"}, {"media_path": "loud.mp4"}])
    args = videos_args(dataset, tiny_checkpoint, tmp_path, "64x64x9", "--with_audio", "True", "--audio_output_dir",
                       str(tmp_path / "audio_latents"))
    assert load_tool("process_videos").main(args) == 0
    assert (tmp_path / "latents" / "silent.pt").is_file() and (tmp_path / "latents" / "loud.pt").is_file()
    assert not (tmp_path / "audio_latents" / "silent.pt").exists()
    assert (tmp_path / "audio_latents" / "loud.pt").is_file()
    assert "silent.mp4: no audio track; video latents written, no audio latents" in caplog.text
    assert "1 without audio" in caplog.text
    with pytest.raises(ValueError, match="--audio_output_dir is required"):
        ProcessVideosConfig(dataset_file=dataset, resolution_buckets="64x64x9", output_dir=tmp_path,
                            model_path=tiny_checkpoint, with_audio=True)


def test_reference_latents(tmp_path, tiny_checkpoint, caplog):
    write_clip(tmp_path / "t1.mp4", num_frames=9, height=64, width=128)
    write_clip(tmp_path / "r1.mp4", num_frames=9, height=64, width=128, colour=(0, 0, 255))
    write_clip(tmp_path / "t2.mp4", num_frames=9, height=64, width=128)
    write_clip(tmp_path / "r2.mp4", num_frames=4, height=64, width=128)
    dataset = write_dataset(tmp_path, [{"media_path": "t1.mp4", "reference_path": "r1.mp4"},
                                       {"media_path": "t2.mp4", "reference_path": "r2.mp4"}])
    config = ProcessVideosConfig(
        dataset_file=dataset, resolution_buckets="128x64x9", output_dir=tmp_path / "latents",
        model_path=tiny_checkpoint, device="cpu", reference_column="reference_path",
        reference_output_dir=tmp_path / "reference_latents", reference_downscale_factor=2,
    )
    summary = process_videos(config)
    assert summary.processed == ["t1.mp4"]
    assert summary.skipped[0][0] == "t2.mp4" and "the reference needs 9" in summary.skipped[0][1]
    target = torch.load(tmp_path / "latents" / "t1.pt", weights_only=True)
    reference = torch.load(tmp_path / "reference_latents" / "t1.pt", weights_only=True)
    assert target["latents"].shape == (128, 2, 2, 4)
    # 128x64 scaled down by 2 is 64x32: latent 2 x 1.
    assert reference["latents"].shape == (128, 2, 1, 2) and reference["latents"].dtype == torch.bfloat16
    assert (reference["height"], reference["width"], reference["fps"]) == (1, 2, target["fps"])
    with pytest.raises(ValueError, match="needs a single resolution bucket"):
        process.check_reference_factor(2, parse_buckets("128x64x9;64x64x9"), True)
    assert process.check_reference_factor(3, parse_buckets("96x96x9"), False) == 1
    assert "is ignored: there is no reference column" in caplog.text


def test_random_crop_is_seeded_and_shared_by_the_reference(tmp_path, tiny_checkpoint):
    frames = torch.randint(0, 256, (9, 64, 160, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    media.write_video(tmp_path / "t.mp4", frames, 24.0, crf=0)
    media.write_video(tmp_path / "r.mp4", frames, 24.0, crf=0)
    dataset = write_dataset(tmp_path, [{"media_path": "t.mp4", "reference_path": "r.mp4"}])
    entries = read_dataset(dataset, reference_column="reference_path", require_captions=False)
    encoder = load_video_vae_encoder(tiny_checkpoint)
    results = []
    for run, seed in enumerate((0, 0, 5)):
        encode_media(entries, buckets=parse_buckets("64x64x9"), latents_dir=tmp_path / f"l{run}",
                     video_encoder=encoder, reference_dir=tmp_path / f"r{run}", reshape_mode="random", seed=seed)
        results.append([torch.load(tmp_path / f"{kind}{run}" / "t.pt", weights_only=True)["latents"]
                        for kind in "lr"])
    assert torch.equal(results[0][0], results[1][0])
    # Target and reference are the same video: the shared crop gives the same latents.
    assert torch.equal(results[0][0], results[0][1])
    assert not torch.equal(results[0][0], results[2][0])


def test_ranks_split_the_samples(tmp_path, tiny_checkpoint, monkeypatch):
    for i in range(5):
        write_clip(tmp_path / f"c{i}.mp4", num_frames=9, height=64, width=64, audio=False)
    dataset = write_dataset(tmp_path, [{"media_path": f"c{i}.mp4"} for i in range(5)])
    done = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        config = ProcessVideosConfig(dataset_file=dataset, resolution_buckets="64x64x9",
                                     output_dir=tmp_path / "latents", model_path=tiny_checkpoint, device="cpu")
        done.append(process_videos(config).processed)
    assert done == [["c0.mp4", "c2.mp4", "c4.mp4"], ["c1.mp4", "c3.mp4"]]
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="invalid RANK=2 for WORLD_SIZE=2"):
        process.rank_and_world_size()


def test_captions_match_direct_encoding(tmp_path, tiny_checkpoint, tiny_gemma):
    rows = [{"caption": "The video shows a red square", "media_path": "clips/a.mp4"},
            {"caption": "  In this video, sky", "media_path": "b.mp4"},
            {"caption": "dog runs fast", "media_path": "c.png"}]
    dataset = write_dataset(tmp_path, rows)
    outputs = {}
    for batch_size in (1, 3):
        out = tmp_path / f"conditions{batch_size}"
        summary = process_captions(ProcessCaptionsConfig(
            dataset_file=dataset, output_dir=out, model_path=tiny_checkpoint, text_encoder_path=tiny_gemma,
            batch_size=batch_size, lora_trigger="tok", remove_llm_prefixes=True, device="cpu",
        ))
        assert summary.processed == ["clips/a.mp4", "b.mp4", "c.png"]
        outputs[batch_size] = {n: torch.load(out / f"{n}.pt", weights_only=True) for n in ("clips/a", "b", "c")}
    encoder = load_gemma_text_encoder(tiny_gemma, dtype=torch.float32)
    processor = load_embeddings_processor(tiny_checkpoint, gemma_hidden_size=32)
    expected = encoder.encode_text(["tok a red square", "tok sky", "tok dog runs fast"], processor)
    for i, name in enumerate(("clips/a", "b", "c")):
        for batch_size in (1, 3):
            data = outputs[batch_size][name]
            # Batching is exact (left padding, identical kernels); storage is bf16 as in the official layout.
            assert torch.equal(data["video_prompt_embeds"], expected.video_prompt_embeds[i].to(torch.bfloat16))
            assert torch.equal(data["audio_prompt_embeds"], data["video_prompt_embeds"])
            assert torch.equal(data["prompt_attention_mask"], expected.prompt_attention_mask[i])


def test_decode_latents_accepts_legacy_files(tmp_path, tiny_checkpoint):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(128, 2, 2, 3, generator=generator)
    (tmp_path / "latents" / "sub").mkdir(parents=True)
    torch.save({"latents": latents.to(torch.bfloat16), "num_frames": 2, "height": 2, "width": 3, "fps": 12.0},
               tmp_path / "latents" / "sub" / "new.pt")
    legacy = latents.permute(1, 2, 3, 0).reshape(12, 128)
    torch.save({"latents": legacy.to(torch.bfloat16), "num_frames": 2, "height": 2, "width": 3},
               tmp_path / "latents" / "legacy.pt")
    torch.save({"latents": torch.zeros(3)}, tmp_path / "latents" / "bad.pt")
    config = DecodeLatentsConfig(latents_dir=tmp_path / "latents", output_dir=tmp_path / "decoded",
                                 model_path=tiny_checkpoint, device="cpu", seed=3)
    summary = decode_latents(config)
    assert sorted(summary.processed) == ["legacy.pt", "sub/new.pt"] and summary.skipped[0][0] == "bad.pt"
    new, legacy_video = (media.read_video(tmp_path / "decoded" / p) for p in ("sub/new.mp4", "legacy.mp4"))
    assert (new.num_frames, new.height, new.width, new.fps) == (9, 64, 96, 12.0)
    assert legacy_video.fps == 24.0  # the legacy file has no fps key: the official default
    # Same latents, same seed: the same decoded frames (compared before H.264, whose rate control depends on fps).
    decoder = load_video_vae_decoder(tiny_checkpoint)
    frames = [process.decode_video_file(decoder, tmp_path / "latents" / p, seed=3, tiling=False)[0]
              for p in ("sub/new.pt", "legacy.pt")]
    assert torch.equal(frames[0], frames[1])
    other_seed = process.decode_video_file(decoder, tmp_path / "latents" / "legacy.pt", seed=4, tiling=False)[0]
    assert not torch.equal(frames[0], other_seed), "the LTX-2 decoder noise comes from the seed"


def test_tiled_encoding_runs(tmp_path, tiny_checkpoint):
    write_clip(tmp_path / "a.mp4", num_frames=9, height=64, width=64, audio=False)
    dataset = write_dataset(tmp_path, [{"media_path": "a.mp4"}])
    for tiled in (False, True):
        process_videos(ProcessVideosConfig(dataset_file=dataset, resolution_buckets="64x64x9",
                                           output_dir=tmp_path / f"l{tiled}", model_path=tiny_checkpoint,
                                           device="cpu", vae_tiling=tiled))
    plain, tiled = (torch.load(tmp_path / f"l{t}" / "a.pt", weights_only=True)["latents"] for t in (False, True))
    # A 64 px clip fits in one 512 px tile, so tiling must not change the result.
    torch.testing.assert_close(plain.float(), tiled.float(), atol=0, rtol=0)


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass, read from its source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = after.value.value
    return docs


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_every_flag_is_explained(name, capsys):
    config = TOOLS[name]
    docs = _field_docs(config)
    assert set(docs) == {f.name for f in dataclasses.fields(config)}, "every field needs an attribute docstring"
    with pytest.raises(SystemExit) as info:
        load_tool(name).main(["--help"])
    assert info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for field_name, doc in docs.items():
        assert " ".join(doc.split()[:3]) in help_text, f"{name}: help for {field_name} missing"


def test_process_dataset_with_references_and_decode(tmp_path, tiny_checkpoint, tiny_gemma):
    write_clip(tmp_path / "t.mp4", num_frames=9, height=64, width=96)
    write_clip(tmp_path / "r.mp4", num_frames=12, height=64, width=96, colour=(0, 0, 255))
    write_clip(tmp_path / "t2.mp4", num_frames=9, height=64, width=96)
    dataset = write_dataset(tmp_path, [{"caption": "a", "media_path": "t.mp4", "reference_path": "r.mp4"},
                                       {"caption": "b", "media_path": "t2.mp4", "reference_path": "gone.mp4"}])
    config = process.ProcessDatasetConfig(
        dataset_path=dataset, resolution_buckets="96x64x9", model_path=tiny_checkpoint, text_encoder_path=tiny_gemma,
        reference_column="reference_path", decode=True, device="cpu", skip_audio=True,
    )
    summary = process.process_dataset(config)
    # A missing reference skips its sample before any model runs: no orphan conditions file.
    assert summary.processed == ["t.mp4"]
    assert summary.skipped[0][0] == "t2.mp4" and "gone.mp4: no such file" in summary.skipped[0][1]
    out = tmp_path / ".precomputed"
    assert torch.load(out / "reference_latents" / "t.pt", weights_only=True)["latents"].shape == (128, 2, 2, 3)
    reference = media.read_video(out / "decoded_reference_videos" / "t.mp4")
    assert (reference.num_frames, reference.height, reference.width) == (9, 64, 96)
    assert media.read_video(out / "decoded_videos" / "t.mp4").num_frames == 9
    assert not (out / "audio_latents").exists() and not (out / "decoded_audio").exists()
    assert not (out / "conditions" / "t2.pt").exists() and not (out / "latents" / "t2.pt").exists()


def test_conditions_files_hold_only_their_own_row(tmp_path, tiny_checkpoint, tiny_gemma):
    # In bf16 on the CPU a row of the batch output is a view of the whole batch; the files must not carry it.
    dataset = write_dataset(tmp_path, [{"caption": f"dog runs {i}", "media_path": f"{i}.mp4"} for i in range(3)])
    process_captions(ProcessCaptionsConfig(dataset_file=dataset, output_dir=tmp_path / "c", model_path=tiny_checkpoint,
                                           text_encoder_path=tiny_gemma, batch_size=3, dtype="bfloat16",
                                           device="cpu"))
    data = torch.load(tmp_path / "c" / "1.pt", weights_only=True)
    for key, bytes_per_row in (("video_prompt_embeds", 1024 * 32 * 2), ("prompt_attention_mask", 1024 * 8)):
        assert data[key].untyped_storage().nbytes() == bytes_per_row
