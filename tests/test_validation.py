"""Validation sampling: config checks, the schedule, prompt dealing across ranks, a Validator run that writes
samples and TensorBoard summaries (read back with TensorBoard's EventAccumulator), and a real 2-rank run (gloo,
CPU) with an FSDP2-sharded transformer and more prompts than ranks, whose samples equal the 1-process run's.

Equality of samples is checked on the clips handed to ``save_clip`` (recorded by wrapping it; the files are
still written), not on the re-decoded MP4s: libx264 with its default threading does not always produce the same
bitstream for the same frames on a loaded machine, so decoded files can differ where the samples do not.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ltxf.validation as validation_module
from ltxf.demo import DEMO_AUDIO_SAMPLE_RATE, build_demo_checkpoint, demo_transformer_config
from ltxf.media import probe_video, read_audio, read_video, write_image
from ltxf.models.gemma import PromptFeatures
from ltxf.models.text import load_embeddings_processor
from ltxf.models.transformer import load_transformer
from ltxf.monitor import Monitor
from ltxf.validation import (
    ValidationConfig,
    Validator,
    assign_prompts,
    load_prompt_features,
    offload_to_host_,
    save_prompt_features,
)
from tests.test_generate import build_tiny_gemma, test_pattern_frames

PROMPTS = ("a red cat runs on the green grass", "a dog jumps over the fence", "blue sky")
TEXT_TOKENS = 16


def random_features(seed: int, num_real: int) -> PromptFeatures:
    """Features at the demo connectors' widths, left-padded like Gemma's."""
    widths = demo_transformer_config()
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(TEXT_TOKENS, dtype=torch.int64)
    mask[-num_real:] = 1
    return PromptFeatures(torch.randn(TEXT_TOKENS, widths.inner_dim, generator=gen),
                          torch.randn(TEXT_TOKENS, widths.audio_inner_dim, generator=gen), mask)


def features_file(path: Path, num_prompts: int) -> Path:
    return save_prompt_features(path, [random_features(i, 4 + i) for i in range(num_prompts)],
                                negative=random_features(99, 3), texts=PROMPTS[:num_prompts])


def record_saved_clips(clips: dict[str, tuple[torch.Tensor, torch.Tensor | None]]):
    """A ``save_clip`` that also records each clip's frames and audio under the file name."""
    real_save_clip = validation_module.save_clip

    def save_clip(path, clip):
        clips[Path(path).name] = (clip.frames.clone(), None if clip.audio is None else clip.audio.clone())
        return real_save_clip(path, clip)

    return save_clip


def assert_same_clip(a: tuple[torch.Tensor, torch.Tensor | None], b: tuple[torch.Tensor, torch.Tensor | None],
                     name: str) -> None:
    assert torch.equal(a[0], b[0]), f"{name}: frames differ"
    assert (a[1] is None) == (b[1] is None) and (a[1] is None or torch.equal(a[1], b[1])), f"{name}: audio differs"


def validation_config(features: Path, num_prompts: int, **overrides) -> ValidationConfig:
    kwargs = dict(prompts=PROMPTS[:num_prompts], prompt_features_path=features, video_dims=(64, 64, 9),
                  frame_rate=24.0, inference_steps=2, interval=5, guidance_scale=3.0, stg_blocks=(1,))
    kwargs.update(overrides)
    return ValidationConfig(**kwargs)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("validation")
    return {"root": root, "checkpoint": build_demo_checkpoint(root / "tiny.safetensors", seed=2),
            "features": features_file(root / "features.pt", len(PROMPTS)),
            "features2": features_file(root / "features2.pt", 2)}


# ------------------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(images=(Path("a.png"),)), "validation.images has 1 entries"),
        (dict(reference_videos=(Path("a.mp4"), Path("b.mp4"), Path("c.mp4"))), "validation.reference_videos"),
        (dict(video_dims=(100, 64, 9)), "width must be a positive multiple of 32"),
        (dict(video_dims=(64, 64, 10)), "frames must be 8k"),
        (dict(video_dims=(64, 64)), "video_dims must be"),
        (dict(reference_downscale_factor=3), "validation.reference_downscale_factor=3"),
        (dict(reference_downscale_factor=0), "validation.reference_downscale_factor"),
        (dict(frame_rate=0.0), "validation.frame_rate"),
        (dict(inference_steps=0), "validation.inference_steps"),
        (dict(interval=0), "validation.interval"),
        (dict(guidance_scale=0.5), "validation.guidance_scale"),
        (dict(stg_scale=-1.0), "validation.stg_scale"),
        (dict(stg_mode="stg_x"), "validation.stg_mode"),
        (dict(stg_blocks=(-1,)), "validation.stg_blocks"),
        (dict(guidance_rescale=1.5), "validation.guidance_rescale"),
        (dict(include_reference_in_output=True), "validation.include_reference_in_output"),
    ],
)
def test_config_errors_name_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        validation_config(Path("features.pt"), 2, **overrides)


