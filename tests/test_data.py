"""ltxf.data: the official precomputed layout (files written by hand with torch.save, independently of ltxf's
writer, and by the writer), pairing and legacy formats, errors, collation, the bucket sampler and resumption."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
import torch

from ltxf import data
from ltxf.latents import audio_latent_length

TEXT_DIM_V, TEXT_DIM_A = 24, 16


def _mask(num_real: int, length: int = 1024) -> torch.Tensor:
    mask = torch.zeros(length, dtype=torch.int64)
    mask[length - num_real :] = 1
    return mask


def _official_sample(
    root: Path,
    rel: str,
    *,
    shape: tuple[int, int, int] = (2, 2, 3),
    fps: float = 24.0,
    audio_steps: int | None = None,
    reference_shape: tuple[int, int, int] | None = None,
    seed: int = 0,
) -> dict[str, dict]:
    """Write one sample exactly as the official preprocessing does (torch.save of plain dicts, §1.20)."""
    gen = torch.Generator().manual_seed(seed)
    files = {
        "latents": {
            "latents": torch.randn(128, *shape, generator=gen).to(torch.bfloat16),
            "num_frames": shape[0],
            "height": shape[1],
            "width": shape[2],
            "fps": fps,
        },
        "conditions": {
            "video_prompt_embeds": torch.randn(1024, TEXT_DIM_V, generator=gen).to(torch.bfloat16),
            "audio_prompt_embeds": torch.randn(1024, TEXT_DIM_A, generator=gen).to(torch.bfloat16),
            "prompt_attention_mask": _mask(7 + seed),
        },
    }
    if audio_steps is not None:
        files["audio_latents"] = {
            "latents": torch.randn(8, audio_steps, 16, generator=gen),
            "num_time_steps": audio_steps,
            "frequency_bins": 16,
            "duration": audio_steps / 25,
        }
    if reference_shape is not None:
        files["reference_latents"] = {
            "latents": torch.randn(128, *reference_shape, generator=gen).to(torch.bfloat16),
            "num_frames": reference_shape[0],
            "height": reference_shape[1],
            "width": reference_shape[2],
            "fps": fps,
        }
    for folder, content in files.items():
        path = root / folder / f"{rel}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(content, path)
    return files


def test_reads_hand_written_official_files(tmp_path):
    root = tmp_path / "dataset" / ".precomputed"
    files = _official_sample(root, "clips/a", audio_steps=13, reference_shape=(2, 1, 2))
    _official_sample(root, "clips/b", audio_steps=13, reference_shape=(2, 1, 2), seed=1)
    # The dataset dir is given: the reader descends into .precomputed, as the official trainer does.
    dataset = data.PrecomputedDataset(tmp_path / "dataset", sources=data.ROLES)
    assert len(dataset) == 2
    sample = dataset[0]
    assert set(sample) == {
        "sample_id",
        "video_latents",
        "fps",
        "video_prompt_embeds",
        "audio_prompt_embeds",
        "prompt_attention_mask",
        "audio_latents",
        "reference_latents",
        "reference_fps",
    }
    assert sample["sample_id"] == "clips/a"
    assert sample["video_latents"].dtype == torch.bfloat16
    assert torch.equal(sample["video_latents"], files["latents"]["latents"])
    assert sample["fps"].dtype == torch.float32 and float(sample["fps"]) == 24.0
    assert torch.equal(sample["video_prompt_embeds"], files["conditions"]["video_prompt_embeds"])
    assert torch.equal(sample["audio_prompt_embeds"], files["conditions"]["audio_prompt_embeds"])
    assert sample["prompt_attention_mask"].dtype == torch.bool
    assert torch.equal(sample["prompt_attention_mask"], files["conditions"]["prompt_attention_mask"] == 1)
    assert sample["audio_latents"].dtype == torch.float32
    assert torch.equal(sample["audio_latents"], files["audio_latents"]["latents"])
    assert torch.equal(sample["reference_latents"], files["reference_latents"]["latents"])
    assert dataset.bucket_keys() == [((128, 2, 2, 3), 13, (128, 2, 1, 2))] * 2


def test_writer_writes_the_official_format(tmp_path):
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(128, 3, 2, 2, generator=gen)
    video_embeds = torch.randn(1024, TEXT_DIM_V, generator=gen)
    audio_embeds = torch.randn(1024, TEXT_DIM_A, generator=gen)
    audio = torch.randn(8, 11, 16, generator=gen, dtype=torch.float64)
    reference = torch.randn(128, 3, 1, 1, generator=gen)
    written = data.write_precomputed_sample(
        tmp_path,
        "sub/clip.mp4",
        latents=latents,
        fps=29.97,
        video_prompt_embeds=video_embeds,
        audio_prompt_embeds=audio_embeds,
        prompt_attention_mask=_mask(5).bool(),
        audio_latents=audio,
        audio_duration=0.42,
        reference_latents=reference,
    )
    assert {role: p.relative_to(tmp_path).as_posix() for role, p in written.items()} == {
        "latents": "latents/sub/clip.pt",
        "conditions": "conditions/sub/clip.pt",
        "audio_latents": "audio_latents/sub/clip.pt",
        "reference_latents": "reference_latents/sub/clip.pt",
    }
    assert sorted(p.name for p in (tmp_path / "latents" / "sub").iterdir()) == ["clip.pt"]  # no temp files

    raw = {role: torch.load(p, weights_only=True) for role, p in written.items()}
    assert set(raw["latents"]) == {"latents", "num_frames", "height", "width", "fps"}
    assert raw["latents"]["latents"].dtype == torch.bfloat16
    assert torch.equal(raw["latents"]["latents"], latents.to(torch.bfloat16))
    assert (raw["latents"]["num_frames"], raw["latents"]["height"], raw["latents"]["width"]) == (3, 2, 2)
    assert all(type(raw["latents"][k]) is int for k in ("num_frames", "height", "width"))
    assert type(raw["latents"]["fps"]) is float and raw["latents"]["fps"] == 29.97
    assert set(raw["conditions"]) == {"video_prompt_embeds", "audio_prompt_embeds", "prompt_attention_mask"}
    assert raw["conditions"]["video_prompt_embeds"].dtype == torch.bfloat16
    assert raw["conditions"]["audio_prompt_embeds"].shape == (1024, TEXT_DIM_A)
    assert raw["conditions"]["prompt_attention_mask"].dtype == torch.int64
    assert torch.equal(raw["conditions"]["prompt_attention_mask"], _mask(5))
    assert set(raw["audio_latents"]) == {"latents", "num_time_steps", "frequency_bins", "duration"}
    assert raw["audio_latents"]["latents"].dtype == torch.float32
    assert (raw["audio_latents"]["num_time_steps"], raw["audio_latents"]["frequency_bins"]) == (11, 16)
    assert raw["audio_latents"]["duration"] == 0.42
    assert raw["reference_latents"]["latents"].shape == (128, 3, 1, 1)
    assert raw["reference_latents"]["fps"] == 29.97

    sample = data.PrecomputedDataset(tmp_path, sources=data.ROLES)[0]
    assert sample["sample_id"] == "sub/clip"
    assert float(sample["fps"]) == pytest.approx(29.97)
    assert torch.equal(sample["audio_latents"], audio.float())


def test_writer_and_hand_written_files_read_the_same(tmp_path):
    files = _official_sample(tmp_path / "hand", "x", audio_steps=9)
    data.write_precomputed_sample(
        tmp_path / "ours",
        "x.mov",
        latents=files["latents"]["latents"],
        fps=files["latents"]["fps"],
        video_prompt_embeds=files["conditions"]["video_prompt_embeds"],
        audio_prompt_embeds=files["conditions"]["audio_prompt_embeds"],
        prompt_attention_mask=files["conditions"]["prompt_attention_mask"],
        audio_latents=files["audio_latents"]["latents"],
        audio_duration=files["audio_latents"]["duration"],
    )
    sources = ("latents", "conditions", "audio_latents")
    hand = data.PrecomputedDataset(tmp_path / "hand", sources=sources)[0]
    ours = data.PrecomputedDataset(tmp_path / "ours", sources=sources)[0]
    assert set(hand) == set(ours)
    for key, value in hand.items():
        assert (
            (torch.equal(value, ours[key]) and value.dtype == ours[key].dtype)
            if torch.is_tensor(value)
            else (value == ours[key])
        ), key


def test_missing_pair_is_skipped_and_counted(tmp_path, caplog):
    for rel in ("a", "b", "c"):
        _official_sample(tmp_path, rel)
    (tmp_path / "conditions" / "b.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="ltxf.data"):
        dataset = data.PrecomputedDataset(tmp_path)
    assert [s.sample_id for s in dataset.samples] == ["a", "c"]
    assert dataset.missing == ["b.pt"]
    assert str(tmp_path / "conditions" / "b.pt") in caplog.text
    with pytest.raises(ValueError, match=r"conditions/b\.pt"):
        data.PrecomputedDataset(tmp_path, on_missing="error")


def test_optional_audio_source_splits_buckets(tmp_path):
    _official_sample(tmp_path, "with_audio", audio_steps=10)
    _official_sample(tmp_path, "without_audio")
    # Required audio: the sample without audio is skipped.
    dataset = data.PrecomputedDataset(tmp_path, sources=("latents", "conditions", "audio_latents"))
    assert len(dataset) == 1 and dataset.missing == ["without_audio.pt"]
    # Optional audio: both samples, in different buckets.
    dataset = data.PrecomputedDataset(
        tmp_path, sources=("latents", "conditions", "audio_latents"), optional_sources=("audio_latents",)
    )
    assert len(dataset) == 2 and dataset.missing == []
    assert "audio_latents" in dataset[0] and "audio_latents" not in dataset[1]
    assert dataset.bucket_keys() == [((128, 2, 2, 3), 10, None), ((128, 2, 2, 3), None, None)]


def test_custom_directory_names(tmp_path):
    _official_sample(tmp_path, "a", reference_shape=(2, 1, 1))
    (tmp_path / "reference_latents").rename(tmp_path / "ref_half")
    dataset = data.PrecomputedDataset(
        tmp_path, sources={"latents": "latents", "conditions": "conditions", "reference_latents": "ref_half"}
    )
    assert dataset[0]["reference_latents"].shape == (128, 2, 1, 1)
    with pytest.raises(ValueError, match="unknown source roles"):
        data.PrecomputedDataset(tmp_path, sources=("latents", "captions"))
    with pytest.raises(ValueError, match="reference_latents.*does not exist"):
        data.PrecomputedDataset(tmp_path, sources=data.ROLES[:2] + ("reference_latents",))


def test_legacy_names_patchified_latents_and_prompt_embeds(tmp_path):
    gen = torch.Generator().manual_seed(0)
    latents_cfhw = torch.randn(128, 2, 3, 4, generator=gen).to(torch.bfloat16)
    # The legacy layout is frame-major tokens: token (f, h, w) at row (f*H + h)*W + w, channels last.
    patchified = latents_cfhw.permute(1, 2, 3, 0).reshape(2 * 3 * 4, 128)
    embeds = torch.randn(1024, TEXT_DIM_V, generator=gen).to(torch.bfloat16)
    (tmp_path / "latents").mkdir()
    (tmp_path / "conditions").mkdir()
    torch.save(
        {"latents": patchified, "num_frames": 2, "height": 3, "width": 4, "fps": 25.0},
        tmp_path / "latents" / "latent_007.pt",
    )
    torch.save(
        {"prompt_embeds": embeds, "prompt_attention_mask": _mask(3)}, tmp_path / "conditions" / "condition_007.pt"
    )
    dataset = data.PrecomputedDataset(tmp_path)
    sample = dataset[0]
    assert sample["sample_id"] == "latent_007"
    assert torch.equal(sample["video_latents"], latents_cfhw)
    assert torch.equal(sample["video_prompt_embeds"], embeds)
    assert torch.equal(sample["audio_prompt_embeds"], embeds)
    assert dataset.bucket_keys() == [((128, 2, 3, 4), None, None)]


def test_trimmed_conditions_are_left_padded(tmp_path):
    files = _official_sample(tmp_path, "a")
    conditions = files["conditions"]
    num_keep = 20
    torch.save({key: value[-num_keep:] for key, value in conditions.items()}, tmp_path / "conditions" / "a.pt")
    sample = data.PrecomputedDataset(tmp_path)[0]
    assert sample["video_prompt_embeds"].shape == (1024, TEXT_DIM_V)
    assert torch.equal(sample["video_prompt_embeds"][-num_keep:], conditions["video_prompt_embeds"][-num_keep:])
    assert not sample["video_prompt_embeds"][:-num_keep].any()
    assert torch.equal(sample["prompt_attention_mask"], conditions["prompt_attention_mask"] == 1)


def test_corrupt_file_names_the_file(tmp_path, caplog):
    for rel in ("a", "b"):
        _official_sample(tmp_path, rel)
    bad = tmp_path / "conditions" / "b.pt"
    bad.write_bytes(b"definitely not a torch file" * 10)
    with pytest.raises(ValueError, match="cannot be read as a torch .pt file") as excinfo:
        data.PrecomputedDataset(tmp_path)
    assert str(bad) in str(excinfo.value)
    with caplog.at_level(logging.WARNING, logger="ltxf.data"):
        dataset = data.PrecomputedDataset(tmp_path, skip_bad_samples=True)
    assert len(dataset) == 1 and [sample_id for sample_id, _ in dataset.bad_samples] == ["b"]
    assert str(bad) in caplog.text

    # A file that breaks after the scan (truncated by another process) fails at load time, naming the file.
    latents = tmp_path / "latents" / "a.pt"
    latents.write_bytes(latents.read_bytes()[:200])
    with pytest.raises(ValueError, match="cannot be read") as excinfo:
        dataset[0]
    assert str(latents) in str(excinfo.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"latents": torch.zeros(128, 2, 3)}, r"must be \[C, F, H, W\]"),
        ({"latents": torch.zeros(64, 1, 2, 2)}, "64 channels, expected 128"),
        ({"latents": torch.zeros(128, 1, 2, 2), "num_frames": 3}, "'num_frames' = 3 disagrees"),
        ({"latents": torch.zeros(12, 128)}, "legacy 2-D latents"),
        ({"lat": torch.zeros(128, 1, 2, 2)}, "missing key 'latents'"),
        ({"latents": torch.zeros(128, 1, 2, 2), "fps": -1.0}, "'fps' must be positive"),
        ([torch.zeros(3)], "expected a dict"),
    ],
)
def test_bad_latent_files_are_rejected(tmp_path, content, message):
    _official_sample(tmp_path, "a")
    path = tmp_path / "latents" / "a.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=message) as excinfo:
        data.PrecomputedDataset(tmp_path)
    assert str(path) in str(excinfo.value)


def test_bad_audio_and_condition_files_are_rejected(tmp_path):
    _official_sample(tmp_path, "a", audio_steps=5)
    torch.save({"latents": torch.zeros(8, 5, 15)}, tmp_path / "audio_latents" / "a.pt")
    with pytest.raises(ValueError, match=r"audio_latents/a\.pt.*\[8, T, 16\]"):
        data.PrecomputedDataset(tmp_path, sources=("latents", "conditions", "audio_latents"))
    torch.save({"prompt_attention_mask": _mask(3)}, tmp_path / "conditions" / "a.pt")
    with pytest.raises(ValueError, match=r"conditions/a\.pt.*video_prompt_embeds"):
        data.PrecomputedDataset(tmp_path)
    torch.save(
        {"video_prompt_embeds": torch.zeros(1000, 4), "prompt_attention_mask": _mask(3)},
        tmp_path / "conditions" / "a.pt",
    )
    with pytest.raises(ValueError, match=r"S = 1024"):
        data.PrecomputedDataset(tmp_path)


def test_missing_fps_uses_official_default(tmp_path, caplog):
    files = _official_sample(tmp_path, "a")
    del files["latents"]["fps"]
    torch.save(files["latents"], tmp_path / "latents" / "a.pt")
    with caplog.at_level(logging.WARNING, logger="ltxf.data"):
        dataset = data.PrecomputedDataset(tmp_path)
    assert float(dataset[0]["fps"]) == data.DEFAULT_FPS == 24.0
    assert "no 'fps' key" in caplog.text


def test_empty_or_missing_root(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        data.PrecomputedDataset(tmp_path / "nothing")
    (tmp_path / "latents").mkdir()
    (tmp_path / "conditions").mkdir()
    with pytest.raises(ValueError, match=r"no \.pt files"):
        data.PrecomputedDataset(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# collate


def _sample(sample_id: str, shape=(128, 2, 2, 2), audio_steps: int | None = None) -> dict:
    sample = {
        "sample_id": sample_id,
        "video_latents": torch.randn(shape),
        "fps": torch.tensor(24.0),
        "prompt_attention_mask": torch.ones(4, dtype=torch.bool),
    }
    if audio_steps is not None:
        sample["audio_latents"] = torch.randn(8, audio_steps, 16)
    return sample


def test_collate_stacks_one_bucket():
    samples = [_sample("a", audio_steps=10), _sample("b", audio_steps=10)]
    batch = data.collate(samples)
    assert batch["sample_id"] == ["a", "b"]
    assert batch["video_latents"].shape == (2, 128, 2, 2, 2)
    assert torch.equal(batch["video_latents"][1], samples[1]["video_latents"])
    assert batch["fps"].shape == (2,)
    assert batch["audio_latents"].shape == (2, 8, 10, 16)


def test_collate_crops_audio_by_one_step_and_rejects_more():
    samples = [_sample("a", audio_steps=11), _sample("b", audio_steps=10)]
    batch = data.collate(samples)
    assert batch["audio_latents"].shape == (2, 8, 10, 16)
    assert torch.equal(batch["audio_latents"][0], samples[0]["audio_latents"][:, :10])
    with pytest.raises(ValueError, match="differ by more than max_audio_crop"):
        data.collate([_sample("a", audio_steps=12), _sample("b", audio_steps=10)])
    with pytest.raises(ValueError, match=r"video_latents.*'b': \(128, 2, 4, 2\)"):
        data.collate([_sample("a"), _sample("b", shape=(128, 2, 4, 2))])
    with pytest.raises(ValueError, match="different keys"):
        data.collate([_sample("a", audio_steps=10), _sample("b")])


def test_bucket_keys_merge_near_audio_lengths():
    shape = (128, 2, 2, 2)
    shapes = [(shape, 100, None), (shape, 101, None), (shape, 102, None), (shape, 110, None), (shape, None, None)]
    keys = data.bucket_keys_from_shapes(shapes, audio_length_tolerance=1)
    assert [k[1] for k in keys] == [100, 100, 102, 110, None]
    # Other video shapes are grouped on their own.
    keys = data.bucket_keys_from_shapes([(shape, 101, None), ((128, 1, 2, 2), 100, None)])
    assert [k[1] for k in keys] == [101, 100]


# ---------------------------------------------------------------------------------------------------------------
# BucketBatchSampler

# 10 samples of bucket A, 7 of B, 2 of C, interleaved as a real sorted dataset would be.
KEYS = ["A"] * 10 + ["B"] * 7 + ["C"] * 2
KEYS = [KEYS[i] for i in torch.randperm(len(KEYS), generator=torch.Generator().manual_seed(1)).tolist()]


def _take(iterator, n: int) -> list[list[int]]:
    return [next(iterator) for _ in range(n)]


def test_sampler_batches_are_single_bucket_and_cover_each_sample_once(caplog):
    with caplog.at_level(logging.WARNING, logger="ltxf.data"):
        sampler = data.BucketBatchSampler(KEYS, batch_size=3, seed=0)
    assert "never used" in caplog.text  # bucket C (2 samples) cannot fill a batch of 3
    assert len(sampler) == 10 // 3 + 7 // 3
    for epoch in range(3):
        batches = sampler.epoch_batches(epoch)
        assert len(batches) == len(sampler)
        assert all(len(b) == 3 and len({KEYS[i] for i in b}) == 1 for b in batches)
        seen = [i for b in batches for i in b]
        assert len(seen) == len(set(seen)) == 15  # 19 samples minus remainders 1 (A) + 1 (B) + 2 (C)
        per_bucket = Counter(KEYS[i] for i in seen)
        assert per_bucket == {"A": 9, "B": 6}


def test_sampler_is_deterministic_and_reshuffles_each_epoch():
    first = data.BucketBatchSampler(KEYS, batch_size=2, seed=7)
    second = data.BucketBatchSampler(KEYS, batch_size=2, seed=7)
    other_seed = data.BucketBatchSampler(KEYS, batch_size=2, seed=8)
    assert first.epoch_batches(0) == second.epoch_batches(0)
    assert first.epoch_batches(5) == second.epoch_batches(5)
    assert first.epoch_batches(0) != first.epoch_batches(1)
    assert first.epoch_batches(0) != other_seed.epoch_batches(0)
    ordered = data.BucketBatchSampler(KEYS, batch_size=2, shuffle=False)
    assert ordered.epoch_batches(0) == ordered.epoch_batches(1)


def test_sampler_shards_across_ranks():
    world_size = 2
    samplers = [data.BucketBatchSampler(KEYS, batch_size=2, seed=3, rank=r, world_size=world_size) for r in range(2)]
    assert len(samplers[0]) == len(samplers[1]) == 10 // 4 + 7 // 4
    for epoch in range(2):
        per_rank = [s.epoch_batches(epoch) for s in samplers]
        indices = [{i for b in batches for i in b} for batches in per_rank]
        assert not indices[0] & indices[1]
        # At every step both ranks hold the same bucket, so the ranks stay in lockstep.
        for b0, b1 in zip(*per_rank, strict=True):
            assert {KEYS[i] for i in b0} == {KEYS[i] for i in b1} and len({KEYS[i] for i in b0}) == 1


def test_sampler_resume_continues_with_the_next_batch():
    sampler = data.BucketBatchSampler(KEYS, batch_size=3, seed=11)
    iterator = iter(sampler)
    consumed = _take(iterator, 7)  # crosses the epoch boundary (5 batches per epoch)
    state = sampler.state_dict()
    assert state == {"epoch": 1, "batch_index": 2, "global_batch_size": 3}
    expected = _take(iterator, 9)
    resumed = data.BucketBatchSampler(KEYS, batch_size=3, seed=11)
    resumed.load_state_dict(state)
    assert _take(iter(resumed), 9) == expected
    # The whole stream is the concatenation of the epochs' plans.
    plan = [b for epoch in range(4) for b in sampler.epoch_batches(epoch)]
    assert consumed + expected == plan[:16]


def test_sampler_state_is_checked():
    sampler = data.BucketBatchSampler(KEYS, batch_size=3)
    iterator = iter(sampler)
    next(iterator)
    sampler.load_state_dict({"epoch": 0, "batch_index": 0})
    with pytest.raises(RuntimeError, match="start a new iterator"):
        next(iterator)
    with pytest.raises(ValueError, match="lacks"):
        sampler.load_state_dict({"epoch": 0})
    # A global batch of 6 (one consumed) resumes at global batch 2 of 3 samples: the same samples into the epoch.
    sampler.load_state_dict({"epoch": 3, "batch_index": 1, "global_batch_size": 6})
    assert sampler.state_dict() == {"epoch": 3, "batch_index": 2, "global_batch_size": 3}
    # A state from before global positions: 2 ranks of batch 3.
    sampler.load_state_dict({"epoch": 3, "batch_index": 1, "world_size": 2})
    assert sampler.state_dict() == {"epoch": 3, "batch_index": 2, "global_batch_size": 3}
    with pytest.raises(ValueError, match="global batch size of 0"):
        sampler.load_state_dict({"epoch": 0, "batch_index": 0, "global_batch_size": 0})


def test_sampler_order_does_not_depend_on_the_number_of_processes():
    """1 process with batch 4 and 2 (or 4) processes with batch 2 (or 1) see the same global batches in the same
    order; a position saved at one world size continues exactly at another with the same global batch."""
    one = data.BucketBatchSampler(KEYS, batch_size=4, seed=7)
    for world_size in (2, 4):
        ranks = [data.BucketBatchSampler(KEYS, batch_size=4 // world_size, seed=7, rank=r, world_size=world_size)
                 for r in range(world_size)]
        for epoch in range(3):
            assert all(s.global_batches(epoch) == one.global_batches(epoch) for s in ranks)
            joined = [sum(slices, []) for slices in zip(*(s.epoch_batches(epoch) for s in ranks), strict=True)]
            assert joined == one.epoch_batches(epoch)

    iterator = iter(one)
    _take(iterator, 3)  # 3 batches per epoch: the next is epoch 1, batch 0
    _take(iterator, 1)
    state = one.state_dict()
    expected = _take(iterator, 5)
    ranks = [data.BucketBatchSampler(KEYS, batch_size=2, seed=7, rank=r, world_size=2) for r in range(2)]
    for sampler in ranks:
        sampler.load_state_dict(state)
    resumed = [sum(pair, []) for pair in zip(*(_take(iter(s), 5) for s in ranks), strict=True)]
    assert resumed == expected


def test_sampler_errors_when_no_batch_fits():
    with pytest.raises(ValueError, match="cannot form a single batch.*2 \\* 2 = 4"):
        data.BucketBatchSampler(["x"] * 3, batch_size=2, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        data.BucketBatchSampler(["x"] * 3, batch_size=1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        data.BucketBatchSampler(["x"] * 3, batch_size=0)


# ---------------------------------------------------------------------------------------------------------------
# DummyDataset and the loader


def _tiny_dummy(**overrides) -> data.DummyDataset:
    kwargs = dict(
        num_frames=9,
        height=64,
        width=32,
        fps=25.0,
        text_length=32,
        num_text_tokens=5,
        video_embed_dim=TEXT_DIM_V,
        audio_embed_dim=TEXT_DIM_A,
        seed=0,
    )
    return data.DummyDataset(6, **(kwargs | overrides))


def test_dummy_dataset_matches_a_real_sample(tmp_path):
    dummy = _tiny_dummy(width=64, with_reference=True, reference_downscale_factor=2)
    fake = dummy[0]
    data.write_precomputed_sample(
        tmp_path,
        "clip.mp4",
        latents=torch.zeros(128, 2, 2, 2),
        fps=25.0,
        video_prompt_embeds=torch.zeros(32, TEXT_DIM_V),
        audio_prompt_embeds=torch.zeros(32, TEXT_DIM_A),
        prompt_attention_mask=_mask(5, 32),
        audio_latents=torch.zeros(8, audio_latent_length(9, 25.0), 16),
        reference_latents=torch.zeros(128, 2, 1, 1),
    )
    real = data.PrecomputedDataset(tmp_path, sources=data.ROLES, text_length=32)[0]
    assert set(fake) == set(real)
    for key, value in real.items():
        if torch.is_tensor(value):
            assert (fake[key].shape, fake[key].dtype) == (value.shape, value.dtype), key
    assert torch.equal(fake["prompt_attention_mask"], real["prompt_attention_mask"])
    assert dummy.bucket_keys() == [((128, 2, 2, 2), audio_latent_length(9, 25.0), (128, 2, 1, 1))] * 6


def test_dummy_dataset_is_deterministic():
    a, b = _tiny_dummy(), _tiny_dummy()
    assert torch.equal(a[3]["video_latents"], b[3]["video_latents"])
    assert torch.equal(a[3]["audio_latents"], b[3]["audio_latents"])
    assert not torch.equal(a[3]["video_latents"], a[4]["video_latents"])
    assert not torch.equal(a[3]["video_latents"], _tiny_dummy(seed=1)[3]["video_latents"])
    assert "audio_latents" not in _tiny_dummy(with_audio=False)[0]
    with pytest.raises(ValueError, match="8\\*k \\+ 1"):
        _tiny_dummy(num_frames=10)
    with pytest.raises(ValueError, match="multiple of 32"):
        _tiny_dummy(height=48)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumable_loader_counts_consumed_batches(num_workers):
    dataset = _tiny_dummy()
    keys = dataset.bucket_keys()
    loader = data.ResumableLoader(dataset, data.BucketBatchSampler(keys, batch_size=2, seed=5), num_workers=num_workers)
    iterator = iter(loader)
    got = [next(iterator)["sample_id"] for _ in range(4)]  # 3 batches per epoch: crosses into epoch 1
    # Workers have prefetched further, but the position counts what the loop received.
    assert loader.state_dict() == {"epoch": 1, "batch_index": 1, "global_batch_size": 2}
    expected = [next(iterator)["sample_id"] for _ in range(3)]
    del iterator

    resumed = data.ResumableLoader(dataset, data.BucketBatchSampler(keys, batch_size=2, seed=5), num_workers=0)
    resumed.load_state_dict({"epoch": 1, "batch_index": 1, "global_batch_size": 2})
    resumed_iter = iter(resumed)
    assert [next(resumed_iter)["sample_id"] for _ in range(3)] == expected
    plan = data.BucketBatchSampler(keys, batch_size=2, seed=5)
    flat = [[f"dummy_{i:06d}" for i in b] for e in range(3) for b in plan.epoch_batches(e)]
    assert got + expected == flat[:7]


def test_flexible_roles_audio_only_masks_and_reference_audio(tmp_path):
    """Audio-only datasets (no latents/) read through audio_latents/; masks must cover their latents' grid."""
    root = tmp_path / "data"
    for name in ("a", "b"):
        data.save_pt({"latents": torch.randn(8, 5, 16), "num_time_steps": 5, "frequency_bins": 16, "duration": 0.2},
                     root / "audio_latents" / f"{name}.pt")
        data.save_pt({"latents": torch.randn(8, 6, 16), "num_time_steps": 6, "frequency_bins": 16, "duration": 0.24},
                     root / "reference_audio_latents" / f"{name}.pt")
        data.save_pt({"mask": torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])}, root / "audio_masks" / f"{name}.pt")
        data.save_pt({"video_prompt_embeds": torch.randn(4, 8), "audio_prompt_embeds": torch.randn(4, 8),
                      "prompt_attention_mask": torch.ones(4, dtype=torch.int64)}, root / "conditions" / f"{name}.pt")
    sources = {"audio_latents": "audio_latents", "conditions": "conditions",
               "reference_audio_latents": "reference_audio_latents", "audio_masks": "audio_masks"}
    dataset = data.PrecomputedDataset(root, sources=sources, text_length=None)
    batch = data.collate([dataset[0], dataset[1]])
    assert "video_latents" not in batch and "fps" not in batch
    assert batch["audio_mask"].shape == (2, 5) and batch["reference_audio_latents"].shape == (2, 8, 6, 16)
    data.save_pt({"mask": torch.ones(4)}, root / "audio_masks" / "b.pt")
    with pytest.raises(ValueError, match=r"b\.pt: mask shape \[4\] does not match its latents' grid \[5\]"):
        data.PrecomputedDataset(root, sources=sources, text_length=None)