def test_config_defaults_are_valid_and_schedule():
    default = ValidationConfig()
    assert not default.enabled and not default.should_run(0)
    assert default.negative_prompt == "worst quality, inconsistent motion, blurry, jittery, distorted"
    width, height, frames = default.video_dims
    assert width % 32 == 0 and height % 32 == 0 and frames % 8 == 1
    config = validation_config(Path("f.pt"), 2)
    assert [s for s in range(16) if config.should_run(s)] == [0, 5, 10, 15]
    skipped = dataclasses.replace(config, skip_initial_validation=True)
    assert [s for s in range(16) if skipped.should_run(s)] == [5, 10, 15]
    assert not dataclasses.replace(config, interval=None).should_run(0)
    assert config.guidance.cfg_scale == 3.0 and config.guidance.stg_blocks == (1,)
    # lists from a CLI or JSON become tuples; paths become Paths
    listed = validation_config(Path("f.pt"), 2, images=["a.png", "b.png"], stg_blocks=[1, 0])
    assert listed.images == (Path("a.png"), Path("b.png")) and listed.stg_blocks == (1, 0)


def test_check_paths_names_the_missing_file(tmp_path):
    config = validation_config(tmp_path / "nope.pt", 2)
    with pytest.raises(ValueError, match="validation.prompt_features_path: file not found"):
        config.check_paths()
    with pytest.raises(ValueError, match=r"validation.images\[0\]: file not found"):
        validation_config(tmp_path / "nope.pt", 1, images=[tmp_path / "missing.png"]).check_paths()


def test_assign_prompts_round_robin_with_padding():
    assert assign_prompts(3, 0, 2) == [0, 2]
    assert assign_prompts(3, 1, 2) == [1, None]
    assert assign_prompts(2, 3, 4) == [None]
    assert assign_prompts(5, 0, 1) == [0, 1, 2, 3, 4]
    for n in range(1, 7):
        for world in range(1, 4):
            parts = [assign_prompts(n, r, world) for r in range(world)]
            assert len({len(p) for p in parts}) == 1
            assert sorted(i for p in parts for i in p if i is not None) == list(range(n))
    with pytest.raises(ValueError):
        assign_prompts(3, 2, 2)


def test_prompt_features_round_trip_and_bad_file(tmp_path):
    path = features_file(tmp_path / "f.pt", 2)
    features, negative = load_prompt_features(path)
    assert len(features) == 2 and features[0].video_prompt_embeds.shape == (1, TEXT_TOKENS, 64)
    assert torch.equal(features[1].prompt_attention_mask[0], random_features(1, 5).prompt_attention_mask)
    assert torch.equal(negative.audio_prompt_embeds[0], random_features(99, 3).audio_prompt_embeds)
    torch.save({"video_prompt_embeds": torch.zeros(3, 4)}, tmp_path / "conditions.pt")
    with pytest.raises(ValueError, match="not a prompt-features file"):
        load_prompt_features(tmp_path / "conditions.pt")


def test_offload_keeps_tensor_objects_and_leaves_host_tensors_alone():
    """On this CPU machine every leaf is a host tensor: offloading must not copy or move any of them (the
    accelerator path swaps storage in place, which keeps the objects too)."""
    tree = {"mu": {"a": torch.ones(2)}, "count": torch.tensor(3), "nested": (torch.zeros(1), None)}
    ids = [id(tree["mu"]["a"]), id(tree["count"]), id(tree["nested"][0])]
    pointers = [tree["mu"]["a"].data_ptr(), tree["count"].data_ptr()]
    restore = offload_to_host_(tree)
    restore()
    assert [id(tree["mu"]["a"]), id(tree["count"]), id(tree["nested"][0])] == ids
    assert [tree["mu"]["a"].data_ptr(), tree["count"].data_ptr()] == pointers


# ------------------------------------------------------------------------------------------------------------
# Runs


def _accumulator(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "audio": 0})
    acc.Reload()
    return acc


def test_validator_writes_samples_and_tensorboard(assets, tmp_path, monkeypatch):
    clips: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    monkeypatch.setattr(validation_module, "save_clip", record_saved_clips(clips))
    checkpoint = assets["checkpoint"]
    config = validation_config(assets["features2"], 2)
    validator = Validator.build(config, checkpoint=checkpoint, device="cpu", dtype=torch.float32)
    transformer = load_transformer(checkpoint).train()
    processor = load_embeddings_processor(checkpoint, with_feature_extractor=False).train()
    monitor = Monitor(tmp_path / "tb", rank=0, total_steps=10)
    paths = validator.run(0, transformer, text_processor=processor, output_dir=tmp_path, monitor=monitor)
    monitor.close()

    assert paths == [tmp_path / "samples" / "step_000000_1.mp4", tmp_path / "samples" / "step_000000_2.mp4"]
    assert transformer.training and processor.training, "train mode was not restored"
    for path in paths:
        info = probe_video(path)
        assert (info.num_frames, info.width, info.height, info.fps, info.has_audio) == (9, 64, 64, 24.0, True)
        assert read_audio(path).sample_rate == DEMO_AUDIO_SAMPLE_RATE
    # The clips handed to save_clip (re-decoded mp4s can differ bit-wise even for equal clips: libx264 threads).
    assert not torch.equal(clips["step_000000_1.mp4"][0], clips["step_000000_2.mp4"][0]), \
        "different prompts gave the same sample"

    acc = _accumulator(tmp_path / "tb")
    tags = acc.Tags()
    assert {"validation/sample_1", "validation/sample_2"} <= set(tags["images"])
    assert {"validation/sample_1_audio", "validation/sample_2_audio"} <= set(tags["audio"])
    gif = acc.Images("validation/sample_1")[0]
    assert (gif.step, gif.width, gif.height) == (0, 64, 64)
    assert gif.encoded_image_string[:6] in (b"GIF89a", b"GIF87a")
    audio = acc.Audio("validation/sample_1_audio")[0]
    assert audio.sample_rate == DEMO_AUDIO_SAMPLE_RATE and audio.length_frames == 33 * 480

    # a second run at a later step is the same sample (same seed, same weights)
    again = validator.run(5, transformer, text_processor=processor, output_dir=tmp_path)
    assert [p.name for p in again] == ["step_000005_1.mp4", "step_000005_2.mp4"]
    for i in (1, 2):
        assert_same_clip(clips[f"step_000005_{i}.mp4"], clips[f"step_000000_{i}.mp4"], f"sample {i}")


def test_validator_with_gemma_and_first_frame_images_writes_pngs(assets, tmp_path):
    gemma = build_tiny_gemma(tmp_path / "gemma")
    images = []
    for i in range(2):
        images.append(tmp_path / f"image_{i}.png")
        write_image(images[-1], test_pattern_frames(1, 40, 72, seed=i)[0])
    config = ValidationConfig(prompts=PROMPTS[:2], text_encoder_path=gemma, images=images, video_dims=(64, 64, 1),
                              frame_rate=24.0, inference_steps=2, stg_blocks=(0,), generate_audio=False)
    validator = Validator.build(config, checkpoint=assets["checkpoint"], device="cpu", dtype=torch.float32)
    assert validator.audio_decoder is None and validator.vocoder is None
    assert all(c.image_latents.shape == (1, 128, 1, 2, 2) for c in validator.conditionings)
    assert validator.requests[0].negative_prompt_features is not None
    transformer = load_transformer(assets["checkpoint"])
    processor = load_embeddings_processor(assets["checkpoint"], with_feature_extractor=False)
    monitor = Monitor(tmp_path / "tb", rank=0, total_steps=10)
    paths = validator.run(3, transformer, text_processor=processor, output_dir=tmp_path, monitor=monitor)
    monitor.close()
    assert [p.name for p in paths] == ["step_000003_1.png", "step_000003_2.png"]
    assert read_video(paths[0]).frames.shape == (1, 64, 64, 3)
    assert set(_accumulator(tmp_path / "tb").Tags()["images"]) >= {"validation/sample_1", "validation/sample_2"}


def test_build_errors(assets, tmp_path):
    with pytest.raises(ValueError, match=r"validation.stg_blocks \[29\] are out of range"):
        Validator.build(validation_config(assets["features2"], 2, stg_blocks=(29,)), checkpoint=assets["checkpoint"],
                        dtype=torch.float32)
    with pytest.raises(ValueError, match="holds 3 prompts but validation.prompts has 2"):
        Validator.build(validation_config(assets["features"], 2), checkpoint=assets["checkpoint"],
                        dtype=torch.float32)
    no_negative = save_prompt_features(tmp_path / "f.pt", [random_features(0, 4)])
    with pytest.raises(ValueError, match="no negative prompt features"):
        Validator.build(validation_config(no_negative, 1), checkpoint=assets["checkpoint"], dtype=torch.float32)


# ------------------------------------------------------------------------------------------------------------
# Two ranks, FSDP2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank: int, world_size: int, root: str, port: int) -> None:
    import torch.distributed as dist

    from ltxf.parallel import build_mesh, parallelize

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
    try:
        root_path = Path(root)
        checkpoint = root_path / "tiny.safetensors"
        config = validation_config(root_path / "features.pt", len(PROMPTS))
        validator = Validator.build(config, checkpoint=checkpoint, device="cpu", dtype=torch.float32)
        transformer = load_transformer(checkpoint)
        parallelize(transformer, mesh=build_mesh(world_size, world_size, torch.device("cpu")),
                    activation_checkpointing=False, compile=False, param_dtype=None, reduce_dtype=torch.float32)
        processor = load_embeddings_processor(checkpoint, with_feature_extractor=False)
        monitor = Monitor(root_path / "two" / "tb", rank=rank, total_steps=10)
        clips: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        validation_module.save_clip = record_saved_clips(clips)  # this spawned process only
        paths = validator.run(5, transformer, text_processor=processor, output_dir=root_path / "two",
                              monitor=monitor, rank=rank, world_size=world_size)
        monitor.close()
        (root_path / f"paths_rank{rank}.json").write_text(json.dumps([str(p) for p in paths]))
        if rank == 0:
            torch.save(clips, root_path / "two_clips.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_fsdp_three_prompts_match_one_process(assets, monkeypatch):
    import torch.multiprocessing as mp

    root = assets["root"]
    mp.spawn(_two_rank_worker, args=(2, str(root), _free_port()), nprocs=2, join=True)
    rank0 = [Path(p) for p in json.loads((root / "paths_rank0.json").read_text())]
    assert json.loads((root / "paths_rank1.json").read_text()) == []
    assert [p.name for p in rank0] == [f"step_000005_{i}.mp4" for i in (1, 2, 3)]

    checkpoint = assets["checkpoint"]
    validator = Validator.build(validation_config(assets["features"], len(PROMPTS)), checkpoint=checkpoint,
                                device="cpu", dtype=torch.float32)
    clips: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    monkeypatch.setattr(validation_module, "save_clip", record_saved_clips(clips))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: CPU kernels may sum in another order with more threads
    try:
        one = validator.run(5, load_transformer(checkpoint), output_dir=root / "one",
                            text_processor=load_embeddings_processor(checkpoint, with_feature_extractor=False))
    finally:
        torch.set_num_threads(threads)
    sharded_clips = torch.load(root / "two_clips.pt", weights_only=True)
    assert sorted(sharded_clips) == sorted(clips) == [p.name for p in one]
    for name in clips:
        # Same fp32 math on all-gathered weights, one thread on both sides: identical samples, prompt by prompt.
        assert_same_clip(clips[name], sharded_clips[name], name)
    for path in rank0:
        info = probe_video(path)
        assert (info.num_frames, info.width, info.height, info.has_audio) == (9, 64, 64, True), path.name
    assert {"validation/sample_1", "validation/sample_3"} <= set(_accumulator(root / "two" / "tb").Tags()["images"])


def test_per_sample_conditions_frozen_modality_and_audio_only_wav(assets, tmp_path):
    """Sample 1 is video-to-audio (the given clip frozen and muxed into the .mp4), sample 2 video with an audio
    prefix; a text-to-audio validation writes .wav files. Condition media are encoded once, at build."""
    from ltxf.conditions import SampleCondition
    from ltxf.media import write_audio, write_video
    from tests.test_generate import test_pattern_frames

    write_video(tmp_path / "clip.mp4", test_pattern_frames(9, 64, 64), 24.0)
    t = torch.arange(16_000) / 16_000
    write_audio(tmp_path / "tone.wav", (0.4 * torch.sin(2 * torch.pi * 330 * t))[None].repeat(2, 1), 16_000)
    conditions = ((SampleCondition(type="video_to_audio", path=tmp_path / "clip.mp4"),),
                  (SampleCondition(type="prefix", modality="audio", path=tmp_path / "tone.wav", duration=0.16),))
    config = validation_config(assets["features2"], 2, conditions=conditions)
    checkpoint = assets["checkpoint"]
    validator = Validator.build(config, checkpoint=checkpoint, device="cpu", dtype=torch.float32)
    assert all(c.conditions is not None for c in validator.conditionings)
    transformer = load_transformer(checkpoint)
    processor = load_embeddings_processor(checkpoint, with_feature_extractor=False)
    paths = validator.run(0, transformer, text_processor=processor, output_dir=tmp_path / "run")
    assert [p.name for p in paths] == ["step_000000_1.mp4", "step_000000_2.mp4"]
    assert all(probe_video(p).has_audio for p in paths)

    audio_only = validation_config(assets["features2"], 2, generate_video=False)
    validator = Validator.build(audio_only, checkpoint=checkpoint, device="cpu", dtype=torch.float32)
    paths = validator.run(0, transformer, text_processor=processor, output_dir=tmp_path / "t2a")
    assert [p.name for p in paths] == ["step_000000_1.wav", "step_000000_2.wav"]
    assert read_audio(paths[0]).sample_rate == DEMO_AUDIO_SAMPLE_RATE
    with pytest.raises(ValueError, match="one tuple of conditions per prompt"):
        validation_config(assets["features2"], 2, conditions=conditions[:1])
